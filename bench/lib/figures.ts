// The load figures (1–5): what each one runs, and which numbers it keeps. One measurement is one
// target (a proxy, or direct) through one case of one figure in one run: a fresh backend process,
// a fresh proxy, then the client; the proxy's CPU time is sampled at the client's window marks and
// its memory around the idle hold.
import { join } from 'node:path';
import { type Target, LOAD_CPU, WORKERS_TARGET, startProxy, type RunningProxy } from './peers.ts';
import { Proc, cpuSeconds, freePorts, rssKiB, sleep, childPids, treeCpuSeconds } from './proc.ts';

export const LOAD_FIGURES = ['cps', 'ttfb', 'tput', 'turn', 'idle'] as const;
export const SNI_ROUTER_FIGURES = ['updates', 'table'] as const;
export const FIGURES = [...LOAD_FIGURES, ...SNI_ROUTER_FIGURES] as const;
export type LoadFigure = (typeof LOAD_FIGURES)[number];
export type FigureId = (typeof FIGURES)[number];

export interface Hello {
  /** "chromium" or "openssl". */
  readonly name: string;
  readonly file: string;
  readonly bytes: number;
  readonly note: string;
}

export interface Durations {
  readonly cps: { readonly warmup: number; readonly duration: number };
  readonly ttfb: { readonly warmup: number; readonly duration: number };
  readonly tput: { readonly warmup: number; readonly duration: number };
  readonly turn: { readonly warmup: number; readonly duration: number };
  /** How long the idle connections are held before memory is read. */
  readonly idleSettle: number;
}

export const FULL_DURATIONS: Durations = {
  cps: { warmup: 1, duration: 10 },
  ttfb: { warmup: 0.5, duration: 5 },
  tput: { warmup: 1, duration: 5 },
  turn: { warmup: 2, duration: 10 },
  idleSettle: 2,
};

export const QUICK_DURATIONS: Durations = {
  cps: { warmup: 0.5, duration: 2 },
  ttfb: { warmup: 0.3, duration: 1 },
  tput: { warmup: 0.5, duration: 1.5 },
  turn: { warmup: 2, duration: 2 },
  idleSettle: 1,
};

export const CPS_IN_FLIGHT = 64;
export const TURN_CONNS = 500;
export const TURN_INTERVAL_MS = 20;
export const TURN_PACKET = 200;
export const TPUT_CASES = [
  { streams: 1, dir: 'up' },
  { streams: 1, dir: 'down' },
  { streams: 50, dir: 'up' },
  { streams: 50, dir: 'down' },
] as const;

export interface Case {
  /** Unique within the figure: "chromium", "1x up", ... */
  readonly id: string;
  readonly hello: Hello;
  readonly backendMode: 'reply' | 'hold' | 'sink' | 'source' | 'echo';
  readonly clientMode: 'conn' | 'tput' | 'turn' | 'idle';
  readonly clientArgs: readonly string[];
  /** Seconds the client takes at most, before it is killed. */
  readonly maxSeconds: number;
}

export function casesFor(figure: LoadFigure, hellos: readonly Hello[], d: Durations, idleConns: number): Case[] {
  const chromium = hellos.find((h) => h.name === 'chromium') ?? hellos[0];
  const win = (w: { warmup: number; duration: number }) => ['--warmup', String(w.warmup), '--duration', String(w.duration)];
  switch (figure) {
    case 'cps':
      return hellos.map((hello) => ({
        id: hello.name, hello, backendMode: 'reply', clientMode: 'conn',
        clientArgs: ['--conc', String(CPS_IN_FLIGHT), ...win(d.cps)], maxSeconds: d.cps.warmup + d.cps.duration + 30,
      }));
    case 'ttfb':
      return hellos.map((hello) => ({
        id: hello.name, hello, backendMode: 'reply', clientMode: 'conn',
        clientArgs: ['--conc', '1', ...win(d.ttfb)], maxSeconds: d.ttfb.warmup + d.ttfb.duration + 30,
      }));
    case 'tput':
      return TPUT_CASES.map((c) => ({
        id: `${c.streams}x ${c.dir}`, hello: chromium, backendMode: c.dir === 'up' ? 'sink' : 'source', clientMode: 'tput',
        clientArgs: ['--streams', String(c.streams), '--dir', c.dir, ...win(d.tput)], maxSeconds: d.tput.warmup + d.tput.duration + 30,
      }));
    case 'turn':
      return [{
        id: 'turn', hello: chromium, backendMode: 'echo', clientMode: 'turn',
        clientArgs: ['--conns', String(TURN_CONNS), '--interval-ms', String(TURN_INTERVAL_MS), '--size', String(TURN_PACKET), ...win(d.turn)],
        maxSeconds: d.turn.warmup + d.turn.duration + 30,
      }];
    case 'idle':
      return [{
        id: 'idle', hello: chromium, backendMode: 'hold', clientMode: 'idle',
        clientArgs: ['--conns', String(idleConns), '--parallel', '256', '--hold', '300'], maxSeconds: 300,
      }];
  }
}

export interface Measurement {
  readonly rep: number;
  readonly figure: FigureId;
  readonly case: string;
  readonly target: Target | string;
  readonly ok: boolean;
  readonly error?: string;
  /** Why it could not be measured here (a missing peer or feature), as opposed to a failure. */
  readonly skipped?: string;
  readonly metrics: Record<string, number | null>;
  readonly raw?: unknown;
}

export interface RunContext {
  readonly repo: string;
  readonly loadgen: string;
  /** Scratch space for configs; removed at the end. */
  readonly tmp: string;
  readonly logDir: string;
  readonly durations: Durations;
  /** Pause after the proxy listens, before measuring. */
  readonly settleMs: number;
  /** `workers:` of the sni-router-workers target. */
  readonly sniRouterWorkers?: number;
}

interface ClientFinal {
  mode: string;
  error_total: number;
  [k: string]: unknown;
}

interface Latency {
  p50: number;
  p90: number;
  p99: number;
  p999: number;
  max: number;
  mean: number;
  n: number;
}

const isMark = (name: string) => (v: unknown) => (v as { mark?: string }).mark === name;
const isFinal = (v: unknown) => typeof (v as { mode?: unknown }).mode === 'string';

/** Runs one case against one target and returns its numbers. Never throws: a failure is recorded. */
export async function measure(ctx: RunContext, rep: number, figure: LoadFigure, c: Case, target: Target): Promise<Measurement> {
  const tag = `${rep}-${figure}-${c.id.replace(/\W+/g, '_')}-${target}`;
  const logFile = join(ctx.logDir, `${tag}.log`);
  let backend: Proc | null = null;
  let proxy: RunningProxy | null = null;
  let client: Proc | null = null;
  try {
    const [listen, a, b, admin] = await freePorts(4);
    backend = new Proc(ctx.loadgen, [
      'backend', '--ports', `${a},${b}`, '--mode', c.backendMode, '--hello-bytes', String(c.hello.bytes),
      '--max-seconds', String(c.maxSeconds + 60),
    ], { cpu: LOAD_CPU, name: 'backend', logFile });
    if ((await backend.waitLine((v) => (v as { ready?: boolean }).ready === true, 5000)) === undefined) {
      throw new Error(`backend did not start:\n${backend.tail()}`);
    }
    proxy = await startProxy(target, { listen, a, b, admin }, { repo: ctx.repo, dir: join(ctx.tmp, tag), logFile },
      target === WORKERS_TARGET ? { workers: ctx.sniRouterWorkers ?? 2 } : {});
    // With workers the proxy is several processes: the primary and the workers it forked.
    const proxyCpu = target === WORKERS_TARGET ? treeCpuSeconds : cpuSeconds;
    await sleep(ctx.settleMs);
    const pid = proxy.proc?.pid ?? null;
    const children = pid === null ? [] : childPids(pid);
    const rssBefore = pid === null ? null : rssKiB(pid);
    client = new Proc(ctx.loadgen, ['client', c.clientMode, '--port', String(proxy.port), '--hello', c.hello.file, ...c.clientArgs], {
      cpu: LOAD_CPU, name: 'client', logFile, stdin: c.clientMode === 'idle',
    });
    const limit = c.maxSeconds * 1000;
    let cpuStart: number | null = null;
    let cpuEnd: number | null = null;
    let rssReady: number | null = null;
    let rssWith: number | null = null;
    let ready: { established: number; failed: number; setup_s: number } | undefined;
    if (c.clientMode === 'idle') {
      ready = await client.waitLine(isMark('ready'), limit);
      if (ready === undefined) throw new Error(`client exited before its connections were up:\n${client.tail()}`);
      if (pid !== null) rssReady = rssKiB(pid);
      await sleep(ctx.durations.idleSettle * 1000);
      if (pid !== null) rssWith = rssKiB(pid);
      client.child.stdin?.end();
    } else {
      if ((await client.waitLine(isMark('start'), limit)) === undefined) throw new Error(`client failed:\n${client.tail()}`);
      if (pid !== null) cpuStart = proxyCpu(pid);
      if ((await client.waitLine(isMark('end'), limit)) === undefined) throw new Error(`client failed:\n${client.tail()}`);
      if (pid !== null) cpuEnd = proxyCpu(pid);
    }
    const final = await client.waitLine<ClientFinal>(isFinal, 30_000);
    if (final === undefined) throw new Error(`client gave no result:\n${client.tail()}`);
    await client.waitExit(5000);
    if (proxy.proc !== null && !proxy.proc.alive) {
      throw new Error(`${target} died during the measurement (code ${proxy.proc.exitCode}, signal ${proxy.proc.exitSignal}):\n${proxy.proc.tail()}`);
    }
    const cpu = cpuStart === null || cpuEnd === null ? null : cpuEnd - cpuStart;
    const metrics = extract(figure, final, cpu, { rssBefore, rssReady, rssWith, ready });
    const raw = { client: final, proxy: { pid, children, rss_before_kib: rssBefore, rss_ready_kib: rssReady, rss_with_kib: rssWith, cpu_s: cpu } };
    return { rep, figure, case: c.id, target, ok: true, metrics, raw };
  } catch (err) {
    return { rep, figure, case: c.id, target, ok: false, error: (err as Error).message, metrics: {} };
  } finally {
    await client?.stop(2000);
    await proxy?.stop();
    await backend?.stop(2000);
  }
}

function extract(
  figure: LoadFigure,
  f: ClientFinal,
  cpu: number | null,
  mem: { rssBefore: number | null; rssReady: number | null; rssWith: number | null; ready?: { established: number; failed: number } },
): Record<string, number | null> {
  const window = Number(f.window_s);
  const errors = Number(f.error_total);
  switch (figure) {
    case 'cps': {
      const ok = Number(f.ok);
      const lat = f.latency_us as Latency | null;
      return {
        cps: Number(f.rate),
        cpu_us_per_conn: cpu === null || ok === 0 ? null : (cpu * 1e6) / ok,
        cpu_pct: cpu === null ? null : (cpu / window) * 100,
        conn_p50_us: lat?.p50 ?? null,
        errors: errors + Number(f.incomplete),
      };
    }
    case 'ttfb': {
      const lat = f.latency_us as Latency | null;
      return { p50_us: lat?.p50 ?? null, p99_us: lat?.p99 ?? null, p999_us: lat?.p999 ?? null, samples: lat?.n ?? 0, errors };
    }
    case 'tput':
      return {
        gbit_s: Number(f.gbit_s),
        cpu_pct: cpu === null ? null : (cpu / window) * 100,
        errors: errors + Number(f.streams_lost),
      };
    case 'turn': {
      const rtt = f.rtt_us as Latency | null;
      const lag = f.send_lag_us as Latency | null;
      return {
        rtt_p50_us: rtt?.p50 ?? null,
        rtt_p99_us: rtt?.p99 ?? null,
        rtt_p999_us: rtt?.p999 ?? null,
        cpu_pct: cpu === null ? null : (cpu / window) * 100,
        lost: Number(f.lost),
        send_lag_p99_us: lag?.p99 ?? null,
        errors: errors + Number(f.conns_lost),
      };
    }
    case 'idle': {
      const established = mem.ready?.established ?? 0;
      const per = mem.rssBefore === null || mem.rssWith === null || established === 0
        ? null
        : (mem.rssWith - mem.rssBefore) / established;
      return {
        rss_before_mib: mem.rssBefore === null ? null : mem.rssBefore / 1024,
        rss_with_mib: mem.rssWith === null ? null : mem.rssWith / 1024,
        kib_per_conn: per,
        established,
        errors: (mem.ready?.failed ?? 0) + Number(f.dropped),
      };
    }
  }
}
