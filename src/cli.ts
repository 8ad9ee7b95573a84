// Command line: run, check, --version, --help. Wiring only; the work is in app.ts and below.
// Exit codes: 0 clean stop, 1 runtime failure, 2 usage or configuration error.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { App } from './app.ts';
import { describeAction } from './certwatch/action.ts';
import { DEFAULT_STAGGER_MS } from './config/certwatch.ts';
import { inspectCertwatch } from './certwatch/inspect.ts';
import { ConfigError, loadConfig, parseRoutesFile } from './config/load.ts';
import type { CertwatchConfig, Config } from './config/types.ts';
import { redactUrl } from './log.ts';
import { RouteTable } from './router/table.ts';
import { type RouteSpec, alpnKey, describeRoute } from './model/route.ts';
import { buildInfo } from './version.ts';

const HELP = `sni-router: routes TLS connections by SNI and ALPN without terminating TLS

Usage:
  sni-router [run] --config FILE     run the router (default FILE: $SNI_ROUTER_CONFIG)
  sni-router check --config FILE     validate FILE and each source's static settings,
                                     print the effective static route table
  sni-router --version               print the version
  sni-router --help                  print this help

Options:
  -c, --config FILE   configuration file (YAML)

Signals:
  SIGTERM, SIGINT     stop accepting, let open connections finish for shutdown_grace, exit 0
  SIGHUP              re-read the config file and resync every source (a bad file is rejected)
  SIGUSR2             logged and ignored

Exit codes: 0 clean stop, 1 runtime failure, 2 usage or configuration error.
Admin HTTP (admin.listen, default 127.0.0.1:9180): /metrics /healthz /readyz /routes /version
`;

class UsageError extends Error {}

interface Args {
  command: 'run' | 'check' | 'help' | 'version';
  config: string | null;
}

export function parseArgs(argv: readonly string[], env: NodeJS.ProcessEnv): Args {
  let command: Args['command'] | null = null;
  let config: string | null = null;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '-h' || a === '--help' || a === 'help') return { command: 'help', config: null };
    if (a === '-V' || a === '-v' || a === '--version' || a === 'version') return { command: 'version', config: null };
    if (a === '-c' || a === '--config') {
      if (i + 1 >= argv.length) throw new UsageError(`${a} needs a file`);
      config = argv[++i];
    } else if (a.startsWith('--config=')) {
      config = a.slice('--config='.length);
    } else if ((a === 'run' || a === 'check') && command === null) {
      command = a;
    } else {
      throw new UsageError(`unknown argument "${a}"`);
    }
  }
  config ??= env.SNI_ROUTER_CONFIG && env.SNI_ROUTER_CONFIG !== '' ? env.SNI_ROUTER_CONFIG : null;
  if (config === null) throw new UsageError('no configuration: pass --config FILE or set SNI_ROUTER_CONFIG');
  return { command: command ?? 'run', config };
}

/** `check`: validate and print what would run. Throws ConfigError on the first problem. */
function check(config: Config, env: NodeJS.ProcessEnv): string {
  const lines: string[] = [`${config.file}: OK`];
  lines.push(`listen: ${config.listen.map((l) => l.text).join(', ')}`);
  lines.push(`admin: ${config.admin.listen?.text ?? 'off'}`);
  lines.push(`fallback: ${config.fallback.name} ${config.fallback.addrs.join(',')}`);
  const routes: RouteSpec[] = [...config.routes];
  for (const s of config.sources) {
    if (s.type === 'file' && existsSync(s.path)) {
      // The routes file is part of the static configuration: validate it here too.
      for (const r of parseRoutesFile(readFileSync(s.path, 'utf8'), s.path, s.name, env)) routes.push(r);
    }
  }
  // The table the router would build from them: on the same match and alpn the first wins.
  const table = new RouteTable(routes, config.fallback);
  lines.push(`routes (${table.routes.length}, in precedence order):`);
  for (const r of table.routes) lines.push(`  ${describeRoute(r)}`);
  if (table.conflicts.length > 0) {
    lines.push(`conflicts (${table.conflicts.length}, left out: the earlier route wins):`);
    for (const { winner, loser } of table.conflicts) lines.push(`  ${describeRoute(loser)}, loses to [${winner.source}] -> ${winner.backend.name}`);
  }
  if (config.sources.length > 0) {
    lines.push('sources:');
    for (const s of config.sources) {
      switch (s.type) {
        case 'file':
          lines.push(`  ${s.name}: file ${s.path}${existsSync(s.path) ? '' : ' (does not exist yet: watched for)'}`);
          break;
        case 'postgres':
          lines.push(`  ${s.name}: postgres ${redactUrl(s.url)} every ${s.intervalMs}ms` +
            `${s.listenChannel === null ? '' : `, LISTEN ${s.listenChannel}`}, query ${s.query === 'default' ? 'default' : 'custom'}` +
            `${s.cacheFile === null ? '' : `, cache ${s.cacheFile}`}`);
          // The names each namespace gets, as templates: the rows are only known at run time.
          for (const n of s.names) {
            lines.push(`    names ${n.match}${n.alpn === null ? ' (alpn from stealth_enabled)' : ` alpn=${alpnKey(n.alpn)}`} -> ${n.name}`);
          }
          break;
        case 'redis':
          lines.push(`  ${s.name}: redis ${redactUrl(s.url)} hash ${s.key}, channel ${s.channel}, resync every ${s.resyncIntervalMs}ms`);
          break;
      }
    }
  }
  const certwatchLine = (c: CertwatchConfig) => {
    const from = c.caddyStorage !== null ? `caddy storage ${c.caddyStorage}` : `${c.cert} + ${c.key}`;
    return `${c.domain} from ${from}` +
      `${c.copyTo === null ? '' : `, copy to ${c.copyTo.dir} mode ${c.copyTo.mode.toString(8).padStart(4, '0')}`}` +
      `${c.onChange === null ? '' : `, on change ${describeAction(c.onChange)}`}` +
      `${c.onChange === null || c.staggerMs === DEFAULT_STAGGER_MS ? '' : `, stagger ${span(c.staggerMs)}`}` +
      `${c.restartWindow === null || c.onChange?.kind !== 'restart' ? '' : `, restarts in ${c.restartWindow.text} local time unless the served certificate expires within ${span(c.urgentBeforeMs)}`}`;
  };
  for (const c of config.certwatch) lines.push(`certwatch ${c.name}: ${certwatchLine(c)}`);
  // A template, as written: the namespaces are only known at run time, from the sources.
  for (const t of config.certwatchTemplates) {
    lines.push(`certwatch ${t.proto.name} (for each namespace the route sources yield at run time): ${certwatchLine(t.proto)}`);
  }
  return `${lines.join('\n')}\n`;
}

/** 604800000 → "7d", 10000 → "10s": as an operator writes durations. */
function span(ms: number): string {
  for (const [unit, size] of [['d', 86_400_000], ['h', 3_600_000], ['m', 60_000], ['s', 1000]] as const) {
    if (ms >= size && ms % size === 0) return `${ms / size}${unit}`;
  }
  return `${ms}ms`;
}

export async function main(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): Promise<number> {
  let args: Args;
  try {
    args = parseArgs(argv, env);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`sni-router: ${err.message}\n\n${HELP}`);
    return 2;
  }
  if (args.command === 'help') {
    process.stdout.write(HELP);
    return 0;
  }
  if (args.command === 'version') {
    process.stdout.write(`sni-router ${buildInfo().version}\n`);
    return 0;
  }
  let config: Config;
  try {
    config = loadConfig(args.config!, env);
    if (args.command === 'check') {
      process.stdout.write(check(config, env));
      // What the cert watcher would find now: warnings only (storage missing, a bad pair, no
      // systemctl), since the files may legitimately appear after the router starts.
      for (const c of config.certwatch) {
        for (const f of await inspectCertwatch(c, env)) process.stdout.write(`  certwatch ${c.name}: ${f.level}: ${f.message}\n`);
      }
      for (const t of config.certwatchTemplates) {
        const dir = join(t.proto.caddyStorage!, 'certificates');
        if (!existsSync(dir)) process.stdout.write(`  certwatch ${t.proto.name}: warn: ${dir} does not exist (yet): the watcher waits for it\n`);
      }
      return 0;
    }
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`${err.message}\n`);
      return 2;
    }
    throw err;
  }
  return run(config, env);
}

async function run(config: Config, env: NodeJS.ProcessEnv): Promise<number> {
  let app: App;
  try {
    app = await App.start(config, { env });
  } catch (err) {
    process.stderr.write(`sni-router: ${(err as Error).message}\n`);
    return 1;
  }
  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) {
        app.logger.warn({ signal }, 'second signal: closing everything now');
        app.server.drain(0).then(() => resolve(0), () => resolve(1));
        return;
      }
      stopping = true;
      app.logger.info({ signal }, 'signal received, draining');
      app.shutdown().then(() => resolve(0), (err: Error) => {
        app.logger.error({ err: err.message }, 'shutdown failed');
        resolve(1);
      });
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGHUP', () => {
      app.reload().catch((err: Error) => app.logger.error({ err: err.message }, 'reload failed'));
    });
    // Node's default for SIGUSR2 is to end the process: a stray one must not drop every relay.
    process.on('SIGUSR2', () => app.logger.warn({ signal: 'SIGUSR2' }, 'signal ignored'));
  });
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  process.on('uncaughtException', (err) => {
    process.stderr.write(`sni-router: fatal: ${err.stack ?? err.message}\n`);
    process.exit(1);
  });
  process.on('unhandledRejection', (err) => {
    process.stderr.write(`sni-router: fatal: unhandled rejection: ${(err as Error)?.stack ?? String(err)}\n`);
    process.exit(1);
  });
  main(process.argv.slice(2)).then((code) => {
    // Give pino's async stdout a moment to flush before exiting.
    setTimeout(() => process.exit(code), 50);
  }, (err: Error) => {
    process.stderr.write(`sni-router: fatal: ${err.stack ?? err.message}\n`);
    process.exit(1);
  });
}
