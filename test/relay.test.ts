// The two relays behind one interface: the native one (libuv handles) by default, the portable one
// (net.Socket) when the config says so or when this Node lacks what the native one is built on.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { chooseRelay } from '../src/router/server.ts';
import { rawExchange, recordingBackend, startRouter, waitFor } from './helpers.ts';
import { buildHello } from './support/hellos.ts';
import { routerSuitePassesWith } from './support/suite.ts';

const ROOT = join(import.meta.dirname, '..');
const NODE = join(ROOT, 'node_modules', '.bin', 'node');

test('the native relay runs on the pinned Node; the portable one when the config asks', async () => {
  assert.deepEqual(chooseRelay('native'), { relay: 'native', problem: null });
  assert.deepEqual(chooseRelay('portable'), { relay: 'portable', problem: null });
  const rec = await recordingBackend({ reply: 'hi' });
  try {
    for (const relay of ['native', 'portable'] as const) {
      const r = await startRouter(`relay: ${relay}\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`);
      try {
        assert.equal(r.app.server.relay, relay);
        const reply = await rawExchange(r.port, [buildHello({ sni: 'x.example.test' })], { end: false, timeoutMs: 1000 });
        assert.equal(reply.toString(), 'hi');
      } finally {
        await r.stop();
      }
    }
  } finally {
    await rec.close();
  }
});

test('on a Node without the internals the native relay needs, the router runs the portable relay, with a warning', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'sni-router-relay-'));
  const rec = await recordingBackend({ reply: 'hi' });
  try {
    // process.binding taken away before the router loads: what a future Node may do.
    writeFileSync(join(dir, 'no-binding.mjs'), 'delete process.binding;\n');
    writeFileSync(join(dir, 'c.yaml'), `listen: "127.0.0.1:0"\nadmin: { listen: "127.0.0.1:0" }\nfallback: { addr: "127.0.0.1:${rec.port}" }\n`);
    const child = spawn(NODE, ['--import', join(dir, 'no-binding.mjs'), join(ROOT, 'src', 'cli.ts'), '--config', join(dir, 'c.yaml')], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const lines: Array<Record<string, unknown>> = [];
    let buf = '';
    child.stdout!.on('data', (d) => {
      buf += d.toString();
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        try {
          lines.push(JSON.parse(buf.slice(0, nl)) as Record<string, unknown>);
        } catch {
          // not a log line
        }
        buf = buf.slice(nl + 1);
      }
    });
    try {
      await waitFor(() => lines.some((l) => l.msg === 'sni-router started'), 15_000, 'the router to start');
      const warning = lines.find((l) => l.msg === 'the native relay cannot run here: running the portable relay');
      assert.match(String(warning?.problem), /lacks process\.binding/);
      const started = lines.find((l) => l.msg === 'sni-router started')!;
      const port = Number(String((started.listen as string[])[0]).split(':').pop());
      const reply = await rawExchange(port, [buildHello({ sni: 'x.example.test' })], { end: false, timeoutMs: 1000 });
      assert.equal(reply.toString(), 'hi');
    } finally {
      child.kill('SIGTERM');
      await new Promise((r) => child.on('exit', r));
    }
  } finally {
    await rec.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the data-plane suite passes on the portable relay', () => routerSuitePassesWith({ SNI_ROUTER_TEST_RELAY: 'portable' }, 'relay: portable'));
