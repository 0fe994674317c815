// What a caller asks of a checkpoint, as a plain value. The libvirt layer
// (src/libvirt/checkpoint.ts) parses libvirt's checkpoint XML into this shape and
// formats checkpoints back; the core never sees XML.
//
// Invariants:
// - Checkpoint names match CHECKPOINT_NAME_PATTERN, so they are safe as file
//   names and QEMU bitmap names; violations are INVALID_NAME.
// - No checkpoint or bitmap name starts with TEMP_BITMAP_PREFIX: reconcile
//   sweeps bitmaps with that prefix.
// - `disks` undefined means every writable qcow2 disk takes part; an empty
//   array means none does.
// - `parent`, `creationTime` and `domainXml` describe an existing checkpoint and
//   are only accepted by redefine.

import { QbackupError } from '../errors.js';

export type CheckpointDiskType = 'bitmap' | 'no';

export interface CheckpointDiskSpec {
  /** The disk's target name, e.g. "vda". */
  name: string;
  /** 'bitmap' (the disk gets a bitmap) or 'no'. */
  checkpoint: CheckpointDiskType;
  /** The tracking bitmap's name (default: the checkpoint's name); only with 'bitmap'. */
  bitmap?: string;
  /** Estimated bytes changed since the checkpoint (output only). */
  size?: number;
}

export interface CheckpointSpec {
  /** Default: the creation time in seconds. */
  name?: string;
  description?: string;
  /** Redefine only: the parent checkpoint. */
  parent?: string;
  /** Redefine only: seconds since the Unix epoch. */
  creationTime?: number;
  disks?: CheckpointDiskSpec[];
  /** Redefine only: the domain definition at the checkpoint, as libvirt <domain> XML. */
  domainXml?: string;
}

/** Valid checkpoint names: usable as file names, no leading dot. */
export const CHECKPOINT_NAME_PATTERN = /^[a-zA-Z0-9_-][a-zA-Z0-9_.-]*$/;

/** Throws INVALID_NAME unless `name` matches CHECKPOINT_NAME_PATTERN. `what` starts the message. */
export function assertCheckpointName(name: string, what = 'Checkpoint name'): void {
  if (!CHECKPOINT_NAME_PATTERN.test(name)) {
    throw new QbackupError(
      'INVALID_NAME',
      `${what} ${JSON.stringify(name)} is invalid: use letters, digits, "_", "-" and "." (but no leading ".").`,
    );
  }
}

/** Prefix of the temporary, non-persistent bitmaps qbackup merges chains into. */
export const TEMP_BITMAP_PREFIX = 'qbackup-tmp-';

/** Names with the temporary prefix are swept by reconcile, so no checkpoint or bitmap may use one. */
export function assertNotTemporary(name: string): void {
  if (name.startsWith(TEMP_BITMAP_PREFIX)) {
    throw new QbackupError('INVALID_NAME', `Invalid name "${name}": names starting with "${TEMP_BITMAP_PREFIX}" are reserved for qbackup's temporary bitmaps`);
  }
}
