// The bad input the checkpoint commands must refuse (CLI, real QEMU): each
// refusal is one sentence on stderr naming the object and the cause, exit
// status 1, and nothing changes — neither the checkpoint metadata (list,
// disks, losses, intents), nor the domain definition, nor any bitmap on the
// images. Run with the domain running (QMP) and shut off (qemu-img), since the
// two paths read bitmaps differently. Also: undefine with checkpoints, and a
// delete right after QEMU was killed, which must never end in claimed coverage.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { QmpClient } from '../../src/qmp/index.js';
import { runTool } from '../../src/image/tools.js';
import { TestEnv, guestWrite, type CliResult } from '../helpers/env.js';
import { changedSince, clustersOf } from '../helpers/extents.js';

interface BitmapView {
  name: string;
  recording: boolean;
  persistent: boolean;
  inconsistent: boolean;
  granularity: number;
}

/** Bitmaps per disk target, from QEMU (running) or the images (shut off), without taking the domain lock. */
async function readBitmaps(env: TestEnv, domain: string): Promise<Record<string, BitmapView[]>> {
  const disks = env.qb.domains.blockList(domain);
  const out: Record<string, BitmapView[]> = {};
  const sock = join(env.stateDir, 'domains', domain, 'qmp.sock');
  if (env.qb.domains.info(domain).state === 'running') {
    const qmp = await QmpClient.connect(sock);
    try {
      const nodes = await qmp.execute<Array<{ 'node-name'?: string; 'dirty-bitmaps'?: Array<Record<string, unknown>> }>>('query-named-block-nodes', { flat: true });
      for (const d of disks) {
        const node = nodes.find((n) => n['node-name'] === d.nodeName);
        assert.ok(node !== undefined, `QEMU has no node for disk ${d.target}`);
        out[d.target] = (node['dirty-bitmaps'] ?? [])
          .map((b) => ({
            name: String(b['name']),
            recording: b['recording'] === true,
            persistent: b['persistent'] === true,
            inconsistent: b['inconsistent'] === true,
            granularity: Number(b['granularity']),
          }))
          .sort((a, b) => a.name.localeCompare(b.name));
      }
    } finally {
      await qmp.close();
    }
  } else {
    for (const d of disks) {
      const { stdout } = await runTool('qemu-img', ['info', '-U', '--output=json', d.source]);
      const info = JSON.parse(stdout) as { 'format-specific'?: { data?: { bitmaps?: Array<{ name: string; flags: string[]; granularity: number }> } } };
      out[d.target] = (info['format-specific']?.data?.bitmaps ?? [])
        .map((b) => ({ name: b.name, recording: b.flags.includes('auto'), persistent: true, inconsistent: b.flags.includes('in-use'), granularity: b.granularity }))
        .sort((a, b) => a.name.localeCompare(b.name));
    }
  }
  return out;
}

/** Everything a refused command must leave as it was. */
async function snapshot(env: TestEnv, domain: string): Promise<unknown> {
  const db = env.qb.db;
  return {
    list: JSON.parse(await env.cliOk(['checkpoint-list', domain, '--json'])) as unknown,
    domains: env.qb.domains.list(),
    xml: env.qb.domains.dumpXml(domain),
    bitmaps: await readBitmaps(env, domain),
    checkpoints: db.prepare('SELECT * FROM checkpoints ORDER BY domain, name').all(),
    checkpointDisks: db.prepare('SELECT * FROM checkpoint_disks ORDER BY domain, checkpoint, target').all(),
    losses: db.prepare('SELECT * FROM coverage_losses ORDER BY domain, disk_id, checkpoint').all(),
    operations: db.prepare('SELECT * FROM operations').all(),
  };
}

function assertOneSentenceError(r: CliResult, args: readonly string[], pattern: RegExp): void {
  const what = `qbackup ${args.join(' ')}`;
  assert.equal(r.signal, null, `${what} was killed`);
  assert.equal(r.code, 1, `${what} exits 1 (stderr: ${r.stderr})`);
  assert.equal(r.stdout, '', `${what} prints nothing on stdout`);
  assert.match(r.stderr, /^error: [^\n]+\n$/, `${what}: one line on stderr`);
  const message = r.stderr.slice('error: '.length).trim();
  assert.doesNotMatch(message, /[.!?]\s+[A-Z]/, `${what}: one sentence, got: ${message}`);
  assert.doesNotMatch(message, /internal error|\bat .+:\d+:\d+/, `${what}: no stack trace`);
  assert.match(message, pattern, `${what}: names the object and the cause`);
}

const T0 = 1_700_000_000;

for (const mode of ['running', 'shut off'] as const) {
  describe(`checkpoint commands refuse bad input without changing anything (domain ${mode})`, () => {
    const env = new TestEnv('qbt-cperr-');
    const dom = 'vm';
    let baseline: unknown;

    /** Runs a command that must fail, and checks that nothing changed. */
    const refused = async (args: readonly string[], pattern: RegExp, options: { input?: string } = {}): Promise<void> => {
      const r = await env.cli(args, options);
      assertOneSentenceError(r, args, pattern);
      assert.deepEqual(await snapshot(env, dom), baseline, `qbackup ${args.join(' ')} changed nothing`);
    };
    const xmlFile = (name: string, text: string): string => env.writeFile(`${mode.replace(' ', '-')}-${name}.xml`, text);

    before(async () => {
      await env.defineDomain(dom, [{ target: 'sda' }, { target: 'sdb' }, { target: 'sdc', format: 'raw' }]);
      await env.qb.domains.start(dom);
      await env.cliOk(['checkpoint-create-as', dom, '--name', 'c1']);
      await guestWrite(env.qb, dom, 'sda', 'write -P 0x11 0 64k');
      await env.cliOk(['checkpoint-create-as', dom, '--name', 'c2', '--description', 'second']);
      await guestWrite(env.qb, dom, 'sdb', 'write -P 0x22 1M 64k');
      if (mode === 'shut off') await env.qb.domains.shutdown(dom);
      // Valid but unusual names are accepted (and deleted again, merging back into c2).
      for (const name of ['x..y', '_1', '-z', 'A.b-C_9']) {
        await env.cliOk(['checkpoint-create-as', dom, `--name=${name}`]);
        await env.cliOk(['checkpoint-delete', dom, '--', name]);
      }
      const list = JSON.parse(await env.cliOk(['checkpoint-list', dom, '--json'])) as Array<{ name: string; parent: string | null; current: boolean }>;
      assert.deepEqual(list.map((c) => [c.name, c.parent, c.current]), [['c1', null, false], ['c2', 'c1', true]]);
      baseline = await snapshot(env, dom);
      const bitmaps = (baseline as { bitmaps: Record<string, BitmapView[]> }).bitmaps;
      assert.deepEqual(Object.keys(bitmaps).sort(), ['sda', 'sdb', 'sdc']);
      assert.deepEqual(bitmaps['sda']?.map((b) => [b.name, b.recording]), [['c1', false], ['c2', true]]);
      assert.deepEqual(bitmaps['sdc'], []);
    });
    after(async () => env.cleanup());

    test('names outside [a-zA-Z0-9_-][a-zA-Z0-9_.-]*', async () => {
      for (const name of ['bad name', 'a/b', '..x', '.x', 'x;y', 'ä', '']) {
        await refused(['checkpoint-create-as', dom, `--name=${name}`], /Checkpoint name ".*" is invalid/);
      }
      await refused(['checkpoint-create', dom, xmlFile('slash', '<domaincheckpoint><name>a/b</name></domaincheckpoint>')], /"a\/b" is invalid/);
      await refused(['checkpoint-create-as', dom, '--name', 'c9', '--diskspec', 'sda,bitmap=a/b'], /Bitmap name "a\/b" is invalid/);
      await refused(
        ['checkpoint-create', dom, '--redefine', xmlFile('redefine-dot', `<domaincheckpoint><name>.hidden</name><creationTime>${T0}</creationTime></domaincheckpoint>`)],
        /"\.hidden" is invalid/,
      );
    });

    test('duplicate checkpoint and bitmap names', async () => {
      await refused(['checkpoint-create-as', dom, '--name', 'c1'], /checkpoint "c1" of domain "vm": a checkpoint with that name exists/);
      await refused(['checkpoint-create-as', dom, '--name', 'c2'], /checkpoint "c2".*exists/);
      await refused(['checkpoint-create', dom, xmlFile('dup', '<domaincheckpoint><name>c2</name></domaincheckpoint>')], /checkpoint "c2".*exists/);
      await refused(['checkpoint-create-as', dom, '--name', 'c9', '--diskspec', 'sda,bitmap=c1'], /disk "sda" already has a bitmap "c1"/);
    });

    test('unknown checkpoint or domain', async () => {
      for (const cmd of [
        ['checkpoint-delete', dom, 'nosuch'],
        ['checkpoint-delete', dom, 'nosuch', '--children'],
        ['checkpoint-delete', dom, 'nosuch', '--metadata'],
        ['checkpoint-dumpxml', dom, 'nosuch'],
        ['checkpoint-parent', dom, 'nosuch'],
        ['checkpoint-info', dom, 'nosuch'],
        ['checkpoint-coverage', dom, 'nosuch'],
      ]) {
        await refused(cmd, /Domain "vm" has no checkpoint "nosuch"/);
      }
      await refused(['checkpoint-parent', dom, 'c1'], /Checkpoint "c1" of domain "vm" has no parent/);
      await refused(['checkpoint-list', 'nodom'], /Domain "nodom" does not exist/);
      await refused(['checkpoint-create-as', 'nodom', '--name', 'c9'], /Domain "nodom" does not exist/);
      // --json: the same error as one JSON document on stderr.
      const r = await env.cli(['checkpoint-info', dom, 'nosuch', '--json']);
      assert.equal(r.code, 1);
      const err = JSON.parse(r.stderr) as { error: { code: string; message: string } };
      assert.equal(err.error.code, 'CHECKPOINT_NOT_FOUND');
      assert.match(err.error.message, /no checkpoint "nosuch"/);
    });

    test('bad --diskspec', async () => {
      await refused(['checkpoint-create-as', dom, '--name', 'c9', '--diskspec', 'sdz'], /checkpoint "c9" of domain "vm": the domain has no disk "sdz"/);
      await refused(['checkpoint-create-as', dom, '--name', 'c9', '--diskspec', 'sda,checkpoint=maybe'], /Invalid --diskspec "sda,checkpoint=maybe"/);
      await refused(['checkpoint-create-as', dom, '--name', 'c9', '--diskspec', 'sda,checkpoint=no,bitmap=x'], /Invalid --diskspec/);
      await refused(['checkpoint-create-as', dom, '--name', 'c9', '--diskspec', ',checkpoint=no'], /Invalid --diskspec/);
      await refused(['checkpoint-create-as', dom, '--name', 'c9', '--diskspec', 'sda', '--diskspec', 'sdz,checkpoint=no'], /no disk "sdz"/);
    });

    test('checkpoint on a raw disk with checkpoint=bitmap', async () => {
      await refused(['checkpoint-create-as', dom, '--name', 'c9', '--diskspec', 'sdc,checkpoint=bitmap'], /disk "sdc" is raw; bitmaps need qcow2/);
      await refused(
        ['checkpoint-create', dom, xmlFile('raw', "<domaincheckpoint><name>c9</name><disks><disk name='sdc' checkpoint='bitmap'/></disks></domaincheckpoint>")],
        /disk "sdc" is raw/,
      );
    });

    test('documents that are not checkpoints, or not XML', async () => {
      await refused(['checkpoint-create', dom, xmlFile('domain-root', "<domain type='kvm'><name>vm</name></domain>")], /not a <domaincheckpoint> document: its root element is <domain>/);
      await refused(['checkpoint-create', dom, xmlFile('malformed', '<domaincheckpoint><name>c9</name>')], /not well-formed XML/);
      await refused(['checkpoint-create', dom, xmlFile('garbage', 'not xml at all')], /not well-formed XML|no root element/);
      await refused(['checkpoint-create', dom, '-'], /not well-formed XML|no root element/, { input: '' });
      await refused(['checkpoint-create', dom, env.path('missing.xml')], /Cannot read checkpoint XML file ".*missing\.xml": it does not exist/);
      await refused(
        ['checkpoint-create', dom, xmlFile('dup-disk', "<domaincheckpoint><name>c9</name><disks><disk name='sda'/><disk name='sda' checkpoint='no'/></disks></domaincheckpoint>")],
        /sda/,
      );
      await refused(
        ['checkpoint-create', dom, xmlFile('unknown-disk', "<domaincheckpoint><name>c9</name><disks><disk name='sdz'/></disks></domaincheckpoint>")],
        /checkpoint "c9" of domain "vm": the domain has no disk "sdz"/,
      );
      await refused(
        ['checkpoint-create', dom, xmlFile('bad-disk', "<domaincheckpoint><name>c9</name><disks><disk name='sda' checkpoint='maybe'/></disks></domaincheckpoint>")],
        /checkpoint='maybe'/,
      );
      // <parent>/<creationTime> belong to --redefine only.
      await refused(
        ['checkpoint-create', dom, xmlFile('parent-no-redefine', `<domaincheckpoint><name>c9</name><parent><name>c1</name></parent><creationTime>${T0}</creationTime></domaincheckpoint>`)],
        /only accepted with --redefine/,
      );
    });

    test('--redefine without name or creationTime, with a missing parent, with a cycle', async () => {
      await refused(['checkpoint-create', dom, '--redefine', xmlFile('r-noname', `<domaincheckpoint><creationTime>${T0}</creationTime></domaincheckpoint>`)], /the XML has no <name>/);
      await refused(['checkpoint-create', dom, '--redefine', xmlFile('r-notime', '<domaincheckpoint><name>r1</name></domaincheckpoint>')], /checkpoint "r1" of domain "vm": the XML has no <creationTime>/);
      await refused(
        ['checkpoint-create', dom, '--redefine', xmlFile('r-noparent', `<domaincheckpoint><name>r1</name><parent><name>ghost</name></parent><creationTime>${T0}</creationTime></domaincheckpoint>`)],
        /checkpoint "r1" of domain "vm": its parent "ghost" does not exist/,
      );
      // c1 is c2's parent: making c2 the parent of c1 closes a loop.
      await refused(
        ['checkpoint-create', dom, '--redefine', xmlFile('r-cycle', `<domaincheckpoint><name>c1</name><parent><name>c2</name></parent><creationTime>${T0}</creationTime></domaincheckpoint>`)],
        /checkpoint "c1" of domain "vm": parent "c2" would make a cycle/,
      );
      await refused(
        ['checkpoint-create', dom, '--redefine', xmlFile('r-self', `<domaincheckpoint><name>c2</name><parent><name>c2</name></parent><creationTime>${T0}</creationTime></domaincheckpoint>`)],
        /parent "c2" would make a cycle/,
      );
      await refused(['checkpoint-create', dom, '--redefine'], /--redefine needs a checkpoint XML file/);
      await refused(['checkpoint-create', dom, '--redefine-validate', xmlFile('rv-only', `<domaincheckpoint><name>r1</name><creationTime>${T0}</creationTime></domaincheckpoint>`)], /--redefine-validate needs --redefine/);
    });

    test('--redefine-validate when the bitmap does not exist', async () => {
      // Without <disks>: every qcow2 disk should have a bitmap "r1"; none does.
      await refused(
        ['checkpoint-create', dom, '--redefine', '--redefine-validate', xmlFile('rv-default', `<domaincheckpoint><name>r1</name><parent><name>c2</name></parent><creationTime>${T0}</creationTime></domaincheckpoint>`)],
        /checkpoint "r1" of domain "vm": disk "sda" has no bitmap "r1"/,
      );
      await refused(
        [
          'checkpoint-create',
          dom,
          '--redefine',
          '--redefine-validate',
          xmlFile('rv-named', `<domaincheckpoint><name>r1</name><creationTime>${T0}</creationTime><disks><disk name='sda' checkpoint='bitmap' bitmap='c1'/><disk name='sdb' checkpoint='bitmap' bitmap='gone'/></disks></domaincheckpoint>`),
        ],
        /disk "sdb" has no bitmap "gone"/,
      );
    });

    test('--children with --children-only', async () => {
      await refused(['checkpoint-delete', dom, 'c1', '--children', '--children-only'], /--children and --children-only cannot be used together/);
    });

    test('undefine of a domain with checkpoints', async () => {
      if (mode === 'running') {
        await refused(['undefine', dom], /Cannot undefine domain "vm": it is running/);
        await refused(['undefine', dom, '--checkpoints-metadata'], /Cannot undefine domain "vm": it is running/);
        return;
      }
      await refused(['undefine', dom], /Cannot undefine domain "vm": it has checkpoints; pass --checkpoints-metadata/);
      const images = env.qb.domains.blockList(dom).filter((d) => d.format === 'qcow2');
      assert.match(await env.cliOk(['undefine', dom, '--checkpoints-metadata']), /Domain 'vm' has been undefined/);
      const db = env.qb.db;
      assert.deepEqual(JSON.parse(await env.cliOk(['list', '--all', '--json'])), []);
      for (const table of ['checkpoints', 'checkpoint_disks', 'coverage_losses', 'operations', 'disks']) {
        assert.deepEqual(db.prepare(`SELECT * FROM ${table} WHERE domain = ?`).all(dom), [], `no ${table} rows left for vm`);
      }
      assert.ok(!existsSync(join(env.stateDir, 'domains', dom)), 'domain directory removed');
      // The bitmaps stay in the images (as the message says), intact.
      for (const d of images) {
        const { stdout } = await runTool('qemu-img', ['info', '-U', '--output=json', d.source]);
        const names = ((JSON.parse(stdout) as { 'format-specific'?: { data?: { bitmaps?: Array<{ name: string }> } } })['format-specific']?.data?.bitmaps ?? []).map((b) => b.name).sort();
        assert.deepEqual(names, ['c1', 'c2'], `bitmaps of ${d.target} stay`);
      }
    });
  });
}

describe('checkpoint-delete right after the QEMU was killed (SIGKILL)', () => {
  const env = new TestEnv('qbt-cpkill-');
  after(async () => env.cleanup());
  let n = 0;

  const coverage = async (domain: string, cp: string): Promise<Array<{ target: string; mode: string; reasons: Array<{ code: string }> }>> =>
    JSON.parse(await env.cliOk(['checkpoint-coverage', domain, cp, '--json'])) as Array<{ target: string; mode: string; reasons: Array<{ code: string }> }>;

  const assertNoCoverage = async (domain: string, when: string): Promise<void> => {
    for (const cp of env.qb.checkpoints.list(domain).map((c) => c.name)) {
      for (const c of await coverage(domain, cp)) {
        assert.equal(c.mode, 'full', `${when}: coverage since ${cp} on ${c.target} must not be incremental`);
        assert.ok(
          c.reasons.some((r) => r.code === 'bitmap-missing' || r.code === 'bitmap-inconsistent'),
          `${when}: since ${cp} on ${c.target}, reasons ${JSON.stringify(c.reasons)}`,
        );
      }
    }
  };

  for (const victim of ['c2', 'c1'] as const) {
    test(`delete of ${victim === 'c2' ? 'the current checkpoint' : 'the root checkpoint'}`, async (t) => {
      const dom = `k${++n}`;
      await env.defineDomain(dom, [{ target: 'sda' }, { target: 'sdb' }]);
      await env.qb.domains.start(dom);
      await env.cliOk(['checkpoint-create-as', dom, '--name', 'c1']);
      await guestWrite(env.qb, dom, 'sda', 'write -P 0x11 0 64k');
      // A clean shutdown stores c1; the next run loads it (and marks it in use).
      await env.qb.domains.shutdown(dom);
      await env.qb.domains.start(dom);
      await guestWrite(env.qb, dom, 'sdb', 'write -P 0x22 64k 64k');
      await env.cliOk(['checkpoint-create-as', dom, '--name', 'c2']);
      await guestWrite(env.qb, dom, 'sda', 'write -P 0x33 1M 64k');
      for (const cp of ['c1', 'c2']) assert.deepEqual((await coverage(dom, cp)).map((c) => c.mode), ['incremental', 'incremental'], `before the kill, since ${cp}`);

      const pid = env.qb.domains.info(dom).pid;
      assert.ok(pid !== undefined);
      process.kill(pid, 'SIGKILL');
      for (let i = 0; i < 100; i++) {
        try {
          process.kill(pid, 0);
        } catch {
          break;
        }
        await new Promise((r) => setTimeout(r, 50));
      }

      const args = ['checkpoint-delete', dom, victim];
      const r = await env.cli(args);
      t.diagnostic(`checkpoint-delete after the kill: exit ${r.code}${r.stderr !== '' ? `, ${r.stderr.trim()}` : ''}`);
      if (r.code !== 0) assertOneSentenceError(r, args, new RegExp(`"${dom}"`));
      assert.equal(r.signal, null);
      assert.deepEqual(env.qb.db.prepare('SELECT * FROM operations').all(), [], 'no intent left behind');
      assert.equal(env.qb.domains.info(dom).state, 'crashed');
      if (r.code === 0) assert.deepEqual(env.qb.checkpoints.list(dom).map((c) => c.name), victim === 'c2' ? ['c1'] : ['c2']);
      // Whatever happened, no checkpoint claims coverage: the bitmaps died with QEMU.
      await assertNoCoverage(dom, 'after the delete, shut off');
      const images = await readBitmaps(env, dom);
      for (const [target, list] of Object.entries(images)) {
        assert.ok(!list.some((b) => b.name === victim && r.code === 0), `bitmap ${victim} of ${target} is gone after the delete`);
      }

      // The domain starts again, still without claimed coverage; a new checkpoint gives exact coverage.
      await env.qb.domains.start(dom);
      await assertNoCoverage(dom, 'after the restart');
      await env.cliOk(['checkpoint-create-as', dom, '--name', 'c3']);
      await guestWrite(env.qb, dom, 'sda', 'write -P 0x44 2M 64k');
      await guestWrite(env.qb, dom, 'sdb', 'write -P 0x55 3M 64k');
      assert.deepEqual(await changedSince(env.qb, dom, 'c3', 'sda'), clustersOf([{ offset: 2 << 20, length: 65536 }]));
      assert.deepEqual(await changedSince(env.qb, dom, 'c3', 'sdb'), clustersOf([{ offset: 3 << 20, length: 65536 }]));
      for (const cp of env.qb.checkpoints.list(dom).map((c) => c.name).filter((c) => c !== 'c3')) {
        for (const target of ['sda', 'sdb']) {
          const changed = await changedSince(env.qb, dom, cp, target);
          assert.ok(!Array.isArray(changed), `since ${cp} on ${target}: must be full, got ${JSON.stringify(changed)}`);
        }
      }
    });
  }
});
