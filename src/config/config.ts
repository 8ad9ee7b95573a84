// The whole configuration from a plain value (parsed YAML with ${ENV} already substituted).
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { parse as parsePostgresUrl } from 'pg-connection-string';
import { localInterfaceAddresses } from '../host.ts';
import type { BackendSpec } from '../model/route.ts';
import { isOwnAddress, selfMessage } from '../model/self-address.ts';
import { certwatchEntry } from './certwatch.ts';
import { DEFAULT_NAMES, nameTemplates } from './names.ts';
import { backend, listenAddress, routeList } from './routes.ts';
import type { CertwatchConfig, CertwatchTemplate, Config, PostgresSourceConfig, SourceConfig } from './types.ts';
import {
  ValueError, type Path, boolean, duration, integer, list, nonEmpty, object, oneOf, opt, pathText, string,
} from './values.ts';

const TOP_KEYS = [
  'listen', 'client_hello_timeout', 'backend_dial_timeout', 'max_concurrent_conns', 'max_conns_per_ip',
  'idle_timeout', 'shutdown_grace', 'max_client_hello_bytes', 'unroutable', 'acme_tls_alpn',
  'backend_cooldown', 'tcp_keepalive', 'relay', 'fallback', 'routes', 'admin', 'log', 'sources', 'certwatch', 'workers',
] as const;

/**
 * A relay with no byte either way for this long is closed. Longer than anything a live TURN
 * allocation stays silent for: a client refreshes its permissions every 5 minutes and its
 * allocation before its lifetime (10 minutes by default) runs out, media flows every 20 ms in a call.
 */
export const DEFAULT_IDLE_TIMEOUT_MS = 15 * 60_000;
/** Keepalive probes after a minute of silence: a peer that vanished is noticed ~10 s later (libuv sends 10 probes 1 s apart). */
export const DEFAULT_TCP_KEEPALIVE_MS = 60_000;

const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'] as const;

export function configFromValue(v: unknown, file: string): Config {
  const o = object(v ?? {}, [], TOP_KEYS);
  if (o.fallback === undefined) throw new ValueError([], 'fallback is required: where unroutable connections go');

  const listenRaw = o.listen ?? ':443';
  const listen = (Array.isArray(listenRaw) ? listenRaw : [listenRaw]).map((l, i) =>
    listenAddress(l, Array.isArray(listenRaw) ? ['listen', i] : ['listen']));
  if (listen.length === 0) throw new ValueError(['listen'], 'listen must name at least one address');

  const admin = o.admin === undefined || o.admin === null ? {} : object(o.admin, ['admin'], ['listen']);
  const adminListen = admin.listen === undefined
    ? listenAddress('127.0.0.1:9180', ['admin', 'listen'])
    : admin.listen === null || admin.listen === '' || admin.listen === false
      ? null
      : listenAddress(admin.listen, ['admin', 'listen']);

  const log = o.log === undefined || o.log === null ? {} : object(o.log, ['log'], ['level', 'access']);

  const sourceNames = new Set<string>();
  const perType = new Map<string, number>();
  const sources = o.sources === undefined || o.sources === null
    ? []
    : list(o.sources, ['sources']).map((s, i) => {
      const src = sourceConfig(s, ['sources', i], perType);
      if (sourceNames.has(src.name) || src.name === 'config') {
        throw new ValueError(['sources', i], `sources[${i}]: name "${src.name}" is used twice (set name: to tell them apart)`);
      }
      sourceNames.add(src.name);
      return src;
    });

  // Names are unique among the entries as written; a template's instance whose name meets another
  // entry's is skipped at run time (certwatch/expand.ts), since only the namespaces tell.
  const certNames = new Set<string>();
  const certwatch: CertwatchConfig[] = [];
  const certwatchTemplates: CertwatchTemplate[] = [];
  if (o.certwatch !== undefined && o.certwatch !== null) {
    list(o.certwatch, ['certwatch']).forEach((c, i) => {
      const cw = certwatchEntry(c, ['certwatch', i]);
      const name = cw.kind === 'entry' ? cw.config.name : cw.template.proto.name;
      if (certNames.has(name)) throw new ValueError(['certwatch', i, 'name'], `certwatch name "${name}" is used twice`);
      certNames.add(name);
      if (cw.kind === 'entry') certwatch.push(cw.config);
      else certwatchTemplates.push(cw.template);
    });
  }

  const fallback = backend(o.fallback, ['fallback'], 'fallback');
  const routes = routeList(o.routes, ['routes'], 'config');
  // A backend that is the router itself: every connection to it would open another to itself.
  const localIps = localInterfaceAddresses();
  const own = (b: BackendSpec) => b.addrs.find((a) => isOwnAddress(a, listen, localIps));
  const selfFallback = own(fallback);
  if (selfFallback !== undefined) throw new ValueError(['fallback'], selfMessage('fallback', selfFallback));
  routes.forEach((r, i) => {
    const self = own(r.backend);
    if (self !== undefined) throw new ValueError(['routes', i, 'backend'], selfMessage(`routes[${i}].backend`, self));
  });

  const workersRaw = o.workers ?? 1;
  const workers = workersRaw === 'auto' ? availableParallelism() : integer(workersRaw, ['workers'], 1, 256);

  return Object.freeze({
    file,
    listen,
    server: Object.freeze({
      clientHelloTimeoutMs: opt(o, 'client_hello_timeout', [], duration, 5000),
      backendDialTimeoutMs: opt(o, 'backend_dial_timeout', [], duration, 5000),
      maxConcurrentConns: opt(o, 'max_concurrent_conns', [], (x, p) => integer(x, p, 0), 10000),
      maxConnsPerIp: opt(o, 'max_conns_per_ip', [], (x, p) => integer(x, p, 0), 0),
      idleTimeoutMs: opt(o, 'idle_timeout', [], duration, DEFAULT_IDLE_TIMEOUT_MS),
      shutdownGraceMs: opt(o, 'shutdown_grace', [], duration, 30_000),
      maxClientHelloBytes: opt(o, 'max_client_hello_bytes', [], (x, p) => integer(x, p, 512, 1 << 20), 16384),
      unroutable: opt(o, 'unroutable', [], (x, p) => oneOf(x, p, ['fallback', 'close'] as const), 'fallback'),
      acmeTlsAlpn: opt(o, 'acme_tls_alpn', [], (x, p) => oneOf(x, p, ['fallback', 'route'] as const), 'fallback'),
      dialCooldownMs: opt(o, 'backend_cooldown', [], duration, 10_000),
      tcpKeepaliveMs: opt(o, 'tcp_keepalive', [], keepaliveDuration, DEFAULT_TCP_KEEPALIVE_MS),
      relay: opt(o, 'relay', [], (x, p) => oneOf(x, p, ['native', 'portable'] as const), 'native'),
    }),
    fallback,
    routes,
    admin: { listen: adminListen },
    log: {
      level: opt(log, 'level', ['log'], (x, p) => oneOf(x, p, LOG_LEVELS), 'info'),
      access: opt(log, 'access', ['log'], boolean, false),
    },
    sources,
    certwatch,
    certwatchTemplates,
    workers,
  });
}

/** TCP_KEEPIDLE takes whole seconds, from 1 to 32767. */
function keepaliveDuration(v: unknown, path: Path): number {
  const ms = duration(v, path);
  if (ms !== 0 && (ms < 1000 || ms > 32767_000)) throw new ValueError(path, `${pathText(path)} must be 0 (off) or from 1s to 9h`);
  return Math.round(ms / 1000) * 1000;
}

const FILE_KEYS = ['type', 'name', 'path'] as const;
const POSTGRES_KEYS = [
  'type', 'name', 'url', 'interval', 'listen_channel', 'query', 'params', 'names', 'cache_file', 'statement_timeout',
] as const;
const REDIS_KEYS = ['type', 'name', 'url', 'key', 'channel', 'resync_interval'] as const;

/** A source without a name is called by its type ("file"), then "file-2", "file-3" and so on. */
function sourceConfig(v: unknown, path: Path, perType: Map<string, number>): SourceConfig {
  // Only the type first: the keys are checked against that type's own list below.
  const peek = object(v, path, v !== null && typeof v === 'object' ? Object.keys(v) : []);
  if (peek.type === undefined) throw new ValueError(path, `${pathText(path)} needs type (file, postgres or redis)`);
  const type = oneOf(peek.type, [...path, 'type'], ['file', 'postgres', 'redis'] as const);
  const nth = (perType.get(type) ?? 0) + 1;
  perType.set(type, nth);
  const name = (o: Record<string, unknown>) => opt(o, 'name', path, nonEmpty, nth === 1 ? type : `${type}-${nth}`);
  switch (type) {
    case 'file': {
      const o = object(v, path, FILE_KEYS);
      if (o.path === undefined) throw new ValueError(path, `${pathText(path)} (file) needs path`);
      return { type, name: name(o), path: nonEmpty(o.path, [...path, 'path']) };
    }
    case 'postgres': {
      const o = object(v, path, POSTGRES_KEYS);
      if (o.url === undefined) throw new ValueError(path, `${pathText(path)} (postgres) needs url`);
      const url = nonEmpty(o.url, [...path, 'url']);
      if (!/^postgres(ql)?:\/\//.test(url)) {
        throw new ValueError([...path, 'url'], `${pathText(path)}.url must start with postgres:// or postgresql://`);
      }
      // Parsed as the pg client will parse it (a bad port, an unencoded '#' in the password, a
      // TLS file that is not there), so that check fails where the source would. The error never
      // holds the URL, which may hold a password.
      try {
        parsePostgresUrl(url);
      } catch (err) {
        throw new ValueError([...path, 'url'], `${pathText(path)}.url cannot be used: ${(err as Error).message}`);
      }
      const paramsRaw = o.params === undefined || o.params === null ? {} : o.params;
      const paramsObj = object(paramsRaw, [...path, 'params'], Object.keys(paramsRaw as object));
      const params: Record<string, string> = {};
      for (const [k, pv] of Object.entries(paramsObj)) params[k] = string(pv, [...path, 'params', k]);
      const query = opt(o, 'query', path, nonEmpty, 'default').trim();
      let names: PostgresSourceConfig['names'] = [];
      if (query === 'default') {
        for (const required of ['base_domain', 'node_id']) {
          if (params[required] === undefined) {
            throw new ValueError([...path, 'params'], `${pathText(path)}: query: default needs params.${required}`);
          }
        }
        if (params.namespace !== undefined) {
          throw new ValueError([...path, 'params', 'namespace'], `${pathText(path)}.params.namespace: {namespace} in names is each row's namespace; call this parameter something else`, true);
        }
        names = o.names === undefined || o.names === null ? DEFAULT_NAMES : nameTemplates(o.names, [...path, 'names'], params);
      } else if (o.names !== undefined) {
        throw new ValueError([...path, 'names'], `${pathText(path)}.names is for query: default only (a custom query returns its match column)`, true);
      }
      const listenChannel = opt<string | null>(o, 'listen_channel', path, nonEmpty, null);
      if (listenChannel !== null && !/^[A-Za-z_][A-Za-z0-9_]{0,62}$/.test(listenChannel)) {
        throw new ValueError([...path, 'listen_channel'], `${pathText(path)}.listen_channel must be a plain SQL identifier`);
      }
      const intervalMs = opt(o, 'interval', path, duration, 10_000);
      if (intervalMs < 100) throw new ValueError([...path, 'interval'], `${pathText(path)}.interval must be at least 100ms`);
      return {
        type,
        name: name(o),
        url,
        intervalMs,
        listenChannel,
        query,
        params,
        names,
        cacheFile: opt<string | null>(o, 'cache_file', path, nonEmpty, null),
        statementTimeoutMs: opt(o, 'statement_timeout', path, duration, 5000),
      };
    }
    case 'redis': {
      const o = object(v, path, REDIS_KEYS);
      const url = opt(o, 'url', path, nonEmpty, 'redis://127.0.0.1:6379/0');
      if (!/^rediss?:\/\//.test(url)) {
        throw new ValueError([...path, 'url'], `${pathText(path)}.url must start with redis:// or rediss://`);
      }
      if (!URL.canParse(url)) {
        throw new ValueError([...path, 'url'], `${pathText(path)}.url is not a valid URL (a port that is not a number, or a reserved character such as '#' not percent-encoded)`);
      }
      const refused = redisUrlError(url);
      if (refused !== null) throw new ValueError([...path, 'url'], `${pathText(path)}.url cannot be used: ${refused}`);
      const resyncIntervalMs = opt(o, 'resync_interval', path, duration, 30_000);
      if (resyncIntervalMs < 100) {
        throw new ValueError([...path, 'resync_interval'], `${pathText(path)}.resync_interval must be at least 100ms`);
      }
      return {
        type,
        name: name(o),
        url,
        key: opt(o, 'key', path, nonEmpty, 'sni-router:routes'),
        channel: opt(o, 'channel', path, nonEmpty, 'sni-router:routes'),
        resyncIntervalMs,
      };
    }
  }
}

/**
 * Why the Redis client would refuse `url`, or null. Asked of the client itself (ioredis, loaded only
 * when a Redis source is configured), so that `check` and a start agree: a URL the client refuses
 * (a password with a bad percent-escape, a port that is not a number) is a configuration error, not
 * a source that fails at once at run time and never retries. The message never holds the URL.
 */
function redisUrlError(url: string): string | null {
  const path = new URL(url).pathname;
  if (path !== '' && path !== '/' && !/^\/\d{1,5}$/.test(path)) return 'the path must be a database number, as in redis://host:6379/0';
  const { Redis } = createRequire(import.meta.url)('ioredis') as typeof import('ioredis');
  try {
    new Redis(url, { lazyConnect: true }).disconnect();
  } catch (err) {
    return err instanceof URIError ? 'a user name or password holds a malformed %-escape (write % as %25)' : (err as Error).message;
  }
  return null;
}
