// Reconnect and retry delays for the sources that talk to a server.

/** Exponential backoff from minMs doubling to maxMs, with 20% jitter so routers do not retry in step. */
export function backoffMs(attempt: number, minMs: number, maxMs: number): number {
  const base = Math.min(maxMs, minMs * 2 ** Math.min(Math.max(attempt, 1) - 1, 10));
  return base * (0.8 + Math.random() * 0.2);
}
