// The pure parts of file-level restore: guest paths taken lexically, names
// escaped for terminals, ls-style modes, shell globs, names safe as one host
// path component, and the download's content type (never HTML).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { QbackupError } from '../../src/errors.js';
import { escapeName, globRegExp, modeString, normalizeGuestPath, safeName } from '../../src/files/index.js';
import { contentType } from '../../src/http/routes-files.js';

test('guest paths are absolute and resolved lexically; .. never climbs above /', () => {
  assert.equal(normalizeGuestPath('/'), '/');
  assert.equal(normalizeGuestPath('//etc/./nginx//nginx.conf'), '/etc/nginx/nginx.conf');
  assert.equal(normalizeGuestPath('/home/../../../etc/shadow'), '/etc/shadow');
  assert.throws(() => normalizeGuestPath('etc/hostname'), (e: unknown) => e instanceof QbackupError && e.code === 'INVALID_ARGUMENT' && /absolute path/.test(e.message));
  assert.throws(() => normalizeGuestPath('/etc/\0x'), (e: unknown) => e instanceof QbackupError && /NUL/.test(e.message));
});

test('names are escaped: control characters, escape sequences, DEL, C1, bidi overrides, backslashes', () => {
  assert.equal(escapeName('plain name é.txt'), 'plain name é.txt');
  assert.equal(escapeName('bad\nname\x1b[31m.txt'), 'bad\\nname\\e[31m.txt');
  assert.equal(escapeName('a\tb\rc\x07d\x7fe\u009bf'), 'a\\tb\\rc\\x07d\\x7fe\\x9bf');
  assert.equal(escapeName('back\\slash'), 'back\\\\slash');
  assert.equal(escapeName('evil\u202etxt.exe'), 'evil\\u202etxt.exe');
  for (let c = 0; c < 0x20; c++) assert.ok(!/[\x00-\x1f]/.test(escapeName(`x${String.fromCharCode(c)}y`)));
});

test('modes read as ls shows them', () => {
  assert.equal(modeString(0o100644), '-rw-r--r--');
  assert.equal(modeString(0o104755), '-rwsr-xr-x');
  assert.equal(modeString(0o102644), '-rw-r-Sr--');
  assert.equal(modeString(0o041777), 'drwxrwxrwt');
  assert.equal(modeString(0o120777), 'lrwxrwxrwx');
  assert.equal(modeString(0o060660), 'brw-rw----');
});

test('globs match whole names: *, ?, [...] and [!...]; other characters are literal', () => {
  const m = (g: string, n: string): boolean => globRegExp(g).test(n);
  assert.ok(m('*.conf', 'nginx.conf'));
  assert.ok(!m('*.conf', 'nginx.conf.bak'));
  assert.ok(m('host?ame', 'hostname'));
  assert.ok(m('[abc]*', 'big'));
  assert.ok(!m('[!abc]*', 'big'));
  assert.ok(m('a.b', 'a.b'));
  assert.ok(!m('a.b', 'axb'));
  assert.ok(m('(x)+', '(x)+'));
  assert.ok(m('*', 'line\nbreak'));
});

test('a host path component is never empty, ., .., or holds / or NUL', () => {
  for (const bad of ['', '.', '..', 'a/b', 'a\0b', 'x'.repeat(256)]) assert.equal(safeName(bad), false, JSON.stringify(bad));
  for (const good of ['...', '.hidden', 'bad\nname\x1b[31m.txt', 'é']) assert.equal(safeName(good), true, JSON.stringify(good));
});

test('a download is typed by its extension and never as HTML', () => {
  assert.equal(contentType('readme.txt'), 'text/plain; charset=utf-8');
  assert.equal(contentType('hostname'), 'text/plain; charset=utf-8');
  assert.equal(contentType('index.html'), 'application/octet-stream');
  assert.equal(contentType('image.svg'), 'application/octet-stream');
  assert.equal(contentType('blob.bin'), 'application/octet-stream');
  assert.equal(contentType('photo.JPG'), 'image/jpeg');
});
