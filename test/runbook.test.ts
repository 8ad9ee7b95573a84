// The runbook's namespace commands (docs/operations.md, "Routes: enable and disable a namespace,
// per source"), run as written against a real router with each source: the route appears in /routes,
// then goes away. The commands are read from the document, so the document cannot drift from what
// works. Uses the local PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) the source tests use.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { startRouter, tempDir, waitFor } from './helpers.ts';
import { createTestDatabase, randomSuffix } from './support/sources.ts';
import { requireTools } from './support/tools.ts';

const ROOT = join(import.meta.dirname, '..');
const RUNBOOK = readFileSync(join(ROOT, 'docs', 'operations.md'), 'utf8');
const run = promisify(execFile);

/** The first fenced block of `lang` after the line that starts with `heading`. */
function block(heading: string, lang: string): string {
  const at = RUNBOOK.indexOf(`\n${heading}`);
  assert.ok(at >= 0, `the runbook has "${heading}"`);
  const m = new RegExp(`\`\`\`${lang}\\n([\\s\\S]*?)\`\`\``).exec(RUNBOOK.slice(at));
  assert.ok(m !== null, `a ${lang} block after "${heading}"`);
  return m[1];
}

interface RoutesView {
  routes: Array<{ match: string; alpn: unknown; source: string; backend: { name: string; addrs: string[] } }>;
}

async function routeFor(adminPort: number, match: string): Promise<RoutesView['routes'][number] | undefined> {
  const res = await fetch(`http://127.0.0.1:${adminPort}/routes`);
  return ((await res.json()) as RoutesView).routes.find((r) => r.match === match);
}

const NAME = 'turn-acme.example.com';

test('the runbook\'s file-source example adds the route, and deleting it removes it', async (t) => {
  const { dir, cleanup } = tempDir();
  const file = join(dir, 'routes.yaml');
  writeFileSync(file, 'routes: []\n');
  const router = await startRouter(`
fallback: { name: caddy, addr: "127.0.0.1:9" }
sources:
  - type: file
    path: ${file}
`);
  t.after(async () => {
    await router.stop();
    cleanup();
  });
  const yaml = block('**File source**', 'yaml');
  // Saved the way editors save: a new file renamed over the old one.
  writeFileSync(`${file}.tmp`, yaml);
  renameSync(`${file}.tmp`, file);
  await waitFor(async () => (await routeFor(router.adminPort, NAME)) !== undefined, 5000, 'the route from the file');
  const r = await routeFor(router.adminPort, NAME);
  assert.deepEqual([r?.alpn, r?.source, r?.backend.name, r?.backend.addrs], ['none', 'file', 'turn-acme', ['127.0.0.1:5350']]);
  writeFileSync(file, 'routes: []\n');
  await waitFor(async () => (await routeFor(router.adminPort, NAME)) === undefined, 5000, 'the route to go');
});

test('the runbook\'s SQL enables, disables, re-enables a namespace and turns stealth off, through the PostgreSQL source', async (t) => {
  const tdb = await createTestDatabase();
  const router = await startRouter(`
fallback: { name: caddy, addr: "127.0.0.1:9" }
sources:
  - type: postgres
    url: "${tdb.url()}"
    interval: 30s
    listen_channel: sni_router_routes
    params: { base_domain: example.com, node_id: node-1 }
`);
  t.after(async () => {
    await router.stop();
    await tdb.drop();
  });
  // The block holds, in order: two INSERTs (enable), disable, enable again, stealth off.
  const statements = block('**PostgreSQL source**', 'sql').split(';').map((s) => s.trim()).filter((s) => s.replace(/--.*$/gm, '').trim() !== '');
  assert.equal(statements.length, 5, statements.join('\n---\n'));
  const exec = async (sql: string) => {
    await tdb.db.query(sql);
  };
  // The names the runbook says a namespace gets with the default `names`.
  const route = () => routeFor(router.adminPort, 'turn.ns-acme.example.com');
  const stealthName = () => routeFor(router.adminPort, 'cdn.ns-acme.example.com');

  // Within a second each time: LISTEN/NOTIFY, not the 30 s poll.
  await exec(statements[0]);
  await exec(statements[1]);
  await waitFor(async () => (await route()) !== undefined, 1500, 'the enabled namespace');
  const r = await route();
  assert.deepEqual([r?.alpn, r?.source, r?.backend.name, r?.backend.addrs], ['none', 'postgres', 'turn-acme', ['127.0.0.1:5350']]);
  const cdn = await stealthName();
  assert.deepEqual([cdn?.alpn, cdn?.source, cdn?.backend.name, cdn?.backend.addrs], ['none', 'postgres', 'turn-acme', ['127.0.0.1:5350']]);
  await exec(statements[2]);
  await waitFor(async () => (await route()) === undefined && (await stealthName()) === undefined, 1500, 'the disabled namespace to go');
  await exec(statements[3]);
  await waitFor(async () => (await route()) !== undefined, 1500, 'the re-enabled namespace');
  await exec(statements[4]);
  await waitFor(async () => (await route())?.alpn === null, 1500, 'stealth off: no ALPN condition');
  assert.equal((await stealthName())?.alpn, 'none', 'the stealth name stays TURN clients only');
});

test('the runbook\'s redis-cli commands add and remove the route through the Redis source', async (t) => {
  if (!requireTools(t, 'redis-cli')) return;
  // The document's key, made unique to this run so that tests sharing the Redis never collide.
  const key = `sni-router:routes:runbook-${randomSuffix()}`;
  const router = await startRouter(`
fallback: { name: caddy, addr: "127.0.0.1:9" }
sources:
  - type: redis
    url: "redis://127.0.0.1:6379/0"
    key: "${key}"
    channel: "${key}"
    resync_interval: 60s
`);
  t.after(async () => {
    await router.stop();
    await run('redis-cli', ['DEL', key]).catch(() => {});
  });
  const lines = block('**Redis source**', 'sh').split('\n').filter((l) => l.startsWith('redis-cli '));
  assert.equal(lines.length, 4, lines.join('\n'));
  const sh = async (line: string) => {
    const { stdout } = await run('sh', ['-c', line.replaceAll('sni-router:routes', key)], { timeout: 10_000 });
    return stdout;
  };
  const route = () => routeFor(router.adminPort, NAME);

  await sh(lines[0]);
  assert.match(await sh(lines[1]), /^1$/m, 'the router is subscribed to the channel');
  await waitFor(async () => (await route()) !== undefined, 1500, 'the route from Redis');
  const r = await route();
  assert.deepEqual([r?.alpn, r?.source, r?.backend.name, r?.backend.addrs], ['none', 'redis', 'turn-acme', ['127.0.0.1:5350']]);
  await sh(lines[2]);
  await sh(lines[3]);
  await waitFor(async () => (await route()) === undefined, 1500, 'the route to go');
});
