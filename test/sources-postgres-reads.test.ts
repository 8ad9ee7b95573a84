// The PostgreSQL source's reads: an unchanged result costs a digest (no rows, no validation, no
// table built), a changed one is read whole and validated in slices; a custom query is digested
// on the server when it can be wrapped, by the router when it cannot.
import assert from 'node:assert/strict';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { type RunningRouter, waitFor } from './helpers.ts';
import { DEFAULT_NAMES } from '../src/config/names.ts';
import { compileNames, snapshotFromNamespaces } from '../src/sources/postgres-rows.ts';
import { BASE, readCounts, rig } from './support/postgres-rig.ts';
import { addNamespace, backendFor, timeUntilRouted } from './support/sources.ts';

const BOUND_MS = 1000;

test('a big read is validated in slices: the event loop turns while 20,000 namespaces become routes', async () => {
  const rows = Array.from({ length: 20_000 }, (_, i) => ({ namespace: `ns${i}`, port: '5349', stealth: i % 2 === 0 }));
  let turns = 0;
  let spinning = true;
  const spin = () => {
    if (!spinning) return;
    turns++;
    setImmediate(spin);
  };
  setImmediate(spin);
  const snapshot = await snapshotFromNamespaces(rows, {
    names: compileNames(DEFAULT_NAMES), params: { base_domain: BASE, node_id: 'node-1' }, backendHost: '127.0.0.1', source: 's',
  });
  spinning = false;
  assert.equal(snapshot.routes.length, 40_000);
  assert.deepEqual(snapshot.invalid, []);
  // The stealth name always carries alpn none; the service's name follows the stealth column.
  assert.deepEqual(snapshot.routes.slice(0, 4).map((r) => [r.match, r.alpn?.kind ?? null, r.namespace]), [
    [`cdn.ns-ns0.${BASE}`, 'none', 'ns0'], [`turn.ns-ns0.${BASE}`, 'none', 'ns0'],
    [`cdn.ns-ns1.${BASE}`, 'none', 'ns1'], [`turn.ns-ns1.${BASE}`, null, 'ns1'],
  ]);
  assert.ok(turns >= 9, `the event loop turned ${turns} times during the validation of 20,000 rows`);
});

/** Waits until the source has read `polls` more times, and returns the counts from then. */
async function afterPolls(r: RunningRouter, source: string, polls: number, ms = 5000) {
  const before = await readCounts(r, source);
  await waitFor(async () => (await readCounts(r, source)).ok >= before.ok + polls, ms, `${polls} more reads`);
  return { before, after: await readCounts(r, source) };
}

test('an unchanged poll replaces nothing and rebuilds nothing; a change is read at the next poll, and at once on NOTIFY', async (t) => {
  const rg = await rig(t);
  const acme = await rg.backend('turn-acme');
  const beta = await rg.backend('turn-beta');
  await addNamespace(rg.d.db, { name: 'acme', port: acme.port });
  await addNamespace(rg.d.db, { name: 'bad_name', port: acme.port });
  const cacheFile = join(rg.dir, 'cache.json');
  const intervalMs = 200;
  const r = await rg.start({ interval: `${intervalMs}ms`, cacheFile });
  await timeUntilRouted(r.port, `turn.ns-acme.${BASE}`, 'turn-acme', { deadlineMs: BOUND_MS });
  await waitFor(() => existsSync(cacheFile), 3000, 'the cache file');
  const cacheWritten = statSync(cacheFile).mtimeMs;

  const invalidBefore = await r.metric('sni_router_source_invalid_entries_total', { source: rg.source });
  const { before, after } = await afterPolls(r, rg.source, 4);
  assert.equal(after.merges, before.merges, 'an unchanged poll builds no table');
  assert.equal(after.generation, before.generation, 'an unchanged poll replaces no table');
  assert.ok(after.lastSuccess > before.lastSuccess, 'an unchanged poll is a success');
  assert.equal(await r.metric('sni_router_source_up', { source: rg.source }), 1);
  assert.equal(statSync(cacheFile).mtimeMs, cacheWritten, 'nor rewrites the cache file');
  // A standing invalid entry is still counted on every read (an alert on its rate keeps firing).
  assert.ok(await r.metric('sni_router_source_invalid_entries_total', { source: rg.source }) >= invalidBefore + 4);

  // A change is a changed digest: the next poll reads the rows and replaces the table.
  const since = Date.now();
  await addNamespace(rg.d.db, { name: 'beta', port: beta.port });
  const polled = await timeUntilRouted(r.port, `turn.ns-beta.${BASE}`, 'turn-beta', { since, deadlineMs: intervalMs + 800 });
  assert.ok((await readCounts(r, rg.source)).merges > after.merges);

  // With LISTEN and a poll too slow to matter: a NOTIFY that changes nothing costs a digest, and
  // one that comes with a change is read at once.
  const listening = await rg.start({ interval: '60s', listen: true });
  await timeUntilRouted(listening.port, `turn.ns-beta.${BASE}`, 'turn-beta', { deadlineMs: BOUND_MS });
  const quiet = await readCounts(listening, rg.source);
  await rg.d.db.query('NOTIFY sni_router_routes');
  await waitFor(async () => (await readCounts(listening, rg.source)).ok > quiet.ok, 3000, 'the NOTIFY to be read');
  const notified = await readCounts(listening, rg.source);
  assert.equal(notified.merges, quiet.merges);
  assert.equal(notified.generation, quiet.generation);
  const since2 = Date.now();
  await rg.d.db.query("UPDATE namespace_webrtc_config SET enabled = false WHERE namespace_name = 'acme'");
  const pushed = await timeUntilRouted(listening.port, `turn.ns-acme.${BASE}`, 'caddy', { since: since2 });
  assert.ok(pushed <= BOUND_MS, `NOTIFY of a change routed after ${pushed}ms`);
  t.diagnostic(`${after.ok - before.ok} unchanged polls, ${after.merges - before.merges} merges; change read at the next poll after ${polled}ms, on NOTIFY after ${pushed}ms`);
});

test('a custom query returns match, addr, name, proxy_protocol and alpn; params are session settings', async (t) => {
  const rg = await rig(t);
  const alpha = await rg.backend('alpha');
  const bravo = await rg.backend('bravo');
  await rg.d.db.query(`CREATE TABLE my_routes (host text, target text, label text, pp text, alpn text[], node text, tenant text);
    INSERT INTO my_routes VALUES
      ('x.${BASE}', '127.0.0.1:${alpha.port}', 'alpha', NULL, NULL, 'node-1', 'tenant-a'),
      ('x.${BASE}', '127.0.0.1:${bravo.port}', 'bravo', NULL, '{h2,http/1.1}', 'node-1', NULL),
      ('pp.${BASE}', '127.0.0.1:1,127.0.0.1:2', 'with-proxy-protocol', 'v2', NULL, 'node-1', NULL),
      ('other-node.${BASE}', '127.0.0.1:${bravo.port}', 'bravo', NULL, NULL, 'node-2', NULL),
      ('bad.${BASE}', 'no-port-here', 'broken', NULL, NULL, 'node-1', NULL)`);
  const intervalMs = 300;
  const r = await rg.start({
    interval: `${intervalMs}ms`,
    // A comment at the end and a semicolon: the digest's wrapping copes with both.
    query: "SELECT host AS match, target AS addr, label AS name, pp AS proxy_protocol, alpn, tenant AS namespace FROM my_routes WHERE node = current_setting('sni_router.node_id') ORDER BY label -- by label\n;\n",
  });
  await waitFor(async () => (await backendFor(r.port, `x.${BASE}`, ['h2'])) === 'bravo', 3000, 'the ALPN route');
  assert.equal(await backendFor(r.port, `x.${BASE}`), 'alpha');
  assert.equal(await backendFor(r.port, `x.${BASE}`, ['acme-tls/2']), 'alpha');
  assert.equal(await backendFor(r.port, `other-node.${BASE}`), 'caddy');
  const pp = r.app.router.table.routes.find((route) => route.match === `pp.${BASE}`);
  assert.deepEqual(pp?.backend, { name: 'with-proxy-protocol', addrs: ['127.0.0.1:1', '127.0.0.1:2'], proxyProtocol: 'v2' });
  assert.ok(await r.metric('sni_router_source_invalid_entries_total', { source: rg.source }) >= 1);
  assert.ok(r.logs.some((l) => l.msg === 'skipped invalid route entry' && String(l.entry).includes(`bad.${BASE}`)));
  assert.deepEqual(r.app.router.table.routes.filter((route) => route.match === `x.${BASE}`).map((route) => route.namespace).sort(),
    ['tenant-a', null].sort());

  // Unchanged, it is digested on the server: polls pass and nothing is rebuilt; a change is read.
  const { before, after } = await afterPolls(r, rg.source, 3);
  assert.equal(after.merges, before.merges);
  assert.equal(after.generation, before.generation);
  assert.ok(!r.logs.some((l) => String(l.msg).includes('cannot be wrapped')));
  const since = Date.now();
  await rg.d.db.query(`INSERT INTO my_routes VALUES ('y.${BASE}', '127.0.0.1:${bravo.port}', 'bravo', NULL, NULL, 'node-1', 'tenant-b')`);
  await timeUntilRouted(r.port, `y.${BASE}`, 'bravo', { since, deadlineMs: intervalMs + 800 });

  // A query that does not return match and addr fails whole; the last good snapshot stays.
  await rg.d.db.query('ALTER TABLE my_routes RENAME COLUMN target TO destination');
  await waitFor(async () => await r.metric('sni_router_source_up', { source: rg.source }) === 0, 3000, 'the query to fail');
  assert.equal(await backendFor(r.port, `x.${BASE}`), 'alpha');
});

test('a custom query the server cannot wrap for a digest is read whole and digested by the router', async (t) => {
  const rg = await rig(t);
  const alpha = await rg.backend('alpha');
  const bravo = await rg.backend('bravo');
  await rg.d.db.query(`CREATE TABLE my_routes (host text, target text);
    INSERT INTO my_routes VALUES ('x.${BASE}', '127.0.0.1:${alpha.port}')`);
  const intervalMs = 200;
  // FOR SHARE cannot run in the read-only transaction of a digest; alone, it can.
  const r = await rg.start({ interval: `${intervalMs}ms`, query: 'SELECT host AS match, target AS addr FROM my_routes FOR SHARE' });
  await timeUntilRouted(r.port, `x.${BASE}`, 'alpha', { deadlineMs: 3000 });
  assert.equal(r.logs.filter((l) => String(l.msg).includes('cannot be wrapped')).length, 1);
  const { before, after } = await afterPolls(r, rg.source, 3);
  assert.equal(after.merges, before.merges, 'the same rows are not validated or merged again');
  const since = Date.now();
  await rg.d.db.query(`UPDATE my_routes SET target = '127.0.0.1:${bravo.port}'`);
  await timeUntilRouted(r.port, `x.${BASE}`, 'bravo', { since, deadlineMs: intervalMs + 800 });
  assert.equal(await r.metric('sni_router_source_updates_total', { source: rg.source, result: 'error' }), 0);
  assert.equal(r.logs.filter((l) => String(l.msg).includes('cannot be wrapped')).length, 1, 'said once');

  // Two statements can be neither wrapped nor read as one result: a failure, never a crash.
  const two = await rg.start({ interval: '60s', query: `SELECT 'z.${BASE}' AS match, '127.0.0.1:1' AS addr; SELECT 1` });
  await waitFor(async () => await two.metric('sni_router_source_updates_total', { source: rg.source, result: 'error' }) >= 1, 3000, 'the read to fail');
  const status = (two.app.routesView() as { sources: Array<{ name: string; last_error: string }> }).sources.find((s) => s.name === rg.source);
  assert.match(status?.last_error ?? '', /holds 2 statements; it must be one/);
});
