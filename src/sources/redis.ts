// The Redis source: the hash at `key` is the whole truth (field = match, value = JSON
// {"backend":{...},"alpn":...}); a message on `channel` carries no data, it only says "the hash
// changed, read it again". Pub/sub is fire-and-forget, so a message sent while this source was
// disconnected is lost; the hash is therefore also read on every (re)connect of either connection
// and every `resync_interval`, so a lost message costs at most one resync.
//
// The hash is read with HSCAN, a thousand fields at a time, so that a big one (200,000 routes is
// a 20 MB reply) is decoded in small pieces between which connections are served, not in one
// stall. The entries are hashed in Redis's order; a digest equal to the last snapshot's is reported
// unchanged and nothing is validated or merged. In a changed hash only the entries whose value
// changed are parsed and validated again (the others keep their route), in slices.
import { createHash } from 'node:crypto';
import { Redis, type RedisOptions } from 'ioredis';
import { route } from '../config/routes.ts';
import type { RedisSourceConfig } from '../config/types.ts';
import { type Logger, redactUrl } from '../log.ts';
import { backoffMs } from './backoff.ts';
import { type RouteSpec, clip, quote } from '../model/route.ts';
import { Serial } from '../serial.ts';
import { forEachSliced } from './slices.ts';
import type { InvalidEntry, RouteSource, Snapshot, SourceSink } from './source.ts';

/** How the connections behave (ioredis options and this source's own waits). */
const TIMING = {
  /** Reconnect backoff from this ... */
  retryMinMs: 100,
  /** ... capped here: Redis coming back is noticed within this. */
  retryMaxMs: 5000,
  connectTimeoutMs: 5000,
  commandTimeoutMs: 5000,
  /** How long start() waits for the first read, so the router starts with the routes when it can. */
  startWaitMs: 3000,
  /** How long a lost subscription may be down (with the reading connection up) before a warning. */
  subscriptionGraceMs: 2000,
} as const;
/** A field longer than any pattern, or a value longer than any route, is refused unread. */
const MAX_ENTRY = { fieldBytes: 512, valueBytes: 64 * 1024 } as const;

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
  /** One read of the hash at a time, and once more after when asked meanwhile. */
  readonly #reads = new Serial<void>(
    () => this.#read(),
    () => undefined,
    (err) => this.#report(err as Error),
  );
  #resyncTimer: NodeJS.Timeout | null = null;
  #subscriberDown = false;
  /** The reading connection is down: its 'close' and 'error' events after the first say nothing new. */
  #clientDown = false;
  /** The error the current outage began with: every failed attempt of it is reported as that one. */
  #outage: string | null = null;
  /** Digest of the hash the last snapshot was made from (null: none yet, or a read must not be skipped). */
  #digest: string | null = null;
  /** The last snapshot's entries: field → its value and what it made. */
  #entries: ReadonlyMap<string, Entry> = new Map();
  /** Settles on the first read's outcome, for start(). */
  #firstRead: (() => void) | null = null;

  constructor(config: RedisSourceConfig, logger: Logger) {
    this.name = config.name;
    this.#config = config;
    this.#logger = logger.child({ source: config.name });
  }

  async start(sink: SourceSink): Promise<void> {
    // Stopped before it started (a reload replaced it meanwhile): it must open nothing.
    if (this.#stopped || this.#client !== null) return;
    this.#sink = sink;
    const { url, key, channel } = this.#config;
    this.#logger.info({ url: redactUrl(url), key, channel, resync_interval_ms: this.#config.resyncIntervalMs }, 'redis source starting');
    const options: RedisOptions = {
      lazyConnect: true,
      // While Redis is down a command fails at once (and is reported) instead of waiting in a
      // queue that grows with every poll.
      enableOfflineQueue: false,
      maxRetriesPerRequest: 1,
      connectTimeout: TIMING.connectTimeoutMs,
      commandTimeout: TIMING.commandTimeoutMs,
      retryStrategy: (times) => backoffMs(times, TIMING.retryMinMs, TIMING.retryMaxMs),
      // The subscription is renewed by hand on 'ready', then the hash is read: in that order, a
      // change cannot fall between the read and the subscription.
      autoResubscribe: false,
    };
    const client = new Redis(url, { ...options, connectionName: `sni-router:${this.name}` });
    const subscriber = new Redis(url, { ...options, connectionName: `sni-router:${this.name}:sub` });
    this.#client = client;
    this.#subscriber = subscriber;

    client.on('ready', () => {
      this.#clientDown = false;
      this.#outage = null;
      void this.#requestRead();
    });
    // ioredis emits 'error' and then 'close' for each failed (re)connect, with messages that
    // alternate ("connection lost", "connect ECONNREFUSED"): one outage, described by its first
    // error. Each attempt is reported (and counted), as that error, so the outage is logged once
    // when it begins, and once when it ends ('source recovered', with the count).
    client.on('error', (err: Error) => {
      this.#clientDown = true;
      this.#report(err);
    });
    client.on('close', () => {
      if (this.#stopped || this.#clientDown) return;
      this.#clientDown = true;
      this.#report(new Error('connection lost'));
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
      timer = setTimeout(done, TIMING.startWaitMs);
    })]);
    clearTimeout(timer);
  }

  resync(): void {
    // An explicit resync (SIGHUP) reads, validates and applies in full, whatever the digest says.
    this.#digest = null;
    this.#entries = new Map();
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
    await this.#reads.stop();
  }

  #requestRead(): Promise<void> {
    return this.#reads.request();
  }

  async #read(): Promise<void> {
    const client = this.#client;
    // Not connected: the loss is already reported, and 'ready' will read.
    if (client === null || client.status !== 'ready') return;
    let hash: Map<string, string>;
    let digest: string;
    try {
      ({ hash, digest } = await scanHash(client, this.#config.key, () => this.#stopped));
    } catch (err) {
      this.#report(err as Error);
      return;
    }
    if (this.#stopped) return;
    if (digest === this.#digest) {
      this.#sink?.unchanged();
    } else {
      const { snapshot, entries } = await snapshotFromEntries(hash, this.name, this.#entries);
      if (this.#stopped) return;
      this.#digest = digest;
      this.#entries = entries;
      this.#sink?.snapshot(snapshot);
    }
    this.#settleFirst();
  }

  #report(err: Error): void {
    if (this.#stopped) return;
    const message = this.#clientDown ? (this.#outage ??= clip(err.message, 300)) : clip(err.message, 300);
    this.#sink?.failure(new Error(`redis ${redactUrl(this.#config.url)}: ${message}`));
    this.#settleFirst();
  }

  #subscriberLost(err: Error): void {
    if (this.#stopped) return;
    const first = !this.#subscriberDown;
    this.#subscriberDown = true;
    this.#logger.debug({ channel: this.#config.channel, err: clip(err.message, 300) }, 'redis subscription lost; reconnecting');
    if (!first) return;
    // Reads (on connect and every resync_interval) go on; changes are only seen later meanwhile.
    // Worth a warning only when the subscription alone is lost: when Redis is down, the source's
    // own failure says so, once.
    setTimeout(() => {
      if (this.#stopped || !this.#subscriberDown || this.#clientDown) return;
      this.#logger.warn({ channel: this.#config.channel, err: clip(err.message, 300) },
        'redis subscription lost; changes are seen at each resync until it is back');
    }, TIMING.subscriptionGraceMs).unref();
  }

  #settleFirst(): void {
    const done = this.#firstRead;
    this.#firstRead = null;
    done?.();
  }
}

/** Fields asked for per HSCAN: a reply of about 100 KB at a time. */
const SCAN_COUNT = 1000;

/**
 * Every field of the hash, by HSCAN, and a digest of what was read in Redis's order (an unchanged
 * hash is scanned in the same order), hashed batch by batch as the replies arrive. A field that
 * changes during the scan may come back twice (the last value read wins) or not at all: its
 * change's PUBLISH, or the next resync, reads it again.
 */
async function scanHash(client: Redis, key: string, stopped: () => boolean): Promise<{ hash: Map<string, string>; digest: string }> {
  const hash = new Map<string, string>();
  const digest = createHash('sha256');
  let cursor = '0';
  do {
    const [next, flat] = await client.hscan(key, cursor, 'COUNT', SCAN_COUNT);
    for (let i = 0; i + 1 < flat.length; i += 2) {
      hash.set(flat[i], flat[i + 1]);
      digest.update(flat[i]).update('\u0000').update(flat[i + 1]).update('\u0001');
    }
    cursor = next;
  } while (cursor !== '0' && !stopped());
  return { hash, digest: digest.digest('base64') };
}

/** What one hash entry made: its route, or why it was refused. */
interface Entry {
  readonly value: string;
  readonly route: RouteSpec | null;
  readonly error: string | null;
}

/**
 * Hash entries to a snapshot: an entry that does not make a valid route is skipped and reported.
 * An entry whose value is the same as in `previous` keeps what it made there (no JSON parse, no
 * validation), so a change of a few entries in a big hash costs a few. The order of the routes is
 * Redis's: each field is its own match, so the order decides nothing.
 */
export async function snapshotFromEntries(
  hash: ReadonlyMap<string, string>, source: string, previous: ReadonlyMap<string, Entry> = new Map(),
): Promise<{ snapshot: Snapshot; entries: Map<string, Entry> }> {
  const routes: RouteSpec[] = [];
  const invalid: InvalidEntry[] = [];
  const entries = new Map<string, Entry>();
  await forEachSliced([...hash], ([field, value]) => {
    let entry = previous.get(field);
    if (entry === undefined || entry.value !== value) {
      try {
        entry = { value, route: routeFromEntry(field, value, source), error: null };
      } catch (err) {
        entry = { value, route: null, error: (err as Error).message };
      }
    }
    entries.set(field, entry);
    if (entry.route !== null) routes.push(entry.route);
    else invalid.push({ entry: clip(field), error: entry.error! });
  });
  return { snapshot: { routes, invalid }, entries };
}

/** Hash fields to a snapshot (each validated). */
export async function snapshotFromHash(hash: Readonly<Record<string, string>>, source: string): Promise<Snapshot> {
  return (await snapshotFromEntries(new Map(Object.entries(hash)), source)).snapshot;
}

/** One hash entry as a route, or an error saying why not. */
export function routeFromEntry(field: string, text: string, source: string): RouteSpec {
  if (Buffer.byteLength(field) > MAX_ENTRY.fieldBytes) throw new Error(`field is longer than ${MAX_ENTRY.fieldBytes} bytes`);
  if (text.length > MAX_ENTRY.valueBytes) throw new Error(`value is longer than ${MAX_ENTRY.valueBytes} bytes`);
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new Error(`value is not JSON: ${clip((err as Error).message)}`);
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new Error('value must be a JSON object like {"backend":{"addr":"127.0.0.1:5349"}}');
  }
  const o = value as Record<string, unknown>;
  if (o.match !== undefined && o.match !== field) throw new Error(`value's match ${quote(String(o.match))} differs from its field`);
  return route({ ...o, match: field }, [], source);
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
