// Cert watch entries per namespace (`for_each: namespace`) and the scheduler that spares calls,
// end to end: a real router whose namespaces come from PostgreSQL's default query or a routes
// file, a Caddy-shaped storage tree renewed the way Caddy writes it, a recorder standing in for
// systemctl (SNI_ROUTER_SYSTEMCTL), real coturn processes reloading on SIGUSR2, /routes and /metrics
// read over HTTP. The clock the restart window is judged by is injected (a certwatch tuning), so
// a test can move it.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import tls from 'node:tls';
import { describe, test } from 'node:test';
import { findCandidates } from '../src/certwatch/find.ts';
import type { Tuning } from '../src/certwatch/index.ts';
import { candidatesFor, scanStorage } from '../src/certwatch/scan.ts';
import { type RunningRouter, sleep, startRouter, tempDir, waitFor } from './helpers.ts';
import { CaddyStorage, DAY, HOUR, type Issued, LE, TestCa, fingerprintOf } from './support/caddy.ts';
import { type Recorder, recorder } from './support/recorder.ts';
import { addNamespace, createTestDatabase } from './support/sources.ts';
import { startCoturn, toolGate } from './support/turn.ts';

const BASE = 'example.test';
const ROOT = join(import.meta.dirname, '..');
const coturnGate = toolGate(['turnserver']);
const cdn = (ns: string) => `cdn.ns-${ns}.${BASE}`;

interface ActionView { state: string; attempts: number; last_error: string | null; deferred_until: string | null; fingerprint: string }
interface EntryView { name: string; domain: string; namespace: string | null; deployed: { fingerprint: string; acted: boolean } | null; actions: ActionView[] }
interface RoutesView { certwatch: EntryView[]; certwatch_skipped: Array<{ template: string; namespace: string; reason: string; detail: string }> }

async function routes(r: RunningRouter): Promise<RoutesView> {
  const res = await fetch(`http://127.0.0.1:${r.adminPort}/routes`);
  assert.equal(res.status, 200);
  return await res.json() as RoutesView;
}

function entryOf(view: RoutesView, name: string): EntryView | undefined {
  return view.certwatch.find((e) => e.name === name);
}

/** Fails with the router's log tail when cond does not hold in time. */
async function until(r: RunningRouter, cond: () => boolean | Promise<boolean>, ms: number, what: string): Promise<void> {
  try {
    await waitFor(cond, ms, what);
  } catch (err) {
    const tail = r.logs.filter((l) => l.cert !== undefined || l.template !== undefined).slice(-30).map((l) => JSON.stringify(l)).join('\n');
    throw new Error(`${(err as Error).message}\n--- certwatch log (tail) ---\n${tail}`);
  }
}

/** The certificate copy_to holds for a namespace's entry `turn-<ns>`. */
function copied(dir: string, ns: string): string | null {
  const file = join(dir, 'turn', ns, `turn-${ns}.crt`);
  return existsSync(file) ? fingerprintOf(readFileSync(file)) : null;
}

/** What a previous run left in a namespace's copy_to (no .acted record: taken as acted on). */
function seed(dir: string, ns: string, pair: Issued): void {
  const d = join(dir, 'turn', ns);
  mkdirSync(d, { recursive: true });
  writeFileSync(join(d, `turn-${ns}.crt`), pair.cert, { mode: 0o640 });
  writeFileSync(join(d, `turn-${ns}.key`), pair.key, { mode: 0o640 });
}

/** A certificate for every namespace's `cdn.` name at once, issued `agoMs` ago, valid for 90 days from then. */
function multiSan(ca: TestCa, namespaces: readonly string[], agoMs: number): Issued {
  return ca.renewal(agoMs, namespaces.map(cdn));
}

/** Caddy files a certificate under the first name it was obtained for: the other namespaces must find it by its SANs. */
function renew(storage: CaddyStorage, pair: Issued, firstNs: string): void {
  storage.renew(LE, pair, cdn(firstNs));
}

function template(dir: string, storage: CaddyStorage, onChange: string, extra = ''): string {
  return `  - for_each: namespace
    name: "turn-{namespace}"
    domain: "cdn.ns-{namespace}.${BASE}"
    caddy_storage: ${storage.root}
    copy_to: { dir: "${join(dir, 'turn')}/{namespace}" }
    on_change: ${onChange}
    debounce: 200ms
    min_interval: 0s
${extra}`;
}

/** A routes file for the file source: one route per namespace. */
function routesFile(file: string, namespaces: readonly string[]): void {
  const lines = ['routes:'];
  namespaces.forEach((ns, i) => lines.push(
    `  - { match: "${cdn(ns)}", alpn: none, namespace: "${ns}", backend: { name: "turn-${ns}", addr: "127.0.0.1:${5400 + i}" } }`,
  ));
  writeFileSync(`${file}.tmp`, `${lines.join('\n')}\n`);
  // Atomically, as an operator's tool would: the file source never reads half a file.
  renameSync(`${file}.tmp`, file);
}

const unitOf = (c: { args: string[] }) => c.args.at(-1) ?? '';
const restartsOf = (s: Recorder) => s.calls().filter((c) => c.args[0] === 'restart');

describe('certwatch per namespace', { concurrency: false }, () => {
  test('a namespace enabled at run time gets its certificate watched; a renewal for every namespace restarts each one at a time, stagger apart, and not a disabled one', async () => {
    const { dir, cleanup } = tempDir('sni-router-ns-pg-');
    const db = await createTestDatabase();
    const ca = new TestCa(dir);
    const storage = new CaddyStorage(join(dir, 'caddy'));
    const systemctl = recorder(dir, 'systemctl', { holdMs: 100 });
    const first = multiSan(ca, ['a', 'b', 'c', 'd'], 30 * DAY);
    renew(storage, first, 'a');
    for (const ns of ['a', 'b', 'd']) {
      seed(dir, ns, first);
      await addNamespace(db.db, { name: ns, port: 5300 + ns.charCodeAt(0) });
    }
    let r: RunningRouter | null = null;
    try {
      r = await startRouter(`
fallback: { name: caddy, addr: "127.0.0.1:9" }
sources:
  - type: postgres
    name: pg
    url: "${db.url()}"
    interval: 1s
    listen_channel: sni_router_routes
    params: { base_domain: ${BASE}, node_id: node-1 }
certwatch:
${template(dir, storage, '{ restart: { systemd_unit: "orama-namespace-turn@{namespace}.service" } }', '    stagger: 300ms\n')}`, {
        env: { ...process.env, SNI_ROUTER_SYSTEMCTL: systemctl.path },
      });
      const router = r;
      const current = (name: string) => router.logs.some((l) => l.cert === name && l.msg === 'the deployed certificate is the newest');
      await until(router, () => ['turn-a', 'turn-b', 'turn-d'].every(current), 15_000, 'the entries of the namespaces in the database');
      assert.deepEqual(systemctl.calls(), [], 'copy_to already held the certificate: nothing to restart');

      // Enabled at run time: its entry appears, and its empty copy_to is filled and acted on at once.
      await addNamespace(db.db, { name: 'c', port: 5399 });
      await until(router, () => restartsOf(systemctl).length === 1, 10_000, "the new namespace's restart");
      assert.equal(unitOf(systemctl.calls()[0]), 'orama-namespace-turn@c.service');
      assert.equal(copied(dir, 'c'), first.fingerprint);
      const view = await routes(router);
      assert.deepEqual(view.certwatch.map((e) => [e.name, e.namespace, e.domain]).sort(), [
        ['turn-a', 'a', cdn('a')], ['turn-b', 'b', cdn('b')], ['turn-c', 'c', cdn('c')], ['turn-d', 'd', cdn('d')],
      ]);
      assert.equal(entryOf(view, 'turn-c')?.deployed?.fingerprint, first.fingerprint);

      // Disabled: its entry goes, with its series; nothing on disk is removed.
      await db.db.query("UPDATE namespace_webrtc_config SET enabled = false WHERE namespace_name = 'b'");
      await until(router, async () => entryOf(await routes(router), 'turn-b') === undefined, 10_000, "b's entry to be withdrawn");
      assert.doesNotMatch(await router.metricsText(), /cert="turn-b"/, "b's series are removed");
      assert.equal(copied(dir, 'b'), first.fingerprint, "b's copy_to is left as it was");

      // One renewal of the certificate every namespace shares.
      const next = multiSan(ca, ['a', 'b', 'c', 'd'], HOUR);
      renew(storage, next, 'a');
      await until(router, () => restartsOf(systemctl).length === 4, 15_000, 'the restarts after the renewal');
      await sleep(1000); // stagger 300 ms: a restart of b would have come by now
      const after = restartsOf(systemctl).slice(1);
      assert.deepEqual(after.map(unitOf).sort(), ['a', 'c', 'd'].map((ns) => `orama-namespace-turn@${ns}.service`));
      for (let i = 1; i < after.length; i++) {
        const gap = after[i].at - after[i - 1].end;
        assert.ok(gap >= 290, `restart ${i + 1} began ${gap} ms after restart ${i} ended (stagger 300 ms): ${JSON.stringify(after)}`);
      }
      for (const ns of ['a', 'c', 'd']) assert.equal(copied(dir, ns), next.fingerprint, `${ns}'s copy_to holds the renewal`);
      assert.equal(copied(dir, 'b'), first.fingerprint, 'the disabled namespace is left alone');
      assert.equal(restartsOf(systemctl).length, 4);
      assert.equal(await router.metric('sni_router_cert_reloads_total', { cert: 'turn-a', result: 'ok' }), 1);
    } finally {
      await r?.stop();
      await db.drop();
      cleanup();
    }
  });

  test('a signal template with pid_file {namespace}.pid reaches each namespace\'s coturn, and both serve the renewal', { skip: coturnGate.skip }, async () => {
    coturnGate.check();
    const { dir, cleanup } = tempDir('sni-router-ns-coturn-');
    const ca = new TestCa(dir);
    const storage = new CaddyStorage(join(dir, 'caddy'));
    const first = multiSan(ca, ['a', 'b'], 30 * DAY);
    renew(storage, first, 'a');
    mkdirSync(join(dir, 'run'));
    const coturns: Array<Awaited<ReturnType<typeof startCoturn>>> = [];
    let r: RunningRouter | null = null;
    try {
      for (const ns of ['a', 'b']) {
        seed(dir, ns, first);
        mkdirSync(join(dir, `coturn-${ns}`));
        coturns.push(await startCoturn({
          certFile: join(dir, 'turn', ns, `turn-${ns}.crt`), keyFile: join(dir, 'turn', ns, `turn-${ns}.key`), users: { u: 'p' },
          dir: join(dir, `coturn-${ns}`), pidFile: join(dir, 'run', `${ns}.pid`), startMs: 30_000,
        }));
      }
      const file = join(dir, 'routes.yaml');
      routesFile(file, ['a', 'b']);
      r = await startRouter(`
fallback: { name: caddy, addr: "127.0.0.1:9" }
sources: [{ type: file, path: "${file}" }]
certwatch:
${template(dir, storage, `{ signal: { pid_file: "${join(dir, 'run')}/{namespace}.pid", signal: SIGUSR2 } }`, '    stagger: 300ms\n')}`);
      const router = r;
      await until(router, () => ['turn-a', 'turn-b'].every((n) => router.logs.some((l) => l.cert === n && l.msg === 'the deployed certificate is the newest')),
        15_000, 'both entries');
      for (const [i, ns] of ['a', 'b'].entries()) assert.equal(await served(coturns[i].tlsPort, cdn(ns)), first.fingerprint);

      const next = multiSan(ca, ['a', 'b'], HOUR);
      renew(storage, next, 'a');
      for (const [i, ns] of ['a', 'b'].entries()) {
        let last = '';
        await until(router, async () => (last = await served(coturns[i].tlsPort, cdn(ns)).catch((e: Error) => e.message)) === next.fingerprint,
          15_000, `coturn ${ns} to serve the renewal (serves ${last})`);
        assert.match(coturns[i].log(), /Reloading TLS certificates and keys/, `coturn ${ns} reloaded on SIGUSR2`);
        assert.equal(process.kill(coturns[i].pid, 0), true, `coturn ${ns}: the same process, reloaded`);
      }
      const deployed = router.logs.filter((l) => l.msg === 'certificate deployed').map((l) => String(l.action));
      assert.deepEqual(deployed.map((a) => /\(from (.*)\)$/.exec(a)?.[1]).sort(), [join(dir, 'run', 'a.pid'), join(dir, 'run', 'b.pid')]);
    } finally {
      await r?.stop();
      for (const c of coturns) await c.stop();
      cleanup();
    }
  });

  test('restart_window defers a restart to the window, across a restart of the router, unless the served certificate expires within urgent_before', async () => {
    const { dir, cleanup } = tempDir('sni-router-ns-window-');
    const ca = new TestCa(dir);
    const storage = new CaddyStorage(join(dir, 'caddy'));
    const systemctl = recorder(dir, 'systemctl');
    // a serves a certificate with 60 days left; b one that expires in 3 days.
    seed(dir, 'a', ca.renewal(30 * DAY, [cdn('a')]));
    seed(dir, 'b', ca.issue([cdn('b')], new Date(Date.now() - 87 * DAY), new Date(Date.now() + 3 * DAY)));
    const file = join(dir, 'routes.yaml');
    routesFile(file, ['a', 'b']);
    // Noon, local time: outside 02:00-05:00.
    const noon = new Date();
    noon.setHours(12, 0, 0, 0);
    let clock = noon.getTime();
    const tuning: Partial<Tuning> = { now: () => clock, tickMs: 50 };
    const yaml = `
fallback: { name: caddy, addr: "127.0.0.1:9" }
sources: [{ type: file, path: "${file}" }]
certwatch:
${template(dir, storage, '{ restart: { systemd_unit: "turn@{namespace}.service" } }', '    stagger: 200ms\n    restart_window: "02:00-05:00"\n    urgent_before: 7d\n')}`;
    const env = { ...process.env, SNI_ROUTER_SYSTEMCTL: systemctl.path };
    let r: RunningRouter | null = await startRouter(yaml, { env, certwatch: tuning });
    try {
      let router = r;
      await until(router, () => router.logs.some((l) => l.cert === 'turn-b' && l.msg === 'certwatch started'), 10_000, 'the entries');
      const next = multiSan(ca, ['a', 'b'], HOUR);
      renew(storage, next, 'a');
      // b is urgent: restarted at once, outside the window.
      await until(router, () => restartsOf(systemctl).length === 1, 10_000, "b's urgent restart");
      assert.equal(unitOf(systemctl.calls()[0]), 'turn@b.service');
      // a waits; its copy_to is written at once all the same.
      await until(router, () => copied(dir, 'a') === next.fingerprint, 5000, "a's copy_to");
      await sleep(600);
      assert.equal(restartsOf(systemctl).length, 1, 'a is not restarted outside the window');
      const tomorrow2am = new Date(noon.getTime());
      tomorrow2am.setDate(tomorrow2am.getDate() + 1);
      tomorrow2am.setHours(2, 0, 0, 0);
      const a = entryOf(await routes(router), 'turn-a');
      assert.equal(a?.actions[0]?.state, 'deferred');
      assert.equal(a?.actions[0]?.deferred_until, tomorrow2am.toISOString());
      assert.equal(a?.deployed?.acted, false);
      assert.equal(await router.metric('sni_router_cert_actions', { cert: 'turn-a', state: 'deferred' }), 1);
      assert.equal(await router.metric('sni_router_cert_actions', { cert: 'turn-b', state: 'pending' }), 0);

      // The router restarts meanwhile: a's record says pending, and what is served still has time.
      await router.stop();
      r = null;
      r = router = await startRouter(yaml, { env, certwatch: tuning });
      await until(router, async () => entryOf(await routes(router), 'turn-a')?.actions[0]?.state === 'deferred', 10_000, 'a deferred again');
      assert.equal(restartsOf(systemctl).length, 1, 'not restarted at start');

      // The window opens.
      clock = tomorrow2am.getTime() + 30 * 60_000;
      await until(router, () => restartsOf(systemctl).length === 2, 5000, "a's restart in the window");
      assert.equal(unitOf(restartsOf(systemctl)[1]), 'turn@a.service');
      await until(router, async () => entryOf(await routes(router), 'turn-a')?.actions.length === 0, 5000, "a's action done");
      assert.equal(await router.metric('sni_router_cert_actions', { cert: 'turn-a', state: 'deferred' }), 0);
      assert.equal(entryOf(await routes(router), 'turn-a')?.deployed?.acted, true);
    } finally {
      await r?.stop();
      cleanup();
    }
  });

  test('a failing action is retried behind the others and then "failed"; /routes and cert_actions show pending, deferred and failed; SIGHUP tries it again', async () => {
    const { dir, cleanup } = tempDir('sni-router-ns-failing-');
    const ca = new TestCa(dir);
    const storage = new CaddyStorage(join(dir, 'caddy'));
    const systemctl = recorder(dir, 'systemctl', { failMatching: 'turn@a.service' });
    renew(storage, multiSan(ca, ['a', 'b', 'c'], 30 * DAY), 'a');
    // An entry of the config file, restarted only in its window, with a renewal waiting.
    storage.renew(LE, ca.renewal(HOUR, [`late.${BASE}`]), `late.${BASE}`);
    const lateCopy = join(dir, 'late');
    mkdirSync(lateCopy);
    const served = ca.renewal(30 * DAY, [`late.${BASE}`]);
    writeFileSync(join(lateCopy, 'late.crt'), served.cert);
    writeFileSync(join(lateCopy, 'late.key'), served.key);
    const file = join(dir, 'routes.yaml');
    routesFile(file, ['a', 'b', 'c']);
    const noon = new Date();
    noon.setHours(12, 0, 0, 0);
    const yamlFile = join(dir, 'router.yaml');
    writeFileSync(yamlFile, `listen: "127.0.0.1:0"
admin: { listen: "127.0.0.1:0" }
fallback: { name: caddy, addr: "127.0.0.1:9" }
sources: [{ type: file, path: "${file}" }]
certwatch:
  - name: late
    domain: late.${BASE}
    caddy_storage: ${storage.root}
    copy_to: { dir: "${lateCopy}" }
    on_change: { restart: { systemd_unit: late.service } }
    restart_window: "02:00-05:00"
${template(dir, storage, '{ restart: { systemd_unit: "turn@{namespace}.service" } }', '    stagger: 400ms\n')}`);
    const r = await startRouter(readFileSync(yamlFile, 'utf8'), {
      file: yamlFile, env: { ...process.env, SNI_ROUTER_SYSTEMCTL: systemctl.path },
      certwatch: { now: () => noon.getTime(), retries: 1, retryBaseMs: 1000 },
    });
    try {
      // copy_to is empty for a, b and c: each is deployed and restarted at start, one at a time.
      const seen = new Map<string, Set<string>>();
      await until(r, async () => {
        for (const e of (await routes(r)).certwatch) for (const a of e.actions) (seen.get(e.name) ?? seen.set(e.name, new Set()).get(e.name)!).add(a.state);
        return entryOf(await routes(r), 'turn-a')?.actions[0]?.state === 'failed';
      }, 15_000, "a's action to fail for good");
      const calls = restartsOf(systemctl).filter((c) => unitOf(c) !== 'late.service');
      assert.deepEqual(calls.map((c) => [unitOf(c), c.status]), [
        ['turn@a.service', 3], ['turn@b.service', 0], ['turn@c.service', 0], ['turn@a.service', 3],
      ], 'a failed, b and c went on, then a was retried behind them');
      assert.ok(seen.get('turn-c')?.has('pending'), `c was seen queued: ${JSON.stringify([...seen].map(([k, v]) => [k, [...v]]))}`);

      const view = await routes(r);
      const a = entryOf(view, 'turn-a')!;
      assert.equal(a.actions[0].attempts, 2);
      assert.match(a.actions[0].last_error ?? '', /reload failed \(simulated\)/);
      for (const ns of ['b', 'c']) assert.deepEqual(entryOf(view, `turn-${ns}`)?.actions, []);
      const late = entryOf(view, 'late')!;
      assert.equal(late.namespace, null);
      assert.equal(late.actions[0].state, 'deferred');
      assert.ok(late.actions[0].deferred_until !== null);
      assert.equal(await r.metric('sni_router_cert_actions', { cert: 'turn-a', state: 'failed' }), 1);
      assert.equal(await r.metric('sni_router_cert_actions', { cert: 'late', state: 'deferred' }), 1);
      assert.equal(await r.metric('sni_router_cert_actions', { cert: 'turn-b', state: 'pending' }), 0);
      assert.equal(await r.metric('sni_router_cert_reloads_total', { cert: 'turn-a', result: 'error' }), 2);

      // Given up until SIGHUP (or the next change, or the periodic rescan).
      await sleep(800);
      assert.equal(restartsOf(systemctl).filter((c) => unitOf(c) === 'turn@a.service').length, 2);
      systemctl.heal();
      assert.equal(await r.app.reload(), true);
      await until(r, async () => entryOf(await routes(r), 'turn-a')?.actions.length === 0, 10_000, "a's action after SIGHUP");
      assert.equal(await r.metric('sni_router_cert_actions', { cert: 'turn-a', state: 'failed' }), 0);
      assert.equal(await r.metric('sni_router_cert_reloads_total', { cert: 'turn-a', result: 'ok' }), 1);
    } finally {
      await r.stop();
      cleanup();
    }
  });

  test('a namespace whose unit name would be invalid is skipped with a reason and a metric, once; the others go on', async () => {
    const { dir, cleanup } = tempDir('sni-router-ns-skip-');
    const ca = new TestCa(dir);
    const storage = new CaddyStorage(join(dir, 'caddy'));
    const systemctl = recorder(dir, 'systemctl');
    const long = 'n'.repeat(60);
    renew(storage, multiSan(ca, ['a', 'd', long], 30 * DAY), 'a');
    const file = join(dir, 'routes.yaml');
    routesFile(file, ['a', long]);
    // 189 characters before the namespace: a 60-character one makes a unit name of 258.
    const unit = `${'orama-namespace-turn-'.repeat(9)}@{namespace}.service`;
    const r = await startRouter(`
fallback: { name: caddy, addr: "127.0.0.1:9" }
sources: [{ type: file, path: "${file}" }]
certwatch:
${template(dir, storage, `{ restart: { systemd_unit: "${unit}" } }`, '    stagger: 100ms\n')}`, { env: { ...process.env, SNI_ROUTER_SYSTEMCTL: systemctl.path } });
    try {
      await until(r, () => restartsOf(systemctl).length === 1, 10_000, "a's restart");
      const skippedLines = () => r.logs.filter((l) => l.msg === 'certwatch entry skipped for a namespace');
      assert.equal(skippedLines().length, 1);
      assert.equal(skippedLines()[0].reason, 'invalid_unit');
      assert.equal(skippedLines()[0].namespace, long);
      const view = await routes(r);
      assert.deepEqual(view.certwatch.map((e) => e.name), ['turn-a']);
      assert.deepEqual(view.certwatch_skipped.map((s) => [s.template, s.namespace, s.reason]), [['turn-{namespace}', long, 'invalid_unit']]);
      assert.equal(await r.metric('sni_router_certwatch_skipped_total', { cert: 'turn-{namespace}', reason: 'invalid_unit' }), 1);

      // Another namespace arrives: it gets its entry; the skipped one is not counted again.
      routesFile(file, ['a', 'd', long]);
      await until(r, () => restartsOf(systemctl).length === 2, 10_000, "d's restart");
      assert.match(unitOf(restartsOf(systemctl)[1]), /@d\.service$/);
      assert.equal(skippedLines().length, 1);
      assert.equal(await r.metric('sni_router_certwatch_skipped_total', { cert: 'turn-{namespace}', reason: 'invalid_unit' }), 1);
      assert.equal(existsSync(join(dir, 'turn', long)), false, 'nothing was written for the skipped namespace');
    } finally {
      await r.stop();
      cleanup();
    }
  });

  test('one read of the storage serves every namespace: a certificate filed under another name counts for each name it carries; entries of the config file still read only their own keys', async () => {
    const { dir, cleanup } = tempDir('sni-router-ns-scan-');
    try {
      const ca = new TestCa(dir);
      const storage = new CaddyStorage(join(dir, 'caddy'));
      const shared = multiSan(ca, ['a', 'b'], HOUR);
      renew(storage, shared, 'a');
      // Under c's own key, a certificate for another name.
      storage.renew(LE, ca.renewal(HOUR, [`other.${BASE}`]), cdn('c'));
      const scan = await scanStorage(storage.root, new Set([cdn('a'), cdn('b'), cdn('c')]), new Date());
      const seen = (ns: string) => candidatesFor(scan, cdn(ns)).map((c) => [c.where, c.verdict.ok ? 'ok' : c.verdict.reason]);
      assert.deepEqual(seen('a'), [[`${LE}/${cdn('a')}`, 'ok']]);
      assert.deepEqual(seen('b'), [[`${LE}/${cdn('a')}`, 'ok']], "b's name, filed under a's key");
      assert.deepEqual(seen('c'), [[`${LE}/${cdn('c')}`, 'wrong_name']]);
      assert.deepEqual(seen('z'), []);
      // The same storage read by an entry of the config file for b: its own keys only, as before.
      const staticB = await findCandidates({
        name: 'b', domain: cdn('b'), caddyStorage: storage.root, cert: null, key: null, copyTo: null, onChange: null,
        minIntervalMs: 0, debounceMs: 0, staggerMs: 0, restartWindow: null, urgentBeforeMs: 0, namespace: null,
      });
      assert.deepEqual(staticB, []);
      // Bounded: beyond the cap, the keys no entry wants are left out first.
      const capped = await scanStorage(storage.root, new Set([cdn('c')]), new Date(), 1);
      assert.equal(capped.leftOut, 1);
      assert.deepEqual(candidatesFor(capped, cdn('c')).map((c) => c.where), [`${LE}/${cdn('c')}`]);
    } finally {
      cleanup();
    }
  });

  test('`sni-router check` refuses an unknown placeholder and {namespace} in an entry of the config file, with FILE:LINE:COL', async () => {
    const { dir, cleanup } = tempDir('sni-router-ns-check-');
    const check = (yaml: string) => new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
      const file = join(dir, 'c.yaml');
      writeFileSync(file, `fallback: { addr: "127.0.0.1:9" }\ncertwatch:\n${yaml}`);
      execFile(join(ROOT, 'bin', 'sni-router'), ['check', '--config', file], { timeout: 20_000 }, (err, stdout, stderr) => {
        resolve({ code: err === null ? 0 : Number((err as { code?: number }).code), stdout, stderr });
      });
    });
    try {
      const storage = join(dir, 'caddy');
      const good = await check(template(dir, new CaddyStorage(storage), '{ restart: { systemd_unit: "turn@{namespace}.service" } }'));
      assert.equal(good.code, 0, good.stderr);
      assert.match(good.stdout, /^certwatch turn-\{namespace\} \(for each namespace the route sources yield at run time\): cdn\.ns-\{namespace\}\.example\.test from caddy storage .*, on change restart systemd unit turn@\{namespace\}\.service$/m);
      const unknown = await check(template(dir, new CaddyStorage(storage), '{ restart: { systemd_unit: "turn@{ns}.service" } }'));
      assert.equal(unknown.code, 2);
      assert.match(unknown.stderr, /c\.yaml:8:43: certwatch\[0\]\.on_change\.restart\.systemd_unit: unknown placeholder \{ns\} \(known: \{namespace\}\)/);
      const asWritten = await check(`  - name: cdn\n    domain: "cdn.ns-{namespace}.${BASE}"\n    caddy_storage: ${storage}\n`);
      assert.equal(asWritten.code, 2);
      assert.match(asWritten.stderr, /c\.yaml:4:13: certwatch\[0\]\.domain uses \{namespace\}, which only an entry with for_each: namespace fills in/);
    } finally {
      cleanup();
    }
  });
});

/** The SHA-256 fingerprint of the certificate a TLS server presents for `servername`. */
function served(port: number, servername: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port, servername, rejectUnauthorized: false });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error('TLS handshake timed out'));
    }, 4000);
    s.on('secureConnect', () => {
      clearTimeout(timer);
      const fp = s.getPeerCertificate().fingerprint256;
      s.destroy();
      resolve(fp);
    });
    s.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}
