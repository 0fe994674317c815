// The other backup tools the repository benchmark compares against, run on
// byte-identical copies of the same disk: virtnbdbackup/virtnbdrestore
// (libvirt's pull-mode backups: a libvirt domain on a copy of the image) and
// restic (the raw disk on standard input). Nothing here is needed by the
// tests or by qbackup itself; the bench only runs them with --peers.
//
// libvirtd and virtlogd are started by the bench as its own child processes
// (no systemd here) and stopped by their pids at the end; when a libvirtd is
// already running it is used as it is and left running.

import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, openSync, closeSync, readFileSync, writeFileSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { processCpuMs, waitProcessIdle } from './env.js';
import { run, runWithCpu, sleep, type RunResult } from './util.js';

export const LIBVIRT_URI = 'qemu:///system';

/** The first directory on PATH (or in sbin) holding `tool`, or undefined. */
export function findTool(tool: string): string | undefined {
  const dirs = [...(process.env['PATH'] ?? '').split(delimiter), '/usr/sbin', '/sbin'];
  for (const d of dirs) {
    if (d !== '' && existsSync(join(d, tool))) return join(d, tool);
  }
  return undefined;
}

/** Why a peer cannot run here (missing tools), or undefined when it can. */
export function peerMissing(peer: 'virtnbdbackup' | 'restic'): string | undefined {
  const tools = peer === 'restic' ? ['restic'] : ['virtnbdbackup', 'virtnbdrestore', 'libvirtd', 'virtlogd', 'virsh'];
  const missing = tools.filter((t) => findTool(t) === undefined);
  if (missing.length === 0) return undefined;
  const pkgs = peer === 'restic' ? 'restic' : 'virtnbdbackup libvirt-daemon-system';
  return `${missing.join(', ')} not installed (apt-get install -y ${pkgs})`;
}

async function virsh(args: readonly string[]): Promise<RunResult> {
  return run('virsh', ['-c', LIBVIRT_URI, ...args]);
}

async function libvirtAnswers(): Promise<boolean> {
  try {
    await virsh(['version']);
    return true;
  } catch {
    return false;
  }
}

/** libvirtd (and virtlogd) for the bench: started here unless one already runs. */
export class Libvirt {
  private constructor(
    private readonly children: ChildProcess[],
    /** 'started' (pids of what we started) or 'reused'. */
    readonly how: string,
  ) {}

  static async start(logDir: string): Promise<Libvirt> {
    if (await libvirtAnswers()) return new Libvirt([], 'an already running libvirtd (left running)');
    const children: ChildProcess[] = [];
    const started = new Libvirt(children, '');
    try {
      for (const daemon of ['virtlogd', 'libvirtd']) {
        const log = openSync(join(logDir, `${daemon}.log`), 'a');
        const child = spawn(daemon, [], { stdio: ['ignore', log, log] });
        closeSync(log);
        children.push(child);
        if (daemon === 'virtlogd') await sleep(300);
      }
      const deadline = Date.now() + 30_000;
      while (!(await libvirtAnswers())) {
        if (Date.now() > deadline) throw new Error(`libvirtd did not answer within 30 s (see ${logDir}/libvirtd.log)`);
        if (children.some((c) => c.exitCode !== null)) throw new Error(`libvirtd or virtlogd exited at start (see ${logDir}/libvirtd.log, virtlogd.log)`);
        await sleep(200);
      }
    } catch (err) {
      await started.stop();
      throw err;
    }
    return new Libvirt(children, `started by the bench (virtlogd pid ${children[0]?.pid ?? '?'}, libvirtd pid ${children[1]?.pid ?? '?'}), stopped at the end`);
  }

  /** Defines and starts a domain with one qcow2 disk (sda on virtio-scsi), and waits until its guest is idle. */
  async startDomain(name: string, disk: string, type: 'kvm' | 'qemu', xmlFile: string): Promise<LibvirtDomain> {
    writeFileSync(
      xmlFile,
      `<domain type='${type}'>
  <name>${name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='${disk}'/>
      <target dev='sda' bus='scsi'/>
    </disk>
    <controller type='scsi' model='virtio-scsi'/>
  </devices>
</domain>
`,
    );
    await virsh(['define', xmlFile]);
    const dom = new LibvirtDomain(name);
    await virsh(['start', name]);
    await dom.afterStart();
    return dom;
  }

  /** Stops what start() started, by pid (libvirtd first: it uses virtlogd). Idempotent. */
  async stop(): Promise<void> {
    for (const child of [...this.children].reverse()) {
      if (child.exitCode !== null || child.signalCode !== null) continue;
      const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      child.kill('SIGTERM');
      const timeout = sleep(15_000).then(() => 'timeout' as const);
      if ((await Promise.race([exited, timeout])) === 'timeout') {
        child.kill('SIGKILL');
        await exited;
      }
    }
    this.children.length = 0;
  }
}

/** A running libvirt domain of the bench. */
export class LibvirtDomain {
  pid = 0;
  /** The disk's qdev id, for HMP qemu-io -d. */
  qdevId = '';

  constructor(readonly name: string) {}

  async afterStart(): Promise<void> {
    this.pid = Number(readFileSync(`/run/libvirt/qemu/${this.name}.pid`, 'utf8').trim());
    const info = await virsh(['qemu-monitor-command', this.name, '--hmp', 'info block']);
    const m = /Attached to:\s+(\S+)/.exec(info.stdout);
    if (m?.[1] === undefined) throw new Error(`cannot find the disk of libvirt domain "${this.name}" in: ${info.stdout}`);
    this.qdevId = m[1];
    await waitProcessIdle(this.pid);
  }

  cpuMs(): number {
    return processCpuMs(this.pid);
  }

  /** Guest-like writes through HMP qemu-io, each from a file of data, in one virsh process. */
  async write(writes: ReadonlyArray<{ offset: number; length: number; file: string }>, scratch: string): Promise<void> {
    const lines = writes.map((w) => `qemu-monitor-command ${this.name} --hmp 'qemu-io -d ${this.qdevId} "write -q -s ${w.file} ${w.offset} ${w.length}"'`);
    writeFileSync(scratch, `${lines.join('\n')}\n`);
    const r = await run('virsh', ['-c', LIBVIRT_URI, '-q'], { stdinFile: scratch });
    if (/error|fail/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io writes into libvirt domain "${this.name}" failed: ${(r.stdout + r.stderr).trim().slice(0, 500)}`);
  }

  /** Destroys and undefines the domain with its checkpoints' metadata. */
  async remove(): Promise<void> {
    await virsh(['destroy', this.name]).catch(() => undefined);
    await virsh(['undefine', this.name, '--checkpoints-metadata']).catch(() => undefined);
  }
}

export interface ToolRun {
  ms: number;
  cpuMs: number;
}

export async function virtnbdbackup(domain: string, level: 'full' | 'inc', output: string, scratch: string): Promise<ToolRun> {
  mkdirSync(scratch, { recursive: true });
  chmodSync(scratch, 0o755);
  const r = await runWithCpu('virtnbdbackup', ['-d', domain, '-l', level, '-o', output, '-S', scratch, '-n']);
  return { ms: r.ms, cpuMs: r.cpuMs };
}

export async function virtnbdrestore(input: string, output: string): Promise<ToolRun> {
  const r = await runWithCpu('virtnbdrestore', ['-i', input, '-o', output, '-n']);
  return { ms: r.ms, cpuMs: r.cpuMs };
}

/** A local restic repository. */
export class Restic {
  private readonly env: NodeJS.ProcessEnv;

  constructor(
    readonly repo: string,
    cacheDir: string,
  ) {
    this.env = { ...process.env, RESTIC_PASSWORD: 'qbackup-bench', RESTIC_REPOSITORY: repo, RESTIC_CACHE_DIR: cacheDir };
  }

  async init(): Promise<void> {
    await run('restic', ['init'], { env: this.env });
  }

  /** `restic backup --stdin` of a raw disk image. */
  async backup(rawFile: string, name: string): Promise<ToolRun> {
    const r = await runWithCpu('restic', ['backup', '--stdin', '--stdin-filename', name, '--host', 'bench', '-q'], { env: this.env, stdinFile: rawFile });
    return { ms: r.ms, cpuMs: r.cpuMs };
  }

  async restore(target: string): Promise<ToolRun> {
    const r = await runWithCpu('restic', ['restore', 'latest', '--target', target, '-q'], { env: this.env });
    return { ms: r.ms, cpuMs: r.cpuMs };
  }

  /** `restic check`, with `--read-data`: every pack read back and checked. */
  async check(readData: boolean): Promise<ToolRun> {
    const r = await runWithCpu('restic', ['check', ...(readData ? ['--read-data'] : []), '-q'], { env: this.env });
    return { ms: r.ms, cpuMs: r.cpuMs };
  }

  static version(): Promise<string> {
    return run('restic', ['version']).then((r) => r.stdout.trim().split('\n')[0] ?? 'unknown');
  }
}

export async function toolVersion(command: string, args: readonly string[]): Promise<string> {
  try {
    const r = await run(command, args);
    return (r.stdout.trim() || r.stderr.trim()).split('\n')[0] ?? 'unknown';
  } catch {
    return 'unknown';
  }
}
