// NBD URIs (src/nbd/uri.ts), TLS certificate directories (src/util/pki.ts)
// and LUKS passphrase files (src/util/secrets.ts) without sockets or QEMU: what each URI means, what is refused and why (a TLS scheme
// is never weakened), the round trip through formatNbdUri, and the one
// sentence for a missing, incomplete or unreadable certificate directory.

import assert from 'node:assert/strict';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { isQbackupError, type ErrorCode } from '../../src/errors.js';
import { formatNbdUri, parseNbdUri, type NbdUri } from '../../src/nbd/uri.js';
import { checkServerCredentials, readClientCredentials } from '../../src/util/pki.js';
import { checkSecretFile } from '../../src/util/secrets.js';

function code(fn: () => unknown, expected: ErrorCode, pattern: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(isQbackupError(err, expected), `expected ${expected}, got ${String(err)}`);
    assert.match(err.message, pattern);
    return true;
  });
}

describe('NBD URIs', () => {
  it('reads the four schemes, the export name, the socket and the TLS parameters', () => {
    const cases: Array<[string, NbdUri]> = [
      ['nbd://127.0.0.1:10810/sda', { address: { host: '127.0.0.1', port: 10810 }, exportName: 'sda', tls: false }],
      ['nbd://host', { address: { host: 'host', port: 10809 }, exportName: '', tls: false }],
      ['nbds://[::1]/a%20b?tls-certificates=/etc/pki/qbackup', { address: { host: '::1', port: 10809 }, exportName: 'a b', tls: true, tlsCertificates: '/etc/pki/qbackup' }],
      ['nbd+unix:///sda?socket=/run/q/nbd.sock', { address: { socket: '/run/q/nbd.sock' }, exportName: 'sda', tls: false }],
      ['nbds+unix:///x?socket=/s&tls-certificates=/p&tls-hostname=backup.example', { address: { socket: '/s' }, exportName: 'x', tls: true, tlsCertificates: '/p', tlsHostname: 'backup.example' }],
      ['nbds://h:1/e?tls-verify-peer=true', { address: { host: 'h', port: 1 }, exportName: 'e', tls: true }],
    ];
    for (const [uri, expected] of cases) {
      assert.deepEqual(parseNbdUri(uri), expected, uri);
      assert.deepEqual(parseNbdUri(formatNbdUri(expected)), expected, `round trip of ${uri}`);
    }
    assert.equal(formatNbdUri({ address: { host: '::1', port: 10809 }, exportName: 'a b', tls: true, tlsCertificates: '/etc/pki' }), 'nbds://[::1]:10809/a%20b?tls-certificates=/etc/pki');
  });

  it('refuses what it does not understand and anything that would weaken TLS', () => {
    const bad: Array<[string, ErrorCode, RegExp]> = [
      ['not a uri', 'INVALID_ARGUMENT', /it is not a URI/],
      ['http://h/sda', 'INVALID_ARGUMENT', /the scheme must be nbd, nbds, nbd\+unix or nbds\+unix/],
      ['nbd+vsock://2/sda', 'INVALID_ARGUMENT', /the scheme must be/],
      ['nbd+unix:///sda', 'INVALID_ARGUMENT', /needs \?socket=PATH/],
      ['nbd+unix://host/sda?socket=/s', 'INVALID_ARGUMENT', /has no host/],
      ['nbd://h/sda?socket=/s', 'INVALID_ARGUMENT', /socket= is only for nbd\+unix/],
      ['nbd://h:70000/sda', 'INVALID_ARGUMENT', /not a URI|outside 1\.\.65535/],
      ['nbd://h:0/sda', 'INVALID_ARGUMENT', /port 0 is outside 1\.\.65535/],
      ['nbd://u:p@h/sda', 'INVALID_ARGUMENT', /user names and passwords/],
      ['nbd://h/sda?tls-certificates=/p', 'INVALID_ARGUMENT', /^Cannot use NBD URI "nbd:\/\/h\/sda\?tls-certificates=\/p": tls-certificates asks for TLS, but nbd:\/\/ is unencrypted \(use nbds\)$/],
      ['nbds://h/sda?tls-verify-peer=false', 'NOT_SUPPORTED', /always verifies the server's certificate/],
      ['nbds://h/sda?tls-psk-file=/k', 'INVALID_ARGUMENT', /query parameter "tls-psk-file" is not supported/],
      ['nbds://h/sda?tls-certificates=/a&tls-certificates=/b', 'INVALID_ARGUMENT', /given twice/],
      ['nbd://h/%zz', 'INVALID_ARGUMENT', /not valid percent-encoding/],
    ];
    for (const [uri, expected, pattern] of bad) code(() => parseNbdUri(uri), expected, pattern);
  });
});

describe('certificate directories', () => {
  const root = mkdtempSync(join(tmpdir(), 'qbt-pki-unit-'));
  after(() => rmSync(root, { recursive: true, force: true }));
  const pem = '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n';
  function dirWith(name: string, files: readonly string[]): string {
    const dir = join(root, name);
    mkdirSync(dir);
    for (const f of files) writeFileSync(join(dir, f), pem);
    return dir;
  }
  const what = 'Cannot serve the backup of domain "vm" over TLS';

  it('server side: the CA, the server certificate and its key, each named when missing', () => {
    const full = dirWith('full', ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']);
    assert.equal(checkServerCredentials(full, what), full);
    code(() => checkServerCredentials(join(root, 'none'), what), 'TLS_CREDENTIALS', /^Cannot serve the backup of domain "vm" over TLS: certificate directory ".*none" does not exist \(it must hold ca-cert\.pem, server-cert\.pem and server-key\.pem\)$/);
    code(() => checkServerCredentials(dirWith('no-key', ['ca-cert.pem', 'server-cert.pem']), what), 'TLS_CREDENTIALS', /certificate directory ".*no-key" has no server-key\.pem$/);
    code(() => checkServerCredentials(dirWith('no-ca', ['server-cert.pem', 'server-key.pem']), what), 'TLS_CREDENTIALS', /has no ca-cert\.pem$/);
    code(() => checkServerCredentials(join(full, 'ca-cert.pem'), what), 'TLS_CREDENTIALS', /is not a directory/);
    code(() => checkServerCredentials('', what), 'TLS_CREDENTIALS', /empty path/);
  });

  it('client side: the CA, and the client certificate and key both or neither', () => {
    const both = readClientCredentials(dirWith('client', ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']), 'x');
    assert.ok(both.ca.length > 0 && both.cert !== undefined && both.key !== undefined);
    const caOnly = readClientCredentials(dirWith('ca-only', ['ca-cert.pem']), 'x');
    assert.equal(caOnly.cert, undefined);
    assert.equal(caOnly.key, undefined);
    code(() => readClientCredentials(dirWith('half', ['ca-cert.pem', 'client-cert.pem']), 'x'), 'TLS_CREDENTIALS', /has client-cert\.pem but no client-key\.pem/);
    code(() => readClientCredentials(dirWith('no-ca-client', ['client-cert.pem', 'client-key.pem']), 'x'), 'TLS_CREDENTIALS', /has no ca-cert\.pem/);
    const garbage = dirWith('garbage', []);
    writeFileSync(join(garbage, 'ca-cert.pem'), 'not a certificate');
    code(() => readClientCredentials(garbage, 'x'), 'TLS_CREDENTIALS', /ca-cert\.pem in certificate directory ".*garbage" cannot be read \(not a PEM file\)/);
  });

  it('LUKS passphrase files: present, non-empty, a regular file, owner-only', () => {
    const dir = join(root, 'secrets');
    mkdirSync(dir);
    const uuid = '6f2a0a3e-1c2b-4d5e-8f90-0123456789ab';
    const what = 'Cannot encrypt the backup of disk "sda" of domain "vm"';
    code(() => checkSecretFile(dir, uuid, what), 'SECRET_NOT_FOUND', new RegExp(`^${what}: secret ${uuid} has no passphrase file ".*/secrets/${uuid}"$`));
    writeFileSync(join(dir, uuid), '', { mode: 0o600 });
    code(() => checkSecretFile(dir, uuid, what), 'SECRET_NOT_FOUND', /is empty$/);
    writeFileSync(join(dir, uuid), 'pass', { mode: 0o600 });
    chmodSync(join(dir, uuid), 0o640);
    code(() => checkSecretFile(dir, uuid, what), 'SECRET_NOT_FOUND', /is readable by other users \(make it 0600\)$/);
    chmodSync(join(dir, uuid), 0o600);
    assert.equal(checkSecretFile(dir, uuid, what), join(dir, uuid));
    mkdirSync(join(dir, '0d8f3c2a-5b6e-4f70-8a9b-c0d1e2f3a4b5'));
    code(() => checkSecretFile(dir, '0d8f3c2a-5b6e-4f70-8a9b-c0d1e2f3a4b5', what), 'SECRET_NOT_FOUND', /is not a regular file$/);
  });
});
