// The correctness oracle: a seeded random scenario against a real domain with
// small disks, checked against a model that knows, byte for byte, what every
// disk holds and, per checkpoint and disk, which 64 KiB clusters were written
// since and whether coverage was lost (and why).
//
// After every backup the oracle checks what a user cares about:
// - the backup's content equals the model's content at the job's start;
// - a disk the model says is covered was backed up incrementally, and the
//   incremental holds no more data than the clusters dirtied since T (+ slack),
//   so "always full" cannot pass; an exported dirty map contains every cluster
//   written since T (never misses a changed block);
// - a disk the model says lost coverage was backed up in full with a reason the
//   model accepts.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { exportUri, type JobInfo } from '../../src/backup/job.js';
import type { CoverageReason } from '../../src/checkpoint/coverage.js';
import { Qbackup } from '../../src/qbackup.js';
import { allocatedDataBytes, createImage } from '../../src/qemu/image.js';
import { runTool } from '../../src/qemu/tools.js';
import { cliPath } from '../helpers/env.js';
import { Prng } from './prng.js';

const GRAIN = 65536; // QEMU's default bitmap granularity (capped at 64 KiB)
const DOMAIN = 'fz';
/** Allowed extra data in an incremental, in clusters per disk. */
export const SLACK_CLUSTERS = 0;

export interface ScenarioOptions {
  seed: number;
  steps: number;
  log?: (line: string) => void;
  keep?: boolean;
}

export interface ScenarioResult {
  seed: number;
  steps: number;
  stepsRun: number;
  backupsChecked: number;
  mismatches: number;
  failure?: { step: number; action: string; message: string };
}

interface ModelDisk {
  file: string;
  size: number;
  clusterSize: number;
  content: Buffer;
  target: string | undefined; // attached as
}

interface ModelCheckpoint {
  name: string;
  /** Per image file that took part: content at creation, clusters dirtied since, why coverage was lost. */
  disks: Map<string, { contentAt: Buffer; dirty: Set<number>; lost: Set<CoverageReason> }>;
}

class OracleFailure extends Error {}

function fail(message: string): never {
  throw new OracleFailure(message);
}

export async function runScenario(options: ScenarioOptions): Promise<ScenarioResult> {
  const rng = new Prng(options.seed);
  const log = options.log ?? ((): void => undefined);
  const dir = mkdtempSync(join(tmpdir(), `qbfuzz-${options.seed}-`));
  const stateDir = join(dir, 'state');
  const qb = Qbackup.open({ stateDir, lockTimeoutMs: 10_000, detachTimeoutMs: 2_000 });
  const result: ScenarioResult = { seed: options.seed, steps: options.steps, stepsRun: 0, backupsChecked: 0, mismatches: 0 };
  const disks: ModelDisk[] = [];
  const chain: ModelCheckpoint[] = [];
  /** Per image file: checkpoint of its last repository backup. */
  const lastRepo = new Map<string, string>();
  let nameCounter = 0;
  const newName = (prefix: string): string => `${prefix}${++nameCounter}`;
  const repo = join(dir, 'repo');

  // ---- helpers bound to this scenario --------------------------------------------

  const attached = (): ModelDisk[] => disks.filter((d) => d.target !== undefined);
  const freeTarget = (): string => {
    for (const c of 'abcdefghij') if (!disks.some((d) => d.target === `sd${c}`)) return `sd${c}`;
    return fail('no free target');
  };
  async function newDisk(): Promise<ModelDisk> {
    const size = (2 + rng.int(3)) << 20;
    const clusterSize = rng.pick([65536, 65536, 262144]);
    const file = join(dir, `disk${disks.length}.qcow2`);
    await createImage(file, 'qcow2', size, { clusterSizeBytes: clusterSize });
    const d: ModelDisk = { file, size, clusterSize, content: Buffer.alloc(size), target: undefined };
    disks.push(d);
    return d;
  }
  function markDirty(d: ModelDisk, offset: number, length: number): void {
    for (const cp of chain) {
      const entry = cp.disks.get(d.file);
      if (entry === undefined) continue;
      for (let c = Math.floor(offset / GRAIN); c * GRAIN < offset + length; c++) entry.dirty.add(c);
    }
  }
  function loseAll(d: ModelDisk | undefined, reason: CoverageReason): void {
    for (const cp of chain) {
      for (const [file, entry] of cp.disks) if (d === undefined || file === d.file) entry.lost.add(reason);
    }
  }
  /** What the coverage rules must say for disk d since checkpoint T: undefined = incremental, else acceptable reasons. */
  function expectedFull(cpName: string, d: ModelDisk): Set<CoverageReason> | undefined {
    const idx = chain.findIndex((c) => c.name === cpName);
    if (idx < 0) return new Set(['checkpoint-missing']);
    const reasons = new Set<CoverageReason>();
    for (const cp of chain.slice(idx)) if (!cp.disks.has(d.file)) reasons.add('not-in-checkpoint');
    const entry = chain[idx]?.disks.get(d.file);
    for (const r of entry?.lost ?? []) reasons.add(r);
    return reasons.size === 0 ? undefined : reasons;
  }
  async function hmp(target: string, cmd: string): Promise<void> {
    await qb.domains.monitorCommand(DOMAIN, `qemu-io -d ${target} "${cmd}"`, { hmp: true });
  }
  async function flushAll(): Promise<void> {
    for (const d of attached()) await hmp(d.target ?? '', 'flush');
  }
  function running(): boolean {
    return qb.domains.info(DOMAIN).state === 'running';
  }
  async function readRaw(file: string, format: string): Promise<Buffer> {
    const out = join(dir, `read-${Date.now()}-${rng.u32()}.raw`);
    await runTool('qemu-img', ['convert', '-U', '-f', format, '-O', 'raw', file, out]);
    const b = readFileSync(out);
    rmSync(out, { force: true });
    return b;
  }
  function compareBytes(actual: Buffer, expected: Buffer, what: string): void {
    if (actual.length < expected.length) fail(`${what}: ${actual.length} bytes, expected ${expected.length}`);
    for (let i = 0; i < expected.length; i += GRAIN) {
      const a = actual.subarray(i, i + GRAIN);
      const e = expected.subarray(i, i + GRAIN);
      if (!a.equals(e)) {
        let j = 0;
        while (j < e.length && a[j] === e[j]) j++;
        fail(`${what}: byte ${i + j} is 0x${(a[j] ?? 0).toString(16)}, expected 0x${(e[j] ?? 0).toString(16)} (cluster ${i / GRAIN})`);
      }
    }
  }
  /** Checks a finished job: modes and reasons against the model, content against the snapshot taken at its start. */
  async function checkJob(job: JobInfo, since: string | undefined, atStart: Map<string, Buffer>, dirtyAtStart: Map<string, Set<number>>, contentAtT: Map<string, Buffer>): Promise<void> {
    for (const jd of job.disks) {
      const d = disks.find((x) => x.target === jd.target);
      if (d === undefined) fail(`job reports unknown disk ${jd.target}`);
      const expectFull = since === undefined ? new Set<CoverageReason>() : expectedFull(since, d);
      if (since !== undefined) {
        if (expectFull === undefined && jd.mode !== 'incremental') {
          fail(`disk ${jd.target} since ${since}: coverage is intact but the backup was full (${(jd.fullReasons ?? []).map((r) => r.code).join(',')})`);
        }
        if (expectFull !== undefined && jd.mode !== 'full') {
          fail(`disk ${jd.target} since ${since}: coverage was lost (${[...expectFull].join(',')}) but the backup was incremental`);
        }
        if (expectFull !== undefined && !(jd.fullReasons ?? []).some((r) => expectFull.has(r.code))) {
          fail(`disk ${jd.target} since ${since}: full for ${(jd.fullReasons ?? []).map((r) => r.code).join(',')}, expected one of ${[...expectFull].join(',')}`);
        }
      }
      const expected = atStart.get(d.file) ?? fail('no snapshot');
      if (job.mode === 'push') {
        let file = jd.targetFile;
        if (jd.mode === 'incremental') {
          const dirty = dirtyAtStart.get(d.file) ?? new Set<number>();
          const data = await allocatedDataBytes(jd.targetFile);
          if (data > (dirty.size + SLACK_CLUSTERS) * GRAIN) fail(`disk ${jd.target} incremental holds ${data} bytes of data, only ${dirty.size} clusters were dirtied`);
          if (jd.backingFile === undefined) {
            // Put the content at T under the incremental: T + changes must equal the disk at the job start.
            const base = join(dir, `base-${jd.target}-${rng.u32()}.raw`);
            writeFileSync(base, contentAtT.get(d.file) ?? fail('no content at T'));
            const top = join(dir, `top-${jd.target}-${rng.u32()}.qcow2`);
            await runTool('cp', [jd.targetFile, top]);
            await runTool('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', base, '-F', 'raw', top]);
            file = top;
          }
        }
        compareBytes(await readRaw(file, 'qcow2'), expected, `push backup of ${jd.target} (${jd.mode}${since !== undefined ? ` since ${since}` : ''})`);
      }
      result.backupsChecked++;
    }
  }

  // ---- set-up ------------------------------------------------------------------

  const cleanup = async (): Promise<void> => {
    try {
      const pid = qb.domains.info(DOMAIN).pid;
      if (pid !== undefined) process.kill(pid, 'SIGKILL');
    } catch {
      // not defined or gone
    }
    qb.close();
    if (!options.keep) rmSync(dir, { recursive: true, force: true });
  };

  let step = 0;
  let action = 'setup';
  try {
    const initial = 2 + rng.int(2);
    for (let i = 0; i < initial; i++) {
      const d = await newDisk();
      d.target = `sd${'abc'[i] ?? 'z'}`;
    }
    const xml = `<domain><name>${DOMAIN}</name><memory unit='MiB'>64</memory><devices>${attached()
      .map((d) => `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${d.file}'/><target dev='${d.target ?? ''}' bus='scsi'/></disk>`)
      .join('')}</devices></domain>`;
    await qb.domains.define(xml);
    await qb.domains.start(DOMAIN, { paused: true });

    for (step = 1; step <= options.steps; step++) {
      const isRunning = running();
      action = rng.weighted({
        write: 28,
        zero: 5,
        discard: 5,
        checkpoint: 12,
        delete: 8,
        pushBackup: 10,
        pullBackup: 6,
        repoBackup: 4,
        attach: 2,
        detach: 4,
        reattach: 3,
        restart: 2,
        crash: 1,
        kill: 3,
      });
      if (!isRunning && action !== 'restart') action = 'restart';
      log(`step ${step}: ${action}`);
      switch (action) {
        case 'write':
        case 'zero':
        case 'discard': {
          const d = rng.pick(attached());
          const unit = action === 'discard' ? d.clusterSize : 512;
          const units = Math.floor(d.size / unit);
          const off = rng.int(units) * unit;
          const len = Math.min((1 + rng.int(action === 'discard' ? 2 : 256)) * unit, d.size - off);
          log(`    ${action} ${d.target ?? ''} ${off}+${len}`);
          if (action === 'write') {
            const pattern = 1 + rng.int(255);
            await hmp(d.target ?? '', `write -P ${pattern} ${off} ${len}`);
            d.content.fill(pattern, off, off + len);
          } else {
            await hmp(d.target ?? '', action === 'zero' ? `write -z ${off} ${len}` : `discard ${off} ${len}`);
            d.content.fill(0, off, off + len);
          }
          markDirty(d, off, len);
          break;
        }
        case 'checkpoint': {
          const name = newName('c');
          await qb.checkpoints.create(DOMAIN, { name });
          addCheckpoint(name);
          break;
        }
        case 'delete': {
          if (chain.length === 0) break;
          // Middle checkpoints most often: deleting them must merge into the parent.
          const middle = chain.slice(1, -1);
          const victim = middle.length > 0 && rng.chance(0.6) ? rng.pick(middle) : rng.pick(chain);
          const children = rng.chance(0.15);
          log(`    delete ${victim.name}${children ? ' --children' : ''}`);
          await qb.checkpoints.delete(DOMAIN, victim.name, { children });
          const idx = chain.indexOf(victim);
          chain.splice(idx, children ? chain.length - idx : 1);
          break;
        }
        case 'pushBackup':
        case 'pullBackup': {
          // Mostly checkpoints that still have coverage somewhere, the oldest of them
          // often: their span crosses deletions, detaches and restarts.
          const covered = chain.filter((c) => attached().some((d) => expectedFull(c.name, d) === undefined));
          const since =
            chain.length === 0 || rng.chance(0.1)
              ? undefined
              : covered.length > 0 && rng.chance(0.85)
                ? rng.chance(0.5)
                  ? covered[0]?.name
                  : rng.pick(covered).name
                : rng.pick(chain).name;
          const withCheckpoint = rng.chance(0.7) ? newName('b') : undefined;
          await flushAll();
          const atStart = new Map(attached().map((d) => [d.file, Buffer.from(d.content)]));
          const sinceCp = chain.find((c) => c.name === since);
          const dirtyAtStart = new Map<string, Set<number>>();
          const contentAtT = new Map<string, Buffer>();
          for (const [f, e] of sinceCp?.disks ?? []) {
            dirtyAtStart.set(f, new Set(e.dirty));
            contentAtT.set(f, e.contentAt);
          }
          if (action === 'pushBackup') {
            const started = await qb.backups.begin(
              DOMAIN,
              { mode: 'push', ...(since !== undefined ? { since } : {}) },
              { targetDir: join(dir, 'push', `${step}`), ...(withCheckpoint !== undefined ? { checkpoint: { name: withCheckpoint } } : {}) },
            );
            if (withCheckpoint !== undefined) addCheckpoint(withCheckpoint);
            const job = await qb.backups.wait(DOMAIN, started.id);
            log(`    push since ${since ?? '-'} checkpoint ${withCheckpoint ?? '-'}: ${job.disks.map((d) => `${d.target}=${d.mode}${d.backingFile !== undefined ? `(backing ${d.backingFile.split('/').slice(-2).join('/')})` : ''}`).join(' ')}`);
            if (job.state !== 'completed') fail(`push job ${job.state}: ${job.error ?? ''}`);
            await checkJob(job, since, atStart, dirtyAtStart, contentAtT);
          } else {
            const job = await qb.backups.begin(
              DOMAIN,
              { mode: 'pull', ...(since !== undefined ? { since } : {}) },
              withCheckpoint !== undefined ? { checkpoint: { name: withCheckpoint } } : {},
            );
            if (withCheckpoint !== undefined) addCheckpoint(withCheckpoint);
            // the guest keeps writing during the job; the export must not change
            const during = rng.pick(attached());
            await hmp(during.target ?? '', `write -P 0xee 0 ${GRAIN}`);
            during.content.fill(0xee, 0, GRAIN);
            markDirty(during, 0, GRAIN);
            try {
              await checkJob(job, since, atStart, dirtyAtStart, contentAtT);
              for (const jd of job.disks) {
                assert.ok(job.server !== undefined);
                const uri = exportUri(job.server, jd.pull?.exportName ?? jd.target);
                const raw = join(dir, `pull-${jd.target}.raw`);
                rmSync(raw, { force: true });
                execFileSync('nbdcopy', [uri, raw]);
                const d = disks.find((x) => x.target === jd.target);
                compareBytes(readFileSync(raw), atStart.get(d?.file ?? '') ?? Buffer.alloc(0), `pull export of ${jd.target}`);
                rmSync(raw, { force: true });
                if (jd.mode === 'incremental' && jd.tmpBitmap !== undefined) {
                  const map = JSON.parse(execFileSync('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${jd.tmpBitmap}`, uri]).toString()) as Array<{ offset: number; length: number; type: number }>;
                  const exported = new Set<number>();
                  for (const e of map) if ((e.type & 1) === 1) for (let c = e.offset / GRAIN; c < (e.offset + e.length) / GRAIN; c++) exported.add(c);
                  const dirty = dirtyAtStart.get(d?.file ?? '') ?? new Set<number>();
                  for (const c of dirty) if (!exported.has(c)) fail(`pull dirty map of ${jd.target} since ${since ?? '?'} misses cluster ${c} written since`);
                  if (exported.size > dirty.size + SLACK_CLUSTERS) fail(`pull dirty map of ${jd.target} has ${exported.size} clusters, only ${dirty.size} were dirtied`);
                }
              }
            } finally {
              await qb.backups.abort(DOMAIN);
            }
          }
          break;
        }
        case 'repoBackup': {
          await flushAll();
          const atStart = new Map(attached().map((d) => [d.file, Buffer.from(d.content)]));
          const expect = new Map(
            attached().map((d) => {
              const t = lastRepo.get(d.file);
              return [d.file, t === undefined ? 'full' : expectedFull(t, d) === undefined ? 'incremental' : 'full'] as const;
            }),
          );
          const pull = rng.chance(0.5);
          const m = await qb.repository.backup(DOMAIN, { repo, mode: pull ? 'pull' : 'push' });
          addCheckpoint(m.checkpoint);
          for (const md of m.disks) {
            const d = disks.find((x) => x.target === md.target);
            if (d === undefined) fail(`repository backup has unknown disk ${md.target}`);
            if (md.level !== expect.get(d.file)) fail(`repository backup of ${md.target}: ${md.level}, expected ${expect.get(d.file) ?? '?'} (${md.fullReason ?? ''})`);
            lastRepo.set(d.file, m.checkpoint);
          }
          const to = join(dir, `restore-${step}`);
          const r = await qb.repository.restore(DOMAIN, { repo, backup: m.id, to, format: 'raw' });
          for (const rd of r.disks) {
            const d = disks.find((x) => x.target === rd.target);
            compareBytes(readFileSync(rd.file), atStart.get(d?.file ?? '') ?? Buffer.alloc(0), `repository restore of ${rd.target}`);
            result.backupsChecked++;
          }
          rmSync(to, { recursive: true, force: true });
          break;
        }
        case 'attach': {
          if (attached().length >= 4) break;
          const d = await newDisk();
          const target = freeTarget();
          log(`    attach ${d.file.split('/').pop() ?? ''} as ${target}`);
          await qb.domains.attachDisk(DOMAIN, { source: d.file, target });
          d.target = target;
          break;
        }
        case 'detach': {
          if (attached().length <= 1) break;
          const d = rng.pick(attached());
          log(`    detach ${d.target ?? ''} (${d.file.split('/').pop() ?? ''})`);
          await qb.domains.detachDisk(DOMAIN, d.target ?? '');
          d.target = undefined;
          loseAll(d, 'detached-since');
          if (rng.chance(0.5)) {
            // back at once, before any new checkpoint: only the journal knows it was away
            const target = freeTarget();
            log(`    reattach ${d.file.split('/').pop() ?? ''} as ${target} at once`);
            await qb.domains.attachDisk(DOMAIN, { source: d.file, target });
            d.target = target;
          }
          break;
        }
        case 'reattach': {
          const detached = disks.filter((d) => d.target === undefined);
          if (detached.length === 0) break;
          const d = rng.pick(detached);
          if (rng.chance(0.7)) {
            // someone else writes the image while it is detached
            const off = rng.int(Math.floor(d.size / 512)) * 512;
            const len = Math.min(65536, d.size - off);
            await runTool('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5c ${off} ${len}`, d.file]);
            d.content.fill(0x5c, off, off + len);
          }
          const target = freeTarget();
          log(`    reattach ${d.file.split('/').pop() ?? ''} as ${target}`);
          await qb.domains.attachDisk(DOMAIN, { source: d.file, target });
          d.target = target;
          break;
        }
        case 'restart': {
          if (running()) await qb.domains.shutdown(DOMAIN);
          await qb.domains.start(DOMAIN, { paused: true });
          break;
        }
        case 'crash': {
          await flushAll();
          await qb.domains.destroy(DOMAIN);
          await qb.domains.start(DOMAIN, { paused: true });
          loseAll(undefined, 'bitmap-missing');
          for (const cp of chain) for (const e of cp.disks.values()) e.lost.add('bitmap-inconsistent');
          break;
        }
        case 'kill': {
          const point = rng.pick(['checkpoint-create:after-intent', 'checkpoint-create:after-qemu', 'checkpoint-delete:after-intent', 'checkpoint-delete:after-qemu', 'backup-begin:before-qemu', 'backup-begin:after-qemu']);
          const name = newName('k');
          let args: string[];
          if (point.startsWith('checkpoint-create')) args = ['checkpoint-create-as', DOMAIN, '--name', name];
          else if (point.startsWith('checkpoint-delete')) {
            if (chain.length === 0) break;
            args = ['checkpoint-delete', DOMAIN, rng.pick(chain).name];
          } else args = ['backup-begin', DOMAIN, '--target-dir', join(dir, 'killed', name), '--checkpoint', name];
          log(`    kill at ${point}: ${args.join(' ')}`);
          try {
            execFileSync(process.execPath, [cliPath, '--state-dir', stateDir, ...args], { env: { ...process.env, QBACKUP_CRASH_AT: point }, stdio: 'ignore' });
          } catch {
            // expected: it killed itself
          }
          // the next command completes or rolls back what was interrupted
          const job = await qb.backups.info(DOMAIN);
          if (job !== undefined) await qb.backups.wait(DOMAIN, job.id);
          const names = new Set(qb.checkpoints.list(DOMAIN).map((c) => c.name));
          if (point.startsWith('checkpoint-delete')) {
            const victim = args[2] ?? '';
            if (names.has(victim)) fail(`checkpoint ${victim} survived an interrupted delete`);
            const idx = chain.findIndex((c) => c.name === victim);
            if (idx >= 0) chain.splice(idx, 1);
          } else if (names.has(name)) {
            addCheckpoint(name);
          }
          const killedDir = join(dir, 'killed', name);
          if (!names.has(name) && existsSync(killedDir) && readdirSync(killedDir).length > 0) {
            fail(`an interrupted backup left files behind: ${readdirSync(killedDir).join(', ')}`);
          }
          break;
        }
      }
      result.stepsRun = step;
      // The metadata must always agree with the model about which checkpoints exist.
      const names = qb.checkpoints.list(DOMAIN).map((c) => c.name);
      const modelNames = chain.map((c) => c.name);
      if (names.join(',') !== modelNames.join(',')) fail(`checkpoints are [${names.join(',')}], the model has [${modelNames.join(',')}]`);
    }
  } catch (err) {
    result.mismatches++;
    result.failure = { step, action, message: err instanceof Error ? err.message : String(err) };
  } finally {
    await cleanup();
  }
  return result;

  function addCheckpoint(name: string): void {
    const cp: ModelCheckpoint = { name, disks: new Map() };
    for (const d of attached()) cp.disks.set(d.file, { contentAt: Buffer.from(d.content), dirty: new Set(), lost: new Set() });
    chain.push(cp);
  }
}
