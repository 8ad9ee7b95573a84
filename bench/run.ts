// npm run bench [-- --quick] [-- --only=cps,ttfb] [-- --proxies=haproxy,sni-router] [-- --runs=N]
//
// The side-by-side benchmark of issue 6: sni-router against HAProxy, nginx and sniproxy (and a
// direct baseline), configured alike, one proxy at a time, each pinned to CPU 0 with the load on
// CPU 1. Writes bench/RESULTS.md (a full run) and raw JSON, logs and the report into bench/out/.
// bench/README.md says what each figure means.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { cpus, loadavg, tmpdir, totalmem } from 'node:os';
import { join, relative } from 'node:path';
import {
  type FigureId, FIGURES, FULL_DURATIONS, type Hello, type Measurement, QUICK_DURATIONS, type RunContext, casesFor, measure,
} from './lib/figures.ts';
import { DEFAULT_TARGETS, LOAD_CPU, PROXY_CPU, TARGETS, type Target, unavailable, versions } from './lib/peers.ts';
import { Proc, installCleanup, killAll } from './lib/proc.ts';
import { renderReport } from './lib/report.ts';
import { fmt } from './lib/stats.ts';
import { UPDATE_SOURCES, measureUpdates } from './lib/updates.ts';

const REPO = join(import.meta.dirname, '..');
const BENCH = join(REPO, 'bench');
/** The Chromium captures, kept with the tests' fixtures (one copy, test/fixtures/README.md says where they came from). */
const CHROMIUM_FIXTURES = process.env.BENCH_FIXTURES ?? join(REPO, 'test', 'fixtures');
const NODE = join(REPO, 'node_modules', '.bin', 'node');

const HELP = `npm run bench -- [options]

  --quick               short windows, one run (a smoke test: ~3 minutes); the report goes to bench/out/ only
  --only=LIST           figures: ${FIGURES.join(',')} (default: all)
  --proxies=LIST        targets: ${TARGETS.join(',')}
                        (default: all; nginx-64k only in the throughput figure unless named here)
  --runs=N              runs per figure (default 3; 1 with --quick)
  --hellos=LIST         ClientHellos for figures 1 and 2: chromium,openssl (default: both)
  --idle-conns=N        idle connections for figure 5 (default 9500)
  --changes=N           route changes per source and run for figure 6a (default 100; 10 with --quick)
  --workers=N           also run sni-router with workers: N (target sni-router-workers, default N 2) in the
                        connections/s figure, unpinned (its workers share CPU 1 with the load generator)
  --recapture-openssl   capture bench/fixtures/openssl-clienthello.bin again with openssl s_client
  --help

Environment: BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres),
BENCH_REDIS_URL (default redis://127.0.0.1:6379/0), BENCH_FIXTURES (default test/fixtures).
`;

interface Options {
  quick: boolean;
  figures: FigureId[];
  targets: Target[];
  runs: number;
  hellos: string[];
  idleConns: number;
  changes: number;
  recapture: boolean;
  /** workers: for sni-router-workers; 0 when --workers was not given. */
  workers: number;
  /** --proxies was given: run exactly those, in every figure. */
  explicitTargets: boolean;
}

function parseList<T extends string>(value: string, allowed: readonly T[], what: string): T[] {
  const items = value.split(',').map((s) => s.trim()).filter(Boolean);
  for (const i of items) {
    if (!allowed.includes(i as T)) throw new Error(`unknown ${what} "${i}" (one of: ${allowed.join(', ')})`);
  }
  return items as T[];
}

function parseOptions(argv: readonly string[]): Options {
  const o: Options = {
    quick: false, figures: [...FIGURES], targets: [...DEFAULT_TARGETS], runs: 0, hellos: ['chromium', 'openssl'],
    idleConns: 9500, changes: 0, recapture: false, explicitTargets: false, workers: 0,
  };
  for (const a of argv) {
    const [k, v = ''] = a.split('=', 2) as [string, string?];
    switch (k) {
      case '--quick': o.quick = true; break;
      case '--only': o.figures = parseList(v.replace(/\brss\b/, 'idle'), FIGURES, 'figure'); break;
      case '--proxies': o.targets = parseList(v, TARGETS, 'proxy'); o.explicitTargets = true; break;
      case '--runs': o.runs = Number(v); break;
      case '--hellos': o.hellos = parseList(v, ['chromium', 'openssl'], 'hello'); break;
      case '--idle-conns': o.idleConns = Number(v); break;
      case '--changes': o.changes = Number(v); break;
      case '--recapture-openssl': o.recapture = true; break;
      case '--workers': o.workers = v === '' ? 2 : Number(v); break;
      case '--help': case '-h': process.stdout.write(HELP); process.exit(0); break;
      default: throw new Error(`unknown option ${a}\n\n${HELP}`);
    }
  }
  if (o.runs === 0) o.runs = o.quick ? 1 : 3;
  if (o.changes === 0) o.changes = o.quick ? 10 : 100;
  if (!Number.isInteger(o.workers) || o.workers < 0 || o.workers > 64) throw new Error('--workers must be 2..64');
  if (o.workers === 1) throw new Error('--workers=1 is the sni-router target itself: give 2 or more');
  if (o.workers > 1 && !o.targets.includes('sni-router-workers')) o.targets.push('sni-router-workers');
  if (o.targets.includes('sni-router-workers') && o.workers === 0) o.workers = 2;
  if (!Number.isInteger(o.runs) || o.runs < 1) throw new Error('--runs must be a positive integer');
  if (!Number.isInteger(o.idleConns) || o.idleConns < 1 || o.idleConns > 9800) throw new Error('--idle-conns must be 1..9800');
  // Keep the canonical order whatever order they were given in.
  o.figures = FIGURES.filter((f) => o.figures.includes(f));
  o.targets = TARGETS.filter((t) => o.targets.includes(t));
  return o;
}

function log(msg: string): void {
  process.stderr.write(`${new Date().toISOString().slice(11, 19)} ${msg}\n`);
}

/** Compiles bench/loadgen.c into bench/loadgen (gitignored) when the source is newer. */
function buildLoadgen(): string {
  const src = join(BENCH, 'loadgen.c');
  const bin = join(BENCH, 'loadgen');
  if (!existsSync(bin) || statSync(bin).mtimeMs < statSync(src).mtimeMs) {
    log('compiling bench/loadgen.c');
    execFileSync('cc', ['-O2', '-Wall', '-Wextra', '-o', bin, src], { stdio: 'inherit' });
  }
  return bin;
}

/**
 * Captures the first flight of `openssl s_client -servername cdn.example.com` against a plain TCP
 * listener: the bytes it sends before it waits for the server (its ClientHello).
 */
async function captureOpensslHello(dest: string): Promise<Buffer> {
  const hello = await new Promise<Buffer>((resolve, reject) => {
    let client: ReturnType<typeof startCapturingClient> | null = null;
    const server = net.createServer((s) => {
      const got: Buffer[] = [];
      let timer: NodeJS.Timeout | null = null;
      s.on('data', (d: Buffer) => {
        got.push(d);
        if (timer !== null) clearTimeout(timer);
        timer = setTimeout(() => {
          s.destroy();
          server.close();
          client?.kill();
          resolve(Buffer.concat(got));
        }, 300);
      });
      s.on('error', () => {});
    });
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const port = (server.address() as net.AddressInfo).port;
      client = startCapturingClient('openssl', ['s_client', '-connect', `127.0.0.1:${port}`, '-servername', 'cdn.example.com']);
    });
    setTimeout(() => reject(new Error('openssl s_client sent nothing within 10 s')), 10_000).unref();
  });
  if (hello.length < 50 || hello[0] !== 0x16) throw new Error(`openssl s_client sent ${hello.length} bytes that are not a TLS handshake`);
  writeFileSync(dest, hello);
  return hello;
}

function startCapturingClient(cmd: string, args: string[]): { kill: () => void } {
  const p = new Proc(cmd, args, { cpu: LOAD_CPU, name: cmd, logFile: '/dev/null' });
  return { kill: () => p.kill('SIGKILL') };
}

async function loadHellos(o: Options): Promise<Hello[]> {
  const out: Hello[] = [];
  for (const name of o.hellos) {
    if (name === 'chromium') {
      const file = join(CHROMIUM_FIXTURES, 'chromium-https-clienthello.bin');
      if (!existsSync(file)) throw new Error(`${file} is missing: set BENCH_FIXTURES to the folder with the Chromium captures`);
      out.push({ name, file, bytes: statSync(file).size, note: 'Chromium 156, X25519MLKEM768 key share, GREASE, ECH GREASE, ALPN h2/http1.1' });
    } else {
      const file = join(BENCH, 'fixtures', 'openssl-clienthello.bin');
      if (o.recapture || !existsSync(file)) {
        mkdirSync(join(BENCH, 'fixtures'), { recursive: true });
        await captureOpensslHello(file);
        log(`captured ${relative(REPO, file)} with openssl s_client`);
      }
      out.push({ name, file, bytes: statSync(file).size, note: `openssl s_client -servername cdn.example.com, ${relative(REPO, file)}` });
    }
  }
  return out;
}

function machine(): Record<string, string> {
  const run = (cmd: string, args: string[]) => {
    try {
      return execFileSync(cmd, args, { encoding: 'utf8' }).trim();
    } catch {
      return '?';
    }
  };
  return {
    nproc: run('nproc', ['--all']),
    kernel: run('uname', ['-r']),
    cpu: cpus()[0]?.model ?? '?',
    memory: `${fmt(totalmem() / 2 ** 30, 1)} GiB`,
    'ulimit -n': run('sh', ['-c', 'ulimit -n']),
    'load average at start': loadavg().map((x) => x.toFixed(2)).join(' '),
  };
}

/** Pins this harness (every thread) to the load CPU, so it never competes with the proxy. */
function pinSelf(): void {
  try {
    execFileSync('taskset', ['-a', '-p', '-c', String(LOAD_CPU), String(process.pid)], { stdio: 'ignore' });
  } catch {
    log('warning: could not pin the harness to CPU 1');
  }
}

async function runTable(ctx: RunContext, rep: number): Promise<Measurement> {
  const base = { rep, figure: 'table' as const, case: '100k', target: 'sni-router' };
  const p = new Proc(NODE, ['--expose-gc', join(BENCH, 'table.ts'), '--json'], {
    cpu: PROXY_CPU, name: 'table', logFile: join(ctx.logDir, `${rep}-table.log`), cwd: REPO,
  });
  try {
    const r = await p.waitLine<{
      routes: number; heap_mb: Record<string, number>; lookup_ns: Record<string, number>;
      build_swap_ms: { median: number }; composer_apply_ms: { median: number };
    }>((v) => typeof (v as { routes?: unknown }).routes === 'number', 180_000);
    if (r === undefined) throw new Error(`bench/table.ts failed:\n${p.tail()}`);
    return {
      ...base, ok: true, raw: r,
      metrics: {
        routes: r.routes,
        lookup_exact_ns: r.lookup_ns.exact, lookup_wildcard_ns: r.lookup_ns.wildcard, lookup_any_ns: r.lookup_ns.any,
        lookup_miss_ns: r.lookup_ns.miss, lookup_mixed_ns: r.lookup_ns.mixed,
        build_swap_ms: r.build_swap_ms.median, composer_apply_ms: r.composer_apply_ms.median,
        heap_table_mb: r.heap_mb.table, heap_total_mb: r.heap_mb.total,
      },
    };
  } catch (err) {
    return { ...base, ok: false, error: (err as Error).message, metrics: {} };
  } finally {
    await p.stop(2000);
  }
}

function summary(m: Measurement): string {
  if (m.skipped !== undefined) return `skipped: ${m.skipped.split('\n')[0]}`;
  if (!m.ok) return `FAILED: ${(m.error ?? '').split('\n')[0]}`;
  const x = m.metrics;
  const err = (x.errors ?? 0) > 0 ? `, ${x.errors} errors` : '';
  switch (m.figure) {
    case 'cps': return `${fmt(x.cps, 0)} conn/s, ${fmt(x.cpu_us_per_conn)} µs CPU/conn${err}`;
    case 'ttfb': return `p50 ${fmt(x.p50_us)} µs, p99 ${fmt(x.p99_us)} µs${err}`;
    case 'tput': return `${fmt(x.gbit_s)} Gbit/s, proxy CPU ${fmt(x.cpu_pct, 0)}%${err}`;
    case 'turn': return `RTT p50 ${fmt(x.rtt_p50_us)} p99 ${fmt(x.rtt_p99_us)} p99.9 ${fmt(x.rtt_p999_us)} µs, proxy CPU ${fmt(x.cpu_pct)}%, lost ${x.lost}${err}`;
    case 'idle': return `${fmt(x.kib_per_conn)} KiB/conn (${fmt(x.rss_before_mib)} → ${fmt(x.rss_with_mib)} MiB, ${x.established} conns)${err}`;
    case 'updates': return `p50 ${fmt(x.p50_ms)} ms, p99 ${fmt(x.p99_ms)} ms over ${x.changes} changes, ${x.timeouts} timeouts, ${x.glitches} glitches`;
    case 'table': return `lookup ${fmt(x.lookup_mixed_ns, 0)} ns, build+swap ${fmt(x.build_swap_ms)} ms, composer ${fmt(x.composer_apply_ms)} ms, table ${fmt(x.heap_table_mb)} MB`;
  }
}

/** Scratch space for configs, removed however the run ends. */
let scratch: string | null = null;

async function main(): Promise<void> {
  const o = parseOptions(process.argv.slice(2));
  const started = new Date();
  const stamp = started.toISOString().replace(/[:.]/g, '-').slice(0, 19);
  const outDir = join(BENCH, 'out', `${stamp}${o.quick ? '-quick' : ''}`);
  const logDir = join(outDir, 'logs');
  mkdirSync(logDir, { recursive: true });
  const tmp = mkdtempSync(join(tmpdir(), 'sni-bench-'));
  scratch = tmp;
  installCleanup(() => rmSync(tmp, { recursive: true, force: true }));
  const mach = machine();
  pinSelf();

  const loadgen = buildLoadgen();
  const hellos = await loadHellos(o);
  const durations = o.quick ? QUICK_DURATIONS : FULL_DURATIONS;
  const ctx: RunContext = { repo: REPO, loadgen, tmp, logDir, durations, settleMs: o.quick ? 200 : 500, sniRouterWorkers: o.workers };
  const vers = versions(REPO);

  const skippedTargets: Record<string, string> = {};
  const targets: Target[] = [];
  for (const t of o.targets) {
    const why = unavailable(t);
    if (why === null) targets.push(t);
    else {
      skippedTargets[t] = why;
      log(`${t}: not measured: ${why}`);
    }
  }
  const wantsSniRouter = o.figures.some((f) => f === 'updates' || f === 'table');
  if (wantsSniRouter && !o.targets.includes('sni-router')) log('note: updates/table measure sni-router only; they run because --only names them');

  const ms: Measurement[] = [];
  const rawFile = join(outDir, 'raw.json');
  const meta = () => ({
    started: started.toISOString(),
    elapsedS: (Date.now() - started.getTime()) / 1000,
    quick: o.quick,
    runs: o.runs,
    command: `npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`,
    machine: { ...mach, 'load average at end': loadavg().map((x) => x.toFixed(2)).join(' ') },
    versions: vers,
    hellos,
    durations,
    idleConns: o.idleConns,
    sniRouterWorkers: o.workers,
    updateChanges: o.changes,
    targets,
    figures: o.figures,
    skippedTargets,
    rawFile: relative(REPO, rawFile),
  });
  const save = () => writeFileSync(rawFile, `${JSON.stringify({ meta: meta(), measurements: ms }, null, 1)}\n`);
  const record = (m: Measurement, label: string) => {
    ms.push(m);
    log(`${label}: ${summary(m)}`);
    save();
  };

  log(`output: ${relative(REPO, outDir)}; ${o.runs} run(s) of ${o.figures.join(', ')} for ${targets.join(', ')}`);
  for (let rep = 1; rep <= o.runs; rep++) {
    for (const figure of o.figures) {
      if (figure === 'updates') {
        for (const source of UPDATE_SOURCES) {
          const m = await measureUpdates(ctx, rep, source, {
            changes: o.changes,
            hello: hellos.find((h) => h.name === 'chromium') ?? hellos[0],
            helloBytes: readFileSync((hellos.find((h) => h.name === 'chromium') ?? hellos[0]).file),
            databaseUrl: process.env.BENCH_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres',
            redisUrl: process.env.BENCH_REDIS_URL ?? 'redis://127.0.0.1:6379/0',
          });
          record(m, `[run ${rep}/${o.runs}] updates ${source}`);
        }
        continue;
      }
      if (figure === 'table') {
        record(await runTable(ctx, rep), `[run ${rep}/${o.runs}] table`);
        continue;
      }
      for (const c of casesFor(figure, hellos, durations, o.idleConns)) {
        for (const target of targets) {
          if (figure === 'idle' && target === 'direct') continue; // no proxy, nothing to weigh
          if (target === 'nginx-64k' && figure !== 'tput' && !o.explicitTargets) continue;
          if (target === 'sni-router-workers' && figure !== 'cps' && !o.explicitTargets) continue;
          const m = await measure(ctx, rep, figure, c, target);
          record(m, `[run ${rep}/${o.runs}] ${figure} ${c.id} ${target}`);
        }
      }
    }
  }

  save();
  const report = renderReport(meta(), ms);
  writeFileSync(join(outDir, 'RESULTS.md'), report);
  if (!o.quick) {
    writeFileSync(join(BENCH, 'RESULTS.md'), report);
    log(`wrote bench/RESULTS.md and ${relative(REPO, outDir)}/`);
  } else {
    log(`quick run: wrote ${relative(REPO, join(outDir, 'RESULTS.md'))} (bench/RESULTS.md is written by full runs only)`);
  }
  rmSync(tmp, { recursive: true, force: true });
  const failed = ms.filter((m) => !m.ok && m.skipped === undefined).length;
  log(`done in ${fmt((Date.now() - started.getTime()) / 60000, 1)} min; ${ms.length} measurements, ${failed} failed`);
  if (failed > 0) process.exitCode = 1;
}

main().catch((err: Error) => {
  process.stderr.write(`bench: ${err.message}\n`);
  killAll();
  if (scratch !== null) rmSync(scratch, { recursive: true, force: true });
  process.exit(2);
});
