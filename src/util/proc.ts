// Process identity on Linux. A pid alone can be reused after a process dies,
// so a process we started is identified by its pid plus its start time (field
// 22 of /proc/PID/stat), and a zombie counts as dead.

import { readFileSync, readdirSync } from 'node:fs';

interface ProcStat {
  state: string;
  startTime: string;
}

function readStat(pid: number): ProcStat | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // The command name (field 2) is in parentheses and may contain spaces.
  const close = text.lastIndexOf(')');
  const fields = text.slice(close + 2).split(' ');
  const state = fields[0];
  const startTime = fields[19];
  if (state === undefined || startTime === undefined) return undefined;
  return { state, startTime };
}

export function processStartTime(pid: number): string | undefined {
  return readStat(pid)?.startTime;
}

/**
 * True when `pid` runs and (if given) started at `startTime`. A zombie leader
 * whose other threads are still exiting counts as alive: those threads still
 * hold the process's files (and so QEMU's image locks).
 */
export function isProcessAlive(pid: number, startTime?: string | null): boolean {
  const stat = readStat(pid);
  if (stat === undefined || stat.state === 'X') return false;
  if (startTime !== undefined && startTime !== null && stat.startTime !== startTime) return false;
  if (stat.state === 'Z') return threadCount(pid) > 1;
  return true;
}

function threadCount(pid: number): number {
  try {
    return readdirSync(`/proc/${pid}/task`).length;
  } catch {
    return 0;
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * The first process (other than ourselves) with `arg` as one of its
 * command-line arguments, with its start time: how a QEMU whose pid was never
 * recorded (its starter died at the wrong instant) is found by its unique
 * QMP socket argument.
 */
export function findProcessWithArg(arg: string): { pid: number; startTime: string } | undefined {
  let entries: string[];
  try {
    entries = readdirSync('/proc');
  } catch {
    return undefined;
  }
  for (const entry of entries) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    let args: string[];
    try {
      args = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
    } catch {
      continue;
    }
    if (!args.includes(arg)) continue;
    const pid = Number(entry);
    const startTime = processStartTime(pid);
    if (startTime !== undefined && isProcessAlive(pid, startTime)) return { pid, startTime };
  }
  return undefined;
}
