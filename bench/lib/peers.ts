// The proxies under test, configured alike from the templates in bench/peers/: one SNI route
// (cdn.example.com → backend A) plus a fallback (backend B), 5 s ClientHello and dial timeouts,
// listening on 127.0.0.1 only, each pinned to CPU 0. `direct` is the baseline without a proxy: the
// client talks to backend A itself.
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { availableParallelism } from 'node:os';
import { Proc, sleep, waitListening } from './proc.ts';

export const TARGETS = ['direct', 'haproxy', 'nginx', 'nginx-64k', 'sniproxy', 'sni-router', 'sni-router-workers', 'sni-router-portable'] as const;
export type Target = (typeof TARGETS)[number];
/**
 * What a run measures unless --proxies says otherwise. nginx-64k (nginx with 64 KiB buffers, the
 * strongest peer on throughput) only runs the throughput figure unless named in --proxies.
 */
export const DEFAULT_TARGETS: readonly Target[] = ['direct', 'haproxy', 'nginx', 'nginx-64k', 'sniproxy', 'sni-router'];

export const PROXY_CPU = 0;
export const LOAD_CPU = 1;

/**
 * sni-router-workers is sni-router with `workers: N` (bench/run.ts --workers=N, default 2), not
 * pinned: its workers may use every CPU, CPU 1 included, which the load generator also uses.
 * Its CPU time is the primary's and the workers' together. Only the connections/s figure runs it
 * unless --proxies names it.
 */
export const WORKERS_TARGET = 'sni-router-workers';

const NGINX_STREAM_MODULE = '/usr/lib/nginx/modules/ngx_stream_module.so';

export interface Ports {
  readonly listen: number;
  readonly a: number;
  readonly b: number;
  readonly admin: number;
}

export interface PeerContext {
  /** The repository root (bin/sni-router, bench/peers). */
  readonly repo: string;
  /** A fresh directory for this proxy's config and runtime files. */
  readonly dir: string;
  /** Where its output goes. */
  readonly logFile: string;
}

export interface SniRouterExtra {
  /** YAML for `routes:` (indented list items), replacing the default single route. */
  readonly routes?: string;
  /** YAML for a top-level `sources:` block. */
  readonly sources?: string;
  /** `workers:` for sni-router-workers. */
  readonly workers?: number;
}

export interface RunningProxy {
  readonly target: Target;
  /** The port clients connect to. */
  readonly port: number;
  /** null for direct. */
  readonly proc: Proc | null;
  stop(): Promise<void>;
}

function fill(template: string, vars: Record<string, string | number>): string {
  return template.replace(/\{\{([A-Z0-9_]+)\}\}/g, (_, name: string) => {
    if (!(name in vars)) throw new Error(`template placeholder {{${name}}} has no value`);
    return String(vars[name]);
  });
}

function template(repo: string, file: string): string {
  return readFileSync(join(repo, 'bench', 'peers', file), 'utf8');
}

/** Why a target cannot run on this machine, or null when it can. */
export function unavailable(target: Target): string | null {
  const which = (cmd: string) => {
    try {
      execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
      return true;
    } catch {
      return false;
    }
  };
  switch (target) {
    case 'direct':
    case 'sni-router':
    case 'sni-router-workers':
    case 'sni-router-portable':
      return null;
    case 'haproxy':
      return which('haproxy') ? null : 'haproxy is not installed (apt-get install haproxy)';
    case 'nginx':
    case 'nginx-64k':
      if (!which('nginx')) return 'nginx is not installed (apt-get install nginx libnginx-mod-stream)';
      return existsSync(NGINX_STREAM_MODULE) ? null : `nginx has no stream module (${NGINX_STREAM_MODULE}): apt-get install libnginx-mod-stream`;
    case 'sniproxy':
      return which('sniproxy') ? null : 'sniproxy is not installed (apt-get install sniproxy)';
  }
}

export function routeYaml(port: number, name = 'a'): string {
  return `  - match: cdn.example.com\n    backend:\n      name: ${name}\n      addr: "127.0.0.1:${port}"\n`;
}

export async function startProxy(target: Target, ports: Ports, ctx: PeerContext, extra: SniRouterExtra = {}): Promise<RunningProxy> {
  if (target === 'direct') {
    return { target, port: ports.a, proc: null, stop: async () => {} };
  }
  mkdirSync(ctx.dir, { recursive: true });
  const vars = {
    DIR: ctx.dir,
    LISTEN_PORT: ports.listen,
    BACKEND_A_PORT: ports.a,
    BACKEND_B_PORT: ports.b,
    ADMIN_PORT: ports.admin,
    STREAM_MODULE: NGINX_STREAM_MODULE,
    NGINX_EXTRA: target === 'nginx-64k' ? 'proxy_buffer_size 64k;' : '',
    MAP_FILE: join(ctx.dir, 'haproxy.map'),
    ROUTES: extra.routes ?? routeYaml(ports.a),
    SOURCES: extra.sources ?? '',
  };
  let cmd: string;
  let args: string[];
  switch (target) {
    case 'haproxy': {
      writeFileSync(join(ctx.dir, 'haproxy.map'), template(ctx.repo, 'haproxy.map'));
      const cfg = join(ctx.dir, 'haproxy.cfg');
      writeFileSync(cfg, fill(template(ctx.repo, 'haproxy.cfg'), vars));
      cmd = 'haproxy';
      args = ['-db', '-f', cfg];
      break;
    }
    case 'nginx':
    case 'nginx-64k': {
      const cfg = join(ctx.dir, 'nginx.conf');
      writeFileSync(cfg, fill(template(ctx.repo, 'nginx.conf'), vars));
      cmd = 'nginx';
      args = ['-p', ctx.dir, '-c', cfg, '-e', join(ctx.dir, 'error.log')];
      break;
    }
    case 'sniproxy': {
      const cfg = join(ctx.dir, 'sniproxy.conf');
      writeFileSync(cfg, fill(template(ctx.repo, 'sniproxy.conf'), vars));
      cmd = 'sniproxy';
      args = ['-f', '-c', cfg];
      break;
    }
    case 'sni-router':
    case 'sni-router-workers':
    case 'sni-router-portable': {
      const cfg = join(ctx.dir, 'sni-router.yaml');
      const workers = target === WORKERS_TARGET ? `\nworkers: ${extra.workers ?? 2}\n` : '';
      // sni-router-portable: the relay on public net.Socket API (relay: portable), pinned like sni-router.
      const relay = target === 'sni-router-portable' ? '\nrelay: portable\n' : '';
      writeFileSync(cfg, fill(template(ctx.repo, 'sni-router.yaml'), vars) + workers + relay);
      cmd = join(ctx.repo, 'bin', 'sni-router');
      args = ['--config', cfg];
      break;
    }
  }
  const cpu = target === WORKERS_TARGET ? `0-${Math.max(1, availableParallelism() - 1)}` : PROXY_CPU;
  const proc = new Proc(cmd, args, { cpu, name: target, logFile: ctx.logFile, cwd: ctx.dir });
  try {
    await waitListening(proc, ports.listen, 15_000);
    // With workers, the port listens once the first one does: wait until every worker listens.
    if (target === WORKERS_TARGET) await waitReady(proc, ports.admin, 15_000);
  } catch (err) {
    await proc.stop(1000);
    throw err;
  }
  return { target, port: ports.listen, proc, stop: () => proc.stop(3000) };
}

/** Waits until sni-router's /readyz answers 200 (every worker listens). */
async function waitReady(proc: Proc, adminPort: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (!proc.alive) throw new Error(`${proc.name} exited (code ${proc.exitCode}, signal ${proc.exitSignal}):\n${proc.tail()}`);
    try {
      if ((await fetch(`http://127.0.0.1:${adminPort}/readyz`)).status === 200) return;
    } catch {
      // not up yet
    }
    await sleep(50);
  }
  throw new Error(`${proc.name} was not ready within ${timeoutMs} ms:\n${proc.tail()}`);
}

/** One line per peer and tool: what exactly was measured. */
export function versions(repo: string): Record<string, string> {
  const run = (cmd: string, args: string[]): string => {
    try {
      return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
    } catch (err) {
      const e = err as { stdout?: string; stderr?: string };
      const text = `${e.stdout ?? ''}${e.stderr ?? ''}`.trim();
      return text === '' ? 'not found' : text;
    }
  };
  const both = (cmd: string, args: string[]): string => {
    try {
      const r = execFileSync('sh', ['-c', `${cmd} ${args.join(' ')} 2>&1`], { encoding: 'utf8' });
      return r.trim();
    } catch {
      return 'not found';
    }
  };
  const firstLine = (s: string) => s.split('\n')[0];
  const pkg = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8')) as { version: string };
  const rev = run('git', ['-C', repo, 'rev-parse', '--short', 'HEAD']);
  const dirty = run('git', ['-C', repo, 'status', '--porcelain', '--', 'src', 'bin']) === '' ? '' : ' + uncommitted changes in src/ or bin/';
  const deb = (p: string) => run('dpkg-query', ['-W', '-f', '${Version}', p]);
  return {
    'sni-router': `${pkg.version} (git ${rev}${dirty})`,
    node: run(join(repo, 'node_modules', '.bin', 'node'), ['--version']),
    haproxy: `${firstLine(both('haproxy', ['-v']))} (deb ${deb('haproxy')})`,
    nginx: `${firstLine(both('nginx', ['-v']))} (deb ${deb('nginx')}, stream module deb ${deb('libnginx-mod-stream')})`,
    sniproxy: `${firstLine(both('sniproxy', ['-V']))} (deb ${deb('sniproxy')})`,
    openssl: firstLine(run('openssl', ['version'])),
    cc: firstLine(run('cc', ['--version'])),
  };
}
