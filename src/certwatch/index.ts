// The cert watcher: one watcher per certwatch entry. Each notices when its certificate pair changes
// (Caddy renewed it), deploys a new pair that is fit (copy_to) and tells the TURN server to load it
// (on_change). See watcher.ts for the steps and select.ts for which pair wins.
import type { CertwatchConfig } from '../config/types.ts';
import type { Logger } from '../log.ts';
import type { Metrics } from '../metrics/metrics.ts';
import { CertWatcher, DEFAULT_TUNING, type Tuning } from './watcher.ts';

export type { Tuning } from './watcher.ts';
export { type Finding, inspectCertwatch } from './inspect.ts';

export interface CertwatchDeps {
  readonly logger: Logger;
  readonly metrics: Metrics;
  /** For actions: the environment programs run with, and SNI_ROUTER_SYSTEMCTL. Default process.env. */
  readonly env?: NodeJS.ProcessEnv;
  /** Timings (retry and settle intervals); the defaults suit production. */
  readonly tuning?: Partial<Tuning>;
}

export interface CertwatchHandle {
  /** Looks at the certificates again now (SIGHUP). */
  recheck(): void;
  stop(): Promise<void>;
}

export async function startCertwatch(configs: readonly CertwatchConfig[], deps: CertwatchDeps): Promise<CertwatchHandle> {
  const tuning: Tuning = { ...DEFAULT_TUNING, ...deps.tuning };
  const watchers = configs.map((c) => new CertWatcher(c, {
    logger: deps.logger, metrics: deps.metrics, env: deps.env ?? process.env, tuning,
  }));
  const started: CertWatcher[] = [];
  try {
    for (const w of watchers) {
      await w.start();
      started.push(w);
    }
  } catch (err) {
    await Promise.all(started.map((w) => w.stop()));
    throw err;
  }
  return {
    recheck() {
      for (const w of watchers) w.recheck();
    },
    async stop() {
      await Promise.all(watchers.map((w) => w.stop()));
    },
  };
}
