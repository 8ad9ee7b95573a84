// File events for a watcher: chokidar on the directories where pairs live, and a poll for those
// that do not exist yet (Caddy has not obtained a certificate) or were removed (storage wiped).
// Every event, and a directory that appeared, is passed on as is; the watcher debounces them.
import { stat } from 'node:fs/promises';
import { type FSWatcher, watch } from 'chokidar';
import type { Logger } from '../log.ts';

/** What to watch: directories, how deep below them, and which paths to leave out. */
export interface WatchSpec {
  readonly dirs: readonly string[];
  readonly depth: number;
  readonly ignored: (path: string) => boolean;
}

export interface WatchTuning {
  readonly dirPollMs: number;
  /** Longest wait for the file watcher's first directory walk before going on. */
  readonly watchReadyMs: number;
}

export class FileWatch {
  readonly #spec: WatchSpec;
  readonly #log: Logger;
  readonly #t: WatchTuning;
  readonly #onEvent: (path: string) => void;
  #fsw: FSWatcher | null = null;
  #ready = false;
  /** Directories to watch that do not exist yet. */
  #missing: string[] = [];
  #poll: NodeJS.Timeout | null = null;
  #polling = false;
  #closed = false;

  constructor(spec: WatchSpec, log: Logger, tuning: WatchTuning, onEvent: (path: string) => void) {
    this.#spec = spec;
    this.#log = log;
    this.#t = tuning;
    this.#onEvent = onEvent;
  }

  async start(): Promise<void> {
    const { dirs, depth, ignored } = this.#spec;
    const present: string[] = [];
    for (const d of dirs) {
      if (await isDir(d)) present.push(d);
      else this.#missing.push(d);
    }
    const fsw = watch([], {
      ignoreInitial: true, followSymlinks: false, depth, ignored, persistent: true, ignorePermissionErrors: true,
    });
    this.#fsw = fsw;
    fsw.on('all', (event, path) => {
      if (event === 'unlinkDir' && dirs.includes(path)) this.#lost(path);
      this.#onEvent(path);
    });
    fsw.on('error', (err) => this.#log.warn({ err: (err as Error).message }, 'certwatch file watcher error'));
    if (present.length > 0) await this.#add(present);
    if (this.#missing.length > 0) {
      this.#log.info({ dirs: this.#missing }, 'waiting for the certificate directory to exist');
      this.#poll = setInterval(() => void this.#pollMissing(), this.#t.dirPollMs);
    }
  }

  async close(): Promise<void> {
    this.#closed = true;
    if (this.#poll !== null) clearInterval(this.#poll);
    this.#poll = null;
    await this.#fsw?.close();
    this.#fsw = null;
  }

  /** A watched directory was removed (storage wiped): wait for it to come back, then watch it again. */
  #lost(dir: string): void {
    if (this.#closed || this.#missing.includes(dir)) return;
    this.#fsw?.unwatch(dir);
    this.#missing.push(dir);
    this.#log.warn({ dirs: [dir] }, 'certificate directory removed; waiting for it to exist again');
    this.#poll ??= setInterval(() => void this.#pollMissing(), this.#t.dirPollMs);
  }

  /**
   * Watches more directories. The first time, waits (bounded) for chokidar's first walk, so that
   * no event after start() is missed; chokidar says "ready" only once, so later additions (a
   * directory that appeared) are followed by an event instead.
   */
  async #add(dirs: string[]): Promise<void> {
    const fsw = this.#fsw;
    if (fsw === null) return;
    if (this.#ready) {
      fsw.add(dirs);
      return;
    }
    const ready = new Promise<void>((done) => {
      const timer = setTimeout(done, this.#t.watchReadyMs);
      fsw.once('ready', () => {
        clearTimeout(timer);
        this.#ready = true;
        done();
      });
    });
    fsw.add(dirs);
    await ready;
  }

  async #pollMissing(): Promise<void> {
    if (this.#polling) return;
    this.#polling = true;
    const appeared: string[] = [];
    try {
      for (const d of this.#missing) if (await isDir(d)) appeared.push(d);
    } finally {
      this.#polling = false;
    }
    if (appeared.length === 0 || this.#closed) return;
    this.#missing = this.#missing.filter((d) => !appeared.includes(d));
    if (this.#missing.length === 0 && this.#poll !== null) {
      clearInterval(this.#poll);
      this.#poll = null;
    }
    this.#log.info({ dirs: appeared }, 'certificate directory appeared; watching it');
    await this.#add(appeared);
    this.#onEvent(appeared[0]);
  }
}

async function isDir(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isDirectory();
  } catch {
    return false;
  }
}
