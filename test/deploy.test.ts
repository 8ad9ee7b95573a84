// The deployment files are checked by the tools that will read them (promtool, docker-compose,
// systemd-analyze, caddy) and against the router itself: every metric a dashboard or alert uses
// exists, every config file loads with the router's own loader, and the files agree with each
// other (ports, paths, service names, timeouts).
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { builtinModules } from 'node:module';
import { dirname, join, relative } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { parse as parseYaml } from 'yaml';
import { loadConfig, parseRoutesFile } from '../src/config/load.ts';
import { splitHostPort } from '../src/config/routes.ts';
import type { Config } from '../src/config/types.ts';
import { startRouter, tempDir } from './helpers.ts';
import { requireTools } from './support/tools.ts';

const ROOT = join(import.meta.dirname, '..');
const NODE = join(ROOT, 'node_modules', '.bin', 'node');
const DEPLOY = join(ROOT, 'deploy');
const run = promisify(execFile);

async function sh(file: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<{ code: number; out: string; err: string }> {
  try {
    const { stdout, stderr } = await run(file, args, { cwd: opts.cwd ?? ROOT, env: opts.env ?? process.env, timeout: 60_000, maxBuffer: 16 << 20 });
    return { code: 0, out: stdout, err: stderr };
  } catch (err) {
    const e = err as { code?: number | string; stdout?: string; stderr?: string; message: string };
    if (typeof e.code !== 'number') throw err;
    return { code: e.code, out: e.stdout ?? '', err: e.stderr ?? '' };
  }
}

function prodEnv(): NodeJS.ProcessEnv {
  return { ...process.env, DATABASE_URL: 'postgres://sni_router:secret@db.internal:5432/orama' };
}

// --- Prometheus and Grafana -----------------------------------------------------------------------

test('promtool accepts the alert rules, and the rules unit tests pass', async (t) => {
  if (!requireTools(t, 'promtool')) return;
  const check = await sh('promtool', ['check', 'rules', join(DEPLOY, 'prometheus', 'alerts.yml')]);
  assert.equal(check.code, 0, check.out + check.err);
  assert.match(check.out, /SUCCESS: \d+ rules found/);
  const unit = await sh('promtool', ['test', 'rules', 'alerts.test.yml'], { cwd: join(DEPLOY, 'prometheus') });
  assert.equal(unit.code, 0, unit.out + unit.err);
  assert.match(unit.out, /SUCCESS/);
});

test('the alerts cover what the runbook promises: certificate expiry, a failing source, limits, dial failures, no router', () => {
  const rules = parseYaml(readFileSync(join(DEPLOY, 'prometheus', 'alerts.yml'), 'utf8')) as {
    groups: Array<{ rules: Array<{ alert: string; expr: string; for?: string }> }>;
  };
  const byName = new Map(rules.groups.flatMap((g) => g.rules).map((r) => [r.alert, r]));
  const expect = (name: string, expr: RegExp, forDuration?: string) => {
    const rule = byName.get(name);
    assert.ok(rule !== undefined, `alert ${name}`);
    assert.match(rule.expr, expr, name);
    if (forDuration !== undefined) assert.equal(rule.for, forDuration, name);
  };
  expect('SniRouterCertificateExpiresSoon', /sni_router_cert_not_after_timestamp_seconds - time\(\)\) < 7 \* 86400/);
  expect('SniRouterSourceFailing', /sni_router_source_up == 0/, '5m');
  expect('SniRouterConnectionLimitRejections', /sni_router_connection_limit_rejections_total/);
  expect('SniRouterBackendDialFailures', /sni_router_backend_dial_failures_total/);
  expect('SniRouterDown', /up\{job="sni-router"\} == 0/);
  expect('SniRouterAbsent', /absent\(up\{job="sni-router"\}\)/);
});

interface Panel {
  type: string;
  id: number;
  title: string;
  datasource?: { type: string; uid: string };
  gridPos: { h: number; w: number; x: number; y: number };
  targets?: Array<{ expr: string; datasource?: { uid: string } }>;
}

function dashboard(): { __inputs: Array<{ name: string; pluginId: string }>; panels: Panel[]; templating: { list: Array<{ query: { query: string } }> } } {
  return JSON.parse(readFileSync(join(DEPLOY, 'grafana', 'sni-router.json'), 'utf8'));
}

test('the Grafana dashboard imports with a Prometheus datasource input and shows every series the runbook names', () => {
  const d = dashboard();
  assert.deepEqual(d.__inputs.map((i) => [i.name, i.pluginId]), [['DS_PROMETHEUS', 'prometheus']]);
  const ids = new Set<number>();
  const exprs: string[] = [];
  for (const p of d.panels) {
    assert.ok(!ids.has(p.id), `panel id ${p.id} is unique`);
    ids.add(p.id);
    assert.ok(p.gridPos.w > 0 && p.gridPos.x + p.gridPos.w <= 24, `${p.title} fits the grid`);
    if (p.type === 'row') continue;
    assert.equal(p.datasource?.uid, '${DS_PROMETHEUS}', `${p.title} uses the datasource input`);
    assert.ok((p.targets ?? []).length > 0, `${p.title} has a query`);
    for (const target of p.targets ?? []) {
      assert.equal(target.datasource?.uid, '${DS_PROMETHEUS}', `${p.title}`);
      exprs.push(target.expr);
    }
  }
  const all = exprs.join('\n');
  for (const shown of [
    /sum by \(route, result\) \(rate\(sni_router_connections_total/,
    /sni_router_active_connections/,
    /sum by \(backend, direction\) \(rate\(sni_router_bytes_total/,
    /sum by \(reason\) \(rate\(sni_router_client_hello_failures_total/,
    /sum by \(backend\) \(rate\(sni_router_backend_dial_failures_total/,
    /sni_router_route_table_generation/,
    /sni_router_source_up/,
    /time\(\) - sni_router_source_last_success_timestamp_seconds/,
    /\(sni_router_cert_not_after_timestamp_seconds\{[^}]*\} - time\(\)\) \/ 86400/,
  ]) {
    assert.match(all, shown);
  }
});

/** Metric names used in PromQL text: ours, and the process_/nodejs_ defaults. */
function metricNames(promql: string): Set<string> {
  return new Set(promql.match(/\b(?:sni_router|process|nodejs)_[a-z0-9_]+/g) ?? []);
}

test('every metric a dashboard panel or an alert uses exists in /metrics of a running router', async (t) => {
  const router = await startRouter('fallback: { name: web, addr: "127.0.0.1:9" }\n');
  t.after(() => router.stop());
  const res = await fetch(`http://127.0.0.1:${router.adminPort}/metrics`);
  const text = await res.text();
  const types = new Map<string, string>();
  for (const m of text.matchAll(/^# TYPE (\S+) (\S+)$/gm)) types.set(m[1], m[2]);

  const d = dashboard();
  const used = new Map<string, string>(); // metric → where
  const note = (expr: string, where: string) => {
    for (const name of metricNames(expr)) if (!used.has(name)) used.set(name, where);
  };
  for (const p of d.panels) for (const target of p.targets ?? []) note(target.expr, `dashboard panel "${p.title}"`);
  for (const v of d.templating.list) note(v.query.query, 'dashboard variable');
  const rules = parseYaml(readFileSync(join(DEPLOY, 'prometheus', 'alerts.yml'), 'utf8')) as {
    groups: Array<{ rules: Array<{ alert: string; expr: string }> }>;
  };
  for (const r of rules.groups.flatMap((g) => g.rules)) note(r.expr, `alert ${r.alert}`);
  assert.ok(used.size >= 15, `found ${used.size} metric names`);

  const missing: string[] = [];
  for (const [name, where] of used) {
    const base = name.replace(/_(bucket|sum|count)$/, '');
    const exists = types.has(name) || (base !== name && types.get(base) === 'histogram');
    if (!exists) missing.push(`${name} (${where})`);
  }
  assert.deepEqual(missing, [], 'metrics used but not exported');
});

// --- systemd -------------------------------------------------------------------------------------

function unitDirectives(text: string): Array<[string, string]> {
  return text.split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#') && !l.startsWith('['))
    .map((l) => {
      const eq = l.indexOf('=');
      return [l.slice(0, eq), l.slice(eq + 1)] as [string, string];
    });
}

function seconds(text: string): number {
  const m = /^(\d+)(ms|s|min|m)?$/.exec(text);
  assert.ok(m !== null, `a duration: ${text}`);
  const n = Number(m[1]);
  return m[2] === 'ms' ? n / 1000 : m[2] === 'min' || m[2] === 'm' ? n * 60 : n;
}

test('systemd-analyze verify accepts the unit and its drop-in, and rates its exposure as OK', async (t) => {
  if (!requireTools(t, 'systemd-analyze')) return;
  const { dir, cleanup } = tempDir('sni-router-unit-');
  t.after(cleanup);
  // The unit's ExecStart points at /opt/sni-router; verify checks that the program exists, so the
  // copy points at this checkout's bin/sni-router instead. Nothing else changes.
  const unit = readFileSync(join(DEPLOY, 'systemd', 'sni-router.service'), 'utf8');
  assert.match(unit, /^ExecStart=\/opt\/sni-router\/bin\/sni-router run --config \/etc\/sni-router\/sni-router.yaml$/m);
  const unitFile = join(dir, 'sni-router.service');
  writeFileSync(unitFile, unit.replaceAll('/opt/sni-router/bin/sni-router', join(ROOT, 'bin', 'sni-router')));
  mkdirSync(join(dir, 'sni-router.service.d'));
  cpSync(join(DEPLOY, 'systemd', 'sni-router.service.d', 'caddy-storage.conf'), join(dir, 'sni-router.service.d', 'caddy-storage.conf'));

  const verify = await sh('systemd-analyze', ['verify', '--man=no', unitFile]);
  assert.equal(verify.code, 0, verify.err);
  // systemd only warns ("Unknown key", "Failed to parse … ignoring") about bad directives and
  // still exits 0: any line about the unit file or its drop-in is a failure.
  const complaints = verify.err.split('\n').filter((l) => l.includes(dir) || l.startsWith('sni-router.service:'));
  assert.deepEqual(complaints, []);

  // Sanity of the check itself: a misspelt directive is reported.
  writeFileSync(join(dir, 'sni-router.service.d', 'zz-typo.conf'), '[Service]\nProtectSytem=strict\n');
  const typo = await sh('systemd-analyze', ['verify', '--man=no', unitFile]);
  assert.match(typo.err, /Unknown key.*ProtectSytem/);

  const security = await sh('systemd-analyze', ['security', '--offline=yes', '--no-pager', unitFile]);
  const level = /Overall exposure level for sni-router\.service: ([\d.]+)/.exec(security.out + security.err);
  assert.ok(level !== null, security.out + security.err);
  assert.ok(Number(level[1]) <= 3, `exposure ${level[1]} (0 = locked down, 10 = exposed)`);
});

test('the unit is hardened as the runbook says and agrees with the production config', () => {
  const directives = unitDirectives(readFileSync(join(DEPLOY, 'systemd', 'sni-router.service'), 'utf8'));
  const all = (key: string) => directives.filter(([k]) => k === key).map(([, v]) => v);
  const one = (key: string) => {
    const v = all(key);
    assert.equal(v.length, 1, `${key} is set once`);
    return v[0];
  };
  assert.equal(one('User'), 'sni-router');
  assert.equal(one('AmbientCapabilities'), 'CAP_NET_BIND_SERVICE');
  assert.equal(one('CapabilityBoundingSet'), 'CAP_NET_BIND_SERVICE');
  assert.equal(one('NoNewPrivileges'), 'yes');
  assert.equal(one('ProtectSystem'), 'strict');
  assert.equal(one('ProtectHome'), 'yes');
  assert.equal(one('PrivateTmp'), 'yes');
  assert.equal(one('Restart'), 'on-failure');
  assert.equal(one('KillSignal'), 'SIGTERM');
  assert.deepEqual(all('ExecReload').at(-1), '/bin/kill -HUP $MAINPID');
  assert.ok(!directives.some(([k, v]) => k === 'MemoryDenyWriteExecute' && v === 'yes'), 'V8 needs W^X off');

  const config = loadConfig(join(DEPLOY, 'config', 'sni-router.yaml'), prodEnv());
  assert.ok(seconds(one('TimeoutStopSec')) * 1000 > config.server.shutdownGraceMs, 'TimeoutStopSec > shutdown_grace');
  assert.ok(Number(one('LimitNOFILE')) >= 2 * config.server.maxConcurrentConns + 1000, 'two descriptors per relayed connection');
  // Every path the router writes is writable under ProtectSystem=strict, and nothing else.
  const writable = all('ReadWritePaths').map((p) => p.replace(/^-/, ''));
  const stateDirs = all('StateDirectory').map((d) => `/var/lib/${d}`);
  const writes = [
    ...config.sources.flatMap((s) => (s.type === 'postgres' && s.cacheFile !== null ? [dirname(s.cacheFile)] : [])),
    ...config.certwatch.flatMap((c) => (c.copyTo === null ? [] : [c.copyTo.dir])),
  ];
  assert.ok(writes.length >= 2);
  for (const w of writes) assert.ok(writable.includes(w) || stateDirs.includes(w), `${w} is writable`);
  assert.deepEqual(writable.filter((p) => !writes.includes(p)), [], 'no writable path the router does not write');
});

test('the polkit rule lets the router user signal exactly the TURN unit that certwatch names', () => {
  const rule = readFileSync(join(DEPLOY, 'polkit', '50-sni-router.rules'), 'utf8');
  const config = loadConfig(join(DEPLOY, 'config', 'sni-router.yaml'), prodEnv());
  const units = config.certwatch.flatMap((c) => (c.onChange?.kind === 'signal' && c.onChange.systemdUnit !== null ? [c.onChange.systemdUnit] : []));
  assert.ok(units.length > 0);
  for (const u of units) assert.ok(rule.includes(`"${u}"`), u);
  assert.match(rule, /subject\.user !== "sni-router"/);
  assert.match(rule, /verb === "kill"/);
});

// --- configuration examples ----------------------------------------------------------------------

test('the production example config and routes file load with the router\'s own loader, and `sni-router check` accepts them', async () => {
  const config = loadConfig(join(DEPLOY, 'config', 'sni-router.yaml'), prodEnv());
  assert.deepEqual(config.listen.map((l) => l.text), [':443']);
  assert.deepEqual(config.fallback.addrs, ['127.0.0.1:8443']);
  assert.deepEqual(config.routes.map((r) => [r.match, r.alpn]), [['cdn.example.com', { kind: 'none' }]]);
  assert.deepEqual(config.sources.map((s) => s.type), ['file', 'postgres', 'redis']);
  assert.equal(config.certwatch[0].domain, 'cdn.example.com');
  assert.equal(config.admin.listen?.host, '127.0.0.1');
  const routes = parseRoutesFile(readFileSync(join(DEPLOY, 'config', 'routes.yaml'), 'utf8'), 'routes.yaml', 'file');
  assert.ok(routes.length > 0);

  const check = await sh(join(ROOT, 'bin', 'sni-router'), ['check', '--config', join(DEPLOY, 'config', 'sni-router.yaml')], { env: prodEnv() });
  assert.equal(check.code, 0, check.err);
  assert.match(check.out, /cdn\.example\.com alpn=none -> turn-tls 127\.0\.0\.1:5349/);
  assert.doesNotMatch(check.out, /secret/, 'the database password is not printed');
});

// --- containers ----------------------------------------------------------------------------------

interface ComposeService {
  image?: string;
  build?: unknown;
  user?: string;
  pid?: string;
  environment?: Record<string, string>;
  volumes?: Array<{ type: string; source: string; target: string; read_only?: boolean } | string>;
  healthcheck?: { test: string[] };
  depends_on?: Record<string, { condition: string }>;
}

/** Normalizes the long and short volume syntax that `docker-compose config` prints. */
function mounts(s: ComposeService): Array<{ source: string; target: string; readOnly: boolean }> {
  return (s.volumes ?? []).map((v) => {
    if (typeof v !== 'string') return { source: v.source, target: v.target, readOnly: v.read_only === true };
    const [source, target, mode] = v.split(':');
    return { source, target, readOnly: mode === 'ro' };
  });
}

/** Where a path inside a container comes from on the host (a bind mount), or null. */
function hostPath(s: ComposeService, inside: string): { path: string; readOnly: boolean } | null {
  for (const m of mounts(s)) {
    if (!m.source.startsWith('/')) continue;
    if (inside === m.target || inside.startsWith(`${m.target}/`)) return { path: m.source + inside.slice(m.target.length), readOnly: m.readOnly };
  }
  return null;
}

function volumeFor(s: ComposeService, inside: string): { source: string; readOnly: boolean } | null {
  for (const m of mounts(s)) {
    if (inside === m.target || inside.startsWith(`${m.target}/`)) return { source: m.source, readOnly: m.readOnly };
  }
  return null;
}

test('docker-compose.yml validates, every file it mounts exists, and the router config it mounts loads and points at its services', async (t) => {
  if (!requireTools(t, 'docker-compose')) return;
  const out = await sh('docker-compose', ['-f', join(ROOT, 'docker-compose.yml'), 'config'], {
    env: { ...process.env, POSTGRES_PASSWORD: 'test-password' },
  });
  assert.equal(out.code, 0, out.err);
  const compose = parseYaml(out.out) as { services: Record<string, ComposeService> };
  const services = compose.services;
  assert.deepEqual(Object.keys(services).sort(), ['caddy', 'coturn', 'postgres', 'redis', 'router', 'volume-init']);
  for (const [name, s] of Object.entries(services)) {
    if (name !== 'volume-init') assert.ok(s.healthcheck !== undefined, `${name} has a healthcheck`);
    for (const m of mounts(s)) {
      if (m.source.startsWith('/')) assert.ok(existsSync(m.source), `${name} mounts ${relative(ROOT, m.source)}, which exists`);
    }
  }
  assert.equal(services.postgres.image, 'postgres:16');
  assert.equal(hostPath(services.postgres, '/docker-entrypoint-initdb.d/10-schema.sql')?.path, join(ROOT, 'sql', 'schema.sql'));
  assert.ok(services.router.build !== undefined, 'the router is built from this Dockerfile');

  // The router's config is the file in deploy/compose, and loads with the environment compose gives it.
  const router = services.router;
  const configFile = hostPath(router, '/etc/sni-router/sni-router.yaml');
  assert.ok(configFile !== null && configFile.path === join(DEPLOY, 'compose', 'sni-router.yaml'));
  const config: Config = loadConfig(configFile.path, { ...process.env, ...router.environment });
  assert.match(router.environment?.DATABASE_URL ?? '', /^postgres:\/\/sni_router:test-password@postgres:5432\/sni_router$/);

  // Every backend is a compose service, at the port that service listens on.
  const hostOf = (addr: string) => {
    const hp = splitHostPort(addr);
    assert.ok(typeof hp !== 'string', addr);
    return hp;
  };
  const caddyfile = readFileSync(hostPath(services.caddy, '/etc/caddy/Caddyfile')!.path, 'utf8');
  const httpsPort = /^\s*https_port (\d+)$/m.exec(caddyfile)?.[1];
  assert.deepEqual(hostOf(config.fallback.addrs[0]), { host: 'caddy', port: Number(httpsPort) });
  const turnConf = readFileSync(hostPath(services.coturn, '/etc/coturn/turnserver.conf')!.path, 'utf8');
  const tlsPort = Number(/^tls-listening-port=(\d+)$/m.exec(turnConf)?.[1]);
  const fileSource = config.sources.find((s) => s.type === 'file');
  assert.ok(fileSource?.type === 'file');
  const routesFile = hostPath(router, fileSource.path);
  assert.ok(routesFile !== null, `${fileSource.path} is mounted`);
  const fileRoutes = parseRoutesFile(readFileSync(routesFile.path, 'utf8'), routesFile.path, 'file');
  for (const r of [...config.routes, ...fileRoutes]) {
    assert.deepEqual(hostOf(r.backend.addrs[0]), { host: 'coturn', port: tlsPort }, r.match);
  }
  const pg = config.sources.find((s) => s.type === 'postgres');
  assert.ok(pg?.type === 'postgres');
  assert.equal(new URL(pg.url).hostname, 'postgres');
  assert.equal(pg.params.backend_host, 'coturn');
  assert.ok(volumeFor(router, dirname(pg.cacheFile!))?.readOnly === false, 'the postgres cache is on a writable volume');
  const redis = config.sources.find((s) => s.type === 'redis');
  assert.ok(redis?.type === 'redis');
  assert.equal(new URL(redis.url).hostname, 'redis');

  // Cert watch: Caddy's data volume, read-only in the router; the copy lands where coturn reads it;
  // the pid file coturn writes is where the router looks, in a shared PID namespace.
  const cw = config.certwatch[0];
  const caddyData = volumeFor(router, cw.caddyStorage!);
  assert.ok(caddyData !== null && caddyData.readOnly, 'caddy storage is mounted read-only');
  assert.equal(caddyData.source, volumeFor(services.caddy, '/data')?.source);
  const copy = volumeFor(router, cw.copyTo!.dir);
  assert.ok(copy !== null && !copy.readOnly);
  assert.equal(copy.source, volumeFor(services.coturn, cw.copyTo!.dir)?.source);
  assert.match(turnConf, new RegExp(`^cert=${cw.copyTo!.dir}/${cw.name}\\.crt$`, 'm'));
  assert.match(turnConf, new RegExp(`^pkey=${cw.copyTo!.dir}/${cw.name}\\.key$`, 'm'));
  assert.ok(cw.onChange?.kind === 'signal' && cw.onChange.pidFile !== null);
  assert.match(turnConf, new RegExp(`^pidfile=${cw.onChange.pidFile}$`, 'm'));
  assert.equal(volumeFor(router, cw.onChange.pidFile)?.source, volumeFor(services.coturn, cw.onChange.pidFile)?.source);
  assert.equal(services.coturn.pid, 'service:router');
  assert.equal(services.coturn.user, services.caddy.user);
  assert.equal(services.coturn.user, '10001:10001', 'the uid of the image\'s sni-router user');
  assert.match(readFileSync(join(ROOT, 'Dockerfile'), 'utf8'), /useradd --system --uid 10001/);

  // The admin port listens beyond loopback inside the container, and is published on the host's loopback only.
  assert.equal(config.admin.listen?.host, undefined);
  assert.match(readFileSync(join(ROOT, 'docker-compose.yml'), 'utf8'), /- "127\.0\.0\.1:9180:9180"/);
});

test('caddy accepts the production and compose Caddyfiles, both set up as the router\'s fallback', async (t) => {
  if (!requireTools(t, 'caddy')) return;
  const { dir, cleanup } = tempDir('sni-router-caddy-');
  t.after(cleanup);
  for (const file of [join(DEPLOY, 'caddy', 'Caddyfile'), join(DEPLOY, 'compose', 'Caddyfile')]) {
    const r = await sh('caddy', ['validate', '--config', file, '--adapter', 'caddyfile'], {
      env: { ...process.env, HOME: dir, XDG_DATA_HOME: join(dir, 'data'), XDG_CONFIG_HOME: join(dir, 'config') },
    });
    assert.equal(r.code, 0, `${file}\n${r.err}`);
    assert.match(r.out + r.err, /Valid configuration/);
    const text = readFileSync(file, 'utf8');
    // HTTPS on the fallback port; http:// redirected to :443 by hand, not to https_port.
    assert.match(text, /^\thttps_port 8443$/m, file);
    assert.match(text, /^\tauto_https disable_redirects$/m, file);
    assert.match(text, /^http:\/\/ \{\n\tredir https:\/\/\{host\}\{uri\} permanent\n\}$/m, file);
  }
  const production = loadConfig(join(DEPLOY, 'config', 'sni-router.yaml'), prodEnv());
  assert.equal(production.fallback.addrs[0], '127.0.0.1:8443');
});

test('promtool accepts the example scrape configuration', async (t) => {
  if (!requireTools(t, 'promtool')) return;
  const r = await sh('promtool', ['check', 'config', join(DEPLOY, 'prometheus', 'prometheus.example.yml')]);
  assert.equal(r.code, 0, r.out + r.err);
  assert.match(r.out, /job_name|SUCCESS/);
  const scrape = parseYaml(readFileSync(join(DEPLOY, 'prometheus', 'prometheus.example.yml'), 'utf8')) as {
    scrape_configs: Array<{ job_name: string }>;
  };
  assert.deepEqual(scrape.scrape_configs.map((c) => c.job_name), ['sni-router'], 'the job the alerts name');
});

function dockerfile(): { stages: string[]; lines: string[] } {
  const text = readFileSync(join(ROOT, 'Dockerfile'), 'utf8').replace(/\\\n/g, ' ');
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'));
  return { stages: lines.filter((l) => l.startsWith('FROM ')), lines };
}

test('the Dockerfile builds from an exact node:<version>-slim by digest, with production dependencies only, and runs as a non-root user', () => {
  const { stages, lines } = dockerfile();
  assert.ok(stages.length >= 2, 'multi-stage');
  // Which version: test/runtime.test.ts holds it to the one the tests run.
  for (const s of stages) assert.match(s, /^FROM node:\d+\.\d+\.\d+-slim@sha256:[0-9a-f]{64}( AS \w+)?$/);
  assert.ok(lines.some((l) => /^RUN npm ci --omit=dev\b/.test(l)));
  const runtime = lines.slice(lines.lastIndexOf(stages.at(-1)!));
  const user = runtime.filter((l) => l.startsWith('USER ')).at(-1);
  assert.ok(user !== undefined && !/^USER (root|0)\b/.test(user), 'the runtime stage switches to a non-root user');
  assert.ok(runtime.indexOf(user) < runtime.findIndex((l) => l.startsWith('ENTRYPOINT')));
  assert.ok(runtime.includes('EXPOSE 443 9180'));
  assert.match(runtime.find((l) => l.startsWith('HEALTHCHECK')) ?? '', /127\.0\.0\.1:9180\/healthz/);
  // Same Node flags as bin/sni-router (a small young generation keeps idle relays cheap).
  assert.equal(runtime.find((l) => l.startsWith('ENTRYPOINT')), 'ENTRYPOINT ["node", "--disable-sigusr1", "--max-semi-space-size=8", "src/cli.ts"]');

  // Every COPY source from the build context exists and is not excluded by .dockerignore.
  const ignored = readFileSync(join(ROOT, '.dockerignore'), 'utf8').split('\n').map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'));
  for (const l of lines.filter((x) => x.startsWith('COPY ') && !x.includes('--from='))) {
    const parts = l.split(/\s+/).slice(1);
    for (const src of parts.slice(0, -1)) {
      assert.ok(existsSync(join(ROOT, src)), `COPY ${src} exists`);
      assert.ok(!ignored.includes(src), `COPY ${src} is not in .dockerignore`);
    }
  }
  for (const kept of ['node_modules', '.git', 'test']) assert.ok(ignored.includes(kept), `.dockerignore leaves out ${kept}`);
});

function sourceFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    return statSync(p).isDirectory() ? sourceFiles(p) : p.endsWith('.ts') ? [p] : [];
  });
}

test('the image\'s contents run with production dependencies alone: the CLI and the healthchecks work', async (t) => {
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { dependencies: Record<string, string> };
  // Every package src/ imports is a production dependency (or a Node.js builtin).
  const builtins = new Set(builtinModules);
  for (const file of sourceFiles(join(ROOT, 'src'))) {
    for (const m of readFileSync(file, 'utf8').matchAll(/^\s*(?:import|export)\s[^'"]*?from\s+'([^'.][^']*)'/gm)) {
      const spec = m[1];
      if (spec.startsWith('node:') || builtins.has(spec)) continue;
      const name = spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0];
      assert.ok(name in pkg.dependencies, `${relative(ROOT, file)} imports ${name}, which must be in dependencies`);
    }
  }

  // What `COPY` puts in the image: package.json, bin/, src/, and the packages `npm ci --omit=dev`
  // installs (the lockfile's non-dev entries), copied, not linked, so nothing resolves back here.
  const { dir, cleanup } = tempDir('sni-router-image-');
  t.after(cleanup);
  const lock = JSON.parse(readFileSync(join(ROOT, 'package-lock.json'), 'utf8')) as { packages: Record<string, { dev?: boolean }> };
  for (const [path, meta] of Object.entries(lock.packages)) {
    if (path === '' || meta.dev === true) continue;
    cpSync(join(ROOT, path), join(dir, path), { recursive: true, dereference: true });
  }
  for (const part of ['package.json', 'bin', 'src']) cpSync(join(ROOT, part), join(dir, part), { recursive: true });
  assert.ok(!existsSync(join(dir, 'node_modules', 'typescript')), 'dev dependencies are left out');

  const env = { ...process.env, DATABASE_URL: 'postgres://sni_router:pw@postgres:5432/sni_router' };
  const version = await sh(NODE, ['src/cli.ts', '--version'], { cwd: dir, env });
  assert.equal(version.code, 0, version.err);
  const check = await sh(NODE, ['src/cli.ts', 'check', '--config', join(DEPLOY, 'compose', 'sni-router.yaml')], { cwd: dir, env });
  assert.equal(check.code, 0, check.err);

  // The healthchecks the image and compose run, against a live router and against nothing.
  // Dockerfile: HEALTHCHECK … CMD ["node", …]; compose: test: ["CMD", "node", …].
  const execForm = (text: string) => {
    const argv = JSON.parse(text) as string[];
    return argv[0] === 'CMD' ? argv.slice(1) : argv;
  };
  const imageLine = dockerfile().lines.find((l) => l.startsWith('HEALTHCHECK'))!;
  const imageCheck = execForm(imageLine.slice(imageLine.indexOf(' CMD ') + 5));
  const composeText = readFileSync(join(ROOT, 'docker-compose.yml'), 'utf8');
  const composeCheck = execForm(/^\s+test: (\["CMD", "node".*\])$/m.exec(composeText)![1]);
  const router = await startRouter('fallback: { name: web, addr: "127.0.0.1:9" }\n');
  t.after(() => router.stop());
  for (const argv of [imageCheck, composeCheck]) {
    assert.deepEqual(argv.slice(0, 2), ['node', '-e']);
    const script = argv.at(-1)!;
    assert.match(script, /127\.0\.0\.1:9180/);
    const up = await sh(NODE, ['-e', script.replace(':9180', `:${router.adminPort}`)]);
    assert.equal(up.code, 0, `${script} against a running router`);
    const down = await sh(NODE, ['-e', script.replace(':9180', ':9')]);
    assert.equal(down.code, 1, `${script} against nothing`);
  }
});
