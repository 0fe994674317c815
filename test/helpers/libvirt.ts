// A real libvirt for the tests: uses the system daemon when one answers on
// /var/run/libvirt/libvirt-sock, else starts `virtlogd -d` and `libvirtd -d`
// with pid files of its own, waits for the socket, and at the end stops
// only what it started, by pid. No systemd, no default network or storage
// pool is needed: the tests' domains have disks only.
//
// Test domains: `type='qemu'` (TCG; /dev/kvm may exist but run no guest),
// SCSI qcow2 disks made by qemu-img in a temporary directory that the
// daemon's QEMU user (libvirt-qemu) can reach, names prefixed `qbt-lv-` and
// unique per process, removed (destroyed, undefined with their checkpoint
// metadata) in each test's finally, or by tearDownLibvirtTest in its `after`.

import { execFile, spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { LIBVIRT, LIBVIRT_SYSTEM_SOCKET, type LibvirtClient, type LibvirtDomainRef } from '../../src/drivers/libvirt/index.js';
import { isQbackupError } from '../../src/errors.js';
import { cliPath } from './env.js';

const execFileAsync = promisify(execFile);

/** Runs a QEMU tool (qemu-img, qemu-io) and returns its stdout; a non-zero exit throws with its stderr. */
export async function tool(program: string, args: readonly string[]): Promise<string> {
  const { stdout } = await execFileAsync(program, [...args], { maxBuffer: 16 << 20 });
  return stdout;
}

export const LIBVIRT_URI = 'qemu:///system';
const VIRTLOGD_SOCKET = '/var/run/libvirt/virtlogd-sock';

export interface LibvirtDaemon {
  uri: string;
  socketPath: string;
  /** Whether this process started libvirtd (and so will stop it). */
  started: boolean;
  /** Stops what was started, by pid; nothing otherwise. Idempotent. */
  stop(): Promise<void>;
  /** Stops and starts again the libvirtd this process started (running domains survive, as with systemd's restart); refuses one it did not start. */
  restart(): Promise<void>;
}

/** Whether something accepts connections on a unix socket. */
export function socketAnswers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection({ path });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function waitFor(what: string, check: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`${what} did not happen within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function stopPid(pid: number): Promise<void> {
  if (!alive(pid)) return;
  process.kill(pid, 'SIGTERM');
  try {
    await waitFor(`process ${pid} to exit`, async () => !alive(pid), 15_000);
  } catch {
    if (alive(pid)) process.kill(pid, 'SIGKILL');
  }
}

/** Runs a daemon that forks into the background (-d) with its pid file; returns its pid. */
async function startDaemon(program: string, pidFile: string, env: NodeJS.ProcessEnv): Promise<number> {
  await new Promise<void>((resolve, reject) => {
    const child = spawn(program, ['-d', '-p', pidFile], { stdio: ['ignore', 'ignore', 'pipe'], env });
    const err: Buffer[] = [];
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`${program} -d exited ${String(code)}: ${Buffer.concat(err).toString().trim()}`))));
  });
  await waitFor(`${program} to write ${pidFile}`, async () => existsSync(pidFile) && readFileSync(pidFile, 'utf8').trim() !== '', 10_000);
  return Number(readFileSync(pidFile, 'utf8').trim());
}

/**
 * Test files that use libvirt run one at a time (node --test may run files in
 * parallel): one may restart the daemon it started, or stop it, under
 * another. The lock is a directory holding the holder's pid; a dead
 * holder's lock is taken over.
 */
const LIBVIRT_TESTS_LOCK = join(tmpdir(), 'qbt-libvirt-tests.lock');

async function lockLibvirtTests(): Promise<() => void> {
  const pidFile = join(LIBVIRT_TESTS_LOCK, 'pid');
  for (;;) {
    try {
      mkdirSync(LIBVIRT_TESTS_LOCK);
      writeFileSync(pidFile, String(process.pid));
      return () => rmSync(LIBVIRT_TESTS_LOCK, { recursive: true, force: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const holder = Number(existsSync(pidFile) ? readFileSync(pidFile, 'utf8').trim() : NaN);
    let alive = true;
    if (Number.isInteger(holder) && holder > 0) {
      try {
        process.kill(holder, 0);
      } catch (err) {
        alive = (err as NodeJS.ErrnoException).code === 'EPERM';
      }
    }
    if (!alive) rmSync(LIBVIRT_TESTS_LOCK, { recursive: true, force: true });
    else await new Promise((r) => setTimeout(r, 200));
  }
}

/** A libvirt daemon to talk to (the running one, or one started here), held by this test file alone until stop(). */
export async function startLibvirt(): Promise<LibvirtDaemon> {
  const unlock = await lockLibvirtTests();
  try {
    const daemon = await startLibvirtUnlocked();
    return {
      ...daemon,
      stop: async () => {
        try {
          await daemon.stop();
        } finally {
          unlock();
        }
      },
    };
  } catch (err) {
    unlock();
    throw err;
  }
}

async function startLibvirtUnlocked(): Promise<LibvirtDaemon> {
  const socketPath = LIBVIRT_SYSTEM_SOCKET;
  if (await socketAnswers(socketPath)) {
    const restart = async (): Promise<void> => {
      throw new Error('the tests did not start this libvirtd, so they do not restart it');
    };
    return { uri: LIBVIRT_URI, socketPath, started: false, stop: async () => undefined, restart };
  }
  const dir = mkdtempSync(join(tmpdir(), 'qbt-libvirtd-'));
  const env = { ...process.env, LIBVIRT_LOG_OUTPUTS: `3:file:${join(dir, 'daemon.log')}` };
  const pids: number[] = [];
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    // libvirtd first: it holds virtlogd's socket while it runs.
    for (const pid of [...pids].reverse()) await stopPid(pid);
    rmSync(dir, { recursive: true, force: true });
  };
  const startLibvirtd = async (): Promise<void> => {
    rmSync(join(dir, 'libvirtd.pid'), { force: true });
    pids.push(await startDaemon('libvirtd', join(dir, 'libvirtd.pid'), env));
    await waitFor(`libvirtd to listen on ${socketPath}`, () => socketAnswers(socketPath), 30_000);
  };
  const restart = async (): Promise<void> => {
    const libvirtd = pids.pop();
    if (libvirtd !== undefined) await stopPid(libvirtd);
    await startLibvirtd();
  };
  try {
    if (!(await socketAnswers(VIRTLOGD_SOCKET))) pids.push(await startDaemon('virtlogd', join(dir, 'virtlogd.pid'), env));
    await startLibvirtd();
  } catch (err) {
    const log = existsSync(join(dir, 'daemon.log')) ? readFileSync(join(dir, 'daemon.log'), 'utf8').split('\n').slice(-20).join('\n') : '';
    await stop();
    throw new Error(`Cannot start libvirtd for the tests (install libvirt-daemon-system and libvirt-clients: bash scripts/setup.sh): ${(err as Error).message}\n${log}`);
  }
  return { uri: LIBVIRT_URI, socketPath, started: true, stop, restart };
}

/** A unique name for a test domain: `qbt-lv-<pid>-<n>-<what>`. */
let counter = 0;
export function testDomainName(what: string): string {
  counter += 1;
  return `qbt-lv-${process.pid}-${counter}-${what}`;
}

/** A temporary directory the daemon's QEMU user can reach (the images and sockets live there). */
export function libvirtTestDir(): { dir: string; socketDir: string; remove: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'qbt-lv-'));
  chmodSync(dir, 0o755);
  const socketDir = join(dir, 'sock');
  mkdirSync(socketDir);
  // QEMU (running as libvirt-qemu) creates the NBD socket of a pull backup here.
  chmodSync(socketDir, 0o1777);
  return { dir, socketDir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

export interface TestDisk {
  target: string;
  file: string;
}

/** qcow2 images (64 KiB clusters, qemu-img's default) for the given targets. */
export async function createTestDisks(dir: string, targets: readonly string[], sizeBytes: number): Promise<TestDisk[]> {
  const disks: TestDisk[] = [];
  for (const target of targets) {
    const file = join(dir, `${target}.qcow2`);
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(sizeBytes)]);
    disks.push({ target, file });
  }
  return disks;
}

export interface TestDiskXmlOptions {
  /** discard='unmap': a guest's discard reaches the image (libvirt's default ignores it). */
  discard?: 'unmap' | undefined;
}

/** A SCSI qcow2 disk of a test domain, as `<disk>` XML (also what attach-device and detach-device take). */
export function testDiskXml(disk: TestDisk, options: TestDiskXmlOptions = {}): string {
  const discard = options.discard !== undefined ? ` discard='${options.discard}'` : '';
  return `<disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'${discard}/>
      <source file='${disk.file}'/>
      <target dev='${disk.target}' bus='scsi'/>
    </disk>`;
}

/** A domain of software emulation (TCG) with SCSI qcow2 disks and no guest OS. */
export function testDomainXml(name: string, disks: readonly TestDisk[], options: TestDiskXmlOptions = {}): string {
  const diskXml = disks.map((d) => `    ${testDiskXml(d, options)}`).join('\n');
  return `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='scsi' index='0' model='virtio-scsi'/>
${diskXml}
  </devices>
</domain>
`;
}

/** The QEMU device id (libvirt's alias) of a running domain's disk, for HMP qemu-io -d. */
export function diskAlias(liveXml: string, target: string): string {
  for (const m of liveXml.matchAll(/<disk\b[\s\S]*?<\/disk>/g)) {
    if (!new RegExp(`<target dev='${target}'`).test(m[0])) continue;
    const alias = /<alias name='([^']+)'\/>/.exec(m[0]);
    if (alias?.[1] !== undefined) return alias[1];
  }
  throw new Error(`disk ${target} has no alias in the live XML`);
}

/** Writes as the guest would: HMP qemu-io through libvirt's monitor passthrough. */
export async function guestWrite(client: LibvirtClient, dom: LibvirtDomainRef, target: string, command: string): Promise<void> {
  const alias = diskAlias(await client.getXmlDesc(dom), target);
  const out = await client.qemuMonitorCommand(dom, `qemu-io -d ${alias} "${command}"`, LIBVIRT.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP);
  if (/error|failed/i.test(out)) throw new Error(`qemu-io on ${target} failed: ${out}`);
}

/** A guest write of a byte pattern that also fills the same range of the test's model of the disk. */
export async function writePattern(client: LibvirtClient, dom: LibvirtDomainRef, model: Map<string, Buffer>, target: string, pattern: number, offset: number, length: number): Promise<void> {
  model.get(target)?.fill(pattern, offset, offset + length);
  await guestWrite(client, dom, target, `write -P 0x${pattern.toString(16)} ${offset} ${length}`);
}

/** The CLI with its own state directory, through libvirt at `uri`; exit code, stdout and stderr (never throws). */
export function libvirtCli(stateDir: string, uri: string, args: readonly string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cliPath, '--state-dir', stateDir, '--connect', uri, ...args], (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : 1, stdout, stderr });
    });
  });
}

/** Destroys (if running) and undefines a test domain with its checkpoint metadata; a domain already gone is fine. */
export async function removeTestDomain(client: LibvirtClient, name: string): Promise<void> {
  let dom: LibvirtDomainRef;
  try {
    dom = await client.lookupDomainByName(name);
  } catch (err) {
    if (isQbackupError(err, 'DOMAIN_NOT_FOUND')) return;
    throw err;
  }
  const { state } = await client.getState(dom);
  if (state !== LIBVIRT.VIR_DOMAIN_SHUTOFF) {
    try {
      await client.destroy(dom);
    } catch (err) {
      if (!isQbackupError(err, 'LIBVIRT_ERROR')) throw err;
    }
  }
  await client.undefine(dom, LIBVIRT.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | LIBVIRT.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA);
}

/**
 * What a libvirt test file set up, each part possibly missing (a `before`
 * that failed part-way): torn down in `after`, last made first.
 */
export interface LibvirtTestSetup {
  /** The library under test: closed, then its driver's connection. */
  qb?: { close(): void; driver: { close?(): Promise<void> } } | undefined;
  /** The test's own client; the domains are removed through it, then it is closed. */
  client?: LibvirtClient | undefined;
  /** Test domains to destroy and undefine (one already gone, or failing to go, is passed over). */
  domains?: readonly string[] | undefined;
  /** Stopped (what the tests started, and the file's hold on libvirt released). */
  daemon?: LibvirtDaemon | undefined;
  /** The `remove` of libvirtTestDir(). */
  remove?: (() => void) | undefined;
  /** Further directories of the file's own, deleted last. */
  dirs?: ReadonlyArray<string | undefined> | undefined;
}

/** Tears down what a libvirt test file set up (see LibvirtTestSetup), in its `after`. */
export async function tearDownLibvirtTest(setup: LibvirtTestSetup): Promise<void> {
  const { qb, client } = setup;
  qb?.close();
  await qb?.driver.close?.();
  if (client !== undefined) for (const name of setup.domains ?? []) await removeTestDomain(client, name).catch(() => undefined);
  await client?.close();
  await setup.daemon?.stop();
  setup.remove?.();
  for (const dir of setup.dirs ?? []) if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
}

/** `virsh` as the independent reference; returns stdout. */
export async function virsh(args: readonly string[]): Promise<string> {
  return tool('virsh', ['-c', LIBVIRT_URI, ...args]);
}

export interface Extent {
  offset: number;
  length: number;
}

/** Sorted, with touching extents joined. */
export function mergeAdjacent(extents: readonly Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of [...extents].sort((a, b) => a.offset - b.offset)) {
    const last = out.at(-1);
    if (last !== undefined && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ ...e });
  }
  return out;
}
