// One client connection, from accept to close: read the ClientHello, route, dial, relay.
//
// Written for the machine (see ../shared/PERFORMANCE-NOTES.md): both sockets read with `onread`
// into one scratch buffer shared by every connection (no stream machinery, no allocation per
// read); the event handlers are shared functions that find their connection through a symbol on
// the socket, so a connection allocates no closures; the ClientHello reader and the buffered
// hello are released as soon as they have been used, so an idle relay holds only its two sockets.
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import type { ConnectionResult } from '../metrics/metrics.ts';
import { ClientHelloReader, type HelloVerdict } from './clienthello.ts';
import { proxyHeader, unmapIPv4 } from './proxyprotocol.ts';
import type { BackendSpec } from './table.ts';
import type { RouterServer } from './server.ts';

const FALLBACK_ROUTE = 'fallback';
/** Socket buffering before backpressure pauses the other side: fewer pause/resume round trips. */
const HIGH_WATER_MARK = 256 * 1024;

/**
 * Reads land in one scratch buffer shared by every socket (libuv reads one socket at a time, and
 * the callback consumes the bytes before returning), so an idle relay holds no read buffer at
 * all. A read that fills the scratch buffer means a bulk transfer: that socket then gets a buffer
 * of its own, written out in place without a copy.
 */
const READ_SIZE = 64 * 1024;
const scratch = Buffer.allocUnsafe(READ_SIZE);

/**
 * net.Socket's slot for the `onread` buffer selector, which Node calls after every read and
 * whose result becomes the buffer for the next. Sockets are built with `onread.buffer` set to
 * `scratch` itself, so an idle relay has no selector (no closure, no call per read); a socket that
 * starts a bulk transfer is given one in this slot, and reads into its own buffer from then on.
 * Internal to Node, like the accept callback RouterServer takes over: found once at load, and a
 * Node without it fails at once rather than relaying wrong bytes.
 */
const kBufferGen: symbol = (() => {
  const probe = new net.Socket();
  const found = Object.getOwnPropertySymbols(probe).find((sym) => sym.description === 'kBufferGen');
  probe.destroy();
  if (found === undefined) throw new Error(`net.Socket has no onread buffer slot in this Node.js (${process.version}); run the pinned Node 24 (npm ci)`);
  return found;
})();

const kConn = Symbol('sni-router.connection');
/** What #chunks becomes once the buffered bytes are sent or dropped: one shared empty list. */
const NO_CHUNKS: Buffer[] = Object.freeze([]) as unknown as Buffer[];
type Sock = net.Socket & { [kConn]?: Connection };

const Phase = { Hello: 0, Dialing: 1, Relaying: 2, Done: 3 } as const;
type Phase = (typeof Phase)[keyof typeof Phase];

export class Connection {
  readonly #server: RouterServer;
  readonly #client: Sock;
  /** The client's address when the per-IP limit counted it, else null (looked up only if needed). */
  readonly #countedIp: string | null;
  readonly #acceptedAt = performance.now();
  #phase: Phase = Phase.Hello;
  #reader: ClientHelloReader | null;
  #chunks: Buffer[] = [];
  #timer: NodeJS.Timeout | null;
  #clientEnded = false;
  #backendEnded = false;
  #clientClosed = false;
  #backendClosed = true;
  #backend: BackendSpec | null = null;
  #sock: Sock | null = null;
  #addrIndex = 0;
  #dialStartedAt = 0;
  #route = FALLBACK_ROUTE;
  #result: ConnectionResult = 'ok';
  #sni: string | null = null;
  #alpn: readonly string[] | null = null;
  #relaying = false;
  /** Up (client → backend) and down: the reading socket's own buffer, once it moved a bulk transfer. */
  #up: OwnBuffer | null = null;
  #down: OwnBuffer | null = null;
  #flushedUp = 0;
  #flushedDown = 0;

  /**
   * Wraps an accepted connection's libuv handle in a Socket that reads with `onread` (net.Server
   * has no option for it; RouterServer hands us the handle instead). Reading starts at once; the
   * Connection built on it must be attached before the event loop turns.
   */
  static socketFor(handle: unknown): net.Socket {
    // `handle` is net.Socket's own (undocumented) way to wrap an accepted handle, as net.Server does.
    const options = {
      handle, allowHalfOpen: true, readableHighWaterMark: HIGH_WATER_MARK, writableHighWaterMark: HIGH_WATER_MARK,
      onread: { buffer: scratch, callback: Connection.#onClientRead },
    } as net.SocketConstructorOpts;
    const sock = new net.Socket(options);
    sock.setNoDelay(true);
    return sock;
  }

  /** `client` must come from Connection.socketFor. */
  constructor(server: RouterServer, client: net.Socket, countedIp: string | null) {
    this.#server = server;
    this.#client = client as Sock;
    this.#countedIp = countedIp;
    this.#reader = new ClientHelloReader(server.settings.maxClientHelloBytes);
    this.#client[kConn] = this;
    client.on('end', Connection.#onClientEnd);
    client.on('error', Connection.#onClientError);
    client.on('close', Connection.#onClientClose);
    this.#timer = setTimeout(Connection.#onHelloTimeout, server.settings.clientHelloTimeoutMs, this);
  }

  get countedIp(): string | null {
    return this.#countedIp;
  }

  /** The client's address (an IPv4 client on a dual-stack socket as IPv4). */
  get clientAddress(): string {
    return this.#countedIp ?? unmapIPv4(this.#client.remoteAddress ?? '');
  }

  // ---- handlers: shared functions, `this` is the socket ----

  /**
   * onread callback of the client socket. Returning false stops reading: while the route is
   * looked up and dialed, while a write of this socket's own buffer is in flight, or while the
   * backend is not keeping up.
   */
  static #onClientRead(this: Sock, n: number, buf: Buffer): boolean {
    const c = this[kConn];
    if (c === undefined) return false;
    if (c.#phase === Phase.Relaying) return Connection.#relay(c, c.#sock!, n, buf, true);
    if (c.#phase !== Phase.Hello) return false;
    const chunk = Buffer.copyBytesFrom(buf, 0, n);
    c.#chunks.push(chunk);
    const verdict = c.#reader!.push(chunk);
    if (verdict === null) return true;
    c.#routeBy(verdict);
    return false;
  }

  /** onread callback of the backend socket: see #onClientRead. */
  static #onBackendRead(this: Sock, n: number, buf: Buffer): boolean {
    const c = this[kConn]!;
    if (c.#phase !== Phase.Relaying) return false;
    return Connection.#relay(c, c.#client, n, buf, false);
  }

  /**
   * Writes what one socket just read to the other. From the shared scratch buffer the bytes are
   * copied out (they are overwritten by the next read of any socket); a read that filled it means
   * a bulk transfer, so this socket gets a buffer of its own for its next reads. An own buffer is
   * written in place, and read into again only once that write is done: a write the kernel took
   * at once is done before write() returns (the queued length does not grow).
   */
  static #relay(c: Connection, to: Sock, n: number, buf: Buffer, up: boolean): boolean {
    if (buf === scratch) {
      const ok = to.write(Buffer.copyBytesFrom(buf, 0, n));
      if (n === READ_SIZE) {
        if (up) c.#up ??= new OwnBuffer(c.#client, to);
        else c.#down ??= new OwnBuffer(c.#sock!, to);
      }
      return ok;
    }
    const own = up ? c.#up! : c.#down!;
    const before = to.writableLength;
    const ok = to.write(n === buf.length ? buf : buf.subarray(0, n), own.written);
    const after = to.writableLength;
    if (after === before || after === 0) return ok;
    own.busy = true;
    return false;
  }

  static #onHelloTimeout(c: Connection): void {
    c.#timer = null;
    if (c.#phase === Phase.Hello) c.#routeBy({ kind: 'failure', reason: 'timeout', detail: 'no complete ClientHello in time' });
  }

  static #onClientEnd(this: Sock): void {
    const c = this[kConn]!;
    c.#clientEnded = true;
    if (c.#phase === Phase.Hello) {
      c.#routeBy({ kind: 'failure', reason: 'closed', detail: 'client closed before the ClientHello was complete' });
    } else if (c.#phase === Phase.Relaying) {
      Connection.#forwardEnd(c.#sock!, c.#backendEnded);
    }
  }

  static #onBackendEnd(this: Sock): void {
    const c = this[kConn]!;
    c.#backendEnded = true;
    Connection.#forwardEnd(c.#client, c.#clientEnded);
  }

  /**
   * Half-close: a FIN from one side becomes a FIN to the other, and the other direction keeps
   * flowing. When the receiving side has already sent its own FIN, both directions are done:
   * closing (which sends the FIN) saves a shutdown() call, once everything queued is written.
   */
  static #forwardEnd(to: Sock, toAlreadyEnded: boolean): void {
    if (toAlreadyEnded && to.writableLength === 0) to.destroy();
    else to.end();
  }

  static #onClientDrain(this: Sock): void {
    const c = this[kConn]!;
    if (c.#down === null || !c.#down.busy) c.#sock?.resume();
  }

  static #onBackendDrain(this: Sock): void {
    const c = this[kConn]!;
    if (c.#up === null || !c.#up.busy) c.#client.resume();
  }

  static #onIdleTimeout(this: Sock): void {
    const c = this[kConn]!;
    if (c.#result === 'ok') c.#result = 'idle_timeout';
    c.#client.destroy();
    c.#sock?.destroy();
  }

  static #onClientError(this: Sock, err: NodeJS.ErrnoException): void {
    const c = this[kConn]!;
    if (c.#result === 'ok') c.#result = isReset(err) ? 'reset' : 'error';
    c.#sock?.destroy();
  }

  static #onBackendError(this: Sock, err: NodeJS.ErrnoException): void {
    const c = this[kConn]!;
    if (c.#phase === Phase.Dialing) {
      const backend = c.#backend!;
      c.#server.dialFailed(backend, backend.addrs[c.#addrIndex], err);
      c.#addrIndex++;
      return; // 'close' follows; it dials the next address
    }
    if (c.#result === 'ok') c.#result = isReset(err) ? 'reset' : 'error';
    c.#client.destroy();
  }

  static #onDialTimeout(c: Connection): void {
    c.#timer = null;
    c.#sock?.destroy(Object.assign(new Error('dial timeout'), { code: 'ETIMEDOUT' }));
  }

  static #onBackendConnect(this: Sock): void {
    this[kConn]!.#startRelay();
  }

  static #onBackendClose(this: Sock): void {
    const c = this[kConn]!;
    c.#backendClosed = true;
    if (c.#phase === Phase.Dialing) {
      if (c.#timer !== null) {
        clearTimeout(c.#timer);
        c.#timer = null;
      }
      if (c.#clientClosed) {
        if (c.#result === 'ok') c.#result = 'error';
        c.#finish();
      } else {
        c.#dial();
      }
      return;
    }
    if (c.#clientClosed) c.#finish();
  }

  static #onClientClose(this: Sock, hadError: boolean): void {
    const c = this[kConn]!;
    c.#clientClosed = true;
    switch (c.#phase) {
      case Phase.Hello:
        c.#routeBy({ kind: 'failure', reason: 'closed', detail: hadError ? 'client connection reset' : 'client closed' });
        return;
      case Phase.Dialing:
        // The dial's own close handler finishes the connection.
        c.#sock?.destroy();
        return;
      case Phase.Relaying:
        if (hadError) c.#sock!.destroy();
        if (c.#backendClosed) c.#finish();
        return;
    }
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
    this.#client.pause();
    m.clientHelloDuration.observe((performance.now() - this.#acceptedAt) / 1000);
    let backend: BackendSpec | null = null;
    if (verdict.kind === 'hello') {
      const hello = verdict.hello;
      this.#sni = hello.sni;
      this.#alpn = hello.alpn;
      if (hello.helloBytes > 0) m.clientHelloBytes.observe(hello.helloBytes);
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
    if (this.#clientClosed) {
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
    return this.#server.router.table.fallback;
  }

  #bufferedBytes(): number {
    let n = 0;
    for (const c of this.#chunks) n += c.length;
    return n;
  }

  #dial(): void {
    const backend = this.#backend!;
    const index = this.#server.nextAddr(backend, this.#addrIndex);
    if (index < 0) {
      this.#result = 'dial_failed';
      this.#finish();
      return;
    }
    this.#addrIndex = index;
    const addr = backend.addrs[index];
    const split = addr.lastIndexOf(':');
    const host = addr.charCodeAt(0) === 0x5b /* [ */ ? addr.slice(1, split - 1) : addr.slice(0, split);
    this.#dialStartedAt = performance.now();
    this.#backendClosed = false;
    // net.Socket passes its options on to stream.Duplex, which reads the high-water marks.
    const options: net.NetConnectOpts & { highWaterMark: number } = {
      host, port: Number(addr.slice(split + 1)), allowHalfOpen: true, noDelay: true, highWaterMark: HIGH_WATER_MARK,
      onread: { buffer: scratch, callback: Connection.#onBackendRead },
    };
    const sock = net.connect(options) as Sock;
    sock[kConn] = this;
    this.#sock = sock;
    this.#timer = setTimeout(Connection.#onDialTimeout, this.#server.settings.backendDialTimeoutMs, this);
    sock.on('connect', Connection.#onBackendConnect);
    sock.on('error', Connection.#onBackendError);
    sock.on('close', Connection.#onBackendClose);
  }

  #startRelay(): void {
    const server = this.#server;
    const backend = this.#backend!;
    const sock = this.#sock!;
    const client = this.#client;
    const connectedAt = performance.now();
    if (this.#timer !== null) {
      clearTimeout(this.#timer);
      this.#timer = null;
    }
    if (this.#clientClosed) {
      server.dialSucceeded(backend.addrs[this.#addrIndex]);
      server.metrics.dialTook(backend.name, (connectedAt - this.#dialStartedAt) / 1000);
      sock.destroy();
      return;
    }
    this.#phase = Phase.Relaying;
    this.#relaying = true;
    server.metrics.activeChanged(backend.name, 1);

    // First what the backend waits for (time to first byte): the PROXY header and every byte
    // read so far, in one write. The bookkeeping follows.
    const parts = this.#chunks;
    this.#chunks = NO_CHUNKS;
    if (backend.proxyProtocol !== null) {
      parts.unshift(proxyHeader(backend.proxyProtocol, {
        srcAddr: client.remoteAddress ?? '',
        srcPort: client.remotePort ?? 0,
        dstAddr: client.localAddress ?? '',
        dstPort: client.localPort ?? 0,
      }));
    }
    if (parts.length > 0) sock.write(parts.length === 1 ? parts[0] : Buffer.concat(parts));

    client.on('drain', Connection.#onClientDrain);
    sock.on('drain', Connection.#onBackendDrain);
    sock.on('end', Connection.#onBackendEnd);
    // Both directions pass through the client socket, so its timer sees all activity.
    if (server.settings.idleTimeoutMs > 0) {
      client.setTimeout(server.settings.idleTimeoutMs);
      client.on('timeout', Connection.#onIdleTimeout);
    }
    if (this.#clientEnded) sock.end();
    else client.resume();

    server.dialSucceeded(backend.addrs[this.#addrIndex]);
    server.metrics.dialTook(backend.name, (connectedAt - this.#dialStartedAt) / 1000);
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
    if (!this.#client.destroyed) this.#client.destroy();
    this.#chunks = NO_CHUNKS;
    if (wasRelaying) server.metrics.activeChanged(this.#backend!.name, -1);
    server.release(this);
    this.flushBytes();
    server.metrics.connectionClosed(this.#route, this.#result);
    if (server.accessLog) {
      const b = this.#backend;
      server.logger.info({
        client: this.clientAddress,
        client_port: this.#client.remotePort,
        sni: this.#sni,
        alpn: this.#alpn,
        route: this.#route,
        backend: b?.name ?? null,
        backend_addr: b === null ? null : b.addrs[Math.min(this.#addrIndex, b.addrs.length - 1)],
        bytes_up: this.#client.bytesRead,
        bytes_down: this.#client.bytesWritten,
        duration_ms: Math.round((performance.now() - this.#acceptedAt) * 1000) / 1000,
        result: this.#result,
      }, 'connection');
    }
  }

  /** Adds bytes relayed since the last flush to bytes_total (at scrape time and at close). */
  flushBytes(): void {
    if (!this.#relaying) return;
    const up = this.#client.bytesRead;
    const down = this.#client.bytesWritten;
    this.#server.metrics.bytesRelayed(this.#backend!.name, up - this.#flushedUp, down - this.#flushedDown);
    this.#flushedUp = up;
    this.#flushedDown = down;
  }

  /** Closes the connection now (shutdown grace over). */
  abort(result: ConnectionResult): void {
    this.#result = result;
    this.#client.destroy();
    this.#sock?.destroy();
    if (this.#phase === Phase.Hello) this.#finish();
  }
}

/**
 * A socket's own read buffer (bulk transfers only: idle relays hold none). It is written out in
 * place, so it is busy, not to be read into, until that write is done; then reading resumes
 * unless the receiving side is past its high-water mark (its 'drain' resumes reading instead).
 */
class OwnBuffer {
  readonly buf = Buffer.allocUnsafe(READ_SIZE);
  busy = false;
  readonly written: () => void;

  /** Makes `from` read into this buffer from its next read on (see kBufferGen). */
  constructor(from: net.Socket, to: net.Socket) {
    const buf = this.buf;
    (from as net.Socket & Record<symbol, unknown>)[kBufferGen] = () => buf;
    this.written = () => {
      this.busy = false;
      if (!to.writableNeedDrain) from.resume();
    };
  }
}

function isReset(err: NodeJS.ErrnoException): boolean {
  return err.code === 'ECONNRESET' || err.code === 'EPIPE';
}

export { HIGH_WATER_MARK };
