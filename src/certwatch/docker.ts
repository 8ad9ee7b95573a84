// The Docker Engine API, as much of it as on_change needs: restart a container, or send it a
// signal, through the Engine's unix socket (the router's image has no docker CLI, and needs none).
// Plain paths without a /v1.xx prefix: every Engine serves them at its own API version.
//
// The socket is hostile input like any other: the answer is read up to a cap, the whole exchange
// has a time limit, and whatever happens ends as a resolved or rejected promise, never a throw.
import http from 'node:http';
import type { DockerTarget } from '../config/types.ts';

export type ContainerRequest = { readonly kind: 'restart' } | { readonly kind: 'kill'; readonly signal: NodeJS.Signals };

/** Enough for any error the Engine writes ({"message": "..."}); more is not read. */
const BODY_CAP = 64 * 1024;
/** How much of the Engine's message goes into an error (and so into the log). */
const MESSAGE_CLIP = 200;

/**
 * POST /containers/{name}/restart or /containers/{name}/kill?signal=S. Resolves when the Engine
 * answers 2xx (204 on every version so far); rejects with an error that says what to fix otherwise,
 * or when nothing complete came back within timeoutMs. A restart answers once the container has
 * stopped (its own stop timeout) and started again.
 */
export function dockerContainerRequest(target: DockerTarget, request: ContainerRequest, timeoutMs: number): Promise<void> {
  const name = encodeURIComponent(target.container);
  const path = request.kind === 'restart'
    ? `/containers/${name}/restart`
    : `/containers/${name}/kill?signal=${encodeURIComponent(request.signal)}`;
  return new Promise((resolve, reject) => {
    let settled = false;
    const finish = (err: Error | null) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      req.destroy();
      if (err === null) resolve();
      else reject(err);
    };
    const req = http.request({
      socketPath: target.socket, method: 'POST', path, agent: false,
      headers: { host: 'docker', 'content-length': '0', connection: 'close' },
    }, (res) => {
      const status = res.statusCode ?? 0;
      const chunks: Buffer[] = [];
      let size = 0;
      const answered = () => finish(status >= 200 && status < 300 ? null : statusError(status, Buffer.concat(chunks), target, request));
      res.on('data', (d: Buffer) => {
        chunks.push(d.subarray(0, BODY_CAP - size));
        size += Math.min(d.length, BODY_CAP - size);
        if (size >= BODY_CAP) answered();
      });
      res.on('end', answered);
      res.on('error', (err) => finish(new Error(`docker socket ${target.socket}: the answer to POST ${path} broke off: ${err.message}`)));
    });
    req.on('error', (err) => finish(connectError(err, target.socket)));
    const timer = setTimeout(() => finish(new Error(`docker socket ${target.socket}: no answer to POST ${path} within ${timeoutMs}ms`)), timeoutMs);
    req.end();
  });
}

function connectError(err: NodeJS.ErrnoException, socket: string): Error {
  switch (err.code) {
    case 'ENOENT':
      return new Error(`docker socket ${socket} not found: is Docker running, is the socket mounted?`);
    case 'EACCES':
      return new Error(`docker socket ${socket}: permission denied: the router's user must be in the socket's group (docker)`);
    case 'ECONNREFUSED':
      return new Error(`docker socket ${socket} refuses connections: is Docker running, is it a socket?`);
    default:
      return new Error(`docker socket ${socket}: ${err.message}`);
  }
}

function statusError(status: number, body: Buffer, target: DockerTarget, request: ContainerRequest): Error {
  const name = target.container;
  if (status === 404) return new Error(`no such docker container ${name} (docker socket ${target.socket})`);
  if (status === 409 && request.kind === 'kill') return new Error(`docker container ${name} is not running, so it cannot be signalled${engineSays(body)}`);
  return new Error(`docker ${request.kind === 'restart' ? 'restart' : `kill --signal=${request.signal}`} ${name}: `
    + `the Engine answered ${status}${engineSays(body)}`);
}

/** ": <the Engine's message>", clipped and printable, or nothing. Its errors are {"message": "..."}. */
function engineSays(body: Buffer): string {
  let text = body.toString('utf8');
  try {
    const parsed: unknown = JSON.parse(text);
    const message = parsed !== null && typeof parsed === 'object' ? (parsed as { message?: unknown }).message : undefined;
    if (typeof message === 'string') text = message;
  } catch {
    // not JSON (or cut at the cap): the text itself
  }
  text = text.replace(/[^\x20-\x7e]+/g, ' ').trim();
  if (text === '') return '';
  return `: ${text.length > MESSAGE_CLIP ? `${text.slice(0, MESSAGE_CLIP)}…` : text}`;
}
