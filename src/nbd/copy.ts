// Copies the changed (or all) bytes of one NBD export into another: the data
// path of a backup, from a QEMU export of a disk into a qcow2 target.
//
// Invariants:
// - Only extents whose dirty bit is set in `dirtyContext` are touched when it
//   is given; everything else is left to the target's backing chain.
// - Zeroes are never sent as data: extents the source's base:allocation
//   reports as NBD_STATE_ZERO, and data chunks that read as all zeroes,
//   become NBD_CMD_WRITE_ZEROES without NBD_CMD_FLAG_NO_HOLE. On a qcow2
//   target with a backing file qemu records those as zero clusters, so an
//   extent that is zero now can never show the older data beneath it.
// - At most maxInFlight copy operations run at once, each with one request
//   in flight on each side, each reading into a buffer of its own that is
//   reused (no allocation per piece).
// - The first failure stops new work; the copy rejects with it once the
//   operations already running have settled. The target is flushed only
//   after everything succeeded.

import { runPool } from '../util/run-pool.js';
import { QbackupError } from '../errors.js';
import type { NbdClient, NbdExtent } from './client.js';
import { NBD_CONTEXT_BASE_ALLOCATION, NBD_STATE_DIRTY, NBD_STATE_ZERO } from './constants.js';

export interface CopyExtentsOptions {
  /** Metadata context of the source whose bit 0 marks what to copy, e.g. "qemu:dirty-bitmap:backup-sda". Default: copy everything. */
  dirtyContext?: string;
  /** Copy operations running at once. Default 8. */
  maxInFlight?: number;
  /** Bytes per read/write. Default 4 MiB; capped by what both exports accept. */
  chunkBytes?: number;
  /** Called after each finished piece with the bytes done so far and the bytes to copy in all. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
}

export interface CopyExtentsResult {
  /** Bytes written as data. */
  dataBytes: number;
  /** Bytes written as zeroes (NBD_CMD_WRITE_ZEROES). */
  zeroBytes: number;
}

const DEFAULT_MAX_IN_FLIGHT = 8;
const DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024;

/** Refuses a copy the two exports cannot do: different sizes, a read-only target, a missing context. */
function checkCopyable(source: NbdClient, target: NbdClient, dirtyContext: string | undefined): void {
  if (source.size !== target.size) {
    throw new QbackupError(
      'INVALID_ARGUMENT',
      `Cannot copy NBD export "${source.exportName}" (${source.size} bytes) into "${target.exportName}" (${target.size} bytes): sizes differ`,
      { details: { source: source.exportName, target: target.exportName } },
    );
  }
  if (target.readOnly) {
    throw new QbackupError('NOT_SUPPORTED', `Cannot copy into NBD export "${target.exportName}": it is read-only`, { details: { target: target.exportName } });
  }
  if (!target.canWriteZeroes) {
    throw new QbackupError('NOT_SUPPORTED', `Cannot copy into NBD export "${target.exportName}": it does not support NBD_CMD_WRITE_ZEROES`, {
      details: { target: target.exportName },
    });
  }
  if (dirtyContext !== undefined && !source.contexts.has(dirtyContext)) {
    throw new QbackupError('NOT_SUPPORTED', `Cannot copy the changes of NBD export "${source.exportName}": context "${dirtyContext}" was not negotiated`, {
      details: { source: source.exportName, context: dirtyContext },
    });
  }
}

interface WorkItem {
  kind: 'data' | 'zero';
  offset: number;
  length: number;
}

export async function copyExtents(source: NbdClient, target: NbdClient, options: CopyExtentsOptions = {}): Promise<CopyExtentsResult> {
  const maxInFlight = options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT;
  if (!Number.isSafeInteger(maxInFlight) || maxInFlight < 1) {
    throw new QbackupError('INVALID_ARGUMENT', `maxInFlight must be a positive integer, got ${String(options.maxInFlight)}`);
  }
  const chunkBytes = chooseChunkBytes(source, target, options.chunkBytes ?? DEFAULT_CHUNK_BYTES);
  checkCopyable(source, target, options.dirtyContext);
  const dirtyContext = options.dirtyContext;
  const ranges: NbdExtent[] =
    dirtyContext === undefined
      ? source.size === 0
        ? []
        : [{ offset: 0, length: source.size, flags: NBD_STATE_DIRTY }]
      : (await source.extents(dirtyContext)).filter((e) => (e.flags & NBD_STATE_DIRTY) !== 0);
  const totalBytes = ranges.reduce((sum, r) => sum + r.length, 0);
  const useAllocation = source.contexts.has(NBD_CONTEXT_BASE_ALLOCATION);
  const zeroes = Buffer.alloc(chunkBytes);

  const result: CopyExtentsResult = { dataBytes: 0, zeroBytes: 0 };
  let doneBytes = 0;
  const work = workItems(source, ranges, useAllocation, chunkBytes);

  // One buffer per operation in flight, reused: a read lands in it and its
  // write has been answered (so sent) before it is handed out again.
  const buffers: Buffer[] = [];
  const copyOne = async (item: WorkItem): Promise<void> => {
    if (item.kind === 'data') {
      const buffer = buffers.pop() ?? Buffer.allocUnsafe(chunkBytes);
      try {
        const data = buffer.subarray(0, item.length);
        await source.readInto(item.offset, data);
        if (data.equals(zeroes.subarray(0, data.length))) {
          await target.writeZeroes(item.offset, item.length);
          result.zeroBytes += item.length;
        } else {
          await target.write(item.offset, data);
          result.dataBytes += item.length;
        }
      } finally {
        buffers.push(buffer);
      }
    } else {
      await target.writeZeroes(item.offset, item.length);
      result.zeroBytes += item.length;
    }
    doneBytes += item.length;
    options.onProgress?.(doneBytes, totalBytes);
  };

  await runPool(work, maxInFlight, copyOne);
  if (target.canFlush) await target.flush();
  return result;
}

/**
 * The pieces to copy, in offset order. Allocation is queried one dirty range
 * at a time, so the whole map of a large disk is never held at once.
 */
async function* workItems(source: NbdClient, ranges: readonly NbdExtent[], useAllocation: boolean, chunkBytes: number): AsyncGenerator<WorkItem, void, undefined> {
  for (const range of ranges) {
    const parts = useAllocation ? await source.extents(NBD_CONTEXT_BASE_ALLOCATION, range.offset, range.length) : [range];
    for (const part of parts) {
      if (useAllocation && (part.flags & NBD_STATE_ZERO) !== 0) {
        yield { kind: 'zero', offset: part.offset, length: part.length };
        continue;
      }
      for (let pos = part.offset; pos < part.offset + part.length; pos += chunkBytes) {
        yield { kind: 'data', offset: pos, length: Math.min(chunkBytes, part.offset + part.length - pos) };
      }
    }
  }
}

function chooseChunkBytes(source: NbdClient, target: NbdClient, requested: number): number {
  if (!Number.isSafeInteger(requested) || requested < 1) {
    throw new QbackupError('INVALID_ARGUMENT', `chunkBytes must be a positive integer, got ${String(requested)}`);
  }
  // Both minimum block sizes are powers of two, so the larger is a multiple of the smaller.
  const alignment = Math.max(source.blockSizes.minimum, target.blockSizes.minimum);
  const limit = Math.min(requested, source.maxTransferBytes, target.maxTransferBytes);
  const chunk = limit - (limit % alignment);
  if (chunk < alignment) {
    throw new QbackupError('INVALID_ARGUMENT', `chunkBytes ${requested} is smaller than the block size ${alignment} both exports need`);
  }
  return chunk;
}
