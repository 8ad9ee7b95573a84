// The routing decision, and with it the stealth rule: the product's most important policy, as pure
// functions of the ClientHello verdict, the table and the settings. No sockets, no timers.
//
// The stealth rule: the router never speaks. Whatever it cannot route (not TLS, a malformed or
// incomplete ClientHello, no SNI, no matching route, a ClientHello timeout, a backend that cannot be
// reached) goes to the fallback with every byte read so far, so that a prober sees exactly what the
// fallback shows. Only overload (the connection limits, decided before a connection exists) and
// `unroutable: close` make the router close a connection itself.
import type { BackendSpec } from '../model/route.ts';
import type { HelloVerdict } from './clienthello.ts';
import type { RouteTable } from './table.ts';

/** The `route` label of a connection that no route took. */
export const FALLBACK_ROUTE = 'fallback';

export interface RoutingPolicy {
  readonly unroutable: 'fallback' | 'close';
  readonly acmeTlsAlpn: 'fallback' | 'route';
}

/** What to do with a connection once its first bytes are judged. */
export type Decision =
  /** Dial `backend`; `fallback` says it is the fallback (no other backend to turn to if it fails). */
  | { readonly kind: 'dial'; readonly backend: BackendSpec; readonly route: string; readonly fallback: boolean }
  /** Close it: `closed` by the router (unroutable: close, or nothing to forward), `reset` (the client is gone). */
  | { readonly kind: 'close'; readonly route: string; readonly result: 'closed' | 'reset' };

/** What the connection knows besides the verdict. */
export interface HelloContext {
  /** Bytes read from the client so far (what the fallback would be sent). */
  readonly buffered: number;
  /** The client's connection failed (reset) before a backend was dialled. */
  readonly clientGone: boolean;
}

/** The fallback, or closing under `unroutable: close`. */
export function unroutable(table: RouteTable, policy: RoutingPolicy): Decision {
  return policy.unroutable === 'close'
    ? { kind: 'close', route: FALLBACK_ROUTE, result: 'closed' }
    : { kind: 'dial', backend: table.fallback, route: FALLBACK_ROUTE, fallback: true };
}

/**
 * Where a connection goes, from its ClientHello verdict.
 * - A ClientHello offering `acme-tls/1` goes to the fallback whatever its name (`acme_tls_alpn:
 *   fallback`): Caddy answers TLS-ALPN-01 challenges, also for names routed to TURN.
 * - A ClientHello whose name and ALPN match a route goes to that route's backend.
 * - Anything else (no SNI, no route, not a ClientHello at all) is unroutable: the fallback, with
 *   every byte read, or closed under `unroutable: close`.
 * - A client that left without sending a byte leaves nothing to forward: closed. One whose
 *   connection failed before the dial: there is nobody to relay for (`reset`).
 */
export function decide(verdict: HelloVerdict, table: RouteTable, policy: RoutingPolicy, ctx: HelloContext): Decision {
  let decision: Decision;
  if (verdict.kind === 'hello') {
    const { sni, alpn } = verdict.hello;
    const acme = alpn !== null && policy.acmeTlsAlpn === 'fallback' && alpn.includes('acme-tls/1');
    const route = acme || sni === null ? null : table.lookup(sni, alpn);
    decision = route !== null
      ? { kind: 'dial', backend: route.backend, route: route.match, fallback: false }
      : unroutable(table, policy);
  } else if (verdict.reason === 'closed' && ctx.buffered === 0) {
    return { kind: 'close', route: FALLBACK_ROUTE, result: 'closed' };
  } else {
    decision = unroutable(table, policy);
  }
  if (decision.kind === 'dial' && ctx.clientGone) return { kind: 'close', route: decision.route, result: 'reset' };
  return decision;
}

/**
 * Every address of a routed connection's backend failed: it goes to the fallback like any
 * connection that cannot be routed (closing it at once would tell a prober that the name leads
 * somewhere else). The fallback's own failure, or `unroutable: close`, ends it: null.
 */
export function afterDialFailure(failed: Decision & { kind: 'dial' }, table: RouteTable, policy: RoutingPolicy): (Decision & { kind: 'dial' }) | null {
  if (failed.fallback || policy.unroutable === 'close') return null;
  return { kind: 'dial', backend: table.fallback, route: FALLBACK_ROUTE, fallback: true };
}
