// CLI commands for domains and their disks, named and flagged as in virsh.

import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import { QbackupError } from '../errors.js';
import type { DiskBus, DiskFormat } from '../domain/types.js';
import { emit, table } from './output.js';
import type { CliContext } from './context.js';

export function registerDomainCommands(program: Command, cli: CliContext): void {
  program
    .command('define')
    .description('define a domain from a libvirt <domain> XML file (updates a shut-off domain with the same name and UUID)')
    .argument('<file>', 'domain XML file')
    .action(async (file: string, _o: unknown, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const d = await qb.domains.define(readInput(file, 'domain XML'));
        emit(out, d, () => `Domain '${d.name}' defined from ${file}`);
      });
    });

  program
    .command('undefine')
    .description('remove a shut-off domain definition (its images are kept)')
    .argument('<domain>')
    .option('--checkpoints-metadata', 'also remove the metadata of its checkpoints')
    .action(async (name: string, o: { checkpointsMetadata?: boolean }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        await qb.domains.undefine(name, { checkpointsMetadata: o.checkpointsMetadata ?? false });
        emit(out, { name, undefined: true }, () => `Domain '${name}' has been undefined`);
      });
    });

  program
    .command('start')
    .description('start a domain in QEMU')
    .argument('<domain>')
    .option('--paused', 'leave the CPUs stopped (the block layer works; no guest code runs)')
    .action(async (name: string, o: { paused?: boolean }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const d = await qb.domains.start(name, { paused: o.paused ?? false });
        emit(out, d, () => `Domain '${name}' started`);
      });
    });

  program
    .command('shutdown')
    .description('stop a domain cleanly (QMP quit; persistent bitmaps are stored)')
    .argument('<domain>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const d = await qb.domains.shutdown(name);
        emit(out, d, () => `Domain '${name}' is shut off`);
      });
    });

  program
    .command('destroy')
    .description('kill a domain’s QEMU at once (SIGKILL); bitmaps of this run are lost')
    .argument('<domain>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const d = await qb.domains.destroy(name);
        emit(out, d, () => `Domain '${name}' destroyed`);
      });
    });

  program
    .command('list')
    .description('list domains (running and crashed; --all adds shut-off ones)')
    .option('--all', 'include shut-off domains')
    .action(async (o: { all?: boolean }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const list = qb.domains.list({ all: o.all ?? false });
        emit(out, list, () =>
          table(
            ['Id', 'Name', 'State'],
            list.map((d) => [d.pid !== undefined ? String(d.pid) : '-', d.name, d.state]),
          ),
        );
      });
    });

  program
    .command('dominfo')
    .description('show a domain’s state')
    .argument('<domain>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const d = qb.domains.info(name);
        emit(out, d, () =>
          [`Name:   ${d.name}`, `UUID:   ${d.uuid}`, `State:  ${d.state} (${d.reason})`, `PID:    ${d.pid ?? '-'}`].join('\n'),
        );
      });
    });

  program
    .command('dumpxml')
    .description('print the domain definition, including hot-plugged disks')
    .argument('<domain>')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const xml = qb.domains.dumpXml(name);
        emit(out, { name, xml }, () => xml);
      });
    });

  program
    .command('domblklist')
    .description('list a domain’s disks')
    .argument('<domain>')
    .option('--details', 'show format, bus, disk id and QEMU node')
    .action(async (name: string, o: { details?: boolean }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const disks = qb.domains.blockList(name);
        emit(out, disks, () =>
          o.details
            ? table(
                ['Target', 'Source', 'Format', 'Bus', 'Disk id', 'Node', 'qemu-io device'],
                disks.map((d) => [d.target, d.source, d.format, d.bus, d.diskId, d.nodeName, d.qemuIoDevice]),
              )
            : table(['Target', 'Source'], disks.map((d) => [d.target, d.source])),
        );
      });
    });

  program
    .command('attach-disk')
    .description('attach an image as a disk, live when the domain runs and in its definition')
    .argument('<domain>')
    .argument('<source>', 'absolute path of the image file')
    .argument('<target>', 'target name, e.g. sdb (SCSI) or vdb (virtio)')
    .option('--subdriver <format>', 'image format: qcow2 or raw (probed when absent)')
    .option('--targetbus <bus>', 'scsi or virtio (derived from the target name when absent)')
    .option('--serial <serial>', 'disk serial number')
    .option('--mode <mode>', '"readonly" for a read-only disk')
    .action(async (name: string, source: string, target: string, o: { subdriver?: string; targetbus?: string; serial?: string; mode?: string }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const info = await qb.domains.attachDisk(name, {
          source,
          target,
          ...(o.subdriver !== undefined ? { format: oneOf<DiskFormat>('--subdriver', o.subdriver, ['qcow2', 'raw']) } : {}),
          ...(o.targetbus !== undefined ? { bus: oneOf<DiskBus>('--targetbus', o.targetbus, ['scsi', 'virtio']) } : {}),
          ...(o.serial !== undefined ? { serial: o.serial } : {}),
          ...(o.mode !== undefined ? { readonly: oneOf('--mode', o.mode, ['readonly']) === 'readonly' } : {}),
        });
        emit(out, info, () => `Disk attached successfully (${info.target}, disk id ${info.diskId})`);
      });
    });

  program
    .command('detach-disk')
    .description('detach a disk, live when the domain runs (SCSI detaches without a guest; virtio needs a guest OS) and from its definition')
    .argument('<domain>')
    .argument('<target>')
    .action(async (name: string, target: string, _o: unknown, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        await qb.domains.detachDisk(name, target);
        emit(out, { name, target, detached: true }, () => 'Disk detached successfully');
      });
    });

  program
    .command('qemu-monitor-command')
    .description('send a raw QMP command (JSON) or, with --hmp, an HMP command line to the domain’s QEMU')
    .argument('<domain>')
    .argument('<command...>')
    .option('--hmp', 'the command is HMP, e.g. qemu-io sda "write -P 0xab 0 64k"')
    .option('--pretty', 'indent the JSON reply')
    .action(async (name: string, words: string[], o: { hmp?: boolean; pretty?: boolean }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const reply = await qb.domains.monitorCommand(name, words.join(' '), { hmp: o.hmp ?? false });
        emit(out, reply, () => (typeof reply === 'string' ? reply : JSON.stringify({ return: reply }, null, o.pretty ? 2 : undefined)));
      });
    });
}

function oneOf<T extends string>(flag: string, value: string, allowed: readonly T[]): T {
  if (!(allowed as readonly string[]).includes(value)) {
    throw new QbackupError('INVALID_ARGUMENT', `Invalid value "${value}" for ${flag}: expected ${allowed.join(' or ')}`);
  }
  return value as T;
}

export function readInput(file: string, what: string): string {
  try {
    return readFileSync(file === '-' ? 0 : file, 'utf8');
  } catch (err) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot read ${what} file "${file}": ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'it does not exist' : (err as Error).message}`);
  }
}
