// `npm start`: the router on 127.0.0.1:8443 in front of two backends it starts itself, so a
// newcomer can see SNI and ALPN routing work with nothing else installed but openssl and curl.
//
//   cdn.example.com, no ALPN offered (a TURN client)  -> "turn": a TLS echo server
//   everything else (browsers, curl, probers)         -> "web": an HTTPS page (h2 and http/1.1)
//
// DEMO_PORT and DEMO_ADMIN_PORT move the router and admin ports. Logs (one JSON line per
// connection) go to stderr so that stdout holds only the instructions.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import http2 from 'node:http2';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import pino from 'pino';
import { App } from './app.ts';
import { parseConfig } from './config/load.ts';
import { createLogger } from './log.ts';

const HOST = '127.0.0.1';

interface CertPair {
  readonly cert: Buffer;
  readonly key: Buffer;
}

class DemoError extends Error {}

function port(name: string, dflt: number): number {
  const text = process.env[name];
  if (text === undefined || text === '') return dflt;
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1 || n > 65535) throw new DemoError(`${name}=${text} is not a port number (1-65535)`);
  return n;
}

/** A self-signed certificate from openssl: the demo needs no npm package to make one. */
function selfSigned(dir: string, name: string, sans: readonly string[]): CertPair {
  const certFile = join(dir, `${name}.crt`);
  const keyFile = join(dir, `${name}.key`);
  try {
    execFileSync('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2',
      '-subj', `/CN=${sans[0]}`, '-addext', `subjectAltName=${sans.map((s) => `DNS:${s}`).join(',')}`,
      '-keyout', keyFile, '-out', certFile,
    ], { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: Buffer };
    if (e.code === 'ENOENT') {
      throw new DemoError('openssl is not installed (it makes the demo certificates): apt install openssl, then npm start again');
    }
    throw new DemoError(`openssl could not make a certificate: ${e.stderr?.toString().trim() || e.message}`);
  }
  return { cert: readFileSync(certFile), key: readFileSync(keyFile) };
}

/** The "turn" backend: greets, then echoes every byte, like a stand-in for TURN over TLS. */
function turnEcho(pair: CertPair): tls.Server {
  const server = tls.createServer({ cert: pair.cert, key: pair.key }, (s) => {
    const sni = (s as tls.TLSSocket & { servername?: string | false }).servername || 'none';
    s.write(`turn echo: you reached the TURN backend (sni=${sni}, alpn=${s.alpnProtocol || 'none'}). Type a line:\n`);
    s.on('data', (d) => s.write(d));
    s.on('error', () => {});
  });
  server.on('tlsClientError', () => {});
  return server;
}

/** The "web" backend: a small HTML page over h2 or http/1.1, standing in for Caddy. */
function webPage(pair: CertPair): http2.Http2SecureServer {
  const server = http2.createSecureServer({ cert: pair.cert, key: pair.key, allowHTTP1: true }, (req, res) => {
    const host = (req.headers[':authority'] ?? req.headers.host ?? '').toString().replace(/[<>&"]/g, '');
    const protocol = req.httpVersion === '2.0' ? 'HTTP/2' : `HTTP/${req.httpVersion}`;
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(`<!doctype html>
<html><head><title>sni-router demo: web</title></head>
<body>
<h1>sni-router demo: the web backend</h1>
<p>You reached the web (fallback) backend for ${host || 'no host'} over ${protocol}.</p>
<p>A browser offers ALPN h2/http/1.1, so even cdn.example.com lands here; only a client offering no ALPN reaches TURN.</p>
</body></html>
`);
  });
  server.on('tlsClientError', () => {});
  server.on('sessionError', () => {});
  return server;
}

function listen(server: tls.Server | http2.Http2SecureServer): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, HOST, () => {
      server.removeListener('error', reject);
      resolve((server.address() as AddressInfo).port);
    });
  });
}

function closeServer(server: tls.Server | http2.Http2SecureServer): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    // Open sessions (an s_client left running) must not hold the demo up.
    setTimeout(resolve, 500).unref();
  });
}

function instructions(routerPort: number, adminPort: number): string {
  const admin = `http://${HOST}:${adminPort}`;
  return `
sni-router demo is running.
  router  ${HOST}:${routerPort}   cdn.example.com offering no ALPN -> turn (TLS echo); everything else -> web (HTTPS page)
  admin   ${admin}   /metrics /healthz /readyz /routes /version

Paste these into another terminal:

  1. A browser-like client reaches the web page (any name; curl offers ALPN h2 and http/1.1):
     curl -k --resolve www.example.com:${routerPort}:${HOST} https://www.example.com:${routerPort}/
     curl -k --resolve cdn.example.com:${routerPort}:${HOST} https://cdn.example.com:${routerPort}/

  2. A TURN-like client (SNI cdn.example.com, no ALPN) reaches the turn echo: type a line, it comes back (Ctrl-C to quit):
     openssl s_client -connect ${HOST}:${routerPort} -servername cdn.example.com -quiet

  3. What the router saw:
     curl -s ${admin}/routes
     curl -s ${admin}/metrics | grep sni_router_connections

Stop the demo with Ctrl-C.
`;
}

async function main(): Promise<number> {
  const routerPort = port('DEMO_PORT', 8443);
  const adminPort = port('DEMO_ADMIN_PORT', 9180);
  const dir = mkdtempSync(join(tmpdir(), 'sni-router-demo-'));
  const servers: Array<tls.Server | http2.Http2SecureServer> = [];
  let app: App | null = null;
  const cleanup = async () => {
    await app?.shutdown(1000);
    await Promise.all(servers.map(closeServer));
    rmSync(dir, { recursive: true, force: true });
  };

  try {
    const turn = turnEcho(selfSigned(dir, 'turn', ['cdn.example.com']));
    const web = webPage(selfSigned(dir, 'web', ['www.example.com', 'cdn.example.com', 'example.com']));
    servers.push(turn, web);
    const turnPort = await listen(turn);
    const webPort = await listen(web);

    // The stealth route of the contract: only a client offering no ALPN reaches TURN.
    const yaml = `
listen: "${HOST}:${routerPort}"
admin: { listen: "${HOST}:${adminPort}" }
client_hello_timeout: 5s
shutdown_grace: 1s
log: { level: info, access: true }
fallback: { name: web, addr: "${HOST}:${webPort}" }
routes:
  - match: cdn.example.com
    alpn: none
    backend: { name: turn, addr: "${HOST}:${turnPort}" }
`;
    const logger = createLogger('info', pino.destination({ dest: 2, sync: false }));
    app = await App.start(parseConfig(yaml, '<demo>'), { logger });
  } catch (err) {
    await cleanup().catch(() => {});
    const msg = (err as Error).message;
    process.stderr.write(`sni-router demo: ${msg}\n`);
    if (/EADDRINUSE|address already in use/i.test(msg)) {
      process.stderr.write('Another program holds the port: stop it, or set DEMO_PORT / DEMO_ADMIN_PORT.\n');
    }
    return 1;
  }

  process.stdout.write(instructions(routerPort, adminPort));

  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) {
        resolve(0);
        return;
      }
      stopping = true;
      process.stderr.write(`\nsni-router demo: ${signal}, stopping\n`);
      cleanup().then(() => resolve(0), (err: Error) => {
        process.stderr.write(`sni-router demo: stop failed: ${err.message}\n`);
        resolve(1);
      });
    };
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGTERM', () => stop('SIGTERM'));
  });
}

main().then((code) => {
  // Let pino's asynchronous stderr drain before leaving.
  setTimeout(() => process.exit(code), 50);
}, (err: Error) => {
  process.stderr.write(`sni-router demo: ${err instanceof DemoError ? err.message : err.stack ?? err.message}\n`);
  process.exit(1);
});
