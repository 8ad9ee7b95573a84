// What `sni-router check` can say about a certwatch entry beyond its syntax: does the source exist,
// which pair would be deployed now, does copy_to already hold it, can the action run. Nothing is
// written, nothing is signalled, no request goes to Docker. These are warnings, not errors: the
// files are runtime state (Caddy may not have obtained the certificate yet, the TURN server may not
// be running).
import { constants } from 'node:fs';
import { access, stat } from 'node:fs/promises';
import { delimiter, dirname, join } from 'node:path';
import type { CertwatchConfig } from '../config/types.ts';
import { systemctlPath } from './action.ts';
import { readDeployed } from './deploy.ts';
import { certificatesDir, findCandidates } from './find.ts';
import { selectPair } from './select.ts';

export interface Finding {
  readonly level: 'info' | 'warn';
  readonly message: string;
}

async function exists(p: string): Promise<boolean> {
  return stat(p).then(() => true, () => false);
}

async function executable(program: string, env: NodeJS.ProcessEnv): Promise<boolean> {
  const paths = program.includes('/') ? [program] : (env.PATH ?? '').split(delimiter).filter((d) => d !== '').map((d) => join(d, program));
  for (const p of paths) {
    if (await access(p, constants.X_OK).then(() => true, () => false)) return true;
  }
  return false;
}

/** Why the Engine could not be reached at `socket`, as far as the file tells; no request is made. */
async function dockerSocketProblem(socket: string): Promise<string | null> {
  let st;
  try {
    st = await stat(socket);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOENT'
      ? `docker socket ${socket} does not exist: is Docker running, is the socket mounted?`
      : `docker socket ${socket}: ${(err as Error).message}`;
  }
  if (!st.isSocket()) return `docker socket ${socket} is not a socket`;
  // Connecting to a unix socket needs write permission on it.
  if (!(await access(socket, constants.R_OK | constants.W_OK).then(() => true, () => false))) {
    return `docker socket ${socket} may not be used by this user: the router's user must be in the socket's group (docker)`;
  }
  return null;
}

export async function inspectCertwatch(config: CertwatchConfig, env: NodeJS.ProcessEnv = process.env): Promise<Finding[]> {
  const out: Finding[] = [];
  const info = (message: string) => out.push({ level: 'info', message });
  const warn = (message: string) => out.push({ level: 'warn', message });

  const source = config.caddyStorage !== null ? certificatesDir(config.caddyStorage) : dirname(config.cert!);
  if (!(await exists(source))) warn(`${source} does not exist (yet): the watcher waits for it`);
  const now = new Date();
  const candidates = await findCandidates(config, now);
  const deployed = await readDeployed(config, now);
  const choice = selectPair(candidates, deployed, {
    settledBad: new Set(), final: true, onlyLater: config.caddyStorage !== null, now,
  });
  for (const r of 'rejected' in choice ? choice.rejected : []) {
    if (!r.verdict.ok) warn(`${r.where}: ${r.verdict.reason}: ${r.verdict.detail}`);
  }
  switch (choice.kind) {
    case 'none':
      warn(`no certificate pair for ${config.domain} found`);
      break;
    case 'blocked':
      warn(`the newest pair (${choice.newest.where}) is not usable; nothing would be deployed`);
      break;
    case 'wait':
      break; // not with final: true
    default: {
      const leaf = choice.best.verdict.leaf;
      const what = `${choice.best.where}: ${leaf.fingerprint}, valid until ${leaf.notAfter.toISOString()}`;
      if (choice.kind === 'newer' && deployed?.acted === false && deployed.leaf.fingerprint === leaf.fingerprint) {
        info(`would act on ${what}: copy_to holds it, but on_change never succeeded for it`);
      } else if (choice.kind === 'newer') info(`would deploy ${what}${config.copyTo === null ? '' : ' (copy_to differs)'}`);
      else if (choice.kind === 'current') info(`copy_to already holds ${what}`);
      else info(`copy_to holds a certificate issued later than ${what}`);
    }
  }

  const action = config.onChange;
  if (action?.kind === 'exec' && !(await executable(action.argv[0], env))) {
    warn(`exec: ${action.argv[0]} is not an executable program`);
  }
  if ((action?.kind === 'restart' || action?.kind === 'signal') && action.systemdUnit !== null && !(await executable(systemctlPath(env), env))) {
    warn(`${systemctlPath(env)} not found: systemd actions cannot run`);
  }
  if (action?.kind === 'signal' && action.pidFile !== null && !(await exists(action.pidFile))) {
    warn(`pid_file ${action.pidFile} does not exist (is the TURN server running?)`);
  }
  if ((action?.kind === 'restart' || action?.kind === 'signal') && action.docker !== null) {
    const problem = await dockerSocketProblem(action.docker.socket);
    if (problem !== null) warn(problem);
  }
  if (config.copyTo !== null && !(await exists(config.copyTo.dir))) {
    info(`copy_to.dir ${config.copyTo.dir} does not exist: it will be created`);
  }
  return out;
}
