// The metric set (prefix sni_router_). Every series of the contract is created here, once, so the
// names and labels live in one place. Label values are bounded: `route` is a configured pattern or
// "fallback", `backend` a configured name, `reason`/`result`/`scope` come from fixed lists; a
// client's SNI never becomes a label.
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import { buildInfo } from '../version.ts';
import { CellCounter, CellGauge, CellHistogram, type CounterCell, type GaugeCell, type HistogramCell } from './cells.ts';

const PREFIX = 'sni_router_';

/** 25 µs to 10 s: a hello on loopback takes tens of µs, a trickled one seconds. */
const LATENCY_BUCKETS = [
  0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
];
/** Handshake sizes: classic hellos are 200–600 bytes, post-quantum ones 1.6–1.9 KB. */
const HELLO_SIZE_BUCKETS = [128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192, 16384, 65536];

export type ConnectionResult =
  | 'ok' // relayed until both sides closed
  | 'reset' // a side reset the connection (TURN clients commonly close this way)
  | 'error' // another socket error ended the relay
  | 'idle_timeout'
  | 'dial_failed' // no backend address could be reached
  | 'closed' // closed by the router: unroutable: close, or nothing to forward
  | 'shutdown' // still open when shutdown_grace ran out
  | 'loop'; // a connection from the router itself (a route that leads back to it), closed at once

export class Metrics {
  readonly registry: Registry;
  // Updated on every connection: cells (./cells.ts), through the methods at the end.
  readonly connections: CellCounter<'route' | 'result'>;
  readonly activeConnections: CellGauge<'backend'>;
  readonly bytes: CellCounter<'backend' | 'direction'>;
  readonly clientHelloDuration: CellHistogram<string>;
  readonly clientHelloBytes: CellHistogram<string>;
  readonly clientHelloFailures: Counter<'reason'>;
  readonly backendDialDuration: CellHistogram<'backend'>;
  readonly backendDialFailures: Counter<'backend'>;
  readonly connectionLimitRejections: Counter<'scope'>;
  readonly routeTableGeneration: Gauge;
  readonly routes: Gauge<'source'>;
  readonly routeConflicts: Counter<'source'>;
  readonly sourceUpdates: Counter<'source' | 'result'>;
  readonly sourceInvalidEntries: Counter<'source'>;
  readonly sourceLastSuccess: Gauge<'source'>;
  readonly sourceUp: Gauge<'source'>;
  readonly certNotAfter: Gauge<'cert'>;
  readonly certReloads: Counter<'cert' | 'result'>;
  readonly certInvalid: Counter<'cert' | 'reason'>;
  readonly certActions: Gauge<'cert' | 'state'>;
  readonly certwatchSkipped: Counter<'cert' | 'reason'>;
  readonly acceptErrors: Counter<'code'>;
  readonly workerRestarts: Counter;
  readonly workerConnectionsLost: Counter;
  readonly buildInfo: Gauge<'version' | 'node'>;
  readonly #collectHooks: Array<() => void> = [];

  constructor(opts: { defaultMetrics?: boolean } = {}) {
    const registry = new Registry();
    this.registry = registry;
    const r = [registry];
    // Plain series: prom-client's own counters and gauges, named with the prefix, in this registry.
    const counter = <L extends string>(name: string, help: string, labelNames: readonly L[] = []) =>
      new Counter<L>({ name: `${PREFIX}${name}`, help, labelNames, registers: r });
    const gauge = <L extends string>(name: string, help: string, labelNames: readonly L[] = []) =>
      new Gauge<L>({ name: `${PREFIX}${name}`, help, labelNames, registers: r });
    this.connections = new CellCounter({
      name: `${PREFIX}connections_total`,
      help: 'Connections handled, by route (configured pattern or "fallback") and how they ended.',
      labelNames: ['route', 'result'],
      registers: r,
    });
    this.activeConnections = new CellGauge({
      name: `${PREFIX}active_connections`,
      help: 'Connections relaying to a backend now.',
      labelNames: ['backend'],
      registers: r,
    });
    this.bytes = new CellCounter({
      name: `${PREFIX}bytes_total`,
      help: 'Bytes relayed; direction "upstream" is client to backend, "downstream" backend to client.',
      labelNames: ['backend', 'direction'],
      registers: r,
      // Long-lived relays (TURN sessions last hours) are counted at scrape time, not only at close.
      collect: () => {
        for (const fn of this.#collectHooks) fn();
      },
    });
    this.clientHelloDuration = new CellHistogram({
      name: `${PREFIX}client_hello_duration_seconds`,
      help: 'Time from accept to a complete ClientHello (or a failure to read one).',
      buckets: LATENCY_BUCKETS,
      registers: r,
    });
    this.clientHelloBytes = new CellHistogram({
      name: `${PREFIX}client_hello_bytes`,
      help: 'Size of the ClientHello handshake message.',
      buckets: HELLO_SIZE_BUCKETS,
      registers: r,
    });
    this.clientHelloFailures = counter('client_hello_failures_total', 'Connections whose first bytes did not yield a ClientHello, by reason.', ['reason']);
    this.backendDialDuration = new CellHistogram({
      name: `${PREFIX}backend_dial_duration_seconds`,
      help: 'Time to connect to a backend, successful dials only.',
      labelNames: ['backend'],
      buckets: LATENCY_BUCKETS,
      registers: r,
    });
    this.backendDialFailures = counter('backend_dial_failures_total', 'Failed attempts to connect to a backend address (each address tried counts once).', ['backend']);
    this.connectionLimitRejections = counter('connection_limit_rejections_total', 'Connections closed at once because a limit was reached: scope "global" or "per_ip".', ['scope']);
    this.routeTableGeneration = gauge('route_table_generation', 'Generation of the live route table; it grows by one on every replace.');
    this.routes = gauge('routes', 'Routes in the live table, by the source they came from.', ['source']);
    this.routeConflicts = counter('route_conflicts_total', 'Routes left out because an earlier source had the same match and alpn, by the losing source.', ['source']);
    this.sourceUpdates = counter('source_updates_total', 'Snapshots read by each source: result "ok" or "error".', ['source', 'result']);
    this.sourceInvalidEntries = counter('source_invalid_entries_total', 'Malformed route entries skipped (their siblings still apply).', ['source']);
    this.sourceLastSuccess = gauge('source_last_success_timestamp_seconds', 'Unix time of the last snapshot a source read successfully.', ['source']);
    this.sourceUp = gauge('source_up', '1 while a source is healthy, 0 while it is failing (its last good snapshot stays live).', ['source']);
    this.certNotAfter = gauge('cert_not_after_timestamp_seconds', 'notAfter of the certificate the cert watcher last deployed (or found), Unix time.', ['cert']);
    this.certReloads = counter('cert_reloads_total', 'Certificate deployments: result "ok", "error" (copy or action failed) or "invalid" (pair rejected).', ['cert', 'result']);
    this.certInvalid = counter('cert_invalid_total', 'Certificate pairs seen but not used, by reason.', ['cert', 'reason']);
    this.certActions = gauge('cert_actions', 'on_change actions waiting, by state: "pending" (queued or running), "deferred" (to restart_window), "failed" (out of retries).', ['cert', 'state']);
    this.certwatchSkipped = counter('certwatch_skipped_total', 'Namespaces a for_each certwatch entry (cert: its name as written) made no entry for, by reason.', ['cert', 'reason']);
    this.acceptErrors = counter('accept_errors_total', 'Errors accepting connections (EMFILE: out of file descriptors), by code.', ['code']);
    this.workerRestarts = counter('worker_restarts_total', 'Data-plane worker processes started again after one exited unexpectedly (workers > 1).');
    this.workerConnectionsLost = counter('worker_connections_lost_total', 'Connections open in a worker when it exited unexpectedly, as of its last heartbeat (workers > 1).');
    this.buildInfo = gauge('build_info', 'Always 1; its labels say which version of sni-router runs, on which Node.js.', ['version', 'node']);
    this.buildInfo.set({ ...buildInfo() }, 1);
    for (const reason of ['not_tls', 'malformed', 'too_large', 'timeout', 'closed']) {
      this.clientHelloFailures.inc({ reason }, 0);
    }
    for (const scope of ['global', 'per_ip']) this.connectionLimitRejections.inc({ scope }, 0);
    if (opts.defaultMetrics !== false) collectDefaultMetrics({ register: registry });
  }

  // The data path updates series through cells resolved once per label value (./cells.ts).
  readonly #closed = new Map<string, Map<string, CounterCell>>();
  readonly #active = new Map<string, GaugeCell>();
  readonly #dial = new Map<string, HistogramCell>();
  readonly #up = new Map<string, CounterCell>();
  readonly #down = new Map<string, CounterCell>();
  #helloDuration: HistogramCell | null = null;
  #helloBytes: HistogramCell | null = null;

  connectionClosed(route: string, result: ConnectionResult): void {
    let byResult = this.#closed.get(route);
    if (byResult === undefined) this.#closed.set(route, byResult = new Map());
    let cell = byResult.get(result);
    if (cell === undefined) byResult.set(result, cell = this.connections.cell(route, result));
    cell.inc();
  }

  activeChanged(backend: string, delta: 1 | -1): void {
    let cell = this.#active.get(backend);
    if (cell === undefined) this.#active.set(backend, cell = this.activeConnections.cell(backend));
    if (delta > 0) cell.inc();
    else cell.dec();
  }

  dialTook(backend: string, seconds: number): void {
    let cell = this.#dial.get(backend);
    if (cell === undefined) this.#dial.set(backend, cell = this.backendDialDuration.cell(backend));
    cell.observe(seconds);
  }

  helloTook(seconds: number): void {
    (this.#helloDuration ??= this.clientHelloDuration.cell()).observe(seconds);
  }

  helloSize(bytes: number): void {
    (this.#helloBytes ??= this.clientHelloBytes.cell()).observe(bytes);
  }

  bytesRelayed(backend: string, up: number, down: number): void {
    if (up > 0) {
      let cell = this.#up.get(backend);
      if (cell === undefined) this.#up.set(backend, cell = this.bytes.cell(backend, 'upstream'));
      cell.inc(up);
    }
    if (down > 0) {
      let cell = this.#down.get(backend);
      if (cell === undefined) this.#down.set(backend, cell = this.bytes.cell(backend, 'downstream'));
      cell.inc(down);
    }
  }

  /** Runs fn before bytes_total is collected (at every scrape). */
  onCollect(fn: () => void): void {
    this.#collectHooks.push(fn);
  }
}
