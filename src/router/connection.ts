// One client connection, from accept to close: read the ClientHello, route, dial, relay.
//
// Written for the machine (see ../shared/PERFORMANCE-NOTES.md and bench/PROFILE.md): the relay
// drives libuv's TCP handles directly (./uv.ts), not net.Socket: a read lands in one scratch
// buffer shared by every connection and is written to the other side at once; a FIN is forwarded
// as a shutdown; backpressure stops reading. No stream states, no events, no nextTicks, and the
// handlers are shared functions that find their connection through a symbol on the handle, so a
// connection allocates no closures. The ClientHello reader and the buffered hello are released as
// soon as they have been used: an idle relay holds its two handles and this object.
import { type LookupAddress, lookup } from 'node:dns';
import { isIP } from 'node:net';
import { performance } from 'node:perf_hooks';
import type { ConnectionResult } from '../metrics/metrics.ts';
import { ClientHelloReader, type HelloVerdict } from './clienthello.ts';
import { proxyHeader, unmapIPv4 } from './proxyprotocol.ts';
import { isLoopback } from '../model/self-address.ts';
import type { BackendSpec } from '../model/route.ts';
import type { RouterServer } from './server.ts';
import {
  ConnectWrap, LAST_WRITE_WAS_ASYNC, READ_BYTES, ShutdownWrap, type SocketAddress, streamState, TCP, TCP_SOCKET,
  type TcpHandle, OPTIONS_INHERITED, peerOf, UV_EOF, WriteWrap, type WriteRequest, type ConnectRequest, errorName,
} from './uv.ts';

const FALLBACK_ROUTE = 'fallback';
/** Bytes queued towards one side before reading from the other stops; reading resumes below half. */
const HIGH_WATER_MARK = 256 * 1024;
const LOW_WATER_MARK = HIGH_WATER_MARK / 2;

/**
 * Reads land in one scratch buffer shared by every handle (libuv reads one handle at a time, and
 * the callback writes or copies the bytes before returning), so an idle relay holds no read buffer
 * at all. What is read there is copied into a write of its own size: a write the kernel cannot
 * take at once keeps pointing at its bytes. A large read (BULK_READ) means a bulk transfer: that
 * direction then reads into buffers of its own, written out in place without a copy (see Bulk).
 */
const READ_SIZE = 64 * 1024;
const scratch = Buffer.allocUnsafe(READ_SIZE);
/** Bytes kept from the client while its backend is dialed before reading stops. */
const DIAL_BUFFER_LIMIT = 64 * 1024;
/** A read this large means a bulk transfer (a TURN packet or a page request is far smaller). */
const BULK_READ = 16 * 1024;
/**
 * A bulk direction's read buffers. Larger than the scratch buffer: on loopback and fast links a
 * read then takes what several 64 KiB reads would, and the proxy's CPU per byte halves (bench,
 * 1 stream: ~55% of a core instead of ~95% for the same rate). Spent only on directions moving
 * bulk data, and given back after a quiet sweep tick (Connection.tick).
 */
const BULK_SIZE = 256 * 1024;
/** Bulk buffers given back, for the next bulk direction: allocating 256 KiB is not free. */
const spareBulk: Buffer[] = [];
const SPARE_BULK_MAX = 32;

function bulkBuffer(): Buffer {
  return spareBulk.pop() ?? Buffer.allocUnsafe(BULK_SIZE);
}

/** Keeps a bulk buffer nothing reads into or writes from any more for reuse. */
function spareBuffer(b: Buffer | null): void {
  if (b !== null && spareBulk.length < SPARE_BULK_MAX) spareBulk.push(b);
}

const kConn = Symbol('sni-router.connection');
type Handle = TcpHandle & { [kConn]?: Connection };

/** A write libuv could not finish at once: what it belongs to, and its bytes, kept alive until done. */
type PendingWrite = WriteRequest & { conn: Connection | null; up: boolean; inPlace: boolean; data: Buffer | null };
type PendingConnect = ConnectRequest & { conn: Connection | null };

/**
 * The request object for the next write. A write that completes at once never touches it (libuv
 * wraps it only for a write it has to queue), so one serves every such write; a queued write
 * keeps it, and the next write gets a fresh one.
 */
let nextWrite = newWriteRequest();

function newWriteRequest(): PendingWrite {
  const req = new WriteWrap() as PendingWrite;
  req.conn = null;
  req.up = false;
  req.inPlace = false;
  req.data = null;
  return req;
}

const FAILED = 0; // the connection is finished
const WRITTEN = 1;
const QUEUED = 2; // libuv holds the bytes until the write is done
type SendResult = typeof FAILED | typeof WRITTEN | typeof QUEUED;

/**
 * A bulk direction's own read buffers: libuv reads into `reading`; a write of it that has to
 * queue makes it `other` and reading goes on into the former `other`, so a transfer keeps reading
 * while one write is in flight and stops only while two are.
 */
class Bulk {
  reading: Buffer = bulkBuffer();
  other: Buffer | null = null;
  /** In-place writes of these buffers queued and not yet done: 0, 1 or 2. */
  writing = 0;

  /**
   * Gives both buffers back for reuse, once nothing reads into `reading` any more. A write still
   * queued points into one of them (which one depends on the order they complete in): then both
   * are left to the garbage collector.
   */
  release(): void {
    if (this.writing !== 0) return;
    spareBuffer(this.reading);
    spareBuffer(this.other);
  }
}

/** What #chunks becomes once the buffered bytes are sent or dropped: one shared empty list. */
const NO_CHUNKS: Buffer[] = Object.freeze([]) as unknown as Buffer[];

const Phase = { Hello: 0, Dialing: 1, Relaying: 2, Done: 3 } as const;
type Phase = (typeof Phase)[keyof typeof Phase];

/** Bits of Connection.#flags. */
const CLIENT_EOF = 1; // the client sent its FIN (or went away during the hello)
const BACKEND_EOF = 2;
const CLIENT_READING = 4;
const BACKEND_READING = 8;
const UP_BUSY = 16; // both of the up direction's own buffers are being written out
const DOWN_BUSY = 32;
const UP_FULL = 64; // the backend's write queue passed the high-water mark
const DOWN_FULL = 128;
const CLIENT_GONE = 256; // the client's connection failed (reset) before relaying began
const RELAYED = 512; // the relay began: bytes count towards bytes_total
const TO_FALLBACK = 1024; // the dial is the fallback's: no other backend to turn to
const COUNTED_IP = 2048; // the per-IP limit counted this connection under #peer.ip
const LOOP_DIAL = 4096; // the address being dialled is the router itself

/** The client's address (an IPv4 client on a dual-stack socket as IPv4) and port. */
export interface ClientPeer {
  readonly ip: string;
  readonly port: number | null;
}

export function clientPeer(handle: TcpHandle): ClientPeer {
  const p = peerOf(handle);
  return { ip: unmapIPv4(p.address ?? ''), port: p.port ?? null };
}

export class Connection {
  readonly #server: RouterServer;
  readonly #client: Handle;
  /**
   * The client's address, looked up at accept when the per-IP limit or the access log needs it
   * (a handle whose peer has hung up no longer knows it), else null.
   */
  readonly #peer: ClientPeer | null;
  readonly #acceptedAt = performance.now();
  #phase: Phase = Phase.Hello;
  #flags = CLIENT_READING;
  #reader: ClientHelloReader | null;
  #chunks: Buffer[] = [];
  #timer: NodeJS.Timeout | null;
  #backend: BackendSpec | null = null;
  #sock: Handle | null = null;
  #addrIndex = 0;
  /** Which dial attempt is current: a late answer to an abandoned one (DNS, connect) is ignored. */
  #attempt = 0;
  #dialStartedAt = 0;
  /** A host-name backend's addresses not yet tried in this dial, and the port to dial. */
  #resolved: LookupAddress[] | null = null;
  #port = 0;
  #route = FALLBACK_ROUTE;
  #result: ConnectionResult = 'ok';
  #sni: string | null = null;
  #alpn: readonly string[] | null = null;
  /** Queued writes not yet done: the connection closes only once there are none. */
  #pending = 0;
  /** Up (client → backend) and down: that direction's own read buffers, once it moves a bulk transfer. */
  #upBulk: Bulk | null = null;
  #downBulk: Bulk | null = null;
  #bytesUp = 0;
  #bytesDown = 0;
  #flushedUp = 0;
  #flushedDown = 0;
  /** Bytes the client sent while the backend was dialed (see #dialRead). */
  #dialBuffered = 0;
  /** Sweep ticks since the last read either way (RouterServer's sweeper). */
  #idleTicks = 0;
  /** Where RouterServer keeps this connection in its list of open ones; -1 when not there. */
  slot = -1;

  /** Takes an accepted connection's libuv handle and starts reading the ClientHello. */
  constructor(server: RouterServer, client: TcpHandle, peer: ClientPeer | null, counted: boolean) {
    this.#server = server;
    this.#client = client as Handle;
    this.#peer = peer;
    if (counted) this.#flags |= COUNTED_IP;
    this.#reader = new ClientHelloReader(server.settings.maxClientHelloBytes);
    this.#timer = setTimeout(Connection.#onHelloTimeout, server.settings.clientHelloTimeoutMs, this);
    const h = this.#client;
    h[kConn] = this;
    h.onread = Connection.#onClientRead;
    if (!OPTIONS_INHERITED) {
      h.setNoDelay(true);
      const ka = server.settings.tcpKeepaliveMs;
      if (ka > 0) h.setKeepAlive(true, ka / 1000);
    }
    h.useUserBuffer(scratch);
    const err = h.readStart();
    if (err !== 0) {
      this.#flags |= CLIENT_GONE | CLIENT_EOF;
      this.#flags &= ~CLIENT_READING;
      this.#routeBy({ kind: 'failure', reason: 'closed', detail: `client connection failed (${errorName(err)})` });
    }
  }

  /** True once the connection is over (it can be over before its constructor returns). */
  get finished(): boolean {
    return this.#phase === Phase.Done;
  }

  /** The address the per-IP limit counted this connection under, else null. */
  get countedIp(): string | null {
    return (this.#flags & COUNTED_IP) !== 0 ? this.#peer!.ip : null;
  }

  /** The client's address (an IPv4 client on a dual-stack socket as IPv4). */
  get clientAddress(): string {
    return (this.#peer ?? clientPeer(this.#client)).ip;
  }

  // ---- handlers: shared functions, `this` is the handle or the request ----

  /**
   * onread of the client handle: the byte count (or EOF, or an error) is in streamState. A Buffer
   * returned here is where libuv reads next (a direction switching buffers).
   */
  static #onClientRead(this: Handle): Buffer | undefined {
    const c = this[kConn];
    if (c === undefined) return undefined;
    const n = streamState[READ_BYTES];
    if (n > 0) {
      if (c.#phase === Phase.Relaying) return Connection.#relay(c, n, true);
      if (c.#phase === Phase.Hello) c.#helloRead(n);
      else if (c.#phase === Phase.Dialing) c.#dialRead(n);
    } else if (n < 0) {
      c.#clientReadEnded(n);
    }
    return undefined;
  }

  /** onread of the backend handle. */
  static #onBackendRead(this: Handle): Buffer | undefined {
    const c = this[kConn];
    if (c === undefined || c.#phase !== Phase.Relaying) return undefined;
    const n = streamState[READ_BYTES];
    if (n > 0) return Connection.#relay(c, n, false);
    if (n < 0) c.#backendReadEnded(n);
    return undefined;
  }

  /**
   * Writes what one side just read to the other: out of the scratch buffer as a copy (the next
   * read of any handle overwrites it), out of a direction's own buffers in place. A read that
   * filled the scratch buffer means a bulk transfer: its direction gets buffers of its own (see
   * Bulk). Returns the buffer the next read goes into when that changes.
   */
  static #relay(c: Connection, n: number, up: boolean): Buffer | undefined {
    c.#idleTicks = 0;
    if (up) c.#bytesUp += n;
    else c.#bytesDown += n;
    const bulk = up ? c.#upBulk : c.#downBulk;
    if (bulk === null) {
      const data = Buffer.allocUnsafe(n);
      scratch.copy(data, 0, 0, n);
      if (c.#send(up, data, false) === FAILED || n < BULK_READ) return undefined;
      const next = new Bulk();
      if (up) c.#upBulk = next;
      else c.#downBulk = next;
      return next.reading;
    }
    const buf = bulk.reading;
    if (c.#send(up, n === buf.length ? buf : buf.subarray(0, n), true) !== QUEUED) return undefined;
    // The buffer just read into is being written out: read into the other one meanwhile, or,
    // with both written out, stop until they are done (the later one is where reading resumes).
    if (++bulk.writing === 1) {
      bulk.other ??= bulkBuffer();
      bulk.reading = bulk.other;
      bulk.other = buf;
      return bulk.reading;
    }
    c.#flags |= up ? UP_BUSY : DOWN_BUSY;
    c.#stopReading(up);
    return undefined;
  }

  /**
   * Writes `data` up (to the backend) or down. A write libuv has to queue holds its bytes until
   * done; past the high-water mark of queued copies, reading from the other side stops.
   */
  #send(up: boolean, data: Buffer, inPlace: boolean): SendResult {
    const to = up ? this.#sock! : this.#client;
    const req = nextWrite;
    const err = to.writeBuffer(req, data);
    if (err !== 0) {
      this.#fail(err);
      return FAILED;
    }
    if (streamState[LAST_WRITE_WAS_ASYNC] === 0) return WRITTEN;
    nextWrite = newWriteRequest();
    req.oncomplete = Connection.#onWriteDone;
    req.conn = this;
    req.up = up;
    req.inPlace = inPlace;
    req.data = data;
    this.#pending++;
    if (!inPlace && to.writeQueueSize >= HIGH_WATER_MARK) {
      this.#flags |= up ? UP_FULL : DOWN_FULL;
      this.#stopReading(up);
    }
    return QUEUED;
  }

  static #onWriteDone(this: PendingWrite, status: number): void {
    const c = this.conn!;
    const up = this.up;
    this.conn = null;
    this.data = null;
    if (c.#phase === Phase.Done) return;
    c.#pending--;
    if (status < 0) {
      c.#fail(status);
      return;
    }
    if (this.inPlace && --(up ? c.#upBulk! : c.#downBulk!).writing === 0) c.#flags &= ~(up ? UP_BUSY : DOWN_BUSY);
    if ((up ? c.#sock! : c.#client).writeQueueSize <= LOW_WATER_MARK) c.#flags &= ~(up ? UP_FULL : DOWN_FULL);
    c.#resumeReading(up);
    c.#closeIfDone();
  }

  /** Stops reading the side that feeds direction `up`. */
  #stopReading(up: boolean): void {
    const bit = up ? CLIENT_READING : BACKEND_READING;
    if ((this.#flags & bit) === 0) return;
    this.#flags &= ~bit;
    (up ? this.#client : this.#sock!).readStop();
  }

  /** Reads again from the side that feeds direction `up`, unless it ended or is held back. */
  #resumeReading(up: boolean): void {
    const f = this.#flags;
    if (up ? (f & (CLIENT_READING | CLIENT_EOF | UP_BUSY | UP_FULL)) !== 0 : (f & (BACKEND_READING | BACKEND_EOF | DOWN_BUSY | DOWN_FULL)) !== 0) return;
    this.#flags |= up ? CLIENT_READING : BACKEND_READING;
    const err = (up ? this.#client : this.#sock!).readStart();
    if (err !== 0) this.#fail(err);
  }

  /** A hello-phase read: keep a copy, and route once the ClientHello is complete (or is not one). */
  #helloRead(n: number): void {
    this.#bytesUp += n;
    const chunk = Buffer.copyBytesFrom(scratch, 0, n);
    this.#chunks.push(chunk);
    const verdict = this.#reader!.push(chunk);
    if (verdict !== null) this.#routeBy(verdict);
  }

  /**
   * What the client sends while the backend is dialed is kept with the hello, up to a bound
   * (then reading stops until the relay starts). Reading on through the dial saves stopping and
   * starting the client's reads (two epoll changes) for every connection.
   */
  #dialRead(n: number): void {
    this.#bytesUp += n;
    this.#chunks.push(Buffer.copyBytesFrom(scratch, 0, n));
    if ((this.#dialBuffered += n) >= DIAL_BUFFER_LIMIT) this.#stopReading(true);
  }

  #clientReadEnded(code: number): void {
    this.#flags &= ~CLIENT_READING;
    if (code === UV_EOF) {
      this.#flags |= CLIENT_EOF;
      if (this.#phase === Phase.Hello) {
        this.#routeBy({ kind: 'failure', reason: 'closed', detail: 'client closed before the ClientHello was complete' });
      } else if (this.#phase === Phase.Relaying) {
        this.#forwardEnd(true);
      }
      return;
    }
    if (this.#phase === Phase.Hello) {
      this.#flags |= CLIENT_GONE | CLIENT_EOF;
      this.#routeBy({ kind: 'failure', reason: 'closed', detail: 'client connection reset' });
    } else {
      this.#fail(code);
    }
  }

  #backendReadEnded(code: number): void {
    this.#flags &= ~BACKEND_READING;
    if (code !== UV_EOF) {
      this.#fail(code);
      return;
    }
    this.#flags |= BACKEND_EOF;
    this.#forwardEnd(false);
  }

  /**
   * Half-close: a FIN from one side becomes a FIN to the other (a shutdown, which libuv sends
   * after every queued write), and the other direction keeps flowing. Once both sides have sent
   * theirs, the connection closes when nothing is left to write. The shutdown has no completion
   * callback (Node calls none for a request without `oncomplete`): nothing waits for it, since
   * closing a handle with its writes done sends the FIN too, and a peer that reset shows in reads.
   */
  #forwardEnd(up: boolean): void {
    if ((this.#flags & (up ? BACKEND_EOF : CLIENT_EOF)) === 0) {
      const err = (up ? this.#sock! : this.#client).shutdown(new ShutdownWrap());
      if (err !== 0) {
        this.#fail(err);
        return;
      }
    }
    this.#closeIfDone();
  }

  #closeIfDone(): void {
    if ((this.#flags & (CLIENT_EOF | BACKEND_EOF)) === (CLIENT_EOF | BACKEND_EOF) && this.#pending === 0) this.#finish();
  }

  /** A read, write or shutdown failed: the relay is over, both sides are closed. */
  #fail(code: number): void {
    if (this.#result === 'ok') {
      const name = errorName(code);
      this.#result = name === 'ECONNRESET' || name === 'EPIPE' ? 'reset' : 'error';
    }
    this.#finish();
  }

  static #onHelloTimeout(c: Connection): void {
    c.#timer = null;
    if (c.#phase === Phase.Hello) c.#routeBy({ kind: 'failure', reason: 'timeout', detail: 'no complete ClientHello in time' });
  }

  /**
   * One tick of the server's sweep. A relay with no read either way for more than `idleLimit`
   * ticks (0: no limit) is closed. One quiet for `bulkLimit` ticks gives its bulk buffers back, so
   * that a kept-alive connection that once moved a download holds none while it waits.
   */
  tick(idleLimit: number, bulkLimit: number): void {
    if (this.#phase !== Phase.Relaying) return;
    const quiet = ++this.#idleTicks;
    if (idleLimit > 0 && quiet > idleLimit) {
      if (this.#result === 'ok') this.#result = 'idle_timeout';
      this.#finish();
      return;
    }
    if (quiet > bulkLimit) {
      if (this.#upBulk !== null) this.#dropBulk(true);
      if (this.#downBulk !== null) this.#dropBulk(false);
    }
  }

  /**
   * The side feeding direction `up` reads into the scratch buffer again and its bulk buffers are
   * given back, unless a write still holds one. useUserBuffer adds a small listener to the handle
   * each time (freed with it): once per quiet second at most, never per read.
   */
  #dropBulk(up: boolean): void {
    const bulk = up ? this.#upBulk! : this.#downBulk!;
    if (bulk.writing !== 0) return;
    (up ? this.#client : this.#sock!).useUserBuffer(scratch);
    bulk.release();
    if (up) this.#upBulk = null;
    else this.#downBulk = null;
  }

  // ---- the state machine ----

  #routeBy(verdict: HelloVerdict): void {
    const server = this.#server;
    const m = server.metrics;
    if (this.#timer !== null) {
      clearTimeout(this.#timer);
      this.#timer = null;
    }
    this.#reader = null;
    m.helloTook((performance.now() - this.#acceptedAt) / 1000);
    let backend: BackendSpec | null = null;
    if (verdict.kind === 'hello') {
      const hello = verdict.hello;
      this.#sni = hello.sni;
      this.#alpn = hello.alpn;
      if (hello.helloBytes > 0) m.helloSize(hello.helloBytes);
      // TLS-ALPN-01 challenges belong to the certificate manager behind the fallback (Caddy),
      // whatever the name: otherwise names routed to TURN could never get a certificate.
      const acme = hello.alpn !== null && server.settings.acmeTlsAlpn === 'fallback' && hello.alpn.includes('acme-tls/1');
      if (!acme && hello.sni !== null) {
        const route = server.router.table.lookup(hello.sni, hello.alpn);
        if (route !== null) {
          backend = route.backend;
          this.#route = route.match;
        }
      }
      if (backend === null) backend = this.#unroutable();
    } else {
      m.clientHelloFailures.inc({ reason: verdict.reason });
      if (server.logger.isLevelEnabled('debug')) {
        server.logger.debug({ client: this.clientAddress, reason: verdict.reason, detail: verdict.detail, bytes: this.#bufferedBytes() },
          'client hello peek failed');
      }
      // A client that went away without sending anything leaves nothing to forward.
      if (verdict.reason === 'closed' && this.#bufferedBytes() === 0) {
        if (this.#result === 'ok') this.#result = 'closed';
      } else {
        backend = this.#unroutable();
      }
    }
    if (backend === null) {
      this.#finish();
      return;
    }
    if ((this.#flags & CLIENT_GONE) !== 0) {
      // The client is gone (reset): nobody to relay for.
      if (this.#result === 'ok') this.#result = 'reset';
      this.#finish();
      return;
    }
    this.#backend = backend;
    this.#phase = Phase.Dialing;
    this.#dial();
  }

  /** The fallback backend, or null under `unroutable: close`. */
  #unroutable(): BackendSpec | null {
    this.#route = FALLBACK_ROUTE;
    if (this.#server.settings.unroutable === 'close') {
      this.#result = 'closed';
      return null;
    }
    this.#flags |= TO_FALLBACK;
    return this.#server.router.table.fallback;
  }

  #bufferedBytes(): number {
    let n = 0;
    for (const c of this.#chunks) n += c.length;
    return n;
  }

  /**
   * Dials the next address to try (RouterServer.nextAddr). When none is left, a routed connection
   * goes to the fallback like any other it cannot route (the stealth rule: closing it at once would
   * tell a prober that the name leads somewhere else); the fallback's own failure, or `unroutable:
   * close`, ends it.
   */
  #dial(): void {
    let backend = this.#backend!;
    let index = this.#server.nextAddr(backend, this.#addrIndex);
    if (index < 0 && (this.#flags & TO_FALLBACK) === 0 && this.#server.settings.unroutable === 'fallback') {
      this.#backend = backend = this.#unroutable()!;
      this.#addrIndex = 0;
      index = this.#server.nextAddr(backend, 0);
    }
    if (index < 0) {
      this.#result = 'dial_failed';
      this.#finish();
      return;
    }
    this.#addrIndex = index;
    const attempt = ++this.#attempt;
    const addr = backend.addrs[index];
    const split = addr.lastIndexOf(':');
    const host = addr.charCodeAt(0) === 0x5b /* [ */ ? addr.slice(1, split - 1) : addr.slice(0, split);
    const port = Number(addr.slice(split + 1));
    this.#dialStartedAt = performance.now();
    this.#timer = setTimeout(Connection.#onDialTimeout, this.#server.settings.backendDialTimeoutMs, this);
    const family = isIP(host);
    if (family !== 0) {
      this.#connect(host, family, port);
      return;
    }
    // A host name (a compose service, say): resolved for each dial, and each of its addresses
    // tried in turn (localhost may be ::1 and 127.0.0.1), as net.connect would.
    try {
      lookup(host, { all: true }, (err, resolved) => {
        if (this.#phase !== Phase.Dialing || this.#attempt !== attempt) return;
        if (err !== null || resolved.length === 0) {
          this.#dialFailed(err?.code ?? 'ENOTFOUND');
          return;
        }
        this.#resolved = resolved;
        this.#connect(resolved[0].address, resolved[0].family, port);
      });
    } catch (err) {
      // dns.lookup throws, rather than calls back, on a name it refuses outright (a NUL byte). The
      // validator never lets such a name into a table; should one get there anyway, it is one
      // failed dial, not an exception that ends the process and every relay in it.
      this.#dialFailed((err as NodeJS.ErrnoException).code ?? 'EINVAL');
    }
  }

  /**
   * Dials one address. The backend is read from the moment its socket exists: libuv then registers
   * it with epoll once for both the connect (POLLOUT) and reads (POLLIN). Started after the connect,
   * reading costs a second registration, which libuv first tries as an add that fails (the socket
   * is still in the epoll set) and then repeats as a change: one io_uring round trip more per
   * connection. Nothing is read before the relay starts: libuv reports a socket's connect before
   * any read, and the connect callback starts the relay.
   */
  #connect(address: string, family: number, port: number): void {
    this.#port = port;
    const sock = new TCP(TCP_SOCKET) as Handle;
    sock[kConn] = this;
    sock.onread = Connection.#onBackendRead;
    sock.useUserBuffer(scratch);
    this.#sock = sock;
    const req = new ConnectWrap() as PendingConnect;
    req.conn = this;
    req.oncomplete = Connection.#onConnect;
    let err = family === 6 ? sock.connect6(req, address, port) : sock.connect(req, address, port);
    if (err === 0) err = sock.readStart();
    if (err !== 0) {
      this.#dialFailed(errorName(err));
      return;
    }
    const server = this.#server;
    if (server.dialLoops(address, port)) {
      // The backend's name resolved to the router itself. The connection is made (its local
      // address is known only now), so that the router sees it arrive and counts the loop; this
      // side sends nothing on it and, once connected, turns to the next address or the fallback.
      this.#flags |= LOOP_DIAL;
      const local: SocketAddress = {};
      sock.getsockname(local);
      server.expectLoop(local, this.#route);
      return;
    }
    this.#flags &= ~LOOP_DIAL;
    // A backend on loopback is watched by the kernel itself (it resets a dead peer's connections);
    // one across a network may vanish without a word.
    const ka = server.settings.tcpKeepaliveMs;
    if (ka > 0 && !isLoopback(address)) sock.setKeepAlive(true, ka / 1000);
  }

  static #onConnect(this: PendingConnect, status: number, sock: Handle): void {
    const c = this.conn!;
    this.conn = null;
    // An abandoned attempt (timed out, or the connection finished meanwhile) has been closed.
    if (c.#sock !== sock || c.#phase !== Phase.Dialing) return;
    if ((c.#flags & LOOP_DIAL) !== 0) {
      c.#flags &= ~LOOP_DIAL;
      c.#dialFailed('ELOOP');
      return;
    }
    if (status >= 0) {
      c.#resolved = null;
      c.#startRelay();
      return;
    }
    const resolved = c.#resolved;
    if (resolved !== null && resolved.length > 1) {
      // The next address of the same host name, within the same dial (and its timeout).
      resolved.shift();
      sock.close();
      c.#connect(resolved[0].address, resolved[0].family, c.#port);
      return;
    }
    c.#dialFailed(errorName(status));
  }

  static #onDialTimeout(c: Connection): void {
    c.#timer = null;
    if (c.#phase === Phase.Dialing) c.#dialFailed('ETIMEDOUT');
  }

  /** This address failed: note it (cooldown, metric, log) and dial the next. */
  #dialFailed(code: string): void {
    if (this.#timer !== null) {
      clearTimeout(this.#timer);
      this.#timer = null;
    }
    if (this.#sock !== null) {
      this.#sock.close();
      this.#sock = null;
    }
    this.#resolved = null;
    const backend = this.#backend!;
    this.#server.dialFailed(backend, backend.addrs[this.#addrIndex], code);
    this.#addrIndex++;
    this.#dial();
  }

  #startRelay(): void {
    const server = this.#server;
    const backend = this.#backend!;
    const sock = this.#sock!;
    const connectedAt = performance.now();
    if (this.#timer !== null) {
      clearTimeout(this.#timer);
      this.#timer = null;
    }
    this.#phase = Phase.Relaying;
    this.#flags |= RELAYED;
    server.metrics.activeChanged(backend.name, 1);

    // First what the backend waits for (time to first byte): the PROXY header and every byte
    // read so far, in one write. The bookkeeping follows.
    const parts = this.#chunks;
    this.#chunks = NO_CHUNKS;
    if (backend.proxyProtocol !== null) {
      const src = peerOf(this.#client);
      const dst: SocketAddress = {};
      this.#client.getsockname(dst);
      parts.unshift(proxyHeader(backend.proxyProtocol, {
        srcAddr: src.address ?? '', srcPort: src.port ?? 0, dstAddr: dst.address ?? '', dstPort: dst.port ?? 0,
      }));
    }
    if (parts.length > 0 && this.#send(true, parts.length === 1 ? parts[0] : Buffer.concat(parts), false) === FAILED) return;

    // After the hello: a first write goes out at once with Nagle or without.
    sock.setNoDelay(true);
    // The backend has been read since its dial (#connect).
    this.#flags |= BACKEND_READING;
    let err = 0;
    if ((this.#flags & CLIENT_EOF) !== 0) this.#forwardEnd(true);
    else if ((this.#flags & CLIENT_READING) === 0) {
      this.#flags |= CLIENT_READING;
      err = this.#client.readStart();
    }
    server.dialSucceeded(backend.addrs[this.#addrIndex]);
    server.metrics.dialTook(backend.name, (connectedAt - this.#dialStartedAt) / 1000);
    if (err !== 0) this.#fail(err);
  }

  #finish(): void {
    if (this.#phase === Phase.Done) return;
    const server = this.#server;
    const wasRelaying = this.#phase === Phase.Relaying;
    this.#phase = Phase.Done;
    if (this.#timer !== null) {
      clearTimeout(this.#timer);
      this.#timer = null;
    }
    // Looked up now only if access logging began after the accept: the lookup fails once the
    // client has hung up, and a closed handle knows nothing at all.
    const peer = server.accessLog ? this.#peer ?? clientPeer(this.#client) : null;
    // Closing sends the FIN (or, with unread bytes, a reset); queued writes are dropped: a
    // connection finishes with writes queued only when it failed or timed out.
    this.#client.close();
    this.#sock?.close();
    this.#chunks = NO_CHUNKS;
    // Closed handles read no more: what no write holds can serve another connection.
    this.#upBulk?.release();
    this.#downBulk?.release();
    this.#upBulk = this.#downBulk = null;
    if (wasRelaying) server.metrics.activeChanged(this.#backend!.name, -1);
    server.release(this);
    this.flushBytes();
    server.metrics.connectionClosed(this.#route, this.#result);
    if (peer !== null) {
      const b = this.#backend;
      server.logger.info({
        client: peer.ip,
        client_port: peer.port,
        sni: this.#sni,
        alpn: this.#alpn,
        route: this.#route,
        backend: b?.name ?? null,
        backend_addr: b === null ? null : b.addrs[Math.min(this.#addrIndex, b.addrs.length - 1)],
        bytes_up: this.#bytesUp,
        bytes_down: this.#bytesDown,
        duration_ms: Math.round((performance.now() - this.#acceptedAt) * 1000) / 1000,
        result: this.#result,
      }, 'connection');
    }
  }

  /** Adds bytes relayed since the last flush to bytes_total (at scrape time and at close). */
  flushBytes(): void {
    if ((this.#flags & RELAYED) === 0) return;
    this.#server.metrics.bytesRelayed(this.#backend!.name, this.#bytesUp - this.#flushedUp, this.#bytesDown - this.#flushedDown);
    this.#flushedUp = this.#bytesUp;
    this.#flushedDown = this.#bytesDown;
  }

  /** Closes the connection now (shutdown grace over). */
  abort(result: ConnectionResult): void {
    this.#result = result;
    this.#finish();
  }
}
