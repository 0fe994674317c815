// A qemu-nbd process serving one image on a private unix socket, for the
// times qbackup needs to write into (or read from) an image file through NBD
// without a VM: the repository's pull-mode copies write into their qcow2 this
// way, so qcow2 details (zero clusters over a backing file) stay QEMU's job.

import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QbackupError } from '../errors.js';
import { outputTail } from './tools.js';
import { sleep } from '../util/proc.js';
import { socketAccepts } from '../util/socket.js';

export interface QemuNbdServer extends AsyncDisposable {
  socket: string;
  exportName: string;
  /** Stops qemu-nbd (it flushes the image on the way out) and removes the socket directory. */
  stop(): Promise<void>;
}

export async function startQemuNbd(image: string, options: { format: 'qcow2' | 'raw'; readOnly?: boolean }): Promise<QemuNbdServer> {
  const dir = mkdtempSync(join(tmpdir(), 'qbackup-nbd-'));
  const socket = join(dir, 'nbd.sock');
  const exportName = 'image';
  // --persistent: the readiness probe is a client too, and qemu-nbd would exit when it leaves.
  const args = [`--socket=${socket}`, '--persistent', `--format=${options.format}`, `--export-name=${exportName}`, '--cache=writeback', '--discard=unmap', image];
  if (options.readOnly) args.unshift('--read-only');
  const child = spawn('qemu-nbd', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const err: Buffer[] = [];
  child.stderr.on('data', (b: Buffer) => err.push(b));
  let exited = false;
  const exit = new Promise<void>((resolve) => child.on('close', () => {
    exited = true;
    resolve();
  }));
  // A spawn failure (qemu-nbd missing) also ends in 'close'; keep its reason for the error below.
  let spawnError: Error | undefined;
  child.on('error', (e) => (spawnError = e));
  const deadline = Date.now() + 10_000;
  while (!(existsSync(socket) && (await socketAccepts(socket)))) {
    if (exited || Date.now() > deadline) {
      child.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
      throw new QbackupError('TOOL_FAILED', `Cannot serve "${image}" with qemu-nbd: ${outputTail(err) || spawnError?.message || 'it did not start'}`);
    }
    await sleep(10);
  }
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    if (!exited) child.kill('SIGTERM');
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([exit, new Promise<void>((resolve) => (timer = setTimeout(resolve, 10_000)))]);
    clearTimeout(timer);
    if (!exited) child.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  };
  return { socket, exportName, stop, [Symbol.asyncDispose]: stop };
}
