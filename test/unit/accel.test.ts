// The accelerator follows the domain's type as in libvirt: type='qemu' is
// software emulation (TCG) even where /dev/kvm opens; type='kvm' is KVM, and
// a clear error when KVM is unusable. An explicit choice (the library's
// `accel` option, QBACKUP_ACCEL) overrides the type: the tests force TCG.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { domainVirtType } from '../../src/model/definition-xml.js';
import { accelArgs } from '../../src/qemu/process.js';

describe('accelerator from the domain type', () => {
  it("type='qemu' runs under TCG even where /dev/kvm is usable", () => {
    assert.deepEqual(accelArgs('auto', 'qemu', 'vm', true), ['-accel', 'tcg']);
  });
  it("type='kvm' runs under KVM only (no silent fall back)", () => {
    assert.deepEqual(accelArgs('auto', 'kvm', 'vm', true), ['-accel', 'kvm']);
  });
  it("type='kvm' without a usable KVM is refused in one sentence", () => {
    assert.throws(() => accelArgs('auto', 'kvm', 'vm', false), (err: unknown) =>
      isQbackupError(err, 'NOT_SUPPORTED') && /^Cannot start domain "vm": it is of type 'kvm' but KVM is not usable on this host \(\/dev\/kvm\); use <domain type='qemu'> for software emulation$/.test((err as Error).message));
  });
  it('an explicit accelerator overrides the type', () => {
    assert.deepEqual(accelArgs('tcg', 'kvm', 'vm', true), ['-accel', 'tcg']);
    assert.deepEqual(accelArgs('kvm', 'qemu', 'vm', true), ['-accel', 'kvm']);
  });
  it('the type is read from the definition', () => {
    assert.equal(domainVirtType("<domain type='qemu'><name>a</name></domain>"), 'qemu');
    assert.equal(domainVirtType('<domain type="kvm"><name>a</name></domain>'), 'kvm');
    assert.equal(domainVirtType('<domain><name>a</name></domain>'), undefined);
  });
});
