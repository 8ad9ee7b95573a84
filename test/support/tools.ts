// External tools the operations tests run (curl, openssl, promtool, docker-compose,
// systemd-analyze, caddy). In CI (CI=true) a missing tool fails the test; elsewhere it is skipped
// with the reason, so a developer without, say, promtool can still run the rest.
import assert from 'node:assert/strict';
import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';

export function toolPath(tool: string): string | null {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    const p = join(dir, tool);
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      // not here
    }
  }
  return null;
}

/** True when every tool is on PATH; otherwise fails (CI) or skips (elsewhere) the test. */
export function requireTools(t: { skip(message: string): void }, ...tools: string[]): boolean {
  const missing = tools.filter((tool) => toolPath(tool) === null);
  if (missing.length === 0) return true;
  const message = `not installed: ${missing.join(', ')}`;
  if (process.env.CI === 'true') assert.fail(`required in CI but ${message}`);
  t.skip(message);
  return false;
}
