// The portable relay as the server sees it: net.Socket connections from net.Server's own accepts,
// half-open allowed (a FIN one way is forwarded, the other direction goes on).
import net from 'node:net';
import type { Transport } from '../transport.ts';
import { PortableConnection, socketPeer } from './connection.ts';

export const portableTransport: Transport<net.Socket> = {
  name: 'portable',
  createServer: () => net.createServer({ allowHalfOpen: true, noDelay: true }),
  takeAccepts(server, onAccept) {
    server.on('connection', onAccept);
    return null;
  },
  // Each connection sets its own keepalive from the settings it starts with.
  setKeepalive() {},
  peer: socketPeer,
  close: (s) => s.destroy(),
  open: (host, s, peer, counted) => new PortableConnection(host, s, peer, counted),
};
