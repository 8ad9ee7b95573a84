// Prometheus series the data path updates on every connection, updated at the cost of an add.
//
// prom-client hashes the label set on every update, even through a `labels(...)` child (the
// child binds the labels and hashes them again on each call), and a histogram observation
// allocates and turns its bucket bound into a string key: together several µs per connection
// in the router's profile. These metrics are prom-client's own classes, registered, exposed and
// aggregated (workers) exactly as before; each label set is a cell, resolved once, and the data
// path adds to the cell. Counters and gauges pass their cells to prom-client through its public
// API when collected (at scrape time); a histogram reports its cells itself, in prom-client's
// format.
import {
  Counter, type CounterConfiguration, Gauge, type GaugeConfiguration, Histogram, type HistogramConfiguration, type LabelValues,
  type MetricObjectWithValues, type MetricValueWithName,
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

/**
 * A prom-client Histogram whose series all live in cells (observe() through prom-client's own
 * API is not used for it). Without labels its one series exists from the start, as prom-client's.
 */
export class CellHistogram<T extends string> extends Histogram<T> {
  readonly #cells: CellMap<HistogramCell>;
  readonly #bounds: Float64Array;
  readonly #config: HistogramConfiguration<T>;

  constructor(config: HistogramConfiguration<T> & { buckets: number[] }) {
    super(config);
    this.#config = config;
    const bounds = Float64Array.from([...config.buckets].sort((a, b) => a - b));
    this.#bounds = bounds;
    this.#cells = new CellMap(config.labelNames, (labels) => new HistogramCell(labels, bounds));
    if (this.#unlabeled) this.cell();
  }

  get #unlabeled(): boolean {
    return (this.#config.labelNames ?? []).length === 0;
  }

  cell(...values: string[]): HistogramCell {
    return this.#cells.get(values);
  }

  override reset(): void {
    super.reset();
    // prom-client's constructor resets too, before this class's fields exist.
    if (!(#cells in this)) return;
    this.#cells.clear();
    if (this.#unlabeled) this.cell();
  }

  /** prom-client's Histogram.get() reads this (and merges sharedLabels into labels). */
  async getForPromString(): Promise<MetricObjectWithValues<MetricValueWithName<T>>> {
    const name = this.#config.name;
    const values: Array<MetricValueWithName<T> & { sharedLabels: LabelValues<string>; exemplar: null | undefined }> = [];
    const bounds = this.#bounds;
    for (const c of this.#cells.values()) {
      let acc = 0;
      for (let i = 0; i < bounds.length; i++) {
        acc += c.counts[i];
        values.push({ labels: { le: bounds[i] } as LabelValues<T>, sharedLabels: c.labels, value: acc, metricName: `${name}_bucket`, exemplar: null });
      }
      values.push({ labels: { le: '+Inf' } as LabelValues<T>, sharedLabels: c.labels, value: c.count, metricName: `${name}_bucket`, exemplar: null });
      values.push({ labels: {}, sharedLabels: c.labels, value: c.sum, metricName: `${name}_sum`, exemplar: undefined });
      values.push({ labels: {}, sharedLabels: c.labels, value: c.count, metricName: `${name}_count`, exemplar: undefined });
    }
    // prom-client's typings call `type` an enum; at run time it is the exposition's word.
    const metric = { name, help: this.#config.help, type: 'histogram', values, aggregator: this.#config.aggregator ?? 'sum' };
    return metric as unknown as MetricObjectWithValues<MetricValueWithName<T>>;
  }
}
