// certwatch entries: YAML to CertwatchConfig, and `for_each: namespace` templates to the entry
// each namespace gets (instantiate). A template is checked whole at load: only known placeholders,
// {namespace} in its name, and a sample namespace must make a valid entry; so a template that can
// never work fails `check`, and what instantiate refuses at run time is only ever a namespace's
// own doing (a name too long for a unit, say).
import { constants as osConstants } from 'node:os';
import { clip, patternError } from '../model/route.ts';
import { type Template, fillTemplate, parseTemplate, templateKeys } from './template.ts';
import type { CertAction, CertwatchConfig, CertwatchTemplate, DockerTarget, RestartWindow } from './types.ts';
import {
  ValueError, type Path, duration, list, nonEmpty, object, oneOf, opt, parseDuration, pathText, string,
} from './values.ts';

const CERT_KEYS = [
  'for_each', 'name', 'domain', 'caddy_storage', 'cert', 'key', 'copy_to', 'on_change', 'min_interval', 'debounce',
  'stagger', 'restart_window', 'urgent_before',
] as const;

/** Where the Docker Engine listens unless docker_socket says otherwise. */
export const DEFAULT_DOCKER_SOCKET = '/var/run/docker.sock';
/** Docker's own rule for container names (ids fit it too). */
const DOCKER_CONTAINER_NAME = /^[a-zA-Z0-9][a-zA-Z0-9_.-]*$/;
/** An entry's name names files (<name>.crt, .<name>.acted and their temporary files). */
const ENTRY_NAME = /^[A-Za-z0-9_.-]+$/;
const ENTRY_NAME_MAX = 200;
/** A namespace for trying a template out at load: any valid label makes the same shape of entry. */
const SAMPLE_NAMESPACE = 'x';
/** Between one entry's action and the next entry's, unless `stagger` says otherwise. */
export const DEFAULT_STAGGER_MS = 10_000;
/** The longest urgent_before: a certificate lifetime is at most a year or so. */
const URGENT_BEFORE_MAX_MS = 400 * 86_400_000;

export type CertwatchEntry =
  | { readonly kind: 'entry'; readonly config: CertwatchConfig }
  | { readonly kind: 'template'; readonly template: CertwatchTemplate };

/** How the values of one entry are read: as they are, or as templates over {namespace}. */
interface Reading {
  readonly templated: boolean;
}

/** A text that may name `known` placeholders (a template), or must not use {namespace} (an entry as written). */
function text(v: unknown, path: Path, r: Reading, known: readonly string[] = ['namespace']): string {
  const s = nonEmpty(v, path);
  if (!r.templated) return plain(v, path, r);
  const parsed = parseTemplate(s);
  if (typeof parsed === 'string') throw new ValueError(path, `${pathText(path)}: ${parsed}`);
  for (const key of templateKeys(parsed)) {
    if (!known.includes(key)) {
      throw new ValueError(path, `${pathText(path)}: unknown placeholder {${clip(key, 40)}} (known: ${known.map((k) => `{${k}}`).join(', ')})`);
    }
  }
  return s;
}

/** A text that is no template, in any entry (the storage every namespace shares). */
function plain(v: unknown, path: Path, r: Reading): string {
  const s = nonEmpty(v, path);
  if (s.includes('{namespace}')) {
    throw new ValueError(path, r.templated
      ? `${pathText(path)} cannot use {namespace} (it is the same for every namespace)`
      : `${pathText(path)} uses {namespace}, which only an entry with for_each: namespace fills in`);
  }
  return s;
}

export function certwatchEntry(v: unknown, path: Path): CertwatchEntry {
  const o = object(v, path, CERT_KEYS);
  const templated = o.for_each !== undefined && o.for_each !== null;
  if (templated) oneOf(o.for_each, [...path, 'for_each'], ['namespace'] as const);
  const r: Reading = { templated };
  if (o.domain === undefined) throw new ValueError(path, `${pathText(path)} needs domain`);
  const domain = text(o.domain, [...path, 'domain'], r).toLowerCase().replace(/\.$/, '');
  const name = opt(o, 'name', path, (x, p) => text(x, p, r), domain);
  if (!templated && !ENTRY_NAME.test(name)) {
    throw new ValueError([...path, 'name'], `${pathText(path)}.name may hold only letters, digits, '.', '_' and '-' (it names files)`);
  }
  if (templated && !templateKeys(parseTemplate(name) as Template).includes('namespace')) {
    throw new ValueError([...path, o.name === undefined ? 'domain' : 'name'],
      `${pathText(path)}.name must contain {namespace}: each namespace's entry needs a name (and files) of its own`);
  }
  const caddyStorage = opt<string | null>(o, 'caddy_storage', path, (x, p) => plain(x, p, r), null);
  const cert = opt<string | null>(o, 'cert', path, (x, p) => plain(x, p, r), null);
  const key = opt<string | null>(o, 'key', path, (x, p) => plain(x, p, r), null);
  if ((cert === null) !== (key === null)) {
    throw new ValueError(path, `${pathText(path)}: cert and key go together`);
  }
  if ((caddyStorage === null) === (cert === null)) {
    throw new ValueError(path, `${pathText(path)} needs exactly one of caddy_storage, or cert and key`);
  }
  if (templated && caddyStorage === null) {
    throw new ValueError(path, `${pathText(path)}: an entry with for_each: namespace reads Caddy's storage (caddy_storage), not cert and key`);
  }
  let copyTo: CertwatchConfig['copyTo'] = null;
  if (o.copy_to !== undefined && o.copy_to !== null) {
    const c = object(o.copy_to, [...path, 'copy_to'], ['dir', 'mode']);
    if (c.dir === undefined) throw new ValueError([...path, 'copy_to'], `${pathText(path)}.copy_to needs dir`);
    const modeText = c.mode === undefined ? '0640' : string(c.mode, [...path, 'copy_to', 'mode']);
    if (!/^0?[0-7]{3}$/.test(modeText)) {
      throw new ValueError([...path, 'copy_to', 'mode'], `${pathText(path)}.copy_to.mode must be octal like "0640"`);
    }
    copyTo = { dir: text(c.dir, [...path, 'copy_to', 'dir'], r), mode: parseInt(modeText, 8) };
  }
  const urgentBeforeMs = opt(o, 'urgent_before', path, urgentBefore, 7 * 86_400_000);
  const config: CertwatchConfig = {
    name,
    domain,
    caddyStorage,
    cert,
    key,
    copyTo,
    onChange: o.on_change === undefined || o.on_change === null ? null : certAction(o.on_change, [...path, 'on_change'], r),
    minIntervalMs: opt(o, 'min_interval', path, duration, 30_000),
    debounceMs: opt(o, 'debounce', path, duration, 500),
    staggerMs: opt(o, 'stagger', path, duration, DEFAULT_STAGGER_MS),
    restartWindow: opt<RestartWindow | null>(o, 'restart_window', path, restartWindow, null),
    urgentBeforeMs,
    namespace: null,
  };
  if (!templated) return { kind: 'entry', config };
  // Tried out with a sample namespace: what it refuses is the template's fault.
  const sample = instantiate(config, SAMPLE_NAMESPACE);
  if ('reason' in sample) {
    throw new ValueError([...path, ...sample.field], `${pathText([...path, ...sample.field])} makes no valid entry (for namespace "${SAMPLE_NAMESPACE}": ${sample.detail})`);
  }
  return { kind: 'template', template: { forEach: 'namespace', proto: config } };
}

/** A span of wall-clock time, not a timer: longer than a timer may hold (duration()'s 24 days). */
function urgentBefore(v: unknown, path: Path): number {
  const ms = v === 0 ? 0 : parseDuration(string(v, path));
  if (ms === null || ms > URGENT_BEFORE_MAX_MS) {
    throw new ValueError(path, `${pathText(path)} must be a duration like 7d or 36h, at most 400d`);
  }
  return ms;
}

/** "HH:MM-HH:MM", local time; "23:00-02:00" wraps midnight. */
export function parseRestartWindow(s: string): RestartWindow | string {
  const m = /^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$/.exec(s);
  if (m === null) return 'must be "HH:MM-HH:MM" in local time, like "02:00-05:00"';
  const [h1, m1, h2, m2] = m.slice(1).map(Number);
  // 24:00 is the end of a day, as an end only.
  if (h1 > 23 || m1 > 59 || h2 > 24 || m2 > 59 || (h2 === 24 && m2 !== 0)) return 'holds a time that is not on a clock';
  const startMin = h1 * 60 + m1;
  const endMin = (h2 * 60 + m2) % 1440;
  if (startMin === endMin) return 'starts where it ends (leave restart_window out to restart at any time)';
  return { startMin, endMin, text: s.trim() };
}

function restartWindow(v: unknown, path: Path): RestartWindow {
  const w = parseRestartWindow(string(v, path));
  if (typeof w === 'string') throw new ValueError(path, `${pathText(path)} ${w}`);
  return w;
}

function signalName(v: unknown, path: Path): NodeJS.Signals {
  let s = nonEmpty(v, path).toUpperCase();
  if (!s.startsWith('SIG')) s = `SIG${s}`;
  if (!(s in osConstants.signals)) throw new ValueError(path, `${pathText(path)}: unknown signal "${s}"`);
  return s as NodeJS.Signals;
}

/**
 * The one target of a signal or restart: `targets` are the keys that may name it. docker_socket
 * belongs to docker_container.
 */
function actionTarget(o: Record<string, unknown>, p: Path, targets: readonly string[], r: Reading): {
  systemdUnit: string | null; pidFile: string | null; docker: DockerTarget | null;
} {
  const given = targets.filter((k) => o[k] !== undefined && o[k] !== null);
  if (given.length !== 1) throw new ValueError(p, `${pathText(p)} needs exactly one of ${targets.join(', ')}`);
  if (o.docker_socket !== undefined && o.docker_socket !== null && given[0] !== 'docker_container') {
    throw new ValueError([...p, 'docker_socket'], `${pathText(p)}.docker_socket goes only with docker_container`);
  }
  let docker: DockerTarget | null = null;
  if (given[0] === 'docker_container') {
    const container = text(o.docker_container, [...p, 'docker_container'], r);
    if (!r.templated && !DOCKER_CONTAINER_NAME.test(container)) {
      throw new ValueError([...p, 'docker_container'], `${pathText(p)}.docker_container "${container.slice(0, 80)}" is not a Docker container name `
        + '(a letter or digit, then letters, digits, \'_\', \'.\' or \'-\')');
    }
    const socket = opt(o, 'docker_socket', p, nonEmpty, DEFAULT_DOCKER_SOCKET);
    if (!socket.startsWith('/')) throw new ValueError([...p, 'docker_socket'], `${pathText(p)}.docker_socket must be an absolute path`);
    docker = { container, socket };
  }
  return {
    systemdUnit: given[0] === 'systemd_unit' ? text(o.systemd_unit, [...p, 'systemd_unit'], r) : null,
    pidFile: given[0] === 'pid_file' ? text(o.pid_file, [...p, 'pid_file'], r) : null,
    docker,
  };
}

function certAction(v: unknown, path: Path, r: Reading): CertAction {
  const o = object(v, path, ['signal', 'restart', 'exec']);
  const given = Object.keys(o).filter((k) => o[k] !== undefined && o[k] !== null);
  if (given.length !== 1) throw new ValueError(path, `${pathText(path)} needs exactly one of signal, restart, exec`);
  if (o.signal !== undefined && o.signal !== null) {
    const p = [...path, 'signal'];
    const s = object(o.signal, p, ['systemd_unit', 'pid_file', 'docker_container', 'docker_socket', 'signal']);
    const target = actionTarget(s, p, ['systemd_unit', 'pid_file', 'docker_container'], r);
    if (s.signal === undefined) throw new ValueError(p, `${pathText(p)} needs signal (e.g. SIGUSR2)`);
    return { kind: 'signal', ...target, signal: signalName(s.signal, [...p, 'signal']) };
  }
  if (o.restart !== undefined && o.restart !== null) {
    const p = [...path, 'restart'];
    const rs = object(o.restart, p, ['systemd_unit', 'docker_container', 'docker_socket']);
    const { systemdUnit, docker } = actionTarget(rs, p, ['systemd_unit', 'docker_container'], r);
    return { kind: 'restart', systemdUnit, docker };
  }
  const p = [...path, 'exec'];
  // {cert} and {key} are the deployed paths, filled in when the program runs (action.ts execArgv).
  const argv = list(o.exec, p).map((a, i) => text(a, [...p, i], r, ['namespace', 'cert', 'key']));
  if (argv.length === 0) throw new ValueError(p, `${pathText(p)} needs a program to run`);
  return { kind: 'exec', argv };
}

// ---------------------------------------------------------------------------------------------
// One namespace's entry from a template

export type SkipReason =
  | 'invalid_name' | 'invalid_domain' | 'invalid_path' | 'invalid_unit' | 'invalid_container' | 'invalid_argument';

/** Why a namespace makes no entry of a template: the value it made, and which key it was for. */
export interface Refusal {
  readonly reason: SkipReason;
  /** The key within the entry, e.g. ['on_change', 'restart', 'systemd_unit']. */
  readonly field: Path;
  readonly detail: string;
}

const UNIT_SUFFIXES = ['.service', '.socket', '.target', '.device', '.mount', '.automount', '.swap', '.path', '.timer', '.slice', '.scope'];
const UNIT_CHARS = /^[A-Za-z0-9:_.\\@-]+$/;

/**
 * Why systemd would not take `unit` as a unit name, or null: its characters, a known type
 * suffix, at most 255 characters. Nor may it begin with '-', which systemctl would read as an option.
 */
export function unitNameProblem(unit: string): string | null {
  if (unit.length > 255) return `the unit name is ${unit.length} characters long (at most 255)`;
  if (!UNIT_CHARS.test(unit)) return `"${clip(unit)}" holds characters a unit name may not (letters, digits and ':', '_', '.', '\\', '@', '-')`;
  if (unit.startsWith('-')) return `"${clip(unit)}" begins with '-'`;
  const suffix = UNIT_SUFFIXES.find((x) => unit.endsWith(x));
  if (suffix === undefined || unit.length === suffix.length || unit.startsWith('@')) {
    return `"${clip(unit)}" does not end in a unit type after a name (${UNIT_SUFFIXES.join(', ')})`;
  }
  return null;
}

/**
 * A path template filled in: each '/'-separated part that holds a placeholder must stay one part,
 * neither "." nor "..", so that no namespace leaves the directory the template names.
 */
function fillPath(template: string, values: Readonly<Record<string, string>>): string | null {
  const parts = template.split('/').map((part) => {
    if (!part.includes('{')) return part;
    const filled = fillTemplate(parseTemplate(part) as Template, values);
    return filled === '' || filled === '.' || filled === '..' || filled.includes('/') || filled.includes('\0') ? null : filled;
  });
  return parts.includes(null) ? null : parts.join('/');
}

function fill(template: string, values: Readonly<Record<string, string>>): string {
  return fillTemplate(parseTemplate(template) as Template, values);
}

/** The entry `namespace` makes of a template's proto, or why it makes none. */
export function instantiate(proto: CertwatchConfig, namespace: string): CertwatchConfig | Refusal {
  const values = { namespace };
  const name = fill(proto.name, values);
  if (!ENTRY_NAME.test(name) || name.length > ENTRY_NAME_MAX) {
    return { reason: 'invalid_name', field: ['name'], detail: `name "${clip(name)}" is not letters, digits, '.', '_' and '-', at most ${ENTRY_NAME_MAX}` };
  }
  const domain = fill(proto.domain, values).toLowerCase().replace(/\.$/, '');
  const domainProblem = domain.startsWith('**.') ? 'a domain is a name or a one-label wildcard' : patternError(domain);
  if (domainProblem !== null) return { reason: 'invalid_domain', field: ['domain'], detail: domainProblem };
  let copyTo = proto.copyTo;
  if (copyTo !== null) {
    const dir = fillPath(copyTo.dir, values);
    if (dir === null) return { reason: 'invalid_path', field: ['copy_to', 'dir'], detail: `the namespace would leave the directory of "${clip(copyTo.dir)}"` };
    copyTo = { ...copyTo, dir };
  }
  let onChange = proto.onChange;
  if (onChange !== null && onChange.kind !== 'exec') {
    const at = ['on_change', onChange.kind];
    const systemdUnit = onChange.systemdUnit === null ? null : fill(onChange.systemdUnit, values);
    if (systemdUnit !== null) {
      const problem = unitNameProblem(systemdUnit);
      if (problem !== null) return { reason: 'invalid_unit', field: [...at, 'systemd_unit'], detail: problem };
    }
    let docker = onChange.docker;
    if (docker !== null) {
      const container = fill(docker.container, values);
      if (!DOCKER_CONTAINER_NAME.test(container) || container.length > 255) {
        return { reason: 'invalid_container', field: [...at, 'docker_container'], detail: `"${clip(container)}" is not a Docker container name` };
      }
      docker = { ...docker, container };
    }
    if (onChange.kind === 'restart') {
      onChange = { ...onChange, systemdUnit, docker };
    } else {
      let pidFile = onChange.pidFile;
      if (pidFile !== null) {
        const filled = fillPath(pidFile, values);
        if (filled === null) return { reason: 'invalid_path', field: [...at, 'pid_file'], detail: `the namespace would leave the directory of "${clip(pidFile)}"` };
        pidFile = filled;
      }
      onChange = { ...onChange, systemdUnit, pidFile, docker };
    }
  } else if (onChange !== null && onChange.kind === 'exec') {
    // {cert} and {key} stay for action.ts to fill with the deployed paths.
    const argv = onChange.argv.map((a) => fill(a, { namespace, cert: '{cert}', key: '{key}' }));
    const bad = argv.findIndex((a) => a.includes('\0'));
    if (bad >= 0) return { reason: 'invalid_argument', field: ['on_change', 'exec', bad], detail: 'an argument would hold a NUL byte' };
    onChange = { kind: 'exec', argv };
  }
  return { ...proto, name, domain, copyTo, onChange, namespace };
}
