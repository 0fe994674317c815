// The real Linux guest for integration tests: its kernel and initramfs
// (scripts/guest/build.sh builds them from Debian packages, cached), ext4
// data disks made on the host, domain XML that boots the guest with its
// agent, the guest's console (STATE_DIR/domains/NAME/console.log), and
// checks of a restored ext4 image made without mounting it (fsck.ext4,
// debugfs).

import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseDomainXml } from '../../src/model/definition-xml.js';
import { GuestAgentClient } from '../../src/qemu/guest-agent.js';
import { runTool } from '../../src/image/tools.js';
import { sleep } from '../../src/util/proc.js';
import { repoRoot, type TestEnv } from './env.js';

export interface GuestBoot {
  kernel: string;
  initrd: string;
}

let built: GuestBoot | undefined;

/** Builds (or finds in the cache) the guest's kernel and initramfs. Synchronous: the first call may take a minute. */
export function guestBoot(): GuestBoot {
  if (built !== undefined) return built;
  const r = spawnSync('bash', [join(repoRoot, 'scripts', 'guest', 'build.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  if (r.status !== 0) throw new Error(`scripts/guest/build.sh failed (${String(r.status)}): ${r.stderr.trim().split('\n').slice(-5).join(' ')}`);
  const dir = r.stdout.trim().split('\n').pop() ?? '';
  built = { kernel: join(dir, 'vmlinuz'), initrd: join(dir, 'initrd.gz') };
  return built;
}

/** A qcow2 data disk holding an empty ext4 filesystem (mkfs.ext4 on the host). */
export async function ext4Disk(env: TestEnv, name: string, sizeMiB = 64): Promise<string> {
  const raw = env.path(`${name}.mkfs.raw`);
  const file = env.path(`${name}.qcow2`);
  writeFileSync(raw, '');
  await runTool('truncate', ['-s', `${sizeMiB}M`, raw]);
  await runTool('mkfs.ext4', ['-q', '-F', '-L', 'qbdata', raw]);
  await runTool('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, file]);
  rmSync(raw);
  return file;
}

export interface GuestDomainOptions {
  workload: 'writer' | 'reader' | 'idle';
  /** Data disk (qcow2) attached as sda; none when undefined. */
  disk?: string;
  /** Without the agent channel. */
  noAgent?: boolean;
  /** More kernel parameters. */
  cmdline?: string;
}

/** libvirt XML of a domain that boots the test guest (256 MiB, the agent channel, the data disk as SCSI sda). */
export function guestDomainXml(name: string, options: GuestDomainOptions): string {
  const boot = guestBoot();
  const disk = options.disk === undefined ? '' : `    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='${options.disk}'/>
      <target dev='sda' bus='scsi'/>
    </disk>
`;
  const agent = options.noAgent ? '' : `    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
`;
  return `<domain type='kvm'>
  <name>${name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${boot.kernel}</kernel>
    <initrd>${boot.initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 qb.workload=${options.workload}${options.cmdline !== undefined ? ` ${options.cmdline}` : ''}</cmdline>
  </os>
  <devices>
${disk}${agent}  </devices>
</domain>
`;
}

/** The guest's console output so far. */
export function consoleText(env: TestEnv, domain: string): string {
  const file = env.qb.domains.consoleLog(domain);
  return existsSync(file) ? readFileSync(file, 'utf8') : '';
}

/** Waits until the console shows a line matching `pattern`; returns the match. */
export async function waitForConsole(env: TestEnv, domain: string, pattern: RegExp, timeoutMs = 120_000): Promise<RegExpMatchArray> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const m = consoleText(env, domain).match(pattern);
    if (m !== null) return m;
    if (Date.now() > deadline) throw new Error(`console of ${domain} shows no ${String(pattern)} after ${timeoutMs} ms:\n${consoleText(env, domain).slice(-2000)}`);
    await sleep(200);
  }
}

/** The highest "qb: synced N" the writer printed so far (0 before the first). */
export function writerProgress(env: TestEnv, domain: string): number {
  const all = [...consoleText(env, domain).matchAll(/qb: synced (\d+)/g)];
  return Number(all[all.length - 1]?.[1] ?? 0);
}

/** fsck.ext4's exit status (0 clean, 1 errors corrected, 4 uncorrected, …). */
export function fsck(image: string, mode: '-fn' | '-fy'): { status: number; output: string } {
  const r = spawnSync('fsck.ext4', [mode, image], { encoding: 'utf8' });
  return { status: r.status ?? -1, output: `${r.stdout}${r.stderr}` };
}

/** The superblock says the journal must be replayed (the filesystem was not quiesced). */
export function needsRecovery(image: string): boolean {
  const r = spawnSync('dumpe2fs', ['-h', image], { encoding: 'utf8' });
  const features = /Filesystem features:\s*(.*)/.exec(r.stdout)?.[1] ?? '';
  return features.split(/\s+/).includes('needs_recovery');
}

export interface ListCheck {
  /** Files the list names. */
  listed: number;
  /** Files whose restored content does not have the listed checksum (or that are missing). */
  bad: string[];
}

/**
 * Copies /files and the lists out of a raw ext4 image with debugfs (no mount)
 * and checks every file in `list` ("sums" or "synced", sha256sum format)
 * against its checksum.
 */
export function checkListedFiles(env: TestEnv, image: string, list: 'sums' | 'synced'): ListCheck {
  const out = env.path(`dump-${createHash('sha256').update(image + list).digest('hex').slice(0, 8)}`);
  rmSync(out, { recursive: true, force: true });
  mkdirSync(out);
  const r = spawnSync('debugfs', ['-R', `dump /${list} ${join(out, 'list')}`, image], { encoding: 'utf8' });
  if (!existsSync(join(out, 'list'))) throw new Error(`debugfs could not read /${list} from ${image}: ${r.stderr}`);
  spawnSync('debugfs', ['-R', `rdump /files ${out}`, image], { encoding: 'utf8' });
  const lines = readFileSync(join(out, 'list'), 'utf8').split('\n').filter((l) => l.trim() !== '');
  const bad: string[] = [];
  for (const line of lines) {
    const m = /^([0-9a-f]{64}) {2}files\/(f\d+)$/.exec(line);
    if (m === null) {
      bad.push(`malformed line "${line}"`);
      continue;
    }
    const file = join(out, 'files', m[2] ?? '');
    const actual = existsSync(file) ? createHash('sha256').update(readFileSync(file)).digest('hex') : 'missing';
    if (actual !== m[1]) bad.push(`${m[2] ?? ''}: ${actual}`);
  }
  const files = existsSync(join(out, 'files')) ? readdirSync(join(out, 'files')).length : 0;
  rmSync(out, { recursive: true, force: true });
  if (files < lines.length - bad.length) throw new Error('impossible: fewer files than good lines');
  return { listed: lines.length, bad };
}

/** Connects to a running guest's agent. */
export async function guestAgent(env: TestEnv, domain: string): Promise<GuestAgentClient> {
  const socket = env.qb.domains.guestAgentSocket(parseDomainXml(env.qb.domains.dumpXml(domain)));
  if (socket === undefined) throw new Error(`domain ${domain} has no agent channel`);
  return GuestAgentClient.connect(socket, domain, { connectTimeoutMs: 30_000, timeoutMs: 60_000 });
}

/**
 * Runs a shell command in the guest through the agent (guest-exec) and
 * returns its exit status and output. Connects for the command only: QEMU
 * serves one client of the agent's socket at a time, and qbackup's quiesce
 * needs it.
 */
export async function guestRun(env: TestEnv, domain: string, command: string, timeoutMs = 120_000): Promise<{ exitcode: number; out: string }> {
  const agent = await guestAgent(env, domain);
  try {
    return await runInGuest(agent, command, timeoutMs);
  } finally {
    agent.close();
  }
}

async function runInGuest(agent: GuestAgentClient, command: string, timeoutMs: number): Promise<{ exitcode: number; out: string }> {
  const { pid } = await agent.execute<{ pid: number }>('guest-exec', { path: '/bin/sh', arg: ['-c', command], 'capture-output': true });
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const st = await agent.execute<{ exited: boolean; exitcode?: number; 'out-data'?: string; 'err-data'?: string }>('guest-exec-status', { pid });
    if (st.exited) {
      const text = (b64: string | undefined): string => Buffer.from(b64 ?? '', 'base64').toString('utf8');
      return { exitcode: st.exitcode ?? -1, out: text(st['out-data']) + text(st['err-data']) };
    }
    if (Date.now() > deadline) throw new Error(`"${command}" still runs in the guest after ${timeoutMs} ms`);
    await sleep(200);
  }
}

export interface ByteRange {
  offset: number;
  length: number;
}

/** The byte ranges a file's data occupies in a raw ext4 image (debugfs "blocks", block size from dumpe2fs). */
export function fileRanges(image: string, path: string): ByteRange[] {
  const header = spawnSync('dumpe2fs', ['-h', image], { encoding: 'utf8' }).stdout;
  const blockSize = Number(/Block size:\s*(\d+)/.exec(header)?.[1] ?? NaN);
  if (!Number.isSafeInteger(blockSize)) throw new Error(`no block size in dumpe2fs -h ${image}`);
  const out = spawnSync('debugfs', ['-R', `blocks ${path}`, image], { encoding: 'utf8' }).stdout;
  const blocks = out.trim().split(/\s+/).filter((b) => b !== '').map(Number).sort((a, b) => a - b);
  const ranges: ByteRange[] = [];
  for (const b of blocks) {
    const last = ranges[ranges.length - 1];
    if (last !== undefined && last.offset + last.length === b * blockSize) last.length += blockSize;
    else ranges.push({ offset: b * blockSize, length: blockSize });
  }
  return ranges;
}

export function readRange(file: string, range: ByteRange): Buffer {
  const fd = openSync(file, 'r');
  try {
    const buf = Buffer.alloc(range.length);
    readSync(fd, buf, 0, range.length, range.offset);
    return buf;
  } finally {
    closeSync(fd);
  }
}

export function isZero(buf: Buffer): boolean {
  for (const b of buf) if (b !== 0) return false;
  return true;
}

/** The part of `r` made of whole `unit`-aligned units. */
export function alignedInside(r: ByteRange, unit: number): ByteRange {
  const start = Math.ceil(r.offset / unit) * unit;
  const end = Math.floor((r.offset + r.length) / unit) * unit;
  return { offset: start, length: Math.max(0, end - start) };
}
