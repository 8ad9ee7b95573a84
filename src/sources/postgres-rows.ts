// What the PostgreSQL source asks and how it turns the answer into routes: the default query over
// the namespace tables, the digest that tells an unchanged result without transferring it, and
// rows to snapshots, validated in slices so that a big table never holds up the data plane.
import { createHash } from 'node:crypto';
import { backendAddress, isNamespaceLabel, route } from '../config/routes.ts';
import { type Template, fillTemplate, parseTemplate } from '../config/template.ts';
import type { NameTemplate } from '../config/types.ts';
import { type AlpnCondition, type BackendSpec, type RouteSpec, clip, normalizeName, patternError } from '../model/route.ts';
import type { InvalidEntry, Snapshot } from './source.ts';

/**
 * Whether namespace_webrtc_config has a stealth_enabled column (sql/schema.sql's does, the
 * namespace service's does not). Asked on every read, in the round trip that opens its
 * transaction, rather than read through to_jsonb(c) ->> 'stealth_enabled' in the query: that
 * works on either table too, but builds a JSON document of every row on every poll, which
 * doubled the server's time for the digest of 200,000 namespaces (305 ms to 650 ms, PostgreSQL
 * 15). Asked per read, not per connection, so that an ALTER TABLE is seen at the next read.
 */
export const BEGIN_AND_STEALTH_COLUMN = `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
SELECT EXISTS (SELECT FROM pg_attribute
                WHERE attrelid = to_regclass('namespace_webrtc_config') AND attname = 'stealth_enabled'
                  AND attnum > 0 AND NOT attisdropped) AS stealth_column`;

/**
 * The default query (over sql/schema.sql, or the namespace service's own tables): every enabled
 * namespace with a TURN port allocation on node $1, one row each; the names come from the
 * source's `names` templates. `enabled` (and `stealth_enabled`) may be boolean or integer 0/1: as
 * text, true is 'true' or '1' either way. Ordered, so that the digest of an unchanged table is the same.
 */
export function defaultQuery(stealthColumn: boolean): string {
  const stealth = stealthColumn ? "c.stealth_enabled::text IN ('true', '1')" : 'NULL::boolean';
  return `
SELECT c.namespace_name::text AS namespace,
       p.turn_tls_port::text AS port,
       ${stealth} AS stealth
  FROM namespace_webrtc_config c
  JOIN webrtc_port_allocations p
    ON p.namespace_cluster_id = c.namespace_cluster_id AND p.service_type = 'turn'
 WHERE c.enabled::text IN ('true', '1') AND p.node_id = $1::text
 ORDER BY c.namespace_name`;
}

/**
 * The digest of a query's whole result, computed by the server: only 64 hex digits cross the
 * wire. Rows in the order the query returns them (a reordering can change which route a client
 * gets). The query goes on lines of its own, so that a trailing `-- comment` cannot swallow the
 * closing parenthesis.
 */
export function digestQuery(query: string): string {
  const body = query.replace(/[\s;]+$/, '');
  return `SELECT encode(sha256(convert_to(coalesce(string_agg(q::text, E'\\n'), ''), 'UTF8')), 'hex') AS digest,
       count(*)::text AS rows
  FROM (
${body}
) q`;
}

/** How many rows are validated (or hashed) between two turns of the event loop. */
const SLICE_ROWS = 2000;

/** Lets pending I/O (connections being relayed and accepted) run before the next slice. */
function nextTurn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/**
 * The digest of rows read whole (a custom query the server cannot wrap): the columns and every
 * value, in order. Marked so that it never equals a digest the server made.
 */
export async function rowsDigest(fields: readonly string[], rows: readonly Record<string, unknown>[]): Promise<string> {
  const hash = createHash('sha256').update(JSON.stringify(fields));
  for (let i = 0; i < rows.length; i++) {
    if (i > 0 && i % SLICE_ROWS === 0) await nextTurn();
    hash.update('\n').update(JSON.stringify(Object.values(rows[i])) ?? '');
  }
  return `rows:${hash.digest('hex')}`;
}

export interface CompiledName {
  readonly match: Template;
  readonly name: Template;
  readonly alpn: AlpnCondition | null;
}

export function compileNames(names: readonly NameTemplate[]): CompiledName[] {
  const parse = (text: string): Template => {
    const t = parseTemplate(text);
    // The config loader has already refused every template that does not parse.
    if (typeof t === 'string') throw new Error(`name template "${text}": ${t}`);
    return t;
  };
  return names.map((n) => ({ match: parse(n.match), name: parse(n.name), alpn: n.alpn }));
}

const ALPN_NONE: AlpnCondition = Object.freeze({ kind: 'none' });

export interface NamespaceRowsOptions {
  readonly names: readonly CompiledName[];
  readonly params: Readonly<Record<string, string>>;
  /** The host TURN listens on; each row gives its port. */
  readonly backendHost: string;
  readonly source: string;
}

/**
 * The default query's rows (namespace, port, stealth) to routes, one per name template. A
 * namespace that is not a DNS label, or has no port, is skipped as one invalid entry; a name that
 * does not make a valid DNS name (too long) is skipped as another, and its siblings still apply.
 */
export async function snapshotFromNamespaces(rows: readonly Record<string, unknown>[], opts: NamespaceRowsOptions): Promise<Snapshot> {
  const routes: RouteSpec[] = [];
  const invalid: InvalidEntry[] = [];
  const values: Record<string, string> = { ...opts.params, namespace: '' };
  for (let i = 0; i < rows.length; i++) {
    if (i > 0 && i % SLICE_ROWS === 0) await nextTurn();
    const row = rows[i];
    const namespace = row.namespace;
    if (typeof namespace !== 'string' || !isNamespaceLabel(namespace)) {
      invalid.push({
        entry: `namespace ${JSON.stringify(clip(String(namespace)))}`,
        error: "the namespace name is not a DNS label (letters, digits and '-', not at either end, at most 63 characters)",
      });
      continue;
    }
    let backend: BackendSpec;
    values.namespace = namespace;
    try {
      if (row.port === null || row.port === undefined) throw new Error('its turn allocation on this node has no turn_tls_port');
      backend = Object.freeze({
        name: fillTemplate(opts.names[0].name, values),
        addrs: Object.freeze([backendAddress(`${opts.backendHost}:${String(row.port)}`, ['turn_tls_port'])]),
        proxyProtocol: null,
      });
    } catch (err) {
      invalid.push({ entry: `namespace ${JSON.stringify(namespace)}`, error: (err as Error).message });
      continue;
    }
    const stealth = row.stealth === true;
    for (const t of opts.names) {
      const match = normalizeName(fillTemplate(t.match, values));
      const err = patternError(match);
      if (err !== null) {
        // Not clipped: a label of at most 63 characters in a template checked at load is bounded.
        invalid.push({ entry: `match ${match}`, error: err });
        continue;
      }
      const name = fillTemplate(t.name, values);
      routes.push(Object.freeze({
        match,
        alpn: t.alpn ?? (stealth ? ALPN_NONE : null),
        // One backend for the namespace's names, unless a template names it otherwise.
        backend: name === backend.name ? backend : Object.freeze({ ...backend, name }),
        source: opts.source,
        namespace,
      }));
    }
  }
  return { routes, invalid };
}

/**
 * A custom query's rows (match, addr [, name, proxy_protocol, alpn, namespace]) to a snapshot: a
 * row that does not make a valid route is skipped and reported. Its entry is named by its match
 * where it has one, not by its position, so that it stays the same entry (logged once) while
 * other rows come and go.
 */
export async function snapshotFromRows(rows: readonly Record<string, unknown>[], source: string): Promise<Snapshot> {
  const routes: RouteSpec[] = [];
  const invalid: InvalidEntry[] = [];
  for (let i = 0; i < rows.length; i++) {
    if (i > 0 && i % SLICE_ROWS === 0) await nextTurn();
    const row = rows[i];
    try {
      const addr = row.addr;
      const addrs = Array.isArray(addr)
        ? addr
        : typeof addr === 'string' && addr.includes(',') ? addr.split(',').map((a) => a.trim()) : null;
      const backend: Record<string, unknown> = addrs === null ? { addr } : { addrs };
      if (row.name !== undefined && row.name !== null) backend.name = row.name;
      if (row.proxy_protocol !== undefined && row.proxy_protocol !== null) backend.proxy_protocol = row.proxy_protocol;
      // The alpn column is read by the same validator as every other source's alpn: NULL is no
      // condition, 'none', 'any', 'h2,http/1.1' or a text[]; '' is refused, as it is elsewhere.
      routes.push(route({ match: row.match, alpn: row.alpn, backend, namespace: row.namespace }, [], source));
    } catch (err) {
      invalid.push({ entry: typeof row.match === 'string' ? `match ${clip(row.match, 300)}` : `row ${i + 1}`, error: (err as Error).message });
    }
  }
  return { routes, invalid };
}

