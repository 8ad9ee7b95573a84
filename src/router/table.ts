// The route table: an immutable map from SNI (and ALPN) to a backend.
//
// Lookup cost does not depend on the number of routes: an exact name is one hash lookup, and each
// wildcard level is one more on a suffix of the name (a name has at most 127 labels). Nothing scans.

import {
  type BackendSpec, type RouteSpec, alpnKey, alpnMatches, sameBackend,
} from '../model/route.ts';

export interface RouteConflict {
  readonly winner: RouteSpec;
  readonly loser: RouteSpec;
}

/**
 * A table under construction: the pattern maps and what goes with them. Filled route by route,
 * so that a big table can be built in slices between which connections are served.
 */
class TableParts {
  readonly exact = new Map<string, RouteSpec[]>();
  readonly oneLabel = new Map<string, RouteSpec[]>();
  readonly anyLabels = new Map<string, RouteSpec[]>();
  /** 1 at each number of labels that some `*.` (`**.`) pattern's suffix has. */
  readonly oneDepth = new Uint8Array(256);
  readonly anyDepth = new Uint8Array(256);
  anyMinDepth = 256;
  readonly kept: RouteSpec[] = [];
  readonly conflicts: RouteConflict[] = [];
  /** Patterns holding more than one route: ordered when the table is finished. */
  readonly shared = new Set<RouteSpec[]>();

  /** Adds routes[from..to) in precedence order: on the same match and alpn the first one stays. */
  add(routes: readonly RouteSpec[], from: number, to: number): void {
    for (let i = from; i < to; i++) {
      const route = routes[i];
      let map = this.exact;
      let name = route.match;
      if (name.startsWith('**.')) {
        map = this.anyLabels;
        name = name.slice(3);
      } else if (name.startsWith('*.')) {
        map = this.oneLabel;
        name = name.slice(2);
      }
      const list = map.get(name);
      if (list === undefined) {
        if (map !== this.exact) {
          const depth = labelCount(name);
          if (map === this.oneLabel) {
            this.oneDepth[depth] = 1;
          } else {
            this.anyDepth[depth] = 1;
            if (depth < this.anyMinDepth) this.anyMinDepth = depth;
          }
        }
        map.set(name, [route]);
      } else {
        // Same match and alpn as a route already kept: a conflict (patterns hold a few routes).
        const key = alpnKey(route.alpn);
        const winner = list.find((r) => alpnKey(r.alpn) === key);
        if (winner !== undefined) {
          this.conflicts.push({ winner, loser: route });
          continue;
        }
        list.push(route);
        this.shared.add(list);
      }
      this.kept.push(route);
    }
  }

  /**
   * Within one pattern, routes with an ALPN condition are tried first, in order, then the one
   * without (a stable sort keeps their relative order).
   */
  finish(): void {
    for (const list of this.shared) list.sort((a, b) => (a.alpn === null ? 1 : 0) - (b.alpn === null ? 1 : 0));
  }
}

/** Routes added to a table between two turns of the event loop when it is built in slices (~5 ms). */
const BUILD_SLICE = 5000;
/** Patterns compared between two turns when tables are diffed in slices. */
const DIFF_SLICE = 20_000;

/** Gives the event loop a turn: pending reads, accepts and timers run before the next slice. */
export const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

export class RouteTable {
  readonly routes: readonly RouteSpec[];
  readonly fallback: BackendSpec;
  readonly conflicts: readonly RouteConflict[];
  readonly #exact: Map<string, RouteSpec[]>;
  readonly #oneLabel: Map<string, RouteSpec[]>;
  readonly #anyLabels: Map<string, RouteSpec[]>;
  readonly #oneDepth: Uint8Array;
  readonly #anyDepth: Uint8Array;
  readonly #anyMinDepth: number;

  /**
   * Builds a table from routes in precedence order. On the same match and alpn the first route
   * wins; the others are reported in `conflicts` and left out.
   */
  constructor(routes: readonly RouteSpec[], fallback: BackendSpec, built?: TableParts) {
    let parts = built;
    if (parts === undefined) {
      parts = new TableParts();
      parts.add(routes, 0, routes.length);
      parts.finish();
    }
    this.fallback = fallback;
    this.#exact = parts.exact;
    this.#oneLabel = parts.oneLabel;
    this.#anyLabels = parts.anyLabels;
    this.#oneDepth = parts.oneDepth;
    this.#anyDepth = parts.anyDepth;
    this.#anyMinDepth = parts.anyMinDepth;
    this.routes = Object.freeze(parts.kept);
    this.conflicts = Object.freeze(parts.conflicts);
  }

  /**
   * The same table, built in slices of a few thousand routes with a turn of the event loop between
   * them: 200,000 routes take ~150 ms to build, which in one piece would hold up every handshake.
   */
  static async build(routes: readonly RouteSpec[], fallback: BackendSpec): Promise<RouteTable> {
    const parts = new TableParts();
    for (let from = 0; from < routes.length; from += BUILD_SLICE) {
      if (from > 0) await nextTurn();
      parts.add(routes, from, Math.min(routes.length, from + BUILD_SLICE));
    }
    parts.finish();
    return new RouteTable(routes, fallback, parts);
  }

  /** The routes of one pattern ("a.example.com", "*.example.com", "**.example.com") in lookup order. */
  patternRoutes(match: string): readonly RouteSpec[] | undefined {
    if (match.startsWith('**.')) return this.#anyLabels.get(match.slice(3));
    if (match.startsWith('*.')) return this.#oneLabel.get(match.slice(2));
    return this.#exact.get(match);
  }

  /** The pattern maps (exact, `*.`, `**.`), for diffTables: name to routes in lookup order. */
  patterns(): readonly [ReadonlyMap<string, readonly RouteSpec[]>, ReadonlyMap<string, readonly RouteSpec[]>, ReadonlyMap<string, readonly RouteSpec[]>] {
    return [this.#exact, this.#oneLabel, this.#anyLabels];
  }

  /**
   * The route for a normalized SNI and the offered ALPN, or null for the fallback. Candidates are
   * tried from the most specific pattern down (exact, then the longest suffix, `*.` before `**.`);
   * the first whose ALPN condition holds wins. A suffix is looked up only if some wildcard pattern
   * has its number of labels, so a miss, or a name deeper than every pattern, costs few lookups.
   */
  lookup(sni: string, alpn: readonly string[] | null): RouteSpec | null {
    let hit = pick(this.#exact.get(sni), alpn);
    if (hit !== null) return hit;
    let dot = sni.indexOf('.');
    if (dot < 0) return null;
    let labels = labelCount(sni) - 1; // of the suffix after the first label
    const one = this.#oneDepth;
    const any = this.#anyDepth;
    if (one[labels] === 1 || any[labels] === 1) {
      const suffix = sni.slice(dot + 1);
      if (one[labels] === 1 && (hit = pick(this.#oneLabel.get(suffix), alpn)) !== null) return hit;
      if (any[labels] === 1 && (hit = pick(this.#anyLabels.get(suffix), alpn)) !== null) return hit;
    }
    while (labels > this.#anyMinDepth) {
      dot = sni.indexOf('.', dot + 1);
      if (dot < 0) return null;
      labels--;
      if (any[labels] === 1 && (hit = pick(this.#anyLabels.get(sni.slice(dot + 1)), alpn)) !== null) return hit;
    }
    return null;
  }
}

/** Labels in a name (a name has at most 127). */
function labelCount(name: string): number {
  let n = 1;
  for (let i = 0; i < name.length; i++) if (name.charCodeAt(i) === 0x2e) n++;
  return n;
}

export interface RouteDiff {
  readonly added: RouteSpec[];
  readonly removed: RouteSpec[];
  /** Same match and alpn, another backend or source; or, within one pattern, another order. */
  readonly changed: RouteSpec[];
}

/**
 * What changed from one table to the next, pattern by pattern over the tables' own maps: no
 * keys are built, and a poll that brings 100,000 unchanged routes costs a few map walks. The order
 * of routes matters only within one pattern (ALPN conditions are tried in order), so only there
 * is a reorder a change.
 */
export function diffTables(before: RouteTable, after: RouteTable): RouteDiff {
  const diff: RouteDiff = { added: [], removed: [], changed: [] };
  const steps = diffSteps(before, after, diff);
  while (!steps.next().done);
  return diff;
}

/** diffTables in slices, with a turn of the event loop between them. */
export async function diffTablesSliced(before: RouteTable, after: RouteTable): Promise<RouteDiff> {
  const diff: RouteDiff = { added: [], removed: [], changed: [] };
  const steps = diffSteps(before, after, diff);
  while (!steps.next().done) await nextTurn();
  return diff;
}

/** Fills `diff`, pausing (yielding) after every DIFF_SLICE patterns. */
function* diffSteps(before: RouteTable, after: RouteTable, diff: RouteDiff): Generator<void, void, void> {
  const a = before.patterns();
  const b = after.patterns();
  let n = 0;
  for (let i = 0; i < b.length; i++) {
    const old = a[i];
    const next = b[i];
    let found = 0;
    for (const [name, list] of next) {
      if (++n % DIFF_SLICE === 0) yield;
      const prev = old.get(name);
      if (prev === undefined) {
        for (const r of list) diff.added.push(r);
        continue;
      }
      found++;
      if (prev !== list) diffPattern(prev, list, diff);
    }
    // Names the old table has and the new one lacks: only if not every old name was found.
    if (found < old.size) {
      for (const [name, list] of old) {
        if (++n % DIFF_SLICE === 0) yield;
        if (!next.has(name)) for (const r of list) diff.removed.push(r);
      }
    }
  }
}

function diffPattern(prev: readonly RouteSpec[], next: readonly RouteSpec[], diff: RouteDiff): void {
  if (prev.length === 1 && next.length === 1) {
    const p = prev[0];
    const n = next[0];
    if (alpnKey(p.alpn) !== alpnKey(n.alpn)) {
      diff.removed.push(p);
      diff.added.push(n);
    } else if (!sameTarget(p, n)) {
      diff.changed.push(n);
    }
    return;
  }
  const prevKeys = prev.map((r) => alpnKey(r.alpn));
  const nextKeys = next.map((r) => alpnKey(r.alpn));
  const reported = diff.added.length + diff.removed.length + diff.changed.length;
  let reordered = false;
  for (let i = 0; i < next.length; i++) {
    const j = prevKeys.indexOf(nextKeys[i]);
    if (j < 0) {
      diff.added.push(next[i]);
      continue;
    }
    if (j !== i) reordered = true;
    if (!sameTarget(prev[j], next[i])) diff.changed.push(next[i]);
  }
  for (let j = 0; j < prev.length; j++) if (!nextKeys.includes(prevKeys[j])) diff.removed.push(prev[j]);
  // The same routes in another order answer lookups differently: that is a change too.
  if (reordered && diff.added.length + diff.removed.length + diff.changed.length === reported) diff.changed.push(next[0]);
}

/** Two routes of the same match and alpn that send to the same backend from the same source. */
function sameTarget(a: RouteSpec, b: RouteSpec): boolean {
  return a === b || (a.source === b.source && a.namespace === b.namespace && sameBackend(a.backend, b.backend));
}

function pick(list: RouteSpec[] | undefined, alpn: readonly string[] | null): RouteSpec | null {
  if (list === undefined) return null;
  for (let i = 0; i < list.length; i++) {
    if (alpnMatches(list[i].alpn, alpn)) return list[i];
  }
  return null;
}

/**
 * Holds the live table. `replace` is an atomic swap: a connection looks the table up once, when
 * its ClientHello is complete, and keeps the backend it got whatever happens to the table later.
 */
/** Told of each replace: the new table, its generation, and what changed from the previous one. */
export type ReplaceListener = (table: RouteTable, generation: number, diff: RouteDiff) => void;

export class Router {
  #table: RouteTable;
  #generation = 1;
  #listeners: ReplaceListener[] = [];

  constructor(initial: RouteTable) {
    this.#table = initial;
  }

  get table(): RouteTable {
    return this.#table;
  }

  get generation(): number {
    return this.#generation;
  }

  /**
   * Swaps `table` in. `diff` is what changed from the live table (the composer has it already);
   * without it, and with a listener to tell, it is computed here.
   */
  replace(table: RouteTable, diff?: RouteDiff): number {
    const previous = this.#table;
    this.#table = table;
    this.#generation++;
    if (this.#listeners.length > 0) {
      const d = diff ?? diffTables(previous, table);
      for (const fn of this.#listeners) fn(table, this.#generation, d);
    }
    return this.#generation;
  }

  onReplace(fn: ReplaceListener): void {
    this.#listeners.push(fn);
  }
}
