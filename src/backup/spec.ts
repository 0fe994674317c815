// What a caller asks of a backup job, as a plain value: the mode, which disks
// and how (full, or incremental since a checkpoint), where push targets go,
// and where a pull job's NBD server listens. The libvirt layer
// (src/libvirt/backup.ts) maps libvirt's backup XML onto this; the repository, the
// CLI and embedding applications build it directly.
//
// Invariants (validateBackupSpec):
// - `disks` undefined means every writable disk; a listed disk takes part,
//   an unlisted one does not (libvirt's rule for <disks>).
// - A disk's `mode: 'full'` and its `since` exclude each other; with neither,
//   the disk follows the job's `since`.
// - Push disks may set `targetFile`; pull disks `scratchFile`, `exportName`,
//   `exportBitmap`; never the other mode's fields. Paths are absolute.
// - `server` only in pull mode: a unix socket path (absolute), or a TCP host
//   and port 1..65535 with an explicit TLS choice.
// - `encryption` (LUKS, the passphrase secret named by a lower-case UUID) is
//   for qcow2 targets and scratch images only; a raw one is NOT_SUPPORTED.

import { QbackupError } from '../errors.js';
import { assertCheckpointName } from '../checkpoint/spec.js';

export type BackupMode = 'push' | 'pull';
export type BackupDiskMode = 'full' | 'incremental';
export type BackupTargetFormat = 'qcow2' | 'raw';

/** Where a pull job's NBD server listens. */
export type NbdServerSpec = { transport: 'unix'; socket: string } | { transport: 'tcp'; host: string; port: number; tls: boolean };

export interface BackupDiskSpec {
  /** The disk's target name, e.g. "sda". */
  target: string;
  /** 'full' forces a full copy; 'incremental' (the default with a `since`) copies changes. */
  mode?: BackupDiskMode;
  /** This disk's checkpoint to copy changes since, overriding the job's. */
  since?: string;
  /** Format of the push target or the pull scratch image (default qcow2). */
  format?: BackupTargetFormat;
  /** Push: where the backup is written. Default: next to the disk, or in `targetDir`. */
  targetFile?: string;
  /** Pull: the temporary image that keeps the frozen view's old data. */
  scratchFile?: string;
  /** Pull: the NBD export name (default: the target name). */
  exportName?: string;
  /** Pull: the name of the exported dirty bitmap (default: backup-<target>). */
  exportBitmap?: string;
  /**
   * Write the push target or pull scratch image as a LUKS-encrypted qcow2;
   * the passphrase is the secret of that UUID (libvirt's <secret uuid=…>),
   * read from the backup service's secrets directory (STATE_DIR/secrets/UUID).
   */
  encryption?: { format: 'luks'; secret: string };
}

export interface BackupSpec {
  mode: BackupMode;
  /** The checkpoint to copy changes since; absent: a full backup. */
  since?: string;
  /** The disks taking part; absent: every writable disk. */
  disks?: BackupDiskSpec[];
  /** Pull mode: where to serve the exports; absent: a unix socket only the owner can reach. */
  server?: NbdServerSpec;
}

/** A secret's UUID: also its file name in the secrets directory, so nothing else may pass. */
const SECRET_UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Throws INVALID_ARGUMENT (or INVALID_NAME) when `spec` breaks an invariant listed above. */
export function validateBackupSpec(spec: BackupSpec, what = 'Backup description'): void {
  const fail = (message: string): never => {
    throw new QbackupError('INVALID_ARGUMENT', `${what} ${message}`);
  };
  if (spec.mode !== 'push' && spec.mode !== 'pull') fail(`has an invalid mode ${JSON.stringify(spec.mode)}: use push or pull.`);
  if (spec.since !== undefined) assertCheckpointName(spec.since, 'Incremental checkpoint name');
  const s = spec.server;
  if (s !== undefined) {
    if (spec.mode !== 'pull') fail('is a push-mode backup but names an NBD server, which only pull mode uses.');
    if (s.transport === 'unix') {
      if (!s.socket.startsWith('/')) fail(`has a relative socket path "${s.socket}"; it must be absolute.`);
    } else if (s.transport === 'tcp') {
      if (s.host === '') fail('has a tcp server without a host.');
      if (!Number.isInteger(s.port) || s.port < 1 || s.port > 65535) fail(`has an invalid server port ${s.port}: expected 1 to 65535.`);
    } else {
      fail('has an invalid server transport.');
    }
  }
  const seen = new Set<string>();
  for (const d of spec.disks ?? []) {
    if (d.target === '') fail('has a disk without a target name.');
    if (seen.has(d.target)) fail(`lists disk "${d.target}" more than once.`);
    seen.add(d.target);
    const disk = `disk "${d.target}"`;
    if (d.mode !== undefined && d.mode !== 'full' && d.mode !== 'incremental') fail(`gives ${disk} an invalid mode.`);
    if (d.since !== undefined) {
      assertCheckpointName(d.since, `Incremental checkpoint name of disk "${d.target}"`);
      if (d.mode === 'full') fail(`gives ${disk} a full mode and also a checkpoint to copy changes since.`);
    }
    if (d.format !== undefined && d.format !== 'qcow2' && d.format !== 'raw') fail(`gives ${disk} an invalid format.`);
    if (spec.mode === 'push') {
      if (d.scratchFile !== undefined || d.exportName !== undefined || d.exportBitmap !== undefined) {
        fail(`gives ${disk} a scratch file or export names, which only pull mode uses.`);
      }
    } else if (d.targetFile !== undefined) {
      fail(`gives ${disk} a target file, which only push mode uses.`);
    }
    if (d.exportName === '') fail(`gives ${disk} an empty export name.`);
    if (d.exportBitmap === '') fail(`gives ${disk} an empty export bitmap name.`);
    for (const [name, path] of [['target file', d.targetFile], ['scratch file', d.scratchFile]] as const) {
      if (path !== undefined && !path.startsWith('/')) fail(`gives ${disk} a relative ${name} "${path}"; it must be absolute.`);
    }
    if (d.encryption !== undefined) {
      if (d.encryption.format !== 'luks') fail(`gives ${disk} an encryption format other than luks.`);
      if (!SECRET_UUID.test(d.encryption.secret)) fail(`gives ${disk} an encryption secret "${d.encryption.secret}" that is not a lower-case UUID.`);
      if (d.format === 'raw') {
        throw new QbackupError('NOT_SUPPORTED', `${what} asks for an encrypted raw image for ${disk}; qbackup encrypts qcow2 only (refusing rather than writing it unencrypted).`);
      }
    }
  }
}
