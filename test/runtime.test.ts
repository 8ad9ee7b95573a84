// One Node.js, end to end: the version package.json pins is the one the lockfile resolves, the one
// the Docker image runs, and the one running these tests. The relay reaches below Node's public API
// (src/router/native), so "a Node 24" is not enough: what the tests passed on is what ships.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';

const ROOT = join(import.meta.dirname, '..');
const EXACT = /^\d+\.\d+\.\d+$/;

interface Package {
  engines?: { node?: string };
  devDependencies?: Record<string, string>;
}
interface Lock {
  packages: Record<string, Package & { version?: string }>;
}

const readJson = <T>(file: string): T => JSON.parse(readFileSync(join(ROOT, file), 'utf8')) as T;

/** The Node.js version each place names, or what it says instead of one. */
function pins(): Array<[where: string, version: string]> {
  const pkg = readJson<Package>('package.json');
  const lock = readJson<Lock>('package-lock.json');
  const root = lock.packages[''] ?? {};
  const out: Array<[string, string]> = [
    ['package.json engines.node', String(pkg.engines?.node)],
    ['package.json devDependencies.node', String(pkg.devDependencies?.node)],
    ['package-lock.json root engines.node', String(root.engines?.node)],
    ['package-lock.json root devDependencies.node', String(root.devDependencies?.node)],
    ['package-lock.json node_modules/node version', String(lock.packages['node_modules/node']?.version)],
  ];
  const text = readFileSync(join(ROOT, 'Dockerfile'), 'utf8');
  const froms = text.split('\n').map((l) => l.trim()).filter((l) => /^FROM\s/i.test(l));
  assert.ok(froms.length > 0, 'the Dockerfile has no FROM line');
  froms.forEach((line, i) => {
    const m = /^FROM\s+(?:--platform=\S+\s+)?node:(\d+\.\d+\.\d+)-slim@sha256:[0-9a-f]{64}(?:\s+AS\s+\S+)?$/i.exec(line);
    out.push([`Dockerfile FROM #${i + 1}`, m === null ? `not node:<x.y.z>-slim@sha256:<digest>: ${line}` : m[1]]);
  });
  out.push(['process.version (the Node running the tests)', process.version.replace(/^v/, '')]);
  return out;
}

test('package.json, the lockfile, the Dockerfile and the Node running the tests name one exact Node.js version', () => {
  const found = pins();
  const expected = found[0][1];
  const table = found.map(([where, v]) => `  ${where.padEnd(46)} ${v}`).join('\n');
  assert.match(expected, EXACT, `package.json engines.node must be an exact version (x.y.z), not a range:\n${table}`);
  const off = found.filter(([, v]) => v !== expected);
  assert.deepEqual(off, [], `the Node.js versions disagree (want ${expected} everywhere; run the tests with ` +
    `node_modules/.bin/node or npm test, regenerate the lockfile after changing package.json):\n${table}`);
});

test('the installed Node binary is the locked one', () => {
  const installed = readJson<{ version: string }>('node_modules/node/package.json').version;
  const locked = readJson<Lock>('package-lock.json').packages['node_modules/node']?.version;
  assert.equal(installed, locked, 'node_modules/node is not what package-lock.json locks: run npm ci');
});
