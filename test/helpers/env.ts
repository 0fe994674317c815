// Test environment: a temporary directory with a state dir, images, domain
// XML, a library instance and a CLI runner. `cleanup` kills (by pid) every QEMU
// the test started and removes the directory.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Qbackup } from '../../src/qbackup.js';
import type { BackendSettings } from '../../src/repository/backend/open.js';
import { createImage } from '../../src/image/qemu-img.js';
import { runTool } from '../../src/image/tools.js';

const here = dirname(fileURLToPath(import.meta.url));
/** Repository root (this file is compiled to dist/test/helpers/). */
export const repoRoot = resolve(here, '..', '..', '..');
export const cliPath = join(repoRoot, 'bin', 'qbackup');

export interface CliResult {
  /** Exit status; -1 when the process was ended by a signal (see `signal`). */
  code: number;
  stdout: string;
  stderr: string;
  /** The signal that ended the process, or null when it exited. */
  signal: NodeJS.Signals | null;
}

export interface DiskXml {
  target: string;
  file: string;
  format?: 'qcow2' | 'raw';
  bus?: 'scsi' | 'virtio';
}

export class TestEnv {
  readonly dir: string;
  readonly stateDir: string;
  readonly qb: Qbackup;

  /** `accel`: the guest tests force TCG (a /dev/kvm that exists but runs no guest is seen in CI sandboxes). */
  /** `backends`: how the library reaches s3:// repositories (the CLI takes the same from the environment). */
  constructor(prefix = 'qbt-', options: { accel?: 'auto' | 'kvm' | 'tcg'; detachTimeoutMs?: number; backends?: BackendSettings } = {}) {
    this.dir = mkdtempSync(join(tmpdir(), prefix));
    this.stateDir = join(this.dir, 'state');
    this.qb = Qbackup.open({ stateDir: this.stateDir, lockTimeoutMs: 5_000, detachTimeoutMs: options.detachTimeoutMs ?? 2_000, ...(options.accel !== undefined ? { accel: options.accel } : {}), ...(options.backends !== undefined ? { backends: options.backends } : {}) });
  }

  path(name: string): string {
    return join(this.dir, name);
  }

  async image(name: string, sizeBytes = 8 << 20, format: 'qcow2' | 'raw' = 'qcow2', clusterSizeBytes?: number): Promise<string> {
    const file = this.path(name);
    await createImage(file, format, sizeBytes, clusterSizeBytes !== undefined ? { clusterSizeBytes } : {});
    return file;
  }

  domainXml(name: string, disks: readonly DiskXml[], extra = ''): string {
    const diskXml = disks
      .map(
        (d) => `    <disk type='file' device='disk'>
      <driver name='qemu' type='${d.format ?? 'qcow2'}'/>
      <source file='${d.file}'/>
      <target dev='${d.target}' bus='${d.bus ?? (d.target.startsWith('vd') ? 'virtio' : 'scsi')}'/>
    </disk>`,
      )
      .join('\n');
    return `<domain type='kvm'>
  <name>${name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
${extra}  <devices>
${diskXml}
  </devices>
</domain>
`;
  }

  writeFile(name: string, text: string): string {
    const file = this.path(name);
    writeFileSync(file, text);
    return file;
  }

  /** Defines a domain with the given disks (images created on the fly) through the library. */
  async defineDomain(name: string, disks: ReadonlyArray<{ target: string; sizeBytes?: number; format?: 'qcow2' | 'raw'; clusterSizeBytes?: number }>): Promise<void> {
    const xmlDisks: DiskXml[] = [];
    for (const d of disks) {
      const file = await this.image(`${name}-${d.target}.${d.format ?? 'qcow2'}`, d.sizeBytes ?? 8 << 20, d.format ?? 'qcow2', d.clusterSizeBytes);
      xmlDisks.push({ target: d.target, file, format: d.format ?? 'qcow2' });
    }
    await this.qb.domains.define(this.domainXml(name, xmlDisks));
  }

  /** Runs the CLI; `env` adds variables to the child's environment (e.g. QBACKUP_CRASH_AT). */
  cli(args: readonly string[], options: { input?: string; env?: Record<string, string> } = {}): Promise<CliResult> {
    return new Promise((resolvePromise, reject) => {
      const child = spawn(process.execPath, [cliPath, '--state-dir', this.stateDir, ...args], {
        stdio: ['pipe', 'pipe', 'pipe'],
        env: { ...process.env, QBACKUP_LOCK_TIMEOUT: '5', ...options.env },
      });
      const out: Buffer[] = [];
      const err: Buffer[] = [];
      child.stdout.on('data', (b: Buffer) => out.push(b));
      child.stderr.on('data', (b: Buffer) => err.push(b));
      child.on('error', reject);
      child.on('close', (code, signal) =>
        resolvePromise({ code: code ?? -1, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString(), signal }),
      );
      child.stdin.end(options.input ?? '');
    });
  }

  /** Like cli() but fails the test unless the command succeeds. */
  async cliOk(args: readonly string[]): Promise<string> {
    const r = await this.cli(args);
    if (r.code !== 0) throw new Error(`qbackup ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
    return r.stdout;
  }

  async cleanup(): Promise<void> {
    try {
      for (const d of this.qb.domains.list()) {
        // QEMU, and the server of an instant restore a failed test left running (it outlives its command by design).
        const server = this.qb.instant.loadRecord(d.name)?.server?.pid;
        for (const pid of [d.pid, server]) {
          if (pid === undefined) continue;
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            // already gone
          }
        }
      }
    } finally {
      this.qb.close();
      rmSync(this.dir, { recursive: true, force: true });
    }
  }
}

/** Writes a pattern into a running domain's disk as its guest would (HMP qemu-io). */
export async function guestWrite(qb: Qbackup, domain: string, target: string, command: string): Promise<void> {
  const disk = qb.domains.blockList(domain).find((d) => d.target === target);
  if (disk === undefined) throw new Error(`no disk ${target}`);
  const out = await qb.domains.monitorCommand(domain, `qemu-io -d ${disk.qemuIoDevice} "${command}"`, { hmp: true });
  if (typeof out === 'string' && /error|failed/i.test(out)) throw new Error(`qemu-io failed: ${out}`);
}

/** Reads bytes of an image (that QEMU may hold open) with qemu-io -U and checks a pattern. */
export async function imageHasPattern(file: string, format: string, pattern: number, offset: number, length: number): Promise<boolean> {
  try {
    const { stdout } = await runTool('qemu-io', ['-U', '-r', '-f', format, '-c', `read -P ${pattern} ${offset} ${length}`, file]);
    return !/Pattern verification failed/.test(stdout);
  } catch {
    return false;
  }
}
