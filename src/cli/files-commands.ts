// CLI for file-level restore: `qbackup files DOMAIN --repo R [--backup ID |
// --until T] [--disk sda] [--fs DEV] ACTION ...` with the actions
// filesystems, ls [-l] [-R] PATH, cat PATH, get PATH... --to DIR and
// find PATH --name GLOB. Each command boots its own appliance (seconds under
// software emulation) and ends it before it returns; the daemon keeps warm
// sessions instead. Every name from the guest is printed escaped, so a
// hostile filename cannot drive the terminal.

import { QbackupError } from '../errors.js';
import { FileSession, copyIntoGuest, escapeName, type ApplianceSettings, type FileEntry } from '../files/index.js';
import type { Qbackup } from '../qbackup.js';
import { arg, defineCommand, flag, value, type ArgumentSpec, type CliCommand } from './command.js';
import { repoAccess } from './passwords.js';
import { diskOption, oneOf, POINT_IN_TIME_FORMS, pointInTime, positiveNumber, repoOption } from './options.js';
import { emit, table } from './output.js';

const ACTIONS = ['filesystems', 'ls', 'cat', 'get', 'find'] as const;

/** `[paths...]`: zero or more words after the action. */
const paths: ArgumentSpec<string[]> = {
  syntax: '[paths...]',
  description: 'guest paths (ls, cat, find: one; get: one or more)',
  read: (raw) => (Array.isArray(raw) ? raw.filter((x): x is string => typeof x === 'string') : []),
};

export const filesCommands: readonly CliCommand[] = [
  defineCommand({
    name: 'files',
    description: "browse a backup's filesystems and copy files out: filesystems | ls [-l] [-R] PATH | cat PATH | get PATH... --to DIR [--into-guest DOMAIN] | find PATH --name GLOB",
    args: { domain: arg('domain'), action: arg('action', ACTIONS.join(', ')), paths },
    options: {
      repo: repoOption(),
      passwordFile: value('--password-file <file>', 'read the passphrase from this file (default: $QBACKUP_PASSWORD)'),
      backup: value('--backup <id>', 'the backup to open (default: the latest)'),
      until: value('--until <time>', `the latest backup taken at or before this time: ${POINT_IN_TIME_FORMS}`),
      disk: diskOption('open'),
      fs: value('--fs <device>', 'the filesystem to take as / (e.g. /dev/sda1; default: the operating system found, or the only filesystem)'),
      long: flag('-l, --long', 'ls, find: type, mode, owner, size, time and link target'),
      recursive: flag('-R, --recursive', 'ls: list subdirectories too'),
      name: value('--name <glob>', 'find: names matching this shell pattern'),
      to: value('--to <dir>', 'get: the directory to write into (created if missing; nothing in it is overwritten); with --into-guest, a directory of the guest'),
      intoGuest: value('--into-guest <domain>', "get: write into this running domain's guest through its guest agent instead of this host (bytes; with guest-exec allowed, directories, owners and modes; never times or symlinks)"),
      maxBytes: value('--max-bytes <MiB>', 'cat, get: refuse files larger than this'),
      timeout: value('--timeout <seconds>', 'stop the appliance when one operation takes longer (default 120; booting it has 600)'),
    },
    run: async ({ qb, out, cli, args, opts: o }) => {
      const env = Object.fromEntries(Object.entries(cli.env).filter((e): e is [string, string] => e[1] !== undefined));
      const action = oneOf('action', args.action, ACTIONS);
      checkArguments(action, args.paths, o);
      if (o.backup !== undefined && o.until !== undefined) throw new QbackupError('INVALID_ARGUMENT', 'Give either --backup or --until, not both');
      const until = o.until !== undefined ? pointInTime('--until', o.until) : undefined;
      const session = await FileSession.open(qb.repository, {
        ...repoAccess(cli, o),
        domain: args.domain,
        backup: o.backup,
        until,
        disks: o.disk,
        fs: o.fs,
        runDir: qb.domains.runDir(),
        appliance: applianceSettings(qb, o.timeout, env),
        limits: { maxFileBytes: o.maxBytes !== undefined ? positiveNumber('--max-bytes', o.maxBytes, 'MiB') * 2 ** 20 : undefined },
      });
      const stop = (): void => void session.close().finally(() => process.exit(130));
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
      try {
        if (action === 'get' && o.intoGuest !== undefined) await getIntoGuest(qb, session, args.paths, o.intoGuest, o.to ?? '/', out.json);
        else await runAction(session, action, args.paths, o, out.json);
      } finally {
        process.off('SIGINT', stop);
        process.off('SIGTERM', stop);
        await session.close();
      }
    },
  }),
];

interface ActionOptions {
  long: boolean;
  recursive: boolean;
  name?: string | undefined;
  to?: string | undefined;
}

function checkArguments(action: (typeof ACTIONS)[number], given: readonly string[], o: ActionOptions): void {
  const one = (): void => {
    if (given.length !== 1) throw new QbackupError('INVALID_ARGUMENT', `files ${action} takes one path`);
  };
  if (action === 'filesystems' && given.length > 0) throw new QbackupError('INVALID_ARGUMENT', 'files filesystems takes no path');
  if (action === 'ls' && given.length > 1) one();
  if (action === 'cat') one();
  if (action === 'find') {
    if (given.length > 1) one();
    if (o.name === undefined) throw new QbackupError('INVALID_ARGUMENT', 'files find needs --name GLOB');
  }
  if (action === 'get') {
    if (given.length === 0) throw new QbackupError('INVALID_ARGUMENT', 'files get needs at least one path');
    if (o.to === undefined) throw new QbackupError('INVALID_ARGUMENT', 'files get needs --to DIR');
  }
}

async function runAction(session: FileSession, action: (typeof ACTIONS)[number], given: readonly string[], o: ActionOptions, json: boolean): Promise<void> {
  const out = { json };
  const path = given[0] ?? '/';
  switch (action) {
    case 'filesystems': {
      await session.mount().catch(() => undefined); // shows where each one is mounted, when a tree can be chosen
      const value = { backup: session.backup.id, filesystems: session.filesystems, operatingSystems: session.operatingSystems };
      emit(out, value, () => {
        const rows = session.filesystems.map((f) => [escapeName(f.device), f.disk ?? '', escapeName(f.type), String(f.sizeBytes), escapeName(f.label), f.mountpoint !== undefined ? escapeName(f.mountpoint) : '']);
        const os = session.operatingSystems.map((x) => `Operating system on ${escapeName(x.root)}: ${escapeName(x.product)}${x.hostname !== '' ? ` (hostname ${escapeName(x.hostname)})` : ''}`);
        return [`Backup ${session.backup.id} of ${session.backup.domain} (${session.backup.time})`, ...os, table(['Device', 'Disk', 'Type', 'Size', 'Label', 'Mounted on'], rows)].join('\n');
      });
      return;
    }
    case 'ls': {
      if (!o.recursive) {
        const entries = await session.list(path);
        emit(out, entries, () => listing(entries, o.long));
        return;
      }
      const all: FileEntry[] = [];
      await session.walk(path, (e) => void all.push(e));
      if (json) {
        emit(out, all, () => '');
        return;
      }
      // As ls -R: each directory's path, then its entries.
      const dirs = all.filter((e) => e.type === 'directory');
      const parts = dirs.map((d) => {
        const children = all.filter((e) => e.path !== d.path && parentOf(e.path) === d.path);
        return `${escapeName(d.path)}:\n${listing(children, o.long)}`;
      });
      emit(out, all, () => (dirs.length === 0 ? listing(all, o.long) : parts.join('\n\n')));
      return;
    }
    case 'cat': {
      await session.read(path, process.stdout);
      return;
    }
    case 'find': {
      const found = await session.find(path, o.name ?? '*');
      emit(out, found, () => (o.long ? listing(found, true, true) : found.map((e) => escapeName(e.path)).join('\n')));
      return;
    }
    case 'get': {
      const to = o.to ?? '.';
      const r = await session.get(given, to);
      emit(out, { backup: session.backup.id, to, ...r }, () =>
        [
          `Got ${r.files} file(s), ${r.directories} directory(ies) and ${r.symlinks} symlink(s), ${r.bytes} bytes, from backup ${session.backup.id} into ${to}`,
          ...r.skipped.map((s) => `  skipped ${escapeName(s.path)}: ${s.reason}`),
        ].join('\n'),
      );
      return;
    }
  }
}

async function getIntoGuest(qb: Qbackup, session: FileSession, given: readonly string[], domain: string, to: string, json: boolean): Promise<void> {
  const r = await copyIntoGuest(session, given, qb.repository.driver, domain, to);
  emit({ json }, { backup: session.backup.id, to, ...r }, () =>
    [
      `Wrote ${r.files} file(s) and ${r.directories} directory(ies), ${r.bytes} bytes, from backup ${session.backup.id} into ${escapeName(to)} in the guest of domain ${domain}`,
      ...(r.notKept.length > 0 ? [`  not kept: ${r.notKept.join(', ')}`] : []),
      ...r.skipped.map((s) => `  skipped ${escapeName(s.path)}: ${s.reason}`),
    ].join('\n'),
  );
}

function parentOf(path: string): string {
  const i = path.lastIndexOf('/');
  return i <= 0 ? '/' : path.slice(0, i);
}

/** Names one per line, or with -l a table: mode, owner, size, time, name -> target. */
function listing(entries: readonly FileEntry[], long: boolean, fullPaths = false): string {
  const name = (e: FileEntry): string => escapeName(fullPaths ? e.path : e.name);
  if (!long) return entries.map(name).join('\n');
  return table(
    ['Mode', 'Owner', 'Size', 'Modified', 'Name'],
    entries.map((e) => [e.modeString, `${e.uid}:${e.gid}`, String(e.size), e.mtime.replace(/\.\d+Z$/, 'Z'), e.link !== undefined ? `${name(e)} -> ${escapeName(e.link)}` : name(e)]),
  );
}

/** The appliance runs with the command's environment (SUPERMIN_KERNEL, SUPERMIN_MODULES, LIBGUESTFS_* reach libguestfs). */
function applianceSettings(qb: Qbackup, timeout: string | undefined, environment: Record<string, string>): ApplianceSettings {
  return {
    environment,
    // Where QEMU must run without KVM (QBACKUP_ACCEL=tcg), so must the appliance.
    backendSettings: qb.options.accel === 'tcg' ? ['force_tcg'] : undefined,
    requestTimeoutMs: timeout !== undefined ? positiveNumber('--timeout', timeout, 'seconds') * 1000 : undefined,
  };
}

