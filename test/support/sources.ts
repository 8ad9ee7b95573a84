// Helpers for the route source tests: a database and Redis keys of their own for each test, a TCP
// forwarder that can be cut and restored (an outage without touching the shared servers), and a
// stopwatch from a change to the first connection routed by it.
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import pg from 'pg';
import { sleep, tlsHello, waitFor } from '../helpers.ts';

export const PG_ADMIN_URL = 'postgres://postgres@127.0.0.1:5432/postgres';
export const PG_PORT = 5432;
export const REDIS_PORT = 6379;
export const SCHEMA_SQL = join(import.meta.dirname, '..', '..', 'sql', 'schema.sql');

export function randomSuffix(): string {
  return randomBytes(5).toString('hex');
}

export interface TestDatabase {
  readonly name: string;
  /** A client connected to the test database, for the test's own statements. */
  readonly db: pg.Client;
  /** A URL for the router: through `port` (a forwarder) when given, and with a password that trust auth ignores. */
  url(port?: number, password?: string): string;
  drop(): Promise<void>;
}

/** CREATE DATABASE sni_router_test_<random>, optionally with sql/schema.sql applied; drop() removes it (FORCE). */
export async function createTestDatabase(opts: { schema?: boolean } = {}): Promise<TestDatabase> {
  const name = `sni_router_test_${randomSuffix()}`;
  const admin = new pg.Client({ connectionString: PG_ADMIN_URL });
  await admin.connect();
  try {
    await admin.query(`CREATE DATABASE ${name}`);
  } finally {
    await admin.end();
  }
  const db = new pg.Client({ connectionString: `postgres://postgres@127.0.0.1:${PG_PORT}/${name}`, application_name: 'sni-router-test' });
  db.on('error', () => {});
  await db.connect();
  if (opts.schema !== false) await db.query(readFileSync(SCHEMA_SQL, 'utf8'));
  return {
    name,
    db,
    url: (port = PG_PORT, password?: string) => `postgres://postgres${password === undefined ? '' : `:${password}`}@127.0.0.1:${port}/${name}`,
    drop: async () => {
      await db.end().catch(() => {});
      const a = new pg.Client({ connectionString: PG_ADMIN_URL });
      await a.connect();
      try {
        await a.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      } finally {
        await a.end();
      }
    },
  };
}

/** Inserts an enabled namespace and its TURN allocation on `node` (one transaction, one NOTIFY per statement). */
export async function addNamespace(db: pg.Client, ns: { name: string; port: number | null; node?: string; stealth?: boolean; enabled?: boolean }): Promise<void> {
  await db.query('BEGIN');
  try {
    await db.query(
      'INSERT INTO namespace_webrtc_config (namespace_cluster_id, namespace_name, enabled, stealth_enabled) VALUES ($1, $2, $3, $4)',
      [`cluster-${ns.name}`, ns.name, ns.enabled ?? true, ns.stealth ?? false],
    );
    await db.query(
      "INSERT INTO webrtc_port_allocations (node_id, namespace_cluster_id, service_type, turn_listen_port, turn_tls_port) VALUES ($1, $2, 'turn', 3478, $3)",
      [ns.node ?? 'node-1', `cluster-${ns.name}`, ns.port],
    );
    await db.query('COMMIT');
  } catch (err) {
    await db.query('ROLLBACK');
    throw err;
  }
}

export function redisClient(): Redis {
  const r = new Redis(`redis://127.0.0.1:${REDIS_PORT}/0`, { lazyConnect: false, maxRetriesPerRequest: 2 });
  r.on('error', () => {});
  return r;
}

/** The ids of the router's Redis connections, found by the connection name it sets. */
export async function redisClientIds(r: Redis, sourceName: string): Promise<string[]> {
  const list = (await r.client('LIST')) as string;
  const ids: string[] = [];
  for (const line of list.split('\n')) {
    const name = /(?:^| )name=(\S*)/.exec(line)?.[1];
    if (name === `sni-router:${sourceName}` || name === `sni-router:${sourceName}:sub`) ids.push(/(?:^| )id=(\d+)/.exec(line)![1]);
  }
  return ids;
}

/**
 * Resolves once the router's two Redis connections are up and subscribed, and the reads they make
 * on connect are done: from then on only a PUBLISH or the resync timer makes it read.
 */
export async function redisSettled(r: Redis, sourceName: string): Promise<void> {
  await waitFor(async () => {
    const list = (await r.client('LIST')) as string;
    const lines = list.split('\n');
    return lines.some((l) => l.includes(` name=sni-router:${sourceName} `)) &&
      lines.some((l) => l.includes(` name=sni-router:${sourceName}:sub `) && / sub=1 /.test(l));
  }, 5000, 'the router\'s redis connections');
  await sleep(150);
}

export interface Forwarder {
  readonly port: number;
  /** Stops listening and cuts every connection through it: the service is "down". */
  cut(): Promise<void>;
  /** Listens again on the same port. */
  restore(): Promise<void>;
  close(): Promise<void>;
}

/** A TCP forwarder on 127.0.0.1 to `targetPort`. */
export async function forwarder(targetPort: number): Promise<Forwarder> {
  const sockets = new Set<net.Socket>();
  let server: net.Server | null = null;
  let port = 0;
  const listen = async () => {
    const s = net.createServer((client) => {
      const upstream = net.connect(targetPort, '127.0.0.1');
      for (const sock of [client, upstream]) {
        sockets.add(sock);
        sock.on('close', () => sockets.delete(sock));
        sock.on('error', () => {});
      }
      client.pipe(upstream);
      upstream.pipe(client);
      client.on('close', () => upstream.destroy());
      upstream.on('close', () => client.destroy());
    });
    await new Promise<void>((resolve, reject) => {
      s.once('error', reject);
      s.listen(port, '127.0.0.1', () => resolve());
    });
    port = (s.address() as net.AddressInfo).port;
    server = s;
  };
  const cut = async () => {
    const s = server;
    server = null;
    for (const sock of sockets) sock.destroy();
    if (s !== null) await new Promise<void>((resolve) => s.close(() => resolve()));
  };
  await listen();
  return { port, cut, restore: listen, close: cut };
}

/** The name of the backend that answers a TLS connection for `sni` through the router ("error" if none). */
export async function backendFor(port: number, sni: string, alpn?: string[]): Promise<string> {
  try {
    const r = await tlsHello(port, sni, alpn);
    return r.line.split(' ')[0];
  } catch {
    return 'error';
  }
}

/**
 * Polls (every ~20 ms) until `sni` reaches `expected` and returns the time since `since`; throws
 * with what it reached instead after `deadlineMs`.
 */
export async function timeUntilRouted(port: number, sni: string, expected: string, opts: { alpn?: string[]; since?: number; deadlineMs?: number } = {}): Promise<number> {
  const since = opts.since ?? Date.now();
  const deadline = since + (opts.deadlineMs ?? 5000);
  let got = '';
  for (;;) {
    got = await backendFor(port, sni, opts.alpn);
    if (got === expected) return Date.now() - since;
    if (Date.now() > deadline) throw new Error(`${sni} still reaches ${got} ${Date.now() - since}ms after the change (expected ${expected})`);
    await sleep(20);
  }
}
