// /metrics with workers: one exposition for the whole router, made from the primary's registry
// and each worker's (as registry.getMetricsAsJSON()) with prom-client's AggregatorRegistry.
//
// How each kind of series combines:
// - the data plane's counters, histograms and gauges (connections_total, bytes_total,
//   active_connections, ...): summed over the workers (the primary has none of its own);
// - the series the primary owns (route table, sources, cert watch, worker restarts, build_info):
//   the primary's alone: workers leave them out of what they send (PRIMARY_METRICS);
// - process_* and nodejs_*: prom-client's rules: CPU, memory, descriptors and heap summed (the
//   whole router's use), event-loop lag averaged (min/max for those), version the first; and the
//   primary's value alone for process_start_time_seconds (prom-client would drop it) and
//   process_max_fds (the limit per process, not a sum).
// - a worker that exited: the counters and histograms it last reported stay in the sums
//   ("retired"), so a restart does not make a counter go backwards; what it counted after the
//   last scrape is lost with it.
import { AggregatorRegistry, type Registry } from 'prom-client';

export interface MetricJson {
  readonly name: string;
  readonly help: string;
  readonly type: string;
  readonly aggregator?: string;
  readonly values: ReadonlyArray<{ readonly value: number; readonly labels: Readonly<Record<string, string | number>>; readonly metricName?: string }>;
}

const PREFIX = 'sni_router_';

/** Series the primary owns: workers do not report them. */
export const PRIMARY_METRICS: readonly string[] = [
  'route_table_generation', 'routes', 'route_conflicts_total',
  'source_updates_total', 'source_invalid_entries_total', 'source_last_success_timestamp_seconds', 'source_up',
  'cert_not_after_timestamp_seconds', 'cert_reloads_total', 'cert_invalid_total',
  'worker_restarts_total', 'worker_connections_lost_total', 'build_info',
].map((n) => `${PREFIX}${n}`);

/** Process-wide facts where the primary's value stands for the whole router. */
const PRIMARY_VALUE = new Set(['process_start_time_seconds', 'process_max_fds']);

export function aggregateMetrics(
  primary: readonly MetricJson[], workers: ReadonlyArray<readonly MetricJson[]>, retired: readonly MetricJson[],
): Registry {
  // The primary's list comes first, so its `aggregator` is the one AggregatorRegistry applies.
  const own = primary.map((m) => (PRIMARY_VALUE.has(m.name) ? { ...m, aggregator: 'first' } : m));
  const fromWorkers = workers.map((list) => list.filter((m) => !PRIMARY_VALUE.has(m.name)));
  return AggregatorRegistry.aggregate([own, ...fromWorkers, retired]);
}

/** Adds what a worker that exited last reported to the retired sums: counters and histograms only. */
export async function retire(retired: readonly MetricJson[], last: readonly MetricJson[]): Promise<MetricJson[]> {
  const kept = last.filter((m) => m.type === 'counter' || m.type === 'histogram');
  if (kept.length === 0) return [...retired];
  const combined = AggregatorRegistry.aggregate([retired, kept]);
  return (await combined.getMetricsAsJSON()) as unknown as MetricJson[];
}
