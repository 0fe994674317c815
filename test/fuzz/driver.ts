// The oracle's driver: runs one Action against a real domain through the
// library (and through the CLI where a process must die), keeps the model in
// step with what happened, and calls the checks. It makes no random choice.
//
// An action whose disk or checkpoint does not exist at this point (its creator
// was removed by the shrinker, or a fault went the other way) is skipped.
// Where a fault makes the outcome uncertain (a killed CLI, a dropped QMP
// connection), the next command must complete or roll back; the driver then
// adopts what the metadata says and checks coverage from every checkpoint,
// so a state that over-claims is caught at once.

import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statfsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { JobInfo } from '../../src/backup/job.js';
import { isQbackupError } from '../../src/errors.js';
import { Qbackup } from '../../src/qbackup.js';
import { createImage } from '../../src/image/qemu-img.js';
import { runTool } from '../../src/image/tools.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { cliPath } from '../helpers/env.js';
import type { Action, ResizePath } from './actions.js';
import {
  checkCheckpoints,
  checkCoverage,
  checkJobModes,
  checkOneSentence,
  checkPullDisk,
  checkPushDisk,
  checkRepoManifest,
  compareBytes,
  expectationFor,
  fail,
  repoExpectations,
  type RepoDiskExpectation,
} from './checks.js';
import { GRAIN, Model, type DiskModel, type DiskSpec } from './model.js';
import { QmpDropProxy } from './qmp-proxy.js';

export const DOMAIN = 'fz';
/** Size of the repository's tmpfs outside a repo-full action. */
const REPO_FS_BYTES = 1 << 30;

export type Outcome = 'done' | 'skipped';

/** Whether this process may mount a tmpfs (root): needed to stage a full repository file system. */
export async function canMountTmpfs(): Promise<boolean> {
  const at = mkdtempSync(join(tmpdir(), 'qbfuzz-probe-'));
  try {
    await runTool('mount', ['-t', 'tmpfs', '-o', 'size=1M', 'tmpfs', at]);
    await runTool('umount', [at]);
    return true;
  } catch {
    return false;
  } finally {
    rmSync(at, { recursive: true, force: true });
  }
}

export class Driver {
  readonly model = new Model();
  readonly qb: Qbackup;
  backupsChecked = 0;
  /** Model name of a checkpoint → the library's name (repository backups choose their own). */
  protected readonly real = new Map<string, string>();
  /** Alias of a repository backup → its manifest id. */
  protected readonly repoIds = new Map<string, string>();
  protected readonly stateDir: string;
  protected readonly repoFs: string;
  protected repoMounted = false;
  protected scratch = 0;

  /** The domain's name: DOMAIN under qbackup's own driver, where every scenario has its own state directory. */
  readonly domain: string;

  constructor(
    readonly dir: string,
    readonly log: (line: string) => void,
    options: { connect?: string | undefined; domain?: string | undefined } = {},
  ) {
    this.stateDir = join(dir, 'state');
    this.repoFs = join(dir, 'repofs');
    this.domain = options.domain ?? DOMAIN;
    this.qb = Qbackup.open({ stateDir: this.stateDir, lockTimeoutMs: 10_000, detachTimeoutMs: 2_000, connect: options.connect });
  }

  protected get repo(): string {
    return join(this.repoFs, 'repo');
  }

  protected file(disk: string): string {
    return join(this.dir, `${disk}.qcow2`);
  }

  /** Creates the disks, defines and starts the domain; with `repoOnTmpfs`, the repository lives on a tmpfs so repo-full can shrink it. */
  async setup(disks: readonly DiskSpec[], repoOnTmpfs: boolean): Promise<void> {
    mkdirSync(this.repoFs, { recursive: true });
    if (repoOnTmpfs) {
      await runTool('mount', ['-t', 'tmpfs', '-o', `size=${REPO_FS_BYTES}`, 'tmpfs', this.repoFs]);
      this.repoMounted = true;
    }
    for (const spec of disks) {
      await createImage(this.file(spec.name), 'qcow2', spec.sizeBytes, { clusterSizeBytes: spec.clusterSizeBytes });
      this.model.attach(this.model.addDisk(spec));
    }
    const xml = `<domain><name>${this.domain}</name><memory unit='MiB'>64</memory><devices>${this.model
      .attached()
      .map((d) => `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${this.file(d.name)}'/><target dev='${d.target ?? ''}' bus='scsi'/></disk>`)
      .join('')}</devices></domain>`;
    await this.qb.domains.define(xml);
    await this.qb.domains.start(this.domain, { paused: true });
  }

  async close(keep: boolean): Promise<void> {
    try {
      const pid = this.qb.domains.info(this.domain).pid;
      if (pid !== undefined) process.kill(pid, 'SIGKILL');
    } catch {
      // not defined or gone
    }
    this.qb.close();
    if (this.repoMounted) await runTool('umount', ['-l', this.repoFs]).catch(() => undefined);
    if (!keep) rmSync(this.dir, { recursive: true, force: true });
  }

  /** Runs one action, then checks that the metadata's checkpoints are the model's. */
  async execute(a: Action): Promise<Outcome> {
    if (this.qb.domains.info(this.domain).state !== 'running') fail('error', 'the domain is not running before the action');
    const outcome = await this.dispatch(a);
    checkCheckpoints(this.model, this.listed());
    return outcome;
  }

  // A flat dispatch: one line per kind.
  protected async dispatch(a: Action): Promise<Outcome> {
    switch (a.kind) {
      case 'write':
        return this.guestWrite(a.disk, a.offset, a.length, `write -P ${a.pattern}`, a.pattern);
      case 'zero':
        return this.guestWrite(a.disk, a.offset, a.length, 'write -z', 0);
      case 'discard':
        return this.guestWrite(a.disk, a.offset, a.length, 'discard', 0);
      case 'checkpoint':
        if (this.model.checkpoint(a.name) !== undefined) return 'skipped';
        await this.qb.checkpoints.create(this.domain, { name: a.name });
        this.model.addCheckpoint(a.name);
        return 'done';
      case 'delete':
        if (this.model.checkpoint(a.name) === undefined) return 'skipped';
        await this.qb.checkpoints.delete(this.domain, this.realName(a.name), { children: a.children });
        this.model.deleteCheckpoint(a.name, a.children);
        return 'done';
      case 'push':
        return this.push(a.since, a.checkpoint);
      case 'pull':
        return this.pull(a.since, a.checkpoint, a.during);
      case 'repo':
        return this.repoBackup(a.alias);
      case 'repo-full':
        return this.repoFull(a.alias, a.headroom);
      case 'repo-prune':
        return this.repoPrune(a.keep);
      case 'repo-gc':
        return this.repoGc();
      case 'repo-verify':
        return this.repoVerify();
      case 'repo-restore':
        return this.repoRestore(a.alias);
      case 'resize':
        return this.resize(a.disk, a.size, a.via);
      case 'attach':
        return this.attach(a.disk, a.size, a.cluster);
      case 'detach':
        return this.detach(a.disk, a.back);
      case 'reattach':
        return this.reattach(a.disk, a.offline);
      case 'restart':
        await this.qb.domains.shutdown(this.domain);
        await this.qb.domains.start(this.domain, { paused: true });
        return 'done';
      case 'crash':
        await this.flushAll();
        await this.qb.domains.destroy(this.domain);
        await this.qb.domains.start(this.domain, { paused: true });
        this.model.crash();
        return 'done';
      case 'kill':
        return this.kill(a.point, a.name);
      case 'qmp-drop':
        return this.qmpDrop(a);
      case 'coverage':
        if (this.model.checkpoint(a.since) === undefined) return 'skipped';
        checkCoverage(this.model, a.since, await this.qb.checkpoints.coverage(this.domain, this.realName(a.since)));
        return 'done';
    }
  }

  // ---- names -------------------------------------------------------------------

  protected realName(name: string): string {
    return this.real.get(name) ?? name;
  }

  /** The metadata's checkpoints, by model name. */
  protected listed(): string[] {
    const byReal = new Map([...this.real].map(([m, r]) => [r, m]));
    return this.qb.checkpoints.list(this.domain).map((c) => byReal.get(c.name) ?? c.name);
  }

  // ---- guest I/O -----------------------------------------------------------------

  protected async hmp(target: string, cmd: string): Promise<void> {
    await this.qb.domains.monitorCommand(this.domain, `qemu-io -d ${target} "${cmd}"`, { hmp: true });
  }

  protected async flushAll(): Promise<void> {
    for (const d of this.model.attached()) await this.hmp(d.target ?? '', 'flush');
  }

  protected async guestWrite(disk: string, offset: number, length: number, cmd: string, pattern: number): Promise<Outcome> {
    const d = this.model.disk(disk);
    // past the end: an earlier resize was shrunk away, or this one's was
    if (d?.target === undefined || offset + length > d.sizeBytes) return 'skipped';
    await this.hmp(d.target, `${cmd} ${offset} ${length}`);
    this.model.write(d, offset, length, pattern);
    return 'done';
  }

  // ---- backups -------------------------------------------------------------------

  /** A since or checkpoint that no longer fits the model makes the backup meaningless: skip it. */
  protected backupApplies(since: string | undefined, checkpoint: string | undefined): boolean {
    return (since === undefined || this.model.checkpoint(since) !== undefined) && (checkpoint === undefined || this.model.checkpoint(checkpoint) === undefined);
  }

  protected async push(since: string | undefined, checkpoint: string | undefined): Promise<Outcome> {
    if (!this.backupApplies(since, checkpoint)) return 'skipped';
    await this.flushAll();
    const e = expectationFor(this.model, since);
    const started = await this.qb.backups.begin(
      this.domain,
      { mode: 'push', ...(since !== undefined ? { since: this.realName(since) } : {}) },
      { targetDir: join(this.dir, 'push', `${++this.scratch}`), ...(checkpoint !== undefined ? { checkpoint: { name: checkpoint } } : {}) },
    );
    if (checkpoint !== undefined) this.model.addCheckpoint(checkpoint);
    const job = await this.qb.backups.wait(this.domain, started.id);
    this.log(`    ${describeJob(job)}`);
    if (job.state !== 'completed') fail('job', `push job ${job.state}: ${job.error ?? ''}`);
    checkJobModes(this.model, job, since);
    for (const jd of job.disks) {
      await checkPushDisk(this.dir, jd, this.diskAt(jd.target).name, e);
      this.backupsChecked++;
    }
    return 'done';
  }

  protected async pull(since: string | undefined, checkpoint: string | undefined, during: string): Promise<Outcome> {
    if (!this.backupApplies(since, checkpoint)) return 'skipped';
    await this.flushAll();
    const e = expectationFor(this.model, since);
    const job = await this.qb.backups.begin(
      this.domain,
      { mode: 'pull', ...(since !== undefined ? { since: this.realName(since) } : {}) },
      checkpoint !== undefined ? { checkpoint: { name: checkpoint } } : {},
    );
    if (checkpoint !== undefined) this.model.addCheckpoint(checkpoint);
    this.log(`    ${describeJob(job)}`);
    try {
      // the guest keeps writing during the job; the export must not change
      const d = this.model.disk(during);
      if (d?.target !== undefined) {
        await this.hmp(d.target, `write -P 0xee 0 ${GRAIN}`);
        this.model.write(d, 0, GRAIN, 0xee);
      }
      checkJobModes(this.model, job, since);
      for (const jd of job.disks) {
        checkPullDisk(this.dir, job, jd, this.diskAt(jd.target).name, e);
        this.backupsChecked++;
      }
    } finally {
      await this.qb.backups.abort(this.domain);
    }
    return 'done';
  }

  protected diskAt(target: string): DiskModel {
    return this.model.byTarget(target) ?? fail('job', `the job reports unknown disk ${target}`);
  }

  // ---- repository ----------------------------------------------------------------

  /** The repository exists (its config was written): prune, gc, verify and list need one. */
  protected repoExists(): boolean {
    return existsSync(join(this.repo, 'config'));
  }

  /** Ids of the domain's backups the repository lists, oldest first. */
  protected async listRepo(): Promise<string[]> {
    if (!this.repoExists()) return [];
    return (await this.qb.repository.list({ repo: this.repo }, this.domain)).map((m) => m.id);
  }

  /** The repository lists exactly the model's backups. */
  protected async checkRepoList(check: 'prune' | 'fault', when: string): Promise<void> {
    const listed = await this.listRepo();
    const known = this.model.repoBackups.map((b) => this.repoIds.get(b.alias) ?? b.alias);
    if (listed.join(',') !== known.join(',')) fail(check, `${when} the repository lists [${listed.join(',')}], expected [${known.join(',')}]`);
  }

  /** A repository backup: each disk's level (and a full's reason) as the model expects, an incremental's bytes read bounded by the dirty clusters, then its restore equals the disks at its start. */
  protected async repoBackup(alias: string): Promise<Outcome> {
    if (this.model.checkpoint(alias) !== undefined) return 'skipped';
    await this.flushAll();
    const expected = repoExpectations(this.model);
    const m = await this.qb.repository.backup(this.domain, { repo: this.repo });
    this.recordRepoBackup(alias, m, expected);
    await this.checkRestore(alias);
    return 'done';
  }

  protected recordRepoBackup(alias: string, m: Manifest, expected: ReadonlyMap<string, RepoDiskExpectation>): void {
    const disks = m.disks.map((d) => `${d.target}=${d.level}(read ${d.bytesRead / 1024} KiB, ${d.chunks} chunks, ${d.newChunks} new)`);
    this.log(`    repository backup ${m.id} (${alias} = ${m.checkpoint}): ${disks.join(' ')}`);
    checkRepoManifest(m, expected);
    this.real.set(alias, m.checkpoint);
    this.repoIds.set(alias, m.id);
    this.model.addRepoBackup(alias);
  }

  protected async checkRestore(alias: string): Promise<void> {
    const b = this.model.repoBackups.find((x) => x.alias === alias) ?? fail('job', `no repository backup ${alias}`);
    const to = join(this.dir, `restore-${++this.scratch}`);
    const r = await this.qb.repository.restore(this.domain, { repo: this.repo, backup: this.repoIds.get(alias) ?? '', to, format: 'raw' });
    if (r.disks.length !== b.contents.size) fail('content', `repository restore of ${alias} gave ${r.disks.length} disks, expected ${b.contents.size}`);
    for (const rd of r.disks) {
      compareBytes(readFileSync(rd.file), b.contents.get(rd.target) ?? Buffer.alloc(0), `repository restore of ${alias} disk ${rd.target}`);
      this.backupsChecked++;
    }
    rmSync(to, { recursive: true, force: true });
  }

  /**
   * A repository backup with only `headroom` bytes free: it may fit; if not it
   * fails with one sentence naming the cause, leaves no checkpoint (the
   * post-step check) and no backup, and every earlier backup still restores.
   */
  protected async repoFull(alias: string, headroom: number): Promise<Outcome> {
    if (!this.repoMounted || this.model.checkpoint(alias) !== undefined) return 'skipped';
    await this.flushAll();
    const expected = repoExpectations(this.model);
    mkdirSync(this.repo, { recursive: true });
    const st = statfsSync(this.repoFs);
    const used = (st.blocks - st.bfree) * st.bsize;
    await this.remountRepo(used + headroom);
    let m: Manifest | undefined;
    let error: unknown;
    try {
      m = await this.qb.repository.backup(this.domain, { repo: this.repo });
    } catch (err) {
      error = err;
    } finally {
      await this.remountRepo(REPO_FS_BYTES);
    }
    if (m !== undefined) {
      this.log(`    fitted in ${headroom} bytes`);
      this.recordRepoBackup(alias, m, expected);
      await this.checkRestore(alias);
      return 'done';
    }
    const message = error instanceof Error ? error.message : String(error);
    this.log(`    failed: ${message}`);
    checkOneSentence(message, /no space left on (the )?device|ENOSPC/i, `repository backup with ${headroom} bytes free`);
    await this.checkRepoList('fault', 'after a failed backup');
    for (const b of this.model.repoBackups) await this.checkRestore(b.alias);
    return 'done';
  }

  /**
   * prune --keep-last `keep`: it removes exactly the older backups, merges
   * their checkpoints away (the post-step check compares the chain), and the
   * repository then lists only the kept ones. Restores are checked after gc.
   */
  protected async repoPrune(keep: number): Promise<Outcome> {
    if (!this.repoExists()) return 'skipped';
    const inChain = new Set(this.model.chain.map((c) => c.name));
    const r = await this.qb.repository.prune(this.domain, { repo: this.repo, keepLast: keep });
    const removed = this.model.pruneRepo(keep);
    const ids = (bs: ReadonlyArray<{ alias: string }>): string => bs.map((b) => this.repoIds.get(b.alias) ?? b.alias).sort().join(',');
    const byReal = new Map([...this.real].map(([alias, name]) => [name, alias]));
    this.log(`    removed [${r.remove.map((x) => x.id).join(',')}], checkpoints [${r.checkpointsRemoved.join(',')}], kept [${r.keep.map((x) => x.id).join(',')}]`);
    if (r.remove.map((x) => x.id).sort().join(',') !== ids(removed)) fail('prune', `keep-last ${keep} removed [${r.remove.map((x) => x.id).join(',')}], expected [${ids(removed)}]`);
    if (r.keep.map((x) => x.id).sort().join(',') !== ids(this.model.repoBackups)) fail('prune', `keep-last ${keep} kept [${r.keep.map((x) => x.id).join(',')}], expected [${ids(this.model.repoBackups)}]`);
    if (r.checkpointsKept.length > 0) fail('prune', `prune could not remove checkpoints: ${r.checkpointsKept.map((k) => `${k.name}: ${k.reason}`).join('; ')}`);
    const gone = r.checkpointsRemoved.map((n) => byReal.get(n) ?? n).sort().join(',');
    const expectGone = removed.filter((b) => inChain.has(b.alias)).map((b) => b.alias).sort().join(',');
    if (gone !== expectGone) fail('prune', `prune removed checkpoints [${gone}], expected [${expectGone}]`);
    await this.checkRepoList('prune', 'after prune');
    return 'done';
  }

  /** gc: the repository still lists exactly the kept backups, and every one restores byte for byte. */
  protected async repoGc(): Promise<Outcome> {
    if (!this.repoExists()) return 'skipped';
    const r = await this.qb.repository.gc({ repo: this.repo });
    this.log(`    gc: ${r.packsDeleted} packs deleted, ${r.packsRepacked} repacked, ${r.indexesDeleted} indexes deleted, ${r.bytesFreed} bytes freed, ${r.condemned} condemned`);
    if (r.condemned > 0) fail('prune', `gc condemned ${r.condemned} objects although no backup runs`);
    await this.checkRepoList('prune', 'after gc');
    for (const b of this.model.repoBackups) await this.checkRestore(b.alias);
    return 'done';
  }

  /** An earlier backup, still listed, restores to the disks as they were at its time. */
  protected async repoRestore(alias: string): Promise<Outcome> {
    if (!this.model.repoBackups.some((b) => b.alias === alias)) return 'skipped';
    await this.checkRestore(alias);
    return 'done';
  }

  /** verify --read-data: every listed backup checked, every chunk read, no problem. */
  protected async repoVerify(): Promise<Outcome> {
    if (!this.repoExists()) return 'skipped';
    const r = await this.qb.repository.verify({ repo: this.repo }, { readData: true });
    this.log(`    verify: ${r.backupsChecked} backups, ${r.chunksChecked} chunks, ${r.chunksRead} read, ${r.problems.length} problems`);
    const first = r.problems[0];
    if (first !== undefined) fail('verify', `verify --read-data: ${r.problems.length} problems, first: ${first.object}: ${first.problem} (${first.backups.join(', ')})`);
    if (r.backupsChecked !== this.model.repoBackups.length) fail('verify', `verify checked ${r.backupsChecked} backups, the repository has ${this.model.repoBackups.length}`);
    if (r.chunksRead !== r.chunksChecked) fail('verify', `verify --read-data read ${r.chunksRead} of ${r.chunksChecked} chunks`);
    return 'done';
  }

  protected async remountRepo(sizeBytes: number): Promise<void> {
    const size = Math.max(4096, Math.ceil(sizeBytes / 4096) * 4096);
    await runTool('mount', ['-o', `remount,size=${size}`, this.repoFs]);
  }

  // ---- configuration -------------------------------------------------------------

  /**
   * A resize along `via`. After a grow, coverage from every checkpoint is
   * asked at once, so a resize qbackup did not notice (an over-claim) fails
   * here. Not after a shrink: asking makes qbackup look at the sizes, and a
   * shrink and a grow back with no look between is the case to catch.
   */
  protected async resize(disk: string, size: number, via: ResizePath): Promise<Outcome> {
    const d = this.model.disk(disk);
    if (d?.target === undefined || d.sizeBytes === size) return 'skipped';
    const target = d.target;
    const shrink = size < d.sizeBytes;
    this.log(`    ${shrink ? 'shrink' : 'grow'} ${target} from ${d.sizeBytes} to ${size} bytes`);
    if (via === 'qmp') {
      const nodeName = this.qb.domains.blockList(this.domain).find((b) => b.target === target)?.nodeName ?? fail('job', `blockList has no disk ${target}`);
      await this.qb.domains.monitorCommand(this.domain, JSON.stringify({ execute: 'block_resize', arguments: { 'node-name': nodeName, size } }));
    } else if (via === 'blockresize') {
      await this.qb.domains.blockResize(this.domain, target, size, { shrink });
    } else {
      await this.qb.domains.shutdown(this.domain);
      await this.qb.domains.blockResize(this.domain, target, size, { shrink });
      await this.qb.domains.start(this.domain, { paused: true });
    }
    this.model.resize(d, size);
    if (!shrink) for (const cp of this.model.chain) checkCoverage(this.model, cp.name, await this.qb.checkpoints.coverage(this.domain, this.realName(cp.name)));
    return 'done';
  }

  protected async attach(disk: string, size: number, cluster: number): Promise<Outcome> {
    if (this.model.disk(disk) !== undefined) return 'skipped';
    await createImage(this.file(disk), 'qcow2', size, { clusterSizeBytes: cluster });
    const d = this.model.addDisk({ name: disk, sizeBytes: size, clusterSizeBytes: cluster });
    await this.plug(d);
    return 'done';
  }

  protected async plug(d: DiskModel): Promise<void> {
    const target = this.model.freeTarget();
    this.log(`    attach ${d.name} as ${target}`);
    await this.qb.domains.attachDisk(this.domain, { source: this.file(d.name), target, format: 'qcow2' });
    this.model.attach(d);
  }

  protected async detach(disk: string, back: boolean): Promise<Outcome> {
    const d = this.model.disk(disk);
    if (d?.target === undefined || this.model.attached().length <= 1) return 'skipped';
    await this.qb.domains.detachDisk(this.domain, d.target);
    this.model.detach(d);
    // back at once, before any new checkpoint: only the journal knows it was away
    if (back) await this.plug(d);
    return 'done';
  }

  protected async reattach(disk: string, offline: number | undefined): Promise<Outcome> {
    const d = this.model.disk(disk);
    if (d === undefined || d.target !== undefined) return 'skipped';
    if (offline !== undefined && offline < d.sizeBytes) {
      // someone else writes the image while it is detached
      const length = Math.min(GRAIN, d.sizeBytes - offline);
      await runTool('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5c ${offline} ${length}`, this.file(d.name)]);
      this.model.writeOffline(d, offline, length, 0x5c);
    }
    await this.plug(d);
    return 'done';
  }

  // ---- faults --------------------------------------------------------------------

  /** The CLI killed (SIGKILL via QBACKUP_CRASH_AT) at `point`; the next command completes or rolls back. */
  protected async kill(point: string, name: string): Promise<Outcome> {
    const deleting = point.startsWith('checkpoint-delete');
    if ((this.model.checkpoint(name) !== undefined) !== deleting) return 'skipped';
    const killedDir = join(this.dir, 'killed', name);
    const args = point.startsWith('checkpoint-create')
      ? ['checkpoint-create-as', this.domain, '--name', name]
      : deleting
        ? ['checkpoint-delete', this.domain, this.realName(name)]
        : ['backup-begin', this.domain, '--target-dir', killedDir, '--checkpoint', name];
    try {
      execFileSync(process.execPath, [cliPath, '--state-dir', this.stateDir, ...args], { env: { ...process.env, QBACKUP_CRASH_AT: point }, stdio: 'ignore' });
    } catch {
      // expected: it killed itself
    }
    await this.settle();
    const names = new Set(this.listed());
    if (deleting) {
      if (names.has(name)) fail('fault', `checkpoint ${name} survived an interrupted delete`);
      this.model.deleteCheckpoint(name, false);
    } else if (names.has(name)) {
      this.model.addCheckpoint(name);
    }
    if (!names.has(name) && existsSync(killedDir) && readdirSync(killedDir).length > 0) {
      fail('fault', `an interrupted backup left files behind: ${readdirSync(killedDir).join(', ')}`);
    }
    this.log(`    after the kill: ${name} ${names.has(name) ? 'exists' : 'does not exist'}`);
    return 'done';
  }

  /** The next command after a fault: it completes or rolls back what was interrupted; a job left running is waited for. */
  protected async settle(): Promise<void> {
    const job = await this.qb.backups.info(this.domain);
    if (job !== undefined) await this.qb.backups.wait(this.domain, job.id);
  }

  /** The library's QMP connection dropped at its at-th command; then the next command must recover and never over-claim. */
  protected async qmpDrop(a: Extract<Action, { kind: 'qmp-drop' }>): Promise<Outcome> {
    const deleting = a.op === 'delete';
    if ((this.model.checkpoint(a.name) !== undefined) !== deleting) return 'skipped';
    if (a.since !== undefined && this.model.checkpoint(a.since) === undefined) return 'skipped';
    const proxy = await QmpDropProxy.install(join(this.stateDir, 'domains', this.domain, 'qmp.sock'), { at: a.at, when: a.when });
    let error: unknown;
    try {
      await this.droppedOp(a);
    } catch (err) {
      error = err;
    } finally {
      await proxy.remove();
    }
    const message = error === undefined ? 'it succeeded' : error instanceof Error ? error.message : String(error);
    this.log(`    dropped ${proxy.dropped === undefined ? 'nothing' : `${a.when} ${proxy.dropped}`}: ${message}`);
    if (proxy.dropped === undefined && error !== undefined) throw error;
    if (error !== undefined && !isQbackupError(error)) fail('fault', `a dropped QMP connection gave an untyped error: ${message}`);
    if (error !== undefined) checkOneSentence(message, /./, 'a dropped QMP connection');
    await this.settle();
    const names = new Set(this.listed());
    if (deleting && !names.has(a.name)) this.model.deleteCheckpoint(a.name, false);
    if (!deleting && names.has(a.name)) this.model.addCheckpoint(a.name);
    checkCheckpoints(this.model, this.listed());
    for (const cp of this.model.chain) checkCoverage(this.model, cp.name, await this.qb.checkpoints.coverage(this.domain, this.realName(cp.name)));
    return 'done';
  }

  protected async droppedOp(a: Extract<Action, { kind: 'qmp-drop' }>): Promise<void> {
    if (a.op === 'checkpoint') await this.qb.checkpoints.create(this.domain, { name: a.name });
    else if (a.op === 'delete') await this.qb.checkpoints.delete(this.domain, this.realName(a.name));
    else {
      const spec = { mode: 'push' as const, ...(a.since !== undefined ? { since: this.realName(a.since) } : {}) };
      const started = await this.qb.backups.begin(this.domain, spec, { targetDir: join(this.dir, 'dropped', a.name), checkpoint: { name: a.name } });
      await this.qb.backups.wait(this.domain, started.id);
    }
  }
}

function describeJob(job: JobInfo): string {
  const disks = job.disks.map((d) => `${d.target}=${d.mode}${d.backingFile !== undefined ? `(backing ${d.backingFile.split('/').slice(-2).join('/')})` : ''}`);
  return `${job.mode} job ${job.id} since ${job.incremental ?? '-'} checkpoint ${job.checkpoint ?? '-'}: ${disks.join(' ')}`;
}
