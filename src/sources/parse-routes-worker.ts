// Parses a large routes file off the main thread (see parseRoutesOffThread in file.ts): YAML
// parsing of a file of tens of thousands of routes takes seconds and hundreds of MB, which on the
// main thread would stall every relay and stay in the router's heap.
import { parentPort, workerData } from 'node:worker_threads';
import { parseRoutesFile } from '../config/load.ts';

const { text, file, source } = workerData as { text: string; file: string; source: string };
try {
  parentPort!.postMessage({ ok: true, routes: parseRoutesFile(text, file, source) });
} catch (err) {
  parentPort!.postMessage({ ok: false, message: (err as Error).message });
}
