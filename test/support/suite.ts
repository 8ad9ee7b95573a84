// Runs test/router.test.ts again in a test runner of its own with other settings (workers: 2, the
// portable relay): the data-plane suite must pass whichever way the data plane runs.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';

const ROOT = join(import.meta.dirname, '..', '..');
const NODE = join(ROOT, 'node_modules', '.bin', 'node');

export async function routerSuitePassesWith(env: Record<string, string>, what: string): Promise<void> {
  // Without NODE_TEST_CONTEXT, which would make the child report to this runner.
  const childEnv: NodeJS.ProcessEnv = { ...process.env, ...env };
  delete childEnv.NODE_TEST_CONTEXT;
  const child = spawn(NODE, ['--test', '--test-reporter=spec', '--test-timeout=120000', join(ROOT, 'test', 'router.test.ts')], {
    cwd: ROOT, env: childEnv, stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout!.on('data', (d) => {
    out += d.toString();
  });
  child.stderr!.on('data', (d) => {
    out += d.toString();
  });
  const timer = setTimeout(() => child.kill('SIGKILL'), 400_000);
  const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  clearTimeout(timer);
  const summary = out.split('\n').filter((l) => /^ℹ (tests|pass|fail|cancelled|skipped|todo|duration_ms) /.test(l));
  console.log(`router.test.ts with ${what}:\n${summary.join('\n')}`);
  assert.equal(code, 0, out.slice(-4000));
  const count = (k: string) => Number(summary.find((l) => l.startsWith(`ℹ ${k} `))?.split(' ')[2]);
  assert.ok(count('pass') >= 20, 'the suite ran');
  assert.equal(count('fail'), 0);
  assert.equal(count('skipped'), 0);
  assert.equal(count('cancelled'), 0);
}
