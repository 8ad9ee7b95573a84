// Builds route sources from their config, in the order written (which is their precedence).
import type { SourceConfig } from '../config/types.ts';
import type { Logger } from '../log.ts';
import { FileSource } from './file.ts';
import { PostgresSource } from './postgres.ts';
import { RedisSource } from './redis.ts';
import type { RouteSource } from './source.ts';

export interface SourceDeps {
  readonly logger: Logger;
}

export function createSources(configs: readonly SourceConfig[], deps: SourceDeps): RouteSource[] {
  return configs.map((c): RouteSource => {
    switch (c.type) {
      case 'file':
        return new FileSource(c, deps.logger);
      case 'postgres':
        return new PostgresSource(c, deps.logger);
      case 'redis':
        return new RedisSource(c, deps.logger);
    }
  });
}
