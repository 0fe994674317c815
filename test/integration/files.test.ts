// File-level restore end to end: a domain whose disk holds a partitioned
// disk with an ext4 root (an /etc/fstab and /etc/os-release, so libguestfs
// inspection finds it and mounts the vfat partition at /boot/efi and an ext4
// on LVM, on a third disk, at /srv) is backed up by qbackup's real backup
// path, changed as its guest would change it (the new filesystems written
// into the running disks), and backed up again.
// - Both backups list and give back what the guest had at each: contents,
//   modes, owners and times, on ext4, on ext4 in an LVM volume and on vfat;
//   files deleted after the first backup still come back from it.
// - get writes files, directories and symlinks with their modes and times;
//   a symlink to /etc/shadow is restored as that link and never followed;
//   nothing lands outside --to.
// - A name with a newline and an escape sequence is printed escaped.
// - The CLI gets /etc/hostname from an encrypted repository with --until.
// - Bad input gets one sentence: a path that does not exist, a disk with no
//   filesystem, a backup id that does not exist, an appliance that cannot
//   start (no appliance; a SUPERMIN_KERNEL that does not exist); after a
//   kill -9 of the CLI the next command ends its appliance.
// One appliance per backup is shared by the cases (booting one under
// software emulation costs tens of seconds); the LVM disk is built by one
// guestfish run, both of its versions in the same appliance.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, lstatSync, mkdirSync, readFileSync, readdirSync, readlinkSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { QbackupError } from '../../src/errors.js';
import { FileSession, GuestfsAppliance, escapeName, reapStaleSessions, type FileSessionOptions } from '../../src/files/index.js';
import { runTool } from '../../src/image/tools.js';
import type { Manifest } from '../../src/repository/repository.js';
import { isProcessAlive } from '../../src/util/proc.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { MiB, ext4Image, guestfish, partitionedDisk, vfatImage, writeTree, type TreeEntry } from '../helpers/guest-fs.js';
import { cliError, fileTree, spawnCli, waitFor } from '../helpers/repo.js';

const T1 = 1_700_000_000;
const T2 = 1_710_000_000;
const BAD_NAME = 'bad\nname\x1b[31m.txt';
const ROOT_UUID = '0b6e1c3a-5a44-4d0e-8f6b-2f7d4d5b9a11';
const PASSWORD = 'files test passphrase';
const BIG = randomBytes(300 * 1024);
const LV_BYTES = 8 * MiB;

/**
 * The LVM disk (sdc: a whole-disk PV, VG datavg, LV data, ext4 "lvdata") and
 * the LV's filesystem after the guest's changes (report.txt rewritten,
 * draft.txt deleted, todo.txt written), built in one guestfish appliance:
 * the changed filesystem is a copy of the LV's, changed on a second drive.
 * Returns the LV's byte offset on the disk.
 */
async function lvmDisk(disk: string, changedLv: string): Promise<number> {
  await runTool('truncate', ['-s', String(16 * MiB), disk]);
  await runTool('truncate', ['-s', String(LV_BYTES), changedLv]);
  const out = await guestfish(
    [disk, changedLv],
    [
      'pvcreate /dev/sda',
      'vgcreate datavg /dev/sda',
      `lvcreate data datavg ${LV_BYTES / MiB}`,
      'mkfs ext4 /dev/datavg/data label:lvdata',
      'mount /dev/datavg/data /',
      'mkdir-mode /projects 0750',
      'chown 1000 1000 /projects',
      'write /projects/report.txt "quarterly report v1\\n"',
      'chmod 0640 /projects/report.txt',
      'chown 1000 1000 /projects/report.txt',
      `utimens /projects/report.txt ${T1} 0 ${T1 + 10} 0`,
      'write /projects/draft.txt "a draft\\n"',
      'chmod 0600 /projects/draft.txt',
      `utimens /projects/draft.txt ${T1} 0 ${T1 + 20} 0`,
      `utimens /projects ${T1} 0 ${T1 + 30} 0`,
      'umount /',
      'copy-device-to-device /dev/datavg/data /dev/sdb',
      'mount /dev/sdb /',
      'write /projects/report.txt "quarterly report v2\\n"',
      `utimens /projects/report.txt ${T2} 0 ${T2 + 10} 0`,
      'rm /projects/draft.txt',
      'write /projects/todo.txt "call alice\\n"',
      'chmod 0644 /projects/todo.txt',
      `utimens /projects/todo.txt ${T2} 0 ${T2 + 20} 0`,
      `utimens /projects ${T2} 0 ${T2 + 30} 0`,
      'umount /',
      'pvs-full',
    ],
  );
  const m = /pe_start: (\d+)/.exec(out);
  assert.ok(m !== null, `guestfish reports where the LV starts: ${out}`);
  return Number(m[1]);
}

function rootTree(hostname: string, withNotes: boolean): TreeEntry[] {
  return [
    { path: 'etc', dir: true, mode: 0o755, time: T1 },
    { path: 'etc/hostname', data: hostname, mode: 0o644, time: hostname === 'vm1\n' ? T1 : T2 },
    { path: 'etc/fstab', data: 'LABEL=rootfs / ext4 defaults 0 1\nLABEL=EFI /boot/efi vfat defaults 0 2\n/dev/datavg/data /srv ext4 defaults 0 2\n', mode: 0o644, time: T1 },
    { path: 'etc/os-release', data: 'NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n', mode: 0o644, time: T1 },
    { path: 'etc/shadow', data: 'root:guest-secret:19000:0:99999:7:::\n', mode: 0o640, gid: 42, uid: 0, time: T1 },
    { path: 'bin', dir: true, mode: 0o755, time: T1 },
    { path: 'srv', dir: true, mode: 0o755, time: T1 },
    { path: 'boot/efi', dir: true, mode: 0o700, time: T1 },
    { path: 'usr/bin/tool', data: '#!/bin/sh\necho tool\n', mode: 0o4755, time: T1 },
    { path: 'tmp', dir: true, mode: 0o1777, time: T1 },
    { path: 'home/alice', dir: true, mode: 0o750, uid: 1000, gid: 1000, time: T1 + 300 },
    ...(withNotes ? [{ path: 'home/alice/notes.txt', data: "alice's notes\n", mode: 0o600, uid: 1000, gid: 1000, time: T1 + 60 }] : [{ path: 'home/alice/new.txt', data: 'written after the first backup\n', mode: 0o644, uid: 1000, gid: 1000, time: T2 }]),
    { path: 'home/alice/big.bin', data: BIG, mode: 0o644, uid: 1000, gid: 1000, time: T1 + 120 },
    { path: 'home/alice/docs', dir: true, mode: 0o755, uid: 1000, gid: 1000, time: T1 + 200 },
    { path: 'home/alice/docs/plan.txt', data: 'step 1\n', mode: 0o664, uid: 1000, gid: 1000, time: T1 + 180 },
    { path: 'home/alice/shadow-link', link: '/etc/shadow', uid: 1000, gid: 1000, time: T1 + 240 },
    { path: 'home/alice/up', link: '../../../../../../etc/passwd', time: T1 + 250 },
    { path: `home/${BAD_NAME}`, data: 'hostile name\n', mode: 0o644, time: T1 },
  ];
}

describe('files: browse and fetch files of backups (libguestfs appliance over our NBD server)', () => {
  let env: TestEnv;
  let repo: string;
  let encRepo: string;
  let b1: Manifest;
  let b2: Manifest;
  let e1: Manifest;
  let s1: FileSession | undefined;
  let s2: FileSession | undefined;
  const appliance = { backendSettings: ['force_tcg'] };
  const cliEnv = { QBACKUP_ACCEL: 'tcg' };

  const open = (o: Partial<FileSessionOptions>): Promise<FileSession> =>
    FileSession.open(env.qb.repository, { repo, domain: 'vm', runDir: env.qb.domains.runDir(), appliance, ...o });

  async function read(s: FileSession, path: string): Promise<Buffer> {
    const out = new PassThrough();
    const chunks: Buffer[] = [];
    out.on('data', (b: Buffer) => chunks.push(b));
    await s.read(path, out);
    out.end();
    return Buffer.concat(chunks);
  }

  before(async () => {
    env = new TestEnv('qbf-', { accel: 'tcg' });
    repo = env.path('repo');
    encRepo = env.path('repo-enc');
    // sdc: ext4 on LVM, built in an appliance while the rest is made here.
    const sdcRaw = env.path('lvm.raw');
    const lvmBuilt = lvmDisk(sdcRaw, env.path('lv2.img'));
    lvmBuilt.catch(() => undefined); // awaited below
    // sda: ext4 root (24 MiB) and a vfat EFI partition (8 MiB) on an MBR.
    const tree1 = env.path('tree1');
    writeTree(tree1, rootTree('vm1\n', true));
    await ext4Image(env.path('root1.img'), tree1, 24 * MiB, 'rootfs', ROOT_UUID);
    writeTree(env.path('efi1'), [
      { path: 'hello.txt', data: 'hello from the EFI partition\n', time: T1 },
      { path: 'old.txt', data: 'removed after the first backup\n', time: T1 + 2 },
    ]);
    await vfatImage(env.path('efi.img'), 8 * MiB, 'EFI', ['hello.txt', 'old.txt'].map((name) => ({ name, path: env.path(`efi1/${name}`) })));
    writeTree(env.path('efi2'), [
      { path: 'hello.txt', data: 'hello again, changed\n', time: T2 },
      { path: 'grub.cfg', data: 'set timeout=5\n', time: T2 + 4 },
    ]);
    await vfatImage(env.path('efi2.img'), 8 * MiB, 'EFI', ['hello.txt', 'grub.cfg'].map((name) => ({ name, path: env.path(`efi2/${name}`) })));
    const disk = await partitionedDisk(env.path('disk.raw'), 40 * MiB, [
      { image: env.path('root1.img'), sizeBytes: 24 * MiB, type: '83' },
      { image: env.path('efi.img'), sizeBytes: 8 * MiB, type: 'c' },
    ]);
    const sda = env.path('vm-sda.qcow2');
    await runTool('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', disk.file, sda]);
    const sdb = await env.image('vm-sdb.qcow2', 8 * MiB);
    const lvOffset = await lvmBuilt;
    const sdc = env.path('vm-sdc.qcow2');
    await runTool('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', sdcRaw, sdc]);
    await env.qb.domains.define(env.domainXml('vm', [{ target: 'sda', file: sda }, { target: 'sdb', file: sdb }, { target: 'sdc', file: sdc }]));
    await env.qb.domains.start('vm', { paused: true });
    await env.qb.repository.init({ repo: encRepo, password: PASSWORD });
    b1 = await env.qb.repository.backup('vm', { repo });
    e1 = await env.qb.repository.backup('vm', { repo: encRepo, password: PASSWORD });
    // The guest renames itself, deletes notes.txt and writes new.txt: the new root filesystem goes over the old one;
    // on the EFI partition and in the LVM volume it changes a file, deletes one and writes one.
    const tree2 = env.path('tree2');
    writeTree(tree2, rootTree('vm1-renamed\n', false));
    await ext4Image(env.path('root2.img'), tree2, 24 * MiB, 'rootfs', ROOT_UUID);
    const part = disk.partitions.get(1);
    assert.ok(part !== undefined);
    await guestWrite(env.qb, 'vm', 'sda', `write -s ${env.path('root2.img')} ${part.offset} ${part.length}`);
    const efi = disk.partitions.get(2);
    assert.ok(efi !== undefined);
    await guestWrite(env.qb, 'vm', 'sda', `write -s ${env.path('efi2.img')} ${efi.offset} ${efi.length}`);
    await guestWrite(env.qb, 'vm', 'sda', 'flush');
    await guestWrite(env.qb, 'vm', 'sdc', `write -s ${env.path('lv2.img')} ${lvOffset} ${LV_BYTES}`);
    await guestWrite(env.qb, 'vm', 'sdc', 'flush');
    b2 = await env.qb.repository.backup('vm', { repo });
    await env.qb.repository.backup('vm', { repo: encRepo, password: PASSWORD });
    assert.equal(b2.disks.find((d) => d.target === 'sda')?.level, 'incremental');
    assert.equal(b2.disks.find((d) => d.target === 'sdc')?.level, 'incremental');
  });

  after(async () => {
    await s1?.close();
    await s2?.close();
    await env?.cleanup();
  });

  test('the full backup: filesystems listed, the operating system found, /, /boot/efi and /srv (LVM) mounted by its fstab', async () => {
    s1 = await open({ backup: b1.id });
    const fs = s1.filesystems.map((f) => [f.device, f.disk, f.type, f.label]);
    // In the order of their device names; the LVM volume as the guest names it, on no one disk.
    assert.deepEqual(fs, [
      ['/dev/datavg/data', undefined, 'ext4', 'lvdata'],
      ['/dev/sda1', 'sda', 'ext4', 'rootfs'],
      ['/dev/sda2', 'sda', 'vfat', 'EFI'],
      ['/dev/sdb', 'sdb', 'unknown', ''],
    ]);
    assert.equal(s1.operatingSystems.length, 1);
    assert.equal(s1.operatingSystems[0]?.root, '/dev/sda1');
    await s1.mount();
    assert.deepEqual(s1.filesystems.map((f) => f.mountpoint), ['/srv', '/', '/boot/efi', undefined]);
    const names = (await s1.list('/')).map((e) => e.name);
    for (const n of ['bin', 'boot', 'etc', 'home', 'tmp', 'usr']) assert.ok(names.includes(n), `/ lists ${n}: ${names.join(' ')}`);
  });

  test('the full backup gives back what the guest had: contents, modes, owners, times, link targets', async () => {
    assert.ok(s1 !== undefined);
    assert.equal((await read(s1, '/etc/hostname')).toString(), 'vm1\n');
    assert.equal((await read(s1, '/boot/efi/hello.txt')).toString(), 'hello from the EFI partition\n');
    assert.ok((await read(s1, '/home/alice/big.bin')).equals(BIG));
    const alice = new Map((await s1.list('/home/alice')).map((e) => [e.name, e]));
    const notes = alice.get('notes.txt');
    assert.equal(notes?.type, 'file');
    assert.equal(notes?.mode, 0o600);
    assert.equal(notes?.modeString, '-rw-------');
    assert.equal(notes?.uid, 1000);
    assert.equal(notes?.gid, 1000);
    assert.equal(notes?.size, "alice's notes\n".length);
    assert.equal(notes?.mtimeSec, T1 + 60);
    assert.equal(notes?.mtime, new Date((T1 + 60) * 1000).toISOString());
    assert.equal(alice.get('shadow-link')?.type, 'symlink');
    assert.equal(alice.get('shadow-link')?.link, '/etc/shadow');
    assert.equal(alice.get('docs')?.type, 'directory');
    assert.equal((await s1.stat('/usr/bin/tool')).modeString, '-rwsr-xr-x');
    assert.equal((await s1.stat('/tmp')).modeString, 'drwxrwxrwt');
    // A path is taken lexically: .. never leaves the tree.
    assert.equal((await s1.stat('/home/../../etc/hostname')).path, '/etc/hostname');
    const found = await s1.find('/', '*.txt');
    assert.deepEqual(found.map((e) => e.path).sort(), ['/boot/efi/hello.txt', '/boot/efi/old.txt', `/home/${BAD_NAME}`, '/home/alice/docs/plan.txt', '/home/alice/notes.txt', '/srv/projects/draft.txt', '/srv/projects/report.txt'].sort());
  });

  test('get writes files, directories and symlinks with modes and times, follows no link and writes nothing outside --to', async () => {
    assert.ok(s1 !== undefined);
    const to = env.path('got1');
    const r = await s1.get(['/home', '/etc/hostname'], to);
    assert.deepEqual(r.skipped, []);
    assert.equal(readFileSync(join(to, 'hostname'), 'utf8'), 'vm1\n');
    assert.equal(readFileSync(join(to, 'home/alice/notes.txt'), 'utf8'), "alice's notes\n");
    assert.ok(readFileSync(join(to, 'home/alice/big.bin')).equals(BIG));
    const notes = statSync(join(to, 'home/alice/notes.txt'));
    assert.equal(notes.mode & 0o7777, 0o600);
    assert.equal(notes.uid, 1000);
    assert.equal(Math.floor(notes.mtimeMs / 1000), T1 + 60);
    const alice = statSync(join(to, 'home/alice'));
    assert.equal(alice.mode & 0o7777, 0o750);
    assert.equal(Math.floor(alice.mtimeMs / 1000), T1 + 300);
    assert.equal(statSync(join(to, 'home/alice/docs/plan.txt')).mode & 0o7777, 0o664);
    // The links come back as links, their targets as stored; neither is followed.
    const link = lstatSync(join(to, 'home/alice/shadow-link'));
    assert.ok(link.isSymbolicLink());
    assert.equal(readlinkSync(join(to, 'home/alice/shadow-link')), '/etc/shadow');
    assert.equal(Math.floor(link.mtimeMs / 1000), T1 + 240);
    assert.equal(readlinkSync(join(to, 'home/alice/up')), '../../../../../../etc/passwd');
    assert.equal(readFileSync(join(to, 'home', BAD_NAME), 'utf8'), 'hostile name\n');
    // Exactly the tree asked for, and nothing else (no temporary file left).
    assert.deepEqual([...fileTree(to).keys()].sort(), ['home/alice/big.bin', 'home/alice/docs/plan.txt', 'home/alice/notes.txt', 'home/alice/shadow-link', 'home/alice/up', `home/${BAD_NAME}`, 'hostname'].sort());
    // get never overwrites: a second get of the same file into the same place is refused, the file kept.
    await assert.rejects(s1.get(['/etc/hostname'], to), (err: unknown) => err instanceof QbackupError && err.code === 'INVALID_ARGUMENT' && /exists/.test(err.message));
  });

  test('bad input on a session: a missing path, a directory read as a file', async () => {
    assert.ok(s1 !== undefined);
    await assert.rejects(s1.stat('/etc/nope'), (err: unknown) => err instanceof QbackupError && err.code === 'FILE_NOT_FOUND' && err.message === `Backup "${b1.id}" of domain "vm" has no file or directory "/etc/nope"`);
    await assert.rejects(read(s1, '/etc'), (err: unknown) => err instanceof QbackupError && err.code === 'INVALID_ARGUMENT' && /is a directory, not a file/.test(err.message));
  });

  test('the full backup on LVM and vfat: contents, modes, owners and times; files deleted later come back from it', async () => {
    assert.ok(s1 !== undefined);
    assert.equal((await read(s1, '/srv/projects/report.txt')).toString(), 'quarterly report v1\n');
    const projects = new Map((await s1.list('/srv/projects')).map((e) => [e.name, e]));
    assert.deepEqual([...projects.keys()].sort(), ['draft.txt', 'report.txt']);
    const report = projects.get('report.txt');
    assert.equal(report?.modeString, '-rw-r-----');
    assert.equal(report?.uid, 1000);
    assert.equal(report?.gid, 1000);
    assert.equal(report?.mtimeSec, T1 + 10);
    const dir = await s1.stat('/srv/projects');
    assert.equal(dir.modeString, 'drwxr-x---');
    assert.equal(dir.mtimeSec, T1 + 30);
    const hello = await s1.stat('/boot/efi/hello.txt');
    assert.equal(hello.mtimeSec, T1);
    assert.equal(hello.size, 'hello from the EFI partition\n'.length);
    // The files the guest deletes before the next backup, fetched from this one.
    const to = env.path('got-deleted');
    await s1.get(['/srv/projects/draft.txt', '/boot/efi/old.txt'], to);
    assert.equal(readFileSync(join(to, 'draft.txt'), 'utf8'), 'a draft\n');
    const draft = statSync(join(to, 'draft.txt'));
    assert.equal(draft.mode & 0o7777, 0o600);
    assert.equal(Math.floor(draft.mtimeMs / 1000), T1 + 20);
    assert.equal(readFileSync(join(to, 'old.txt'), 'utf8'), 'removed after the first backup\n');
    assert.equal(Math.floor(statSync(join(to, 'old.txt')).mtimeMs / 1000), T1 + 2);
  });

  test('the incremental backup: the changed file, the new file, and the deleted one gone (the full still has it)', async () => {
    await s1?.close();
    s1 = undefined;
    s2 = await open({ backup: b2.id });
    assert.equal((await read(s2, '/etc/hostname')).toString(), 'vm1-renamed\n');
    assert.equal((await s2.stat('/etc/hostname')).mtimeSec, T2);
    assert.equal((await read(s2, '/home/alice/new.txt')).toString(), 'written after the first backup\n');
    assert.ok((await read(s2, '/home/alice/big.bin')).equals(BIG));
    await assert.rejects(s2.stat('/home/alice/notes.txt'), (err: unknown) => err instanceof QbackupError && err.code === 'FILE_NOT_FOUND');
    // On LVM and vfat the same: changed, new and deleted files as the guest had them at the second backup.
    assert.equal((await read(s2, '/srv/projects/report.txt')).toString(), 'quarterly report v2\n');
    assert.equal((await s2.stat('/srv/projects/report.txt')).mtimeSec, T2 + 10);
    assert.equal((await s2.stat('/srv/projects/report.txt')).modeString, '-rw-r-----');
    const todo = await s2.stat('/srv/projects/todo.txt');
    assert.equal(todo.modeString, '-rw-r--r--');
    assert.equal(todo.mtimeSec, T2 + 20);
    assert.equal((await s2.stat('/srv/projects')).mtimeSec, T2 + 30);
    assert.equal((await read(s2, '/boot/efi/hello.txt')).toString(), 'hello again, changed\n');
    assert.equal((await s2.stat('/boot/efi/hello.txt')).mtimeSec, T2);
    assert.equal((await read(s2, '/boot/efi/grub.cfg')).toString(), 'set timeout=5\n');
    for (const gone of ['/srv/projects/draft.txt', '/boot/efi/old.txt']) {
      await assert.rejects(s2.stat(gone), (err: unknown) => err instanceof QbackupError && err.code === 'FILE_NOT_FOUND', gone);
    }
    const to = env.path('got2');
    await s2.get(['/home/alice/new.txt'], to);
    assert.equal(Math.floor(statSync(join(to, 'new.txt')).mtimeMs / 1000), T2);
    // Names are escaped for terminals.
    const home = await s2.list('/home');
    const bad = home.find((e) => e.name === BAD_NAME);
    assert.ok(bad !== undefined);
    assert.equal(escapeName(bad.name), 'bad\\nname\\e[31m.txt');
  });

  test('the CLI gets yesterday\'s /etc/hostname from an encrypted repository (--until), and lists with names escaped', async () => {
    await s2?.close();
    s2 = undefined;
    const to = env.path('got-cli');
    const r = await env.cli(['files', 'vm', '--repo', encRepo, '--until', e1.time, 'get', '/etc/hostname', '/home/alice/notes.txt', '--to', to], { env: { ...cliEnv, QBACKUP_PASSWORD: PASSWORD } });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(readFileSync(join(to, 'hostname'), 'utf8'), 'vm1\n');
    assert.equal(statSync(join(to, 'notes.txt')).mode & 0o7777, 0o600);
    assert.match(r.stdout, new RegExp(`from backup ${e1.id} into`));
    const ls = await env.cli(['files', 'vm', '--repo', repo, 'ls', '-l', '-R', '/home'], { env: cliEnv });
    assert.equal(ls.code, 0, ls.stderr);
    assert.ok(ls.stdout.includes('bad\\nname\\e[31m.txt'), ls.stdout);
    assert.ok(!ls.stdout.includes('\x1b'), 'no escape character reaches the terminal');
    assert.match(ls.stdout, /shadow-link -> \/etc\/shadow/);
    assert.match(ls.stdout, /-rw-r--r-- +1000:1000 +\d+ +2024-03-09T\d\d:\d\d:\d\dZ +new\.txt/);
  });

  test('bad input through the CLI: a backup id that does not exist, --until before every backup or unreadable, a SUPERMIN_KERNEL that is not there, a disk with no filesystem; a kill -9 leaves nothing running', async () => {
    const nob = await env.cli(['--json', 'files', 'vm', '--repo', repo, '--backup', 'b-nope', 'ls', '/']);
    assert.equal(nob.code, 1);
    assert.equal(cliError(nob).code, 'BACKUP_NOT_FOUND');
    assert.equal(cliError(nob).message, 'Repository has no backup "b-nope" of domain "vm"');
    // --until as a user types it: yesterday is before every backup of this test; a time it cannot read is one sentence.
    const y = await env.cli(['--json', 'files', 'vm', '--repo', repo, '--until', 'yesterday', 'ls', '/']);
    assert.equal(y.code, 1);
    assert.equal(cliError(y).code, 'BACKUP_NOT_FOUND');
    assert.match(cliError(y).message, /^Repository has no backup of domain "vm" taken at or before \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    const bad = await env.cli(['--json', 'files', 'vm', '--repo', repo, '--until', 'last tuesday-ish', 'ls', '/']);
    assert.equal(bad.code, 1);
    assert.equal(cliError(bad).message, 'Invalid --until "last tuesday-ish": expected a time such as 2026-11-25T18:00:00Z, yesterday or "2 days ago"');
    // SUPERMIN_KERNEL naming no file: one sentence naming it, and nothing left running or recorded.
    const nk = await env.cli(['--json', 'files', 'vm', '--repo', repo, 'ls', '/'], { env: { ...cliEnv, SUPERMIN_KERNEL: env.path('no-such-vmlinuz') } });
    assert.equal(nk.code, 1);
    assert.equal(cliError(nk).code, 'APPLIANCE_FAILED');
    assert.equal(cliError(nk).message, `The file-browsing appliance cannot start: SUPERMIN_KERNEL "${env.path('no-such-vmlinuz')}" is not a file; point it at a kernel (vmlinuz) or unset it so the host's /boot/vmlinuz-* is used`);
    // A command killed with SIGKILL while its appliance runs: the next command ends that appliance.
    const killed = spawnCli(env, ['files', 'vm', '--repo', repo, 'ls', '/'], cliEnv);
    const records = join(env.qb.domains.runDir(), 'files');
    let pids: { helper?: number; vm?: number } = {};
    const seen = await waitFor(() => {
      const f = existsSync(records) ? readdirSync(records).find((n) => n.endsWith('.json')) : undefined;
      if (f === undefined) return false;
      pids = JSON.parse(readFileSync(join(records, f), 'utf8')) as typeof pids;
      return pids.vm !== undefined;
    }, 600_000);
    assert.ok(seen, 'the command recorded its appliance');
    killed.child.kill('SIGKILL');
    await killed.done;
    const r = await env.cli(['--json', 'files', 'vm', '--repo', repo, '--disk', 'sdb', 'ls', '/'], { env: cliEnv });
    assert.equal(r.code, 1, r.stderr);
    const e = cliError(r);
    assert.equal(e.code, 'FILESYSTEM_NOT_FOUND');
    assert.equal(e.message, `Backup "${b2.id}" of domain "vm" has no filesystem qbackup can read on disk(s) sdb`);
    assert.ok(await waitFor(() => !isProcessAlive(pids.vm ?? 0) && !isProcessAlive(pids.helper ?? 0), 30_000), 'the appliance of the killed command is gone');
    assert.equal(reapStaleSessions(env.qb.domains.runDir()), 0);
    assert.deepEqual(readdirSync(records).filter((n) => n.endsWith('.json')), []);
  });

  test('an appliance that cannot start says so in one sentence with the fix', async () => {
    // A disk that opens (qemu-nbd serving a small image), and libguestfs pointed at an appliance that is not there.
    const dir = env.path('no-appliance');
    mkdirSync(dir);
    const image = await env.image('tiny.raw', 1 * MiB, 'raw');
    const socket = join(dir, 'nbd.sock');
    const nbd = spawn('qemu-nbd', ['--persistent', '--read-only', '--format=raw', '--export-name=sda', `--socket=${socket}`, image], { stdio: 'ignore' });
    try {
      assert.ok(await waitFor(() => existsSync(socket), 10_000), 'qemu-nbd listens');
      await assert.rejects(
        GuestfsAppliance.launch([{ socket, export: 'sda' }], { environment: { PATH: process.env['PATH'] ?? '/usr/bin:/bin', LIBGUESTFS_PATH: join(dir, 'nothing'), LIBGUESTFS_CACHEDIR: dir, TMPDIR: dir } }),
        (err: unknown) => {
          assert.ok(err instanceof QbackupError && err.code === 'APPLIANCE_FAILED', String(err));
          assert.match(err.message, /^The file-browsing appliance cannot start \(.*\): run libguestfs-test-tool to see why, and install libguestfs-tools and linux-image-amd64 \(scripts\/setup\.sh does\)$/);
          assert.ok(!err.message.includes('\n'));
          return true;
        },
      );
      // The kernel variables handed in through the options: the variable and its value, in one sentence.
      const modules = join(dir, 'no-modules');
      await assert.rejects(
        GuestfsAppliance.launch([{ socket, export: 'sda' }], { environment: { PATH: process.env['PATH'] ?? '/usr/bin:/bin', SUPERMIN_KERNEL: image, SUPERMIN_MODULES: modules } }),
        (err: unknown) =>
          err instanceof QbackupError &&
          err.code === 'APPLIANCE_FAILED' &&
          err.message === `The file-browsing appliance cannot start: SUPERMIN_MODULES "${modules}" is not a directory; point it at the kernel's modules (a real directory on which depmod has run) or unset it`,
      );
    } finally {
      nbd.kill('SIGKILL');
    }
  });
});
