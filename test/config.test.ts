// Configuration and command line: the Go orama-sni-router config loads unchanged, errors point at
// FILE:LINE:COL, ${ENV} is interpolated, `check` prints the table, exit codes follow the contract.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { ConfigError, parseConfig } from '../src/config/load.ts';
import { parseDuration } from '../src/config/values.ts';
import { tempDir } from './helpers.ts';

const BIN = join(import.meta.dirname, '..', 'bin', 'sni-router');

const ORAMA = `listen: ":443"                 # a string or a list of strings; "[::]:443" for IPv6
client_hello_timeout: 5s
backend_dial_timeout: 5s
max_concurrent_conns: 10000
fallback:
  name: caddy
  addr: "127.0.0.1:8443"
routes:
  - match: "cdn.example.com"
    backend:
      name: turn-tls
      addr: "127.0.0.1:5349"
`;

function run(args: string[], env: NodeJS.ProcessEnv = {}) {
  // A bare PATH, from another directory: bin/sni-router must find the pinned Node by itself.
  return spawnSync(BIN, args, { cwd: '/', env: { PATH: '/usr/bin:/bin', ...env }, encoding: 'utf8', timeout: 30_000 });
}

function errorOf(yaml: string, env: NodeJS.ProcessEnv = {}): ConfigError {
  try {
    parseConfig(yaml, 'x.yaml', env);
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected ConfigError, got ${err}`);
    return err;
  }
  assert.fail('expected an error');
}

describe('configuration', () => {
  test('the orama-sni-router config loads unchanged, with the documented defaults', () => {
    const c = parseConfig(ORAMA, 'orama.yaml');
    assert.deepEqual(c.listen, [{ host: undefined, port: 443, text: ':443' }]);
    assert.equal(c.server.clientHelloTimeoutMs, 5000);
    assert.equal(c.server.backendDialTimeoutMs, 5000);
    assert.equal(c.server.maxConcurrentConns, 10000);
    assert.equal(c.server.maxConnsPerIp, 0);
    assert.equal(c.server.idleTimeoutMs, 15 * 60_000, 'a relay silent for 15 minutes is reclaimed');
    assert.equal(c.server.tcpKeepaliveMs, 60_000, 'keepalive probes after a minute of silence');
    assert.equal(c.server.shutdownGraceMs, 30000);
    assert.equal(c.server.maxClientHelloBytes, 16384);
    assert.equal(c.server.unroutable, 'fallback');
    assert.equal(c.server.acmeTlsAlpn, 'fallback');
    assert.deepEqual(c.fallback, { name: 'caddy', addrs: ['127.0.0.1:8443'], proxyProtocol: null });
    assert.equal(c.routes.length, 1);
    assert.deepEqual(c.routes[0], {
      match: 'cdn.example.com', alpn: null, source: 'config', namespace: null,
      backend: { name: 'turn-tls', addrs: ['127.0.0.1:5349'], proxyProtocol: null },
    });
    assert.equal(c.admin.listen?.text, '127.0.0.1:9180');
    assert.deepEqual(c.log, { level: 'info', access: false });
  });

  test('every further key parses: lists of listen addresses, IPv6, addrs, proxy_protocol, alpn forms', () => {
    const c = parseConfig(`
listen: ["0.0.0.0:443", "[::]:443"]
max_conns_per_ip: 50
idle_timeout: 10m
shutdown_grace: 1m30s
max_client_hello_bytes: 8192
unroutable: close
acme_tls_alpn: route
admin: { listen: "[::1]:9999" }
log: { level: debug, access: true }
fallback: { addrs: ["127.0.0.1:1", "[::1]:2"], proxy_protocol: v1 }
routes:
  - { match: "*.a.example", alpn: none, backend: { name: t, addr: "h:1", proxy_protocol: v2 } }
  - { match: "**.b.example", alpn: any, backend: { addr: "h:2" } }
  - { match: "c.example", alpn: [h2, "http/1.1"], backend: { addr: "h:3" } }
`, 'full.yaml');
    assert.deepEqual(c.listen.map((l) => [l.host, l.port]), [['0.0.0.0', 443], ['::', 443]]);
    assert.equal(c.server.idleTimeoutMs, 600_000);
    assert.equal(c.server.shutdownGraceMs, 90_000);
    assert.equal(c.server.unroutable, 'close');
    assert.equal(c.fallback.name, 'fallback');
    assert.deepEqual(c.fallback.addrs, ['127.0.0.1:1', '[::1]:2']);
    assert.equal(c.routes[0].backend.proxyProtocol, 'v2');
    assert.deepEqual(c.routes.map((r) => r.alpn), [{ kind: 'none' }, { kind: 'any' }, { kind: 'list', protocols: ['h2', 'http/1.1'] }]);
  });

  test('durations follow Go syntax', () => {
    assert.equal(parseDuration('250ms'), 250);
    assert.equal(parseDuration('1h2m3s'), 3_723_000);
    assert.equal(parseDuration('1.5s'), 1500);
    assert.equal(parseDuration('0'), 0);
    assert.equal(parseDuration('5'), null);
    assert.equal(parseDuration('5 s'), null);
  });

  test('an unknown key is an error naming the key and its line', () => {
    const e = errorOf(`${ORAMA}client_helo_timeout: 5s\n`);
    assert.equal(e.message, 'x.yaml:13:1: unknown key "client_helo_timeout" (allowed: listen, client_hello_timeout, backend_dial_timeout, max_concurrent_conns, max_conns_per_ip, idle_timeout, shutdown_grace, max_client_hello_bytes, unroutable, acme_tls_alpn, backend_cooldown, tcp_keepalive, relay, fallback, routes, admin, log, sources, certwatch, workers)');
    const nested = errorOf(ORAMA.replace('      name: turn-tls', '      nmae: turn-tls'));
    assert.match(nested.message, /^x\.yaml:11:7: unknown key "nmae" in routes\[0\]\.backend/);
  });

  test('a bad value points at the value', () => {
    assert.match(errorOf(ORAMA.replace('client_hello_timeout: 5s', 'client_hello_timeout: soon')).message,
      /^x\.yaml:2:23: client_hello_timeout must be a duration/);
    assert.match(errorOf(ORAMA.replace('"127.0.0.1:5349"', '"127.0.0.1"')).message, /^x\.yaml:12:13: routes\[0\]\.backend\.addr: "127\.0\.0\.1" has no port/);
    assert.match(errorOf(ORAMA.replace('"cdn.example.com"', '"cdn.*.com"')).message, /^x\.yaml:9:12: .*wildcard/);
    assert.match(errorOf('routes: []\n').message, /fallback is required/);
  });

  test('a YAML syntax error has a position', () => {
    assert.match(errorOf('listen: [":443"\nfallback: {}\n').message, /^x\.yaml:\d+:\d+: /);
    assert.match(errorOf('a: 1\na: 2\n').message, /^x\.yaml:2:1: /);
  });

  test('${ENV} is replaced; an unset variable is an error at its line', () => {
    const env = { TURN_PORT: '5349', FB: '127.0.0.1:9' };
    const c = parseConfig(`fallback: { addr: "\${FB}" }\nmax_concurrent_conns: \${TURN_PORT}\nroutes:\n  - { match: a.b, backend: { addr: "127.0.0.1:\${TURN_PORT}" } }\n`, 'e.yaml', env);
    assert.deepEqual(c.fallback.addrs, ['127.0.0.1:9']);
    assert.equal(c.server.maxConcurrentConns, 5349);
    assert.deepEqual(c.routes[0].backend.addrs, ['127.0.0.1:5349']);
    assert.equal(errorOf('fallback: { addr: "${NOPE}" }\n').message, 'x.yaml:1:19: environment variable NOPE is not set');
  });

  test('sources and certwatch settings are validated', () => {
    assert.match(errorOf(`${ORAMA}sources:\n  - type: postgres\n    url: "mysql://x"\n`).message, /^x\.yaml:15:10: sources\[0\]\.url must start with postgres/);
    assert.match(errorOf(`${ORAMA}sources:\n  - type: ftp\n`).message, /^x\.yaml:14:11: sources\[0\]\.type must be one of file, postgres, redis/);
    assert.match(errorOf(`${ORAMA}sources:\n  - type: file\n    path: /x\n    url: "redis://h"\n`).message,
      /^x\.yaml:16:5: unknown key "url" in sources\[0\] \(allowed: type, name, path\)$/, 'the keys of the source\'s own type');
    // URLs the clients would refuse at run time are refused here, without echoing a password.
    for (const url of ['postgres://u:SECRETPW@127.0.0.1:notaport/db', 'postgres://u:SECRET#PW@127.0.0.1/db']) {
      const err = errorOf(`${ORAMA}sources:\n  - type: postgres\n    url: "${url}"\n    query: "SELECT 1"\n`);
      assert.match(err.message, /^x\.yaml:15:10: sources\[0\]\.url cannot be used: Invalid URL/);
      assert.doesNotMatch(err.message, /SECRET/);
    }
    const redisErr = errorOf(`${ORAMA}sources:\n  - type: redis\n    url: "redis://:SECRETPW@127.0.0.1:x/0"\n`);
    assert.match(redisErr.message, /^x\.yaml:15:10: sources\[0\]\.url is not a valid URL/);
    assert.doesNotMatch(redisErr.message, /SECRET/);
    // A host-less URL with the socket in a parameter is what pg accepts, so it is accepted.
    assert.equal(parseConfig(`${ORAMA}sources:\n  - type: postgres\n    url: "postgres://u@/db?host=/run/postgresql"\n    query: "SELECT 1"\n`, 'x.yaml').sources.length, 1);
    assert.match(errorOf(`${ORAMA}certwatch:\n  - domain: cdn.example.com\n    cert: /a\n`).message, /cert and key go together/);
    assert.match(errorOf(`${ORAMA}certwatch:\n  - domain: c.d\n    cert: /a\n    key: /b\n    on_change: { restart: { systemd_unit: x }, exec: [a] }\n`).message, /exactly one of signal, restart, exec/);
    const ok = parseConfig(`${ORAMA}sources:
  - type: file
    path: /etc/sni-router/routes.yaml
  - type: postgres
    url: "postgres://u:pw@db/x"
    interval: 10s
    listen_channel: sni_router_routes
    query: default
    params: { base_domain: example.com, node_id: node-1 }
    cache_file: /var/lib/sni-router/postgres-routes.json
  - type: redis
    url: "redis://127.0.0.1:6379/0"
    key: "sni-router:routes"
    channel: "sni-router:routes"
    resync_interval: 30s
certwatch:
  - name: cdn
    domain: cdn.example.com
    caddy_storage: /var/lib/caddy/.local/share/caddy
    copy_to: { dir: /etc/turn/certs, mode: "0640" }
    on_change:
      signal: { systemd_unit: coturn.service, signal: SIGUSR2 }
    min_interval: 30s
`, 'x.yaml');
    assert.deepEqual(ok.sources.map((s) => s.name), ['file', 'postgres', 'redis']);
    assert.equal(ok.certwatch[0].copyTo?.mode, 0o640);
    assert.deepEqual(ok.certwatch[0].onChange, { kind: 'signal', systemdUnit: 'coturn.service', pidFile: null, docker: null, signal: 'SIGUSR2' });
  });

  test('on_change restarts or signals a Docker container by name; a wrong target is an error at its key', () => {
    const onChange = (yaml: string) => `${ORAMA}certwatch:\n  - domain: cdn.example.com\n    cert: /a\n    key: /b\n    on_change:\n      ${yaml}\n`;
    const action = (yaml: string) => parseConfig(onChange(yaml), 'x.yaml').certwatch[0].onChange;
    assert.deepEqual(action('restart: { docker_container: livekit }'),
      { kind: 'restart', systemdUnit: null, docker: { container: 'livekit', socket: '/var/run/docker.sock' } });
    assert.deepEqual(action('signal: { docker_container: coturn-1.a_b, docker_socket: /run/docker.sock, signal: usr2 }'),
      { kind: 'signal', systemdUnit: null, pidFile: null, docker: { container: 'coturn-1.a_b', socket: '/run/docker.sock' }, signal: 'SIGUSR2' });
    assert.deepEqual(action('restart: { systemd_unit: livekit.service }'), { kind: 'restart', systemdUnit: 'livekit.service', docker: null });
    // Line 18 is the on_change line; columns point at the mapping, the key or the value at fault.
    const err = (yaml: string) => errorOf(onChange(yaml)).message;
    assert.equal(err('restart: { docker_container: livekit, systemd_unit: livekit.service }'),
      'x.yaml:18:16: certwatch[0].on_change.restart needs exactly one of systemd_unit, docker_container');
    assert.equal(err('restart: {}'), 'x.yaml:18:16: certwatch[0].on_change.restart needs exactly one of systemd_unit, docker_container');
    assert.equal(err('signal: { pid_file: /run/t.pid, docker_container: coturn, signal: SIGUSR2 }'),
      'x.yaml:18:15: certwatch[0].on_change.signal needs exactly one of systemd_unit, pid_file, docker_container');
    assert.equal(err('signal: { systemd_unit: coturn.service, docker_socket: /run/docker.sock, signal: SIGUSR2 }'),
      'x.yaml:18:62: certwatch[0].on_change.signal.docker_socket goes only with docker_container');
    for (const bad of ['"/livekit"', '"live kit"', '"-livekit"', '"livekit/../x"']) {
      assert.match(err(`restart: { docker_container: ${bad} }`),
        /^x\.yaml:18:36: certwatch\[0\]\.on_change\.restart\.docker_container ".*" is not a Docker container name \(a letter or digit, then letters, digits, '_', '\.' or '-'\)$/, bad);
    }
    assert.equal(err('restart: { docker_container: livekit, docker_socket: run/docker.sock }'),
      'x.yaml:18:60: certwatch[0].on_change.restart.docker_socket must be an absolute path');
    assert.equal(err('restart: { docker_container: livekit, docker_sock: /x }'),
      'x.yaml:18:45: unknown key "docker_sock" in certwatch[0].on_change.restart (allowed: systemd_unit, docker_container, docker_socket)');
    assert.equal(err('restart: { pid_file: /run/t.pid }'),
      'x.yaml:18:18: unknown key "pid_file" in certwatch[0].on_change.restart (allowed: systemd_unit, docker_container, docker_socket)', 'a pid file cannot be restarted');
  });
});

describe('certwatch for each namespace', () => {
  // ORAMA is 12 lines: certwatch: on line 13, the entry from line 14.
  const cw = (entry: string) => `${ORAMA}certwatch:\n  - ${entry.trim().split('\n').join('\n    ')}\n`;
  const TEMPLATE = `for_each: namespace
name: "turn-{namespace}"
domain: "cdn.ns-{namespace}.example.com"
caddy_storage: /caddy
copy_to: { dir: "/etc/turn/{namespace}" }
on_change: { restart: { systemd_unit: "turn@{namespace}.service" } }`;

  test('a for_each entry is a template; stagger, restart_window and urgent_before have defaults, and days are durations', () => {
    const c = parseConfig(cw(TEMPLATE), 'x.yaml');
    assert.deepEqual(c.certwatch, []);
    assert.equal(c.certwatchTemplates.length, 1);
    const proto = c.certwatchTemplates[0].proto;
    assert.deepEqual([proto.name, proto.domain, proto.copyTo?.dir], ['turn-{namespace}', 'cdn.ns-{namespace}.example.com', '/etc/turn/{namespace}']);
    assert.deepEqual([proto.staggerMs, proto.restartWindow, proto.urgentBeforeMs], [10_000, null, 7 * 86_400_000]);
    const tuned = parseConfig(cw(`${TEMPLATE}\nstagger: 2s\nrestart_window: "23:00-02:00"\nurgent_before: 36h`), 'x.yaml').certwatchTemplates[0].proto;
    assert.deepEqual([tuned.staggerMs, tuned.restartWindow, tuned.urgentBeforeMs], [2000, { startMin: 1380, endMin: 120, text: '23:00-02:00' }, 36 * 3_600_000]);
    assert.equal(parseDuration('7d'), 7 * 86_400_000);
    const plain = parseConfig(cw('domain: cdn.example.com\ncert: /a\nkey: /b\nrestart_window: "02:00-05:00"'), 'x.yaml').certwatch[0];
    assert.deepEqual([plain.namespace, plain.staggerMs, plain.restartWindow?.text], [null, 10_000, '02:00-05:00']);
  });

  test('templates that can never work are errors at their key', () => {
    const err = (entry: string) => errorOf(cw(entry)).message;
    assert.equal(err(TEMPLATE.replace('for_each: namespace', 'for_each: node')), 'x.yaml:14:15: certwatch[0].for_each must be one of namespace, got "node"');
    assert.equal(err(TEMPLATE.replace('turn-{namespace}', 'turn')), "x.yaml:15:11: certwatch[0].name must contain {namespace}: each namespace's entry needs a name (and files) of its own");
    assert.equal(err(TEMPLATE.replace('"/etc/turn/{namespace}"', '"/etc/turn/{node}"')), 'x.yaml:18:21: certwatch[0].copy_to.dir: unknown placeholder {node} (known: {namespace})');
    assert.equal(err(TEMPLATE.replace('caddy_storage: /caddy', 'caddy_storage: "/caddy/{namespace}"')),
      'x.yaml:17:20: certwatch[0].caddy_storage cannot use {namespace} (it is the same for every namespace)');
    assert.equal(err(TEMPLATE.replace('caddy_storage: /caddy', 'cert: /a\nkey: /b')),
      "x.yaml:14:5: certwatch[0]: an entry with for_each: namespace reads Caddy's storage (caddy_storage), not cert and key");
    assert.match(err(TEMPLATE.replace('turn@{namespace}.service', 'turn@{namespace}')), /^x\.yaml:19:43: certwatch\[0\]\.on_change\.restart\.systemd_unit makes no valid entry \(for namespace "x": .*does not end in a unit type/);
    assert.equal(err(`${TEMPLATE}\nrestart_window: "5am-7am"`), 'x.yaml:20:21: certwatch[0].restart_window must be "HH:MM-HH:MM" in local time, like "02:00-05:00"');
    assert.equal(err(`${TEMPLATE}\nurgent_before: 2y`), 'x.yaml:20:20: certwatch[0].urgent_before must be a duration like 7d or 36h, at most 400d');
    assert.equal(err('domain: cdn.example.com\ncert: /a\nkey: /b\non_change: { exec: ["/bin/reload", "{namespace}"] }'),
      'x.yaml:17:40: certwatch[0].on_change.exec[1] uses {namespace}, which only an entry with for_each: namespace fills in');
    // {cert} and {key} stay known in a template's exec arguments.
    assert.doesNotThrow(() => parseConfig(cw(TEMPLATE.replace(/on_change: .*/, 'on_change: { exec: ["/bin/reload", "{namespace}", "{cert}", "{key}"] }')), 'x.yaml'));
  });
});

describe('postgres names', () => {
  // ORAMA is 12 lines: the source starts on line 14, a names entry on line 19.
  const pg = (extra: string, query = 'default') => `${ORAMA}sources:
  - type: postgres
    url: "postgres://u@db/x"
    query: ${query}
    params: { base_domain: example.com, node_id: node-1 }
${extra}`;

  test('without names, the default query makes the names of the stealth-TURN deployment guide', () => {
    const c = parseConfig(pg(''), 'x.yaml');
    assert.ok(c.sources[0].type === 'postgres');
    assert.deepEqual(c.sources[0].names, [
      { match: 'cdn.ns-{namespace}.{base_domain}', alpn: { kind: 'none' }, name: 'turn-{namespace}' },
      { match: 'turn.ns-{namespace}.{base_domain}', alpn: null, name: 'turn-{namespace}' },
    ]);
  });

  test('templates over {namespace} and params, with alpn and a backend name', () => {
    const c = parseConfig(pg(`    names:
      - { match: "turn-{namespace}.{base_domain}" }
      - { match: "{namespace}.{node_id}.{base_domain}", alpn: [h2], name: "web-{namespace}" }
`), 'x.yaml');
    assert.ok(c.sources[0].type === 'postgres');
    assert.deepEqual(c.sources[0].names, [
      { match: 'turn-{namespace}.{base_domain}', alpn: null, name: 'turn-{namespace}' },
      { match: '{namespace}.{node_id}.{base_domain}', alpn: { kind: 'list', protocols: ['h2'] }, name: 'web-{namespace}' },
    ]);
    // Names alike for one namespace ("x") but not for every one are no twins.
    assert.equal(parseConfig(pg('    names: [{ match: "x{namespace}.example.com" }, { match: "{namespace}x.example.com" }]\n'), 'x.yaml').sources.length, 1);
  });

  test('a template that cannot make names is an error at its line and column', () => {
    const names = (line: string) => errorOf(pg(`    names:\n      - ${line}\n`)).message;
    assert.match(names('{ match: "cdn.{namespace}.{domain}" }'),
      /^x\.yaml:19:18: sources\[0\]\.names\[0\]\.match: unknown placeholder \{domain\} \(known: \{namespace\}, \{base_domain\}, \{node_id\}\)$/);
    assert.match(names('{ match: "cdn.{namespace}.example.com", name: "t-{ns}" }'), /^x\.yaml:19:55: .*names\[0\]\.name: unknown placeholder \{ns\}/);
    assert.match(names('{ match: "cdn.example.com" }'), /^x\.yaml:19:18: .*must contain \{namespace\}/);
    assert.match(names('{ match: "cdn.{namespace.example.com" }'), /^x\.yaml:19:18: .*"\{" at character 5 does not open a \{placeholder\}/);
    assert.match(names('{ match: "cdn.{namespace}..{base_domain}" }'), /^x\.yaml:19:18: .*makes no valid name/);
    assert.match(names('{ match: "cdn.{namespace}.{base_domain}", alpn: [] }'), /^x\.yaml:19:57: .*alpn must name at least one protocol/);
    assert.match(names('{ match: "{namespace}.example.com", backend: x }'), /^x\.yaml:19:45: unknown key "backend"/);
    assert.match(errorOf(pg('    names:\n      - { match: "a-{namespace}.{base_domain}" }\n      - { match: "A-{namespace}.{base_domain}." }\n')).message,
      /^x\.yaml:20:9: sources\[0\]\.names\[1\] makes the same names as sources\[0\]\.names\[0\]/);
    assert.match(errorOf(pg('    names: []\n')).message, /^x\.yaml:18:12: sources\[0\]\.names must name at least one template/);
    assert.match(errorOf(pg('    names: [{ match: "{namespace}.example.com" }]\n', '"SELECT 1"')).message,
      /^x\.yaml:18:5: sources\[0\]\.names is for query: default only/);
    assert.match(errorOf(pg('').replace('node_id: node-1', 'node_id: node-1, namespace: x')).message,
      /^x\.yaml:17:58: sources\[0\]\.params\.namespace: \{namespace\} in names is each row's namespace/);
  });

  test('check refuses an unknown placeholder with FILE:LINE:COL and exit 2, and prints the names of a good file', () => {
    const { dir, cleanup } = tempDir();
    try {
      const bad = join(dir, 'bad.yaml');
      writeFileSync(bad, pg('    names:\n      - { match: "cdn.ns-{namespace}.{basedomain}", alpn: none }\n'));
      const r = run(['check', '--config', bad]);
      assert.equal(r.status, 2, r.stdout);
      assert.match(r.stderr.split('\n')[0], new RegExp(`^${bad}:19:18: sources\\[0\\]\\.names\\[0\\]\\.match: unknown placeholder \\{basedomain\\}`));
      const good = join(dir, 'good.yaml');
      writeFileSync(good, pg(''));
      const ok = run(['check', '--config', good]);
      assert.equal(ok.status, 0, ok.stderr);
      assert.match(ok.stdout, /^ {4}names cdn\.ns-\{namespace\}\.\{base_domain\} alpn=none -> turn-\{namespace\}$/m);
      assert.match(ok.stdout, /^ {4}names turn\.ns-\{namespace\}\.\{base_domain\} \(alpn from stealth_enabled\) -> turn-\{namespace\}$/m);
    } finally {
      cleanup();
    }
  });
});

describe('command line', () => {

  test('check prints the effective static table and exits 0', () => {
    const { dir, cleanup } = tempDir();
    try {
      const file = join(dir, 'c.yaml');
      writeFileSync(file, ORAMA);
      const r = run(['check', '--config', file]);
      assert.equal(r.status, 0, r.stderr);
      assert.match(r.stdout, /cdn\.example\.com -> turn-tls 127\.0\.0\.1:5349 \[config\]/);
      assert.match(r.stdout, /fallback: caddy 127\.0\.0\.1:8443/);
      // SNI_ROUTER_CONFIG is the default for --config.
      assert.equal(run(['check'], { SNI_ROUTER_CONFIG: file }).status, 0);
    } finally {
      cleanup();
    }
  });

  test('check prints the table the router would run: a route that loses a conflict is listed as left out', () => {
    const { dir, cleanup } = tempDir();
    try {
      const routesFile = join(dir, 'routes.yaml');
      writeFileSync(routesFile, 'routes:\n  - { match: a.example.com, backend: { name: from-file, addr: "127.0.0.1:3" } }\n'
        + '  - { match: b.example.com, backend: { name: b, addr: "127.0.0.1:4" } }\n');
      const file = join(dir, 'c.yaml');
      writeFileSync(file, `fallback: { name: caddy, addr: "127.0.0.1:8443" }
routes:
  - { match: a.example.com, backend: { name: first, addr: "127.0.0.1:1" } }
  - { match: "A.example.com.", backend: { name: second, addr: "127.0.0.1:2" } }
  - { match: a.example.com, alpn: none, backend: { name: turn, addr: "127.0.0.1:5" } }
sources:
  - { type: file, name: extra, path: "${routesFile}" }
`);
      const r = run(['check', '--config', file]);
      assert.equal(r.status, 0, r.stderr);
      const routes = r.stdout.slice(r.stdout.indexOf('routes ('), r.stdout.indexOf('conflicts ('));
      assert.match(routes, /^routes \(3, in precedence order\):$/m);
      assert.match(routes, /a\.example\.com -> first 127\.0\.0\.1:1 \[config\]/);
      assert.match(routes, /a\.example\.com alpn=none -> turn/, 'another alpn is no conflict');
      assert.match(routes, /b\.example\.com -> b .*\[extra\]/);
      assert.doesNotMatch(routes, /second|from-file/);
      assert.match(r.stdout, /^conflicts \(2, left out: the earlier route wins\):$/m);
      assert.match(r.stdout, /a\.example\.com -> second 127\.0\.0\.1:2 \[config\], loses to \[config\] -> first$/m);
      assert.match(r.stdout, /a\.example\.com -> from-file 127\.0\.0\.1:3 \[extra\], loses to \[config\] -> first$/m);
    } finally {
      cleanup();
    }
  });

  test('check on a bad file prints FILE:LINE:COL and exits 2', () => {
    const { dir, cleanup } = tempDir();
    try {
      const file = join(dir, 'bad.yaml');
      writeFileSync(file, `${ORAMA}bogus: 1\n`);
      const r = run(['check', '-c', file]);
      assert.equal(r.status, 2);
      assert.equal(r.stderr.trim().split('\n')[0].startsWith(`${file}:13:1: unknown key "bogus"`), true, r.stderr);
    } finally {
      cleanup();
    }
  });

  test('--version, --help, usage errors', () => {
    const v = run(['--version']);
    assert.equal(v.status, 0);
    assert.match(v.stdout, /^sni-router \d+\.\d+\.\d+/);
    const h = run(['--help']);
    assert.equal(h.status, 0);
    assert.match(h.stdout, /sni-router check --config FILE/);
    assert.equal(run(['--bogus']).status, 2);
    assert.equal(run([]).status, 2);
  });

  test('bin/sni-router runs with any PATH: empty, without coreutils, or unset; through absolute and relative symlinks', () => {
    const { dir, cleanup } = tempDir();
    try {
      symlinkSync(BIN, join(dir, 'sni-router'));
      mkdirSync(join(dir, 'sub'));
      symlinkSync('../sni-router', join(dir, 'sub', 'relative'));
      for (const program of [BIN, join(dir, 'sni-router'), join(dir, 'sub', 'relative')]) {
        for (const env of [{ PATH: '' }, { PATH: '/nonexistent' }, {}]) {
          const r = spawnSync(program, ['--version'], { cwd: '/', env, encoding: 'utf8', timeout: 30_000 });
          assert.equal(r.status, 0, `${program} with ${JSON.stringify(env)}: ${r.stderr}`);
          assert.match(r.stdout, /^sni-router \d+\.\d+\.\d+/);
        }
      }
    } finally {
      cleanup();
    }
  });

  test('run fails with exit 1 when it cannot listen', async () => {
    const { dir, cleanup } = tempDir();
    const net = await import('node:net');
    const blocker = net.createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', () => r()));
    try {
      const port = (blocker.address() as import('node:net').AddressInfo).port;
      const file = join(dir, 'c.yaml');
      writeFileSync(file, `listen: "127.0.0.1:${port}"\nadmin: { listen: "" }\nfallback: { addr: "127.0.0.1:9" }\n`);
      const r = run(['--config', file]);
      assert.equal(r.status, 1);
      assert.match(r.stderr, /cannot listen on 127\.0\.0\.1:\d+/);
    } finally {
      blocker.close();
      cleanup();
    }
  });
});
