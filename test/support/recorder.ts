// A program that records how it was called: it stands in for reload scripts and, through the
// SNI_ROUTER_SYSTEMCTL hook, for systemctl. Each call is one line of its log: when it started,
// when it ended, its exit status and its arguments.
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface Call {
  /** Unix ms when it started and when it was about to exit. */
  readonly at: number;
  readonly end: number;
  readonly status: number;
  readonly args: string[];
}

export interface RecorderOptions {
  /** The first N calls fail (exit 3). */
  readonly failFirst?: number;
  /** Refuse --kill-whom= like systemd before 252 (exit 1). */
  readonly rejectKillWhom?: boolean;
  /** Calls whose arguments contain this fail (exit 3) until heal() is called. */
  readonly failMatching?: string;
  /** Each call takes this long (a unit that takes a while to restart). */
  readonly holdMs?: number;
}

export interface Recorder {
  readonly path: string;
  calls(): Call[];
  /** From now on, calls matching failMatching succeed. */
  heal(): void;
}

export function recorder(dir: string, name: string, opts: RecorderOptions = {}): Recorder {
  const path = join(dir, name);
  const log = join(dir, `${name}.calls`);
  const count = join(dir, `${name}.count`);
  const healed = join(dir, `${name}.healed`);
  const hold = opts.holdMs === undefined ? '' : `sleep ${(opts.holdMs / 1000).toFixed(3)}`;
  writeFileSync(path, `#!/bin/sh
at=$(date +%s%3N)
n=$(cat '${count}' 2>/dev/null || echo 0); n=$((n+1)); echo "$n" > '${count}'
status=0
if [ "$n" -le ${opts.failFirst ?? 0} ]; then status=3; fi
${opts.rejectKillWhom === true ? `case "$*" in *--kill-whom=*) status=1;; esac` : ''}
${opts.failMatching === undefined ? '' : `if [ ! -e '${healed}' ]; then case "$*" in *'${opts.failMatching}'*) status=3;; esac; fi`}
${hold}
{ printf '%s\\t%s\\t%s' "$at" "$(date +%s%3N)" "$status"; printf '\\t%s' "$@"; printf '\\n'; } >> '${log}'
if [ "$status" = 1 ]; then echo "systemctl: unrecognized option '--kill-whom=main'" >&2; fi
if [ "$status" = 3 ]; then echo "reload failed (simulated)" >&2; fi
exit "$status"
`);
  chmodSync(path, 0o755);
  const calls = (): Call[] => {
    let text = '';
    try {
      text = readFileSync(log, 'utf8');
    } catch {
      return [];
    }
    return text.split('\n').filter((l) => l !== '').map((l) => {
      const [at, end, status, ...args] = l.split('\t');
      return { at: Number(at), end: Number(end), status: Number(status), args };
    });
  };
  return { path, calls, heal: () => writeFileSync(healed, '') };
}
