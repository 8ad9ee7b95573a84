// The typed configuration, after validation. Durations are milliseconds.
import type { AlpnCondition, BackendSpec, RouteSpec } from '../model/route.ts';

export interface ListenAddress {
  /** undefined: every interface, IPv4 and IPv6 (":443"). */
  readonly host: string | undefined;
  readonly port: number;
  /** As written, for logs. */
  readonly text: string;
}

export interface ServerSettings {
  readonly clientHelloTimeoutMs: number;
  readonly backendDialTimeoutMs: number;
  readonly maxConcurrentConns: number;
  readonly maxConnsPerIp: number;
  readonly idleTimeoutMs: number;
  readonly shutdownGraceMs: number;
  readonly maxClientHelloBytes: number;
  readonly unroutable: 'fallback' | 'close';
  readonly acmeTlsAlpn: 'fallback' | 'route';
  /** How long a backend address that failed to dial is skipped. */
  readonly dialCooldownMs: number;
  /** Idle time before TCP keepalive probes a client (and a backend that is not on loopback); 0: off. */
  readonly tcpKeepaliveMs: number;
  /**
   * The relay: native (libuv handles, the default) or portable (net.Socket). Read when the data
   * plane starts; native falls back to portable, with a warning, on a Node without its internals.
   */
  readonly relay: 'native' | 'portable';
}

export interface FileSourceConfig {
  readonly type: 'file';
  readonly name: string;
  readonly path: string;
}

/** One route per namespace that the default query yields; `{namespace}` and `{<param>}` are filled in. */
export interface NameTemplate {
  /** As written, e.g. "cdn.ns-{namespace}.{base_domain}". */
  readonly match: string;
  /** The template's own condition, or null: from the stealth_enabled column where the table has one. */
  readonly alpn: AlpnCondition | null;
  /** The backend's name, a template too [turn-{namespace}]. */
  readonly name: string;
}

export interface PostgresSourceConfig {
  readonly type: 'postgres';
  readonly name: string;
  readonly url: string;
  readonly intervalMs: number;
  readonly listenChannel: string | null;
  /** 'default' reads sql/schema.sql's tables; anything else is SQL returning match, addr [, name, proxy_protocol, alpn]. */
  readonly query: string;
  readonly params: Readonly<Record<string, string>>;
  /** The default query's names for each namespace; empty with a custom query. */
  readonly names: readonly NameTemplate[];
  readonly cacheFile: string | null;
  readonly statementTimeoutMs: number;
}

export interface RedisSourceConfig {
  readonly type: 'redis';
  readonly name: string;
  readonly url: string;
  readonly key: string;
  readonly channel: string;
  readonly resyncIntervalMs: number;
}

export type SourceConfig = FileSourceConfig | PostgresSourceConfig | RedisSourceConfig;

/** A container that on_change restarts or signals through the Docker Engine API. */
export interface DockerTarget {
  /** Its name or id. */
  readonly container: string;
  /** The Engine's unix socket. */
  readonly socket: string;
}

/** Exactly one target is set: systemdUnit, pidFile (signal only) or docker. */
export type CertAction =
  | {
    readonly kind: 'signal'; readonly systemdUnit: string | null; readonly pidFile: string | null;
    readonly docker: DockerTarget | null; readonly signal: NodeJS.Signals;
  }
  | { readonly kind: 'restart'; readonly systemdUnit: string | null; readonly docker: DockerTarget | null }
  | { readonly kind: 'exec'; readonly argv: readonly string[] };

/** restart_window: local time of day, in minutes since midnight; start > end wraps midnight. */
export interface RestartWindow {
  readonly startMin: number;
  readonly endMin: number;
  /** As written, "02:00-05:00", for logs. */
  readonly text: string;
}

export interface CertwatchConfig {
  readonly name: string;
  readonly domain: string;
  readonly caddyStorage: string | null;
  readonly cert: string | null;
  readonly key: string | null;
  readonly copyTo: { readonly dir: string; readonly mode: number } | null;
  readonly onChange: CertAction | null;
  readonly minIntervalMs: number;
  /** Quiet time after the last file event before the pair is read. */
  readonly debounceMs: number;
  /** Between the end of this entry's action and the start of the next entry's (one renewal, many entries). */
  readonly staggerMs: number;
  /** `restart` actions wait for this window, unless urgent; null: any time. */
  readonly restartWindow: RestartWindow | null;
  /** A restart is urgent, window or not, when the certificate being served expires within this. */
  readonly urgentBeforeMs: number;
  /** The namespace a `for_each: namespace` entry was made for; null for an entry of the config file. */
  readonly namespace: string | null;
}

/**
 * A `for_each: namespace` entry: `proto` is an entry whose name, domain, copy_to.dir and action
 * targets still hold `{namespace}` (checked at load: only known placeholders, and a sample
 * namespace makes a valid entry). certwatch/expand.ts makes one entry per namespace from it.
 */
export interface CertwatchTemplate {
  readonly forEach: 'namespace';
  readonly proto: CertwatchConfig;
}

export interface Config {
  /** The file it was read from, or "<embedded>". */
  readonly file: string;
  readonly listen: readonly ListenAddress[];
  readonly server: ServerSettings;
  readonly fallback: BackendSpec;
  readonly routes: readonly RouteSpec[];
  readonly admin: { readonly listen: ListenAddress | null };
  readonly log: { readonly level: string; readonly access: boolean };
  readonly sources: readonly SourceConfig[];
  readonly certwatch: readonly CertwatchConfig[];
  /** `for_each: namespace` entries, instantiated at run time from the namespaces the sources yield. */
  readonly certwatchTemplates: readonly CertwatchTemplate[];
  /** Worker processes for the data plane; 1 runs everything in one process. */
  readonly workers: number;
}
