// bin/sni-router as a real process, for tests that need what only a process shows: its exit after
// a signal, its file descriptors in /proc, a `check` that must return.
import { type ChildProcess, spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { waitFor } from '../helpers.ts';

export const BIN = join(import.meta.dirname, '..', '..', 'bin', 'sni-router');

export interface RouterProcess {
  readonly child: ChildProcess;
  readonly pid: number;
  readonly port: number;
  readonly adminPort: number;
  readonly logs: Array<Record<string, unknown>>;
  stderr(): string;
  /** Exit code and signal, once it has exited. */
  readonly exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Open file descriptors of the process now (/proc/<pid>/fd). */
  fds(): number;
}

/** Collects the JSON lines of a stream (pino on stdout). */
function jsonLines(stream: NodeJS.ReadableStream, into: Array<Record<string, unknown>>): void {
  let buf = '';
  stream.on('data', (d: Buffer) => {
    buf += d.toString();
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      try {
        into.push(JSON.parse(line) as Record<string, unknown>);
      } catch {
        into.push({ raw: line });
      }
    }
  });
}

/** Runs `bin/sni-router --config FILE` and waits for "sni-router started". */
export async function spawnRouterProcess(configFile: string): Promise<RouterProcess> {
  const child = spawn(BIN, ['--config', configFile], { stdio: ['ignore', 'pipe', 'pipe'] });
  const logs: Array<Record<string, unknown>> = [];
  jsonLines(child.stdout!, logs);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => {
    stderr += d.toString();
  });
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.on('exit', (code, signal) => resolve({ code, signal }));
  });
  try {
    await waitFor(() => logs.some((l) => l.msg === 'sni-router started') || child.exitCode !== null, 20_000, 'the router to start');
  } catch (err) {
    child.kill('SIGKILL');
    throw new Error(`${(err as Error).message}: ${stderr}`);
  }
  const started = logs.find((l) => l.msg === 'sni-router started');
  if (started === undefined) throw new Error(`the router exited at start: ${stderr}`);
  const portOf = (a: unknown) => Number(String(a).split(':').pop());
  return {
    child,
    pid: child.pid!,
    port: portOf((started.listen as string[])[0]),
    adminPort: portOf(started.admin),
    logs,
    stderr: () => stderr,
    exit,
    fds: () => readdirSync(`/proc/${child.pid}/fd`).length,
  };
}
