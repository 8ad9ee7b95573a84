// Routes and backends from plain values: the config file, a routes file, a Redis hash entry or a
// PostgreSQL row all pass through here, so every source accepts exactly the same route shapes.
import { isIP } from 'node:net';
import { type AlpnCondition, type BackendSpec, type ProxyProtocol, type RouteSpec, clip, normalizeName, patternError } from '../model/route.ts';
import type { ListenAddress } from './types.ts';
import { ValueError, type Path, list, nonEmpty, object, oneOf, pathText, string } from './values.ts';

export interface HostPort {
  readonly host: string;
  readonly port: number;
}

/** Splits "host:port", "[v6]:port" or ":port" (empty host). Returns an error message or the parts. */
export function splitHostPort(text: string): HostPort | string {
  let host: string;
  let portText: string;
  if (text.startsWith('[')) {
    const close = text.indexOf(']');
    if (close < 0 || text[close + 1] !== ':') return `"${text}" is not [address]:port`;
    host = text.slice(1, close);
    portText = text.slice(close + 2);
    if (isIP(host) !== 6) return `"${host}" in "${text}" is not an IPv6 address`;
  } else {
    const colon = text.lastIndexOf(':');
    if (colon < 0) return `"${text}" has no port (write host:port)`;
    host = text.slice(0, colon);
    portText = text.slice(colon + 1);
    if (host.includes(':')) return `"${text}": write an IPv6 address in brackets, as [${host}]:${portText}`;
  }
  if (!/^\d{1,5}$/.test(portText) || Number(portText) > 65535) return `"${text}" has no valid port`;
  return { host, port: Number(portText) };
}

export function backendAddress(v: unknown, path: Path): string {
  const text = nonEmpty(v, path).trim();
  const hp = splitHostPort(text);
  if (typeof hp === 'string') throw new ValueError(path, `${pathText(path)}: ${hp}`);
  if (hp.host === '') throw new ValueError(path, `${pathText(path)}: "${text}" needs a host to dial`);
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
  const name = o.name === undefined || o.name === null ? (defaultName ?? addrs[0]) : nonEmpty(o.name, [...path, 'name']);
  const proxyProtocol = o.proxy_protocol === undefined || o.proxy_protocol === null || o.proxy_protocol === false
    ? null
    : oneOf<ProxyProtocol>(o.proxy_protocol, [...path, 'proxy_protocol'], ['v1', 'v2']);
  return Object.freeze({ name, addrs: Object.freeze(addrs), proxyProtocol });
}

export function alpnCondition(v: unknown, path: Path): AlpnCondition | null {
  if (v === undefined || v === null) return null;
  if (typeof v === 'string') {
    if (v === 'none') return { kind: 'none' };
    if (v === 'any') return { kind: 'any' };
    // A single protocol written without brackets.
    return { kind: 'list', protocols: [v] };
  }
  const raw = list(v, path);
  if (raw.length === 0) throw new ValueError(path, `${pathText(path)} must name at least one protocol (or be none / any)`);
  const protocols = raw.map((p, i) => {
    const s = string(p, [...path, i]);
    if (s.length === 0 || s.length > 255) throw new ValueError([...path, i], `${pathText([...path, i])} must be 1 to 255 bytes`);
    return s;
  });
  return { kind: 'list', protocols: Object.freeze(protocols) };
}

export function matchPattern(v: unknown, path: Path): string {
  const match = normalizeName(nonEmpty(v, path).trim());
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
    throw new ValueError(path, `${pathText(path)}: namespace ${JSON.stringify(clip(s))} is not a DNS label `
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
