// One read of a whole Caddy storage tree, shared by every namespace's entry of a `for_each`
// template: each debounced change reads and judges every pair once, and each entry then chooses
// among the pairs that may serve its domain (candidatesFor). A certificate that covers many
// namespaces (a multi-SAN certificate, or a wildcard) is read once per change, not once per
// namespace.
//
// Which pairs may serve a domain:
// - those under its own storage keys, exactly as an entry of the config file reads them
//   (find.ts storageKeysFor: the domain, and the wildcard one label up), judged the same way (a
//   pair there for another name is `wrong_name`);
// - and, unlike an entry of the config file, a certificate stored under any other key whose
//   subjectAltName covers the domain. Caddy files a certificate under the first name it was
//   obtained for, so a certificate issued for `cdn.ns-a…` and `cdn.ns-b…` together lives under
//   one key only; each namespace's own key would never find it. Entries of the config file keep
//   their exact keys (their behaviour is unchanged, and a pair elsewhere in the storage must not
//   start competing with the one they deploy).
//
// The tree is hostile like any file there (safe-read.ts): at most MAX_SCAN_DIRS directories are
// read per scan, the keys some entry wants first; the rest, beyond the cap, are left out (logged).
import { readdir, realpath } from 'node:fs/promises';
import { join } from 'node:path';
import { bundledRoots, caddyRoots } from './anchors.ts';
import { type Candidate, type ReadContext, certificatesDir, readPair, storageKeysFor } from './find.ts';
import { type BadPair, dnsNames } from './pair.ts';

/** Key directories read in one scan at most (each is two small files). */
export const MAX_SCAN_DIRS = 10_000;

interface Scanned {
  readonly key: string;
  readonly candidate: Candidate;
}

export interface StorageScan {
  /** The storage could not be listed (other than not existing): every entry reports it. */
  readonly failure: Candidate | null;
  readonly byKey: ReadonlyMap<string, readonly Scanned[]>;
  /** Pairs whose certificate parsed, by each DNS name they carry. */
  readonly byName: ReadonlyMap<string, readonly Scanned[]>;
  /** Key directories not read: over MAX_SCAN_DIRS. */
  readonly leftOut: number;
}

const EMPTY: StorageScan = { failure: null, byKey: new Map(), byName: new Map(), leftOut: 0 };

async function directories(dir: string): Promise<string[]> {
  return (await readdir(dir, { withFileTypes: true })).filter((d) => d.isDirectory()).map((d) => d.name).sort();
}

/** Reads every pair of the storage (the keys in `wanted` first), judged for everything but the name. */
export async function scanStorage(caddyStorage: string, wanted: ReadonlySet<string>, now: Date, maxDirs = MAX_SCAN_DIRS): Promise<StorageScan> {
  const root = certificatesDir(caddyStorage);
  let dirs: Array<{ issuer: string; key: string }>;
  let ctx: ReadContext;
  try {
    dirs = [];
    for (const issuer of await directories(root)) {
      for (const key of await directories(join(root, issuer)).catch(() => [])) dirs.push({ issuer, key });
      // Listing alone is bounded too: a tree of millions of directories is not walked to the end.
      if (dirs.length > 4 * maxDirs) break;
    }
    const within = await realpath(caddyStorage);
    ctx = { within, anchors: [...bundledRoots(), ...await caddyRoots(caddyStorage, within)] };
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'ENOENT' || e.code === 'ENOTDIR') return EMPTY;
    const verdict: BadPair = { ok: false, reason: 'unreadable', detail: `${e.code ?? 'error'}: ${e.message}`, leaf: null, contentHash: `unreadable ${root} ${e.code ?? ''}` };
    return { ...EMPTY, failure: { where: root, certFile: root, keyFile: root, verdict } };
  }
  // Stable: wanted keys first, each group in issuer/key order.
  const ordered = [...dirs.filter((d) => wanted.has(d.key)), ...dirs.filter((d) => !wanted.has(d.key))];
  const read = ordered.slice(0, maxDirs);
  const byKey = new Map<string, Scanned[]>();
  const byName = new Map<string, Scanned[]>();
  for (const { issuer, key } of read) {
    const dir = join(root, issuer, key);
    const candidate = await readPair(`${issuer}/${key}`, join(dir, `${key}.crt`), join(dir, `${key}.key`), null, false, ctx, now);
    if (candidate === null) continue;
    const scanned = { key, candidate };
    push(byKey, key, scanned);
    const leaf = candidate.verdict.leaf;
    if (leaf !== null) for (const name of new Set(dnsNames(leaf.names))) push(byName, name, scanned);
  }
  return { failure: null, byKey, byName, leftOut: ordered.length - read.length };
}

function push<T>(m: Map<string, T[]>, k: string, v: T): void {
  const list = m.get(k);
  if (list === undefined) m.set(k, [v]);
  else list.push(v);
}

/** The names a certificate must carry to serve `domain`: itself, and the wildcard one label up (one-label wildcards, as TLS clients match). */
function coveringNames(domain: string): string[] {
  if (domain.startsWith('*.')) return [domain];
  const dot = domain.indexOf('.');
  return dot > 0 ? [domain, `*${domain.slice(dot)}`] : [domain];
}

/** The pairs of a scan that may serve `domain` (see the top of this file), judged for it. */
export function candidatesFor(scan: StorageScan, domain: string): Candidate[] {
  if (scan.failure !== null) return [scan.failure];
  const out: Candidate[] = [];
  const seen = new Set<Candidate>();
  const covers = new Set(coveringNames(domain));
  for (const k of storageKeysFor(domain)) {
    for (const s of scan.byKey.get(k) ?? []) {
      seen.add(s.candidate);
      const v = s.candidate.verdict;
      if (v.ok && !dnsNames(v.leaf.names).some((n) => covers.has(n))) {
        const wrong: BadPair = {
          ok: false, reason: 'wrong_name', detail: `does not cover ${domain} (${v.leaf.names || v.leaf.subject})`, leaf: v.leaf, contentHash: v.contentHash,
        };
        out.push({ ...s.candidate, verdict: wrong });
      } else {
        out.push(s.candidate);
      }
    }
  }
  for (const name of covers) {
    for (const s of scan.byName.get(name) ?? []) {
      if (seen.has(s.candidate)) continue;
      seen.add(s.candidate);
      out.push(s.candidate);
    }
  }
  return out;
}
