// Quiescing a running guest around one instant (a checkpoint's QMP
// transaction): its filesystems are frozen through the guest agent right
// before, and thawed right after, whatever happens in between (an error, a
// timeout). libvirt's --quiesce for snapshots, applied to checkpoints.
//
// - mode undefined: nothing is frozen; the result is crash-consistent.
// - 'required': no agent channel, a domain that is not running, an agent
//   that does not answer or a freeze that fails is an error (GUEST_AGENT),
//   and nothing else is done.
// - 'optional': the same conditions only make the result crash-consistent.
// A freeze whose answer did not come is thawed anyway (it may have happened).
// A thaw that fails is reported as an error even when the work succeeded,
// since the guest may be left frozen; the message says the work is done.

import { QbackupError, describeError } from '../errors.js';
import { GuestAgentClient } from '../qemu/guest-agent.js';

export type QuiesceMode = 'required' | 'optional';
export type Consistency = 'crash' | 'filesystem';

export interface QuiesceTarget {
  domain: string;
  running: boolean;
  /** The agent's socket; undefined when the domain has no agent channel. */
  agentSocket: string | undefined;
}

export interface QuiesceTimeouts {
  connectTimeoutMs?: number;
  freezeTimeoutMs?: number;
  thawTimeoutMs?: number;
}

/** The guest's filesystems as freezeGuest left them; thaw() never throws (it returns what went wrong). */
export interface Frozen {
  consistency: Consistency;
  thaw(): Promise<QbackupError | undefined>;
}

/**
 * Freezes the guest's filesystems when asked and possible. Throws GUEST_AGENT
 * when `required` and impossible (after thawing what a failed freeze may have
 * frozen); with `optional`, gives up quietly (consistency 'crash').
 */
export async function freezeGuest(target: QuiesceTarget, mode: QuiesceMode | undefined, timeouts: QuiesceTimeouts = {}): Promise<Frozen> {
  const agent = mode === undefined ? undefined : await freeze(target, mode, timeouts);
  if (agent === undefined) return { consistency: 'crash', thaw: async () => undefined };
  let thawed: Promise<QbackupError | undefined> | undefined;
  return {
    consistency: 'filesystem',
    thaw: () => {
      thawed ??= thaw(agent, target.domain, timeouts).then(
        () => undefined,
        (err: unknown) => new QbackupError('GUEST_AGENT', `Thawing the guest's filesystems of domain "${target.domain}" failed, they may still be frozen: ${describeError(err)}`, { cause: err }),
      );
      return thawed;
    },
  };
}

/**
 * Runs `work` with the guest's filesystems frozen (when asked and possible)
 * and thaws them whatever happens; says which consistency `work` saw. A thaw
 * that fails after `work` succeeded is an error that says the work is done.
 */
export async function withQuiesce<T>(
  target: QuiesceTarget,
  mode: QuiesceMode | undefined,
  work: () => Promise<T>,
  timeouts: QuiesceTimeouts = {},
): Promise<{ value: T; consistency: Consistency }> {
  const frozen = await freezeGuest(target, mode, timeouts);
  let value: T;
  try {
    value = await work();
  } catch (err) {
    const thawError = await frozen.thaw();
    if (thawError === undefined) throw err;
    throw new QbackupError('GUEST_AGENT', `${describeError(err)} (and ${describeError(thawError)})`, { cause: err });
  }
  const thawError = await frozen.thaw();
  if (thawError !== undefined) {
    throw new QbackupError('GUEST_AGENT', `The work on domain "${target.domain}" is done, but ${describeError(thawError)}`, { cause: thawError });
  }
  return { value, consistency: frozen.consistency };
}

/** Freezes; the agent connection when frozen, undefined when optional quiescing gave up. */
async function freeze(target: QuiesceTarget, mode: QuiesceMode, timeouts: QuiesceTimeouts): Promise<GuestAgentClient | undefined> {
  const { domain } = target;
  const cannot = (why: string, cause?: unknown): undefined => {
    if (mode === 'optional') return undefined;
    throw new QbackupError('GUEST_AGENT', `Cannot quiesce domain "${domain}": ${why}`, cause === undefined ? {} : { cause });
  };
  if (!target.running) return cannot('it is not running');
  if (target.agentSocket === undefined) return cannot('it has no guest agent channel (<channel type="unix"> with target org.qemu.guest_agent.0)');
  let agent: GuestAgentClient;
  try {
    agent = await GuestAgentClient.connect(target.agentSocket, domain, { connectTimeoutMs: timeouts.connectTimeoutMs ?? 5_000 });
  } catch (err) {
    return cannot(`the guest agent does not answer, or another client holds its socket (${describeError(err)})`, err);
  }
  try {
    await agent.freeze(timeouts.freezeTimeoutMs ?? 60_000);
    return agent;
  } catch (err) {
    // The freeze may have happened (no answer in time) or half happened: thaw, on a new connection if need be.
    await thaw(agent, domain, timeouts).catch(() => undefined);
    return cannot(`freezing its filesystems failed (${describeError(err)})`, err);
  }
}

async function thaw(agent: GuestAgentClient, domain: string, timeouts: QuiesceTimeouts): Promise<void> {
  const socket = agent.socketPath;
  try {
    await agent.thaw(timeouts.thawTimeoutMs ?? 10_000);
    return;
  } catch {
    // The connection is gone or out of step: one more try on a fresh one.
  } finally {
    agent.close();
  }
  const again = await GuestAgentClient.connect(socket, domain, { connectTimeoutMs: timeouts.connectTimeoutMs ?? 5_000 });
  try {
    await again.thaw(timeouts.thawTimeoutMs ?? 10_000);
  } finally {
    again.close();
  }
}
