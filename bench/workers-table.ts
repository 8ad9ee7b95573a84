// What a big route table costs with workers > 1: the primary sends each new table to every worker
// over the cluster IPC channel (as a change set: the patterns that changed), and each worker
// rebuilds its RouteTable. This measures, with a 100,000-route table:
//   - primary: RouteTable build, and the replace call (change set + JSON + send to every worker);
//   - until every worker routes by the new table (from the replace);
//   - each worker's apply (its own RouteTable build), from its 'route table applied' log line;
//   - the stall a client sees: a probe process keeps one connection at a time going through the
//     router (connect, hello, first byte back) and the worst latency around each change is kept;
//   - a worker restarted with the table (kill -9 → listening again).
// With --workers 1 the same changes are made in-process, for comparison.
//
//   node bench/workers-table.ts [--routes 100000] [--workers 2] [--json]
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { App } from '../src/app.ts';
import { parseConfig } from '../src/config/load.ts';
import { createLogger } from '../src/log.ts';
import { RouteTable } from '../src/router/table.ts';
import { type BackendSpec, type RouteSpec } from '../src/model/route.ts';

const args = process.argv.slice(2);
const argValue = (name: string): string | undefined => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const N = Number(argValue('--routes') ?? 100_000);
const WORKERS = Number(argValue('--workers') ?? 2);
const json = args.includes('--json');
const REPO = join(import.meta.dirname, '..');
const NODE = join(REPO, 'node_modules', '.bin', 'node');
const HELLO = readFileSync(join(process.env.BENCH_FIXTURES ?? join(REPO, 'test', 'fixtures'), 'chromium-https-clienthello.bin'));

const now = () => performance.timeOrigin + performance.now();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// A backend that answers one byte once it has the whole hello.
const backend = net.createServer((s) => {
  let n = 0;
  s.on('data', (d) => {
    n += d.length;
    if (n >= HELLO.length) s.end('x');
  });
  s.on('error', () => {});
});
await new Promise<void>((r) => backend.listen(0, '127.0.0.1', () => r()));
const backendAddr = `127.0.0.1:${(backend.address() as net.AddressInfo).port}`;

const logLines: Array<Record<string, unknown>> = [];
const logger = createLogger('debug', new Writable({
  write(chunk: Buffer, _enc, cb) {
    for (const l of chunk.toString().split('\n')) if (l !== '') logLines.push(JSON.parse(l) as Record<string, unknown>);
    cb();
  },
}));
const config = parseConfig(`workers: ${WORKERS}
listen: "127.0.0.1:0"
admin: { listen: "" }
max_concurrent_conns: 0
fallback: { name: fb, addr: "${backendAddr}" }
routes:
  - { match: cdn.example.com, backend: { name: probe, addr: "${backendAddr}" } }
`, 'bench.yaml');
const app = await App.start(config, { logger });
const port = app.listenAddresses[0].port;

// The probe: another process, one connection at a time, printing "<unix ms at start> <latency ms>".
const probeScript = `
const net = require('node:net');
const hello = Buffer.from(process.argv[2], 'base64');
const port = Number(process.argv[1]);
const now = () => performance.timeOrigin + performance.now();
function one() {
  const t0 = now();
  const s = net.connect({ host: '127.0.0.1', port, noDelay: true });
  s.on('error', () => {});
  s.once('data', () => { process.stdout.write(t0.toFixed(1) + ' ' + (now() - t0).toFixed(3) + '\\n'); s.destroy(); setImmediate(one); });
  s.write(hello);
}
one();
`;
const probe = spawn(NODE, ['-e', probeScript, String(port), HELLO.toString('base64')], { stdio: ['ignore', 'pipe', 'inherit'] });
const samples: Array<[number, number]> = [];
let pbuf = '';
probe.stdout.on('data', (d) => {
  pbuf += d.toString();
  let nl: number;
  while ((nl = pbuf.indexOf('\n')) >= 0) {
    const [t, ms] = pbuf.slice(0, nl).split(' ').map(Number);
    samples.push([t, ms]);
    pbuf = pbuf.slice(nl + 1);
  }
});

const fallback: BackendSpec = { name: 'fb', addrs: [backendAddr], proxyProtocol: null };
const probeRoute: RouteSpec = { match: 'cdn.example.com', alpn: null, backend: { name: 'probe', addrs: [backendAddr], proxyProtocol: null }, source: 'bench', namespace: null };

/** As bench/table.ts: 90% exact names, 5% `*.`, 5% `**.`; `generation` moves 1% of them to another port. */
function makeRoutes(n: number, generation: number): RouteSpec[] {
  const routes: RouteSpec[] = new Array(n);
  routes[0] = probeRoute;
  for (let i = 1; i < n; i++) {
    const kind = i % 20;
    const match = kind === 0 ? `*.w${i}.example.net` : kind === 1 ? `**.d${i}.example.org` : `h${i}.example.com`;
    const p = 5349 + (i % 100 === generation % 100 ? generation : 0);
    routes[i] = {
      match, alpn: kind === 2 ? { kind: 'none' } : null, source: 'bench', namespace: null,
      backend: { name: `turn-${i % 1000}`, addrs: [`10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}:${p}`], proxyProtocol: null },
    };
  }
  return routes;
}

function worstBetween(from: number, to: number): { n: number; max: number } {
  let max = 0;
  let n = 0;
  for (const [t, ms] of samples) {
    // A probe whose connection was open during [from, to].
    if (t <= to && t + ms >= from) {
      n++;
      if (ms > max) max = ms;
    }
  }
  return { n, max };
}

function p99(from: number, to: number): number {
  const v = samples.filter(([t]) => t >= from && t <= to).map(([, ms]) => ms).sort((a, b) => a - b);
  return v.length === 0 ? NaN : v[Math.min(v.length - 1, Math.floor(v.length * 0.99))];
}

interface Change {
  readonly what: string;
  readonly build_ms: number;
  readonly replace_ms: number;
  readonly applied_ms: number;
  readonly worker_apply_ms: number[];
  readonly probe_worst_ms: number;
}

async function change(what: string, routes: RouteSpec[]): Promise<Change> {
  await sleep(400);
  const logFrom = logLines.length;
  const t0 = now();
  const table = new RouteTable(routes, fallback);
  const t1 = now();
  const generation = app.router.replace(table);
  const t2 = now();
  let t3 = t2;
  if (WORKERS > 1) {
    const deadline = Date.now() + 30_000;
    while (!(await app.dataPlaneStats()).every((s) => s.generation === generation)) {
      if (Date.now() > deadline) throw new Error('workers did not apply the table in 30 s');
      await sleep(5);
    }
    t3 = now();
  }
  await sleep(300);
  const applied = logLines.slice(logFrom).filter((l) => l.msg === 'route table applied' && l.generation === generation).map((l) => Number(l.ms));
  return {
    what, build_ms: t1 - t0, replace_ms: t2 - t1, applied_ms: t3 - t1, worker_apply_ms: applied, probe_worst_ms: worstBetween(t0, t3 + 50).max,
  };
}

await sleep(1500);
const t0 = now();
await sleep(1500);
const baselineP99 = p99(t0, now());
const baselineWorst = worstBetween(t0, now()).max;

const results: Change[] = [];
let routes = makeRoutes(N, 0);
results.push(await change(`${N.toLocaleString('en-US')} routes, from a table of 1`, routes));
for (let g = 1; g <= 3; g++) {
  routes = makeRoutes(N, g);
  results.push(await change('1% of backends moved, every route a new object (a source re-read)', routes));
}
for (let g = 1; g <= 3; g++) {
  routes = [...routes];
  for (let k = 0; k < 10; k++) {
    const i = 1 + ((g * 7919 + k * 104729) % (N - 1));
    routes[i] = { ...routes[i], backend: { ...routes[i].backend, addrs: [`10.9.9.${k}:${6000 + g}`] } };
  }
  results.push(await change('10 routes changed, the rest the same objects', routes));
}

let restartMs: number | null = null;
if (WORKERS > 1) {
  const victim = app.workerStatus()[0];
  const from = logLines.length;
  const k0 = now();
  process.kill(victim.pid!, 'SIGKILL');
  const deadline = Date.now() + 60_000;
  while (!logLines.slice(from).some((l) => l.msg === 'worker listening' && l.worker === victim.slot)) {
    if (Date.now() > deadline) throw new Error('the worker did not come back in 60 s');
    await sleep(10);
  }
  restartMs = now() - k0;
}

probe.kill();
await app.shutdown(0);
backend.close();

const f = (x: number) => x.toFixed(1);
if (json) {
  process.stdout.write(`${JSON.stringify({ routes: N, workers: WORKERS, baseline_p99_ms: baselineP99, baseline_worst_ms: baselineWorst, changes: results, restart_ms: restartMs })}\n`);
} else {
  process.stdout.write(`${N.toLocaleString('en-US')}-route table, workers: ${WORKERS}; probe latency without changes: p99 ${f(baselineP99)} ms, worst ${f(baselineWorst)} ms\n`);
  for (const r of results) {
    process.stdout.write(`  ${r.what}:\n    primary: build ${f(r.build_ms)} ms, replace + send ${f(r.replace_ms)} ms; ` +
      `${WORKERS > 1 ? `every worker on it after ${f(r.applied_ms)} ms; worker builds ${r.worker_apply_ms.map(f).join(', ') || 'n/a (<100 ms: debug)'} ms; ` : ''}` +
      `worst probe around it ${f(r.probe_worst_ms)} ms\n`);
  }
  if (restartMs !== null) process.stdout.write(`  a worker killed with the table loaded is listening again after ${f(restartMs)} ms\n`);
}
