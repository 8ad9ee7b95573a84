// `names:` of a PostgreSQL source with `query: default`: the names each namespace is routed under,
// as templates over {namespace} and the source's params. Checked whole at load, so that a template
// that can never make a name fails `check`, not every read.
import { alpnKey, clip, normalizeName, patternError } from '../model/route.ts';
import { alpnCondition } from './routes.ts';
import { type Template, fillTemplate, parseTemplate, templateKeys } from './template.ts';
import type { NameTemplate } from './types.ts';
import { ValueError, type Path, list, nonEmpty, object, pathText } from './values.ts';

/**
 * Without `names:`, the names of the stealth-TURN deployment guide: `cdn.ns-<namespace>` for TURN
 * clients only (browsers and probers see the fallback's site), and the DNS name the namespace
 * service creates for the namespace's TURN servers.
 */
export const DEFAULT_NAMES: readonly NameTemplate[] = Object.freeze([
  Object.freeze({ match: 'cdn.ns-{namespace}.{base_domain}', alpn: Object.freeze({ kind: 'none' as const }), name: 'turn-{namespace}' }),
  Object.freeze({ match: 'turn.ns-{namespace}.{base_domain}', alpn: null, name: 'turn-{namespace}' }),
]);

const DEFAULT_BACKEND_NAME = 'turn-{namespace}';
const NAME_KEYS = ['match', 'alpn', 'name'] as const;
/** A namespace for trying a template out at load: any valid label makes the same shape of name. */
const SAMPLE_NAMESPACE = 'x';

export function nameTemplates(v: unknown, path: Path, params: Readonly<Record<string, string>>): NameTemplate[] {
  const raw = list(v, path);
  if (raw.length === 0) throw new ValueError(path, `${pathText(path)} must name at least one template (leave it out for the default names)`);
  if (raw.length > 16) throw new ValueError(path, `${pathText(path)} holds ${raw.length} templates; at most 16`);
  const seen = new Map<string, number>();
  return raw.map((entry, i) => {
    const p = [...path, i];
    const o = object(entry, p, NAME_KEYS);
    if (o.match === undefined) throw new ValueError(p, `${pathText(p)} needs match`);
    const match = nonEmpty(o.match, [...p, 'match']).trim();
    const matchTemplate = template(match, [...p, 'match'], params);
    if (!templateKeys(matchTemplate).includes('namespace')) {
      throw new ValueError([...p, 'match'], `${pathText([...p, 'match'])} must contain {namespace}: each namespace needs names of its own`);
    }
    const sample = normalizeName(fillTemplate(matchTemplate, { ...params, namespace: SAMPLE_NAMESPACE }));
    const err = patternError(sample);
    if (err !== null) {
      throw new ValueError([...p, 'match'], `${pathText([...p, 'match'])} makes no valid name (for namespace "${SAMPLE_NAMESPACE}": ${err})`);
    }
    const alpn = alpnCondition(o.alpn, [...p, 'alpn']);
    const name = o.name === undefined || o.name === null ? DEFAULT_BACKEND_NAME : nonEmpty(o.name, [...p, 'name']).trim();
    template(name, [...p, 'name'], params);
    // Twins make the same name for every namespace: the same text once params are filled in.
    const shape = normalizeName(fillTemplate(matchTemplate, { ...params, namespace: '{namespace}' }));
    const key = `${shape}|${alpn === null ? 'stealth column' : alpnKey(alpn)}`;
    const twin = seen.get(key);
    if (twin !== undefined) {
      throw new ValueError(p, `${pathText(p)} makes the same names as ${pathText([...path, twin])} (same match and alpn)`);
    }
    seen.set(key, i);
    return Object.freeze({ match, alpn, name });
  });
}

/** Parses a template whose placeholders must be {namespace} or a key of params. */
function template(text: string, path: Path, params: Readonly<Record<string, string>>): Template {
  const parsed = parseTemplate(text);
  if (typeof parsed === 'string') throw new ValueError(path, `${pathText(path)}: ${parsed}`);
  for (const key of templateKeys(parsed)) {
    if (key !== 'namespace' && !Object.hasOwn(params, key)) {
      const known = ['namespace', ...Object.keys(params)].map((k) => `{${k}}`).join(', ');
      throw new ValueError(path, `${pathText(path)}: unknown placeholder {${clip(key, 40)}} (known: ${known})`);
    }
  }
  return parsed;
}
