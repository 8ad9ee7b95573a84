// A rig for the PostgreSQL source tests: a database of its own, a forwarder in front of it (an
// outage on demand), a fallback "caddy", TLS backends named after the TURN servers they stand
// for, and routers whose postgres source reads that database. Everything is torn down after the test.
import assert from 'node:assert/strict';
import type { TestContext } from 'node:test';
import type tls from 'node:tls';
import { type Listening, type RunningRouter, makeCert, startRouter, tempDir, tlsBackend } from '../helpers.ts';
import { type Forwarder, type TestDatabase, PG_PORT, createTestDatabase, forwarder, randomSuffix } from './sources.ts';

export const BASE = 'example.test';

export interface RouterOptions {
  readonly interval: string;
  readonly listen?: boolean;
  readonly cacheFile?: string;
  readonly query?: string;
  /** `names:` as YAML flow text, e.g. '[{ match: "turn-{namespace}.{base_domain}" }]'. */
  readonly names?: string;
  /** Straight to PostgreSQL, not through the forwarder. */
  readonly direct?: boolean;
}

export interface Rig {
  readonly dir: string;
  readonly d: TestDatabase;
  readonly fwd: Forwarder;
  readonly password: string;
  readonly source: string;
  backend(name: string): Promise<Listening<tls.Server>>;
  /** Starts a router whose postgres source reads the test database through the forwarder. */
  start(opts: RouterOptions): Promise<RunningRouter>;
}

/** With `schema: false` the database starts empty (the test creates its own tables). */
export async function rig(t: TestContext, opts: { schema?: boolean } = {}): Promise<Rig> {
  const tmp = tempDir();
  const pair = makeCert(tmp.dir, 'backend.test');
  const caddy = await tlsBackend('caddy', pair);
  const backends: Array<Listening<tls.Server>> = [caddy];
  const d = await createTestDatabase({ schema: opts.schema });
  const fwd = await forwarder(PG_PORT);
  const routers: RunningRouter[] = [];
  const password = `pw-${randomSuffix()}`;
  const source = `pg-${randomSuffix()}`;
  t.after(async () => {
    for (const r of routers) await r.stop();
    await fwd.close();
    await d.drop();
    for (const b of backends) await b.close();
    tmp.cleanup();
  });
  return {
    dir: tmp.dir,
    d,
    fwd,
    password,
    source,
    backend: async (name) => {
      const b = await tlsBackend(name, pair);
      backends.push(b);
      return b;
    },
    start: async (o) => {
      const lines = [
        `fallback: { name: caddy, addr: "127.0.0.1:${caddy.port}" }`,
        'sources:',
        '  - type: postgres',
        `    name: ${source}`,
        `    url: "${d.url(o.direct === true ? PG_PORT : fwd.port, password)}"`,
        `    interval: ${o.interval}`,
        `    params: { base_domain: ${BASE}, node_id: node-1 }`,
      ];
      if (o.listen === true) lines.push('    listen_channel: sni_router_routes');
      if (o.cacheFile !== undefined) lines.push(`    cache_file: "${o.cacheFile}"`);
      if (o.query !== undefined) lines.push(`    query: ${JSON.stringify(o.query)}`);
      if (o.names !== undefined) lines.push(`    names: ${o.names}`);
      const r = await startRouter(lines.join('\n'));
      routers.push(r);
      return r;
    },
  };
}

export function assertNoPassword(r: RunningRouter, password: string): void {
  const leaked = r.logs.filter((l) => JSON.stringify(l).includes(password));
  assert.deepEqual(leaked, [], 'the database password appears in the logs');
}

/** What the source has done so far: reads that succeeded, and the tables the composer built. */
export async function readCounts(r: RunningRouter, source: string): Promise<{ ok: number; lastSuccess: number; merges: number; generation: number }> {
  return {
    ok: await r.metric('sni_router_source_updates_total', { source, result: 'ok' }),
    lastSuccess: await r.metric('sni_router_source_last_success_timestamp_seconds', { source }),
    merges: r.app.composer.merges,
    generation: await r.metric('sni_router_route_table_generation'),
  };
}
