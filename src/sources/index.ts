// Builds route sources from their config. (Concrete sources land with the sources issue.)
import type { SourceConfig } from '../config/types.ts';
import type { Logger } from '../log.ts';
import type { RouteSource } from './source.ts';

export interface SourceDeps {
  readonly logger: Logger;
}

export function createSources(configs: readonly SourceConfig[], _deps: SourceDeps): RouteSource[] {
  return configs.map((c) => {
    throw new Error(`source type ${c.type} is not implemented yet`);
  });
}
