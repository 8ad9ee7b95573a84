// Starts one cert watcher per certwatch entry. (The watcher lands with the cert-watch issue.)
import type { CertwatchConfig } from '../config/types.ts';
import type { Logger } from '../log.ts';
import type { Metrics } from '../metrics/metrics.ts';

export interface CertwatchDeps {
  readonly logger: Logger;
  readonly metrics: Metrics;
}

export interface CertwatchHandle {
  /** Looks at the certificates again now (SIGHUP). */
  recheck(): void;
  stop(): Promise<void>;
}

export async function startCertwatch(configs: readonly CertwatchConfig[], _deps: CertwatchDeps): Promise<CertwatchHandle> {
  if (configs.length > 0) throw new Error('certwatch is not implemented yet');
  return { recheck() {}, async stop() {} };
}
