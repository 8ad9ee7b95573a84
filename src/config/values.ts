// Small validators over plain values (parsed YAML or JSON). Each error carries the path of the
// value it is about, so a YAML loader can turn it into FILE:LINE:COL and a source into a log field.
// Values may come from anyone who can write a source (a Redis field, a database row): an error
// message quotes at most a clipped piece of a value, never all of it.
import { clip } from '../model/route.ts';

export type Path = ReadonlyArray<string | number>;

export class ValueError extends Error {
  readonly path: Path;
  /** True when the error is about the key itself (an unknown key), not its value. */
  readonly atKey: boolean;
  constructor(path: Path, message: string, atKey = false) {
    super(message);
    this.path = path;
    this.atKey = atKey;
  }
}

export function pathText(path: Path): string {
  let out = '';
  for (const seg of path) out += typeof seg === 'number' ? `[${seg}]` : out === '' ? clip(seg, 64) : `.${clip(seg, 64)}`;
  return out;
}

function describe(v: unknown): string {
  if (v === null || v === undefined) return 'nothing';
  if (Array.isArray(v)) return 'a list';
  return typeof v === 'object' ? 'a mapping' : `${typeof v} ${clip(JSON.stringify(v) ?? String(v))}`;
}

/** A mapping whose keys must all be in `allowed`. */
export function object(v: unknown, path: Path, allowed: readonly string[]): Record<string, unknown> {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) {
    throw new ValueError(path, `${pathText(path) || 'the document'} must be a mapping, got ${describe(v)}`);
  }
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) {
    if (!allowed.includes(k)) {
      const where = path.length === 0 ? '' : ` in ${pathText(path)}`;
      throw new ValueError([...path, k], `unknown key "${clip(k, 64)}"${where} (allowed: ${allowed.join(', ')})`, true);
    }
  }
  return o;
}

/** The value of an optional key, read by `read`, or `dflt` when absent or null. */
export function opt<T>(o: Record<string, unknown>, key: string, path: Path, read: (v: unknown, p: Path) => T, dflt: T): T {
  const v = o[key];
  return v === undefined || v === null ? dflt : read(v, [...path, key]);
}

export function list(v: unknown, path: Path): unknown[] {
  if (!Array.isArray(v)) throw new ValueError(path, `${pathText(path)} must be a list, got ${describe(v)}`);
  return v;
}

export function string(v: unknown, path: Path): string {
  if (typeof v === 'string') return v;
  // Ports and numbers written bare in YAML are still meant as text where text is asked for.
  if (typeof v === 'number' && Number.isFinite(v)) return String(v);
  throw new ValueError(path, `${pathText(path)} must be a string, got ${describe(v)}`);
}

export function nonEmpty(v: unknown, path: Path): string {
  const s = string(v, path);
  if (s.trim() === '') throw new ValueError(path, `${pathText(path)} must not be empty`);
  return s;
}

/**
 * A whole number. A decimal string is one too: `${ENV}` values arrive as strings (never parsed as
 * YAML), and a key that wants a number takes the number the string spells.
 */
export function integer(v: unknown, path: Path, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v === 'string' && /^\d{1,15}$/.test(v.trim())) v = Number(v.trim());
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw new ValueError(path, `${pathText(path)} must be a whole number from ${min} to ${max}, got ${describe(v)}`);
  }
  return v;
}

/** true or false; the strings "true" and "false" too (a `${ENV}` value is a string). */
export function boolean(v: unknown, path: Path): boolean {
  if (v === 'true' || v === 'false') return v === 'true';
  if (typeof v !== 'boolean') throw new ValueError(path, `${pathText(path)} must be true or false, got ${describe(v)}`);
  return v;
}

export function oneOf<T extends string>(v: unknown, path: Path, choices: readonly T[]): T {
  const s = string(v, path);
  if (!(choices as readonly string[]).includes(s)) {
    throw new ValueError(path, `${pathText(path)} must be one of ${choices.join(', ')}, got "${clip(s)}"`);
  }
  return s as T;
}

const UNIT_MS: Record<string, number> = { ns: 1e-6, us: 1e-3, 'µs': 1e-3, ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/**
 * Parses a Go-style duration ("250ms", "5s", "1m30s", "1.5h"; "0" alone) into milliseconds. Days
 * ("7d") too, which Go lacks: certificate lifetimes are counted in them.
 */
export function parseDuration(text: string): number | null {
  const s = text.trim();
  if (s === '0') return 0;
  const re = /(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)/y;
  let total = 0;
  let i = 0;
  while (i < s.length) {
    re.lastIndex = i;
    const m = re.exec(s);
    if (m === null) return null;
    total += Number(m[1]) * UNIT_MS[m[2]];
    i = re.lastIndex;
  }
  return i === 0 ? null : total;
}

/**
 * The longest duration a timer can hold: Node turns a longer setTimeout into 1 ms (with a warning),
 * so a poll interval of "9999h" would become a busy loop.
 */
export const MAX_DURATION_MS = 2 ** 31 - 1;

export function duration(v: unknown, path: Path): number {
  if (v === 0) return 0;
  const s = string(v, path);
  const ms = parseDuration(s);
  if (ms === null) {
    throw new ValueError(path, `${pathText(path)} must be a duration like 250ms, 5s or 2m, got "${clip(s)}"`);
  }
  if (ms > MAX_DURATION_MS) throw new ValueError(path, `${pathText(path)} must be at most 24 days, got "${clip(s)}"`);
  return ms;
}
