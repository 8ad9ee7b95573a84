// The cell metrics (src/metrics/cells.ts) as prom-client's registry reads them. The histogram is
// not a prom-client class: these tests pin that a Registry still exposes its samples, that what it
// exposes is line for line what prom-client's own Histogram exposes for the same observations, and
// that the workers' aggregation (AggregatorRegistry over getMetricsAsJSON) sums it the same way.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { AggregatorRegistry, Histogram, Registry } from 'prom-client';
import { CellCounter, CellGauge, CellHistogram } from '../src/metrics/cells.ts';

const BUCKETS = [0.001, 0.01, 0.1, 1, 10];

/** Deterministic values across every bucket, the bounds themselves and beyond the last (mulberry32). */
function observations(n: number, seed: number): number[] {
  let a = seed >>> 0;
  const random = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const r = random();
    out.push(r < 0.2 ? BUCKETS[Math.floor(random() * BUCKETS.length)] : random() * 10 ** Math.floor(random() * 6 - 4));
  }
  return out;
}

/** The same observations into a CellHistogram and into prom-client's Histogram, each in its own registry. */
function both(series: ReadonlyArray<readonly [backend: string, values: readonly number[]]>, labelled = true) {
  const cellsRegistry = new Registry();
  const stockRegistry = new Registry();
  const config = { name: 'x_dial_seconds', help: 'Dial time.', buckets: BUCKETS, ...(labelled ? { labelNames: ['backend'] as const } : {}) };
  const cells = new CellHistogram({ ...config, registers: [cellsRegistry] });
  const stock = new Histogram({ ...config, labelNames: labelled ? ['backend'] : [], registers: [stockRegistry] });
  for (const [backend, values] of series) {
    const cell = labelled ? cells.cell(backend) : cells.cell();
    // A cell resolved is a series, at zero until observed: prom-client's zero(labels).
    if (labelled) stock.zero({ backend });
    for (const v of values) {
      cell.observe(v);
      if (labelled) stock.observe({ backend }, v);
      else stock.observe(v);
    }
  }
  return { cells, stock, cellsRegistry, stockRegistry };
}

test('a registry exposes a cell histogram\'s observations as cumulative bucket lines, sum and count', async () => {
  const registry = new Registry();
  const h = new CellHistogram({ name: 'x_hello_bytes', help: 'Hello size.', buckets: [512, 1024, 2048], registers: [registry] });
  const dial = new CellHistogram({
    name: 'x_dial_seconds', help: 'Dial time.', labelNames: ['backend'], buckets: [0.01, 0.1], registers: [registry],
  });
  for (const v of [300, 512, 1923, 1923, 5000]) h.cell().observe(v);
  dial.cell('turn').observe(0.05);
  dial.cell('turn').observe(0.25);
  assert.equal(await registry.metrics(), [
    '# HELP x_hello_bytes Hello size.',
    '# TYPE x_hello_bytes histogram',
    'x_hello_bytes_bucket{le="512"} 2',
    'x_hello_bytes_bucket{le="1024"} 2',
    'x_hello_bytes_bucket{le="2048"} 4',
    'x_hello_bytes_bucket{le="+Inf"} 5',
    'x_hello_bytes_sum 9658',
    'x_hello_bytes_count 5',
    '',
    '# HELP x_dial_seconds Dial time.',
    '# TYPE x_dial_seconds histogram',
    'x_dial_seconds_bucket{le="0.01",backend="turn"} 0',
    'x_dial_seconds_bucket{le="0.1",backend="turn"} 1',
    'x_dial_seconds_bucket{le="+Inf",backend="turn"} 2',
    'x_dial_seconds_sum{backend="turn"} 0.3',
    'x_dial_seconds_count{backend="turn"} 2',
    '',
  ].join('\n'));
});

test('an unlabelled cell histogram shows its series at zero before any observation, as prom-client\'s does', async () => {
  const { cellsRegistry, stockRegistry } = both([], false);
  const text = await cellsRegistry.metrics();
  assert.match(text, /^x_dial_seconds_bucket\{le="\+Inf"\} 0$/m);
  assert.equal(text, await stockRegistry.metrics());
});

test('exposition and JSON are prom-client\'s own Histogram\'s for the same observations', async () => {
  const { cellsRegistry, stockRegistry } = both([['turn', observations(200, 1)], ['caddy', observations(50, 2)], ['idle', []]]);
  assert.equal(await cellsRegistry.metrics(), await stockRegistry.metrics());
  // What a worker sends to the primary: getMetricsAsJSON() on the wire.
  assert.equal(JSON.stringify(await cellsRegistry.getMetricsAsJSON()), JSON.stringify(await stockRegistry.getMetricsAsJSON()));

  const plain = both([['', observations(100, 3)]], false);
  assert.equal(await plain.cellsRegistry.metrics(), await plain.stockRegistry.metrics());
  assert.equal(JSON.stringify(await plain.cellsRegistry.getMetricsAsJSON()), JSON.stringify(await plain.stockRegistry.getMetricsAsJSON()));
});

test('the workers\' aggregation sums cell histograms as it sums prom-client\'s', async () => {
  const a = both([['turn', observations(30, 4)]]);
  const b = both([['turn', observations(20, 5)], ['caddy', observations(10, 6)]]);
  const cells = AggregatorRegistry.aggregate([await a.cellsRegistry.getMetricsAsJSON(), await b.cellsRegistry.getMetricsAsJSON()]);
  const stock = AggregatorRegistry.aggregate([await a.stockRegistry.getMetricsAsJSON(), await b.stockRegistry.getMetricsAsJSON()]);
  const text = await cells.metrics();
  assert.match(text, /^x_dial_seconds_count\{backend="turn"\} 50$/m);
  assert.match(text, /^x_dial_seconds_count\{backend="caddy"\} 10$/m);
  assert.equal(text, await stock.metrics());
});

test('reset() empties a cell histogram as prom-client\'s reset() does; registry.resetMetrics() reaches it', async () => {
  const labelled = both([['turn', observations(10, 7)]]);
  labelled.cells.reset();
  labelled.stock.reset();
  assert.equal(await labelled.cellsRegistry.metrics(), await labelled.stockRegistry.metrics());
  assert.doesNotMatch(await labelled.cellsRegistry.metrics(), /_bucket/);

  const plain = both([['', observations(10, 8)]], false);
  plain.cellsRegistry.resetMetrics();
  assert.match(await plain.cellsRegistry.metrics(), /^x_dial_seconds_count 0$/m);
  plain.cells.cell().observe(0.5);
  assert.match(await plain.cellsRegistry.metrics(), /^x_dial_seconds_count 1$/m);
});

test('a cell histogram refuses an invalid name, the reserved label le, and label values of the wrong arity', () => {
  assert.throws(() => new CellHistogram({ name: 'x-h', help: 'h', buckets: [1], registers: [] }), /invalid metric name/);
  assert.throws(() => new CellHistogram({ name: 'x_h', help: 'h', labelNames: ['le'], buckets: [1], registers: [] }), /reserved/);
  const h = new CellHistogram({ name: 'x_h', help: 'h', labelNames: ['a', 'b'], buckets: [1], registers: [] });
  assert.throws(() => h.cell('only-one'), /expected 2 label values/);
});

test('cell counters and gauges reach the registry through prom-client\'s Counter and Gauge', async () => {
  const registry = new Registry();
  const c = new CellCounter({ name: 'x_total', help: 'c', labelNames: ['r'], registers: [registry] });
  const g = new CellGauge({ name: 'x_active', help: 'g', labelNames: ['b'], registers: [registry] });
  const ok = c.cell('ok');
  ok.inc();
  ok.inc(4);
  g.cell('turn').inc();
  g.cell('turn').inc();
  g.cell('turn').dec();
  const text = await registry.metrics();
  assert.match(text, /^x_total\{r="ok"\} 5$/m);
  assert.match(text, /^x_active\{b="turn"\} 1$/m);
  ok.inc();
  assert.match(await registry.metrics(), /^x_total\{r="ok"\} 6$/m, 'a second scrape adds only what came since the first');
});
