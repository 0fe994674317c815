// CLI commands for checkpoints, named and flagged as in virsh, plus our own
// checkpoint-coverage.

import type { CheckpointInfo } from '../checkpoint/checkpoints.js';
import type { CheckpointDiskSpec } from '../checkpoint/spec.js';
import { QbackupError } from '../errors.js';
import { arg, defineCommand, flag, optionalArg, repeatable, value, type CliCommand } from './command.js';
import { quiesceMode, quiesceOptions, readInput } from './options.js';
import { emit, table } from './output.js';

const domain = arg('domain');
const checkpoint = arg('checkpoint');

export const checkpointCommands: readonly CliCommand[] = [
  defineCommand({
    name: 'checkpoint-create',
    description: 'create a checkpoint from a <domaincheckpoint> XML file (or redefine one from saved metadata)',
    args: { domain, file: optionalArg('file', 'checkpoint XML; without it, a default checkpoint is created') },
    options: {
      redefine: flag('--redefine', 'import checkpoint metadata (name, creationTime, parent) without touching bitmaps'),
      redefineValidate: flag('--redefine-validate', 'with --redefine, check that the bitmaps exist and are usable'),
      ...quiesceOptions(),
    },
    run: async ({ qb, out, args: { domain, file }, opts: o }) => {
      if (o.redefineValidate && !o.redefine) throw new QbackupError('INVALID_ARGUMENT', 'Option --redefine-validate needs --redefine');
      if (o.redefine && file === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Option --redefine needs a checkpoint XML file');
      // The XML parser loads when XML is given (start-up time).
      const spec = file === undefined ? {} : (await import('../libvirt/checkpoint.js')).parseCheckpointXml(readInput(file, 'checkpoint XML'));
      if (!o.redefine && (spec.parent !== undefined || spec.creationTime !== undefined || spec.domainXml !== undefined)) {
        throw new QbackupError('INVALID_ARGUMENT', `Cannot create checkpoint of domain "${domain}": <parent>, <creationTime> and <domain> are only accepted with --redefine`);
      }
      if (o.redefine && (o.quiesce || o.quiesceOptional)) throw new QbackupError('INVALID_ARGUMENT', 'Option --quiesce cannot be used with --redefine');
      const info = o.redefine ? await qb.checkpoints.redefine(domain, spec, { validate: o.redefineValidate }) : await qb.checkpoints.create(domain, spec, quiesceMode(o));
      emit(out, info, () => `Domain checkpoint ${info.name} ${o.redefine ? 'redefined' : 'created'}${quiescedText(info)}`);
    },
  }),

  defineCommand({
    name: 'checkpoint-create-as',
    description: 'create a checkpoint from options',
    args: { domain },
    options: {
      name: value('--name <name>', 'checkpoint name (default: creation time in seconds)'),
      description: value('--description <text>', 'description'),
      diskspec: repeatable('--diskspec <spec>', 'TARGET,checkpoint=bitmap|no[,bitmap=NAME]; repeatable'),
      ...quiesceOptions(),
    },
    run: async ({ qb, out, args: { domain }, opts: o }) => {
      const disks = o.diskspec.map(parseDiskspec);
      const info = await qb.checkpoints.create(domain, {
        ...(o.name !== undefined ? { name: o.name } : {}),
        ...(o.description !== undefined ? { description: o.description } : {}),
        ...(disks.length > 0 ? { disks } : {}),
      }, quiesceMode(o));
      emit(out, info, () => `Domain checkpoint ${info.name} created${quiescedText(info)}`);
    },
  }),

  defineCommand({
    name: 'checkpoint-list',
    description: 'list the checkpoints of a domain',
    args: { domain },
    options: {
      tree: flag('--tree', 'show the parent/child tree'),
      parent: flag('--parent', 'add a column with each parent'),
      name: flag('--name', 'print names only'),
      roots: flag('--roots', 'only checkpoints without a parent'),
      leaves: flag('--leaves', 'only checkpoints without children'),
      topological: flag('--topological', 'parents before children'),
    },
    run: async ({ qb, out, args: { domain }, opts: o }) => {
      const list = qb.checkpoints.list(domain, { roots: o.roots, leaves: o.leaves, topological: o.topological || o.tree });
      emit(out, list, () => checkpointListText(list, o));
    },
  }),

  defineCommand({
    name: 'checkpoint-dumpxml',
    description: 'print a checkpoint as <domaincheckpoint> XML',
    args: { domain, checkpoint },
    options: {
      domain: flag('--no-domain', 'leave out the <domain> definition'),
      size: flag('--size', 'add the bytes changed since the checkpoint per disk (domain must run)'),
    },
    run: async ({ qb, out, args: { domain, checkpoint: name }, opts: o }) => {
      const spec = await qb.checkpoints.describe(domain, name, { size: o.size });
      const { formatCheckpointXml } = await import('../libvirt/checkpoint.js');
      const xml = formatCheckpointXml(spec, { noDomain: !o.domain, includeSize: o.size });
      emit(out, { name, xml }, () => xml);
    },
  }),

  defineCommand({
    name: 'checkpoint-parent',
    description: 'print the name of a checkpoint’s parent',
    args: { domain, checkpoint },
    run: async ({ qb, out, args: { domain, checkpoint: name } }) => {
      const parent = qb.checkpoints.parent(domain, name);
      if (parent === null && !out.json) throw new QbackupError('CHECKPOINT_NOT_FOUND', `Checkpoint "${name}" of domain "${domain}" has no parent`);
      emit(out, { name, parent }, () => parent ?? '');
    },
  }),

  defineCommand({
    name: 'checkpoint-info',
    description: 'show a checkpoint’s place in the chain',
    args: { domain, checkpoint },
    run: async ({ qb, out, args: { domain, checkpoint: name } }) => {
      const c = qb.checkpoints.info(domain, name);
      emit(out, c, () => checkpointInfoText(c));
    },
  }),

  defineCommand({
    name: 'checkpoint-coverage',
    description: 'for each current disk: can a backup since CHECKPOINT be incremental, and if not, why',
    args: { domain, checkpoint },
    run: async ({ qb, out, args: { domain, checkpoint: name } }) => {
      const cov = await qb.checkpoints.coverage(domain, name);
      emit(out, cov, () =>
        table(
          ['Target', 'Disk id', 'Backup', 'Reason'],
          cov.map((c) => [c.target, c.diskId, c.mode, c.reasons.map((r) => `${r.code}: ${r.detail}`).join('; ') || '-']),
        ),
      );
    },
  }),

  defineCommand({
    name: 'checkpoint-delete',
    description: 'delete a checkpoint, merging its bitmap into its parent’s so earlier checkpoints keep their coverage',
    args: { domain, checkpoint },
    options: {
      children: flag('--children', 'also delete its descendants'),
      childrenOnly: flag('--children-only', 'delete only its descendants'),
      metadata: flag('--metadata', 'delete metadata only, leave bitmaps (coverage from the parent is then lost)'),
    },
    run: async ({ qb, out, args: { domain, checkpoint: name }, opts: o }) => {
      const deleted = await qb.checkpoints.delete(domain, name, { children: o.children, childrenOnly: o.childrenOnly, metadata: o.metadata });
      emit(out, { deleted }, () => (o.childrenOnly ? `Domain checkpoint ${name} children deleted` : `Domain checkpoint ${name} deleted`));
    },
  }),
];

export function parseDiskspec(spec: string): CheckpointDiskSpec {
  const [target, ...rest] = spec.split(',');
  if (target === undefined || target === '') throw new QbackupError('INVALID_ARGUMENT', `Invalid --diskspec "${spec}": it must start with a disk target`);
  const out: CheckpointDiskSpec = { name: target, checkpoint: 'bitmap' };
  for (const part of rest) {
    const [key, value] = part.split('=', 2);
    if (key === 'checkpoint' && (value === 'bitmap' || value === 'no')) out.checkpoint = value;
    else if (key === 'bitmap' && value !== undefined && value !== '') out.bitmap = value;
    else throw new QbackupError('INVALID_ARGUMENT', `Invalid --diskspec "${spec}": unknown part "${part}" (use checkpoint=bitmap|no and bitmap=NAME)`);
  }
  if (out.checkpoint === 'no' && out.bitmap !== undefined) {
    throw new QbackupError('INVALID_ARGUMENT', `Invalid --diskspec "${spec}": bitmap= makes no sense with checkpoint=no`);
  }
  return out;
}

function formatTime(seconds: number): string {
  return new Date(seconds * 1000).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' +0000');
}

function checkpointListText(list: readonly CheckpointInfo[], o: { tree: boolean; name: boolean; parent: boolean }): string {
  if (o.tree) return renderTree(list);
  if (o.name) return list.map((c) => c.name).join('\n');
  const headers = o.parent ? ['Name', 'Creation Time', 'Parent'] : ['Name', 'Creation Time'];
  return table(headers, list.map((c) => [c.name, formatTime(c.creationTime), ...(o.parent ? [c.parent ?? ''] : [])]));
}

function checkpointInfoText(c: CheckpointInfo): string {
  return [
    `Name:           ${c.name}`,
    `Domain:         ${c.domain}`,
    `Current:        ${c.current ? 'yes' : 'no'}`,
    `Has metadata:   yes`,
    `Parent:         ${c.parent ?? '-'}`,
    `Children:       ${c.children}`,
    `Descendants:    ${c.descendants}`,
    `Created:        ${formatTime(c.creationTime)}`,
    `Disks:          ${c.disks.map((d) => `${d.target}=${d.checkpoint === 'bitmap' ? (d.bitmap ?? '') : 'no'}`).join(' ')}`,
  ].join('\n');
}

function renderTree(list: readonly CheckpointInfo[]): string {
  const names = new Set(list.map((c) => c.name));
  const lines: string[] = [];
  const walk = (parent: string | null, prefix: string): void => {
    const kids = list.filter((c) => (parent === null ? c.parent === null || !names.has(c.parent) : c.parent === parent));
    kids.forEach((c, i) => {
      const last = i === kids.length - 1;
      lines.push(parent === null ? c.name : `${prefix}${last ? '└── ' : '├── '}${c.name}`);
      walk(c.name, parent === null ? '  ' : `${prefix}${last ? '    ' : '│   '}`);
    });
  };
  walk(null, '');
  return lines.join('\n');
}

/** What a human reads after "created": nothing, unless quiescing was asked for and did not happen. */
function quiescedText(info: CheckpointInfo): string {
  return info.consistency === 'filesystem' ? " (guest's filesystems frozen)" : '';
}
