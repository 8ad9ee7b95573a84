// Figure 6b, sni-router only: a 100,000-route table. Lookup time per kind of name, the time to
// build a new table and swap it in (RouteTable + Router.replace, and the whole composer path that
// a source's snapshot takes: merge, conflicts, diff, swap), and the heap it holds.
//
//   node --expose-gc bench/table.ts [--routes 100000] [--json]
//
// bench/run.ts runs it pinned to CPU 0 (where the router runs) and keeps the median of its runs.
import { performance } from 'node:perf_hooks';
import { createLogger } from '../src/log.ts';
import { Metrics } from '../src/metrics/metrics.ts';
import { RouteTable, Router } from '../src/router/table.ts';
import { type BackendSpec, type RouteSpec } from '../src/model/route.ts';
import { Composer } from '../src/sources/composer.ts';

const args = process.argv.slice(2);
const argValue = (name: string): string | undefined => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const N = Number(argValue('--routes') ?? 100_000);
const json = args.includes('--json');

const gc = (globalThis as { gc?: () => void }).gc;
if (gc === undefined) {
  process.stderr.write('bench/table.ts: run with node --expose-gc\n');
  process.exit(2);
}

function heapMB(): number {
  gc!();
  gc!();
  return process.memoryUsage().heapUsed / 1e6;
}

const fallback: BackendSpec = Object.freeze({ name: 'caddy', addrs: Object.freeze(['127.0.0.1:8443']), proxyProtocol: null });

/**
 * N routes as a large TURN fleet would have them: 90% exact names (a tenth of them `alpn: none`),
 * 5% `*.` and 5% `**.` wildcards; every route its own backend object, as a source parses them.
 * `generation` moves 1% of the backends to another port, so successive snapshots differ.
 */
function makeRoutes(n: number, generation: number): RouteSpec[] {
  const routes: RouteSpec[] = new Array(n);
  for (let i = 0; i < n; i++) {
    const kind = i % 20;
    const match = kind === 0 ? `*.w${i}.example.net` : kind === 1 ? `**.d${i}.example.org` : `h${i}.example.com`;
    const port = 5349 + (i % 100 === generation % 100 ? generation : 0);
    const backend: BackendSpec = Object.freeze({
      name: `turn-${i % 1000}`,
      addrs: Object.freeze([`10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}:${port}`]),
      proxyProtocol: null,
    });
    routes[i] = Object.freeze({ match, alpn: kind === 2 ? { kind: 'none' as const } : null, backend, source: 'bench', namespace: null });
  }
  return routes;
}

/** Names to look up, by kind, picked at random across the table. */
function queries(n: number, kind: 'exact' | 'wildcard' | 'any' | 'miss', count = 1 << 16): string[] {
  const out: string[] = new Array(count);
  for (let k = 0; k < count; k++) {
    let i = Math.floor(Math.random() * n);
    switch (kind) {
      case 'exact':
        while (i % 20 < 3) i = Math.floor(Math.random() * n);
        out[k] = `h${i}.example.com`;
        break;
      case 'wildcard':
        i -= i % 20;
        out[k] = `turn.w${i}.example.net`;
        break;
      case 'any':
        i -= i % 20 - 1;
        if (i >= n) i -= 20;
        out[k] = `a.b.d${i}.example.org`;
        break;
      case 'miss':
        out[k] = `nope${i}.example.com`;
        break;
    }
  }
  return out;
}

const OFFERED = ['h2', 'http/1.1'];

/** Nanoseconds per lookup over `total` lookups cycling through names. */
function timeLookups(table: RouteTable, names: readonly string[], total: number): number {
  let hits = 0;
  const mask = names.length - 1;
  for (let i = 0; i < 200_000; i++) if (table.lookup(names[i & mask], OFFERED) !== null) hits++;
  const t0 = performance.now();
  for (let i = 0; i < total; i++) if (table.lookup(names[i & mask], OFFERED) !== null) hits++;
  const dt = performance.now() - t0;
  if (hits < 0) process.stdout.write(''); // keeps the loop observable
  return (dt * 1e6) / total;
}

function median(v: number[]): number {
  const s = [...v].sort((a, b) => a - b);
  return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

const h0 = heapMB();
const routes = makeRoutes(N, 0);
const h1 = heapMB();
const table = new RouteTable(routes, fallback);
const h2 = heapMB();
if (table.routes.length !== N) throw new Error(`expected ${N} routes in the table, got ${table.routes.length}`);

const LOOKUPS = 2_000_000;
const kinds = ['exact', 'wildcard', 'any', 'miss'] as const;
const lookupNs: Record<string, number> = {};
const mixed: string[] = [];
for (const kind of kinds) {
  const names = queries(N, kind);
  for (let i = 0; i < names.length; i += 4) mixed.push(names[i]);
  // sanity: hits are hits and misses are misses
  const r = table.lookup(names[0], OFFERED);
  if ((kind === 'miss') !== (r === null)) throw new Error(`lookup of ${names[0]} (${kind}) returned ${r?.match ?? 'null'}`);
  lookupNs[kind] = timeLookups(table, names, LOOKUPS);
}
lookupNs.mixed = timeLookups(table, mixed, LOOKUPS);

const router = new Router(table);
const buildSwap: number[] = [];
for (let g = 1; g <= 5; g++) {
  const next = makeRoutes(N, g);
  const t0 = performance.now();
  router.replace(new RouteTable(next, fallback));
  buildSwap.push(performance.now() - t0);
}

const composer = new Composer({ router, metrics: new Metrics({ defaultMetrics: false }), logger: createLogger('silent') });
const composerApply: number[] = [];
for (let g = 6; g <= 10; g++) {
  const next = makeRoutes(N, g);
  const before = router.generation;
  const t0 = performance.now();
  composer.setConfig(next, fallback);
  composerApply.push(performance.now() - t0);
  if (router.generation === before) throw new Error('the composer did not replace the table');
}
await composer.stop();

const result = {
  routes: N,
  heap_mb: { routes: h1 - h0, table: h2 - h1, total: h2 - h0 },
  lookup_ns: lookupNs,
  build_swap_ms: { median: median(buildSwap), min: Math.min(...buildSwap), max: Math.max(...buildSwap) },
  composer_apply_ms: { median: median(composerApply), min: Math.min(...composerApply), max: Math.max(...composerApply) },
};
if (json) {
  process.stdout.write(`${JSON.stringify(result)}\n`);
} else {
  const f = (x: number) => x.toFixed(1);
  process.stdout.write(`${N.toLocaleString('en-US')} routes\n` +
    `  lookup ns: exact ${f(lookupNs.exact)}, *. ${f(lookupNs.wildcard)}, **. ${f(lookupNs.any)}, miss ${f(lookupNs.miss)}, mixed ${f(lookupNs.mixed)}\n` +
    `  build + swap: ${f(result.build_swap_ms.median)} ms (${f(result.build_swap_ms.min)}–${f(result.build_swap_ms.max)})\n` +
    `  composer apply (merge, diff, swap): ${f(result.composer_apply_ms.median)} ms (${f(result.composer_apply_ms.min)}–${f(result.composer_apply_ms.max)})\n` +
    `  heap: routes ${f(result.heap_mb.routes)} MB, table ${f(result.heap_mb.table)} MB, total ${f(result.heap_mb.total)} MB\n`);
}
