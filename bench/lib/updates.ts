// Figure 6a, sni-router only: route-update latency, from a change made at the source (a routes
// file renamed into place, a PostgreSQL UPDATE + NOTIFY, a Redis HSET + PUBLISH) to the first new
// connection routed by it. The route cdn.example.com comes only from the source and flips between
// backend A and backend C; the config's fallback is backend B. Each backend answers with its own
// letter, so a probe (a real connection with the Chromium ClientHello) tells where the router sent
// it. A probe that lands on B means the route was briefly missing: counted as a fallback glitch.
import { mkdirSync, renameSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { Redis } from 'ioredis';
import pg from 'pg';
import { redactUrl } from '../../src/log.ts';
import type { Hello, Measurement, RunContext } from './figures.ts';
import { LOAD_CPU, startProxy, type RunningProxy } from './peers.ts';
import { Proc, freePorts, sleep } from './proc.ts';
import { percentile } from './stats.ts';

export const UPDATE_SOURCES = ['file', 'postgres', 'redis'] as const;
export type UpdateSource = (typeof UPDATE_SOURCES)[number];

/** How long one change may take to show before it counts as a timeout. */
const CHANGE_TIMEOUT_MS = 5000;
const PROBE_GAP_MS = 2;

interface SourceDriver {
  /** Puts the route (to addr) in place and returns the YAML `sources:` block that reads it. */
  setup(addr: string): Promise<string>;
  /** Points the route at addr. */
  change(addr: string): Promise<void>;
  cleanup(): Promise<void>;
}

const ROUTE_MATCH = 'cdn.example.com';

function fileDriver(dir: string): SourceDriver {
  const path = join(dir, 'routes.yaml');
  const write = (addr: string) => {
    // Written beside it, then renamed into place: what a careful operator (or a config manager) does.
    writeFileSync(`${path}.tmp`, `routes:\n  - match: ${ROUTE_MATCH}\n    backend:\n      name: turn\n      addr: "${addr}"\n`);
    renameSync(`${path}.tmp`, path);
  };
  return {
    async setup(addr) {
      write(addr);
      return `sources:\n  - type: file\n    path: "${path}"\n`;
    },
    async change(addr) {
      write(addr);
    },
    async cleanup() {},
  };
}

function postgresDriver(url: string): SourceDriver {
  const table = `sni_bench_routes_${process.pid}`;
  const channel = `sni_bench_${process.pid}`;
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 3000 });
  let connected = false;
  return {
    async setup(addr) {
      try {
        await client.connect();
      } catch (err) {
        throw new SkipError(`PostgreSQL not reachable at ${redactUrl(url)} (${(err as Error).message}); set BENCH_DATABASE_URL`);
      }
      connected = true;
      await client.query(`CREATE TABLE IF NOT EXISTS ${table} (match text PRIMARY KEY, addr text NOT NULL, name text NOT NULL DEFAULT 'turn')`);
      await client.query(`DELETE FROM ${table}`);
      await client.query(`INSERT INTO ${table} (match, addr) VALUES ($1, $2)`, [ROUTE_MATCH, addr]);
      return [
        'sources:',
        '  - type: postgres',
        `    url: "${url}"`,
        '    interval: 60s',
        `    listen_channel: ${channel}`,
        `    query: "SELECT match, addr, name FROM ${table}"`,
        '',
      ].join('\n');
    },
    async change(addr) {
      // One simple query, one implicit transaction: the NOTIFY goes out when the UPDATE commits.
      if (!/^[0-9.:]+$/.test(addr)) throw new Error(`bad address ${addr}`);
      await client.query(`UPDATE ${table} SET addr = '${addr}' WHERE match = '${ROUTE_MATCH}'; NOTIFY ${channel}`);
    },
    async cleanup() {
      if (!connected) return;
      await client.query(`DROP TABLE IF EXISTS ${table}`).catch(() => {});
      await client.end().catch(() => {});
    },
  };
}

function redisDriver(url: string): SourceDriver {
  const key = `sni-bench:${process.pid}:routes`;
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, retryStrategy: () => null, connectTimeout: 3000 });
  redis.on('error', () => {});
  let connected = false;
  const value = (addr: string) => JSON.stringify({ backend: { name: 'turn', addr } });
  return {
    async setup(addr) {
      try {
        await redis.connect();
      } catch (err) {
        throw new SkipError(`Redis not reachable at ${redactUrl(url)} (${(err as Error).message}); set BENCH_REDIS_URL`);
      }
      connected = true;
      await redis.del(key);
      await redis.hset(key, ROUTE_MATCH, value(addr));
      return [
        'sources:',
        '  - type: redis',
        `    url: "${url}"`,
        `    key: "${key}"`,
        `    channel: "${key}"`,
        '    resync_interval: 60s',
        '',
      ].join('\n');
    },
    async change(addr) {
      // One round trip: the hash changes, then the message says so.
      await redis.pipeline().hset(key, ROUTE_MATCH, value(addr)).publish(key, 'changed').exec();
    },
    async cleanup() {
      if (!connected) return;
      await redis.del(key).catch(() => {});
      redis.disconnect();
    },
  };
}

class SkipError extends Error {}

/** One connection through the router: which backend answered ('A', 'B', 'C'), or null. */
export function probe(port: number, hello: Buffer, timeoutMs = 2000): Promise<string | null> {
  return new Promise((resolve) => {
    let done = false;
    const s = net.connect({ port, host: '127.0.0.1', noDelay: true });
    const finish = (v: string | null) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      s.destroy();
      resolve(v);
    };
    const timer = setTimeout(() => finish(null), timeoutMs);
    s.on('connect', () => s.write(hello));
    s.on('data', (d: Buffer) => finish(String.fromCharCode(d[0])));
    s.on('error', () => finish(null));
    s.on('close', () => finish(null));
  });
}

interface Wait {
  readonly ms: number | null;
  readonly probes: number;
  readonly fallback: number;
  readonly last: string | null;
}

async function waitRouted(port: number, hello: Buffer, expected: string, t0: number, timeoutMs: number): Promise<Wait> {
  let probes = 0;
  let fallback = 0;
  let last: string | null = null;
  while (performance.now() - t0 < timeoutMs) {
    last = await probe(port, hello);
    probes++;
    if (last === expected) return { ms: performance.now() - t0, probes, fallback, last };
    if (last === 'B') fallback++;
    await sleep(PROBE_GAP_MS);
  }
  return { ms: null, probes, fallback, last };
}

export interface UpdateOptions {
  readonly changes: number;
  readonly hello: Hello;
  readonly helloBytes: Buffer;
  readonly databaseUrl: string;
  readonly redisUrl: string;
}

/** Runs `changes` route changes through one source; never throws. */
export async function measureUpdates(ctx: RunContext, rep: number, source: UpdateSource, opts: UpdateOptions): Promise<Measurement> {
  const base = { rep, figure: 'updates' as const, case: source, target: 'sni-router' };
  const tag = `${rep}-updates-${source}`;
  const logFile = join(ctx.logDir, `${tag}.log`);
  const dir = join(ctx.tmp, tag);
  const driver = source === 'file' ? fileDriver(dir) : source === 'postgres' ? postgresDriver(opts.databaseUrl) : redisDriver(opts.redisUrl);
  let backend: Proc | null = null;
  let proxy: RunningProxy | null = null;
  try {
    const [listen, a, b, c, admin] = await freePorts(5);
    backend = new Proc(ctx.loadgen, [
      'backend', '--ports', `${a},${b},${c}`, '--mode', 'reply', '--hello-bytes', String(opts.hello.bytes), '--max-seconds', '900',
    ], { cpu: LOAD_CPU, name: 'backend', logFile });
    if ((await backend.waitLine((v) => (v as { ready?: boolean }).ready === true, 5000)) === undefined) {
      throw new Error(`backend did not start:\n${backend.tail()}`);
    }
    mkdirSync(dir, { recursive: true });
    const addrA = `127.0.0.1:${a}`;
    const addrC = `127.0.0.1:${c}`;
    const sourcesYaml = await driver.setup(addrA);
    try {
      proxy = await startProxy('sni-router', { listen, a, b, admin }, { repo: ctx.repo, dir, logFile }, { routes: '', sources: sourcesYaml });
    } catch (err) {
      const msg = (err as Error).message;
      const line = msg.split('\n').find((l) => /not implemented|unknown|source/i.test(l) && !l.startsWith('#'));
      if (/not implemented/i.test(msg)) throw new SkipError(`sources not available: ${line?.trim() ?? msg}`);
      throw err;
    }
    const first = await waitRouted(listen, opts.helloBytes, 'A', performance.now(), 10_000);
    if (first.ms === null) {
      const tail = proxy.proc?.tail() ?? '';
      if (/not implemented/i.test(tail)) throw new SkipError(`sources not available: ${tail.split('\n').find((l) => /not implemented/i.test(l))}`);
      throw new Error(`the ${source} source's first route never took effect within 10 s (probes last reached ${first.last ?? 'nothing'});` +
        ` router output:\n${tail}`);
    }
    const samples: number[] = [];
    let timeouts = 0;
    let glitches = 0;
    let probes = 0;
    for (let i = 0; i < opts.changes; i++) {
      const toC = i % 2 === 0;
      const t0 = performance.now();
      await driver.change(toC ? addrC : addrA);
      const w = await waitRouted(listen, opts.helloBytes, toC ? 'C' : 'A', t0, CHANGE_TIMEOUT_MS);
      probes += w.probes;
      glitches += w.fallback;
      if (w.ms === null) {
        timeouts++;
        // Put it back in step: wait for whichever backend it settles on.
        await sleep(500);
      } else {
        samples.push(w.ms);
      }
      if (proxy.proc !== null && !proxy.proc.alive) throw new Error(`sni-router died:\n${proxy.proc.tail()}`);
      await sleep(20 + Math.random() * 40);
    }
    const metrics = {
      p50_ms: percentile(samples, 0.5),
      p99_ms: percentile(samples, 0.99),
      max_ms: samples.length === 0 ? null : Math.max(...samples),
      changes: samples.length,
      timeouts,
      glitches,
    };
    return { ...base, ok: true, metrics, raw: { samples_ms: samples, probes } };
  } catch (err) {
    if (err instanceof SkipError) return { ...base, ok: false, skipped: err.message, metrics: {} };
    return { ...base, ok: false, error: (err as Error).message, metrics: {} };
  } finally {
    await proxy?.stop();
    await backend?.stop(2000);
    await driver.cleanup().catch(() => {});
  }
}
