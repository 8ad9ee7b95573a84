// A data-plane worker (workers > 1): started by the primary with node:cluster, it listens on the
// configured addresses with its own SO_REUSEPORT socket (the kernel spreads connections over the
// workers), routes by the table the primary sends it, and answers the primary's questions
// (metrics, counts). Sources, the cert watcher and the admin server stay in the primary.
//
// Signals: SIGINT, SIGTERM, SIGHUP and SIGUSR2 sent to the whole process group (a terminal's ctrl-C, a
// systemd stop) are the primary's to act on: it tells each worker to drain. A worker whose
// primary is gone exits (node:cluster does that when the IPC channel closes).
import cluster from 'node:cluster';
import type { AddressInfo } from 'node:net';
import pino from 'pino';
import { type PrimaryMessage, type TableChange, type WorkerMessage, type WorkerSettings, isPrimaryMessage } from './cluster/protocol.ts';
import { TableReplica } from './cluster/table-sync.ts';
import { createLogger, type Logger } from './log.ts';
import { Metrics } from './metrics/metrics.ts';
import { RouterServer } from './router/server.ts';
import type { RouteSpec } from './model/route.ts';
import { RouteTable, Router } from './router/table.ts';

/** Up to this many routes a table is built in one piece; beyond, in slices (see RouteTable.build). */
const SYNC_BUILD_ROUTES = 20_000;

type Init = Extract<PrimaryMessage, { t: 'init' }>;

function send(m: WorkerMessage, done?: () => void): void {
  if (process.connected) process.send!(m, undefined, undefined, done);
  else done?.();
}

/** Writes each log line to the primary, which writes it to its own log destination. */
const relayDestination = { write: (line: string) => send({ t: 'log', line }) };

class DataPlaneWorker {
  readonly logger: Logger;
  readonly metrics = new Metrics();
  readonly replica = new TableReplica();
  readonly router: Router;
  readonly server: RouterServer;
  readonly #primaryMetrics: ReadonlySet<string>;
  #heartbeat: NodeJS.Timeout | null = null;
  #draining = false;
  /** The generation of the table connections are routed by (a big one is built a while after it arrives). */
  #generation: number;
  /** The table being built in slices, and the change to build after it (only the latest counts). */
  #building: Promise<void> | null = null;
  #next: { routes: readonly RouteSpec[]; change: TableChange } | null = null;

  constructor(init: Init) {
    const destination = init.relayLogs ? relayDestination : pino.destination({ dest: 1, sync: true });
    // Sync writes: several processes share stdout, and one write per line keeps lines whole.
    this.logger = createLogger(init.settings.logLevel, destination).child({ worker: init.slot });
    this.#primaryMetrics = new Set(init.primaryMetrics);
    this.router = new Router(this.replica.apply(init.table));
    this.#generation = init.table.generation;
    this.server = new RouterServer({
      router: this.router, metrics: this.metrics, logger: this.logger,
      settings: init.settings.server, accessLog: init.settings.accessLog,
    });
    for (const c of init.cooldowns) this.server.applyCooldown(c);
    this.server.onCooldownChange = (c) => send({ t: 'cooldown', ...c });
  }

  async listen(init: Init): Promise<AddressInfo[]> {
    // A socket of its own (reusePort + exclusive): without exclusive, a cluster worker's listen is
    // handed to the primary, which would accept every connection and pass it on (~70 µs each).
    const addresses = await this.server.listen(init.listen, { reusePort: true, exclusive: true });
    this.#beat();
    this.#heartbeat = setInterval(() => this.#beat(), init.heartbeatMs);
    return addresses;
  }

  #beat(): void {
    send({
      t: 'heartbeat', active: this.server.activeConnections,
      trackedClientAddresses: this.server.trackedClientAddresses, generation: this.#generation,
    });
  }

  /**
   * Changes are taken in order as they arrive; the table they describe is built at once when small,
   * else in slices (RouteTable.build) while connections go on being served by the previous one. A
   * change arriving meanwhile waits for that build, and only the latest is built next.
   */
  applyTable(change: TableChange): void {
    const routes = this.replica.update(change);
    if (this.#building !== null || routes.length > SYNC_BUILD_ROUTES) {
      this.#next = { routes, change };
      this.#building ??= this.#buildQueued();
      return;
    }
    const t0 = performance.now();
    this.#install(new RouteTable(routes, change.fallback), change, t0);
  }

  async #buildQueued(): Promise<void> {
    try {
      for (let next = this.#next; next !== null; next = this.#next) {
        this.#next = null;
        const t0 = performance.now();
        this.#install(await RouteTable.build(next.routes, next.change.fallback), next.change, t0);
      }
    } catch (err) {
      this.logger.error({ err: (err as Error).message }, 'route table update failed, keeping the running table');
    } finally {
      this.#building = null;
    }
  }

  #install(table: RouteTable, change: TableChange, t0: number): void {
    this.router.replace(table);
    this.#generation = change.generation;
    const ms = Math.round((performance.now() - t0) * 10) / 10;
    this.logger[ms >= 100 ? 'info' : 'debug']({ generation: change.generation, routes: table.routes.length, ms }, 'route table applied');
  }

  applySettings(s: WorkerSettings): void {
    this.server.settings = s.server;
    this.server.accessLog = s.accessLog;
    this.logger.level = s.logLevel;
  }

  async reply(id: number, kind: 'metrics' | 'stats'): Promise<void> {
    let body: unknown;
    if (kind === 'metrics') {
      const all = await this.metrics.registry.getMetricsAsJSON();
      body = all.filter((m) => !this.#primaryMetrics.has(m.name));
    } else {
      const connections = (await this.metrics.connections.get()).values.reduce((n, v) => n + v.value, 0);
      body = {
        pid: process.pid, active: this.server.activeConnections, trackedClientAddresses: this.server.trackedClientAddresses,
        connections, generation: this.#generation,
      };
    }
    send({ t: 'reply', id, body });
  }

  async drain(graceMs: number): Promise<void> {
    const first = !this.#draining;
    this.#draining = true;
    await this.server.drain(graceMs);
    if (!first) return;
    if (this.#heartbeat !== null) clearInterval(this.#heartbeat);
    this.#beat();
    send({ t: 'drained' }, () => process.exit(0));
  }
}

function run(): void {
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGUSR2'] as const) process.on(signal, () => {});
  let worker: DataPlaneWorker | null = null;
  let fatal = (err: Error): void => {
    process.stderr.write(`sni-router worker ${process.pid}: fatal: ${err.stack ?? err.message}\n`);
    process.exit(1);
  };
  process.on('uncaughtException', (err) => fatal(err));
  process.on('unhandledRejection', (err) => fatal(err instanceof Error ? err : new Error(String(err))));

  process.on('message', (m: unknown) => {
    if (!isPrimaryMessage(m)) return;
    if (m.t === 'init') {
      const init = m;
      worker = new DataPlaneWorker(init);
      const w = worker;
      fatal = (err) => {
        w.logger.fatal({ err: err.message, stack: err.stack }, 'worker failed');
        process.stderr.write(`sni-router worker ${process.pid}: fatal: ${err.stack ?? err.message}\n`);
        send({ t: 'drained' }, () => process.exit(1));
        setTimeout(() => process.exit(1), 1000).unref();
      };
      w.listen(init).then((addresses) => send({ t: 'listening', addresses }), (err: Error) => {
        send({ t: 'listen-failed', error: err.message }, () => process.exit(1));
      });
      return;
    }
    const w = worker;
    switch (m.t) {
      case 'table':
        w?.applyTable(m);
        return;
      case 'settings':
        w?.applySettings(m);
        return;
      case 'cooldown':
        w?.server.applyCooldown(m);
        return;
      case 'drain':
        if (w === null) process.exit(0);
        else void w.drain(m.graceMs);
        return;
      case 'metrics':
      case 'stats':
        if (w === null) send({ t: 'reply', id: m.id, body: null });
        else void w.reply(m.id, m.t);
        return;
    }
  });
  send({ t: 'ready' });
}

if (cluster.isWorker) {
  run();
} else {
  process.stderr.write('src/worker.ts is started by the sni-router primary (workers > 1), not by hand\n');
  process.exitCode = 2;
}
