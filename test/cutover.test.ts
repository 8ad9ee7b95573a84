// The cutover of the runbook (docs/operations.md) with a real Caddy: Caddy moved to its https_port
// behind the router, with the Caddyfile the compose stack ships (deploy/compose/Caddyfile, ports
// moved to free ones). Browsers and probers see Caddy exactly as before, TURN clients reach TURN,
// http:// still redirects to https:// without Caddy's new port, ACME TLS-ALPN-01 connections reach
// Caddy, and the cert watcher picks up the certificate Caddy issued and signals the TURN server
// through a pid file.
import assert from 'node:assert/strict';
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import tls from 'node:tls';
import { promisify } from 'node:util';
import { type RunningRouter, makeCert, metricValue, startRouter, tempDir, tlsBackend, tlsHello, waitFor } from './helpers.ts';
import { requireTools, toolPath } from './support/tools.ts';

const ROOT = join(import.meta.dirname, '..');
const NODE = join(ROOT, 'node_modules', '.bin', 'node');
const run = promisify(execFile);

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

async function curl(args: string[]): Promise<{ code: number; out: string }> {
  try {
    const { stdout } = await run('curl', ['-sS', '--max-time', '10', ...args], { timeout: 15_000 });
    return { code: 0, out: stdout };
  } catch (err) {
    const e = err as { code?: number; stdout?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, out: e.stdout ?? '' };
  }
}

function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

describe('cutover with a real Caddy behind the router', () => {
  const { dir, cleanup } = tempDir('sni-router-cutover-');
  const children: ChildProcess[] = [];
  const closers: Array<() => Promise<void>> = [];
  let available = true;
  let httpsPort = 0;
  let httpPort = 0;
  let caddyLog = '';
  let issued = '';
  let storage = '';
  let turnPort = 0;
  let turnOut = '';
  let turnPid = 0;
  let router: RunningRouter;

  before(async () => {
    if (toolPath('caddy') === null || toolPath('curl') === null) {
      available = false;
      return;
    }
    // Caddy with the compose Caddyfile; only its ports, admin address and data directory move.
    httpsPort = await freePort();
    httpPort = await freePort();
    const adminPort = await freePort();
    const shipped = readFileSync(join(ROOT, 'deploy', 'compose', 'Caddyfile'), 'utf8');
    assert.match(shipped, /^\thttps_port 8443$/m);
    const caddyfile = shipped
      .replace(/^\thttps_port 8443$/m, `\thttps_port ${httpsPort}\n\thttp_port ${httpPort}\n\tadmin 127.0.0.1:${adminPort}\n\tdefault_bind 127.0.0.1`);
    writeFileSync(join(dir, 'Caddyfile'), caddyfile);
    const caddyEnv = { ...process.env, HOME: dir, XDG_DATA_HOME: join(dir, 'data'), XDG_CONFIG_HOME: join(dir, 'config') };
    const caddy = spawn('caddy', ['run', '--config', join(dir, 'Caddyfile'), '--adapter', 'caddyfile'], {
      env: caddyEnv, stdio: ['ignore', 'ignore', 'pipe'],
    });
    children.push(caddy);
    caddy.stderr!.on('data', (d: Buffer) => {
      caddyLog = (caddyLog + d.toString()).slice(-20_000);
    });
    storage = join(dir, 'data', 'caddy');
    issued = join(storage, 'certificates', 'local', 'cdn.example.com', 'cdn.example.com.crt');
    await waitFor(() => existsSync(issued) || caddy.exitCode !== null, 20_000, `Caddy to issue cdn.example.com\n${caddyLog}`);
    assert.equal(caddy.exitCode, null, caddyLog);

    // The TURN server: a TLS echo, and a process that stands for it in the pid file.
    const turn = await tlsBackend('turn', makeCert(dir, 'cdn.example.com'));
    closers.push(() => turn.close());
    turnPort = turn.port;
    const turnProcess = spawn(NODE, ['-e', "process.on('SIGUSR2', () => console.log('SIGUSR2')); console.log('ready'); setInterval(() => {}, 1000);"], {
      stdio: ['ignore', 'pipe', 'ignore'],
    });
    children.push(turnProcess);
    turnProcess.stdout!.on('data', (d: Buffer) => {
      turnOut += d.toString();
    });
    // The router acts at start when Caddy's certificate is already there: a signal that came
    // before the handler would kill the stand-in instead of being counted.
    await waitFor(() => turnOut.includes('ready'), 10_000, 'the TURN stand-in to install its SIGUSR2 handler');
    turnPid = turnProcess.pid!;
    writeFileSync(join(dir, 'turnserver.pid'), `${turnPid}\n`);

    router = await startRouter(`
client_hello_timeout: 2s
fallback: { name: caddy, addr: "127.0.0.1:${httpsPort}" }
routes:
  - match: cdn.example.com
    alpn: none
    backend: { name: turn-tls, addr: "127.0.0.1:${turnPort}" }
certwatch:
  - name: cdn
    domain: cdn.example.com
    caddy_storage: ${storage}
    copy_to: { dir: ${join(dir, 'turn-certs')}, mode: "0640" }
    on_change:
      signal: { pid_file: ${join(dir, 'turnserver.pid')}, signal: SIGUSR2 }
`);
    closers.push(() => router.stop());
  });

  after(async () => {
    for (const close of closers.reverse()) await close();
    await Promise.all(children.map(stop));
    cleanup();
  });

  test('browsers get Caddy\'s site for any name, TURN clients reach TURN, probers see what Caddy shows', async (t) => {
    if (!available && !requireTools(t, 'caddy', 'curl')) return;
    const rp = router.port;
    // Browsers (ALPN h2, http/1.1) get Caddy's site, for any name, the TURN name included.
    for (const name of ['www.example.com', 'cdn.example.com']) {
      const r = await curl(['-k', '--resolve', `${name}:${rp}:127.0.0.1`, `https://${name}:${rp}/`]);
      assert.equal(r.code, 0, `${name}\n${caddyLog}`);
      assert.match(r.out, new RegExp(`<h1>${name.replace(/\./g, '\\.')}</h1>`));
    }
    // A TURN client (no ALPN) reaches TURN.
    const hello = await tlsHello(rp, 'cdn.example.com');
    assert.equal(hello.line, 'turn alpn=none sni=cdn.example.com');

    // A prober by address (no SNI) sees what Caddy itself shows: same outcome, same body.
    const viaRouter = await curl(['-k', `https://127.0.0.1:${rp}/`]);
    const direct = await curl(['-k', `https://127.0.0.1:${httpsPort}/`]);
    assert.deepEqual(viaRouter, direct);
  });

  test('http:// still redirects to https:// on the standard port, not to Caddy\'s https_port', async (t) => {
    if (!available && !requireTools(t, 'caddy', 'curl')) return;
    const redirect = await curl(['-o', '/dev/null', '-w', '%{http_code} %{redirect_url}', '-H', 'Host: www.example.com', `http://127.0.0.1:${httpPort}/a?b=c`]);
    assert.equal(redirect.out, '301 https://www.example.com/a?b=c');
  });

  test('an ACME TLS-ALPN-01 hello for the TURN name reaches Caddy, not TURN', async (t) => {
    if (!available && !requireTools(t, 'caddy', 'curl')) return;
    const count = async (route: string) => metricValue(await router.metricsText(), 'sni_router_connections_total', { route });
    const turnBefore = await count('cdn.example.com');
    const fallbackBefore = await count('fallback');
    await new Promise<void>((resolve) => {
      const s = tls.connect({ host: '127.0.0.1', port: router.port, servername: 'cdn.example.com', ALPNProtocols: ['acme-tls/1'], rejectUnauthorized: false });
      s.on('secureConnect', () => s.end());
      s.on('error', () => resolve()); // Caddy has no challenge open, so it may refuse the handshake
      s.on('close', () => resolve());
    });
    await waitFor(async () => (await count('fallback')) > fallbackBefore);
    assert.equal(await count('cdn.example.com'), turnBefore);
  });

  test('the cert watcher deploys the certificate Caddy issued and signals the TURN server through its pid file', async (t) => {
    if (!available && !requireTools(t, 'caddy', 'curl')) return;
    const certLog = () => router.logs.filter((l) => /cert/i.test(JSON.stringify(l))).slice(-20).map((l) => JSON.stringify(l)).join('\n') || `(none among ${router.logs.length} lines)`;
    await waitFor(() => turnOut.includes('SIGUSR2'), 20_000, `pid ${turnPid} to get SIGUSR2`).catch((err: Error) => {
      throw new Error(`${err.message}; the router's cert log:\n${certLog()}`);
    });
    const certDir = join(dir, 'turn-certs');
    assert.deepEqual(readFileSync(join(certDir, 'cdn.crt')), readFileSync(issued));
    assert.equal(statSync(join(certDir, 'cdn.key')).mode & 0o777, 0o640);
    const text = await router.metricsText();
    assert.equal(metricValue(text, 'sni_router_cert_reloads_total', { cert: 'cdn', result: 'ok' }), 1);
    assert.ok(metricValue(text, 'sni_router_cert_not_after_timestamp_seconds', { cert: 'cdn' }) > Date.now() / 1000);
  });
});
