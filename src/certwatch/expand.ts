// Which entries exist for the namespaces the sources yield now: one per namespace and template
// (config/certwatch.ts instantiate), less those a namespace cannot make. Pure: the cert watch
// manager (index.ts) asks it whenever the set of namespaces changes and hands each template's
// watcher its list.
import { type SkipReason, instantiate } from '../config/certwatch.ts';
import type { CertwatchConfig, CertwatchTemplate } from '../config/types.ts';
import { pathText } from '../config/values.ts';

/** Beyond this many namespaces, a template makes no more entries (each reads, copies and acts). */
export const MAX_ENTRIES_PER_TEMPLATE = 10_000;

export type SkippedReason = SkipReason | 'name_conflict' | 'too_many';

/** Every reason, for the metric's series at 0. */
export const SKIPPED_REASONS: readonly SkippedReason[] = [
  'invalid_name', 'invalid_domain', 'invalid_path', 'invalid_unit', 'invalid_container', 'invalid_argument', 'name_conflict', 'too_many',
];

export interface Skipped {
  /** The template's name as written ("turn-{namespace}"). */
  readonly template: string;
  readonly namespace: string;
  readonly reason: SkippedReason;
  readonly detail: string;
}

export interface Plan {
  /** Each template's entries, in the order of `templates`. */
  readonly entries: ReadonlyArray<readonly CertwatchConfig[]>;
  readonly skipped: readonly Skipped[];
}

/**
 * The entries of `templates` for `namespaces`. `taken` are the names of the config file's own
 * entries: an instance with one of those names (or one an earlier template made) is skipped, as
 * its files and metric series would be another entry's. Namespaces are taken in sorted order, so
 * the same set always makes the same entries.
 */
export function planEntries(
  templates: readonly CertwatchTemplate[], namespaces: Iterable<string>, taken: ReadonlySet<string>, max = MAX_ENTRIES_PER_TEMPLATE,
): Plan {
  const sorted = [...new Set(namespaces)].sort();
  const names = new Set(taken);
  const skipped: Skipped[] = [];
  const entries = templates.map((t) => {
    const out: CertwatchConfig[] = [];
    for (const namespace of sorted) {
      const skip = (reason: SkippedReason, detail: string) => skipped.push({ template: t.proto.name, namespace, reason, detail });
      if (out.length >= max) {
        skip('too_many', `the template makes at most ${max} entries`);
        continue;
      }
      const made = instantiate(t.proto, namespace);
      if ('reason' in made) {
        skip(made.reason, `${pathText(made.field)}: ${made.detail}`);
        continue;
      }
      if (names.has(made.name)) {
        skip('name_conflict', `name "${made.name}" is another entry's`);
        continue;
      }
      names.add(made.name);
      out.push(made);
    }
    return out;
  });
  return { entries, skipped };
}
