// The documentation a reader finds from the README: every relative link resolves to a file of the
// repository (and its #anchor to a heading there), every repository path it names in code exists,
// nothing points outside the repository, and the README stays a front door, not the manual.
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { test } from 'node:test';

const ROOT = resolve(import.meta.dirname, '..');
const DOCS = [
  'README.md',
  ...readdirSync(join(ROOT, 'docs')).filter((f) => f.endsWith('.md')).map((f) => `docs/${f}`),
  'bench/PROFILE.md',
];

/** The text outside fenced code blocks, line by line (a fence's lines become empty). */
function prose(text: string): string[] {
  let fenced = false;
  return text.split('\n').map((line) => {
    if (/^\s*(```|~~~)/.test(line)) {
      fenced = !fenced;
      return '';
    }
    return fenced ? '' : line;
  });
}

/** GitHub's anchor for a heading: lowercased, punctuation dropped, spaces to '-'; repeats get -1, -2. */
function anchors(text: string): Set<string> {
  const out = new Set<string>();
  const seen = new Map<string, number>();
  for (const line of prose(text)) {
    const m = /^#{1,6}\s+(.*?)\s*#*\s*$/.exec(line);
    if (m === null) continue;
    const heading = m[1].replace(/\[([^\]]*)\]\([^)]*\)/g, '$1');
    const slug = heading.toLowerCase().replace(/[^\p{L}\p{N}\s_-]/gu, '').replace(/\s/g, '-');
    const n = seen.get(slug) ?? 0;
    seen.set(slug, n + 1);
    out.add(n === 0 ? slug : `${slug}-${n}`);
  }
  return out;
}

/** Markdown links [text](target) in prose, with inline code left out. */
function links(text: string): Array<{ line: number; target: string }> {
  const out: Array<{ line: number; target: string }> = [];
  prose(text).forEach((line, i) => {
    for (const m of line.replace(/`[^`]*`/g, '').matchAll(/\]\(([^)\s]+)(?:\s+"[^"]*")?\)/g)) out.push({ line: i + 1, target: m[1] });
  });
  return out;
}

test('every relative link in README.md, docs/ and bench/PROFILE.md resolves inside the repository, anchors included', () => {
  const problems: string[] = [];
  let checked = 0;
  for (const doc of DOCS) {
    const text = readFileSync(join(ROOT, doc), 'utf8');
    for (const { line, target } of links(text)) {
      if (/^[a-z]+:/i.test(target)) continue; // https:, mailto:
      checked++;
      const [path, anchor] = target.split('#', 2);
      const file = path === '' ? join(ROOT, doc) : resolve(dirname(join(ROOT, doc)), decodeURIComponent(path));
      const where = `${doc}:${line}: ${target}`;
      if (relative(ROOT, file).startsWith('..')) {
        problems.push(`${where} leaves the repository`);
        continue;
      }
      if (!existsSync(file)) {
        problems.push(`${where}: no such file`);
        continue;
      }
      if (anchor !== undefined && anchor !== '') {
        if (!file.endsWith('.md') || statSync(file).isDirectory()) {
          problems.push(`${where}: an anchor into a file that is not Markdown`);
        } else if (!anchors(readFileSync(file, 'utf8')).has(anchor)) {
          problems.push(`${where}: no heading makes #${anchor}`);
        }
      }
    }
  }
  assert.deepEqual(problems, []);
  assert.ok(checked > 50, `only ${checked} links checked: the link pattern is broken`);
});

test('every repository path the documents name in code exists, and none names a path outside the repository', () => {
  const problems: string[] = [];
  for (const doc of DOCS) {
    const text = readFileSync(join(ROOT, doc), 'utf8');
    text.split('\n').forEach((line, i) => {
      if (/\.\.\/shared|\/work\//.test(line)) problems.push(`${doc}:${i + 1}: points outside the repository`);
      for (const m of line.matchAll(/`((?:src|test|deploy|bench|sql|bin|docs)\/[\w.@/-]+)`/g)) {
        const path = m[1].replace(/\/$/, '');
        if (path === 'bench/loadgen' || path.startsWith('bench/out')) continue; // built or written by the bench
        if (!existsSync(join(ROOT, path))) problems.push(`${doc}:${i + 1}: ${m[1]} does not exist`);
      }
    });
  }
  assert.deepEqual(problems, []);
});

test('the README is a front door: at most 160 lines, and it links to every document in docs/', () => {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
  const lines = readme.split('\n').length - (readme.endsWith('\n') ? 1 : 0);
  assert.ok(lines <= 160, `README.md has ${lines} lines`);
  const linked = new Set(links(readme).map((l) => l.target.split('#')[0]));
  for (const doc of DOCS.filter((d) => d.startsWith('docs/'))) assert.ok(linked.has(doc), `README.md links to ${doc}`);
});

test('the anchors are made as GitHub makes them', () => {
  assert.deepEqual([...anchors('# What SIGHUP re-reads, what needs a restart\n## Configuration and `${ENV}`\n## Day to day\n## Day to day\n```\n# not a heading\n```\n')],
    ['what-sighup-re-reads-what-needs-a-restart', 'configuration-and-env', 'day-to-day', 'day-to-day-1']);
});
