// Process identity on Linux. A pid alone can be reused after a process dies,
// so a process we started is identified by its pid plus its start time (field
// 22 of /proc/PID/stat), and a zombie counts as dead.

import { readFileSync } from 'node:fs';

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

/** True when `pid` runs, is not a zombie, and (if given) started at `startTime`. */
export function isProcessAlive(pid: number, startTime?: string | null): boolean {
  const stat = readStat(pid);
  if (stat === undefined || stat.state === 'Z' || stat.state === 'X') return false;
  return startTime === undefined || startTime === null || stat.startTime === startTime;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
