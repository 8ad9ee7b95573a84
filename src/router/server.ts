// The TCP side of the router: accept, read the ClientHello, route, dial, relay.
//
// Per connection: wait for the ClientHello (bounded by client_hello_timeout, which also bounds
// clients that trickle bytes), look the route up once, dial the backend (addresses in order, a
// failed one skipped for a cooldown), send an optional PROXY header and every byte read so far in
// one write, then relay both ways with backpressure and half-close.
//
// The stealth rule lives here: the router never writes a byte of its own to a client. Whatever it
// cannot route goes to the fallback with its bytes, or is closed under `unroutable: close`.
import net, { type AddressInfo } from 'node:net';
import type { ListenAddress, ServerSettings } from '../config/types.ts';
import { localInterfaceAddresses, openFileLimit } from '../host.ts';
import type { Logger } from '../log.ts';
import { RateLimitedLog } from '../log.ts';
import type { Metrics } from '../metrics/metrics.ts';
import { type ClientPeer, Connection, clientPeer } from './connection.ts';
import type { Router } from './table.ts';
import type { BackendSpec } from '../model/route.ts';
import { OPTIONS_INHERITED, type SocketAddress, type TcpHandle } from './uv.ts';
import { unmapIPv4 } from './proxyprotocol.ts';
import { type ListenEndpoint, reachesListener } from '../model/self-address.ts';

/** Local conditions that say nothing about the backend's health: no cooldown for these. */
const LOCAL_DIAL_ERRORS = new Set(['EMFILE', 'ENFILE', 'ENOBUFS', 'ENOMEM', 'EADDRNOTAVAIL']);
/**
 * Descriptors kept for everything but relays: Node and libuv hold ~22 at idle, the admin server up
 * to its cap, the sources and the cert watcher a few. Connections are capped so that they never
 * take these (64 with a small limit, 256 from a limit of 1024 up).
 */
function reservedFds(limit: number): number {
  return Math.min(256, Math.max(64, Math.floor(limit / 4)));
}
/** A loop dial whose connection never arrives (the backlog was full) is forgotten after this. */
const LOOP_EXPECT_MS = 10_000;

export interface ServerOptions {
  readonly router: Router;
  readonly metrics: Metrics;
  readonly logger: Logger;
  readonly settings: ServerSettings;
  readonly accessLog: boolean;
}

export interface BackendHealth {
  readonly addr: string;
  readonly healthy: boolean;
  /** Unix ms until which the address is skipped, when unhealthy. */
  readonly cooldownUntil: number | null;
  readonly lastError: string | null;
}

/** A change of one address's cooldown: until null means healthy again. */
export interface CooldownChange {
  readonly addr: string;
  readonly until: number | null;
  readonly error: string | null;
}

export class RouterServer {
  readonly router: Router;
  readonly metrics: Metrics;
  readonly logger: Logger;
  #settings: ServerSettings;
  accessLog: boolean;
  readonly #listeners: net.Server[] = [];
  /** The listeners' libuv handles: their socket options pass to every accepted connection. */
  readonly #listenHandles: TcpHandle[] = [];
  /**
   * Open connections, each at its `slot`; taking one out moves the last into its place. Not a Set:
   * V8 replaces a Set's table as entries come and go, and a replaced table keeps pointing at the
   * connections it held (for iterators). Once such a table is in the old generation, each
   * connection it names survives the next scavenge and is promoted with all it references:
   * `--trace-gc-nvp` showed ~630 bytes promoted per connection with a Set, ~140 without.
   */
  readonly #conns: Connection[] = [];
  readonly #perIp = new Map<string, number>();
  /** Connections the descriptor limit allows (each relay holds two), whatever max_concurrent_conns says. */
  #fdCap = Number.MAX_SAFE_INTEGER;
  /** Where this server listens, as bound: a dial to one of these is a loop. */
  #own: ListenEndpoint[] = [];
  readonly #ownPorts = new Set<number>();
  /** Local address "ip|port" of each dial to the router itself → the route it looped on, until it arrives. */
  readonly #loops = new Map<string, { route: string; at: number }>();
  readonly #cooldown = new Map<string, { until: number; error: string }>();
  readonly #limitLog = new RateLimitedLog(1000);
  readonly #dialLog = new RateLimitedLog(1000);
  readonly #acceptLog = new RateLimitedLog(1000);
  #draining = false;
  /** One timer for every relay: idle_timeout and bulk buffers, see #startSweep. */
  #sweeper: NodeJS.Timeout | null = null;
  #idleTicksAllowed = 0;
  /** Sweep ticks a relay must be quiet for before it gives its bulk buffers back (a second). */
  #bulkTicksAllowed = 1;
  /**
   * Told about every cooldown this server sets or clears itself, so that processes serving the
   * same backends (workers) can share them: an address one found dead is skipped by all.
   */
  onCooldownChange: ((change: CooldownChange) => void) | null = null;

  constructor(opts: ServerOptions) {
    this.router = opts.router;
    this.metrics = opts.metrics;
    this.logger = opts.logger;
    this.#settings = opts.settings;
    this.accessLog = opts.accessLog;
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
    if (keepaliveChanged && OPTIONS_INHERITED) for (const h of this.#listenHandles) this.#setListenerKeepalive(h);
  }

  #setListenerKeepalive(handle: TcpHandle): boolean {
    const ms = this.#settings.tcpKeepaliveMs;
    return handle.setKeepAlive(ms > 0, Math.max(1, Math.round(ms / 1000))) === 0;
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
      // Only for listening: accepted handles never become net.Sockets (see #takeAccepts).
      const server = net.createServer();
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
      this.#takeAccepts(server, addr.text);
      this.#listeners.push(server);
      const info = server.address() as AddressInfo;
      bound.push(info);
      this.#own.push({ host: info.address, port: info.port });
      this.#ownPorts.add(info.port);
    }
    this.#startSweep();
    return bound;
  }

  /**
   * True when dialling ip:port reaches this router (a backend host name that resolves to it). The
   * port is compared first: for every other backend this is one Set lookup per dial.
   */
  dialLoops(ip: string, port: number): boolean {
    return this.#ownPorts.has(port) && reachesListener(ip, port, this.#own, localInterfaceAddresses());
  }

  /**
   * A dial to the router itself is under way from local address `local`: the connection it makes
   * is recognized when it arrives, closed at once and counted as a loop. The dialling connection
   * sends nothing on it (it turns to the fallback), so nothing can go round.
   */
  expectLoop(local: SocketAddress, route: string): void {
    if (local.address === undefined || local.port === undefined) return;
    this.#loops.set(`${unmapIPv4(local.address)}|${local.port}`, { route, at: Date.now() });
  }

  /**
   * One sweep timer for every relay. It closes idle relays without a timer each: a relay counts
   * sweep ticks since its last read either way and is closed past the limit, so it closes between
   * idle_timeout and idle_timeout plus one tick (a quarter of the timeout, at most a second) after
   * its last byte. It also takes back the bulk buffers of relays quiet for at least a second
   * (Connection.tick), so it runs without an idle_timeout too.
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
    if (this.#loops.size > 0) {
      const old = Date.now() - LOOP_EXPECT_MS;
      for (const [key, loop] of this.#loops) if (loop.at < old) this.#loops.delete(key);
    }
    const idle = this.#idleTicksAllowed;
    const bulk = this.#bulkTicksAllowed;
    // Backwards: a relay closed here is replaced by the last one, which has had its tick.
    const conns = this.#conns;
    for (let i = conns.length - 1; i >= 0; i--) conns[i].tick(idle, bulk);
  }

  /**
   * Takes over the listening handle's accept callback (net.Server's own would wrap the accepted
   * handle in a net.Socket) so that each accepted libuv handle goes to a Connection as it is: the
   * relay drives handles directly (uv.ts). Accept errors still go through net.Server ('error'
   * event). Node is pinned (package.json), so the internals this touches are known; should they
   * ever change, listening fails loudly rather than serving with a router that cannot read.
   */
  #takeAccepts(server: net.Server, text: string): void {
    type OnConnection = (this: unknown, err: number, clientHandle?: unknown) => void;
    const handle = (server as unknown as { _handle?: { onconnection?: OnConnection; setNoDelay?(on: boolean): number } | null })._handle;
    const original = handle?.onconnection;
    if (handle == null || typeof original !== 'function') {
      server.close();
      throw new Error(`cannot listen on ${text}: this Node.js (${process.version}) has no net.Server accept callback to take over; run the pinned Node 24 (npm ci)`);
    }
    // Linux copies TCP_NODELAY and keepalive from the listening socket to each accepted one: one
    // setsockopt here instead of one per connection. Elsewhere each Connection sets them.
    if (OPTIONS_INHERITED && (handle.setNoDelay?.(true) !== 0 || !this.#setListenerKeepalive(handle as TcpHandle))) {
      server.close();
      throw new Error(`cannot listen on ${text}: cannot set TCP_NODELAY or keepalive on the listening socket`);
    }
    this.#listenHandles.push(handle as TcpHandle);
    handle.onconnection = (err: number, clientHandle?: unknown) => {
      if (err !== 0 || clientHandle == null) original.call(handle, err, clientHandle);
      else this.#accept(clientHandle as TcpHandle);
    };
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
   * Each relayed connection holds two descriptors. A limit below what max_concurrent_conns needs
   * is survivable (EMFILE is shed, not fatal) but is a misconfiguration worth a warning at start.
   */
  #checkDescriptorLimit(): void {
    const soft = openFileLimit();
    if (soft === null) return;
    // Whatever the connection limit says, connections never take every descriptor: a flood, or a
    // loop the guard cannot see (a port forward back to the router), meets this cap and is shed
    // like any overload, while the admin server, the sources and the cert watcher keep theirs.
    this.#fdCap = Math.max(1, Math.floor((soft - reservedFds(soft)) / 2));
    const wanted = this.settings.maxConcurrentConns;
    if (wanted === 0 || wanted > this.#fdCap) {
      this.logger.warn({ limit: soft, max_concurrent_conns: wanted, connections_capped_at: this.#fdCap },
        'file descriptor limit is low for max_concurrent_conns');
    }
  }

  backendHealth(addr: string): BackendHealth {
    const cd = this.#cooldown.get(addr);
    if (cd === undefined || cd.until <= Date.now()) return { addr, healthy: true, cooldownUntil: null, lastError: null };
    return { addr, healthy: false, cooldownUntil: cd.until, lastError: cd.error };
  }

  #onServerError(err: NodeJS.ErrnoException): void {
    // Accept errors (EMFILE when out of file descriptors) must not bring the process down. libuv
    // already sheds the pending connection; we count, log once a second, and keep serving.
    const code = err.code ?? 'unknown';
    this.metrics.acceptErrors.inc({ code });
    const suppressed = this.#acceptLog.allow();
    if (suppressed >= 0) this.logger.warn({ code, err: err.message, suppressed }, 'accept failed');
  }

  #accept(handle: TcpHandle): void {
    if (this.#draining) {
      handle.close();
      return;
    }
    const s = this.#settings;
    const open = this.#conns.length;
    if ((s.maxConcurrentConns > 0 && open >= s.maxConcurrentConns) || open >= this.#fdCap) {
      this.#reject(handle, 'global');
      return;
    }
    // The client's address costs a getpeername() call: only looked up when a limit, the access
    // log or an expected loop needs it.
    let peer: ClientPeer | null = null;
    if (this.#loops.size > 0) {
      peer = clientPeer(handle);
      const key = `${peer.ip}|${peer.port}`;
      const loop = this.#loops.get(key);
      if (loop !== undefined) {
        this.#loops.delete(key);
        this.metrics.connectionClosed(loop.route, 'loop');
        this.logger.warn({ route: loop.route, client: peer.ip, client_port: peer.port },
          'connection from the router itself closed: the route leads back to the router');
        handle.close();
        return;
      }
    }
    if (s.maxConnsPerIp > 0 || this.accessLog) {
      peer ??= clientPeer(handle);
      if (peer.ip === '') {
        // Gone already (reset before the accept was seen): it cannot be counted per address.
        if (s.maxConnsPerIp > 0) {
          handle.close();
          return;
        }
        peer = null;
      }
    }
    if (s.maxConnsPerIp > 0) {
      const ip = peer!.ip;
      const count = this.#perIp.get(ip) ?? 0;
      if (count >= s.maxConnsPerIp) {
        this.#reject(handle, 'per_ip', ip);
        return;
      }
      this.#perIp.set(ip, count + 1);
    }
    const conn = new Connection(this, handle, peer, s.maxConnsPerIp > 0);
    if (!conn.finished) {
      conn.slot = this.#conns.length;
      this.#conns.push(conn);
    }
  }

  #reject(handle: TcpHandle, scope: 'global' | 'per_ip', ip?: string): void {
    this.metrics.connectionLimitRejections.inc({ scope });
    const suppressed = this.#limitLog.allow();
    if (suppressed >= 0) {
      this.logger.warn({ scope, client: ip ?? clientPeer(handle).ip, active: this.#conns.length, suppressed },
        'connection limit reached');
    }
    handle.close();
  }

  /** Called by a Connection when it is over. */
  release(conn: Connection): void {
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

  /**
   * Picks the next address to try, from index `from` on: the first that is not cooling down after
   * a failure, or else simply the next one (an address in cooldown is still better than none).
   * Each address is tried at most once per connection; -1 when none are left.
   */
  nextAddr(backend: BackendSpec, from: number): number {
    if (from >= backend.addrs.length) return -1;
    if (this.#cooldown.size === 0) return from;
    const now = Date.now();
    for (let i = from; i < backend.addrs.length; i++) {
      const cd = this.#cooldown.get(backend.addrs[i]);
      if (cd === undefined || cd.until <= now) return i;
    }
    return from;
  }

  /** `code` is the error's name: ECONNREFUSED, ETIMEDOUT (backend_dial_timeout), ENOTFOUND, … */
  dialFailed(backend: BackendSpec, addr: string, code: string): void {
    this.metrics.backendDialFailures.inc({ backend: backend.name });
    if (!LOCAL_DIAL_ERRORS.has(code)) {
      const until = Date.now() + this.settings.dialCooldownMs;
      this.#cooldown.set(addr, { until, error: code });
      this.onCooldownChange?.({ addr, until, error: code });
    }
    const suppressed = this.#dialLog.allow();
    if (suppressed >= 0) {
      this.logger.warn({ backend: backend.name, addr, err: code, suppressed }, 'backend dial failed');
    }
  }

  dialSucceeded(addr: string): void {
    if (this.#cooldown.size > 0 && this.#cooldown.delete(addr)) {
      this.onCooldownChange?.({ addr, until: null, error: null });
    }
  }

  /** A cooldown another process set or cleared (not reported back through onCooldownChange). */
  applyCooldown(change: CooldownChange): void {
    if (change.until === null) this.#cooldown.delete(change.addr);
    else this.#cooldown.set(change.addr, { until: change.until, error: change.error ?? 'unknown' });
  }
}
