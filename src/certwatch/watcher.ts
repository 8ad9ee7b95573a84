// One certwatch entry: watches where its pair lives, and after each burst of file events decides
// (select.ts) whether a new pair is to be deployed, deploys it (copy_to, then on_change), and
// remembers what the TURN server holds.
//
// Everything the watcher does runs one step at a time: a scan, then perhaps a deployment. Events
// that arrive meanwhile ask for one more scan afterwards. Time is handled by a few timers:
//   debounce  — quiet time after the last file event before a scan;
//   settle    — a pair that may be half written is looked at again, a bounded number of times;
//   action    — a deployment waits for min_interval since the last one, or for the backoff after
//               a failed one, then scans again (so the latest pair is the one deployed);
//   periodic  — a slow rescan, for what no file event announces (a watch that broke, time passing);
//   dirPoll   — a directory that does not exist yet is looked for until it does.
import { stat } from 'node:fs/promises';
import { basename, dirname, relative, resolve, sep } from 'node:path';
import { type FSWatcher, watch } from 'chokidar';
import type { CertwatchConfig } from '../config/types.ts';
import type { Logger } from '../log.ts';
import type { Metrics } from '../metrics/metrics.ts';
import { runAction } from './action.ts';
import { copyToPaths, pairId, readDeployed, recordDeployment, writeCopyTo } from './deploy.ts';
import { type Candidate, certificatesDir, findCandidates, storageKeysFor } from './find.ts';
import { INVALID_REASONS } from './pair.ts';
import type { GoodPair } from './pair.ts';
import { type Choice, type Deployed, selectPair } from './select.ts';

export interface Tuning {
  /** Between looks at a pair that may be half written. */
  readonly settleIntervalMs: number;
  /** How many more looks before a bad pair is reported and left alone. */
  readonly settleAttempts: number;
  /** First retry of a failed deployment; it doubles each time, up to retryMaxMs. */
  readonly retryBaseMs: number;
  readonly retryMaxMs: number;
  /** Retries of one failed deployment before giving up until the next change, SIGHUP or rescan. */
  readonly retries: number;
  readonly rescanIntervalMs: number;
  readonly dirPollMs: number;
  /** Time limit of an exec or systemctl action. */
  readonly actionTimeoutMs: number;
  /** Longest wait for the file watcher's first directory walk before going on. */
  readonly watchReadyMs: number;
  /** Longest wait, at stop, for a scan or deployment under way. */
  readonly stopWaitMs: number;
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
};

type Trigger = 'start' | 'event' | 'settle' | 'action' | 'periodic' | 'recheck';

export interface WatcherDeps {
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly env: NodeJS.ProcessEnv;
  readonly tuning: Tuning;
}

/** Remembered bad pairs (by content) are forgotten beyond this many. */
const SETTLED_BAD_CAP = 64;

export class CertWatcher {
  readonly #config: CertwatchConfig;
  readonly #log: Logger;
  readonly #metrics: Metrics;
  readonly #env: NodeJS.ProcessEnv;
  readonly #t: Tuning;
  #fsw: FSWatcher | null = null;
  #watchReady = false;
  /** Directories to watch that do not exist yet. */
  #missingDirs: string[] = [];
  #debounce: NodeJS.Timeout | null = null;
  #settleTimer: NodeJS.Timeout | null = null;
  #actionTimer: NodeJS.Timeout | null = null;
  #actionAt = 0;
  #periodic: NodeJS.Timeout | null = null;
  #dirPoll: NodeJS.Timeout | null = null;
  #polling = false;
  #running: Promise<void> | null = null;
  #queued = new Set<Trigger>();
  #stopped = false;

  #deployed: Deployed | null = null;
  /** Date.now() of the last successful deployment (min_interval counts from it). */
  #lastDeployAt = Number.NEGATIVE_INFINITY;
  #settleAttempt = 0;
  /** Failed attempts at deploying #failedKey. */
  #failures = 0;
  #failedKey: string | null = null;
  #retryAt = 0;
  /** Content hashes of bad pairs already waited for and reported. */
  #settledBad = new Set<string>();
  /** The last situation noted in the log, so a standing one is logged once, not at every scan. */
  #lastNote = '';

  constructor(config: CertwatchConfig, deps: WatcherDeps) {
    this.#config = config;
    this.#log = deps.logger.child({ cert: config.name });
    this.#metrics = deps.metrics;
    this.#env = deps.env;
    this.#t = deps.tuning;
    for (const result of ['ok', 'error', 'invalid']) this.#metrics.certReloads.inc({ cert: config.name, result }, 0);
    for (const reason of INVALID_REASONS) this.#metrics.certInvalid.inc({ cert: config.name, reason }, 0);
  }

  get name(): string {
    return this.#config.name;
  }

  /** Reads what copy_to holds, starts watching, and begins the first scan (not awaited). */
  async start(): Promise<void> {
    const c = this.#config;
    this.#deployed = await readDeployed(c);
    if (this.#deployed !== null) this.#metrics.certNotAfter.set({ cert: c.name }, this.#deployed.leaf.notAfter.getTime() / 1000);
    await this.#watch();
    this.#periodic = setInterval(() => this.#kick('periodic'), this.#t.rescanIntervalMs);
    this.#log.info({
      domain: c.domain,
      source: c.caddyStorage !== null ? certificatesDir(c.caddyStorage) : { cert: c.cert, key: c.key },
      copy_to: c.copyTo === null ? null : copyToPaths(c.copyTo, c.name),
      on_change: c.onChange?.kind ?? null,
      deployed: this.#deployed === null ? null : this.#deployed.leaf.fingerprint,
      ...(this.#deployed?.acted === false ? { acted: false } : {}),
    }, this.#deployed === null && c.copyTo === null
      ? 'certwatch started; without copy_to the deployed certificate is unknown, so the first good pair is acted on'
      : 'certwatch started');
    this.#kick('start');
  }

  /** Scans now (SIGHUP); also ends a give-up after failed deployments. */
  recheck(): void {
    this.#kick('recheck');
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    for (const t of [this.#debounce, this.#settleTimer, this.#actionTimer]) if (t !== null) clearTimeout(t);
    for (const t of [this.#periodic, this.#dirPoll]) if (t !== null) clearInterval(t);
    this.#debounce = this.#settleTimer = this.#actionTimer = this.#periodic = this.#dirPoll = null;
    await this.#fsw?.close();
    this.#fsw = null;
    // A deployment under way may finish, for a while: shutdown must not wait on a filesystem call
    // that never returns, nor on a slow action. One cut short is acted on again at the next
    // start (copy_to's record still says "pending").
    const running = this.#running;
    if (running === null) return;
    let timer: NodeJS.Timeout | undefined;
    const finished = await Promise.race([
      running.then(() => true),
      new Promise<false>((done) => {
        timer = setTimeout(() => done(false), this.#t.stopWaitMs);
      }),
    ]);
    clearTimeout(timer);
    if (!finished) this.#log.warn({ waited_ms: this.#t.stopWaitMs }, 'certwatch stopped while a scan or deployment was still under way');
  }

  // ------------------------------------------------------------------------------------------
  // Watching

  async #watch(): Promise<void> {
    const c = this.#config;
    let dirs: string[];
    let ignored: (p: string) => boolean;
    let depth: number;
    if (c.caddyStorage !== null) {
      const root = resolve(certificatesDir(c.caddyStorage));
      const keys = new Set(storageKeysFor(c.domain));
      dirs = [root];
      depth = 2;
      // certificates/<issuer>/<key>/<file>: only our keys' directories, and nothing deeper.
      ignored = (p) => {
        const rel = relative(root, p);
        if (rel === '' || rel.startsWith('..')) return false;
        const parts = rel.split(sep);
        return parts.length > 3 || (parts.length >= 2 && !keys.has(parts[1]));
      };
    } else {
      const cert = resolve(c.cert!);
      const key = resolve(c.key!);
      const files = new Set([cert, key]);
      dirs = [...new Set([dirname(cert), dirname(key)])];
      depth = 0;
      ignored = (p) => !dirs.includes(p) && !files.has(p);
    }
    const present: string[] = [];
    for (const d of dirs) {
      if (await isDir(d)) present.push(d);
      else this.#missingDirs.push(d);
    }
    const fsw = watch([], {
      ignoreInitial: true, followSymlinks: false, depth, ignored, persistent: true, ignorePermissionErrors: true,
    });
    this.#fsw = fsw;
    fsw.on('all', (event, path) => {
      if (event === 'unlinkDir' && dirs.includes(path)) this.#lostDir(path);
      this.#onFileEvent(path);
    });
    fsw.on('error', (err) => this.#log.warn({ err: (err as Error).message }, 'certwatch file watcher error'));
    if (present.length > 0) await this.#addWatched(present);
    if (this.#missingDirs.length > 0) {
      this.#log.info({ dirs: this.#missingDirs }, 'waiting for the certificate directory to exist');
      this.#dirPoll = setInterval(() => void this.#pollMissing(), this.#t.dirPollMs);
    }
  }

  /** A watched directory was removed (storage wiped): wait for it to come back, then watch it again. */
  #lostDir(dir: string): void {
    if (this.#stopped || this.#missingDirs.includes(dir)) return;
    this.#fsw?.unwatch(dir);
    this.#missingDirs.push(dir);
    this.#log.warn({ dirs: [dir] }, 'certificate directory removed; waiting for it to exist again');
    this.#dirPoll ??= setInterval(() => void this.#pollMissing(), this.#t.dirPollMs);
  }

  /**
   * Watches more directories. The first time, waits (bounded) for chokidar's first walk, so that
   * no event after start() is missed; chokidar says "ready" only once, so later additions (a
   * directory that appeared) are followed by a debounced scan instead.
   */
  async #addWatched(dirs: string[]): Promise<void> {
    const fsw = this.#fsw;
    if (fsw === null) return;
    if (this.#watchReady) {
      fsw.add(dirs);
      return;
    }
    const ready = new Promise<void>((done) => {
      const timer = setTimeout(done, this.#t.watchReadyMs);
      fsw.once('ready', () => {
        clearTimeout(timer);
        this.#watchReady = true;
        done();
      });
    });
    fsw.add(dirs);
    await ready;
  }

  async #pollMissing(): Promise<void> {
    if (this.#polling) return;
    this.#polling = true;
    const appeared: string[] = [];
    try {
      for (const d of this.#missingDirs) if (await isDir(d)) appeared.push(d);
    } finally {
      this.#polling = false;
    }
    if (appeared.length === 0 || this.#stopped) return;
    this.#missingDirs = this.#missingDirs.filter((d) => !appeared.includes(d));
    if (this.#missingDirs.length === 0 && this.#dirPoll !== null) {
      clearInterval(this.#dirPoll);
      this.#dirPoll = null;
    }
    this.#log.info({ dirs: appeared }, 'certificate directory appeared; watching it');
    await this.#addWatched(appeared);
    this.#onFileEvent(appeared[0]);
  }

  #onFileEvent(path: string): void {
    if (this.#stopped) return;
    this.#log.trace({ path: basename(path) }, 'certificate file event');
    if (this.#debounce !== null) clearTimeout(this.#debounce);
    this.#debounce = setTimeout(() => {
      this.#debounce = null;
      this.#kick('event');
    }, this.#config.debounceMs);
  }

  // ------------------------------------------------------------------------------------------
  // One step at a time

  #kick(trigger: Trigger): void {
    if (this.#stopped) return;
    this.#queued.add(trigger);
    if (this.#running === null) this.#runQueued();
  }

  #runQueued(): void {
    const triggers = this.#queued;
    this.#queued = new Set();
    this.#running = this.#step(triggers)
      .catch((err: unknown) => this.#log.error({ err: (err as Error).message }, 'certwatch scan failed'))
      .finally(() => {
        this.#running = null;
        if (this.#queued.size > 0 && !this.#stopped) this.#runQueued();
      });
  }

  async #step(triggers: ReadonlySet<Trigger>): Promise<void> {
    if (this.#settleTimer !== null) {
      clearTimeout(this.#settleTimer);
      this.#settleTimer = null;
    }
    // Only the settle timer continues a wait; anything else starts a fresh one.
    if (!(triggers.size === 1 && triggers.has('settle'))) this.#settleAttempt = 0;
    // A SIGHUP or the periodic rescan gives a deployment that was given up on a new budget.
    if (triggers.has('recheck') || triggers.has('periodic')) {
      if (this.#failures > this.#t.retries) this.#failures = 0;
    }
    const now = new Date();
    const candidates = await findCandidates(this.#config, now);
    if (this.#stopped) return;
    const choice = selectPair(candidates, this.#deployed, {
      settledBad: this.#settledBad,
      final: this.#settleAttempt >= this.#t.settleAttempts,
      onlyLater: this.#config.caddyStorage !== null,
      now,
    });
    this.#log.debug({ triggers: [...triggers], candidates: candidates.length, choice: choice.kind }, 'certificates scanned');
    await this.#follow(choice);
  }

  async #follow(choice: Choice): Promise<void> {
    const c = this.#config;
    if (choice.kind === 'wait') {
      this.#settleAttempt++;
      this.#log.debug({
        attempt: this.#settleAttempt,
        pending: choice.pending.map((p) => ({ where: p.where, reason: p.verdict.ok ? null : p.verdict.reason })),
      }, 'certificate pair not usable yet; looking again shortly');
      this.#settleTimer = setTimeout(() => {
        this.#settleTimer = null;
        this.#kick('settle');
      }, this.#t.settleIntervalMs);
      return;
    }
    this.#reportRejected(choice.rejected);
    switch (choice.kind) {
      case 'none':
        this.#note('none', 'warn', {
          where: c.caddyStorage !== null ? certificatesDir(c.caddyStorage) : c.cert,
          domain: c.domain,
        }, 'no certificate pair found for the domain yet');
        return;
      case 'blocked':
        this.#note(`blocked:${choice.newest.verdict.contentHash}`, 'warn', {
          where: choice.newest.where,
          reason: choice.newest.verdict.ok ? null : choice.newest.verdict.reason,
          deployed: this.#deployed?.leaf.fingerprint ?? null,
        }, 'the newest certificate pair is not usable; keeping the deployed one');
        return;
      case 'current':
        this.#note(`current:${choice.best.verdict.leaf.fingerprint}`, 'debug', {
          fingerprint: choice.best.verdict.leaf.fingerprint,
        }, 'the deployed certificate is the newest');
        return;
      case 'older':
        this.#note(`older:${choice.best.verdict.leaf.fingerprint}`, 'info', {
          where: choice.best.where,
          fingerprint: choice.best.verdict.leaf.fingerprint,
          not_before: choice.best.verdict.leaf.notBefore.toISOString(),
          deployed: this.#deployed?.leaf.fingerprint,
          deployed_not_before: this.#deployed?.leaf.notBefore.toISOString(),
        }, 'ignoring a certificate issued no later than the deployed one');
        return;
      case 'newer':
        await this.#deploy(choice.best);
    }
  }

  /** Counts and logs each bad pair once, after it was waited for. */
  #reportRejected(rejected: readonly Candidate[]): void {
    for (const r of rejected) {
      if (r.verdict.ok || this.#settledBad.has(r.verdict.contentHash)) continue;
      this.#settledBad.add(r.verdict.contentHash);
      if (this.#settledBad.size > SETTLED_BAD_CAP) this.#settledBad.delete(this.#settledBad.values().next().value!);
      this.#metrics.certInvalid.inc({ cert: this.#config.name, reason: r.verdict.reason });
      this.#metrics.certReloads.inc({ cert: this.#config.name, result: 'invalid' });
      this.#log.warn({
        where: r.where,
        reason: r.verdict.reason,
        detail: r.verdict.detail,
        fingerprint: r.verdict.leaf?.fingerprint ?? null,
        not_before: r.verdict.leaf?.notBefore.toISOString() ?? null,
        not_after: r.verdict.leaf?.notAfter.toISOString() ?? null,
      }, 'certificate pair rejected');
    }
  }

  #note(key: string, level: 'debug' | 'info' | 'warn', fields: Record<string, unknown>, msg: string): void {
    if (key === this.#lastNote) return;
    this.#lastNote = key;
    this.#log[level](fields, msg);
  }

  // ------------------------------------------------------------------------------------------
  // Deploying

  async #deploy(best: Candidate & { readonly verdict: GoodPair }): Promise<void> {
    const c = this.#config;
    const pair = best.verdict;
    const key = pairId(pair.leaf);
    if (key !== this.#failedKey) {
      this.#failures = 0;
      this.#failedKey = null;
      this.#retryAt = 0;
    }
    if (this.#failures > this.#t.retries) return; // given up until the next pair, SIGHUP or rescan
    const now = Date.now();
    const at = Math.max(this.#lastDeployAt + c.minIntervalMs, this.#retryAt);
    if (now < at) {
      this.#scheduleAction(at);
      this.#note(`deferred:${key}`, 'info', {
        where: best.where, fingerprint: pair.leaf.fingerprint, in_ms: at - now,
      }, this.#retryAt > now ? 'certificate deployment waits for its retry' : 'certificate deployment deferred by min_interval');
      return;
    }
    const paths = c.copyTo !== null ? copyToPaths(c.copyTo, c.name) : { cert: best.certFile, key: best.keyFile };
    const started = Date.now();
    try {
      if (c.copyTo !== null) {
        // First the record that this pair is on its way: stopped before the action succeeds, the
        // next start acts on it again (readDeployed).
        await recordDeployment(c.copyTo, c.name, pair.leaf, 'pending');
        for (const w of await writeCopyTo(c.copyTo, c.name, pair)) this.#log.warn(w);
      }
      const done = c.onChange === null ? null : await runAction(c.onChange, paths, { env: this.#env, timeoutMs: this.#t.actionTimeoutMs });
      this.#deployed = { leaf: pair.leaf, fit: true, acted: true };
      this.#lastDeployAt = Date.now();
      this.#failures = 0;
      this.#failedKey = null;
      this.#retryAt = 0;
      this.#lastNote = '';
      this.#metrics.certReloads.inc({ cert: c.name, result: 'ok' });
      this.#metrics.certNotAfter.set({ cert: c.name }, pair.leaf.notAfter.getTime() / 1000);
      this.#log.info({
        where: best.where,
        fingerprint: pair.leaf.fingerprint,
        not_before: pair.leaf.notBefore.toISOString(),
        not_after: pair.leaf.notAfter.toISOString(),
        copied_to: c.copyTo === null ? null : paths,
        action: done?.what ?? null,
        ms: Date.now() - started,
      }, 'certificate deployed');
      // Last, once counted and logged: the TURN server already has the pair. Not a failed
      // deployment if this cannot be written; the next start acts on the pair once more.
      if (c.copyTo !== null) {
        const w = await recordDeployment(c.copyTo, c.name, pair.leaf, 'acted')
          .catch((err: Error) => `could not record the deployment: ${err.message}`);
        if (w !== null) this.#log.warn(w);
      }
    } catch (err) {
      this.#failures++;
      this.#failedKey = key;
      this.#metrics.certReloads.inc({ cert: c.name, result: 'error' });
      if (this.#failures <= this.#t.retries) {
        const delay = Math.min(this.#t.retryBaseMs * 2 ** (this.#failures - 1), this.#t.retryMaxMs);
        this.#retryAt = Date.now() + delay;
        this.#scheduleAction(this.#retryAt);
        this.#log.error({
          err: (err as Error).message, fingerprint: pair.leaf.fingerprint, attempt: this.#failures, retry_in_ms: delay,
        }, 'certificate deployment failed');
      } else {
        this.#log.error({
          err: (err as Error).message, fingerprint: pair.leaf.fingerprint, attempts: this.#failures,
        }, 'certificate deployment failed; giving up until the next change, SIGHUP or periodic rescan');
      }
    }
  }

  /** One timer for "deploy at `at`": an earlier request wins. */
  #scheduleAction(at: number): void {
    if (this.#stopped) return;
    if (this.#actionTimer !== null && this.#actionAt <= at) return;
    if (this.#actionTimer !== null) clearTimeout(this.#actionTimer);
    this.#actionAt = at;
    this.#actionTimer = setTimeout(() => {
      this.#actionTimer = null;
      this.#kick('action');
    }, Math.max(0, at - Date.now()));
  }
}

async function isDir(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isDirectory();
  } catch {
    return false;
  }
}
