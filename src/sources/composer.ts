// The composer: holds the last good snapshot of every source, merges them with the config's own
// routes in precedence order, and swaps the result into the router. Bursts of changes are
// coalesced for a few tens of milliseconds; a merge that changes nothing is not applied.
import type { Logger } from '../log.ts';
import type { Metrics } from '../metrics/metrics.ts';
import {
  type RouteConflict, type RouteDiff, RouteTable, type Router, diffTables, diffTablesSliced,
} from '../router/table.ts';
import {
  type BackendSpec, type RouteSpec, alpnKey, clip, describeBackend, describeRoute, routeKey, sameBackend,
} from '../model/route.ts';
import { selfMessage } from '../model/self-address.ts';
import type { InvalidEntry, RouteSource, Snapshot, SourceSink, SourceStatus } from './source.ts';

export interface ComposerOptions {
  readonly router: Router;
  readonly metrics: Metrics;
  readonly logger: Logger;
  /** How long to gather changes before one replace. */
  readonly coalesceMs?: number;
}

interface Tracked {
  readonly source: RouteSource;
  /** The last good snapshot as the source gave it. */
  raw: Snapshot | null;
  /** The same, less the routes to the router itself (moved to its invalid entries). */
  snapshot: Snapshot | null;
  status: SourceStatus;
  /** The current outage: failures reported, and the distinct errors already logged (a few). */
  outage: { failures: number; logged: Set<string> } | null;
}

/**
 * Up to this many routes, a merge is built in one piece (a few milliseconds); beyond, in slices
 * (RouteTable.build): at 200,000 routes a build and a diff take ~150 ms each.
 */
const SYNC_MERGE_ROUTES = 20_000;

/** Distinct errors of one outage logged as warnings; more than this are debug. */
const OUTAGE_MESSAGES = 4;

/** The routes that came from config, the first in precedence. */
export const CONFIG_SOURCE = 'config';

export class Composer {
  readonly #router: Router;
  readonly #metrics: Metrics;
  readonly #logger: Logger;
  readonly #coalesceMs: number;
  #configRoutes: readonly RouteSpec[] = [];
  #fallback: BackendSpec;
  #sources: Tracked[] = [];
  #timer: NodeJS.Timeout | null = null;
  #stopped = false;
  /** Conflicts already reported, so a standing conflict is logged and counted once. */
  #knownConflicts = new Set<string>();
  /**
   * The conflicts of the last merge. Not the live table's: a change that only adds or removes a
   * loser changes no lookup, so the table is not replaced, yet the conflict is real.
   */
  #conflicts: readonly RouteConflict[] = [];
  /** True until the routes and generation gauges describe the live table and its sources. */
  #gaugesStale = true;
  /** Merges run (each builds a table): an unchanged read must not add one. */
  #merges = 0;
  /** The merge under way when it is built in slices, and whether another must follow it. */
  #merging: Promise<void> | null = null;
  #mergeAgain = false;
  /** Whether a backend address is the router's own (set once the router knows where it listens). */
  #isSelf: (addr: string) => boolean = () => false;
  /** The namespaces the live table's routes carry, as last published. */
  #namespaces: ReadonlySet<string> = new Set();
  #namespaceListeners: Array<(namespaces: ReadonlySet<string>) => void> = [];

  constructor(opts: ComposerOptions) {
    this.#router = opts.router;
    this.#metrics = opts.metrics;
    this.#logger = opts.logger;
    this.#coalesceMs = opts.coalesceMs ?? 25;
    this.#fallback = opts.router.table.fallback;
  }

  /** Sets the config's routes and fallback (at start and on SIGHUP) and applies them at once. */
  setConfig(routes: readonly RouteSpec[], fallback: BackendSpec): Promise<void> {
    this.#configRoutes = routes;
    this.#fallback = fallback;
    return this.applyNow();
  }

  /** Replaces the set of sources (in precedence order): stops the old ones, starts the new. */
  async setSources(sources: readonly RouteSource[]): Promise<void> {
    const old = this.#sources;
    const next = sources.map((source): Tracked => {
      // A source that is only reconfigured (same name and type) keeps serving its last good
      // snapshot until the new one reads: a reload during an outage must not drop its routes.
      const previous = old.find((t) => t.source.name === source.name && t.source.type === source.type);
      return {
        source,
        raw: previous?.raw ?? null,
        snapshot: previous?.snapshot ?? null,
        status: {
          name: source.name, type: source.type, state: 'starting', failingSince: null,
          lastSuccess: previous?.status.lastSuccess ?? null, lastError: null, routes: previous?.snapshot?.routes.length ?? 0,
        },
        outage: null,
      };
    });
    this.#sources = next;
    await Promise.all(old.map((t) => t.source.stop().catch((err: Error) => {
      this.#logger.warn({ source: t.source.name, err: err.message }, 'source did not stop cleanly');
    })));
    // A source that is gone says nothing more: its gauges go (its counters keep their history).
    for (const t of old) {
      const name = t.source.name;
      if (this.#sources.some((n) => n.source.name === name)) continue;
      this.#metrics.sourceUp.remove({ source: name });
      this.#metrics.sourceLastSuccess.remove({ source: name });
    }
    this.#gaugesStale = true;
    // These, not whatever #sources holds by now: a source is started by the call that made it.
    await Promise.all(next.map((t) => t.source.start(this.#sinkFor(t)).catch((err: Error) => {
      this.#sinkFor(t).failure(err);
    })));
    // At once, not coalesced: at start the first table must hold what the sources read before
    // the router listens.
    await this.applyNow();
  }

  /**
   * Tells the composer which backend addresses are the router's own: a source's route to one is
   * skipped as an invalid entry (it would make every connection to it connect to the router again).
   */
  setSelfCheck(isSelf: (addr: string) => boolean): void {
    this.#isSelf = isSelf;
    let changed = false;
    for (const t of this.#sources) {
      if (t.raw === null) continue;
      const next = this.#withoutSelf(t.raw, t.source.name, t.snapshot);
      changed ||= next.routes.length !== t.snapshot?.routes.length;
      t.snapshot = next;
    }
    if (changed) this.schedule();
  }

  /** The snapshot less its routes to the router itself, which join its invalid entries (logged when new). */
  #withoutSelf(raw: Snapshot, source: string, before: Snapshot | null): Snapshot {
    const self: InvalidEntry[] = [];
    const routes = raw.routes.filter((r) => {
      const addr = r.backend.addrs.find(this.#isSelf);
      if (addr === undefined) return true;
      self.push({ entry: r.match, error: selfMessage('backend', addr) });
      return false;
    });
    if (self.length === 0) return raw;
    const known = new Set((before?.invalid ?? []).map((bad) => bad.entry));
    for (const bad of self) {
      if (!known.has(bad.entry)) this.#logger.warn({ source, entry: bad.entry, err: bad.error }, 'skipped invalid route entry');
    }
    return { ...raw, routes, invalid: raw.invalid.concat(self) };
  }

  resyncAll(): void {
    for (const t of this.#sources) t.source.resync();
  }

  /** The standing conflicts: what the last merge of config and sources left out, and why. */
  conflicts(): readonly RouteConflict[] {
    return this.#conflicts;
  }

  /** How many times the sources were merged into a new table (built, then swapped or not). */
  get merges(): number {
    return this.#merges;
  }

  /** The namespaces the live table's routes carry (config routes and every source's). */
  namespaces(): ReadonlySet<string> {
    return this.#namespaces;
  }

  /**
   * Calls `listener` after a merge whenever the set of namespaces changes (a namespace enabled,
   * disabled, or its source gone): the cert watcher makes and withdraws per-namespace entries by it.
   */
  onNamespaces(listener: (namespaces: ReadonlySet<string>) => void): void {
    this.#namespaceListeners.push(listener);
  }

  statuses(): SourceStatus[] {
    return this.#sources.map((t) => t.status);
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#timer !== null) clearTimeout(this.#timer);
    this.#timer = null;
    await this.#merging;
    await Promise.all(this.#sources.map((t) => t.source.stop().catch(() => {})));
  }

  #sinkFor(t: Tracked): SourceSink {
    const name = t.source.name;
    const readOk = (routes: number) => {
      const now = Date.now();
      if (t.outage !== null) {
        this.#logger.info({
          source: name, failures: t.outage.failures, failed_ms: now - (t.status.failingSince ?? now),
        }, 'source recovered');
        t.outage = null;
      }
      t.status = { ...t.status, state: 'ok', failingSince: null, lastSuccess: now, lastError: null, routes };
      this.#metrics.sourceUpdates.inc({ source: name, result: 'ok' });
      this.#metrics.sourceLastSuccess.set({ source: name }, now / 1000);
      this.#metrics.sourceUp.set({ source: name }, 1);
    };
    return {
      unchanged: () => {
        if (this.#stopped || !this.#sources.includes(t) || t.snapshot === null) return;
        readOk(t.snapshot.routes.length);
        // The entries still skipped are counted on every read, as when they were read whole.
        if (t.snapshot.invalid.length > 0) this.#metrics.sourceInvalidEntries.inc({ source: name }, t.snapshot.invalid.length);
      },
      snapshot: (raw) => {
        if (this.#stopped || !this.#sources.includes(t)) return;
        const before = t.snapshot;
        t.raw = raw;
        const snapshot = t.snapshot = this.#withoutSelf(raw, name, before);
        if (snapshot.origin === undefined) {
          readOk(snapshot.routes.length);
        } else {
          // Served from a copy (PostgreSQL's cache file) while the source itself has not answered:
          // its routes apply, but it is no read of the source: not up, no success.
          t.status = { ...t.status, routes: snapshot.routes.length };
          this.#metrics.sourceUp.set({ source: name }, 0);
        }
        if (snapshot.invalid.length > 0) {
          this.#metrics.sourceInvalidEntries.inc({ source: name }, snapshot.invalid.length);
          // Counted on every read (an alert on the rate lasts as long as the entry stays bad), but
          // logged only when new: a poll every few seconds must not repeat the same warning.
          const known = new Set((before?.invalid ?? []).map((bad) => `${bad.entry}\u0000${bad.error}`));
          const fresh = raw.invalid.filter((bad) => !known.has(`${bad.entry}\u0000${bad.error}`));
          for (const bad of fresh.slice(0, 20)) {
            this.#logger.warn({ source: name, entry: clip(bad.entry, 200), err: clip(bad.error, 500) }, 'skipped invalid route entry');
          }
        }
        this.schedule();
      },
      failure: (err) => {
        if (this.#stopped || !this.#sources.includes(t)) return;
        const message = clip(err.message, 500);
        t.status = {
          ...t.status, state: 'failing', failingSince: t.status.failingSince ?? Date.now(), lastError: message,
        };
        this.#metrics.sourceUpdates.inc({ source: name, result: 'error' });
        this.#metrics.sourceUp.set({ source: name }, 0);
        // One warning when an outage begins and one line when it ends ('source recovered', with
        // the count): a retry every few seconds must not repeat it. Another error during the
        // outage (the file fixed into a new mistake, the database back with a dropped table) is
        // news and warned about, once, up to a few distinct ones; the rest are debug.
        const outage = t.outage ??= { failures: 0, logged: new Set() };
        outage.failures++;
        const news = !outage.logged.has(message) && outage.logged.size < OUTAGE_MESSAGES;
        if (news) outage.logged.add(message);
        this.#logger[news ? 'warn' : 'debug']({ source: name, err: message, routes_kept: t.snapshot?.routes.length ?? 0 },
          'source failed, keeping its last good snapshot');
      },
    };
  }

  /** Applies soon, gathering any further changes that arrive meanwhile. */
  schedule(): void {
    if (this.#timer !== null || this.#stopped) return;
    this.#timer = setTimeout(() => {
      this.#timer = null;
      void this.applyNow();
    }, this.#coalesceMs);
  }

  /**
   * Merges everything and replaces the table if anything changed. A merge of a few thousand routes
   * runs at once; a bigger one is built and compared in slices with turns of the event loop between
   * them, so that connections keep being served while it runs (one merge at a time: a change that
   * arrives meanwhile is merged right after, and the promise settles once it is).
   */
  applyNow(): Promise<void> {
    if (this.#timer !== null) {
      clearTimeout(this.#timer);
      this.#timer = null;
    }
    if (this.#merging !== null) {
      this.#mergeAgain = true;
      return this.#merging;
    }
    const merged = this.#merged();
    if (merged.length <= SYNC_MERGE_ROUTES) {
      this.#guarded(() => {
        const current = this.#router.table;
        const table = new RouteTable(merged, this.#fallback);
        this.#install(current, table, diffTables(current, table));
      });
      return Promise.resolve();
    }
    this.#merging = (async () => {
      try {
        let routes = merged;
        for (;;) {
          this.#mergeAgain = false;
          const current = this.#router.table;
          const table = await RouteTable.build(routes, this.#fallback);
          const diff = await diffTablesSliced(current, table);
          if (!this.#stopped) this.#guarded(() => this.#install(current, table, diff));
          if (!this.#mergeAgain || this.#stopped) break;
          routes = this.#merged();
        }
      } catch (err) {
        this.#failedMerge(err);
      } finally {
        this.#merging = null;
      }
    })();
    return this.#merging;
  }

  /** Config routes, then every source's, in precedence order; counted as one merge. */
  #merged(): readonly RouteSpec[] {
    this.#merges++;
    // concat, not push(...routes): a spread passes every route as an argument, and a source with
    // 125,000 routes overflows the stack.
    let merged: readonly RouteSpec[] = this.#configRoutes;
    for (const t of this.#sources) if (t.snapshot !== null) merged = merged.concat(t.snapshot.routes);
    return merged;
  }

  #guarded(fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.#failedMerge(err);
    }
  }

  /**
   * A table that cannot be built must not take the data plane down with it: the running table
   * stays, and the next change or resync tries again.
   */
  #failedMerge(err: unknown): void {
    this.#logger.error({ err: (err as Error).message }, 'route table update failed, keeping the running table');
  }

  /** Swaps `table` in for `current` if `diff` (or the fallback) says anything changed. */
  #install(current: RouteTable, table: RouteTable, diff: RouteDiff): void {
    this.#reportConflicts(table);
    const fallbackChanged = !sameBackend(current.fallback, table.fallback);
    if (diff.added.length === 0 && diff.removed.length === 0 && diff.changed.length === 0 && !fallbackChanged) {
      // Nothing to swap; the gauges still describe the live table from the start, and after the
      // set of sources changed.
      if (this.#gaugesStale) this.#publishGauges(current);
      return;
    }
    const generation = this.#router.replace(table, diff);
    this.#publishGauges(table);
    this.#logger.info({
      generation,
      routes: table.routes.length,
      added: diff.added.slice(0, 50).map(describeRoute),
      removed: diff.removed.slice(0, 50).map(describeRoute),
      changed: diff.changed.slice(0, 50).map(describeRoute),
      ...(fallbackChanged ? { fallback: describeBackend(table.fallback) } : {}),
      ...(diff.added.length + diff.removed.length + diff.changed.length > 150 ? { truncated: true } : {}),
    }, 'route table replaced');
  }

  #publishGauges(table: RouteTable): void {
    this.#publishNamespaces(table);
    this.#gaugesStale = false;
    this.#metrics.routeTableGeneration.set(this.#router.generation);
    this.#metrics.routes.reset();
    const perSource = new Map<string, number>([[CONFIG_SOURCE, 0]]);
    for (const t of this.#sources) perSource.set(t.source.name, 0);
    for (const r of table.routes) perSource.set(r.source, (perSource.get(r.source) ?? 0) + 1);
    for (const [source, n] of perSource) this.#metrics.routes.set({ source }, n);
  }

  /** The live table's namespaces (a route that lost a conflict is not in it), to the listeners when they changed. */
  #publishNamespaces(table: RouteTable): void {
    const next = new Set<string>();
    for (const r of table.routes) if (r.namespace !== null) next.add(r.namespace);
    if (next.size === this.#namespaces.size && [...next].every((n) => this.#namespaces.has(n))) return;
    this.#namespaces = next;
    for (const listener of this.#namespaceListeners) {
      try {
        listener(next);
      } catch (err) {
        this.#logger.error({ err: (err as Error).message }, 'a namespace listener failed');
      }
    }
  }

  #reportConflicts(table: RouteTable): void {
    const now = new Set<string>();
    for (const { winner, loser } of table.conflicts) {
      const key = `${routeKey(loser)}|${loser.source}|${winner.source}`;
      now.add(key);
      if (this.#knownConflicts.has(key)) continue;
      this.#metrics.routeConflicts.inc({ source: loser.source });
      this.#logger.warn({
        match: loser.match, alpn: alpnKey(loser.alpn) || undefined, winner: winner.source, loser: loser.source,
        kept_backend: winner.backend.name, dropped_backend: loser.backend.name,
      }, 'route conflict: the earlier source wins');
    }
    this.#knownConflicts = now;
    this.#conflicts = table.conflicts;
  }
}
