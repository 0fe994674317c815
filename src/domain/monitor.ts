// The monitor passthrough (virsh qemu-monitor-command): raw QMP or HMP sent
// to a running domain's QEMU. Anything can be done through it, a resize too,
// so the sizes are looked at again afterwards.

import { QbackupError, describeError } from '../errors.js';
import type { DomainSessions } from './session.js';

/**
 * Raw QMP (a JSON {"execute": …, "arguments": …} document, or a bare command
 * name) or, with `hmp`, an HMP command line. Returns QMP's `return` value or
 * HMP's text output.
 */
export async function monitorCommand(sessions: DomainSessions, name: string, command: string, options: { hmp?: boolean | undefined } = {}): Promise<unknown> {
  return sessions.withDomain(name, 'qemu-monitor-command', async (ctx) => {
    sessions.requireRunning(ctx, 'send a monitor command to');
    return sessions.withQmp(ctx, 'qemu-monitor-command', async (qmp) => {
      const { execute, args } = options.hmp ? { execute: '', args: undefined } : parseMonitorCommand(name, command);
      const result = options.hmp ? await qmp.humanMonitorCommand(command) : await qmp.execute(execute, args);
      // Anything can be done through the monitor, a block_resize too.
      await sessions.hooks.sizesMayHaveChanged?.(ctx, qmp);
      return result;
    });
  });
}

function parseMonitorCommand(domain: string, command: string): { execute: string; args?: Record<string, unknown> } {
  const text = command.trim();
  if (!text.startsWith('{')) return { execute: text };
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot send monitor command to domain "${domain}": it is not valid JSON (${describeError(err)})`);
  }
  if (typeof doc !== 'object' || doc === null || typeof (doc as Record<string, unknown>)['execute'] !== 'string') {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot send monitor command to domain "${domain}": a QMP command needs an "execute" member`);
  }
  const rec = doc as Record<string, unknown>;
  const args = rec['arguments'];
  if (args !== undefined && (typeof args !== 'object' || args === null || Array.isArray(args))) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot send monitor command to domain "${domain}": "arguments" must be an object`);
  }
  return args === undefined ? { execute: rec['execute'] as string } : { execute: rec['execute'] as string, args: args as Record<string, unknown> };
}
