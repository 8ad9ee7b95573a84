// Node's internals, fenced: libuv's TCP handles as Node's own `net` module drives them, and the
// accept hook of a listening net.Server. Every slot of Node below its public API that the relay
// touches is named here and nowhere else; test/uv.test.ts pins each behaviour the relay assumes.
//
// Why the relay reaches this low (bench/PROFILE.md has the figures): a relay needs no stream
// machinery (read into a buffer it owns, write what it read, forward a FIN), and net.Socket wraps
// every handle in a Duplex with two stream states, its listeners, a timer and a nextTick or two per
// event. Those were most of the router's CPU per connection and most of its memory per idle relay.
// These are the bindings net.Socket itself is built on (`lib/net.js`), reached through
// `process.binding`, which Node 24 still allows for them (DEP0111 is a documentation deprecation).
//
// Nothing here throws at load: `nativeRelayProblem()` says what is missing, and the server then
// runs the portable relay (public net.Socket API) instead, with a warning.
import type net from 'node:net';
import { getSystemErrorName } from 'node:util';

/** A libuv TCP handle (tcp_wrap's TCP): the methods net.Socket itself calls. */
export interface TcpHandle {
  /**
   * Called with `this` = the handle after each read; the byte count is in readResult(). A Buffer it
   * returns is where the next read lands (with a user buffer, see readInto).
   */
  onread: ((this: TcpHandle, arrayBuffer: ArrayBuffer | undefined) => Uint8Array | undefined) | null;
  readStart(): number;
  readStop(): number;
  useUserBuffer(buf: Uint8Array): void;
  /** 0 when done or queued (lastWriteQueued() says which), else a libuv error. */
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

const HANDLE_METHODS = [
  'readStart', 'readStop', 'useUserBuffer', 'writeBuffer', 'shutdown', 'close', 'setNoDelay', 'setKeepAlive',
  'getpeername', 'getsockname', 'connect', 'connect6',
] as const;

/** Reaches the bindings; returns what is missing instead of them when this Node lacks any. */
function load(): { tcp: TcpWrapBinding; stream: StreamWrapBinding; eof: number } | string {
  try {
    const binding = (process as unknown as { binding?: (name: string) => unknown }).binding;
    if (typeof binding !== 'function') return 'process.binding';
    const tcp = binding('tcp_wrap') as TcpWrapBinding;
    const stream = binding('stream_wrap') as StreamWrapBinding;
    const uv = binding('uv') as { UV_EOF?: unknown };
    if (typeof tcp?.TCP !== 'function' || typeof tcp.TCPConnectWrap !== 'function' || typeof tcp.constants?.SOCKET !== 'number') {
      return 'tcp_wrap.TCP';
    }
    if (typeof stream?.WriteWrap !== 'function' || typeof stream.ShutdownWrap !== 'function' ||
      !(stream.streamBaseState instanceof Int32Array) || typeof stream.kReadBytesOrError !== 'number' ||
      typeof stream.kLastWriteWasAsync !== 'number') {
      return 'stream_wrap.WriteWrap';
    }
    if (typeof uv?.UV_EOF !== 'number') return 'uv.UV_EOF';
    for (const method of HANDLE_METHODS) {
      if (typeof (tcp.TCP.prototype as unknown as Record<string, unknown>)[method] !== 'function') return `TCP.prototype.${method}`;
    }
    return { tcp, stream, eof: uv.UV_EOF };
  } catch (err) {
    return `process.binding (${(err as Error).message})`;
  }
}

const loaded = load();
const bindings = typeof loaded === 'string' ? null : loaded;

/**
 * Why the native relay cannot run on this Node (what it lacks), or null when it can. The server
 * then runs the portable relay.
 */
export function nativeRelayProblem(): string | null {
  return typeof loaded === 'string' ? `this Node.js (${process.version}) lacks ${loaded}, which the native relay is built on` : null;
}

function need<T>(v: T | undefined): T {
  if (v === undefined) throw new Error(nativeRelayProblem() ?? 'native relay unavailable');
  return v;
}

/** A new TCP handle for an outgoing connection. */
export function newTcpHandle(): TcpHandle {
  const b = need(bindings ?? undefined);
  return new b.tcp.TCP(b.tcp.constants.SOCKET);
}

export function newConnectRequest(): ConnectRequest {
  return new (need(bindings ?? undefined).tcp.TCPConnectWrap)();
}

export function newWriteRequest(): WriteRequest {
  return new (need(bindings ?? undefined).stream.WriteWrap)();
}

/** A shutdown (FIN after every queued write); without `oncomplete` nothing is called when it is done. */
export function newShutdownRequest(): ShutdownRequest {
  return new (need(bindings ?? undefined).stream.ShutdownWrap)();
}

/**
 * Written by libuv's callbacks and by each write, read right after, before anything else runs.
 * A one-element stand-in when the bindings are missing (nothing reads it then).
 */
const streamState = bindings?.stream.streamBaseState ?? new Int32Array(2);
const READ_BYTES = bindings?.stream.kReadBytesOrError ?? 0;
const LAST_WRITE_WAS_ASYNC = bindings?.stream.kLastWriteWasAsync ?? 1;

/** In onread: the byte count of the read, or a negative libuv error (UV_EOF at the end). */
export function readResult(): number {
  return streamState[READ_BYTES];
}

/** Right after a writeBuffer that returned 0: whether libuv queued it (else it was written whole). */
export function lastWriteQueued(): boolean {
  return streamState[LAST_WRITE_WAS_ASYNC] !== 0;
}

export const UV_EOF = bindings?.eof ?? -4095;

/**
 * Linux copies TCP_NODELAY and the keepalive settings (SO_KEEPALIVE, TCP_KEEPIDLE and the probe
 * interval and count) from a listening socket to the sockets it accepts, and starts the keepalive
 * timer of each: set once on the listener, they cost nothing per connection.
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

/** The local end of a handle ({} when it has none). */
export function localOf(handle: TcpHandle): SocketAddress {
  const out: SocketAddress = {};
  handle.getsockname(out);
  return out;
}

type OnConnection = (this: unknown, err: number, clientHandle?: unknown) => void;
type ServerHandle = TcpHandle & { onconnection?: OnConnection };

/** The libuv handle of a listening net.Server (its `_handle`), or null. */
export function listenerHandle(server: net.Server): TcpHandle | null {
  const h = (server as unknown as { _handle?: ServerHandle | null })._handle;
  return h == null ? null : h;
}

/**
 * Takes over a listening net.Server's accept callback: each accepted libuv handle goes to
 * `onHandle` as it is (net.Server's own callback would wrap it in a net.Socket). Accept errors
 * still go through net.Server ('error' event). Returns false when this server has no accept
 * callback to take over.
 */
export function takeAccepts(server: net.Server, onHandle: (handle: TcpHandle) => void): boolean {
  const handle = (server as unknown as { _handle?: ServerHandle | null })._handle;
  const original = handle?.onconnection;
  if (handle == null || typeof original !== 'function') return false;
  handle.onconnection = (err: number, clientHandle?: unknown) => {
    if (err !== 0 || clientHandle == null) original.call(handle, err, clientHandle);
    else onHandle(clientHandle as TcpHandle);
  };
  return true;
}
