// The metric set, read the way Prometheus reads it: over HTTP from the admin port, after real
// traffic through a real router. Every count is compared with what the test sent, by label.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import tls from 'node:tls';
import {
  FIXTURES, type RunningRouter, makeCert, metricValue, rawExchange, recordingBackend, startRouter, tempDir, tlsBackend,
  waitFor,
} from './helpers.ts';

/** Chromium's HTTPS ClientHello (ALPN h2, http/1.1), one TLS record. */
const CHROMIUM_HELLO = readFileSync(join(FIXTURES, 'chromium-https-clienthello.bin'));

/**
 * The fixture ClientHello with its server_name extension rewritten to `sni` (or removed, for
 * null), every length in the record and the handshake fixed up. Everything else stays as Chromium
 * sent it, so the router parses a real-world hello with a name of our choosing.
 */
function helloWithSni(sni: string | null, template: Buffer = CHROMIUM_HELLO): Buffer {
  assert.equal(template[0], 0x16, 'a handshake record');
  const hs = template.subarray(5, 5 + template.readUInt16BE(3));
  assert.equal(hs[0], 0x01, 'a ClientHello');
  let p = 4 + 2 + 32; // handshake header, legacy_version, random
  p += 1 + hs[p]; // legacy_session_id
  p += 2 + hs.readUInt16BE(p); // cipher_suites
  p += 1 + hs[p]; // legacy_compression_methods
  const extEnd = p + 2 + hs.readUInt16BE(p);
  const exts: Buffer[] = [];
  for (let q = p + 2; q < extEnd;) {
    const type = hs.readUInt16BE(q);
    const len = hs.readUInt16BE(q + 2);
    if (type !== 0) {
      exts.push(hs.subarray(q, q + 4 + len));
    } else if (sni !== null) {
      const name = Buffer.from(sni, 'ascii');
      const ext = Buffer.alloc(4 + 2 + 1 + 2 + name.length);
      ext.writeUInt16BE(0, 0);
      ext.writeUInt16BE(2 + 1 + 2 + name.length, 2);
      ext.writeUInt16BE(1 + 2 + name.length, 4); // server_name_list
      ext[6] = 0; // host_name
      ext.writeUInt16BE(name.length, 7);
      name.copy(ext, 9);
      exts.push(ext);
    }
    q += 4 + len;
  }
  const extBlock = Buffer.concat(exts);
  const bodyLen = (p - 4) + 2 + extBlock.length;
  const out = Buffer.alloc(5 + 4 + bodyLen);
  out[0] = 0x16;
  template.copy(out, 1, 1, 3); // record version
  out.writeUInt16BE(4 + bodyLen, 3);
  out[5] = 0x01;
  out.writeUIntBE(bodyLen, 6, 3);
  hs.copy(out, 9, 4, p);
  out.writeUInt16BE(extBlock.length, 9 + p - 4);
  extBlock.copy(out, 9 + p - 4 + 2);
  return out;
}

async function scrape(adminPort: number): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${adminPort}/metrics`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /^text\/plain/);
  return res.text();
}

/** Every sample line of the router's own series ("sni_router_…{…} value"). */
function routerSeries(text: string): string[] {
  return text.split('\n').filter((l) => l.startsWith('sni_router_'));
}

/** Non-zero samples of one metric, as "label=value,…" → value. */
function samples(text: string, name: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    const m = /^([a-z_]+)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (m === null || m[1] !== name || Number(m[3]) === 0) continue;
    out.set((m[2] ?? '').replace(/"/g, ''), Number(m[3]));
  }
  return out;
}

async function closedPort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const { port } = s.address() as net.AddressInfo;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** A TLS client through the router that reads the backend's greeting and closes; the bytes it put on the wire each way. */
async function tlsGreeting(port: number, servername: string): Promise<{ line: string; sent: number; received: number }> {
  const raw = net.connect({ host: '127.0.0.1', port });
  await new Promise<void>((resolve, reject) => raw.once('connect', resolve).once('error', reject));
  const s = tls.connect({ socket: raw, servername, rejectUnauthorized: false });
  const line = await new Promise<string>((resolve, reject) => {
    let buf = '';
    s.on('data', (d: Buffer) => {
      buf += d.toString();
      if (buf.includes('\n')) resolve(buf.slice(0, buf.indexOf('\n')));
    });
    s.once('error', reject);
  });
  s.end();
  await new Promise<void>((resolve) => raw.once('close', () => resolve()));
  return { line, sent: raw.bytesWritten, received: raw.bytesRead };
}

/** A raw connection that writes `data` and stays open until `end()` is called. */
async function holdOpen(port: number, data: Buffer): Promise<{ end(): Promise<Buffer> }> {
  const s = net.connect({ host: '127.0.0.1', port, allowHalfOpen: true });
  const got: Buffer[] = [];
  s.on('data', (d: Buffer) => got.push(d));
  const closed = new Promise<void>((resolve) => s.once('close', () => resolve()));
  await new Promise<void>((resolve, reject) => s.once('connect', resolve).once('error', reject));
  s.write(data);
  return {
    end: async () => {
      s.end();
      await closed;
      return Buffer.concat(got);
    },
  };
}

test('after a scripted mix of traffic, /metrics counts exactly what was sent, by label', async (t) => {
  const { dir, cleanup } = tempDir();
  const WEB_REPLY = 'web fallback says hi\n';
  const HELD_REPLY = 'held backend here, 33 bytes long\n';
  const turn = await tlsBackend('turn', makeCert(dir, 'turn.example.com'));
  const web = await recordingBackend({ reply: WEB_REPLY });
  const held = await recordingBackend({ reply: HELD_REPLY });
  const deadPort = await closedPort();
  const LIMIT = 3;
  const router: RunningRouter = await startRouter(`
client_hello_timeout: 300ms
max_concurrent_conns: ${LIMIT}
fallback: { name: web, addr: "127.0.0.1:${web.port}" }
routes:
  - match: turn.example.com
    backend: { name: turn, addr: "127.0.0.1:${turn.port}" }
  - match: dead.example.com
    backend: { name: dead, addr: "127.0.0.1:${deadPort}" }
  - match: held.example.com
    backend: { name: held, addr: "127.0.0.1:${held.port}" }
`);
  t.after(async () => {
    await router.stop();
    await Promise.all([turn.close(), web.close(), held.close()]);
    cleanup();
  });
  const idle = () => waitFor(() => router.app.server.activeConnections === 0, 5000, 'open connections to finish');

  // Routed TLS: three real handshakes to the turn backend.
  let turnUp = 0;
  let turnDown = 0;
  for (let i = 0; i < 3; i++) {
    const r = await tlsGreeting(router.port, 'turn.example.com');
    assert.match(r.line, /^turn alpn=none sni=turn\.example\.com$/);
    turnUp += r.sent;
    turnDown += r.received;
  }
  await idle();

  // Fallback: two names no route matches.
  let webUp = 0;
  for (const sni of ['nobody.example.org', 'www.example.com']) {
    const hello = helloWithSni(sni);
    const reply = await rawExchange(router.port, [hello]);
    assert.equal(reply.toString(), WEB_REPLY);
    webUp += hello.length;
  }

  // Not TLS: a plain HTTP request goes to the fallback with its bytes.
  const httpReq = Buffer.from('GET / HTTP/1.0\r\n\r\n');
  assert.equal((await rawExchange(router.port, [httpReq])).toString(), WEB_REPLY);
  webUp += httpReq.length;

  // ClientHello timeout: half a hello, then silence past client_hello_timeout.
  const partial = helloWithSni('slow.example.com').subarray(0, 100);
  const before = web.conns.length;
  const slow = await holdOpen(router.port, partial);
  await waitFor(() => web.conns.length > before && web.conns[before].bytes.length === partial.length, 3000, 'the timeout to hand the bytes to the fallback');
  assert.equal((await slow.end()).toString(), WEB_REPLY);
  webUp += partial.length;

  // Dial failure: the backend's port is closed; the connection goes to the fallback with its bytes.
  for (let i = 0; i < 2; i++) {
    const hello = helloWithSni('dead.example.com');
    assert.equal((await rawExchange(router.port, [hello])).toString(), WEB_REPLY);
    webUp += hello.length;
  }
  await idle();

  // Over the limit: LIMIT connections held open, two more are turned away.
  const heldPayload = Buffer.from('payload after the hello');
  const heldHello = helloWithSni('held.example.com');
  const holders = [];
  for (let i = 0; i < LIMIT; i++) holders.push(await holdOpen(router.port, Buffer.concat([heldHello, heldPayload])));
  await held.waitConns(LIMIT);
  await waitFor(() => held.conns.every((c) => c.bytes.length === heldHello.length + heldPayload.length), 3000, 'held bytes');
  let text = await scrape(router.adminPort);
  assert.equal(metricValue(text, 'sni_router_active_connections', { backend: 'held' }), LIMIT);
  for (let i = 0; i < 2; i++) {
    assert.equal((await rawExchange(router.port, [heldHello])).length, 0, 'a rejected connection gets nothing back');
  }
  assert.equal(held.conns.length, LIMIT, 'rejected connections never reach a backend');
  for (const h of holders) assert.equal((await h.end()).toString(), HELD_REPLY);
  await idle();

  text = await scrape(router.adminPort);
  assert.deepEqual(samples(text, 'sni_router_connections_total'), new Map([
    ['route=turn.example.com,result=ok', 3],
    ['route=fallback,result=ok', 6],
    ['route=held.example.com,result=ok', LIMIT],
  ]));
  assert.deepEqual(samples(text, 'sni_router_client_hello_failures_total'), new Map([['reason=not_tls', 1], ['reason=timeout', 1]]));
  // Every reason is exported from the start, at zero, so rate() works before the first failure.
  for (const reason of ['not_tls', 'malformed', 'too_large', 'timeout', 'closed']) {
    assert.match(text, new RegExp(`^sni_router_client_hello_failures_total\\{reason="${reason}"\\} \\d+$`, 'm'));
  }
  assert.deepEqual(samples(text, 'sni_router_backend_dial_failures_total'), new Map([['backend=dead', 2]]));
  assert.deepEqual(samples(text, 'sni_router_connection_limit_rejections_total'), new Map([['scope=global', 2]]));
  assert.equal(metricValue(text, 'sni_router_connection_limit_rejections_total', { scope: 'per_ip' }), 0);
  assert.deepEqual(samples(text, 'sni_router_bytes_total'), new Map([
    ['backend=turn,direction=upstream', turnUp],
    ['backend=turn,direction=downstream', turnDown],
    ['backend=web,direction=upstream', webUp],
    ['backend=web,direction=downstream', 6 * WEB_REPLY.length],
    ['backend=held,direction=upstream', LIMIT * (heldHello.length + heldPayload.length)],
    ['backend=held,direction=downstream', LIMIT * HELD_REPLY.length],
  ]));
  for (const backend of ['turn', 'web', 'held']) {
    assert.equal(metricValue(text, 'sni_router_active_connections', { backend }), 0, backend);
  }
  // Histograms: one ClientHello observation per connection that got past accept (rejected ones
  // did not); sizes only for complete hellos; dial times for successful dials only.
  assert.equal(metricValue(text, 'sni_router_client_hello_duration_seconds_count'), 3 + 4 + 2 + LIMIT);
  assert.equal(metricValue(text, 'sni_router_client_hello_bytes_count'), 3 + 2 + 2 + LIMIT);
  assert.deepEqual(samples(text, 'sni_router_backend_dial_duration_seconds_count'), new Map([
    ['backend=turn', 3], ['backend=web', 6], ['backend=held', LIMIT],
  ]));
  assert.equal(metricValue(text, 'sni_router_route_table_generation'), router.app.router.generation);
  // The default process and Node.js series are there too.
  assert.match(text, /^process_cpu_seconds_total /m);
  assert.match(text, /^nodejs_eventloop_lag_seconds /m);
});

test('route_table_generation and routes{source} describe the live table from the start and after a replace', async (t) => {
  const router = await startRouter(`
fallback: { name: web, addr: "127.0.0.1:9" }
routes:
  - match: a.example.com
    backend: { name: a, addr: "127.0.0.1:9" }
  - match: b.example.com
    alpn: none
    backend: { name: b, addr: "127.0.0.1:9" }
`);
  t.after(() => router.stop());
  let text = await scrape(router.adminPort);
  assert.equal(metricValue(text, 'sni_router_route_table_generation'), router.app.router.generation);
  assert.equal(metricValue(text, 'sni_router_routes', { source: 'config' }), 2, 'routes{source="config"} at start');

  const table = router.app.router.table;
  router.app.composer.setConfig(table.routes.slice(0, 1), table.fallback);
  text = await scrape(router.adminPort);
  assert.equal(metricValue(text, 'sni_router_route_table_generation'), router.app.router.generation);
  assert.equal(metricValue(text, 'sni_router_routes', { source: 'config' }), 1, 'routes{source="config"} after a replace');
});

test('build_info is 1, once, labelled with the version in package.json and the Node.js version', async (t) => {
  const router = await startRouter('fallback: { name: web, addr: "127.0.0.1:9" }\n');
  t.after(() => router.stop());
  const pkg = JSON.parse(readFileSync(join(import.meta.dirname, '..', 'package.json'), 'utf8')) as { version: string };
  const text = await scrape(router.adminPort);
  assert.match(text, /^# TYPE sni_router_build_info gauge$/m);
  assert.deepEqual(routerSeries(text).filter((l) => l.startsWith('sni_router_build_info')),
    [`sni_router_build_info{version="${pkg.version}",node="${process.version}"} 1`]);
});

test('bytes_total counts a long-lived relay at scrape time, before it closes', async (t) => {
  const backend = await recordingBackend({ reply: 'x'.repeat(1000) });
  const router = await startRouter(`
fallback: { name: web, addr: "127.0.0.1:${backend.port}" }
routes:
  - match: turn.example.com
    backend: { name: turn, addr: "127.0.0.1:${backend.port}" }
`);
  t.after(async () => {
    await router.stop();
    await backend.close();
  });
  const hello = helloWithSni('turn.example.com');
  const conn = await holdOpen(router.port, hello);
  await backend.waitConns(1);
  await waitFor(() => backend.conns[0].bytes.length === hello.length, 3000, 'the hello at the backend');
  let text = '';
  await waitFor(async () => {
    text = await scrape(router.adminPort);
    return metricValue(text, 'sni_router_bytes_total', { backend: 'turn', direction: 'downstream' }) === 1000;
  }, 3000, 'downstream bytes while open');
  assert.equal(metricValue(text, 'sni_router_bytes_total', { backend: 'turn', direction: 'upstream' }), hello.length);
  assert.equal(metricValue(text, 'sni_router_active_connections', { backend: 'turn' }), 1);
  assert.equal(metricValue(text, 'sni_router_connections_total'), 0, 'counted once, when it ends');
  await conn.end();
  await waitFor(() => router.app.server.activeConnections === 0);
  text = await scrape(router.adminPort);
  // Flushed at scrape and again at close: counted once in total.
  assert.equal(metricValue(text, 'sni_router_bytes_total', { backend: 'turn', direction: 'upstream' }), hello.length);
  assert.equal(metricValue(text, 'sni_router_bytes_total', { backend: 'turn', direction: 'downstream' }), 1000);
  assert.equal(metricValue(text, 'sni_router_connections_total', { route: 'turn.example.com', result: 'ok' }), 1);
});

test('10,000 connections with distinct random SNIs add no series', { timeout: 60_000 }, async (t) => {
  // A sink that reads everything and closes when the client does.
  const sockets = new Set<net.Socket>();
  const sink = net.createServer({ allowHalfOpen: true }, (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => {});
    s.resume();
    s.on('end', () => s.end());
  });
  await new Promise<void>((r) => sink.listen(0, '127.0.0.1', () => r()));
  const sinkPort = (sink.address() as net.AddressInfo).port;
  const router = await startRouter(`
max_concurrent_conns: 10000
fallback: { name: web, addr: "127.0.0.1:${sinkPort}" }
routes:
  - match: "*.wild.example.com"
    backend: { name: wild, addr: "127.0.0.1:${sinkPort}" }
  - match: "**.deep.example.com"
    backend: { name: deep, addr: "127.0.0.1:${sinkPort}" }
`);
  t.after(async () => {
    await router.stop();
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => sink.close(() => r()));
  });

  // Each name gets a label no metric could have seen before.
  const label = () => `z${randomBytes(8).toString('hex')}`;
  const names = [
    () => `${label()}.wild.example.com`, // the *. route
    () => `${label()}.${label()}.deep.example.com`, // the **. route
    () => `${label()}.example.net`, // no route: fallback
    () => `${label()}.${label()}.wild.example.com`, // two labels: not *., fallback
  ];
  const exchange = async (sni: string) => {
    const reply = await rawExchange(router.port, [helloWithSni(sni)], { timeoutMs: 10_000 });
    assert.equal(reply.length, 0);
  };

  // Warm up: one of each kind, so every series the flood can touch exists already.
  for (const make of names) await exchange(make());
  await waitFor(() => router.app.server.activeConnections === 0);
  const beforeText = await scrape(router.adminPort);
  const before = routerSeries(beforeText);

  const TOTAL = 10_000;
  const CONCURRENCY = 100;
  let next = 0;
  const started = Date.now();
  await Promise.all(Array.from({ length: CONCURRENCY }, async () => {
    while (next < TOTAL) {
      const i = next++;
      await exchange(names[i % names.length]());
    }
  }));
  await waitFor(() => router.app.server.activeConnections === 0, 10_000, 'the flood to finish');
  const elapsed = Date.now() - started;

  const afterText = await scrape(router.adminPort);
  const after = routerSeries(afterText);
  // Same series, only values moved.
  const key = (l: string) => l.slice(0, l.lastIndexOf(' '));
  assert.deepEqual(after.map(key), before.map(key), 'the set of sni_router_ series changed');
  assert.doesNotMatch(afterText, /z[0-9a-f]{16}/, 'a client SNI leaked into /metrics');
  const total = TOTAL + names.length;
  assert.equal(metricValue(afterText, 'sni_router_connections_total'), total);
  assert.deepEqual(samples(afterText, 'sni_router_connections_total'), new Map([
    ['route=*.wild.example.com,result=ok', total / 4],
    ['route=**.deep.example.com,result=ok', total / 4],
    ['route=fallback,result=ok', total / 2],
  ]));
  t.diagnostic(`${TOTAL} connections in ${elapsed} ms; ${after.length} sni_router_ series before and after`);
});
