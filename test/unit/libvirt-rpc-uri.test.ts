// Connection URIs: which driver, which socket, and one sentence for the rest.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseConnectUri } from '../../src/drivers/libvirt/index.js';
import { isQbackupError } from '../../src/errors.js';

describe('connection URIs', () => {
  it('select qbackup own driver by default or with qbackup:///', () => {
    assert.equal(parseConnectUri(undefined).driver, 'qbackup');
    assert.equal(parseConnectUri('').driver, 'qbackup');
    assert.equal(parseConnectUri('qbackup:///').driver, 'qbackup');
  });

  it('select libvirt with the socket of each form', () => {
    assert.deepEqual(parseConnectUri('qemu:///system'), { driver: 'libvirt', uri: 'qemu:///system', name: 'qemu:///system', mode: 'system', socketPath: '/var/run/libvirt/libvirt-sock' });
    assert.deepEqual(parseConnectUri('qemu:///session', { runtimeDir: '/run/user/1000' }), {
      driver: 'libvirt',
      uri: 'qemu:///session',
      name: 'qemu:///session',
      mode: 'session',
      socketPath: '/run/user/1000/libvirt/libvirt-sock',
    });
    const unix = parseConnectUri('qemu+unix:///system?socket=/tmp/x/libvirt-sock');
    assert.equal(unix.driver === 'libvirt' ? `${unix.name} ${unix.socketPath}` : '', 'qemu:///system /tmp/x/libvirt-sock');
  });

  it('refuse remote transports, hosts, other drivers and malformed URIs in one sentence', () => {
    const cases: Array<[string, string, RegExp]> = [
      ['qemu+ssh://root@host/system', 'NOT_SUPPORTED', /remote transport "ssh"/],
      ['qemu+tls://host/system', 'NOT_SUPPORTED', /remote transport "tls"/],
      ['qemu+tcp://host/system', 'NOT_SUPPORTED', /remote transport "tcp"/],
      ['qemu://host/system', 'NOT_SUPPORTED', /host "host"/],
      ['xen:///system', 'NOT_SUPPORTED', /driver "xen"/],
      ['qemu:///embed?root=/x', 'NOT_SUPPORTED', /path "\/embed"/],
      ['qemu+unix:///system?socket=rel/sock', 'INVALID_ARGUMENT', /not absolute/],
      ['qemu+unix:///system?mode=legacy', 'INVALID_ARGUMENT', /parameter "mode"/],
      ['qemu:///session', 'INVALID_ARGUMENT', /XDG_RUNTIME_DIR/],
      ['system', 'INVALID_ARGUMENT', /not of the form/],
      ['qbackup://host/', 'INVALID_ARGUMENT', /qbackup:\/\/\//],
    ];
    for (const [uri, code, message] of cases) {
      assert.throws(() => parseConnectUri(uri), (err: unknown) => {
        assert.ok(isQbackupError(err), String(err));
        assert.equal(err.code, code, uri);
        assert.match(err.message, message);
        assert.ok(!err.message.includes('\n'), 'one line');
        return true;
      });
    }
  });
});
