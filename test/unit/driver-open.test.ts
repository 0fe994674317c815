// Choosing a hypervisor driver from a connection URI: none or qbackup:/// is
// our own QEMU engine; libvirt URIs are read (system, session, a socket) and,
// while no libvirt driver is registered, refused with DRIVER_UNAVAILABLE in
// one sentence; anything else is refused the same way.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { HypervisorDriver } from '../../src/drivers/driver.js';
import { openDriver, parseConnectionUri } from '../../src/drivers/open.js';
import { isQbackupError } from '../../src/errors.js';

const local = { uri: 'qbackup:///' } as HypervisorDriver;
const sources = { qemu: () => local };

describe('connection URIs', () => {
  it('none, empty or qbackup:/// opens our QEMU driver', () => {
    for (const uri of [undefined, '', 'qbackup:///']) assert.equal(openDriver(uri, sources), local);
  });

  it('reads the local libvirt URIs', () => {
    assert.deepEqual(parseConnectionUri('qemu:///system'), { kind: 'libvirt', uri: 'qemu:///system', instance: 'system', transport: 'unix', socket: undefined });
    assert.deepEqual(parseConnectionUri('qemu:///session'), { kind: 'libvirt', uri: 'qemu:///session', instance: 'session', transport: 'unix', socket: undefined });
    assert.deepEqual(parseConnectionUri('qemu+unix:///system?socket=/run/x.sock'), {
      kind: 'libvirt', uri: 'qemu+unix:///system?socket=/run/x.sock', instance: 'system', transport: 'unix', socket: '/run/x.sock',
    });
  });

  it('refuses a libvirt URI with one sentence while no libvirt driver is built in', () => {
    assert.throws(
      () => openDriver('qemu:///system', sources),
      (e: unknown) => isQbackupError(e, 'DRIVER_UNAVAILABLE') && /libvirt support is not built into this qbackup/.test((e as Error).message),
    );
  });

  it('refuses what it cannot read or what no driver handles', () => {
    for (const uri of ['xen:///system', 'qemu+ssh://host/system', 'qemu:///embed', 'not a uri']) {
      assert.throws(() => openDriver(uri, sources), (e: unknown) => isQbackupError(e, 'DRIVER_UNAVAILABLE'), uri);
    }
  });
});
