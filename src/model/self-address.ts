// Is an address one of the router's own? A route whose backend is the router itself makes every
// connection to it open another to itself, until descriptors or the connection limit run out.
// Pure: the caller says which addresses are local (network interfaces are read at the edge).
import { isIP } from 'node:net';

/** Where the router listens: host undefined (or "::", "0.0.0.0") is every local address. */
export interface ListenEndpoint {
  readonly host: string | undefined;
  readonly port: number;
}

/** 127.0.0.0/8, ::1, and IPv4-mapped loopback. */
export function isLoopback(ip: string): boolean {
  const v4 = ip.startsWith('::ffff:') ? ip.slice(7) : ip;
  return v4.startsWith('127.') || ip === '::1';
}

/** 0.0.0.0 and ::: a connect to it reaches the local host. */
export function isUnspecified(ip: string): boolean {
  return ip === '0.0.0.0' || ip === '::' || ip === '::ffff:0.0.0.0';
}

function normalizeIp(ip: string): string {
  const plain = ip.startsWith('[') && ip.endsWith(']') ? ip.slice(1, -1) : ip;
  const unzoned = plain.includes('%') ? plain.slice(0, plain.indexOf('%')) : plain;
  return unzoned.startsWith('::ffff:') && isIP(unzoned.slice(7)) === 4 ? unzoned.slice(7) : unzoned.toLowerCase();
}

/**
 * True when dialling ip:port reaches one of the router's own listeners. `localIps` holds the host's
 * interface addresses (loopback and unspecified addresses count as local whatever it holds).
 */
export function reachesListener(ip: string, port: number, listen: readonly ListenEndpoint[], localIps: ReadonlySet<string>): boolean {
  const target = normalizeIp(ip);
  const local = isLoopback(target) || isUnspecified(target) || localIps.has(target);
  if (!local) return false;
  for (const l of listen) {
    if (l.port !== port) continue;
    const host = l.host === undefined ? undefined : normalizeIp(l.host);
    if (host === undefined || isUnspecified(host)) return true;
    // A listener on one address is reached by a dial to that address, or to "any" (0.0.0.0 reaches
    // 127.0.0.1's listener, and a loopback listener is what a dial to another loopback address hits
    // only when it is that address).
    if (host === target || isUnspecified(target)) return true;
  }
  return false;
}

/**
 * True when "host:port" (a backend address as written) is one of the router's listen addresses, as
 * far as can be told without resolving names: an IP literal. A host name (localhost included) is
 * resolved at each dial, and what it resolves to then is checked there (the relay's loop guard).
 */
export function isOwnAddress(addr: string, listen: readonly ListenEndpoint[], localIps: ReadonlySet<string>): boolean {
  const split = addr.lastIndexOf(':');
  if (split < 0) return false;
  const host = addr.startsWith('[') ? addr.slice(1, split - 1) : addr.slice(0, split);
  const port = Number(addr.slice(split + 1));
  return isIP(normalizeIp(host)) !== 0 && reachesListener(host, port, listen, localIps);
}

/** Why a backend address is refused as the router's own. */
export function selfMessage(what: string, addr: string): string {
  return `${what}: ${addr} is the router's own listen address: every connection to it would connect to the router again`;
}
