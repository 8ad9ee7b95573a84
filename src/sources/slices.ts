// Work over many entries, in slices that give the event loop back between them: validating a
// snapshot of 100,000 routes takes a few hundred milliseconds, which in one piece would hold up
// every connection's ClientHello for as long.

/** Entries handled before the event loop gets a turn: a few milliseconds of validation. */
const SLICE = 2000;

const turn = () => new Promise<void>((resolve) => setImmediate(resolve));

/** Calls fn for each item in order, yielding to the event loop between slices. */
export async function forEachSliced<T>(items: readonly T[], fn: (item: T, index: number) => void): Promise<void> {
  for (let start = 0; start < items.length; start += SLICE) {
    if (start > 0) await turn();
    const end = Math.min(items.length, start + SLICE);
    for (let i = start; i < end; i++) fn(items[i], i);
  }
}
