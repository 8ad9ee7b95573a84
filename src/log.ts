// pino JSON logs on stdout, and the few helpers every part uses: a rate limit for messages that a
// flood would otherwise repeat, and redaction of secrets in URLs.
import pino, { type Logger } from 'pino';

export type { Logger } from 'pino';

export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  return pino(
    {
      level,
      base: { pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    destination ?? pino.destination({ dest: 1, sync: false }),
  );
}

/** Replaces the password in a URL ("postgres://u:secret@h/db" → "postgres://u:***@h/db"). */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password !== '') u.password = '***';
    // A password can also travel as a query parameter (libpq's ?password=).
    for (const k of [...u.searchParams.keys()]) {
      if (/pass|secret|token/i.test(k)) u.searchParams.set(k, '***');
    }
    return u.toString();
  } catch {
    return url.replace(/\/\/([^:/@]*):[^@/]*@/, '//$1:***@');
  }
}

/**
 * Lets a message through at most once per interval and says how many were held back, so that a
 * flood (a connection limit hit 10,000 times a second) costs one log line, not 10,000.
 */
export class RateLimitedLog {
  readonly #intervalMs: number;
  #nextAt = 0;
  #suppressed = 0;
  constructor(intervalMs: number) {
    this.#intervalMs = intervalMs;
  }
  /** Returns the number suppressed since the last line if this one should be logged, else -1. */
  allow(now = Date.now()): number {
    if (now < this.#nextAt) {
      this.#suppressed++;
      return -1;
    }
    this.#nextAt = now + this.#intervalMs;
    const n = this.#suppressed;
    this.#suppressed = 0;
    return n;
  }
}
