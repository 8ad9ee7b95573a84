// The PostgreSQL source through a real router and a real PostgreSQL (a database of its own per
// test): namespaces enabled and disabled reach the live table under the names of `names` within a
// second with LISTEN/NOTIFY and within one interval without, on sql/schema.sql's tables and on the
// namespace service's own; an outage never empties the table; a router started during an outage
// serves the cache file. The cost of a read is test/sources-postgres-reads.test.ts's.
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { sleep, waitFor } from './helpers.ts';
import { BASE, assertNoPassword, rig } from './support/postgres-rig.ts';
import { addNamespace, backendFor, timeUntilRouted } from './support/sources.ts';

const BOUND_MS = 1000;

test('sql/schema.sql: an enabled namespace is routed under both names of the deployment guide within a second of its NOTIFY; stealth and disable follow', async (t) => {
  const rg = await rig(t);
  const acme = await rg.backend('turn-acme');
  // A 60 s poll cannot explain anything that happens within a second: only the NOTIFY can.
  const r = await rg.start({ interval: '60s', listen: true });
  const cdn = `cdn.ns-acme.${BASE}`;
  const sni = `turn.ns-acme.${BASE}`;
  assert.equal(await backendFor(r.port, cdn), 'caddy');
  assert.equal(await backendFor(r.port, sni), 'caddy');

  let since = Date.now();
  await addNamespace(rg.d.db, { name: 'acme', port: acme.port });
  const enabled = Math.max(
    await timeUntilRouted(r.port, cdn, 'turn-acme', { since }),
    await timeUntilRouted(r.port, sni, 'turn-acme', { since }),
  );
  assert.ok(enabled <= BOUND_MS, `enabled namespace routed after ${enabled}ms`);
  // The stealth name is TURN's for ALPN-less clients only, whatever the stealth_enabled column says;
  // the service's name follows the column (false here: any client).
  assert.equal(await backendFor(r.port, cdn, ['h2']), 'caddy');
  assert.equal(await backendFor(r.port, sni, ['h2']), 'turn-acme');
  const routed = r.app.router.table.routes.filter((route) => route.source === rg.source);
  assert.deepEqual(routed.map((route) => [route.match, route.namespace, route.backend.name]).sort(),
    [[cdn, 'acme', 'turn-acme'], [sni, 'acme', 'turn-acme']]);

  // Stealth: browsers and probers (offering h2/http1.1) reach the fallback, ALPN-less TURN clients reach TURN.
  since = Date.now();
  await rg.d.db.query("UPDATE namespace_webrtc_config SET stealth_enabled = true WHERE namespace_name = 'acme'");
  const stealth = await timeUntilRouted(r.port, sni, 'caddy', { since, alpn: ['h2', 'http/1.1'] });
  assert.ok(stealth <= BOUND_MS, `stealth applied after ${stealth}ms`);
  assert.equal(await backendFor(r.port, sni), 'turn-acme');

  since = Date.now();
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = false, disabled_at = now() WHERE namespace_name = 'acme'");
  const disabled = Math.max(
    await timeUntilRouted(r.port, sni, 'caddy', { since }),
    await timeUntilRouted(r.port, cdn, 'caddy', { since }),
  );
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

/**
 * The namespace service's tables as it keeps them (SQLite-style, through rqlite): `enabled` an
 * INTEGER 0/1, no stealth_enabled column; the same table names and join columns as
 * sql/schema.sql. The trigger is sql/schema.sql's, which the service does not have.
 */
const SERVICE_TABLES = `
CREATE TABLE namespace_webrtc_config (
    id TEXT PRIMARY KEY,
    namespace_cluster_id TEXT NOT NULL UNIQUE,
    namespace_name TEXT NOT NULL UNIQUE,
    turn_shared_secret TEXT NOT NULL,
    turn_ttl_seconds INTEGER NOT NULL DEFAULT 600,
    sfu_node_count INTEGER NOT NULL DEFAULT 3,
    turn_node_count INTEGER NOT NULL DEFAULT 2,
    enabled INTEGER NOT NULL DEFAULT 1,
    enabled_by TEXT,
    enabled_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    disabled_at TIMESTAMP
);
CREATE TABLE webrtc_port_allocations (
    id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    namespace_cluster_id TEXT NOT NULL,
    service_type TEXT NOT NULL,
    sfu_signaling_port INTEGER,
    sfu_media_port_start INTEGER,
    sfu_media_port_end INTEGER,
    turn_listen_port INTEGER,
    turn_tls_port INTEGER,
    turn_relay_port_start INTEGER,
    turn_relay_port_end INTEGER,
    allocated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    UNIQUE (node_id, namespace_cluster_id, service_type)
);
CREATE FUNCTION sni_router_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sni_router_routes', TG_TABLE_NAME || ' ' || TG_OP);
    RETURN NULL;
END
$$;
CREATE TRIGGER namespace_webrtc_config_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON namespace_webrtc_config
    FOR EACH STATEMENT EXECUTE FUNCTION sni_router_notify();
CREATE TRIGGER webrtc_port_allocations_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON webrtc_port_allocations
    FOR EACH STATEMENT EXECUTE FUNCTION sni_router_notify();`;

test("the namespace service's own tables (integer enabled, no stealth column): the default query routes both names within a second; disabling withdraws both", async (t) => {
  const rg = await rig(t, { schema: false });
  await rg.d.db.query(SERVICE_TABLES);
  const acme = await rg.backend('turn-acme');
  const r = await rg.start({ interval: '60s', listen: true });
  await waitFor(async () => await r.metric('sni_router_source_up', { source: rg.source }) === 1, 3000, 'the default query to read the service tables');
  const cdn = `cdn.ns-acme.${BASE}`;
  const sni = `turn.ns-acme.${BASE}`;

  let since = Date.now();
  await rg.d.db.query('BEGIN');
  await rg.d.db.query("INSERT INTO namespace_webrtc_config (id, namespace_cluster_id, namespace_name, turn_shared_secret, enabled) VALUES ('w1', 'cluster-acme', 'acme', 's3cret', 1)");
  await rg.d.db.query("INSERT INTO webrtc_port_allocations (id, node_id, namespace_cluster_id, service_type, turn_listen_port, turn_tls_port) VALUES ('p1', 'node-1', 'cluster-acme', 'turn', 3478, $1), ('p2', 'node-1', 'cluster-acme', 'sfu', NULL, NULL)", [acme.port]);
  await rg.d.db.query('COMMIT');
  const enabled = Math.max(
    await timeUntilRouted(r.port, cdn, 'turn-acme', { since }),
    await timeUntilRouted(r.port, sni, 'turn-acme', { since }),
  );
  assert.ok(enabled <= BOUND_MS, `enabled namespace routed after ${enabled}ms`);
  // No stealth column: the stealth name still keeps browsers on the fallback; the service's DNS
  // name goes to TURN whatever the client offers.
  assert.equal(await backendFor(r.port, cdn, ['h2']), 'caddy');
  assert.equal(await backendFor(r.port, sni, ['h2']), 'turn-acme');

  since = Date.now();
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = 0, disabled_at = CURRENT_TIMESTAMP WHERE namespace_name = 'acme'");
  const disabled = Math.max(
    await timeUntilRouted(r.port, cdn, 'caddy', { since }),
    await timeUntilRouted(r.port, sni, 'caddy', { since }),
  );
  assert.ok(disabled <= BOUND_MS, `disabled namespace left the table after ${disabled}ms`);

  since = Date.now();
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = 1, disabled_at = NULL WHERE namespace_name = 'acme'");
  const again = await timeUntilRouted(r.port, cdn, 'turn-acme', { since });
  assert.ok(again <= BOUND_MS, `re-enabled namespace routed after ${again}ms`);
  assert.equal(await r.metric('sni_router_source_updates_total', { source: rg.source, result: 'error' }), 0);
  t.diagnostic(`service tables, NOTIFY: enable ${enabled}ms, disable ${disabled}ms, enable again ${again}ms`);
});

test('without LISTEN, a change is routed within one poll interval (under the names of old versions, kept by `names`)', async (t) => {
  const rg = await rig(t);
  const names = ['one', 'two', 'three'];
  const backends = await Promise.all(names.map((n) => rg.backend(`turn-${n}`)));
  const intervalMs = 500;
  // The names of versions before `names:`, kept by naming them.
  const r = await rg.start({ interval: `${intervalMs}ms`, names: '[{ match: "turn-{namespace}.{base_domain}" }]' });
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
  await timeUntilRouted(r.port, `turn.ns-acme.${BASE}`, 'turn-acme', { deadlineMs: BOUND_MS });
  const errorsBefore = await r.metric('sni_router_source_updates_total', { source: rg.source, result: 'error' });

  // Hard outage: every connection cut, new ones refused.
  await rg.fwd.cut();
  await waitFor(async () => await r.metric('sni_router_source_up', { source: rg.source }) === 0, 5000, 'source_up to drop to 0');
  assert.ok(await r.metric('sni_router_source_updates_total', { source: rg.source, result: 'error' }) > errorsBefore);
  assert.equal(await backendFor(r.port, `turn.ns-acme.${BASE}`), 'turn-acme', 'the last good routes stay while the database is down');

  // Changes made while the router cannot see them (their NOTIFYs reach nobody).
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = false WHERE namespace_name = 'acme'");
  await addNamespace(rg.d.db, { name: 'beta', port: beta.port });
  await sleep(1500);
  assert.equal(await backendFor(r.port, `turn.ns-acme.${BASE}`), 'turn-acme');
  assert.equal(await backendFor(r.port, `turn.ns-beta.${BASE}`), 'caddy');
  const status = (r.app.routesView() as { sources: Array<{ name: string; state: string; last_error: string }> }).sources
    .find((s) => s.name === rg.source);
  assert.equal(status?.state, 'failing');

  const since = Date.now();
  await rg.fwd.restore();
  // Reconnection backs off exponentially but is capped at 5 s; the 60 s poll plays no part.
  const recovered = await timeUntilRouted(r.port, `turn.ns-beta.${BASE}`, 'turn-beta', { since, deadlineMs: 8000 });
  assert.ok(recovered <= 6000, `recovered after ${recovered}ms`);
  assert.equal(await backendFor(r.port, `turn.ns-acme.${BASE}`), 'caddy');
  await waitFor(async () => await r.metric('sni_router_source_up', { source: rg.source }) === 1, 2000, 'source_up back to 1');

  // And LISTEN is back: the next change arrives by NOTIFY again.
  const since2 = Date.now();
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = true WHERE namespace_name = 'acme'");
  await waitFor(async () => (await backendFor(r.port, `turn.ns-acme.${BASE}`)) === 'turn-acme', 8000, 'acme back');
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
  await timeUntilRouted(r.port, `turn.ns-acme.${BASE}`, 'turn-acme', { deadlineMs: BOUND_MS });

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
  const afterKill = await timeUntilRouted(r.port, `turn.ns-beta.${BASE}`, 'turn-beta', { since });
  assert.ok(afterKill <= BOUND_MS + 1000, `change made while killed applied after ${afterKill}ms`);
  assert.equal(await backendFor(r.port, `turn.ns-acme.${BASE}`), 'caddy');

  // New connections, and the listener is LISTENing again: a NOTIFY-only change arrives in a second.
  await waitFor(async () => {
    const now = await routerBackends();
    return now.length === 2 && now.every((b) => !before.some((o) => o.pid === b.pid)) &&
      now.some((b) => b.application_name.endsWith(':listen') && /^LISTEN /i.test(b.query));
  }, 5000, 'the router to reconnect and LISTEN');
  const since2 = Date.now();
  await addNamespace(rg.d.db, { name: 'gamma', port: gamma.port });
  const relisten = await timeUntilRouted(r.port, `turn.ns-gamma.${BASE}`, 'turn-gamma', { since: since2 });
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
  await timeUntilRouted(first.port, `turn.ns-beta.${BASE}`, 'turn-beta', { deadlineMs: BOUND_MS });
  await waitFor(() => existsSync(cacheFile) && readFileSync(cacheFile, 'utf8').includes('turn-beta'), 5000, 'the cache file');
  const cached = JSON.parse(readFileSync(cacheFile, 'utf8')) as { routes: Array<{ match: string }> };
  assert.deepEqual(cached.routes.map((c) => c.match),
    [`cdn.ns-acme.${BASE}`, `turn.ns-acme.${BASE}`, `cdn.ns-beta.${BASE}`, `turn.ns-beta.${BASE}`]);
  assert.deepEqual(readdirSync(join(rg.dir, 'state')), ['postgres-routes.json'], 'no temp file is left behind');
  await first.stop();

  await rg.fwd.cut();
  const r = await rg.start({ interval: '60s', listen: true, cacheFile });
  // Served from the first connection on: the cache is applied before the router listens.
  assert.equal(await backendFor(r.port, `turn.ns-acme.${BASE}`), 'turn-acme');
  assert.equal(await backendFor(r.port, `turn.ns-beta.${BASE}`), 'turn-beta');
  assert.equal(await backendFor(r.port, `turn.ns-beta.${BASE}`, ['h2']), 'caddy', 'stealth survives the cache');
  assert.equal(await r.metric('sni_router_source_up', { source: rg.source }), 0);
  assert.ok(await r.metric('sni_router_source_updates_total', { source: rg.source, result: 'error' }) >= 1);
  assert.ok(r.logs.some((l) => l.msg === 'postgres not readable: serving the routes of the cache file until it is' && l.routes === 4));

  // The database returns with a change made meanwhile: live data replaces the cache.
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = false WHERE namespace_name = 'acme'");
  const since = Date.now();
  await rg.fwd.restore();
  const recovered = await timeUntilRouted(r.port, `turn.ns-acme.${BASE}`, 'caddy', { since, deadlineMs: 8000 });
  assert.equal(await backendFor(r.port, `turn.ns-beta.${BASE}`), 'turn-beta');
  await waitFor(() => !readFileSync(cacheFile, 'utf8').includes('turn-acme'), 5000, 'the cache to follow the live data');
  assertNoPassword(r, rg.password);
  t.diagnostic(`live data replaced the cache ${recovered}ms after PostgreSQL came back`);
});

test('skips a namespace that makes no DNS name and counts it while its siblings apply', async (t) => {
  const rg = await rig(t);
  const good = await rg.backend('turn-good');
  const r = await rg.start({ interval: '60s', listen: true });
  await addNamespace(rg.d.db, { name: 'good', port: good.port });
  await addNamespace(rg.d.db, { name: 'Not A Label!', port: good.port });
  await addNamespace(rg.d.db, { name: 'noport', port: null });
  // Not one label: two labels, and a character no host name has.
  await addNamespace(rg.d.db, { name: 'a.b', port: good.port });
  await addNamespace(rg.d.db, { name: 'bad_name', port: good.port });
  // A label, but "ns-" and 61 characters make a label of 64: both of its names are skipped.
  const long = 'l'.repeat(61);
  await addNamespace(rg.d.db, { name: long, port: good.port });
  await timeUntilRouted(r.port, `cdn.ns-good.${BASE}`, 'turn-good', { deadlineMs: BOUND_MS });
  await timeUntilRouted(r.port, `turn.ns-good.${BASE}`, 'turn-good', { deadlineMs: BOUND_MS });
  await waitFor(async () => await r.metric('sni_router_source_invalid_entries_total', { source: rg.source }) >= 6, 3000, 'invalid rows counted');
  assert.equal(await r.metric('sni_router_source_up', { source: rg.source }), 1);
  assert.equal(await r.metric('sni_router_routes', { source: rg.source }), 2);
  assert.equal(await backendFor(r.port, `turn.ns-a.b.${BASE}`), 'caddy');
  const skippedLines = () => r.logs.filter((l) => l.msg === 'skipped invalid route entry' && l.source === rg.source);
  const skipped = skippedLines().map((l) => String(l.entry));
  for (const entry of ['namespace "Not A Label!"', 'namespace "noport"', 'namespace "a.b"', 'namespace "bad_name"',
    `match cdn.ns-${long}.${BASE}`, `match turn.ns-${long}.${BASE}`]) {
    assert.ok(skipped.includes(entry), `${entry} skipped: ${skipped.join('; ')}`);
  }
  assert.equal(skipped.length, 6);
  // A standing bad row is counted on every read but logged once.
  r.app.composer.resyncAll();
  await waitFor(async () => await r.metric('sni_router_source_invalid_entries_total', { source: rg.source }) >= 12, 3000, 'recounted');
  assert.equal(skippedLines().length, 6);
  // Also when the rows around it change: a namespace sorted before them comes (and moves every
  // row after it one place down); the standing ones are still not logged again.
  const early = await rg.backend('turn-aaa');
  await addNamespace(rg.d.db, { name: 'aaa', port: early.port });
  await timeUntilRouted(r.port, `turn.ns-aaa.${BASE}`, 'turn-aaa', { deadlineMs: BOUND_MS });
  assert.equal(skippedLines().length, 6, skippedLines().map((l) => String(l.entry)).join('; '));
});
