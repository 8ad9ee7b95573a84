// The metric set (prefix sni_router_). Every series of the contract is created here, once, so the
// names and labels live in one place. Label values are bounded: `route` is a configured pattern or
// "fallback", `backend` a configured name, `reason`/`result`/`scope` come from fixed lists; a
// client's SNI never becomes a label.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

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
  | 'shutdown'; // still open when shutdown_grace ran out

export class Metrics {
  readonly registry: Registry;
  readonly connections: Counter<'route' | 'result'>;
  readonly activeConnections: Gauge<'backend'>;
  readonly bytes: Counter<'backend' | 'direction'>;
  readonly clientHelloDuration: Histogram;
  readonly clientHelloBytes: Histogram;
  readonly clientHelloFailures: Counter<'reason'>;
  readonly backendDialDuration: Histogram<'backend'>;
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
  readonly acceptErrors: Counter<'code'>;
  readonly workerRestarts: Counter;
  readonly workerConnectionsLost: Counter;
  readonly #collectHooks: Array<() => void> = [];

  constructor(opts: { defaultMetrics?: boolean } = {}) {
    const registry = new Registry();
    this.registry = registry;
    const r = [registry];
    this.connections = new Counter({
      name: `${PREFIX}connections_total`,
      help: 'Connections handled, by route (configured pattern or "fallback") and how they ended.',
      labelNames: ['route', 'result'],
      registers: r,
    });
    this.activeConnections = new Gauge({
      name: `${PREFIX}active_connections`,
      help: 'Connections relaying to a backend now.',
      labelNames: ['backend'],
      registers: r,
    });
    this.bytes = new Counter({
      name: `${PREFIX}bytes_total`,
      help: 'Bytes relayed; direction "upstream" is client to backend, "downstream" backend to client.',
      labelNames: ['backend', 'direction'],
      registers: r,
      // Long-lived relays (TURN sessions last hours) are counted at scrape time, not only at close.
      collect: () => {
        for (const fn of this.#collectHooks) fn();
      },
    });
    this.clientHelloDuration = new Histogram({
      name: `${PREFIX}client_hello_duration_seconds`,
      help: 'Time from accept to a complete ClientHello (or a failure to read one).',
      buckets: LATENCY_BUCKETS,
      registers: r,
    });
    this.clientHelloBytes = new Histogram({
      name: `${PREFIX}client_hello_bytes`,
      help: 'Size of the ClientHello handshake message.',
      buckets: HELLO_SIZE_BUCKETS,
      registers: r,
    });
    this.clientHelloFailures = new Counter({
      name: `${PREFIX}client_hello_failures_total`,
      help: 'Connections whose first bytes did not yield a ClientHello, by reason.',
      labelNames: ['reason'],
      registers: r,
    });
    this.backendDialDuration = new Histogram({
      name: `${PREFIX}backend_dial_duration_seconds`,
      help: 'Time to connect to a backend, successful dials only.',
      labelNames: ['backend'],
      buckets: LATENCY_BUCKETS,
      registers: r,
    });
    this.backendDialFailures = new Counter({
      name: `${PREFIX}backend_dial_failures_total`,
      help: 'Failed attempts to connect to a backend address (each address tried counts once).',
      labelNames: ['backend'],
      registers: r,
    });
    this.connectionLimitRejections = new Counter({
      name: `${PREFIX}connection_limit_rejections_total`,
      help: 'Connections closed at once because a limit was reached: scope "global" or "per_ip".',
      labelNames: ['scope'],
      registers: r,
    });
    this.routeTableGeneration = new Gauge({
      name: `${PREFIX}route_table_generation`,
      help: 'Generation of the live route table; it grows by one on every replace.',
      registers: r,
    });
    this.routes = new Gauge({
      name: `${PREFIX}routes`,
      help: 'Routes in the live table, by the source they came from.',
      labelNames: ['source'],
      registers: r,
    });
    this.routeConflicts = new Counter({
      name: `${PREFIX}route_conflicts_total`,
      help: 'Routes left out because an earlier source had the same match and alpn, by the losing source.',
      labelNames: ['source'],
      registers: r,
    });
    this.sourceUpdates = new Counter({
      name: `${PREFIX}source_updates_total`,
      help: 'Snapshots read by each source: result "ok" or "error".',
      labelNames: ['source', 'result'],
      registers: r,
    });
    this.sourceInvalidEntries = new Counter({
      name: `${PREFIX}source_invalid_entries_total`,
      help: 'Malformed route entries skipped (their siblings still apply).',
      labelNames: ['source'],
      registers: r,
    });
    this.sourceLastSuccess = new Gauge({
      name: `${PREFIX}source_last_success_timestamp_seconds`,
      help: 'Unix time of the last snapshot a source read successfully.',
      labelNames: ['source'],
      registers: r,
    });
    this.sourceUp = new Gauge({
      name: `${PREFIX}source_up`,
      help: '1 while a source is healthy, 0 while it is failing (its last good snapshot stays live).',
      labelNames: ['source'],
      registers: r,
    });
    this.certNotAfter = new Gauge({
      name: `${PREFIX}cert_not_after_timestamp_seconds`,
      help: 'notAfter of the certificate the cert watcher last deployed (or found), Unix time.',
      labelNames: ['cert'],
      registers: r,
    });
    this.certReloads = new Counter({
      name: `${PREFIX}cert_reloads_total`,
      help: 'Certificate deployments: result "ok", "error" (copy or action failed) or "invalid" (pair rejected).',
      labelNames: ['cert', 'result'],
      registers: r,
    });
    this.certInvalid = new Counter({
      name: `${PREFIX}cert_invalid_total`,
      help: 'Certificate pairs seen but not used, by reason.',
      labelNames: ['cert', 'reason'],
      registers: r,
    });
    this.acceptErrors = new Counter({
      name: `${PREFIX}accept_errors_total`,
      help: 'Errors accepting connections (EMFILE: out of file descriptors), by code.',
      labelNames: ['code'],
      registers: r,
    });
    this.workerRestarts = new Counter({
      name: `${PREFIX}worker_restarts_total`,
      help: 'Data-plane worker processes started again after one exited unexpectedly (workers > 1).',
      registers: r,
    });
    this.workerConnectionsLost = new Counter({
      name: `${PREFIX}worker_connections_lost_total`,
      help: 'Connections open in a worker when it exited unexpectedly, as of its last heartbeat (workers > 1).',
      registers: r,
    });
    for (const reason of ['not_tls', 'malformed', 'too_large', 'timeout', 'closed']) {
      this.clientHelloFailures.inc({ reason }, 0);
    }
    for (const scope of ['global', 'per_ip']) this.connectionLimitRejections.inc({ scope }, 0);
    if (opts.defaultMetrics !== false) collectDefaultMetrics({ register: registry });
  }

  // The data path updates series through children resolved once per label value: a label lookup
  // hashes its label set on every call, a cached child does not.
  readonly #closed = new Map<string, Map<string, { inc(v?: number): void }>>();
  readonly #active = new Map<string, { inc(v?: number): void; dec(v?: number): void }>();
  readonly #dial = new Map<string, { observe(v: number): void }>();
  readonly #up = new Map<string, { inc(v?: number): void }>();
  readonly #down = new Map<string, { inc(v?: number): void }>();

  connectionClosed(route: string, result: ConnectionResult): void {
    let byResult = this.#closed.get(route);
    if (byResult === undefined) this.#closed.set(route, byResult = new Map());
    let child = byResult.get(result);
    if (child === undefined) byResult.set(result, child = this.connections.labels(route, result));
    child.inc();
  }

  activeChanged(backend: string, delta: 1 | -1): void {
    let child = this.#active.get(backend);
    if (child === undefined) this.#active.set(backend, child = this.activeConnections.labels(backend));
    if (delta > 0) child.inc();
    else child.dec();
  }

  dialTook(backend: string, seconds: number): void {
    let child = this.#dial.get(backend);
    if (child === undefined) this.#dial.set(backend, child = this.backendDialDuration.labels(backend));
    child.observe(seconds);
  }

  bytesRelayed(backend: string, up: number, down: number): void {
    if (up > 0) {
      let child = this.#up.get(backend);
      if (child === undefined) this.#up.set(backend, child = this.bytes.labels(backend, 'upstream'));
      child.inc(up);
    }
    if (down > 0) {
      let child = this.#down.get(backend);
      if (child === undefined) this.#down.set(backend, child = this.bytes.labels(backend, 'downstream'));
      child.inc(down);
    }
  }

  /** Runs fn before bytes_total is collected (at every scrape). */
  onCollect(fn: () => void): void {
    this.#collectHooks.push(fn);
  }
}
