// Which pair to deploy, given every pair found and what is deployed now. Pure: the watcher calls it
// after each scan and does what the choice says.
//
// "Newest" is the latest notBefore among the certificates that parse. If that newest pair is bad
// (its key does not match yet, it is expired, for another name…) nothing older is used instead:
// the deployed certificate is only ever replaced by one issued later, so a renewal that is half
// written, or broken, never makes the watcher fall back to an older pair left in another issuer
// directory. A pair whose certificate cannot be read at all cannot be ordered; it may be a file
// being rewritten in place, so it is waited for before anything else is decided.
//
// The nuance: a pair refused for its files (a FIFO or a device, a symlink out of the storage, a
// file over the size cap; pair.ts refusesTheFiles) is neither waited for nor ordered, even when
// its other file holds a certificate. Caddy never writes such files, so they are no stage of a
// renewal; and their dates are whatever their author chose: ordering them would let anyone who
// can plant a symlink beside a forged certificate dated a minute ago pin the deployed pair until
// it expires, renewals notwithstanding. They are reported once, and the usable pairs decide.
import type { Candidate } from './find.ts';
import { type GoodPair, type Leaf, refusesTheFiles } from './pair.ts';

/** What the TURN server holds, as far as the watcher knows. */
export interface Deployed {
  readonly leaf: Leaf;
  /**
   * Its key matched and it covered the domain. Only a fit pair counts as "already deployed", and
   * only a fit pair that is still valid sets the floor for what may replace it.
   */
  readonly fit: boolean;
  /** on_change succeeded for it. A pair copied while the action failed is deployed again. */
  readonly acted: boolean;
}

export type Choice =
  /** No pair anywhere (Caddy has not obtained one yet). */
  | { readonly kind: 'none'; readonly rejected: readonly Candidate[] }
  /** Something may be mid-write: look again shortly before deciding. */
  | { readonly kind: 'wait'; readonly pending: readonly Candidate[] }
  /** The newest pair is bad and was waited for: keep what is deployed. */
  | { readonly kind: 'blocked'; readonly newest: Candidate; readonly rejected: readonly Candidate[] }
  /** The best pair is the deployed one. */
  | { readonly kind: 'current'; readonly best: Candidate & { readonly verdict: GoodPair }; readonly rejected: readonly Candidate[] }
  /** The best pair was issued no later than the deployed one: never go back. */
  | { readonly kind: 'older'; readonly best: Candidate & { readonly verdict: GoodPair }; readonly rejected: readonly Candidate[] }
  /** Deploy this one. */
  | { readonly kind: 'newer'; readonly best: Candidate & { readonly verdict: GoodPair }; readonly rejected: readonly Candidate[] };

export interface SelectOptions {
  /** Content hashes of bad pairs already waited for and reported: they no longer make us wait. */
  readonly settledBad: ReadonlySet<string>;
  /** The bounded wait is over: decide with what is there. */
  readonly final: boolean;
  /** Only a later notBefore may replace a usable deployed pair (Caddy storage; explicit paths follow the file). */
  readonly onlyLater: boolean;
  readonly now: Date;
}

function newestFirst(a: Candidate, b: Candidate): number {
  const la = a.verdict.leaf!;
  const lb = b.verdict.leaf!;
  return lb.notBefore.getTime() - la.notBefore.getTime()
    || lb.notAfter.getTime() - la.notAfter.getTime()
    || (a.where < b.where ? -1 : a.where > b.where ? 1 : 0);
}

export function selectPair(candidates: readonly Candidate[], deployed: Deployed | null, opts: SelectOptions): Choice {
  const unsettled = (c: Candidate) => !c.verdict.ok && !opts.settledBad.has(c.verdict.contentHash);
  const unordered = candidates.filter((c) => c.verdict.leaf === null);
  const ordered = candidates.filter((c) => c.verdict.leaf !== null).sort(newestFirst);

  if (!opts.final) {
    const pending = unordered.filter((c) => unsettled(c) && !(!c.verdict.ok && refusesTheFiles(c.verdict.reason)));
    if (ordered.length > 0 && unsettled(ordered[0])) pending.push(ordered[0]);
    if (pending.length > 0) return { kind: 'wait', pending };
  }
  if (ordered.length === 0) return { kind: 'none', rejected: unordered };
  const newest = ordered[0];
  if (!newest.verdict.ok) return { kind: 'blocked', newest, rejected: [...unordered, newest] };
  const best = newest as Candidate & { readonly verdict: GoodPair };
  const leaf = best.verdict.leaf;
  if (deployed === null || !deployed.fit) return { kind: 'newer', best, rejected: unordered };
  if (deployed.leaf.fingerprint === leaf.fingerprint) {
    // The same leaf with another chain (an intermediate that was missing) is worth deploying, and
    // so is the same pair again when its action never succeeded.
    return { kind: deployed.leaf.chainHash === leaf.chainHash && deployed.acted ? 'current' : 'newer', best, rejected: unordered };
  }
  const stillValid = opts.now >= deployed.leaf.notBefore && opts.now <= deployed.leaf.notAfter;
  if (opts.onlyLater && stillValid && leaf.notBefore <= deployed.leaf.notBefore) {
    return { kind: 'older', best, rejected: unordered };
  }
  return { kind: 'newer', best, rejected: unordered };
}
