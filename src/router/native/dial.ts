// Dialling a backend for the native relay: its addresses in order (an address in cooldown skipped
// while another is available), a host name resolved at each dial with each of its addresses tried
// in turn, one time limit per address, and a dial that turns out to reach the router itself
// recognized as a loop.
import { type LookupAddress, lookup } from 'node:dns';
import { isIP } from 'node:net';
import { performance } from 'node:perf_hooks';
import type { BackendSpec } from '../../model/route.ts';
import { isLoopback } from '../../model/self-address.ts';
import type { ConnectionHost } from '../connection-host.ts';
import { type ConnectRequest, errorName, localOf, newConnectRequest, newTcpHandle } from './handles.ts';
import { type PumpHandle, onRead, scratch } from './pump.ts';

/** Who a dial reports to. */
export interface DialOwner {
  /** The route the connection took (a loop is counted under it). */
  readonly route: string;
  /** Connected to `dial.backend.addrs[dial.addrIndex]`: `sock` is the backend's. */
  connected(dial: Dial, sock: PumpHandle): void;
  /** Every address failed. */
  exhausted(dial: Dial): void;
}

type PendingConnect = ConnectRequest & { dial: Dial | null };

export class Dial {
  readonly backend: BackendSpec;
  readonly #host: ConnectionHost;
  readonly #owner: DialOwner;
  /** The address being dialled (or the last one tried). */
  addrIndex = 0;
  /** performance.now() when the current address's dial began. */
  startedAt = 0;
  /** Which attempt is current: a late answer to an abandoned one (DNS, connect) is ignored. */
  #attempt = 0;
  /** A host name's addresses not yet tried in this dial, and the port to dial. */
  #resolved: LookupAddress[] | null = null;
  #port = 0;
  #sock: PumpHandle | null = null;
  #timer: NodeJS.Timeout | null = null;
  /** The address being dialled is the router itself: once connected, it counts as a failure. */
  #loop = false;
  #over = false;

  constructor(host: ConnectionHost, owner: DialOwner, backend: BackendSpec) {
    this.#host = host;
    this.#owner = owner;
    this.backend = backend;
  }

  /** Dials the next address to try (ConnectionHost.nextAddr), or reports that none is left. */
  next(): void {
    const index = this.#host.nextAddr(this.backend, this.addrIndex);
    if (index < 0) {
      this.#over = true;
      this.#owner.exhausted(this);
      return;
    }
    this.addrIndex = index;
    const attempt = ++this.#attempt;
    const addr = this.backend.addrs[index];
    const split = addr.lastIndexOf(':');
    const host = addr.charCodeAt(0) === 0x5b /* [ */ ? addr.slice(1, split - 1) : addr.slice(0, split);
    const port = Number(addr.slice(split + 1));
    this.startedAt = performance.now();
    this.#timer = setTimeout(Dial.#onTimeout, this.#host.settings.backendDialTimeoutMs, this);
    const family = isIP(host);
    if (family !== 0) {
      this.#connect(host, family, port);
      return;
    }
    // A host name (a compose service, say): resolved for each dial, and each of its addresses
    // tried in turn (localhost may be ::1 and 127.0.0.1), as net.connect would.
    try {
      lookup(host, { all: true }, (err, resolved) => {
        if (this.#over || this.#attempt !== attempt) return;
        if (err !== null || resolved.length === 0) {
          this.#failed(err?.code ?? 'ENOTFOUND');
          return;
        }
        this.#resolved = resolved;
        this.#connect(resolved[0].address, resolved[0].family, port);
      });
    } catch (err) {
      // dns.lookup throws, rather than calls back, on a name it refuses outright (a NUL byte). The
      // validator never lets such a name into a table; should one get there anyway, it is one
      // failed dial, not an exception that ends the process and every relay in it.
      this.#failed((err as NodeJS.ErrnoException).code ?? 'EINVAL');
    }
  }

  /** Abandons the dial (the connection is over): its socket, if any, is closed. */
  cancel(): void {
    this.#over = true;
    this.#clearTimer();
    this.#sock?.close();
    this.#sock = null;
  }

  /**
   * Dials one address. The backend is read from the moment its socket exists: libuv then registers
   * it with epoll once for both the connect (POLLOUT) and reads (POLLIN). Started after the connect,
   * reading costs a second registration, which libuv first tries as an add that fails (the socket
   * is still in the epoll set) and then repeats as a change: one io_uring round trip more per
   * connection. Nothing is read before the relay starts: libuv reports a socket's connect before
   * any read, and the connect callback starts the relay.
   */
  #connect(address: string, family: number, port: number): void {
    this.#port = port;
    const sock = newTcpHandle() as PumpHandle;
    sock.onread = onRead;
    sock.useUserBuffer(scratch);
    this.#sock = sock;
    const req = newConnectRequest() as PendingConnect;
    req.dial = this;
    req.oncomplete = Dial.#onConnect;
    let err = family === 6 ? sock.connect6(req, address, port) : sock.connect(req, address, port);
    if (err === 0) err = sock.readStart();
    if (err !== 0) {
      this.#failed(errorName(err));
      return;
    }
    const host = this.#host;
    this.#loop = host.dialLoops(address, port);
    if (this.#loop) {
      // The backend's name resolved to the router itself. The connection is made (its local
      // address is known only now), so that the router sees it arrive and counts the loop; this
      // side sends nothing on it and, once connected, turns to the next address or the fallback.
      host.expectLoop(localOf(sock), this.#owner.route);
      return;
    }
    // A backend on loopback is watched by the kernel itself (it resets a dead peer's connections);
    // one across a network may vanish without a word.
    const ka = host.settings.tcpKeepaliveMs;
    if (ka > 0 && !isLoopback(address)) sock.setKeepAlive(true, ka / 1000);
  }

  static #onConnect(this: PendingConnect, status: number, sock: PumpHandle): void {
    const d = this.dial!;
    this.dial = null;
    // An abandoned attempt (timed out, or the connection finished meanwhile) has been closed.
    if (d.#sock !== sock || d.#over) return;
    if (d.#loop) {
      d.#failed('ELOOP');
      return;
    }
    if (status >= 0) {
      d.#clearTimer();
      d.#resolved = null;
      d.#sock = null;
      d.#over = true;
      // The relay first (the backend waits for the hello), the bookkeeping after.
      d.#owner.connected(d, sock);
      d.#host.dialSucceeded(d.backend.addrs[d.addrIndex]);
      return;
    }
    const resolved = d.#resolved;
    if (resolved !== null && resolved.length > 1) {
      // The next address of the same host name, within the same dial (and its timeout).
      resolved.shift();
      sock.close();
      d.#connect(resolved[0].address, resolved[0].family, d.#port);
      return;
    }
    d.#failed(errorName(status));
  }

  static #onTimeout(d: Dial): void {
    d.#timer = null;
    if (!d.#over) d.#failed('ETIMEDOUT');
  }

  #clearTimer(): void {
    if (this.#timer !== null) {
      clearTimeout(this.#timer);
      this.#timer = null;
    }
  }

  /** This address failed: note it (cooldown, metric, log) and dial the next. */
  #failed(code: string): void {
    this.#clearTimer();
    if (this.#sock !== null) {
      this.#sock.close();
      this.#sock = null;
    }
    this.#resolved = null;
    this.#loop = false;
    this.#host.dialFailed(this.backend, this.backend.addrs[this.addrIndex], code);
    this.addrIndex++;
    this.next();
  }
}
