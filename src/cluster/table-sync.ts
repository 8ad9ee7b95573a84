// Keeps the workers' route tables equal to the primary's, sending only what changed.
//
// Sending a whole 100,000-route table over the IPC channel on every change costs each worker the
// JSON parse of every route (~70 ms here) on top of building its table; a change set costs only
// the patterns that changed. Routes are compared by identity first (the composer passes on the
// route objects of sources that did not change), then field by field.
import { RouteTable } from '../router/table.ts';
import { type AlpnCondition, type BackendSpec, type RouteSpec, sameBackend } from '../model/route.ts';
import type { TableChange } from './protocol.ts';

/** A pattern's routes: most patterns have one, kept as it is (no array per pattern). */
type Pattern = RouteSpec | RouteSpec[];

function sameAlpn(a: AlpnCondition | null, b: AlpnCondition | null): boolean {
  if (a === b) return true;
  if (a === null || b === null || a.kind !== b.kind) return false;
  if (a.kind !== 'list' || b.kind !== 'list') return true;
  return a.protocols.length === b.protocols.length && a.protocols.every((p, i) => p === b.protocols[i]);
}

function sameRoute(a: RouteSpec, b: RouteSpec): boolean {
  return a === b || (a.match === b.match && a.source === b.source && a.namespace === b.namespace && sameAlpn(a.alpn, b.alpn) && sameBackend(a.backend, b.backend));
}

function samePattern(a: Pattern, b: Pattern): boolean {
  if (!Array.isArray(a) || !Array.isArray(b)) return !Array.isArray(a) && !Array.isArray(b) && sameRoute(a, b);
  return a.length === b.length && a.every((r, i) => sameRoute(r, b[i]));
}

function byPattern(routes: readonly RouteSpec[]): Map<string, Pattern> {
  const patterns = new Map<string, Pattern>();
  for (const r of routes) {
    const p = patterns.get(r.match);
    if (p === undefined) patterns.set(r.match, r);
    else if (Array.isArray(p)) p.push(r);
    else patterns.set(r.match, [p, r]);
  }
  return patterns;
}

const asList = (p: Pattern): RouteSpec[] => (Array.isArray(p) ? p : [p]);

/** The primary's side: remembers the last table it described and describes the next one as a change. */
export class TablePublisher {
  #patterns: Map<string, Pattern>;
  #fallback: BackendSpec;
  #generation: number;

  constructor(table: RouteTable, generation: number) {
    this.#patterns = byPattern(table.routes);
    this.#fallback = table.fallback;
    this.#generation = generation;
  }

  /** Everything, for a worker that starts. */
  full(): TableChange {
    return { generation: this.#generation, set: [...this.#patterns.values()].map(asList), delete: [], fallback: this.#fallback };
  }

  /** What changed since the last call (or construction); the table becomes the new base. */
  change(table: RouteTable, generation: number): TableChange {
    const next = byPattern(table.routes);
    const set: RouteSpec[][] = [];
    const del: string[] = [];
    for (const [match, routes] of next) {
      const before = this.#patterns.get(match);
      if (before === undefined || !samePattern(before, routes)) set.push(asList(routes));
    }
    for (const match of this.#patterns.keys()) if (!next.has(match)) del.push(match);
    this.#patterns = next;
    this.#fallback = table.fallback;
    this.#generation = generation;
    return { generation, set, delete: del, fallback: table.fallback };
  }
}

/** The worker's side: the routes by pattern, and the table built from them. */
export class TableReplica {
  readonly #patterns = new Map<string, readonly RouteSpec[]>();
  #generation = 0;

  get generation(): number {
    return this.#generation;
  }

  /** Applies a change; returns the routes of the table it describes (see RouteTable, RouteTable.build). */
  update(change: TableChange): readonly RouteSpec[] {
    for (const match of change.delete) this.#patterns.delete(match);
    for (const routes of change.set) {
      if (routes.length > 0) this.#patterns.set(routes[0].match, routes);
    }
    this.#generation = change.generation;
    const routes: RouteSpec[] = [];
    for (const group of this.#patterns.values()) for (const r of group) routes.push(r);
    return routes;
  }

  /** Applies a change and builds the table it describes, in one piece. */
  apply(change: TableChange): RouteTable {
    return new RouteTable(this.update(change), change.fallback);
  }
}
