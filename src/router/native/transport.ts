// The native relay as the server sees it: accepted libuv handles, taken from the listening
// net.Server before it wraps them in net.Sockets.
import net from 'node:net';
import type { Transport } from '../transport.ts';
import { NativeConnection, clientPeer } from './connection.ts';
import { OPTIONS_INHERITED, type TcpHandle, listenerHandle, takeAccepts } from './handles.ts';

function setListenerKeepalive(handle: TcpHandle, keepaliveMs: number): boolean {
  return handle.setKeepAlive(keepaliveMs > 0, Math.max(1, Math.round(keepaliveMs / 1000))) === 0;
}

export const nativeTransport: Transport<TcpHandle> = {
  name: 'native',
  // Only for listening: accepted handles never become net.Sockets.
  createServer: () => net.createServer(),
  takeAccepts(server, onAccept, keepaliveMs) {
    const handle = listenerHandle(server);
    if (handle === null || !takeAccepts(server, onAccept)) {
      return `this Node.js (${process.version}) has no net.Server accept callback to take over`;
    }
    // Linux copies TCP_NODELAY and keepalive from the listening socket to each accepted one: one
    // setsockopt here instead of one per connection. Elsewhere each connection sets them.
    if (OPTIONS_INHERITED && (handle.setNoDelay(true) !== 0 || !setListenerKeepalive(handle, keepaliveMs))) {
      return 'cannot set TCP_NODELAY or keepalive on the listening socket';
    }
    return null;
  },
  setKeepalive(server, keepaliveMs) {
    const handle = listenerHandle(server);
    if (handle !== null && OPTIONS_INHERITED) setListenerKeepalive(handle, keepaliveMs);
  },
  peer: clientPeer,
  close: (handle) => handle.close(),
  open: (host, handle, peer, counted) => new NativeConnection(host, handle, peer, counted),
};
