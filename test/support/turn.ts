// Real TURN clients and servers for end-to-end tests: coturn (`turnserver`), its UDP echo peer
// (`turnutils_peer`), its test client (`turnutils_uclient`), and headless Chromium gathering a
// WebRTC relay candidate. Everything listens on 127.0.0.1 only; every process is stopped by its
// own pid (Chromium by the process group it leads).
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, X509Certificate } from 'node:crypto';
import dgram from 'node:dgram';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { join } from 'node:path';
import { FIXTURES, sleep, tempDir, waitFor } from '../helpers.ts';

export const CHROMIUM = '/usr/bin/chromium';
const PAGE = join(FIXTURES, 'webrtc-turn.html');
/** Output kept per process, for assertions and failure messages. */
const OUTPUT_CAP = 512 * 1024;

export { type ToolGate, toolGate } from './tools.ts';

/** A port that was free a moment ago on 127.0.0.1. */
export async function freePort(kind: 'tcp' | 'udp' = 'tcp'): Promise<number> {
  if (kind === 'udp') {
    const s = dgram.createSocket('udp4');
    await new Promise<void>((r) => s.bind(0, '127.0.0.1', () => r()));
    const port = s.address().port;
    await new Promise<void>((r) => s.close(() => r()));
    return port;
  }
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** base64(sha256(SubjectPublicKeyInfo)): the form Chromium's --ignore-certificate-errors-spki-list takes. */
export function spkiHash(certPem: Buffer | string): string {
  const der = new X509Certificate(certPem).publicKey.export({ type: 'spki', format: 'der' });
  return createHash('sha256').update(der).digest('base64');
}

/** A child process whose output is kept (bounded) and which is stopped by its pid. */
export class Proc {
  readonly child: ChildProcess;
  readonly #group: boolean;
  readonly #exited: Promise<void>;
  #out = '';

  /** `group`: lead a process group of its own, so stop() also reaches the helpers it forks. */
  constructor(cmd: string, args: readonly string[], opts: { group?: boolean } = {}) {
    this.#group = opts.group === true;
    this.child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], detached: this.#group });
    const keep = (d: Buffer) => {
      this.#out += d.toString();
      if (this.#out.length > OUTPUT_CAP) this.#out = this.#out.slice(-OUTPUT_CAP);
    };
    this.child.stdout!.on('data', keep);
    this.child.stderr!.on('data', keep);
    this.#exited = new Promise((resolve) => {
      this.child.on('error', (err) => {
        keep(Buffer.from(`\n[spawn ${cmd} failed: ${err.message}]\n`));
        resolve();
      });
      this.child.on('close', () => resolve());
    });
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  get output(): string {
    return this.#out;
  }

  get running(): boolean {
    return this.child.pid !== undefined && this.child.exitCode === null && this.child.signalCode === null;
  }

  /** True once the process has exited and its output is read, false after `ms`. */
  async exited(ms: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const done = await Promise.race([
      this.#exited.then(() => true),
      new Promise<boolean>((r) => {
        timer = setTimeout(() => r(false), ms);
      }),
    ]);
    clearTimeout(timer);
    return done;
  }

  /** SIGTERM, then SIGKILL after `graceMs`. Never throws. */
  async stop(graceMs = 3000): Promise<void> {
    const pid = this.child.pid;
    if (pid === undefined) return;
    const send = (sig: NodeJS.Signals) => {
      try {
        process.kill(this.#group ? -pid : pid, sig);
      } catch {
        // ESRCH: already gone.
      }
    };
    if (this.running) {
      send('SIGTERM');
      if (!(await this.exited(graceMs))) send('SIGKILL');
    }
    // A group leader that exited may leave helpers behind (Chromium's zygote, renderers).
    if (this.#group) send('SIGKILL');
    await this.exited(graceMs);
  }
}

// ---------------------------------------------------------------------------------------------
// coturn

export interface Coturn {
  readonly tlsPort: number;
  readonly pid: number;
  readonly pidFile: string;
  /** Everything coturn logged so far (verbose: sessions, allocations, per-session usage). */
  log(): string;
  waitForLog(re: RegExp, ms?: number): Promise<RegExpMatchArray>;
  stop(): Promise<void>;
}

export interface CoturnOptions {
  readonly certFile: string;
  readonly keyFile: string;
  /** username → password, for the long-term credential mechanism. */
  readonly users: Readonly<Record<string, string>>;
  readonly realm?: string;
  /** Where the pid file and the user database go; a temp dir of its own when absent. */
  readonly dir?: string;
  /** The pid file [<dir>/turnserver.pid]. */
  readonly pidFile?: string;
  readonly startMs?: number;
}

/**
 * coturn with only its TLS listener, on 127.0.0.1 and a free port; relays on 127.0.0.1, loopback
 * peers allowed (coturn refuses them by default). No config file (-n: Debian's
 * /etc/turnserver.conf logs to syslog), no CLI, its own SQLite file, log on stdout.
 */
export async function startCoturn(opts: CoturnOptions): Promise<Coturn> {
  const own = opts.dir === undefined ? tempDir('sni-router-coturn-') : null;
  const dir = opts.dir ?? own!.dir;
  const pidFile = opts.pidFile ?? join(dir, 'turnserver.pid');
  let lastError = '';
  // A free port can be taken between the probe and coturn's bind: try a few.
  for (let attempt = 0; attempt < 3; attempt++) {
    const tlsPort = await freePort();
    const args = [
      '-n', '-v', '--log-file=stdout', '--simple-log',
      '--listening-ip=127.0.0.1', '--relay-ip=127.0.0.1', `--tls-listening-port=${tlsPort}`,
      '--no-udp', '--no-tcp', '--no-dtls', '--no-cli', '--allow-loopback-peers',
      `--cert=${opts.certFile}`, `--pkey=${opts.keyFile}`,
      '--lt-cred-mech', `--realm=${opts.realm ?? 'example.com'}`,
      ...Object.entries(opts.users).map(([u, p]) => `--user=${u}:${p}`),
      `--pidfile=${pidFile}`, `--db=${join(dir, 'turndb')}`,
    ];
    const proc = new Proc('turnserver', args);
    const listening = new RegExp(`TLS listener opened on : 127\\.0\\.0\\.1:${tlsPort}\\b`);
    try {
      await waitFor(() => listening.test(proc.output) || !proc.running, opts.startMs ?? 20_000, 'coturn TLS listener');
    } catch (err) {
      await proc.stop();
      own?.cleanup();
      throw new Error(`${(err as Error).message}\n--- coturn output ---\n${proc.output.slice(-4000)}`);
    }
    if (!proc.running) {
      lastError = proc.output.slice(-4000);
      await proc.stop();
      continue;
    }
    return {
      tlsPort,
      pid: proc.pid,
      pidFile,
      log: () => proc.output,
      async waitForLog(re, ms = 10_000) {
        let m: RegExpMatchArray | null = null;
        try {
          await waitFor(() => (m = re.exec(proc.output)) !== null, ms, `coturn log ${re}`);
        } catch (err) {
          throw new Error(`${(err as Error).message}\n--- coturn output (tail) ---\n${proc.output.slice(-4000)}`);
        }
        return m!;
      },
      async stop() {
        await proc.stop();
        own?.cleanup();
      },
    };
  }
  own?.cleanup();
  throw new Error(`coturn did not start:\n${lastError}`);
}

/** coturn's UDP echo peer on 127.0.0.1, answered once it echoes a probe datagram. */
export async function startTurnPeer(startMs = 15_000): Promise<{ port: number; stop(): Promise<void> }> {
  const port = await freePort('udp');
  const proc = new Proc('turnutils_peer', ['-L', '127.0.0.1', '-p', String(port)]);
  const probe = dgram.createSocket('udp4');
  let echoed = false;
  probe.on('message', () => {
    echoed = true;
  });
  try {
    await new Promise<void>((r) => probe.bind(0, '127.0.0.1', () => r()));
    await waitFor(async () => {
      if (!proc.running) throw new Error(`turnutils_peer exited:\n${proc.output}`);
      probe.send('ping', port, '127.0.0.1');
      await sleep(50);
      return echoed;
    }, startMs, 'turnutils_peer to echo');
  } catch (err) {
    await proc.stop();
    throw err;
  } finally {
    probe.close();
  }
  return { port, stop: () => proc.stop() };
}

export interface UclientResult {
  readonly exitCode: number | null;
  readonly output: string;
  /** From its final summary: "start_mclient: tot_send_msgs=N, tot_recv_msgs=M". */
  readonly sent: number;
  readonly received: number;
  /** From "Total lost packets L (…%)". */
  readonly lost: number;
}

/**
 * `turnutils_uclient -t -S`: TURN over TLS over TCP (it sends no SNI), `clients` sessions each
 * allocating a UDP relay and sending `messages` 100-byte packets to the echo peer through it.
 */
export async function runUclient(opts: {
  port: number; user: string; password: string; peerPort: number; messages: number; clients: number; timeoutMs?: number;
}): Promise<UclientResult> {
  const proc = new Proc('turnutils_uclient', [
    '-t', '-S', '-c', // TCP to the server, TLS, no RTCP sessions
    '-n', String(opts.messages), '-m', String(opts.clients),
    '-e', '127.0.0.1', '-r', String(opts.peerPort),
    '-u', opts.user, '-w', opts.password,
    '-p', String(opts.port), '127.0.0.1',
  ]);
  try {
    if (!(await proc.exited(opts.timeoutMs ?? 45_000))) {
      throw new Error(`turnutils_uclient still running after ${opts.timeoutMs ?? 45_000}ms:\n${proc.output.slice(-4000)}`);
    }
  } finally {
    await proc.stop();
  }
  const out = proc.output;
  const totals = [...out.matchAll(/start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\s*$/gm)].at(-1);
  const lost = /Total lost packets (\d+) /.exec(out);
  if (totals === undefined || lost === null) throw new Error(`turnutils_uclient printed no summary (exit ${proc.child.exitCode}):\n${out.slice(-4000)}`);
  return { exitCode: proc.child.exitCode, output: out, sent: Number(totals[1]), received: Number(totals[2]), lost: Number(lost[1]) };
}

// ---------------------------------------------------------------------------------------------
// Chromium

export interface GatherReport {
  /** ICE candidate lines, e.g. "candidate:… 1 udp 8191 127.0.0.1 50123 typ relay raddr …". */
  readonly candidates: string[];
  readonly errors: Array<{ url: string; code: number; text: string }>;
  /** The optional HTTPS fetch made by the same page. */
  readonly probe: { status: number; body: string } | { error: string } | null;
  readonly state: string;
  readonly exception: string | null;
}

/**
 * Loads test/fixtures/webrtc-turn.html in headless Chromium: an RTCPeerConnection with one TURN
 * server and iceTransportPolicy "relay" gathers candidates (and, with `probeUrl`, first fetches
 * that URL); the page POSTs what it saw back to us. Chromium is stopped and its profile removed
 * before this returns, whatever happened.
 */
export async function gatherWithChromium(opts: {
  turnUrl: string; username: string; credential: string; probeUrl?: string;
  /** Chromium flags beyond the headless basics, e.g. --host-resolver-rules, certificate flags. */
  args: readonly string[];
  timeoutMs?: number;
}): Promise<{ report: GatherReport; chromiumOutput: string }> {
  const page = readFileSync(PAGE);
  let report: GatherReport | null = null;
  const server = http.createServer((req, res) => {
    if (req.method === 'POST' && req.url === '/report') {
      let body = '';
      req.on('data', (d) => (body += d));
      req.on('end', () => {
        report = JSON.parse(body) as GatherReport;
        res.end('ok');
      });
      return;
    }
    if (req.method === 'GET' && req.url?.startsWith('/?')) {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end(page);
      return;
    }
    res.writeHead(404).end();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const profile = tempDir('sni-router-chromium-');
  const query = new URLSearchParams({
    turn: opts.turnUrl, username: opts.username, credential: opts.credential, probe: opts.probeUrl ?? '',
  });
  const url = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/?${query}`;
  const chromium = new Proc(CHROMIUM, [
    '--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--no-default-browser-check',
    '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
    `--user-data-dir=${profile.dir}`, ...opts.args, url,
  ], { group: true });
  try {
    const ms = opts.timeoutMs ?? 45_000;
    try {
      await waitFor(() => report !== null || !chromium.running, ms, 'the page to report its ICE candidates');
    } catch (err) {
      throw new Error(`${(err as Error).message}\n--- chromium output (tail) ---\n${chromium.output.slice(-4000)}`);
    }
    if (report === null) throw new Error(`chromium exited before the page reported:\n${chromium.output.slice(-4000)}`);
    return { report, chromiumOutput: chromium.output };
  } finally {
    await chromium.stop();
    await new Promise<void>((r) => {
      server.close(() => r());
      server.closeAllConnections();
    });
    profile.cleanup();
  }
}
