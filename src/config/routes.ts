// Routes and backends from plain values: the config file, a routes file, a Redis hash entry or a
// PostgreSQL row all pass through here, so every source accepts exactly the same route shapes.
import { isIP } from 'node:net';
import { type AlpnCondition, type BackendSpec, type ProxyProtocol, type RouteSpec, clip, normalizeName, patternError, quote } from '../model/route.ts';
import type { ListenAddress } from './types.ts';
import { ValueError, type Path, list, nonEmpty, object, oneOf, pathText, string } from './values.ts';

export interface HostPort {
  readonly host: string;
  readonly port: number;
}

/** What an address may be written with: printable ASCII, no spaces (and so no NUL). */
const ADDRESS_TEXT = /^[\x21-\x7e]{1,300}$/;
/** A host name to resolve: DNS labels of letters, digits, '-' and '_', at most 253 characters. */
const HOST_NAME = /^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$/;
/** An IPv6 zone, as in [fe80::1%eth0]: an interface name. */
const ZONE = /%[A-Za-z0-9_.-]{1,15}$/;

/** Splits "host:port", "[v6]:port" or ":port" (empty host). Returns an error message or the parts. */
export function splitHostPort(text: string): HostPort | string {
  if (!ADDRESS_TEXT.test(text)) {
    return `"${clip(JSON.stringify(text).slice(1, -1))}" is not an address (printable ASCII without spaces, at most 300 characters)`;
  }
  let host: string;
  let portText: string;
  if (text.startsWith('[')) {
    const close = text.indexOf(']');
    if (close < 0 || text[close + 1] !== ':') return `"${clip(text)}" is not [address]:port`;
    host = text.slice(1, close);
    portText = text.slice(close + 2);
    const zone = ZONE.exec(host);
    if (isIP(zone === null ? host : host.slice(0, zone.index)) !== 6 || (zone === null && host.includes('%'))) {
      return `"${clip(host)}" in "${clip(text)}" is not an IPv6 address`;
    }
  } else {
    const colon = text.lastIndexOf(':');
    if (colon < 0) return `"${clip(text)}" has no port (write host:port)`;
    host = text.slice(0, colon);
    portText = text.slice(colon + 1);
    if (host.includes(':')) return `"${clip(text)}": write an IPv6 address in brackets, as [${clip(host)}]:${clip(portText, 10)}`;
    if (host !== '' && host !== '*' && isIP(host) === 0 && !HOST_NAME.test(host)) {
      return `"${clip(host)}" in "${clip(text)}" is neither an IP address nor a host name`;
    }
  }
  if (!/^\d{1,5}$/.test(portText) || Number(portText) > 65535) return `"${clip(text)}" has no valid port`;
  return { host, port: Number(portText) };
}

export function backendAddress(v: unknown, path: Path): string {
  const text = nonEmpty(v, path).trim();
  const hp = splitHostPort(text);
  if (typeof hp === 'string') throw new ValueError(path, `${pathText(path)}: ${hp}`);
  if (hp.host === '' || hp.host === '*') throw new ValueError(path, `${pathText(path)}: "${text}" needs a host to dial`);
  if (hp.port === 0) throw new ValueError(path, `${pathText(path)}: port 0 cannot be dialled`);
  return text;
}

export function listenAddress(v: unknown, path: Path): ListenAddress {
  const text = nonEmpty(v, path).trim();
  const hp = splitHostPort(text);
  if (typeof hp === 'string') throw new ValueError(path, `${pathText(path)}: ${hp}`);
  const host = hp.host === '' || hp.host === '*' ? undefined : hp.host;
  return { host, port: hp.port, text };
}

const BACKEND_KEYS = ['name', 'addr', 'addrs', 'proxy_protocol'] as const;

export function backend(v: unknown, path: Path, defaultName?: string): BackendSpec {
  const o = object(v, path, BACKEND_KEYS);
  let addrs: string[];
  if (o.addr !== undefined && o.addrs !== undefined) {
    throw new ValueError([...path, 'addrs'], `${pathText(path)}: write addr or addrs, not both`);
  } else if (o.addr !== undefined) {
    addrs = [backendAddress(o.addr, [...path, 'addr'])];
  } else if (o.addrs !== undefined) {
    const raw = list(o.addrs, [...path, 'addrs']);
    if (raw.length === 0) throw new ValueError([...path, 'addrs'], `${pathText(path)}.addrs must not be empty`);
    addrs = raw.map((a, i) => backendAddress(a, [...path, 'addrs', i]));
  } else {
    throw new ValueError(path, `${pathText(path)} needs addr (or addrs)`);
  }
  const name = o.name === undefined || o.name === null ? (defaultName ?? addrs[0]) : backendName(o.name, [...path, 'name']);
  const proxyProtocol = o.proxy_protocol === undefined || o.proxy_protocol === null || o.proxy_protocol === false
    ? null
    : oneOf<ProxyProtocol>(o.proxy_protocol, [...path, 'proxy_protocol'], ['v1', 'v2']);
  return Object.freeze({ name, addrs: Object.freeze(addrs), proxyProtocol });
}

/**
 * A backend's name: it becomes the `backend` label of several series and a field of log lines, so
 * it is bounded: printable ASCII, at most 128 characters.
 */
export function backendName(v: unknown, path: Path): string {
  const s = nonEmpty(v, path).trim();
  if (!/^[\x20-\x7e]{1,128}$/.test(s)) {
    throw new ValueError(path, `${pathText(path)} must be 1 to 128 printable ASCII characters, got ${quote(s)}`);
  }
  return s;
}

/** An ALPN protocol name as a route may name it: printable ASCII without ',' or spaces, 1 to 255 bytes. */
const PROTOCOL = /^[\x21-\x2b\x2d-\x7e]{1,255}$/;
const MAX_PROTOCOLS = 16;

/**
 * The same verdict from every origin: `none`, `any`, a list, or a string naming protocols separated
 * by commas ("h2,http/1.1", as a database column holds them). An empty string or list is refused,
 * not taken as "no condition": the author meant something, and a route that can never match (or
 * that matches every client of a stealth name) is worse than a skipped one.
 */
export function alpnCondition(v: unknown, path: Path): AlpnCondition | null {
  if (v === undefined || v === null) return null;
  let raw: unknown[];
  if (typeof v === 'string') {
    const text = v.trim();
    if (text === 'none') return { kind: 'none' };
    if (text === 'any') return { kind: 'any' };
    if (text === '') throw new ValueError(path, `${pathText(path)} is empty: write none, any or the protocols (or leave alpn out)`);
    raw = text.split(',').map((p) => p.trim());
  } else {
    raw = list(v, path);
    if (raw.length === 0) throw new ValueError(path, `${pathText(path)} must name at least one protocol (or be none / any)`);
  }
  if (raw.length > MAX_PROTOCOLS) throw new ValueError(path, `${pathText(path)} names more than ${MAX_PROTOCOLS} protocols`);
  const protocols = raw.map((p, i) => {
    const s = string(p, [...path, i]);
    if (!PROTOCOL.test(s)) {
      throw new ValueError([...path, i], `${pathText([...path, i])} must be a protocol name of 1 to 255 printable ASCII `
        + `characters without ',' or spaces, got ${quote(s)}`);
    }
    return s;
  });
  return { kind: 'list', protocols: Object.freeze(protocols) };
}

export function matchPattern(v: unknown, path: Path): string {
  const text = nonEmpty(v, path).trim();
  // Before lowercasing: Unicode lowercases some letters to ASCII ("\u212A" KELVIN SIGN to "k"), which
  // would turn a name no client can send into one that matches another route's.
  if (!/^[\x21-\x7e]{1,255}$/.test(text)) {
    throw new ValueError(path, `${pathText(path)}: ${quote(text)} is not a host name pattern (ASCII letters, digits, '-', '_', '.', a leading '*.' or '**.', at most 255 characters)`);
  }
  const match = normalizeName(text);
  const err = patternError(match);
  if (err !== null) throw new ValueError(path, `${pathText(path)}: ${err}`);
  return match;
}

const ROUTE_KEYS = ['match', 'alpn', 'backend', 'namespace'] as const;

/** A namespace: one DNS label (letters, digits, '-'). */
const NAMESPACE = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/i;

export function isNamespaceLabel(s: string): boolean {
  return NAMESPACE.test(s);
}

export function namespaceName(v: unknown, path: Path): string {
  const s = string(v, path);
  if (!NAMESPACE.test(s)) {
    throw new ValueError(path, `${pathText(path)}: namespace ${quote(s)} is not a DNS label `
      + "(letters, digits and '-', not at either end, at most 63 characters)");
  }
  return s;
}

export function route(v: unknown, path: Path, source: string): RouteSpec {
  const o = object(v, path, ROUTE_KEYS);
  if (o.match === undefined) throw new ValueError(path, `${pathText(path)} needs match`);
  if (o.backend === undefined) throw new ValueError(path, `${pathText(path)} needs backend`);
  return Object.freeze({
    match: matchPattern(o.match, [...path, 'match']),
    alpn: alpnCondition(o.alpn, [...path, 'alpn']),
    backend: backend(o.backend, [...path, 'backend']),
    source,
    namespace: o.namespace === undefined || o.namespace === null ? null : namespaceName(o.namespace, [...path, 'namespace']),
  });
}

export function routeList(v: unknown, path: Path, source: string): RouteSpec[] {
  if (v === undefined || v === null) return [];
  return list(v, path).map((r, i) => route(r, [...path, i], source));
}
