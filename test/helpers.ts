// Test helpers: real certificates (openssl), real TLS and TCP backends, a router started on
// ephemeral loopback ports. Nothing here is a mock: every byte crosses a real socket.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import tls from 'node:tls';
import { App, type AppOptions } from '../src/app.ts';
import { parseConfig } from '../src/config/load.ts';
import { createLogger, type Logger } from '../src/log.ts';

/** Captured ClientHellos and pages the tests load (test/fixtures/README.md says where each came from). */
export const FIXTURES = join(import.meta.dirname, 'fixtures');

export function tempDir(prefix = 'sni-router-test-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

export interface CertPair {
  readonly certFile: string;
  readonly keyFile: string;
  readonly cert: Buffer;
  readonly key: Buffer;
}

/** A self-signed EC certificate for the given DNS names, made by openssl. */
export function makeCert(dir: string, name: string, sans: readonly string[] = [name], days = 30): CertPair {
  const safe = name.replace(/[^A-Za-z0-9.-]/g, '_');
  const certFile = join(dir, `${safe}.crt`);
  const keyFile = join(dir, `${safe}.key`);
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', String(days),
    '-subj', `/CN=${name}`, '-addext', `subjectAltName=${sans.map((s) => `DNS:${s}`).join(',')}`,
    '-keyout', keyFile, '-out', certFile,
  ], { stdio: 'ignore' });
  return { certFile, keyFile, cert: readFileSync(certFile), key: readFileSync(keyFile) };
}

/** Collects log lines in memory (JSON objects) so tests can assert on them. */
export function memoryLogger(level = 'debug'): { logger: Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const dest = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString().split('\n')) if (l.trim() !== '') lines.push(JSON.parse(l) as Record<string, unknown>);
      cb();
    },
  });
  return { logger: createLogger(level, dest), lines };
}

export interface Listening<T> {
  readonly port: number;
  readonly server: T;
  close(): Promise<void>;
}

function closer(server: net.Server, sockets: Set<net.Socket>): () => Promise<void> {
  return () => new Promise<void>((resolve) => {
    for (const s of sockets) s.destroy();
    server.close(() => resolve());
  });
}

/**
 * A TLS backend that answers each connection with "<name> alpn=<negotiated> sni=<servername>\n"
 * and then echoes whatever it receives.
 */
export async function tlsBackend(name: string, pair: CertPair, opts: { alpn?: string[]; host?: string } = {}): Promise<Listening<tls.Server>> {
  const sockets = new Set<net.Socket>();
  const server = tls.createServer({ cert: pair.cert, key: pair.key, ALPNProtocols: opts.alpn }, (s) => {
    s.write(`${name} alpn=${s.alpnProtocol || 'none'} sni=${(s as tls.TLSSocket & { servername?: string }).servername || 'none'}\n`);
    s.on('data', (d) => s.write(d));
    s.on('error', () => {});
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  server.on('tlsClientError', () => {});
  await new Promise<void>((r) => server.listen(0, opts.host ?? '127.0.0.1', () => r()));
  return { port: (server.address() as net.AddressInfo).port, server, close: closer(server, sockets) };
}

export interface Recorded {
  /** Every byte received on the connection, in order. */
  bytes: Buffer;
  ended: boolean;
  socket: net.Socket;
}

/**
 * A plain TCP backend that records what each connection sends. `reply` (if given) is written when
 * the connection opens; with `replyOnEnd`, it answers after the client's FIN, then ends.
 */
export async function recordingBackend(opts: { reply?: Buffer | string; replyOnEnd?: Buffer | string; host?: string } = {}): Promise<Listening<net.Server> & { conns: Recorded[]; waitConns(n: number, ms?: number): Promise<Recorded[]> }> {
  const sockets = new Set<net.Socket>();
  const conns: Recorded[] = [];
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    const rec: Recorded = { bytes: Buffer.alloc(0), ended: false, socket: s };
    conns.push(rec);
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => {});
    if (opts.reply !== undefined) s.write(opts.reply);
    s.on('data', (d) => {
      rec.bytes = Buffer.concat([rec.bytes, d]);
    });
    s.on('end', () => {
      rec.ended = true;
      if (opts.replyOnEnd !== undefined) s.end(opts.replyOnEnd);
      else s.end();
    });
  });
  await new Promise<void>((r) => server.listen(0, opts.host ?? '127.0.0.1', () => r()));
  return {
    port: (server.address() as net.AddressInfo).port,
    server,
    conns,
    close: closer(server, sockets),
    waitConns: async (n, ms = 5000) => {
      await waitFor(() => conns.length >= n, ms, `${n} backend connections`);
      return conns;
    },
  };
}

export async function waitFor(cond: () => boolean | Promise<boolean>, ms = 5000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms}ms waiting for ${what}`);
    await sleep(10);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export interface RunningRouter {
  readonly app: App;
  readonly port: number;
  readonly adminPort: number;
  readonly logs: Array<Record<string, unknown>>;
  /** Data-plane processes: 1, or the workers with SNI_ROUTER_TEST_WORKERS / `workers:` in the YAML. */
  readonly workers: number;
  stop(graceMs?: number): Promise<void>;
  /** /metrics as the admin server serves it (with workers: all of them, aggregated). */
  metricsText(): Promise<string>;
  /** Open connections, counted now (with workers: asked of each, summed). */
  activeConnections(): Promise<number>;
  /** Client addresses tracked for max_conns_per_ip, counted now (with workers: summed). */
  trackedClientAddresses(): Promise<number>;
  /** The value of one series, e.g. metric('sni_router_connections_total', {route: 'fallback'}); 0 when absent. */
  metric(name: string, labels?: Record<string, string>): Promise<number>;
}

/**
 * Starts the router in-process from YAML (listen and admin.listen default to ephemeral loopback
 * ports when the YAML leaves them out). SNI_ROUTER_TEST_WORKERS=N runs the data plane in N worker
 * processes (`workers: N`) unless the YAML sets workers itself: the data-plane suites run both ways.
 */
export async function startRouter(
  yaml: string, opts: { env?: NodeJS.ProcessEnv; file?: string; certwatch?: AppOptions['certwatch'] } = {},
): Promise<RunningRouter> {
  let text = yaml;
  if (!/^listen:/m.test(text)) text = `listen: "127.0.0.1:0"\n${text}`;
  if (!/^admin:/m.test(text)) text = `admin: { listen: "127.0.0.1:0" }\n${text}`;
  const testWorkers = process.env.SNI_ROUTER_TEST_WORKERS;
  if (testWorkers !== undefined && testWorkers !== '' && !/^workers:/m.test(text)) text = `workers: ${testWorkers}\n${text}`;
  const testRelay = process.env.SNI_ROUTER_TEST_RELAY;
  if (testRelay !== undefined && testRelay !== '' && !/^relay:/m.test(text)) text = `relay: ${testRelay}\n${text}`;
  const config = parseConfig(text, opts.file ?? 'test.yaml', opts.env ?? process.env);
  const { logger, lines } = memoryLogger(config.log.level === 'info' ? 'debug' : config.log.level);
  const app = await App.start(config, { logger, env: opts.env, certwatch: opts.certwatch });
  const metricsText = () => app.metricsText();
  return {
    app,
    port: app.listenAddresses[0].port,
    adminPort: app.adminAddress?.port ?? 0,
    logs: lines,
    workers: config.workers,
    stop: (graceMs = 0) => app.shutdown(graceMs),
    metricsText,
    activeConnections: async () => (await app.connectionCounts()).active,
    trackedClientAddresses: async () => (await app.connectionCounts()).trackedClientAddresses,
    metric: async (name, labels = {}) => metricValue(await metricsText(), name, labels),
  };
}

/** Sums the series of `name` whose labels include all of `labels`, in Prometheus text. */
export function metricValue(text: string, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$/.exec(line);
    if (m === null || m[1] !== name) continue;
    const have: Record<string, string> = {};
    for (const p of (m[3] ?? '').matchAll(/([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"/g)) have[p[1]] = p[2];
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) sum += Number(m[4]);
  }
  return sum;
}

export interface TlsResult {
  /** The first line the backend sent ("<name> alpn=… sni=…"). */
  readonly line: string;
  readonly alpn: string | false;
  readonly peerCertSubject: string;
}

/** Connects with node:tls through the router and reads the backend's greeting line. */
export async function tlsHello(port: number, servername: string | undefined, alpn?: string[], host = '127.0.0.1'): Promise<TlsResult> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host, port, servername, ALPNProtocols: alpn, rejectUnauthorized: false });
    let buf = '';
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error('tlsHello timed out'));
    }, 8000);
    s.on('data', (d) => {
      buf += d.toString();
      const nl = buf.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        const cert = s.getPeerCertificate();
        resolve({ line: buf.slice(0, nl), alpn: s.alpnProtocol ?? false, peerCertSubject: String(cert.subject?.CN ?? '') });
        s.end();
      }
    });
    s.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

/** Opens a raw TCP connection, writes `pieces` (one write each, with a pause between), returns all bytes back until close. */
export async function rawExchange(port: number, pieces: readonly Buffer[], opts: { gapMs?: number; end?: boolean; timeoutMs?: number } = {}): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port, noDelay: true, allowHalfOpen: true });
    const got: Buffer[] = [];
    const timer = setTimeout(() => {
      s.destroy();
      resolve(Buffer.concat(got));
    }, opts.timeoutMs ?? 5000);
    s.on('data', (d) => got.push(d));
    // The peer's FIN ends the exchange (the socket is half-open, so 'close' alone would wait).
    s.on('end', () => {
      clearTimeout(timer);
      s.destroy();
      resolve(Buffer.concat(got));
    });
    s.on('close', () => {
      clearTimeout(timer);
      resolve(Buffer.concat(got));
    });
    s.on('error', (err) => {
      clearTimeout(timer);
      if ((err as NodeJS.ErrnoException).code === 'ECONNRESET') resolve(Buffer.concat(got));
      else reject(err);
    });
    s.on('connect', async () => {
      for (const p of pieces) {
        s.write(p);
        if (opts.gapMs) await sleep(opts.gapMs);
      }
      if (opts.end !== false) s.end();
    });
  });
}
