// The cert watcher's pure policy: when an action may run (restart_window, urgent_before, stagger,
// retries) and which entries a set of namespaces makes of a `for_each: namespace` template. No I/O:
// the templates come from the real config parser, the rest are plain values.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { parseRestartWindow, unitNameProblem } from '../src/config/certwatch.ts';
import { parseConfig } from '../src/config/load.ts';
import type { CertAction, CertwatchTemplate, RestartWindow } from '../src/config/types.ts';
import { planEntries } from '../src/certwatch/expand.ts';
import { inWindow, isUrgent, pickNext, retryDelay, whenToAct, windowOpensAt } from '../src/certwatch/policy.ts';

const DAY = 86_400_000;

function win(text: string): RestartWindow {
  const w = parseRestartWindow(text);
  assert.ok(typeof w !== 'string', `${text}: ${String(w)}`);
  return w;
}

/** A local time on 10 June 2025 (day +1: the 11th). */
function at(h: number, m: number, day = 0): Date {
  return new Date(2025, 5, 10 + day, h, m);
}

const restart: CertAction = { kind: 'restart', systemdUnit: 'turn@a.service', docker: null };
const signal: CertAction = { kind: 'signal', systemdUnit: 'coturn.service', pidFile: null, docker: null, signal: 'SIGUSR2' };
const exec: CertAction = { kind: 'exec', argv: ['/bin/true'] };

describe('restart_window', () => {
  test('a window within one day holds from its start up to, not including, its end', () => {
    const w = win('02:00-05:00');
    assert.deepEqual([at(1, 59), at(2, 0), at(4, 59), at(5, 0), at(12, 0)].map((d) => inWindow(w, d)), [false, true, true, false, false]);
  });

  test('a window that wraps midnight holds on both sides of it', () => {
    const w = win('23:00-02:00');
    assert.deepEqual([at(22, 59), at(23, 0), at(0, 0), at(1, 59), at(2, 0), at(12, 0)].map((d) => inWindow(w, d)), [false, true, true, true, false, false]);
  });

  test('the next opening is later the same day or the next day; an open window opens now', () => {
    const w = win('02:00-05:00');
    assert.equal(windowOpensAt(w, at(12, 0)).getTime(), at(2, 0, 1).getTime(), 'after the window: tomorrow');
    assert.equal(windowOpensAt(w, at(1, 0)).getTime(), at(2, 0).getTime(), 'before it: today');
    assert.equal(windowOpensAt(w, at(3, 7)).getTime(), at(3, 7).getTime(), 'in it: now');
    const wrap = win('23:00-02:00');
    assert.equal(windowOpensAt(wrap, at(12, 0)).getTime(), at(23, 0).getTime());
    assert.equal(windowOpensAt(wrap, at(2, 30)).getTime(), at(23, 0).getTime());
    assert.equal(windowOpensAt(wrap, at(0, 30)).getTime(), at(0, 30).getTime(), 'after midnight, still open');
  });

  test('"HH:MM-HH:MM" is parsed; a window that is empty or off the clock is refused', () => {
    assert.deepEqual(parseRestartWindow('02:00-05:00'), { startMin: 120, endMin: 300, text: '02:00-05:00' });
    assert.deepEqual(parseRestartWindow('22:30-24:00'), { startMin: 1350, endMin: 0, text: '22:30-24:00' }, '24:00 ends at midnight');
    for (const bad of ['2-5', '25:00-01:00', '02:60-03:00', '02:00-02:00', '00:00-24:00', 'always']) {
      assert.equal(typeof parseRestartWindow(bad), 'string', bad);
    }
  });
});

describe('urgent_before and which actions wait', () => {
  const now = at(12, 0);
  const timing = (action: CertAction, servingUntil: number | null, window: RestartWindow | null = win('02:00-05:00')) => ({
    action, window, urgentBeforeMs: 7 * DAY, servingUntil,
  });

  test('a restart outside its window waits for it while the served certificate has time left', () => {
    assert.deepEqual(whenToAct(timing(restart, now.getTime() + 30 * DAY), now), { kind: 'deferred', until: at(2, 0, 1) });
  });

  test('a restart runs at once in its window, without a window, or when the served certificate expires within urgent_before', () => {
    assert.deepEqual(whenToAct(timing(restart, now.getTime() + 30 * DAY), at(3, 0)), { kind: 'now', urgent: false });
    assert.deepEqual(whenToAct(timing(restart, now.getTime() + 30 * DAY, null), now), { kind: 'now', urgent: false });
    assert.deepEqual(whenToAct(timing(restart, now.getTime() + 3 * DAY), now), { kind: 'now', urgent: true });
    assert.deepEqual(whenToAct(timing(restart, null), now), { kind: 'now', urgent: true }, 'unknown: it may serve nothing usable');
  });

  test('signal and exec are never deferred', () => {
    assert.deepEqual(whenToAct(timing(signal, now.getTime() + 30 * DAY), now), { kind: 'now', urgent: false });
    assert.deepEqual(whenToAct(timing(exec, now.getTime() + 30 * DAY), now), { kind: 'now', urgent: false });
  });

  test('urgency counts from now, the boundary included', () => {
    assert.equal(isUrgent(null, 0, DAY), true);
    assert.equal(isUrgent(DAY, 0, DAY), true);
    assert.equal(isUrgent(DAY + 1, 0, DAY), false);
  });
});

describe('the next action', () => {
  const q = (key: string, retryAt = 0, ready = true) => ({ key, ready, retryAt });

  test('one at a time, the next starting stagger after the previous ended', () => {
    const last = { key: 'a', endedAt: 1000, staggerMs: 500 };
    assert.deepEqual(pickNext([q('b')], 1200, last), { wakeAt: 1500 });
    assert.deepEqual(pickNext([q('b')], 1500, last), { run: q('b') });
    assert.deepEqual(pickNext([q('b')], 1200, null), { run: q('b') }, 'nothing ran before');
  });

  test('a failed action waiting for its retry does not hold up the ones behind it; its own retry waits only for its backoff', () => {
    assert.deepEqual(pickNext([q('a', 5000), q('b')], 1000, null), { run: q('b') });
    assert.deepEqual(pickNext([q('a', 5000)], 1000, null), { wakeAt: 5000 });
    assert.deepEqual(pickNext([q('a', 900)], 1000, { key: 'a', endedAt: 800, staggerMs: 10_000 }), { run: q('a', 900) });
  });

  test('deferred and failed actions are passed over; nothing ready is null', () => {
    assert.deepEqual(pickNext([q('a', 0, false), q('b')], 0, null), { run: q('b') });
    assert.equal(pickNext([q('a', 0, false)], 0, null), null);
    assert.equal(pickNext([], 0, null), null);
  });

  test('retries back off by doubling, up to the cap', () => {
    assert.deepEqual([1, 2, 3, 4, 10].map((n) => retryDelay(n, 1000, 5000)), [1000, 2000, 4000, 5000, 5000]);
  });
});

describe('for_each: namespace entries', () => {
  function templates(entries: string): CertwatchTemplate[] {
    return [...parseConfig(`fallback: { addr: "127.0.0.1:9" }\ncertwatch:\n${entries}`, 't.yaml').certwatchTemplates];
  }
  const CONTRACT = `  - for_each: namespace
    name: "turn-{namespace}"
    domain: "cdn.ns-{namespace}.example.com"
    caddy_storage: /var/lib/caddy/.local/share/caddy
    copy_to: { dir: "/etc/turn/{namespace}" }
    on_change: { restart: { systemd_unit: "orama-namespace-turn@{namespace}.service" } }
    stagger: 10s
    restart_window: "02:00-05:00"
    urgent_before: 7d
`;

  test('each namespace gets the template with its name filled in, in a stable order', () => {
    const plan = planEntries(templates(CONTRACT), ['b', 'a'], new Set());
    assert.deepEqual(plan.skipped, []);
    const [a, b] = plan.entries[0];
    assert.deepEqual(plan.entries[0].map((e) => e.name), ['turn-a', 'turn-b']);
    assert.equal(a.namespace, 'a');
    assert.equal(a.domain, 'cdn.ns-a.example.com');
    assert.deepEqual(a.copyTo, { dir: '/etc/turn/a', mode: 0o640 });
    assert.deepEqual(a.onChange, { kind: 'restart', systemdUnit: 'orama-namespace-turn@a.service', docker: null });
    assert.equal(b.onChange?.kind === 'restart' ? b.onChange.systemdUnit : null, 'orama-namespace-turn@b.service');
    assert.equal(a.caddyStorage, '/var/lib/caddy/.local/share/caddy');
    assert.deepEqual([a.staggerMs, a.urgentBeforeMs, a.restartWindow?.text], [10_000, 7 * DAY, '02:00-05:00']);
  });

  test('pid_file and exec arguments are filled in; {cert} and {key} stay for the deployed paths', () => {
    const [t1, t2] = templates(`  - for_each: namespace
    name: "coturn-{namespace}"
    domain: "cdn.ns-{namespace}.example.com"
    caddy_storage: /caddy
    on_change: { signal: { pid_file: "/run/turn/{namespace}.pid", signal: SIGUSR2 } }
  - for_each: namespace
    name: "hook-{namespace}"
    domain: "cdn.ns-{namespace}.example.com"
    caddy_storage: /caddy
    on_change: { exec: ["/usr/local/bin/reload", "--ns={namespace}", "{cert}", "{key}"] }
`);
    const plan = planEntries([t1, t2], ['x1'], new Set());
    assert.deepEqual(plan.entries[0][0].onChange, { kind: 'signal', systemdUnit: null, pidFile: '/run/turn/x1.pid', docker: null, signal: 'SIGUSR2' });
    assert.deepEqual(plan.entries[1][0].onChange, { kind: 'exec', argv: ['/usr/local/bin/reload', '--ns=x1', '{cert}', '{key}'] });
  });

  test('a namespace that would make an invalid unit, leave copy_to.dir or make an invalid container is skipped with its reason; the others go on', () => {
    const long = 'n'.repeat(60); // "ns-" + 60: still a DNS label in the domain
    const unitPlan = planEntries(templates(CONTRACT.replace('orama-namespace-turn@{namespace}.service',
      `${'orama-namespace-turn-'.repeat(9)}@{namespace}.service`)), ['a', long], new Set());
    assert.deepEqual(unitPlan.entries[0].map((e) => e.namespace), ['a']);
    assert.deepEqual(unitPlan.skipped.map((s) => [s.namespace, s.reason]), [[long, 'invalid_unit']]);
    assert.match(unitPlan.skipped[0].detail, /^on_change\.restart\.systemd_unit: the unit name is 2\d\d characters long \(at most 255\)$/);

    const pathPlan = planEntries(templates(CONTRACT.replace('cdn.ns-{namespace}.example.com', 'cdn.example.com')), ['..', 'a'], new Set());
    assert.deepEqual(pathPlan.skipped.map((s) => [s.namespace, s.reason]), [['..', 'invalid_path']]);
    assert.deepEqual(pathPlan.entries[0].map((e) => e.namespace), ['a']);

    const dockerPlan = planEntries(templates(CONTRACT.replace('{ systemd_unit: "orama-namespace-turn@{namespace}.service" }', '{ docker_container: "{namespace}" }')),
      ['_x', 'b'], new Set());
    assert.deepEqual(dockerPlan.skipped.map((s) => [s.namespace, s.reason]), [['_x', 'invalid_container']]);
    assert.deepEqual(dockerPlan.entries[0].map((e) => e.namespace), ['b']);
  });

  test('an instance named like an entry of the config file, or beyond the cap, is skipped', () => {
    const plan = planEntries(templates(CONTRACT), ['a', 'b', 'c', 'd'], new Set(['turn-a']), 2);
    assert.deepEqual(plan.entries[0].map((e) => e.name), ['turn-b', 'turn-c']);
    assert.deepEqual(plan.skipped.map((s) => [s.namespace, s.reason]), [['a', 'name_conflict'], ['d', 'too_many']]);
  });

  test('unit names follow systemd: characters, a type suffix, at most 255, no leading "-"', () => {
    assert.equal(unitNameProblem('orama-namespace-turn@a.service'), null);
    assert.equal(unitNameProblem('turn:x_y.socket'), null);
    assert.match(unitNameProblem(`${'a'.repeat(250)}.service`) ?? '', /258 characters/);
    assert.match(unitNameProblem('a b.service') ?? '', /characters a unit name may not/);
    assert.match(unitNameProblem('turn@a') ?? '', /unit type/);
    assert.match(unitNameProblem('.service') ?? '', /unit type/);
    assert.match(unitNameProblem('-a.service') ?? '', /begins with '-'/);
  });
});
