// The Redis source through a real router and the real Redis (keys and channel of its own per
// test): HSET/HDEL + PUBLISH reach the live table within a second, and a change made while the
// router was disconnected (its PUBLISH lost) still arrives on reconnect.
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import type tls from 'node:tls';
import type { Redis } from 'ioredis';
import { type Listening, type RunningRouter, makeCert, sleep, startRouter, tempDir, tlsBackend, waitFor } from './helpers.ts';
import {
  type Forwarder, REDIS_PORT, backendFor, forwarder, randomSuffix, redisClient, redisClientIds, redisSettled, timeUntilRouted,
} from './support/sources.ts';

const BOUND_MS = 1000;

interface Rig {
  readonly redis: Redis;
  readonly key: string;
  readonly channel: string;
  readonly source: string;
  readonly fwd: Forwarder;
  readonly ports: Record<string, number>;
  start(opts?: { resync?: string; viaForwarder?: boolean }): Promise<RunningRouter>;
  /** The value of a hash entry routing to a test backend. */
  entry(backend: string, extra?: Record<string, unknown>): string;
}

async function rig(t: TestContext): Promise<Rig> {
  const tmp = tempDir();
  const pair = makeCert(tmp.dir, 'backend.test');
  const names = ['caddy', 'alpha', 'bravo', 'charlie'];
  const backends: Array<Listening<tls.Server>> = await Promise.all(names.map((n) => tlsBackend(n, pair)));
  const ports: Record<string, number> = {};
  names.forEach((n, i) => {
    ports[n] = backends[i].port;
  });
  const suffix = randomSuffix();
  const key = `sni-router-test:${suffix}:routes`;
  const channel = `sni-router-test:${suffix}:changed`;
  const source = `redis-${suffix}`;
  const redis = redisClient();
  const fwd = await forwarder(REDIS_PORT);
  const routers: RunningRouter[] = [];
  t.after(async () => {
    for (const r of routers) await r.stop();
    await redis.del(key);
    redis.disconnect();
    await fwd.close();
    for (const b of backends) await b.close();
    tmp.cleanup();
  });
  return {
    redis,
    key,
    channel,
    source,
    fwd,
    ports,
    entry: (backend, extra = {}) => JSON.stringify({ backend: { name: backend, addr: `127.0.0.1:${ports[backend]}` }, ...extra }),
    start: async (opts = {}) => {
      const r = await startRouter([
        `fallback: { name: caddy, addr: "127.0.0.1:${ports.caddy}" }`,
        'sources:',
        '  - type: redis',
        `    name: ${source}`,
        `    url: "redis://127.0.0.1:${opts.viaForwarder === true ? fwd.port : REDIS_PORT}/0"`,
        `    key: "${key}"`,
        `    channel: "${channel}"`,
        `    resync_interval: ${opts.resync ?? '60s'}`,
      ].join('\n'));
      routers.push(r);
      return r;
    },
  };
}

test('HSET + PUBLISH routes a name within a second; HDEL + PUBLISH removes it', async (t) => {
  const rg = await rig(t);
  await rg.redis.hset(rg.key, 'kept.example.test', rg.entry('alpha'));
  // A 60 s resync cannot explain anything that happens within a second: only the message can.
  const r = await rg.start();
  assert.equal(await backendFor(r.port, 'kept.example.test'), 'alpha', 'the hash is read before the router listens');

  let since = Date.now();
  await rg.redis.hset(rg.key, 'turn-acme.example.test', rg.entry('bravo', { alpn: 'none' }));
  await rg.redis.publish(rg.channel, 'turn-acme.example.test');
  const added = await timeUntilRouted(r.port, 'turn-acme.example.test', 'bravo', { since });
  assert.ok(added <= BOUND_MS, `HSET + PUBLISH routed after ${added}ms`);
  assert.equal(await backendFor(r.port, 'turn-acme.example.test', ['h2']), 'caddy', 'alpn: none from the JSON value applies');

  since = Date.now();
  await rg.redis.hset(rg.key, 'turn-acme.example.test', rg.entry('charlie', { alpn: 'none' }));
  await rg.redis.publish(rg.channel, '');
  const changed = await timeUntilRouted(r.port, 'turn-acme.example.test', 'charlie', { since });
  assert.ok(changed <= BOUND_MS, `changed backend routed after ${changed}ms`);

  since = Date.now();
  await rg.redis.hdel(rg.key, 'turn-acme.example.test');
  await rg.redis.publish(rg.channel, 'anything at all');
  const removed = await timeUntilRouted(r.port, 'turn-acme.example.test', 'caddy', { since });
  assert.ok(removed <= BOUND_MS, `HDEL + PUBLISH removed after ${removed}ms`);
  assert.equal(await backendFor(r.port, 'kept.example.test'), 'alpha');

  // The whole hash deleted is zero routes, not an error.
  since = Date.now();
  await rg.redis.del(rg.key);
  await rg.redis.publish(rg.channel, '');
  await timeUntilRouted(r.port, 'kept.example.test', 'caddy', { since, deadlineMs: BOUND_MS });
  assert.equal(await r.metric('sni_router_source_up', { source: rg.source }), 1);
  t.diagnostic(`HSET+PUBLISH ${added}ms, change ${changed}ms, HDEL+PUBLISH ${removed}ms`);
});

test('a change made while its connections are killed arrives on reconnect without a PUBLISH', async (t) => {
  const rg = await rig(t);
  await rg.redis.hset(rg.key, 'a.example.test', rg.entry('alpha'));
  const r = await rg.start();
  assert.equal(await backendFor(r.port, 'a.example.test'), 'alpha');
  const ids = await rg.redis.client('LIST').then(() => redisClientIds(rg.redis, rg.source));
  assert.equal(ids.length, 2, 'the command and the subscriber connection, named sni-router:<source>[:sub]');

  // Kill both connections and change the hash in one transaction: the router cannot have read
  // the change before it was cut, and nobody publishes it.
  const since = Date.now();
  const tx = rg.redis.multi();
  for (const id of ids) tx.client('KILL', 'ID', id);
  tx.hset(rg.key, 'a.example.test', rg.entry('bravo'));
  tx.hset(rg.key, 'b.example.test', rg.entry('charlie'));
  const results = await tx.exec();
  assert.deepEqual(results?.map(([err]) => err), [null, null, null, null]);
  const ms = await timeUntilRouted(r.port, 'a.example.test', 'bravo', { since });
  assert.ok(ms <= BOUND_MS, `change made while cut applied ${ms}ms after reconnect`);
  assert.equal(await backendFor(r.port, 'b.example.test'), 'charlie');
  await waitFor(async () => (await redisClientIds(rg.redis, rg.source)).length === 2, 3000, 'both connections back');

  // The subscription is renewed: PUBLISH works again.
  const since2 = Date.now();
  await rg.redis.hdel(rg.key, 'b.example.test');
  await rg.redis.publish(rg.channel, '');
  const resubscribed = await timeUntilRouted(r.port, 'b.example.test', 'caddy', { since: since2 });
  assert.ok(resubscribed <= BOUND_MS, `PUBLISH after reconnect applied after ${resubscribed}ms`);
  t.diagnostic(`after CLIENT KILL: change applied in ${ms}ms, next PUBLISH ${resubscribed}ms`);
});

test('keeps the routes while Redis is unreachable and applies the changes made meanwhile', async (t) => {
  const rg = await rig(t);
  await rg.redis.hset(rg.key, 'a.example.test', rg.entry('alpha'));
  const r = await rg.start({ viaForwarder: true });
  assert.equal(await backendFor(r.port, 'a.example.test'), 'alpha');

  await rg.fwd.cut();
  await waitFor(async () => await r.metric('sni_router_source_up', { source: rg.source }) === 0, 5000, 'source_up to drop to 0');
  assert.ok(await r.metric('sni_router_source_updates_total', { source: rg.source, result: 'error' }) >= 1);
  await rg.redis.hset(rg.key, 'a.example.test', rg.entry('bravo'));
  await rg.redis.publish(rg.channel, '');
  await sleep(1000);
  assert.equal(await backendFor(r.port, 'a.example.test'), 'alpha', 'the last good routes stay while Redis is down');

  const since = Date.now();
  await rg.fwd.restore();
  const recovered = await timeUntilRouted(r.port, 'a.example.test', 'bravo', { since, deadlineMs: 8000 });
  assert.ok(recovered <= 6000, `recovered after ${recovered}ms`);
  await waitFor(async () => await r.metric('sni_router_source_up', { source: rg.source }) === 1, 2000, 'source_up back to 1');
  t.diagnostic(`Redis back: change applied after ${recovered}ms`);
});

test('a change without PUBLISH is read within one resync_interval', async (t) => {
  const rg = await rig(t);
  const r = await rg.start({ resync: '400ms' });
  // Let the reads on connect pass, so that only the resync timer is left.
  await redisSettled(rg.redis, rg.source);
  const since = Date.now();
  await rg.redis.hset(rg.key, 'quiet.example.test', rg.entry('alpha'));
  const ms = await timeUntilRouted(r.port, 'quiet.example.test', 'alpha', { since });
  assert.ok(ms <= 400 + 500, `read after ${ms}ms with a 400ms resync_interval`);
});

test('skips malformed entries and counts them while their siblings apply', async (t) => {
  const rg = await rig(t);
  await rg.redis.hset(rg.key,
    'good.example.test', rg.entry('alpha'),
    'also-good.example.test', rg.entry('bravo', { alpn: ['h2'] }),
    'not-json.example.test', '{"backend":',
    'no-backend.example.test', '{"alpn":"none"}',
    'bad-addr.example.test', '{"backend":{"addr":"nowhere"}}',
    'unknown-key.example.test', '{"backend":{"addr":"127.0.0.1:1"},"weight":3}',
    'bad..name', rg.entry('alpha'));
  const r = await rg.start();
  assert.equal(await backendFor(r.port, 'good.example.test'), 'alpha');
  assert.equal(await backendFor(r.port, 'also-good.example.test', ['h2']), 'bravo');
  // Counted on every read (the start reads the hash once per connection), logged once.
  const counted = await r.metric('sni_router_source_invalid_entries_total', { source: rg.source });
  assert.ok(counted >= 5 && counted % 5 === 0, `${counted} invalid entries counted`);
  assert.equal(await r.metric('sni_router_routes', { source: rg.source }), 2);
  assert.equal(await r.metric('sni_router_source_up', { source: rg.source }), 1);
  const skipped = r.logs.filter((l) => l.msg === 'skipped invalid route entry' && l.source === rg.source);
  assert.deepEqual(skipped.map((l) => l.entry).sort(),
    ['bad-addr.example.test', 'bad..name', 'no-backend.example.test', 'not-json.example.test', 'unknown-key.example.test'].sort());
  assert.match(String(skipped.find((l) => l.entry === 'unknown-key.example.test')?.err), /unknown key "weight"/);
});
