// The oracle's checks: what a user cares about, compared with the model.
// - content: a push backup (with its backing chain, or laid over the model's
//   content at T when it has none), a pull export read while the guest writes,
//   and a repository restore equal, byte for byte, the disk at the job's start;
// - never a missed block: an exported dirty map holds every cluster written since T;
// - no over-statement and no free pass: a disk the model says is covered is
//   backed up incrementally, with no more data than the clusters dirtied since
//   T (+ SLACK_CLUSTERS); a disk that lost coverage is full with a reason the
//   model accepts; checkpoint-coverage says the same; a repository backup
//   picks the level (and a full's reason) the model expects, and an
//   incremental reads no more than the clusters dirtied since the disk's last
//   repository backup (incremental = proportional);
// - the repository after prune, gc and verify: exactly the kept backups are
//   listed, each restores, verify --read-data finds no problem;
// - the checkpoints in the metadata are exactly the model's.
// A failed check throws OracleFailure with a stable `check` code, which the
// shrinker uses to tell "the same failure" from another one.

import { execFileSync } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { exportUri, type JobDisk, type JobInfo } from '../../src/backup/job.js';
import type { CoverageReason, DiskCoverage } from '../../src/checkpoint/coverage.js';
import { allocatedDataBytes } from '../../src/image/qemu-img.js';
import { runTool } from '../../src/image/tools.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { GRAIN, type Model, type RepoFullReason } from './model.js';

/** Allowed extra data in an incremental, in clusters per disk. */
export const SLACK_CLUSTERS = 0;

export type CheckCode = 'content' | 'mode' | 'reason' | 'size' | 'dirty-map' | 'checkpoints' | 'coverage' | 'job' | 'fault' | 'prune' | 'verify' | 'error';

export class OracleFailure extends Error {
  constructor(
    readonly check: CheckCode,
    message: string,
  ) {
    super(message);
  }
}

export function fail(check: CheckCode, message: string): never {
  throw new OracleFailure(check, message);
}

let scratchCounter = 0;
function scratch(dir: string, name: string): string {
  return join(dir, `${name}-${++scratchCounter}`);
}

export function compareBytes(actual: Buffer, expected: Buffer, what: string): void {
  // the length too: a backup taken after a resize has the disk's size at its start
  if (actual.length !== expected.length) fail('content', `${what}: ${actual.length} bytes, expected ${expected.length}`);
  for (let i = 0; i < expected.length; i += GRAIN) {
    const a = actual.subarray(i, i + GRAIN);
    const e = expected.subarray(i, i + GRAIN);
    if (!a.equals(e)) {
      let j = 0;
      while (j < e.length && a[j] === e[j]) j++;
      fail('content', `${what}: byte ${i + j} is 0x${(a[j] ?? 0).toString(16)}, expected 0x${(e[j] ?? 0).toString(16)} (cluster ${i / GRAIN})`);
    }
  }
}

export async function readRaw(dir: string, file: string, format: string): Promise<Buffer> {
  const out = scratch(dir, 'read.raw');
  await runTool('qemu-img', ['convert', '-U', '-f', format, '-O', 'raw', file, out]);
  const b = readFileSync(out);
  rmSync(out, { force: true });
  return b;
}

const codes = (jd: JobDisk): string => (jd.fullReasons ?? []).map((r) => r.code).join(',');

/** Each disk's mode and full reasons against the coverage rules of the model (pure). */
export function checkJobModes(model: Model, job: JobInfo, since: string | undefined): void {
  if (since === undefined) return;
  for (const jd of job.disks) {
    const d = model.byTarget(jd.target) ?? fail('job', `job reports unknown disk ${jd.target}`);
    const expectFull = model.expectedFull(since, d);
    if (expectFull === undefined && jd.mode !== 'incremental') {
      fail('mode', `disk ${jd.target} since ${since}: coverage is intact but the backup was full (${codes(jd)})`);
    }
    if (expectFull !== undefined && jd.mode !== 'full') {
      fail('mode', `disk ${jd.target} since ${since}: coverage was lost (${[...expectFull].join(',')}) but the backup was incremental`);
    }
    if (expectFull !== undefined && !(jd.fullReasons ?? []).some((r) => expectFull.has(r.code))) {
      fail('reason', `disk ${jd.target} since ${since}: full for ${codes(jd)}, expected one of ${[...expectFull].join(',')}`);
    }
  }
}

/** What the model knew at a job's start, per disk name. */
export interface JobExpectation {
  since: string | undefined;
  atStart: Map<string, Buffer>;
  dirtyAtStart: Map<string, Set<number>>;
  contentAtT: Map<string, Buffer>;
}

export function expectationFor(model: Model, since: string | undefined): JobExpectation {
  const e: JobExpectation = { since, atStart: model.snapshot(), dirtyAtStart: new Map(), contentAtT: new Map() };
  for (const [name, cd] of model.checkpoint(since ?? '')?.disks ?? []) {
    e.dirtyAtStart.set(name, new Set(cd.dirty));
    e.contentAtT.set(name, cd.contentAt);
  }
  return e;
}

/** A push job's file for one disk: size of an incremental, then content (over its backing chain or the model's content at T). */
export async function checkPushDisk(dir: string, jd: JobDisk, disk: string, e: JobExpectation): Promise<void> {
  let file = jd.targetFile;
  if (jd.mode === 'incremental') {
    const dirty = e.dirtyAtStart.get(disk) ?? new Set<number>();
    const data = await allocatedDataBytes(jd.targetFile);
    if (data > (dirty.size + SLACK_CLUSTERS) * GRAIN) fail('size', `disk ${jd.target} incremental holds ${data} bytes of data, only ${dirty.size} clusters were dirtied`);
    if (jd.backingFile === undefined) {
      // Put the content at T under the incremental: T + changes must equal the disk at the job start.
      const base = scratch(dir, `base-${jd.target}.raw`);
      writeFileSync(base, e.contentAtT.get(disk) ?? fail('job', `no content at ${e.since ?? '?'} for ${disk}`));
      const top = scratch(dir, `top-${jd.target}.qcow2`);
      await runTool('cp', [jd.targetFile, top]);
      await runTool('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', base, '-F', 'raw', top]);
      file = top;
    }
  }
  const expected = e.atStart.get(disk) ?? fail('job', `no content at the job start for ${disk}`);
  compareBytes(await readRaw(dir, file, 'qcow2'), expected, `push backup of ${jd.target} (${jd.mode}${e.since !== undefined ? ` since ${e.since}` : ''})`);
}

/** A pull job's export for one disk: its content, and for an incremental, the exported dirty map. */
export function checkPullDisk(dir: string, job: JobInfo, jd: JobDisk, disk: string, e: JobExpectation): void {
  if (job.server === undefined) fail('job', `pull job ${job.id} has no server`);
  const uri = exportUri(job.server, jd.pull?.exportName ?? jd.target);
  const raw = scratch(dir, `pull-${jd.target}.raw`);
  execFileSync('nbdcopy', [uri, raw]);
  compareBytes(readFileSync(raw), e.atStart.get(disk) ?? Buffer.alloc(0), `pull export of ${jd.target}`);
  rmSync(raw, { force: true });
  if (jd.mode !== 'incremental' || jd.tmpBitmap === undefined) return;
  const map = JSON.parse(execFileSync('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${jd.tmpBitmap}`, uri]).toString()) as Array<{ offset: number; length: number; type: number }>;
  const exported = new Set<number>();
  for (const x of map) if ((x.type & 1) === 1) for (let c = x.offset / GRAIN; c < (x.offset + x.length) / GRAIN; c++) exported.add(c);
  const dirty = e.dirtyAtStart.get(disk) ?? new Set<number>();
  for (const c of dirty) if (!exported.has(c)) fail('dirty-map', `pull dirty map of ${jd.target} since ${e.since ?? '?'} misses cluster ${c} written since`);
  if (exported.size > dirty.size + SLACK_CLUSTERS) fail('size', `pull dirty map of ${jd.target} has ${exported.size} clusters, only ${dirty.size} were dirtied`);
}

/** The metadata's checkpoints (mapped to model names) are exactly the model's chain. */
export function checkCheckpoints(model: Model, listed: readonly string[]): void {
  const modelNames = model.chain.map((c) => c.name);
  if (listed.join(',') !== modelNames.join(',')) fail('checkpoints', `checkpoints are [${listed.join(',')}], the model has [${modelNames.join(',')}]`);
}

/** checkpoint-coverage since T agrees with the model for every attached disk (never over-claims, never gives up for no reason). */
export function checkCoverage(model: Model, since: string, coverage: readonly DiskCoverage[]): void {
  for (const d of model.attached()) {
    const c = coverage.find((x) => x.target === d.target);
    if (c === undefined) fail('coverage', `checkpoint-coverage since ${since} does not mention disk ${d.target ?? ''}`);
    const expectFull = model.expectedFull(since, d);
    const got = c.reasons.map((r) => r.code).join(',');
    if (expectFull !== undefined && c.mode !== 'full') fail('coverage', `coverage of ${d.target ?? ''} since ${since} claims incremental, the model says lost (${[...expectFull].join(',')})`);
    if (expectFull === undefined && c.mode !== 'incremental') fail('coverage', `coverage of ${d.target ?? ''} since ${since} is full (${got}), the model says covered`);
    if (expectFull !== undefined && !c.reasons.some((r) => expectFull.has(r.code as CoverageReason))) {
      fail('reason', `coverage of ${d.target ?? ''} since ${since}: full for ${got}, expected one of ${[...expectFull].join(',')}`);
    }
  }
}

/** A failure a user sees: one sentence on one line, naming the cause. */
export function checkOneSentence(message: string, cause: RegExp, what: string): void {
  if (message.includes('\n')) fail('fault', `${what}: the error spans lines: ${JSON.stringify(message)}`);
  if (!cause.test(message)) fail('fault', `${what}: the error does not name the cause (${String(cause)}): ${message}`);
}

// ---- repository ----------------------------------------------------------------

/** What the model expects of one disk in a repository backup taken now. */
export interface RepoDiskExpectation {
  disk: string;
  sizeBytes: number;
  /** undefined: incremental; else the reasons a full may give. */
  full: Set<RepoFullReason> | undefined;
  /** 64 KiB clusters written since the disk's last repository backup. */
  dirty: number;
}

/** Per target: the level, reasons and dirty clusters of every attached disk (taken right before the backup). */
export function repoExpectations(model: Model): Map<string, RepoDiskExpectation> {
  return new Map(
    model.attached().map((d) => [d.target ?? '', { disk: d.name, sizeBytes: d.sizeBytes, full: model.expectedRepoFull(d), dirty: model.dirtySinceRepo(d).size }]),
  );
}

/** A full's reason text names one the model accepts. */
function reasonMatches(text: string, r: RepoFullReason): boolean {
  if (r === 'no-earlier-backup') return /no earlier backup/.test(text);
  if (r === 'checkpoint-missing') return /no longer exists|checkpoint-missing:/.test(text);
  // the coverage code, or the repository's own comparison with the last backup's size
  if (r === 'resized') return /resiz/.test(text);
  return text.includes(`${r}:`);
}

/**
 * A repository manifest against the model: every attached disk, each at the
 * level the model expects; a full with a reason the model accepts; an
 * incremental that read no more than the clusters dirtied since (zeroed or
 * discarded ones may be skipped, so at most, not exactly) and stored no more
 * chunks than that.
 */
export function checkRepoManifest(m: Manifest, expected: ReadonlyMap<string, RepoDiskExpectation>): void {
  for (const target of expected.keys()) if (!m.disks.some((md) => md.target === target)) fail('job', `repository backup ${m.id} has no disk ${target}`);
  for (const md of m.disks) {
    const e = expected.get(md.target) ?? fail('job', `repository backup ${m.id} has unknown disk ${md.target}`);
    const what = `repository backup of ${md.target} (${e.disk})`;
    if (md.virtualSize !== e.sizeBytes) fail('job', `${what}: virtual size ${md.virtualSize}, expected ${e.sizeBytes}`);
    const level = e.full === undefined ? 'incremental' : 'full';
    if (md.level !== level) fail('mode', `${what}: ${md.level} (${md.fullReason ?? '-'}), expected ${level}${e.full !== undefined ? ` (${[...e.full].join(',')})` : ''}`);
    if (e.full !== undefined && !(md.fullReason !== null && [...e.full].some((r) => reasonMatches(md.fullReason ?? '', r)))) {
      fail('reason', `${what}: full for "${md.fullReason ?? ''}", expected one of ${[...e.full].join(',')}`);
    }
    if (e.full === undefined && md.fullReason !== null) fail('reason', `${what}: incremental with a full reason "${md.fullReason}"`);
    if (md.newChunks > md.chunks) fail('size', `${what}: ${md.newChunks} new chunks of ${md.chunks}`);
    const limit = e.full === undefined ? (e.dirty + SLACK_CLUSTERS) * GRAIN : e.sizeBytes;
    if (md.bytesRead > limit) fail('size', `${what} (${md.level}): read ${md.bytesRead} bytes, ${e.full === undefined ? `only ${e.dirty} clusters were dirtied since its last backup` : 'more than the disk'}`);
    if (e.full === undefined && md.chunks > e.dirty + SLACK_CLUSTERS) fail('size', `${what}: ${md.chunks} chunks in the delta, only ${e.dirty} clusters were dirtied`);
  }
}
