// The trusted roots a chain's last certificate may be issued by (pair.ts chainProblem): the
// Mozilla roots bundled with Node, and the roots of Caddy's own CA, which Caddy keeps in its
// storage as pki/authorities/<name>/root.crt (read like any file there, safe-read.ts).
import { X509Certificate } from 'node:crypto';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import tls from 'node:tls';
import { splitChain } from './pair.ts';
import { readSafely } from './safe-read.ts';

let bundled: readonly X509Certificate[] | null = null;

/** Parsed once, on first use (some 150 certificates). */
export function bundledRoots(): readonly X509Certificate[] {
  bundled ??= tls.rootCertificates.flatMap((pem) => {
    try {
      return [new X509Certificate(pem)];
    } catch {
      return [];
    }
  });
  return bundled;
}

/**
 * The root certificates of Caddy's CAs. One that cannot be read is left out: a lone leaf it
 * issued is then refused (bad_chain, naming its issuer), which says where to look.
 */
export async function caddyRoots(caddyStorage: string, within: string): Promise<X509Certificate[]> {
  const dir = join(caddyStorage, 'pki', 'authorities');
  let names: string[];
  try {
    names = (await readdir(dir, { withFileTypes: true })).filter((d) => d.isDirectory()).map((d) => d.name).sort();
  } catch {
    return [];
  }
  const roots: X509Certificate[] = [];
  for (const name of names) {
    const read = await readSafely(join(dir, name, 'root.crt'), { within });
    if (read === null || !read.ok) continue;
    try {
      roots.push(...splitChain(read.data.toString('latin1')));
    } catch {
      // Not PEM: not a root.
    }
  }
  return roots;
}
