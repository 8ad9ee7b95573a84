// The repository stands on its own: a clone with nothing beside it runs the tests and the bench.
// Every path the code, the tests, the bench and the deployment files name stays inside it, and the
// captured fixtures are the bytes their README documents.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { dirname, isAbsolute, join, relative, resolve } from 'node:path';
import { test } from 'node:test';
import { FIXTURES } from './helpers.ts';

const ROOT = resolve(import.meta.dirname, '..');
const SCANNED_DIRS = ['src', 'test', 'bench', 'deploy', '.ci', 'bin', 'sql'];
const SCANNED_FILES = ['Dockerfile', 'docker-compose.yml', 'package.json', 'tsconfig.json', '.dockerignore'];
/** Build output and generated reports, not sources (both gitignored). */
const SKIPPED = new Set(['bench/out', 'bench/loadgen', 'node_modules']);

function textFiles(dir: string, out: string[] = []): string[] {
  for (const f of readdirSync(dir)) {
    const p = join(dir, f);
    if (SKIPPED.has(relative(ROOT, p))) continue;
    const st = statSync(p);
    if (st.isDirectory()) textFiles(p, out);
    else if (st.size < 1 << 20 && !readFileSync(p).includes(0)) out.push(p);
  }
  return out;
}

const scanned = (): string[] => [
  ...SCANNED_DIRS.flatMap((d) => textFiles(join(ROOT, d))),
  ...SCANNED_FILES.map((f) => join(ROOT, f)),
];

const inside = (p: string): boolean => {
  const r = relative(ROOT, p);
  return r === '' || (!r.startsWith('..') && !isAbsolute(r));
};

test('no file names a path outside the repository', () => {
  const found: string[] = [];
  for (const file of scanned()) {
    const name = relative(ROOT, file);
    const text = readFileSync(file, 'utf8');
    // The folder this repository used to read its fixtures from, and the machine's work tree.
    for (const m of text.matchAll(/\.\.\/shared\b|'\.\.',\s*'shared'|\/work\/[\w-]/g)) found.push(`${name}: ${m[0]}`);
    // Paths built from the file's own folder: join(import.meta.dirname, '..', 'x') and the like.
    for (const m of text.matchAll(/join\(import\.meta\.dirname((?:,\s*'[^']*')*)\)/g)) {
      const parts = [...m[1].matchAll(/'([^']*)'/g)].map((x) => x[1]);
      if (!inside(resolve(dirname(file), ...parts))) found.push(`${name}: ${m[0]}`);
    }
    // A repository root joined with a step up.
    for (const m of text.matchAll(/\b(?:ROOT|REPO),\s*'\.\.'/g)) found.push(`${name}: ${m[0]}`);
    // Relative imports and Markdown links.
    for (const m of text.matchAll(/(?:from\s+|import\()'(\.\.?\/[^']+)'|\]\((\.\.?\/[^)#\s]+)/g)) {
      const to = m[1] ?? m[2];
      if (!inside(resolve(dirname(file), to))) found.push(`${name}: ${to}`);
    }
  }
  assert.deepEqual(found, [], `paths that leave the repository:\n${found.join('\n')}`);
});

test('the scan sees what it guards: the fixtures folder, a relative import, a Markdown link', () => {
  const files = scanned().map((f) => relative(ROOT, f));
  for (const f of ['test/helpers.ts', 'bench/run.ts', 'bench/README.md', '.ci/run', 'Dockerfile', 'src/cli.ts']) {
    assert.ok(files.includes(f), `${f} is not scanned`);
  }
  assert.ok(inside(FIXTURES), `FIXTURES (${FIXTURES}) is outside the repository`);
});

test('the captured ClientHellos are the bytes test/fixtures/README.md documents', () => {
  const readme = readFileSync(join(FIXTURES, 'README.md'), 'utf8');
  const documented = [...readme.matchAll(/^\| `([\w.-]+\.bin)` \| `([0-9a-f]{64})` \|$/gm)];
  const bins = readdirSync(FIXTURES).filter((f) => f.endsWith('.bin')).sort();
  assert.deepEqual(documented.map((m) => m[1]).sort(), bins, 'every .bin file has one sha256 line in the README');
  for (const [, file, sha] of documented) {
    const got = createHash('sha256').update(readFileSync(join(FIXTURES, file))).digest('hex');
    assert.equal(got, sha, `${file} differs from the capture the README documents`);
  }
});

test('no process id file is committed, and .gitignore keeps them out', (t) => {
  assert.match(readFileSync(join(ROOT, '.gitignore'), 'utf8'), /^\*\.pid$/m);
  let tracked: string;
  try {
    tracked = execFileSync('git', ['ls-files', '--', '*.pid'], { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  } catch {
    t.skip('not a git checkout');
    return;
  }
  assert.equal(tracked.trim(), '', 'a *.pid file (a leftover of a run) is committed');
});
