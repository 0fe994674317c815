// CLI commands for domains and their disks, named and flagged as in virsh.

import { QbackupError } from '../errors.js';
import type { BlockInfo } from '../domain/domains.js';
import { arg, defineCommand, flag, value, variadicArg, type CliCommand } from './command.js';
import { oneOfValues, readInput } from './options.js';
import { emit, table } from './output.js';

const domain = arg('domain');

export const domainCommands: readonly CliCommand[] = [
  defineCommand({
    name: 'define',
    description: 'define a domain from a libvirt <domain> XML file (updates a shut-off domain with the same name and UUID)',
    args: { file: arg('file', 'domain XML file') },
    run: async ({ qb, out, args }) => {
      const d = await qb.domains.define(readInput(args.file, 'domain XML'));
      emit(out, d, () => `Domain '${d.name}' defined from ${args.file}`);
    },
  }),

  defineCommand({
    name: 'undefine',
    description: 'remove a shut-off domain definition (its images are kept)',
    args: { domain },
    options: { checkpointsMetadata: flag('--checkpoints-metadata', 'also remove the metadata of its checkpoints') },
    run: async ({ qb, out, args: { domain: name }, opts }) => {
      await qb.domains.undefine(name, { checkpointsMetadata: opts.checkpointsMetadata });
      emit(out, { name, undefined: true }, () => `Domain '${name}' has been undefined`);
    },
  }),

  defineCommand({
    name: 'start',
    description: 'start a domain in QEMU',
    args: { domain },
    options: { paused: flag('--paused', 'leave the CPUs stopped (the block layer works; no guest code runs)') },
    run: async ({ qb, out, args: { domain: name }, opts }) => {
      // Through another hypervisor (--connect): its driver starts the domain, serving an instant restore's backup first.
      const d = qb.driver.uri !== 'qbackup:///' ? await qb.driver.startDomain(name, { paused: opts.paused }) : await qb.domains.start(name, { paused: opts.paused });
      emit(out, d, () => `Domain '${name}' started`);
    },
  }),

  defineCommand({
    name: 'shutdown',
    description: 'stop a domain cleanly (QMP quit; persistent bitmaps are stored)',
    args: { domain },
    run: async ({ qb, out, args: { domain: name } }) => {
      const d = await qb.domains.shutdown(name);
      emit(out, d, () => `Domain '${name}' is shut off`);
    },
  }),

  defineCommand({
    name: 'destroy',
    description: 'kill a domain’s QEMU at once (SIGKILL); bitmaps of this run are lost',
    args: { domain },
    run: async ({ qb, out, args: { domain: name } }) => {
      const d = await qb.domains.destroy(name);
      emit(out, d, () => `Domain '${name}' destroyed`);
    },
  }),

  defineCommand({
    name: 'list',
    description: 'list domains (running and crashed; --all adds shut-off ones)',
    options: { all: flag('--all', 'include shut-off domains') },
    run: async ({ qb, out, opts }) => {
      if (qb.driver.uri !== 'qbackup:///') {
        // Another hypervisor's domains (--connect), through its driver.
        const listed = (await qb.driver.listDomains()).filter((d) => opts.all || d.state !== 'shut off');
        emit(out, listed.map((d) => ({ ...d, connection: qb.driver.uri })), () => table(['Name', 'State', 'Connection'], listed.map((d) => [d.name, d.state, qb.driver.uri])));
        return;
      }
      const list = qb.domains.list({ all: opts.all });
      emit(out, list, () => table(['Id', 'Name', 'State'], list.map((d) => [d.pid !== undefined ? String(d.pid) : '-', d.name, d.state])));
    },
  }),

  defineCommand({
    name: 'dominfo',
    description: 'show a domain’s state',
    args: { domain },
    run: async ({ qb, out, args: { domain: name } }) => {
      const d = qb.domains.info(name);
      emit(out, d, () => [`Name:   ${d.name}`, `UUID:   ${d.uuid}`, `State:  ${d.state} (${d.reason})`, `PID:    ${d.pid ?? '-'}`].join('\n'));
    },
  }),

  defineCommand({
    name: 'dumpxml',
    description: 'print the domain definition, including hot-plugged disks',
    args: { domain },
    run: async ({ qb, out, args: { domain: name } }) => {
      const xml = qb.domains.dumpXml(name);
      emit(out, { name, xml }, () => xml);
    },
  }),

  defineCommand({
    name: 'domblklist',
    description: 'list a domain’s disks',
    args: { domain },
    options: { details: flag('--details', 'show format, bus, disk id and QEMU node') },
    run: async ({ qb, out, args: { domain: name }, opts }) => {
      const disks = qb.domains.blockList(name);
      emit(out, disks, () => blockListText(disks, opts.details));
    },
  }),

  defineCommand({
    name: 'attach-disk',
    description: 'attach an image as a disk, live when the domain runs and in its definition',
    args: { domain, source: arg('source', 'absolute path of the image file'), target: arg('target', 'target name, e.g. sdb (SCSI) or vdb (virtio)') },
    options: {
      subdriver: value('--subdriver <format>', 'image format: qcow2 or raw (raw when absent, as in virsh: a format is never probed)'),
      targetbus: value('--targetbus <bus>', 'scsi or virtio (derived from the target name when absent)'),
      serial: value('--serial <serial>', 'disk serial number'),
      mode: value('--mode <mode>', '"readonly" for a read-only disk'),
    },
    run: async ({ qb, out, args: { domain: name, source, target }, opts: o }) => {
      const info = await qb.domains.attachDisk(name, {
        source,
        target,
        ...(o.subdriver !== undefined ? { format: oneOfValues('--subdriver', o.subdriver, ['qcow2', 'raw']) } : {}),
        ...(o.targetbus !== undefined ? { bus: oneOfValues('--targetbus', o.targetbus, ['scsi', 'virtio']) } : {}),
        ...(o.serial !== undefined ? { serial: o.serial } : {}),
        ...(o.mode !== undefined ? { readonly: oneOfValues('--mode', o.mode, ['readonly']) === 'readonly' } : {}),
      });
      emit(out, info, () => `Disk attached successfully (${info.target}, disk id ${info.diskId})`);
    },
  }),

  defineCommand({
    name: 'detach-disk',
    description: 'detach a disk, live when the domain runs (SCSI detaches without a guest; virtio needs a guest OS) and from its definition',
    args: { domain, target: arg('target') },
    run: async ({ qb, out, args: { domain: name, target } }) => {
      await qb.domains.detachDisk(name, target);
      emit(out, { name, target, detached: true }, () => 'Disk detached successfully');
    },
  }),

  defineCommand({
    name: 'blockresize',
    description: 'change a disk\'s size (as virsh: a plain number is KiB; or B, K/KiB, M/MiB, G/GiB, T/TiB); the disk loses its checkpoints\' coverage',
    args: { domain, target: arg('target'), size: arg('size') },
    options: { shrink: flag('--shrink', 'allow making the disk smaller (its end is lost)') },
    run: async ({ qb, out, args: { domain: name, target, size }, opts }) => {
      const info = await qb.domains.blockResize(name, target, scaledSize(size), { shrink: opts.shrink });
      emit(out, info, () => 'Block device resized');
    },
  }),

  defineCommand({
    name: 'qemu-monitor-command',
    description: 'send a raw QMP command (JSON) or, with --hmp, an HMP command line to the domain’s QEMU',
    args: { domain, command: variadicArg('command') },
    options: {
      hmp: flag('--hmp', 'the command is HMP, e.g. qemu-io sda "write -P 0xab 0 64k"'),
      pretty: flag('--pretty', 'indent the JSON reply'),
    },
    run: async ({ qb, out, args: { domain: name, command }, opts }) => {
      const reply = await qb.domains.monitorCommand(name, command.join(' '), { hmp: opts.hmp });
      emit(out, reply, () => (typeof reply === 'string' ? reply : JSON.stringify({ return: reply }, null, opts.pretty ? 2 : undefined)));
    },
  }),
];

function blockListText(disks: readonly BlockInfo[], details: boolean): string {
  if (!details) return table(['Target', 'Source'], disks.map((d) => [d.target, d.source]));
  return table(
    ['Target', 'Source', 'Format', 'Bus', 'Disk id', 'Node', 'qemu-io device'],
    disks.map((d) => [d.target, d.source, d.format, d.bus, d.diskId, d.nodeName, d.qemuIoDevice]),
  );
}

/** virsh's scaled sizes: a plain number is KiB. */
function scaledSize(text: string): number {
  const m = /^(\d+)\s*(B|K|KiB|M|MiB|G|GiB|T|TiB)?$/i.exec(text.trim());
  const units: Record<string, number> = { b: 1, k: 1024, kib: 1024, m: 1024 ** 2, mib: 1024 ** 2, g: 1024 ** 3, gib: 1024 ** 3, t: 1024 ** 4, tib: 1024 ** 4 };
  const scale = units[(m?.[2] ?? 'k').toLowerCase()];
  if (m === null || scale === undefined) throw new QbackupError('INVALID_ARGUMENT', `Invalid size "${text}": use a number of KiB or a number with a unit such as 48M or 2GiB`);
  return Number(m[1]) * scale;
}
