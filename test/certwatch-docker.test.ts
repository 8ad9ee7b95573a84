// on_change against Docker: `restart` and `signal` for a container go to the Engine API on its unix
// socket. A stand-in Engine (node:http on a unix socket in a temp dir) answers the routes the router
// uses with the real Engine's status codes and JSON error bodies, and records every request, so the
// tests see exactly what reached "Docker": through runAction, through a Caddy-shaped renewal, and
// (not at all) through `sni-router check`.
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { runAction } from '../src/certwatch/action.ts';
import { startCertwatch } from '../src/certwatch/index.ts';
import type { CertAction, CertwatchConfig } from '../src/config/types.ts';
import { Metrics } from '../src/metrics/metrics.ts';
import { memoryLogger, metricValue, sleep, tempDir, waitFor } from './helpers.ts';
import { CaddyStorage, DAY, DOMAIN, HOUR, LE, TestCa, fingerprintOf } from './support/caddy.ts';

const ROOT = join(import.meta.dirname, '..');
const NODE = join(ROOT, 'node_modules', '.bin', 'node');

interface EngineRequest {
  readonly method: string;
  readonly path: string;
  readonly host: string | undefined;
  /** What the test's `look` saw when the request arrived. */
  readonly seen: string | null;
}

interface Engine {
  readonly socket: string;
  readonly requests: EngineRequest[];
  /** Bytes of the endless body written before the client hung up ('huge' only). */
  readonly bodyWritten: () => number;
  close(): Promise<void>;
}

/**
 * The Engine API routes on_change uses. `containers` maps a name to whether it is running.
 * 'silent' reads requests and never answers; 'huge' answers 500 with a body that never ends.
 */
async function startEngine(
  dir: string, containers: Record<string, boolean>, mode: 'engine' | 'silent' | 'huge' = 'engine', look: (path: string) => string | null = () => null,
): Promise<Engine> {
  const socket = join(dir, `docker-${mode}.sock`);
  const requests: EngineRequest[] = [];
  let written = 0;
  const json = (res: http.ServerResponse, status: number, message: string) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(`${JSON.stringify({ message })}\n`);
  };
  const server = http.createServer((req, res) => {
    requests.push({ method: req.method ?? '', path: req.url ?? '', host: req.headers.host, seen: look(req.url ?? '') });
    if (mode === 'silent') return;
    if (mode === 'huge') {
      res.writeHead(500, { 'content-type': 'text/plain' });
      const chunk = Buffer.alloc(64 * 1024, 'x');
      const pump = () => {
        while (!res.destroyed && written < 256 * 1024 * 1024) {
          written += chunk.length;
          if (!res.write(chunk)) {
            res.once('drain', pump);
            return;
          }
        }
      };
      res.on('error', () => {});
      pump();
      return;
    }
    // An API version prefix is optional on the real Engine too.
    const url = new URL(req.url ?? '/', 'http://docker');
    const m = /^(?:\/v[0-9.]+)?\/containers\/([^/]+)\/(restart|kill)$/.exec(url.pathname);
    if (req.method !== 'POST' || m === null) {
      json(res, 404, 'page not found');
      return;
    }
    const name = decodeURIComponent(m[1]);
    if (!(name in containers)) {
      json(res, 404, `No such container: ${name}`);
      return;
    }
    if (m[2] === 'kill' && !containers[name]) {
      json(res, 409, `Cannot kill container: ${name}: Container 3f2a9c0d1e4b is not running`);
      return;
    }
    containers[name] = true;
    res.writeHead(204);
    res.end();
  });
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(socket, () => resolve()));
  return {
    socket, requests, bodyWritten: () => written,
    close: () => new Promise<void>((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    }),
  };
}

const NO_PATHS = { cert: '/nonexistent.crt', key: '/nonexistent.key' };
const restart = (container: string, socket: string): CertAction => ({ kind: 'restart', systemdUnit: null, docker: { container, socket } });
const signal = (container: string, socket: string, sig: NodeJS.Signals = 'SIGUSR2'): CertAction => ({
  kind: 'signal', systemdUnit: null, pidFile: null, docker: { container, socket }, signal: sig,
});
const act = (action: CertAction, timeoutMs = 5000) => runAction(action, NO_PATHS, { env: process.env, timeoutMs });

describe('certwatch: docker actions', { concurrency: true }, () => {
  test('restart and signal a container by name: one POST each, to the Engine\'s paths', async () => {
    const { dir, cleanup } = tempDir('sni-router-docker-');
    const engine = await startEngine(dir, { livekit: true, coturn: true });
    try {
      assert.deepEqual(await act(restart('livekit', engine.socket)), { what: `restart docker container livekit (socket ${engine.socket})` });
      assert.deepEqual(await act(signal('coturn', engine.socket)), { what: `signal SIGUSR2 to docker container coturn (socket ${engine.socket})` });
      assert.deepEqual(engine.requests.map((r) => `${r.method} ${r.path}`), [
        'POST /containers/livekit/restart',
        'POST /containers/coturn/kill?signal=SIGUSR2',
      ]);
      assert.ok(engine.requests.every((r) => r.host !== undefined), 'HTTP/1.1 with a Host header, as the Engine requires');
    } finally {
      await engine.close();
      cleanup();
    }
  });

  test('a missing container (404) and a stopped one (409) fail with what to fix', async () => {
    const { dir, cleanup } = tempDir('sni-router-docker-');
    const engine = await startEngine(dir, { coturn: false });
    try {
      await assert.rejects(act(restart('ghost', engine.socket)), /^Error: no such docker container ghost \(docker socket .*docker-engine\.sock\)$/);
      await assert.rejects(act(signal('ghost', engine.socket)), /no such docker container ghost/);
      await assert.rejects(act(signal('coturn', engine.socket)),
        /^Error: docker container coturn is not running, so it cannot be signalled: Cannot kill container: coturn: Container 3f2a9c0d1e4b is not running$/);
      // A restart starts a stopped container: that is what it is for.
      await act(restart('coturn', engine.socket));
      await act(signal('coturn', engine.socket, 'SIGHUP'));
      assert.equal(engine.requests.length, 5);
      assert.equal(engine.requests[4].path, '/containers/coturn/kill?signal=SIGHUP');
    } finally {
      await engine.close();
      cleanup();
    }
  });

  test('no socket, a socket nobody answers on, a silent Engine and an endless answer all end in bounded errors', async () => {
    const { dir, cleanup } = tempDir('sni-router-docker-');
    const silent = await startEngine(dir, {}, 'silent');
    const huge = await startEngine(dir, {}, 'huge');
    try {
      await assert.rejects(act(restart('livekit', join(dir, 'absent.sock'))),
        new RegExp(`^Error: docker socket ${dir}/absent\\.sock not found: is Docker running, is the socket mounted\\?$`));
      writeFileSync(join(dir, 'plain-file.sock'), '');
      await assert.rejects(act(restart('livekit', join(dir, 'plain-file.sock'))), /docker socket .*plain-file\.sock refuses connections/);

      let began = Date.now();
      await assert.rejects(act(restart('livekit', silent.socket), 300), /^Error: docker socket .* no answer to POST \/containers\/livekit\/restart within 300ms$/);
      let took = Date.now() - began;
      assert.ok(took >= 280 && took < 3000, `the time limit held: ${took} ms`);
      assert.equal(silent.requests.length, 1, 'the request did reach the Engine');

      began = Date.now();
      const err = await act(signal('coturn', huge.socket)).then(() => null, (e: Error) => e);
      took = Date.now() - began;
      assert.ok(err !== null);
      assert.match(err.message, /^docker kill --signal=SIGUSR2 coturn: the Engine answered 500: x{200}…$/);
      assert.ok(took < 3000, `gave up reading quickly: ${took} ms`);
      await waitFor(() => huge.bodyWritten() > 0, 2000, 'the Engine wrote');
      await sleep(200);
      const written = huge.bodyWritten();
      await sleep(300);
      assert.equal(huge.bodyWritten(), written, 'the connection was closed: the Engine writes no more');
      assert.ok(written < 32 * 1024 * 1024, `read no more than a cap (plus socket buffers): the Engine wrote ${written} bytes`);
    } finally {
      await silent.close();
      await huge.close();
      cleanup();
    }
  });

  test('a socket the router\'s user may not open is a permission error naming the group', async (t) => {
    if (process.getuid?.() !== 0) {
      t.skip('needs root, to run the request as another user');
      return;
    }
    const { dir, cleanup } = tempDir('sni-router-docker-');
    chmodSync(dir, 0o755);
    const engine = await startEngine(dir, { livekit: true });
    try {
      chmodSync(engine.socket, 0o600);
      const script = `
        import { runAction } from ${JSON.stringify(join(ROOT, 'src', 'certwatch', 'action.ts'))};
        runAction({ kind: 'restart', systemdUnit: null, docker: { container: 'livekit', socket: ${JSON.stringify(engine.socket)} } },
          { cert: '', key: '' }, { env: {}, timeoutMs: 5000 }).then(() => console.log('ok'), (e) => console.log(e.message));`;
      const child = spawn(NODE, ['--input-type=module', '-e', script], { uid: 65534, gid: 65534, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let errText = '';
      child.stdout.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr.on('data', (d: Buffer) => (errText += d.toString()));
      const code = await new Promise<number | null>((resolve) => child.on('exit', resolve));
      if (/EACCES|permission denied/i.test(errText) && out === '') {
        t.skip(`the repository is not readable by uid 65534: ${errText.split('\n')[0]}`);
        return;
      }
      assert.equal(code, 0, errText);
      assert.equal(out.trim(), `docker socket ${engine.socket}: permission denied: the router's user must be in the socket's group (docker)`);
      assert.equal(engine.requests.length, 0);
    } finally {
      await engine.close();
      cleanup();
    }
  });

  test('a renewal in Caddy\'s storage restarts and signals the containers once each, with copy_to written first', async () => {
    const { dir, cleanup } = tempDir('sni-router-docker-renewal-');
    // At each request, the certificate the container would load from its copy_to.
    const engine = await startEngine(dir, { livekit: true, coturn: true }, 'engine', (path) => {
      const name = /^\/containers\/([^/]+)\//.exec(path)?.[1] ?? '';
      try {
        return fingerprintOf(readFileSync(join(dir, name, `${name}.crt`)));
      } catch {
        return null;
      }
    });
    const ca = new TestCa(dir);
    const storage = new CaddyStorage(join(dir, 'caddy'));
    storage.renew(LE, ca.renewal(30 * DAY));
    const entry = (name: string, onChange: CertAction): CertwatchConfig => ({
      name, domain: DOMAIN, caddyStorage: storage.root, cert: null, key: null,
      copyTo: { dir: join(dir, name), mode: 0o640 }, onChange, minIntervalMs: 0, debounceMs: 300,
      staggerMs: 0, restartWindow: null, urgentBeforeMs: 7 * DAY, namespace: null,
    });
    const metrics = new Metrics({ defaultMetrics: false });
    const { logger, lines } = memoryLogger('debug');
    const reloads = async (cert: string, result: string) => metricValue(await metrics.registry.metrics(), 'sni_router_cert_reloads_total', { cert, result });
    const handle = await startCertwatch([
      entry('livekit', restart('livekit', engine.socket)),
      entry('coturn', signal('coturn', engine.socket)),
      entry('ghost', restart('ghost', engine.socket)),
    ], { logger, metrics, tuning: { retryBaseMs: 60_000 } });
    try {
      // copy_to starts empty: the pair found at start is deployed and acted on, once per entry.
      await waitFor(async () => (await reloads('livekit', 'ok')) === 1 && (await reloads('coturn', 'ok')) === 1
        && (await reloads('ghost', 'error')) === 1, 10_000, 'the actions at start');
      const renewed = ca.renewal(HOUR);
      engine.requests.length = 0;
      storage.renew(LE, renewed);
      await waitFor(async () => (await reloads('livekit', 'ok')) === 2 && (await reloads('coturn', 'ok')) === 2, 10_000, 'the actions after the renewal');
      await sleep(1000); // debounce 300 ms: anything more would have happened by now
      assert.deepEqual(engine.requests.map((r) => `${r.method} ${r.path}`).sort(), [
        'POST /containers/coturn/kill?signal=SIGUSR2',
        'POST /containers/ghost/restart',
        'POST /containers/livekit/restart',
      ]);
      for (const r of engine.requests.filter((x) => !x.path.includes('ghost'))) assert.equal(r.seen, renewed.fingerprint, `${r.path}: copy_to held the renewal`);
      // The missing container: a failed deployment, counted and logged with the reason.
      assert.equal(await reloads('ghost', 'error'), 2);
      const failed = lines.filter((l) => l.cert === 'ghost' && l.msg === 'certificate deployment failed');
      assert.equal(failed.length, 2);
      assert.match(String(failed[0].err), /^no such docker container ghost/);
      const deployed = lines.find((l) => l.cert === 'livekit' && l.msg === 'certificate deployed' && l.fingerprint === renewed.fingerprint);
      assert.equal(deployed?.action, `restart docker container livekit (socket ${engine.socket})`);
    } finally {
      await handle.stop();
      await engine.close();
      cleanup();
    }
  });

  test('sni-router check prints the docker action and warns about the socket, without a request to it', async () => {
    const { dir, cleanup } = tempDir('sni-router-docker-check-');
    const engine = await startEngine(dir, { livekit: true });
    writeFileSync(join(dir, 'plain-file.sock'), '');
    const config = (socket: string) => `fallback: { addr: "127.0.0.1:9" }
certwatch:
  - name: livekit
    domain: ${DOMAIN}
    cert: ${join(dir, 'x.crt')}
    key: ${join(dir, 'x.key')}
    on_change: { restart: { docker_container: livekit, docker_socket: "${socket}" } }
  - name: coturn
    domain: ${DOMAIN}
    cert: ${join(dir, 'x.crt')}
    key: ${join(dir, 'x.key')}
    on_change: { signal: { docker_container: coturn, signal: usr2 } }
`;
    const check = async (socket: string) => {
      const file = join(dir, 'c.yaml');
      writeFileSync(file, config(socket));
      return new Promise<string>((resolve, reject) => {
        execFile(join(ROOT, 'bin', 'sni-router'), ['check', '--config', file], { timeout: 20_000 }, (err, stdout, stderr) => {
          if (err !== null) reject(new Error(`${err.message}\n${stderr}`));
          else resolve(stdout);
        });
      });
    };
    try {
      const live = await check(engine.socket);
      assert.match(live, new RegExp(`^certwatch livekit: .*, on change restart docker container livekit \\(socket ${engine.socket}\\)$`, 'm'));
      assert.match(live, /^certwatch coturn: .*, on change signal SIGUSR2 to docker container coturn$/m);
      assert.doesNotMatch(live, /certwatch livekit: warn: docker socket/);
      const absent = await check(join(dir, 'absent.sock'));
      assert.match(absent, /certwatch livekit: warn: docker socket .*absent\.sock does not exist: is Docker running, is the socket mounted\?/);
      const plain = await check(join(dir, 'plain-file.sock'));
      assert.match(plain, /certwatch livekit: warn: docker socket .*plain-file\.sock is not a socket/);
      assert.equal(engine.requests.length, 0, 'check made no request');
    } finally {
      await engine.close();
      cleanup();
    }
  });
});
