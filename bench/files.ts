// `npm run bench:files`: file-level restore against libguestfs's own tools
// on a plain qcow2 copy of the same disk (the floor: no repository, no NBD).
// A domain's disk holds an ext4 partition with a file of random data
// (--file-mib, default 1024) and a directory of 100 small files; it is
// backed up (untimed), then:
// - cold: FileSession.open (serve the backup, boot the appliance, list and
//   inspect the filesystems) plus the first listing of /etc;
// - warm: 100 more listings of /etc on the same session;
// - fetch: the big file read through the session;
// - floor: `virt-ls -a COPY.qcow2 -m /dev/sda1 /etc` (a cold boot each) and
//   `guestfish --ro -a COPY.qcow2 -m /dev/sda1 copy-out` of the big file
//   (virt-copy-out's own call; virt-copy-out itself mounts by inspection only).
// Everything runs under software emulation (force_tcg), like the tests.
// Writes the results between the "files" markers of docs/benchmarks.md.
// Timing only, never asserted.
//
// Options: --file-mib N (default 1024), --no-doc.

import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { FileSession } from '../src/files/index.js';
import { Qbackup } from '../src/qbackup.js';
import { runTool } from '../src/image/tools.js';
import { ext4Image, partitionedDisk, writeTree } from '../test/helpers/guest-fs.js';
import { withSection } from './doc-sections.js';
import { loadAverage } from './machine.js';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '..', '..');
const MiB = 1024 * 1024;

function timed(command: string, args: readonly string[], env: NodeJS.ProcessEnv): Promise<number> {
  const t0 = performance.now();
  return new Promise((res, rej) => {
    const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'], env });
    let err = '';
    child.stderr.on('data', (b: Buffer) => (err += b.toString()));
    child.on('error', rej);
    child.on('close', (code) => (code === 0 ? res(performance.now() - t0) : rej(new Error(`${command} failed: ${err.trim().split('\n').at(-1) ?? code}`))));
  });
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { 'file-mib': { type: 'string', default: '1024' }, 'no-doc': { type: 'boolean', default: false } } });
  const fileMiB = Number(values['file-mib']);
  const dir = mkdtempSync(join(tmpdir(), 'qb-bench-files-'));
  const qb = Qbackup.open({ stateDir: join(dir, 'state'), accel: 'tcg' });
  try {
    const tree = join(dir, 'tree');
    writeTree(tree, Array.from({ length: 100 }, (_, i) => ({ path: `etc/f${String(i).padStart(3, '0')}.conf`, data: `setting ${i}\n` })));
    mkdirSync(tree, { recursive: true });
    const fd = openSync(join(tree, 'big.bin'), 'w');
    for (let i = 0; i < fileMiB / 16; i++) writeSync(fd, randomBytes(16 * MiB));
    closeSync(fd);
    const fsBytes = (Math.ceil((fileMiB * 1.1) / 16) * 16 + 64) * MiB;
    await ext4Image(join(dir, 'root.img'), tree, fsBytes, 'bench', '6a1d8d6c-2f39-4a8e-9d57-0c1b7f5e3a42');
    rmSync(tree, { recursive: true, force: true });
    const disk = await partitionedDisk(join(dir, 'disk.raw'), fsBytes + 2 * MiB, [{ image: join(dir, 'root.img'), sizeBytes: fsBytes, type: '83' }]);
    rmSync(join(dir, 'root.img'));
    const qcow2 = join(dir, 'copy.qcow2');
    await runTool('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', disk.file, qcow2]);
    rmSync(disk.file);
    const sda = join(dir, 'bench-sda.qcow2');
    await runTool('cp', ['--reflink=auto', qcow2, sda]);
    await qb.domains.define(`<domain type='kvm'><name>bench</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${sda}'/><target dev='sda' bus='scsi'/></disk></devices></domain>`);
    await qb.domains.start('bench', { paused: true });
    const repo = join(dir, 'repo');
    await qb.repository.backup('bench', { repo });
    await qb.domains.destroy('bench');

    console.log(`file-level restore, a ${fileMiB} MiB file (load average ${loadAverage()})`);
    let t0 = performance.now();
    const session = await FileSession.open(qb.repository, { repo, domain: 'bench', runDir: qb.domains.runDir(), appliance: { backendSettings: ['force_tcg'] } });
    await session.list('/etc');
    const coldMs = performance.now() - t0;
    t0 = performance.now();
    for (let i = 0; i < 100; i++) await session.list('/etc');
    const warmMs = performance.now() - t0;
    let bytes = 0;
    const sink = new Writable({ write: (chunk: Buffer, _enc, cb) => ((bytes += chunk.length), cb()) });
    t0 = performance.now();
    await session.read('/big.bin', sink);
    const fetchMs = performance.now() - t0;
    await session.close();
    if (bytes !== fileMiB * MiB) throw new Error(`read ${bytes} bytes, expected ${fileMiB * MiB}`);

    const env = { ...process.env, LIBGUESTFS_BACKEND: 'direct', LIBGUESTFS_BACKEND_SETTINGS: 'force_tcg' };
    console.log(`qbackup files: cold ${coldMs.toFixed(0)} ms, 100 warm listings ${warmMs.toFixed(0)} ms, fetch ${fetchMs.toFixed(0)} ms`);
    const virtLsMs = await timed('virt-ls', ['--format=qcow2', '-a', qcow2, '-m', '/dev/sda1', '/etc'], env);
    console.log(`virt-ls: ${virtLsMs.toFixed(0)} ms`);
    const out = join(dir, 'out');
    mkdirSync(out);
    // virt-copy-out mounts by inspection only (this disk has no operating system): guestfish's copy-out is the same call.
    const copyOutMs = await timed('guestfish', ['--ro', '--format=qcow2', '-a', qcow2, '-m', '/dev/sda1', 'copy-out', '/big.bin', out], env);

    const s = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;
    const rate = (ms: number): string => `${((fileMiB * MiB) / MiB / (ms / 1000)).toFixed(0)} MiB/s`;
    const rows = [
      `| first listing, cold (serve the backup, boot the appliance, inspect, list /etc) | ${s(coldMs)} | virt-ls (boot, list /etc): ${s(virtLsMs)} |`,
      `| 100 more listings of /etc (100 entries each), warm | ${s(warmMs)} (${(warmMs / 100).toFixed(0)} ms each) | each virt-ls boots again |`,
      `| fetch a ${fileMiB} MiB file, warm | ${s(fetchMs)} (${rate(fetchMs)}) | guestfish copy-out (boot + copy): ${s(copyOutMs)} |`,
    ];
    const section = [
      '## File-level restore (`npm run bench:files`)',
      '',
      `A backup of an ext4 partition holding a ${fileMiB} MiB file of random data and a directory of 100 small files, read through \`FileSession\` (the repository → our NBD server → the libguestfs appliance, software emulation), beside libguestfs's own tools (virt-ls, guestfish copy-out) on a plain qcow2 copy of the same disk (the floor: no repository, no NBD). One run; load average ${loadAverage()} on the 2-core machine.`,
      '',
      '| operation | qbackup files | floor (plain qcow2) |',
      '|---|---|---|',
      ...rows,
      '',
      'The cold start is the appliance boot under TCG. virt-ls pays the same boot. The daemon keeps the session warm, so only the first request of a backup pays it.',
      `The fetch is slower than the floor's copy once booted (guestfish copy-out minus virt-ls's boot, about ${s(Math.max(0, copyOutMs - virtLsMs))}). qbackup's path adds chunk decoding in our NBD server, which runs in the same process as the reader here, and the helper's pipe copy. How the time splits between them has not been measured yet.`,
    ].join('\n');
    console.log(section);
    if (values['no-doc'] !== true) {
      const doc = join(root, 'docs', 'benchmarks.md');
      writeFileSync(doc, withSection(readFileSync(doc, 'utf8'), 'files', section));
    }
  } finally {
    for (const d of qb.domains.list()) if (d.pid !== undefined) try { process.kill(d.pid, 'SIGKILL'); } catch { /* gone */ }
    qb.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
