// Facts about the host the router runs on, read when asked: its interface addresses and its
// descriptor limit. The one place that reads them, so that the policies using them stay pure.
import { readFileSync } from 'node:fs';
import { networkInterfaces } from 'node:os';

/** Every address of every interface (IPv4, IPv6 lowercased, without zone). */
export function localInterfaceAddresses(): Set<string> {
  const out = new Set<string>();
  for (const list of Object.values(networkInterfaces())) {
    for (const a of list ?? []) out.add(a.address.toLowerCase().split('%')[0]);
  }
  return out;
}

/** The soft RLIMIT_NOFILE from /proc (Linux); null where it cannot be read. */
export function openFileLimit(): number | null {
  try {
    const m = /^Max open files\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
    if (m === null) return null;
    return m[1] === 'unlimited' ? Number.MAX_SAFE_INTEGER : Number(m[1]);
  } catch {
    return null;
  }
}
