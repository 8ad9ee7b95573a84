// The route table: patterns, precedence, ALPN conditions, normalization, atomic replace.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { routeList } from '../src/config/routes.ts';
import { RouteTable, Router, diffTables, diffTablesSliced } from '../src/router/table.ts';
import { type RouteSpec, alpnKey, alpnMatches, normalizeName, patternError, routeKey } from '../src/model/route.ts';

const fallback = { name: 'caddy', addrs: ['127.0.0.1:8443'], proxyProtocol: null };

function table(routes: unknown[]): RouteTable {
  return new RouteTable(routeList(routes, ['routes'], 'config'), fallback);
}

function to(name: string) {
  return { name, addr: `127.0.0.1:${1000 + name.length}` };
}

function lookup(t: RouteTable, sni: string, alpn: string[] | null = null): string | null {
  return t.lookup(normalizeName(sni), alpn)?.backend.name ?? null;
}

describe('patterns', () => {
  const t = table([
    { match: 'cdn.example.com', backend: to('exact') },
    { match: '*.example.com', backend: to('one') },
    { match: '**.example.com', backend: to('many') },
    { match: '**.deep.example.com', backend: to('deep') },
  ]);

  test('exact beats every wildcard', () => {
    assert.equal(lookup(t, 'cdn.example.com'), 'exact');
  });
  test('"*." matches exactly one more label', () => {
    assert.equal(lookup(t, 'a.example.com'), 'one');
  });
  test('"**." matches one or more labels, and the longest suffix wins', () => {
    assert.equal(lookup(t, 'a.b.example.com'), 'many');
    assert.equal(lookup(t, 'x.deep.example.com'), 'deep');
    assert.equal(lookup(t, 'x.y.deep.example.com'), 'deep');
  });
  test('a wildcard never matches its bare suffix', () => {
    assert.equal(lookup(t, 'example.com'), null);
    assert.equal(lookup(t, 'com'), null);
  });
  test('"*." comes before "**." for the same suffix', () => {
    assert.equal(lookup(t, 'www.example.com'), 'one');
  });
  test('SNI and patterns compare lowercased, with one trailing dot removed', () => {
    const t2 = table([{ match: 'CDN.Example.COM.', backend: to('exact') }]);
    assert.equal(t2.routes[0].match, 'cdn.example.com');
    assert.equal(lookup(t2, 'cdn.EXAMPLE.com.'), 'exact');
    assert.equal(lookup(t2, 'cdn.example.com..'), null);
  });
  test('no match gives null (the fallback)', () => {
    assert.equal(lookup(t, 'other.org'), null);
  });
  test('invalid patterns are refused with a reason', () => {
    assert.match(patternError('a.*.example.com') ?? '', /wildcard is allowed only as the first label/);
    assert.match(patternError('*') ?? '', /wildcard/);
    assert.match(patternError('*.') ?? '', /no valid name/);
    assert.match(patternError('bad..name') ?? '', /not a valid DNS label/);
    assert.equal(patternError('xn--bcher-kva.example'), null);
    assert.throws(() => table([{ match: 'foo.*', backend: to('x') }]), /wildcard/);
  });
});

describe('ALPN conditions', () => {
  const t = table([
    { match: 'cdn.example.com', backend: to('plain') },
    { match: 'cdn.example.com', alpn: 'none', backend: to('turn') },
    { match: 'cdn.example.com', alpn: ['h2', 'http/1.1'], backend: to('web') },
    { match: 'api.example.com', alpn: 'any', backend: to('anyalpn') },
  ]);
  test('for the same pattern, ALPN routes are tried first, in order, then the one without', () => {
    assert.equal(lookup(t, 'cdn.example.com', null), 'turn');
    assert.equal(lookup(t, 'cdn.example.com', []), 'turn');
    assert.equal(lookup(t, 'cdn.example.com', ['http/1.1']), 'web');
    assert.equal(lookup(t, 'cdn.example.com', ['spdy/3']), 'plain');
  });
  test('"any" needs at least one protocol offered', () => {
    assert.equal(lookup(t, 'api.example.com', ['x']), 'anyalpn');
    assert.equal(lookup(t, 'api.example.com', null), null);
  });
  test('the stealth example: alpn none to TURN and nothing else for that name', () => {
    const s = table([{ match: 'cdn.example.com', alpn: 'none', backend: to('turn') }]);
    assert.equal(lookup(s, 'cdn.example.com', null), 'turn');
    assert.equal(lookup(s, 'cdn.example.com', ['h2', 'http/1.1']), null);
  });
  test('an exact route whose ALPN does not hold lets a wildcard route answer', () => {
    const s = table([
      { match: 'cdn.example.com', alpn: 'none', backend: to('turn') },
      { match: '**.example.com', backend: to('web') },
    ]);
    assert.equal(lookup(s, 'cdn.example.com', ['h2']), 'web');
  });
});

describe('table construction', () => {
  test('on the same match and alpn the first route wins and the conflict is reported', () => {
    const t = new RouteTable([
      ...routeList([{ match: 'a.example.com', backend: to('first') }], ['r'], 'config'),
      ...routeList([{ match: 'A.example.com.', backend: to('second') }], ['r'], 'redis'),
      ...routeList([{ match: 'a.example.com', alpn: 'none', backend: to('third') }], ['r'], 'redis'),
    ], fallback);
    assert.equal(t.routes.length, 2);
    assert.equal(t.conflicts.length, 1);
    assert.equal(t.conflicts[0].winner.source, 'config');
    assert.equal(t.conflicts[0].loser.backend.name, 'second');
  });

  test('a 100,000-route table answers exact and wildcard lookups', () => {
    const routes = [];
    for (let i = 0; i < 100_000; i++) routes.push({ match: i % 2 ? `ns${i}.example.com` : `*.ns${i}.example.net`, backend: to(`b${i}`) });
    const t = table(routes);
    assert.equal(lookup(t, 'ns99999.example.com'), 'b99999');
    assert.equal(lookup(t, 'x.ns4.example.net'), 'b4');
    assert.equal(lookup(t, 'nope.example.com'), null);
  });

  test('Router.replace swaps atomically and counts generations', () => {
    const r = new Router(table([{ match: 'a.b', backend: to('old') }]));
    const before = r.table;
    const seen: number[] = [];
    r.onReplace((_t, g) => seen.push(g));
    const gen = r.replace(table([{ match: 'a.b', backend: to('new') }]));
    assert.equal(gen, 2);
    assert.deepEqual(seen, [2]);
    // A connection that looked the old table up keeps what it got.
    assert.equal(before.lookup('a.b', null)?.backend.name, 'old');
    assert.equal(r.table.lookup('a.b', null)?.backend.name, 'new');
  });
});

describe('diffTables (what the composer logs, and whether it replaces at all)', () => {
  const names = ['a.example.com', 'b.example.com', '*.example.com', '**.example.com', 'turn.example.net'];
  const alpns = [null, 'none', 'any', ['h2'], ['http/1.1', 'h2']] as const;
  const routeArb = fc.record({
    match: fc.constantFrom(...names),
    alpn: fc.constantFrom(...alpns),
    backend: fc.constantFrom('x', 'y', 'z'),
    port: fc.constantFrom(1, 2),
    source: fc.constantFrom('config', 'pg'),
  });
  const build = (rs: Array<{ match: string; alpn: (typeof alpns)[number]; backend: string; port: number; source: string }>) =>
    new RouteTable(rs.map((r) => ({
      ...routeList([{ match: r.match, ...(r.alpn === null ? {} : { alpn: r.alpn }), backend: { name: r.backend, addr: `127.0.0.1:${r.port}` } }], ['routes'], r.source)[0],
    })), fallback);
  /** Per pattern, the ALPN keys in lookup order with backend and source: what lookups depend on. */
  const shape = (t: RouteTable) => t.patterns().map((m) => new Map([...m].map(([name, list]) =>
    [name, list.map((r) => `${alpnKey(r.alpn)}>${r.backend.name}@${r.backend.addrs.join(',')}/${r.source}`).join(' ')])));
  const keys = (rs: readonly RouteSpec[]) => rs.map((r) => routeKey(r)).sort();

  test('an equal table built from other objects is no change; any change a lookup could see is reported', () => {
    fc.assert(fc.property(fc.array(routeArb, { maxLength: 12 }), fc.array(routeArb, { maxLength: 12 }), (ra, rb) => {
      const a = build(ra);
      assert.deepEqual(diffTables(a, build(ra)), { added: [], removed: [], changed: [] });
      const b = build(rb);
      const d = diffTables(a, b);
      const same = JSON.stringify(shape(a).map((m) => [...m].sort())) === JSON.stringify(shape(b).map((m) => [...m].sort()));
      assert.equal(d.added.length + d.removed.length + d.changed.length === 0, same);
      // Added and removed are exactly the match+alpn keys only one side has.
      const ka = new Set(a.routes.map((r) => routeKey(r)));
      const kb = new Set(b.routes.map((r) => routeKey(r)));
      assert.deepEqual(keys(d.added), [...kb].filter((k) => !ka.has(k)).sort());
      assert.deepEqual(keys(d.removed), [...ka].filter((k) => !kb.has(k)).sort());
      for (const r of d.changed) assert.ok(ka.has(routeKey(r)) && kb.has(routeKey(r)));
    }), { numRuns: 500 });
  });

  test('a reorder of ALPN routes within one pattern is a change; across patterns it is not', () => {
    const h2 = { match: 'a.example.com', alpn: ['h2'], backend: to('web') };
    const none = { match: 'a.example.com', alpn: 'none', backend: to('turn') };
    const other = { match: 'b.example.com', backend: to('b') };
    assert.equal(diffTables(table([h2, none, other]), table([none, h2, other])).changed.length, 1);
    assert.deepEqual(diffTables(table([h2, none, other]), table([other, h2, none])), { added: [], removed: [], changed: [] });
  });
});

describe('lookup against a reference that scans every route', () => {
  const labelArb = fc.constantFrom('a', 'b', 'c', 'turn', 'x-1');
  const nameArb = fc.array(labelArb, { minLength: 1, maxLength: 6 }).map((ls) => ls.join('.'));
  const alpnArb = fc.constantFrom(undefined, 'none', 'any', ['h2'], ['acme-tls/1']);
  const routeArb = fc.record({ kind: fc.constantFrom('', '*.', '**.'), name: nameArb, alpn: alpnArb, backend: fc.constantFrom('p', 'q', 'r') });
  const offeredArb = fc.constantFrom(null, [], ['h2'], ['http/1.1'], ['acme-tls/1']);

  function reference(t: RouteTable, sni: string, offered: readonly string[] | null): string | null {
    const labels = sni.split('.');
    const patterns = [sni];
    for (let i = 1; i < labels.length; i++) {
      const suffix = labels.slice(i).join('.');
      if (i === 1) patterns.push(`*.${suffix}`);
      patterns.push(`**.${suffix}`);
    }
    for (const p of patterns) {
      const list = t.routes.filter((r) => r.match === p);
      list.sort((a, b) => (a.alpn === null ? 1 : 0) - (b.alpn === null ? 1 : 0));
      const hit = list.find((r) => alpnMatches(r.alpn, offered));
      if (hit !== undefined) return hit.backend.name;
    }
    return null;
  }

  test('every name, at every depth, gets what a scan of all routes gives', () => {
    fc.assert(fc.property(fc.array(routeArb, { maxLength: 15 }), fc.array(fc.tuple(nameArb, offeredArb), { minLength: 1, maxLength: 20 }), (rs, qs) => {
      const t = table(rs.map((r) => ({ match: `${r.kind}${r.name}`, ...(r.alpn === undefined ? {} : { alpn: r.alpn }), backend: to(r.backend) })));
      for (const [sni, offered] of qs) {
        assert.equal(t.lookup(sni, offered)?.backend.name ?? null, reference(t, sni, offered), `${sni} offering ${JSON.stringify(offered)}`);
      }
    }), { numRuns: 1000 });
  });
});

describe('tables built and compared in slices', () => {
  test('a table built in slices answers, conflicts and diffs exactly as one built at once (sizes across the slice bounds)', async () => {
    const routesFor = (n: number, seed: number): RouteSpec[] => {
      const out: RouteSpec[] = [];
      for (let i = 0; i < n; i++) {
        const k = (i * 7 + seed) % 23;
        const match = k === 0 ? `*.w${i % 500}.example.net` : k === 1 ? `**.d${i % 300}.example.org` : `h${i % (n - 7 + 1)}.example.com`;
        out.push(routeList([{
          match, ...(k === 2 ? { alpn: 'none' } : k === 3 ? { alpn: ['h2'] } : {}),
          backend: { name: `b${(i + seed) % 9}`, addr: `127.0.0.1:${1 + ((i + seed) % 50)}` },
        }], ['routes'], seed % 2 === 0 ? 'config' : 'pg')[0]);
      }
      return out;
    };
    for (const n of [0, 1, 4999, 5000, 5001, 12_345]) {
      const rs = routesFor(n, 3);
      const whole = new RouteTable(rs, fallback);
      const sliced = await RouteTable.build(rs, fallback);
      assert.deepEqual(sliced.routes, whole.routes);
      assert.deepEqual(sliced.conflicts, whole.conflicts);
      for (let i = 0; i < Math.min(n, 2000); i += 7) {
        for (const sni of [`h${i}.example.com`, `x.w${i % 500}.example.net`, `a.b.d${i % 300}.example.org`]) {
          for (const offered of [null, ['h2']]) assert.equal(sliced.lookup(sni, offered), whole.lookup(sni, offered));
        }
      }
      const other = new RouteTable(routesFor(n, 4), fallback);
      assert.deepEqual(await diffTablesSliced(whole, other), diffTables(whole, other));
    }
  });
});
