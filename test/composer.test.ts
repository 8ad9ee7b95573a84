// The composer through a real router fed by all four origins at once (config, file, PostgreSQL,
// Redis): precedence and conflicts, SIGHUP resyncing every source, and a churn of a thousand
// changes while two hundred connections relay traffic.
import assert from 'node:assert/strict';
import { renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import tls from 'node:tls';
import type { Redis } from 'ioredis';
import { Metrics } from '../src/metrics/metrics.ts';
import { routeList } from '../src/config/routes.ts';
import { RouteTable, Router } from '../src/router/table.ts';
import { Composer } from '../src/sources/composer.ts';
import type { RouteSource, SourceSink } from '../src/sources/source.ts';
import {
  type Listening, type RunningRouter, makeCert, memoryLogger, metricValue, sleep, startRouter, tempDir, tlsBackend, waitFor,
} from './helpers.ts';
import {
  type TestDatabase, backendFor, createTestDatabase, randomSuffix, redisClient, redisSettled, timeUntilRouted,
} from './support/sources.ts';

const BOUND_MS = 1000;
const BACKENDS = ['caddy', 'alpha', 'bravo', 'charlie', 'delta', 'stream'];

interface Rig {
  readonly dir: string;
  readonly configFile: string;
  readonly routesFile: string;
  readonly d: TestDatabase;
  readonly redis: Redis;
  readonly key: string;
  readonly channel: string;
  readonly ports: Record<string, number>;
  readonly names: { file: string; pg: string; redis: string };
  /** The config file's text with these routes of its own. */
  config(routes: ReadonlyArray<readonly [string, string]>, opts?: { pgInterval?: string; listen?: boolean; redisResync?: string }): string;
  start(configText: string): Promise<RunningRouter>;
  writeRoutesFile(routes: ReadonlyArray<readonly [string, string]>): void;
  entry(backend: string): string;
}

function routeLines(ports: Record<string, number>, routes: ReadonlyArray<readonly [string, string]>, indent: string): string {
  return routes.map(([m, b]) => `${indent}- match: "${m}"\n${indent}  backend: { name: ${b}, addr: "127.0.0.1:${ports[b]}" }\n`).join('');
}

async function rig(t: TestContext): Promise<Rig> {
  const tmp = tempDir();
  const pair = makeCert(tmp.dir, 'backend.test');
  const backends: Array<Listening<tls.Server>> = await Promise.all(BACKENDS.map((n) => tlsBackend(n, pair)));
  const ports: Record<string, number> = {};
  BACKENDS.forEach((n, i) => {
    ports[n] = backends[i].port;
  });
  const d = await createTestDatabase();
  await d.db.query(`CREATE TABLE simple_routes (match text PRIMARY KEY, addr text NOT NULL, name text NOT NULL);
    CREATE TRIGGER simple_routes_notify AFTER INSERT OR UPDATE OR DELETE ON simple_routes
      FOR EACH STATEMENT EXECUTE FUNCTION sni_router_notify();`);
  const redis = redisClient();
  const suffix = randomSuffix();
  const key = `sni-router-test:${suffix}:routes`;
  const channel = `sni-router-test:${suffix}:changed`;
  const names = { file: `file-${suffix}`, pg: `pg-${suffix}`, redis: `redis-${suffix}` };
  const configFile = join(tmp.dir, 'sni-router.yaml');
  const routesFile = join(tmp.dir, 'routes.yaml');
  const routers: RunningRouter[] = [];
  t.after(async () => {
    for (const r of routers) await r.stop();
    await redis.del(key);
    redis.disconnect();
    await d.drop();
    for (const b of backends) await b.close();
    tmp.cleanup();
  });
  const writeRoutesFile = (routes: ReadonlyArray<readonly [string, string]>) => {
    const tmpFile = join(tmp.dir, `.routes.${randomSuffix()}.tmp`);
    writeFileSync(tmpFile, `routes:\n${routeLines(ports, routes, '  ')}`);
    renameSync(tmpFile, routesFile);
  };
  return {
    dir: tmp.dir,
    configFile,
    routesFile,
    d,
    redis,
    key,
    channel,
    ports,
    names,
    config: (routes, opts = {}) => [
      'listen: "127.0.0.1:0"',
      'admin: { listen: "127.0.0.1:0" }',
      `fallback: { name: caddy, addr: "127.0.0.1:${ports.caddy}" }`,
      routes.length === 0 ? 'routes: []' : `routes:\n${routeLines(ports, routes, '  ')}`,
      'sources:',
      `  - { type: file, name: ${names.file}, path: "${routesFile}" }`,
      '  - type: postgres',
      `    name: ${names.pg}`,
      `    url: "${d.url()}"`,
      `    interval: ${opts.pgInterval ?? '60s'}`,
      ...(opts.listen === false ? [] : ['    listen_channel: sni_router_routes']),
      '    query: "SELECT match, addr, name FROM simple_routes ORDER BY match"',
      '  - type: redis',
      `    name: ${names.redis}`,
      `    key: "${key}"`,
      `    channel: "${channel}"`,
      `    resync_interval: ${opts.redisResync ?? '60s'}`,
      '',
    ].join('\n'),
    start: async (configText) => {
      writeFileSync(configFile, configText);
      const r = await startRouter(configText, { file: configFile });
      routers.push(r);
      return r;
    },
    writeRoutesFile,
    entry: (backend) => JSON.stringify({ backend: { name: backend, addr: `127.0.0.1:${ports[backend]}` } }),
  };
}

async function pgSet(db: TestDatabase, ports: Record<string, number>, match: string, backend: string): Promise<void> {
  await db.db.query(
    'INSERT INTO simple_routes (match, addr, name) VALUES ($1, $2, $3) ON CONFLICT (match) DO UPDATE SET addr = EXCLUDED.addr, name = EXCLUDED.name',
    [match, `127.0.0.1:${ports[backend]}`, backend],
  );
}

/** A source whose snapshots the test hands over, as a real source does when it reads. */
class HandFedSource implements RouteSource {
  readonly type = 'redis' as const;
  readonly name: string;
  #sink: SourceSink | null = null;
  constructor(name: string) {
    this.name = name;
  }
  async start(sink: SourceSink): Promise<void> {
    this.#sink = sink;
  }
  resync(): void {}
  async stop(): Promise<void> {}
  /** [match, backend name] or [match, backend name, namespace]. */
  feed(routes: ReadonlyArray<readonly [string, string, string?]>, origin?: string): void {
    const specs = routeList(routes.map(([match, name, namespace]) => ({ match, backend: { name, addr: '127.0.0.1:9' }, namespace })), [this.name], this.name);
    this.#sink?.snapshot({ routes: specs, invalid: [], ...(origin === undefined ? {} : { origin }) });
  }
}

/** A composer over a real router and metrics, fed by hand-fed sources, with the config's own routes. */
async function handFed(configRoutes: ReadonlyArray<readonly [string, string]>, ...sources: HandFedSource[]) {
  const fallback = { name: 'caddy', addrs: ['127.0.0.1:9'], proxyProtocol: null };
  const router = new Router(new RouteTable([], fallback));
  const metrics = new Metrics({ defaultMetrics: false });
  const composer = new Composer({ router, metrics, logger: memoryLogger('info').logger, coalesceMs: 1 });
  const routes = configRoutes.map(([match, name]) => ({ match, backend: { name, addr: '127.0.0.1:9' } }));
  composer.setConfig(routeList(routes, ['routes'], 'config'), fallback);
  await composer.setSources(sources);
  return { router, metrics, composer };
}

test('the namespaces of the live table are told to listeners when they change, and only then; a route that lost a conflict brings none', async () => {
  const src = new HandFedSource('namespaces');
  const { composer } = await handFed([['cdn.ns-c.test', 'config-wins']], src);
  const heard: string[][] = [];
  composer.onNamespaces((ns) => heard.push([...ns].sort()));
  const settle = () => sleep(30);
  src.feed([['cdn.ns-a.test', 'turn-a', 'a'], ['turn.ns-a.test', 'turn-a', 'a'], ['cdn.ns-b.test', 'turn-b', 'b'], ['cdn.ns-c.test', 'turn-c', 'c']]);
  await settle();
  assert.deepEqual(heard, [['a', 'b']], 'c\'s only route lost to the config');
  src.feed([['cdn.ns-a.test', 'turn-a', 'a'], ['cdn.ns-b.test', 'turn-b', 'b'], ['other.test', 'other']]);
  await settle();
  assert.deepEqual(heard, [['a', 'b']], 'routes changed, the namespaces did not');
  src.feed([['cdn.ns-a.test', 'turn-a', 'a']]);
  await settle();
  assert.deepEqual(heard, [['a', 'b'], ['a']]);
  assert.deepEqual([...composer.namespaces()], ['a']);
});

test('a conflict that changes no lookup is still shown and counted: the table is not replaced, the conflicts are current', async () => {
  const early = new HandFedSource('early');
  const late = new HandFedSource('late');
  const { router, metrics, composer } = await handFed([['same.test', 'config-wins']], early, late);
  const losers = () => composer.conflicts().map((c) => c.loser.source).sort();
  const settle = () => sleep(30);

  early.feed([['same.test', 'early-loses']]);
  await settle();
  assert.deepEqual(losers(), ['early']);
  const generation = router.generation;

  // The late source's route loses too: no lookup changes, so no replace, but one more conflict.
  late.feed([['same.test', 'late-loses'], ['other.test', 'late-wins']]);
  await settle();
  assert.ok(router.generation > generation, 'other.test is new: replaced');
  const afterOther = router.generation;
  late.feed([['same.test', 'late-loses-elsewhere'], ['other.test', 'late-wins']]);
  await settle();
  assert.equal(router.generation, afterOther, 'a loser changing its backend changes no lookup');
  assert.deepEqual(losers(), ['early', 'late']);
  assert.equal(metricValue(await metrics.registry.metrics(), 'sni_router_route_conflicts_total', { source: 'late' }), 1,
    'the same match losing to the same winner is one standing conflict');

  // The early source withdraws its loser: the table again stays, the conflict goes.
  early.feed([]);
  await settle();
  assert.equal(router.generation, afterOther);
  assert.deepEqual(losers(), ['late']);
  await composer.stop();
});

test('a source with 200,000 routes is merged whole (passing them as call arguments overflows the stack)', async () => {
  const big = new HandFedSource('big');
  const { router, composer } = await handFed([['config.test', 'config']], big);
  const pairs: Array<readonly [string, string]> = [];
  for (let i = 0; i < 200_000; i++) pairs.push([`ns${i}.big.test`, `b${i}`]);
  big.feed(pairs);
  await waitFor(() => router.table.routes.length === 200_001, 10_000, 'the big table');
  assert.equal(router.table.lookup('ns199999.big.test', null)?.backend.name, 'b199999');
  assert.equal(router.table.lookup('config.test', null)?.backend.name, 'config');
  await composer.stop();
});

test('a snapshot from a cache is applied but is no success; a source taken away leaves no gauges behind', async () => {
  const keep = new HandFedSource('keep');
  const cached = new HandFedSource('cached');
  const { router, metrics, composer } = await handFed([], keep, cached);
  const metric = async (name: string, source: string, extra: Record<string, string> = {}) => metricValue(await metrics.registry.metrics(), name, { source, ...extra });
  const series = async (source: string) => (await metrics.registry.metrics()).split('\n').filter((l) => l.includes(`source="${source}"`) && /^sni_router_source_(up|last_success_timestamp_seconds)\{/.test(l));

  keep.feed([['keep.test', 'k']]);
  cached.feed([['cached.test', 'c']], 'cache');
  await waitFor(() => router.table.routes.length === 2, 3000, 'both snapshots applied');
  assert.equal(await metric('sni_router_source_up', 'keep'), 1);
  assert.equal(await metric('sni_router_source_up', 'cached'), 0, 'a cache is not the source answering');
  assert.equal(await metric('sni_router_source_updates_total', 'cached', { result: 'ok' }), 0);
  assert.ok(!(await series('cached')).some((l) => l.startsWith('sni_router_source_last_success')), 'no success time from a cache');
  assert.deepEqual(composer.statuses().map((st) => [st.name, st.state, st.routes]), [['keep', 'ok', 1], ['cached', 'starting', 1]]);

  cached.feed([['cached.test', 'c']]);
  await waitFor(async () => await metric('sni_router_source_up', 'cached') === 1, 3000, 'the live read');
  assert.equal((await series('cached')).length, 2);

  await composer.setSources([keep]);
  assert.deepEqual(await series('cached'), [], 'no gauge of a source that is gone');
  assert.equal(await metric('sni_router_source_up', 'keep'), 1);
  await composer.stop();
});

test('config routes come first, then sources in order; the loser of a conflict is logged and counted', async (t) => {
  const rg = await rig(t);
  const same = 'same.example.test';
  rg.writeRoutesFile([[same, 'bravo'], ['file-only.example.test', 'bravo']]);
  await pgSet(rg.d, rg.ports, same, 'charlie');
  await rg.redis.hset(rg.key, same, rg.entry('delta'));
  const r = await rg.start(rg.config([[same, 'alpha']]));

  assert.equal(await backendFor(r.port, same), 'alpha');
  assert.equal(await backendFor(r.port, 'file-only.example.test'), 'bravo', 'a route without a conflict applies');
  for (const loser of [rg.names.file, rg.names.pg, rg.names.redis]) {
    assert.equal(await r.metric('sni_router_route_conflicts_total', { source: loser }), 1, `${loser} lost once`);
    assert.ok(r.logs.some((l) => l.msg === 'route conflict: the earlier source wins' && l.match === same && l.winner === 'config' && l.loser === loser));
  }
  assert.equal(await r.metric('sni_router_route_conflicts_total', { source: 'config' }), 0);
  const view = r.app.routesView() as { routes: Array<{ match: string; source: string }>; conflicts: Array<{ match: string; winner: string; loser: string }> };
  assert.deepEqual(view.routes.filter((x) => x.match === same).map((x) => x.source), ['config']);
  assert.deepEqual(view.conflicts.map((c) => c.loser).sort(), [rg.names.file, rg.names.pg, rg.names.redis].sort());

  // A standing conflict is counted once, not on every read.
  r.app.composer.resyncAll();
  await sleep(300);
  assert.equal(await r.metric('sni_router_route_conflicts_total', { source: rg.names.redis }), 1);

  // Each winner withdrawn in turn hands the name to the next in precedence.
  // reload() reads the config file on disk.
  writeFileSync(rg.configFile, rg.config([]));
  assert.equal(await r.app.reload(), true);
  assert.equal(await backendFor(r.port, same), 'bravo', 'config withdrawn: the file wins');

  let since = Date.now();
  rg.writeRoutesFile([['file-only.example.test', 'bravo']]);
  await timeUntilRouted(r.port, same, 'charlie', { since, deadlineMs: BOUND_MS });

  since = Date.now();
  await rg.d.db.query('DELETE FROM simple_routes WHERE match = $1', [same]);
  await timeUntilRouted(r.port, same, 'delta', { since, deadlineMs: BOUND_MS });

  since = Date.now();
  await rg.redis.hdel(rg.key, same);
  await rg.redis.publish(rg.channel, '');
  await timeUntilRouted(r.port, same, 'caddy', { since, deadlineMs: BOUND_MS });
  assert.deepEqual((r.app.routesView() as { conflicts: unknown[] }).conflicts, []);

  // Same match with a different alpn is not a conflict: both stand, the ALPN one tried first.
  await rg.redis.hset(rg.key, same, JSON.stringify({ alpn: 'none', backend: { name: 'delta', addr: `127.0.0.1:${rg.ports.delta}` } }));
  await rg.redis.publish(rg.channel, '');
  await pgSet(rg.d, rg.ports, same, 'charlie');
  await waitFor(async () => (await backendFor(r.port, same, ['h2'])) === 'charlie', 3000, 'the postgres route');
  assert.equal(await backendFor(r.port, same), 'delta');
  assert.deepEqual((r.app.routesView() as { conflicts: unknown[] }).conflicts, []);
});

test('SIGHUP (app.reload) re-reads the config and resyncs every source', async (t) => {
  const rg = await rig(t);
  rg.writeRoutesFile([]);
  // No LISTEN, a 60 s poll, no PUBLISH and a 60 s resync: only the reload can bring these in.
  const text = rg.config([['config.example.test', 'alpha']], { listen: false, pgInterval: '60s', redisResync: '60s' });
  const r = await rg.start(text);
  await redisSettled(rg.redis, rg.names.redis);
  await pgSet(rg.d, rg.ports, 'pg.example.test', 'charlie');
  await rg.redis.hset(rg.key, 'redis.example.test', rg.entry('delta'));
  writeFileSync(rg.configFile, rg.config([['config.example.test', 'bravo']], { listen: false, pgInterval: '60s', redisResync: '60s' }));
  await sleep(500);
  assert.equal(await backendFor(r.port, 'pg.example.test'), 'caddy');
  assert.equal(await backendFor(r.port, 'redis.example.test'), 'caddy');
  assert.equal(await backendFor(r.port, 'config.example.test'), 'alpha');

  const since = Date.now();
  assert.equal(await r.app.reload(), true);
  assert.equal(await backendFor(r.port, 'config.example.test'), 'bravo');
  const pgMs = await timeUntilRouted(r.port, 'pg.example.test', 'charlie', { since, deadlineMs: BOUND_MS });
  const redisMs = await timeUntilRouted(r.port, 'redis.example.test', 'delta', { since, deadlineMs: BOUND_MS });
  t.diagnostic(`after reload: postgres ${pgMs}ms, redis ${redisMs}ms`);
});

/** A TLS connection through the router that keeps sending and checks that all of it echoes back. */
interface Stream {
  sent: string;
  received: string;
  errors: number;
  closed: boolean;
  socket: tls.TLSSocket;
}

async function openStream(port: number, sni: string, id: number): Promise<Stream> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, servername: sni, rejectUnauthorized: false });
    const s: Stream = { sent: '', received: '', errors: 0, closed: false, socket };
    let greeted = false;
    let head = '';
    const timer = setTimeout(() => reject(new Error(`stream ${id} got no greeting`)), 15_000);
    socket.on('data', (d: Buffer) => {
      if (greeted) {
        s.received += d.toString();
        return;
      }
      head += d.toString();
      const nl = head.indexOf('\n');
      if (nl < 0) return;
      greeted = true;
      clearTimeout(timer);
      s.received = head.slice(nl + 1);
      if (!head.startsWith('stream ')) reject(new Error(`stream ${id} reached ${head.slice(0, nl)}`));
      else resolve(s);
    });
    socket.on('error', (err) => {
      s.errors++;
      clearTimeout(timer);
      reject(err);
    });
    socket.on('close', () => {
      s.closed = true;
    });
  });
}

test('a thousand route changes across sources while 200 connections relay traffic', async (t) => {
  const rg = await rig(t);
  rg.writeRoutesFile([]);
  const r = await rg.start(rg.config([['stream.example.test', 'stream']]));
  const generationBefore = r.app.router.generation;

  // 200 long-lived connections relaying through the router the whole time.
  const streams: Stream[] = [];
  for (let batch = 0; batch < 10; batch++) {
    streams.push(...await Promise.all(Array.from({ length: 20 }, (_, i) => openStream(r.port, 'stream.example.test', batch * 20 + i))));
  }
  let pumping = true;
  const pump = (async () => {
    for (let round = 0; pumping && round < 1000; round++) {
      for (const [i, s] of streams.entries()) {
        const msg = `${i}:${round};`;
        s.sent += msg;
        s.socket.write(msg);
      }
      await sleep(50);
    }
  })();
  // New connections keep working during the churn.
  let probes = 0;
  let probeFailures = 0;
  const probe = (async () => {
    for (let i = 0; pumping && i < 2000; i++) {
      if ((await backendFor(r.port, 'stream.example.test')) === 'stream') probes++;
      else probeFailures++;
      await sleep(20);
    }
  })();

  // The churn: 1,000 changes spread over the three sources, on a pool of names they share so
  // that conflicts come and go too. A model of each source says what the table must end as.
  const pool = Array.from({ length: 40 }, (_, i) => `churn-${i}.example.test`);
  const choices = ['alpha', 'bravo', 'charlie', 'delta'];
  const model = { file: new Map<string, string>(), pg: new Map<string, string>(), redis: new Map<string, string>() };
  let seed = 42;
  const random = (n: number) => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed % n;
  };
  const plan: Array<{ source: 'file' | 'pg' | 'redis'; match: string; backend: string | null }> = [];
  for (let i = 0; i < 1000; i++) {
    const source = (['file', 'pg', 'redis'] as const)[i % 3];
    plan.push({ source, match: pool[random(pool.length)], backend: random(10) < 7 ? choices[random(choices.length)] : null });
  }
  const started = Date.now();
  const bySource = (source: 'file' | 'pg' | 'redis') => plan.filter((p) => p.source === source);
  await Promise.all([
    (async () => {
      for (const c of bySource('file')) {
        if (c.backend === null) model.file.delete(c.match);
        else model.file.set(c.match, c.backend);
        rg.writeRoutesFile([...model.file]);
        await sleep(8);
      }
    })(),
    (async () => {
      for (const c of bySource('pg')) {
        if (c.backend === null) {
          model.pg.delete(c.match);
          await rg.d.db.query('DELETE FROM simple_routes WHERE match = $1', [c.match]);
        } else {
          model.pg.set(c.match, c.backend);
          await pgSet(rg.d, rg.ports, c.match, c.backend);
        }
        await sleep(8);
      }
    })(),
    (async () => {
      for (const c of bySource('redis')) {
        if (c.backend === null) {
          model.redis.delete(c.match);
          await rg.redis.hdel(rg.key, c.match);
        } else {
          model.redis.set(c.match, c.backend);
          await rg.redis.hset(rg.key, c.match, rg.entry(c.backend));
        }
        await rg.redis.publish(rg.channel, c.match);
        await sleep(8);
      }
    })(),
  ]);
  const churnMs = Date.now() - started;

  // The table the composer must end with: config, then file, postgres, redis; first wins.
  const expected = new Map<string, string>([['stream.example.test', 'stream config']]);
  for (const [source, m] of [[rg.names.file, model.file], [rg.names.pg, model.pg], [rg.names.redis, model.redis]] as const) {
    for (const [match, backend] of m) if (!expected.has(match)) expected.set(match, `${backend} ${source}`);
  }
  const actual = () => new Map(r.app.router.table.routes.map((x) => [x.match, `${x.backend.name} ${x.source}`]));
  const settleStart = Date.now();
  await waitFor(() => JSON.stringify([...actual()].sort()) === JSON.stringify([...expected].sort()), 10_000, 'the final table');
  const settledMs = Date.now() - settleStart;
  assert.deepEqual(new Map([...actual()].sort()), new Map([...expected].sort()));
  for (const match of pool.slice(0, 10)) {
    assert.equal(await backendFor(r.port, match), expected.get(match)?.split(' ')[0] ?? 'caddy', match);
  }

  // Every relayed byte came back, on every connection, in order.
  pumping = false;
  await pump;
  await probe;
  await waitFor(() => streams.every((s) => s.received.length >= s.sent.length), 10_000, 'the echoes');
  for (const [i, s] of streams.entries()) {
    assert.equal(s.received, s.sent, `connection ${i} relayed every byte`);
    assert.equal(s.errors, 0);
    assert.equal(s.closed, false, `connection ${i} survived the churn`);
  }
  assert.equal(probeFailures, 0, `${probeFailures} new connections failed during the churn`);
  assert.ok(probes > 0);
  assert.ok(r.app.router.generation > generationBefore);
  for (const s of streams) s.socket.destroy();
  t.diagnostic(`1000 changes in ${churnMs}ms (${r.app.router.generation - generationBefore} table replaces); final table ${settledMs}ms after the last; ${probes} new connections during the churn`);
});
