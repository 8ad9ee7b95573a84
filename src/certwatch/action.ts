// on_change: how the TURN server is told to load the new pair. A signal to the main process of a
// systemd unit (systemctl kill), to the pid in a pid file or to a Docker container, a restart of a
// unit or a container, or a program run with the deployed paths. Programs and Engine requests run
// with a time limit, programs without a shell; an action that does not succeed throws, and the
// watcher retries it.
import { spawn } from 'node:child_process';
import { readFile, stat } from 'node:fs/promises';
import { DEFAULT_DOCKER_SOCKET } from '../config/certwatch.ts';
import type { CertAction, DockerTarget } from '../config/types.ts';
import type { DeployedPaths } from './deploy.ts';
import { dockerContainerRequest } from './docker.ts';
import { readSafely } from './safe-read.ts';

/**
 * The systemctl binary. SNI_ROUTER_SYSTEMCTL replaces it, for tests only: a script that records its
 * arguments stands in for systemd.
 */
export function systemctlPath(env: NodeJS.ProcessEnv): string {
  const p = env.SNI_ROUTER_SYSTEMCTL;
  return p !== undefined && p !== '' ? p : 'systemctl';
}

export interface ActionOptions {
  readonly env: NodeJS.ProcessEnv;
  readonly timeoutMs: number;
}

/** The argv an exec action runs: {cert} and {key} replaced by the deployed paths, anywhere in an argument. */
export function execArgv(argv: readonly string[], paths: DeployedPaths): string[] {
  return argv.map((a) => a.replaceAll('{cert}', paths.cert).replaceAll('{key}', paths.key));
}

/** What runAction did, for the log. */
export interface ActionDone {
  readonly what: string;
}

const OUTPUT_CAP = 4096;

/** Runs argv (no shell); resolves on exit 0, rejects with its stderr otherwise or on timeout. */
export function runProgram(argv: readonly string[], opts: ActionOptions): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0], argv.slice(1), {
      stdio: ['ignore', 'pipe', 'pipe'], env: opts.env, shell: false, timeout: opts.timeoutMs, killSignal: 'SIGKILL',
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => {
      if (stdout.length < OUTPUT_CAP) stdout += d.toString();
    });
    child.stderr.on('data', (d: Buffer) => {
      if (stderr.length < OUTPUT_CAP) stderr += d.toString();
    });
    child.on('error', (err) => reject(new Error(`${argv[0]}: ${err.message}`)));
    // 'exit', not 'close': a script that leaves a daemon behind holding our pipes has still
    // finished. One more turn of the loop lets the output already in the pipes arrive.
    child.on('exit', (code, signal) => {
      setTimeout(() => {
        child.stdout.destroy();
        child.stderr.destroy();
        if (code === 0) {
          resolve({ stdout, stderr });
          return;
        }
        const how = signal === 'SIGKILL' ? `killed after the ${opts.timeoutMs}ms time limit` : signal !== null ? `killed by ${signal}` : `exit code ${code}`;
        const tail = stderr.trim().split('\n').slice(-3).join(' | ');
        reject(new Error(`${argv.join(' ')}: ${how}${tail === '' ? '' : `: ${tail}`}`));
      }, 20);
    });
  });
}

/**
 * /proc reports process start times in USER_HZ ticks, which is 100 on every architecture Node.js
 * runs on (it is fixed by the kernel's ABI, whatever the kernel's own HZ).
 */
const USER_HZ = 100;
/** A pid file's mtime and the kernel's idea of boot time are both wall clock; allow for a coarse clock. */
const STALE_SLACK_MS = 2000;

/** When process `pid` started (Unix ms), from /proc; null where /proc cannot tell (not Linux, hidepid). */
export async function processStartMs(pid: number): Promise<number | null> {
  try {
    const [stat, procStat] = await Promise.all([readFile(`/proc/${pid}/stat`, 'utf8'), readFile('/proc/stat', 'utf8')]);
    // The command name (field 2) is in parentheses and may hold spaces or ")": fields after it
    // count from the last ")". starttime is field 22, the 20th after the name.
    const starttime = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]);
    const btime = Number(/^btime (\d+)$/m.exec(procStat)?.[1]);
    if (!Number.isFinite(starttime) || !Number.isFinite(btime)) return null;
    return btime * 1000 + (starttime * 1000) / USER_HZ;
  } catch {
    return null;
  }
}

/**
 * The pid a pid file names, refusing anything that is not one ordinary process, and a stale file:
 * a TURN server that died leaves its pid file behind, and its pid may since belong to another
 * process, which SIGUSR2 would kill. A process that started after the file was written is not
 * the one that wrote it.
 */
export async function readPidFile(file: string): Promise<number> {
  const read = await readSafely(file, { within: null, maxBytes: 4096 });
  if (read === null) throw new Error(`pid file ${file} does not exist`);
  if (!read.ok) throw new Error(`pid file ${file}: ${read.reason}: ${read.detail}`);
  const text = read.data.toString('utf8').trim();
  if (!/^\d+$/.test(text)) throw new Error(`pid file ${file} does not hold a pid: "${text.slice(0, 40)}"`);
  const pid = Number(text);
  // 0 would signal our own process group, 1 is init; a pid like that in a pid file is a mistake.
  if (pid <= 1 || pid === process.pid || !Number.isSafeInteger(pid)) throw new Error(`pid file ${file} holds pid ${pid}, which is not a TURN server`);
  const [written, started] = await Promise.all([stat(file).then((st) => st.mtimeMs), processStartMs(pid)]);
  if (started !== null && started > written + STALE_SLACK_MS) {
    throw new Error(`pid file ${file} is stale: pid ${pid} started ${new Date(started).toISOString()}, after the file was written `
      + `(${new Date(written).toISOString()}); is the TURN server running?`);
  }
  return pid;
}

async function systemctlKill(unit: string, signal: NodeJS.Signals, opts: ActionOptions): Promise<string> {
  const systemctl = systemctlPath(opts.env);
  const argv = [systemctl, 'kill', '--kill-whom=main', `--signal=${signal}`, unit];
  try {
    await runProgram(argv, opts);
    return argv.join(' ');
  } catch (err) {
    // systemd before 252 knows the option only by its old name.
    if (!/unrecognized option|unknown option/i.test((err as Error).message)) throw err;
    const old = [systemctl, 'kill', '--kill-who=main', `--signal=${signal}`, unit];
    await runProgram(old, opts);
    return old.join(' ');
  }
}

function dockerWhat(docker: DockerTarget): string {
  return `docker container ${docker.container}${docker.socket === DEFAULT_DOCKER_SOCKET ? '' : ` (socket ${docker.socket})`}`;
}

/** The action in words, for `sni-router check`: "restart docker container livekit". */
export function describeAction(action: CertAction): string {
  switch (action.kind) {
    case 'signal': {
      const to = action.docker !== null ? dockerWhat(action.docker)
        : action.systemdUnit !== null ? `systemd unit ${action.systemdUnit}` : `the pid in ${action.pidFile}`;
      return `signal ${action.signal} to ${to}`;
    }
    case 'restart':
      return `restart ${action.docker !== null ? dockerWhat(action.docker) : `systemd unit ${action.systemdUnit}`}`;
    case 'exec':
      return `exec ${action.argv.join(' ')}`;
  }
}

export async function runAction(action: CertAction, paths: DeployedPaths, opts: ActionOptions): Promise<ActionDone> {
  switch (action.kind) {
    case 'signal': {
      if (action.docker !== null) {
        await dockerContainerRequest(action.docker, { kind: 'kill', signal: action.signal }, opts.timeoutMs);
        return { what: describeAction(action) };
      }
      if (action.systemdUnit !== null) return { what: await systemctlKill(action.systemdUnit, action.signal, opts) };
      const pid = await readPidFile(action.pidFile!);
      process.kill(pid, action.signal);
      return { what: `kill -${action.signal} ${pid} (from ${action.pidFile})` };
    }
    case 'restart': {
      if (action.docker !== null) {
        await dockerContainerRequest(action.docker, { kind: 'restart' }, opts.timeoutMs);
        return { what: describeAction(action) };
      }
      const argv = [systemctlPath(opts.env), 'restart', action.systemdUnit!];
      await runProgram(argv, opts);
      return { what: argv.join(' ') };
    }
    case 'exec': {
      const argv = execArgv(action.argv, paths);
      await runProgram(argv, opts);
      return { what: argv.join(' ') };
    }
  }
}
