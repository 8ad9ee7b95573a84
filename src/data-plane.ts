// The data plane as the rest of the app sees it: where connections are accepted and relayed. One
// interface, two implementations: this process (LocalDataPlane, workers: 1) or a pool of worker
// processes (cluster/pool.ts, workers > 1). The app holds one and never asks which.
import type { AddressInfo } from 'node:net';
import type { WorkerStats, WorkerStatus } from './cluster/protocol.ts';
import type { ListenAddress, ServerSettings } from './config/types.ts';
import type { Logger } from './log.ts';
import type { Metrics } from './metrics/metrics.ts';
import { type BackendHealth, RouterServer } from './router/server.ts';
import type { Router } from './router/table.ts';

export interface DataPlane {
  /** Connections accepted and not finished (with workers: as of their last heartbeats). */
  readonly activeConnections: number;
  readonly draining: boolean;
  /** The relay that runs connections (the workers' as configured; each warns if it falls back). */
  readonly relay: 'native' | 'portable';
  /** Listens on the configured addresses; resolves with where it listens. */
  start(): Promise<AddressInfo[]>;
  /** null while serving, else why not ("a worker is restarting"). */
  notReadyReason(): string | null;
  backendHealth(addr: string): BackendHealth;
  /** New settings for new connections (and idle_timeout for open ones); the access log; the log level. */
  configure(settings: ServerSettings, accessLog: boolean, logLevel: string): void;
  /** Prometheus text for the whole data plane (and this process's own series). */
  metricsText(): Promise<string>;
  /** Each data-plane process's counts, asked now. */
  stats(): Promise<WorkerStats[]>;
  /** The workers as their heartbeats describe them; empty when the data plane is this process. */
  status(): WorkerStatus[];
  /** Stops accepting, lets open connections finish for up to graceMs, then closes the rest. */
  drain(graceMs: number): Promise<void>;
}

/** What any data plane is built from. */
export interface DataPlaneOptions {
  readonly router: Router;
  readonly metrics: Metrics;
  readonly logger: Logger;
  readonly listen: readonly ListenAddress[];
  readonly settings: ServerSettings;
  readonly accessLog: boolean;
}

/** The data plane in this process: one RouterServer. */
export class LocalDataPlane implements DataPlane {
  readonly #server: RouterServer;
  readonly #metrics: Metrics;
  readonly #router: Router;
  readonly #listen: readonly ListenAddress[];

  constructor(opts: DataPlaneOptions) {
    this.#server = new RouterServer(opts);
    this.#metrics = opts.metrics;
    this.#router = opts.router;
    this.#listen = opts.listen;
  }

  get activeConnections(): number {
    return this.#server.activeConnections;
  }

  get draining(): boolean {
    return this.#server.draining;
  }

  get relay(): 'native' | 'portable' {
    return this.#server.relay;
  }

  start(): Promise<AddressInfo[]> {
    return this.#server.listen(this.#listen);
  }

  notReadyReason(): string | null {
    return null;
  }

  backendHealth(addr: string): BackendHealth {
    return this.#server.backendHealth(addr);
  }

  /** The log level is the app's own logger's, set by the app. */
  configure(settings: ServerSettings, accessLog: boolean, _logLevel: string): void {
    this.#server.settings = settings;
    this.#server.accessLog = accessLog;
  }

  metricsText(): Promise<string> {
    return this.#metrics.registry.metrics();
  }

  async stats(): Promise<WorkerStats[]> {
    const connections = (await this.#metrics.connections.get()).values.reduce((n, v) => n + v.value, 0);
    const s = this.#server;
    return [{ pid: process.pid, active: s.activeConnections, trackedClientAddresses: s.trackedClientAddresses, connections, generation: this.#router.generation }];
  }

  status(): WorkerStatus[] {
    return [];
  }

  drain(graceMs: number): Promise<void> {
    return this.#server.drain(graceMs);
  }
}
