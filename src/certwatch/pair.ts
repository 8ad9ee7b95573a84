// A certificate and its key, read as bytes and judged without I/O: does the PEM parse, does the
// key match the leaf, does each certificate of the chain sign the one before, is it valid now,
// does it cover the domain. The reasons a pair is refused are the `reason` label of
// cert_invalid_total.
import { X509Certificate, createHash, createPrivateKey } from 'node:crypto';

export type InvalidReason =
  | 'missing' // a file of the pair does not exist
  | 'unreadable' // it exists but cannot be read (permissions)
  | 'not_regular_file' // a FIFO, a device, a socket, a directory
  | 'outside_storage' // in Caddy storage, a file that resolves outside it (a symlink leaving it)
  | 'too_large' // over the size cap (safe-read.ts MAX_FILE_BYTES)
  | 'parse_error' // not PEM, or cut short
  | 'key_mismatch'
  | 'bad_chain' // a certificate not signed by the next one, or a lone certificate nobody vouches for
  | 'expired'
  | 'not_yet_valid'
  | 'wrong_name'; // does not cover the domain

export const INVALID_REASONS: readonly InvalidReason[] = [
  'missing', 'unreadable', 'not_regular_file', 'outside_storage', 'too_large', 'parse_error', 'key_mismatch', 'bad_chain',
  'expired', 'not_yet_valid', 'wrong_name',
];

/**
 * Refusals of the files themselves rather than of a certificate: never a stage of Caddy writing a
 * pair (it writes regular files of a few KiB, inside its storage, by rename), so there is nothing
 * to wait for, and no date in them to order the pair by.
 */
export function refusesTheFiles(reason: InvalidReason): boolean {
  return reason === 'not_regular_file' || reason === 'outside_storage' || reason === 'too_large';
}

/** What is known of a leaf certificate that parsed, whether or not the pair is usable. */
export interface Leaf {
  /** SHA-256 of the leaf's DER, "AB:CD:…" as openssl and node print it. */
  readonly fingerprint: string;
  readonly notBefore: Date;
  readonly notAfter: Date;
  readonly subject: string;
  readonly names: string;
  /** sha256 over the DER of every certificate in the chain: the same leaf with other intermediates differs. */
  readonly chainHash: string;
}

/** A pair fit to deploy: the exact bytes that were judged, and its leaf. */
export interface GoodPair {
  readonly ok: true;
  readonly leaf: Leaf;
  /** The full chain as read (leaf first), written unchanged to copy_to. */
  readonly cert: Buffer;
  readonly key: Buffer;
  /** sha256 over both files' bytes: tells a rewrite of the same pair from a change. */
  readonly contentHash: string;
}

export interface BadPair {
  readonly ok: false;
  readonly reason: InvalidReason;
  readonly detail: string;
  /** The leaf, when the certificate parsed (so the pair can still be ordered by notBefore). */
  readonly leaf: Leaf | null;
  readonly contentHash: string;
}

export type PairVerdict = GoodPair | BadPair;

/** Real chains hold two to four certificates (leaf, intermediates, perhaps a cross-signed root). */
const MAX_CHAIN = 8;

const PEM_CERT = /-----BEGIN CERTIFICATE-----\r?\n[\s\S]*?-----END CERTIFICATE-----/g;

/**
 * The certificates of a PEM chain, in file order. A block that begins but does not end (a file
 * read while it was being rewritten in place) makes the whole chain unreadable, not shorter.
 */
export function splitChain(pem: string): X509Certificate[] {
  const blocks = pem.match(PEM_CERT) ?? [];
  const begins = pem.split('-----BEGIN CERTIFICATE-----').length - 1;
  if (blocks.length === 0) throw new Error('no PEM certificate block');
  if (begins !== blocks.length) throw new Error(`${begins} PEM blocks begin but ${blocks.length} certificates end (truncated file?)`);
  // Each one is parsed and its signature checked on the event loop: a file of a thousand is no chain.
  if (blocks.length > MAX_CHAIN) throw new Error(`${blocks.length} certificates in the chain (at most ${MAX_CHAIN})`);
  return blocks.map((b, i) => {
    try {
      return new X509Certificate(b);
    } catch (err) {
      throw new Error(`certificate ${i + 1} of the chain: ${(err as Error).message}`);
    }
  });
}

function leafOf(chain: readonly X509Certificate[]): Leaf {
  const x509 = chain[0];
  const h = createHash('sha256');
  for (const c of chain) h.update(c.raw);
  return {
    chainHash: h.digest('hex'),
    fingerprint: x509.fingerprint256,
    notBefore: x509.validFromDate,
    notAfter: x509.validToDate,
    // Caddy's own CA (issuer "local") and some ACME CAs issue certificates with an empty subject:
    // node reports it as undefined.
    subject: (x509.subject ?? '').replace(/\n/g, ', '),
    names: x509.subjectAltName ?? '',
  };
}

/**
 * True when the certificate serves `domain`. A wildcard domain ("*.example.com") needs that very
 * wildcard among the names; a plain one is matched the way a TLS client would (one-label wildcards).
 */
export function coversDomain(x509: X509Certificate, domain: string): boolean {
  if (domain.startsWith('*.')) {
    const names = (x509.subjectAltName ?? '').split(/,\s*/);
    return names.some((n) => n.toLowerCase() === `dns:${domain}`);
  }
  return x509.checkHost(domain, { subject: 'default', wildcards: true, partialWildcards: false }) !== undefined;
}

/**
 * The DNS names of a leaf's subjectAltName (Leaf.names, as node prints it: "DNS:a, DNS:*.b"),
 * lowercased. Names node had to quote (a comma or a quote inside) are no host names and left out.
 */
export function dnsNames(names: string): string[] {
  const out: string[] = [];
  for (const part of names.split(', ')) if (part.startsWith('DNS:') && !part.startsWith('DNS:"')) out.push(part.slice(4).toLowerCase());
  return out;
}

export function contentHash(cert: Buffer | null, key: Buffer | null): string {
  const h = createHash('sha256');
  h.update(cert ?? Buffer.alloc(0));
  h.update('\0');
  h.update(key ?? Buffer.alloc(0));
  return h.digest('hex');
}

/**
 * Why the chain does not hold together, or null when it does. Each certificate must be issued and
 * signed by the next; the last one must be self-signed, or issued by one of the anchors (trusted
 * roots: Node's and Caddy's own CA), or, in a chain of two or more, issued by a CA the anchors do
 * not know (private ACME CAs exist). A lone certificate that is neither self-signed nor anchored
 * is refused: anyone can make one for any public key, such as a key of this host.
 */
export function chainProblem(chain: readonly X509Certificate[], anchors: readonly X509Certificate[]): string | null {
  for (let i = 0; i + 1 < chain.length; i++) {
    if (!chain[i].checkIssued(chain[i + 1]) || !chain[i].verify(chain[i + 1].publicKey)) {
      return `certificate ${i + 1} of the chain is not issued and signed by certificate ${i + 2}`;
    }
  }
  const last = chain[chain.length - 1];
  const where = chain.length === 1 ? 'the certificate' : `certificate ${chain.length} of the chain`;
  if (last.checkIssued(last)) return last.verify(last.publicKey) ? null : `${where} is self-issued but its signature does not verify`;
  const issuers = anchors.filter((a) => last.checkIssued(a));
  if (issuers.some((a) => last.verify(a.publicKey))) return null;
  if (issuers.length > 0) return `${where} names a trusted root as its issuer (${last.issuer.replace(/\n/g, ', ')}) but is not signed by it`;
  if (chain.length === 1) return `a lone certificate issued by ${last.issuer.replace(/\n/g, ', ')}, which is not a trusted root, without its chain`;
  return null;
}

/**
 * Judges a pair read from disk (null: the file does not exist). `anchors` are the trusted roots a
 * chain's last certificate may be issued by (see chainProblem). A null domain judges everything
 * but the name (a scan shared by many domains: each asks coversName of the pairs it may use).
 */
export function judgePair(
  cert: Buffer | null, key: Buffer | null, domain: string | null, now: Date = new Date(), anchors: readonly X509Certificate[] = [],
): PairVerdict {
  const hash = contentHash(cert, key);
  const bad = (reason: InvalidReason, detail: string, leaf: Leaf | null = null): BadPair => ({
    ok: false, reason, detail, leaf, contentHash: hash,
  });
  if (cert === null) return bad('missing', 'the certificate file does not exist');
  let chain: X509Certificate[];
  try {
    chain = splitChain(cert.toString('latin1'));
  } catch (err) {
    return bad('parse_error', `certificate: ${(err as Error).message}`);
  }
  const x509 = chain[0];
  let leaf: Leaf;
  try {
    leaf = leafOf(chain);
  } catch (err) {
    return bad('parse_error', `certificate: ${(err as Error).message}`);
  }
  if (key === null) return bad('missing', 'the key file does not exist', leaf);
  let matches: boolean;
  try {
    matches = x509.checkPrivateKey(createPrivateKey(key));
  } catch (err) {
    return bad('parse_error', `key: ${(err as Error).message}`, leaf);
  }
  if (!matches) return bad('key_mismatch', 'the key does not belong to the certificate', leaf);
  // Still ordered by its leaf's notBefore: a chain cut between two blocks (older Caddy rewriting
  // in place) is one stage of a write, to be waited out like any other.
  let problem: string | null;
  try {
    problem = chainProblem(chain, anchors);
  } catch (err) {
    problem = `the chain cannot be checked: ${(err as Error).message}`;
  }
  if (problem !== null) return bad('bad_chain', problem, leaf);
  if (now < leaf.notBefore) return bad('not_yet_valid', `valid from ${leaf.notBefore.toISOString()}`, leaf);
  if (now > leaf.notAfter) return bad('expired', `expired at ${leaf.notAfter.toISOString()}`, leaf);
  if (domain !== null && !coversDomain(x509, domain)) return bad('wrong_name', `does not cover ${domain} (${leaf.names || leaf.subject})`, leaf);
  return { ok: true, leaf, cert, key, contentHash: hash };
}
