// The data plane over real sockets: real TLS clients (node:tls, openssl), byte-exact relay, the
// stealth rule, PROXY headers, half-close, limits, failover, and live table replacement.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { parseConfig } from '../src/config/load.ts';
import { RouteTable } from '../src/router/table.ts';
import {
  type CertPair, type Listening, type RunningRouter, makeCert, rawExchange, recordingBackend, sleep, startRouter, tempDir, tlsBackend, tlsHello, waitFor,
} from './helpers.ts';
import {
  buildHello, captureNodeHello, captureOpensslHello, chromiumHttps, chromiumTurn, handshakeBytes, toRecords,
} from './support/hellos.ts';

let dir: string;
let cleanupDir: () => void;
let turnCert: CertPair;
let webCert: CertPair;

before(() => {
  ({ dir, cleanup: cleanupDir } = tempDir());
  turnCert = makeCert(dir, 'cdn.example.com');
  webCert = makeCert(dir, 'www.example.com');
});
after(() => cleanupDir());

/** `size` bytes of big-endian 32-bit counters from `seed`: a misplaced or repeated chunk shows. */
function counterPattern(size: number, seed: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) b.writeUInt32BE((i / 4 + seed) >>> 0, i);
  return b;
}

function opensslClient(port: number, servername: string | null, alpn?: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const args = ['s_client', '-connect', `127.0.0.1:${port}`, '-ign_eof'];
    if (servername === null) args.push('-noservername');
    else args.push('-servername', servername);
    if (alpn !== undefined) args.push('-alpn', alpn);
    const child = spawn('openssl', args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => {
      out += d.toString();
      // The backend greets, then echoes; once the echo is back we are done.
      if (out.includes('ping-through-router')) child.kill('SIGTERM');
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    child.on('error', reject);
    child.on('close', () => {
      clearTimeout(timer);
      resolve(out);
    });
    setTimeout(() => child.stdin.write('ping-through-router\n'), 300);
  });
}

describe('routing real TLS clients', () => {
  test('node:tls with servername X reaches the backend whose certificate names X; without SNI the fallback', async () => {
    const turn = await tlsBackend('turn', turnCert);
    const web = await tlsBackend('web', webCert, { alpn: ['h2', 'http/1.1'] });
    const r = await startRouter(`
fallback: { name: caddy, addr: "127.0.0.1:${web.port}" }
routes:
  - match: cdn.example.com
    backend: { name: turn, addr: "127.0.0.1:${turn.port}" }
`);
    try {
      const a = await tlsHello(r.port, 'cdn.example.com');
      assert.equal(a.peerCertSubject, 'cdn.example.com');
      assert.match(a.line, /^turn sni=|^turn alpn=none sni=cdn\.example\.com$/);
      const b = await tlsHello(r.port, 'CDN.example.com.');
      assert.equal(b.peerCertSubject, 'cdn.example.com');
      const c = await tlsHello(r.port, undefined);
      assert.equal(c.peerCertSubject, 'www.example.com');
      assert.equal(c.line, 'web alpn=none sni=none');
      const d = await tlsHello(r.port, 'unknown.example.org', ['h2']);
      assert.equal(d.line, 'web alpn=h2 sni=unknown.example.org');
    } finally {
      await r.stop();
      await turn.close();
      await web.close();
    }
  });

  test('openssl s_client with servername X completes a handshake with X\'s backend; without SNI the fallback', async () => {
    const turn = await tlsBackend('turn', turnCert);
    const web = await tlsBackend('web', webCert);
    const r = await startRouter(`
fallback: { name: caddy, addr: "127.0.0.1:${web.port}" }
routes:
  - { match: cdn.example.com, backend: { name: turn, addr: "127.0.0.1:${turn.port}" } }
`);
    try {
      const a = await opensslClient(r.port, 'cdn.example.com');
      assert.match(a, /subject=\s*CN\s*=\s*cdn\.example\.com/);
      assert.match(a, /^turn alpn=none sni=cdn\.example\.com$/m);
      assert.match(a, /ping-through-router/);
      const b = await opensslClient(r.port, null);
      assert.match(b, /subject=\s*CN\s*=\s*www\.example\.com/);
      assert.match(b, /^web alpn=none sni=none$/m);
    } finally {
      await r.stop();
      await turn.close();
      await web.close();
    }
  });

  test('stealth: alpn none → TURN; a browser offering h2 → fallback; acme-tls/1 → fallback', async () => {
    const turn = await tlsBackend('turn', turnCert, { alpn: ['acme-tls/1'] });
    const web = await tlsBackend('web', webCert, { alpn: ['h2', 'http/1.1', 'acme-tls/1'] });
    const r = await startRouter(`
fallback: { name: caddy, addr: "127.0.0.1:${web.port}" }
routes:
  - { match: cdn.example.com, alpn: none, backend: { name: turn, addr: "127.0.0.1:${turn.port}" } }
  - { match: acme.example.com, backend: { name: turn, addr: "127.0.0.1:${turn.port}" } }
`);
    try {
      assert.match((await tlsHello(r.port, 'cdn.example.com')).line, /^turn /);
      assert.match((await tlsHello(r.port, 'cdn.example.com', ['h2', 'http/1.1'])).line, /^web alpn=h2 /);
      assert.match((await tlsHello(r.port, 'cdn.example.com', ['http/1.1'])).line, /^web alpn=http\/1\.1 /);
      assert.match((await tlsHello(r.port, 'acme.example.com', ['acme-tls/1'])).line, /^web alpn=acme-tls\/1 sni=acme\.example\.com/);
      assert.match((await tlsHello(r.port, 'acme.example.com')).line, /^turn /);
    } finally {
      await r.stop();
      await turn.close();
      await web.close();
    }
  });

  test('acme_tls_alpn: route sends acme-tls/1 by the normal rules', async () => {
    const turn = await tlsBackend('turn', turnCert, { alpn: ['acme-tls/1'] });
    const web = await tlsBackend('web', webCert, { alpn: ['acme-tls/1'] });
    const r = await startRouter(`
acme_tls_alpn: route
fallback: { name: caddy, addr: "127.0.0.1:${web.port}" }
routes:
  - { match: cdn.example.com, backend: { name: turn, addr: "127.0.0.1:${turn.port}" } }
`);
    try {
      assert.match((await tlsHello(r.port, 'cdn.example.com', ['acme-tls/1'])).line, /^turn alpn=acme-tls\/1/);
    } finally {
      await r.stop();
      await turn.close();
      await web.close();
    }
  });

  test('IPv6: listens on [::1] and routes', async () => {
    const turn = await tlsBackend('turn', turnCert, { host: '::1' });
    const r = await startRouter(`
listen: ["[::1]:0"]
fallback: { addr: "[::1]:${turn.port}" }
`);
    try {
      assert.equal(r.app.listenAddresses[0].family, 'IPv6');
      assert.match((await tlsHello(r.port, 'cdn.example.com', undefined, '::1')).line, /^turn /);
    } finally {
      await r.stop();
      await turn.close();
    }
  });
});

describe('relay is byte-exact', () => {
  test('the backend receives byte for byte what the client sent: real hellos, one byte per write, re-split records', async () => {
    const rec = await recordingBackend({ replyOnEnd: 'bye' });
    const r = await startRouter(`
fallback: { addr: "127.0.0.1:1" }
routes:
  - { match: "**.example.com", backend: { name: rec, addr: "127.0.0.1:${rec.port}" } }
  - { match: "cdn.example.com", backend: { name: rec, addr: "127.0.0.1:${rec.port}" } }
`);
    try {
      const tail = Buffer.from('\x17\x03\x03\x00\x05after');
      const node = await captureNodeHello('node.example.com', ['h2']);
      const openssl = await captureOpensslHello('openssl.example.com');
      const cases: Array<{ name: string; pieces: Buffer[] }> = [];
      for (const [name, flight] of [['chromium-https', chromiumHttps()], ['chromium-turn', chromiumTurn()], ['node', node], ['openssl', openssl]] as const) {
        cases.push({ name: `${name} in one write`, pieces: [Buffer.concat([flight, tail])] });
      }
      const f = chromiumHttps();
      cases.push({ name: 'one byte per write', pieces: [...f].map((b) => Buffer.from([b])).concat([tail]) });
      const tiny = toRecords(handshakeBytes(f), new Array(200).fill(1).concat([37, 5, 900]));
      cases.push({ name: 'many small records, cut in 7-byte writes', pieces: [...Array(Math.ceil(tiny.length / 7)).keys()].map((i) => tiny.subarray(i * 7, i * 7 + 7)) });
      for (const c of cases) {
        const before = rec.conns.length;
        const reply = await rawExchange(r.port, c.pieces, { gapMs: c.pieces.length > 100 ? 0 : 2 });
        await waitFor(() => rec.conns.length > before && rec.conns[before].ended, 5000, c.name);
        const sent = Buffer.concat(c.pieces);
        assert.ok(rec.conns[before].bytes.equals(sent), `${c.name}: backend got ${rec.conns[before].bytes.length} bytes, client sent ${sent.length}`);
        assert.equal(reply.toString(), 'bye', c.name);
      }
    } finally {
      await r.stop();
      await rec.close();
    }
  });

  test('half-close: the client ends its side and still receives the backend\'s whole reply', async () => {
    const big = Buffer.alloc(4 * 1024 * 1024, 'x');
    const rec = await recordingBackend({ replyOnEnd: big });
    const r = await startRouter(`fallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    try {
      const hello = buildHello({ sni: 'half.example.com' });
      const reply = await rawExchange(r.port, [hello, Buffer.from('request body')], { timeoutMs: 15_000 });
      assert.equal(reply.length, big.length);
      await waitFor(() => rec.conns[0]?.ended === true);
      assert.ok(rec.conns[0].bytes.equals(Buffer.concat([hello, Buffer.from('request body')])));
    } finally {
      await r.stop();
      await rec.close();
    }
  });

  test('backpressure: a slow reader gets every byte of a large transfer, in order', async () => {
    const size = 16 * 1024 * 1024;
    const payload = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4) payload.writeUInt32BE(i / 4, i);
    const rec = await recordingBackend({ reply: payload });
    const r = await startRouter(`fallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    try {
      const got = await new Promise<Buffer>((resolve, reject) => {
        const s = net.connect({ host: '127.0.0.1', port: r.port });
        const parts: Buffer[] = [];
        let n = 0;
        s.on('data', (d) => {
          parts.push(d);
          n += d.length;
          // Read slowly at first so the router must hold the backend back.
          if (parts.length < 20) {
            s.pause();
            setTimeout(() => s.resume(), 20);
          }
          if (n >= size) {
            s.destroy();
            resolve(Buffer.concat(parts));
          }
        });
        s.on('error', reject);
        s.write(buildHello({ sni: 'bp.example.com' }));
      });
      assert.ok(got.equals(payload));
    } finally {
      await r.stop();
      await rec.close();
    }
  });
  test('backpressure upstream: a slow backend gets every byte a fast client sends, in order', async () => {
    const size = 16 * 1024 * 1024;
    const payload = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4) payload.writeUInt32BE(i / 4, i);
    const hello = buildHello({ sni: 'up.example.com' });
    let received: Promise<Buffer> | null = null;
    const backend = net.createServer((s) => {
      received = new Promise((resolve) => {
        const parts: Buffer[] = [];
        s.on('data', (d) => {
          parts.push(d);
          // Read slowly at first so the router must hold the client back.
          if (parts.length < 20) {
            s.pause();
            setTimeout(() => s.resume(), 20);
          }
        });
        s.on('end', () => {
          resolve(Buffer.concat(parts));
          s.end();
        });
      });
    });
    await new Promise<void>((resolve) => backend.listen(0, '127.0.0.1', resolve));
    const r = await startRouter(`fallback: { addr: "127.0.0.1:${(backend.address() as net.AddressInfo).port}" }\n`);
    try {
      await new Promise<void>((resolve, reject) => {
        const s = net.connect({ host: '127.0.0.1', port: r.port }, () => {
          s.write(hello);
          s.end(payload);
        });
        s.on('error', reject);
        s.on('close', () => resolve());
        s.resume();
      });
      await waitFor(() => received !== null);
      const got = await received!;
      assert.equal(got.length, hello.length + size);
      assert.ok(got.subarray(hello.length).equals(payload));
    } finally {
      await r.stop();
      await new Promise((resolve) => backend.close(resolve));
    }
  });

  test('both ways at once: bulk each way with readers that stall now and then, every byte in order, then half-closes', async () => {
    const size = 8 * 1024 * 1024;
    const pattern = (seed: number) => counterPattern(size, seed);
    const up = pattern(0);
    const down = pattern(0x55555555);
    const hello = buildHello({ sni: 'duplex.example.com' });
    // Reads everything until the peer's FIN, stalling every 7th chunk for a few ms.
    const drain = (s: net.Socket) => new Promise<Buffer>((resolve, reject) => {
      const parts: Buffer[] = [];
      s.on('data', (d) => {
        parts.push(d);
        if (parts.length % 7 === 0) {
          s.pause();
          setTimeout(() => s.resume(), 5);
        }
      });
      s.on('end', () => resolve(Buffer.concat(parts)));
      s.on('error', reject);
    });
    let atBackend: Promise<Buffer> | null = null;
    const backend = net.createServer({ allowHalfOpen: true }, (s) => {
      atBackend = drain(s);
      s.end(down); // the backend's FIN follows its last byte, while the client is still sending
    });
    await new Promise<void>((resolve) => backend.listen(0, '127.0.0.1', resolve));
    const r = await startRouter(`fallback: { addr: "127.0.0.1:${(backend.address() as net.AddressInfo).port}" }\n`);
    try {
      const atClient = await new Promise<Buffer>((resolve, reject) => {
        const s = net.connect({ host: '127.0.0.1', port: r.port, allowHalfOpen: true }, () => {
          s.write(hello);
          s.end(up);
        });
        drain(s).then(resolve, reject);
      });
      await waitFor(() => atBackend !== null);
      const got = await atBackend!;
      assert.equal(got.length, hello.length + size);
      assert.ok(got.subarray(hello.length).equals(up), 'upstream bytes differ');
      assert.equal(atClient.length, size);
      assert.ok(atClient.equals(down), 'downstream bytes differ');
      await waitFor(async () => (await r.metric('sni_router_connections_total', { route: 'fallback', result: 'ok' })) === 1);
    } finally {
      await r.stop();
      await new Promise((resolve) => backend.close(resolve));
    }
  });

  test('a bulk connection quiet for a while gives its buffers back and moves bulk again, beside another taking them', async () => {
    const size = 4 * 1024 * 1024;
    const pattern = (seed: number) => counterPattern(size, seed);
    // The backend echoes: both directions of each connection move bulk data.
    const backend = net.createServer((s) => s.pipe(s));
    await new Promise<void>((resolve) => backend.listen(0, '127.0.0.1', resolve));
    const r = await startRouter(`fallback: { addr: "127.0.0.1:${(backend.address() as net.AddressInfo).port}" }\n`);
    const hello = buildHello({ sni: 'quiet.example.com' });
    const open = () => new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect({ host: '127.0.0.1', port: r.port }, () => resolve(s));
      s.once('error', reject);
    });
    // Sends `data` and resolves with exactly as many bytes back.
    const exchange = (s: net.Socket, data: Buffer) => new Promise<Buffer>((resolve, reject) => {
      const parts: Buffer[] = [];
      let got = 0;
      const onData = (d: Buffer) => {
        parts.push(d);
        if ((got += d.length) >= data.length) {
          s.off('data', onData);
          resolve(Buffer.concat(parts));
        }
      };
      s.on('data', onData);
      s.once('error', reject);
      s.write(data);
    });
    try {
      const a = await open();
      const first = pattern(1);
      const echoed = await exchange(a, Buffer.concat([hello, first]));
      assert.ok(echoed.subarray(hello.length).equals(first), 'first transfer differs');
      // Quiet for more than two sweep ticks (1 s each without idle_timeout): the bulk buffers
      // go back to the spare list, and the next bulk connection takes them.
      await sleep(2500);
      const b = await open();
      const second = pattern(2);
      const third = pattern(3);
      const [fromA, fromB] = await Promise.all([exchange(a, second), exchange(b, Buffer.concat([hello, third]))]);
      assert.ok(fromA.equals(second), 'the quiet connection\'s second transfer differs');
      assert.ok(fromB.subarray(hello.length).equals(third), 'the new connection\'s transfer differs');
      a.destroy();
      b.destroy();
    } finally {
      await r.stop();
      await new Promise((resolve) => backend.close(resolve));
    }
  });
});

describe('PROXY protocol', () => {
  function parseV1(b: Buffer) {
    const end = b.indexOf('\r\n');
    const [sig, fam, src, dst, sport, dport] = b.subarray(0, end).toString('latin1').split(' ');
    return { sig, fam, src, dst, sport: Number(sport), dport: Number(dport), rest: b.subarray(end + 2) };
  }
  function parseV2(b: Buffer) {
    assert.ok(b.subarray(0, 12).equals(Buffer.from('0d0a0d0a000d0a515549540a', 'hex')), 'v2 signature');
    assert.equal(b[12], 0x21, 'version 2, PROXY command');
    const fam = b[13];
    const len = b.readUInt16BE(14);
    const body = b.subarray(16, 16 + len);
    if (fam === 0x11) {
      return {
        fam, src: [...body.subarray(0, 4)].join('.'), dst: [...body.subarray(4, 8)].join('.'),
        sport: body.readUInt16BE(8), dport: body.readUInt16BE(10), rest: b.subarray(16 + len),
      };
    }
    assert.equal(fam, 0x21, 'TCP over IPv6');
    const v6 = (x: Buffer) => [...Array(8).keys()].map((i) => x.readUInt16BE(i * 2).toString(16)).join(':');
    return { fam, src: v6(body.subarray(0, 16)), dst: v6(body.subarray(16, 32)), sport: body.readUInt16BE(32), dport: body.readUInt16BE(34), rest: b.subarray(16 + len) };
  }

  async function through(version: 'v1' | 'v2', host: string) {
    const rec = await recordingBackend({ host });
    const listen = host === '::1' ? '[::1]:0' : '127.0.0.1:0';
    const addr = host === '::1' ? `[::1]:${rec.port}` : `127.0.0.1:${rec.port}`;
    const r = await startRouter(`listen: "${listen}"\nfallback: { addr: "${addr}", proxy_protocol: ${version} }\n`);
    try {
      const hello = chromiumTurn();
      const client = net.connect({ host, port: r.port });
      await new Promise((res) => client.on('connect', res));
      client.write(hello);
      await waitFor(() => rec.conns.length === 1 && rec.conns[0].bytes.length >= hello.length + 16);
      const info = { clientPort: client.localPort!, routerPort: r.port, bytes: rec.conns[0].bytes, hello };
      client.destroy();
      return info;
    } finally {
      await r.stop();
      await rec.close();
    }
  }

  test('v1 over IPv4 carries the client\'s address and port, then the client\'s bytes', async () => {
    const { clientPort, routerPort, bytes, hello } = await through('v1', '127.0.0.1');
    const p = parseV1(bytes);
    assert.deepEqual([p.sig, p.fam, p.src, p.dst, p.sport, p.dport], ['PROXY', 'TCP4', '127.0.0.1', '127.0.0.1', clientPort, routerPort]);
    assert.ok(p.rest.equals(hello));
  });

  test('v2 over IPv4 is byte-correct', async () => {
    const { clientPort, routerPort, bytes, hello } = await through('v2', '127.0.0.1');
    const p = parseV2(bytes);
    assert.deepEqual([p.fam, p.src, p.dst, p.sport, p.dport], [0x11, '127.0.0.1', '127.0.0.1', clientPort, routerPort]);
    assert.ok(p.rest.equals(hello));
  });

  test('v1 and v2 over IPv6', async () => {
    const a = await through('v1', '::1');
    const p1 = parseV1(a.bytes);
    assert.deepEqual([p1.fam, p1.src, p1.dst, p1.sport, p1.dport], ['TCP6', '::1', '::1', a.clientPort, a.routerPort]);
    const b = await through('v2', '::1');
    const p2 = parseV2(b.bytes);
    assert.deepEqual([p2.src, p2.dst, p2.sport, p2.dport], ['0:0:0:0:0:0:0:1', '0:0:0:0:0:0:0:1', b.clientPort, b.routerPort]);
    assert.ok(p2.rest.equals(b.hello));
  });
});

describe('the stealth rule: unroutable goes to the fallback with its bytes', () => {
  test('an HTTP request, garbage, and a silent client all reach the fallback with their bytes', async () => {
    const rec = await recordingBackend({ replyOnEnd: 'HTTP/1.1 400 Bad Request\r\n\r\n' });
    const r = await startRouter(`client_hello_timeout: 300ms\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    try {
      const http = Buffer.from('GET / HTTP/1.1\r\nHost: cdn.example.com\r\n\r\n');
      const reply = await rawExchange(r.port, [http]);
      assert.equal(reply.toString(), 'HTTP/1.1 400 Bad Request\r\n\r\n');
      const garbage = Buffer.from([0x16, 0x03, 0x01, 0x00, 0x04, 0x09, 0x00, 0x00, 0x00, 0xff, 0xfe]);
      await rawExchange(r.port, [garbage]);
      // Silent past the timeout: the fallback gets the connection (with nothing) and the client's later bytes.
      const silent = net.connect({ host: '127.0.0.1', port: r.port });
      await new Promise((res) => silent.on('connect', res));
      await waitFor(() => rec.conns.length === 3, 3000, 'the silent client to reach the fallback');
      silent.end('late bytes');
      // A partial hello, then silence: forwarded as it is.
      const partial = chromiumHttps().subarray(0, 700);
      const partialReply = await rawExchange(r.port, [partial], { end: false, timeoutMs: 2000 });
      await waitFor(() => rec.conns.length === 4 && rec.conns[2].ended);
      assert.ok(rec.conns[0].bytes.equals(http));
      assert.ok(rec.conns[1].bytes.equals(garbage));
      assert.equal(rec.conns[2].bytes.toString(), 'late bytes');
      await waitFor(() => rec.conns[3].bytes.length === 700);
      assert.ok(rec.conns[3].bytes.equals(partial));
      assert.equal(partialReply.length, 0, 'the router itself never speaks');
      assert.equal(await r.metric('sni_router_client_hello_failures_total', { reason: 'not_tls' }), 1);
      assert.equal(await r.metric('sni_router_client_hello_failures_total', { reason: 'malformed' }), 1);
      assert.equal(await r.metric('sni_router_client_hello_failures_total', { reason: 'timeout' }), 2);
    } finally {
      await r.stop();
      await rec.close();
    }
  });

  test('a route whose every address fails goes to the fallback with every byte, not closed; under unroutable: close it is closed', async () => {
    const rec = await recordingBackend({ replyOnEnd: 'fallback here' });
    const dead = [await freePort(), await freePort()];
    const config = (unroutable: string) => `
unroutable: ${unroutable}
fallback: { name: caddy, addr: "127.0.0.1:${rec.port}" }
routes:
  - { match: turn.example.com, alpn: none, backend: { name: turn, addrs: ["127.0.0.1:${dead[0]}", "127.0.0.1:${dead[1]}"] } }
`;
    const routers: RunningRouter[] = [];
    try {
      const r = await startRouter(config('fallback'));
      routers.push(r);
      const hello = buildHello({ sni: 'turn.example.com' });
      const after = Buffer.from('bytes sent after the hello, while the backend is dialled');
      const reply = await rawExchange(r.port, [hello, after]);
      assert.equal(reply.toString(), 'fallback here', 'the client sees what the fallback says');
      await waitFor(() => rec.conns.length === 1 && rec.conns[0].ended);
      assert.ok(rec.conns[0].bytes.equals(Buffer.concat([hello, after])), 'the fallback got every byte, in order');
      assert.equal(await r.metric('sni_router_backend_dial_failures_total', { backend: 'turn' }), 2, 'both addresses were tried');
      assert.equal(await r.metric('sni_router_connections_total', { route: 'fallback', result: 'ok' }), 1);
      assert.equal(await r.metric('sni_router_connections_total', { route: 'turn.example.com', result: 'dial_failed' }), 0);

      const closing = await startRouter(config('close'));
      routers.push(closing);
      assert.equal((await rawExchange(closing.port, [hello], { end: false })).length, 0);
      assert.equal(rec.conns.length, 1, 'the fallback saw nothing more');
      assert.equal(await closing.metric('sni_router_connections_total', { route: 'turn.example.com', result: 'dial_failed' }), 1);
    } finally {
      for (const r of routers) await r.stop();
      await rec.close();
    }
  });

  test('unroutable: close closes them without a byte, and the fallback sees nothing', async () => {
    const rec = await recordingBackend();
    const turn = await tlsBackend('turn', turnCert);
    const r = await startRouter(`
client_hello_timeout: 300ms
unroutable: close
fallback: { addr: "127.0.0.1:${rec.port}" }
routes:
  - { match: cdn.example.com, backend: { name: turn, addr: "127.0.0.1:${turn.port}" } }
`);
    try {
      assert.equal((await rawExchange(r.port, [Buffer.from('GET / HTTP/1.0\r\n\r\n')], { end: false })).length, 0);
      assert.equal((await rawExchange(r.port, [buildHello({ sni: 'other.example.com' })], { end: false })).length, 0);
      assert.equal((await rawExchange(r.port, [buildHello({ sni: null })], { end: false })).length, 0);
      assert.equal((await rawExchange(r.port, [], { end: false })).length, 0);
      assert.match((await tlsHello(r.port, 'cdn.example.com')).line, /^turn /);
      await sleep(100);
      assert.equal(rec.conns.length, 0);
      assert.equal(await r.metric('sni_router_connections_total', { route: 'fallback', result: 'closed' }), 4);
    } finally {
      await r.stop();
      await rec.close();
      await turn.close();
    }
  });

  test('fallback down: the connection is closed and the process keeps serving', async () => {
    const closedPort = await freePort();
    const turn = await tlsBackend('turn', turnCert);
    const r = await startRouter(`
fallback: { name: caddy, addr: "127.0.0.1:${closedPort}" }
routes:
  - { match: cdn.example.com, backend: { name: turn, addr: "127.0.0.1:${turn.port}" } }
`);
    try {
      for (let i = 0; i < 5; i++) {
        assert.equal((await rawExchange(r.port, [Buffer.from('GET / HTTP/1.0\r\n\r\n')], { end: false })).length, 0);
      }
      assert.match((await tlsHello(r.port, 'cdn.example.com')).line, /^turn /);
      assert.equal(await r.metric('sni_router_connections_total', { route: 'fallback', result: 'dial_failed' }), 5);
      assert.ok(await r.metric('sni_router_backend_dial_failures_total', { backend: 'caddy' }) >= 1);
      assert.ok(r.logs.some((l) => l.msg === 'backend dial failed' && l.level === 'warn'));
    } finally {
      await r.stop();
      await turn.close();
    }
  });
});

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

describe('access log', () => {
  /**
   * A backend that answers the first bytes and hangs up at once: the router's FIN reaches the
   * client first, and by the time the connection finishes the client has hung up too, so its
   * socket no longer knows the peer.
   */
  async function hangingUp(reply: string): Promise<Listening<net.Server>> {
    const server = net.createServer((s) => {
      s.on('error', () => {});
      s.once('data', () => s.end(reply));
    });
    await new Promise<void>((res) => server.listen(0, '127.0.0.1', () => res()));
    return { port: (server.address() as net.AddressInfo).port, server, close: () => new Promise<void>((res) => server.close(() => res())) };
  }

  /** Sends `bytes`, reads until the backend's FIN, then hangs up; says which port it used. */
  async function exchange(port: number, bytes: Buffer): Promise<{ localPort: number; reply: string }> {
    const s = net.connect({ host: '127.0.0.1', port });
    await new Promise((res, rej) => s.once('connect', res).once('error', rej));
    const localPort = s.localPort!;
    let reply = '';
    s.on('data', (d: Buffer) => {
      reply += d.toString();
    });
    s.write(bytes);
    await new Promise((res) => s.once('end', res));
    s.end();
    await new Promise((res) => s.once('close', res));
    return { localPort, reply };
  }

  for (const limits of ['', 'max_conns_per_ip: 10\n']) {
    test(`a connection the backend ended is logged with the client's address and port${limits === '' ? '' : ' (per-IP limit on)'}`, async () => {
      const web = await hangingUp('web');
      const turn = await hangingUp('turn');
      const r = await startRouter(`${limits}log: { access: true }
fallback: { name: web, addr: "127.0.0.1:${web.port}" }
routes:
  - { match: cdn.example.com, backend: { name: turn, addr: "127.0.0.1:${turn.port}" } }
`);
      try {
        const routed = await exchange(r.port, buildHello({ sni: 'cdn.example.com' }));
        const fallback = await exchange(r.port, Buffer.from('GET / HTTP/1.0\r\n\r\n'));
        assert.deepEqual([routed.reply, fallback.reply], ['turn', 'web']);
        await waitFor(() => r.logs.filter((l) => l.msg === 'connection').length === 2, 3000, 'two access lines');
        for (const [c, route] of [[routed, 'cdn.example.com'], [fallback, 'fallback']] as const) {
          const line = r.logs.find((l) => l.msg === 'connection' && l.route === route);
          assert.equal(line?.client, '127.0.0.1', JSON.stringify(line));
          assert.equal(line.client_port, c.localPort);
          assert.equal(line.result, 'ok');
        }
      } finally {
        await r.stop();
        await web.close();
        await turn.close();
      }
    });
  }
});

describe('backends and limits', () => {
  test('a dial failure on the first of addrs falls over to the second, and the failed one cools down', async () => {
    const dead = await freePort();
    const turn = await tlsBackend('turn', turnCert);
    const r = await startRouter(`
fallback: { addr: "127.0.0.1:9" }
routes:
  - { match: cdn.example.com, backend: { name: turn, addrs: ["127.0.0.1:${dead}", "127.0.0.1:${turn.port}"] } }
`);
    try {
      assert.match((await tlsHello(r.port, 'cdn.example.com')).line, /^turn /);
      assert.equal(await r.metric('sni_router_backend_dial_failures_total', { backend: 'turn' }), 1);
      for (let i = 0; i < 3; i++) assert.match((await tlsHello(r.port, 'cdn.example.com')).line, /^turn /);
      // In cooldown the dead address is skipped: no new failures.
      assert.equal(await r.metric('sni_router_backend_dial_failures_total', { backend: 'turn' }), 1);
      const view = r.app.routesView() as { routes: Array<{ backend: { health: Array<{ healthy: boolean }> } }> };
      assert.deepEqual(view.routes[0].backend.health.map((h) => h.healthy), [false, true]);
    } finally {
      await r.stop();
      await turn.close();
    }
  });

  test('a backend named by host name is resolved at dial time, and a dead one falls over like an address', async () => {
    const dead = await freePort();
    const turn = await tlsBackend('turn', turnCert);
    const r = await startRouter(`
fallback: { addr: "localhost:${turn.port}" }
routes:
  - { match: cdn.example.com, backend: { name: turn, addrs: ["localhost:${dead}", "localhost:${turn.port}"] } }
`);
    try {
      assert.match((await tlsHello(r.port, 'cdn.example.com')).line, /^turn /);
      assert.equal(await r.metric('sni_router_backend_dial_failures_total', { backend: 'turn' }), 1);
      assert.match((await tlsHello(r.port, 'other.example.com')).line, /^turn /);
      await waitFor(async () => (await r.metric('sni_router_connections_total', { route: 'fallback', result: 'ok' })) === 1);
    } finally {
      await r.stop();
      await turn.close();
    }
  });

  test('a backend that never completes the dial is given up after backend_dial_timeout, and the next address is tried', async () => {
    // A loopback listener that never accepts, its backlog filled: further SYNs are dropped, so a
    // dial hangs until the router's timeout fires.
    const stuck = spawn('python3', ['-c', [
      'import socket, sys, time',
      's = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(0)',
      'print(s.getsockname()[1], flush=True)',
      'fill = []',
      'for _ in range(4):',
      '    c = socket.socket(); c.setblocking(False); c.connect_ex(s.getsockname()); fill.append(c)',
      'time.sleep(0.3)',
      'print("full", flush=True)',
      'time.sleep(60)',
    ].join('\n')], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    stuck.stdout.on('data', (d) => {
      out += d.toString();
    });
    const turn = await tlsBackend('turn', turnCert);
    try {
      await waitFor(() => out.includes('full'), 10_000, 'the stuck listener');
      const stuckPort = Number(out.split('\n')[0]);
      const r = await startRouter(`
backend_dial_timeout: 300ms
fallback: { addr: "127.0.0.1:9" }
routes:
  - { match: cdn.example.com, backend: { name: turn, addrs: ["127.0.0.1:${stuckPort}", "127.0.0.1:${turn.port}"] } }
`);
      try {
        const t0 = Date.now();
        assert.match((await tlsHello(r.port, 'cdn.example.com')).line, /^turn /);
        const took = Date.now() - t0;
        assert.ok(took >= 250, `took ${took} ms: the first address cannot have been tried`);
        assert.equal(await r.metric('sni_router_backend_dial_failures_total', { backend: 'turn' }), 1);
        assert.ok(r.logs.some((l) => l.msg === 'backend dial failed' && l.err === 'ETIMEDOUT'));
      } finally {
        await r.stop();
      }
    } finally {
      stuck.kill('SIGKILL');
      await turn.close();
    }
  });

  test('over max_concurrent_conns new connections close at once and existing ones keep working', async () => {
    const turn = await tlsBackend('turn', turnCert);
    const r = await startRouter(`
max_concurrent_conns: 3
fallback: { addr: "127.0.0.1:${turn.port}" }
`);
    // With workers each one enforces its share, ceil(3 / workers), and the kernel picks the worker
    // of each connection: the limit bites after between one share and workers × share (exactly 3
    // with one process).
    const share = Math.ceil(3 / r.workers);
    const tls = await import('node:tls');
    const held: import('node:tls').TLSSocket[] = [];
    let refused: { bytes: number } | null = null;
    try {
      for (let i = 0; i <= share * r.workers && refused === null; i++) {
        // Over a socket of our own, whose bytesRead counts what arrived before TLS saw it.
        const raw = net.connect({ host: '127.0.0.1', port: r.port });
        const s = tls.connect({ socket: raw, servername: 'cdn.example.com', rejectUnauthorized: false });
        s.on('error', () => {});
        const got = await new Promise<boolean>((res) => {
          s.once('data', () => res(true));
          s.once('close', () => res(false));
        });
        if (got) held.push(s);
        else refused = { bytes: raw.bytesRead };
      }
      assert.ok(refused !== null, `no connection was refused after ${held.length}`);
      assert.equal(refused.bytes, 0, 'closed without a byte');
      assert.ok(held.length >= share && held.length <= share * r.workers, `${held.length} held before the limit bit`);
      assert.equal(await r.metric('sni_router_connection_limit_rejections_total', { scope: 'global' }), 1);
      for (const s of held) {
        const echoed = new Promise<string>((res) => s.once('data', (d) => res(d.toString())));
        s.write('still here');
        assert.equal(await echoed, 'still here');
      }
      assert.ok(r.logs.some((l) => l.msg === 'connection limit reached' && l.level === 'warn'));
    } finally {
      for (const s of held) s.destroy();
      await r.stop();
      await turn.close();
    }
  });

  test('max_conns_per_ip limits one address; the per-IP table empties as connections close', async () => {
    const rec = await recordingBackend();
    const r = await startRouter(`max_conns_per_ip: 2\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    // With workers the limit holds per worker, and the kernel spreads one address's connections
    // over them: it bites after between 2 and 2 × workers (exactly 2 with one process).
    const socks: net.Socket[] = [];
    let accepted = 0;
    let refused = false;
    try {
      for (let i = 0; i <= 2 * r.workers && !refused; i++) {
        const s = net.connect({ host: '127.0.0.1', port: r.port });
        s.on('error', () => {});
        socks.push(s);
        await new Promise((res) => s.on('connect', res));
        s.write('GET / HTTP/1.0\r\n\r\n');
        refused = await new Promise<boolean>((res) => {
          s.once('close', () => res(true));
          rec.waitConns(accepted + 1).then(() => res(false), () => {});
        });
        if (!refused) accepted++;
        else assert.equal(s.bytesRead, 0, 'closed without a byte');
      }
      assert.ok(refused, `no connection was refused after ${accepted}`);
      assert.ok(accepted >= 2 && accepted <= 2 * r.workers, `${accepted} accepted before the limit bit`);
      assert.equal(await r.metric('sni_router_connection_limit_rejections_total', { scope: 'per_ip' }), 1);
      // Another loopback address is another client.
      const other = net.connect({ host: '127.0.0.1', port: r.port, localAddress: '127.0.0.2' });
      await new Promise((res) => other.on('connect', res));
      other.write('GET / HTTP/1.0\r\n\r\n');
      await rec.waitConns(accepted + 1);
      other.destroy();
      for (const s of socks) s.destroy();
      await waitFor(async () => (await r.activeConnections()) === 0);
      assert.equal(await r.trackedClientAddresses(), 0);
    } finally {
      for (const s of socks) s.destroy();
      await r.stop();
      await rec.close();
    }
  });

  test('a thousand clients trickling a byte a second do not starve real ones, and time out to the fallback', async () => {
    const rec = await recordingBackend();
    const turn = await tlsBackend('turn', turnCert);
    const r = await startRouter(`
client_hello_timeout: 2s
fallback: { addr: "127.0.0.1:${rec.port}" }
routes:
  - { match: cdn.example.com, backend: { name: turn, addr: "127.0.0.1:${turn.port}" } }
`);
    const tricklers: net.Socket[] = [];
    const hello = chromiumHttps();
    let timer: NodeJS.Timeout | null = null;
    try {
      for (let i = 0; i < 1000; i++) {
        const s = net.connect({ host: '127.0.0.1', port: r.port, noDelay: true });
        s.on('error', () => {});
        tricklers.push(s);
      }
      let sent = 0;
      const trickle = () => {
        for (const s of tricklers) if (!s.destroyed) s.write(hello.subarray(sent, sent + 1));
        sent++;
      };
      trickle();
      timer = setInterval(trickle, 1000);
      await waitFor(async () => (await r.activeConnections()) >= 1000, 10_000, 'tricklers accepted');
      const t0 = Date.now();
      for (let i = 0; i < 5; i++) assert.match((await tlsHello(r.port, 'cdn.example.com')).line, /^turn /);
      assert.ok(Date.now() - t0 < 3000, `real clients took ${Date.now() - t0} ms`);
      // After client_hello_timeout every trickler is handed to the fallback with the bytes it sent.
      await waitFor(() => rec.conns.length >= 1000, 15_000, 'tricklers forwarded to the fallback');
      assert.ok(rec.conns.every((c) => hello.subarray(0, c.bytes.length).equals(c.bytes)));
    } finally {
      if (timer) clearInterval(timer);
      for (const s of tricklers) s.destroy();
      await r.stop();
      await rec.close();
      await turn.close();
    }
  });

  test('idle_timeout closes a relay with no traffic either way', async () => {
    const rec = await recordingBackend();
    const r = await startRouter(`idle_timeout: 300ms\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    try {
      const t0 = Date.now();
      await rawExchange(r.port, [Buffer.from('GET / HTTP/1.0\r\n\r\n')], { end: false, timeoutMs: 5000 });
      const took = Date.now() - t0;
      assert.ok(took >= 250 && took < 3000, `closed after ${took} ms`);
      await waitFor(async () => (await r.metric('sni_router_connections_total', { result: 'idle_timeout' })) === 1);
    } finally {
      await r.stop();
      await rec.close();
    }
  });

  test('idle_timeout closes every idle relay among many, none of those that keep talking, and those once they stop or hang up', async () => {
    const rec = await recordingBackend();
    const r = await startRouter(`idle_timeout: 400ms\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    const sockets: net.Socket[] = [];
    const closed = new Set<number>();
    let ticker: NodeJS.Timeout | undefined;
    try {
      // 30 relays; every third keeps sending, so the sweep closes relays on both sides of live ones.
      for (let i = 0; i < 30; i++) {
        const s = net.connect({ host: '127.0.0.1', port: r.port });
        s.on('error', () => {});
        s.on('close', () => closed.add(i));
        s.write(`GET /${i} HTTP/1.0\r\n`);
        sockets.push(s);
      }
      await rec.waitConns(30);
      const talking = (i: number) => i % 3 === 0;
      ticker = setInterval(() => {
        for (let i = 0; i < 30; i++) if (talking(i) && !closed.has(i)) sockets[i].write('x');
      }, 100);
      await waitFor(() => closed.size >= 20, 5000, '20 idle relays closed');
      await sleep(600); // more than a sweep past the idle ones: a live relay closed by mistake shows
      for (let i = 0; i < 30; i++) assert.equal(closed.has(i), !talking(i), `relay ${i} ${closed.has(i) ? 'closed' : 'open'}`);
      assert.equal(await r.metric('sni_router_connections_total', { result: 'idle_timeout' }), 20);
      assert.equal(await r.activeConnections(), 10);
      // Then half the talkers hang up (in an order unlike the router's) and the others fall
      // silent: each is still swept, and the router's list of open connections ends empty.
      clearInterval(ticker);
      for (let i = 0; i < 30; i += 6) sockets[i].destroy();
      await waitFor(() => closed.size === 30, 5000, 'every relay closed');
      await waitFor(async () => (await r.metric('sni_router_connections_total', { result: 'idle_timeout' })) === 25);
      await waitFor(async () => (await r.activeConnections()) === 0, 5000, 'no open connection left');
    } finally {
      clearInterval(ticker);
      for (const s of sockets) s.destroy();
      await r.stop();
      await rec.close();
    }
  });

  test('an idle_timeout set by a reload applies to relays already open', async () => {
    const rec = await recordingBackend();
    const dir = mkdtempSync(join(tmpdir(), 'sni-router-idle-'));
    const file = join(dir, 'config.yaml');
    const yaml = (idle: string) => `listen: "127.0.0.1:0"\nadmin: { listen: "127.0.0.1:0" }\nidle_timeout: ${idle}\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`;
    writeFileSync(file, yaml('0'));
    const r = await startRouter(yaml('0'), { file });
    try {
      const closed = rawExchange(r.port, [Buffer.from('GET / HTTP/1.0\r\n\r\n')], { end: false, timeoutMs: 8000 });
      await waitFor(async () => (await r.metric('sni_router_active_connections')) === 1);
      await new Promise((resolve) => setTimeout(resolve, 400));
      assert.equal(await r.metric('sni_router_active_connections'), 1, 'no idle_timeout yet: the relay stays open');
      writeFileSync(file, yaml('300ms'));
      assert.equal(await r.app.reload(), true);
      const t0 = Date.now();
      await closed;
      const took = Date.now() - t0;
      assert.ok(took < 3000, `closed ${took} ms after the reload`);
      await waitFor(async () => (await r.metric('sni_router_connections_total', { result: 'idle_timeout' })) === 1);
    } finally {
      await r.stop();
      await rec.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('live table replacement', () => {
  test('1,000 connections in flight while the table is replaced 100 times: none breaks, new ones follow the new table', async () => {
    const a = await recordingBackend({ reply: 'A' });
    const b = await recordingBackend({ reply: 'B' });
    const fb = await recordingBackend({ reply: 'F' });
    const r = await startRouter(`
max_concurrent_conns: 5000
fallback: { addr: "127.0.0.1:${fb.port}" }
routes:
  - { match: live.example.com, backend: { name: a, addr: "127.0.0.1:${a.port}" } }
`);
    const tableFor = (port: number, name: string) => {
      const c = parseConfig(`fallback: { addr: "127.0.0.1:${fb.port}" }\nroutes:\n  - { match: live.example.com, backend: { name: ${name}, addr: "127.0.0.1:${port}" } }\n`, 't.yaml');
      return new RouteTable(c.routes, c.fallback);
    };
    const socks: net.Socket[] = [];
    try {
      // Let the composer's first coalesced apply land before replacing the table directly.
      await sleep(100);
      const gen0 = r.app.router.generation;
      const hello = buildHello({ sni: 'live.example.com' });
      const greetings: string[] = new Array(1000).fill('');
      let replaced = 0;
      const replacer = setInterval(() => {
        if (replaced < 100) {
          replaced++;
          r.app.router.replace(replaced % 2 ? tableFor(b.port, 'b') : tableFor(a.port, 'a'));
        }
      }, 5);
      await Promise.all([...Array(1000).keys()].map(async (i) => {
        const s = net.connect({ host: '127.0.0.1', port: r.port });
        socks.push(s);
        s.on('error', (err) => assert.fail(`connection ${i} broke: ${err.message}`));
        s.on('data', (d) => {
          greetings[i] += d.toString();
        });
        await new Promise((res) => s.on('connect', res));
        s.write(hello);
      }));
      await waitFor(() => greetings.every((g) => g.length >= 1), 20_000, 'every connection greeted');
      await waitFor(() => replaced === 100, 5000);
      clearInterval(replacer);
      assert.ok(greetings.every((g) => g === 'A' || g === 'B'), 'every connection reached a route backend');
      // Every connection is still alive and relays both ways.
      const backends = [...a.conns, ...b.conns];
      assert.equal(backends.length, 1000);
      for (const c of backends) c.socket.write('ping');
      await waitFor(() => greetings.every((g) => g.endsWith('ping')), 10_000, 'relay after the churn');
      assert.ok(socks.every((s) => !s.destroyed));
      // After the last replace (even count → a), new connections follow the new table.
      r.app.router.replace(tableFor(b.port, 'b'));
      const reply = await rawExchange(r.port, [hello], { end: false, timeoutMs: 500 });
      assert.equal(reply.toString(), 'B');
      assert.equal(r.app.router.generation, gen0 + 100 + 1);
    } finally {
      for (const s of socks) s.destroy();
      await r.stop();
      await a.close();
      await b.close();
      await fb.close();
    }
  });
});
