// What every connection knows about itself, whichever relay runs it: where it went and how it
// ended (what accounting.ts reads), and the step from a ClientHello verdict to a decision.
import { performance } from 'node:perf_hooks';
import type { ConnectionResult } from '../metrics/metrics.ts';
import type { BackendSpec } from '../model/route.ts';
import { type Finished, account } from './accounting.ts';
import type { HelloVerdict } from './clienthello.ts';
import type { ClientPeer, ConnectionHost, RelayConnection } from './connection-host.ts';
import { type Decision, FALLBACK_ROUTE, decide } from './decision.ts';

export type DialDecision = Decision & { kind: 'dial' };

/** Where a connection is: reading its ClientHello, dialling, relaying, over. */
export const Phase = { Hello: 0, Dialing: 1, Relaying: 2, Done: 3 } as const;
export type Phase = (typeof Phase)[keyof typeof Phase];

export abstract class RelayState implements Finished, RelayConnection {
  readonly host: ConnectionHost;
  readonly acceptedAt = performance.now();
  phase: Phase = Phase.Hello;
  /** The route label: the pattern that matched, or "fallback". */
  route = FALLBACK_ROUTE;
  result: ConnectionResult = 'ok';
  sni: string | null = null;
  alpn: readonly string[] | null = null;
  /** Where it is being dialled, while it is (and after a dial that failed, for the access log). */
  decision: DialDecision | null = null;
  /** The backend relayed to, once connected. */
  relayedTo: BackendSpec | null = null;
  /** Which of the backend's addresses was dialled last. */
  addrIndex = 0;
  /** Where the server keeps it in its list of open ones; -1 when not there. */
  slot = -1;
  /** Bytes already added to bytes_total. */
  #flushedUp = 0;
  #flushedDown = 0;

  constructor(host: ConnectionHost) {
    this.host = host;
  }

  get finished(): boolean {
    return this.phase === Phase.Done;
  }

  abstract get countedIp(): string | null;
  abstract tick(idleLimit: number, bulkLimit: number): void;
  /** Stops its timers and its dial and closes its sockets (the end, before the bookkeeping). */
  protected abstract closeAll(): void;
  /** The client's address for the access log, as looked up at accept, or now. */
  protected abstract peerForLog(): ClientPeer;
  abstract get bytesUp(): number;
  abstract get bytesDown(): number;
  /** The client's address, for a log line (looked up now if it was not at accept). */
  clientIp(): string {
    return this.peerForLog().ip;
  }

  get backend(): BackendSpec | null {
    return this.relayedTo ?? this.decision?.backend ?? null;
  }

  /** Closes it now (shutdown grace over). */
  abort(result: 'shutdown'): void {
    this.result = result;
    this.finish();
  }

  /** A result set once: the first cause of the end is the one counted. */
  endWith(result: ConnectionResult): void {
    if (this.result === 'ok') this.result = result;
  }

  /**
   * Counts the verdict (hello time and size, or the failure's reason, logged at debug) and decides
   * where the connection goes (decision.ts). `buffered`: the bytes read so far, all kept.
   */
  judge(verdict: HelloVerdict, buffered: number, clientGone: boolean): Decision {
    const host = this.host;
    const m = host.metrics;
    m.helloTook((performance.now() - this.acceptedAt) / 1000);
    if (verdict.kind === 'hello') {
      this.sni = verdict.hello.sni;
      this.alpn = verdict.hello.alpn;
      if (verdict.hello.helloBytes > 0) m.helloSize(verdict.hello.helloBytes);
    } else {
      m.clientHelloFailures.inc({ reason: verdict.reason });
      if (host.logger.isLevelEnabled('debug')) {
        host.logger.debug({ client: this.clientIp(), reason: verdict.reason, detail: verdict.detail, bytes: buffered }, 'client hello peek failed');
      }
    }
    const d = decide(verdict, host.table(), host.settings, { buffered, clientGone });
    this.route = d.route;
    if (d.kind === 'close') this.endWith(d.result);
    return d;
  }

  /** Adds bytes relayed since the last flush to bytes_total (at scrape time and at close). */
  flushBytes(): void {
    const b = this.relayedTo;
    if (b === null) return;
    const up = this.bytesUp;
    const down = this.bytesDown;
    this.host.metrics.bytesRelayed(b.name, up - this.#flushedUp, down - this.#flushedDown);
    this.#flushedUp = up;
    this.#flushedDown = down;
  }

  /**
   * Ends the connection now (idempotent): its sockets closed, then the bookkeeping: the active
   * gauge, the server's list, bytes_total, connections_total and the access log. The client's
   * address is looked up before the close (a closed handle knows nothing), and only if access
   * logging began after the accept (the lookup fails once the client has hung up).
   */
  finish(): void {
    if (this.phase === Phase.Done) return;
    const host = this.host;
    const wasRelaying = this.phase === Phase.Relaying;
    this.phase = Phase.Done;
    const peer = host.accessLog ? this.peerForLog() : null;
    this.closeAll();
    if (wasRelaying) host.metrics.activeChanged(this.relayedTo!.name, -1);
    host.release(this);
    this.flushBytes();
    account(host, this, peer);
  }
}
