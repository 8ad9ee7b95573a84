// Admin HTTP: /metrics, /healthz, /readyz, /routes, /version. Bound to loopback unless the operator writes
// another address. It serves reads only; nothing here changes the router.
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { ListenAddress } from '../config/types.ts';
import type { Logger } from '../log.ts';
import { buildInfo } from '../version.ts';

export interface AdminHandlers {
  /** Prometheus text and its content type. */
  metrics(): Promise<{ contentType: string; body: string }>;
  /** null when ready, else why not. */
  notReadyReason(): string | null;
  routes(): unknown;
}

/** Concurrent admin connections; more are closed as soon as they are accepted. */
export const MAX_CONNECTIONS = 64;
const CHECK_INTERVAL_MS = 1000;
const DROP_LOG_INTERVAL_MS = 60_000;

export class AdminServer {
  readonly #server: http.Server;
  readonly #handlers: AdminHandlers;
  readonly #logger: Logger;
  #droppedLoggedAt = Number.NEGATIVE_INFINITY;

  constructor(handlers: AdminHandlers, logger: Logger) {
    this.#handlers = handlers;
    this.#logger = logger;
    // Node checks headersTimeout and requestTimeout only every connectionsCheckingInterval (30 s
    // by default): connections that never finish their headers lived about 45 s.
    this.#server = http.createServer({ connectionsCheckingInterval: CHECK_INTERVAL_MS }, (req, res) => {
      this.#handle(req, res).catch((err: Error) => {
        this.#logger.error({ err: err.message, path: req.url }, 'admin request failed');
        if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' });
        res.end('internal error\n');
      });
    });
    // Scrapers and health checks make one short request at a time: anything beyond a few dozen
    // connections, or slower than a few seconds, is a flood. Over the cap a connection is closed
    // as soon as it is accepted, so a flood holds at most MAX_CONNECTIONS descriptors of the
    // budget the data plane shares, each for a few seconds.
    this.#server.maxConnections = MAX_CONNECTIONS;
    this.#server.keepAliveTimeout = 5000;
    this.#server.headersTimeout = 5000;
    this.#server.requestTimeout = 10_000;
    // A response that is not read (or a socket that says nothing after its request).
    this.#server.timeout = 10_000;
    this.#server.on('drop', () => {
      const now = Date.now();
      if (now - this.#droppedLoggedAt < DROP_LOG_INTERVAL_MS) return;
      this.#droppedLoggedAt = now;
      this.#logger.warn({ max_connections: MAX_CONNECTIONS }, 'admin connection limit reached');
    });
  }

  async listen(addr: ListenAddress): Promise<AddressInfo> {
    await new Promise<void>((resolve, reject) => {
      this.#server.once('error', (err) => reject(new Error(`cannot listen on admin address ${addr.text}: ${err.message}`)));
      this.#server.listen({ host: addr.host, port: addr.port }, () => resolve());
    });
    return this.#server.address() as AddressInfo;
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
    // Nothing here is worth waiting for at shutdown: a scrape cut short is retried.
    this.#server.closeAllConnections();
    await closed;
  }

  async #handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' });
      res.end('method not allowed\n');
      return;
    }
    switch (path) {
      case '/metrics': {
        const { contentType, body } = await this.#handlers.metrics();
        res.writeHead(200, { 'content-type': contentType });
        res.end(body);
        return;
      }
      case '/healthz':
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.end('ok\n');
        return;
      case '/readyz': {
        const why = this.#handlers.notReadyReason();
        res.writeHead(why === null ? 200 : 503, { 'content-type': 'text/plain' });
        res.end(why === null ? 'ready\n' : `not ready: ${why}\n`);
        return;
      }
      case '/routes':
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(`${JSON.stringify(this.#handlers.routes(), null, 2)}\n`);
        return;
      case '/version': {
        const { version, node } = buildInfo();
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(`${JSON.stringify({ version, node })}\n`);
        return;
      }
      default:
        res.writeHead(404, { 'content-type': 'text/plain' });
        res.end('not found: try /metrics, /healthz, /readyz, /routes or /version\n');
    }
  }
}
