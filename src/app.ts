// Wiring: the one place that knows every part. Sources feed the composer, the composer feeds the
// router, the server reads the router; the cert watcher and the admin server sit beside them.
import type { AddressInfo } from 'node:net';
import { startCertwatch, type CertwatchHandle } from './certwatch/index.ts';
import { loadConfig } from './config/load.ts';
import type { Config } from './config/types.ts';
import { createLogger, type Logger } from './log.ts';
import { AdminServer } from './metrics/admin.ts';
import { Metrics } from './metrics/metrics.ts';
import { RouterServer } from './router/server.ts';
import { RouteTable, Router, alpnKey } from './router/table.ts';
import { Composer } from './sources/composer.ts';
import { createSources } from './sources/index.ts';

export interface AppOptions {
  readonly logger?: Logger;
  readonly env?: NodeJS.ProcessEnv;
}

export class App {
  config: Config;
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly router: Router;
  readonly server: RouterServer;
  readonly composer: Composer;
  readonly #env: NodeJS.ProcessEnv;
  #admin: AdminServer | null = null;
  #certwatch: CertwatchHandle | null = null;
  #listening = false;
  listenAddresses: AddressInfo[] = [];
  adminAddress: AddressInfo | null = null;

  private constructor(config: Config, opts: AppOptions) {
    this.config = config;
    this.#env = opts.env ?? process.env;
    this.logger = opts.logger ?? createLogger(config.log.level);
    this.metrics = new Metrics();
    this.router = new Router(new RouteTable(config.routes, config.fallback));
    this.metrics.routeTableGeneration.set(this.router.generation);
    this.server = new RouterServer({
      router: this.router, metrics: this.metrics, logger: this.logger, settings: config.server, accessLog: config.log.access,
    });
    this.composer = new Composer({ router: this.router, metrics: this.metrics, logger: this.logger });
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
    this.composer.setConfig(config.routes, config.fallback);
    if (config.admin.listen !== null) {
      this.#admin = new AdminServer({
        metrics: async () => ({ contentType: this.metrics.registry.contentType, body: await this.metrics.registry.metrics() }),
        notReadyReason: () => this.notReadyReason(),
        routes: () => this.routesView(),
      }, this.logger);
      this.adminAddress = await this.#admin.listen(config.admin.listen);
    }
    await this.composer.setSources(createSources(config.sources, { logger: this.logger }));
    this.#certwatch = await startCertwatch(config.certwatch, { logger: this.logger, metrics: this.metrics });
    this.listenAddresses = await this.server.listen(config.listen);
    this.#listening = true;
    this.logger.info({
      listen: this.listenAddresses.map((a) => (a.family === 'IPv6' ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`)),
      admin: this.adminAddress === null ? null : `${this.adminAddress.address}:${this.adminAddress.port}`,
      routes: this.router.table.routes.length,
      sources: config.sources.map((s) => s.name),
    }, 'sni-router started');
  }

  notReadyReason(): string | null {
    if (this.server.draining) return 'draining';
    if (!this.#listening) return 'not listening yet';
    return null;
  }

  routesView(): unknown {
    const table = this.router.table;
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
        backend: backendView(r.backend),
      })),
      conflicts: table.conflicts.map((c) => ({
        match: c.loser.match, alpn: alpnKey(c.loser.alpn) || null, winner: c.winner.source, loser: c.loser.source,
      })),
      sources: this.composer.statuses().map((s) => ({
        name: s.name, type: s.type, state: s.state, routes: s.routes, last_error: s.lastError,
        failing_since: s.failingSince === null ? null : new Date(s.failingSince).toISOString(),
        last_success: s.lastSuccess === null ? null : new Date(s.lastSuccess).toISOString(),
      })),
    };
  }

  /**
   * SIGHUP: re-read the config file and resync every source. A file that does not load is
   * rejected whole and the running table kept. Listen addresses need a restart to change.
   */
  async reload(): Promise<boolean> {
    let next: Config;
    try {
      next = loadConfig(this.config.file, this.#env);
    } catch (err) {
      this.logger.error({ err: (err as Error).message }, 'reload rejected: config file is invalid, keeping the running config');
      return false;
    }
    const prev = this.config;
    this.config = next;
    this.server.settings = next.server;
    this.server.accessLog = next.log.access;
    this.logger.level = next.log.level;
    if (JSON.stringify(prev.listen) !== JSON.stringify(next.listen) ||
      JSON.stringify(prev.admin) !== JSON.stringify(next.admin) || prev.workers !== next.workers) {
      this.logger.warn('listen, admin.listen and workers changes take effect at the next restart');
    }
    this.composer.setConfig(next.routes, next.fallback);
    if (JSON.stringify(prev.sources) !== JSON.stringify(next.sources)) {
      await this.composer.setSources(createSources(next.sources, { logger: this.logger }));
    } else {
      this.composer.resyncAll();
    }
    if (JSON.stringify(prev.certwatch) !== JSON.stringify(next.certwatch)) {
      await this.#certwatch?.stop();
      this.#certwatch = await startCertwatch(next.certwatch, { logger: this.logger, metrics: this.metrics });
    } else {
      this.#certwatch?.recheck();
    }
    this.logger.info({ generation: this.router.generation }, 'config reloaded');
    return true;
  }

  /** Stops accepting, drains for up to graceMs, then closes everything else. */
  async shutdown(graceMs = this.config.server.shutdownGraceMs): Promise<void> {
    this.logger.info({ grace_ms: graceMs, open: this.server.activeConnections }, 'shutting down');
    await this.server.drain(graceMs);
    await this.composer.stop();
    await this.#certwatch?.stop();
    await this.#admin?.close();
    this.logger.info('stopped');
  }
}
