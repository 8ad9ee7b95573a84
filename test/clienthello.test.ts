// The ClientHello reader: real hellos from Chromium, node:tls and openssl, any segmentation, any
// record split, hostile input. Pure functions: no sockets needed.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { ClientHelloReader, type HelloVerdict, readClientHello } from '../src/router/clienthello.ts';
import {
  buildHello, captureNodeHello, captureOpensslHello, chromiumHttps, chromiumTurn, cut, ext, handshakeBytes, toRecords,
} from './support/hellos.ts';

function feed(pieces: readonly Buffer[], max = 16384): { verdict: HelloVerdict | null; consumedPieces: number } {
  const reader = new ClientHelloReader(max);
  for (let i = 0; i < pieces.length; i++) {
    const v = reader.push(pieces[i]);
    if (v !== null) return { verdict: v, consumedPieces: i + 1 };
  }
  return { verdict: null, consumedPieces: pieces.length };
}

function hello(v: HelloVerdict | null) {
  assert.ok(v !== null, 'expected a verdict');
  assert.equal(v.kind, 'hello', v.kind === 'failure' ? `${v.reason}: ${v.detail}` : '');
  return (v as Extract<HelloVerdict, { kind: 'hello' }>).hello;
}

function failureReason(v: HelloVerdict | null): string {
  assert.ok(v !== null, 'expected a verdict');
  assert.equal(v.kind, 'failure');
  return (v as Extract<HelloVerdict, { kind: 'failure' }>).reason;
}

describe('real ClientHellos', () => {
  test('Chromium HTTPS hello (post-quantum, 1.9 KB): SNI and ALPN h2, http/1.1', () => {
    const h = hello(readClientHello(chromiumHttps()));
    assert.equal(h.sni, 'cdn.example.com');
    assert.deepEqual(h.alpn, ['h2', 'http/1.1']);
    assert.ok(h.helloBytes > 1500, `hello is ${h.helloBytes} bytes`);
  });

  test('Chromium WebRTC TURN hello: SNI and no ALPN extension at all', () => {
    const h = hello(readClientHello(chromiumTurn()));
    assert.equal(h.sni, 'cdn.example.com');
    assert.equal(h.alpn, null);
  });

  test('node:tls hellos with and without SNI and ALPN', async () => {
    const a = hello(readClientHello(await captureNodeHello('Turn.Example.COM', ['h2'])));
    assert.equal(a.sni, 'turn.example.com');
    assert.deepEqual(a.alpn, ['h2']);
    const b = hello(readClientHello(await captureNodeHello(undefined)));
    assert.equal(b.sni, null);
    assert.equal(b.alpn, null);
  });

  test('openssl s_client hellos with and without SNI', async () => {
    const a = hello(readClientHello(await captureOpensslHello('cdn.example.com', 'h2,http/1.1')));
    assert.equal(a.sni, 'cdn.example.com');
    assert.deepEqual(a.alpn, ['h2', 'http/1.1']);
    const b = hello(readClientHello(await captureOpensslHello(null)));
    assert.equal(b.sni, null);
  });

  test('the verdict comes with the last byte of the hello, never later', () => {
    for (const flight of [chromiumHttps(), chromiumTurn()]) {
      const hs = handshakeBytes(flight);
      // Bytes after the hello (another record) must not be needed: the verdict comes at the hello's last byte.
      const withTrailer = Buffer.concat([flight, Buffer.from([0x17, 3, 3, 0, 5, 1, 2, 3, 4, 5])]);
      const oneByte = [...withTrailer].map((b) => Buffer.from([b]));
      const { verdict, consumedPieces } = feed(oneByte);
      hello(verdict);
      // One record here: header (5) + handshake bytes.
      assert.equal(consumedPieces, 5 + hs.length);
    }
  });
});

describe('segmentation and records', () => {
  test('one byte per read gives the same result', () => {
    const flight = chromiumHttps();
    const { verdict } = feed([...flight].map((b) => Buffer.from([b])));
    assert.deepEqual(hello(verdict), hello(readClientHello(flight)));
  });

  test('a hello re-split into many TLS records (one byte each, fragmentation tools) parses the same', () => {
    const flight = chromiumHttps();
    const hs = handshakeBytes(flight);
    const tiny = toRecords(hs, new Array(hs.length).fill(1));
    assert.equal(tiny.length, hs.length * 6);
    assert.deepEqual(hello(readClientHello(tiny)), hello(readClientHello(flight)));
    // SNI split across the first record boundary, as sing-box / ByeDPI do.
    const split = toRecords(hs, [50, 7, 300]);
    assert.deepEqual(hello(readClientHello(split)), hello(readClientHello(flight)));
  });

  test('property: any cut of a valid hello into segments and records parses to the same result', () => {
    const flights = [chromiumHttps(), chromiumTurn(), buildHello({ sni: 'a.example.org', alpn: ['x', 'y'] })];
    fc.assert(fc.property(
      fc.integer({ min: 0, max: flights.length - 1 }),
      fc.array(fc.integer({ min: 1, max: 400 }), { maxLength: 40 }),
      fc.array(fc.integer({ min: 1, max: 12000 }), { maxLength: 60 }),
      (which, recordSizes, cutPoints) => {
        const flight = flights[which];
        const expected = hello(readClientHello(flight));
        const records = toRecords(handshakeBytes(flight), recordSizes);
        const { verdict, consumedPieces } = feed(cut(records, cutPoints));
        const got = hello(verdict);
        assert.deepEqual({ sni: got.sni, alpn: got.alpn }, { sni: expected.sni, alpn: expected.alpn });
        assert.equal(consumedPieces, cut(records, cutPoints).length, 'verdict only once the last byte arrived');
      },
    ), { numRuns: 300 });
  });

  test('property: random bytes never throw and never need more than the cap allows', () => {
    fc.assert(fc.property(fc.uint8Array({ minLength: 0, maxLength: 3000 }), fc.array(fc.integer({ min: 1, max: 3000 }), { maxLength: 20 }), (bytes, cuts) => {
      const buf = Buffer.from(bytes);
      const reader = new ClientHelloReader(2048);
      for (const piece of cut(buf, cuts)) {
        const v = reader.push(piece);
        if (v !== null) return;
      }
    }), { numRuns: 2000 });
  });

  test('property: random bytes behind a valid record header never throw, and a cap bounds the wait', () => {
    fc.assert(fc.property(fc.uint8Array({ minLength: 0, maxLength: 5000 }), (bytes) => {
      const buf = Buffer.concat([Buffer.from([22, 3, 1]), Buffer.from(bytes)]);
      const reader = new ClientHelloReader(1024);
      const v = reader.push(buf);
      // Whatever it says, it must have said it by 6 × (cap + header) bytes: zero-length records are refused.
      if (v === null) assert.ok(buf.length < 6 * (1024 + 4) + 5);
    }), { numRuns: 2000 });
  });

  test('property: a mutated real hello never throws', () => {
    const flight = chromiumHttps();
    fc.assert(fc.property(fc.array(fc.tuple(fc.integer({ min: 0, max: flight.length - 1 }), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 8 }), (muts) => {
      const b = Buffer.from(flight);
      for (const [i, v] of muts) b[i] = v;
      readClientHello(b);
    }), { numRuns: 3000 });
  });
});

describe('classification', () => {
  test('an HTTP request is not_tls at its first byte', () => {
    const reader = new ClientHelloReader(16384);
    assert.equal(failureReason(reader.push(Buffer.from('G'))), 'not_tls');
  });

  test('a handshake byte without a TLS version is not_tls', () => {
    assert.equal(failureReason(readClientHello(Buffer.from([22, 9, 9]))), 'not_tls');
  });

  test('a hello larger than max_client_hello_bytes is too_large as soon as its header says so', () => {
    const big = buildHello({ sni: 'x.example.com', padding: 6000 });
    const reader = new ClientHelloReader(4096);
    // Record header (5) + handshake header (4) are enough to know.
    assert.equal(reader.push(big.subarray(0, 8)), null);
    assert.equal(failureReason(reader.push(big.subarray(8, 9))), 'too_large');
  });

  test('a hello up to the cap is accepted, across records bigger than one', () => {
    const h = buildHello({ sni: 'big.example.com', alpn: ['h2'], padding: 15000 });
    assert.equal(hello(readClientHello(h, 16384)).sni, 'big.example.com');
  });

  test('a non-ClientHello handshake message, an alert record, a zero-length record are malformed', () => {
    assert.equal(failureReason(readClientHello(Buffer.from([22, 3, 1, 0, 4, 2, 0, 0, 0]))), 'malformed');
    const flight = chromiumHttps();
    const alertFirst = Buffer.concat([toRecords(handshakeBytes(flight).subarray(0, 10), [10]), Buffer.from([21, 3, 3, 0, 2, 2, 40])]);
    assert.equal(failureReason(readClientHello(alertFirst)), 'malformed');
    assert.equal(failureReason(readClientHello(Buffer.from([22, 3, 1, 0, 0]))), 'malformed');
  });

  test('truncated vectors inside the hello are malformed and name the field', () => {
    const flight = buildHello({ sni: 'a.example.com' });
    const hs = handshakeBytes(flight);
    // Claim a longer cipher suite list than the body holds.
    const bad = Buffer.from(hs);
    bad.writeUInt16BE(0xfff0, 4 + 2 + 32 + 1);
    const v = readClientHello(toRecords(bad, [bad.length]));
    assert.ok(v !== null && v.kind === 'failure');
    assert.equal(v.reason, 'malformed');
    assert.match(v.detail, /cipher_suites/);
  });

  test('SNI: lowercased, one trailing dot removed; invalid names and two host names are malformed', () => {
    assert.equal(hello(readClientHello(buildHello({ sni: 'CDN.Example.com.' }))).sni, 'cdn.example.com');
    assert.equal(failureReason(readClientHello(buildHello({ sni: 'bad name' }))), 'malformed');
    assert.equal(failureReason(readClientHello(buildHello({ sni: 'x\u0000.com' }))), 'malformed');
    const twoNames = ext(0, Buffer.from([0, 8, 0, 0, 1, 0x61, 0, 0, 1, 0x62]));
    const v = readClientHello(buildHello({ sni: null, extra: [twoNames] }));
    assert.equal(failureReason(v), 'malformed');
    assert.match((v as { detail: string }).detail, /more than one host_name/);
  });

  test('GREASE ALPN values are ignored; only-GREASE counts as no protocol', () => {
    const h = hello(readClientHello(buildHello({ sni: 'a.b', alpn: ['\u001a\u001a', 'h2'] })));
    assert.deepEqual(h.alpn, ['h2']);
    assert.deepEqual(hello(readClientHello(buildHello({ sni: 'a.b', alpn: ['\u00fa\u00fa'] }))).alpn, []);
  });

  test('an SSLv2-compatible hello is treated as a hello without SNI', () => {
    const v2 = Buffer.from([0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10]);
    const h = hello(readClientHello(v2));
    assert.equal(h.sni, null);
  });

  test('a hello without any extensions (old TLS) has no SNI and no ALPN', () => {
    const body = Buffer.concat([Buffer.from([3, 1]), Buffer.alloc(32), Buffer.from([0, 0, 2, 0, 0x2f, 1, 0])]);
    const hs = Buffer.concat([Buffer.from([1, 0, 0, body.length]), body]);
    const h = hello(readClientHello(toRecords(hs, [hs.length])));
    assert.deepEqual({ sni: h.sni, alpn: h.alpn }, { sni: null, alpn: null });
  });

  test('16,000 one-byte records of a hostile trickle cost linear work (no re-parse per byte)', () => {
    // 16,000 one-byte records: a quadratic reader would do ~10^8 steps here; this must be instant.
    const hs = handshakeBytes(buildHello({ sni: 'slow.example.com', padding: 15000 }));
    const records = toRecords(hs, new Array(hs.length).fill(1));
    const reader = new ClientHelloReader(16384);
    let v: HelloVerdict | null = null;
    for (let i = 0; i < records.length && v === null; i++) v = reader.push(records.subarray(i, i + 1));
    assert.equal(hello(v).sni, 'slow.example.com');
  });
});
