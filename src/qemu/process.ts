// Starting and stopping the qemu-system-x86_64 process of a domain. QEMU runs
// detached from the qbackup process that started it (a CLI command ends, the
// VM does not); it is identified afterwards by pid + start time, reached over
// its QMP socket (mode 0600 in a 0700 directory), and its stdout/stderr go to a
// per-domain log, which is also where HMP qemu-io output lands; the guest's
// serial console goes to its own file. A domain with a guest agent channel
// gets a virtio-serial port whose host side is a socket QEMU listens on. The caller
// learns QEMU's pid the moment it is spawned (onSpawn), before QMP is up, so
// that a caller killed while QEMU starts leaves it findable.

import { openLogFile } from '../util/safe-create.js';
import { spawn } from 'node:child_process';
import { accessSync, chmodSync, closeSync, constants, existsSync, lstatSync, openSync, readFileSync, rmSync, statSync, writeSync } from 'node:fs';
import { QbackupError } from '../errors.js';
import { isProcessAlive, processStartTime, sleep } from '../util/proc.js';
import { socketAccepts } from '../util/socket.js';
import { QmpClient } from '../qmp/client.js';
import type { KernelBoot } from '../model/definition.js';
import { ROOT_PORT_COUNT, SCSI_CONTROLLER_ID, backingNodeSpec, blockdevSpecs, deviceSpec, rootPortId, type QemuDiskSpec } from './nodes.js';

export interface LaunchOptions {
  name: string;
  uuid: string;
  memoryKiB: number;
  vcpus: number;
  disks: readonly QemuDiskSpec[];
  qmpSocket: string;
  logFile: string;
  /** The guest's serial console (ttyS0) is written here, truncated at each start. */
  consoleLog?: string;
  /** Direct kernel boot (-kernel, -initrd, -append). */
  kernelBoot?: KernelBoot | undefined;
  /** The guest agent's socket: QEMU listens on it for qbackup, the agent talks on virtio-serial port org.qemu.guest_agent.0. */
  agentSocket?: string | undefined;
  /** Start with the CPUs stopped (virsh start --paused). The block layer works either way. */
  paused?: boolean;
  /** 'auto' follows `virtType` (see accelArgs); 'kvm' or 'tcg' forces one. */
  accel?: 'auto' | 'kvm' | 'tcg';
  /** The <domain type> of the definition: 'qemu' (TCG) or 'kvm' (KVM). */
  virtType?: string | undefined;
  binary?: string | undefined;
  startTimeoutMs?: number | undefined;
  /** Called synchronously as soon as QEMU is spawned, before it answers QMP. */
  onSpawn?: (pid: number) => void;
}

export interface QemuProcessInfo {
  pid: number;
  pidStart: string;
  qmpSocket: string;
  logFile: string;
}

const MAX_SOCKET_PATH = 107;

export function kvmUsable(): boolean {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * The -accel arguments. An explicit 'kvm' or 'tcg' wins; 'auto' follows the
 * domain type as libvirt does: 'qemu' is software emulation (TCG) even where
 * /dev/kvm opens (a nested host may open it and never run a guest), 'kvm' is
 * KVM or a refusal. A document without a type keeps the old lenient choice:
 * KVM when usable, else TCG (QEMU tries -accel options in order).
 */
export function accelArgs(accel: 'auto' | 'kvm' | 'tcg', virtType: string | undefined, domain: string, kvmIsUsable: boolean): string[] {
  if (accel === 'kvm') return ['-accel', 'kvm'];
  if (accel === 'tcg' || virtType === 'qemu') return ['-accel', 'tcg'];
  if (virtType === 'kvm') {
    if (!kvmIsUsable) {
      throw new QbackupError('NOT_SUPPORTED', `Cannot start domain "${domain}": it is of type 'kvm' but KVM is not usable on this host (/dev/kvm); use <domain type='qemu'> for software emulation`);
    }
    return ['-accel', 'kvm'];
  }
  return kvmIsUsable ? ['-accel', 'kvm', '-accel', 'tcg'] : ['-accel', 'tcg'];
}

/** The -chardev argument of a domain's QMP socket: also how a QEMU whose pid was lost is found in /proc. */
export function qmpChardevArg(qmpSocket: string): string {
  return `socket,id=qmp0,path=${qmpSocket},server=on,wait=off`;
}

export function buildQemuArgs(options: LaunchOptions): string[] {
  const args: string[] = ['-name', `guest=${options.name}`, '-uuid', options.uuid, '-M', 'q35', '-nodefaults', '-display', 'none'];
  args.push(...accelArgs(options.accel ?? 'auto', options.virtType, options.name, options.accel === 'auto' || options.accel === undefined ? kvmUsable() : false));
  args.push('-m', `${Math.max(16, Math.ceil(options.memoryKiB / 1024))}M`, '-smp', String(options.vcpus));
  args.push('-chardev', qmpChardevArg(options.qmpSocket), '-mon', 'chardev=qmp0,mode=control');
  args.push('-device', `virtio-scsi-pci,id=${SCSI_CONTROLLER_ID}`);
  for (let i = 0; i < ROOT_PORT_COUNT; i++) {
    args.push('-device', `pcie-root-port,id=${rootPortId(i)},chassis=${i + 1},slot=${i + 1}`);
  }
  let nextPort = 0;
  for (const disk of options.disks) {
    const backing = backingNodeSpec(disk);
    if (backing !== undefined) args.push('-blockdev', JSON.stringify(backing));
    for (const spec of blockdevSpecs(disk)) args.push('-blockdev', JSON.stringify(spec));
    const port = disk.bus === 'virtio' ? rootPortId(nextPort++) : undefined;
    if (port !== undefined && nextPort > ROOT_PORT_COUNT) {
      throw new QbackupError('NOT_SUPPORTED', `Domain "${options.name}" has more than ${ROOT_PORT_COUNT} virtio disks`);
    }
    args.push('-device', JSON.stringify(deviceSpec(disk, port)));
  }
  args.push(...guestArgs(options));
  if (options.paused) args.push('-S');
  return args;
}

/** QEMU's option syntax doubles a comma inside a value. */
function optionValue(value: string): string {
  return value.replace(/,/g, ',,');
}

/** The serial console, direct kernel boot and the guest agent's virtio-serial port. */
function guestArgs(options: LaunchOptions): string[] {
  const args: string[] = [];
  if (options.consoleLog !== undefined) {
    args.push('-chardev', `file,id=console0,path=${optionValue(options.consoleLog)}`, '-serial', 'chardev:console0');
  }
  const boot = options.kernelBoot;
  if (boot !== undefined) {
    args.push('-kernel', boot.kernel);
    if (boot.initrd !== undefined) args.push('-initrd', boot.initrd);
    if (boot.cmdline !== undefined) args.push('-append', boot.cmdline);
  }
  if (options.agentSocket !== undefined) {
    args.push('-chardev', `socket,id=qga0,path=${optionValue(options.agentSocket)},server=on,wait=off`);
    args.push('-device', 'virtio-serial-pci,id=virtio-serial0');
    args.push('-device', 'virtserialport,bus=virtio-serial0.0,chardev=qga0,name=org.qemu.guest_agent.0');
  }
  return args;
}

/**
 * Starts QEMU and returns once its QMP socket accepts connections. If QEMU
 * exits first, the error carries the last lines it printed.
 */
export async function launchQemu(options: LaunchOptions): Promise<QemuProcessInfo> {
  if (Buffer.byteLength(options.qmpSocket) > MAX_SOCKET_PATH) {
    throw new QbackupError('STATE_DIR', `Cannot start domain "${options.name}": the QMP socket path "${options.qmpSocket}" is longer than ${MAX_SOCKET_PATH} bytes; use a shorter state directory`);
  }
  if (options.agentSocket !== undefined && Buffer.byteLength(options.agentSocket) > MAX_SOCKET_PATH) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot start domain "${options.name}": the guest agent socket path "${options.agentSocket}" is longer than ${MAX_SOCKET_PATH} bytes`);
  }
  rmSync(options.qmpSocket, { force: true });
  if (options.consoleLog !== undefined) {
    closeSync(openLogFile(options.consoleLog, 'truncate')); // QEMU truncates it, keeping the mode
    chmodSync(options.consoleLog, 0o600);
  }
  // Only a leftover socket is removed: the path comes from the domain's XML.
  if (options.agentSocket !== undefined && lstatSync(options.agentSocket, { throwIfNoEntry: false })?.isSocket() === true) rmSync(options.agentSocket);
  const args = buildQemuArgs(options);
  const binary = options.binary ?? 'qemu-system-x86_64';
  const logFd = openLogFile(options.logFile, 'append');
  const logStart = statSync(options.logFile).size;
  writeSync(logFd, `\n=== ${new Date().toISOString()} starting: ${binary} ${args.map(quoteArg).join(' ')}\n`);
  let exited: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  let spawnError: Error | undefined;
  const child = spawn(binary, args, { detached: true, stdio: ['ignore', logFd, logFd] });
  closeSync(logFd);
  if (child.pid !== undefined) options.onSpawn?.(child.pid);
  child.on('exit', (code, signal) => {
    exited = { code, signal };
  });
  child.on('error', (err) => {
    spawnError = err;
  });
  child.unref();

  const deadline = Date.now() + (options.startTimeoutMs ?? 30_000);
  for (;;) {
    if (spawnError !== undefined) {
      throw new QbackupError('QEMU_START_FAILED', `Cannot start domain "${options.name}": ${spawnError.message}`, { cause: spawnError });
    }
    if (exited !== undefined) {
      const text = logTail(options.logFile, logStart);
      throw new QbackupError('QEMU_START_FAILED', `Cannot start domain "${options.name}": QEMU exited: ${text || `status ${String(exited.code ?? exited.signal)}`}`, {
        details: { log: options.logFile },
      });
    }
    // The socket listens before QEMU has opened its disks (the kernel accepts
    // into the backlog), so only a QMP exchange proves QEMU got through its
    // start-up; a QEMU that fails on a disk exits during that exchange.
    if ((await qmpStatus(options.qmpSocket)) !== undefined) break;
    if (Date.now() > deadline) {
      if (child.pid !== undefined) killProcess(child.pid);
      throw new QbackupError('QEMU_START_FAILED', `Cannot start domain "${options.name}": QEMU did not open its QMP socket in time (see "${options.logFile}")`);
    }
    await sleep(20);
  }
  chmodSync(options.qmpSocket, 0o600);
  if (options.agentSocket !== undefined) chmodSync(options.agentSocket, 0o600);
  const pid = child.pid;
  if (pid === undefined) throw new QbackupError('QEMU_START_FAILED', `Cannot start domain "${options.name}": no pid`);
  return { pid, pidStart: processStartTime(pid) ?? '', qmpSocket: options.qmpSocket, logFile: options.logFile };
}

/** QEMU's run state ("running", "paused", "prelaunch", …) over QMP; undefined when it does not answer. */
export async function qmpStatus(socket: string): Promise<string | undefined> {
  if (!existsSync(socket) || !(await socketAccepts(socket))) return undefined;
  try {
    const qmp = await QmpClient.connect(socket, { connectTimeoutMs: 5_000, defaultTimeoutMs: 5_000 });
    try {
      return (await qmp.execute<{ status: string }>('query-status')).status;
    } finally {
      await qmp.close();
    }
  } catch {
    return undefined;
  }
}

/**
 * Waits until the QEMU (pid + start time) answers QMP on `socket` and returns
 * its run state; undefined when it exits or the deadline passes first.
 */
export async function waitForQmp(socket: string, pid: number, pidStart: string | undefined, deadlineMs: number): Promise<string | undefined> {
  for (;;) {
    if (!isProcessAlive(pid, pidStart)) return undefined;
    const status = await qmpStatus(socket);
    if (status !== undefined) return status;
    if (Date.now() > deadlineMs) return undefined;
    await sleep(20);
  }
}

function quoteArg(a: string): string {
  return /^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`;
}

/** The QEMU-printed lines of the log since `from`, condensed to one line. */
export function logTail(logFile: string, from = 0): string {
  try {
    const text = readFileSync(logFile, 'utf8').slice(from);
    return text
      .split('\n')
      .filter((l) => l.trim() !== '' && !l.startsWith('=== '))
      .slice(-3)
      .map((l) => l.replace(/^qemu-system-x86_64: /, '').trim())
      .join(' ');
  } catch {
    return '';
  }
}

export function killProcess(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

/** Waits until the process is gone; false on timeout. */
export async function waitForExit(pid: number, pidStart: string | undefined, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (isProcessAlive(pid, pidStart)) {
    if (Date.now() > deadline) return false;
    await sleep(20);
  }
  return true;
}
