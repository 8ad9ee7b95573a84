// The cert watcher: one watcher per entry of the config file, and one per `for_each: namespace`
// template serving that template's entry for each namespace the route sources yield. Each notices
// when its certificate pair changes (Caddy renewed it), deploys a new pair that is fit (copy_to),
// and hands the action that makes the TURN server load it (on_change) to one scheduler shared by
// all, which spaces them out. See watcher.ts for the steps, select.ts for which pair wins,
// scheduler.ts for when actions run.
import type { CertwatchConfig, CertwatchTemplate } from '../config/types.ts';
import type { Logger } from '../log.ts';
import type { Metrics } from '../metrics/metrics.ts';
import type { EntryView } from './entry.ts';
import { SKIPPED_REASONS, type Skipped, planEntries } from './expand.ts';
import { ActionScheduler } from './scheduler.ts';
import { CertWatcher, DEFAULT_TUNING, type Tuning, entryFinder, storageFinder } from './watcher.ts';

export type { Tuning } from './watcher.ts';
export type { EntryView } from './entry.ts';
export { type Finding, inspectCertwatch } from './inspect.ts';

export interface CertwatchDeps {
  readonly logger: Logger;
  readonly metrics: Metrics;
  /** For actions: the environment programs run with, and SNI_ROUTER_SYSTEMCTL. Default process.env. */
  readonly env?: NodeJS.ProcessEnv;
  /** Timings (retry and settle intervals, the clock); the defaults suit production. */
  readonly tuning?: Partial<Tuning>;
}

/** What /routes shows of the cert watcher. */
export interface CertwatchView {
  readonly entries: readonly EntryView[];
  readonly skipped: readonly Skipped[];
}

export interface CertwatchHandle {
  /** Looks at the certificates again now (SIGHUP). */
  recheck(): void;
  /** The namespaces the route sources yield now: templates make or withdraw their entries. */
  setNamespaces(namespaces: ReadonlySet<string>): void;
  view(): CertwatchView;
  stop(): Promise<void>;
}

export async function startCertwatch(
  configs: readonly CertwatchConfig[], deps: CertwatchDeps, templates: readonly CertwatchTemplate[] = [],
): Promise<CertwatchHandle> {
  const tuning: Tuning = { ...DEFAULT_TUNING, ...deps.tuning };
  const { logger, metrics } = deps;
  const scheduler = new ActionScheduler({ logger, metrics, env: deps.env ?? process.env, tuning });
  const watcherDeps = { logger, metrics, tuning, scheduler };
  const statics = configs.map((c) => {
    const w = new CertWatcher(entryFinder(c), c.debounceMs, logger.child({ cert: c.name }), watcherDeps);
    w.setEntries([c]);
    return w;
  });
  const fleets = templates.map((t) => new CertWatcher(
    storageFinder(t.proto.caddyStorage!, logger.child({ template: t.proto.name })), t.proto.debounceMs,
    logger.child({ template: t.proto.name }), watcherDeps,
  ));
  for (const t of templates) for (const reason of SKIPPED_REASONS) metrics.certwatchSkipped.inc({ cert: t.proto.name, reason }, 0);
  const all = [...statics, ...fleets];
  const started: Array<CertWatcher<unknown>> = [];
  try {
    for (const w of all) {
      await w.start();
      started.push(w);
    }
  } catch (err) {
    await Promise.all(started.map((w) => w.stop()));
    await scheduler.stop();
    throw err;
  }

  const taken = new Set(configs.map((c) => c.name));
  /** The namespaces skipped now, each logged and counted once while it stays skipped. */
  let skipped = new Map<string, Skipped>();
  let namespaces: ReadonlySet<string> = new Set();
  return {
    recheck() {
      for (const w of all) w.recheck();
    },
    setNamespaces(next) {
      if (templates.length === 0 || sameSet(next, namespaces)) return;
      namespaces = new Set(next);
      const plan = planEntries(templates, namespaces, taken);
      fleets.forEach((w, i) => w.setEntries(plan.entries[i]));
      const now = new Map<string, Skipped>();
      for (const s of plan.skipped) {
        const key = `${s.template}\u0000${s.namespace}\u0000${s.reason}`;
        now.set(key, s);
        if (skipped.has(key)) continue;
        metrics.certwatchSkipped.inc({ cert: s.template, reason: s.reason });
        logger.warn({ template: s.template, namespace: s.namespace, reason: s.reason, detail: s.detail }, 'certwatch entry skipped for a namespace');
      }
      skipped = now;
    },
    view() {
      return { entries: all.flatMap((w) => w.views()), skipped: [...skipped.values()] };
    },
    async stop() {
      await Promise.all([...all.map((w) => w.stop()), scheduler.stop()]);
    },
  };
}

function sameSet(a: ReadonlySet<string>, b: ReadonlySet<string>): boolean {
  if (a.size !== b.size) return false;
  for (const x of a) if (!b.has(x)) return false;
  return true;
}
