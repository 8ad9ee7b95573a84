// Wiring: the one place that knows every part. Sources feed the composer, the composer feeds the
// router, the server reads the router; the cert watcher and the admin server sit beside them.
//
// With workers > 1 this process is the primary: it keeps everything but the data plane, which
// runs in worker processes (src/worker.ts) that the WorkerPool starts, feeds with every new table
// and asks for metrics; `server` is then the pool, which answers for all of them.
import type { AddressInfo } from 'node:net';
import { startCertwatch, type CertwatchHandle, type Tuning as CertwatchTuning } from './certwatch/index.ts';
import { WorkerPool } from './cluster/pool.ts';
import type { WorkerStats, WorkerStatus } from './cluster/protocol.ts';
import { loadConfig } from './config/load.ts';
import type { Config } from './config/types.ts';
import { localInterfaceAddresses } from './host.ts';
import { createLogger, type Logger } from './log.ts';
import { isOwnAddress } from './model/self-address.ts';
import { AdminServer } from './metrics/admin.ts';
import { Metrics } from './metrics/metrics.ts';
import { type DataPlane, LocalDataPlane } from './data-plane.ts';
import { RouteTable, Router } from './router/table.ts';
import { alpnKey } from './model/route.ts';
import { Composer } from './sources/composer.ts';
import { createSources } from './sources/index.ts';

export interface AppOptions {
  /** Also receives the workers' log lines (sent over IPC); without it, workers write to stdout. */
  readonly logger?: Logger;
  readonly env?: NodeJS.ProcessEnv;
  /** The cert watcher's timings and clock (tests); the defaults suit production. */
  readonly certwatch?: Partial<CertwatchTuning>;
}

/**
 * Whether a backend address is one the router listens on, by the addresses actually bound (a
 * configured port 0 is known only then). The port is compared first: a source's snapshot of
 * 100,000 routes is filtered through this.
 */
function ownAddressCheck(bound: readonly AddressInfo[]): (addr: string) => boolean {
  const listen = bound.map((a) => ({ host: a.address, port: a.port }));
  const ports = new Set(listen.map((l) => l.port));
  const localIps = localInterfaceAddresses();
  return (addr) => ports.has(Number(addr.slice(addr.lastIndexOf(':') + 1))) && isOwnAddress(addr, listen, localIps);
}

export class App {
  config: Config;
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly router: Router;
  /** Where connections are accepted and relayed: this process, or the worker pool. */
  readonly server: DataPlane;
  readonly composer: Composer;
  readonly #env: NodeJS.ProcessEnv;
  readonly #certwatchTuning: Partial<CertwatchTuning> | undefined;
  #admin: AdminServer | null = null;
  #certwatch: CertwatchHandle | null = null;
  #listening = false;
  /** Reloads run one at a time: the one running, then at most one more that every SIGHUP meanwhile joins. */
  #reloadChain: Promise<unknown> = Promise.resolve();
  #reloadWaiting: Promise<boolean> | null = null;
  #stopping = false;
  listenAddresses: AddressInfo[] = [];
  adminAddress: AddressInfo | null = null;

  private constructor(config: Config, opts: AppOptions) {
    this.config = config;
    this.#env = opts.env ?? process.env;
    this.logger = opts.logger ?? createLogger(config.log.level);
    this.metrics = new Metrics();
    this.router = new Router(new RouteTable(config.routes, config.fallback));
    this.metrics.routeTableGeneration.set(this.router.generation);
    const plane = {
      router: this.router, metrics: this.metrics, logger: this.logger, listen: config.listen, settings: config.server,
      accessLog: config.log.access,
    };
    this.server = config.workers > 1
      ? new WorkerPool({ ...plane, count: config.workers, relayLogs: opts.logger !== undefined })
      : new LocalDataPlane(plane);
    this.composer = new Composer({ router: this.router, metrics: this.metrics, logger: this.logger });
    this.#certwatchTuning = opts.certwatch;
    // A namespace enabled or disabled in a source gets or loses its per-namespace cert watch entries.
    this.composer.onNamespaces((namespaces) => this.#certwatch?.setNamespaces(namespaces));
  }

  static async start(config: Config, opts: AppOptions = {}): Promise<App> {
    const app = new App(config, opts);
    try {
      await app.#start();
    } catch (err) {
      await app.shutdown(0).catch(() => {});
      throw err;
    }
    return app;
  }

  async #start(): Promise<void> {
    const config = this.config;
    await this.composer.setConfig(config.routes, config.fallback);
    if (config.admin.listen !== null) {
      this.#admin = new AdminServer({
        metrics: async () => ({ contentType: this.metrics.registry.contentType, body: await this.metricsText() }),
        notReadyReason: () => this.notReadyReason(),
        routes: () => this.routesView(),
      }, this.logger);
      this.adminAddress = await this.#admin.listen(config.admin.listen);
    }
    await this.composer.setSources(createSources(config.sources, { logger: this.logger }));
    await this.#startCertwatch(config);
    this.listenAddresses = await this.server.start();
    this.composer.setSelfCheck(ownAddressCheck(this.listenAddresses));
    this.#listening = true;
    this.logger.info({
      listen: this.listenAddresses.map((a) => (a.family === 'IPv6' ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`)),
      admin: this.adminAddress === null ? null : `${this.adminAddress.address}:${this.adminAddress.port}`,
      routes: this.router.table.routes.length,
      sources: config.sources.map((s) => s.name),
      workers: config.workers,
      relay: this.server.relay,
    }, 'sni-router started');
  }

  async #startCertwatch(config: Config): Promise<void> {
    this.#certwatch = await startCertwatch(config.certwatch, {
      logger: this.logger, metrics: this.metrics, env: this.#env, tuning: this.#certwatchTuning,
    }, config.certwatchTemplates);
    // The namespaces as they are now: a change published while it started found no handle to tell.
    this.#certwatch.setNamespaces(this.composer.namespaces());
  }

  notReadyReason(): string | null {
    if (this.server.draining) return 'draining';
    if (!this.#listening) return 'not listening yet';
    return this.server.notReadyReason();
  }

  /** Prometheus text: this process's registry, and with workers every worker's, aggregated. */
  async metricsText(): Promise<string> {
    return this.server.metricsText();
  }

  /** Open connections and tracked client addresses, counted now (with workers: asked of each, summed). */
  async connectionCounts(): Promise<{ active: number; trackedClientAddresses: number }> {
    const stats = await this.server.stats();
    return {
      active: stats.reduce((n, s) => n + s.active, 0),
      trackedClientAddresses: stats.reduce((n, s) => n + s.trackedClientAddresses, 0),
    };
  }

  /** Each data-plane process's counts, asked now: one entry per worker (or one for this process). */
  async dataPlaneStats(): Promise<WorkerStats[]> {
    return this.server.stats();
  }

  /** The workers as their heartbeats describe them; empty with workers: 1. */
  workerStatus(): WorkerStatus[] {
    return this.server.status();
  }

  routesView(): unknown {
    const workers = this.server.status();
    const table = this.router.table;
    const certwatch = this.#certwatch?.view();
    const backendView = (b: typeof table.fallback) => ({
      name: b.name,
      addrs: b.addrs,
      proxy_protocol: b.proxyProtocol,
      health: b.addrs.map((a) => {
        const h = this.server.backendHealth(a);
        return {
          addr: a, healthy: h.healthy, last_error: h.lastError,
          cooldown_until: h.cooldownUntil === null ? null : new Date(h.cooldownUntil).toISOString(),
        };
      }),
    });
    return {
      generation: this.router.generation,
      fallback: backendView(table.fallback),
      routes: table.routes.map((r) => ({
        match: r.match,
        alpn: r.alpn === null ? null : r.alpn.kind === 'list' ? r.alpn.protocols : r.alpn.kind,
        source: r.source,
        namespace: r.namespace,
        backend: backendView(r.backend),
      })),
      conflicts: this.composer.conflicts().map((c) => ({
        match: c.loser.match, alpn: alpnKey(c.loser.alpn) || null, winner: c.winner.source, loser: c.loser.source,
      })),
      certwatch: certwatch?.entries ?? [],
      certwatch_skipped: (certwatch?.skipped ?? []).map((s) => ({ template: s.template, namespace: s.namespace, reason: s.reason, detail: s.detail })),
      sources: this.composer.statuses().map((s) => ({
        name: s.name, type: s.type, state: s.state, routes: s.routes, last_error: s.lastError,
        failing_since: s.failingSince === null ? null : new Date(s.failingSince).toISOString(),
        last_success: s.lastSuccess === null ? null : new Date(s.lastSuccess).toISOString(),
      })),
      ...(workers.length === 0 ? {} : {
        workers: workers.map((w) => ({
          worker: w.slot, pid: w.pid, state: w.state, active_connections: w.active, generation: w.generation, restarts: w.restarts,
        })),
      }),
    };
  }

  /**
   * SIGHUP: re-read the config file and resync every source. A file that does not load is
   * rejected whole and the running table kept. Listen addresses need a restart to change.
   *
   * Reloads never overlap: two interleaved ones would each replace the sources, and the sources one
   * created while the other was replacing them would be left running (and connected) for good. A
   * SIGHUP during a reload queues one more, which reads the file as it is when it begins; further
   * SIGHUPs before it begins join it.
   */
  reload(): Promise<boolean> {
    if (this.#reloadWaiting !== null) return this.#reloadWaiting;
    const next = this.#reloadChain.then(() => {
      this.#reloadWaiting = null;
      return this.#stopping ? false : this.#reloadNow();
    });
    this.#reloadWaiting = next;
    this.#reloadChain = next.catch(() => {});
    return next;
  }

  async #reloadNow(): Promise<boolean> {
    let next: Config;
    try {
      next = loadConfig(this.config.file, this.#env);
    } catch (err) {
      this.logger.error({ err: (err as Error).message }, 'reload rejected: config file is invalid, keeping the running config');
      return false;
    }
    const prev = this.config;
    this.config = next;
    this.logger.level = next.log.level;
    this.server.configure(next.server, next.log.access, next.log.level);
    if (JSON.stringify(prev.listen) !== JSON.stringify(next.listen) ||
      JSON.stringify(prev.admin) !== JSON.stringify(next.admin) || prev.workers !== next.workers ||
      prev.server.relay !== next.server.relay) {
      this.logger.warn('listen, admin.listen, workers and relay changes take effect at the next restart');
    }
    await this.composer.setConfig(next.routes, next.fallback);
    if (JSON.stringify(prev.sources) !== JSON.stringify(next.sources)) {
      await this.composer.setSources(createSources(next.sources, { logger: this.logger }));
    } else {
      this.composer.resyncAll();
    }
    if (JSON.stringify([prev.certwatch, prev.certwatchTemplates]) !== JSON.stringify([next.certwatch, next.certwatchTemplates])) {
      await this.#certwatch?.stop();
      this.#certwatch = null;
      await this.#startCertwatch(next);
    } else {
      this.#certwatch?.recheck();
    }
    this.logger.info({ generation: this.router.generation }, 'config reloaded');
    return true;
  }

  /** Stops accepting, drains for up to graceMs, then closes everything else. */
  async shutdown(graceMs = this.config.server.shutdownGraceMs): Promise<void> {
    this.#stopping = true;
    this.logger.info({ grace_ms: graceMs, open: this.server.activeConnections }, 'shutting down');
    await this.server.drain(graceMs);
    // A reload under way finishes first, so that nothing it starts outlives the stop.
    await this.#reloadChain;
    await this.composer.stop();
    await this.#certwatch?.stop();
    await this.#admin?.close();
    this.logger.info('stopped');
  }
}
