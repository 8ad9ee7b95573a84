// `npm start`: the demo starts, prints commands a newcomer can paste, the commands work as
// printed (curl reaches the web page, openssl s_client without ALPN reaches the turn echo, the
// admin port answers), and Ctrl-C stops it cleanly.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { waitFor } from './helpers.ts';
import { requireTools } from './support/tools.ts';

const ROOT = join(import.meta.dirname, '..');
const NODE = join(ROOT, 'node_modules', '.bin', 'node');

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

/** Runs one pasted command line in a shell, the way a terminal would. */
function runShell(cmd: string, opts: { input?: string; untilOut?: RegExp; timeoutMs?: number } = {}): Promise<{ out: string; err: string; code: number | null }> {
  return new Promise((resolve, reject) => {
    const child = spawn('sh', ['-c', cmd], { cwd: ROOT, detached: true, stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let done = false;
    const finish = (code: number | null) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      resolve({ out, err, code });
    };
    const killGroup = () => {
      try {
        process.kill(-child.pid!, 'SIGTERM');
      } catch {
        // already gone
      }
    };
    const timer = setTimeout(() => {
      killGroup();
      reject(new Error(`"${cmd}" did not finish in time; stdout so far: ${out}\nstderr: ${err}`));
    }, opts.timeoutMs ?? 15_000);
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      // Interactive commands (s_client) run until told to stop, as a user would press Ctrl-C.
      if (opts.untilOut !== undefined && opts.untilOut.test(out)) {
        killGroup();
        finish(null);
      }
    });
    child.stderr.on('data', (d: Buffer) => {
      err += d.toString();
    });
    child.on('error', reject);
    child.on('close', (code) => finish(code));
    if (opts.input !== undefined) child.stdin.write(opts.input);
    if (opts.untilOut === undefined) child.stdin.end();
  });
}

test('npm start runs the demo: its printed commands reach the web page and the turn echo, and Ctrl-C stops it with exit 0', async (t) => {
  if (!requireTools(t, 'curl', 'openssl')) return;
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> };
  // `npm start` is exactly this command; it is run with the pinned Node (npm puts node_modules/.bin
  // first on PATH), without npm in between so that the demo's own exit code is seen.
  assert.equal(pkg.scripts.start, 'node src/demo.ts');

  const routerPort = await freePort();
  const adminPort = await freePort();
  const demo: ChildProcess = spawn(NODE, ['src/demo.ts'], {
    cwd: ROOT,
    env: { ...process.env, DEMO_PORT: String(routerPort), DEMO_ADMIN_PORT: String(adminPort) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  demo.stdout!.on('data', (d: Buffer) => {
    stdout += d.toString();
  });
  demo.stderr!.on('data', (d: Buffer) => {
    stderr += d.toString();
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    demo.on('exit', (code, signal) => resolve({ code, signal }));
  });
  t.after(() => {
    if (demo.exitCode === null && demo.signalCode === null) demo.kill('SIGKILL');
  });

  await waitFor(() => stdout.includes('Ctrl-C') || demo.exitCode !== null, 20_000, 'the demo to print its instructions');
  assert.equal(demo.exitCode, null, `the demo exited early:\n${stdout}\n${stderr}`);

  const commands = stdout.split('\n').map((l) => l.trim()).filter((l) => /^(curl|openssl) /.test(l));
  const webCmds = commands.filter((c) => c.startsWith('curl -k '));
  const turnCmd = commands.find((c) => c.startsWith('openssl s_client'));
  const routesCmd = commands.find((c) => c.endsWith('/routes'));
  const metricsCmd = commands.find((c) => c.includes('/metrics'));
  assert.ok(webCmds.some((c) => c.includes(`--resolve www.example.com:${routerPort}:127.0.0.1`)), stdout);
  assert.ok(turnCmd !== undefined && routesCmd !== undefined && metricsCmd !== undefined, stdout);
  assert.ok(!turnCmd.includes('-alpn'), 'the TURN-like client offers no ALPN');
  assert.ok(routesCmd.includes(`127.0.0.1:${adminPort}`) && metricsCmd.includes(`127.0.0.1:${adminPort}`));

  // 1. Browser-like clients (curl offers h2 and http/1.1) reach the web page, whatever the name.
  for (const cmd of webCmds) {
    const r = await runShell(cmd);
    assert.equal(r.code, 0, `${cmd}\n${r.err}`);
    assert.match(r.out, /<h1>sni-router demo: the web backend<\/h1>/);
    assert.match(r.out, /over HTTP\/2/);
  }

  // 2. The TURN-like client reaches the echo: the greeting, then the typed line comes back.
  const line = `hello turn ${process.pid}`;
  const turn = await runShell(turnCmd, { input: `${line}\n`, untilOut: new RegExp(`${line}\\n`) });
  assert.match(turn.out, /^turn echo: you reached the TURN backend \(sni=cdn\.example\.com, alpn=none\)/m);
  assert.ok(turn.out.includes(`${line}\n`), turn.out);

  // 3. The admin port shows the route and the connections just made, by route.
  const routes = await runShell(routesCmd);
  assert.equal(routes.code, 0);
  const view = JSON.parse(routes.out) as { routes: Array<{ match: string; alpn: unknown; backend: { name: string } }>; fallback: { name: string } };
  assert.deepEqual(view.routes.map((r) => [r.match, r.alpn, r.backend.name]), [['cdn.example.com', 'none', 'turn']]);
  assert.equal(view.fallback.name, 'web');

  let metrics = '';
  await waitFor(async () => {
    metrics = (await runShell(metricsCmd)).out;
    return /route="cdn\.example\.com"/.test(metrics);
  }, 10_000, 'the turn connection in /metrics');
  const fallbackOk = /sni_router_connections_total\{route="fallback",result="ok"\} (\d+)/.exec(metrics);
  assert.equal(fallbackOk?.[1], String(webCmds.length), metrics);
  assert.match(metrics, /sni_router_connections_total\{route="cdn\.example\.com",result="(ok|error)"\} 1/);

  // Ctrl-C: a clean stop, exit 0, ports released.
  demo.kill('SIGINT');
  let timer: NodeJS.Timeout | undefined;
  const { code, signal } = await Promise.race([
    exited,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`the demo did not stop on SIGINT:\n${stderr}`)), 10_000);
    }),
  ]).finally(() => clearTimeout(timer));
  assert.deepEqual({ code, signal }, { code: 0, signal: null }, stderr);
  await new Promise<void>((resolve, reject) => {
    const s = net.createServer().once('error', reject).listen(routerPort, '127.0.0.1', () => s.close(() => resolve()));
  });
});

test('the demo fails clearly, with exit 1, when its port is taken', async () => {
  const holder = net.createServer();
  await new Promise<void>((r) => holder.listen(0, '127.0.0.1', () => r()));
  const taken = (holder.address() as net.AddressInfo).port;
  try {
    const r = spawn(NODE, ['src/demo.ts'], {
      cwd: ROOT, env: { ...process.env, DEMO_PORT: String(taken), DEMO_ADMIN_PORT: String(await freePort()) },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let err = '';
    r.stderr.on('data', (d: Buffer) => {
      err += d.toString();
    });
    const code = await new Promise<number | null>((resolve) => r.on('exit', (c) => resolve(c)));
    assert.equal(code, 1);
    assert.match(err, /DEMO_PORT/);
  } finally {
    holder.close();
  }
});

test('the demo says what is missing, with exit 1, when openssl is not installed', async () => {
  const r = spawn(NODE, ['src/demo.ts'], {
    cwd: ROOT, env: { ...process.env, PATH: '/nonexistent', DEMO_PORT: String(await freePort()), DEMO_ADMIN_PORT: String(await freePort()) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  r.stderr.on('data', (d: Buffer) => {
    err += d.toString();
  });
  const code = await new Promise<number | null>((resolve) => r.on('exit', (c) => resolve(c)));
  assert.equal(code, 1);
  assert.match(err, /openssl is not installed/);
});
