// A route that leads back to the router: refused where it can be seen (an IP address of its own),
// cut at the first looped connection where it cannot (a host name that resolves to it).
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { isOwnAddress, reachesListener } from '../src/model/self-address.ts';
import { recordingBackend, startRouter, tempDir, waitFor } from './helpers.ts';
import { buildHello } from './support/hellos.ts';
import { REDIS_PORT, randomSuffix, redisClient, redisSettled } from './support/sources.ts';

const BIN = join(import.meta.dirname, '..', 'bin', 'sni-router');

/** A port nothing listens on now (bound, read, released). */
async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address() as net.AddressInfo;
  await new Promise((r) => s.close(r));
  return port;
}

/** The first bytes a hello for `sni` brings back ("" when the connection closes first). */
function firstReply(port: number, sni: string): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    const done = (text: string) => {
      clearTimeout(timer);
      s.destroy();
      resolve(text);
    };
    const timer = setTimeout(() => done(''), 3000);
    s.on('connect', () => s.write(buildHello({ sni })));
    s.on('data', (d) => done(d.toString()));
    s.on('close', () => done(''));
    s.on('error', () => done(''));
  });
}

test('which addresses are the router itself', () => {
  const local = new Set(['10.1.2.3', 'fe80::1']);
  const wildcard = [{ host: undefined, port: 443 }];
  assert.equal(isOwnAddress('127.0.0.1:443', wildcard, local), true);
  assert.equal(isOwnAddress('127.9.9.9:443', wildcard, local), true);
  assert.equal(isOwnAddress('[::1]:443', wildcard, local), true);
  assert.equal(isOwnAddress('0.0.0.0:443', wildcard, local), true);
  assert.equal(isOwnAddress('10.1.2.3:443', wildcard, local), true, 'an interface address');
  assert.equal(isOwnAddress('10.1.2.4:443', wildcard, local), false, 'another host');
  assert.equal(isOwnAddress('127.0.0.1:5349', wildcard, local), false, 'another port');
  assert.equal(isOwnAddress('localhost:443', wildcard, local), false, 'a name is checked when it is dialled');
  const one = [{ host: '127.0.0.1', port: 443 }];
  assert.equal(isOwnAddress('127.0.0.1:443', one, local), true);
  assert.equal(isOwnAddress('127.0.0.2:443', one, local), false, 'a listener on one loopback address only');
  assert.equal(isOwnAddress('10.1.2.3:443', one, local), false);
  assert.equal(reachesListener('::ffff:127.0.0.1', 443, one, local), true);
  assert.equal(reachesListener('0.0.0.0', 443, one, local), true);
});

test('check refuses a route or a fallback to the router\'s own listen address', () => {
  const tmp = tempDir();
  try {
    const file = join(tmp.dir, 'c.yaml');
    writeFileSync(file, 'listen: ":8443"\nfallback: { addr: "127.0.0.1:9999" }\nroutes:\n  - match: a.example.com\n    backend: { addr: "127.0.0.1:8443" }\n');
    const route = spawnSync(BIN, ['check', '--config', file], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(route.status, 2);
    assert.match(route.stderr, /c\.yaml:5:\d+: routes\[0\]\.backend: 127\.0\.0\.1:8443 is the router's own listen address/);
    writeFileSync(file, 'listen: "127.0.0.1:8443"\nfallback: { addr: "[::ffff:127.0.0.1]:8443" }\n');
    const fallback = spawnSync(BIN, ['check', '--config', file], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(fallback.status, 2);
    assert.match(fallback.stderr, /c\.yaml:2:\d+: fallback: .* is the router's own listen address/);
  } finally {
    tmp.cleanup();
  }
});

test('a backend host name that resolves to the router is cut at the first looped connection; the client reaches the fallback', async (t) => {
  const fallback = await recordingBackend({ reply: 'fallback' });
  t.after(() => fallback.close());
  const port = await freePort();
  const r = await startRouter([
    `listen: "127.0.0.1:${port}"`,
    'max_concurrent_conns: 50',
    `fallback: { name: caddy, addr: "127.0.0.1:${fallback.port}" }`,
    'routes:',
    '  - match: loop.example.test',
    `    backend: { name: itself, addr: "localhost:${port}" }`,
  ].join('\n'));
  t.after(() => r.stop());
  assert.equal(await firstReply(port, 'loop.example.test'), 'fallback', 'the client is served by the fallback');
  await waitFor(async () => (await r.metric('sni_router_connections_total', { result: 'loop' })) === 1, 3000, 'the loop to be counted');
  assert.equal(await r.metric('sni_router_connections_total', { route: 'loop.example.test', result: 'loop' }), 1);
  // Nothing went round: one looped connection, no other connection than the client's and the
  // fallback's, and no limit was reached.
  await waitFor(async () => (await r.activeConnections()) === 0, 3000, 'every connection to end');
  assert.equal(await r.metric('sni_router_connections_total', { result: 'loop' }), 1);
  assert.equal(await r.metric('sni_router_connection_limit_rejections_total'), 0);
  assert.equal(fallback.conns.length, 1, 'the hello reached the fallback once');

  // Again: each client is one looped connection, never more.
  for (let i = 0; i < 5; i++) assert.equal(await firstReply(port, 'loop.example.test'), 'fallback');
  await waitFor(async () => (await r.metric('sni_router_connections_total', { result: 'loop' })) === 6, 3000, 'six loops');
  assert.ok(r.logs.some((l) => l.msg === 'connection from the router itself closed: the route leads back to the router'));
});

test('a Redis entry routing to the router\'s own address is skipped and counted as invalid', async (t) => {
  const fallback = await recordingBackend({ reply: 'fallback' });
  const turn = await recordingBackend({ reply: 'turn' });
  const suffix = randomSuffix();
  const key = `sni-router-test:${suffix}:routes`;
  const redis = redisClient();
  t.after(async () => {
    await redis.del(key);
    redis.disconnect();
    await fallback.close();
    await turn.close();
  });
  const port = await freePort();
  await redis.hset(key,
    'self.example.test', JSON.stringify({ backend: { addr: `127.0.0.1:${port}` } }),
    'good.example.test', JSON.stringify({ backend: { addr: `127.0.0.1:${turn.port}` } }));
  const r = await startRouter([
    `listen: "127.0.0.1:${port}"`,
    `fallback: { addr: "127.0.0.1:${fallback.port}" }`,
    'sources:',
    `  - { type: redis, name: r-${suffix}, url: "redis://127.0.0.1:${REDIS_PORT}/0", key: "${key}", channel: "c-${suffix}" }`,
  ].join('\n'));
  t.after(() => r.stop());
  await redisSettled(redis, `r-${suffix}`);
  await waitFor(async () => (await r.metric('sni_router_routes', { source: `r-${suffix}` })) === 1);
  assert.ok(await r.metric('sni_router_source_invalid_entries_total', { source: `r-${suffix}` }) >= 1);
  assert.equal(await firstReply(port, 'self.example.test'), 'fallback');
  assert.equal(await firstReply(port, 'good.example.test'), 'turn');
  const skipped = r.logs.find((l) => l.msg === 'skipped invalid route entry' && l.entry === 'self.example.test');
  assert.match(String(skipped?.err), /is the router's own listen address/);
});

test('TCP keepalive is on for clients (set once on the listener) and for backends that are not on loopback', async (t) => {
  const ip = Object.values((await import('node:os')).networkInterfaces()).flat()
    .find((a) => a !== undefined && a.family === 'IPv4' && !a.internal)?.address;
  const remote = await recordingBackend({ reply: 'remote', host: ip ?? '127.0.0.1' });
  t.after(() => remote.close());
  const r = await startRouter([
    'tcp_keepalive: 45s',
    `fallback: { addr: "${ip ?? '127.0.0.1'}:${remote.port}" }`,
  ].join('\n'));
  t.after(() => r.stop());
  const s = net.connect({ host: '127.0.0.1', port: r.port });
  t.after(() => s.destroy());
  await new Promise((resolve) => s.on('connect', resolve));
  s.write(buildHello({ sni: 'x.example.test' }));
  await new Promise((resolve) => s.once('data', resolve));
  const sockets = execFileSync('ss', ['-tnoH', 'state', 'established'], { encoding: 'utf8' }).split('\n');
  // Recv-Q Send-Q Local Peer [timer]: the router's accepted socket is local = its port.
  const columns = (l: string) => l.trim().split(/\s+/);
  const client = sockets.find((l) => columns(l)[2] === `127.0.0.1:${r.port}` && columns(l)[3] === `127.0.0.1:${s.localPort}`);
  assert.match(client ?? '', /timer:\(keepalive,4\dsec/, `the accepted client socket: ${client}`);
  if (ip === undefined) {
    t.diagnostic('no non-loopback interface: the backend side is not checked');
    return;
  }
  // The backend's own accepted socket has no keepalive: a timer on a socket to it is the router's.
  const backend = sockets.find((l) => columns(l)[3] === `${ip}:${remote.port}`);
  assert.match(backend ?? '', /timer:\(keepalive,4\dsec/, `the router's socket to the backend: ${backend}`);
});
