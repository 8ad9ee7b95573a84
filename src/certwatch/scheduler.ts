// One queue for the on_change actions of every certwatch entry, static and per namespace. A
// renewal of a certificate that many entries use (a multi-SAN or wildcard certificate for every
// namespace) would otherwise restart every namespace's TURN server in the same second, dropping
// every call on the node at once. Here actions run one at a time, `stagger` apart; restarts wait
// for `restart_window` unless urgent; a failed one is retried behind the others. When each may run
// is policy.ts's to say; this file keeps the queue, the timers and the bookkeeping.
//
// Each entry has at most one action queued: the pair it acts for is what copy_to holds, and a
// newer pair that arrives meanwhile replaces it in place (the action reads copy_to when it runs).
import type { CertAction, RestartWindow } from '../config/types.ts';
import type { Logger } from '../log.ts';
import type { Metrics } from '../metrics/metrics.ts';
import { settlesWithin } from '../serial.ts';
import { type ActionDone, describeAction, runAction } from './action.ts';
import type { DeployedPaths } from './deploy.ts';
import { type LastRun, type Queued, pickNext, retryDelay, whenToAct } from './policy.ts';

export interface SchedulerTuning {
  readonly retryBaseMs: number;
  readonly retryMaxMs: number;
  /** Retries after the first attempt before the action is "failed" until the next change, SIGHUP or rescan. */
  readonly retries: number;
  readonly actionTimeoutMs: number;
  readonly stopWaitMs: number;
  /** How often deferred actions are looked at again (the clock may be moved; a window may open). */
  readonly tickMs: number;
  /** The wall clock (ms) restart_window and urgent_before are judged by. */
  readonly now: () => number;
}

/** What an entry asks to be run, and how it hears back. */
export interface ActionJob {
  /** The entry's name: one job per entry. */
  readonly entry: string;
  readonly namespace: string | null;
  readonly action: CertAction;
  readonly paths: DeployedPaths;
  readonly staggerMs: number;
  readonly window: RestartWindow | null;
  readonly urgentBeforeMs: number;
  /** notAfter (ms) of the certificate the TURN server serves now; null: unknown. */
  readonly servingUntil: number | null;
  /** The pair it acts for. */
  readonly pairKey: string;
  readonly fingerprint: string;
  readonly log: Logger;
  done(done: ActionDone, ms: number): void;
  /** retryInMs null: out of retries; the action is "failed" until revived. */
  failed(err: Error, attempt: number, retryInMs: number | null): void;
}

export type ActionState = 'pending' | 'running' | 'deferred' | 'failed';
/** The states cert_actions counts; a running action is still pending. */
export const ACTION_STATES = ['pending', 'deferred', 'failed'] as const;

interface Slot extends Queued {
  ready: boolean;
  job: ActionJob;
  state: ActionState;
  /** Queue order: set when queued, and again (to the back) after a failed attempt. */
  seq: number;
  attempts: number;
  retryAt: number;
  queuedAt: number;
  deferredUntil: Date | null;
  /** Logged as urgent already (once per job). */
  urgentNoted: boolean;
  lastError: string | null;
  /** A newer job for the same entry, submitted while this one ran. */
  next: ActionJob | null;
  withdrawn: boolean;
}

/** An entry's action as /routes shows it. */
export interface ActionView {
  readonly action: string;
  readonly state: ActionState;
  readonly fingerprint: string;
  readonly queued_at: string;
  readonly attempts: number;
  readonly retry_at: string | null;
  readonly deferred_until: string | null;
  readonly last_error: string | null;
}

export class ActionScheduler {
  readonly #t: SchedulerTuning;
  readonly #log: Logger;
  readonly #metrics: Metrics;
  readonly #env: NodeJS.ProcessEnv;
  readonly #slots = new Map<string, Slot>();
  #seq = 0;
  #last: LastRun | null = null;
  #running: Promise<void> | null = null;
  #timer: NodeJS.Timeout | null = null;
  #stopped = false;

  constructor(deps: { readonly logger: Logger; readonly metrics: Metrics; readonly env: NodeJS.ProcessEnv; readonly tuning: SchedulerTuning }) {
    this.#t = deps.tuning;
    this.#log = deps.logger;
    this.#metrics = deps.metrics;
    this.#env = deps.env;
  }

  /** Starts the cert_actions series of an entry at 0. */
  track(entry: string): void {
    for (const state of ACTION_STATES) this.#metrics.certActions.set({ cert: entry, state }, 0);
  }

  /** Drops an entry's action (one running finishes unheard) and its series. */
  forget(entry: string): void {
    const slot = this.#slots.get(entry);
    if (slot !== undefined) {
      slot.withdrawn = true;
      if (slot.state !== 'running') this.#slots.delete(entry);
    }
    for (const state of ACTION_STATES) this.#metrics.certActions.remove({ cert: entry, state });
  }

  /** Queues an action, or replaces the one queued for the same entry (keeping its place). */
  submit(job: ActionJob): void {
    if (this.#stopped) return;
    const slot = this.#slots.get(job.entry);
    if (slot !== undefined && slot.withdrawn) {
      // The entry went and came back while its old action ran: that one ends unheard, this one queues.
      this.#slots.set(job.entry, this.#fresh(job));
    } else if (slot !== undefined && slot.state === 'running') {
      slot.next = job;
    } else if (slot !== undefined && slot.state !== 'failed') {
      Object.assign(slot, { job, attempts: 0, retryAt: 0, lastError: null, urgentNoted: false });
    } else {
      this.#slots.set(job.entry, this.#fresh(job));
    }
    this.#setGauge(job.entry);
    this.#pump();
  }

  /** A failed action gets a new budget (SIGHUP, the periodic rescan). */
  revive(entry: string): void {
    const slot = this.#slots.get(entry);
    if (slot === undefined || slot.state !== 'failed') return;
    Object.assign(slot, { state: 'pending', attempts: 0, retryAt: 0, seq: ++this.#seq });
    this.#setGauge(entry);
    this.#pump();
  }

  /** The action queued for an entry, if any: its state and the pair it is for. */
  stateOf(entry: string): { readonly state: ActionState; readonly pairKey: string } | null {
    const slot = this.#slots.get(entry);
    return slot === undefined || slot.withdrawn ? null : { state: slot.state, pairKey: slot.job.pairKey };
  }

  view(entry: string): ActionView | null {
    const s = this.#slots.get(entry);
    if (s === undefined || s.withdrawn) return null;
    return {
      action: describeAction(s.job.action),
      state: s.state,
      fingerprint: s.job.fingerprint,
      queued_at: new Date(s.queuedAt).toISOString(),
      attempts: s.attempts,
      retry_at: s.retryAt > Date.now() && s.state === 'pending' ? new Date(s.retryAt).toISOString() : null,
      deferred_until: s.deferredUntil?.toISOString() ?? null,
      last_error: s.lastError,
    };
  }

  /** Stops starting actions; waits (bounded) for the one running. */
  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#timer !== null) clearTimeout(this.#timer);
    this.#timer = null;
    const running = this.#running;
    if (running === null) return;
    if (!await settlesWithin(running, this.#t.stopWaitMs)) {
      const stuck = [...this.#slots.values()].find((s) => s.state === 'running');
      (stuck?.job.log ?? this.#log).warn({ waited_ms: this.#t.stopWaitMs }, 'certwatch stopped while a scan or deployment was still under way');
    }
  }

  #fresh(job: ActionJob): Slot {
    return {
      key: job.entry, ready: true, job, state: 'pending', seq: ++this.#seq, attempts: 0, retryAt: 0, queuedAt: Date.now(),
      deferredUntil: null, urgentNoted: false, lastError: null, next: null, withdrawn: false,
    };
  }

  #setGauge(entry: string): void {
    const slot = this.#slots.get(entry);
    const counted = slot === undefined || slot.withdrawn ? null : slot.state === 'running' ? 'pending' : slot.state;
    for (const state of ACTION_STATES) this.#metrics.certActions.set({ cert: entry, state }, counted === state ? 1 : 0);
  }

  /** Looks at the queue: marks what waits for its window, runs the next action or sets a timer for it. */
  #pump(): void {
    if (this.#stopped || this.#running !== null) return;
    if (this.#timer !== null) clearTimeout(this.#timer);
    this.#timer = null;
    const wall = new Date(this.#t.now());
    const queue = [...this.#slots.values()].filter((s) => s.state === 'pending' || s.state === 'deferred').sort((a, b) => a.seq - b.seq);
    let deferred = false;
    for (const s of queue) {
      const when = whenToAct({ action: s.job.action, window: s.job.window, urgentBeforeMs: s.job.urgentBeforeMs, servingUntil: s.job.servingUntil }, wall);
      if (when.kind === 'deferred') {
        deferred = true;
        if (s.state !== 'deferred' || s.deferredUntil?.getTime() !== when.until.getTime()) {
          s.job.log.info({
            action: describeAction(s.job.action), window: s.job.window?.text, until: when.until.toISOString(),
            serving_not_after: s.job.servingUntil === null ? null : new Date(s.job.servingUntil).toISOString(),
          }, 'restart deferred to the restart window');
        }
        s.state = 'deferred';
        s.deferredUntil = when.until;
      } else {
        if (when.urgent && !s.urgentNoted) {
          s.urgentNoted = true;
          s.job.log.warn({
            window: s.job.window?.text, urgent_before_ms: s.job.urgentBeforeMs,
            serving_not_after: s.job.servingUntil === null ? null : new Date(s.job.servingUntil).toISOString(),
          }, s.job.servingUntil === null
            ? 'restart outside the restart window: what the TURN server serves is not known'
            : 'restart outside the restart window: the certificate being served expires soon');
        }
        s.state = 'pending';
        s.deferredUntil = null;
      }
      s.ready = s.state === 'pending';
      this.#setGauge(s.key);
    }
    const next = pickNext(queue, Date.now(), this.#last);
    if (next !== null && 'run' in next) {
      this.#run(next.run);
      return;
    }
    let wakeAt = next === null ? Number.POSITIVE_INFINITY : next.wakeAt;
    if (deferred) wakeAt = Math.min(wakeAt, Date.now() + this.#t.tickMs);
    if (Number.isFinite(wakeAt)) {
      this.#timer = setTimeout(() => {
        this.#timer = null;
        this.#pump();
      }, Math.max(0, wakeAt - Date.now()));
    }
  }

  #run(slot: Slot): void {
    slot.state = 'running';
    this.#setGauge(slot.key);
    const job = slot.job;
    const started = Date.now();
    this.#running = runAction(job.action, job.paths, { env: this.#env, timeoutMs: this.#t.actionTimeoutMs })
      .then((done) => this.#finished(slot, job, started, done, null), (err: unknown) => this.#finished(slot, job, started, null, err as Error))
      .catch((err: unknown) => this.#log.error({ err: (err as Error).message }, 'certwatch action bookkeeping failed'))
      .finally(() => {
        this.#running = null;
        this.#pump();
      });
  }

  #finished(slot: Slot, job: ActionJob, started: number, done: ActionDone | null, err: Error | null): void {
    const endedAt = Date.now();
    this.#last = { key: slot.key, endedAt, staggerMs: job.staggerMs };
    if (slot.withdrawn) {
      if (this.#slots.get(slot.key) === slot) this.#slots.delete(slot.key);
      return;
    }
    if (err === null) {
      this.#slots.delete(slot.key);
      job.done(done!, endedAt - started);
    } else {
      slot.attempts++;
      slot.lastError = err.message;
      if (slot.attempts <= this.#t.retries) {
        const delay = retryDelay(slot.attempts, this.#t.retryBaseMs, this.#t.retryMaxMs);
        Object.assign(slot, { state: 'pending', retryAt: endedAt + delay, seq: ++this.#seq });
        job.failed(err, slot.attempts, delay);
      } else {
        slot.state = 'failed';
        job.failed(err, slot.attempts, null);
      }
    }
    if (slot.next !== null) {
      // Submitted while this one ran: it runs afresh, in this one's place.
      const fresh = this.#fresh(slot.next);
      this.#slots.set(slot.key, { ...fresh, seq: slot.seq });
    }
    this.#setGauge(slot.key);
  }
}
