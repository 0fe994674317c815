// Redefine is how a management application restores qbackup's checkpoint
// metadata after losing it: the bitmaps are still in the images, the saved
// <domaincheckpoint> documents are imported, validated against the bitmaps,
// and "changed since T" works again exactly as before.

import { formatCheckpointXml } from '../../src/libvirt/checkpoint.js';
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { changedSince, clustersOf } from '../helpers/extents.js';

const MiB = 1 << 20;

describe('checkpoint redefine after metadata loss (real QEMU)', () => {
  let env: TestEnv;
  before(async () => {
    env = new TestEnv();
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 8 * MiB }]);
  });
  after(async () => env.cleanup());

  test('saved checkpoint XML restores the chain and its coverage', async () => {
    const qb = env.qb;
    const domainXml = qb.domains.dumpXml('vm');
    await qb.domains.start('vm', { paused: true });
    await guestWrite(qb, 'vm', 'sda', 'write -P 1 0 64k');
    await qb.checkpoints.create('vm', { name: 'c1' });
    await guestWrite(qb, 'vm', 'sda', 'write -P 2 1M 64k');
    await qb.checkpoints.create('vm', { name: 'c2' });
    await guestWrite(qb, 'vm', 'sda', 'write -P 3 2M 64k');
    const saved = [formatCheckpointXml(await qb.checkpoints.describe('vm', 'c1')), formatCheckpointXml(await qb.checkpoints.describe('vm', 'c2'))];
    await qb.domains.shutdown('vm');

    // the metadata is lost; the images keep their bitmaps
    await qb.domains.undefine('vm', { checkpointsMetadata: true });
    await qb.domains.define(domainXml);
    assert.deepEqual(qb.checkpoints.list('vm'), []);

    for (const [i, xml] of saved.entries()) {
      const r = await env.cli(['checkpoint-create', 'vm', env.writeFile(`saved${i}.xml`, xml), '--redefine', '--redefine-validate']);
      assert.equal(r.code, 0, r.stderr);
    }
    const list = qb.checkpoints.list('vm');
    assert.deepEqual(list.map((c) => [c.name, c.parent, c.current]), [['c1', null, false], ['c2', 'c1', true]]);

    await qb.domains.start('vm', { paused: true });
    await guestWrite(qb, 'vm', 'sda', 'write -P 4 3M 64k');
    assert.deepEqual(
      await changedSince(qb, 'vm', 'c1', 'sda'),
      clustersOf([{ offset: 1 * MiB, length: 65536 }, { offset: 2 * MiB, length: 65536 }, { offset: 3 * MiB, length: 65536 }]),
    );
    assert.deepEqual(await changedSince(qb, 'vm', 'c2', 'sda'), clustersOf([{ offset: 2 * MiB, length: 65536 }, { offset: 3 * MiB, length: 65536 }]));
    // and the redefined chain keeps working: a new checkpoint disables c2's bitmap
    await qb.checkpoints.create('vm', { name: 'c3' });
    assert.equal(qb.checkpoints.info('vm', 'c3').parent, 'c2');
    assert.equal((await qb.checkpoints.coverage('vm', 'c1'))[0]?.mode, 'incremental');
  });
});
