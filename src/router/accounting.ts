// What a finished connection leaves behind, whichever relay ran it: its count in connections_total
// and, with log.access, one access-log line.
import type { ConnectionResult } from '../metrics/metrics.ts';
import type { BackendSpec } from '../model/route.ts';
import type { ClientPeer, ConnectionHost } from './connection-host.ts';

/** The facts of one finished connection. */
export interface Finished {
  readonly route: string;
  readonly result: ConnectionResult;
  readonly sni: string | null;
  readonly alpn: readonly string[] | null;
  readonly backend: BackendSpec | null;
  /** Which of the backend's addresses was dialled last. */
  readonly addrIndex: number;
  readonly bytesUp: number;
  readonly bytesDown: number;
  /** performance.now() at accept. */
  readonly acceptedAt: number;
}

/** Counts the connection, and logs it when access logging is on (`peer` is null otherwise). */
export function account(host: ConnectionHost, f: Finished, peer: ClientPeer | null): void {
  host.metrics.connectionClosed(f.route, f.result);
  if (peer === null) return;
  const b = f.backend;
  host.logger.info({
    client: peer.ip,
    client_port: peer.port,
    sni: f.sni,
    alpn: f.alpn,
    route: f.route,
    backend: b?.name ?? null,
    backend_addr: b === null ? null : b.addrs[Math.min(f.addrIndex, b.addrs.length - 1)],
    bytes_up: f.bytesUp,
    bytes_down: f.bytesDown,
    duration_ms: Math.round((performance.now() - f.acceptedAt) * 1000) / 1000,
    result: f.result,
  }, 'connection');
}
