// Progress bars for long commands: shown only on a terminal and never with
// --json, so scripts and logs get clean output.

import { createRequire } from 'node:module';
import type { Progress } from '../repository/repository.js';
import type { OutputOptions } from './output.js';

export interface ProgressReporter {
  update(p: Progress): void;
  stop(): void;
}

/** Runs a long call with a progress bar that is gone before anything is printed. */
export async function withProgress<T>(out: OutputOptions, call: (onProgress: (p: Progress) => void) => Promise<T>): Promise<T> {
  const bar = progressReporter(out);
  try {
    return await call((p) => bar.update(p));
  } finally {
    bar.stop();
  }
}

export function progressReporter(out: OutputOptions): ProgressReporter {
  if (out.json || !process.stderr.isTTY) return { update: () => undefined, stop: () => undefined };
  // Loaded only for a terminal: it is a tenth of the CLI's start-up otherwise.
  const cliProgress = createRequire(import.meta.url)('cli-progress') as typeof import('cli-progress');
  const bar = new cliProgress.SingleBar(
    {
      stream: process.stderr,
      format: ' {phase} [{bar}] {percentage}% | {doneMiB}/{totalMiB} MiB | {rate} MiB/s | ETA {eta_formatted}',
      hideCursor: true,
      clearOnComplete: true,
    },
    cliProgress.Presets.shades_classic,
  );
  let phase = '';
  let started = false;
  let since = Date.now();
  return {
    update(p) {
      const total = Math.max(1, p.totalBytes);
      if (!started || p.phase !== phase) {
        if (started) bar.stop();
        bar.start(total, 0, { phase: p.phase, doneMiB: '0', totalMiB: mib(total), rate: '0' });
        started = true;
        phase = p.phase;
        since = Date.now();
      }
      const seconds = Math.max(0.001, (Date.now() - since) / 1000);
      bar.setTotal(total);
      bar.update(Math.min(p.doneBytes, total), { phase: p.phase, doneMiB: mib(p.doneBytes), totalMiB: mib(total), rate: (p.doneBytes / 1048576 / seconds).toFixed(1) });
    },
    stop() {
      if (started) bar.stop();
      started = false;
    },
  };
}

function mib(bytes: number): string {
  return (bytes / 1048576).toFixed(1);
}
