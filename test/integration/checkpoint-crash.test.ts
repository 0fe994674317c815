// Crash safety of checkpoint create and delete (docs/design.md, the chain model's last rule): the CLI
// kills itself (QBACKUP_CRASH_AT) at each fault point, with the domain running
// (QMP transactions) and shut off (qemu-img bitmap), and the next command on
// the domain must find a state it can complete or roll back. The key check is
// the user-level one: after recovery, for every checkpoint T and every disk,
// the extents QEMU reports as changed since T (read over NBD) are exactly the
// clusters the test wrote since T — metadata never claims coverage the bitmaps
// do not give, and recovery does not throw coverage away either.
// The last suite holds the same invariant for deletes of a checkpoint that has
// no usable bitmap for a disk (checkpoint='no', or its bitmap removed behind
// qbackup's back): the parent must not regain coverage across that gap.

import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { QmpClient } from '../../src/qmp/index.js';
import { runTool } from '../../src/image/tools.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { changedSince, clustersOf, type Extent } from '../helpers/extents.js';

const TARGETS = ['sda', 'sdb'] as const;
const SLOT = 128 * 1024;

interface BitmapView {
  name: string;
  recording: boolean;
  persistent: boolean;
  inconsistent: boolean;
}

type LogEntry = { kind: 'checkpoint'; name: string } | { kind: 'write'; target: string; offset: number; length: number };

/** Bitmaps per disk target, read from QEMU (running) or from the image files (shut off), without the domain lock. */
async function readBitmaps(env: TestEnv, domain: string, running: boolean): Promise<Map<string, BitmapView[]>> {
  const disks = env.qb.domains.blockList(domain);
  const out = new Map<string, BitmapView[]>();
  if (running) {
    const qmp = await QmpClient.connect(join(env.stateDir, 'domains', domain, 'qmp.sock'));
    try {
      const nodes = await qmp.execute<Array<{ 'node-name'?: string; 'dirty-bitmaps'?: Array<Record<string, unknown>> }>>('query-named-block-nodes', { flat: true });
      for (const d of disks) {
        const node = nodes.find((n) => n['node-name'] === d.nodeName);
        assert.ok(node !== undefined, `QEMU has no node ${d.nodeName} for disk ${d.target}`);
        out.set(
          d.target,
          (node['dirty-bitmaps'] ?? [])
            .map((b) => ({ name: String(b['name']), recording: b['recording'] === true, persistent: b['persistent'] === true, inconsistent: b['inconsistent'] === true }))
            .sort((a, b) => a.name.localeCompare(b.name)),
        );
      }
    } finally {
      await qmp.close();
    }
  } else {
    for (const d of disks) {
      const { stdout } = await runTool('qemu-img', ['info', '-U', '--output=json', d.source]);
      const info = JSON.parse(stdout) as { 'format-specific'?: { data?: { bitmaps?: Array<{ name: string; flags: string[] }> } } };
      out.set(
        d.target,
        (info['format-specific']?.data?.bitmaps ?? [])
          .map((b) => ({ name: b.name, recording: b.flags.includes('auto'), persistent: true, inconsistent: b.flags.includes('in-use') }))
          .sort((a, b) => a.name.localeCompare(b.name)),
      );
    }
  }
  return out;
}

/** A domain with two qcow2 disks and a log of the checkpoints and guest writes made on it. */
class Scenario {
  readonly log: LogEntry[] = [];
  private slot = 0;
  running = false;

  constructor(
    readonly env: TestEnv,
    readonly domain: string,
  ) {}

  async setUp(): Promise<void> {
    await this.env.defineDomain(this.domain, TARGETS.map((target) => ({ target })));
    await this.env.qb.domains.start(this.domain);
    this.running = true;
  }

  /** A guest write of one fresh 64 KiB cluster on every disk (through the library, so under the lock). */
  async writeAll(): Promise<void> {
    for (const target of TARGETS) {
      const offset = this.slot++ * SLOT;
      await guestWrite(this.env.qb, this.domain, target, `write -P 0x${((this.slot % 200) + 16).toString(16)} ${offset} 64k`);
      this.log.push({ kind: 'write', target, offset, length: 65536 });
    }
  }

  /** The same, over a QMP connection of our own: no lock, so no recovery runs. */
  async writeAllRaw(): Promise<void> {
    const qmp = await QmpClient.connect(join(this.env.stateDir, 'domains', this.domain, 'qmp.sock'));
    try {
      for (const d of this.env.qb.domains.blockList(this.domain)) {
        const offset = this.slot++ * SLOT;
        const out = await qmp.humanMonitorCommand(`qemu-io -d ${d.qemuIoDevice} "write -P 0x5a ${offset} 64k"`);
        assert.doesNotMatch(out, /error|failed/i);
        this.log.push({ kind: 'write', target: d.target, offset, length: 65536 });
      }
    } finally {
      await qmp.close();
    }
  }

  async checkpoint(name: string): Promise<void> {
    await this.env.cliOk(['checkpoint-create-as', this.domain, '--name', name]);
    this.log.push({ kind: 'checkpoint', name });
  }

  async shutdown(): Promise<void> {
    await this.env.qb.domains.shutdown(this.domain);
    this.running = false;
  }

  async start(): Promise<void> {
    await this.env.qb.domains.start(this.domain);
    this.running = true;
  }

  writesSince(checkpoint: string, target: string): Extent[] {
    const at = this.log.findIndex((e) => e.kind === 'checkpoint' && e.name === checkpoint);
    assert.ok(at >= 0, `no checkpoint ${checkpoint} in the log`);
    return this.log.slice(at + 1).flatMap((e) => (e.kind === 'write' && e.target === target ? [{ offset: e.offset, length: e.length }] : []));
  }

  bitmaps(): Promise<Map<string, BitmapView[]>> {
    return readBitmaps(this.env, this.domain, this.running);
  }

  async runCrashing(args: readonly string[], point: string): Promise<void> {
    const r = await this.env.cli(args, { env: { QBACKUP_CRASH_AT: point } });
    assert.equal(r.signal, 'SIGKILL', `qbackup ${args.join(' ')} with QBACKUP_CRASH_AT=${point} should die by SIGKILL (exit ${r.code}): ${r.stderr}`);
    assert.equal(r.stdout, '', 'a killed command prints no success message');
    const ops = this.env.qb.db.prepare('SELECT kind FROM operations WHERE domain = ?').all(this.domain) as Array<{ kind: string }>;
    assert.deepEqual(ops.map((o) => o.kind), [point.split(':')[0]], 'the intent is journaled before the crash');
  }

  /** The next command that takes the lock (and so runs recovery). */
  async recover(): Promise<void> {
    const first = this.checkpointNames()[0];
    assert.ok(first !== undefined);
    await this.env.cliOk(['checkpoint-coverage', this.domain, first, '--json']);
    assert.deepEqual(this.env.qb.db.prepare('SELECT * FROM operations').all(), [], 'recovery leaves no intent behind');
  }

  checkpointNames(): string[] {
    return this.env.qb.checkpoints.list(this.domain).map((c) => c.name);
  }

  async listJson(): Promise<Array<{ name: string; parent: string | null; current: boolean }>> {
    return JSON.parse(await this.env.cliOk(['checkpoint-list', this.domain, '--json'])) as Array<{ name: string; parent: string | null; current: boolean }>;
  }

  /**
   * The user-level check: for every checkpoint T and disk, coverage says
   * incremental (CLI) and the merged bitmaps T…current hold exactly the
   * clusters written since T (NBD, domain running).
   */
  async assertCoverageExact(): Promise<void> {
    for (const cp of this.checkpointNames()) {
      const cov = JSON.parse(await this.env.cliOk(['checkpoint-coverage', this.domain, cp, '--json'])) as Array<{ target: string; mode: string; reasons: unknown[] }>;
      assert.deepEqual(
        cov.map((c) => [c.target, c.mode, c.reasons]),
        TARGETS.map((t) => [t, 'incremental', []]),
        `coverage since ${cp}`,
      );
    }
    if (!this.running) await this.start();
    await this.writeAll();
    for (const cp of this.checkpointNames()) {
      for (const target of TARGETS) {
        const changed = await changedSince(this.env.qb, this.domain, cp, target);
        assert.ok(Array.isArray(changed), `changed since ${cp} on ${target}: ${JSON.stringify(changed)}`);
        assert.deepEqual(changed, clustersOf(this.writesSince(cp, target)), `changed since ${cp} on ${target} is exactly what was written since`);
      }
    }
  }
}

/** Asserts the chain's bitmap shape on every disk: exactly `names` exist, all usable, only `recording` records. */
function assertBitmaps(bitmaps: Map<string, BitmapView[]>, names: string[], recording: string, when: string): void {
  for (const target of TARGETS) {
    const list = bitmaps.get(target) ?? [];
    assert.deepEqual(list.map((b) => b.name), [...names].sort(), `${when}: bitmaps of ${target}`);
    for (const b of list) {
      assert.equal(b.inconsistent, false, `${when}: bitmap ${b.name} of ${target} is consistent`);
      assert.equal(b.persistent, true, `${when}: bitmap ${b.name} of ${target} is persistent`);
      assert.equal(b.recording, b.name === recording, `${when}: bitmap ${b.name} of ${target} recording=${b.name === recording}`);
    }
  }
}

let counter = 0;

for (const mode of ['running', 'shut off'] as const) {
  describe(`checkpoint crash recovery (domain ${mode})`, () => {
    const env = new TestEnv('qbt-crash-');
    after(async () => env.cleanup());

    for (const point of ['checkpoint-create:after-intent', 'checkpoint-create:after-qemu'] as const) {
      test(`create killed at ${point}`, async () => {
        const s = new Scenario(env, `c${++counter}`);
        await s.setUp();
        await s.checkpoint('c1');
        await s.writeAll();
        await s.checkpoint('c2');
        await s.writeAll();
        if (mode === 'shut off') await s.shutdown();
        const before = await s.bitmaps();
        assertBitmaps(before, ['c1', 'c2'], 'c2', 'before the crash');

        await s.runCrashing(['checkpoint-create-as', s.domain, '--name', 'c3'], point);
        const crashAt = s.log.length;
        const raw = await s.bitmaps();
        if (point.endsWith('after-intent')) assert.deepEqual(raw, before, 'killed before touching the bitmaps');
        else assertBitmaps(raw, ['c1', 'c2', 'c3'], 'c3', 'killed right after the bitmap change');
        // Guest writes between the crash and the next command must land in the right bitmap.
        if (s.running) await s.writeAllRaw();

        await s.recover();
        const list = await s.listJson();
        const exists = list.some((c) => c.name === 'c3');
        const after = await s.bitmaps();
        if (exists) {
          // Completed: the checkpoint and all its bitmaps, only the newest recording.
          assertBitmaps(after, ['c1', 'c2', 'c3'], 'c3', 'after recovery (completed)');
          assert.deepEqual(list.map((c) => [c.name, c.parent, c.current]), [['c1', null, false], ['c2', 'c1', false], ['c3', 'c2', true]]);
          s.log.splice(crashAt, 0, { kind: 'checkpoint', name: 'c3' });
        } else {
          // Rolled back: no stray bitmap, the previous one still recording.
          assertBitmaps(after, ['c1', 'c2'], 'c2', 'after recovery (rolled back)');
          assert.deepEqual(list.map((c) => [c.name, c.parent, c.current]), [['c1', null, false], ['c2', 'c1', true]]);
        }
        // The images decide: nothing done → rolled back; everything done → completed.
        assert.equal(exists, point.endsWith('after-qemu'), 'recovery outcome follows what the images hold');
        assert.deepEqual(env.qb.db.prepare('SELECT * FROM coverage_losses WHERE domain = ?').all(s.domain), [], 'no coverage loss recorded');

        await s.assertCoverageExact();
        // And the chain keeps working: a new checkpoint with the crashed name (if rolled back) or another one.
        await s.checkpoint(exists ? 'c4' : 'c3');
        await s.writeAll();
        await s.assertCoverageExact();
      });
    }

    for (const point of ['checkpoint-delete:after-intent', 'checkpoint-delete:after-qemu'] as const) {
      for (const victim of ['c2', 'c3'] as const) {
        const which = victim === 'c2' ? 'a middle checkpoint' : 'the current checkpoint';
        test(`delete of ${which} killed at ${point}`, async () => {
          const s = new Scenario(env, `c${++counter}`);
          await s.setUp();
          await s.checkpoint('c1');
          await s.writeAll();
          await s.checkpoint('c2');
          await s.writeAll();
          await s.checkpoint('c3');
          await s.writeAll();
          if (mode === 'shut off') await s.shutdown();
          const before = await s.bitmaps();
          assertBitmaps(before, ['c1', 'c2', 'c3'], 'c3', 'before the crash');

          await s.runCrashing(['checkpoint-delete', s.domain, victim], point);
          const raw = await s.bitmaps();
          if (point.endsWith('after-intent')) assert.deepEqual(raw, before, 'killed before touching the bitmaps');
          else assertBitmaps(raw, victim === 'c2' ? ['c1', 'c3'] : ['c1', 'c2'], victim === 'c2' ? 'c3' : 'c2', 'killed right after the merge');
          if (s.running) await s.writeAllRaw();

          await s.recover();
          const list = await s.listJson();
          const remaining = victim === 'c2' ? ['c1', 'c3'] : ['c1', 'c2'];
          const current = remaining[1] ?? '';
          // The deletion is completed: checkpoint and bitmap gone, children reparented, parent holds the merged data.
          assert.deepEqual(
            list.map((c) => [c.name, c.parent, c.current]),
            [
              ['c1', null, false],
              [current, 'c1', true],
            ],
          );
          assertBitmaps(await s.bitmaps(), remaining, current, 'after recovery');
          assert.deepEqual(env.qb.db.prepare('SELECT * FROM operations').all(), []);
          assert.deepEqual(env.qb.db.prepare('SELECT * FROM coverage_losses WHERE domain = ?').all(s.domain), [], 'no coverage loss recorded');
          const ids = env.qb.db.prepare('SELECT checkpoint FROM checkpoint_disks WHERE domain = ? AND checkpoint = ?').all(s.domain, victim);
          assert.deepEqual(ids, [], 'no disk rows of the deleted checkpoint');

          // Writes made before the deletion since the parent are still reported from it (and from c1).
          await s.assertCoverageExact();
          await s.checkpoint('c4');
          await s.writeAll();
          await env.cliOk(['checkpoint-delete', s.domain, current]);
          await s.assertCoverageExact();
        });
      }
    }
  });
}

/**
 * The general form of the invariant, for states where losing coverage is
 * expected: for every checkpoint T and disk, either the answer is "full" with
 * a reason, or the merged bitmaps hold every cluster written since T.
 */
async function assertNoFalseCoverage(s: Scenario): Promise<Map<string, string>> {
  const modes = new Map<string, string>();
  for (const cp of s.checkpointNames()) {
    for (const target of TARGETS) {
      const changed = await changedSince(s.env.qb, s.domain, cp, target);
      if (!Array.isArray(changed)) {
        assert.ok(changed.full.length > 0, `full without a reason since ${cp} on ${target}`);
        modes.set(`${cp}/${target}`, `full:${changed.full.join(',')}`);
        continue;
      }
      const covered = (c: Extent): boolean => changed.some((e) => e.offset <= c.offset && c.offset + c.length <= e.offset + e.length);
      const missing = clustersOf(s.writesSince(cp, target)).flatMap((e) => {
        const out: Extent[] = [];
        for (let o = e.offset; o < e.offset + e.length; o += 65536) if (!covered({ offset: o, length: 65536 })) out.push({ offset: o, length: 65536 });
        return out;
      });
      assert.deepEqual(missing, [], `coverage since ${cp} on ${target} is claimed incremental but misses written clusters`);
      modes.set(`${cp}/${target}`, 'incremental');
    }
  }
  return modes;
}

describe('deleting a checkpoint without a usable bitmap for a disk never gives its parent coverage it lacks', () => {
  const env = new TestEnv('qbt-gap-');
  after(async () => env.cleanup());

  for (const victim of ['c2', 'c3'] as const) {
    for (const how of ['checkpoint=no', 'bitmap removed outside qbackup'] as const) {
      test(`${victim === 'c2' ? 'middle' : 'current'} checkpoint, disk sda: ${how}`, async () => {
        const s = new Scenario(env, `g${++counter}`);
        await s.setUp();
        await s.checkpoint('c1');
        await s.writeAll();
        const mk = async (name: string): Promise<void> => {
          if (how === 'checkpoint=no' && name === victim) {
            await env.cliOk(['checkpoint-create-as', s.domain, '--name', name, '--diskspec', 'sda,checkpoint=no']);
            s.log.push({ kind: 'checkpoint', name });
          } else {
            await s.checkpoint(name);
          }
        };
        await mk('c2');
        await s.writeAll();
        if (victim === 'c3') await mk('c3');
        await s.writeAll();
        if (victim === 'c2') await mk('c3');
        await s.writeAll();
        if (how !== 'checkpoint=no') {
          const node = env.qb.domains.blockList(s.domain).find((d) => d.target === 'sda')?.nodeName ?? '';
          await env.cliOk(['qemu-monitor-command', s.domain, JSON.stringify({ execute: 'block-dirty-bitmap-remove', arguments: { node, name: victim } })]);
        }
        await assertNoFalseCoverage(s);
        await env.cliOk(['checkpoint-delete', s.domain, victim]);
        await s.writeAll();
        const modes = await assertNoFalseCoverage(s);
        // sdb had bitmaps all along: it keeps incremental coverage; sda has none from the parent on.
        for (const cp of s.checkpointNames()) assert.equal(modes.get(`${cp}/sdb`), 'incremental', `sdb since ${cp}`);
        const parent = victim === 'c2' ? 'c1' : 'c2';
        assert.match(modes.get(`${parent}/sda`) ?? '', /^full:.*bitmap-missing/, `sda since ${parent}`);
        assert.match(modes.get('c1/sda') ?? '', /^full:/, 'sda since c1');
        if (victim === 'c2') assert.equal(modes.get('c3/sda'), 'incremental', 'sda since c3 (after the gap)');
        // More checkpoints and a restart (reconcile) must not bring the lost coverage back either.
        await s.checkpoint('c4');
        await s.writeAll();
        await s.shutdown();
        await s.start();
        await s.writeAll();
        const later = await assertNoFalseCoverage(s);
        assert.match(later.get(`${parent}/sda`) ?? '', /^full:/, `sda since ${parent} after a restart`);
        assert.equal(later.get('c4/sda'), 'incremental', 'sda since c4');
      });
    }
  }
});
