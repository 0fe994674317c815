// Which disk libvirt's backup begin refused incrementally, from its error
// (libvirt 9.0's codes and sentences), and the bounds of the retry: only a
// disk still asked incrementally since that very checkpoint, once.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { refusedIncremental } from '../../src/drivers/libvirt/driver.js';
import * as C from '../../src/drivers/libvirt/rpc/constants.js';
import { LibvirtCallError } from '../../src/drivers/libvirt/rpc/errors.js';
import { QbackupError } from '../../src/errors.js';

const callError = (code: number, message: string): LibvirtCallError =>
  new LibvirtCallError('domain-backup-begin', { code, domain: 10, message, level: 2, dom: undefined, str1: undefined, str2: undefined, str3: undefined, int1: -1, int2: -1, net: undefined });

const broken = callError(C.VIR_ERR_CHECKPOINT_INCONSISTENT, "checkpoint inconsistent: missing or broken bitmap 'qb-1' for disk 'sdb'");
const gone = callError(C.VIR_ERR_NO_DOMAIN_CHECKPOINT, "Domain checkpoint not found: Checkpoint 'qb-1' for incremental backup of disk 'sda' not found");
const wanted = new Map<string, string | undefined>([['sda', 'qb-1'], ['sdb', 'qb-1'], ['sdc', undefined]]);

describe('libvirt: the disk whose incremental the backup begin refused', () => {
  it('names the disk and quotes libvirt, for a broken bitmap and for a checkpoint gone', () => {
    assert.deepEqual(refusedIncremental(broken, wanted, new Map()), {
      target: 'sdb',
      reason: `BITMAP_INCONSISTENT: libvirt refused the incremental of disk "sdb" since checkpoint "qb-1": checkpoint inconsistent: missing or broken bitmap 'qb-1' for disk 'sdb'`,
    });
    assert.deepEqual(refusedIncremental(gone, wanted, new Map()), {
      target: 'sda',
      reason: `CHECKPOINT_NOT_FOUND: libvirt refused the incremental of disk "sda" since checkpoint "qb-1": Domain checkpoint not found: Checkpoint 'qb-1' for incremental backup of disk 'sda' not found`,
    });
  });

  it('retries no disk twice, nor one asked full or since another checkpoint', () => {
    assert.equal(refusedIncremental(broken, wanted, new Map([['sdb', 'earlier']])), undefined);
    assert.equal(refusedIncremental(broken, new Map([['sdb', undefined]]), new Map()), undefined);
    assert.equal(refusedIncremental(broken, new Map([['sdb', 'qb-0']]), new Map()), undefined);
    assert.equal(refusedIncremental(broken, new Map([['sda', 'qb-1']]), new Map()), undefined);
  });

  it('leaves every other error standing', () => {
    assert.equal(refusedIncremental(callError(C.VIR_ERR_CHECKPOINT_INCONSISTENT, 'something else entirely'), wanted, new Map()), undefined);
    assert.equal(refusedIncremental(callError(C.VIR_ERR_OPERATION_INVALID, "missing or broken bitmap 'qb-1' for disk 'sdb'"), wanted, new Map()), undefined);
    assert.equal(refusedIncremental(new QbackupError('BITMAP_INCONSISTENT', "missing or broken bitmap 'qb-1' for disk 'sdb'"), wanted, new Map()), undefined);
    assert.equal(refusedIncremental(new Error('boom'), wanted, new Map()), undefined);
  });
});
