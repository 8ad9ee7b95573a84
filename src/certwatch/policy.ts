// When an action may run. Pure: the scheduler (scheduler.ts) asks these at every turn, with the
// time it is given, and does what they say.
//
// - restart_window defers `restart` actions (systemd or Docker) to a time of day, local time: a
//   restart drops every call the TURN server relays. `signal` (coturn reloads in place) and `exec`
//   (whatever it does, the operator chose it) are never deferred.
// - urgent_before overrides the window: when the certificate the TURN server serves now expires
//   within it, waiting for the window could let it expire. When nothing tells what it serves (an
//   empty copy_to, or no copy_to), the restart is urgent too: it may be serving nothing usable.
// - stagger spaces the actions of one renewal: one at a time, the next starting `stagger` after
//   the previous ended; a retry of the same action waits for its backoff only.
import type { CertAction, RestartWindow } from '../config/types.ts';

function minuteOfDay(at: Date): number {
  return at.getHours() * 60 + at.getMinutes();
}

/** Whether `at` (local time) falls in the window: from its start, up to but not including its end. */
export function inWindow(w: RestartWindow, at: Date): boolean {
  const m = minuteOfDay(at);
  return w.startMin < w.endMin ? m >= w.startMin && m < w.endMin : m >= w.startMin || m < w.endMin;
}

/** When the window is next open: `at` itself when it is open now, else its next start (local time). */
export function windowOpensAt(w: RestartWindow, at: Date): Date {
  if (inWindow(w, at)) return at;
  const start = new Date(at);
  start.setHours(Math.floor(w.startMin / 60), w.startMin % 60, 0, 0);
  if (start.getTime() <= at.getTime()) {
    // setDate, then the hour again: a day is not 24 hours across a daylight-saving change.
    start.setDate(start.getDate() + 1);
    start.setHours(Math.floor(w.startMin / 60), w.startMin % 60, 0, 0);
  }
  return start;
}

/** The certificate served now expires within urgentBeforeMs of `nowMs`; unknown (null) counts as urgent. */
export function isUrgent(servingUntil: number | null, nowMs: number, urgentBeforeMs: number): boolean {
  return servingUntil === null || servingUntil - nowMs <= urgentBeforeMs;
}

/** Only a restart interrupts what the TURN server relays. */
export function isDeferrable(action: CertAction): boolean {
  return action.kind === 'restart';
}

export type When =
  | { readonly kind: 'now'; readonly urgent: boolean }
  | { readonly kind: 'deferred'; readonly until: Date };

export interface Timing {
  readonly action: CertAction;
  readonly window: RestartWindow | null;
  readonly urgentBeforeMs: number;
  /** notAfter (ms) of the certificate the TURN server serves now; null: unknown. */
  readonly servingUntil: number | null;
}

/** Whether an action may run at `now`, or until when it waits for its window. */
export function whenToAct(t: Timing, now: Date): When {
  if (!isDeferrable(t.action) || t.window === null || inWindow(t.window, now)) return { kind: 'now', urgent: false };
  if (isUrgent(t.servingUntil, now.getTime(), t.urgentBeforeMs)) return { kind: 'now', urgent: true };
  return { kind: 'deferred', until: windowOpensAt(t.window, now) };
}

/** The wait before retry `attempt` (1-based) of a failed action: doubling from base, at most max. */
export function retryDelay(attempt: number, baseMs: number, maxMs: number): number {
  return Math.min(baseMs * 2 ** Math.max(0, attempt - 1), maxMs);
}

/** A queued action as the choice of the next one sees it. */
export interface Queued {
  readonly key: string;
  /** Not deferred, not failed. */
  readonly ready: boolean;
  /** Not before this (Date.now() ms): a failed attempt's backoff; 0 when none. */
  readonly retryAt: number;
}

/** The action that ran last: the next one starts its stagger after it ended. */
export interface LastRun {
  readonly key: string;
  readonly endedAt: number;
  readonly staggerMs: number;
}

export type Next<Q> = { readonly run: Q } | { readonly wakeAt: number } | null;

/**
 * The next action to run from `queue` (in queue order), or when to look again, or null when
 * nothing is ready. The first ready one whose backoff is over goes next, once the previous
 * action's stagger has passed; a retried one does not hold up the others behind it.
 */
export function pickNext<Q extends Queued>(queue: readonly Q[], nowMs: number, last: LastRun | null): Next<Q> {
  let wakeAt = Number.POSITIVE_INFINITY;
  for (const q of queue) {
    if (!q.ready) continue;
    if (q.retryAt > nowMs) {
      wakeAt = Math.min(wakeAt, q.retryAt);
      continue;
    }
    const gate = last === null || last.key === q.key ? 0 : last.endedAt + last.staggerMs;
    if (gate > nowMs) return { wakeAt: Math.min(wakeAt, gate) };
    return { run: q };
  }
  return Number.isFinite(wakeAt) ? { wakeAt } : null;
}
