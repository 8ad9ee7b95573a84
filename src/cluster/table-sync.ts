// Keeps the workers' route tables equal to the primary's, sending only what changed.
//
// Sending a whole 100,000-route table over the IPC channel on every change costs each worker the
// JSON parse of every route (~70 ms here) on top of building its table; a change set costs only
// the patterns that changed, known from the one diff the composer computes for each replace.
import { type RouteDiff, RouteTable } from '../router/table.ts';
import type { RouteSpec } from '../model/route.ts';
import type { TableChange } from './protocol.ts';

/** The primary's side: the table last described, and the next one described as a change. */
export class TablePublisher {
  #table: RouteTable;
  #generation: number;

  constructor(table: RouteTable, generation: number) {
    this.#table = table;
    this.#generation = generation;
  }

  /** Everything, for a worker that starts: each pattern's routes, in lookup order. */
  full(): TableChange {
    const set: RouteSpec[][] = [];
    for (const map of this.#table.patterns()) for (const routes of map.values()) set.push([...routes]);
    return { generation: this.#generation, set, delete: [], fallback: this.#table.fallback };
  }

  /**
   * What changed, from the diff the composer computed (Router.replace): each pattern a route was
   * added to, removed from or changed in is sent whole, or deleted when none of its routes is left.
   */
  change(table: RouteTable, generation: number, diff: RouteDiff): TableChange {
    const touched = new Set<string>();
    for (const list of [diff.added, diff.removed, diff.changed]) for (const r of list) touched.add(r.match);
    const set: RouteSpec[][] = [];
    const del: string[] = [];
    for (const match of touched) {
      const routes = table.patternRoutes(match);
      if (routes === undefined) del.push(match);
      else set.push([...routes]);
    }
    this.#table = table;
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
