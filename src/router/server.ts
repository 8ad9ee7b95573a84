// The TCP side of the router: listen, admit each connection (limits, loops), and hand it to the
// relay, which reads the ClientHello, routes (decision.ts: the stealth rule), dials and relays.
// Two relays stand behind one Transport: native (libuv handles) and portable (net.Socket); the
// native one unless the config says otherwise or this Node lacks what it is built on.
import net, { type AddressInfo } from 'node:net';
import type { ListenAddress, ServerSettings } from '../config/types.ts';
import { openFileLimit } from '../host.ts';
import type { Logger } from '../log.ts';
import { RateLimitedLog } from '../log.ts';
import type { Metrics } from '../metrics/metrics.ts';
import type { BackendSpec } from '../model/route.ts';
import type { ClientPeer, ConnectionHost, RelayConnection } from './connection-host.ts';
import { type BackendHealth, type CooldownChange, Cooldowns } from './cooldowns.ts';
import { LoopGuard } from './loop-guard.ts';
import { nativeRelayProblem } from './native/handles.ts';
import { nativeTransport } from './native/transport.ts';
import { portableTransport } from './portable/transport.ts';
import type { RouteTable, Router } from './table.ts';
import type { Transport } from './transport.ts';

export type { BackendHealth, CooldownChange } from './cooldowns.ts';

/**
 * Descriptors kept for everything but relays: Node and libuv hold ~22 at idle, the admin server up
 * to its cap, the sources and the cert watcher a few. Connections are capped so that they never
 * take these (64 with a small limit, 256 from a limit of 1024 up).
 */
function reservedFds(limit: number): number {
  return Math.min(256, Math.max(64, Math.floor(limit / 4)));
}

export type RelayKind = 'native' | 'portable';

export interface ServerOptions {
  readonly router: Router;
  readonly metrics: Metrics;
  readonly logger: Logger;
  readonly settings: ServerSettings;
  readonly accessLog: boolean;
}

/** The relay to run: the one wanted, unless it is native and this Node cannot run it (then why). */
export function chooseRelay(wanted: RelayKind): { relay: RelayKind; problem: string | null } {
  const problem = wanted === 'native' ? nativeRelayProblem() : null;
  return { relay: problem === null ? wanted : 'portable', problem };
}

export class RouterServer implements ConnectionHost {
  readonly router: Router;
  readonly metrics: Metrics;
  readonly logger: Logger;
  readonly relay: RelayKind;
  readonly #transport: Transport<unknown>;
  #settings: ServerSettings;
  accessLog: boolean;
  readonly #listeners: net.Server[] = [];
  /**
   * Open connections, each at its `slot`; taking one out moves the last into its place. Not a Set:
   * V8 replaces a Set's table as entries come and go, and a replaced table keeps pointing at the
   * connections it held (for iterators). Once such a table is in the old generation, each
   * connection it names survives the next scavenge and is promoted with all it references:
   * `--trace-gc-nvp` showed ~630 bytes promoted per connection with a Set, ~140 without.
   */
  readonly #conns: RelayConnection[] = [];
  readonly #perIp = new Map<string, number>();
  /** Connections the descriptor limit allows (each relay holds two), whatever max_concurrent_conns says. */
  #fdCap = Number.MAX_SAFE_INTEGER;
  readonly #loops = new LoopGuard();
  readonly #cooldowns: Cooldowns;
  readonly #limitLog = new RateLimitedLog(1000);
  readonly #acceptLog = new RateLimitedLog(1000);
  #draining = false;
  /** One timer for every relay: idle_timeout and bulk buffers, see #startSweep. */
  #sweeper: NodeJS.Timeout | null = null;
  #idleTicksAllowed = 0;
  /** Sweep ticks a relay must be quiet for before it gives its bulk buffers back (a second). */
  #bulkTicksAllowed = 1;

  constructor(opts: ServerOptions) {
    this.router = opts.router;
    this.metrics = opts.metrics;
    this.logger = opts.logger;
    this.#settings = opts.settings;
    this.accessLog = opts.accessLog;
    // The relay wanted (settings.relay): the portable one is taken anyway where native cannot run.
    const { relay, problem } = chooseRelay(opts.settings.relay);
    if (problem !== null) this.logger.warn({ problem }, 'the native relay cannot run here: running the portable relay');
    this.relay = relay;
    this.#transport = (relay === 'native' ? nativeTransport : portableTransport) as Transport<unknown>;
    this.#cooldowns = new Cooldowns(opts.metrics, opts.logger);
    this.metrics.onCollect(() => {
      for (const c of this.#conns) c.flushBytes();
    });
  }

  get settings(): ServerSettings {
    return this.#settings;
  }

  /** New settings apply to new connections; a changed idle_timeout also to open relays. */
  set settings(next: ServerSettings) {
    const idleChanged = next.idleTimeoutMs !== this.#settings.idleTimeoutMs;
    const keepaliveChanged = next.tcpKeepaliveMs !== this.#settings.tcpKeepaliveMs;
    this.#settings = next;
    if (idleChanged && this.#listeners.length > 0 && !this.#draining) this.#startSweep();
    if (keepaliveChanged) for (const s of this.#listeners) this.#transport.setKeepalive(s, next.tcpKeepaliveMs);
  }

  /** Told about every cooldown this server sets or clears itself (workers share them). */
  set onCooldownChange(fn: ((change: CooldownChange) => void) | null) {
    this.#cooldowns.onChange = fn;
  }

  /** Connections accepted and not yet finished, including those still waiting for a ClientHello. */
  get activeConnections(): number {
    return this.#conns.length;
  }

  get draining(): boolean {
    return this.#draining;
  }

  /** Tracked client addresses; bounded by the number of open connections. */
  get trackedClientAddresses(): number {
    return this.#perIp.size;
  }

  /**
   * Listens on every address. `reusePort` with `exclusive` gives a cluster worker a socket of its
   * own (the kernel spreads connections) instead of one shared through the cluster primary.
   */
  async listen(addrs: readonly ListenAddress[], opts: { reusePort?: boolean; exclusive?: boolean } = {}): Promise<AddressInfo[]> {
    this.#checkDescriptorLimit();
    const bound: AddressInfo[] = [];
    for (const addr of addrs) {
      const server = this.#transport.createServer();
      // An explicit "[::]" beside an IPv4 wildcard on the same port must not also claim IPv4.
      const ipv6Only = addr.host !== undefined && net.isIPv6(addr.host) &&
        addrs.some((o) => o !== addr && o.port === addr.port && o.host !== undefined && net.isIPv4(o.host));
      await new Promise<void>((resolve, reject) => {
        const onError = (err: Error) => reject(new Error(`cannot listen on ${addr.text}: ${err.message}`));
        server.once('error', onError);
        server.listen({
          host: addr.host, port: addr.port, ipv6Only, reusePort: opts.reusePort, exclusive: opts.exclusive, backlog: 4096,
        }, () => {
          server.removeListener('error', onError);
          // From here on an 'error' is an accept error (a failure to listen is not one).
          server.on('error', (err) => this.#onServerError(err as NodeJS.ErrnoException));
          resolve();
        });
      });
      const refused = this.#transport.takeAccepts(server, (a) => this.#accept(a), this.#settings.tcpKeepaliveMs);
      if (refused !== null) {
        server.close();
        throw new Error(`cannot listen on ${addr.text}: ${refused}`);
      }
      this.#listeners.push(server);
      const info = server.address() as AddressInfo;
      bound.push(info);
      this.#loops.listening(info);
    }
    this.#startSweep();
    return bound;
  }

  /**
   * One sweep timer for every relay. It closes idle relays without a timer each: a relay counts
   * sweep ticks since its last read either way and is closed past the limit, so it closes between
   * idle_timeout and idle_timeout plus one tick (a quarter of the timeout, at most a second) after
   * its last byte. It also takes back the bulk buffers of relays quiet for at least a second, so
   * it runs without an idle_timeout too.
   */
  #startSweep(): void {
    if (this.#sweeper !== null) clearInterval(this.#sweeper);
    const idle = this.#settings.idleTimeoutMs;
    const tick = idle > 0 ? Math.max(10, Math.min(1000, Math.floor(idle / 4))) : 1000;
    this.#idleTicksAllowed = idle > 0 ? Math.ceil(idle / tick) : 0;
    this.#bulkTicksAllowed = Math.ceil(1000 / tick);
    this.#sweeper = setInterval(() => this.#sweep(), tick);
    this.#sweeper.unref();
  }

  #sweep(): void {
    this.#loops.sweep();
    const idle = this.#idleTicksAllowed;
    const bulk = this.#bulkTicksAllowed;
    // Backwards: a relay closed here is replaced by the last one, which has had its tick.
    const conns = this.#conns;
    for (let i = conns.length - 1; i >= 0; i--) conns[i].tick(idle, bulk);
  }

  /** Stops accepting, lets open connections finish for up to graceMs, then closes the rest. */
  async drain(graceMs: number): Promise<void> {
    this.#draining = true;
    if (this.#sweeper !== null) clearInterval(this.#sweeper);
    this.#sweeper = null;
    // close() stops accepting at once; its callback would wait for every open connection, which
    // is what the grace period below bounds, so it is not awaited.
    for (const s of this.#listeners) s.close();
    const deadline = Date.now() + graceMs;
    while (this.#conns.length > 0 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, Math.min(50, Math.max(1, deadline - Date.now()))));
    }
    if (this.#conns.length > 0) {
      this.logger.info({ open: this.#conns.length }, 'shutdown grace over, closing remaining connections');
      for (const c of [...this.#conns]) c.abort('shutdown');
    }
  }

  /**
   * Whatever the connection limit says, connections never take every descriptor: a flood, or a
   * loop the guard cannot see (a port forward back to the router), meets this cap and is shed like
   * any overload, while the admin server, the sources and the cert watcher keep theirs.
   */
  #checkDescriptorLimit(): void {
    const soft = openFileLimit();
    if (soft === null) return;
    this.#fdCap = Math.max(1, Math.floor((soft - reservedFds(soft)) / 2));
    const wanted = this.settings.maxConcurrentConns;
    if (wanted === 0 || wanted > this.#fdCap) {
      this.logger.warn({ limit: soft, max_concurrent_conns: wanted, connections_capped_at: this.#fdCap },
        'file descriptor limit is low for max_concurrent_conns');
    }
  }

  backendHealth(addr: string): BackendHealth {
    return this.#cooldowns.health(addr);
  }

  #onServerError(err: NodeJS.ErrnoException): void {
    // Accept errors (EMFILE when out of file descriptors) must not bring the process down. libuv
    // already sheds the pending connection; we count, log once a second, and keep serving.
    const code = err.code ?? 'unknown';
    this.metrics.acceptErrors.inc({ code });
    const suppressed = this.#acceptLog.allow();
    if (suppressed >= 0) this.logger.warn({ code, err: err.message, suppressed }, 'accept failed');
  }

  /** Admits an accepted connection (limits, loops) and opens it, or closes it at once. */
  #accept(accepted: unknown): void {
    const t = this.#transport;
    if (this.#draining) {
      t.close(accepted);
      return;
    }
    const s = this.#settings;
    const open = this.#conns.length;
    if ((s.maxConcurrentConns > 0 && open >= s.maxConcurrentConns) || open >= this.#fdCap) {
      this.#reject(accepted, 'global');
      return;
    }
    // The client's address costs a getpeername() call: only looked up when a limit, the access
    // log or an expected loop needs it.
    let peer: ClientPeer | null = null;
    if (this.#loops.expecting) {
      peer = t.peer(accepted);
      const route = this.#loops.arrived(peer.ip, peer.port);
      if (route !== null) {
        this.metrics.connectionClosed(route, 'loop');
        this.logger.warn({ route, client: peer.ip, client_port: peer.port },
          'connection from the router itself closed: the route leads back to the router');
        t.close(accepted);
        return;
      }
    }
    if (s.maxConnsPerIp > 0 || this.accessLog) {
      peer ??= t.peer(accepted);
      if (peer.ip === '') {
        // Gone already (reset before the accept was seen): it cannot be counted per address.
        if (s.maxConnsPerIp > 0) {
          t.close(accepted);
          return;
        }
        peer = null;
      }
    }
    if (s.maxConnsPerIp > 0) {
      const ip = peer!.ip;
      const count = this.#perIp.get(ip) ?? 0;
      if (count >= s.maxConnsPerIp) {
        this.#reject(accepted, 'per_ip', ip);
        return;
      }
      this.#perIp.set(ip, count + 1);
    }
    const conn = t.open(this, accepted, peer, s.maxConnsPerIp > 0);
    if (!conn.finished) {
      conn.slot = this.#conns.length;
      this.#conns.push(conn);
    }
  }

  #reject(accepted: unknown, scope: 'global' | 'per_ip', ip?: string): void {
    this.metrics.connectionLimitRejections.inc({ scope });
    const suppressed = this.#limitLog.allow();
    if (suppressed >= 0) {
      this.logger.warn({ scope, client: ip ?? this.#transport.peer(accepted).ip, active: this.#conns.length, suppressed },
        'connection limit reached');
    }
    this.#transport.close(accepted);
  }

  // ---- ConnectionHost ----

  table(): RouteTable {
    return this.router.table;
  }

  release(conn: RelayConnection): void {
    const i = conn.slot;
    if (i >= 0) {
      const last = this.#conns.pop()!;
      if (last !== conn) {
        this.#conns[i] = last;
        last.slot = i;
      }
      conn.slot = -1;
    }
    const ip = conn.countedIp;
    if (ip === null) return;
    const n = (this.#perIp.get(ip) ?? 1) - 1;
    if (n <= 0) this.#perIp.delete(ip);
    else this.#perIp.set(ip, n);
  }

  nextAddr(backend: BackendSpec, from: number): number {
    return this.#cooldowns.nextAddr(backend, from);
  }

  dialFailed(backend: BackendSpec, addr: string, code: string): void {
    this.#cooldowns.failed(backend, addr, code, this.#settings.dialCooldownMs);
  }

  dialSucceeded(addr: string): void {
    this.#cooldowns.succeeded(addr);
  }

  dialLoops(ip: string, port: number): boolean {
    return this.#loops.dialLoops(ip, port);
  }

  expectLoop(local: { readonly address?: string; readonly port?: number }, route: string): void {
    this.#loops.expect(local, route);
  }

  /** A cooldown another process set or cleared (not reported back through onCooldownChange). */
  applyCooldown(change: CooldownChange): void {
    this.#cooldowns.apply(change);
  }
}
