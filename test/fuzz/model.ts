// The oracle's pure model of one domain: what every disk holds byte for byte,
// which disks are attached where, the checkpoint chain and, per checkpoint and
// disk, the content when it was taken, the 64 KiB clusters written since and
// why coverage was lost; and the repository backups (those not pruned) with
// their content and disks. A disk's size changes with a resize: its content is
// cut or extended with zeroes, so a shrink and a grow back read zeroes in the
// regrown area.
// No I/O: the action generator simulates on it, the driver keeps it in step
// with the real domain, and the checks compare QEMU's bytes and qbackup's
// claims against it.
//
// Names are the model's own: disks are "disk0", "disk1", … (the driver maps them
// to image files), checkpoints keep the names the actions gave them, and a
// repository backup's checkpoint is known by its alias "r<N>" (the library picks
// the real name; the driver maps it).

import type { CoverageReason } from '../../src/checkpoint/coverage.js';

/** QEMU's default bitmap granularity (capped at 64 KiB). */
export const GRAIN = 65536;
/** The sizes a resize stays within. */
export const MIN_DISK_BYTES = 1 << 20;
export const MAX_DISK_BYTES = 6 << 20;
/** Targets handed out in order, first free first. */
const TARGETS = ['sda', 'sdb', 'sdc', 'sdd', 'sde', 'sdf', 'sdg', 'sdh', 'sdi', 'sdj'];

export interface DiskSpec {
  name: string;
  sizeBytes: number;
  clusterSizeBytes: number;
}

export interface DiskModel extends DiskSpec {
  content: Buffer;
  /** Attached as this target, or undefined while detached. */
  target: string | undefined;
}

export interface CheckpointDiskModel {
  contentAt: Buffer;
  dirty: Set<number>;
  lost: Set<CoverageReason>;
}

export interface CheckpointModel {
  name: string;
  /** Per disk that took part. */
  disks: Map<string, CheckpointDiskModel>;
}

export interface RepoBackupModel {
  alias: string;
  /** Content at the backup's start, by the target the disk had then (its length is the disk's size then). */
  contents: Map<string, Buffer>;
  /** The disks it holds (model names). */
  disks: Set<string>;
}

/** Why the repository must back a disk up in full: a coverage reason, or no usable earlier backup. */
export type RepoFullReason = CoverageReason | 'no-earlier-backup';

export class Model {
  readonly disks: DiskModel[] = [];
  readonly chain: CheckpointModel[] = [];
  /** The repository's backups of the domain, oldest first (pruned ones are gone). */
  readonly repoBackups: RepoBackupModel[] = [];
  /**
   * libvirt's driver: a repository keeps one checkpoint, its latest backup's;
   * the earlier ones are deleted (libvirt merges their bitmaps) once the next
   * backup committed.
   */
  latestCheckpointOnly = false;

  attached(): DiskModel[] {
    return this.disks.filter((d) => d.target !== undefined);
  }

  disk(name: string): DiskModel | undefined {
    return this.disks.find((d) => d.name === name);
  }

  byTarget(target: string): DiskModel | undefined {
    return this.disks.find((d) => d.target === target);
  }

  checkpoint(name: string): CheckpointModel | undefined {
    return this.chain.find((c) => c.name === name);
  }

  freeTarget(): string {
    const t = TARGETS.find((x) => !this.disks.some((d) => d.target === x));
    if (t === undefined) throw new Error('model: no free target');
    return t;
  }

  /** A new, zeroed, detached disk. */
  addDisk(spec: DiskSpec): DiskModel {
    const d: DiskModel = { ...spec, content: Buffer.alloc(spec.sizeBytes), target: undefined };
    this.disks.push(d);
    return d;
  }

  attach(d: DiskModel): string {
    d.target = this.freeTarget();
    return d.target;
  }

  /** Detaching loses coverage from every checkpoint the disk was in (the image may change while away). */
  detach(d: DiskModel): void {
    d.target = undefined;
    this.lose(d, 'detached-since');
  }

  /** A write of `pattern` (0 for write-zeroes and discard) by the guest; range already clipped. */
  write(d: DiskModel, offset: number, length: number, pattern: number): void {
    d.content.fill(pattern, offset, offset + length);
    for (const cp of this.chain) {
      const entry = cp.disks.get(d.name);
      if (entry === undefined) continue;
      for (let c = Math.floor(offset / GRAIN); c * GRAIN < offset + length; c++) entry.dirty.add(c);
    }
  }

  /**
   * A resize to `sizeBytes` (a multiple of the disk's cluster size): the
   * content is cut or extended with zeroes, and every checkpoint with a bitmap
   * on the disk loses coverage ("resized"); later checkpoints start clean. The
   * same size is no change.
   */
  resize(d: DiskModel, sizeBytes: number): void {
    if (sizeBytes === d.sizeBytes) return;
    const content = Buffer.alloc(sizeBytes);
    d.content.copy(content, 0, 0, Math.min(sizeBytes, d.content.length));
    d.content = content;
    d.sizeBytes = sizeBytes;
    this.lose(d, 'resized');
  }

  /** A write while detached: no bitmap sees it (coverage is already lost by the detach). */
  writeOffline(d: DiskModel, offset: number, length: number, pattern: number): void {
    d.content.fill(pattern, offset, offset + length);
  }

  addCheckpoint(name: string): CheckpointModel {
    const cp: CheckpointModel = { name, disks: new Map() };
    for (const d of this.attached()) cp.disks.set(d.name, { contentAt: Buffer.from(d.content), dirty: new Set(), lost: new Set() });
    this.chain.push(cp);
    return cp;
  }

  /** Removes `name` (and, with children, every later checkpoint). Coverage of the earlier ones is kept by the merge. */
  deleteCheckpoint(name: string, children: boolean): string[] {
    const idx = this.chain.findIndex((c) => c.name === name);
    if (idx < 0) return [];
    return this.chain.splice(idx, children ? this.chain.length - idx : 1).map((c) => c.name);
  }

  /** QEMU killed: bitmaps of the run are gone and loaded ones inconsistent. */
  crash(): void {
    for (const cp of this.chain) {
      for (const e of cp.disks.values()) {
        e.lost.add('bitmap-missing');
        e.lost.add('bitmap-inconsistent');
      }
    }
  }

  private lose(d: DiskModel, reason: CoverageReason): void {
    for (const cp of this.chain) cp.disks.get(d.name)?.lost.add(reason);
  }

  /** The coverage rules for disk d since checkpoint T: undefined = incremental, else the acceptable reasons for a full. */
  expectedFull(since: string, d: DiskModel): Set<CoverageReason> | undefined {
    const idx = this.chain.findIndex((c) => c.name === since);
    if (idx < 0) return new Set(['checkpoint-missing']);
    const reasons = new Set<CoverageReason>();
    for (const cp of this.chain.slice(idx)) if (!cp.disks.has(d.name)) reasons.add('not-in-checkpoint');
    for (const r of this.chain[idx]?.disks.get(d.name)?.lost ?? []) reasons.add(r);
    return reasons.size === 0 ? undefined : reasons;
  }

  /** Checkpoints from which at least one attached disk is still covered, oldest first. */
  covered(): CheckpointModel[] {
    return this.chain.filter((c) => this.attached().some((d) => this.expectedFull(c.name, d) === undefined));
  }

  /** The newest repository backup that holds d: the one its next repository backup builds on. */
  lastRepo(d: DiskModel): RepoBackupModel | undefined {
    return [...this.repoBackups].reverse().find((b) => b.disks.has(d.name));
  }

  /** The repository's rule for d: undefined = incremental since its last backup's checkpoint, else the acceptable reasons for a full. */
  expectedRepoFull(d: DiskModel): Set<RepoFullReason> | undefined {
    const last = this.lastRepo(d);
    return last === undefined ? new Set(['no-earlier-backup']) : this.expectedFull(last.alias, d);
  }

  /** The level the repository must choose for d: incremental when its last backup's checkpoint still covers it. */
  expectedRepoLevel(d: DiskModel): 'full' | 'incremental' {
    return this.expectedRepoFull(d) === undefined ? 'incremental' : 'full';
  }

  /** The 64 KiB clusters of d written since its last repository backup (empty when it has none or its checkpoint is gone). */
  dirtySinceRepo(d: DiskModel): Set<number> {
    const last = this.lastRepo(d);
    return new Set(last === undefined ? [] : (this.checkpoint(last.alias)?.disks.get(d.name)?.dirty ?? []));
  }

  /** Records a successful repository backup taken at this instant, with checkpoint alias `alias`. */
  addRepoBackup(alias: string): RepoBackupModel {
    const attached = this.attached();
    const b: RepoBackupModel = { alias, contents: new Map(attached.map((d) => [d.target ?? '', Buffer.from(d.content)])), disks: new Set(attached.map((d) => d.name)) };
    this.repoBackups.push(b);
    this.addCheckpoint(alias);
    if (this.latestCheckpointOnly) for (const earlier of this.repoBackups) if (earlier.alias !== alias) this.deleteCheckpoint(earlier.alias, false);
    return b;
  }

  /** keep-last `keep`: removes the older backups and merges their checkpoints away; returns the removed ones, oldest first. */
  pruneRepo(keep: number): RepoBackupModel[] {
    const removed = this.repoBackups.splice(0, Math.max(0, this.repoBackups.length - keep));
    for (const b of removed) this.deleteCheckpoint(b.alias, false);
    return removed;
  }

  /** Per attached disk: its content now. */
  snapshot(): Map<string, Buffer> {
    return new Map(this.attached().map((d) => [d.name, Buffer.from(d.content)]));
  }
}
