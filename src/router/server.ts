// The TCP side of the router: accept, read the ClientHello, route, dial, relay.
//
// Per connection: wait for the ClientHello (bounded by client_hello_timeout, which also bounds
// clients that trickle bytes), look the route up once, dial the backend (addresses in order, a
// failed one skipped for a cooldown), send an optional PROXY header and every byte read so far in
// one write, then relay both ways with backpressure and half-close.
//
// The stealth rule lives here: the router never writes a byte of its own to a client. Whatever it
// cannot route goes to the fallback with its bytes, or is closed under `unroutable: close`.
import { readFileSync } from 'node:fs';
import net, { type AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';
import type { ListenAddress, ServerSettings } from '../config/types.ts';
import type { Logger } from '../log.ts';
import { RateLimitedLog } from '../log.ts';
import type { ConnectionResult, Metrics } from '../metrics/metrics.ts';
import { ClientHelloReader, type HelloVerdict } from './clienthello.ts';
import { proxyHeader, unmapIPv4 } from './proxyprotocol.ts';
import type { BackendSpec, Router } from './table.ts';

const FALLBACK_ROUTE = 'fallback';
/** Local conditions that say nothing about the backend's health: no cooldown for these. */
const LOCAL_DIAL_ERRORS = new Set(['EMFILE', 'ENFILE', 'ENOBUFS', 'ENOMEM', 'EADDRNOTAVAIL']);

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

export class RouterServer {
  readonly router: Router;
  readonly metrics: Metrics;
  readonly logger: Logger;
  settings: ServerSettings;
  accessLog: boolean;
  readonly #listeners: net.Server[] = [];
  readonly #conns = new Set<Connection>();
  readonly #perIp = new Map<string, number>();
  readonly #cooldown = new Map<string, { until: number; error: string }>();
  readonly #limitLog = new RateLimitedLog(1000);
  readonly #dialLog = new RateLimitedLog(1000);
  readonly #acceptLog = new RateLimitedLog(1000);
  #draining = false;

  constructor(opts: ServerOptions) {
    this.router = opts.router;
    this.metrics = opts.metrics;
    this.logger = opts.logger;
    this.settings = opts.settings;
    this.accessLog = opts.accessLog;
    this.metrics.onCollect(() => {
      for (const c of this.#conns) c.flushBytes();
    });
  }

  /** Connections accepted and not yet finished, including those still waiting for a ClientHello. */
  get activeConnections(): number {
    return this.#conns.size;
  }

  get draining(): boolean {
    return this.#draining;
  }

  /** Tracked client addresses; bounded by the number of open connections. */
  get trackedClientAddresses(): number {
    return this.#perIp.size;
  }

  async listen(addrs: readonly ListenAddress[], opts: { reusePort?: boolean } = {}): Promise<AddressInfo[]> {
    this.#checkDescriptorLimit();
    const bound: AddressInfo[] = [];
    for (const addr of addrs) {
      const server = net.createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: false });
      server.on('connection', (socket) => this.#accept(socket));
      server.on('error', (err) => this.#onServerError(err as NodeJS.ErrnoException));
      // An explicit "[::]" beside an IPv4 wildcard on the same port must not also claim IPv4.
      const ipv6Only = addr.host !== undefined && net.isIPv6(addr.host) &&
        addrs.some((o) => o !== addr && o.port === addr.port && o.host !== undefined && net.isIPv4(o.host));
      await new Promise<void>((resolve, reject) => {
        const onError = (err: Error) => reject(new Error(`cannot listen on ${addr.text}: ${err.message}`));
        server.once('error', onError);
        server.listen({ host: addr.host, port: addr.port, ipv6Only, reusePort: opts.reusePort, backlog: 4096 }, () => {
          server.removeListener('error', onError);
          resolve();
        });
      });
      this.#listeners.push(server);
      bound.push(server.address() as AddressInfo);
    }
    return bound;
  }

  /** Stops accepting, lets open connections finish for up to graceMs, then closes the rest. */
  async drain(graceMs: number): Promise<void> {
    this.#draining = true;
    // close() stops accepting at once; its callback would wait for every open connection, which
    // is what the grace period below bounds, so it is not awaited.
    for (const s of this.#listeners) s.close();
    const deadline = Date.now() + graceMs;
    while (this.#conns.size > 0 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, Math.min(50, Math.max(1, deadline - Date.now()))));
    }
    if (this.#conns.size > 0) {
      this.logger.info({ open: this.#conns.size }, 'shutdown grace over, closing remaining connections');
      for (const c of [...this.#conns]) c.abort('shutdown');
    }
  }

  /**
   * Each relayed connection holds two descriptors. A limit below what max_concurrent_conns needs
   * is survivable (EMFILE is shed, not fatal) but is a misconfiguration worth a warning at start.
   */
  #checkDescriptorLimit(): void {
    const soft = openFileLimit();
    const needed = this.settings.maxConcurrentConns * 2 + 64;
    if (soft !== null && this.settings.maxConcurrentConns > 0 && soft < needed) {
      this.logger.warn({ limit: soft, needed, max_concurrent_conns: this.settings.maxConcurrentConns },
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

  #accept(socket: net.Socket): void {
    const remote = socket.remoteAddress;
    if (this.#draining || remote === undefined) {
      socket.destroy();
      return;
    }
    const ip = unmapIPv4(remote);
    const s = this.settings;
    if (s.maxConcurrentConns > 0 && this.#conns.size >= s.maxConcurrentConns) {
      this.#reject(socket, 'global', ip);
      return;
    }
    let count = 0;
    if (s.maxConnsPerIp > 0) {
      count = this.#perIp.get(ip) ?? 0;
      if (count >= s.maxConnsPerIp) {
        this.#reject(socket, 'per_ip', ip);
        return;
      }
      this.#perIp.set(ip, count + 1);
    }
    this.#conns.add(new Connection(this, socket, ip, s.maxConnsPerIp > 0));
  }

  #reject(socket: net.Socket, scope: 'global' | 'per_ip', ip: string): void {
    socket.on('error', noop);
    socket.destroy();
    this.metrics.connectionLimitRejections.inc({ scope });
    const suppressed = this.#limitLog.allow();
    if (suppressed >= 0) {
      this.logger.warn({ scope, client: ip, active: this.#conns.size, suppressed }, 'connection limit reached');
    }
  }

  /** Called by a Connection when it is over. */
  release(conn: Connection, countedIp: boolean): void {
    this.#conns.delete(conn);
    if (!countedIp) return;
    const n = (this.#perIp.get(conn.ip) ?? 1) - 1;
    if (n <= 0) this.#perIp.delete(conn.ip);
    else this.#perIp.set(conn.ip, n);
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

  markDialFailure(backend: BackendSpec, addr: string, err: NodeJS.ErrnoException): void {
    const code = err.code ?? err.message;
    this.metrics.backendDialFailures.inc({ backend: backend.name });
    if (!LOCAL_DIAL_ERRORS.has(code)) {
      this.#cooldown.set(addr, { until: Date.now() + this.settings.dialCooldownMs, error: code });
    }
    const suppressed = this.#dialLog.allow();
    if (suppressed >= 0) {
      this.logger.warn({ backend: backend.name, addr, err: code, suppressed }, 'backend dial failed');
    }
  }

  markDialSuccess(addr: string): void {
    if (this.#cooldown.size > 0) this.#cooldown.delete(addr);
  }
}

function noop(): void {}

/** The soft RLIMIT_NOFILE from /proc (Linux); null where it cannot be read. */
function openFileLimit(): number | null {
  try {
    const m = /^Max open files\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
    if (m === null) return null;
    return m[1] === 'unlimited' ? Number.MAX_SAFE_INTEGER : Number(m[1]);
  } catch {
    return null;
  }
}

/** Where a connection stands; plain numbers so the checks on the hot path stay cheap. */
const Phase = { Hello: 0, Dialing: 1, Relaying: 2, Done: 3 } as const;
type Phase = (typeof Phase)[keyof typeof Phase];

/**
 * One client connection from accept to close. Handlers are bound once per connection; nothing is
 * allocated per chunk while relaying.
 */
class Connection {
  readonly server: RouterServer;
  readonly client: net.Socket;
  readonly ip: string;
  readonly #countedIp: boolean;
  readonly #acceptedAt = performance.now();
  #phase: Phase = Phase.Hello;
  #reader: ClientHelloReader;
  #chunks: Buffer[] = [];
  #helloTimer: NodeJS.Timeout | null;
  #clientEnded = false;
  #backend: BackendSpec | null = null;
  #backendSock: net.Socket | null = null;
  #addrIndex = 0;
  #dialStartedAt = 0;
  #route = FALLBACK_ROUTE;
  #result: ConnectionResult = 'ok';
  #sni: string | null = null;
  #alpn: readonly string[] | null = null;
  #clientClosed = false;
  #backendClosed = true;
  #relaying = false;
  #flushedUp = 0;
  #flushedDown = 0;

  constructor(server: RouterServer, client: net.Socket, ip: string, countedIp: boolean) {
    this.server = server;
    this.client = client;
    this.ip = ip;
    this.#countedIp = countedIp;
    this.#reader = new ClientHelloReader(server.settings.maxClientHelloBytes);
    client.on('data', this.#onHelloData);
    client.on('end', this.#onClientEnd);
    client.on('error', this.#onError);
    client.on('close', this.#onClientClose);
    this.#helloTimer = setTimeout(this.#onHelloTimeout, server.settings.clientHelloTimeoutMs);
  }

  #onHelloData = (chunk: Buffer): void => {
    this.#chunks.push(chunk);
    const verdict = this.#reader.push(chunk);
    if (verdict !== null) this.#route_(verdict);
  };

  #onHelloTimeout = (): void => {
    this.#helloTimer = null;
    if (this.#phase === Phase.Hello) this.#route_({ kind: 'failure', reason: 'timeout', detail: 'no complete ClientHello in time' });
  };

  #onClientEnd = (): void => {
    this.#clientEnded = true;
    if (this.#phase === Phase.Hello) {
      this.#route_({ kind: 'failure', reason: 'closed', detail: 'client closed before the ClientHello was complete' });
    } else if (this.#phase === Phase.Relaying) {
      this.#backendSock!.end();
    }
  };

  #route_(verdict: HelloVerdict): void {
    const server = this.server;
    const m = server.metrics;
    if (this.#helloTimer !== null) {
      clearTimeout(this.#helloTimer);
      this.#helloTimer = null;
    }
    this.client.removeListener('data', this.#onHelloData);
    this.client.pause();
    m.clientHelloDuration.observe((performance.now() - this.#acceptedAt) / 1000);
    const table = server.router.table;
    let backend: BackendSpec | null = null;
    if (verdict.kind === 'hello') {
      const hello = verdict.hello;
      this.#sni = hello.sni;
      this.#alpn = hello.alpn;
      if (hello.helloBytes > 0) m.clientHelloBytes.observe(hello.helloBytes);
      // TLS-ALPN-01 challenges belong to the certificate manager behind the fallback (Caddy),
      // whatever the name: otherwise names routed to TURN could never get a certificate.
      const acme = server.settings.acmeTlsAlpn === 'fallback' && hello.alpn !== null && hello.alpn.includes('acme-tls/1');
      if (!acme && hello.sni !== null) {
        const route = table.lookup(hello.sni, hello.alpn);
        if (route !== null) {
          backend = route.backend;
          this.#route = route.match;
        }
      }
      if (backend === null) backend = this.#unroutable();
    } else {
      m.clientHelloFailures.inc({ reason: verdict.reason });
      if (server.logger.isLevelEnabled('debug')) {
        server.logger.debug({ client: this.ip, reason: verdict.reason, detail: verdict.detail, bytes: this.#bufferedBytes() },
          'client hello peek failed');
      }
      // A client that went away without sending anything leaves nothing to forward.
      backend = verdict.reason === 'closed' && this.#bufferedBytes() === 0 ? null : this.#unroutable();
      if (backend === null && this.#result === 'ok') this.#result = 'closed';
    }
    if (backend === null) {
      this.#finishEarly();
      return;
    }
    if (this.#clientClosed) {
      // The socket is gone (reset): nobody to relay for.
      this.#result = 'error';
      this.#finishEarly();
      return;
    }
    this.#backend = backend;
    this.#phase = Phase.Dialing;
    this.#dial();
  }

  /** The fallback backend, or null under `unroutable: close`. */
  #unroutable(): BackendSpec | null {
    this.#route = FALLBACK_ROUTE;
    if (this.server.settings.unroutable === 'close') {
      this.#result = 'closed';
      return null;
    }
    return this.server.router.table.fallback;
  }

  #bufferedBytes(): number {
    let n = 0;
    for (const c of this.#chunks) n += c.length;
    return n;
  }

  #dial(): void {
    const backend = this.#backend!;
    const index = this.server.nextAddr(backend, this.#addrIndex);
    if (index < 0) {
      this.#result = 'dial_failed';
      this.#finishEarly();
      return;
    }
    this.#addrIndex = index;
    const addr = backend.addrs[index];
    const split = addr.lastIndexOf(':');
    const host = addr.startsWith('[') ? addr.slice(1, split - 1) : addr.slice(0, split);
    const port = Number(addr.slice(split + 1));
    this.#dialStartedAt = performance.now();
    this.#backendClosed = false;
    const sock = net.connect({ host, port, allowHalfOpen: true, noDelay: true });
    this.#backendSock = sock;
    sock.setTimeout(this.server.settings.backendDialTimeoutMs);
    sock.on('connect', this.#onBackendConnect);
    sock.on('timeout', this.#onBackendTimeout);
    sock.on('error', this.#onBackendError);
    sock.on('close', this.#onBackendClose);
  }

  #onBackendConnect = (): void => {
    const server = this.server;
    const backend = this.#backend!;
    const sock = this.#backendSock!;
    server.markDialSuccess(backend.addrs[this.#addrIndex]);
    server.metrics.backendDialDuration.observe({ backend: backend.name }, (performance.now() - this.#dialStartedAt) / 1000);
    if (this.#clientClosed) {
      sock.destroy();
      return;
    }
    this.#phase = Phase.Relaying;
    this.#relaying = true;
    server.metrics.activeConnections.inc({ backend: backend.name });
    // Both directions pass through the client socket, so its timer sees all activity.
    sock.setTimeout(0);
    if (server.settings.idleTimeoutMs > 0) {
      this.client.setTimeout(server.settings.idleTimeoutMs);
      this.client.on('timeout', this.#onIdleTimeout);
    }

    // The PROXY header and every byte read so far go out in one write.
    const parts = this.#chunks;
    if (backend.proxyProtocol !== null) {
      parts.unshift(proxyHeader(backend.proxyProtocol, {
        srcAddr: this.client.remoteAddress ?? '',
        srcPort: this.client.remotePort ?? 0,
        dstAddr: this.client.localAddress ?? '',
        dstPort: this.client.localPort ?? 0,
      }));
    }
    this.#chunks = [];
    if (parts.length > 0) sock.write(parts.length === 1 ? parts[0] : Buffer.concat(parts));

    this.client.on('data', this.#onClientData);
    this.client.on('drain', this.#onClientDrain);
    sock.on('data', this.#onBackendData);
    sock.on('drain', this.#onBackendDrain);
    sock.on('end', this.#onBackendEnd);
    if (this.#clientEnded) sock.end();
    else this.client.resume();
  };

  #onClientData = (chunk: Buffer): void => {
    if (!this.#backendSock!.write(chunk)) this.client.pause();
  };

  #onBackendData = (chunk: Buffer): void => {
    if (!this.client.write(chunk)) this.#backendSock!.pause();
  };

  #onClientDrain = (): void => {
    this.#backendSock?.resume();
  };

  #onBackendDrain = (): void => {
    this.client.resume();
  };

  #onBackendEnd = (): void => {
    // Half-close: the backend is done sending; the client may still send (and the reverse).
    this.client.end();
  };

  #onBackendTimeout = (): void => {
    const err = Object.assign(new Error('dial timeout'), { code: 'ETIMEDOUT' });
    this.#backendSock!.destroy(err);
  };

  #onIdleTimeout = (): void => {
    if (this.#result === 'ok') this.#result = 'idle_timeout';
    this.client.destroy();
    this.#backendSock?.destroy();
  };

  #onBackendError = (err: NodeJS.ErrnoException): void => {
    if (this.#phase === Phase.Dialing) {
      const backend = this.#backend!;
      this.server.markDialFailure(backend, backend.addrs[this.#addrIndex], err);
      this.#addrIndex++;
      return; // 'close' follows; it dials the next address
    }
    if (this.#result === 'ok') this.#result = 'error';
    this.client.destroy();
  };

  #onError = (): void => {
    if (this.#result === 'ok') this.#result = 'error';
    this.#backendSock?.destroy();
  };

  #onBackendClose = (): void => {
    this.#backendClosed = true;
    if (this.#phase === Phase.Dialing) {
      if (this.#clientClosed) {
        if (this.#result === 'ok') this.#result = 'error';
        this.#finishEarly();
      } else {
        this.#dial();
      }
      return;
    }
    if (this.#clientClosed) this.#finish();
  };

  #onClientClose = (hadError: boolean): void => {
    this.#clientClosed = true;
    switch (this.#phase) {
      case Phase.Hello:
        this.#route_({ kind: 'failure', reason: 'closed', detail: hadError ? 'client connection reset' : 'client closed' });
        return;
      case Phase.Dialing:
        // The dial goes on until it settles; its close handler finishes the connection.
        this.#backendSock?.destroy();
        return;
      case Phase.Relaying:
        if (hadError) this.#backendSock!.destroy();
        if (this.#backendClosed) this.#finish();
        return;
      case Phase.Done:
        return;
    }
  };

  /** Ends a connection that never reached the relay phase. */
  #finishEarly(): void {
    if (this.#phase === Phase.Done) return;
    if (!this.client.destroyed) this.client.destroy();
    this.#phase = Phase.Done;
    this.#complete();
  }

  #finish(): void {
    if (this.#phase === Phase.Done) return;
    const wasRelaying = this.#phase === Phase.Relaying;
    this.#phase = Phase.Done;
    if (wasRelaying) this.server.metrics.activeConnections.dec({ backend: this.#backend!.name });
    this.#complete();
  }

  #complete(): void {
    const server = this.server;
    if (this.#helloTimer !== null) {
      clearTimeout(this.#helloTimer);
      this.#helloTimer = null;
    }
    server.release(this, this.#countedIp);
    this.flushBytes();
    server.metrics.connections.inc({ route: this.#route, result: this.#result });
    if (server.accessLog) {
      server.logger.info({
        client: this.ip,
        client_port: this.client.remotePort,
        sni: this.#sni,
        alpn: this.#alpn,
        route: this.#route,
        backend: this.#backend?.name ?? null,
        backend_addr: this.#backend === null ? null : this.#backend.addrs[Math.min(this.#addrIndex, this.#backend.addrs.length - 1)],
        bytes_up: this.client.bytesRead,
        bytes_down: this.client.bytesWritten,
        duration_ms: Math.round((performance.now() - this.#acceptedAt) * 1000) / 1000,
        result: this.#result,
      }, 'connection');
    }
  }

  /** Adds bytes relayed since the last flush to bytes_total (at scrape time and at close). */
  flushBytes(): void {
    if (!this.#relaying || this.#backend === null) return;
    const up = this.client.bytesRead;
    const down = this.client.bytesWritten;
    const m = this.server.metrics.bytes;
    if (up > this.#flushedUp) m.inc({ backend: this.#backend.name, direction: 'upstream' }, up - this.#flushedUp);
    if (down > this.#flushedDown) m.inc({ backend: this.#backend.name, direction: 'downstream' }, down - this.#flushedDown);
    this.#flushedUp = up;
    this.#flushedDown = down;
  }

  abort(result: ConnectionResult): void {
    this.#result = result;
    this.client.destroy();
    this.#backendSock?.destroy();
    if (this.#phase === Phase.Hello) this.#finishEarly();
  }
}
