// The byte pump of the native relay: two directions (client → backend, backend → client), each a
// record of the handle it reads, the handle it writes and its own state, so that one code path
// serves both. Written for the machine: the handlers are shared functions that find their
// direction through a symbol on the handle or the request, so a relay allocates no closures; a
// read lands in one scratch buffer shared by every connection and is written to the other side at
// once; a FIN is forwarded as a shutdown; backpressure stops reading.
import {
  type TcpHandle, type WriteRequest, errorName, lastWriteQueued, newShutdownRequest, newWriteRequest, readResult, UV_EOF,
} from './handles.ts';

/** Bytes queued towards one side before reading from the other stops; reading resumes below half. */
const HIGH_WATER_MARK = 256 * 1024;
const LOW_WATER_MARK = HIGH_WATER_MARK / 2;

/**
 * Reads land in one scratch buffer shared by every handle (libuv reads one handle at a time, and
 * the callback writes or copies the bytes before returning), so an idle relay holds no read buffer
 * at all. What is read there is copied into a write of its own size: a write the kernel cannot
 * take at once keeps pointing at its bytes. A large read (BULK_READ) means a bulk transfer: that
 * direction then reads into buffers of its own, written out in place without a copy (see Bulk).
 */
const READ_SIZE = 64 * 1024;
export const scratch = Buffer.allocUnsafe(READ_SIZE);
/** A read this large means a bulk transfer (a TURN packet or a page request is far smaller). */
const BULK_READ = 16 * 1024;
/**
 * A bulk direction's read buffers. Larger than the scratch buffer: on loopback and fast links a
 * read then takes what several 64 KiB reads would, and the proxy's CPU per byte halves (bench,
 * 1 stream: ~55% of a core instead of ~95% for the same rate). Spent only on directions moving
 * bulk data, and given back after a quiet sweep tick (Direction.quiet).
 */
const BULK_SIZE = 256 * 1024;
/** Bulk buffers given back, for the next bulk direction: allocating 256 KiB is not free. */
const spareBulk: Buffer[] = [];
const SPARE_BULK_MAX = 32;

function bulkBuffer(): Buffer {
  return spareBulk.pop() ?? Buffer.allocUnsafe(BULK_SIZE);
}

/** Keeps a bulk buffer nothing reads into or writes from any more for reuse. */
function spareBuffer(b: Buffer | null): void {
  if (b !== null && spareBulk.length < SPARE_BULK_MAX) spareBulk.push(b);
}

/**
 * A bulk direction's own read buffers: libuv reads into `reading`; a write of it that has to
 * queue makes it `other` and reading goes on into the former `other`, so a transfer keeps reading
 * while one write is in flight and stops only while two are.
 */
class Bulk {
  reading: Buffer = bulkBuffer();
  other: Buffer | null = null;
  /** In-place writes of these buffers queued and not yet done: 0, 1 or 2. */
  writing = 0;

  /**
   * Gives both buffers back for reuse, once nothing reads into `reading` any more. A write still
   * queued points into one of them (which one depends on the order they complete in): then both
   * are left to the garbage collector.
   */
  release(): void {
    if (this.writing !== 0) return;
    spareBuffer(this.reading);
    spareBuffer(this.other);
  }
}

/** What a direction tells the relay it belongs to. */
export interface PumpOwner {
  /** `n` bytes were read from `dir.from` (into the scratch buffer or the direction's own): returns where the next read goes, when that changes. */
  read(dir: Direction, n: number): Buffer | undefined;
  /** Reading `dir.from` ended: UV_EOF (its FIN) or an error. */
  readEnded(dir: Direction, code: number): void;
  /** A read, write or shutdown failed with this libuv error: the relay is over. */
  failed(code: number): void;
  /** A direction ended (its FIN forwarded) or its last queued write completed: close if all is done. */
  settled(): void;
}

export const kDirection = Symbol('sni-router.direction');
export type PumpHandle = TcpHandle & { [kDirection]?: Direction };

/** A write libuv could not finish at once: its direction and its bytes, kept alive until done. */
type PendingWrite = WriteRequest & { dir: Direction | null; inPlace: boolean; data: Buffer | null };

/**
 * The request object for the next write. A write that completes at once never touches it (libuv
 * wraps it only for a write it has to queue), so one serves every such write; a queued write
 * keeps it, and the next write gets a fresh one.
 */
let nextWrite: PendingWrite | null = null;

function pendingWrite(): PendingWrite {
  const req = newWriteRequest() as PendingWrite;
  req.dir = null;
  req.inPlace = false;
  req.data = null;
  return req;
}

/** The result of writing one chunk. */
export const FAILED = 0; // the relay is finished
export const WRITTEN = 1;
export const QUEUED = 2; // libuv holds the bytes until the write is done
export type SendResult = typeof FAILED | typeof WRITTEN | typeof QUEUED;

/** One direction of a relay: reads `from`, writes `to`. */
export class Direction {
  readonly owner: PumpOwner;
  readonly from: PumpHandle;
  to: PumpHandle | null = null;
  /** The other direction: it is the one whose reads stop when this one's writes back up. */
  reverse: Direction | null = null;
  bulk: Bulk | null = null;
  /** `from` is being read. */
  reading = false;
  /** `from` sent its FIN (or went away). */
  eof = false;
  /** Both bulk buffers are being written out: reading waits. */
  busy = false;
  /** `to`'s write queue passed the high-water mark: reading waits. */
  full = false;
  /** Writes to `to` queued and not yet done. */
  pending = 0;
  bytes = 0;
  /** The relay is over: completions of writes still queued change nothing. */
  closed = false;

  constructor(owner: PumpOwner, from: PumpHandle) {
    this.owner = owner;
    this.from = from;
  }

  /**
   * Writes `data` to `to`. A write libuv has to queue holds its bytes until done; past the
   * high-water mark of queued copies, reading `from` stops.
   */
  send(data: Buffer, inPlace: boolean): SendResult {
    const to = this.to!;
    const req = nextWrite ??= pendingWrite();
    const err = to.writeBuffer(req, data);
    if (err !== 0) {
      this.owner.failed(err);
      return FAILED;
    }
    if (!lastWriteQueued()) return WRITTEN;
    nextWrite = pendingWrite();
    req.oncomplete = onWriteDone;
    req.dir = this;
    req.inPlace = inPlace;
    req.data = data;
    this.pending++;
    if (!inPlace && to.writeQueueSize >= HIGH_WATER_MARK) {
      this.full = true;
      this.pause();
    }
    return QUEUED;
  }

  /**
   * `n` bytes were read: write them on, out of the scratch buffer as a copy (the next read of any
   * handle overwrites it), out of the direction's own buffers in place. A read that filled the
   * scratch buffer means a bulk transfer: the direction gets buffers of its own (see Bulk).
   * Returns the buffer the next read goes into when that changes.
   */
  relay(n: number): Buffer | undefined {
    this.bytes += n;
    const bulk = this.bulk;
    if (bulk === null) {
      const data = Buffer.allocUnsafe(n);
      scratch.copy(data, 0, 0, n);
      if (this.send(data, false) === FAILED || n < BULK_READ) return undefined;
      const next = new Bulk();
      this.bulk = next;
      return next.reading;
    }
    const buf = bulk.reading;
    if (this.send(n === buf.length ? buf : buf.subarray(0, n), true) !== QUEUED) return undefined;
    // The buffer just read into is being written out: read into the other one meanwhile, or,
    // with both written out, stop until they are done (the later one is where reading resumes).
    if (++bulk.writing === 1) {
      bulk.other ??= bulkBuffer();
      bulk.reading = bulk.other;
      bulk.other = buf;
      return bulk.reading;
    }
    this.busy = true;
    this.pause();
    return undefined;
  }

  /** Stops reading `from`. */
  pause(): void {
    if (!this.reading) return;
    this.reading = false;
    this.from.readStop();
  }

  /** Reads `from` again, unless it ended or this direction is held back. */
  resume(): void {
    if (this.reading || this.eof || this.busy || this.full) return;
    this.reading = true;
    const err = this.from.readStart();
    if (err !== 0) this.owner.failed(err);
  }

  /**
   * `from` sent its FIN: it becomes a FIN to `to` (a shutdown, which libuv sends after every
   * queued write), and the other direction keeps flowing (half-close). The shutdown has no
   * completion callback (Node calls none for a request without `oncomplete`): nothing waits for
   * it, since closing a handle with its writes done sends the FIN too, and a peer that reset shows
   * in reads. Unless `to` already sent its own: then nothing is left to say.
   */
  end(): void {
    this.eof = true;
    this.reading = false;
    if (!this.reverse!.eof) {
      const err = this.to!.shutdown(newShutdownRequest());
      if (err !== 0) {
        this.owner.failed(err);
        return;
      }
    }
    this.owner.settled();
  }

  /**
   * The direction quiet for a while: `from` reads into the scratch buffer again and its bulk
   * buffers are given back, unless a write still holds one. useUserBuffer adds a small listener to
   * the handle each time (freed with it): once per quiet second at most, never per read.
   */
  quiet(): void {
    const bulk = this.bulk;
    if (bulk === null || bulk.writing !== 0) return;
    this.from.useUserBuffer(scratch);
    bulk.release();
    this.bulk = null;
  }

  /** The handles are closed: what no write holds can serve another direction. */
  release(): void {
    this.closed = true;
    this.bulk?.release();
    this.bulk = null;
  }
}

/**
 * onread of every handle the relay reads (client and backend alike), `this` = the handle: the byte
 * count (or EOF, or an error) is in readResult(). A Buffer returned is where libuv reads next (a
 * direction switching buffers). A handle whose direction is not set yet reads nothing.
 */
export function onRead(this: PumpHandle): Buffer | undefined {
  const dir = this[kDirection];
  if (dir === undefined) return undefined;
  const n = readResult();
  if (n > 0) return dir.owner.read(dir, n);
  if (n < 0) dir.owner.readEnded(dir, n);
  return undefined;
}

function onWriteDone(this: PendingWrite, status: number): void {
  const dir = this.dir!;
  const inPlace = this.inPlace;
  this.dir = null;
  this.data = null;
  if (dir.closed) return;
  dir.pending--;
  if (status < 0) {
    dir.owner.failed(status);
    return;
  }
  if (inPlace && --dir.bulk!.writing === 0) dir.busy = false;
  if (dir.to!.writeQueueSize <= LOW_WATER_MARK) dir.full = false;
  dir.resume();
  dir.owner.settled();
}

/** Whether a read result is the end of the stream (as opposed to an error). */
export function isEof(code: number): boolean {
  return code === UV_EOF;
}

/** The name of a libuv error: a reset (ECONNRESET, EPIPE) or another one. */
export function isReset(code: number): boolean {
  const name = errorName(code);
  return name === 'ECONNRESET' || name === 'EPIPE';
}
