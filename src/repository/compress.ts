// Chunk compression: zstd (level 1 by default), chosen by measuring on this
// kind of machine (docs/benchmarks.md): it gives up on incompressible data at
// about 1 GB/s and compresses text-like data better than lz4 at a similar
// speed. A chunk is stored raw whenever compression would not make it
// smaller, or when its head does not compress (compress() below).
//
// Invariants:
// - Decompression never allocates more than the caller's bound: the frame's
//   declared content size is read first and checked (hostile repositories).

import { createRequire } from 'node:module';
import { Compressor, Decompressor } from 'zstd-napi';
import { QbackupError } from '../errors.js';

interface ZstdBinding {
  getFrameContentSize(frame: Uint8Array): number | null;
}
const binding = createRequire(import.meta.url)('zstd-napi/binding') as ZstdBinding;

/** The head of a chunk compressed first, to tell whether the rest is worth it. */
const SAMPLE_BYTES = 4096;

export class ChunkCompressor {
  private readonly compressor = new Compressor();
  private readonly decompressor = new Decompressor();

  constructor(level = 1) {
    this.compressor.setParameters({ compressionLevel: level });
  }

  /**
   * The compressed bytes, or undefined when they would not be smaller than
   * `data`. A chunk whose first SAMPLE_BYTES do not shrink by an eighth is
   * not compressed at all (random or already compressed data: zstd would
   * spend its time and give nothing); it is stored raw, which every reader
   * reads, so the repository format does not change.
   */
  compress(data: Uint8Array): Buffer | undefined {
    if (data.length >= 4 * SAMPLE_BYTES) {
      const sample = this.compressor.compress(data.subarray(0, SAMPLE_BYTES));
      if (sample.length > SAMPLE_BYTES - SAMPLE_BYTES / 8) return undefined;
    }
    const out = this.compressor.compress(data);
    return out.length < data.length ? out : undefined;
  }

  /** The size a frame declares, or undefined when it is not a zstd frame or does not say. */
  contentSize(frame: Uint8Array): number | undefined {
    try {
      return binding.getFrameContentSize(frame) ?? undefined;
    } catch {
      return undefined; // not a frame: the caller reports the object as damaged
    }
  }

  /** Decompresses a frame that must yield exactly `expectedBytes`; `what` names it in errors. */
  decompress(frame: Uint8Array, expectedBytes: number, what: string): Buffer {
    let size: number | null;
    try {
      size = binding.getFrameContentSize(frame);
    } catch (err) {
      throw new QbackupError('REPO_DAMAGED', `${what} is damaged: not a zstd frame`, { cause: err });
    }
    if (size !== expectedBytes) throw new QbackupError('REPO_DAMAGED', `${what} is damaged: it declares ${size ?? 'an unknown number of'} bytes, expected ${expectedBytes}`);
    let out: Buffer;
    try {
      out = this.decompressor.decompress(frame);
    } catch (err) {
      throw new QbackupError('REPO_DAMAGED', `${what} is damaged: it does not decompress`, { cause: err });
    }
    if (out.length !== expectedBytes) throw new QbackupError('REPO_DAMAGED', `${what} is damaged: it decompresses to ${out.length} bytes, expected ${expectedBytes}`);
    return out;
  }
}
