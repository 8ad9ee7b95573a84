// What a connection needs from the server that accepted it: one narrow interface, implemented
// explicitly by RouterServer, so that a connection never reaches into the server's members and
// neither module imports the other's values.
import type { ServerSettings } from '../config/types.ts';
import type { Logger } from '../log.ts';
import type { Metrics } from '../metrics/metrics.ts';
import type { BackendSpec } from '../model/route.ts';
import type { RouteTable } from './table.ts';

export interface ConnectionHost {
  readonly settings: ServerSettings;
  readonly accessLog: boolean;
  readonly metrics: Metrics;
  readonly logger: Logger;
  /** The live table: looked up once, when the ClientHello is complete. */
  table(): RouteTable;
  /** The next address of `backend` to try from index `from` (cooldowns considered), or -1. */
  nextAddr(backend: BackendSpec, from: number): number;
  /** `addr` failed to dial with `code` (ECONNREFUSED, ETIMEDOUT, …): counted, logged, cooled down. */
  dialFailed(backend: BackendSpec, addr: string, code: string): void;
  dialSucceeded(addr: string): void;
  /** Whether dialling ip:port reaches this router itself. */
  dialLoops(ip: string, port: number): boolean;
  /** A dial to the router itself is under way from local address:port; `route` is the route that looped. */
  expectLoop(local: { readonly address?: string; readonly port?: number }, route: string): void;
  /** The connection is over: forget it. */
  release(conn: RelayConnection): void;
}

/** A connection as the server holds it, whichever relay runs it. */
export interface RelayConnection {
  /** Where the server keeps it in its list of open ones; -1 when not there. */
  slot: number;
  /** True once the connection is over (it can be over before its constructor returns). */
  readonly finished: boolean;
  /** The address the per-IP limit counted it under, else null. */
  readonly countedIp: string | null;
  /** One tick of the server's sweep: idle_timeout, and giving back bulk buffers. */
  tick(idleLimit: number, bulkLimit: number): void;
  /** Adds bytes relayed since the last flush to bytes_total (at scrape time and at close). */
  flushBytes(): void;
  /** Closes it now (shutdown grace over). */
  abort(result: 'shutdown'): void;
}

/** The client's address (an IPv4 client on a dual-stack socket as IPv4) and port. */
export interface ClientPeer {
  readonly ip: string;
  readonly port: number | null;
}
