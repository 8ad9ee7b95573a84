// bench/RESULTS.md from the measurements: one Markdown table per figure (and per case), each cell
// the median of the runs with its spread, and beside the main numbers the ratio to HAProxy's in the
// same run (the median of the per-run ratios, with their spread).
import type { Durations, FigureId, Hello, LoadFigure, Measurement } from './figures.ts';
import { CPS_IN_FLIGHT, TURN_CONNS, TURN_INTERVAL_MS, TURN_PACKET } from './figures.ts';
import { type Spread, fmt, fmtRatio, fmtSpread, spread } from './stats.ts';

export interface Meta {
  readonly started: string;
  readonly elapsedS: number;
  readonly quick: boolean;
  readonly runs: number;
  readonly command: string;
  readonly machine: Record<string, string>;
  readonly versions: Record<string, string>;
  readonly hellos: readonly Hello[];
  readonly durations: Durations;
  readonly idleConns: number;
  readonly updateChanges: number;
  readonly targets: readonly string[];
  readonly figures: readonly FigureId[];
  readonly skippedTargets: Record<string, string>;
  readonly rawFile: string;
  /** `workers:` of the sni-router-workers target (0: not run). */
  readonly sniRouterWorkers?: number;
}

interface Col {
  readonly label: string;
  readonly key: string;
  readonly digits?: number;
  /** Also show the ratio to HAProxy's value in the same run. */
  readonly ratio?: boolean;
  /** The value minus direct's in the same run ("added over direct"). */
  readonly added?: boolean;
  /** Also show the ratio to the best peer's value in the same run (higher is better). */
  readonly bestPeer?: boolean;
}

/** The proxies sni-router is compared with. */
const PEERS = ['haproxy', 'nginx', 'nginx-64k', 'sniproxy'];

interface Section {
  readonly title: string;
  readonly about: string;
  readonly goal: string;
  readonly cols: readonly Col[];
}

const SECTIONS: Record<LoadFigure, Section> = {
  cps: {
    title: `1. New connections per second, ${CPS_IN_FLIGHT} in flight, and proxy CPU per connection`,
    about: `Each connection: connect, send the ClientHello, the backend answers one byte after reading all of it, the client reads it and closes. ` +
      `conn/s counts connections completed in the window; CPU µs/conn is the proxy's user+system time over the window divided by them.`,
    goal: 'issue 6 target: conn/s ≥ 1.0× HAProxy; CPU per connection ≤ 1.25× HAProxy.',
    cols: [
      { label: 'conn/s ↑', key: 'cps', digits: 0, ratio: true },
      { label: 'CPU µs/conn ↓', key: 'cpu_us_per_conn', digits: 1, ratio: true },
      { label: 'proxy CPU %', key: 'cpu_pct', digits: 0 },
      { label: 'p50 conn time µs', key: 'conn_p50_us', digits: 0 },
      { label: 'errors', key: 'errors', digits: 0 },
    ],
  },
  ttfb: {
    title: '2. Time to first byte, one connection in flight',
    about: 'From connect() to the backend\'s first byte at the client (the backend answers once it has the whole ClientHello); "added" is the value minus direct\'s in the same run.',
    goal: 'issue 6 target: added p50 ≤ 1.2× HAProxy\'s.',
    cols: [
      { label: 'p50 µs', key: 'p50_us', digits: 1 },
      { label: 'p99 µs', key: 'p99_us', digits: 1 },
      { label: 'added p50 µs ↓', key: 'p50_us', digits: 1, added: true, ratio: true },
      { label: 'added p99 µs ↓', key: 'p99_us', digits: 1, added: true, ratio: true },
      { label: 'errors', key: 'errors', digits: 0 },
    ],
  },
  tput: {
    title: '3. Throughput, 64 KiB writes',
    about: 'After the ClientHello, the sender writes 64 KiB chunks as fast as the connection takes them; "up" is client → backend (counted as written by the client), "down" backend → client (counted as read by the client).',
    goal: 'issue 6 target: ≥ 1.0× the best peer in each case.',
    cols: [
      { label: 'Gbit/s ↑', key: 'gbit_s', digits: 2, ratio: true, bestPeer: true },
      { label: 'proxy CPU %', key: 'cpu_pct', digits: 0 },
      { label: 'errors', key: 'errors', digits: 0 },
    ],
  },
  turn: {
    title: `4. TURN-like load: ${TURN_CONNS} connections, each echoing a ${TURN_PACKET}-byte packet every ${TURN_INTERVAL_MS} ms`,
    about: `Sends are spread evenly over the interval (${TURN_CONNS * (1000 / TURN_INTERVAL_MS)} packets/s each way); round trip from the client's send to the echo's arrival. ` +
      '"added" is the value minus direct\'s in the same run. Loadgen send lag p99 shows how late the client sent against its schedule (its own health).',
    goal: 'issue 6 target: proxy CPU ≤ 1.0× HAProxy\'s; added round-trip p99 ≤ 1 ms.',
    cols: [
      { label: 'RTT p50 µs', key: 'rtt_p50_us', digits: 0 },
      { label: 'RTT p99 µs', key: 'rtt_p99_us', digits: 0 },
      { label: 'RTT p99.9 µs', key: 'rtt_p999_us', digits: 0 },
      { label: 'added p99 µs ↓', key: 'rtt_p99_us', digits: 0, added: true, ratio: true },
      { label: 'added p99.9 µs', key: 'rtt_p999_us', digits: 0, added: true },
      { label: 'proxy CPU % ↓', key: 'cpu_pct', digits: 1, ratio: true },
      { label: 'lost', key: 'lost', digits: 0 },
      { label: 'loadgen send lag p99 µs', key: 'send_lag_p99_us', digits: 0 },
      { label: 'errors', key: 'errors', digits: 0 },
    ],
  },
  idle: {
    title: '5. Memory per idle proxied connection',
    about: 'RSS (VmRSS) of the proxy just before the client opens its connections, and after they are all up (each has sent its ClientHello and had one byte back) and held for a moment; KiB/conn is the growth divided by the connections.',
    goal: 'issue 6 target: ≤ 3.3 KB per connection.',
    cols: [
      { label: 'RSS before MiB', key: 'rss_before_mib', digits: 1 },
      { label: 'RSS with conns MiB', key: 'rss_with_mib', digits: 1 },
      { label: 'KiB/conn ↓', key: 'kib_per_conn', digits: 2, ratio: true },
      { label: 'connections', key: 'established', digits: 0 },
      { label: 'errors', key: 'errors', digits: 0 },
    ],
  },
};

type ByRep = Map<number, Measurement>;

function value(m: Measurement | undefined, key: string): number | null {
  if (m === undefined || !m.ok) return null;
  const v = m.metrics[key];
  return typeof v === 'number' && Number.isFinite(v) ? v : null;
}

function columnValues(col: Col, mine: ByRep, direct: ByRep | undefined): Map<number, number> {
  const out = new Map<number, number>();
  for (const [rep, m] of mine) {
    let v = value(m, col.key);
    if (v !== null && col.added) {
      const d = value(direct?.get(rep), col.key);
      v = d === null || m.target === 'direct' ? null : v - d;
    }
    if (v !== null) out.set(rep, v);
  }
  return out;
}

function ratios(mine: Map<number, number>, base: Map<number, number> | undefined): Spread | null {
  if (base === undefined) return null;
  const r: number[] = [];
  for (const [rep, v] of mine) {
    const b = base.get(rep);
    if (b !== undefined && b !== 0) r.push(v / b);
  }
  return spread(r);
}

function firstLine(s: string | undefined): string {
  return (s ?? '').split('\n')[0].slice(0, 300);
}

function loadTable(figure: LoadFigure, caseId: string, ms: readonly Measurement[], targets: readonly string[]): string[] {
  const sec = SECTIONS[figure];
  const byTarget = new Map<string, ByRep>();
  for (const m of ms) {
    if (m.figure !== figure || m.case !== caseId) continue;
    let t = byTarget.get(m.target);
    if (t === undefined) byTarget.set(m.target, (t = new Map()));
    t.set(m.rep, m);
  }
  const header = ['proxy'];
  for (const c of sec.cols) {
    header.push(c.label);
    if (c.ratio) header.push('× HAProxy');
    if (c.bestPeer) header.push('× best peer');
  }
  const lines = [`| ${header.join(' | ')} |`, `|${header.map((_, i) => (i === 0 ? '---' : '---:')).join('|')}|`];
  const problems: string[] = [];
  for (const target of targets) {
    const mine = byTarget.get(target);
    if (mine === undefined) continue;
    const cells = [target];
    const okRuns = [...mine.values()].filter((m) => m.ok).length;
    for (const c of sec.cols) {
      const vals = columnValues(c, mine, byTarget.get('direct'));
      cells.push(fmtSpread(spread([...vals.values()]), c.digits));
      if (c.ratio) {
        const base = byTarget.get('haproxy');
        if (base === undefined) cells.push('—');
        else if (target === 'haproxy') cells.push(vals.size > 0 ? '1×' : '—');
        else cells.push(fmtRatio(ratios(vals, columnValues(c, base, byTarget.get('direct')))));
      }
      if (c.bestPeer) {
        const best = new Map<number, number>();
        for (const peer of PEERS) {
          const p = byTarget.get(peer);
          if (p === undefined) continue;
          for (const [rep, v] of columnValues(c, p, byTarget.get('direct'))) best.set(rep, Math.max(best.get(rep) ?? 0, v));
        }
        cells.push(best.size === 0 ? '—' : fmtRatio(ratios(vals, best)));
      }
    }
    if (okRuns < mine.size) cells[0] = `${target} (${okRuns}/${mine.size} runs ok)`;
    lines.push(`| ${cells.join(' | ')} |`);
    for (const m of mine.values()) {
      if (m.skipped !== undefined) problems.push(`- ${target}, run ${m.rep}: skipped: ${firstLine(m.skipped)}`);
      else if (!m.ok) problems.push(`- ${target}, run ${m.rep}: **failed**: ${firstLine(m.error)}`);
      else if ((m.metrics.errors ?? 0) > 0) problems.push(`- ${target}, run ${m.rep}: ${m.metrics.errors} connection errors (see the raw JSON)`);
    }
  }
  if (problems.length > 0) lines.push('', ...problems);
  return lines;
}

function updatesSection(ms: readonly Measurement[]): string[] {
  const mine = ms.filter((m) => m.figure === 'updates');
  if (mine.length === 0) return [];
  const lines = [
    '## 6a. Route-update latency (sni-router only)',
    '',
    'From the change at the source (routes file renamed into place; PostgreSQL `UPDATE` + `NOTIFY` in one transaction; Redis `HSET` + `PUBLISH` in one round trip) ' +
      'to the end of the first new connection routed to the new backend. Probes are real connections with the Chromium ClientHello, about every 2 ms. ' +
      'p50/p99 are over the changes of a run; the cells give the median of the runs (min–max). A glitch is a probe that reached the fallback while the route flipped.',
    '',
    'issue 6 target: p99 Redis ≤ 50 ms, PostgreSQL NOTIFY ≤ 100 ms, file ≤ 250 ms.',
    '',
    '| source | p50 ms | p99 ms ↓ | max ms | changes seen | timeouts | fallback glitches |',
    '|---|---:|---:|---:|---:|---:|---:|',
  ];
  const notes: string[] = [];
  for (const source of ['file', 'postgres', 'redis']) {
    const runs = mine.filter((m) => m.case === source);
    if (runs.length === 0) continue;
    const ok = runs.filter((m) => m.ok);
    if (ok.length === 0) {
      const why = runs[0].skipped ?? runs[0].error;
      lines.push(`| ${source} | — | — | — | — | — | — |`);
      notes.push(`- ${source}: ${runs[0].skipped !== undefined ? 'skipped' : '**failed**'}: ${firstLine(why)}`);
      continue;
    }
    const col = (k: string, d: number) => fmtSpread(spread(ok.map((m) => m.metrics[k])), d);
    lines.push(`| ${source} | ${col('p50_ms', 1)} | ${col('p99_ms', 1)} | ${col('max_ms', 1)} | ${col('changes', 0)} | ${col('timeouts', 0)} | ${col('glitches', 0)} |`);
    for (const m of runs) if (!m.ok) notes.push(`- ${source}, run ${m.rep}: ${m.skipped !== undefined ? 'skipped' : '**failed**'}: ${firstLine(m.skipped ?? m.error)}`);
  }
  if (notes.length > 0) lines.push('', ...notes);
  return lines;
}

function tableSection(ms: readonly Measurement[]): string[] {
  const mine = ms.filter((m) => m.figure === 'table');
  if (mine.length === 0) return [];
  const ok = mine.filter((m) => m.ok);
  const col = (k: string, d: number) => fmtSpread(spread(ok.map((m) => m.metrics[k])), d);
  const n = ok[0]?.metrics.routes ?? 100_000;
  const lines = [
    `## 6b. A ${fmt(n, 0)}-route table (sni-router only, \`bench/table.ts\`)`,
    '',
    'RouteTable and Router from src/router/table.ts, used directly, pinned to CPU 0. Routes: 90% exact names (a tenth with `alpn: none`), 5% `*.`, 5% `**.`. ' +
      'Lookup: 2 M lookups of random names of each kind (offering h2, http/1.1). Build + swap: `new RouteTable(snapshot)` + `Router.replace`; ' +
      'composer apply: the whole path a source\'s snapshot takes (merge, conflicts, diff against the live table, swap). Heap after full GC.',
    '',
    'issue 6 target: lookup ≤ 1 µs; replace ≤ 200 ms.',
    '',
    '| lookup ns: exact | `*.` | `**.` | miss | mixed | build + swap ms | composer apply ms | heap MB: table | routes + table |',
    '|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    `| ${col('lookup_exact_ns', 0)} | ${col('lookup_wildcard_ns', 0)} | ${col('lookup_any_ns', 0)} | ${col('lookup_miss_ns', 0)} | ${col('lookup_mixed_ns', 0)} | ` +
      `${col('build_swap_ms', 1)} | ${col('composer_apply_ms', 1)} | ${col('heap_table_mb', 1)} | ${col('heap_total_mb', 1)} |`,
  ];
  for (const m of mine) if (!m.ok) lines.push('', `- run ${m.rep}: **failed**: ${firstLine(m.error)}`);
  return lines;
}

export function renderReport(meta: Meta, ms: readonly Measurement[]): string {
  const out: string[] = [];
  const d = meta.durations;
  out.push(
    '# sni-router benchmark results',
    '',
    meta.quick
      ? '> **Quick run** (`--quick`): short windows, one run. Smoke test only: numbers are noisy and not for comparison.'
      : `> Each figure is the median of ${meta.runs} runs, with the spread (min–max) in parentheses.`,
    '',
    `Generated by \`${meta.command}\` on ${meta.started}, in ${fmt(meta.elapsedS / 60, 1)} min. Raw numbers: \`${meta.rawFile}\`.`,
    '',
    'Where sni-router misses a target: where the time goes (profiles), what was tried and what it gave, in [PROFILE.md](PROFILE.md).',
    '',
    '## Machine and versions',
    '',
    '| | |',
    '|---|---|',
    ...Object.entries(meta.machine).map(([k, v]) => `| ${k} | ${v} |`),
    ...Object.entries(meta.versions).map(([k, v]) => `| ${k} | ${v.replace(/\|/g, '\\|')} |`),
    '',
    '## Method',
    '',
    '- Each proxy runs alone, pinned to CPU 0 (`taskset -c 0`); the load generator, the backends and this harness are pinned to CPU 1. ' +
      'For every measurement, a fresh backend process, a fresh proxy and a fresh client. All traffic is on 127.0.0.1.',
    '- Configured alike (templates in `bench/peers/`): one SNI route, `cdn.example.com` → backend A, and a fallback, backend B; 5 s ClientHello and dial timeouts ' +
      '(sniproxy has no setting for either). HAProxy: `req.ssl_sni` map, `inspect-delay 5s`, `accept if { req.ssl_hello_type 1 }`, default buffers, one thread. ' +
      'nginx: `stream` + `ssl_preread` + `map`, one worker, no master, default 16 KiB buffers (`nginx-64k`: `proxy_buffer_size 64k`, run in the throughput figure unless `--proxies` names it). sni-router: `bin/sni-router`, log level warn.',
    `- direct is the baseline without a proxy: the client connects to backend A itself.`,
    `- ClientHellos (every connection sends one, whole, in one write): ${meta.hellos.map((h) => `${h.name} (${h.bytes} bytes: ${h.note})`).join('; ')}. ` +
      'Figures 1 and 2 use each; the others use the Chromium one.',
    `- Windows: new connections ${d.cps.duration} s after ${d.cps.warmup} s warm-up; TTFB ${d.ttfb.duration} s; throughput ${d.tput.duration} s after ${d.tput.warmup} s; ` +
      `TURN-like ${d.turn.duration} s after ${d.turn.warmup} s; idle: ${fmt(meta.idleConns, 0)} connections held ${d.idleSettle} s; route updates: ${meta.updateChanges} changes per source per run.`,
    '- Proxy CPU: utime + stime of the proxy process from /proc/PID/stat (10 ms ticks), read at the client\'s window marks. Memory: VmRSS from /proc/PID/status.',
    '- "× HAProxy": the value divided by HAProxy\'s in the same run; median of those per-run ratios (min–max). ↑ higher is better, ↓ lower is better.',
    '- The machine is shared: read ratios rather than absolute numbers. Load average at start and end is in the table above.',
  );
  if (meta.targets.includes('sni-router-workers')) {
    out.push(`- sni-router-workers: sni-router with \`workers: ${meta.sniRouterWorkers ?? 2}\`, **not pinned**: its workers run on every CPU, ` +
      'CPU 1 included, which the load generator and backends use too, so it competes with its own load. ' +
      'Proxy CPU is the primary\'s and the workers\' together. Only in the connections/s figure unless `--proxies` names it.');
  }
  if (Object.keys(meta.skippedTargets).length > 0) {
    out.push('', '**Not measured:**', ...Object.entries(meta.skippedTargets).map(([t, why]) => `- ${t}: ${why}`));
  }
  for (const figure of ['cps', 'ttfb', 'tput', 'turn', 'idle'] as const) {
    if (!meta.figures.includes(figure)) continue;
    const sec = SECTIONS[figure];
    out.push('', `## ${sec.title}`, '', sec.about, '', sec.goal);
    const cases = [...new Set(ms.filter((m) => m.figure === figure).map((m) => m.case))];
    for (const c of cases) {
      if (cases.length > 1 || figure === 'tput') out.push('', `### ${figure === 'tput' ? `${c.replace('x ', ' stream(s), ')}` : `${c} ClientHello`}`);
      out.push('', ...loadTable(figure, c, ms, meta.targets));
    }
  }
  if (meta.figures.includes('updates')) out.push('', ...updatesSection(ms));
  if (meta.figures.includes('table')) out.push('', ...tableSection(ms));
  out.push('');
  return out.join('\n');
}
