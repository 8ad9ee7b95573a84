// The runtime half of the loop guard: a dial whose address turns out to be the router itself (a
// backend host name that resolves to it) is expected back, and the connection it makes is
// recognized when it arrives. The static half (a route to one of the router's own IP addresses is
// refused) is in config and the composer.
import type { AddressInfo } from 'node:net';
import { localInterfaceAddresses } from '../host.ts';
import { type ListenEndpoint, reachesListener } from '../model/self-address.ts';
import { unmapIPv4 } from './proxyprotocol.ts';

/** A loop dial whose connection never arrives (the backlog was full) is forgotten after this. */
const EXPECT_MS = 10_000;

export class LoopGuard {
  /** Where the server listens, as bound: a dial to one of these is a loop. */
  readonly #own: ListenEndpoint[] = [];
  readonly #ports = new Set<number>();
  /** Local address "ip|port" of each dial to the router itself → the route it looped on, until it arrives. */
  readonly #expected = new Map<string, { route: string; at: number }>();

  listening(bound: AddressInfo): void {
    this.#own.push({ host: bound.address, port: bound.port });
    this.#ports.add(bound.port);
  }

  /** True when dialling ip:port reaches the router: one Set lookup for any other port. */
  dialLoops(ip: string, port: number): boolean {
    return this.#ports.has(port) && reachesListener(ip, port, this.#own, localInterfaceAddresses());
  }

  expect(local: { readonly address?: string; readonly port?: number }, route: string): void {
    if (local.address === undefined || local.port === undefined) return;
    this.#expected.set(`${unmapIPv4(local.address)}|${local.port}`, { route, at: Date.now() });
  }

  /** Whether any looped connection is expected (only then is an accepted client's address looked up). */
  get expecting(): boolean {
    return this.#expected.size > 0;
  }

  /** The route a connection from ip:port looped on (and it is no longer expected), or null. */
  arrived(ip: string, port: number | null): string | null {
    const key = `${ip}|${port}`;
    const loop = this.#expected.get(key);
    if (loop === undefined) return null;
    this.#expected.delete(key);
    return loop.route;
  }

  /** Forgets expected loops that never arrived. */
  sweep(): void {
    if (this.#expected.size === 0) return;
    const old = Date.now() - EXPECT_MS;
    for (const [key, loop] of this.#expected) if (loop.at < old) this.#expected.delete(key);
  }
}
