// The route model: what a route, a backend and an ALPN condition are, shared by the config loader,
// the sources, the composer, the route table and the data plane. Pure values and functions; no I/O.

/** ALPN condition of a route: absent (null) means "whatever the client offers". */
export type AlpnCondition =
  | { readonly kind: 'none' } // offers no ALPN
  | { readonly kind: 'any' } // offers at least one protocol
  | { readonly kind: 'list'; readonly protocols: readonly string[] }; // offers at least one of these

export type ProxyProtocol = 'v1' | 'v2';

export interface BackendSpec {
  readonly name: string;
  /** "host:port" or "[v6]:port", tried in order. */
  readonly addrs: readonly string[];
  readonly proxyProtocol: ProxyProtocol | null;
}

export interface RouteSpec {
  /** Normalized pattern: "name", "*.suffix" or "**.suffix". */
  readonly match: string;
  readonly alpn: AlpnCondition | null;
  readonly backend: BackendSpec;
  /** Where the route came from: "config", or a source's name. */
  readonly source: string;
  /** The namespace the route belongs to (a DNS label), when its source says. */
  readonly namespace: string | null;
}

/** Lowercases and removes one trailing dot, as the contract says for SNI and patterns alike. */
export function normalizeName(name: string): string {
  const lower = name.toLowerCase();
  return lower.endsWith('.') ? lower.slice(0, -1) : lower;
}

const LABEL = /^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$/;

/** Returns an error message for a pattern that cannot match anything sensible, else null. */
export function patternError(match: string): string | null {
  if (match.length === 0) return 'match is empty';
  let rest = match;
  if (match.startsWith('**.')) rest = match.slice(3);
  else if (match.startsWith('*.')) rest = match.slice(2);
  if (rest.length === 0 || rest.length > 253) return `match "${clip(match)}" has no valid name after the wildcard`;
  for (const label of rest.split('.')) {
    if (!LABEL.test(label)) {
      return label.includes('*')
        ? `match "${clip(match)}": a wildcard is allowed only as the first label ("*." or "**.")`
        : `match "${clip(match)}": "${clip(label)}" is not a valid DNS label`;
    }
  }
  return null;
}

/** A stable key for "same match and same alpn", the unit of conflict between sources. */
export function routeKey(route: Pick<RouteSpec, 'match' | 'alpn'>): string {
  return `${route.match}|${alpnKey(route.alpn)}`;
}

export function alpnKey(alpn: AlpnCondition | null): string {
  if (alpn === null) return '';
  if (alpn.kind === 'list') return `[${alpn.protocols.join(',')}]`;
  return alpn.kind;
}

export function alpnMatches(cond: AlpnCondition | null, offered: readonly string[] | null): boolean {
  if (cond === null) return true;
  switch (cond.kind) {
    case 'none':
      return offered === null || offered.length === 0;
    case 'any':
      return offered !== null && offered.length > 0;
    case 'list':
      if (offered === null) return false;
      for (const p of cond.protocols) if (offered.includes(p)) return true;
      return false;
  }
}

/** Same name, addresses (in order) and PROXY protocol version. */
export function sameBackend(a: BackendSpec, b: BackendSpec): boolean {
  if (a === b) return true;
  if (a.name !== b.name || a.proxyProtocol !== b.proxyProtocol || a.addrs.length !== b.addrs.length) return false;
  for (let i = 0; i < a.addrs.length; i++) if (a.addrs[i] !== b.addrs[i]) return false;
  return true;
}

/** "turn-tls 127.0.0.1:5349 proxy_protocol=v2", for logs and `check`. */
export function describeBackend(b: BackendSpec): string {
  return `${b.name} ${b.addrs.join(',')}${b.proxyProtocol === null ? '' : ` proxy_protocol=${b.proxyProtocol}`}`;
}

/** "cdn.example.com alpn=none -> turn-tls 127.0.0.1:5349 [config]", for logs and `check`. */
export function describeRoute(r: RouteSpec): string {
  const alpn = alpnKey(r.alpn);
  const ns = r.namespace === null ? '' : ` namespace=${r.namespace}`;
  return `${r.match}${alpn === '' ? '' : ` alpn=${alpn}`} -> ${describeBackend(r.backend)} [${r.source}${ns}]`;
}

/** A value cut to a length fit for a log line or an error message. */
export function clip(text: string, max = 80): string {
  return text.length <= max ? text : `${text.slice(0, max)}… (${text.length} characters)`;
}

/** A value in double quotes for an error message: clipped, and every non-ASCII or control character escaped. */
export function quote(text: string, max = 80): string {
  return JSON.stringify(clip(text, max)).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}
