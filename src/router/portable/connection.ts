// One client connection on the portable relay: the same states and decisions as the native one
// (decision.ts, accounting.ts), on public net.Socket API only. Slower per connection and heavier
// per idle relay (two Duplex streams), but it runs on any Node, and it is what the router falls back
// to when the internals the native relay is built on are missing.
import { lookup as dnsLookup, type LookupAddress, type LookupAllOptions, type LookupOneOptions } from 'node:dns';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import type { ConnectionResult } from '../../metrics/metrics.ts';
import { isLoopback } from '../../model/self-address.ts';
import { ClientHelloReader, type HelloVerdict } from '../clienthello.ts';
import type { ClientPeer, ConnectionHost, RelayConnection } from '../connection-host.ts';
import { afterDialFailure } from '../decision.ts';
import { proxyHeader, unmapIPv4 } from '../proxyprotocol.ts';
import { Phase, RelayState } from '../relay-state.ts';

/** Bytes kept from the client while its backend is dialled before reading stops. */
const DIAL_BUFFER_LIMIT = 64 * 1024;


/** The client's address (an IPv4 client on a dual-stack socket as IPv4) and port. */
export function socketPeer(s: net.Socket): ClientPeer {
  return { ip: unmapIPv4(s.remoteAddress ?? ''), port: s.remotePort ?? null };
}

function resultOf(err: NodeJS.ErrnoException): ConnectionResult {
  return err.code === 'ECONNRESET' || err.code === 'EPIPE' ? 'reset' : 'error';
}

export class PortableConnection extends RelayState implements RelayConnection {
  readonly #client: net.Socket;
  readonly #peer: ClientPeer | null;
  readonly #counted: boolean;
  #reader: ClientHelloReader | null;
  #chunks: Buffer[] = [];
  #timer: NodeJS.Timeout | null;
  #sock: net.Socket | null = null;
  #dialStartedAt = 0;
  #bytesUp = 0;
  #bytesDown = 0;
  #clientEnded = false;
  #clientGone = false;
  /** Sockets that closed while relaying: both, and the relay is over. */
  #closed = 0;
  #idleTicks = 0;

  constructor(host: ConnectionHost, client: net.Socket, peer: ClientPeer | null, counted: boolean) {
    super(host);
    this.#client = client;
    this.#peer = peer;
    this.#counted = counted;
    const settings = host.settings;
    this.#reader = new ClientHelloReader(settings.maxClientHelloBytes);
    this.#timer = setTimeout(() => {
      this.#timer = null;
      if (this.phase === Phase.Hello) this.#routeBy({ kind: 'failure', reason: 'timeout', detail: 'no complete ClientHello in time' });
    }, settings.clientHelloTimeoutMs);
    client.setNoDelay(true);
    if (settings.tcpKeepaliveMs > 0) client.setKeepAlive(true, settings.tcpKeepaliveMs);
    client.on('data', (d: Buffer) => this.#clientData(d));
    client.on('end', () => this.#clientEnd());
    client.on('error', (err: NodeJS.ErrnoException) => this.#clientError(err));
    client.on('close', () => this.#socketClosed());
  }

  get countedIp(): string | null {
    return this.#counted ? this.#peer!.ip : null;
  }

  get bytesUp(): number {
    return this.#bytesUp;
  }

  get bytesDown(): number {
    return this.#bytesDown;
  }

  // ---- the client ----

  #clientData(d: Buffer): void {
    this.#bytesUp += d.length;
    switch (this.phase) {
      case Phase.Relaying:
        this.#idleTicks = 0;
        if (!this.#sock!.write(d)) this.#client.pause();
        return;
      case Phase.Hello: {
        this.#chunks.push(d);
        const verdict = this.#reader!.push(d);
        if (verdict !== null) this.#routeBy(verdict);
        return;
      }
      case Phase.Dialing: {
        this.#chunks.push(d);
        let buffered = 0;
        for (const c of this.#chunks) buffered += c.length;
        if (buffered >= DIAL_BUFFER_LIMIT) this.#client.pause();
      }
    }
  }

  #clientEnd(): void {
    this.#clientEnded = true;
    if (this.phase === Phase.Hello) {
      this.#routeBy({ kind: 'failure', reason: 'closed', detail: 'client closed before the ClientHello was complete' });
    } else if (this.phase === Phase.Relaying) {
      this.#sock!.end();
    }
  }

  #clientError(err: NodeJS.ErrnoException): void {
    if (this.phase === Phase.Hello) {
      this.#clientGone = true;
      this.#clientEnded = true;
      this.#routeBy({ kind: 'failure', reason: 'closed', detail: 'client connection reset' });
    } else {
      this.#failed(err);
    }
  }

  #routeBy(verdict: HelloVerdict): void {
    this.#stopTimer();
    this.#reader = null;
    const d = this.judge(verdict, this.#bytesUp, this.#clientGone);
    if (d.kind === 'close') {
      this.finish();
      return;
    }
    this.phase = Phase.Dialing;
    this.decision = d;
    this.addrIndex = 0;
    this.#dialNext();
  }

  // ---- the dial ----

  /** Dials the next address to try, or turns to the fallback (decision.ts) when none is left. */
  #dialNext(): void {
    const host = this.host;
    const decision = this.decision!;
    const index = host.nextAddr(decision.backend, this.addrIndex);
    if (index < 0) {
      const next = afterDialFailure(decision, host.table(), host.settings);
      if (next === null) {
        this.endWith('dial_failed');
        this.finish();
        return;
      }
      this.decision = next;
      this.route = next.route;
      this.addrIndex = 0;
      this.#dialNext();
      return;
    }
    this.addrIndex = index;
    const addr = decision.backend.addrs[index];
    const split = addr.lastIndexOf(':');
    const hostName = addr.startsWith('[') ? addr.slice(1, split - 1) : addr.slice(0, split);
    const port = Number(addr.slice(split + 1));
    // A dial to the router itself is refused before it is made: nothing can go round.
    if (net.isIP(hostName) !== 0 && host.dialLoops(hostName, port)) {
      this.#dialFailed('ELOOP');
      return;
    }
    this.#dialStartedAt = performance.now();
    const sock = net.connect({
      host: hostName, port, allowHalfOpen: true, noDelay: true,
      // A host name's addresses that are the router itself are left out (ELOOP if that is all).
      lookup: (name: string, options: LookupOneOptions | LookupAllOptions, cb: (...args: never[]) => void) => {
        dnsLookup(name, { ...options, all: true }, (err, all: LookupAddress[]) => {
          const ok = err === null ? all.filter((a) => !host.dialLoops(a.address, port)) : [];
          const done = cb as unknown as (e: NodeJS.ErrnoException | null, a: unknown, f?: number) => void;
          if (err === null && ok.length === 0) err = Object.assign(new Error(`${name} is the router itself`), { code: 'ELOOP' });
          if (err !== null) done(err, options.all === true ? [] : '', 4);
          else if (options.all === true) done(null, ok);
          else done(null, ok[0].address, ok[0].family);
        });
      },
    });
    this.#sock = sock;
    this.#timer = setTimeout(() => {
      this.#timer = null;
      if (this.#sock === sock && this.phase === Phase.Dialing) this.#dialFailed('ETIMEDOUT');
    }, host.settings.backendDialTimeoutMs);
    sock.once('connect', () => {
      if (this.#sock === sock && this.phase === Phase.Dialing) this.#startRelay(sock);
    });
    sock.on('error', (err: NodeJS.ErrnoException) => {
      if (this.#sock !== sock) return;
      if (this.phase === Phase.Dialing) this.#dialFailed(err.code ?? 'EIO');
      else this.#failed(err);
    });
  }

  #dialFailed(code: string): void {
    this.#stopTimer();
    this.#sock?.destroy();
    this.#sock = null;
    const backend = this.decision!.backend;
    this.host.dialFailed(backend, backend.addrs[this.addrIndex], code);
    this.addrIndex++;
    this.#dialNext();
  }

  #startRelay(sock: net.Socket): void {
    const host = this.host;
    const connectedAt = performance.now();
    this.#stopTimer();
    const backend = this.decision!.backend;
    this.relayedTo = backend;
    this.decision = null;
    this.phase = Phase.Relaying;
    host.metrics.activeChanged(backend.name, 1);
    const parts = this.#chunks;
    this.#chunks = [];
    if (backend.proxyProtocol !== null) {
      const c = this.#client;
      parts.unshift(proxyHeader(backend.proxyProtocol, {
        srcAddr: c.remoteAddress ?? '', srcPort: c.remotePort ?? 0, dstAddr: c.localAddress ?? '', dstPort: c.localPort ?? 0,
      }));
    }
    if (parts.length > 0) sock.write(parts.length === 1 ? parts[0] : Buffer.concat(parts));
    const ka = host.settings.tcpKeepaliveMs;
    if (ka > 0 && !isLoopback(sock.remoteAddress ?? '')) sock.setKeepAlive(true, ka);
    sock.on('data', (d: Buffer) => {
      this.#bytesDown += d.length;
      this.#idleTicks = 0;
      if (!this.#client.write(d)) sock.pause();
    });
    sock.on('end', () => this.#client.end());
    sock.on('close', () => this.#socketClosed());
    sock.on('drain', () => this.#client.resume());
    this.#client.on('drain', () => sock.resume());
    if (this.#clientEnded) sock.end();
    else this.#client.resume();
    host.dialSucceeded(backend.addrs[this.addrIndex]);
    host.metrics.dialTook(backend.name, (connectedAt - this.#dialStartedAt) / 1000);
  }

  // ---- the end ----

  /** With half-close on both sockets, each closes once it has ended both ways: both, and it is over. */
  #socketClosed(): void {
    if (this.phase === Phase.Relaying && ++this.#closed === 2) this.finish();
  }

  #failed(err: NodeJS.ErrnoException): void {
    this.endWith(resultOf(err));
    this.finish();
  }

  tick(idleLimit: number): void {
    if (this.phase !== Phase.Relaying) return;
    if (idleLimit > 0 && ++this.#idleTicks > idleLimit) {
      this.endWith('idle_timeout');
      this.finish();
    }
  }

  #stopTimer(): void {
    if (this.#timer === null) return;
    clearTimeout(this.#timer);
    this.#timer = null;
  }

  protected override peerForLog(): ClientPeer {
    return this.#peer ?? socketPeer(this.#client);
  }

  protected override closeAll(): void {
    this.#stopTimer();
    this.#client.destroy();
    this.#sock?.destroy();
    this.#chunks = [];
  }

}
