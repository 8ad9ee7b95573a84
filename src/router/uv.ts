// libuv's TCP handles as Node's own `net` module drives them, for the relay (connection.ts).
//
// A relay needs no stream machinery: read into a buffer it owns, write what it read, forward a
// FIN. net.Socket wraps every handle in a Duplex with two stream states, its listeners, a timer
// and a process.nextTick or two per event, which measured as most of the router's CPU per
// connection and most of its memory per idle relay (bench/PROFILE.md). These are the bindings
// net.Socket itself is built on (`lib/net.js`), reached through `process.binding`, which Node 24
// still allows for them. They are internal, and Node is pinned (package.json) so they are known:
// everything used is checked here at load, and a Node without it fails at once, with a message,
// rather than serve with a relay that cannot read or write.
import { getSystemErrorName } from 'node:util';

/** A libuv TCP handle (tcp_wrap's TCP): the methods net.Socket itself calls. */
export interface TcpHandle {
  /**
   * Called with `this` = the handle after each read; the byte count is in streamState[READ_BYTES].
   * A Buffer it returns is where the next read lands (with a user buffer, see useUserBuffer).
   */
  onread: ((this: TcpHandle, arrayBuffer: ArrayBuffer | undefined) => Uint8Array | undefined) | null;
  readStart(): number;
  readStop(): number;
  /** Reads land in this buffer from now on (no allocation per read). */
  useUserBuffer(buf: Uint8Array): void;
  /** 0 when done or queued (streamState[lastWriteWasAsync] says which), else a libuv error. */
  writeBuffer(req: WriteRequest, buf: Uint8Array): number;
  shutdown(req: ShutdownRequest): number;
  close(callback?: () => void): void;
  setNoDelay(enable: boolean): number;
  /** SO_KEEPALIVE, with TCP_KEEPIDLE = delay seconds (libuv also sets 1 s between 10 probes). */
  setKeepAlive(enable: boolean, delaySeconds: number): number;
  getpeername(out: SocketAddress): number;
  getsockname(out: SocketAddress): number;
  connect(req: ConnectRequest, address: string, port: number): number;
  connect6(req: ConnectRequest, address: string, port: number): number;
  /** Bytes handed to libuv and not yet written. */
  readonly writeQueueSize: number;
}

export interface SocketAddress {
  address?: string;
  family?: string;
  port?: number;
}

/** The callbacks are called with `this` = the request, which callers extend with their own fields. */
export interface WriteRequest {
  oncomplete: ((this: never, status: number) => void) | null;
}
export interface ShutdownRequest {
  /** Optional: without it, Node calls nothing when the shutdown is done. */
  oncomplete?: ((this: never, status: number) => void) | null;
}
export interface ConnectRequest {
  oncomplete: ((this: never, status: number, handle: TcpHandle) => void) | null;
}

interface TcpWrapBinding {
  TCP: new (type: number) => TcpHandle;
  TCPConnectWrap: new () => ConnectRequest;
  constants: { SOCKET: number };
}
interface StreamWrapBinding {
  WriteWrap: new () => WriteRequest;
  ShutdownWrap: new () => ShutdownRequest;
  streamBaseState: Int32Array;
  kReadBytesOrError: number;
  kLastWriteWasAsync: number;
}
interface UvBinding {
  UV_EOF: number;
}

function need(ok: boolean, what: string): void {
  if (!ok) throw new Error(`this Node.js (${process.version}) lacks ${what}, which the relay is built on; run the pinned Node 24 (npm ci)`);
}

const binding = (process as unknown as { binding(name: string): unknown }).binding;
need(typeof binding === 'function', 'process.binding');
const tcpWrap = binding('tcp_wrap') as TcpWrapBinding;
const streamWrap = binding('stream_wrap') as StreamWrapBinding;
const uv = binding('uv') as UvBinding;
need(typeof tcpWrap.TCP === 'function' && typeof tcpWrap.TCPConnectWrap === 'function' && typeof tcpWrap.constants?.SOCKET === 'number',
  'tcp_wrap.TCP');
need(typeof streamWrap.WriteWrap === 'function' && typeof streamWrap.ShutdownWrap === 'function' &&
  streamWrap.streamBaseState instanceof Int32Array && typeof streamWrap.kReadBytesOrError === 'number' &&
  typeof streamWrap.kLastWriteWasAsync === 'number', 'stream_wrap.WriteWrap');
need(typeof uv.UV_EOF === 'number', 'uv.UV_EOF');
for (const method of ['readStart', 'readStop', 'useUserBuffer', 'writeBuffer', 'shutdown', 'close', 'setNoDelay', 'setKeepAlive', 'getpeername',
  'getsockname', 'connect', 'connect6'] as const) {
  need(typeof (tcpWrap.TCP.prototype as unknown as Record<string, unknown>)[method] === 'function', `TCP.prototype.${method}`);
}

export const TCP = tcpWrap.TCP;
export const TCP_SOCKET = tcpWrap.constants.SOCKET;
export const ConnectWrap = tcpWrap.TCPConnectWrap;
export const WriteWrap = streamWrap.WriteWrap;
export const ShutdownWrap = streamWrap.ShutdownWrap;
/**
 * Written by libuv's callbacks and by each write, read right after, before anything else runs:
 * after a read, streamState[READ_BYTES] is the byte count or a negative libuv error (UV_EOF at end).
 */
export const streamState = streamWrap.streamBaseState;
export const READ_BYTES = streamWrap.kReadBytesOrError;
export const LAST_WRITE_WAS_ASYNC = streamWrap.kLastWriteWasAsync;
export const UV_EOF = uv.UV_EOF;

/**
 * Linux copies TCP_NODELAY and the keepalive settings (SO_KEEPALIVE, TCP_KEEPIDLE and the probe
 * interval and count) from a listening socket to the sockets it accepts, and starts the keepalive
 * timer of each: set once on the listener, they cost nothing per connection (`ss -to` shows the
 * accepted sockets' keepalive timers).
 */
export const OPTIONS_INHERITED = process.platform === 'linux';

/** "ECONNRESET" for a libuv error number. */
export function errorName(code: number): string {
  try {
    return getSystemErrorName(code);
  } catch {
    return `E${-code}`;
  }
}

/** The remote end of a handle ({} when it is not connected, or closed). */
export function peerOf(handle: TcpHandle): SocketAddress {
  const out: SocketAddress = {};
  handle.getpeername(out);
  return out;
}
