// The shape the code keeps so that it stays easy to change: no import cycle anywhere in src/,
// arrows that point one way (sources → composer → router; the router imports nothing from the
// sources, the cert watcher or config values), and Node's internals named in one folder only.
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { test } from 'node:test';

const SRC = join(import.meta.dirname, '..', 'src');

function sources(dir = SRC): string[] {
  const out: string[] = [];
  for (const f of readdirSync(dir)) {
    const p = join(dir, f);
    if (statSync(p).isDirectory()) out.push(...sources(p));
    else if (p.endsWith('.ts')) out.push(p);
  }
  return out;
}

/** Each file's relative imports (type-only ones included), resolved, with whether they are type-only. */
function imports(file: string): Array<{ to: string; typeOnly: boolean }> {
  const text = readFileSync(file, 'utf8');
  const out: Array<{ to: string; typeOnly: boolean }> = [];
  for (const m of text.matchAll(/^(import|export)\s+(type\s+)?(?:[^'";]*?\sfrom\s+)?'(\.[^']+)'/gm)) {
    out.push({ to: resolve(dirname(file), m[3]), typeOnly: m[2] !== undefined });
  }
  return out;
}

test('no import cycle in src/, type-only imports included', () => {
  const files = sources();
  const graph = new Map(files.map((f) => [f, imports(f).map((i) => i.to)]));
  const state = new Map<string, 1 | 2>();
  const stack: string[] = [];
  const cycles: string[] = [];
  const visit = (f: string) => {
    state.set(f, 1);
    stack.push(f);
    for (const d of graph.get(f) ?? []) {
      if (state.get(d) === 1) cycles.push([...stack.slice(stack.indexOf(d)), d].map((x) => relative(SRC, x)).join(' -> '));
      else if (!state.has(d)) visit(d);
    }
    stack.pop();
    state.set(f, 2);
  };
  for (const f of files) if (!state.has(f)) visit(f);
  assert.deepEqual(cycles, []);
});

test('the router imports nothing from the sources or the cert watcher, and only types from config', () => {
  for (const f of sources(join(SRC, 'router'))) {
    for (const i of imports(f)) {
      const to = relative(SRC, i.to);
      assert.ok(!to.startsWith('sources/') && !to.startsWith('certwatch/'), `${relative(SRC, f)} imports ${to}`);
      if (to.startsWith('config/')) assert.ok(i.typeOnly, `${relative(SRC, f)} imports a value from ${to}`);
    }
  }
  for (const f of sources(join(SRC, 'config'))) {
    for (const i of imports(f)) assert.ok(!relative(SRC, i.to).startsWith('router/'), `${relative(SRC, f)} imports the router`);
  }
});

test("Node's internals are reached in src/router/native/handles.ts only", () => {
  for (const f of sources()) {
    if (f.endsWith(join('native', 'handles.ts'))) continue;
    const text = readFileSync(f, 'utf8');
    assert.doesNotMatch(text, /process\.binding|_handle\b|onconnection/, relative(SRC, f));
  }
});
