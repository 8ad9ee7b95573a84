// The PostgreSQL source through a real router and a real PostgreSQL (a database of its own per
// test): namespaces enabled and disabled reach the live table within a second with LISTEN/NOTIFY
// and within one interval without; an outage never empties the table; a router started during an
// outage serves the cache file.
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { type Listening, type RunningRouter, makeCert, sleep, startRouter, tempDir, tlsBackend, waitFor } from './helpers.ts';
import type tls from 'node:tls';
import {
  type Forwarder, type TestDatabase, PG_PORT, addNamespace, backendFor, createTestDatabase, forwarder, randomSuffix,
  timeUntilRouted,
} from './support/sources.ts';

const BOUND_MS = 1000;
const BASE = 'example.test';

interface Rig {
  readonly dir: string;
  readonly d: TestDatabase;
  readonly fwd: Forwarder;
  readonly password: string;
  readonly source: string;
  backend(name: string): Promise<Listening<tls.Server>>;
  /** Starts a router whose postgres source reads the test database through the forwarder. */
  start(opts: { interval: string; listen?: boolean; cacheFile?: string; query?: string; direct?: boolean }): Promise<RunningRouter>;
}

async function rig(t: TestContext): Promise<Rig> {
  const tmp = tempDir();
  const pair = makeCert(tmp.dir, 'backend.test');
  const caddy = await tlsBackend('caddy', pair);
  const backends: Array<Listening<tls.Server>> = [caddy];
  const d = await createTestDatabase();
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
    start: async (opts) => {
      const lines = [
        `fallback: { name: caddy, addr: "127.0.0.1:${caddy.port}" }`,
        'sources:',
        '  - type: postgres',
        `    name: ${source}`,
        `    url: "${d.url(opts.direct === true ? PG_PORT : fwd.port, password)}"`,
        `    interval: ${opts.interval}`,
        `    params: { base_domain: ${BASE}, node_id: node-1 }`,
      ];
      if (opts.listen === true) lines.push('    listen_channel: sni_router_routes');
      if (opts.cacheFile !== undefined) lines.push(`    cache_file: "${opts.cacheFile}"`);
      if (opts.query !== undefined) lines.push(`    query: ${JSON.stringify(opts.query)}`);
      const r = await startRouter(lines.join('\n'));
      routers.push(r);
      return r;
    },
  };
}

function assertNoPassword(r: RunningRouter, password: string): void {
  const leaked = r.logs.filter((l) => JSON.stringify(l).includes(password));
  assert.deepEqual(leaked, [], 'the database password appears in the logs');
}

test('routes an enabled namespace within a second of its NOTIFY; stealth and disable follow', async (t) => {
  const rg = await rig(t);
  const acme = await rg.backend('turn-acme');
  // A 60 s poll cannot explain anything that happens within a second: only the NOTIFY can.
  const r = await rg.start({ interval: '60s', listen: true });
  const sni = `turn-acme.${BASE}`;
  assert.equal(await backendFor(r.port, sni), 'caddy');

  let since = Date.now();
  await addNamespace(rg.d.db, { name: 'acme', port: acme.port });
  const enabled = await timeUntilRouted(r.port, sni, 'turn-acme', { since });
  assert.ok(enabled <= BOUND_MS, `enabled namespace routed after ${enabled}ms`);

  // Stealth: browsers and probers (offering h2/http1.1) reach the fallback, ALPN-less TURN clients reach TURN.
  since = Date.now();
  await rg.d.db.query("UPDATE namespace_webrtc_config SET stealth_enabled = true WHERE namespace_name = 'acme'");
  const stealth = await timeUntilRouted(r.port, sni, 'caddy', { since, alpn: ['h2', 'http/1.1'] });
  assert.ok(stealth <= BOUND_MS, `stealth applied after ${stealth}ms`);
  assert.equal(await backendFor(r.port, sni), 'turn-acme');

  since = Date.now();
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = false, disabled_at = now() WHERE namespace_name = 'acme'");
  const disabled = await timeUntilRouted(r.port, sni, 'caddy', { since });
  assert.ok(disabled <= BOUND_MS, `disabled namespace left the table after ${disabled}ms`);

  // Re-enabled, then its port allocation removed (the other table's trigger): gone again.
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = true, stealth_enabled = false WHERE namespace_name = 'acme'");
  await timeUntilRouted(r.port, sni, 'turn-acme', { deadlineMs: BOUND_MS });
  since = Date.now();
  await rg.d.db.query("DELETE FROM webrtc_port_allocations WHERE namespace_cluster_id = 'cluster-acme'");
  const deallocated = await timeUntilRouted(r.port, sni, 'caddy', { since });
  assert.ok(deallocated <= BOUND_MS, `deallocated namespace left the table after ${deallocated}ms`);
  // Another node's allocation is not this router's business.
  await rg.d.db.query("INSERT INTO webrtc_port_allocations (node_id, namespace_cluster_id, service_type, turn_tls_port) VALUES ('node-2', 'cluster-acme', 'turn', $1)", [acme.port]);
  await sleep(300);
  assert.equal(await backendFor(r.port, sni), 'caddy');
  assertNoPassword(r, rg.password);
  t.diagnostic(`NOTIFY: enable ${enabled}ms, stealth ${stealth}ms, disable ${disabled}ms, deallocate ${deallocated}ms`);
});

test('without LISTEN, a change is routed within one poll interval', async (t) => {
  const rg = await rig(t);
  const names = ['one', 'two', 'three'];
  const backends = await Promise.all(names.map((n) => rg.backend(`turn-${n}`)));
  const intervalMs = 500;
  const r = await rg.start({ interval: `${intervalMs}ms` });
  const times: number[] = [];
  for (const [i, name] of names.entries()) {
    const since = Date.now();
    await addNamespace(rg.d.db, { name, port: backends[i].port });
    const ms = await timeUntilRouted(r.port, `turn-${name}.${BASE}`, `turn-${name}`, { since });
    // One interval, plus the query, the composer's coalescing and the client's own handshake.
    assert.ok(ms <= intervalMs + 500, `routed after ${ms}ms with a ${intervalMs}ms interval`);
    times.push(ms);
  }
  const since = Date.now();
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = false WHERE namespace_name = 'two'");
  times.push(await timeUntilRouted(r.port, `turn-two.${BASE}`, 'caddy', { since, deadlineMs: intervalMs + 500 }));
  t.diagnostic(`poll every ${intervalMs}ms: changes routed after ${times.join(', ')}ms`);
});

test('keeps the routes while PostgreSQL is unreachable and applies the changes made meanwhile', async (t) => {
  const rg = await rig(t);
  const acme = await rg.backend('turn-acme');
  const beta = await rg.backend('turn-beta');
  const r = await rg.start({ interval: '60s', listen: true });
  await addNamespace(rg.d.db, { name: 'acme', port: acme.port });
  await timeUntilRouted(r.port, `turn-acme.${BASE}`, 'turn-acme', { deadlineMs: BOUND_MS });
  const errorsBefore = await r.metric('sni_router_source_updates_total', { source: rg.source, result: 'error' });

  // Hard outage: every connection cut, new ones refused.
  await rg.fwd.cut();
  await waitFor(async () => await r.metric('sni_router_source_up', { source: rg.source }) === 0, 5000, 'source_up to drop to 0');
  assert.ok(await r.metric('sni_router_source_updates_total', { source: rg.source, result: 'error' }) > errorsBefore);
  assert.equal(await backendFor(r.port, `turn-acme.${BASE}`), 'turn-acme', 'the last good routes stay while the database is down');

  // Changes made while the router cannot see them (their NOTIFYs reach nobody).
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = false WHERE namespace_name = 'acme'");
  await addNamespace(rg.d.db, { name: 'beta', port: beta.port });
  await sleep(1500);
  assert.equal(await backendFor(r.port, `turn-acme.${BASE}`), 'turn-acme');
  assert.equal(await backendFor(r.port, `turn-beta.${BASE}`), 'caddy');
  const status = (r.app.routesView() as { sources: Array<{ name: string; state: string; last_error: string }> }).sources
    .find((s) => s.name === rg.source);
  assert.equal(status?.state, 'failing');

  const since = Date.now();
  await rg.fwd.restore();
  // Reconnection backs off exponentially but is capped at 5 s; the 60 s poll plays no part.
  const recovered = await timeUntilRouted(r.port, `turn-beta.${BASE}`, 'turn-beta', { since, deadlineMs: 8000 });
  assert.ok(recovered <= 6000, `recovered after ${recovered}ms`);
  assert.equal(await backendFor(r.port, `turn-acme.${BASE}`), 'caddy');
  await waitFor(async () => await r.metric('sni_router_source_up', { source: rg.source }) === 1, 2000, 'source_up back to 1');

  // And LISTEN is back: the next change arrives by NOTIFY again.
  const since2 = Date.now();
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = true WHERE namespace_name = 'acme'");
  await waitFor(async () => (await backendFor(r.port, `turn-acme.${BASE}`)) === 'turn-acme', 8000, 'acme back');
  const relisten = Date.now() - since2;
  assert.ok(relisten <= BOUND_MS + 5000);
  assertNoPassword(r, rg.password);
  t.diagnostic(`outage over: changes applied ${recovered}ms after PostgreSQL came back; next NOTIFY ${relisten}ms`);
});

test('reconnects and LISTENs again after its connections are terminated', async (t) => {
  const rg = await rig(t);
  const acme = await rg.backend('turn-acme');
  const beta = await rg.backend('turn-beta');
  const gamma = await rg.backend('turn-gamma');
  const r = await rg.start({ interval: '60s', listen: true, direct: true });
  await addNamespace(rg.d.db, { name: 'acme', port: acme.port });
  await timeUntilRouted(r.port, `turn-acme.${BASE}`, 'turn-acme', { deadlineMs: BOUND_MS });

  const routerBackends = async () => (await rg.d.db.query<{ pid: number; application_name: string; query: string }>(
    "SELECT pid, application_name, query FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE 'sni-router:' || $2 || '%'",
    [rg.d.name, rg.source],
  )).rows;
  const before = await routerBackends();
  assert.deepEqual(before.map((b) => b.application_name).sort(), [`sni-router:${rg.source}`, `sni-router:${rg.source}:listen`]);

  // Terminate both connections in the transaction that makes a change: whether or not its
  // NOTIFY finds a listener, the change must arrive.
  const since = Date.now();
  await rg.d.db.query('BEGIN');
  await rg.d.db.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY($1::int[])', [before.map((b) => b.pid)]);
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = false WHERE namespace_name = 'acme'");
  await rg.d.db.query("INSERT INTO namespace_webrtc_config (namespace_cluster_id, namespace_name) VALUES ('cluster-beta', 'beta')");
  await rg.d.db.query("INSERT INTO webrtc_port_allocations (node_id, namespace_cluster_id, service_type, turn_tls_port) VALUES ('node-1', 'cluster-beta', 'turn', $1)", [beta.port]);
  await rg.d.db.query('COMMIT');
  const afterKill = await timeUntilRouted(r.port, `turn-beta.${BASE}`, 'turn-beta', { since });
  assert.ok(afterKill <= BOUND_MS + 1000, `change made while killed applied after ${afterKill}ms`);
  assert.equal(await backendFor(r.port, `turn-acme.${BASE}`), 'caddy');

  // New connections, and the listener is LISTENing again: a NOTIFY-only change arrives in a second.
  await waitFor(async () => {
    const now = await routerBackends();
    return now.length === 2 && now.every((b) => !before.some((o) => o.pid === b.pid)) &&
      now.some((b) => b.application_name.endsWith(':listen') && /^LISTEN /i.test(b.query));
  }, 5000, 'the router to reconnect and LISTEN');
  const since2 = Date.now();
  await addNamespace(rg.d.db, { name: 'gamma', port: gamma.port });
  const relisten = await timeUntilRouted(r.port, `turn-gamma.${BASE}`, 'turn-gamma', { since: since2 });
  assert.ok(relisten <= BOUND_MS, `NOTIFY after reconnect routed after ${relisten}ms`);
  t.diagnostic(`after pg_terminate_backend: change applied in ${afterKill}ms; next NOTIFY ${relisten}ms`);
});

test('a router started while PostgreSQL is unreachable serves the cache file', async (t) => {
  const rg = await rig(t);
  const acme = await rg.backend('turn-acme');
  const beta = await rg.backend('turn-beta');
  const cacheFile = join(rg.dir, 'state', 'postgres-routes.json');
  const first = await rg.start({ interval: '60s', listen: true, cacheFile });
  await addNamespace(rg.d.db, { name: 'acme', port: acme.port });
  await addNamespace(rg.d.db, { name: 'beta', port: beta.port, stealth: true });
  await timeUntilRouted(first.port, `turn-beta.${BASE}`, 'turn-beta', { deadlineMs: BOUND_MS });
  await waitFor(() => existsSync(cacheFile) && readFileSync(cacheFile, 'utf8').includes('turn-beta'), 5000, 'the cache file');
  const cached = JSON.parse(readFileSync(cacheFile, 'utf8')) as { routes: Array<{ match: string }> };
  assert.deepEqual(cached.routes.map((c) => c.match), [`turn-acme.${BASE}`, `turn-beta.${BASE}`]);
  assert.deepEqual(readdirSync(join(rg.dir, 'state')), ['postgres-routes.json'], 'no temp file is left behind');
  await first.stop();

  await rg.fwd.cut();
  const r = await rg.start({ interval: '60s', listen: true, cacheFile });
  // Served from the first connection on: the cache is applied before the router listens.
  assert.equal(await backendFor(r.port, `turn-acme.${BASE}`), 'turn-acme');
  assert.equal(await backendFor(r.port, `turn-beta.${BASE}`), 'turn-beta');
  assert.equal(await backendFor(r.port, `turn-beta.${BASE}`, ['h2']), 'caddy', 'stealth survives the cache');
  assert.equal(await r.metric('sni_router_source_up', { source: rg.source }), 0);
  assert.ok(await r.metric('sni_router_source_updates_total', { source: rg.source, result: 'error' }) >= 1);
  assert.ok(r.logs.some((l) => l.msg === 'postgres not readable: serving the routes of the cache file until it is' && l.routes === 2));

  // The database returns with a change made meanwhile: live data replaces the cache.
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = false WHERE namespace_name = 'acme'");
  const since = Date.now();
  await rg.fwd.restore();
  const recovered = await timeUntilRouted(r.port, `turn-acme.${BASE}`, 'caddy', { since, deadlineMs: 8000 });
  assert.equal(await backendFor(r.port, `turn-beta.${BASE}`), 'turn-beta');
  await waitFor(() => !readFileSync(cacheFile, 'utf8').includes('turn-acme'), 5000, 'the cache to follow the live data');
  assertNoPassword(r, rg.password);
  t.diagnostic(`live data replaced the cache ${recovered}ms after PostgreSQL came back`);
});

test('skips malformed rows and counts them while their siblings apply', async (t) => {
  const rg = await rig(t);
  const good = await rg.backend('turn-good');
  const r = await rg.start({ interval: '60s', listen: true });
  await addNamespace(rg.d.db, { name: 'good', port: good.port });
  await addNamespace(rg.d.db, { name: 'Not A Label!', port: good.port });
  await addNamespace(rg.d.db, { name: 'noport', port: null });
  // Not one label under the base domain: two labels, and a character no host name has.
  await addNamespace(rg.d.db, { name: 'a.b', port: good.port });
  await addNamespace(rg.d.db, { name: 'bad_name', port: good.port });
  await timeUntilRouted(r.port, `turn-good.${BASE}`, 'turn-good', { deadlineMs: BOUND_MS });
  await waitFor(async () => await r.metric('sni_router_source_invalid_entries_total', { source: rg.source }) >= 4, 3000, 'invalid rows counted');
  assert.equal(await r.metric('sni_router_source_up', { source: rg.source }), 1);
  assert.equal(await r.metric('sni_router_routes', { source: rg.source }), 1);
  assert.equal(await backendFor(r.port, `turn-a.b.${BASE}`), 'caddy');
  const skippedLines = () => r.logs.filter((l) => l.msg === 'skipped invalid route entry' && l.source === rg.source);
  const skipped = skippedLines().map((l) => String(l.entry));
  for (const name of ['turn-Not A Label!', 'turn-noport', 'turn-a.b.', 'turn-bad_name.']) {
    assert.ok(skipped.some((e) => e.includes(name)), `${name} skipped: ${skipped.join('; ')}`);
  }
  assert.equal(skipped.length, 4);
  // A standing bad row is counted on every read but logged once.
  r.app.composer.resyncAll();
  await waitFor(async () => await r.metric('sni_router_source_invalid_entries_total', { source: rg.source }) >= 8, 3000, 'recounted');
  assert.equal(skippedLines().length, 4);
  // Also when the rows around it change: a namespace sorted before them comes (and moves every
  // row after it one place down); the standing ones are still not logged again.
  const early = await rg.backend('turn-aaa');
  await addNamespace(rg.d.db, { name: 'aaa', port: early.port });
  await timeUntilRouted(r.port, `turn-aaa.${BASE}`, 'turn-aaa', { deadlineMs: BOUND_MS });
  assert.equal(skippedLines().length, 4, skippedLines().map((l) => String(l.entry)).join('; '));
});

test('a custom query returns match, addr, name, proxy_protocol and alpn; params are session settings', async (t) => {
  const rg = await rig(t);
  const alpha = await rg.backend('alpha');
  const bravo = await rg.backend('bravo');
  await rg.d.db.query(`CREATE TABLE my_routes (host text, target text, label text, pp text, alpn text[], node text);
    INSERT INTO my_routes VALUES
      ('x.${BASE}', '127.0.0.1:${alpha.port}', 'alpha', NULL, NULL, 'node-1'),
      ('x.${BASE}', '127.0.0.1:${bravo.port}', 'bravo', NULL, '{h2,http/1.1}', 'node-1'),
      ('pp.${BASE}', '127.0.0.1:1,127.0.0.1:2', 'with-proxy-protocol', 'v2', NULL, 'node-1'),
      ('other-node.${BASE}', '127.0.0.1:${bravo.port}', 'bravo', NULL, NULL, 'node-2'),
      ('bad.${BASE}', 'no-port-here', 'broken', NULL, NULL, 'node-1')`);
  const r = await rg.start({
    interval: '300ms',
    query: "SELECT host AS match, target AS addr, label AS name, pp AS proxy_protocol, alpn FROM my_routes WHERE node = current_setting('sni_router.node_id') ORDER BY label",
  });
  await waitFor(async () => (await backendFor(r.port, `x.${BASE}`, ['h2'])) === 'bravo', 3000, 'the ALPN route');
  assert.equal(await backendFor(r.port, `x.${BASE}`), 'alpha');
  assert.equal(await backendFor(r.port, `x.${BASE}`, ['acme-tls/2']), 'alpha');
  assert.equal(await backendFor(r.port, `other-node.${BASE}`), 'caddy');
  const pp = r.app.router.table.routes.find((route) => route.match === `pp.${BASE}`);
  assert.deepEqual(pp?.backend, { name: 'with-proxy-protocol', addrs: ['127.0.0.1:1', '127.0.0.1:2'], proxyProtocol: 'v2' });
  assert.ok(await r.metric('sni_router_source_invalid_entries_total', { source: rg.source }) >= 1);
  assert.ok(r.logs.some((l) => l.msg === 'skipped invalid route entry' && String(l.entry).includes(`bad.${BASE}`)));

  // A query that does not return match and addr fails whole; the last good snapshot stays.
  await rg.d.db.query('ALTER TABLE my_routes RENAME COLUMN target TO destination');
  await waitFor(async () => await r.metric('sni_router_source_up', { source: rg.source }) === 0, 3000, 'the query to fail');
  assert.equal(await backendFor(r.port, `x.${BASE}`), 'alpha');
});
