// YAML text to plain values, remembering where each value stood so that every error can be
// printed as FILE:LINE:COL. ${NAME} in a string is replaced from the environment here, as text.
//
// The conversion is our own (the positions need it), so it also does what the YAML library's
// toJS() would guard: aliases are resolved through one index built in a single pass (the
// library's Alias.resolve() walks the whole document per alias), and what aliases expand to is
// bounded, so a few hundred bytes of nested aliases (a "billion laughs") are refused at once
// instead of expanding on the main thread.
import { readFileSync } from 'node:fs';
import {
  type Alias, LineCounter, type Node, type ParsedNode, isAlias, isMap, isScalar, isSeq, parseDocument, visit,
} from 'yaml';
import { configFromValue } from './config.ts';
import { routeList } from './routes.ts';
import type { Config } from './types.ts';
import { ValueError, type Path } from './values.ts';
import type { RouteSpec } from '../model/route.ts';

export class ConfigError extends Error {
  readonly file: string;
  readonly line: number;
  readonly col: number;
  constructor(file: string, line: number, col: number, message: string) {
    super(`${file}:${line}:${col}: ${message}`);
    this.file = file;
    this.line = line;
    this.col = col;
  }
}

interface Located {
  readonly value: unknown;
  /** Position of the value at path (or of its key, with atKey), falling back to the nearest parent. */
  position(path: Path, atKey: boolean): { line: number; col: number };
}

const ENV_REF = /\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g;
/** Nodes that aliases may add beyond the document's own: at least this many, ... */
const ALIAS_EXPANSION_MIN = 100_000;
/** ... or this many times the document's own node count. */
const ALIAS_EXPANSION_FACTOR = 2;

function pathKey(path: Path): string {
  return path.join('\u0000');
}

/** Parses YAML text into plain values with positions; throws ConfigError on a YAML or ${ENV} error. */
export function parseYaml(text: string, file: string, env: NodeJS.ProcessEnv = process.env): Located {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true });
  const at = (offset: number) => {
    const p = lineCounter.linePos(offset);
    return { line: p.line, col: p.col };
  };
  if (doc.errors.length > 0) {
    const e = doc.errors[0];
    const p = at(e.pos[0]);
    throw new ConfigError(file, p.line, p.col, e.message.split('\n')[0]);
  }
  const valuePos = new Map<string, number>();
  const keyPos = new Map<string, number>();

  // Each alias's anchor, in one pass in document order: the nearest anchor of that name before it.
  const anchors = new Map<string, Node>();
  const aliasTarget = new Map<Alias, Node | undefined>();
  let nodes = 0;
  visit(doc, {
    Node: (_key, node) => {
      nodes++;
      if (isAlias(node)) aliasTarget.set(node, anchors.get(node.source));
      else if (node.anchor !== undefined) anchors.set(node.anchor, node);
    },
  });
  const expansionBudget = Math.max(ALIAS_EXPANSION_MIN, ALIAS_EXPANSION_FACTOR * nodes);
  let expanded = 0;

  const convert = (node: unknown, path: Path, depth: number, viaAlias: boolean): unknown => {
    if (depth > 64) throw new ValueError(path, 'the document nests too deeply (or an alias refers to itself)');
    if (viaAlias && ++expanded > expansionBudget) {
      throw new ValueError(path, `aliases expand to more than ${expansionBudget} values: refused (an alias bomb?)`);
    }
    if (isAlias(node)) {
      const target = aliasTarget.get(node);
      if (target === undefined) throw new ValueError(path, `alias *${node.source} has no anchor before it`);
      return convert(target, path, depth + 1, true);
    }
    const n = node as Node | null;
    if (n?.range) valuePos.set(pathKey(path), n.range[0]);
    if (n === null || n === undefined) return null;
    if (isMap(n)) {
      const out: Record<string, unknown> = {};
      for (const pair of n.items) {
        if (!isScalar(pair.key)) throw new ValueError(path, 'a mapping key must be a plain value (not a list, mapping or alias)');
        const k = String(pair.key.value);
        const kp = [...path, k];
        const keyNode = pair.key as ParsedNode | null;
        if (keyNode?.range) keyPos.set(pathKey(kp), keyNode.range[0]);
        out[k] = convert(pair.value, kp, depth + 1, viaAlias);
        if (!valuePos.has(pathKey(kp)) && keyNode?.range) valuePos.set(pathKey(kp), keyNode.range[0]);
      }
      return out;
    }
    if (isSeq(n)) return n.items.map((item, i) => convert(item, [...path, i], depth + 1, viaAlias));
    if (isScalar(n)) {
      if (typeof n.value !== 'string' || !n.value.includes('${')) return n.value;
      let missing: string | null = null;
      // As text, whatever the variable holds: never parsed as YAML ("turn #1" stays whole, "0x10"
      // stays a string). A key that wants a number or a boolean reads the text (values.ts).
      const replaced = n.value.replace(ENV_REF, (_, name: string) => {
        const v = env[name];
        if (v === undefined) missing ??= name;
        return v ?? '';
      });
      if (missing !== null) throw new ValueError(path, `environment variable ${missing} is not set`);
      return replaced;
    }
    return null;
  };

  const position = (path: Path, atKey: boolean) => {
    for (let p = path; ; p = p.slice(0, -1)) {
      const off = (atKey && p === path ? keyPos.get(pathKey(p)) : undefined) ?? valuePos.get(pathKey(p));
      if (off !== undefined) return at(off);
      if (p.length === 0) return { line: 1, col: 1 };
    }
  };

  try {
    return { value: convert(doc.contents, [], 0, false), position };
  } catch (err) {
    if (err instanceof ValueError) {
      const p = position(err.path, err.atKey);
      throw new ConfigError(file, p.line, p.col, err.message);
    }
    throw err;
  }
}

/** Runs a validator over parsed YAML, turning its errors into FILE:LINE:COL. */
function validate<T>(located: Located, file: string, fn: (v: unknown) => T): T {
  try {
    return fn(located.value);
  } catch (err) {
    if (err instanceof ValueError) {
      const p = located.position(err.path, err.atKey);
      throw new ConfigError(file, p.line, p.col, err.message);
    }
    throw err;
  }
}

export function parseConfig(text: string, file: string, env: NodeJS.ProcessEnv = process.env): Config {
  const located = parseYaml(text, file, env);
  return validate(located, file, (v) => configFromValue(v, file));
}

export function loadConfig(file: string, env: NodeJS.ProcessEnv = process.env): Config {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(file, 1, 1, `cannot read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  return parseConfig(text, file, env);
}

/** A routes file for the file source: a mapping with `routes:` in the config's route schema. */
export function parseRoutesFile(text: string, file: string, source: string, env: NodeJS.ProcessEnv = process.env): RouteSpec[] {
  const located = parseYaml(text, file, env);
  return validate(located, file, (v) => {
    if (v === null || v === undefined) return [];
    const message = 'a routes file holds one key, routes: (a list of routes)';
    if (typeof v !== 'object' || Array.isArray(v)) throw new ValueError([], message);
    const stray = Object.keys(v).find((k) => k !== 'routes');
    if (stray !== undefined) throw new ValueError([stray], message, true);
    return routeList((v as { routes?: unknown }).routes, ['routes'], source);
  });
}
