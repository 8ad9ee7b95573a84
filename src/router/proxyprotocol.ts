// PROXY protocol headers (HAProxy's proxy-protocol.txt, versions 1 and 2), sent to a backend before
// the client's bytes so that it sees the real client address instead of the router's.
import { isIPv4, isIPv6 } from 'node:net';
import type { ProxyProtocol } from '../model/route.ts';

export interface Endpoints {
  readonly srcAddr: string;
  readonly srcPort: number;
  readonly dstAddr: string;
  readonly dstPort: number;
}

const V2_SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
const V2_PROXY_CMD = 0x21; // version 2, command PROXY
const V2_LOCAL_CMD = 0x20; // version 2, command LOCAL
const V2_TCP4 = 0x11;
const V2_TCP6 = 0x21;

/** "::ffff:1.2.3.4" (an IPv4 client on a dual-stack socket) is sent as the IPv4 address it is. */
export function unmapIPv4(addr: string): string {
  return addr.startsWith('::ffff:') && isIPv4(addr.slice(7)) ? addr.slice(7) : addr;
}

export function proxyHeader(version: ProxyProtocol, ep: Endpoints): Buffer {
  return version === 'v1' ? proxyV1(ep) : proxyV2(ep);
}

export function proxyV1(ep: Endpoints): Buffer {
  const src = unmapIPv4(ep.srcAddr);
  const dst = unmapIPv4(ep.dstAddr);
  if (isIPv4(src) && isIPv4(dst)) return Buffer.from(`PROXY TCP4 ${src} ${dst} ${ep.srcPort} ${ep.dstPort}\r\n`, 'latin1');
  if (isIPv6(src) || isIPv6(dst)) {
    return Buffer.from(`PROXY TCP6 ${toV6(src)} ${toV6(dst)} ${ep.srcPort} ${ep.dstPort}\r\n`, 'latin1');
  }
  return Buffer.from('PROXY UNKNOWN\r\n', 'latin1');
}

export function proxyV2(ep: Endpoints): Buffer {
  const src = unmapIPv4(ep.srcAddr);
  const dst = unmapIPv4(ep.dstAddr);
  if (isIPv4(src) && isIPv4(dst)) {
    const out = Buffer.alloc(16 + 12);
    V2_SIGNATURE.copy(out, 0);
    out[12] = V2_PROXY_CMD;
    out[13] = V2_TCP4;
    out.writeUInt16BE(12, 14);
    writeV4(out, 16, src);
    writeV4(out, 20, dst);
    out.writeUInt16BE(ep.srcPort, 24);
    out.writeUInt16BE(ep.dstPort, 26);
    return out;
  }
  if ((isIPv6(src) || isIPv4(src)) && (isIPv6(dst) || isIPv4(dst))) {
    const out = Buffer.alloc(16 + 36);
    V2_SIGNATURE.copy(out, 0);
    out[12] = V2_PROXY_CMD;
    out[13] = V2_TCP6;
    out.writeUInt16BE(36, 14);
    writeV6(out, 16, toV6(src));
    writeV6(out, 32, toV6(dst));
    out.writeUInt16BE(ep.srcPort, 48);
    out.writeUInt16BE(ep.dstPort, 50);
    return out;
  }
  // Addresses we cannot express (should not happen on TCP): LOCAL, so the backend uses its own view.
  const out = Buffer.alloc(16);
  V2_SIGNATURE.copy(out, 0);
  out[12] = V2_LOCAL_CMD;
  out[13] = 0;
  out.writeUInt16BE(0, 14);
  return out;
}

function toV6(addr: string): string {
  return isIPv4(addr) ? `::ffff:${addr}` : addr;
}

function writeV4(out: Buffer, off: number, addr: string): void {
  const parts = addr.split('.');
  for (let i = 0; i < 4; i++) out[off + i] = Number(parts[i]);
}

/** Writes an IPv6 address (any textual form, including an embedded IPv4 tail) as 16 bytes. */
export function writeV6(out: Buffer, off: number, addr: string): void {
  let text = addr;
  const zone = text.indexOf('%');
  if (zone >= 0) text = text.slice(0, zone);
  const words: number[] = [];
  const tail = text.lastIndexOf(':');
  if (isIPv4(text.slice(tail + 1))) {
    const v4 = text.slice(tail + 1).split('.').map(Number);
    text = `${text.slice(0, tail + 1)}${((v4[0] << 8) | v4[1]).toString(16)}:${((v4[2] << 8) | v4[3]).toString(16)}`;
  }
  const [head, rest] = text.split('::');
  const headWords = head === '' ? [] : head.split(':');
  const restWords = rest === undefined || rest === '' ? [] : rest.split(':');
  const fill = rest === undefined ? 0 : 8 - headWords.length - restWords.length;
  for (const w of headWords) words.push(parseInt(w, 16));
  for (let i = 0; i < fill; i++) words.push(0);
  for (const w of restWords) words.push(parseInt(w, 16));
  for (let i = 0; i < 8; i++) out.writeUInt16BE(words[i] ?? 0, off + i * 2);
}
