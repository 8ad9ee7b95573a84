// Where a certificate pair lives: the two explicit paths of a certwatch entry, or every issuer
// directory of a Caddy storage tree (certificates/<issuer>/<key>/<key>.{crt,key}, where <key> is
// the domain, or the wildcard that covers it, in certmagic's file-safe spelling). Each pair found
// is read (safe-read.ts: regular files inside the storage, under a size cap) and judged here;
// choosing among them is select.ts's job.
import type { X509Certificate } from 'node:crypto';
import { readdir, realpath } from 'node:fs/promises';
import { join } from 'node:path';
import type { CertwatchConfig } from '../config/types.ts';
import { bundledRoots, caddyRoots } from './anchors.ts';
import { type BadPair, type PairVerdict, contentHash, judgePair } from './pair.ts';
import { type SafeRead, readSafely } from './safe-read.ts';

export interface Candidate {
  /** For logs: "<issuer>/<key>" in Caddy storage, or the certificate path. */
  readonly where: string;
  readonly certFile: string;
  readonly keyFile: string;
  readonly verdict: PairVerdict;
}

/**
 * certmagic's KeyBuilder.Safe: how Caddy turns a name into a file name ("*.example.com" is stored
 * as "wildcard_.example.com").
 */
export function storageKey(name: string): string {
  return name.trim().toLowerCase()
    .replaceAll(' ', '_')
    .replaceAll('+', '_plus_')
    .replaceAll('*', 'wildcard_')
    .replaceAll(':', '-')
    .replaceAll('..', '')
    .replace(/[^\w@.-]/g, '');
}

/**
 * The storage keys whose certificate may serve `domain`: its own, and the wildcard one label up
 * ("cdn.example.com" → "wildcard_.example.com"). No wildcard for a name directly under a public
 * suffix ("*.com" is never issued).
 */
export function storageKeysFor(domain: string): string[] {
  if (domain.startsWith('*.')) return [storageKey(domain)];
  const labels = domain.split('.');
  const keys = [storageKey(domain)];
  if (labels.length >= 3) keys.push(storageKey(`*.${labels.slice(1).join('.')}`));
  return keys;
}

export function certificatesDir(caddyStorage: string): string {
  return join(caddyStorage, 'certificates');
}

function unreadable(where: string, e: NodeJS.ErrnoException): BadPair {
  return {
    ok: false, reason: 'unreadable', detail: `${e.code ?? 'error'}: ${e.message}`, leaf: null,
    contentHash: contentHash(Buffer.from(`unreadable ${where} ${e.code ?? ''}`), null),
  };
}

/**
 * A file of the pair was refused before anything was judged. The pair stays unordered (leaf
 * null) even when the other file holds a certificate: see select.ts. Its hash names the file and
 * the reason, not the detail, so a standing refusal is reported once.
 */
function refused(where: string, file: string, r: Extract<SafeRead, { ok: false }>): BadPair {
  return {
    ok: false, reason: r.reason, detail: r.detail, leaf: null,
    contentHash: contentHash(Buffer.from(`refused ${where} ${file} ${r.reason}`), null),
  };
}

/** Where a pair may be read from, and who may vouch for its chain. */
export interface ReadContext {
  /** The real path of the Caddy storage root every file must resolve inside; null: explicit paths. */
  readonly within: string | null;
  readonly anchors: readonly X509Certificate[];
}

/** Reads and judges one pair; null when neither file exists (and `required` is false). */
export async function readPair(
  where: string, certFile: string, keyFile: string, domain: string | null, required: boolean, ctx: ReadContext, now = new Date(),
): Promise<Candidate | null> {
  // The key first: Caddy writes the key before the certificate, so a certificate read after
  // it is at least as new (a mismatch in the other order is waited out all the same).
  const key = await readSafely(keyFile, { within: ctx.within });
  if (key !== null && !key.ok) return { where, certFile, keyFile, verdict: refused(where, keyFile, key) };
  const cert = await readSafely(certFile, { within: ctx.within });
  if (cert !== null && !cert.ok) return { where, certFile, keyFile, verdict: refused(where, certFile, cert) };
  if (cert === null && key === null && !required) return null;
  return { where, certFile, keyFile, verdict: judgePair(cert?.data ?? null, key?.data ?? null, domain, now, ctx.anchors) };
}

/** The context pairs of this entry are read in: the storage root and Caddy's own roots, or neither. */
export async function readContext(config: Pick<CertwatchConfig, 'caddyStorage'>): Promise<ReadContext> {
  if (config.caddyStorage === null) return { within: null, anchors: bundledRoots() };
  const within = await realpath(config.caddyStorage);
  return { within, anchors: [...bundledRoots(), ...await caddyRoots(config.caddyStorage, within)] };
}

/** Every pair an entry can see now. */
export async function findCandidates(config: CertwatchConfig, now = new Date()): Promise<Candidate[]> {
  if (config.caddyStorage === null) {
    const c = await readPair(config.cert!, config.cert!, config.key!, config.domain, true, await readContext(config), now);
    return c === null ? [] : [c];
  }
  const root = certificatesDir(config.caddyStorage);
  let issuers: string[];
  let ctx: ReadContext;
  try {
    issuers = (await readdir(root, { withFileTypes: true })).filter((d) => d.isDirectory()).map((d) => d.name).sort();
    ctx = await readContext(config);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'ENOENT' || e.code === 'ENOTDIR') return [];
    // Most often: the router may not read Caddy's storage. Reported like an unreadable pair.
    return [{
      where: root, certFile: root, keyFile: root,
      verdict: unreadable(root, e),
    }];
  }
  const keys = storageKeysFor(config.domain);
  const found: Candidate[] = [];
  for (const issuer of issuers) {
    for (const k of keys) {
      const dir = join(root, issuer, k);
      const c = await readPair(`${issuer}/${k}`, join(dir, `${k}.crt`), join(dir, `${k}.key`), config.domain, false, ctx, now);
      if (c !== null) found.push(c);
    }
  }
  return found;
}
