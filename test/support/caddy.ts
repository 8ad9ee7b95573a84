// Certificates with chosen dates, and a Caddy storage tree written the way Caddy writes it: what
// the cert watcher's tests renew. Certificates come from openssl (`openssl ca` gives them the exact
// validity dates a test needs: older, newer, expired).
import { execFileSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readFileSync, renameSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { sleep } from '../helpers.ts';

export const DOMAIN = 'cdn.example.com';
export const LE = 'acme-v02.api.letsencrypt.org-directory';
export const ZEROSSL = 'acme.zerossl.com-v2-dv90';
export const STAGING = 'acme-staging-v02.api.letsencrypt.org-directory';
export const HOUR = 3600_000;
export const DAY = 24 * HOUR;

export interface Issued {
  readonly cert: Buffer; // leaf + CA, as Caddy stores a chain
  readonly key: Buffer;
  readonly fingerprint: string;
  readonly notAfter: Date;
}

function opensslDate(d: Date): string {
  return `${d.toISOString().replace(/[-:T]/g, '').slice(0, 14)}Z`;
}

/** A throwaway CA that issues EC leaf certificates valid exactly from..to, via `openssl ca`. */
export class TestCa {
  readonly #dir: string;
  #n = 0;
  constructor(dir: string) {
    this.#dir = join(dir, 'ca');
    mkdirSync(this.#dir, { recursive: true });
    writeFileSync(join(this.#dir, 'index.txt'), '');
    writeFileSync(join(this.#dir, 'serial'), '1000\n');
    writeFileSync(join(this.#dir, 'ca.cnf'), [
      '[ca]', 'default_ca = test', '[test]', `database = ${this.#dir}/index.txt`, `new_certs_dir = ${this.#dir}`,
      `serial = ${this.#dir}/serial`, 'default_md = sha256', 'policy = any', 'unique_subject = no',
      'copy_extensions = copy', '[any]', 'commonName = optional', '',
    ].join('\n'));
    execFileSync('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '3650',
      '-subj', '/CN=sni-router test CA', '-keyout', join(this.#dir, 'ca.key'), '-out', join(this.#dir, 'ca.crt'),
    ], { stdio: 'ignore' });
  }

  /** The CA's own (self-signed) certificate, PEM. */
  root(): Buffer {
    return readFileSync(join(this.#dir, 'ca.crt'));
  }

  /** `subject: ''` issues with an empty subject, names in subjectAltName only, as Caddy's own CA does. */
  issue(names: readonly string[], from: Date, to: Date, opts: { subject?: string } = {}): Issued {
    const n = ++this.#n;
    const key = join(this.#dir, `${n}.key`);
    const csr = join(this.#dir, `${n}.csr`);
    const crt = join(this.#dir, `${n}.crt`);
    execFileSync('openssl', [
      'req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
      '-subj', opts.subject === '' ? '/' : `/CN=${opts.subject ?? names[0]}`,
      '-addext', `subjectAltName=${names.map((s) => `DNS:${s}`).join(',')}`, '-keyout', key, '-out', csr,
    ], { stdio: 'ignore' });
    execFileSync('openssl', [
      'ca', '-batch', '-notext', '-config', join(this.#dir, 'ca.cnf'), '-cert', join(this.#dir, 'ca.crt'),
      '-keyfile', join(this.#dir, 'ca.key'), '-startdate', opensslDate(from), '-enddate', opensslDate(to),
      '-in', csr, '-out', crt,
    ], { stdio: 'ignore' });
    const leaf = readFileSync(crt);
    const x509 = new X509Certificate(leaf);
    return {
      cert: Buffer.concat([leaf, readFileSync(join(this.#dir, 'ca.crt'))]),
      key: readFileSync(key),
      fingerprint: x509.fingerprint256,
      notAfter: x509.validToDate,
    };
  }

  /** A certificate for DOMAIN issued `agoMs` before now, valid for 90 days from then. */
  renewal(agoMs: number, names: readonly string[] = [DOMAIN], opts: { subject?: string } = {}): Issued {
    const from = new Date(Date.now() - agoMs);
    return this.issue(names, from, new Date(from.getTime() + 90 * DAY), opts);
  }
}

export function fingerprintOf(certPem: Buffer): string {
  return new X509Certificate(certPem).fingerprint256;
}

export class CaddyStorage {
  readonly root: string;
  constructor(root: string) {
    this.root = root;
  }

  dir(issuer: string, key = DOMAIN): string {
    return join(this.root, 'certificates', issuer, key);
  }

  /** Caddy ≥ 2.9: key, then certificate, then metadata, each to a temp file renamed into place. */
  renew(issuer: string, pair: { cert: Buffer; key: Buffer }, key = DOMAIN): void {
    const dir = this.dir(issuer, key);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const put = (name: string, data: Buffer | string) => {
      const tmp = join(dir, `.${name}.tmp${Math.random().toString(36).slice(2)}`);
      writeFileSync(tmp, data, { mode: 0o600 });
      renameSync(tmp, join(dir, name));
    };
    put(`${key}.key`, pair.key);
    put(`${key}.crt`, pair.cert);
    put(`${key}.json`, JSON.stringify({ sans: [DOMAIN], issuer_data: { url: `https://${issuer}/cert/1` } }));
  }

  /**
   * Older Caddy: each file truncated and rewritten in place. The certificate goes in two writes
   * with `pauseMs` between them, longer than the debounce, so the watcher does see a torn file.
   */
  async renewInPlace(issuer: string, pair: { cert: Buffer; key: Buffer }, pauseMs: number): Promise<void> {
    const dir = this.dir(issuer);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    writeFileSync(join(dir, `${DOMAIN}.key`), pair.key, { mode: 0o600 });
    const fd = openSync(join(dir, `${DOMAIN}.crt`), 'w', 0o600);
    try {
      const half = Math.floor(pair.cert.length / 3);
      writeSync(fd, pair.cert, 0, half);
      await sleep(pauseMs);
      writeSync(fd, pair.cert, half, pair.cert.length - half);
    } finally {
      closeSync(fd);
    }
    writeFileSync(join(dir, `${DOMAIN}.json`), JSON.stringify({ sans: [DOMAIN] }), { mode: 0o600 });
  }
}
