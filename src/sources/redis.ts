// The Redis source: the hash at `key` is the whole truth (field = match, value = JSON
// {"backend":{...},"alpn":...}); a message on `channel` carries no data, it only says "the hash
// changed, read it again". Pub/sub is fire-and-forget, so a message sent while this source was
// disconnected is lost; the hash is therefore also read on every (re)connect of either connection
// and every `resync_interval`, so a lost message costs at most one resync.
import { Redis, type RedisOptions } from 'ioredis';
import { route } from '../config/routes.ts';
import type { RedisSourceConfig } from '../config/types.ts';
import { type Logger, redactUrl } from '../log.ts';
import { backoffMs } from './backoff.ts';
import type { RouteSpec } from '../model/route.ts';
import type { InvalidEntry, RouteSource, Snapshot, SourceSink } from './source.ts';

const RETRY_MIN_MS = 100;
/** Backoff cap: Redis coming back is noticed within this. */
const RETRY_MAX_MS = 5000;
const CONNECT_TIMEOUT_MS = 5000;
const COMMAND_TIMEOUT_MS = 5000;
/** How long start() waits for the first read, so the router starts with the routes when it can. */
const START_WAIT_MS = 3000;

export class RedisSource implements RouteSource {
  readonly type = 'redis' as const;
  readonly name: string;
  readonly #config: RedisSourceConfig;
  readonly #logger: Logger;
  #sink: SourceSink | null = null;
  #stopped = false;
  /** Reads the hash. */
  #client: Redis | null = null;
  /** Holds the subscription (a subscribed connection can run nothing else). */
  #subscriber: Redis | null = null;
  #reading: Promise<void> | null = null;
  #readAgain = false;
  #resyncTimer: NodeJS.Timeout | null = null;
  #subscriberDown = false;
  /** Settles on the first read's outcome, for start(). */
  #firstRead: (() => void) | null = null;

  constructor(config: RedisSourceConfig, logger: Logger) {
    this.name = config.name;
    this.#config = config;
    this.#logger = logger.child({ source: config.name });
  }

  async start(sink: SourceSink): Promise<void> {
    this.#sink = sink;
    const { url, key, channel } = this.#config;
    this.#logger.info({ url: redactUrl(url), key, channel, resync_interval_ms: this.#config.resyncIntervalMs }, 'redis source starting');
    const options: RedisOptions = {
      lazyConnect: true,
      // While Redis is down a command fails at once (and is reported) instead of waiting in a
      // queue that grows with every poll.
      enableOfflineQueue: false,
      maxRetriesPerRequest: 1,
      connectTimeout: CONNECT_TIMEOUT_MS,
      commandTimeout: COMMAND_TIMEOUT_MS,
      retryStrategy: (times) => backoffMs(times, RETRY_MIN_MS, RETRY_MAX_MS),
      // The subscription is renewed by hand on 'ready', then the hash is read: in that order, a
      // change cannot fall between the read and the subscription.
      autoResubscribe: false,
    };
    const client = new Redis(url, { ...options, connectionName: `sni-router:${this.name}` });
    const subscriber = new Redis(url, { ...options, connectionName: `sni-router:${this.name}:sub` });
    this.#client = client;
    this.#subscriber = subscriber;

    client.on('ready', () => void this.#requestRead());
    client.on('error', (err: Error) => this.#report(err));
    client.on('close', () => {
      if (!this.#stopped) this.#report(new Error('connection lost'));
    });

    subscriber.on('ready', () => {
      subscriber.subscribe(channel).then(() => {
        if (this.#subscriberDown) this.#logger.info({ channel }, 'redis subscription restored');
        this.#subscriberDown = false;
        void this.#requestRead();
      }, (err: Error) => this.#subscriberLost(err));
    });
    subscriber.on('message', (ch: string) => {
      if (ch === channel) void this.#requestRead();
    });
    subscriber.on('error', (err: Error) => this.#subscriberLost(err));
    subscriber.on('close', () => {
      if (!this.#stopped) this.#subscriberLost(new Error('connection lost'));
    });

    const first = new Promise<void>((done) => {
      this.#firstRead = done;
    });
    // A failed first connect is reported through 'error'; ioredis keeps retrying by retryStrategy.
    client.connect().catch(() => {});
    subscriber.connect().catch(() => {});
    this.#resyncTimer = setInterval(() => void this.#requestRead(), this.#config.resyncIntervalMs);
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([first, new Promise<void>((done) => {
      timer = setTimeout(done, START_WAIT_MS);
    })]);
    clearTimeout(timer);
  }

  resync(): void {
    void this.#requestRead();
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#resyncTimer !== null) clearInterval(this.#resyncTimer);
    this.#resyncTimer = null;
    this.#firstRead?.();
    const clients = [this.#client, this.#subscriber].filter((c): c is Redis => c !== null);
    this.#client = null;
    this.#subscriber = null;
    await Promise.all(clients.map(closeQuietly));
    await this.#reading?.catch(() => {});
  }

  #requestRead(): Promise<void> {
    if (this.#stopped) return Promise.resolve();
    if (this.#reading !== null) {
      this.#readAgain = true;
      return this.#reading;
    }
    this.#reading = this.#read().finally(() => {
      this.#reading = null;
      if (this.#readAgain && !this.#stopped) {
        this.#readAgain = false;
        void this.#requestRead();
      }
    });
    return this.#reading;
  }

  async #read(): Promise<void> {
    const client = this.#client;
    // Not connected: the loss is already reported, and 'ready' will read.
    if (client === null || client.status !== 'ready') return;
    let hash: Record<string, string>;
    try {
      hash = await client.hgetall(this.#config.key);
    } catch (err) {
      this.#report(err as Error);
      return;
    }
    if (this.#stopped) return;
    this.#sink?.snapshot(snapshotFromHash(hash, this.name));
    this.#settleFirst();
  }

  #report(err: Error): void {
    if (this.#stopped) return;
    this.#sink?.failure(new Error(`redis ${redactUrl(this.#config.url)}: ${err.message}`));
    this.#settleFirst();
  }

  #subscriberLost(err: Error): void {
    if (this.#stopped) return;
    // Reads (on connect and every resync_interval) go on; changes are only seen later meanwhile.
    this.#logger[this.#subscriberDown ? 'debug' : 'warn']({ channel: this.#config.channel, err: err.message },
      'redis subscription lost; reconnecting');
    this.#subscriberDown = true;
  }

  #settleFirst(): void {
    const done = this.#firstRead;
    this.#firstRead = null;
    done?.();
  }
}

/** Hash fields to a snapshot: an entry that does not make a valid route is skipped and reported. */
export function snapshotFromHash(hash: Readonly<Record<string, string>>, source: string): Snapshot {
  const routes: RouteSpec[] = [];
  const invalid: InvalidEntry[] = [];
  // Sorted, so that the same hash always yields the same snapshot whatever order Redis returns it in.
  for (const field of Object.keys(hash).sort()) {
    try {
      let value: unknown;
      try {
        value = JSON.parse(hash[field]);
      } catch (err) {
        throw new Error(`value is not JSON: ${(err as Error).message}`);
      }
      if (value === null || typeof value !== 'object' || Array.isArray(value)) {
        throw new Error('value must be a JSON object like {"backend":{"addr":"127.0.0.1:5349"}}');
      }
      const o = value as Record<string, unknown>;
      if (o.match !== undefined && o.match !== field) throw new Error(`value's match "${String(o.match)}" differs from its field`);
      routes.push(route({ ...o, match: field }, [], source));
    } catch (err) {
      invalid.push({ entry: field, error: (err as Error).message });
    }
  }
  return { routes, invalid };
}

/** Disconnects for good (no reconnect) and waits, briefly, for the socket to close. */
async function closeQuietly(client: Redis): Promise<void> {
  const open = client.status === 'connecting' || client.status === 'connect' || client.status === 'ready';
  let timer: NodeJS.Timeout | undefined;
  const ended = open
    ? new Promise<void>((done) => {
      client.once('end', () => done());
      timer = setTimeout(done, 1000);
    })
    : Promise.resolve();
  client.disconnect();
  await ended;
  clearTimeout(timer);
}
