// The one way certwatch reads a file: Caddy's storage, explicit cert/key paths, copy_to read back,
// a CA root, a pid file. Whoever can write there may leave anything: a FIFO (a plain open() of one
// waits for a writer forever, holding a libuv thread that even process.exit() then waits for), a
// device, a symlink to a key elsewhere on the host, a sparse file of gigabytes. So the file must
// be a regular file, no larger than a cap, and, under a storage root, resolve inside it.
import { constants } from 'node:fs';
import { type FileHandle, open, readlink, realpath, stat } from 'node:fs/promises';
import { sep } from 'node:path';
import type { InvalidReason } from './pair.ts';

/** A full chain is a few KiB, a key less; 1 MiB leaves room for any real one. */
export const MAX_FILE_BYTES = 1024 * 1024;

export type ReadRefusal = Extract<InvalidReason, 'not_regular_file' | 'outside_storage' | 'too_large' | 'unreadable'>;

export type SafeRead =
  | { readonly ok: true; readonly data: Buffer }
  | { readonly ok: false; readonly reason: ReadRefusal; readonly detail: string };

export interface ReadLimits {
  /** The real path (realpath) of a tree the file must resolve inside; null: anywhere (the operator named it). */
  readonly within: string | null;
  readonly maxBytes?: number;
}

// O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer (reads of a regular
// file ignore it). O_NOCTTY: a terminal never becomes our controlling one.
const OPEN_FLAGS = constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOCTTY;

function isInside(path: string, root: string): boolean {
  return path === root || path.startsWith(root.endsWith(sep) ? root : root + sep);
}

function kind(st: { isFIFO(): boolean; isSocket(): boolean; isCharacterDevice(): boolean; isBlockDevice(): boolean; isDirectory(): boolean }): string {
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  if (st.isCharacterDevice() || st.isBlockDevice()) return 'a device';
  if (st.isDirectory()) return 'a directory';
  return 'not a regular file';
}

/**
 * Reads `file` under the rules above. null when it does not exist; otherwise its bytes or why
 * they were refused. Other errors (EACCES, ELOOP) are refusals with reason `unreadable`.
 */
export async function readSafely(file: string, limits: ReadLimits): Promise<SafeRead | null> {
  const max = limits.maxBytes ?? MAX_FILE_BYTES;
  const refuse = (reason: ReadRefusal, detail: string): SafeRead => ({ ok: false, reason, detail });
  try {
    let target = file;
    if (limits.within !== null) {
      // Resolved before opening, so that nothing outside (a device whose open() has effects) is
      // ever opened; the path of the opened descriptor is checked again below, in case a
      // directory was swapped for a symlink in between.
      target = await realpath(file);
      if (!isInside(target, limits.within)) return refuse('outside_storage', `${file} resolves to ${target}, outside ${limits.within}`);
    }
    const before = await stat(target);
    if (!before.isFile()) return refuse('not_regular_file', `${file} is ${kind(before)}`);
    if (before.size > max) return refuse('too_large', `${file} is ${before.size} bytes (at most ${max})`);
    // Inside a storage tree the resolved path is opened without following a symlink put there since.
    const fh = await open(target, OPEN_FLAGS | (limits.within !== null ? constants.O_NOFOLLOW : 0));
    try {
      const st = await fh.stat();
      if (!st.isFile()) return refuse('not_regular_file', `${file} is ${kind(st)}`);
      if (st.size > max) return refuse('too_large', `${file} is ${st.size} bytes (at most ${max})`);
      if (limits.within !== null) {
        const opened = await openedPath(fh);
        if (opened !== null && !isInside(opened, limits.within)) {
          return refuse('outside_storage', `${file} opened ${opened}, outside ${limits.within}`);
        }
      }
      const data = await readAtMost(fh, st.size, max);
      if (data === null) return refuse('too_large', `${file} grew past ${max} bytes while read`);
      return { ok: true, data };
    } finally {
      await fh.close();
    }
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'ENOENT') return null;
    return refuse('unreadable', `${e.code ?? 'error'}: ${e.message}`);
  }
}

/** Where an open descriptor points (Linux); null where /proc cannot tell, and the earlier realpath stands. */
async function openedPath(fh: FileHandle): Promise<string | null> {
  if (process.platform !== 'linux') return null;
  try {
    // An unlinked file (renamed over since it was opened) reads "<path> (deleted)": still inside.
    return await readlink(`/proc/self/fd/${fh.fd}`);
  } catch {
    return null;
  }
}

/** At most `max` bytes, reading one more to notice a file that grew past it (null then). */
async function readAtMost(fh: FileHandle, size: number, max: number): Promise<Buffer | null> {
  let buf = Buffer.allocUnsafe(Math.min(size, max) + 1);
  let n = 0;
  for (;;) {
    if (n === buf.length) {
      if (buf.length > max) return null;
      const bigger = Buffer.allocUnsafe(Math.min(buf.length * 2, max + 1));
      buf.copy(bigger, 0, 0, n);
      buf = bigger;
    }
    const { bytesRead } = await fh.read(buf, n, buf.length - n, n);
    if (bytesRead === 0) break;
    n += bytesRead;
  }
  return n > max ? null : Buffer.from(buf.subarray(0, n));
}
