// The overlay of an instant restore's disk: a new qcow2 image whose zero
// ranges are allocated zero clusters, so reads there never reach the
// backing and the copy skips them (a sparse disk moves only its data). Its
// header names no backing file: the definition declares the backing.
//
// Invariant: the file is created exclusively, never through a planted
// symlink; the tools reach it by descriptor.

import { QbackupError } from '../errors.js';
import { createExclusiveFile } from '../util/safe-create.js';
import { createImage } from './qemu-img.js';
import { runTool } from './tools.js';

export async function createZeroOverlay(path: string, sizeBytes: number, zeroRanges: ReadonlyArray<{ offset: number; length: number }>): Promise<void> {
  await using overlay = await createExclusiveFile(path, `Cannot create overlay "${path}"`);
  await createImage(overlay.fdPath, 'qcow2', sizeBytes);
  if (zeroRanges.length === 0) return;
  const script = zeroRanges.map((r) => `write -z ${r.offset} ${r.length}\n`).join('');
  const { stdout, stderr } = await runTool('qemu-io', ['-f', 'qcow2', '--', overlay.fdPath], { input: script, what: `Marking the holes of overlay "${path}"`, errorCode: 'IMAGE_ERROR' });
  const failed = `${stdout}\n${stderr}`.split('\n').find((l) => /error|failed/i.test(l));
  if (failed !== undefined) throw new QbackupError('IMAGE_ERROR', `Cannot mark the holes of overlay "${path}": ${failed.trim()}`);
}
