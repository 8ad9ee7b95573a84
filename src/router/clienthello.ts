// Reads a TLS ClientHello from the first bytes of a connection without terminating TLS.
//
// Everything here is pure: bytes in, a verdict out, no sockets and no timers. The server feeds
// each chunk it reads to a ClientHelloReader and acts on the first verdict that is not "need more".
//
// The reader assembles the handshake message across any TCP segmentation and across several TLS
// records (RFC 8446 §5.1 allows a handshake message to span records, and anti-censorship tools
// fragment the hello on purpose). It never throws, and it never asks for more bytes than a
// well-formed hello needs: the verdict comes as soon as the last byte of the ClientHello message
// arrives. Bytes after that (the rest of the last record, early data) are not looked at; the
// backend's own TLS stack, which sees every byte, is the strict parser.

/** Why a connection's first bytes did not yield a ClientHello; these are the metric's `reason`. */
export type HelloFailureReason = 'not_tls' | 'malformed' | 'too_large' | 'timeout' | 'closed';

export interface ClientHello {
  /** The host name from server_name, lowercased without one trailing dot; null when absent. */
  readonly sni: string | null;
  /** Protocols offered in ALPN, GREASE removed; null when the extension is absent. */
  readonly alpn: readonly string[] | null;
  /** Size of the ClientHello handshake message, header included. */
  readonly helloBytes: number;
}

export type HelloVerdict =
  | { readonly kind: 'hello'; readonly hello: ClientHello }
  | { readonly kind: 'failure'; readonly reason: HelloFailureReason; readonly detail: string };

const RECORD_HEADER = 5;
const HANDSHAKE_HEADER = 4;
const CONTENT_TYPE_HANDSHAKE = 22;
const HANDSHAKE_CLIENT_HELLO = 1;
const EXT_SERVER_NAME = 0;
const EXT_ALPN = 16;
const SNI_HOST_NAME = 0;
/** TLS records carry at most 2^14 bytes of plaintext (RFC 8446 §5.1). */
const MAX_RECORD_FRAGMENT = 16384;

/** An SSLv2-compatible hello carries no extensions, so no SNI: route it as such. */
const SSLV2_HELLO: ClientHello = Object.freeze({ sni: null, alpn: null, helloBytes: 0 });

const EMPTY = Buffer.alloc(0);

function failure(reason: HelloFailureReason, detail: string): HelloVerdict {
  return { kind: 'failure', reason, detail };
}

/**
 * Incremental ClientHello reader for one connection. Call `push` with each chunk in order; it
 * returns null while more bytes are needed, then a verdict. After a verdict, stop pushing.
 *
 * Cost is linear in the bytes received whatever the segmentation: record headers are walked once,
 * and fragments are copied once, into a buffer sized from the handshake header.
 */
export class ClientHelloReader {
  readonly #maxHelloBytes: number;
  /** Bytes received so far that belong to an incomplete record header or fragment. */
  #pending: Buffer = EMPTY;
  /** Bytes of the record currently being read that are still to come (0 = expecting a header). */
  #recordRemaining = 0;
  /** The handshake message assembled so far, sized once its length is known. */
  #handshake: Buffer | null = null;
  #header: Buffer | null = null;
  #handshakeFill = 0;
  #handshakeTotal = -1;
  #firstByte = true;

  constructor(maxHelloBytes: number) {
    this.#maxHelloBytes = maxHelloBytes;
  }

  push(chunk: Buffer): HelloVerdict | null {
    // The common case: the first chunk holds a whole record that holds the whole ClientHello.
    // It is parsed where it lies, with no reassembly copy; anything else takes the general path.
    if (this.#firstByte && this.#pending.length === 0 && chunk.length >= RECORD_HEADER + HANDSHAKE_HEADER &&
      chunk[0] === CONTENT_TYPE_HANDSHAKE && chunk[1] === 3 && chunk[RECORD_HEADER] === HANDSHAKE_CLIENT_HELLO) {
      const recordLen = chunk.readUInt16BE(3);
      const total = HANDSHAKE_HEADER + chunk.readUIntBE(RECORD_HEADER + 1, 3);
      if (recordLen <= MAX_RECORD_FRAGMENT && total <= recordLen && RECORD_HEADER + recordLen <= chunk.length &&
        total <= this.#maxHelloBytes) {
        this.#firstByte = false;
        return parseClientHelloBody(chunk.subarray(RECORD_HEADER + HANDSHAKE_HEADER, RECORD_HEADER + total), total);
      }
    }
    let data = this.#pending.length === 0 ? chunk : Buffer.concat([this.#pending, chunk]);
    this.#pending = EMPTY;
    if (this.#firstByte && data.length > 0) {
      const early = classifyFirstBytes(data);
      if (early === 'need') {
        // Copied: the caller may reuse its read buffer.
        this.#pending = Buffer.from(data);
        return null;
      }
      if (early !== 'tls') return early;
      this.#firstByte = false;
    }
    let off = 0;
    while (off < data.length) {
      if (this.#recordRemaining === 0) {
        if (data.length - off < RECORD_HEADER) {
          this.#pending = Buffer.from(data.subarray(off));
          return null;
        }
        if (data[off] !== CONTENT_TYPE_HANDSHAKE) {
          return failure('malformed', `record content type ${data[off]} before the ClientHello was complete`);
        }
        if (data[off + 1] !== 3) return failure('malformed', 'record version is not TLS');
        const len = data.readUInt16BE(off + 3);
        // Zero-length handshake fragments are forbidden (RFC 8446 §5.1); they would also let a
        // client stretch the wire size without bound.
        if (len === 0) return failure('malformed', 'empty handshake record');
        if (len > MAX_RECORD_FRAGMENT) return failure('malformed', `record length ${len} exceeds 2^14`);
        this.#recordRemaining = len;
        off += RECORD_HEADER;
        continue;
      }
      const take = Math.min(this.#recordRemaining, data.length - off);
      const verdict = this.#absorb(data, off, take);
      if (verdict !== null) return verdict;
      this.#recordRemaining -= take;
      off += take;
    }
    return null;
  }

  /** Adds fragment bytes to the handshake message; returns a verdict once the message is whole. */
  #absorb(data: Buffer, off: number, len: number): HelloVerdict | null {
    let i = off;
    const end = off + len;
    while (this.#handshakeTotal < 0 && i < end) {
      const header = (this.#header ??= Buffer.alloc(HANDSHAKE_HEADER));
      header[this.#handshakeFill++] = data[i++];
      if (this.#handshakeFill === HANDSHAKE_HEADER) {
        if (header[0] !== HANDSHAKE_CLIENT_HELLO) {
          return failure('malformed', `first handshake message has type ${header[0]}, not ClientHello`);
        }
        const bodyLen = header.readUIntBE(1, 3);
        const total = HANDSHAKE_HEADER + bodyLen;
        if (total > this.#maxHelloBytes) {
          return failure('too_large', `ClientHello of ${total} bytes exceeds max_client_hello_bytes ${this.#maxHelloBytes}`);
        }
        this.#handshakeTotal = total;
        this.#handshake = Buffer.allocUnsafe(total);
        header.copy(this.#handshake, 0);
      }
    }
    if (this.#handshake === null) return null;
    const want = this.#handshakeTotal - this.#handshakeFill;
    const n = Math.min(want, end - i);
    data.copy(this.#handshake, this.#handshakeFill, i, i + n);
    this.#handshakeFill += n;
    if (this.#handshakeFill < this.#handshakeTotal) return null;
    return parseClientHelloBody(this.#handshake.subarray(HANDSHAKE_HEADER), this.#handshakeTotal);
  }
}

/** Decides from the first bytes whether this looks like TLS at all. */
function classifyFirstBytes(data: Buffer): 'tls' | 'need' | HelloVerdict {
  const b0 = data[0];
  if (b0 === CONTENT_TYPE_HANDSHAKE) {
    if (data.length < 2) return 'need';
    return data[1] === 3 ? 'tls' : failure('not_tls', 'handshake byte without a TLS record version');
  }
  // SSLv2-compatible CLIENT-HELLO: a 2-byte length with the top bit set, then message type 1.
  if ((b0 & 0x80) !== 0) {
    if (data.length < 3) return 'need';
    if (data[2] === 1) return { kind: 'hello', hello: SSLV2_HELLO };
  }
  return failure('not_tls', `first byte 0x${b0.toString(16).padStart(2, '0')} is not a TLS handshake record`);
}

/**
 * A cursor over a byte range that reads TLS vectors. Every read checks bounds and reports the
 * field it was reading, so a failure says which part of the hello was wrong.
 */
class Cursor {
  buf: Buffer;
  off: number;
  end: number;
  constructor(buf: Buffer, off: number, end: number) {
    this.buf = buf;
    this.off = off;
    this.end = end;
  }
  get remaining(): number {
    return this.end - this.off;
  }
  skip(n: number, field: string): string | null {
    if (this.remaining < n) return `reading ${field}: truncated`;
    this.off += n;
    return null;
  }
  /** Reads a vector with an n-byte length prefix and returns a cursor over its contents. */
  vector(lenBytes: 1 | 2, field: string): Cursor | string {
    if (this.remaining < lenBytes) return `reading ${field} length: truncated`;
    const len = lenBytes === 1 ? this.buf[this.off] : this.buf.readUInt16BE(this.off);
    const start = this.off + lenBytes;
    if (this.end - start < len) return `reading ${field}: length ${len} runs past its enclosing field`;
    this.off = start + len;
    return new Cursor(this.buf, start, start + len);
  }
  u16(field: string): number | string {
    if (this.remaining < 2) return `reading ${field}: truncated`;
    const v = this.buf.readUInt16BE(this.off);
    this.off += 2;
    return v;
  }
}

/** Parses the body of a ClientHello handshake message (after its 4-byte header). */
export function parseClientHelloBody(body: Buffer, helloBytes: number): HelloVerdict {
  const c = new Cursor(body, 0, body.length);
  let err = c.skip(2, 'ClientHello legacy_version') ?? c.skip(32, 'ClientHello random');
  if (err) return failure('malformed', err);
  const session = c.vector(1, 'ClientHello legacy_session_id');
  if (typeof session === 'string') return failure('malformed', session);
  if (session.remaining > 32) return failure('malformed', 'reading ClientHello legacy_session_id: longer than 32 bytes');
  const suites = c.vector(2, 'ClientHello cipher_suites');
  if (typeof suites === 'string') return failure('malformed', suites);
  if (suites.remaining < 2 || suites.remaining % 2 !== 0) {
    return failure('malformed', 'reading ClientHello cipher_suites: length must be even and non-zero');
  }
  const compression = c.vector(1, 'ClientHello legacy_compression_methods');
  if (typeof compression === 'string') return failure('malformed', compression);
  if (compression.remaining < 1) return failure('malformed', 'reading ClientHello legacy_compression_methods: empty');
  // Before TLS 1.2 the extensions block may be absent altogether: no SNI, no ALPN.
  if (c.remaining === 0) return { kind: 'hello', hello: { sni: null, alpn: null, helloBytes } };
  const exts = c.vector(2, 'ClientHello extensions');
  if (typeof exts === 'string') return failure('malformed', exts);

  let sni: string | null = null;
  let alpn: string[] | null = null;
  let sawSni = false;
  while (exts.remaining > 0) {
    const type = exts.u16('extension type');
    if (typeof type === 'string') return failure('malformed', type);
    const data = exts.vector(2, `extension ${type}`);
    if (typeof data === 'string') return failure('malformed', data);
    if (type === EXT_SERVER_NAME) {
      // A duplicated extension would let the router and the backend disagree on the name.
      if (sawSni) return failure('malformed', 'reading server_name: extension appears twice');
      sawSni = true;
      const r = parseServerName(data);
      if (typeof r !== 'object') return failure('malformed', r);
      sni = r.name;
    } else if (type === EXT_ALPN) {
      if (alpn !== null) return failure('malformed', 'reading ALPN: extension appears twice');
      const r = parseAlpn(data);
      if (typeof r === 'string') return failure('malformed', r);
      alpn = r;
    }
  }
  return { kind: 'hello', hello: { sni, alpn, helloBytes } };
}

function parseServerName(data: Cursor): { name: string | null } | string {
  // An empty server_name extension is what a server sends back; from a client it carries nothing.
  if (data.remaining === 0) return { name: null };
  const list = data.vector(2, 'server_name list');
  if (typeof list === 'string') return list;
  let name: string | null = null;
  while (list.remaining > 0) {
    if (list.remaining < 1) return 'reading server_name type: truncated';
    const nameType = list.buf[list.off];
    list.off += 1;
    const value = list.vector(2, 'server_name host_name');
    if (typeof value === 'string') return value;
    if (nameType !== SNI_HOST_NAME) continue;
    // RFC 6066 §3: at most one name of each type.
    if (name !== null) return 'reading server_name: more than one host_name';
    const r = hostName(value.buf, value.off, value.end);
    if (r === null) return 'reading server_name host_name: not a valid DNS name';
    name = r;
  }
  return { name };
}

/** Validates a host name and returns it lowercased without one trailing dot, or null. */
function hostName(buf: Buffer, start: number, end: number): string | null {
  if (end <= start || end - start > 255) return null;
  for (let i = start; i < end; i++) {
    const b = buf[i];
    // Letters, digits, '-', '.', '_' (seen in real deployments); nothing else can be a DNS name.
    const ok = (b >= 0x61 && b <= 0x7a) || (b >= 0x41 && b <= 0x5a) || (b >= 0x30 && b <= 0x39) ||
      b === 0x2d || b === 0x2e || b === 0x5f;
    if (!ok) return null;
  }
  let name = buf.toString('latin1', start, end).toLowerCase();
  if (name.endsWith('.')) name = name.slice(0, -1);
  return name.length === 0 ? null : name;
}

function parseAlpn(data: Cursor): string[] | string {
  const list = data.vector(2, 'ALPN protocol_name_list');
  if (typeof list === 'string') return list;
  if (list.remaining === 0) return 'reading ALPN protocol_name_list: empty';
  const out: string[] = [];
  while (list.remaining > 0) {
    const proto = list.vector(1, 'ALPN protocol name');
    if (typeof proto === 'string') return proto;
    if (proto.remaining === 0) return 'reading ALPN protocol name: empty';
    if (isGreaseAlpn(proto.buf, proto.off, proto.remaining)) continue;
    out.push(proto.buf.toString('latin1', proto.off, proto.end));
  }
  return out;
}

/** RFC 8701 reserves two-byte ALPN identifiers 0x?A?A with equal bytes as GREASE. */
function isGreaseAlpn(buf: Buffer, off: number, len: number): boolean {
  return len === 2 && buf[off] === buf[off + 1] && (buf[off] & 0x0f) === 0x0a;
}

/** Convenience for tests and tools: parse a complete first flight in one call. */
export function readClientHello(bytes: Buffer, maxHelloBytes = 16384): HelloVerdict | null {
  return new ClientHelloReader(maxHelloBytes).push(bytes);
}
