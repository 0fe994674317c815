// The guest agent client and quiesce against a scripted fake agent: protocol
// edge cases only (a previous client's late answers, garbage before the
// delimiter, an agent that never answers). The real qemu-ga is exercised by
// test/integration/guest-*.test.ts.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { freezeGuest, withQuiesce } from '../../src/domain/quiesce.js';
import { isQbackupError } from '../../src/errors.js';
import { AgentAnswerParser, GuestAgentClient } from '../../src/qemu/guest-agent.js';

const dir = mkdtempSync(join(tmpdir(), 'qbga-'));
after(() => rmSync(dir, { recursive: true, force: true }));
let serial = 0;

interface FakeAgent {
  socket: string;
  commands: string[];
  server: Server;
}

/** A fake qemu-ga: answers commands in order; `answer` returns the raw text to write (undefined: stay silent). */
async function fakeAgent(answer: (cmd: { execute: string; arguments?: { id?: number } }) => string | undefined): Promise<FakeAgent> {
  const socket = join(dir, `a${serial++}.sock`);
  const commands: string[] = [];
  const server = createServer((conn: Socket) => {
    let buf = '';
    conn.on('data', (chunk: Buffer) => {
      buf += chunk.toString('latin1').replace(/\xff/g, '');
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const cmd = JSON.parse(line) as { execute: string; arguments?: { id?: number } };
        commands.push(cmd.execute);
        const text = answer(cmd);
        if (text !== undefined) conn.write(Buffer.from(text, 'latin1'));
      }
    });
    conn.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(socket, resolve));
  return { socket, commands, server };
}

function standard(cmd: { execute: string; arguments?: { id?: number } }): string | undefined {
  if (cmd.execute === 'guest-sync-delimited') {
    // A previous client's answers come first: a stray line, then an old sync.
    return `{"return": 7}\n\xff{"return": 99}\n\xff{"return": ${cmd.arguments?.id ?? 0}}\n`;
  }
  if (cmd.execute === 'guest-fsfreeze-freeze' || cmd.execute === 'guest-fsfreeze-thaw') return '{"return": 1}\n';
  if (cmd.execute === 'guest-fsfreeze-status') return '{"return": "thawed"}\n';
  return '{"error": {"class": "CommandNotFound", "desc": "no such command"}}\n';
}

describe('guest agent', () => {
  it('parser: drops bytes before the delimiter, splits lines, caps them', () => {
    const p = new AgentAnswerParser();
    p.expectDelimiter();
    assert.deepEqual(p.push(Buffer.from('{"return": 1}\n')), []);
    assert.deepEqual(p.push(Buffer.from('junk\xff{"return": ', 'latin1')), []);
    assert.deepEqual(p.push(Buffer.from('2}\n{"return": 3}\nnot json\n')).map((a) => (a instanceof Error ? 'error' : a)), [{ return: 2 }, { return: 3 }, 'error']);
    assert.throws(() => p.push(Buffer.alloc(2 << 20, 0x61)), /longer than/);
  });

  it('synchronises past a previous client\'s answers, then runs commands in order', async () => {
    const agent = await fakeAgent(standard);
    const client = await GuestAgentClient.connect(agent.socket, 'vm');
    assert.equal(await client.freeze(), 1);
    assert.equal(await client.freezeStatus(), 'thawed');
    assert.equal(await client.thaw(), 1);
    await assert.rejects(client.execute('guest-nope'), (err: unknown) => isQbackupError(err, 'GUEST_AGENT') && /no such command/.test(err.message));
    client.close();
    client.close();
    agent.server.close();
  });

  it('times out on an agent that does not answer', async () => {
    const agent = await fakeAgent(() => undefined);
    await assert.rejects(GuestAgentClient.connect(agent.socket, 'vm', { connectTimeoutMs: 200 }), (err: unknown) => isQbackupError(err, 'GUEST_AGENT') && /guest-sync/.test(err.message));
    agent.server.close();
  });

  it('quiesce: required fails without an agent, optional goes on crash-consistent', async () => {
    const target = { domain: 'vm', running: true, agentSocket: undefined };
    await assert.rejects(withQuiesce(target, 'required', async () => 1), (err: unknown) => isQbackupError(err, 'GUEST_AGENT') && /no guest agent channel/.test(err.message));
    assert.deepEqual(await withQuiesce(target, 'optional', async () => 1), { value: 1, consistency: 'crash' });
    assert.deepEqual(await withQuiesce(target, undefined, async () => 1), { value: 1, consistency: 'crash' });
    const silent = await fakeAgent(() => undefined);
    const gone = { ...target, agentSocket: silent.socket };
    await assert.rejects(withQuiesce(gone, 'required', async () => 1, { connectTimeoutMs: 200 }), /does not answer/);
    assert.equal((await withQuiesce(gone, 'optional', async () => 1, { connectTimeoutMs: 200 })).consistency, 'crash');
    silent.server.close();
  });

  it('quiesce: thaws after the work, and when the work fails', async () => {
    const agent = await fakeAgent(standard);
    const target = { domain: 'vm', running: true, agentSocket: agent.socket };
    assert.deepEqual(await withQuiesce(target, 'required', async () => 5), { value: 5, consistency: 'filesystem' });
    await assert.rejects(withQuiesce(target, 'required', async () => {
      throw new Error('transaction refused');
    }), /transaction refused/);
    const frozen = await freezeGuest(target, 'required');
    assert.equal(await frozen.thaw(), undefined);
    assert.equal(await frozen.thaw(), undefined); // once
    const ops = agent.commands.filter((c) => c !== 'guest-sync-delimited');
    assert.deepEqual(ops, ['guest-fsfreeze-freeze', 'guest-fsfreeze-thaw', 'guest-fsfreeze-freeze', 'guest-fsfreeze-thaw', 'guest-fsfreeze-freeze', 'guest-fsfreeze-thaw']);
    agent.server.close();
  });

  it('quiesce: a freeze without an answer is thawed anyway', async () => {
    const agent = await fakeAgent((cmd) => (cmd.execute === 'guest-fsfreeze-freeze' ? undefined : standard(cmd)));
    const target = { domain: 'vm', running: true, agentSocket: agent.socket };
    await assert.rejects(withQuiesce(target, 'required', async () => 1, { freezeTimeoutMs: 200 }), (err: unknown) => isQbackupError(err, 'GUEST_AGENT') && /freezing/.test(err.message));
    assert.deepEqual(agent.commands.filter((c) => c !== 'guest-sync-delimited'), ['guest-fsfreeze-freeze', 'guest-fsfreeze-thaw']);
    agent.server.close();
  });
});
