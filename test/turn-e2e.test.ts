// Real TURN clients through the router: coturn's turnutils_uclient (TURN over TLS, no SNI) and
// headless Chromium's WebRTC (turns: with SNI and no ALPN) allocate relays on a real coturn that
// sits behind the router, and the router's metrics, access log and coturn's own log agree on where
// every connection went.
//
// coturn, turnutils_uclient, turnutils_peer and chromium are Debian packages. Outside CI a missing
// one skips the tests that need it; in CI (CI=true) it fails them.
import assert from 'node:assert/strict';
import https from 'node:https';
import type net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { type CertPair, makeCert, startRouter, tempDir, tlsBackend, waitFor } from './helpers.ts';
import {
  CHROMIUM, type Coturn, type GatherReport, gatherWithChromium, runUclient, spkiHash, startCoturn, startTurnPeer, toolGate,
} from './support/turn.ts';

const COTURN_TOOLS = ['turnserver'];
const uclientGate = toolGate([...COTURN_TOOLS, 'turnutils_uclient', 'turnutils_peer']);
const chromiumGate = toolGate([...COTURN_TOOLS, CHROMIUM]);

// One coturn for the file; each test uses a user of its own, so coturn's log tells whose
// allocation is whose.
const USERS = { uclient: 'uclient-secret', chromium: 'chromium-secret', pinned: 'pinned-secret' };

let dir: string;
let cleanupDir: () => void = () => {};
let turnCert: CertPair;
let caddyCert: CertPair;
let coturn: Coturn | null = null;

before(async () => {
  if (uclientGate.skip !== false && chromiumGate.skip !== false) return; // both skipped
  ({ dir, cleanup: cleanupDir } = tempDir('sni-router-turn-e2e-'));
  turnCert = makeCert(dir, 'cdn.example.com');
  // The fallback (Caddy's stand-in) has a key of its own: a client that reached it instead of
  // coturn would see a different certificate.
  caddyCert = makeCert(dir, 'caddy.example.com', ['cdn.example.com', 'caddy.example.com']);
  toolGate(COTURN_TOOLS).check();
  coturn = await startCoturn({ certFile: turnCert.certFile, keyFile: turnCert.keyFile, users: USERS, dir, startMs: 30_000 });
});

after(async () => {
  await coturn?.stop();
  cleanupDir();
});

/** Lines of the router's access log ("connection"), once `n` of them match `pick`. */
async function accessLines(
  logs: Array<Record<string, unknown>>, pick: (l: Record<string, unknown>) => boolean, n: number, what: string,
): Promise<Array<Record<string, unknown>>> {
  const lines = () => logs.filter((l) => l.msg === 'connection' && pick(l));
  try {
    await waitFor(() => lines().length >= n, 15_000, what);
  } catch (err) {
    const seen = logs.filter((l) => l.msg === 'connection').map((l) => JSON.stringify(l)).join('\n');
    throw new Error(`${(err as Error).message}; access log so far:\n${seen}`);
  }
  return lines();
}

/** The relay candidates of a report, as { line, address, port }. */
function relayCandidates(report: GatherReport): Array<{ line: string; address: string; port: number }> {
  const out = [];
  for (const line of report.candidates) {
    // candidate:<foundation> <component> <protocol> <priority> <address> <port> typ <type> ...
    const f = line.split(' ');
    if (f[6] === 'typ' && f[7] === 'relay') out.push({ line, address: f[4], port: Number(f[5]) });
  }
  return out;
}

function describeReport(report: GatherReport): string {
  return JSON.stringify(report, null, 2);
}

describe('real TURN clients through the router', () => {
  test('turnutils_uclient (TURN over TLS, no SNI) allocates and relays every packet when no-SNI goes to coturn', {
    skip: uclientGate.skip, timeout: 90_000,
  }, async (t) => {
    uclientGate.check();
    // A route for the TURN name to another backend: a hello without SNI must not match it.
    const decoy = await tlsBackend('decoy', caddyCert);
    t.after(() => decoy.close());
    const peer = await startTurnPeer();
    t.after(() => peer.stop());
    const r = await startRouter(`
log: { access: true }
fallback: { name: coturn, addr: "127.0.0.1:${coturn!.tlsPort}" }
routes:
  - match: cdn.example.com
    backend: { name: decoy, addr: "127.0.0.1:${decoy.port}" }
`);
    t.after(() => r.stop());

    const messages = 20;
    const clients = 2;
    const res = await runUclient({
      port: r.port, user: 'uclient', password: USERS.uclient, peerPort: peer.port, messages, clients, timeoutMs: 60_000,
    });
    const summary = res.output.split('\n').filter((l) => /tot_send_msgs=\d+, tot_recv_msgs|Total lost|round trip/.test(l)).slice(-4).join('\n');
    assert.equal(res.exitCode, 0, `turnutils_uclient exit code\n${res.output.slice(-3000)}`);
    assert.equal(res.sent, messages * clients, `packets sent\n${summary}`);
    assert.equal(res.received, messages * clients, `packets received back through the relay\n${summary}`);
    assert.equal(res.lost, 0, `packets lost\n${summary}`);

    // coturn saw these sessions allocate, and relayed every packet to the peer and back.
    const usage = new RegExp(
      `peer usage: realm=<example\\.com>, username=<uclient>, rp=${messages}, rb=${messages * 100}, sp=${messages}, sb=${messages * 100}`, 'g');
    await waitFor(() => [...coturn!.log().matchAll(usage)].length >= clients, 15_000, `coturn to log ${clients} sessions' peer usage`)
      .catch((err: Error) => assert.fail(`${err.message}\n${coturn!.log().split('\n').filter((l) => l.includes('uclient')).join('\n')}`));
    // (uclient makes a second, idle allocation per client: at least one each.)
    const allocations = coturn!.log().match(/user <uclient>: incoming packet ALLOCATE processed, success/g) ?? [];
    assert.ok(allocations.length >= clients, `coturn allocations for user uclient: ${allocations.length}`);

    // The router sent them there as no-SNI hellos, via the fallback. (uclient does offer ALPN:
    // http/1.1, stun.turn, stun.nat-discovery. It also first tries TLS 1.0/1.1, which coturn
    // refuses with an alert, so there are more connections than sessions.)
    const relayed = await accessLines(r.logs, (l) => (l.bytes_up as number) > messages * 100 && (l.bytes_down as number) > messages * 100,
      clients, `${clients} access log lines carrying the relayed packets`);
    for (const l of r.logs.filter((x) => x.msg === 'connection')) {
      assert.equal(l.sni, null, `uclient sends no SNI: ${JSON.stringify(l)}`);
      assert.equal(l.route, 'fallback', JSON.stringify(l));
      assert.equal(l.backend, 'coturn', JSON.stringify(l));
    }
    assert.ok(relayed.length >= clients);
    assert.ok(await r.metric('sni_router_connections_total', { route: 'fallback' }) >= clients);
    assert.equal(await r.metric('sni_router_connections_total', { route: 'cdn.example.com' }), 0, 'nothing matched the cdn route');
    assert.ok(await r.metric('sni_router_backend_dial_duration_seconds_count', { backend: 'coturn' }) >= clients);
    assert.equal(await r.metric('sni_router_backend_dial_duration_seconds_count', { backend: 'decoy' }), 0, 'the decoy was never dialled');
    assert.ok(await r.metric('sni_router_bytes_total', { backend: 'coturn', direction: 'upstream' }) > messages * clients * 100);
    assert.ok(await r.metric('sni_router_bytes_total', { backend: 'coturn', direction: 'downstream' }) > messages * clients * 100);
    assert.equal(await r.metric('sni_router_client_hello_failures_total'), 0, 'every uclient hello parsed');
  });

  test('Chromium WebRTC gathers a relay candidate via turns: with alpn: none, while its HTTPS to the same name reaches the fallback', {
    skip: chromiumGate.skip, timeout: 90_000,
  }, async (t) => {
    chromiumGate.check();
    const caddy = await httpsFallback(caddyCert);
    t.after(() => caddy.close());
    const r = await startRouter(`
log: { access: true }
fallback: { name: caddy, addr: "127.0.0.1:${caddy.port}" }
routes:
  - match: cdn.example.com
    alpn: none
    backend: { name: coturn, addr: "127.0.0.1:${coturn!.tlsPort}" }
`);
    t.after(() => r.stop());

    const { report } = await gatherWithChromium({
      turnUrl: `turns:cdn.example.com:${r.port}?transport=tcp`,
      username: 'chromium',
      credential: USERS.chromium,
      probeUrl: `https://cdn.example.com:${r.port}/`,
      args: ['--host-resolver-rules=MAP cdn.example.com 127.0.0.1', '--ignore-certificate-errors'],
    });

    // The browser's HTTPS request offered ALPN, so the same name on the same port reached Caddy.
    assert.ok(report.probe !== null && 'body' in report.probe, `HTTPS probe failed: ${describeReport(report)}`);
    assert.match(report.probe.body, /^caddy sni=cdn\.example\.com alpn=/);

    // WebRTC's TURN client offered none, so it reached coturn and allocated a relay.
    const relays = relayCandidates(report);
    assert.ok(relays.length >= 1, `no relay candidate: ${describeReport(report)}`);
    for (const c of relays) {
      assert.equal(c.address, '127.0.0.1', c.line);
      // The relay port in the candidate is one that this coturn allocated.
      await coturn!.waitForLog(new RegExp(`Local relay addr: 127\\.0\\.0\\.1:${c.port}\\b`));
    }
    await coturn!.waitForLog(/user <chromium>: incoming packet ALLOCATE processed, success/);

    const turnLines = await accessLines(r.logs, (l) => l.route === 'cdn.example.com', 1, 'access log line for the cdn route');
    for (const l of turnLines) {
      assert.equal(l.sni, 'cdn.example.com');
      assert.equal(l.alpn, null, 'Chromium\'s TURN client offers no ALPN');
      assert.equal(l.backend, 'coturn');
    }
    const webLines = await accessLines(r.logs, (l) => l.backend === 'caddy', 1, 'access log line for the fallback');
    assert.equal(webLines[0].sni, 'cdn.example.com');
    assert.ok(Array.isArray(webLines[0].alpn) && (webLines[0].alpn as string[]).includes('http/1.1'), JSON.stringify(webLines[0]));
    assert.ok(await r.metric('sni_router_connections_total', { route: 'cdn.example.com' }) >= 1);
    assert.ok(await r.metric('sni_router_connections_total', { route: 'fallback' }) >= 1);
    assert.equal(await r.metric('sni_router_client_hello_failures_total'), 0, 'every Chromium hello parsed');
  });

  test('Chromium that validates the TURN certificate gets a relay only with coturn\'s key: the TLS session ends at coturn, not the router', {
    skip: chromiumGate.skip, timeout: 90_000,
  }, async (t) => {
    chromiumGate.check();
    const caddy = await httpsFallback(caddyCert);
    t.after(() => caddy.close());
    const r = await startRouter(`
fallback: { name: caddy, addr: "127.0.0.1:${caddy.port}" }
routes:
  - match: cdn.example.com
    alpn: none
    backend: { name: coturn, addr: "127.0.0.1:${coturn!.tlsPort}" }
`);
    t.after(() => r.stop());
    const gather = (trusted: CertPair) => gatherWithChromium({
      turnUrl: `turns:cdn.example.com:${r.port}?transport=tcp`,
      username: 'pinned',
      credential: USERS.pinned,
      // Trusts exactly one key, instead of --ignore-certificate-errors' anything.
      args: ['--host-resolver-rules=MAP cdn.example.com 127.0.0.1', `--ignore-certificate-errors-spki-list=${spkiHash(trusted.cert)}`],
    });

    const withCoturnKey = (await gather(turnCert)).report;
    assert.ok(relayCandidates(withCoturnKey).length >= 1, `no relay candidate with coturn's key trusted: ${describeReport(withCoturnKey)}`);
    await coturn!.waitForLog(/user <pinned>: incoming packet ALLOCATE processed, success/);

    // Control: the same route trusting another key gets no relay, so Chromium really checks.
    const withOtherKey = (await gather(caddyCert)).report;
    assert.equal(relayCandidates(withOtherKey).length, 0, `relay candidate despite an untrusted certificate: ${describeReport(withOtherKey)}`);
    assert.ok(withOtherKey.errors.some((e) => e.code === 701), describeReport(withOtherKey));
  });
});

/**
 * Caddy's stand-in: HTTPS answering "caddy sni=<servername> alpn=<negotiated>" to any origin,
 * closing each connection after the response so the router counts it.
 */
async function httpsFallback(pair: CertPair): Promise<{ port: number; close(): Promise<void> }> {
  const server = https.createServer({ cert: pair.cert, key: pair.key }, (req, res) => {
    const s = req.socket as net.Socket & { servername?: string; alpnProtocol?: string | false };
    res.writeHead(200, { 'content-type': 'text/plain', 'access-control-allow-origin': '*', connection: 'close' });
    res.end(`caddy sni=${s.servername || 'none'} alpn=${s.alpnProtocol || 'none'}\n`);
  });
  server.on('tlsClientError', () => {});
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: () => new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    }),
  };
}
