// The PostgreSQL source: runs one query that returns the routes (the default reads the namespace
// tables of sql/schema.sql; a custom one returns match, addr [, name, proxy_protocol, alpn]) every
// `interval`, and at once whenever a NOTIFY arrives on `listen_channel`.
//
// Two connections: the reader runs the query, a dedicated listener holds the LISTEN (so a slow
// query never delays a notification, and a notification never waits for a poll). Either one lost
// is reconnected with exponential backoff capped at a few seconds, and the listener's return
// triggers a read, because the NOTIFYs sent while it was away are gone. While the database is
// unreachable the composer keeps the last good snapshot; with `cache_file` that snapshot also
// survives a restart during the outage.
import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, rename, unlink } from 'node:fs/promises';
import { dirname } from 'node:path';
import pg from 'pg';
import { route } from '../config/routes.ts';
import type { PostgresSourceConfig } from '../config/types.ts';
import { type Logger, redactUrl } from '../log.ts';
import { backoffMs } from './backoff.ts';
import { type AlpnCondition, type RouteSpec, alpnKey } from '../model/route.ts';
import type { InvalidEntry, RouteSource, Snapshot, SourceSink } from './source.ts';

const RETRY_MIN_MS = 200;
/** Backoff cap: an outage's end is noticed within this, whatever the poll interval. */
const RETRY_MAX_MS = 5000;
const CONNECT_TIMEOUT_MS = 5000;
/** How long start() waits for the first read before serving the cache file (a silent network). */
const START_WAIT_MS = 3000;

/**
 * The default query, over sql/schema.sql: every enabled namespace with a TURN port allocation on
 * this node becomes `turn-<namespace>.<base_domain>` → `<backend_host>:<turn_tls_port>`, named
 * `turn-<namespace>`. A stealth namespace's route carries `alpn: none`, so that only a client
 * offering no ALPN (a WebRTC TURN client) reaches TURN and browsers and probers reach the fallback.
 */
export const DEFAULT_QUERY = `
SELECT 'turn-' || c.namespace_name || '.' || $1::text AS match,
       $3::text || ':' || p.turn_tls_port::text AS addr,
       'turn-' || c.namespace_name AS name,
       CASE WHEN c.stealth_enabled THEN 'none' END AS alpn,
       c.namespace_name AS namespace
  FROM namespace_webrtc_config c
  JOIN webrtc_port_allocations p
    ON p.namespace_cluster_id = c.namespace_cluster_id AND p.service_type = 'turn'
 WHERE c.enabled AND p.node_id = $2::text
 ORDER BY c.namespace_name`;

/** The backend host of the default query when `params.backend_host` is not set: TURN runs beside the router. */
const DEFAULT_BACKEND_HOST = '127.0.0.1';

interface CacheFile {
  readonly version: 1;
  readonly source: string;
  readonly written_at: string;
  readonly routes: unknown[];
}

export class PostgresSource implements RouteSource {
  readonly type = 'postgres' as const;
  readonly name: string;
  readonly #config: PostgresSourceConfig;
  readonly #logger: Logger;
  #sink: SourceSink | null = null;
  #stopped = false;

  #reader: pg.Client | null = null;
  #reading: Promise<void> | null = null;
  #readAgain = false;
  #readFailures = 0;
  #pollTimer: NodeJS.Timeout | null = null;

  #listener: pg.Client | null = null;
  #listenFailures = 0;
  #listenTimer: NodeJS.Timeout | null = null;

  /** Routes from cache_file, read at start; served once if the database cannot be read first. */
  #cached: Snapshot | null = null;
  #cacheServed = false;
  #live = false;
  /** The routes last written to cache_file, so an unchanged poll does not rewrite it. */
  #cacheWritten = '';

  constructor(config: PostgresSourceConfig, logger: Logger) {
    this.name = config.name;
    this.#config = config;
    this.#logger = logger.child({ source: config.name });
  }

  async start(sink: SourceSink): Promise<void> {
    this.#sink = sink;
    if (this.#config.cacheFile !== null) this.#cached = await this.#readCache(this.#config.cacheFile);
    this.#logger.info({
      url: redactUrl(this.#config.url), interval_ms: this.#config.intervalMs, listen_channel: this.#config.listenChannel,
      query: this.#config.query === 'default' ? 'default' : 'custom',
    }, 'postgres source starting');
    if (this.#config.listenChannel !== null) void this.#connectListener();
    const first = this.#requestRead();
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([first, new Promise<void>((done) => {
      timer = setTimeout(done, START_WAIT_MS);
    })]);
    clearTimeout(timer);
    // Still nothing live (down, or too slow to answer): serve the cache while it keeps trying.
    this.#serveCache();
  }

  resync(): void {
    if (this.#stopped) return;
    // SIGHUP also cuts any backoff short: the operator asked for a read now.
    if (this.#config.listenChannel !== null && this.#listener === null && this.#listenTimer !== null) {
      clearTimeout(this.#listenTimer);
      this.#listenTimer = null;
      void this.#connectListener();
    }
    void this.#requestRead();
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#pollTimer !== null) clearTimeout(this.#pollTimer);
    if (this.#listenTimer !== null) clearTimeout(this.#listenTimer);
    this.#pollTimer = null;
    this.#listenTimer = null;
    const reader = this.#reader;
    const listener = this.#listener;
    this.#reader = null;
    this.#listener = null;
    await Promise.all([reader, listener].map((c) => (c === null ? undefined : endQuietly(c))));
    await this.#reading?.catch(() => {});
  }

  // --- reading -----------------------------------------------------------------------------

  /** Reads now, or once more after the read in flight (whatever number of requests arrive meanwhile). */
  #requestRead(): Promise<void> {
    if (this.#stopped) return Promise.resolve();
    if (this.#reading !== null) {
      this.#readAgain = true;
      return this.#reading;
    }
    if (this.#pollTimer !== null) {
      clearTimeout(this.#pollTimer);
      this.#pollTimer = null;
    }
    this.#reading = this.#read().finally(() => {
      this.#reading = null;
      if (this.#stopped) return;
      if (this.#readAgain) {
        this.#readAgain = false;
        void this.#requestRead();
        return;
      }
      // After a failure, retry sooner than the poll (with backoff); never later than the poll.
      const delay = this.#readFailures === 0
        ? this.#config.intervalMs
        : Math.min(this.#config.intervalMs, backoffMs(this.#readFailures, RETRY_MIN_MS, RETRY_MAX_MS));
      this.#pollTimer = setTimeout(() => {
        this.#pollTimer = null;
        void this.#requestRead();
      }, delay);
    });
    return this.#reading;
  }

  async #read(): Promise<void> {
    let result: pg.QueryResult;
    try {
      const client = await this.#readerClient();
      result = this.#config.query === 'default'
        ? await client.query(DEFAULT_QUERY, [
          this.#config.params.base_domain, this.#config.params.node_id,
          this.#config.params.backend_host ?? DEFAULT_BACKEND_HOST,
        ])
        : await client.query(this.#config.query);
    } catch (err) {
      this.#dropReader();
      this.#readFailed(err as Error);
      return;
    }
    if (this.#stopped) return;
    const columns = new Set(result.fields.map((f) => f.name));
    if (!columns.has('match') || !columns.has('addr')) {
      this.#readFailed(new Error(`the query returned columns ${[...columns].join(', ') || '(none)'}; it must return match and addr`));
      return;
    }
    const snapshot = snapshotFromRows(result.rows, this.name, this.#config.query === 'default');
    this.#readFailures = 0;
    this.#live = true;
    this.#sink?.snapshot(snapshot);
    if (this.#config.cacheFile !== null) await this.#writeCache(this.#config.cacheFile, snapshot);
  }

  #readFailed(err: Error): void {
    if (this.#stopped) return;
    this.#readFailures++;
    // The cache goes in before the failure, so the source reads as failing with the cache live.
    this.#serveCache();
    this.#sink?.failure(new Error(`postgres ${redactUrl(this.#config.url)}: ${err.message}`));
  }

  async #readerClient(): Promise<pg.Client> {
    if (this.#reader !== null) return this.#reader;
    const client = this.#newClient(`sni-router:${this.name}`);
    client.on('error', (err) => {
      // Lost while idle (terminated, server gone): read again, which reconnects or reports.
      if (this.#reader !== client) return;
      this.#logger.debug({ err: err.message }, 'postgres reader connection lost');
      this.#dropReader();
      void this.#requestRead();
    });
    client.on('end', () => {
      if (this.#reader !== client) return;
      this.#dropReader();
      void this.#requestRead();
    });
    try {
      await client.connect();
      if (this.#config.query !== 'default') {
        // A custom query reads params as current_setting('sni_router.<name>').
        for (const [k, v] of Object.entries(this.#config.params)) {
          await client.query('SELECT set_config($1, $2, false)', [`sni_router.${k}`, v]);
        }
      }
    } catch (err) {
      await endQuietly(client);
      throw err;
    }
    if (this.#stopped) {
      await endQuietly(client);
      throw new Error('stopped');
    }
    this.#reader = client;
    return client;
  }

  #dropReader(): void {
    const client = this.#reader;
    this.#reader = null;
    if (client !== null) void endQuietly(client);
  }

  // --- listening ---------------------------------------------------------------------------

  async #connectListener(): Promise<void> {
    const channel = this.#config.listenChannel;
    if (this.#stopped || channel === null) return;
    const client = this.#newClient(`sni-router:${this.name}:listen`);
    this.#listener = client;
    client.on('notification', (msg) => {
      if (msg.channel === channel) void this.#requestRead();
    });
    client.on('error', (err) => this.#listenerLost(client, err));
    client.on('end', () => this.#listenerLost(client, new Error('connection ended')));
    try {
      await client.connect();
      await client.query(`LISTEN ${quoteIdent(channel)}`);
    } catch (err) {
      this.#listenerLost(client, err as Error);
      return;
    }
    if (this.#listener !== client) return;
    if (this.#listenFailures > 0) this.#logger.info({ channel }, 'postgres LISTEN restored');
    this.#listenFailures = 0;
    // Whatever was notified while nobody listened is lost: read once to catch up.
    void this.#requestRead();
  }

  #listenerLost(client: pg.Client, err: Error): void {
    if (this.#listener !== client) return;
    this.#listener = null;
    void endQuietly(client);
    if (this.#stopped) return;
    this.#listenFailures++;
    const delay = backoffMs(this.#listenFailures, RETRY_MIN_MS, RETRY_MAX_MS);
    this.#logger[this.#listenFailures === 1 ? 'warn' : 'debug']({
      channel: this.#config.listenChannel, err: err.message, retry_ms: Math.round(delay),
    }, 'postgres LISTEN connection lost; polling meanwhile');
    // A lost listener often means a lost database: find out now rather than at the next poll.
    if (this.#listenFailures === 1) void this.#requestRead();
    this.#listenTimer = setTimeout(() => {
      this.#listenTimer = null;
      void this.#connectListener();
    }, delay);
  }

  #newClient(applicationName: string): pg.Client {
    const timeout = this.#config.statementTimeoutMs;
    return new pg.Client({
      connectionString: this.#config.url,
      application_name: applicationName,
      statement_timeout: timeout,
      // The client's own bound, for a server that stops answering without closing.
      query_timeout: timeout > 0 ? timeout + 2000 : undefined,
      connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
      keepAlive: true,
      keepAliveInitialDelayMillis: 10_000,
    });
  }

  // --- cache file --------------------------------------------------------------------------

  #serveCache(): void {
    if (this.#cacheServed || this.#live || this.#cached === null || this.#stopped) return;
    this.#cacheServed = true;
    this.#logger.warn({ cache_file: this.#config.cacheFile, routes: this.#cached.routes.length },
      'postgres not readable: serving the routes of the cache file until it is');
    this.#sink?.snapshot(this.#cached);
  }

  async #readCache(file: string): Promise<Snapshot | null> {
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        this.#logger.warn({ cache_file: file, err: (err as Error).message }, 'cannot read the postgres cache file');
      }
      return null;
    }
    try {
      const data = JSON.parse(text) as Partial<CacheFile>;
      if (data.version !== 1 || !Array.isArray(data.routes)) throw new Error('not a version 1 cache file');
      const routes: RouteSpec[] = [];
      const invalid: InvalidEntry[] = [];
      data.routes.forEach((r, i) => {
        try {
          routes.push(route(r, ['routes', i], this.name));
        } catch (err) {
          invalid.push({ entry: `cache routes[${i}]`, error: (err as Error).message });
        }
      });
      return { routes, invalid, origin: 'cache' };
    } catch (err) {
      this.#logger.warn({ cache_file: file, err: (err as Error).message }, 'ignoring an unreadable postgres cache file');
      return null;
    }
  }

  /** Writes the snapshot to a temp file and renames it over the cache: a reader sees old or new, whole. */
  async #writeCache(file: string, snapshot: Snapshot): Promise<void> {
    const routes = snapshot.routes.map(plainRoute);
    const key = JSON.stringify(routes);
    if (key === this.#cacheWritten) return;
    const data: CacheFile = { version: 1, source: this.name, written_at: new Date().toISOString(), routes };
    const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
    try {
      await mkdir(dirname(file), { recursive: true });
      const fh = await open(tmp, 'w', 0o600);
      try {
        await fh.writeFile(`${JSON.stringify(data, null, 1)}\n`);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await rename(tmp, file);
      this.#cacheWritten = key;
    } catch (err) {
      await unlink(tmp).catch(() => {});
      this.#logger.warn({ cache_file: file, err: (err as Error).message }, 'cannot write the postgres cache file');
    }
  }
}

/**
 * A namespace name as the default query uses it: one DNS label once prefixed with "turn-" (so
 * that the `*.<base_domain>` certificate covers the name), letters compared lowercased.
 */
const NAMESPACE_LABEL = /^[a-z0-9](?:[a-z0-9-]{0,56}[a-z0-9])?$/i;

/**
 * Rows to a snapshot: a row that does not make a valid route is skipped and reported. Its entry
 * is named by its match where it has one, not by its position, so that it stays the same entry
 * (logged once) while other rows come and go. With the default query (`namespaceLabels`), a
 * namespace name that is not a DNS label is such a row.
 */
export function snapshotFromRows(rows: readonly Record<string, unknown>[], source: string, namespaceLabels = false): Snapshot {
  const routes: RouteSpec[] = [];
  const invalid: InvalidEntry[] = [];
  rows.forEach((row, i) => {
    try {
      if (namespaceLabels && !(typeof row.namespace === 'string' && NAMESPACE_LABEL.test(row.namespace))) {
        throw new Error(`namespace name ${JSON.stringify(row.namespace)} is not a DNS label `
          + "(letters, digits and '-', not at either end, at most 58 characters)");
      }
      const addr = row.addr;
      const addrs = Array.isArray(addr)
        ? addr
        : typeof addr === 'string' && addr.includes(',') ? addr.split(',').map((a) => a.trim()) : null;
      const backend: Record<string, unknown> = addrs === null ? { addr } : { addrs };
      if (row.name !== undefined && row.name !== null) backend.name = row.name;
      if (row.proxy_protocol !== undefined && row.proxy_protocol !== null) backend.proxy_protocol = row.proxy_protocol;
      routes.push(route({ match: row.match, alpn: alpnColumn(row.alpn), backend, namespace: row.namespace }, [], source));
    } catch (err) {
      invalid.push({ entry: typeof row.match === 'string' ? `match ${row.match}` : `row ${i + 1}`, error: (err as Error).message });
    }
  });
  return { routes, invalid };
}

/** The alpn column: NULL or '' (any client), 'none', 'any', 'h2,http/1.1', or a text[]. */
function alpnColumn(v: unknown): unknown {
  if (v === null || v === undefined) return null;
  if (typeof v !== 'string') return v;
  const text = v.trim();
  if (text === '') return null;
  if (text === 'none' || text === 'any') return text;
  return text.split(',').map((p) => p.trim());
}

/** A route as the plain value route() reads back, for the cache file. */
function plainRoute(r: RouteSpec): unknown {
  return {
    match: r.match,
    ...(r.alpn === null ? {} : { alpn: plainAlpn(r.alpn) }),
    ...(r.namespace === null ? {} : { namespace: r.namespace }),
    backend: {
      name: r.backend.name,
      addrs: r.backend.addrs,
      ...(r.backend.proxyProtocol === null ? {} : { proxy_protocol: r.backend.proxyProtocol }),
    },
  };
}

function plainAlpn(alpn: AlpnCondition): unknown {
  return alpn.kind === 'list' ? [...alpn.protocols] : alpnKey(alpn);
}

function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

/** Exponential, with jitter so that a fleet of routers does not reconnect in step. */
/** Closes a client whatever its state; a connection that does not say goodbye in time is cut. */
async function endQuietly(client: pg.Client): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const ended = client.end().then(() => true, () => true);
  const late = new Promise<boolean>((done) => {
    timer = setTimeout(() => done(false), 1000);
  });
  if (!await Promise.race([ended, late])) {
    (client as unknown as { connection?: { stream?: { destroy(): void } } }).connection?.stream?.destroy();
  }
  clearTimeout(timer);
}
