// The messages between the primary and its data-plane workers (workers > 1), over the cluster
// IPC channel as JSON. Everything here is plain data: a route table crosses as its routes.
//
// A table goes out as a change set, grouped by `match`: the routes of every pattern whose routes
// changed (in table order: order among a pattern's ALPN routes matters), and the patterns that are
// gone. Order across patterns does not matter to a lookup, so a worker can keep its routes by
// pattern and rebuild its table from them. A worker that starts gets every pattern at once.
import type { AddressInfo } from 'node:net';
import type { ListenAddress, ServerSettings } from '../config/types.ts';
import type { BackendSpec, RouteSpec } from '../model/route.ts';

export interface TableChange {
  /** The primary's generation for this table. */
  readonly generation: number;
  /** Every route of each pattern that is new or changed, grouped by pattern, in table order. */
  readonly set: readonly (readonly RouteSpec[])[];
  /** Patterns that have no route any more. */
  readonly delete: readonly string[];
  readonly fallback: BackendSpec;
}

export interface WorkerSettings {
  /** As configured, except maxConcurrentConns: the primary's limit divided among the workers. */
  readonly server: ServerSettings;
  readonly accessLog: boolean;
  readonly logLevel: string;
}

export interface BackendCooldown {
  readonly addr: string;
  /** Unix ms until which the address is skipped; null when it is healthy again. */
  readonly until: number | null;
  readonly error: string | null;
}

export type PrimaryMessage =
  | {
    readonly t: 'init';
    /** 1..N, stable across restarts of the same worker. */
    readonly slot: number;
    readonly listen: readonly ListenAddress[];
    readonly settings: WorkerSettings;
    readonly table: TableChange;
    readonly cooldowns: readonly BackendCooldown[];
    /** true: send log lines to the primary; false: write them to stdout directly. */
    readonly relayLogs: boolean;
    readonly heartbeatMs: number;
    /** Metric names the primary owns (sources, table, cert watch): workers leave them out. */
    readonly primaryMetrics: readonly string[];
  }
  | ({ readonly t: 'table' } & TableChange)
  | ({ readonly t: 'settings' } & WorkerSettings)
  | ({ readonly t: 'cooldown' } & BackendCooldown)
  | { readonly t: 'drain'; readonly graceMs: number }
  | { readonly t: 'metrics'; readonly id: number }
  | { readonly t: 'stats'; readonly id: number };

export interface WorkerStats {
  readonly pid: number;
  /** Connections accepted and not finished. */
  readonly active: number;
  readonly trackedClientAddresses: number;
  /** Connections finished (the worker's share of connections_total). */
  readonly connections: number;
  /** The primary's generation of the table this worker routes by. */
  readonly generation: number;
}

export type WorkerMessage =
  | { readonly t: 'ready' }
  | { readonly t: 'listening'; readonly addresses: readonly AddressInfo[] }
  | { readonly t: 'listen-failed'; readonly error: string }
  | {
    readonly t: 'heartbeat';
    readonly active: number;
    readonly trackedClientAddresses: number;
    readonly generation: number;
  }
  | ({ readonly t: 'cooldown' } & BackendCooldown)
  | { readonly t: 'log'; readonly line: string }
  | { readonly t: 'reply'; readonly id: number; readonly body: unknown }
  | { readonly t: 'drained' };

export function isWorkerMessage(m: unknown): m is WorkerMessage {
  return typeof m === 'object' && m !== null && typeof (m as { t?: unknown }).t === 'string';
}

export function isPrimaryMessage(m: unknown): m is PrimaryMessage {
  return typeof m === 'object' && m !== null && typeof (m as { t?: unknown }).t === 'string';
}

export type WorkerState = 'starting' | 'listening' | 'restarting' | 'stopped';

/** What the primary knows of a worker from its heartbeats (at most the heartbeat interval old). */
export interface WorkerStatus {
  readonly slot: number;
  readonly pid: number | null;
  readonly state: WorkerState;
  readonly active: number;
  readonly trackedClientAddresses: number;
  readonly generation: number;
  readonly restarts: number;
}
