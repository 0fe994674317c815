// What a file of a backed-up filesystem looks like to callers: a FileEntry
// built from the stat fields libguestfs reports, guest paths normalized
// lexically (absolute, no "." or ".." left), and names made safe to show on
// a terminal (control characters and backslashes escaped, as `ls -b` does).

import { QbackupError } from '../errors.js';
import type { GuestStat } from './appliance.js';

export type FileType = 'file' | 'directory' | 'symlink' | 'fifo' | 'socket' | 'char' | 'block' | 'unknown';

export interface FileEntry {
  /** The last component ("/" for the root). */
  name: string;
  /** Absolute path in the session's tree. */
  path: string;
  type: FileType;
  /** Permission bits with setuid, setgid and sticky (st_mode & 07777). */
  mode: number;
  /** As ls shows it, e.g. "-rw-r--r--". */
  modeString: string;
  uid: number;
  gid: number;
  size: number;
  /** ISO 8601 with nanoseconds cut to milliseconds; mtimeNs keeps the rest. */
  mtime: string;
  mtimeSec: number;
  mtimeNs: number;
  atimeSec: number;
  atimeNs: number;
  nlink: number;
  /** A symlink's target, as stored (never followed). */
  link?: string;
}

const S_IFMT = 0o170000;
const TYPES: ReadonlyArray<[number, FileType, string]> = [
  [0o100000, 'file', '-'],
  [0o040000, 'directory', 'd'],
  [0o120000, 'symlink', 'l'],
  [0o010000, 'fifo', 'p'],
  [0o140000, 'socket', 's'],
  [0o020000, 'char', 'c'],
  [0o060000, 'block', 'b'],
];

export function fileType(mode: number): FileType {
  return TYPES.find(([bits]) => (mode & S_IFMT) === bits)?.[1] ?? 'unknown';
}

/** "drwxr-xr-x", "-rwsr-xr-x", "drwxrwxrwt". */
export function modeString(mode: number): string {
  const t = TYPES.find(([bits]) => (mode & S_IFMT) === bits)?.[2] ?? '?';
  const rwx = (shift: number, special: number, ch: string): string => {
    const r = mode & (4 << shift) ? 'r' : '-';
    const w = mode & (2 << shift) ? 'w' : '-';
    const x = mode & (1 << shift);
    const s = mode & special;
    return r + w + (s ? (x ? ch : ch.toUpperCase()) : x ? 'x' : '-');
  };
  return t + rwx(6, 0o4000, 's') + rwx(3, 0o2000, 's') + rwx(0, 0o1000, 't');
}

export function entryOf(path: string, s: GuestStat, name?: string): FileEntry {
  const sec = s.mtime;
  return {
    name: name ?? (path === '/' ? '/' : path.slice(path.lastIndexOf('/') + 1)),
    path,
    type: fileType(s.mode),
    mode: s.mode & 0o7777,
    modeString: modeString(s.mode),
    uid: s.uid,
    gid: s.gid,
    size: s.size,
    mtime: new Date(sec * 1000 + Math.floor(s.mtimeNs / 1e6)).toISOString(),
    mtimeSec: sec,
    mtimeNs: s.mtimeNs,
    atimeSec: s.atime,
    atimeNs: s.atimeNs,
    nlink: s.nlink,
    ...(s.link !== undefined ? { link: s.link } : {}),
  };
}

/** An absolute guest path with "//", "." and ".." resolved lexically; "/" stays "/". */
export function normalizeGuestPath(path: string): string {
  if (path.includes('\0')) throw new QbackupError('INVALID_ARGUMENT', `Invalid path ${JSON.stringify(path)}: it contains a NUL byte`);
  if (!path.startsWith('/')) throw new QbackupError('INVALID_ARGUMENT', `Invalid path ${JSON.stringify(path)}: give an absolute path in the guest, such as /etc/hostname`);
  const out: string[] = [];
  for (const part of path.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') out.pop();
    else out.push(part);
  }
  return `/${out.join('/')}`;
}

export function joinGuestPath(dir: string, name: string): string {
  return dir === '/' ? `/${name}` : `${dir}/${name}`;
}

/**
 * A guest name (or path, or link target) safe to print on a terminal: C0 and
 * C1 control characters, DEL and backslash become \n, \t, \e, \xNN or \\;
 * everything else (printable Unicode) is kept.
 */
export function escapeName(name: string): string {
  let out = '';
  for (const ch of name) {
    const c = ch.codePointAt(0) ?? 0;
    if (ch === '\\') out += '\\\\';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\t') out += '\\t';
    else if (ch === '\r') out += '\\r';
    else if (c === 0x1b) out += '\\e';
    else if (c < 0x20 || c === 0x7f || (c >= 0x80 && c < 0xa0) || c === 0x2028 || c === 0x2029 || (c >= 0x202a && c <= 0x202e) || (c >= 0x2066 && c <= 0x2069)) {
      out += c <= 0xff ? `\\x${c.toString(16).padStart(2, '0')}` : `\\u${c.toString(16).padStart(4, '0')}`;
    } else out += ch;
  }
  return out;
}
