// What this build is: package.json's version and the Node.js running it. `--version`, GET /version
// and the build_info metric all read it here.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

export interface BuildInfo {
  readonly version: string;
  readonly node: string;
}

let cached: BuildInfo | null = null;

export function buildInfo(): BuildInfo {
  if (cached === null) {
    const pkg = JSON.parse(readFileSync(join(import.meta.dirname, '..', 'package.json'), 'utf8')) as { version: string };
    cached = Object.freeze({ version: String(pkg.version), node: process.version });
  }
  return cached;
}
