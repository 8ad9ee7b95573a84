// Backend addresses that failed to dial, skipped for `backend_cooldown` while another is available.
// Shared by every connection of a server, and (through onChange) by every worker.
import type { Logger } from '../log.ts';
import { RateLimitedLog } from '../log.ts';
import type { Metrics } from '../metrics/metrics.ts';
import type { BackendSpec } from '../model/route.ts';

/** Local conditions that say nothing about the backend's health: no cooldown for these. */
const LOCAL_DIAL_ERRORS = new Set(['EMFILE', 'ENFILE', 'ENOBUFS', 'ENOMEM', 'EADDRNOTAVAIL']);

export interface BackendHealth {
  readonly addr: string;
  readonly healthy: boolean;
  /** Unix ms until which the address is skipped, when unhealthy. */
  readonly cooldownUntil: number | null;
  readonly lastError: string | null;
}

/** A change of one address's cooldown: until null means healthy again. */
export interface CooldownChange {
  readonly addr: string;
  readonly until: number | null;
  readonly error: string | null;
}

export class Cooldowns {
  readonly #map = new Map<string, { until: number; error: string }>();
  readonly #log = new RateLimitedLog(1000);
  readonly #metrics: Metrics;
  readonly #logger: Logger;
  /**
   * Told about every cooldown set or cleared here, so that processes serving the same backends
   * (workers) can share them: an address one found dead is skipped by all.
   */
  onChange: ((change: CooldownChange) => void) | null = null;

  constructor(metrics: Metrics, logger: Logger) {
    this.#metrics = metrics;
    this.#logger = logger;
  }

  health(addr: string): BackendHealth {
    const cd = this.#map.get(addr);
    if (cd === undefined || cd.until <= Date.now()) return { addr, healthy: true, cooldownUntil: null, lastError: null };
    return { addr, healthy: false, cooldownUntil: cd.until, lastError: cd.error };
  }

  /**
   * Picks the next address to try, from index `from` on: the first that is not cooling down after
   * a failure, or else simply the next one (an address in cooldown is still better than none).
   * Each address is tried at most once per connection; -1 when none are left.
   */
  nextAddr(backend: BackendSpec, from: number): number {
    if (from >= backend.addrs.length) return -1;
    if (this.#map.size === 0) return from;
    const now = Date.now();
    for (let i = from; i < backend.addrs.length; i++) {
      const cd = this.#map.get(backend.addrs[i]);
      if (cd === undefined || cd.until <= now) return i;
    }
    return from;
  }

  /** `code` is the error's name: ECONNREFUSED, ETIMEDOUT (backend_dial_timeout), ENOTFOUND, … */
  failed(backend: BackendSpec, addr: string, code: string, cooldownMs: number): void {
    this.#metrics.backendDialFailures.inc({ backend: backend.name });
    if (!LOCAL_DIAL_ERRORS.has(code)) {
      const until = Date.now() + cooldownMs;
      this.#map.set(addr, { until, error: code });
      this.onChange?.({ addr, until, error: code });
    }
    const suppressed = this.#log.allow();
    if (suppressed >= 0) this.#logger.warn({ backend: backend.name, addr, err: code, suppressed }, 'backend dial failed');
  }

  succeeded(addr: string): void {
    if (this.#map.size > 0 && this.#map.delete(addr)) this.onChange?.({ addr, until: null, error: null });
  }

  /** A cooldown another process set or cleared (not reported back through onChange). */
  apply(change: CooldownChange): void {
    if (change.until === null) this.#map.delete(change.addr);
    else this.#map.set(change.addr, { until: change.until, error: change.error ?? 'unknown' });
  }
}
