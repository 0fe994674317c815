// CLI commands for checkpoints, named and flagged as in virsh, plus our own
// checkpoint-coverage.

import type { Command } from 'commander';
import type { CheckpointInfo } from '../checkpoint/service.js';
import type { CheckpointDiskSpec } from '../checkpoint/spec.js';
import { formatCheckpointXml, parseCheckpointXml } from '../libvirt/checkpoint.js';
import { QbackupError } from '../errors.js';
import type { CliContext } from './context.js';
import { readInput } from './domain-commands.js';
import { collect, emit, table } from './output.js';

export function registerCheckpointCommands(program: Command, cli: CliContext): void {
  program
    .command('checkpoint-create')
    .description('create a checkpoint from a <domaincheckpoint> XML file (or redefine one from saved metadata)')
    .argument('<domain>')
    .argument('[file]', 'checkpoint XML; without it, a default checkpoint is created')
    .option('--redefine', 'import checkpoint metadata (name, creationTime, parent) without touching bitmaps')
    .option('--redefine-validate', 'with --redefine, check that the bitmaps exist and are usable')
    .action(async (domain: string, file: string | undefined, o: { redefine?: boolean; redefineValidate?: boolean }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        if (o.redefineValidate && !o.redefine) throw new QbackupError('INVALID_ARGUMENT', 'Option --redefine-validate needs --redefine');
        if (o.redefine && file === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Option --redefine needs a checkpoint XML file');
        const spec = file === undefined ? {} : parseCheckpointXml(readInput(file, 'checkpoint XML'));
        const info = o.redefine
          ? await qb.checkpoints.redefine(domain, spec, { validate: o.redefineValidate ?? false })
          : await qb.checkpoints.create(domain, spec);
        emit(out, info, () => `Domain checkpoint ${info.name} ${o.redefine ? 'redefined' : 'created'}`);
      });
    });

  program
    .command('checkpoint-create-as')
    .description('create a checkpoint from options')
    .argument('<domain>')
    .option('--name <name>', 'checkpoint name (default: creation time in seconds)')
    .option('--description <text>', 'description')
    .option('--diskspec <spec>', 'TARGET,checkpoint=bitmap|no[,bitmap=NAME]; repeatable', collect, [])
    .action(async (domain: string, o: { name?: string; description?: string; diskspec: string[] }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const disks = o.diskspec.map(parseDiskspec);
        const info = await qb.checkpoints.create(domain, {
          ...(o.name !== undefined ? { name: o.name } : {}),
          ...(o.description !== undefined ? { description: o.description } : {}),
          ...(disks.length > 0 ? { disks } : {}),
        });
        emit(out, info, () => `Domain checkpoint ${info.name} created`);
      });
    });

  program
    .command('checkpoint-list')
    .description('list the checkpoints of a domain')
    .argument('<domain>')
    .option('--tree', 'show the parent/child tree')
    .option('--parent', 'add a column with each parent')
    .option('--name', 'print names only')
    .option('--roots', 'only checkpoints without a parent')
    .option('--leaves', 'only checkpoints without children')
    .option('--topological', 'parents before children')
    .action(
      async (
        domain: string,
        o: { tree?: boolean; parent?: boolean; name?: boolean; roots?: boolean; leaves?: boolean; topological?: boolean },
        cmd: Command,
      ) => {
        await cli.run(cmd, async (qb, out) => {
          const list = qb.checkpoints.list(domain, { roots: o.roots ?? false, leaves: o.leaves ?? false, topological: (o.topological ?? false) || (o.tree ?? false) });
          emit(out, list, () => {
            if (o.tree) return renderTree(list);
            if (o.name) return list.map((c) => c.name).join('\n');
            const headers = o.parent ? ['Name', 'Creation Time', 'Parent'] : ['Name', 'Creation Time'];
            return table(
              headers,
              list.map((c) => {
                const row = [c.name, formatTime(c.creationTime)];
                if (o.parent) row.push(c.parent ?? '');
                return row;
              }),
            );
          });
        });
      },
    );

  program
    .command('checkpoint-dumpxml')
    .description('print a checkpoint as <domaincheckpoint> XML')
    .argument('<domain>')
    .argument('<checkpoint>')
    .option('--no-domain', 'leave out the <domain> definition')
    .option('--size', 'add the bytes changed since the checkpoint per disk (domain must run)')
    .action(async (domain: string, name: string, o: { domain?: boolean; size?: boolean }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const spec = await qb.checkpoints.describe(domain, name, { size: o.size ?? false });
        const xml = formatCheckpointXml(spec, { noDomain: o.domain === false, includeSize: o.size ?? false });
        emit(out, { name, xml }, () => xml);
      });
    });

  program
    .command('checkpoint-parent')
    .description('print the name of a checkpoint’s parent')
    .argument('<domain>')
    .argument('<checkpoint>')
    .action(async (domain: string, name: string, _o: unknown, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const parent = qb.checkpoints.parent(domain, name);
        if (parent === null && !out.json) throw new QbackupError('CHECKPOINT_NOT_FOUND', `Checkpoint "${name}" of domain "${domain}" has no parent`);
        emit(out, { name, parent }, () => parent ?? '');
      });
    });

  program
    .command('checkpoint-info')
    .description('show a checkpoint’s place in the chain')
    .argument('<domain>')
    .argument('<checkpoint>')
    .action(async (domain: string, name: string, _o: unknown, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const c = qb.checkpoints.info(domain, name);
        emit(out, c, () =>
          [
            `Name:           ${c.name}`,
            `Domain:         ${c.domain}`,
            `Current:        ${c.current ? 'yes' : 'no'}`,
            `Has metadata:   yes`,
            `Parent:         ${c.parent ?? '-'}`,
            `Children:       ${c.children}`,
            `Descendants:    ${c.descendants}`,
            `Created:        ${formatTime(c.creationTime)}`,
            `Disks:          ${c.disks.map((d) => `${d.target}=${d.checkpoint === 'bitmap' ? (d.bitmap ?? '') : 'no'}`).join(' ')}`,
          ].join('\n'),
        );
      });
    });

  program
    .command('checkpoint-coverage')
    .description('for each current disk: can a backup since CHECKPOINT be incremental, and if not, why')
    .argument('<domain>')
    .argument('<checkpoint>')
    .action(async (domain: string, name: string, _o: unknown, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const cov = await qb.checkpoints.coverage(domain, name);
        emit(out, cov, () =>
          table(
            ['Target', 'Disk id', 'Backup', 'Reason'],
            cov.map((c) => [c.target, c.diskId, c.mode, c.reasons.map((r) => `${r.code}: ${r.detail}`).join('; ') || '-']),
          ),
        );
      });
    });

  program
    .command('checkpoint-delete')
    .description('delete a checkpoint, merging its bitmap into its parent’s so earlier checkpoints keep their coverage')
    .argument('<domain>')
    .argument('<checkpoint>')
    .option('--children', 'also delete its descendants')
    .option('--children-only', 'delete only its descendants')
    .option('--metadata', 'delete metadata only, leave bitmaps (coverage from the parent is then lost)')
    .action(async (domain: string, name: string, o: { children?: boolean; childrenOnly?: boolean; metadata?: boolean }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const deleted = await qb.checkpoints.delete(domain, name, {
          children: o.children ?? false,
          childrenOnly: o.childrenOnly ?? false,
          metadata: o.metadata ?? false,
        });
        emit(out, { deleted }, () => (o.childrenOnly ? `Domain checkpoint ${name} children deleted` : `Domain checkpoint ${name} deleted`));
      });
    });
}

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
