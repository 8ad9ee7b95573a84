// One certwatch entry's decisions: given the pairs it can see, which to deploy (select.ts), and
// deploying it: copy_to at once, then on_change through the scheduler (scheduler.ts), which runs
// every entry's actions one at a time and tells the entry how each went. The entry remembers
// what copy_to holds and what the TURN server serves. It does no watching and keeps no timers:
// the watcher (watcher.ts) that reads the pairs for it asks it to decide, and looks again when
// it says so.
import type { CertwatchConfig } from '../config/types.ts';
import type { Logger } from '../log.ts';
import type { Metrics } from '../metrics/metrics.ts';
import type { ActionDone } from './action.ts';
import { copyToPaths, pairId, readDeployment, recordDeployment, writeCopyTo } from './deploy.ts';
import { type Candidate, certificatesDir } from './find.ts';
import { type GoodPair, INVALID_REASONS } from './pair.ts';
import { type ActionScheduler, type ActionView } from './scheduler.ts';
import { type Choice, type Deployed, selectPair } from './select.ts';

export type Trigger = 'start' | 'event' | 'settle' | 'action' | 'periodic' | 'recheck' | 'namespaces';

export interface EntryTuning {
  /** How many more looks at a pair that may be half written before it is reported and left alone. */
  readonly settleAttempts: number;
  /** A failed copy is looked at again after retryBaseMs, doubling up to retryMaxMs, `retries` times. */
  readonly retryBaseMs: number;
  readonly retryMaxMs: number;
  readonly retries: number;
}

export interface EntryDeps {
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly tuning: EntryTuning;
  readonly scheduler: ActionScheduler;
  /** Asks the watcher to look at this entry again soon (its action ended while a newer pair waited). */
  readonly requestLook: () => void;
}

/** What the entry wants next from its watcher. */
export interface Wants {
  /** A look after the settle interval: a pair may be half written. */
  readonly settle: boolean;
  /** A look at this time (Date.now() ms): min_interval, or a failed copy's retry; null: none. */
  readonly lookAt: number | null;
}

const NOTHING: Wants = { settle: false, lookAt: null };

/** Remembered bad pairs (by content) are forgotten beyond this many. */
const SETTLED_BAD_CAP = 64;

/** An entry as /routes shows it. */
export interface EntryView {
  readonly name: string;
  readonly domain: string;
  readonly namespace: string | null;
  readonly deployed: { readonly fingerprint: string; readonly not_after: string; readonly acted: boolean } | null;
  readonly serving_not_after: string | null;
  readonly actions: readonly ActionView[];
}

export class Entry {
  readonly config: CertwatchConfig;
  readonly #log: Logger;
  readonly #metrics: Metrics;
  readonly #t: EntryTuning;
  readonly #scheduler: ActionScheduler;
  readonly #requestLook: () => void;

  #deployed: Deployed | null = null;
  /** notAfter (ms) of what the TURN server serves: the pair last acted on; null: unknown. */
  #servingUntil: number | null = null;
  /** Date.now() of the last successful action (min_interval counts from it). */
  #lastDeployAt = Number.NEGATIVE_INFINITY;
  #settleAttempt = 0;
  /** Failed copies of #failedKey. */
  #failures = 0;
  #failedKey: string | null = null;
  #retryAt = 0;
  /** Content hashes of bad pairs already waited for and reported. */
  #settledBad = new Set<string>();
  /** The last situation noted in the log, so a standing one is logged once, not at every scan. */
  #lastNote = '';
  /** A newer pair waited while the action ran: look again when it ends. */
  #lookAgain = false;
  #withdrawn = false;

  constructor(config: CertwatchConfig, deps: EntryDeps) {
    this.config = config;
    this.#log = deps.logger.child(config.namespace === null ? { cert: config.name } : { cert: config.name, namespace: config.namespace });
    this.#metrics = deps.metrics;
    this.#t = deps.tuning;
    this.#scheduler = deps.scheduler;
    this.#requestLook = deps.requestLook;
    for (const result of ['ok', 'error', 'invalid']) this.#metrics.certReloads.inc({ cert: config.name, result }, 0);
    // Every reason at 0 for the entries of the config file; a namespace's entry adds its series
    // when they happen (eleven per namespace would make thousands of series on a busy node).
    if (config.namespace === null) for (const reason of INVALID_REASONS) this.#metrics.certInvalid.inc({ cert: config.name, reason }, 0);
    this.#scheduler.track(config.name);
  }

  get name(): string {
    return this.config.name;
  }

  /** Reads what copy_to holds and what the TURN server serves. */
  async load(): Promise<void> {
    const c = this.config;
    const d = await readDeployment(c);
    this.#deployed = d.deployed;
    this.#servingUntil = d.servingUntil;
    if (this.#deployed !== null) this.#metrics.certNotAfter.set({ cert: c.name }, this.#deployed.leaf.notAfter.getTime() / 1000);
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
  }

  /** The entry is gone (its namespace left the sources): its action is dropped, its series removed. Nothing on disk is touched. */
  withdraw(): void {
    this.#withdrawn = true;
    const cert = this.config.name;
    this.#scheduler.forget(cert);
    this.#metrics.certNotAfter.remove({ cert });
    for (const result of ['ok', 'error', 'invalid']) this.#metrics.certReloads.remove({ cert, result });
    for (const reason of INVALID_REASONS) this.#metrics.certInvalid.remove({ cert, reason });
    this.#log.info('certwatch entry withdrawn');
  }

  view(): EntryView {
    const c = this.config;
    const action = this.#scheduler.view(c.name);
    return {
      name: c.name,
      domain: c.domain,
      namespace: c.namespace,
      deployed: this.#deployed === null ? null : {
        fingerprint: this.#deployed.leaf.fingerprint, not_after: this.#deployed.leaf.notAfter.toISOString(), acted: this.#deployed.acted,
      },
      serving_not_after: this.#servingUntil === null ? null : new Date(this.#servingUntil).toISOString(),
      actions: action === null ? [] : [action],
    };
  }

  /** Decides on the pairs seen now, and deploys when a new one is to be. */
  async decide(candidates: readonly Candidate[], triggers: ReadonlySet<Trigger>, now: Date): Promise<Wants> {
    if (this.#withdrawn) return NOTHING;
    // Only the settle timer continues a wait; anything else starts a fresh one.
    if (!(triggers.size === 1 && triggers.has('settle'))) this.#settleAttempt = 0;
    // A SIGHUP or the periodic rescan gives a deployment that was given up on a new budget.
    if (triggers.has('recheck') || triggers.has('periodic')) {
      if (this.#failures > this.#t.retries) this.#failures = 0;
      this.#scheduler.revive(this.config.name);
    }
    const choice = selectPair(candidates, this.#deployed, {
      settledBad: this.#settledBad,
      final: this.#settleAttempt >= this.#t.settleAttempts,
      onlyLater: this.config.caddyStorage !== null,
      now,
    });
    this.#log.debug({ triggers: [...triggers], candidates: candidates.length, choice: choice.kind }, 'certificates scanned');
    return this.#follow(choice);
  }

  async #follow(choice: Choice): Promise<Wants> {
    const c = this.config;
    if (choice.kind === 'wait') {
      this.#settleAttempt++;
      this.#log.debug({
        attempt: this.#settleAttempt,
        pending: choice.pending.map((p) => ({ where: p.where, reason: p.verdict.ok ? null : p.verdict.reason })),
      }, 'certificate pair not usable yet; looking again shortly');
      return { settle: true, lookAt: null };
    }
    this.#reportRejected(choice.rejected);
    switch (choice.kind) {
      case 'none':
        this.#note('none', 'warn', {
          where: c.caddyStorage !== null ? certificatesDir(c.caddyStorage) : c.cert,
          domain: c.domain,
        }, 'no certificate pair found for the domain yet');
        return NOTHING;
      case 'blocked':
        this.#note(`blocked:${choice.newest.verdict.contentHash}`, 'warn', {
          where: choice.newest.where,
          reason: choice.newest.verdict.ok ? null : choice.newest.verdict.reason,
          deployed: this.#deployed?.leaf.fingerprint ?? null,
        }, 'the newest certificate pair is not usable; keeping the deployed one');
        return NOTHING;
      case 'current':
        this.#note(`current:${choice.best.verdict.leaf.fingerprint}`, 'debug', {
          fingerprint: choice.best.verdict.leaf.fingerprint,
        }, 'the deployed certificate is the newest');
        return NOTHING;
      case 'older':
        this.#note(`older:${choice.best.verdict.leaf.fingerprint}`, 'info', {
          where: choice.best.where,
          fingerprint: choice.best.verdict.leaf.fingerprint,
          not_before: choice.best.verdict.leaf.notBefore.toISOString(),
          deployed: this.#deployed?.leaf.fingerprint,
          deployed_not_before: this.#deployed?.leaf.notBefore.toISOString(),
        }, 'ignoring a certificate issued no later than the deployed one');
        return NOTHING;
      case 'newer':
        return this.#deploy(choice.best);
    }
  }

  /** Counts and logs each bad pair once, after it was waited for. */
  #reportRejected(rejected: readonly Candidate[]): void {
    for (const r of rejected) {
      if (r.verdict.ok || this.#settledBad.has(r.verdict.contentHash)) continue;
      this.#settledBad.add(r.verdict.contentHash);
      if (this.#settledBad.size > SETTLED_BAD_CAP) this.#settledBad.delete(this.#settledBad.values().next().value!);
      this.#metrics.certInvalid.inc({ cert: this.config.name, reason: r.verdict.reason });
      this.#metrics.certReloads.inc({ cert: this.config.name, result: 'invalid' });
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
  // Deploying: copy_to now, on_change through the scheduler

  async #deploy(best: Candidate & { readonly verdict: GoodPair }): Promise<Wants> {
    const c = this.config;
    const pair = best.verdict;
    const key = pairId(pair.leaf);
    const queued = this.#scheduler.stateOf(c.name);
    if (queued?.state === 'running') {
      // copy_to must not change under an action that may be reading it (a restart loading the
      // key, then the certificate): the pair waits for it to end.
      this.#lookAgain = true;
      return NOTHING;
    }
    if (queued !== null && queued.pairKey === key) {
      // Its action is queued, deferred, or was given up on (until the next change, SIGHUP or rescan).
      this.#note(`queued:${key}:${queued.state}`, 'debug', { fingerprint: pair.leaf.fingerprint, state: queued.state }, 'certificate copied; its action waits');
      return NOTHING;
    }
    if (key !== this.#failedKey) {
      this.#failures = 0;
      this.#failedKey = null;
      this.#retryAt = 0;
    }
    if (this.#failures > this.#t.retries) return NOTHING; // given up until the next pair, SIGHUP or rescan
    const now = Date.now();
    const at = Math.max(this.#lastDeployAt + c.minIntervalMs, this.#retryAt);
    if (now < at) {
      this.#note(`deferred:${key}`, 'info', {
        where: best.where, fingerprint: pair.leaf.fingerprint, in_ms: at - now,
      }, this.#retryAt > now ? 'certificate deployment waits for its retry' : 'certificate deployment deferred by min_interval');
      return { settle: false, lookAt: at };
    }
    const paths = c.copyTo !== null ? copyToPaths(c.copyTo, c.name) : { cert: best.certFile, key: best.keyFile };
    const started = Date.now();
    try {
      if (c.copyTo !== null) {
        // First the record that this pair is on its way: stopped before the action succeeds, the
        // next start acts on it again (readDeployment), knowing what the TURN server still serves.
        await recordDeployment(c.copyTo, c.name, pair.leaf, 'pending', this.#servingUntil);
        for (const w of await writeCopyTo(c.copyTo, c.name, pair)) this.#log.warn(w);
      }
    } catch (err) {
      this.#failures++;
      this.#failedKey = key;
      this.#metrics.certReloads.inc({ cert: c.name, result: 'error' });
      if (this.#failures <= this.#t.retries) {
        const delay = Math.min(this.#t.retryBaseMs * 2 ** (this.#failures - 1), this.#t.retryMaxMs);
        this.#retryAt = Date.now() + delay;
        this.#log.error({
          err: (err as Error).message, fingerprint: pair.leaf.fingerprint, attempt: this.#failures, retry_in_ms: delay,
        }, 'certificate deployment failed');
        return { settle: false, lookAt: this.#retryAt };
      }
      this.#log.error({
        err: (err as Error).message, fingerprint: pair.leaf.fingerprint, attempts: this.#failures,
      }, 'certificate deployment failed; giving up until the next change, SIGHUP or periodic rescan');
      return NOTHING;
    }
    this.#deployed = { leaf: pair.leaf, fit: true, acted: false };
    this.#failures = 0;
    this.#failedKey = null;
    this.#retryAt = 0;
    if (c.onChange === null) {
      await this.#acted(best, null, Date.now() - started);
      return NOTHING;
    }
    this.#scheduler.submit({
      entry: c.name,
      namespace: c.namespace,
      action: c.onChange,
      paths,
      staggerMs: c.staggerMs,
      window: c.restartWindow,
      urgentBeforeMs: c.urgentBeforeMs,
      servingUntil: this.#servingUntil,
      pairKey: key,
      fingerprint: pair.leaf.fingerprint,
      log: this.#log,
      done: (done, ms) => void this.#acted(best, done, ms).catch((err: Error) => this.#log.error({ err: err.message }, 'certwatch bookkeeping failed')),
      failed: (err, attempt, retryInMs) => this.#actionFailed(pair, err, attempt, retryInMs),
    });
    return NOTHING;
  }

  /** on_change succeeded (or there is none): the TURN server has the pair. */
  async #acted(best: Candidate & { readonly verdict: GoodPair }, done: ActionDone | null, ms: number): Promise<void> {
    if (this.#withdrawn) return;
    const c = this.config;
    const pair = best.verdict;
    if (this.#deployed !== null && pairId(this.#deployed.leaf) === pairId(pair.leaf)) this.#deployed = { ...this.#deployed, acted: true };
    this.#servingUntil = pair.leaf.notAfter.getTime();
    this.#lastDeployAt = Date.now();
    this.#lastNote = '';
    this.#metrics.certReloads.inc({ cert: c.name, result: 'ok' });
    this.#metrics.certNotAfter.set({ cert: c.name }, pair.leaf.notAfter.getTime() / 1000);
    this.#log.info({
      where: best.where,
      fingerprint: pair.leaf.fingerprint,
      not_before: pair.leaf.notBefore.toISOString(),
      not_after: pair.leaf.notAfter.toISOString(),
      copied_to: c.copyTo === null ? null : copyToPaths(c.copyTo, c.name),
      action: done?.what ?? null,
      ms,
    }, 'certificate deployed');
    this.#lookAgainIfAsked();
    // Last, once counted and logged: the TURN server already has the pair. Not a failed
    // deployment if this cannot be written; the next start acts on the pair once more.
    if (c.copyTo !== null) {
      const w = await recordDeployment(c.copyTo, c.name, pair.leaf, 'acted')
        .catch((err: Error) => `could not record the deployment: ${err.message}`);
      if (w !== null) this.#log.warn(w);
    }
  }

  #actionFailed(pair: GoodPair, err: Error, attempt: number, retryInMs: number | null): void {
    if (this.#withdrawn) return;
    this.#metrics.certReloads.inc({ cert: this.config.name, result: 'error' });
    if (retryInMs !== null) {
      this.#log.error({ err: err.message, fingerprint: pair.leaf.fingerprint, attempt, retry_in_ms: retryInMs }, 'certificate deployment failed');
    } else {
      this.#log.error({
        err: err.message, fingerprint: pair.leaf.fingerprint, attempts: attempt,
      }, 'certificate deployment failed; giving up until the next change, SIGHUP or periodic rescan');
    }
    this.#lookAgainIfAsked();
  }

  #lookAgainIfAsked(): void {
    if (!this.#lookAgain) return;
    this.#lookAgain = false;
    this.#requestLook();
  }
}
