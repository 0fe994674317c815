// The content digest recorded for every backed-up disk: a digest of the
// disk's whole logical content (what a guest would read), independent of how
// the qcow2 chain stores it. Defined as SHA-256 over, for each 1 MiB block in
// order, either the SHA-256 of the block or, for an all-zero block, a fixed
// marker; so sparse disks hash fast and any changed byte changes the digest.

import { createHash } from 'node:crypto';
import { runTool } from '../qemu/tools.js';

export const DIGEST_BLOCK_BYTES = 1 << 20;
const ZERO_MARKER = Buffer.from('qbackup-zero-block');
const ZERO_BLOCK = Buffer.alloc(DIGEST_BLOCK_BYTES);

/** Incremental computation over a byte stream of the logical content. */
export class ContentDigest {
  private readonly outer = createHash('sha256');
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  bytes = 0;

  update(chunk: Buffer): void {
    this.bytes += chunk.length;
    let rest = chunk;
    while (rest.length > 0) {
      const take = Math.min(rest.length, DIGEST_BLOCK_BYTES - this.pendingBytes);
      this.pending.push(rest.subarray(0, take));
      this.pendingBytes += take;
      rest = rest.subarray(take);
      if (this.pendingBytes === DIGEST_BLOCK_BYTES) this.flushBlock();
    }
  }

  digest(): string {
    if (this.pendingBytes > 0) this.flushBlock();
    return `sha256-blocks:${this.outer.digest('hex')}`;
  }

  private flushBlock(): void {
    const block = this.pending.length === 1 ? (this.pending[0] ?? Buffer.alloc(0)) : Buffer.concat(this.pending, this.pendingBytes);
    const zero = block.length === DIGEST_BLOCK_BYTES ? block.equals(ZERO_BLOCK) : block.equals(Buffer.alloc(block.length));
    this.outer.update(zero ? ZERO_MARKER : createHash('sha256').update(block).digest());
    this.pending = [];
    this.pendingBytes = 0;
  }
}

/**
 * Digest of an image (following its backing chain) as QEMU reads it: qemu-nbd
 * serves it read-only and nbdcopy streams the logical content into a pipe
 * (`qemu-img convert` cannot write to a pipe), so every format and chain is
 * handled alike.
 */
export async function imageDigest(file: string, format: 'qcow2' | 'raw', onBytes?: (bytes: number) => void): Promise<{ digest: string; bytes: number }> {
  const d = new ContentDigest();
  const args = ['--', '[', 'qemu-nbd', '--read-only', '--format', format, file, ']', '-'];
  await runTool('nbdcopy', args, {
    what: `Reading "${file}"`,
    errorCode: 'IMAGE_ERROR',
    onStdout: (b) => {
      d.update(b);
      onBytes?.(d.bytes);
    },
  });
  return { digest: d.digest(), bytes: d.bytes };
}
