// qemu-img operations on image files that no running QEMU is writing:
// reading their header, creating, and (for offline checkpoints) persistent
// bitmap maintenance. Every call names the image's format (-f): a format is
// never probed, so a guest that writes a qcow2 header into a raw disk cannot
// change how qbackup reads it. Images qbackup creates are owner-only (0600)
// whatever the umask: they hold whole disks.

import { chmodSync, closeSync, constants, fchmodSync, openSync } from 'node:fs';
import { QbackupError, describeError } from '../errors.js';
import { runTool } from './tools.js';

export type ImageFormat = 'qcow2' | 'raw';

export interface ImageBitmapInfo {
  name: string;
  granularity: number;
  /** Flags as qemu-img reports them: "auto" = enabled (recording), "in-use" = not stored cleanly. */
  flags: string[];
}

export interface ImageInfo {
  filename: string;
  format: string;
  virtualSize: number;
  actualSize?: number;
  clusterSize?: number;
  backingFilename?: string;
  bitmaps: ImageBitmapInfo[];
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

export function parseImageInfo(json: string): ImageInfo {
  const raw: unknown = JSON.parse(json);
  if (!isRecord(raw) || typeof raw['format'] !== 'string' || typeof raw['virtual-size'] !== 'number') {
    throw new QbackupError('IMAGE_ERROR', 'qemu-img info returned an unexpected document');
  }
  const info: ImageInfo = {
    filename: String(raw['filename'] ?? ''),
    format: raw['format'],
    virtualSize: raw['virtual-size'],
    bitmaps: [],
  };
  if (typeof raw['actual-size'] === 'number') info.actualSize = raw['actual-size'];
  if (typeof raw['cluster-size'] === 'number') info.clusterSize = raw['cluster-size'];
  if (typeof raw['backing-filename'] === 'string') info.backingFilename = raw['backing-filename'];
  const specific = raw['format-specific'];
  if (isRecord(specific) && isRecord(specific['data']) && Array.isArray(specific['data']['bitmaps'])) {
    for (const b of specific['data']['bitmaps'] as unknown[]) {
      if (!isRecord(b) || typeof b['name'] !== 'string') continue;
      info.bitmaps.push({
        name: b['name'],
        granularity: typeof b['granularity'] === 'number' ? b['granularity'] : 0,
        flags: Array.isArray(b['flags']) ? (b['flags'] as unknown[]).map(String) : [],
      });
    }
  }
  return info;
}

/**
 * The header of `file` read as `format` (qemu-img fails when it is not one);
 * the backing file is reported, never opened. `shared` (-U) reads an image
 * that a running QEMU holds open.
 */
export async function imageInfo(file: string, format: ImageFormat, options: { shared?: boolean } = {}): Promise<ImageInfo> {
  const args = ['info', '--output=json', '-f', format];
  if (options.shared) args.push('-U');
  args.push('--', file);
  const { stdout } = await runTool('qemu-img', args, { what: `Reading image "${file}"` });
  return parseImageInfo(stdout);
}

/** How often a LUKS image's creation is tried when QEMU's key-derivation timing reads no CPU time. */
const LUKS_CREATE_ATTEMPTS = 50;

/** Creates (or truncates) `file` as an image, mode 0600 before qemu-img writes anything into it. */
export async function createImage(
  file: string,
  format: ImageFormat,
  sizeBytes: number,
  options: { clusterSizeBytes?: number; backingFile?: string; backingFormat?: string; luksSecretFile?: string } = {},
): Promise<void> {
  try {
    // Never through a planted symlink: a new file, or an existing regular one truncated. A /proc/PID/fd/N
    // name (a file created exclusively by util/safe-create.ts) is a link by nature and is opened as it is.
    const byDescriptor = /^\/proc\/(self|\d+)\/fd\/\d+$/.test(file);
    const flags = byDescriptor ? constants.O_WRONLY | constants.O_TRUNC : constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW;
    const fd = openSync(file, flags, 0o600);
    try {
      fchmodSync(fd, 0o600);
    } finally {
      closeSync(fd);
    }
  } catch (err) {
    throw new QbackupError('TOOL_FAILED', `Creating image "${file}" failed: ${describeError(err)}`, { cause: err });
  }
  const args = ['create', '-q', '-f', format];
  const opts: string[] = [];
  if (options.clusterSizeBytes !== undefined) opts.push(`cluster_size=${options.clusterSizeBytes}`);
  if (options.luksSecretFile !== undefined) {
    // QEMU option syntax: a comma in a value is written twice.
    args.push('--object', `secret,id=qbsec0,file=${options.luksSecretFile.replace(/,/g, ',,')}`);
    opts.push('encrypt.format=luks', 'encrypt.key-secret=qbsec0');
  }
  if (opts.length > 0) args.push('-o', opts.join(','));
  if (options.backingFile !== undefined) {
    args.push('-b', options.backingFile, '-F', options.backingFormat ?? 'qcow2');
    // An encrypted backing file cannot be opened without its secret; the size is given, so it need not be.
    if (options.luksSecretFile !== undefined) args.push('-u');
  }
  args.push(file, String(sizeBytes));
  // LUKS creation times its key derivation by the thread's CPU time, and its
  // first probe (2^15 iterations) often finishes inside one scheduler tick, so
  // QEMU reads no CPU time and gives up ("Unable to get accurate CPU usage").
  // On this class of machine that happens to about one run in three, in ~10 ms,
  // before anything is written. It is a failed measurement, not a failed image,
  // so it is tried again; 50 attempts make a spurious failure vanishingly rare.
  for (let attempt = 1; ; attempt++) {
    try {
      await runTool('qemu-img', args, { what: `Creating image "${file}"` });
      break;
    } catch (err) {
      if (options.luksSecretFile === undefined || attempt >= LUKS_CREATE_ATTEMPTS || !/Unable to get accurate CPU usage/.test(describeError(err))) throw err;
    }
  }
  // qemu-img reopens the file it creates; make sure nothing widened the mode.
  chmodSync(file, 0o600);
}

/** Bytes of data stored in this file itself (not its backing chain, not zero clusters). */
export async function allocatedDataBytes(file: string, format: ImageFormat = 'qcow2'): Promise<number> {
  const { stdout } = await runTool('qemu-img', ['map', '--output=json', '-f', format, '--', file], { what: `Mapping image "${file}"` });
  const map = JSON.parse(stdout) as Array<{ length: number; depth: number; data: boolean }>;
  return map.filter((e) => e.depth === 0 && e.data).reduce((a, e) => a + e.length, 0);
}
