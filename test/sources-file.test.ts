// The file source through a real router: every way an operator, an editor or Kubernetes replaces a
// routes file reaches the live table within a second, and a bad file never touches it.
import assert from 'node:assert/strict';
import { mkdirSync, renameSync, rmSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { type RunningRouter, makeCert, sleep, startRouter, tempDir, tlsBackend, waitFor } from './helpers.ts';
import { backendFor, randomSuffix, timeUntilRouted } from './support/sources.ts';

const BOUND_MS = 1000;

interface Rig {
  readonly dir: string;
  readonly ports: Record<string, number>;
  start(path: string, extra?: string): Promise<RunningRouter>;
}

async function rig(t: TestContext): Promise<Rig> {
  const tmp = tempDir();
  const pair = makeCert(tmp.dir, 'backend.test');
  const backends = await Promise.all(['caddy', 'alpha', 'bravo', 'charlie'].map((n) => tlsBackend(n, pair)));
  const ports: Record<string, number> = {};
  for (const [i, n] of ['caddy', 'alpha', 'bravo', 'charlie'].entries()) ports[n] = backends[i].port;
  const routers: RunningRouter[] = [];
  t.after(async () => {
    for (const r of routers) await r.stop();
    for (const b of backends) await b.close();
    tmp.cleanup();
  });
  return {
    dir: tmp.dir,
    ports,
    start: async (path, extra = '') => {
      const r = await startRouter([
        `fallback: { name: caddy, addr: "127.0.0.1:${ports.caddy}" }`,
        extra,
        'sources:',
        `  - { type: file, name: routes-file, path: "${path}" }`,
      ].join('\n'));
      routers.push(r);
      return r;
    },
  };
}

/** A routes file: each [match, backend] pair routes to that test backend. */
function routesYaml(ports: Record<string, number>, routes: ReadonlyArray<readonly [string, string]>): string {
  return `routes:\n${routes.map(([m, b]) => `  - match: "${m}"\n    backend: { name: ${b}, addr: "127.0.0.1:${ports[b]}" }\n`).join('')}`;
}

/** Temp file in the same directory, then rename: what editors, Caddy and careful scripts do. */
function writeAtomically(file: string, text: string): void {
  const tmp = join(file, '..', `.${randomSuffix()}.tmp`);
  writeFileSync(tmp, text);
  renameSync(tmp, file);
}

async function assertRoutedWithin(r: RunningRouter, sni: string, backend: string, since: number): Promise<number> {
  const ms = await timeUntilRouted(r.port, sni, backend, { since });
  assert.ok(ms <= BOUND_MS, `${sni} reached ${backend} only ${ms}ms after the change`);
  return ms;
}

test('sees an in-place write and a rename over the file within a second', async (t) => {
  const rg = await rig(t);
  const file = join(rg.dir, 'routes.yaml');
  writeFileSync(file, routesYaml(rg.ports, [['a.example.test', 'alpha']]));
  const r = await rg.start(file);
  assert.equal(await backendFor(r.port, 'a.example.test'), 'alpha', 'the file is read before the router listens');
  assert.equal(await backendFor(r.port, 'b.example.test'), 'caddy');

  let since = Date.now();
  writeFileSync(file, routesYaml(rg.ports, [['a.example.test', 'bravo'], ['b.example.test', 'charlie']]));
  const inPlace = await assertRoutedWithin(r, 'a.example.test', 'bravo', since);
  assert.equal(await backendFor(r.port, 'b.example.test'), 'charlie');

  since = Date.now();
  writeAtomically(file, routesYaml(rg.ports, [['a.example.test', 'charlie']]));
  const renamed = await assertRoutedWithin(r, 'a.example.test', 'charlie', since);
  await timeUntilRouted(r.port, 'b.example.test', 'caddy', { since, deadlineMs: BOUND_MS });
  t.diagnostic(`in-place write ${inPlace}ms, rename over ${renamed}ms`);

  // An unrelated file in the same directory reads the routes file again but changes nothing.
  const generation = r.app.router.generation;
  writeFileSync(join(rg.dir, 'unrelated.txt'), 'x');
  await new Promise((done) => setTimeout(done, 300));
  assert.equal(r.app.router.generation, generation);
});

test('follows a Kubernetes ConfigMap symlink swap (..data re-pointed to a new directory)', async (t) => {
  const rg = await rig(t);
  // What the kubelet's atomic writer lays out: ..<timestamp>/routes.yaml, ..data -> ..<timestamp>,
  // routes.yaml -> ..data/routes.yaml; an update writes a new timestamped directory, points
  // ..data_tmp at it, renames ..data_tmp over ..data and removes the old directory.
  const dir = join(rg.dir, 'configmap');
  mkdirSync(dir);
  let version = 0;
  const swap = (text: string) => {
    const previous = version === 0 ? null : `..2026_11_22_04_00_0${version}.000`;
    version++;
    const next = `..2026_11_22_04_00_0${version}.000`;
    mkdirSync(join(dir, next));
    writeFileSync(join(dir, next, 'routes.yaml'), text);
    symlinkSync(next, join(dir, '..data_tmp'));
    renameSync(join(dir, '..data_tmp'), join(dir, '..data'));
    if (previous !== null) rmSync(join(dir, previous), { recursive: true });
  };
  swap(routesYaml(rg.ports, [['turn.example.test', 'alpha']]));
  symlinkSync('..data/routes.yaml', join(dir, 'routes.yaml'));
  const r = await rg.start(join(dir, 'routes.yaml'));
  assert.equal(await backendFor(r.port, 'turn.example.test'), 'alpha');

  const times: number[] = [];
  for (const backend of ['bravo', 'charlie', 'alpha']) {
    const since = Date.now();
    swap(routesYaml(rg.ports, [['turn.example.test', backend]]));
    times.push(await assertRoutedWithin(r, 'turn.example.test', backend, since));
  }
  t.diagnostic(`ConfigMap swaps seen after ${times.join(', ')}ms`);
});

test('follows a symlink to a file in another directory, edited in place or re-pointed', async (t) => {
  const rg = await rig(t);
  const real = join(rg.dir, 'elsewhere');
  const link = join(rg.dir, 'etc');
  mkdirSync(real);
  mkdirSync(link);
  writeFileSync(join(real, 'v1.yaml'), routesYaml(rg.ports, [['s.example.test', 'alpha']]));
  writeFileSync(join(real, 'v2.yaml'), routesYaml(rg.ports, [['s.example.test', 'charlie']]));
  symlinkSync(join(real, 'v1.yaml'), join(link, 'routes.yaml'));
  const r = await rg.start(join(link, 'routes.yaml'));
  assert.equal(await backendFor(r.port, 's.example.test'), 'alpha');

  // The target's directory is watched too: an in-place edit of the target is seen.
  let since = Date.now();
  writeFileSync(join(real, 'v1.yaml'), routesYaml(rg.ports, [['s.example.test', 'bravo']]));
  const edited = await assertRoutedWithin(r, 's.example.test', 'bravo', since);

  // The link re-pointed (ln -sfn style: a new link renamed over the old one).
  since = Date.now();
  symlinkSync(join(real, 'v2.yaml'), join(link, '.routes.yaml.new'));
  renameSync(join(link, '.routes.yaml.new'), join(link, 'routes.yaml'));
  const repointed = await assertRoutedWithin(r, 's.example.test', 'charlie', since);
  t.diagnostic(`target edited: ${edited}ms, link re-pointed: ${repointed}ms`);
});

test('keeps the routes while the file is deleted and applies it when recreated', async (t) => {
  const rg = await rig(t);
  const file = join(rg.dir, 'routes.yaml');
  writeFileSync(file, routesYaml(rg.ports, [['a.example.test', 'alpha']]));
  const r = await rg.start(file);
  assert.equal(await backendFor(r.port, 'a.example.test'), 'alpha');

  unlinkSync(file);
  await waitFor(async () => await r.metric('sni_router_source_up', { source: 'routes-file' }) === 0, 5000, 'the source to report the missing file');
  assert.ok(await r.metric('sni_router_source_updates_total', { source: 'routes-file', result: 'error' }) >= 1);
  assert.equal(await backendFor(r.port, 'a.example.test'), 'alpha', 'a missing file keeps its last good routes');
  const failure = r.logs.find((l) => l.msg === 'source failed, keeping its last good snapshot' && l.source === 'routes-file');
  assert.match(String(failure?.err), /does not exist/);

  const since = Date.now();
  writeFileSync(file, routesYaml(rg.ports, [['a.example.test', 'bravo']]));
  const ms = await assertRoutedWithin(r, 'a.example.test', 'bravo', since);
  await waitFor(async () => await r.metric('sni_router_source_up', { source: 'routes-file' }) === 1, 2000, 'source_up 1');
  t.diagnostic(`recreated file seen after ${ms}ms`);
});

test('waits for a directory that does not exist yet', async (t) => {
  const rg = await rig(t);
  const file = join(rg.dir, 'not', 'yet', 'there', 'routes.yaml');
  const r = await rg.start(file);
  assert.equal(await r.metric('sni_router_source_up', { source: 'routes-file' }), 0);
  assert.equal(await backendFor(r.port, 'late.example.test'), 'caddy');

  const since = Date.now();
  mkdirSync(join(rg.dir, 'not', 'yet', 'there'), { recursive: true });
  writeFileSync(file, routesYaml(rg.ports, [['late.example.test', 'alpha']]));
  const ms = await assertRoutedWithin(r, 'late.example.test', 'alpha', since);

  // And once there, it is watched like any other.
  const since2 = Date.now();
  writeAtomically(file, routesYaml(rg.ports, [['late.example.test', 'bravo']]));
  const ms2 = await assertRoutedWithin(r, 'late.example.test', 'bravo', since2);
  t.diagnostic(`file in a new directory seen after ${ms}ms, next change after ${ms2}ms`);
});

test('rejects a file that does not parse whole, keeps the old routes, and recovers', async (t) => {
  const rg = await rig(t);
  const file = join(rg.dir, 'routes.yaml');
  writeFileSync(file, routesYaml(rg.ports, [['a.example.test', 'alpha'], ['b.example.test', 'alpha']]));
  const r = await rg.start(file);
  assert.equal(await backendFor(r.port, 'a.example.test'), 'alpha');
  const generation = r.app.router.generation;

  // Broken YAML: rejected with FILE:LINE:COL, nothing changes.
  writeAtomically(file, 'routes:\n  - match: "a.example.test"\n    backend: { name: bravo, addr: [unclosed\n');
  await waitFor(() => r.logs.some((l) => l.msg === 'source failed, keeping its last good snapshot' && l.source === 'routes-file'), 5000, 'the parse failure to be logged');
  const failure = r.logs.find((l) => l.msg === 'source failed, keeping its last good snapshot' && l.source === 'routes-file');
  assert.match(String(failure?.err), new RegExp(`^${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:\\d+:\\d+: `));
  assert.equal(await r.metric('sni_router_source_up', { source: 'routes-file' }), 0);

  // Valid YAML with one bad route: the whole file is still rejected, its good route included.
  writeAtomically(file, `${routesYaml(rg.ports, [['a.example.test', 'bravo']])}  - match: "b.example.test"\n    backend: { addr: "no-port" }\n`);
  // Another mistake while still failing is news: a warning again, not a debug repeat.
  await waitFor(() => r.logs.some((l) => l.source === 'routes-file' && l.level === 'warn' && String(l.err).includes('no-port')), 5000, 'the new failure to be warned about');
  assert.equal(await backendFor(r.port, 'a.example.test'), 'alpha');
  assert.equal(await backendFor(r.port, 'b.example.test'), 'alpha');
  assert.equal(r.app.router.generation, generation, 'a rejected file never replaces the table');

  const since = Date.now();
  writeAtomically(file, routesYaml(rg.ports, [['a.example.test', 'charlie']]));
  const ms = await assertRoutedWithin(r, 'a.example.test', 'charlie', since);
  await timeUntilRouted(r.port, 'b.example.test', 'caddy', { since, deadlineMs: BOUND_MS });
  assert.equal(await r.metric('sni_router_source_up', { source: 'routes-file' }), 1);
  t.diagnostic(`fixed file seen after ${ms}ms`);
});

test('a routes file that holds no routes yields no routes', async (t) => {
  const rg = await rig(t);
  const file = join(rg.dir, 'routes.yaml');
  writeFileSync(file, routesYaml(rg.ports, [['a.example.test', 'alpha']]));
  const r = await rg.start(file);
  assert.equal(await backendFor(r.port, 'a.example.test'), 'alpha');
  const since = Date.now();
  writeAtomically(file, 'routes: []\n');
  await timeUntilRouted(r.port, 'a.example.test', 'caddy', { since, deadlineMs: BOUND_MS });
  assert.equal(await r.metric('sni_router_source_up', { source: 'routes-file' }), 1);
  assert.equal(await r.metric('sni_router_routes', { source: 'routes-file' }), 0);
});

test('a large routes file is parsed off the main thread: relays go on while it parses, and its errors still name FILE:LINE:COL', async (t) => {
  const rg = await rig(t);
  const file = join(rg.dir, 'routes.yaml');
  writeFileSync(file, routesYaml(rg.ports, [['a.example.test', 'alpha']]));
  const r = await rg.start(file);
  assert.equal(await backendFor(r.port, 'a.example.test'), 'alpha');

  // 30,000 routes (~2 MB of YAML): seconds of parsing, which inline would stall every connection.
  const many: Array<readonly [string, string]> = [['a.example.test', 'bravo']];
  for (let i = 0; i < 30_000; i++) many.push([`n${i}.bulk.test`, 'charlie']);
  const since = Date.now();
  writeAtomically(file, routesYaml(rg.ports, many));
  let slowest = 0;
  let probes = 0;
  for (;;) {
    const started = Date.now();
    const got = await backendFor(r.port, 'a.example.test');
    slowest = Math.max(slowest, Date.now() - started);
    probes++;
    if (got === 'bravo') break;
    assert.ok(Date.now() - since < 60_000, 'the large file was never applied');
    await sleep(20);
  }
  const appliedMs = Date.now() - since;
  assert.equal(await backendFor(r.port, 'n29999.bulk.test'), 'charlie');
  t.diagnostic(`30,000 routes applied after ${appliedMs} ms; ${probes} handshakes meanwhile, the slowest ${slowest} ms`);
  assert.ok(probes >= 3 && slowest < appliedMs / 2, `handshakes went on during the parse (slowest ${slowest} ms of ${appliedMs})`);

  // A mistake deep in a large file: rejected whole, with its position, by the same parser.
  writeAtomically(file, `${routesYaml(rg.ports, many.slice(0, 2000))}  - match: "bad.example.test"\n    backend: { addr: "no-port" }\n`);
  await waitFor(() => r.logs.some((l) => l.source === 'routes-file' && l.level === 'warn' && /routes\.yaml:\d+:\d+: .*no-port/.test(String(l.err))), 10_000, 'the position of the bad route');
  assert.equal(await backendFor(r.port, 'n29999.bulk.test'), 'charlie', 'the last good routes stay');
});
