// Prometheus series the data path updates on every connection, updated at the cost of an add.
//
// prom-client hashes the label set on every update, even through a `labels(...)` child (the
// child binds the labels and hashes them again on each call), and a histogram observation
// allocates and turns its bucket bound into a string key: together several µs per connection
// in the router's profile. These metrics are registered, exposed and aggregated (workers) as
// prom-client's own; each label set is a cell, resolved once, and the data path adds to the cell.
// Counters and gauges are prom-client's classes and pass their cells to them through their public
// API when collected (at scrape time); a histogram is a metric of its own that reports its cells
// through get(), in prom-client's format.
import {
  type Aggregator, Counter, type CounterConfiguration, Gauge, type GaugeConfiguration, type LabelValues, type Metric,
  type MetricObjectWithValues, type MetricValueWithName, type Registry,
} from 'prom-client';

/** One metric's cells by label values: each made once, with its labels, on first use. */
class CellMap<C> {
  readonly #cells = new Map<string, C>();
  readonly #names: readonly string[];
  readonly #make: (labels: LabelValues<string>) => C;

  constructor(names: readonly string[] | undefined, make: (labels: LabelValues<string>) => C) {
    this.#names = names ?? [];
    this.#make = make;
  }

  get(values: readonly string[]): C {
    const key = values.join('\u0000');
    let c = this.#cells.get(key);
    if (c === undefined) {
      const names = this.#names;
      if (values.length !== names.length) throw new Error(`expected ${names.length} label values (${names.join(', ')}), got ${values.length}`);
      const labels: Record<string, string> = {};
      for (let i = 0; i < names.length; i++) labels[names[i]] = values[i];
      this.#cells.set(key, c = this.#make(labels));
    }
    return c;
  }

  values(): MapIterator<C> {
    return this.#cells.values();
  }

  clear(): void {
    this.#cells.clear();
  }
}

export class CounterCell {
  value = 0;
  folded = 0;
  readonly labels: LabelValues<string>;
  constructor(labels: LabelValues<string>) {
    this.labels = labels;
  }
  inc(by = 1): void {
    this.value += by;
  }
}

/** A prom-client Counter whose hot series are cells (see cell()). */
export class CellCounter<T extends string> extends Counter<T> {
  readonly #cells: CellMap<CounterCell>;

  constructor(config: CounterConfiguration<T>) {
    const own = config.collect;
    super({
      ...config,
      collect() {
        // The caller's collect first: it may add to cells (bytes relayed so far).
        const v = own?.call(this);
        const fold = () => (this as CellCounter<T>).#fold();
        return v instanceof Promise ? v.then(fold) : fold();
      },
    });
    this.#cells = new CellMap(config.labelNames, (labels) => new CounterCell(labels));
  }

  /** The cell for these label values (in labelNames order); resolve it once, then add to it. */
  cell(...values: string[]): CounterCell {
    return this.#cells.get(values);
  }

  #fold(): void {
    for (const c of this.#cells.values()) {
      const delta = c.value - c.folded;
      if (delta > 0) this.inc(c.labels as LabelValues<T>, delta);
      c.folded = c.value;
    }
  }
}

export class GaugeCell {
  value = 0;
  readonly labels: LabelValues<string>;
  constructor(labels: LabelValues<string>) {
    this.labels = labels;
  }
  inc(): void {
    this.value++;
  }
  dec(): void {
    this.value--;
  }
}

/** A prom-client Gauge whose hot series are cells. */
export class CellGauge<T extends string> extends Gauge<T> {
  readonly #cells: CellMap<GaugeCell>;

  constructor(config: GaugeConfiguration<T>) {
    super({
      ...config,
      collect() {
        for (const c of (this as CellGauge<T>).#cells.values()) this.set(c.labels as LabelValues<T>, c.value);
      },
    });
    this.#cells = new CellMap(config.labelNames, (labels) => new GaugeCell(labels));
  }

  cell(...values: string[]): GaugeCell {
    return this.#cells.get(values);
  }
}

export class HistogramCell {
  /** Observations per bucket (not cumulative); the last slot is above every bound (+Inf). */
  readonly counts: Float64Array;
  sum = 0;
  count = 0;
  readonly labels: LabelValues<string>;
  readonly bounds: Float64Array;
  constructor(labels: LabelValues<string>, bounds: Float64Array) {
    this.labels = labels;
    this.bounds = bounds;
    this.counts = new Float64Array(bounds.length + 1);
  }
  observe(value: number): void {
    const bounds = this.bounds;
    let i = 0;
    while (i < bounds.length && value > bounds[i]) i++;
    this.counts[i]++;
    this.sum += value;
    this.count++;
  }
}

/** prom-client's histogram configuration, less what cells do not do (collect, exemplars). */
export interface CellHistogramConfiguration<T extends string> {
  readonly name: string;
  readonly help: string;
  readonly labelNames?: readonly T[];
  readonly buckets: readonly number[];
  readonly registers: readonly Registry[];
  readonly aggregator?: Aggregator;
}

/**
 * One sample as prom-client's own histogram reports it in get(), its keys in the same order (the
 * JSON a worker sends is byte for byte the same); no exemplars: null on buckets, as there.
 */
interface Sample {
  value: number;
  metricName: string;
  exemplar?: null;
  labels: LabelValues<string>;
}

/**
 * A histogram whose series all live in cells. Not a prom-client Histogram (whose exposition could
 * only be replaced through a private method): a metric of its own that a Registry takes through the
 * contract each of prom-client's metric classes keeps in public: name, help, type and aggregator,
 * get() for the samples, reset(). AggregatorRegistry.aggregate registers plain objects of that
 * shape too. get() returns, sample for sample, what prom-client's Histogram returns for the same
 * observations, so the exposition and the JSON the workers send are unchanged; test/cells.test.ts
 * compares them with prom-client's own. Without labels its one series exists from the start, as
 * prom-client's does.
 */
export class CellHistogram<T extends string> {
  readonly name: string;
  readonly help: string;
  readonly type = 'histogram';
  readonly aggregator: Aggregator;
  readonly labelNames: readonly T[];
  readonly #cells: CellMap<HistogramCell>;
  readonly #bounds: Float64Array;

  constructor(config: CellHistogramConfiguration<T>) {
    this.name = config.name;
    this.help = config.help;
    this.aggregator = config.aggregator ?? 'sum';
    this.labelNames = config.labelNames ?? [];
    if (!/^[a-zA-Z_:][a-zA-Z0-9_:]*$/.test(config.name)) throw new Error(`invalid metric name ${JSON.stringify(config.name)}`);
    if (this.labelNames.includes('le' as T)) throw new Error(`${config.name}: le is a reserved label name`);
    const bounds = Float64Array.from([...config.buckets].sort((a, b) => a - b));
    this.#bounds = bounds;
    this.#cells = new CellMap(this.labelNames, (labels) => new HistogramCell(labels, bounds));
    this.reset();
    // prom-client's typings name only its own classes; at run time a registry asks a metric for
    // no more than the contract above.
    for (const r of config.registers) r.registerMetric(this as unknown as Metric<T>);
  }

  cell(...values: string[]): HistogramCell {
    return this.#cells.get(values);
  }

  /** Every series gone (cells handed out before are no longer read); without labels, its one series at zero. */
  reset(): void {
    this.#cells.clear();
    if (this.labelNames.length === 0) this.cell();
  }

  /** The samples, cumulative by bucket, in prom-client's order: buckets, +Inf, sum, count per series. */
  async get(): Promise<MetricObjectWithValues<MetricValueWithName<T>>> {
    const name = this.name;
    const bucket = `${name}_bucket`;
    const values: Sample[] = [];
    const bounds = this.#bounds;
    for (const c of this.#cells.values()) {
      let acc = 0;
      for (let i = 0; i < bounds.length; i++) {
        acc += c.counts[i];
        values.push({ value: acc, metricName: bucket, exemplar: null, labels: { le: bounds[i], ...c.labels } });
      }
      values.push({ value: c.count, metricName: bucket, exemplar: null, labels: { le: '+Inf', ...c.labels } });
      values.push({ value: c.sum, metricName: `${name}_sum`, labels: { ...c.labels } });
      values.push({ value: c.count, metricName: `${name}_count`, labels: { ...c.labels } });
    }
    // prom-client's typings call `type` an enum; at run time it is the exposition's word.
    const metric = { name, help: this.help, type: this.type, values, aggregator: this.aggregator };
    return metric as unknown as MetricObjectWithValues<MetricValueWithName<T>>;
  }
}
