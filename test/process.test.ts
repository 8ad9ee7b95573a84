// The router as operators run it: bin/sni-router as a process, with signals (SIGTERM/SIGINT drain,
// SIGHUP reload) and hostile conditions (out of file descriptors).
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  type CertPair, makeCert, rawExchange, metricValue, recordingBackend, sleep, tempDir, tlsBackend, tlsHello, waitFor,
} from './helpers.ts';
import { buildHello } from './support/hellos.ts';
import { REDIS_PORT, createTestDatabase, randomSuffix, redisClient, redisClientIds, redisSettled } from './support/sources.ts';

const BIN = join(import.meta.dirname, '..', 'bin', 'sni-router');

let dir: string;
let cleanupDir: () => void;
let cert: CertPair;
before(() => {
  ({ dir, cleanup: cleanupDir } = tempDir());
  cert = makeCert(dir, 'cdn.example.com');
});
after(() => cleanupDir());

interface Proc {
  child: ChildProcess;
  port: number;
  adminPort: number;
  logs: Array<Record<string, unknown>>;
  exit: Promise<number | null>;
}

async function spawnRouter(configFile: string, opts: { ulimitFiles?: number } = {}): Promise<Proc> {
  const cmd = opts.ulimitFiles === undefined ? BIN : 'sh';
  const args = opts.ulimitFiles === undefined
    ? ['--config', configFile]
    : ['-c', `ulimit -n ${opts.ulimitFiles} && exec "${BIN}" --config "${configFile}"`];
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const logs: Array<Record<string, unknown>> = [];
  let buf = '';
  child.stdout!.on('data', (d) => {
    buf += d.toString();
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      try {
        logs.push(JSON.parse(line) as Record<string, unknown>);
      } catch {
        logs.push({ raw: line });
      }
    }
  });
  let stderr = '';
  child.stderr!.on('data', (d) => {
    stderr += d.toString();
  });
  const exit = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  await waitFor(() => logs.some((l) => l.msg === 'sni-router started') || child.exitCode !== null, 20_000, `router start (${stderr})`);
  const started = logs.find((l) => l.msg === 'sni-router started');
  assert.ok(started, `router did not start: ${stderr}`);
  const port = Number(String((started.listen as string[])[0]).split(':').pop());
  const adminPort = Number(String(started.admin).split(':').pop());
  return { child, port, adminPort, logs, exit };
}

async function http(port: number, path: string): Promise<{ status: number; body: string }> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`);
  return { status: res.status, body: await res.text() };
}

function config(file: string, text: string): string {
  writeFileSync(file, `listen: "127.0.0.1:0"\nadmin: { listen: "127.0.0.1:0" }\n${text}`);
  return file;
}

describe('signals', () => {
  test('SIGTERM stops accepting, marks /readyz 503, lets open connections finish, exits 0', async () => {
    const rec = await recordingBackend();
    const file = config(join(dir, 'drain.yaml'), `shutdown_grace: 20s\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    const p = await spawnRouter(file);
    try {
      const open = net.connect({ host: '127.0.0.1', port: p.port });
      const got: Buffer[] = [];
      open.on('data', (d) => got.push(d));
      await new Promise((r) => open.on('connect', r));
      open.write(buildHello({ sni: 'x.example.com' }));
      await rec.waitConns(1);
      assert.equal((await http(p.adminPort, '/readyz')).status, 200);
      p.child.kill('SIGTERM');
      await waitFor(async () => (await http(p.adminPort, '/readyz')).status === 503, 5000, 'readyz 503');
      // New connections are refused while draining.
      await waitFor(() => new Promise<boolean>((resolve) => {
        const s = net.connect({ host: '127.0.0.1', port: p.port });
        s.on('connect', () => {
          s.destroy();
          resolve(false);
        });
        s.on('error', () => resolve(true));
      }), 5000, 'listener closed');
      // The open connection still relays both ways.
      rec.conns[0].socket.write('still relaying');
      await waitFor(() => Buffer.concat(got).toString() === 'still relaying');
      assert.equal(p.child.exitCode, null, 'still running while a connection is open');
      open.end();
      assert.equal(await p.exit, 0);
    } finally {
      p.child.kill('SIGKILL');
      await rec.close();
    }
  });

  test('SIGINT with a connection left open past shutdown_grace closes it and exits 0', async () => {
    const rec = await recordingBackend();
    const file = config(join(dir, 'grace.yaml'), `shutdown_grace: 500ms\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    const p = await spawnRouter(file);
    try {
      const open = net.connect({ host: '127.0.0.1', port: p.port });
      const closed = new Promise((r) => open.on('close', r));
      open.on('error', () => {});
      open.write('GET / HTTP/1.0\r\n\r\n');
      await rec.waitConns(1);
      const t0 = Date.now();
      p.child.kill('SIGINT');
      assert.equal(await p.exit, 0);
      const took = Date.now() - t0;
      assert.ok(took >= 400 && took < 5000, `exited after ${took} ms`);
      await closed;
    } finally {
      p.child.kill('SIGKILL');
      await rec.close();
    }
  });

  test('SIGHUP re-reads the config file; a bad file is rejected and the running table kept', async () => {
    const turn = await tlsBackend('turn', cert);
    const web = await tlsBackend('web', cert);
    const file = join(dir, 'hup.yaml');
    config(file, `fallback: { addr: "127.0.0.1:${web.port}" }\n`);
    const p = await spawnRouter(file);
    try {
      assert.match((await tlsHello(p.port, 'cdn.example.com')).line, /^web /);
      config(file, `fallback: { addr: "127.0.0.1:${web.port}" }\nroutes:\n  - { match: cdn.example.com, backend: { name: turn, addr: "127.0.0.1:${turn.port}" } }\n`);
      p.child.kill('SIGHUP');
      await waitFor(async () => (await tlsHello(p.port, 'cdn.example.com')).line.startsWith('turn '), 5000, 'new route after SIGHUP');
      writeFileSync(file, 'fallback: [oops\n');
      p.child.kill('SIGHUP');
      await waitFor(() => p.logs.some((l) => l.msg === 'reload rejected: config file is invalid, keeping the running config'), 5000);
      assert.match((await tlsHello(p.port, 'cdn.example.com')).line, /^turn /);
      const routes = JSON.parse((await http(p.adminPort, '/routes')).body) as { routes: Array<{ match: string }> };
      assert.deepEqual(routes.routes.map((r) => r.match), ['cdn.example.com']);
      p.child.kill('SIGTERM');
      assert.equal(await p.exit, 0);
    } finally {
      p.child.kill('SIGKILL');
      await turn.close();
      await web.close();
    }
  });
});

describe('hostile conditions', () => {
  test('100 alternating SIGHUPs leave exactly one client per configured source, and the router serving', async () => {
    const web = await tlsBackend('web', cert);
    const db = await createTestDatabase();
    const redis = redisClient();
    const suffix = randomSuffix();
    const file = join(dir, 'storm.yaml');
    // Two configs that differ in every source's settings, so that each reload replaces both sources.
    const write = (n: number) => config(file, [
      `fallback: { addr: "127.0.0.1:${web.port}" }`,
      'sources:',
      `  - { type: redis, name: r-${suffix}, url: "redis://127.0.0.1:${REDIS_PORT}/0", key: "k-${suffix}", resync_interval: ${30 + (n % 2)}s }`,
      `  - { type: postgres, name: p-${suffix}, url: "${db.url()}", interval: ${10 + (n % 2)}s, listen_channel: sni_router_routes,`,
      '      params: { base_domain: example.com, node_id: node-1 } }',
    ].join('\n'));
    write(0);
    const p = await spawnRouter(file);
    try {
      await redisSettled(redis, `r-${suffix}`);
      for (let i = 1; i <= 100; i++) {
        write(i);
        p.child.kill('SIGHUP');
        await sleep(i % 10 === 0 ? 30 : 2);
      }
      await waitFor(() => p.logs.filter((l) => l.msg === 'config reloaded').length >= 1, 20_000, 'the reloads');
      // Every reload has run (the last SIGHUPs join one queued reload), and nothing more is pending.
      let reloads = -1;
      await waitFor(async () => {
        const n = p.logs.filter((l) => l.msg === 'config reloaded').length;
        const settled = n === reloads;
        reloads = n;
        await sleep(500);
        return settled;
      }, 30_000, 'the reloads to settle');
      await sleep(1500);
      assert.equal((await redisClientIds(redis, `r-${suffix}`)).length, 2, 'one reading and one subscribed Redis connection');
      const pgSessions = await db.db.query<{ n: number }>(
        "SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name LIKE $1", [`sni-router:p-${suffix}%`]);
      assert.equal(pgSessions.rows[0].n, 2, 'one reading and one LISTEN PostgreSQL session');
      assert.match((await tlsHello(p.port, 'cdn.example.com')).line, /^web /);
      assert.equal(p.child.exitCode, null);
      p.child.kill('SIGTERM');
      assert.equal(await p.exit, 0);
    } finally {
      p.child.kill('SIGKILL');
      redis.disconnect();
      await db.drop();
      await web.close();
    }
  });

  test('connections never take every file descriptor: past the cap they are shed; it keeps serving once they free up', async () => {
    const rec = await recordingBackend({ reply: 'hi' });
    const file = config(join(dir, 'emfile.yaml'), `fallback: { name: rec, addr: "127.0.0.1:${rec.port}" }\n`);
    const p = await spawnRouter(file, { ulimitFiles: 100 });
    const held: net.Socket[] = [];
    try {
      const warning = p.logs.find((l) => l.msg === 'file descriptor limit is low for max_concurrent_conns');
      assert.ok(warning, 'warned at start');
      // 100 descriptors, 64 kept for the rest of the router: (100 - 64) / 2 relays.
      assert.equal(warning.connections_capped_at, 18);
      // One connection at a time, each held open (two descriptors in the router), until the
      // router refuses one: the cap, not a failed dial or accept (EMFILE).
      let refused = false;
      for (let i = 0; i < 100 && !refused; i++) {
        const s = net.connect({ host: '127.0.0.1', port: p.port });
        s.on('error', () => {});
        held.push(s);
        s.write(buildHello({ sni: 'cdn.example.com' }));
        refused = await new Promise<boolean>((resolve) => {
          s.once('data', () => resolve(false));
          s.once('close', () => resolve(true));
          setTimeout(() => resolve(true), 3000);
        });
      }
      assert.ok(refused, 'the router refused a connection');
      assert.equal(held.length, 19, '18 relays, the 19th refused');
      // A burst of accepts while exhausted: libuv sheds them; the process must survive.
      const burst = [...Array(50).keys()].map(() => net.connect({ host: '127.0.0.1', port: p.port }).on('error', () => {}));
      await sleep(300);
      for (const s of burst) s.destroy();
      assert.equal(p.child.exitCode, null, 'still running');
      for (const s of held) s.destroy();
      await waitFor(async () => {
        const reply = await rawExchange(p.port, [buildHello({ sni: 'cdn.example.com' })], { end: false, timeoutMs: 500 });
        return reply.toString() === 'hi';
      }, 10_000, 'serving again');
      assert.equal(p.logs.find((l) => l.msg === 'backend dial failed'), undefined, 'no dial ran out of descriptors');
      const metrics = (await http(p.adminPort, '/metrics')).body;
      assert.ok(metricValue(metrics, 'sni_router_connection_limit_rejections_total', { scope: 'global' }) >= 1);
      assert.equal(metricValue(metrics, 'sni_router_accept_errors_total'), 0, 'no accept ran out of descriptors');
      const routes = JSON.parse((await http(p.adminPort, '/routes')).body) as { fallback: { health: Array<{ healthy: boolean }> } };
      assert.equal(routes.fallback.health[0].healthy, true);
      p.child.kill('SIGTERM');
      assert.equal(await p.exit, 0);
    } finally {
      for (const s of held) s.destroy();
      p.child.kill('SIGKILL');
      await rec.close();
    }
  });

  test('stray SIGUSR1 and SIGUSR2 neither stop the router nor open a debugger', async () => {
    const web = await tlsBackend('web', cert);
    const p = await spawnRouter(config(join(dir, 'usr.yaml'), `fallback: { addr: "127.0.0.1:${web.port}" }\n`));
    try {
      for (const signal of ['SIGUSR2', 'SIGUSR1', 'SIGUSR2'] as const) p.child.kill(signal);
      await sleep(500);
      assert.equal(p.child.exitCode, null, 'still running');
      assert.match((await tlsHello(p.port, 'cdn.example.com')).line, /^web /);
      const inspector = await new Promise<boolean>((resolve) => {
        const s = net.connect({ host: '127.0.0.1', port: 9229 }, () => {
          s.destroy();
          resolve(true);
        });
        s.on('error', () => resolve(false));
      });
      assert.equal(inspector, false, 'no inspector listening on 9229');
      assert.ok(p.logs.some((l) => l.msg === 'signal ignored' && l.signal === 'SIGUSR2'));
      p.child.kill('SIGTERM');
      assert.equal(await p.exit, 0);
    } finally {
      p.child.kill('SIGKILL');
      await web.close();
    }
  });

  test('a client that resets mid-relay does not disturb others', async () => {
    const rec = await recordingBackend({ reply: 'hi' });
    const file = config(join(dir, 'reset.yaml'), `fallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    const p = await spawnRouter(file);
    try {
      for (let i = 0; i < 20; i++) {
        const s = net.connect({ host: '127.0.0.1', port: p.port });
        s.on('error', () => {});
        await new Promise((r) => s.on('connect', r));
        s.write(buildHello({ sni: 'r.example.com' }));
        await sleep(5);
        s.resetAndDestroy();
      }
      assert.equal((await rawExchange(p.port, [buildHello({ sni: 'ok.example.com' })], { end: false, timeoutMs: 1000 })).toString(), 'hi');
      assert.equal(p.child.exitCode, null);
      p.child.kill('SIGTERM');
      assert.equal(await p.exit, 0);
    } finally {
      p.child.kill('SIGKILL');
      await rec.close();
    }
  });
});
