// The file source: a routes YAML file (`routes:` in the config's route schema), watched through the
// directories that hold it rather than through the file itself. Every way of replacing a file ends
// in an event on its directory: an in-place write, a temp file renamed over it (editors, Caddy), a
// Kubernetes ConfigMap swap (`..data` re-pointed to a new timestamped directory), a delete and
// recreate. A watch on the file's inode would be left behind by all but the first.
//
// On any event the whole path is resolved again (every symlink on the way, so the directory of each
// link is watched too), the file re-read, and its content hash compared with the last one handled,
// so that the noise of unrelated files in the same directory costs a read and nothing more.
import { createHash } from 'node:crypto';
import { lstat, readFile, readlink } from 'node:fs/promises';
import { join, parse, resolve, sep } from 'node:path';
import { Worker } from 'node:worker_threads';
import { type FSWatcher, watch } from 'chokidar';
import type { FileSourceConfig } from '../config/types.ts';
import { parseRoutesFile } from '../config/load.ts';
import type { Logger } from '../log.ts';
import type { RouteSpec } from '../model/route.ts';
import { Serial } from '../serial.ts';
import type { RouteSource, SourceSink } from './source.ts';

/** Quiet time after the last event before reading: a truncate and its write, a swap's renames. */
const QUIET_MS = 20;
/** A stream of events never holds a read back longer than this. */
const MAX_HOLD_MS = 150;
/**
 * A read every so often whatever the events say, in case the kernel dropped one (inotify queue
 * overflow, network filesystems). Prometheus's file discovery does the same.
 */
const SAFETY_REREAD_MS = 60_000;
/** How long to wait for a new directory watch to be in place. */
const WATCH_READY_MS = 2000;
/** Symlinks followed while resolving the path, as the kernel's own limit. */
const MAX_SYMLINK_HOPS = 40;
/**
 * A file larger than this is parsed in a worker thread: YAML parsing is slow and heavy (by hand
 * here, 100,000 routes, 7 MB of YAML: ~7 s and ~900 MB), and on the main thread would stall every
 * relay for as long. Below it, a parse takes a few milliseconds.
 */
const INLINE_PARSE_BYTES = 64 * 1024;
/** A routes file over this is refused without being parsed: tables this big belong in PostgreSQL or Redis. */
const MAX_FILE_BYTES = 64 * 1024 * 1024;
/** The worker's heap; a file that needs more fails to parse (the router is unharmed). */
const PARSE_HEAP_MB = 2048;

export class FileSource implements RouteSource {
  readonly type = 'file' as const;
  readonly name: string;
  readonly #path: string;
  readonly #logger: Logger;
  #sink: SourceSink | null = null;
  /** Watched directory → its watcher. */
  readonly #watchers = new Map<string, FSWatcher>();
  #quietTimer: NodeJS.Timeout | null = null;
  #burstStartedAt = 0;
  #safetyTimer: NodeJS.Timeout | null = null;
  /** One refresh at a time; `true`: report even an unchanged file (start, SIGHUP). */
  readonly #refreshes = new Serial<boolean>(
    (force) => this.#refresh(force).catch((err: Error) => this.#sink?.failure(err)),
    (a, b) => a || b,
    (err) => this.#logger.error({ err: (err as Error).message }, 'file source refresh failed'),
  );
  /** The content hash last handled, or "unreadable:<code>", so an unchanged state is not reported twice. */
  #lastState: string | null = null;
  #stopped = false;

  constructor(config: FileSourceConfig, logger: Logger) {
    this.name = config.name;
    this.#path = resolve(config.path);
    this.#logger = logger.child({ source: config.name });
  }

  async start(sink: SourceSink): Promise<void> {
    this.#sink = sink;
    await this.#refreshes.request(true);
    if (this.#stopped) return;
    this.#safetyTimer = setInterval(() => void this.#refreshes.request(false), SAFETY_REREAD_MS);
  }

  resync(): void {
    void this.#refreshes.request(true);
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    // clearTimeout clears an interval as well (one Timeout class).
    for (const t of [this.#quietTimer, this.#safetyTimer]) if (t !== null) clearTimeout(t);
    this.#quietTimer = this.#safetyTimer = null;
    await this.#refreshes.stop();
    await Promise.all([...this.#watchers.values()].map((w) => w.close().catch(() => {})));
    this.#watchers.clear();
  }

  /** Any event in a watched directory: read once the burst has settled. */
  #onEvent(): void {
    if (this.#stopped) return;
    const now = Date.now();
    if (this.#quietTimer === null) this.#burstStartedAt = now;
    else clearTimeout(this.#quietTimer);
    const wait = Math.max(0, Math.min(QUIET_MS, this.#burstStartedAt + MAX_HOLD_MS - now));
    this.#quietTimer = setTimeout(() => {
      this.#quietTimer = null;
      void this.#refreshes.request(false);
    }, wait);
  }


  async #refresh(force: boolean): Promise<void> {
    // Watch first, read second: a change that lands between the two is still an event.
    // Each pass puts the watches where the path resolves now; a new watch can reveal a directory
    // created before it was ready (mkdir -p), hence more than one pass, but never many.
    for (let pass = 0; pass < 8 && !this.#stopped; pass++) {
      if (!await this.#watchWhereResolved()) break;
    }
    if (this.#stopped || this.#sink === null) return;
    let text: string;
    try {
      text = await readFile(this.#path, 'utf8');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? 'EIO';
      const state = `unreadable:${code}`;
      if (!force && state === this.#lastState) return;
      this.#lastState = state;
      // A missing file is a failure, not an empty table: a file being replaced by hand is briefly
      // absent, and a deleted ConfigMap must not withdraw every route it held.
      this.#sink.failure(new Error(code === 'ENOENT' || code === 'ENOTDIR'
        ? `${this.#path} does not exist`
        : `cannot read ${this.#path}: ${code}`));
      return;
    }
    const hash = createHash('sha256').update(text).digest('hex');
    if (!force && hash === this.#lastState) return;
    this.#lastState = hash;
    let routes: RouteSpec[];
    try {
      const bytes = Buffer.byteLength(text);
      if (bytes > MAX_FILE_BYTES) {
        throw new Error(`${this.#path}: ${(bytes / 1048576).toFixed(0)} MiB, over the 64 MiB a routes file may have `
          + '(tables this big belong in the PostgreSQL or Redis source)');
      }
      routes = bytes <= INLINE_PARSE_BYTES
        ? parseRoutesFile(text, this.#path, this.name)
        : await parseRoutesOffThread(text, this.#path, this.name);
    } catch (err) {
      // Rejected whole: the message is FILE:LINE:COL, the last good snapshot stays live.
      this.#sink.failure(err as Error);
      return;
    }
    this.#sink.snapshot({ routes, invalid: [] });
  }

  /** Moves the watches to the directories the path resolves through now. Returns whether any moved. */
  async #watchWhereResolved(): Promise<boolean> {
    const wanted = await directoriesToWatch(this.#path);
    let moved = false;
    for (const [dir, w] of this.#watchers) {
      if (wanted.has(dir)) continue;
      this.#watchers.delete(dir);
      moved = true;
      await w.close().catch(() => {});
    }
    for (const dir of wanted) {
      if (this.#watchers.has(dir) || this.#stopped) continue;
      moved = true;
      this.#watchers.set(dir, await this.#watchDirectory(dir));
    }
    if (moved) this.#logger.debug({ path: this.#path, watching: [...this.#watchers.keys()] }, 'file source watches moved');
    return moved;
  }

  async #watchDirectory(dir: string): Promise<FSWatcher> {
    // Only the directory itself is watched (one inotify watch, however many files it holds); the
    // raw events of that watch name every child that is created, written, renamed or removed.
    const w = watch(dir, {
      depth: 0,
      ignoreInitial: true,
      followSymlinks: false,
      atomic: false,
      persistent: true,
      ignored: (p: string) => p !== dir,
    });
    w.on('raw', () => this.#onEvent());
    w.on('all', () => this.#onEvent());
    w.on('error', (err: unknown) => {
      this.#logger.warn({ dir, err: (err as Error).message }, 'file source watch error; re-reading');
      this.#onEvent();
    });
    await new Promise<void>((done) => {
      const timer = setTimeout(done, WATCH_READY_MS);
      w.once('ready', () => {
        clearTimeout(timer);
        done();
      });
    });
    return w;
  }
}

/**
 * The directories to watch for `path`: the one that holds each symlink met while resolving it
 * (a swap re-points a link there), and the one that holds the file itself. When part of the path
 * does not exist yet, the nearest existing directory above it, so its creation is seen.
 */
export async function directoriesToWatch(path: string): Promise<Set<string>> {
  const dirs = new Set<string>();
  let current = resolve(path);
  for (let hops = 0; hops <= MAX_SYMLINK_HOPS; hops++) {
    const { root } = parse(current);
    const parts = current.slice(root.length).split(sep).filter((p) => p !== '');
    let dir = root;
    let followed = false;
    for (let i = 0; i < parts.length; i++) {
      const next = join(dir, parts[i]);
      let isLink: boolean;
      try {
        isLink = (await lstat(next)).isSymbolicLink();
      } catch {
        dirs.add(dir);
        return dirs;
      }
      if (isLink) {
        dirs.add(dir);
        let target: string;
        try {
          target = await readlink(next);
        } catch {
          return dirs;
        }
        current = resolve(dir, target, ...parts.slice(i + 1));
        followed = true;
        break;
      }
      if (i === parts.length - 1) {
        dirs.add(dir);
        return dirs;
      }
      dir = next;
    }
    if (!followed) {
      dirs.add(dir);
      return dirs;
    }
  }
  return dirs;
}

/** parseRoutesFile in a worker thread of its own, which ends with the parse and takes its heap along. */
function parseRoutesOffThread(text: string, file: string, source: string): Promise<RouteSpec[]> {
  return new Promise((resolveRoutes, reject) => {
    const worker = new Worker(new URL('./parse-routes-worker.ts', import.meta.url), {
      workerData: { text, file, source },
      resourceLimits: { maxOldGenerationSizeMb: PARSE_HEAP_MB },
      stdout: false,
      stderr: false,
    });
    let settled = false;
    worker.once('message', (m: { ok: true; routes: RouteSpec[] } | { ok: false; message: string }) => {
      settled = true;
      if (m.ok) resolveRoutes(m.routes);
      else reject(new Error(m.message));
      void worker.terminate();
    });
    worker.once('error', (err: Error & { code?: string }) => {
      if (settled) return;
      settled = true;
      reject(new Error(err.code === 'ERR_WORKER_OUT_OF_MEMORY'
        ? `${file}: too large to parse within ${PARSE_HEAP_MB} MiB`
        : `${file}: ${err.message}`));
    });
    worker.once('exit', (code) => {
      if (!settled) reject(new Error(`${file}: the parser exited (${code}) without a result`));
    });
  });
}
