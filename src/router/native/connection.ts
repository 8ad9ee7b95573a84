// One client connection on the native relay, from accept to close: read the ClientHello, decide
// (decision.ts), dial (dial.ts), relay (pump.ts), account (accounting.ts). This file is the state
// machine that joins them: Hello → Dialing → Relaying → Done. An idle relay holds its two
// handles, this object and its two directions; the ClientHello reader, the buffered hello and
// the dial are dropped as soon as they have served.
import { performance } from 'node:perf_hooks';
import { ClientHelloReader, type HelloVerdict } from '../clienthello.ts';
import type { ClientPeer, ConnectionHost, RelayConnection } from '../connection-host.ts';
import { afterDialFailure } from '../decision.ts';
import { proxyHeader, unmapIPv4 } from '../proxyprotocol.ts';
import { type DialDecision, Phase, RelayState } from '../relay-state.ts';
import { Dial, type DialOwner } from './dial.ts';
import { OPTIONS_INHERITED, type TcpHandle, errorName, localOf, peerOf } from './handles.ts';
import {
  Direction, FAILED, type PumpHandle, type PumpOwner, isEof, isReset, kDirection, onRead, scratch,
} from './pump.ts';

/** Bytes kept from the client while its backend is dialled before reading stops. */
const DIAL_BUFFER_LIMIT = 64 * 1024;

/** What #chunks becomes once the buffered bytes are sent or dropped: one shared empty list. */
const NO_CHUNKS: Buffer[] = Object.freeze([]) as unknown as Buffer[];


/** The client's address (an IPv4 client on a dual-stack socket as IPv4) and port. */
export function clientPeer(handle: TcpHandle): ClientPeer {
  const p = peerOf(handle);
  return { ip: unmapIPv4(p.address ?? ''), port: p.port ?? null };
}

export class NativeConnection extends RelayState implements RelayConnection, PumpOwner, DialOwner {
  readonly #client: PumpHandle;
  /**
   * The client's address, looked up at accept when the per-IP limit or the access log needs it
   * (a handle whose peer has hung up no longer knows it), else null.
   */
  readonly #peer: ClientPeer | null;
  readonly #counted: boolean;
  #reader: ClientHelloReader | null;
  #chunks: Buffer[] = [];
  #helloTimer: NodeJS.Timeout | null;
  #dial: Dial | null = null;
  /** Client → backend; from the start, since the client is read from the start. */
  readonly #up: Direction;
  /** Backend → client, once connected. */
  #down: Direction | null = null;
  /** Bytes the client sent while the backend was dialled (see #dialRead). */
  #dialBuffered = 0;
  /** Sweep ticks since the last read either way (RouterServer's sweeper). */
  #idleTicks = 0;
  /** The client's connection failed (reset) before relaying began. */
  #clientGone = false;

  /** Takes an accepted connection's libuv handle and starts reading the ClientHello. */
  constructor(host: ConnectionHost, client: TcpHandle, peer: ClientPeer | null, counted: boolean) {
    super(host);
    this.#peer = peer;
    this.#counted = counted;
    const settings = host.settings;
    this.#reader = new ClientHelloReader(settings.maxClientHelloBytes);
    this.#helloTimer = setTimeout(NativeConnection.#onHelloTimeout, settings.clientHelloTimeoutMs, this);
    const h = this.#client = client as PumpHandle;
    const up = this.#up = new Direction(this, h);
    h[kDirection] = up;
    h.onread = onRead;
    if (!OPTIONS_INHERITED) {
      h.setNoDelay(true);
      if (settings.tcpKeepaliveMs > 0) h.setKeepAlive(true, settings.tcpKeepaliveMs / 1000);
    }
    h.useUserBuffer(scratch);
    up.reading = true;
    const err = h.readStart();
    if (err !== 0) {
      up.reading = false;
      up.eof = true;
      this.#clientGone = true;
      this.#routeBy({ kind: 'failure', reason: 'closed', detail: `client connection failed (${errorName(err)})` });
    }
  }

  get countedIp(): string | null {
    return this.#counted ? this.#peer!.ip : null;
  }

  get bytesUp(): number {
    return this.#up.bytes;
  }

  get bytesDown(): number {
    return this.#down?.bytes ?? 0;
  }

  // ---- PumpOwner: reads, and the ends of reading and writing ----

  read(dir: Direction, n: number): Buffer | undefined {
    if (this.phase === Phase.Relaying) {
      this.#idleTicks = 0;
      return dir.relay(n);
    }
    if (this.phase === Phase.Hello) this.#helloRead(n);
    else if (this.phase === Phase.Dialing) this.#dialRead(n);
    return undefined;
  }

  readEnded(dir: Direction, code: number): void {
    dir.reading = false;
    if (dir !== this.#up) {
      // The backend: read only while relaying.
      if (isEof(code)) dir.end();
      else this.failed(code);
      return;
    }
    if (isEof(code)) {
      dir.eof = true;
      if (this.phase === Phase.Hello) {
        this.#routeBy({ kind: 'failure', reason: 'closed', detail: 'client closed before the ClientHello was complete' });
      } else if (this.phase === Phase.Relaying) {
        dir.end();
      }
      // While dialling: the FIN is forwarded once the relay starts.
      return;
    }
    if (this.phase === Phase.Hello) {
      dir.eof = true;
      this.#clientGone = true;
      this.#routeBy({ kind: 'failure', reason: 'closed', detail: 'client connection reset' });
    } else {
      this.failed(code);
    }
  }

  /** A read, write or shutdown failed: the relay is over, both sides are closed. */
  failed(code: number): void {
    this.endWith(isReset(code) ? 'reset' : 'error');
    this.finish();
  }

  /** Once both sides have sent their FIN and nothing is left to write, the connection closes. */
  settled(): void {
    const up = this.#up;
    const down = this.#down;
    if (down !== null && up.eof && down.eof && up.pending === 0 && down.pending === 0) this.finish();
  }

  // ---- the hello ----

  /** A hello-phase read: keep a copy, and route once the ClientHello is complete (or is not one). */
  #helloRead(n: number): void {
    this.#up.bytes += n;
    const chunk = Buffer.copyBytesFrom(scratch, 0, n);
    this.#chunks.push(chunk);
    const verdict = this.#reader!.push(chunk);
    if (verdict !== null) this.#routeBy(verdict);
  }

  /**
   * What the client sends while the backend is dialled is kept with the hello, up to a bound
   * (then reading stops until the relay starts). Reading on through the dial saves stopping and
   * starting the client's reads (two epoll changes) for every connection.
   */
  #dialRead(n: number): void {
    this.#up.bytes += n;
    this.#chunks.push(Buffer.copyBytesFrom(scratch, 0, n));
    if ((this.#dialBuffered += n) >= DIAL_BUFFER_LIMIT) this.#up.pause();
  }

  static #onHelloTimeout(c: NativeConnection): void {
    c.#helloTimer = null;
    if (c.phase === Phase.Hello) c.#routeBy({ kind: 'failure', reason: 'timeout', detail: 'no complete ClientHello in time' });
  }

  #stopHelloTimer(): void {
    if (this.#helloTimer === null) return;
    clearTimeout(this.#helloTimer);
    this.#helloTimer = null;
  }

  #routeBy(verdict: HelloVerdict): void {
    this.#stopHelloTimer();
    this.#reader = null;
    // Everything read so far is buffered: it is what a dialled backend gets first.
    const d = this.judge(verdict, this.#up.bytes, this.#clientGone);
    if (d.kind === 'close') {
      this.finish();
      return;
    }
    this.phase = Phase.Dialing;
    this.#dialTo(d);
  }

  // ---- the dial ----

  #dialTo(d: DialDecision): void {
    this.decision = d;
    this.route = d.route;
    const dial = this.#dial = new Dial(this.host, this, d.backend);
    dial.next();
  }

  /**
   * No address of the backend could be reached: a routed connection goes to the fallback like any
   * other it cannot route (decision.ts); the fallback's own failure, or `unroutable: close`, ends it.
   */
  exhausted(dial: Dial): void {
    if (this.phase !== Phase.Dialing || dial !== this.#dial) return;
    this.addrIndex = dial.addrIndex;
    const next = afterDialFailure(this.decision!, this.host.table(), this.host.settings);
    if (next === null) {
      this.endWith('dial_failed');
      this.finish();
      return;
    }
    this.#dialTo(next);
  }

  /** Connected: first what the backend waits for (time to first byte), the bookkeeping after. */
  connected(dial: Dial, sock: PumpHandle): void {
    const connectedAt = performance.now();
    const host = this.host;
    const backend = dial.backend;
    this.#dial = null;
    this.decision = null;
    this.relayedTo = backend;
    this.addrIndex = dial.addrIndex;
    this.phase = Phase.Relaying;
    host.metrics.activeChanged(backend.name, 1);

    const up = this.#up;
    const down = this.#down = new Direction(this, sock);
    up.to = sock;
    down.to = this.#client;
    up.reverse = down;
    down.reverse = up;
    sock[kDirection] = down;
    // The backend has been read since its dial (dial.ts).
    down.reading = true;

    // The PROXY header and every byte read so far, in one write.
    const parts = this.#chunks;
    this.#chunks = NO_CHUNKS;
    if (backend.proxyProtocol !== null) {
      const src = peerOf(this.#client);
      const dst = localOf(this.#client);
      parts.unshift(proxyHeader(backend.proxyProtocol, {
        srcAddr: src.address ?? '', srcPort: src.port ?? 0, dstAddr: dst.address ?? '', dstPort: dst.port ?? 0,
      }));
    }
    if (parts.length > 0 && up.send(parts.length === 1 ? parts[0] : Buffer.concat(parts), false) === FAILED) return;

    // After the hello: a first write goes out at once with Nagle or without.
    sock.setNoDelay(true);
    if (up.eof) up.end();
    else up.resume();
    host.metrics.dialTook(backend.name, (connectedAt - dial.startedAt) / 1000);
  }

  // ---- the end ----

  /**
   * One tick of the server's sweep. A relay with no read either way for more than `idleLimit`
   * ticks (0: no limit) is closed. One quiet for `bulkLimit` ticks gives its bulk buffers back, so
   * that a kept-alive connection that once moved a download holds none while it waits.
   */
  tick(idleLimit: number, bulkLimit: number): void {
    if (this.phase !== Phase.Relaying) return;
    const quiet = ++this.#idleTicks;
    if (idleLimit > 0 && quiet > idleLimit) {
      this.endWith('idle_timeout');
      this.finish();
      return;
    }
    if (quiet > bulkLimit) {
      this.#up.quiet();
      this.#down!.quiet();
    }
  }

  protected override peerForLog(): ClientPeer {
    return this.#peer ?? clientPeer(this.#client);
  }

  protected override closeAll(): void {
    this.#stopHelloTimer();
    this.#dial?.cancel();
    this.#dial = null;
    // Closing sends the FIN (or, with unread bytes, a reset); queued writes are dropped: a
    // connection finishes with writes queued only when it failed or timed out.
    this.#client.close();
    this.#down?.from.close();
    this.#chunks = NO_CHUNKS;
    // Closed handles read no more: what no write holds can serve another connection.
    this.#up.release();
    this.#down?.release();
  }

}
