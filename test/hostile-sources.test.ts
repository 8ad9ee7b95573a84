// Hostile input from the sources' side: whatever a Redis entry, a routes file or an ${ENV} value
// holds, the router validates it with one verdict for every origin, skips and counts what it
// refuses, bounds what reaches a label or a log line, and never stops serving.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { renameSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import fc from 'fast-check';
import { ConfigError, parseConfig, parseRoutesFile } from '../src/config/load.ts';
import { route } from '../src/config/routes.ts';
import { ValueError } from '../src/config/values.ts';
import { routeFromEntry, snapshotFromHash } from '../src/sources/redis.ts';
import { recordingBackend, sleep, startRouter, tempDir, waitFor } from './helpers.ts';
import { buildHello } from './support/hellos.ts';
import { REDIS_PORT, randomSuffix, redisClient, redisSettled } from './support/sources.ts';

const BIN = join(import.meta.dirname, '..', 'bin', 'sni-router');

/** What the router's backend first answers a hello for `sni` with ("" when the connection closes first). */
function firstReply(port: number, sni: string, timeoutMs = 2000): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    const done = (text: string) => {
      clearTimeout(timer);
      s.destroy();
      resolve(text);
    };
    const timer = setTimeout(() => done(''), timeoutMs);
    s.on('connect', () => s.write(buildHello({ sni })));
    s.on('data', (d) => done(d.toString()));
    s.on('close', () => done(''));
    s.on('error', () => done(''));
  });
}

/** A router with one Redis source of its own (hash and channel), and a recording fallback. */
async function redisRig(t: TestContext, extraYaml = '') {
  const suffix = randomSuffix();
  const key = `sni-router-test:${suffix}:routes`;
  const channel = `sni-router-test:${suffix}:changed`;
  const source = `redis-${suffix}`;
  const redis = redisClient();
  const fallback = await recordingBackend({ reply: 'fallback' });
  const turn = await recordingBackend({ reply: 'turn' });
  t.after(async () => {
    await redis.del(key);
    redis.disconnect();
    await fallback.close();
    await turn.close();
  });
  const start = async () => {
    const r = await startRouter([
      `fallback: { name: caddy, addr: "127.0.0.1:${fallback.port}" }`,
      'sources:',
      `  - { type: redis, name: ${source}, url: "redis://127.0.0.1:${REDIS_PORT}/0", key: "${key}", channel: "${channel}", resync_interval: 30s }`,
      extraYaml,
    ].join('\n'));
    t.after(() => r.stop());
    await redisSettled(redis, source);
    return r;
  };
  const reach = (port: number, sni: string) => firstReply(port, sni);
  return { redis, key, channel, source, fallback, turn, start, reach };
}

test('a Redis entry whose backend host holds a NUL byte is skipped and counted; its name goes to the fallback and the process lives', async (t) => {
  const rg = await redisRig(t);
  await rg.redis.hset(rg.key,
    'nul.example.test', JSON.stringify({ backend: { addr: 'a\u0000b:443' } }),
    'ctl.example.test', JSON.stringify({ backend: { addr: 'a\nb:443' } }),
    'good.example.test', JSON.stringify({ backend: { name: 'turn', addr: `127.0.0.1:${rg.turn.port}` } }));
  const r = await rg.start();
  assert.equal(await r.metric('sni_router_routes', { source: rg.source }), 1);
  assert.ok(await r.metric('sni_router_source_invalid_entries_total', { source: rg.source }) >= 2);
  // The name whose entry was refused has no route: a client for it reaches the fallback, and the
  // router is still there for the next one.
  for (let i = 0; i < 3; i++) assert.equal(await rg.reach(r.port, 'nul.example.test'), 'fallback');
  assert.equal(await rg.reach(r.port, 'good.example.test'), 'turn');
  const skipped = r.logs.filter((l) => l.msg === 'skipped invalid route entry').map((l) => String(l.err));
  assert.ok(skipped.some((e) => /nul\.example\.test|is not an address/.test(e)), skipped.join('\n'));
});

test('check refuses a NUL byte in a backend host, in the config and in a routes file, with FILE:LINE:COL', () => {
  const tmp = tempDir();
  try {
    const routes = join(tmp.dir, 'routes.yaml');
    writeFileSync(routes, 'routes:\n  - match: a.example.com\n    backend: { addr: "a\\0b:443" }\n');
    const file = join(tmp.dir, 'c.yaml');
    writeFileSync(file, `fallback: { addr: "127.0.0.1:1" }\nsources:\n  - { type: file, path: "${routes}" }\n`);
    const fromFile = spawnSync(BIN, ['check', '--config', file], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(fromFile.status, 2, fromFile.stdout);
    assert.match(fromFile.stderr, /routes\.yaml:3:\d+: .*is not an address/);
    writeFileSync(file, 'fallback: { addr: "127.0.0.1:1" }\nroutes:\n  - match: a.example.com\n    backend: { addr: "a\\0b:443" }\n');
    const inConfig = spawnSync(BIN, ['check', '--config', file], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(inConfig.status, 2);
    assert.match(inConfig.stderr, /c\.yaml:4:\d+: routes\[0\]\.backend\.addr: .*is not an address/);
  } finally {
    tmp.cleanup();
  }
});

test('one verdict for every origin: the Kelvin sign, empty and comma-separated ALPN, huge names', async () => {
  const verdict = (v: Record<string, unknown>): string => {
    const results: string[] = [];
    // The config's route schema (config, routes file, cache file) ...
    try {
      const r = route(v, [], 'x');
      results.push(JSON.stringify([r.match, r.alpn]));
    } catch (err) {
      assert.ok(err instanceof ValueError, `threw ${String(err)}`);
      results.push('refused');
    }
    // ... a Redis entry (field = match, value = the rest, as JSON) ...
    try {
      const { match, ...rest } = v;
      const r = routeFromEntry(String(match), JSON.stringify(rest), 'x');
      results.push(JSON.stringify([r.match, r.alpn]));
    } catch {
      results.push('refused');
    }
    // ... and a routes file written as YAML (JSON is YAML).
    try {
      const [r] = parseRoutesFile(JSON.stringify({ routes: [v] }), 'r.yaml', 'x');
      results.push(JSON.stringify([r.match, r.alpn]));
    } catch (err) {
      assert.ok(err instanceof ConfigError);
      results.push('refused');
    }
    assert.equal(new Set(results).size, 1, `the origins disagree: ${results.join(' | ')}`);
    return results[0];
  };
  const be = { addr: '127.0.0.1:5349' };
  assert.equal(verdict({ match: '\u212Aelvin.example.com', backend: be }), 'refused', 'a non-ASCII letter that lowercases to ASCII');
  assert.equal(verdict({ match: 'kelvin.example.com', backend: be }), '["kelvin.example.com",null]');
  assert.equal(verdict({ match: 'a.example.com', alpn: '', backend: be }), 'refused');
  assert.equal(verdict({ match: 'a.example.com', alpn: [], backend: be }), 'refused');
  assert.equal(verdict({ match: 'a.example.com', alpn: 'h2,http/1.1', backend: be }),
    '["a.example.com",{"kind":"list","protocols":["h2","http/1.1"]}]');
  assert.equal(verdict({ match: 'a.example.com', alpn: ['h2', 'http/1.1'], backend: be }),
    '["a.example.com",{"kind":"list","protocols":["h2","http/1.1"]}]');
  assert.equal(verdict({ match: 'a.example.com', alpn: ['h2,http/1.1'], backend: be }), 'refused', 'a comma inside one listed protocol');
  assert.equal(verdict({ match: 'a.example.com', backend: { name: 'x'.repeat(1_000_000), addr: '127.0.0.1:1' } }), 'refused');
  assert.equal(verdict({ match: `${'a'.repeat(1_000_000)}.example.com`, backend: be }), 'refused');
  assert.equal(verdict({ match: 'a.example.com', backend: { addr: `${'h'.repeat(300)}:1` } }), 'refused');

  // The refusal says why without quoting a megabyte back.
  const huge = await snapshotFromHash({ [`${'a'.repeat(1_000_000)}.example.com`]: JSON.stringify({ backend: be }) }, 'x');
  assert.equal(huge.routes.length, 0);
  assert.ok(huge.invalid[0].entry.length < 200 && huge.invalid[0].error.length < 500, JSON.stringify(huge.invalid[0]).slice(0, 300));
});

test('a megabyte backend name or match from Redis is refused: /metrics and the log stay small', async (t) => {
  const rg = await redisRig(t);
  await rg.redis.hset(rg.key,
    'big-name.example.test', JSON.stringify({ backend: { name: 'n'.repeat(1 << 20), addr: `127.0.0.1:${rg.turn.port}` } }),
    `${'m'.repeat(1 << 20)}.example.test`, JSON.stringify({ backend: { addr: `127.0.0.1:${rg.turn.port}` } }));
  const r = await rg.start();
  await rg.reach(r.port, 'big-name.example.test');
  const text = await r.metricsText();
  assert.ok(text.length < 200_000, `/metrics is ${text.length} bytes`);
  for (const line of r.logs) assert.ok(JSON.stringify(line).length < 4096, `a log line of ${JSON.stringify(line).length} bytes`);
  assert.equal(await r.metric('sni_router_routes', { source: rg.source }), 0);
});

test('the entry validators never throw anything but a refusal, and never accept what cannot be dialled or labelled', async () => {
  const json = fc.jsonValue({ maxDepth: 4 });
  const text = fc.oneof(fc.string({ maxLength: 40 }), fc.string({ unit: 'binary', maxLength: 40 }), fc.constantFrom(
    'a\u0000b:443', '127.0.0.1:5349', '[::1]:5349', '[fe80::1%eth0]:1', 'localhost:443', 'h:0', ':443', '*.example.com',
    '**.example.com', 'Example.COM.', 'none', 'any', 'h2,http/1.1', '', ' ', '\u212A', 'x'.repeat(300),
  ));
  const entry = fc.record({
    match: fc.oneof(text, json),
    alpn: fc.oneof(text, json, fc.array(text, { maxLength: 3 })),
    namespace: fc.oneof(text, json),
    backend: fc.oneof(json, fc.record({
      name: fc.oneof(text, json), addr: fc.oneof(text, json), addrs: fc.oneof(fc.array(text, { maxLength: 3 }), json),
      proxy_protocol: fc.oneof(text, json),
    }, { requiredKeys: [] })),
  }, { requiredKeys: [] });
  const dialable = /^(?:\[[0-9a-f:.]+(?:%[A-Za-z0-9_.-]+)?\]|[A-Za-z0-9_.-]+):\d{1,5}$/i;
  fc.assert(fc.property(entry, (v) => {
    let r;
    try {
      r = route(v, [], 'fuzz');
    } catch (err) {
      assert.ok(err instanceof ValueError, `threw ${String(err)}`);
      assert.ok(err.message.length < 1000);
      return;
    }
    assert.match(r.match, /^(?:\*\*?\.)?[a-z0-9_.-]{1,253}$/);
    assert.match(r.backend.name, /^[\x20-\x7e]{1,128}$/);
    for (const a of r.backend.addrs) {
      assert.match(a, dialable);
      const port = Number(a.slice(a.lastIndexOf(':') + 1));
      assert.ok(port >= 1 && port <= 65535);
    }
    if (r.alpn?.kind === 'list') for (const p of r.alpn.protocols) assert.match(p, /^[\x21-\x2b\x2d-\x7e]{1,255}$/);
    if (r.namespace !== null) assert.match(r.namespace, /^[a-z0-9-]{1,63}$/i);
  }), { numRuns: 3000 });
  // The same through a Redis entry, whose field and value are any strings at all.
  fc.assert(fc.property(text, fc.oneof(fc.string(), json.map((j) => JSON.stringify(j))), (field, value) => {
    try {
      routeFromEntry(field, value, 'fuzz');
    } catch (err) {
      assert.ok(err instanceof Error);
    }
  }), { numRuns: 2000 });
});

test('${VAR} values arrive verbatim, as text: never parsed as YAML', () => {
  const env = { NAME: 'turn #1', HEX: '0x10', ANCHOR: '&a x', PORT: '5349', N: '250', ON: 'true', FLOW: '[a, b]' };
  const c = parseConfig([
    // Unquoted, in block style (in a flow mapping "{ ... }" the "{" of "${" is YAML syntax).
    'fallback:',
    '  name: ${ANCHOR}',
    '  addr: "127.0.0.1:1"',
    'max_concurrent_conns: ${N}',
    'log:',
    '  access: ${ON}',
    'routes:',
    '  - match: a.example.com',
    '    backend:',
    '      name: ${NAME}',
    '      addr: 127.0.0.1:${PORT}',
    '  - match: b.example.com',
    '    backend:',
    '      name: ${HEX}',
    '      addr: "127.0.0.1:2"',
    '  - match: c.example.com',
    '    backend:',
    '      name: ${FLOW}',
    '      addr: "127.0.0.1:3"',
  ].join('\n'), 'env.yaml', env);
  assert.equal(c.fallback.name, '&a x');
  assert.equal(c.routes[0].backend.name, 'turn #1');
  assert.deepEqual(c.routes[0].backend.addrs, ['127.0.0.1:5349']);
  assert.equal(c.routes[1].backend.name, '0x10');
  assert.equal(c.routes[2].backend.name, '[a, b]');
  assert.equal(c.server.maxConcurrentConns, 250, 'a key that wants a number reads the number the text spells');
  assert.equal(c.log.access, true);
  assert.throws(() => parseConfig('fallback: { addr: "127.0.0.1:1" }\nmax_concurrent_conns: ${HEX}\n', 'env.yaml', env),
    /env\.yaml:2:\d+: max_concurrent_conns must be a whole number/);
});

const BOMB = [
  'a: &a ["x","x","x","x","x","x","x","x","x"]',
  ...'bcdefgh'.split('').map((c, i) => `${c}: &${c} [${Array(9).fill(`*${'abcdefgh'[i]}`).join(',')}]`),
  `routes: [${Array(9).fill('*h').join(',')}]`,
].join('\n');

test('an alias bomb renamed over a watched routes file is rejected within a second while connections keep passing', async (t) => {
  const tmp = tempDir();
  const fallback = await recordingBackend({ reply: 'fallback' });
  const turn = await recordingBackend({ reply: 'turn' });
  t.after(async () => {
    await fallback.close();
    await turn.close();
    tmp.cleanup();
  });
  assert.ok(BOMB.length < 400, `${BOMB.length} bytes`);
  const file = join(tmp.dir, 'routes.yaml');
  writeFileSync(file, `routes:\n  - { match: a.example.test, backend: { name: turn, addr: "127.0.0.1:${turn.port}" } }\n`);
  const r = await startRouter(`fallback: { addr: "127.0.0.1:${fallback.port}" }\nsources:\n  - { type: file, name: f, path: "${file}" }\n`);
  t.after(() => r.stop());
  assert.equal(await firstReply(r.port, 'a.example.test'), 'turn');

  const tmpFile = join(tmp.dir, '.routes.yaml.tmp');
  writeFileSync(tmpFile, BOMB);
  const since = Date.now();
  renameSync(tmpFile, file);
  // Probes through the rejection: every one answered by the route that stays.
  let probes = 0;
  let failed = 0;
  let rejectedAt = 0;
  while (Date.now() - since < 2500) {
    const reply = await firstReply(r.port, 'a.example.test', 1000);
    probes++;
    if (reply !== 'turn') failed++;
    if (rejectedAt === 0 && r.logs.some((l) => l.msg === 'source failed, keeping its last good snapshot' && /alias/.test(String(l.err)))) {
      rejectedAt = Date.now();
    }
    await sleep(20);
  }
  assert.ok(rejectedAt > 0, 'the file was rejected');
  assert.ok(rejectedAt - since < 1000, `rejected after ${rejectedAt - since}ms`);
  assert.equal(failed, 0, `${failed} of ${probes} probes failed`);
  t.diagnostic(`bomb rejected after ${rejectedAt - since}ms; ${probes} probes, all answered`);

  // check refuses it too, at once.
  const cfg = join(tmp.dir, 'c.yaml');
  writeFileSync(cfg, `fallback: { addr: "127.0.0.1:1" }\nsources:\n  - { type: file, path: "${file}" }\n`);
  const started = Date.now();
  const check = spawnSync(BIN, ['check', '--config', cfg], { encoding: 'utf8', timeout: 20_000 });
  assert.equal(check.status, 2);
  assert.match(check.stderr, /routes\.yaml:\d+:\d+: aliases expand to more than/);
  assert.ok(Date.now() - started < 5000);
});

test('check refuses a Redis URL the Redis client would refuse, and the router will not start with it', () => {
  const tmp = tempDir();
  try {
    const file = join(tmp.dir, 'c.yaml');
    writeFileSync(file, 'fallback: { addr: "127.0.0.1:1" }\nsources:\n  - { type: redis, url: "redis://:pa%ss@127.0.0.1:6379/0" }\n');
    const check = spawnSync(BIN, ['check', '--config', file], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(check.status, 2);
    assert.match(check.stderr, /c\.yaml:3:\d+: sources\[0\]\.url cannot be used: .*malformed %-escape/);
    assert.doesNotMatch(check.stderr, /pa%ss/, 'the password is not printed');
    const run = spawnSync(BIN, ['--config', file], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(run.status, 2);
  } finally {
    tmp.cleanup();
  }
});

test('a Redis outage logs one warning when it begins and one line when it ends, with the count between', async (t) => {
  const { forwarder } = await import('./support/sources.ts');
  const fwd = await forwarder(REDIS_PORT);
  t.after(() => fwd.close());
  const suffix = randomSuffix();
  const fallback = await recordingBackend({ reply: 'fallback' });
  t.after(() => fallback.close());
  const r = await startRouter([
    `fallback: { addr: "127.0.0.1:${fallback.port}" }`,
    'sources:',
    `  - { type: redis, name: down-${suffix}, url: "redis://127.0.0.1:${fwd.port}/0", key: "k-${suffix}", resync_interval: 200ms }`,
  ].join('\n'));
  t.after(() => r.stop());
  await waitFor(async () => (await r.metric('sni_router_source_up', { source: `down-${suffix}` })) === 1);
  await fwd.cut();
  // Several reconnect attempts (backoff from 100 ms, capped at 5 s) and resyncs.
  await sleep(4000);
  const failures = await r.metric('sni_router_source_updates_total', { source: `down-${suffix}`, result: 'error' });
  const warned = r.logs.filter((l) => l.level === 'warn' && l.source === `down-${suffix}`);
  assert.equal(warned.length, 1, JSON.stringify(warned.map((l) => [l.msg, l.err])));
  await fwd.restore();
  await waitFor(async () => (await r.metric('sni_router_source_up', { source: `down-${suffix}` })) === 1, 8000, 'recovery');
  const recovered = r.logs.filter((l) => l.msg === 'source recovered' && l.source === `down-${suffix}`);
  assert.equal(recovered.length, 1);
  assert.ok(Number(recovered[0].failures) >= 1 && Number(recovered[0].failures) <= failures + 1, JSON.stringify(recovered[0]));
});

test('an unchanged Redis hash replaces nothing and rebuilds nothing; a change is still read', async (t) => {
  const rg = await redisRig(t);
  await rg.redis.hset(rg.key, 'a.example.test', JSON.stringify({ backend: { name: 'turn', addr: `127.0.0.1:${rg.turn.port}` } }));
  const r = await rg.start();
  const merges = r.app.composer.merges;
  const ok = await r.metric('sni_router_source_updates_total', { source: rg.source, result: 'ok' });
  for (let i = 0; i < 5; i++) {
    await rg.redis.publish(rg.channel, 'x');
    await sleep(60);
  }
  await waitFor(async () => (await r.metric('sni_router_source_updates_total', { source: rg.source, result: 'ok' })) >= ok + 5);
  assert.equal(r.app.composer.merges, merges, 'no table was built for an unchanged hash');
  await rg.redis.hset(rg.key, 'b.example.test', JSON.stringify({ backend: { name: 'turn', addr: `127.0.0.1:${rg.turn.port}` } }));
  await rg.redis.publish(rg.channel, 'x');
  await waitFor(async () => (await rg.reach(r.port, 'b.example.test')) === 'turn', 3000, 'the change to route');
  assert.ok(r.app.composer.merges > merges);
});

test('PostgreSQL rows of any shape never throw out of the row validators, and make only routes that can be dialled and labelled', async () => {
  const { snapshotFromRows, snapshotFromNamespaces, compileNames } = await import('../src/sources/postgres-rows.ts');
  const { DEFAULT_NAMES } = await import('../src/config/names.ts');
  const value = fc.oneof(
    fc.jsonValue({ maxDepth: 2 }), fc.string({ maxLength: 30 }), fc.string({ unit: 'binary', maxLength: 30 }),
    fc.constantFrom('127.0.0.1:5349', 'a\u0000b:1', 'h2,http/1.1', '', 'none', 'acme', 'ACME', 'x'.repeat(70), '5349', '0', '65536'),
    fc.integer(), fc.boolean(), fc.constant(null), fc.array(fc.string({ maxLength: 10 }), { maxLength: 3 }),
  );
  const row = fc.dictionary(fc.constantFrom('match', 'addr', 'name', 'proxy_protocol', 'alpn', 'namespace', 'port', 'stealth', 'extra'), value);
  const check = (routes: readonly { match: string; backend: { name: string; addrs: readonly string[] } }[]) => {
    for (const r of routes) {
      assert.match(r.match, /^(?:\*\*?\.)?[a-z0-9_.-]{1,253}$/);
      assert.match(r.backend.name, /^[\x20-\x7e]{1,128}$/);
      for (const a of r.backend.addrs) assert.match(a, /^(?:\[[0-9a-f:.]+(?:%[A-Za-z0-9_.-]+)?\]|[A-Za-z0-9_.-]+):\d{1,5}$/i);
    }
  };
  const names = compileNames(DEFAULT_NAMES);
  await fc.assert(fc.asyncProperty(fc.array(row, { maxLength: 8 }), async (rows) => {
    const custom = await snapshotFromRows(rows, 'fuzz');
    check(custom.routes);
    assert.equal(custom.routes.length + custom.invalid.length, rows.length);
    const byNamespace = await snapshotFromNamespaces(rows, { names, params: { base_domain: 'example.com' }, backendHost: '127.0.0.1', source: 'fuzz' });
    check(byNamespace.routes);
    for (const r of byNamespace.routes) assert.match(String(r.namespace), /^[a-z0-9-]{1,63}$/i);
  }), { numRuns: 1500 });
});
