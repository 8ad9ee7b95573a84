// The seam between the server and a relay: how connections are accepted and opened. Two
// implementations: native (libuv handles, ./native/) and portable (net.Socket, ./portable/). The
// server, the routing decision and the accounting are the same for both.
import type net from 'node:net';
import type { ClientPeer, ConnectionHost, RelayConnection } from './connection-host.ts';

export interface Transport<A> {
  readonly name: 'native' | 'portable';
  /** A listening server as this relay wants it (options that only creation can set). */
  createServer(): net.Server;
  /**
   * Takes over the connections `server` accepts: each goes to `onAccept`, accept errors still to
   * the server's 'error' event. Returns why it cannot, or null.
   */
  takeAccepts(server: net.Server, onAccept: (accepted: A) => void, keepaliveMs: number): string | null;
  /** A new keepalive setting for the connections `server` accepts from now on. */
  setKeepalive(server: net.Server, keepaliveMs: number): void;
  /** The client's address, or ip '' when it is gone already. */
  peer(accepted: A): ClientPeer;
  /** Closes an accepted connection that is not admitted. */
  close(accepted: A): void;
  /** Starts the connection: read the ClientHello, route, dial, relay. */
  open(host: ConnectionHost, accepted: A, peer: ClientPeer | null, counted: boolean): RelayConnection;
}
