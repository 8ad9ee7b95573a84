// Admin HTTP, from the outside: /healthz, /readyz through a SIGTERM-style drain, /routes through a
// live replace, and the answers to anything else.
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { App } from '../src/app.ts';
import { parseConfig } from '../src/config/load.ts';
import { RouteTable } from '../src/router/table.ts';
import { FIXTURES, memoryLogger, rawExchange, recordingBackend, sleep, startRouter, tempDir, waitFor } from './helpers.ts';
import { spawnRouterProcess } from './support/process.ts';

interface RoutesView {
  generation: number;
  fallback: { name: string; addrs: string[]; health: Array<{ addr: string; healthy: boolean; last_error: string | null }> };
  routes: Array<{
    match: string;
    alpn: unknown;
    source: string;
    backend: { name: string; addrs: string[]; proxy_protocol: string | null; health: Array<{ addr: string; healthy: boolean; last_error: string | null }> };
  }>;
}

async function get(port: number, path: string, init: RequestInit = {}): Promise<{ status: number; body: string; type: string }> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`, init);
  return { status: res.status, body: await res.text(), type: res.headers.get('content-type') ?? '' };
}

test('/healthz answers 200, /readyz 200 once listening, and unknown paths and methods are refused', async (t) => {
  const router = await startRouter('fallback: { name: web, addr: "127.0.0.1:9" }\n');
  t.after(() => router.stop());
  assert.deepEqual(await get(router.adminPort, '/healthz'), { status: 200, body: 'ok\n', type: 'text/plain' });
  assert.deepEqual(await get(router.adminPort, '/readyz'), { status: 200, body: 'ready\n', type: 'text/plain' });
  assert.equal((await get(router.adminPort, '/healthz?verbose=1')).status, 200);
  const notFound = await get(router.adminPort, '/nope');
  assert.equal(notFound.status, 404);
  assert.match(notFound.body, /\/version/, 'the 404 names every endpoint');
  assert.equal((await get(router.adminPort, '/metrics', { method: 'POST', body: 'x' })).status, 405);
  // The admin server binds where it was told: loopback here.
  assert.equal(router.app.adminAddress?.address, '127.0.0.1');
});

test('/version answers the version in package.json and the Node.js version, as JSON', async (t) => {
  const router = await startRouter('fallback: { name: web, addr: "127.0.0.1:9" }\n');
  t.after(() => router.stop());
  const pkg = JSON.parse(readFileSync(join(import.meta.dirname, '..', 'package.json'), 'utf8')) as { version: string };
  const res = await get(router.adminPort, '/version');
  assert.equal(res.status, 200);
  assert.equal(res.type, 'application/json');
  assert.deepEqual(JSON.parse(res.body), { version: pkg.version, node: process.version });
});

test('/readyz flips to 503 while draining and /healthz stays 200; the drain waits for the open connection', async (t) => {
  const backend = await recordingBackend();
  const router = await startRouter(`fallback: { name: web, addr: "127.0.0.1:${backend.port}" }\n`);
  t.after(() => backend.close());
  const client = net.connect({ host: '127.0.0.1', port: router.port, allowHalfOpen: true });
  await new Promise<void>((resolve, reject) => client.once('connect', resolve).once('error', reject));
  client.write('GET / HTTP/1.0\r\n\r\n');
  await backend.waitConns(1);
  assert.equal((await get(router.adminPort, '/readyz')).status, 200);

  // What SIGTERM does (cli.ts calls app.shutdown with shutdown_grace).
  let stopped = false;
  const shutdown = router.app.shutdown(10_000).then(() => {
    stopped = true;
  });
  let ready = { status: 0, body: '', type: '' };
  await waitFor(async () => {
    ready = await get(router.adminPort, '/readyz');
    return ready.status === 503;
  }, 3000, '/readyz to say 503');
  assert.equal(ready.body, 'not ready: draining\n');
  assert.equal((await get(router.adminPort, '/healthz')).status, 200, 'alive while draining');
  // No new connections while draining: the listener is closed.
  await assert.rejects(rawExchange(router.port, [Buffer.from('x')]), /ECONNREFUSED/);
  assert.equal(stopped, false, 'the open connection holds the drain');

  client.end();
  await shutdown;
  assert.equal(stopped, true);
  assert.equal(router.app.server.activeConnections, 0);
  // After the drain the admin port is closed too.
  await assert.rejects(get(router.adminPort, '/healthz'));
});

test('/routes shows the generation, each route with its source and backend health, and follows a replace', async (t) => {
  const up = await recordingBackend();
  const deadServer = net.createServer();
  await new Promise<void>((r) => deadServer.listen(0, '127.0.0.1', () => r()));
  const deadPort = (deadServer.address() as net.AddressInfo).port;
  await new Promise<void>((r) => deadServer.close(() => r()));
  const router = await startRouter(`
fallback: { name: web, addr: "127.0.0.1:${up.port}" }
routes:
  - match: cdn.example.com
    alpn: none
    backend: { name: turn, addr: "127.0.0.1:${deadPort}" }
`);
  t.after(async () => {
    await router.stop();
    await up.close();
  });
  const view = async (): Promise<RoutesView> => {
    const r = await get(router.adminPort, '/routes');
    assert.equal(r.status, 200);
    assert.equal(r.type, 'application/json');
    return JSON.parse(r.body) as RoutesView;
  };

  let v = await view();
  const g0 = v.generation;
  assert.equal(g0, router.app.router.generation);
  assert.deepEqual(v.routes.map((r) => ({ match: r.match, alpn: r.alpn, source: r.source, backend: r.backend.name, addrs: r.backend.addrs })), [
    { match: 'cdn.example.com', alpn: 'none', source: 'config', backend: 'turn', addrs: [`127.0.0.1:${deadPort}`] },
  ]);
  assert.equal(v.routes[0].backend.health[0].healthy, true);
  assert.equal(v.fallback.name, 'web');

  // A failed dial shows in the backend's health.
  const turnHello = readFileSync(join(FIXTURES, 'chromium-webrtc-turn-clienthello.bin'));
  assert.equal((await rawExchange(router.port, [turnHello])).length, 0);
  await waitFor(() => router.app.server.activeConnections === 0);
  v = await view();
  assert.equal(v.routes[0].backend.health[0].healthy, false);
  assert.match(v.routes[0].backend.health[0].last_error ?? '', /ECONNREFUSED/);

  // A live replace: the config's routes change (what SIGHUP does), the view follows at once.
  const table = router.app.router.table;
  const added = { match: 'www.example.com', alpn: null, backend: { name: 'site', addrs: [`127.0.0.1:${up.port}`], proxyProtocol: null }, source: 'config', namespace: null };
  router.app.composer.setConfig([...table.routes, added], table.fallback);
  v = await view();
  assert.equal(v.generation, g0 + 1);
  assert.deepEqual(v.routes.map((r) => [r.match, r.backend.name, r.source]), [
    ['cdn.example.com', 'turn', 'config'],
    ['www.example.com', 'site', 'config'],
  ]);

  // And a plain swap of the table (Router.replace) shows too.
  router.app.router.replace(new RouteTable([], table.fallback));
  v = await view();
  assert.equal(v.generation, g0 + 2);
  assert.deepEqual(v.routes, []);
});

test('/readyz is 503 while the router starts (sources still reading, not yet listening), then 200', async (t) => {
  // A PostgreSQL that accepts connections and never answers: the source waits for its first read
  // before the router listens, and the admin port is already up meanwhile.
  const silent = new Set<net.Socket>();
  const db = net.createServer((s) => {
    silent.add(s);
    s.on('error', () => {});
  });
  await new Promise<void>((r) => db.listen(0, '127.0.0.1', () => r()));
  const probe = net.createServer();
  await new Promise<void>((r) => probe.listen(0, '127.0.0.1', () => r()));
  const adminPort = (probe.address() as net.AddressInfo).port;
  await new Promise<void>((r) => probe.close(() => r()));
  const config = parseConfig(`
listen: "127.0.0.1:0"
admin: { listen: "127.0.0.1:${adminPort}" }
fallback: { name: web, addr: "127.0.0.1:9" }
sources:
  - type: postgres
    url: "postgres://u:p@127.0.0.1:${(db.address() as net.AddressInfo).port}/db"
    params: { base_domain: example.com, node_id: node-1 }
`, 'starting.yaml');
  const starting = App.start(config, { logger: memoryLogger().logger });
  t.after(async () => {
    await (await starting).shutdown(0);
    for (const s of silent) s.destroy();
    db.close();
  });
  let early = { status: 0, body: '', type: '' };
  await waitFor(async () => {
    early = await get(adminPort, '/readyz').catch(() => early);
    return early.status !== 0;
  }, 3000, 'the admin port to answer during start');
  assert.deepEqual([early.status, early.body], [503, 'not ready: not listening yet\n']);
  assert.equal((await get(adminPort, '/healthz')).status, 200);
  await starting;
  assert.equal((await get(adminPort, '/readyz')).status, 200);
});

test('300 idle and slowloris connections to the admin port are capped and timed out; the data plane keeps routing', async (t) => {
  const { dir, cleanup } = tempDir('sni-router-admin-flood-');
  const backend = await recordingBackend({ reply: 'caddy\n' });
  const file = join(dir, 'router.yaml');
  writeFileSync(file, `listen: "127.0.0.1:0"\nadmin: { listen: "127.0.0.1:0" }\nfallback: { name: web, addr: "127.0.0.1:${backend.port}" }\n`);
  // A real process: its descriptors are what the flood would exhaust.
  const router = await spawnRouterProcess(file);
  const sockets: net.Socket[] = [];
  t.after(async () => {
    for (const s of sockets) s.destroy();
    router.child.kill('SIGKILL');
    await router.exit;
    await backend.close();
    cleanup();
  });
  assert.equal((await get(router.adminPort, '/healthz')).status, 200);
  await sleep(200); // fetch's keep-alive connection
  const baseline = router.fds();

  const opened = Date.now();
  const closedAt: number[] = [];
  for (let i = 0; i < 300; i++) {
    const s = net.connect({ host: '127.0.0.1', port: router.adminPort });
    s.on('error', () => {});
    s.resume(); // reads, so that the router's FIN is seen
    s.on('close', () => closedAt.push(Date.now()));
    // A third says nothing, a third sends headers that never end, a third one header byte every 500 ms.
    if (i % 3 === 1) s.on('connect', () => s.write('GET /healthz HTTP/1.1\r\nHost: x\r\n'));
    if (i % 3 === 2) {
      s.on('connect', () => {
        s.write('GET /metrics HTTP/1.1\r\nX-Slow: ');
        const drip = setInterval(() => s.write('x'), 500);
        s.on('close', () => clearInterval(drip));
      });
    }
    sockets.push(s);
  }
  let peak = 0;
  const sampler = setInterval(() => {
    peak = Math.max(peak, router.fds() - baseline);
  }, 100);
  try {
    await waitFor(() => sockets.every((s) => !s.connecting), 5000, 'the connections to be made');
    await sleep(1000);
    // The data plane routes meanwhile.
    const reply = await rawExchange(router.port, [Buffer.from('GET / HTTP/1.0\r\n\r\n')], { timeoutMs: 3000 });
    assert.equal(reply.toString(), 'caddy\n', 'routed to the fallback while the admin port is flooded');
    assert.ok(peak <= 64 + 16, `the router held ${peak} more descriptors during the flood (cap 64)`);
    assert.ok(closedAt.length >= 300 - 64, `${closedAt.length} of 300 connections closed at once by the cap`);
    // The rest are closed by headersTimeout (5 s, checked every second).
    await waitFor(() => closedAt.length === 300, 15_000, 'every admin connection to be closed');
    const lastMs = Math.max(...closedAt) - opened;
    assert.ok(lastMs <= 5000 + 4000, `the last slow connection was closed ${lastMs} ms after it opened`);
    t.diagnostic(`peak: ${peak} descriptors over the baseline; the last connection closed after ${lastMs} ms`);
    assert.deepEqual(await get(router.adminPort, '/healthz'), { status: 200, body: 'ok\n', type: 'text/plain' });
  } finally {
    clearInterval(sampler);
  }
  assert.ok(peak <= 64 + 16, `the router held ${peak} more descriptors during the flood (cap 64)`);
});
