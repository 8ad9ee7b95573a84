// The PostgreSQL source: runs one query that returns the routes (the default reads the namespace
// tables of sql/schema.sql and makes the names of `names`; a custom one returns match, addr [, name,
// proxy_protocol, alpn, namespace]) every `interval`, and at once whenever a NOTIFY arrives on
// `listen_channel`.
//
// A read first asks the server for a digest of the result; the same digest as the last good read
// means nothing changed, and no row crosses the wire, nothing is validated and nothing is merged.
// Digest and rows are read in one REPEATABLE READ transaction, so the rows are exactly what the
// digest describes: a change made between the two cannot be taken for the unchanged state.
//
// Two connections: the reader runs the query, a dedicated listener holds the LISTEN (so a slow
// query never delays a notification, and a notification never waits for a poll). Either one lost
// is reconnected with exponential backoff capped at a few seconds, and the listener's return
// triggers a read, because the NOTIFYs sent while it was away are gone. While the database is
// unreachable the composer keeps the last good snapshot; with `cache_file` that snapshot also
// survives a restart during the outage.
import pg from 'pg';
import type { PostgresSourceConfig } from '../config/types.ts';
import { type Logger, redactUrl } from '../log.ts';
import { Serial } from '../serial.ts';
import { backoffMs } from './backoff.ts';
import { RouteCache } from './postgres-cache.ts';
import {
  BEGIN_AND_STEALTH_COLUMN, type CompiledName, compileNames, defaultQuery, digestQuery, rowsDigest,
  snapshotFromNamespaces, snapshotFromRows,
} from './postgres-rows.ts';
import type { RouteSource, Snapshot, SourceSink } from './source.ts';

const RETRY_MIN_MS = 200;
/** Backoff cap: an outage's end is noticed within this, whatever the poll interval. */
const RETRY_MAX_MS = 5000;
const CONNECT_TIMEOUT_MS = 5000;
/** How long start() waits for the first read before serving the cache file (a silent network). */
const START_WAIT_MS = 3000;

/** The backend host of the default query when `params.backend_host` is not set: TURN runs beside the router. */
const DEFAULT_BACKEND_HOST = '127.0.0.1';

/**
 * SQLSTATE classes that say the custom query cannot be wrapped for a digest (syntax, a statement
 * that is not a query, one that writes in the read-only transaction), when the query alone runs.
 */
const UNWRAPPABLE = /^(42|0A|25)/;

/** What the database answered: nothing new, or the rows of a result whose digest is `digest`. */
type Fetched =
  | { readonly unchanged: true; readonly digest: string }
  | { readonly unchanged: false; readonly digest: string; readonly fields: readonly string[]; readonly rows: Record<string, unknown>[] };

export class PostgresSource implements RouteSource {
  readonly type = 'postgres' as const;
  readonly name: string;
  readonly #config: PostgresSourceConfig;
  readonly #logger: Logger;
  #sink: SourceSink | null = null;
  #stopped = false;

  #reader: pg.Client | null = null;
  /** One read at a time, once more after when asked meanwhile; the next poll is set when they are done. */
  readonly #reads = new Serial<void>(
    () => this.#read(),
    () => undefined,
    (err) => this.#readFailed(err as Error),
  );
  #readFailures = 0;
  #pollTimer: NodeJS.Timeout | null = null;

  #listener: pg.Client | null = null;
  #listenFailures = 0;
  #listenTimer: NodeJS.Timeout | null = null;

  /** Routes from cache_file, read at start; served once if the database cannot be read first. */
  #cache: RouteCache | null;
  #cached: Snapshot | null = null;
  #cacheServed = false;
  #live = false;

  /** The digest of the result whose snapshot the composer holds (null before the first). */
  #digest: string | null = null;
  /**
   * The next read sends a full snapshot whatever the digest says: at start, after a reconnect and
   * after a resync (SIGHUP), so that none of them can leave standing a snapshot that no read on
   * the current connection confirmed.
   */
  #fullRead = true;
  /** False once the custom query proved it cannot be wrapped: its rows are then digested here. */
  #digestInDatabase = true;
  readonly #names: readonly CompiledName[];

  constructor(config: PostgresSourceConfig, logger: Logger) {
    this.name = config.name;
    this.#config = config;
    this.#logger = logger.child({ source: config.name });
    this.#cache = config.cacheFile === null ? null : new RouteCache(config.cacheFile, config.name, this.#logger);
    this.#names = compileNames(config.names);
    this.#reads.onIdle = () => this.#schedulePoll();
  }

  async start(sink: SourceSink): Promise<void> {
    this.#sink = sink;
    if (this.#cache !== null) this.#cached = await this.#cache.read();
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
    // A full read, not a digest: SIGHUP is the operator's way to say "read everything again".
    this.#fullRead = true;
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
    await this.#reads.stop();
  }

  // --- reading -----------------------------------------------------------------------------

  /** Reads now, or once more after the read in flight (whatever number of requests arrive meanwhile). */
  #requestRead(): Promise<void> {
    if (this.#stopped) return Promise.resolve();
    if (this.#pollTimer !== null) {
      clearTimeout(this.#pollTimer);
      this.#pollTimer = null;
    }
    return this.#reads.request();
  }

  /** After the reads: the next poll, sooner after a failure (with backoff), never later than the interval. */
  #schedulePoll(): void {
    if (this.#stopped) return;
    const delay = this.#readFailures === 0
      ? this.#config.intervalMs
      : Math.min(this.#config.intervalMs, backoffMs(this.#readFailures, RETRY_MIN_MS, RETRY_MAX_MS));
    this.#pollTimer = setTimeout(() => {
      this.#pollTimer = null;
      void this.#requestRead();
    }, delay);
  }

  async #read(): Promise<void> {
    let fetched: Fetched;
    try {
      const client = await this.#readerClient();
      // Taken after connecting (a new connection asks for a full read); a resync while this read
      // runs asks again, for the next one.
      const known = this.#fullRead ? null : this.#digest;
      this.#fullRead = false;
      fetched = this.#config.query === 'default'
        ? await this.#fetchDefault(client, known)
        : await this.#fetchCustom(client, known);
    } catch (err) {
      this.#dropReader();
      this.#readFailed(err as Error);
      return;
    }
    if (this.#stopped) return;
    if (fetched.unchanged) {
      this.#readFailures = 0;
      this.#sink?.unchanged();
      return;
    }
    let snapshot: Snapshot;
    if (this.#config.query === 'default') {
      snapshot = await snapshotFromNamespaces(fetched.rows, {
        names: this.#names, params: this.#config.params, source: this.name,
        backendHost: this.#config.params.backend_host ?? DEFAULT_BACKEND_HOST,
      });
    } else {
      if (!fetched.fields.includes('match') || !fetched.fields.includes('addr')) {
        this.#readFailed(new Error(`the query returned columns ${fetched.fields.join(', ') || '(none)'}; it must return match and addr`));
        return;
      }
      snapshot = await snapshotFromRows(fetched.rows, this.name);
    }
    if (this.#stopped) return;
    this.#readFailures = 0;
    this.#live = true;
    this.#sink?.snapshot(snapshot);
    this.#digest = fetched.digest;
    if (this.#cache !== null) await this.#cache.write(snapshot);
  }

  /** The default query: the digest, and the rows when it changed, in one transaction. */
  async #fetchDefault(client: pg.Client, known: string | null): Promise<Fetched> {
    const params = [this.#config.params.node_id];
    const opened = await client.query(BEGIN_AND_STEALTH_COLUMN) as unknown as pg.QueryResult[];
    const query = defaultQuery(opened[1]?.rows[0]?.stealth_column === true);
    const digest = `db:${(await client.query<{ digest: string }>(digestQuery(query), params)).rows[0].digest}`;
    if (digest === known) {
      await client.query('COMMIT');
      return { unchanged: true, digest };
    }
    const result = await client.query(query, params);
    await client.query('COMMIT');
    return { unchanged: false, digest, fields: result.fields.map((f) => f.name), rows: result.rows };
  }

  /**
   * A custom query: wrapped for a digest like the default. One the server cannot wrap (a trailing
   * statement, a query that writes) is read whole every time and digested here, which still
   * spares the validation and the merge of an unchanged result.
   */
  async #fetchCustom(client: pg.Client, known: string | null): Promise<Fetched> {
    const query = this.#config.query;
    if (this.#digestInDatabase) {
      await client.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
      let digest: string | null = null;
      let wrapError: pg.DatabaseError | null = null;
      try {
        digest = `db:${(await client.query<{ digest: string }>(digestQuery(query))).rows[0].digest}`;
      } catch (err) {
        // Anything but the server's refusal (a lost connection, a timeout) fails the read.
        if (!(err instanceof pg.DatabaseError)) throw err;
        wrapError = err;
        await client.query('ROLLBACK');
      }
      if (digest !== null) {
        if (digest === known) {
          await client.query('COMMIT');
          return { unchanged: true, digest };
        }
        const result = oneResult(await client.query(query));
        await client.query('COMMIT');
        return { unchanged: false, digest, fields: result.fields.map((f) => f.name), rows: result.rows };
      }
      // The query alone decides: if it fails too, that is the read's failure, not the wrapping's.
      const result = oneResult(await client.query(query));
      if (wrapError !== null && UNWRAPPABLE.test(wrapError.code ?? '')) {
        this.#digestInDatabase = false;
        this.#logger.info({ err: wrapError.message },
          'the custom query cannot be wrapped for a digest on the server: reading it whole on every poll');
      }
      return this.#digestedHere(result, known);
    }
    return this.#digestedHere(oneResult(await client.query(query)), known);
  }

  async #digestedHere(result: pg.QueryResult, known: string | null): Promise<Fetched> {
    const fields = result.fields.map((f) => f.name);
    const digest = await rowsDigest(fields, result.rows);
    return digest === known ? { unchanged: true, digest } : { unchanged: false, digest, fields, rows: result.rows };
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
    // A new connection (perhaps to another server, after a failover) starts with a full read.
    this.#fullRead = true;
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
}

/** Several statements in one custom query answer with a list of results: refused, not guessed at. */
function oneResult(result: pg.QueryResult | pg.QueryResult[]): pg.QueryResult {
  if (Array.isArray(result)) throw new Error(`the query holds ${result.length} statements; it must be one`);
  return result;
}

function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

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
