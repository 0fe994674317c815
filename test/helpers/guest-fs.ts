// Guest disks with real filesystems for the file-level restore tests, made on
// the host without mounting anything: each filesystem is built in a file
// (mkfs.ext4 -d copies a directory tree with its modes, owners, times and
// symlinks; mkfs.vfat + mcopy for the vfat one), then copied into its
// partition of a raw disk partitioned by sfdisk; LVM, which needs a kernel,
// is built by guestfish inside its own appliance. The partition offsets are
// returned so a test can write a changed filesystem into a running domain's
// disk as its guest would.

import { chmodSync, lchownSync, mkdirSync, symlinkSync, utimesSync, writeFileSync, lutimesSync, chownSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { runTool } from '../../src/image/tools.js';

export const MiB = 1024 * 1024;

/** One entry of a tree to build: a file (text or bytes), a directory or a symlink. */
export interface TreeEntry {
  path: string;
  data?: string | Buffer;
  dir?: boolean;
  link?: string;
  mode?: number;
  uid?: number;
  gid?: number;
  /** Seconds since the epoch (atime and mtime). */
  time?: number;
}

/** Writes a tree under `root` (parents first; directory times after their contents). */
export function writeTree(root: string, entries: readonly TreeEntry[]): void {
  mkdirSync(root, { recursive: true });
  for (const e of entries) {
    const p = join(root, e.path);
    mkdirSync(dirname(p), { recursive: true });
    if (e.dir === true) mkdirSync(p, { recursive: true });
    else if (e.link !== undefined) symlinkSync(e.link, p);
    else writeFileSync(p, e.data ?? '');
    if (e.link === undefined && e.mode !== undefined) chmodSync(p, e.mode);
    if (e.uid !== undefined) (e.link !== undefined ? lchownSync : chownSync)(p, e.uid, e.gid ?? e.uid);
  }
  // Times last, deepest first, so writing children does not move a directory's mtime afterwards.
  for (const e of [...entries].sort((a, b) => b.path.split('/').length - a.path.split('/').length)) {
    if (e.time === undefined) continue;
    const p = join(root, e.path);
    if (e.link !== undefined) lutimesSync(p, e.time, e.time);
    else utimesSync(p, e.time, e.time);
  }
}

export interface PartitionedDisk {
  file: string;
  sizeBytes: number;
  /** Byte offset and length of each partition (1-based number → extent). */
  partitions: Map<number, { offset: number; length: number }>;
}

/** An ext4 filesystem image holding `tree` (labelled). */
export async function ext4Image(file: string, tree: string, sizeBytes: number, label: string, uuid: string): Promise<void> {
  await runTool('mkfs.ext4', ['-q', '-F', '-L', label, '-U', uuid, '-d', tree, '-E', 'root_owner=0:0', '-b', '4096', file, `${sizeBytes / 1024}k`]);
}

/** A vfat filesystem image holding the files of `files` (name → text), times kept (vfat stores local time: written as UTC, as the appliance reads it). */
export async function vfatImage(file: string, sizeBytes: number, label: string, files: ReadonlyArray<{ name: string; path: string }>): Promise<void> {
  await runTool('mkfs.vfat', ['-C', '-n', label, '-i', '1234abcd', file, String(sizeBytes / 1024)]);
  for (const f of files) await runTool('env', ['TZ=UTC0', 'mcopy', '-m', '-i', file, f.path, `::/${f.name}`]);
}

/**
 * Runs a guestfish script (one command a line) in its own libguestfs appliance
 * under software emulation, for what only a kernel can build (LVM): the host
 * kernel never sees the disks. `drives` are raw files, /dev/sda, /dev/sdb, …
 * in order. Returns guestfish's output.
 */
export async function guestfish(drives: readonly string[], script: readonly string[]): Promise<string> {
  const lines = ['set-backend direct', 'set-backend-settings force_tcg', ...drives.map((d) => `add-drive ${d} format:raw`), 'run', ...script, ''];
  const r = await runTool('guestfish', [], { input: lines.join('\n') });
  return r.stdout;
}

/** A raw disk with an MBR and one partition per image (types: 83 Linux, c FAT32 LBA), each image copied in. */
export async function partitionedDisk(file: string, sizeBytes: number, parts: ReadonlyArray<{ image: string; sizeBytes: number; type: string }>): Promise<PartitionedDisk> {
  await runTool('truncate', ['-s', String(sizeBytes), file]);
  const partitions = new Map<number, { offset: number; length: number }>();
  let at = MiB;
  const script: string[] = ['label: dos'];
  parts.forEach((p, i) => {
    script.push(`start=${at / 512}, size=${p.sizeBytes / 512}, type=${p.type}`);
    partitions.set(i + 1, { offset: at, length: p.sizeBytes });
    at += p.sizeBytes;
  });
  const scriptFile = `${file}.sfdisk`;
  writeFileSync(scriptFile, `${script.join('\n')}\n`);
  await runTool('sh', ['-c', `sfdisk -q "$1" < "$2"`, 'sh', file, scriptFile]);
  for (const [i, p] of parts.entries()) {
    const ext = partitions.get(i + 1);
    if (ext === undefined) continue;
    await runTool('dd', [`if=${p.image}`, `of=${file}`, 'bs=1M', `seek=${ext.offset / MiB}`, 'conv=notrunc', 'status=none']);
  }
  return { file, sizeBytes, partitions };
}
