// Options and value checks that several commands share. The checks run inside
// a command's `run`, so a bad value is a QbackupError('INVALID_ARGUMENT'): one
// sentence on stderr (or a JSON error with --json) and exit status 1. Their
// messages are part of the CLI's interface and stay as they are.

import { closeSync, openSync, readSync } from 'node:fs';
import { QbackupError } from '../errors.js';
import type { QuiesceMode } from '../domain/quiesce.js';
import { flag, repeatable, value, type OptionSpec } from './command.js';

/** `--repo <name|dir|s3://bucket/prefix>`: a configured repository's name or a location; absent means the configured default. */
export function repoOption(description = 'a repository named in the configuration file, a directory, or s3://BUCKET/PREFIX (S3 settings from the configuration or AWS_* variables); default: defaults.repository'): OptionSpec<string | undefined> {
  return value('--repo <name|dir|s3://bucket/prefix>', description);
}

/** `--disk <target>`, repeatable; none given means every disk. */
export function diskOption(verb: string): OptionSpec<string[]> {
  return repeatable('--disk <target>', `${verb} only this disk; repeatable`);
}

/** `Invalid --mode "foo": expected push or pull` */
export function oneOf<T extends string>(flag: string, value: string, allowed: readonly T[]): T {
  if (!isOneOf(value, allowed)) throw new QbackupError('INVALID_ARGUMENT', `Invalid ${flag} "${value}": expected ${allowed.join(' or ')}`);
  return value;
}

/** attach-disk's phrasing, `Invalid value "vmdk" for --subdriver: expected qcow2 or raw`. */
export function oneOfValues<T extends string>(flag: string, value: string, allowed: readonly T[]): T {
  if (!isOneOf(value, allowed)) throw new QbackupError('INVALID_ARGUMENT', `Invalid value "${value}" for ${flag}: expected ${allowed.join(' or ')}`);
  return value;
}

function isOneOf<T extends string>(value: string, allowed: readonly T[]): value is T {
  return (allowed as readonly string[]).includes(value);
}

/** A number above zero, e.g. `--bandwidth 12.5` (MiB/s). */
export function positiveNumber(flag: string, value: string, unit: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new QbackupError('INVALID_ARGUMENT', `Invalid ${flag} "${value}": expected a positive number of ${unit}`);
  return n;
}

/** HOST:PORT or [IPv6]:PORT, e.g. `--tcp 127.0.0.1:10809`. */
export function hostPort(flag: string, value: string, options: { anyPort?: boolean } = {}): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s[\]]+)):(\d{1,5})$/.exec(value.trim());
  const port = Number(m?.[3]);
  const host = m?.[1] ?? m?.[2];
  // Port 0 asks a listener for any free port.
  if (host === undefined || !Number.isInteger(port) || port < (options.anyPort === true ? 0 : 1) || port > 65535) {
    throw new QbackupError('INVALID_ARGUMENT', `Invalid ${flag} "${value}": expected HOST:PORT such as 127.0.0.1:10809`);
  }
  return { host, port };
}

/** A point in time, e.g. `--until 2026-11-25T18:00:00Z`. */
/** What a point in time on the command line may be, for option descriptions. */
export const POINT_IN_TIME_FORMS = 'an ISO 8601 time (2026-11-25T18:00:00Z, 2026-11-25 18:00 in local time, 2026-11-25), now, yesterday (24 hours ago), or N seconds|minutes|hours|days|weeks ago';

const DAY_MS = 86_400_000;
const UNIT_MS: Record<string, number> = { second: 1000, minute: 60_000, hour: 3_600_000, day: DAY_MS, week: 7 * DAY_MS };
const RELATIVE = /^(\d{1,9}) *(second|minute|hour|day|week)s? +ago$/;

/**
 * A point in time as a user types it: an ISO 8601 time (what Date parses), or
 * a form relative to `now` as GNU date reads it: "now", "yesterday" (24 hours
 * before now, the same time of day) and "N units ago".
 */
export function pointInTime(flag: string, value: string, now: Date = new Date()): Date {
  const text = value.trim().toLowerCase().replace(/\s+/g, ' ');
  let time: Date;
  if (text === 'now') time = new Date(now.getTime());
  else if (text === 'yesterday') time = new Date(now.getTime() - DAY_MS);
  else {
    const m = RELATIVE.exec(text);
    time = m !== null ? new Date(now.getTime() - Number(m[1]) * (UNIT_MS[m[2] ?? ''] ?? Number.NaN)) : new Date(value);
  }
  if (Number.isNaN(time.getTime())) throw new QbackupError('INVALID_ARGUMENT', `Invalid ${flag} "${value}": expected a time such as 2026-11-25T18:00:00Z, yesterday or "2 days ago"`);
  return time;
}

/** Input documents are read up to this size (above every XML document limit), never whole whatever their size. */
const MAX_INPUT_BYTES = 4 << 20;

/** The text of an input file named on the command line; `-` reads stdin. */
export function readInput(file: string, what: string): string {
  let fd: number | undefined;
  const chunks: Buffer[] = [];
  let total = 0;
  try {
    fd = file === '-' ? 0 : openSync(file, 'r');
    for (;;) {
      const chunk = Buffer.alloc(1 << 16);
      const n = readSync(fd, chunk, 0, chunk.length, null);
      if (n === 0) break;
      chunks.push(chunk.subarray(0, n));
      total += n;
      if (total > MAX_INPUT_BYTES) break;
    }
  } catch (err) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot read ${what} file "${file}": ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'it does not exist' : (err as Error).message}`);
  } finally {
    if (fd !== undefined && fd !== 0) closeSync(fd);
  }
  if (total > MAX_INPUT_BYTES) {
    throw new QbackupError('INVALID_XML', `The ${what} file "${file}" is larger than ${MAX_INPUT_BYTES >> 20} MiB.`);
  }
  return Buffer.concat(chunks).toString('utf8');
}

/** `--quiesce` and `--quiesce-optional`: freeze the guest's filesystems through its agent (virsh's --quiesce). */
export function quiesceOptions(): { quiesce: OptionSpec<boolean>; quiesceOptional: OptionSpec<boolean> } {
  return {
    quiesce: flag('--quiesce', "freeze the guest's filesystems through its agent for the checkpoint; fail without an agent"),
    quiesceOptional: flag('--quiesce-optional', 'like --quiesce, but go on crash-consistent when the agent is missing or does not answer'),
  };
}

/** The library's quiesce mode for those two flags; neither given: the configuration's defaults.quiesce, if any. */
export function quiesceMode(o: { quiesce: boolean; quiesceOptional: boolean }, configured?: 'none' | 'optional' | 'required' | undefined): { quiesce?: QuiesceMode } {
  if (o.quiesceOptional) return { quiesce: 'optional' };
  if (o.quiesce) return { quiesce: 'required' };
  return configured === 'optional' || configured === 'required' ? { quiesce: configured } : {};
}
