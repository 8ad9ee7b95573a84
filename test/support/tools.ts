// External tools the operations tests run (curl, openssl, promtool, docker-compose,
// systemd-analyze, caddy). In CI (CI=true) a missing tool fails the test; elsewhere it is skipped
// with the reason, so a developer without, say, promtool can still run the rest.
import assert from 'node:assert/strict';
import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';

/** Where `tool` (a name on PATH, or a path) is, when it is executable; else null. */
export function toolPath(tool: string): string | null {
  const candidates = tool.includes('/') ? [tool] : (process.env.PATH ?? '').split(delimiter).map((d) => join(d, tool));
  for (const p of candidates) {
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

export interface ToolGate {
  /** For node:test's `skip` option: a reason when a tool is missing outside CI, else false. */
  readonly skip: string | false;
  /** Throws when a tool is missing: in CI a missing tool is a failure, never a skip. */
  check(): void;
}

/** Like requireTools, for suites that decide once, in a test's options, whether to run. */
export function toolGate(tools: readonly string[]): ToolGate {
  const missing = tools.filter((t) => toolPath(t) === null);
  const inCi = process.env.CI === 'true';
  return {
    skip: missing.length > 0 && !inCi ? `not installed: ${missing.join(', ')} (Debian packages coturn, chromium)` : false,
    check() {
      if (missing.length > 0) throw new Error(`required tools missing${inCi ? ' in CI' : ''}: ${missing.join(', ')}`);
    },
  };
}
