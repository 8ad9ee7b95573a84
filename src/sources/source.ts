// A route source: something that knows a set of routes and tells when it changes. It yields whole
// snapshots (never deltas) and reports failures; it knows nothing of the router, the table or the
// other sources. The composer owns precedence, last-known-good and debounce.
import type { RouteSpec } from '../model/route.ts';

export interface InvalidEntry {
  /** What the entry was called where it came from: a hash field, a row's match, a list index. */
  readonly entry: string;
  readonly error: string;
}

export interface Snapshot {
  /** Every route the source holds now, valid ones only. */
  readonly routes: readonly RouteSpec[];
  /** Entries skipped as malformed; their siblings still apply. */
  readonly invalid: readonly InvalidEntry[];
  /** Where it came from when not live, e.g. "cache" for a PostgreSQL cache file read at start. */
  readonly origin?: string;
}

export interface SourceSink {
  /** A complete, good snapshot. */
  snapshot(snapshot: Snapshot): void;
  /**
   * A good read that found exactly what the last snapshot holds (its digest matched): the source
   * is healthy and nothing is merged, validated or rebuilt.
   */
  unchanged(): void;
  /** Reading failed; the last good snapshot stays live. */
  failure(err: Error): void;
}

export interface RouteSource {
  readonly name: string;
  readonly type: 'file' | 'postgres' | 'redis';
  /** Begins reading and watching. Returns once started; outages are reported to the sink, never thrown. */
  start(sink: SourceSink): Promise<void>;
  /** Re-reads everything now (SIGHUP). */
  resync(): void;
  /** Stops watching and closes connections. */
  stop(): Promise<void>;
}

export interface SourceStatus {
  readonly name: string;
  readonly type: string;
  readonly state: 'starting' | 'ok' | 'failing';
  /** Unix ms the current failure began, while failing. */
  readonly failingSince: number | null;
  /** Unix ms of the last good snapshot. */
  readonly lastSuccess: number | null;
  readonly lastError: string | null;
  readonly routes: number;
}
