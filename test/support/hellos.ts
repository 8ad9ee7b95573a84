// Real ClientHellos for tests: the Chromium captures in test/fixtures, and hellos captured at
// test time from node:tls and openssl s_client. Plus tools to re-cut a hello into TLS records.
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';
import { FIXTURES } from '../helpers.ts';

export const chromiumHttps = (): Buffer => readFileSync(join(FIXTURES, 'chromium-https-clienthello.bin'));
export const chromiumTurn = (): Buffer => readFileSync(join(FIXTURES, 'chromium-webrtc-turn-clienthello.bin'));

/** Listens once, returns the first flight a client sends (the bytes until it goes quiet for 200 ms). */
async function captureFirstFlight(connect: (port: number) => () => void): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const server = net.createServer((s) => {
      const got: Buffer[] = [];
      let timer: NodeJS.Timeout | null = null;
      s.on('data', (d) => {
        got.push(d);
        if (timer) clearTimeout(timer);
        timer = setTimeout(() => {
          s.destroy();
          server.close();
          stop();
          resolve(Buffer.concat(got));
        }, 200);
      });
      s.on('error', () => {});
    });
    let stop: () => void = () => {};
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      stop = connect((server.address() as net.AddressInfo).port);
    });
  });
}

export function captureNodeHello(servername: string | undefined, alpn?: string[]): Promise<Buffer> {
  return captureFirstFlight((port) => {
    const s = tls.connect({ host: '127.0.0.1', port, servername, ALPNProtocols: alpn, rejectUnauthorized: false });
    s.on('error', () => {});
    return () => s.destroy();
  });
}

export function captureOpensslHello(servername: string | null, alpn?: string): Promise<Buffer> {
  return captureFirstFlight((port) => {
    const args = ['s_client', '-connect', `127.0.0.1:${port}`];
    if (servername === null) args.push('-noservername');
    else args.push('-servername', servername);
    if (alpn !== undefined) args.push('-alpn', alpn);
    const child = spawn('openssl', args, { stdio: ['pipe', 'ignore', 'ignore'] });
    child.on('error', () => {});
    return () => child.kill('SIGKILL');
  });
}

/** The handshake bytes carried by a sequence of TLS records (record headers removed). */
export function handshakeBytes(flight: Buffer): Buffer {
  const parts: Buffer[] = [];
  let off = 0;
  while (off + 5 <= flight.length) {
    const len = flight.readUInt16BE(off + 3);
    parts.push(flight.subarray(off + 5, off + 5 + len));
    off += 5 + len;
  }
  return Buffer.concat(parts);
}

/** Wraps handshake bytes into TLS handshake records whose fragments have the given sizes (the last takes the rest). */
export function toRecords(handshake: Buffer, sizes: readonly number[]): Buffer {
  const out: Buffer[] = [];
  let off = 0;
  let i = 0;
  while (off < handshake.length) {
    const want = i < sizes.length ? Math.max(1, sizes[i]) : handshake.length - off;
    const n = Math.min(want, handshake.length - off, 16384);
    const header = Buffer.from([22, 3, 1, 0, 0]);
    header.writeUInt16BE(n, 3);
    out.push(header, handshake.subarray(off, off + n));
    off += n;
    i++;
  }
  return Buffer.concat(out);
}

/** Cuts bytes into consecutive segments at the given cut points. */
export function cut(bytes: Buffer, points: readonly number[]): Buffer[] {
  const sorted = [...new Set(points.filter((p) => p > 0 && p < bytes.length))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const p of sorted) {
    out.push(bytes.subarray(prev, p));
    prev = p;
  }
  out.push(bytes.subarray(prev));
  return out;
}

/**
 * Builds a minimal well-formed ClientHello first flight with the given SNI and ALPN, for
 * cases no real client sends (several names, GREASE ALPN, huge padding).
 */
export function buildHello(opts: { sni?: string | null; alpn?: string[] | null; extra?: Buffer[]; padding?: number } = {}): Buffer {
  const exts: Buffer[] = [];
  if (opts.sni !== null && opts.sni !== undefined) {
    const name = Buffer.from(opts.sni, 'latin1');
    const entry = Buffer.concat([Buffer.from([0]), u16(name.length), name]);
    exts.push(ext(0, Buffer.concat([u16(entry.length), entry])));
  }
  if (opts.alpn !== null && opts.alpn !== undefined) {
    const list = Buffer.concat(opts.alpn.map((p) => Buffer.concat([Buffer.from([Buffer.byteLength(p, 'latin1')]), Buffer.from(p, 'latin1')])));
    exts.push(ext(16, Buffer.concat([u16(list.length), list])));
  }
  for (const e of opts.extra ?? []) exts.push(e);
  if (opts.padding) exts.push(ext(21, Buffer.alloc(opts.padding)));
  const extBlock = Buffer.concat(exts);
  const body = Buffer.concat([
    Buffer.from([3, 3]), Buffer.alloc(32, 7), Buffer.from([0]), u16(2), Buffer.from([0x13, 0x01]), Buffer.from([1, 0]),
    u16(extBlock.length), extBlock,
  ]);
  const hs = Buffer.concat([Buffer.from([1, (body.length >> 16) & 0xff, (body.length >> 8) & 0xff, body.length & 0xff]), body]);
  return toRecords(hs, [16384]);
}

export function ext(type: number, data: Buffer): Buffer {
  return Buffer.concat([u16(type), u16(data.length), data]);
}

function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}
