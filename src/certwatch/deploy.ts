// copy_to: the pair written where the TURN server reads it, as <name>.crt (full chain) and
// <name>.key. Each file is written to a temporary file in the same directory with its final mode,
// flushed, and renamed over the old one, so a reader sees the old file or the new one, never a
// part. The key goes first, as Caddy does it: a reader that notices the new certificate finds its
// key already there.
//
// Beside them, `.<name>.acted` names the pair on_change last succeeded for, or the one on its way
// ("pending …", written before the copy). copy_to alone cannot say it: a pair is copied before
// the action runs, so a router stopped while the action was failing would otherwise find the pair
// in place at its next start, take it as deployed, and never tell the TURN server, which would
// serve the old certificate until it expired. A pending record also says until when the
// certificate the TURN server still serves is valid ("… serving-until <ISO date>"): a restart
// deferred to restart_window stays deferred, or turns urgent, across a restart of the router.
import { randomBytes } from 'node:crypto';
import { mkdir, open, rename, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import type { CertwatchConfig } from '../config/types.ts';
import type { Candidate } from './find.ts';
import { bundledRoots } from './anchors.ts';
import { readContext, readPair } from './find.ts';
import type { Leaf } from './pair.ts';
import { readSafely } from './safe-read.ts';
import type { Deployed } from './select.ts';

export interface DeployedPaths {
  readonly cert: string;
  readonly key: string;
}

export function copyToPaths(copyTo: NonNullable<CertwatchConfig['copyTo']>, name: string): DeployedPaths {
  return { cert: join(copyTo.dir, `${name}.crt`), key: join(copyTo.dir, `${name}.key`) };
}

/** What copy_to holds now, judged like any other pair (null: nothing there yet). */
export async function readCopyTo(config: CertwatchConfig, now = new Date()): Promise<Candidate | null> {
  if (config.copyTo === null) return null;
  const p = copyToPaths(config.copyTo, config.name);
  // copy_to is the operator's directory: no storage root to stay inside, but the same roots vouch
  // for the chain as for the pair it was copied from.
  const { anchors } = await readContext(config).catch(() => ({ anchors: bundledRoots() }));
  return readPair(p.cert, p.cert, p.key, config.domain, false, { within: null, anchors }, now);
}

/** The record of the last pair on_change succeeded for. */
function actedPath(copyTo: NonNullable<CertwatchConfig['copyTo']>, name: string): string {
  return join(copyTo.dir, `.${name}.acted`);
}

/** What names one deployment: the leaf and the chain sent with it. */
export function pairId(leaf: Leaf): string {
  return `${leaf.fingerprint}/${leaf.chainHash}`;
}

/**
 * What the TURN server holds, as far as copy_to tells (null: nothing there, or no copy_to). The
 * pair is acted on when the record names it. A record written before the copy ("pending …") or
 * naming another pair means the action never succeeded for what copy_to holds. Without any record
 * (copy_to written by hand, or by a version that kept none) it is taken as acted on: acting at
 * every start could restart the TURN server for nothing.
 */
export async function readDeployed(config: CertwatchConfig, now = new Date()): Promise<Deployed | null> {
  return (await readDeployment(config, now)).deployed;
}

export interface Deployment {
  readonly deployed: Deployed | null;
  /** notAfter (ms) of the certificate the TURN server serves, as far as copy_to tells; null: unknown. */
  readonly servingUntil: number | null;
}

const PENDING = /^pending \S+(?: serving-until (\S+))?$/;

/** readDeployed, and what the TURN server serves: the acted-on pair, or what a pending record says. */
export async function readDeployment(config: CertwatchConfig, now = new Date()): Promise<Deployment> {
  const held = await readCopyTo(config, now);
  if (held === null || held.verdict.leaf === null) return { deployed: null, servingUntil: null };
  const read = await readSafely(actedPath(config.copyTo!, config.name), { within: null, maxBytes: 4096 });
  const record = read?.ok === true ? read.data.toString('utf8').trim() : null;
  const leaf = held.verdict.leaf;
  const acted = record === null || record === pairId(leaf);
  let servingUntil: number | null = acted ? leaf.notAfter.getTime() : null;
  const pending = record === null ? null : PENDING.exec(record);
  if (!acted && pending?.[1] !== undefined) {
    const at = Date.parse(pending[1]);
    if (Number.isFinite(at)) servingUntil = at;
  }
  return { deployed: { leaf, fit: held.verdict.ok, acted }, servingUntil };
}

/**
 * Records a deployment's progress: `pending` before copy_to is written (with the notAfter of what
 * the TURN server serves meanwhile, when known), then, once on_change succeeded, the pair itself.
 * Returns a warning worth logging, like writeFileAtomic.
 */
export async function recordDeployment(
  copyTo: NonNullable<CertwatchConfig['copyTo']>, name: string, leaf: Leaf, state: 'pending' | 'acted', servingUntil: number | null = null,
): Promise<string | null> {
  await mkdir(copyTo.dir, { recursive: true, mode: 0o755 });
  const serving = servingUntil === null ? '' : ` serving-until ${new Date(servingUntil).toISOString()}`;
  const text = state === 'pending' ? `pending ${pairId(leaf)}${serving}` : pairId(leaf);
  return writeFileAtomic(actedPath(copyTo, name), Buffer.from(`${text}\n`), copyTo.mode);
}

/**
 * Writes `data` to `file` atomically with `mode`. The owner and group of the file it replaces are
 * kept; a new file takes the group of its directory (chgrp the directory to the TURN server's
 * group once, and every renewal stays readable to it). Returns a warning when the group could not
 * be set (not root, and not a member of that group).
 */
export async function writeFileAtomic(file: string, data: Buffer, mode: number): Promise<string | null> {
  const dir = dirname(file);
  let owner: { uid: number; gid: number };
  try {
    const old = await stat(file);
    owner = { uid: old.uid, gid: old.gid };
  } catch {
    const d = await stat(dir);
    owner = { uid: process.getuid?.() ?? -1, gid: d.gid };
  }
  const tmp = join(dir, `.${basename(file)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  let warning: string | null = null;
  const fh = await open(tmp, 'wx', mode);
  try {
    try {
      await fh.writeFile(data);
      await fh.chmod(mode); // open()'s mode is filtered by the umask
      const now = await fh.stat();
      if (owner.uid >= 0 && (now.uid !== owner.uid || now.gid !== owner.gid)) {
        try {
          await fh.chown(owner.uid, owner.gid);
        } catch (err) {
          warning = `could not give ${file} uid ${owner.uid} gid ${owner.gid}: ${(err as Error).message}`;
        }
      }
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
  } catch (err) {
    await unlink(tmp).catch(() => {});
    throw err;
  }
  // The rename itself is durable only once the directory is.
  const dh = await open(dir, 'r');
  try {
    await dh.sync();
  } catch {
    // Some filesystems refuse fsync on a directory; the rename has happened either way.
  } finally {
    await dh.close();
  }
  return warning;
}

/** Writes the pair to copy_to (key, then certificate). Returns warnings worth logging. */
export async function writeCopyTo(
  copyTo: NonNullable<CertwatchConfig['copyTo']>, name: string, pair: { readonly cert: Buffer; readonly key: Buffer },
): Promise<string[]> {
  await mkdir(copyTo.dir, { recursive: true, mode: 0o755 });
  const p = copyToPaths(copyTo, name);
  const warnings: string[] = [];
  const wk = await writeFileAtomic(p.key, pair.key, copyTo.mode);
  if (wk !== null) warnings.push(wk);
  const wc = await writeFileAtomic(p.cert, pair.cert, copyTo.mode);
  if (wc !== null) warnings.push(wc);
  return warnings;
}
