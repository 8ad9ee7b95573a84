// The contract of Node's internals that the native relay is built on (src/router/native/handles.ts),
// on real loopback connections: if a Node upgrade changes any of these behaviours, this file
// fails before the relay misbehaves.
import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';
import {
  type TcpHandle, type WriteRequest, UV_EOF, lastWriteQueued, listenerHandle, localOf, nativeRelayProblem,
  newConnectRequest, newShutdownRequest, newTcpHandle, newWriteRequest, peerOf, readResult, takeAccepts,
} from '../src/router/native/handles.ts';

/** A peer on the public API: records what it receives, can stop reading. */
async function peerServer(opts: { read?: boolean } = {}) {
  const got: Buffer[] = [];
  const sockets: net.Socket[] = [];
  let ended = false;
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    sockets.push(s);
    if (opts.read === false) s.pause();
    s.on('data', (d) => got.push(d));
    s.on('end', () => {
      ended = true;
    });
    s.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as net.AddressInfo;
  return {
    port, got, sockets, ended: () => ended,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}

/** Connects a native handle to 127.0.0.1:port; resolves with it once connected (status 0). */
function connectHandle(port: number, family: 4 | 6 = 4): Promise<TcpHandle> {
  return new Promise((resolve, reject) => {
    const h = newTcpHandle();
    const req = newConnectRequest();
    req.oncomplete = function (this: never, status: number, handle: TcpHandle) {
      if (status === 0 && handle === h) resolve(h);
      else reject(new Error(`connect status ${status}`));
    } as never;
    const err = family === 6 ? h.connect6(req, '::1', port) : h.connect(req, '127.0.0.1', port);
    if (err !== 0) reject(new Error(`connect returned ${err}`));
  });
}

const until = async (cond: () => boolean, ms = 3000) => {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 5));
  }
};

test('this Node has every internal the native relay needs', () => {
  assert.equal(nativeRelayProblem(), null);
});

test('connect and connect6 complete with status 0 and the handle; peer and local addresses are known', async () => {
  const peer = await peerServer();
  const v6 = net.createServer();
  await new Promise<void>((r) => v6.listen(0, '::1', r));
  try {
    const h = await connectHandle(peer.port);
    assert.equal(peerOf(h).port, peer.port);
    assert.equal(localOf(h).address, '127.0.0.1');
    h.close();
    const h6 = await connectHandle((v6.address() as net.AddressInfo).port, 6);
    assert.equal(peerOf(h6).address, '::1');
    h6.close();
  } finally {
    v6.close();
    await peer.close();
  }
});

test('a small write completes at once; one the peer does not read queues, holds its bytes and completes later', async () => {
  const peer = await peerServer({ read: false });
  try {
    const h = await connectHandle(peer.port);
    const small = newWriteRequest();
    assert.equal(h.writeBuffer(small, Buffer.from('hello')), 0);
    assert.equal(lastWriteQueued(), false, 'written whole: libuv never touches the request');
    // Fill the kernel's buffers: a write that cannot be taken at once is queued.
    let queued: WriteRequest | null = null;
    let completed = -1;
    const big = Buffer.alloc(8 << 20, 0x61);
    const req = newWriteRequest();
    req.oncomplete = function (this: never, status: number) {
      completed = status;
    } as never;
    assert.equal(h.writeBuffer(req, big), 0);
    assert.equal(lastWriteQueued(), true, 'queued');
    queued = req;
    assert.ok(h.writeQueueSize > 0, 'the queue holds bytes');
    assert.equal(completed, -1, 'not completed while the peer does not read');
    peer.sockets[0].resume();
    await until(() => completed !== -1, 5000);
    assert.equal(completed, 0);
    assert.equal(h.writeQueueSize, 0);
    await until(() => peer.got.reduce((n, b) => n + b.length, 0) === 5 + big.length);
    assert.ok(queued !== null);
    h.close();
  } finally {
    await peer.close();
  }
});

test('reads land in a user buffer; the buffer onread returns is where the next read lands; EOF comes as UV_EOF', async () => {
  const peer = await peerServer();
  try {
    const h = await connectHandle(peer.port);
    const first = Buffer.alloc(64);
    const second = Buffer.alloc(64);
    const seen: Array<{ n: number; where: string }> = [];
    h.useUserBuffer(first);
    h.onread = function (this: TcpHandle) {
      const n = readResult();
      if (n > 0) {
        const inFirst = first.subarray(0, n).toString() !== '\0'.repeat(n);
        seen.push({ n, where: inFirst && seen.length === 0 ? 'first' : second.subarray(0, n).toString() !== '\0'.repeat(n) ? 'second' : '?' });
        return seen.length === 1 ? second : undefined;
      }
      seen.push({ n, where: 'end' });
      return undefined;
    };
    assert.equal(h.readStart(), 0);
    await until(() => peer.sockets.length === 1);
    peer.sockets[0].write('one');
    await until(() => seen.length === 1);
    assert.equal(first.subarray(0, 3).toString(), 'one');
    peer.sockets[0].write('two');
    await until(() => seen.length === 2);
    assert.equal(second.subarray(0, 3).toString(), 'two', 'read into the buffer onread returned');
    assert.deepEqual(seen.slice(0, 2), [{ n: 3, where: 'first' }, { n: 3, where: 'second' }]);
    peer.sockets[0].end();
    await until(() => seen.length === 3);
    assert.equal(seen[2].n, UV_EOF);
    h.close();
  } finally {
    await peer.close();
  }
});

test('a shutdown without a completion callback sends the FIN after the queued writes, and calls nothing', async () => {
  const peer = await peerServer();
  try {
    const h = await connectHandle(peer.port);
    const req = newWriteRequest();
    req.oncomplete = function () {} as never;
    h.writeBuffer(req, Buffer.from('last words'));
    assert.equal(h.shutdown(newShutdownRequest()), 0);
    await until(() => peer.ended());
    assert.equal(Buffer.concat(peer.got).toString(), 'last words');
    h.close();
  } finally {
    await peer.close();
  }
});

test('the accept hook hands each accepted connection over as a handle that reads', async () => {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const handles: TcpHandle[] = [];
  try {
    assert.ok(listenerHandle(server) !== null);
    assert.equal(takeAccepts(server, (h) => handles.push(h)), true);
    let netSockets = 0;
    server.on('connection', () => netSockets++);
    const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
    await until(() => handles.length === 1);
    const h = handles[0];
    const buf = Buffer.alloc(16);
    let got = '';
    h.useUserBuffer(buf);
    h.onread = function () {
      const n = readResult();
      if (n > 0) got += buf.subarray(0, n).toString();
      return undefined;
    };
    assert.equal(h.readStart(), 0);
    client.write('ping');
    await until(() => got === 'ping');
    assert.equal(netSockets, 0, 'net.Server never wrapped it in a net.Socket');
    assert.equal(peerOf(h).port, client.localPort);
    h.close();
    client.destroy();
  } finally {
    server.close();
  }
});
