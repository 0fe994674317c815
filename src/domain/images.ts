// The checks an image passes before it becomes (or, at start, stays) a disk
// of a domain. An image never chooses host files: its format is the declared
// one (read with `qemu-img info -f FORMAT`, never probed), a qcow2 whose header
// names a backing file is refused (chains are not supported yet, and QEMU
// opens disks with backing: null), and what qbackup cannot honour in the
// definition (<encryption>, a declared <backingStore> chain of files) is
// refused rather than kept and ignored. The one declared backing accepted is a
// raw NBD export on a unix socket under a qcow2 image (an instant restore):
// the definition names it, never the image. Identity is the file (device + inode), so a hard link
// is the same image as its other names.

import { existsSync, statSync } from 'node:fs';
import { QbackupError, describeError } from '../errors.js';
import { imageInfo } from '../image/qemu-img.js';
import type { DiskDefinition } from '../model/definition.js';

/** Refuses a disk whose definition asks for what qbackup cannot pass to QEMU. */
export function refuseUnsupportedDisk(domain: string, disk: DiskDefinition): void {
  if (disk.encryption !== undefined) {
    const format = disk.encryption === '' ? '' : ` format='${disk.encryption}'`;
    throw new QbackupError(
      'NOT_SUPPORTED',
      `Cannot use disk "${disk.target}" of domain "${domain}": it asks for <encryption${format}>, and qbackup cannot pass encryption secrets to QEMU yet`,
    );
  }
  if (disk.nbdBacking !== undefined && (disk.format !== 'qcow2' || disk.readonly)) {
    throw new QbackupError(
      'NOT_SUPPORTED',
      `Cannot use disk "${disk.target}" of domain "${domain}": an NBD <backingStore> needs a writable qcow2 image above it`,
    );
  }
  if (disk.backingStore !== undefined) {
    const named = disk.backingStore === '' ? '' : ` ("${disk.backingStore}")`;
    throw new QbackupError(
      'NOT_SUPPORTED',
      `Cannot use disk "${disk.target}" of domain "${domain}": it declares a <backingStore> chain${named}, which qbackup does not support yet`,
    );
  }
}

/**
 * Checks that the image of `disk` exists, opens as its declared format and
 * names no backing file. `subject` starts the error sentence, e.g.
 * `Cannot use image "/x.qcow2" for disk "sdb" of domain "vm": it` or
 * `Cannot start domain "vm": image "/x.qcow2" of disk "sdb"`.
 */
export async function checkDiskImage(disk: DiskDefinition, subject: string): Promise<void> {
  if (!existsSync(disk.source)) {
    throw new QbackupError('IMAGE_NOT_FOUND', `${subject} does not exist`);
  }
  let backing: string | undefined;
  try {
    // -U: a running QEMU (this domain's, at a live attach of a shared image) may hold it.
    backing = (await imageInfo(disk.source, disk.format, { shared: true })).backingFilename;
  } catch (err) {
    throw new QbackupError('IMAGE_ERROR', `${subject} cannot be opened as ${disk.format}: ${describeError(err)}`, { cause: err });
  }
  if (backing !== undefined) {
    throw new QbackupError(
      'NOT_SUPPORTED',
      `${subject} names the backing file "${backing}" in its header, and qbackup does not follow backing files (declared or not) yet`,
    );
  }
}

/** The file behind a path, as "device:inode"; undefined when it cannot be read. */
export function imageIdentity(path: string): string | undefined {
  try {
    const st = statSync(path, { bigint: true });
    return `${st.dev}:${st.ino}`;
  } catch {
    return undefined;
  }
}
