// A watcher: watches where pairs live, reads them after each burst of file events, and has each of
// its entries decide on what it sees (entry.ts). An entry of the config file has a watcher of its
// own, reading exactly its pair (find.ts); a `for_each: namespace` template has one watcher for
// all its namespaces' entries, reading the whole storage once per change (scan.ts) and letting
// each entry choose from that one read.
//
// Everything a watcher does runs one step at a time: entries that came or went, a read, then each
// entry's decision (perhaps a copy). Events that arrive meanwhile ask for one more step afterwards.
// Time is handled by a few timers:
//   debounce  — quiet time after the last file event before a read;
//   settle    — a pair that may be half written is looked at again, a bounded number of times;
//   look      — an entry waits for min_interval, or for the retry of a failed copy;
//   periodic  — a slow rescan, for what no file event announces (a watch that broke, time passing);
// and the file watch's own poll for a directory that does not exist yet (watch.ts).
// on_change actions are not run here: they go to the scheduler every watcher shares (scheduler.ts).
import { dirname, relative, resolve, sep } from 'node:path';
import type { CertwatchConfig } from '../config/types.ts';
import type { Logger } from '../log.ts';
import type { Metrics } from '../metrics/metrics.ts';
import { Serial, settlesWithin } from '../serial.ts';
import { Entry, type EntryTuning, type EntryView, type Trigger } from './entry.ts';
import { type Candidate, certificatesDir, findCandidates, storageKeysFor } from './find.ts';
import { type StorageScan, candidatesFor, scanStorage } from './scan.ts';
import type { ActionScheduler, SchedulerTuning } from './scheduler.ts';
import { FileWatch, type WatchSpec, type WatchTuning } from './watch.ts';

export interface Tuning extends EntryTuning, WatchTuning, SchedulerTuning {
  /** Between looks at a pair that may be half written. */
  readonly settleIntervalMs: number;
  readonly rescanIntervalMs: number;
}

export const DEFAULT_TUNING: Tuning = {
  settleIntervalMs: 1000,
  settleAttempts: 4,
  retryBaseMs: 1000,
  retryMaxMs: 60_000,
  retries: 5,
  rescanIntervalMs: 10 * 60_000,
  dirPollMs: 2000,
  actionTimeoutMs: 30_000,
  watchReadyMs: 10_000,
  stopWaitMs: 3000,
  tickMs: 1000,
  now: Date.now,
};

/** Where a watcher's entries find their pairs: what to watch, one read, and each entry's share of it. */
export interface Finder<S> {
  readonly watch: WatchSpec;
  scan(now: Date, entries: readonly CertwatchConfig[]): Promise<S>;
  candidates(scan: S, entry: CertwatchConfig): readonly Candidate[];
}

/** An entry of the config file: its own pair, under its own keys or at its explicit paths. */
export function entryFinder(c: CertwatchConfig): Finder<Candidate[]> {
  let watch: WatchSpec;
  if (c.caddyStorage !== null) {
    const root = resolve(certificatesDir(c.caddyStorage));
    const keys = new Set(storageKeysFor(c.domain));
    // certificates/<issuer>/<key>/<file>: only our keys' directories, and nothing deeper.
    watch = {
      dirs: [root],
      depth: 2,
      ignored: (p) => {
        const rel = relative(root, p);
        if (rel === '' || rel.startsWith('..')) return false;
        const parts = rel.split(sep);
        return parts.length > 3 || (parts.length >= 2 && !keys.has(parts[1]));
      },
    };
  } else {
    const cert = resolve(c.cert!);
    const key = resolve(c.key!);
    const files = new Set([cert, key]);
    const dirs = [...new Set([dirname(cert), dirname(key)])];
    watch = { dirs, depth: 0, ignored: (p) => !dirs.includes(p) && !files.has(p) };
  }
  return { watch, scan: (now) => findCandidates(c, now), candidates: (scan) => scan };
}

/** A template's entries: the whole storage, read once per change for all of them (scan.ts). */
export function storageFinder(caddyStorage: string, log: Logger): Finder<StorageScan> {
  const root = resolve(certificatesDir(caddyStorage));
  let warnedLeftOut = false;
  return {
    watch: {
      dirs: [root],
      depth: 2,
      ignored: (p) => {
        const rel = relative(root, p);
        return rel !== '' && !rel.startsWith('..') && rel.split(sep).length > 3;
      },
    },
    async scan(now, entries) {
      const wanted = new Set(entries.flatMap((e) => storageKeysFor(e.domain)));
      const scan = await scanStorage(caddyStorage, wanted, now);
      if (scan.leftOut > 0 && !warnedLeftOut) {
        warnedLeftOut = true;
        log.warn({ left_out: scan.leftOut }, 'Caddy storage holds more certificate directories than one scan reads; the others are not looked at');
      }
      return scan;
    },
    candidates: (scan, entry) => candidatesFor(scan, entry.domain),
  };
}

export interface WatcherDeps {
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly tuning: Tuning;
  readonly scheduler: ActionScheduler;
}

export class CertWatcher<S> {
  readonly #finder: Finder<S>;
  readonly #debounceMs: number;
  readonly #log: Logger;
  readonly #deps: WatcherDeps;
  readonly #t: Tuning;
  readonly #watch: FileWatch;
  readonly #entries = new Map<string, Entry>();
  /** The entries wanted from the next step on (setEntries), by name; null: no change. */
  #desired: ReadonlyMap<string, CertwatchConfig> | null = null;
  #debounce: NodeJS.Timeout | null = null;
  #settleTimer: NodeJS.Timeout | null = null;
  #lookTimer: NodeJS.Timeout | null = null;
  #lookAt = 0;
  #periodic: NodeJS.Timeout | null = null;
  /** One step at a time; triggers that arrive meanwhile are gathered for one more step after it. */
  readonly #steps = new Serial<ReadonlySet<Trigger>>(
    (triggers) => this.#step(triggers),
    (a, b) => new Set([...a, ...b]),
    (err) => this.#log.error({ err: (err as Error).message }, 'certwatch scan failed'),
  );
  #started = false;
  #stopped = false;

  /** `log` names what is watched (the entry, or the template) in the lines the watcher itself writes. */
  constructor(finder: Finder<S>, debounceMs: number, log: Logger, deps: WatcherDeps) {
    this.#finder = finder;
    this.#debounceMs = debounceMs;
    this.#log = log;
    this.#deps = deps;
    this.#t = deps.tuning;
    this.#watch = new FileWatch(finder.watch, log, deps.tuning, (path) => this.#onFileEvent(path));
  }

  /** The entries this watcher serves from now on: new ones are loaded and decide at once, gone ones are withdrawn. */
  setEntries(configs: readonly CertwatchConfig[]): void {
    const next = new Map(configs.map((c) => [c.name, c]));
    const now = this.#desired ?? this.#entries;
    // Another template's namespaces changed, or only skipped ones: nothing to read for.
    if (this.#started && next.size === now.size && [...next.keys()].every((n) => now.has(n))) return;
    this.#desired = next;
    if (this.#started) this.#kick('namespaces');
  }

  views(): EntryView[] {
    return [...this.#entries.values()].map((e) => e.view());
  }

  /** Loads the entries set so far, starts watching, and begins the first read (not awaited). */
  async start(): Promise<void> {
    await this.#reconcile();
    await this.#watch.start();
    this.#periodic = setInterval(() => this.#kick('periodic'), this.#t.rescanIntervalMs);
    this.#started = true;
    this.#kick('start');
  }

  /** Reads now (SIGHUP); also ends a give-up after failed deployments. */
  recheck(): void {
    this.#kick('recheck');
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    for (const t of [this.#debounce, this.#settleTimer, this.#lookTimer]) if (t !== null) clearTimeout(t);
    if (this.#periodic !== null) clearInterval(this.#periodic);
    this.#debounce = this.#settleTimer = this.#lookTimer = this.#periodic = null;
    await this.#watch.close();
    // A step under way may finish, for a while: shutdown must not wait on a filesystem call that
    // never returns. A copy cut short is acted on again at the next start (its record says "pending").
    const busy = this.#steps.busy;
    const finished = await settlesWithin(this.#steps.stop(), this.#t.stopWaitMs);
    if (busy && !finished) this.#log.warn({ waited_ms: this.#t.stopWaitMs }, 'certwatch stopped while a scan or deployment was still under way');
  }

  #onFileEvent(path: string): void {
    if (this.#stopped) return;
    this.#log.trace({ path }, 'certificate file event');
    if (this.#debounce !== null) clearTimeout(this.#debounce);
    this.#debounce = setTimeout(() => {
      this.#debounce = null;
      this.#kick('event');
    }, this.#debounceMs);
  }

  #kick(trigger: Trigger): void {
    if (this.#stopped) return;
    void this.#steps.request(new Set([trigger]));
  }

  /** Entries that came (loaded: what copy_to holds) and went (withdrawn: nothing on disk is touched). */
  async #reconcile(): Promise<void> {
    const desired = this.#desired;
    if (desired === null) return;
    this.#desired = null;
    for (const [name, e] of this.#entries) {
      if (desired.has(name)) continue;
      e.withdraw();
      this.#entries.delete(name);
    }
    for (const [name, config] of desired) {
      if (this.#entries.has(name) || this.#stopped) continue;
      const e = new Entry(config, {
        logger: this.#deps.logger, metrics: this.#deps.metrics, tuning: this.#t, scheduler: this.#deps.scheduler,
        requestLook: () => this.#kick('action'),
      });
      await e.load();
      this.#entries.set(name, e);
    }
  }

  async #step(triggers: ReadonlySet<Trigger>): Promise<void> {
    if (this.#settleTimer !== null) {
      clearTimeout(this.#settleTimer);
      this.#settleTimer = null;
    }
    await this.#reconcile();
    if (this.#entries.size === 0 || this.#stopped) return;
    const now = new Date();
    const entries = [...this.#entries.values()];
    const scan = await this.#finder.scan(now, entries.map((e) => e.config));
    let settle = false;
    let lookAt = Number.POSITIVE_INFINITY;
    for (const e of entries) {
      if (this.#stopped) return;
      try {
        const wants = await e.decide(this.#finder.candidates(scan, e.config), triggers, now);
        settle ||= wants.settle;
        if (wants.lookAt !== null) lookAt = Math.min(lookAt, wants.lookAt);
      } catch (err) {
        this.#log.error({ cert: e.name, err: (err as Error).message }, 'certwatch scan failed');
      }
    }
    if (settle) {
      this.#settleTimer = setTimeout(() => {
        this.#settleTimer = null;
        this.#kick('settle');
      }, this.#t.settleIntervalMs);
    }
    if (Number.isFinite(lookAt)) this.#scheduleLook(lookAt);
  }

  /** One timer for "look again at `at`": an earlier request wins. */
  #scheduleLook(at: number): void {
    if (this.#stopped) return;
    if (this.#lookTimer !== null && this.#lookAt <= at) return;
    if (this.#lookTimer !== null) clearTimeout(this.#lookTimer);
    this.#lookAt = at;
    this.#lookTimer = setTimeout(() => {
      this.#lookTimer = null;
      this.#kick('action');
    }, Math.max(0, at - Date.now()));
  }
}
