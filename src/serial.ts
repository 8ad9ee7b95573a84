// One run at a time, and once more after: what every route source does with its reads and the
// cert watcher with its scans. A request while a run is under way is remembered (merged with any
// others that arrive) and served by one more run right after it, so that nothing asked for is lost
// and a burst of requests costs two runs, never one per request.

export class Serial<T> {
  readonly #run: (request: T) => Promise<void>;
  readonly #merge: (a: T, b: T) => T;
  readonly #failed: (err: unknown) => void;
  #running: Promise<void> | null = null;
  #queued: { request: T } | null = null;
  #stopped = false;
  /** Called once a run is not followed by another (the PostgreSQL source schedules its next poll here). */
  onIdle: (() => void) | null = null;

  /**
   * `run` must report its own failures (to the sink, to the log): one that throws anyway is handed
   * to `failed`, and the next request runs as usual.
   */
  constructor(run: (request: T) => Promise<void>, merge: (a: T, b: T) => T, failed: (err: unknown) => void) {
    this.#run = run;
    this.#merge = merge;
    this.#failed = failed;
  }

  /** Whether a run is under way. */
  get busy(): boolean {
    return this.#running !== null;
  }

  /** Runs now, or once more after the run under way. Settles when the runs it led to are done. */
  request(request: T): Promise<void> {
    if (this.#stopped) return Promise.resolve();
    if (this.#running !== null) {
      this.#queued = this.#queued === null ? { request } : { request: this.#merge(this.#queued.request, request) };
      return this.#running;
    }
    this.#running = this.#loop(request);
    return this.#running;
  }

  async #loop(first: T): Promise<void> {
    let request = first;
    for (;;) {
      try {
        await this.#run(request);
      } catch (err) {
        this.#failed(err);
      }
      const next = this.#queued;
      if (next === null || this.#stopped) break;
      this.#queued = null;
      request = next.request;
    }
    this.#running = null;
    if (!this.#stopped) this.onIdle?.();
  }

  /** No more runs; resolves when the one under way (if any) is done. */
  stop(): Promise<void> {
    this.#stopped = true;
    this.#queued = null;
    return this.#running ?? Promise.resolve();
  }
}

/** Whether `p` settles within `ms` (it goes on either way): for shutdowns that must not hang on I/O. */
export async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const settled = await Promise.race([
    p.then(() => true, () => true),
    new Promise<false>((done) => {
      timer = setTimeout(() => done(false), ms);
    }),
  ]);
  clearTimeout(timer);
  return settled;
}
