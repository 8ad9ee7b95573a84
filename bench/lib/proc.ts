// Processes of the benchmark: start pinned to a CPU, read their JSON lines, sample their CPU time
// and memory from /proc, and make sure every one of them is gone when the harness ends, however it
// ends (normal exit, a thrown error, ctrl-C, SIGTERM). Each child runs in its own process group
// under `setpriv --pdeathsig KILL`, so it dies with the harness even if the harness is SIGKILLed.
import { type ChildProcess, spawn } from 'node:child_process';
import { createWriteStream, readFileSync, type WriteStream } from 'node:fs';
import net from 'node:net';
import { createInterface } from 'node:readline';

export interface StartOptions {
  /** The CPU to pin to (taskset -c): one CPU, or a list such as "0-1". */
  readonly cpu: number | string;
  /** A short name for errors and the log file. */
  readonly name: string;
  /** stdout and stderr are appended here. */
  readonly logFile: string;
  readonly cwd?: string;
  readonly env?: NodeJS.ProcessEnv;
  /** Keep stdin open as a pipe (the idle client quits when it closes). */
  readonly stdin?: boolean;
}

/** A running child: its JSON lines as they come, its exit, and its tail of output for errors. */
export class Proc {
  readonly name: string;
  readonly child: ChildProcess;
  readonly pid: number;
  readonly lines: unknown[] = [];
  #tail: string[] = [];
  #waiters: Array<{ test: (v: unknown) => boolean; resolve: (v: unknown) => void }> = [];
  #log: WriteStream;
  exitCode: number | null = null;
  exitSignal: string | null = null;
  readonly exited: Promise<void>;

  constructor(cmd: string, args: readonly string[], opts: StartOptions) {
    this.name = opts.name;
    this.#log = createWriteStream(opts.logFile, { flags: 'a' });
    this.#log.write(`# ${new Date().toISOString()} cpu ${opts.cpu}: ${cmd} ${args.join(' ')}\n`);
    this.child = spawn('setpriv', ['--pdeathsig', 'KILL', '--', 'taskset', '-c', String(opts.cpu), cmd, ...args], {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      detached: true,
      stdio: [opts.stdin === true ? 'pipe' : 'ignore', 'pipe', 'pipe'],
    });
    if (this.child.pid === undefined) throw new Error(`${opts.name}: cannot start ${cmd}`);
    this.pid = this.child.pid;
    live.add(this);
    this.exited = new Promise((resolve) => {
      this.child.on('exit', (code, signal) => {
        this.exitCode = code;
        this.exitSignal = signal;
        live.delete(this);
        for (const w of this.#waiters) w.resolve(undefined);
        this.#waiters = [];
        resolve();
      });
    });
    this.child.on('error', (err) => this.#remember(`spawn error: ${err.message}`));
    const out = createInterface({ input: this.child.stdout! });
    out.on('line', (line) => {
      this.#log.write(`${line}\n`);
      this.#remember(line);
      if (!line.startsWith('{')) return;
      let v: unknown;
      try {
        v = JSON.parse(line);
      } catch {
        return;
      }
      this.lines.push(v);
      this.#waiters = this.#waiters.filter((w) => {
        if (!w.test(v)) return true;
        w.resolve(v);
        return false;
      });
    });
    createInterface({ input: this.child.stderr! }).on('line', (line) => {
      this.#log.write(`[stderr] ${line}\n`);
      this.#remember(line);
    });
  }

  #remember(line: string): void {
    this.#tail.push(line);
    if (this.#tail.length > 20) this.#tail.shift();
  }

  get alive(): boolean {
    return this.exitCode === null && this.exitSignal === null;
  }

  tail(): string {
    return this.#tail.join('\n');
  }

  /** The first JSON line (already seen or still to come) that passes test; undefined if it exits first. */
  waitLine<T>(test: (v: unknown) => boolean, timeoutMs: number): Promise<T | undefined> {
    const seen = this.lines.find(test);
    if (seen !== undefined) return Promise.resolve(seen as T);
    if (!this.alive) return Promise.resolve(undefined);
    return new Promise<T | undefined>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters = this.#waiters.filter((w) => w.resolve !== done);
        reject(new Error(`${this.name}: no expected output within ${timeoutMs} ms; last output:\n${this.tail()}`));
      }, timeoutMs);
      const done = (v: unknown) => {
        clearTimeout(timer);
        resolve(v as T | undefined);
      };
      this.#waiters.push({ test, resolve: done });
    });
  }

  /** Resolves when it exits; SIGKILLs its group after timeoutMs. */
  async waitExit(timeoutMs: number): Promise<void> {
    const timer = setTimeout(() => this.kill('SIGKILL'), timeoutMs);
    await this.exited;
    clearTimeout(timer);
  }

  kill(signal: NodeJS.Signals): void {
    try {
      process.kill(-this.pid, signal);
    } catch {
      // already gone
    }
  }

  /** SIGTERM, then SIGKILL after graceMs; resolves once it is gone. */
  async stop(graceMs = 3000): Promise<void> {
    if (this.alive) this.kill('SIGTERM');
    await this.waitExit(graceMs);
    // Anything it left behind in its group goes too.
    this.kill('SIGKILL');
    this.#log.end();
  }
}

const live = new Set<Proc>();

/** Kills every child still running; safe to call from an 'exit' handler (synchronous). */
export function killAll(): void {
  for (const p of live) p.kill('SIGKILL');
  live.clear();
}

let cleanupInstalled = false;

/** Kills every child on exit, on SIGINT/SIGTERM/SIGHUP and on an uncaught error. */
export function installCleanup(onSignal: () => void = () => {}): void {
  if (cleanupInstalled) return;
  cleanupInstalled = true;
  process.on('exit', killAll);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(sig, () => {
      process.stderr.write(`\nbench: ${sig}: stopping every process it started\n`);
      killAll();
      onSignal();
      process.exit(130);
    });
  }
}

/** CPU time (user + system, all threads) of a process in seconds, from /proc/PID/stat. */
export function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name, which is in parentheses and may hold spaces.
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // rest[0] is field 3 (state); utime is field 14, stime field 15.
  const utime = Number(rest[11]);
  const stime = Number(rest[12]);
  return (utime + stime) / CLOCK_TICKS;
}

/** Clock ticks per second for /proc times (getconf CLK_TCK: 100 on Linux). */
const CLOCK_TICKS = 100;

/** Resident set size in KiB, from VmRSS in /proc/PID/status. */
export function rssKiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(status);
  if (m === null) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]);
}

/**
 * CPU time of a process and its child processes (sni-router with workers: the primary and the
 * workers it forked), in seconds.
 */
export function treeCpuSeconds(pid: number): number {
  let s = cpuSeconds(pid);
  for (const child of childPids(pid)) {
    try {
      s += cpuSeconds(child);
    } catch {
      // exited meanwhile
    }
  }
  return s;
}

/** Threads and child processes, for the record: a proxy that forks would be measured wrong. */
export function childPids(pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/** `n` distinct free TCP ports on 127.0.0.1 (held open together so none repeats). */
export async function freePorts(n: number): Promise<number[]> {
  const servers: net.Server[] = [];
  const ports: number[] = [];
  for (let i = 0; i < n; i++) {
    const s = net.createServer();
    await new Promise<void>((resolve, reject) => {
      s.once('error', reject);
      s.listen(0, '127.0.0.1', () => resolve());
    });
    servers.push(s);
    ports.push((s.address() as net.AddressInfo).port);
  }
  await Promise.all(servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
  return ports;
}

/** True when something listens on 127.0.0.1:port (read from /proc/net/tcp: no connection made). */
export function isListening(port: number): boolean {
  const want = `0100007F:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  const table = readFileSync('/proc/net/tcp', 'utf8');
  for (const line of table.split('\n')) {
    const f = line.trim().split(/\s+/);
    if (f[1] === want && f[3] === '0A') return true;
  }
  return false;
}

/** Waits until the port listens, or the process dies, or timeoutMs passes. */
export async function waitListening(proc: Proc, port: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (!proc.alive) throw new Error(`${proc.name} exited (code ${proc.exitCode}, signal ${proc.exitSignal}):\n${proc.tail()}`);
    if (isListening(port)) return;
    await sleep(20);
  }
  throw new Error(`${proc.name} did not listen on 127.0.0.1:${port} within ${timeoutMs} ms:\n${proc.tail()}`);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
