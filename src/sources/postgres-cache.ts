// The PostgreSQL source's cache file: the last good snapshot, so that a router restarted while the
// database is down still serves what it served before. Written only when the routes change.
import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, rename, unlink } from 'node:fs/promises';
import { dirname } from 'node:path';
import { route } from '../config/routes.ts';
import type { Logger } from '../log.ts';
import { type AlpnCondition, type RouteSpec, alpnKey } from '../model/route.ts';
import type { InvalidEntry, Snapshot } from './source.ts';

interface CacheFile {
  readonly version: 1;
  readonly source: string;
  readonly written_at: string;
  readonly routes: unknown[];
}

export class RouteCache {
  readonly file: string;
  readonly #source: string;
  readonly #logger: Logger;
  /** The routes last written, so that a read that changed nothing does not rewrite the file. */
  #written = '';

  constructor(file: string, source: string, logger: Logger) {
    this.file = file;
    this.#source = source;
    this.#logger = logger;
  }

  /** The cached snapshot (origin "cache"), or null when there is none or it is unreadable. */
  async read(): Promise<Snapshot | null> {
    let text: string;
    try {
      text = await readFile(this.file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        this.#logger.warn({ cache_file: this.file, err: (err as Error).message }, 'cannot read the postgres cache file');
      }
      return null;
    }
    try {
      const data = JSON.parse(text) as Partial<CacheFile>;
      if (data.version !== 1 || !Array.isArray(data.routes)) throw new Error('not a version 1 cache file');
      const routes: RouteSpec[] = [];
      const invalid: InvalidEntry[] = [];
      data.routes.forEach((r, i) => {
        try {
          routes.push(route(r, ['routes', i], this.#source));
        } catch (err) {
          invalid.push({ entry: `cache routes[${i}]`, error: (err as Error).message });
        }
      });
      return { routes, invalid, origin: 'cache' };
    } catch (err) {
      this.#logger.warn({ cache_file: this.file, err: (err as Error).message }, 'ignoring an unreadable postgres cache file');
      return null;
    }
  }

  /** Writes the snapshot to a temp file and renames it over the cache: a reader sees old or new, whole. */
  async write(snapshot: Snapshot): Promise<void> {
    const routes = snapshot.routes.map(plainRoute);
    const key = JSON.stringify(routes);
    if (key === this.#written) return;
    const data: CacheFile = { version: 1, source: this.#source, written_at: new Date().toISOString(), routes };
    const tmp = `${this.file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
    try {
      await mkdir(dirname(this.file), { recursive: true });
      const fh = await open(tmp, 'w', 0o600);
      try {
        await fh.writeFile(`${JSON.stringify(data, null, 1)}\n`);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await rename(tmp, this.file);
      this.#written = key;
    } catch (err) {
      await unlink(tmp).catch(() => {});
      this.#logger.warn({ cache_file: this.file, err: (err as Error).message }, 'cannot write the postgres cache file');
    }
  }
}

/** A route as the plain value route() reads back. */
function plainRoute(r: RouteSpec): unknown {
  return {
    match: r.match,
    ...(r.alpn === null ? {} : { alpn: plainAlpn(r.alpn) }),
    ...(r.namespace === null ? {} : { namespace: r.namespace }),
    backend: {
      name: r.backend.name,
      addrs: r.backend.addrs,
      ...(r.backend.proxyProtocol === null ? {} : { proxy_protocol: r.backend.proxyProtocol }),
    },
  };
}

function plainAlpn(alpn: AlpnCondition): unknown {
  return alpn.kind === 'list' ? [...alpn.protocols] : alpnKey(alpn);
}
