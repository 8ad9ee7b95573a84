// The primary's side of workers > 1: forks the data-plane workers (src/worker.ts) with
// node:cluster, keeps every worker's route table equal to the primary's Router, passes settings
// and backend cooldowns on, asks the workers for metrics and counts, restarts a worker that dies
// (backing off if it keeps dying) and counts the connections it took with it, and drains them all
// at shutdown.
//
// The primary never listens on the data-plane addresses: each worker binds its own socket with
// SO_REUSEPORT and the kernel spreads connections over them (cluster's round-robin would cost the
// primary ~70 µs per connection). With port 0, the first worker binds an ephemeral port and the
// others (and any restarted worker) bind the same one.
import cluster, { type Worker } from 'node:cluster';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import pino from 'pino';
import type { ListenAddress, ServerSettings } from '../config/types.ts';
import type { Logger } from '../log.ts';
import type { Metrics } from '../metrics/metrics.ts';
import type { DataPlane, DataPlaneOptions } from '../data-plane.ts';
import type { BackendHealth } from '../router/server.ts';
import { PRIMARY_METRICS, type MetricJson, aggregateMetrics, retire } from './aggregate.ts';
import type { PrimaryMessage, WorkerMessage, WorkerSettings, WorkerState, WorkerStats, WorkerStatus } from './protocol.ts';
import { isWorkerMessage } from './protocol.ts';
import { TablePublisher } from './table-sync.ts';

const WORKER_FILE = fileURLToPath(new URL('../worker.ts', import.meta.url));
/** How the primary watches its workers. */
const WATCH = {
  heartbeatMs: 500,
  /** A listening worker silent this long is stuck (a busy loop): it is killed and restarted. */
  heartbeatTimeoutMs: 15_000,
  requestTimeoutMs: 2000,
  /** A worker that ran this long before it died is restarted at once; sooner, with a growing delay ... */
  stableMs: 10_000,
  /** ... from this, doubling, up to this. */
  firstBackoffMs: 250,
  maxBackoffMs: 30_000,
} as const;
/** Where pino keeps a logger's destination (pino.symbols is its public list of them). */
const streamSym = pino.symbols.streamSym;

export interface WorkerPoolOptions extends DataPlaneOptions {
  readonly count: number;
  /** true: workers send their log lines to this logger's destination; false: they write to stdout. */
  readonly relayLogs: boolean;
}

interface Slot {
  readonly index: number;
  worker: Worker | null;
  state: WorkerState;
  pid: number | null;
  startedAt: number;
  initSent: boolean;
  active: number;
  tracked: number;
  generation: number;
  lastHeartbeat: number;
  restarts: number;
  /** Exits in a row that came sooner than WATCH.stableMs after the start. */
  fastExits: number;
  restartTimer: NodeJS.Timeout | null;
  lastMetrics: MetricJson[] | null;
  /** Why the last start failed, as the worker reported it. */
  failure: string | null;
  exited: Promise<void>;
}

interface Pending {
  readonly slot: Slot;
  readonly resolve: (body: unknown) => void;
}

export class WorkerPool implements DataPlane {
  readonly #metrics: Metrics;
  readonly #logger: Logger;
  readonly #relayLogs: boolean;
  readonly #slots: Slot[];
  readonly #publisher: TablePublisher;
  readonly #cooldowns = new Map<string, { until: number; error: string }>();
  readonly #pending = new Map<number, Pending>();
  #listen: readonly ListenAddress[];
  #settings: WorkerSettings;
  #retired: MetricJson[] = [];
  #nextId = 0;
  #started = false;
  #draining = false;
  #watchdog: NodeJS.Timeout | null = null;

  constructor(opts: WorkerPoolOptions) {
    this.#metrics = opts.metrics;
    this.#logger = opts.logger;
    this.#relayLogs = opts.relayLogs;
    this.#listen = opts.listen;
    this.#settings = this.#workerSettings(opts.settings, opts.accessLog, opts.logger.level, opts.count);
    this.#slots = Array.from({ length: opts.count }, (_, i) => ({
      index: i + 1, worker: null, state: 'stopped' as WorkerState, pid: null, startedAt: 0, initSent: false,
      active: 0, tracked: 0, generation: 0, lastHeartbeat: 0, restarts: 0, fastExits: 0, restartTimer: null,
      lastMetrics: null, failure: null, exited: Promise.resolve(),
    }));
    this.#publisher = new TablePublisher(opts.router.table, opts.router.generation);
    opts.router.onReplace((table, generation, diff) => {
      const t0 = performance.now();
      const change = this.#publisher.change(table, generation, diff);
      this.#broadcast({ t: 'table', ...change });
      this.#logger.debug({
        generation, patterns_changed: change.set.length, patterns_removed: change.delete.length,
        ms: Math.round((performance.now() - t0) * 10) / 10,
      }, 'route table sent to workers');
    });
  }

  get count(): number {
    return this.#slots.length;
  }

  get relay(): 'native' | 'portable' {
    return this.#settings.server.relay;
  }

  get draining(): boolean {
    return this.#draining;
  }

  /** Sum of the workers' open connections, as of their last heartbeats. */
  get activeConnections(): number {
    let n = 0;
    for (const s of this.#slots) if (s.worker !== null) n += s.active;
    return n;
  }

  /** Sum of the workers' tracked client addresses (each worker tracks its own), as of their last heartbeats. */
  get trackedClientAddresses(): number {
    let n = 0;
    for (const s of this.#slots) if (s.worker !== null) n += s.tracked;
    return n;
  }

  /** Starts every worker; resolves once all listen, with the addresses they bound. */
  async start(): Promise<AddressInfo[]> {
    const bound = await this.#spawn(this.#slots[0]);
    // Port 0: the others join the port the first one got.
    this.#listen = this.#listen.map((a, i) => (a.port !== 0 ? a : { ...a, port: bound[i].port, text: `${a.text} (port ${bound[i].port})` }));
    await Promise.all(this.#slots.slice(1).map((s) => this.#spawn(s)));
    this.#started = true;
    this.#watchdog = setInterval(() => this.#checkHeartbeats(), WATCH.heartbeatMs);
    this.#watchdog.unref();
    return bound;
  }

  /** null when every worker listens, else why not. */
  notReadyReason(): string | null {
    if (this.#draining) return 'draining';
    const waiting = this.#slots.filter((s) => s.state !== 'listening');
    if (waiting.length === 0) return null;
    return waiting.map((s) => `worker ${s.index} is ${s.state}`).join(', ');
  }

  status(): WorkerStatus[] {
    return this.#slots.map((s) => ({
      slot: s.index, pid: s.worker === null ? null : s.pid, state: s.state, active: s.active,
      trackedClientAddresses: s.tracked, generation: s.generation, restarts: s.restarts,
    }));
  }

  /** Each worker's counts, asked now (a worker that does not answer in time is left out). */
  async stats(): Promise<WorkerStats[]> {
    const replies = await Promise.all(this.#slots.map((s) => this.#request(s, 'stats')));
    return replies.filter((r): r is WorkerStats => r !== null);
  }

  /** Backend health as the workers reported it: one cooldown per address, shared by all workers. */
  backendHealth(addr: string): BackendHealth {
    const cd = this.#cooldowns.get(addr);
    if (cd === undefined || cd.until <= Date.now()) return { addr, healthy: true, cooldownUntil: null, lastError: null };
    return { addr, healthy: false, cooldownUntil: cd.until, lastError: cd.error };
  }

  /** SIGHUP: new settings, access log and log level for every worker. */
  configure(settings: ServerSettings, accessLog: boolean, logLevel: string): void {
    this.#settings = this.#workerSettings(settings, accessLog, logLevel, this.#slots.length);
    this.#broadcast({ t: 'settings', ...this.#settings });
  }

  /** The Prometheus text for the whole router: the primary's registry and every worker's. */
  async metricsText(): Promise<string> {
    const [own, ...replies] = await Promise.all([
      this.#metrics.registry.getMetricsAsJSON() as unknown as Promise<MetricJson[]>,
      ...this.#slots.map((s) => this.#request(s, 'metrics') as Promise<MetricJson[] | null>),
    ]);
    const workers: MetricJson[][] = [];
    replies.forEach((r, i) => {
      const slot = this.#slots[i];
      if (r !== null) {
        slot.lastMetrics = r;
        workers.push(r);
      } else if (slot.worker !== null && slot.lastMetrics !== null) {
        // A live worker too busy to answer in time: its last answer, so that no sum drops.
        workers.push(slot.lastMetrics);
      }
    });
    return aggregateMetrics(own, workers, this.#retired).metrics();
  }

  /**
   * Tells every worker to stop accepting and drain for up to graceMs, and waits for them to exit
   * (a worker still there a few seconds after that is killed). Called again (a second signal),
   * it passes the shorter grace on.
   */
  async drain(graceMs: number): Promise<void> {
    this.#draining = true;
    if (this.#watchdog !== null) clearInterval(this.#watchdog);
    for (const s of this.#slots) {
      if (s.restartTimer !== null) clearTimeout(s.restartTimer);
      s.restartTimer = null;
    }
    const live = this.#slots.filter((s) => s.worker !== null);
    for (const s of live) {
      // A worker that has not had its table yet holds no connection: nothing to drain.
      if (s.initSent) this.#send(s, { t: 'drain', graceMs });
      else s.worker!.process.kill('SIGKILL');
    }
    const all = Promise.all(live.map((s) => s.exited));
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([all, new Promise<void>((r) => { timer = setTimeout(r, graceMs + 5000); })]);
    clearTimeout(timer);
    for (const s of live) {
      if (s.worker !== null) {
        this.#logger.warn({ worker: s.index, worker_pid: s.pid }, 'worker did not exit after draining; killing it');
        s.worker.process.kill('SIGKILL');
      }
    }
    await Promise.race([all, new Promise<void>((r) => { timer = setTimeout(r, 2000); })]);
    clearTimeout(timer);
  }

  #workerSettings(server: ServerSettings, accessLog: boolean, logLevel: string, n: number): WorkerSettings {
    // Each worker enforces its share of the global limit (it cannot see the others' counts).
    const perWorker = server.maxConcurrentConns > 0 ? Math.ceil(server.maxConcurrentConns / n) : 0;
    return { server: { ...server, maxConcurrentConns: perWorker }, accessLog, logLevel };
  }

  /** Forks the worker of a slot; resolves with its addresses once it listens, rejects if it exits first. */
  #spawn(slot: Slot): Promise<AddressInfo[]> {
    cluster.setupPrimary({
      exec: WORKER_FILE,
      // The primary's own flags (--max-old-space-size, --cpu-prof, ...), not a test runner's or a debugger's.
      execArgv: process.execArgv.filter((a) => !/^--(test|inspect|watch|experimental-test)/.test(a)),
      silent: false,
    });
    const worker = cluster.fork();
    slot.worker = worker;
    slot.state = 'starting';
    slot.pid = worker.process.pid ?? null;
    slot.startedAt = Date.now();
    slot.initSent = false;
    slot.active = 0;
    slot.tracked = 0;
    slot.lastHeartbeat = Date.now();
    slot.lastMetrics = null;
    slot.failure = null;
    let listening: (a: AddressInfo[]) => void = () => {};
    let failed: (err: Error) => void = () => {};
    const started = new Promise<AddressInfo[]>((resolve, reject) => {
      listening = resolve;
      failed = reject;
    });
    slot.exited = new Promise<void>((resolve) => {
      worker.on('exit', (code, signal) => {
        this.#onExit(slot, worker, code, signal);
        failed(new Error(`worker ${slot.index} exited (${signal ?? `code ${code}`}) before it listened` +
          `${slot.failure === null ? '' : `: ${slot.failure}`}`));
        resolve();
      });
    });
    worker.on('message', (m: unknown) => {
      if (!isWorkerMessage(m) || slot.worker !== worker) return;
      if (m.t === 'listening') {
        slot.state = 'listening';
        slot.lastHeartbeat = Date.now();
        this.#logger.info({ worker: slot.index, worker_pid: slot.pid, restarts: slot.restarts }, 'worker listening');
        listening([...m.addresses]);
        return;
      }
      this.#onMessage(slot, m);
    });
    // An IPC write to a worker that just died: its exit is handled above.
    worker.on('error', (err) => this.#logger.debug({ worker: slot.index, err: err.message }, 'worker channel error'));
    return started;
  }

  #onMessage(slot: Slot, m: WorkerMessage): void {
    switch (m.t) {
      case 'ready':
        if (this.#draining) {
          slot.worker?.process.kill('SIGKILL');
          return;
        }
        this.#send(slot, {
          t: 'init', slot: slot.index, listen: this.#listen, settings: this.#settings, table: this.#publisher.full(),
          cooldowns: [...this.#cooldowns].map(([addr, c]) => ({ addr, until: c.until, error: c.error })),
          relayLogs: this.#relayLogs, heartbeatMs: WATCH.heartbeatMs, primaryMetrics: PRIMARY_METRICS,
        });
        slot.initSent = true;
        return;
      case 'heartbeat':
        slot.active = m.active;
        slot.tracked = m.trackedClientAddresses;
        slot.generation = m.generation;
        slot.lastHeartbeat = Date.now();
        return;
      case 'cooldown':
        if (m.until === null) this.#cooldowns.delete(m.addr);
        else this.#cooldowns.set(m.addr, { until: m.until, error: m.error ?? 'unknown' });
        for (const other of this.#slots) if (other !== slot && other.initSent) this.#send(other, m);
        return;
      case 'log':
        this.#writeLogLine(m.line);
        return;
      case 'reply': {
        const p = this.#pending.get(m.id);
        if (p !== undefined) p.resolve(m.body);
        return;
      }
      case 'listen-failed':
        slot.failure = m.error;
        return;
      case 'listening':
      case 'drained':
        return;
    }
  }

  #onExit(slot: Slot, worker: Worker, code: number | null, signal: string | null): void {
    if (slot.worker !== worker) return;
    slot.worker = null;
    slot.initSent = false;
    for (const [id, p] of this.#pending) {
      if (p.slot === slot) {
        this.#pending.delete(id);
        p.resolve(null);
      }
    }
    if (this.#draining || !this.#started) {
      slot.state = 'stopped';
      return;
    }
    const lost = slot.active;
    const ranMs = Date.now() - slot.startedAt;
    slot.fastExits = ranMs < WATCH.stableMs ? slot.fastExits + 1 : 0;
    const delay = slot.fastExits === 0 ? 0 : Math.min(WATCH.maxBackoffMs, WATCH.firstBackoffMs * 2 ** (slot.fastExits - 1));
    this.#metrics.workerConnectionsLost.inc(lost);
    slot.active = 0;
    slot.tracked = 0;
    slot.state = 'restarting';
    this.#logger.error({
      worker: slot.index, worker_pid: slot.pid, code, signal, connections_lost: lost, ran_ms: ranMs, restart_in_ms: delay,
      ...(slot.failure === null ? {} : { err: slot.failure }),
    }, 'worker exited unexpectedly; restarting it');
    const last = slot.lastMetrics;
    slot.lastMetrics = null;
    if (last !== null) {
      retire(this.#retired, last).then((r) => {
        this.#retired = r;
      }, (err: Error) => this.#logger.warn({ err: err.message }, 'could not keep an exited worker\'s counters'));
    }
    slot.restartTimer = setTimeout(() => {
      slot.restartTimer = null;
      if (this.#draining) return;
      slot.restarts++;
      this.#metrics.workerRestarts.inc();
      // A start that fails is handled by the exit it ends with.
      this.#spawn(slot).catch(() => {});
    }, delay);
  }

  #checkHeartbeats(): void {
    const now = Date.now();
    for (const s of this.#slots) {
      if (s.worker !== null && s.state === 'listening' && now - s.lastHeartbeat > WATCH.heartbeatTimeoutMs) {
        this.#logger.error({ worker: s.index, worker_pid: s.pid, silent_ms: now - s.lastHeartbeat }, 'worker stopped answering; killing it');
        s.lastHeartbeat = now;
        s.worker.process.kill('SIGKILL');
      }
    }
  }

  #request(slot: Slot, kind: 'metrics' | 'stats'): Promise<unknown> {
    if (slot.worker === null || !slot.initSent) return Promise.resolve(null);
    const id = ++this.#nextId;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        this.#logger.warn({ worker: slot.index, request: kind }, 'worker did not answer in time');
        resolve(null);
      }, WATCH.requestTimeoutMs);
      this.#pending.set(id, {
        slot,
        resolve: (body) => {
          clearTimeout(timer);
          this.#pending.delete(id);
          resolve(body);
        },
      });
      if (!this.#send(slot, { t: kind, id })) this.#pending.get(id)?.resolve(null);
    });
  }

  #broadcast(m: PrimaryMessage): void {
    for (const s of this.#slots) if (s.initSent) this.#send(s, m);
  }

  #send(slot: Slot, m: PrimaryMessage): boolean {
    const w = slot.worker;
    if (w === null || !w.isConnected()) return false;
    try {
      w.send(m);
      return true;
    } catch {
      return false; // the channel closed under us: the exit handler follows
    }
  }

  /** A worker's log line, already formatted, goes to this logger's destination as it is. */
  #writeLogLine(line: string): void {
    const stream = (this.#logger as unknown as Record<symbol, unknown>)[streamSym] as { write(s: string): unknown } | undefined;
    if (stream !== undefined) stream.write(line.endsWith('\n') ? line : `${line}\n`);
  }
}
