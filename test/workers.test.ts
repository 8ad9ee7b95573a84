// Multi-core (workers > 1): the primary keeps sources, admin and the authoritative table; N
// worker processes listen with SO_REUSEPORT and route. Real processes, real sockets, real kills.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import { TablePublisher, TableReplica } from '../src/cluster/table-sync.ts';
import { parseConfig } from '../src/config/load.ts';
import { RouteTable, diffTables } from '../src/router/table.ts';
import { type AlpnCondition, type RouteSpec } from '../src/model/route.ts';
import {
  type CertPair, makeCert, metricValue, rawExchange, recordingBackend, sleep, startRouter, tempDir, tlsBackend, tlsHello, waitFor,
} from './helpers.ts';
import { buildHello } from './support/hellos.ts';
import { routerSuitePassesWith } from './support/suite.ts';

const ROOT = join(import.meta.dirname, '..');
const BIN = join(ROOT, 'bin', 'sni-router');

let dir: string;
let cleanupDir: () => void;
let turnCert: CertPair;
let webCert: CertPair;
before(() => {
  ({ dir, cleanup: cleanupDir } = tempDir());
  turnCert = makeCert(dir, 'cdn.example.com');
  webCert = makeCert(dir, 'www.example.com');
});
after(() => cleanupDir());

function tableFor(yaml: string): RouteTable {
  const c = parseConfig(yaml, 't.yaml');
  return new RouteTable(c.routes, c.fallback);
}

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Sends a ClientHello through the router and returns the backend's first bytes ('' if it closes first). */
async function greeting(port: number, sni: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`no greeting for ${sni}`));
    }, 5000);
    s.on('error', () => {});
    s.once('data', (d) => {
      clearTimeout(timer);
      s.destroy();
      resolve(d.toString());
    });
    s.on('close', () => {
      clearTimeout(timer);
      resolve('');
    });
    s.write(buildHello({ sni }));
  });
}

/** Opens a connection through the router to a holding backend and waits until the backend has it. */
async function holdOpen(port: number, rec: Awaited<ReturnType<typeof recordingBackend>>, sni: string): Promise<net.Socket> {
  const before = rec.conns.length;
  const s = net.connect({ host: '127.0.0.1', port });
  s.on('error', () => {});
  await new Promise((r) => s.on('connect', r));
  s.write(buildHello({ sni }));
  await rec.waitConns(before + 1);
  return s;
}

describe('workers: 2 in-process (the test process is the primary)', () => {
  test('real TLS clients route correctly, and connections land in both workers', async () => {
    const turn = await tlsBackend('turn', turnCert);
    const web = await tlsBackend('web', webCert);
    const r = await startRouter(`
workers: 2
fallback: { name: caddy, addr: "127.0.0.1:${web.port}" }
routes:
  - { match: cdn.example.com, alpn: none, backend: { name: turn, addr: "127.0.0.1:${turn.port}" } }
`);
    try {
      assert.equal(r.workers, 2);
      assert.equal(r.app.notReadyReason(), null);
      const n = 30;
      for (let i = 0; i < n; i++) {
        if (i % 2 === 0) {
          const a = await tlsHello(r.port, 'cdn.example.com');
          assert.equal(a.line, 'turn alpn=none sni=cdn.example.com');
          assert.equal(a.peerCertSubject, 'cdn.example.com');
        } else {
          const b = await tlsHello(r.port, 'cdn.example.com', ['h2']);
          assert.equal(b.peerCertSubject, 'www.example.com');
          assert.match(b.line, /^web alpn=none sni=cdn\.example\.com$/);
        }
      }
      let stats = await r.app.dataPlaneStats();
      await waitFor(async () => {
        stats = await r.app.dataPlaneStats();
        return stats.reduce((t, s) => t + s.connections, 0) === n;
      }, 5000, 'every connection finished');
      assert.equal(stats.length, 2);
      assert.equal(new Set(stats.map((s) => s.pid)).size, 2);
      assert.ok(stats.every((s) => s.pid !== process.pid), 'the primary routes nothing itself');
      console.log(`connections per worker: ${stats.map((s) => `pid ${s.pid}: ${s.connections}`).join(', ')}`);
      assert.ok(stats.every((s) => s.connections > 0), 'both workers took connections');
    } finally {
      await r.stop();
      await turn.close();
      await web.close();
    }
  });

  test('a table replace reaches every worker: new connections in each follow it', async () => {
    const a = await recordingBackend({ reply: 'A' });
    const b = await recordingBackend({ reply: 'B' });
    const fb = await recordingBackend({ reply: 'F' });
    const yaml = (name: string, port: number) => `fallback: { addr: "127.0.0.1:${fb.port}" }
routes:
  - { match: live.example.com, backend: { name: ${name}, addr: "127.0.0.1:${port}" } }
  - { match: "*.gone.example.com", backend: { name: ${name}, addr: "127.0.0.1:${port}" } }
`;
    const r = await startRouter(`workers: 2\n${yaml('a', a.port)}`);
    try {
      const probe = (sni: string) => greeting(r.port, sni);
      for (let i = 0; i < 6; i++) assert.equal(await probe('live.example.com'), 'A');
      const gen = r.app.router.replace(tableFor(`fallback: { addr: "127.0.0.1:${fb.port}" }
routes:
  - { match: live.example.com, backend: { name: b, addr: "127.0.0.1:${b.port}" } }
`));
      await waitFor(async () => (await r.app.dataPlaneStats()).every((s) => s.generation === gen), 5000, 'both workers on the new table');
      const before = await r.app.dataPlaneStats();
      const n = 30;
      for (let i = 0; i < n; i++) {
        assert.equal(await probe('live.example.com'), 'B', `connection ${i}`);
      }
      // The pattern that left the table is gone in every worker too.
      for (let i = 0; i < 6; i++) assert.equal(await probe('x.gone.example.com'), 'F');
      await waitFor(async () => (await r.app.dataPlaneStats()).reduce((t, s) => t + s.connections, 0) ===
        before.reduce((t, s) => t + s.connections, 0) + n + 6, 5000);
      const afterStats = await r.app.dataPlaneStats();
      for (const s of afterStats) {
        const was = before.find((x) => x.pid === s.pid)!;
        assert.ok(s.connections > was.connections, `worker ${s.pid} took some of the new connections`);
      }
      assert.equal(b.conns.length, n);
    } finally {
      await r.stop();
      await a.close();
      await b.close();
      await fb.close();
    }
  });

  test('/metrics sums both workers; series the primary owns are not multiplied', async () => {
    const rec = await recordingBackend({ reply: 'hi' });
    const r = await startRouter(`workers: 2\nfallback: { name: rec, addr: "127.0.0.1:${rec.port}" }\n`);
    try {
      const n = 40;
      for (let i = 0; i < n; i++) {
        assert.equal((await rawExchange(r.port, [buildHello({ sni: `m${i}.example.com` })])).toString(), 'hi');
      }
      await waitFor(async () => (await r.metric('sni_router_connections_total')) === n, 5000, `${n} connections counted`);
      const stats = await r.app.dataPlaneStats();
      assert.ok(stats.every((s) => s.connections > 0), `both workers counted some: ${stats.map((s) => s.connections).join('+')}`);
      const res = await fetch(`http://127.0.0.1:${r.adminPort}/metrics`);
      const text = await res.text();
      assert.equal(metricValue(text, 'sni_router_connections_total', { route: 'fallback', result: 'ok' }), n);
      assert.equal(metricValue(text, 'sni_router_client_hello_bytes_count'), n);
      assert.equal(metricValue(text, 'sni_router_backend_dial_duration_seconds_count', { backend: 'rec' }), n);
      assert.equal(metricValue(text, 'sni_router_route_table_generation'), r.app.router.generation);
      assert.equal(metricValue(text, 'sni_router_worker_restarts_total'), 0);
      const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string };
      assert.deepEqual(text.split('\n').filter((l) => l.startsWith('sni_router_build_info')),
        [`sni_router_build_info{version="${pkg.version}",node="${process.version}"} 1`], 'build_info once, not summed over the workers');
      // Process facts: the primary's start time and descriptor limit, not a sum.
      const start = metricValue(text, 'process_start_time_seconds');
      assert.ok(Math.abs(start - (Date.now() / 1000 - process.uptime())) < 5, `process_start_time_seconds ${start}`);
      const softLimit = Number(/^Max open files\s+(\d+)/m.exec(readFileSync('/proc/self/limits', 'utf8'))![1]);
      assert.equal(metricValue(text, 'process_max_fds'), softLimit);
      // Each series appears once: the aggregate has no duplicate lines.
      const samples = text.split('\n').filter((l) => l !== '' && !l.startsWith('#')).map((l) => l.slice(0, l.lastIndexOf(' ')));
      assert.equal(new Set(samples).size, samples.length);
    } finally {
      await r.stop();
      await rec.close();
    }
  });

  test('kill -9 of a worker: it is restarted, service continues, restarts and lost connections are counted', async () => {
    const rec = await recordingBackend();
    const r = await startRouter(`workers: 2\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    const held: net.Socket[] = [];
    try {
      // Finished connections first, scraped once: what /metrics showed must not shrink when a worker dies.
      for (let i = 0; i < 20; i++) await rawExchange(r.port, [buildHello({ sni: `done${i}.example.com` })]);
      await waitFor(async () => (await r.metric('sni_router_connections_total')) === 20, 5000, 'finished connections counted');
      assert.ok((await r.app.dataPlaneStats()).every((s) => s.connections > 0), 'both workers counted some');
      for (let i = 0; i < 10; i++) held.push(await holdOpen(r.port, rec, `k${i}.example.com`));
      const stats = await r.app.dataPlaneStats();
      assert.equal(stats.reduce((t, s) => t + s.active, 0), 10);
      const victim = stats.reduce((x, y) => (y.active > x.active ? y : x));
      const survivor = stats.find((s) => s.pid !== victim.pid)!;
      // The primary counts what the last heartbeat said: let it catch up with the exact count.
      await waitFor(() => r.app.workerStatus().find((w) => w.pid === victim.pid)?.active === victim.active, 5000, 'heartbeat');
      const closedByKill = held.map((s) => new Promise<boolean>((res) => {
        const t = setTimeout(() => res(false), 3000);
        s.on('close', () => {
          clearTimeout(t);
          res(true);
        });
      }));
      process.kill(victim.pid, 'SIGKILL');
      // Not ready while a worker is missing, ready again once it listens.
      await waitFor(() => r.app.notReadyReason() !== null, 5000, 'not ready while restarting');
      assert.match(r.app.notReadyReason()!, /worker \d is restarting|worker \d is starting/);
      await waitFor(async () => (await r.metric('sni_router_worker_restarts_total')) === 1, 10_000, 'restart counted');
      await waitFor(() => r.app.notReadyReason() === null, 10_000, 'ready again');
      const readyz = await fetch(`http://127.0.0.1:${r.adminPort}/readyz`);
      assert.equal(readyz.status, 200);
      assert.equal(await r.metric('sni_router_worker_connections_lost_total'), victim.active);
      assert.ok(r.logs.some((l) => l.msg === 'worker exited unexpectedly; restarting it' && l.worker_pid === victim.pid &&
        l.signal === 'SIGKILL' && l.connections_lost === victim.active));
      // The killed worker's clients lost their connections; the survivor's still relay.
      const closed = await Promise.all(closedByKill);
      assert.equal(closed.filter(Boolean).length, victim.active);
      const survivorsHeld = held.filter((_, i) => !closed[i]);
      assert.equal(survivorsHeld.length, survivor.active);
      // Service continues: new connections work (on both workers, the new one included).
      const now = await r.app.dataPlaneStats();
      assert.equal(now.length, 2);
      assert.ok(!now.some((s) => s.pid === victim.pid));
      const n = rec.conns.length;
      for (let i = 0; i < 20; i++) held.push(await holdOpen(r.port, rec, `after${i}.example.com`));
      assert.equal(rec.conns.length, n + 20);
      const later = await r.app.dataPlaneStats();
      assert.ok(later.every((s) => s.active > 0), `both workers serve: ${later.map((s) => s.active).join('+')}`);
      // Counters do not go backwards: the dead worker's last scraped counts stay in the sums.
      assert.equal(await r.metric('sni_router_connections_total'), 20);
      assert.equal(await r.metric('sni_router_worker_restarts_total'), 1);
    } finally {
      for (const s of held) s.destroy();
      await r.stop();
      await rec.close();
    }
  });

  test('a worker that keeps dying is restarted after a growing delay; the others keep serving', async () => {
    const rec = await recordingBackend({ reply: 'ok' });
    const r = await startRouter(`workers: 2\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    try {
      const delays: number[] = [];
      for (let i = 1; i <= 3; i++) {
        const slot1 = r.app.workerStatus().find((w) => w.slot === 1)!;
        assert.equal(slot1.state, 'listening');
        process.kill(slot1.pid!, 'SIGKILL');
        await waitFor(() => r.app.workerStatus().find((w) => w.slot === 1)?.restarts === i &&
          r.app.workerStatus().find((w) => w.slot === 1)?.state === 'listening', 10_000, `restart ${i}`);
        const exit = r.logs.filter((l) => l.msg === 'worker exited unexpectedly; restarting it' && l.worker === 1);
        delays.push(Number(exit[exit.length - 1].restart_in_ms));
        // Meanwhile the other worker served: every connection reached the backend.
        for (let k = 0; k < 5; k++) assert.equal(await greeting(r.port, `d${i}-${k}.example.com`), 'ok');
      }
      assert.deepEqual(delays, [250, 500, 1000]);
      assert.equal(await r.metric('sni_router_worker_restarts_total'), 3);
      assert.equal(r.app.workerStatus().find((w) => w.slot === 2)!.restarts, 0);
    } finally {
      await r.stop();
      await rec.close();
    }
  });

  test('a worker that stops answering (SIGSTOP) is killed after 15 s of silence and restarted', async () => {
    const rec = await recordingBackend({ reply: 'ok' });
    const r = await startRouter(`workers: 2\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    const stopped = r.app.workerStatus()[0].pid!;
    try {
      const t0 = Date.now();
      process.kill(stopped, 'SIGSTOP');
      await waitFor(() => r.logs.some((l) => l.msg === 'worker stopped answering; killing it' && l.worker_pid === stopped), 20_000, 'watchdog');
      const took = Date.now() - t0;
      assert.ok(took >= 14_000, `killed after ${took} ms`);
      await waitFor(() => r.app.notReadyReason() === null && !alive(stopped), 10_000, 'restarted');
      assert.equal(await r.metric('sni_router_worker_restarts_total'), 1);
      for (let k = 0; k < 10; k++) assert.equal(await greeting(r.port, `s${k}.example.com`), 'ok');
    } finally {
      if (alive(stopped)) process.kill(stopped, 'SIGKILL');
      await r.stop();
      await rec.close();
    }
  });

  test('backend cooldowns are shared: an address one worker found dead is skipped by all', async () => {
    const dead = await freePort();
    const rec = await recordingBackend({ reply: 'ok' });
    const r = await startRouter(`workers: 2
fallback: { addr: "127.0.0.1:9" }
routes:
  - { match: cdn.example.com, backend: { name: turn, addrs: ["127.0.0.1:${dead}", "127.0.0.1:${rec.port}"] } }
`);
    try {
      assert.equal(await greeting(r.port, 'cdn.example.com'), 'ok');
      for (let i = 0; i < 20; i++) assert.equal(await greeting(r.port, 'cdn.example.com'), 'ok');
      const stats = await r.app.dataPlaneStats();
      assert.ok(stats.every((s) => s.connections > 0 || s.active > 0), 'both workers routed some');
      assert.equal(await r.metric('sni_router_backend_dial_failures_total', { backend: 'turn' }), 1);
      const view = r.app.routesView() as { routes: Array<{ backend: { health: Array<{ healthy: boolean; last_error: string | null }> } }> };
      assert.deepEqual(view.routes[0].backend.health.map((h) => h.healthy), [false, true]);
      assert.equal(view.routes[0].backend.health[0].last_error, 'ECONNREFUSED');
    } finally {
      await r.stop();
      await rec.close();
    }
  });
});

describe('table sync: a change set rebuilds the same table in the worker', () => {
  const names = ['a.example.com', 'b.example.com', 'x.a.example.com', 'y.x.a.example.com', 'example.com', 'c.example.org'];
  const patterns = ['a.example.com', 'b.example.com', '*.a.example.com', '**.a.example.com', '**.example.com', '*.example.com', 'c.example.org'];
  const alpns: Array<AlpnCondition | null> = [null, { kind: 'none' }, { kind: 'any' }, { kind: 'list', protocols: ['h2'] }, { kind: 'list', protocols: ['http/1.1', 'h2'] }];
  const offers: Array<string[] | null> = [null, [], ['h2'], ['http/1.1'], ['acme-tls/1']];
  const route = fc.record({
    match: fc.constantFrom(...patterns),
    alpn: fc.constantFrom(...alpns),
    backend: fc.record({ name: fc.constantFrom('t1', 't2'), addrs: fc.constantFrom(['127.0.0.1:1'], ['127.0.0.1:2', '127.0.0.1:3']), proxyProtocol: fc.constantFrom(null, 'v2' as const) }),
    source: fc.constantFrom('config', 'file', 'redis'),
    namespace: fc.constantFrom(null, 'acme'),
  }) as fc.Arbitrary<RouteSpec>;
  const fallback = (port: number) => ({ name: 'caddy', addrs: [`127.0.0.1:${port}`], proxyProtocol: null });

  test('after any sequence of tables (sent as JSON), every lookup in the worker matches the primary', () => {
    fc.assert(fc.property(fc.array(fc.tuple(fc.array(route, { maxLength: 14 }), fc.integer({ min: 1, max: 3 })), { minLength: 1, maxLength: 6 }), (tables) => {
      const first = new RouteTable([], fallback(0));
      const publisher = new TablePublisher(first, 1);
      const replica = new TableReplica();
      let previous = replica.apply(JSON.parse(JSON.stringify(publisher.full())));
      const answers = (t: RouteTable) => names.flatMap((name) => offers.map((offer) => t.lookup(name, offer)));
      let generation = 1;
      let primary = first;
      for (const [generated, fb] of tables) {
        const routes = JSON.parse(JSON.stringify(generated)) as RouteSpec[];
        const table = new RouteTable(routes, fallback(fb));
        // The diff the composer hands to Router.replace.
        const change = publisher.change(table, ++generation, diffTables(primary, table));
        primary = table;
        const before = answers(previous);
        const copy = replica.apply(JSON.parse(JSON.stringify(change)));
        // The new table shares lists with the one it was derived from, which must not change.
        assert.deepEqual(answers(previous), before);
        previous = copy;
        assert.equal(replica.generation, generation);
        assert.deepEqual(copy.fallback, table.fallback);
        assert.equal(copy.routes.length, table.routes.length);
        for (const name of names) {
          for (const offer of offers) {
            assert.deepEqual(copy.lookup(name, offer), table.lookup(name, offer), `${name} ${JSON.stringify(offer)}`);
          }
        }
      }
    }), { numRuns: 300 });
  });

  test('an unchanged pattern is not sent again', () => {
    const t1 = tableFor('fallback: { addr: "127.0.0.1:1" }\nroutes:\n  - { match: a.example.com, backend: { addr: "127.0.0.1:2" } }\n  - { match: b.example.com, backend: { addr: "127.0.0.1:3" } }\n');
    const t2 = tableFor('fallback: { addr: "127.0.0.1:1" }\nroutes:\n  - { match: a.example.com, backend: { addr: "127.0.0.1:2" } }\n  - { match: c.example.com, backend: { addr: "127.0.0.1:3" } }\n');
    const p = new TablePublisher(t1, 1);
    const change = p.change(t2, 2, diffTables(t1, t2));
    assert.deepEqual(change.set.map((g) => g.map((r) => r.match)), [['c.example.com']]);
    assert.deepEqual(change.delete, ['b.example.com']);
  });
});

interface Proc {
  child: ChildProcess;
  port: number;
  adminPort: number;
  logs: Array<Record<string, unknown>>;
  stderr: () => string;
  exit: Promise<number | null>;
}

/** bin/sni-router as operators run it, its JSON log lines (from the primary and the workers) collected. */
async function spawnRouter(configFile: string): Promise<Proc> {
  const child = spawn(BIN, ['--config', configFile], { stdio: ['ignore', 'pipe', 'pipe'] });
  const logs: Array<Record<string, unknown>> = [];
  let buf = '';
  child.stdout!.on('data', (d) => {
    buf += d.toString();
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      try {
        logs.push(JSON.parse(line) as Record<string, unknown>);
      } catch {
        logs.push({ raw: line });
      }
    }
  });
  let stderr = '';
  child.stderr!.on('data', (d) => {
    stderr += d.toString();
  });
  const exit = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  await waitFor(() => logs.some((l) => l.msg === 'sni-router started') || child.exitCode !== null, 30_000, `router start (${stderr})`);
  const started = logs.find((l) => l.msg === 'sni-router started');
  assert.ok(started, `router did not start: ${stderr}`);
  const port = Number(String((started.listen as string[])[0]).split(':').pop());
  const adminPort = Number(String(started.admin).split(':').pop());
  return { child, port, adminPort, logs, stderr: () => stderr, exit };
}

async function http(port: number, path: string): Promise<{ status: number; body: string }> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`);
  return { status: res.status, body: await res.text() };
}

function workerPids(p: Proc): number[] {
  return p.logs.filter((l) => l.msg === 'worker listening').map((l) => Number(l.worker_pid));
}

describe('bin/sni-router with workers: 2', () => {
  test('SIGTERM drains every worker: /readyz 503, the open connection finishes, exit 0; workers ignore signals sent to them directly', async () => {
    const rec = await recordingBackend();
    const port = await freePort();
    const file = join(dir, 'drain.yaml');
    writeFileSync(file, `workers: 2\nlisten: "127.0.0.1:${port}"\nadmin: { listen: "127.0.0.1:0" }\nshutdown_grace: 20s\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    const p = await spawnRouter(file);
    const pids = workerPids(p);
    try {
      assert.equal(p.port, port);
      assert.equal(pids.length, 2);
      // Worker events are the primary's lines: pid is the primary's, worker_pid the worker's (one
      // key each; a repeated "pid" would leave a JSON reader only the last).
      const primaryPid = p.logs.find((l) => l.msg === 'sni-router started')!.pid;
      for (const l of p.logs.filter((x) => x.msg === 'worker listening')) assert.equal(l.pid, primaryPid);
      assert.ok(!pids.includes(Number(primaryPid)));
      assert.equal((await http(p.adminPort, '/readyz')).status, 200);
      // The primary coordinates: SIGINT and SIGTERM sent to a worker itself (a terminal's process
      // group gets them too) neither stop it nor count as a restart; nor does a stray SIGUSR2.
      process.kill(pids[0], 'SIGTERM');
      process.kill(pids[1], 'SIGINT');
      process.kill(pids[0], 'SIGUSR2');
      process.kill(pids[1], 'SIGUSR2');
      await sleep(300);
      assert.ok(pids.every(alive), 'workers still running');
      assert.equal(metricValue((await http(p.adminPort, '/metrics')).body, 'sni_router_worker_restarts_total'), 0);

      const open = net.connect({ host: '127.0.0.1', port });
      const got: Buffer[] = [];
      open.on('data', (d) => got.push(d));
      await new Promise((r) => open.on('connect', r));
      open.write(buildHello({ sni: 'x.example.com' }));
      await rec.waitConns(1);
      p.child.kill('SIGTERM');
      await waitFor(async () => (await http(p.adminPort, '/readyz')).status === 503, 5000, 'readyz 503');
      assert.match((await http(p.adminPort, '/readyz')).body, /draining/);
      // Both workers stop accepting: connections are refused (tried many times: each lands on a
      // worker the kernel picks).
      await waitFor(() => new Promise<boolean>((resolve) => {
        const s = net.connect({ host: '127.0.0.1', port });
        s.on('connect', () => {
          s.destroy();
          resolve(false);
        });
        s.on('error', () => resolve(true));
      }), 5000, 'listeners closed');
      for (let i = 0; i < 10; i++) {
        const refused = await new Promise<boolean>((resolve) => {
          const s = net.connect({ host: '127.0.0.1', port });
          s.on('connect', () => {
            s.destroy();
            resolve(false);
          });
          s.on('error', () => resolve(true));
        });
        assert.ok(refused, `connection ${i} after the drain began was accepted`);
      }
      rec.conns[0].socket.write('still relaying');
      await waitFor(() => Buffer.concat(got).toString() === 'still relaying');
      assert.equal(p.child.exitCode, null, 'still running while a connection is open');
      open.end();
      assert.equal(await p.exit, 0);
      await waitFor(() => !pids.some(alive), 5000, 'workers gone');
    } finally {
      p.child.kill('SIGKILL');
      for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
      await rec.close();
    }
  });

  test('SIGHUP reaches the workers: a new route and log.access apply in both', async () => {
    const turn = await tlsBackend('turn', turnCert);
    const web = await tlsBackend('web', webCert);
    const port = await freePort();
    const file = join(dir, 'hup.yaml');
    const head = `workers: 2\nlisten: "127.0.0.1:${port}"\nadmin: { listen: "127.0.0.1:0" }\nfallback: { addr: "127.0.0.1:${web.port}" }\n`;
    writeFileSync(file, head);
    const p = await spawnRouter(file);
    const pids = workerPids(p);
    try {
      assert.match((await tlsHello(port, 'cdn.example.com')).line, /^web /);
      assert.ok(!p.logs.some((l) => l.msg === 'connection'), 'no access log yet');
      writeFileSync(file, `${head}log: { access: true }\nroutes:\n  - { match: cdn.example.com, backend: { name: turn, addr: "127.0.0.1:${turn.port}" } }\n`);
      p.child.kill('SIGHUP');
      await waitFor(() => p.logs.some((l) => l.msg === 'config reloaded'), 5000, 'reload');
      await waitFor(async () => (await tlsHello(port, 'cdn.example.com')).line.startsWith('turn '), 5000, 'new route after SIGHUP');
      for (let i = 0; i < 30; i++) assert.match((await tlsHello(port, 'cdn.example.com')).line, /^turn /);
      await waitFor(() => new Set(p.logs.filter((l) => l.msg === 'connection' && l.route === 'cdn.example.com').map((l) => l.pid)).size === 2,
        5000, 'access log lines from both workers');
      const accessPids = new Set(p.logs.filter((l) => l.msg === 'connection').map((l) => Number(l.pid)));
      assert.deepEqual([...accessPids].sort(), [...pids].sort());
      p.child.kill('SIGTERM');
      assert.equal(await p.exit, 0);
    } finally {
      p.child.kill('SIGKILL');
      for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
      await turn.close();
      await web.close();
    }
  });

  test('a worker whose primary is killed exits', async () => {
    const rec = await recordingBackend();
    const file = join(dir, 'orphan.yaml');
    writeFileSync(file, `workers: 2\nlisten: "127.0.0.1:0"\nadmin: { listen: "127.0.0.1:0" }\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    const p = await spawnRouter(file);
    const pids = workerPids(p);
    try {
      assert.equal(pids.length, 2);
      p.child.kill('SIGKILL');
      await p.exit;
      await waitFor(() => !pids.some(alive), 5000, 'orphaned workers to exit');
    } finally {
      for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
      await rec.close();
    }
  });
});

describe('the data-plane suite with workers: 2', () => {
  test('test/router.test.ts passes with SNI_ROUTER_TEST_WORKERS=2', () => routerSuitePassesWith({ SNI_ROUTER_TEST_WORKERS: '2' }, 'workers: 2'));
});
