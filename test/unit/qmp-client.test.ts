import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server, type Socket } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import {
  QmpClient,
  QmpCommandError,
  QmpProtocolError,
  type QmpConnectOptions,
  type QmpEvent,
} from '../../src/qmp/index.js';
import { QbackupError, isQbackupError } from '../../src/errors.js';

// ---------------------------------------------------------------------------
// A scripted QMP peer: a unix-socket server that greets, answers
// qmp_capabilities by itself and queues every other command for the test.

interface ReceivedCommand {
  execute: string;
  arguments?: Record<string, unknown>;
  id: unknown;
}

const GREETING = {
  QMP: { version: { qemu: { micro: 0, minor: 2, major: 7 }, package: 'fake' }, capabilities: ['oob'] },
};

class PeerConnection {
  readonly log: ReceivedCommand[] = [];
  private readonly queue: ReceivedCommand[] = [];
  private readonly takers: Array<(command: ReceivedCommand) => void> = [];
  private buffered = '';
  readonly ended: Promise<unknown>;

  constructor(
    readonly socket: Socket,
    private readonly autoCapabilities: boolean,
  ) {
    this.ended = once(socket, 'close');
    socket.on('error', () => undefined);
    socket.on('data', (chunk: Buffer) => {
      this.buffered += chunk.toString('utf8');
      let newline: number;
      while ((newline = this.buffered.indexOf('\n')) !== -1) {
        const line = this.buffered.slice(0, newline);
        this.buffered = this.buffered.slice(newline + 1);
        this.receive(JSON.parse(line) as ReceivedCommand);
      }
    });
  }

  private receive(command: ReceivedCommand): void {
    this.log.push(command);
    if (this.autoCapabilities && command.execute === 'qmp_capabilities') {
      this.send({ return: {}, id: command.id });
      return;
    }
    const taker = this.takers.shift();
    if (taker) taker(command);
    else this.queue.push(command);
  }

  nextCommand(): Promise<ReceivedCommand> {
    const queued = this.queue.shift();
    if (queued) return Promise.resolve(queued);
    return new Promise((resolve) => this.takers.push(resolve));
  }

  async nextCommands(count: number): Promise<ReceivedCommand[]> {
    const commands: ReceivedCommand[] = [];
    for (let i = 0; i < count; i++) commands.push(await this.nextCommand());
    return commands;
  }

  send(...messages: object[]): void {
    this.socket.write(messages.map((m) => `${JSON.stringify(m)}\n`).join(''));
  }

  sendRaw(data: string | Buffer): void {
    this.socket.write(data);
  }

  reply(command: ReceivedCommand, value: unknown = {}): void {
    this.send({ return: value, id: command.id });
  }
}

interface PeerOptions {
  /** Sent on connect; null sends nothing; a string is sent raw. */
  greeting?: object | string | null;
  autoCapabilities?: boolean;
}

class FakeQmpPeer {
  private readonly connections: PeerConnection[] = [];
  private readonly waiting: Array<(connection: PeerConnection) => void> = [];

  private constructor(
    readonly dir: string,
    readonly socketPath: string,
    private readonly server: Server,
  ) {}

  static async start(options: PeerOptions = {}): Promise<FakeQmpPeer> {
    const dir = await mkdtemp(join(tmpdir(), 'qmp-fake-'));
    const socketPath = join(dir, 'qmp.sock');
    const server = createServer();
    const peer = new FakeQmpPeer(dir, socketPath, server);
    server.on('connection', (socket) => {
      const connection = new PeerConnection(socket, options.autoCapabilities ?? true);
      const greeting = options.greeting === undefined ? GREETING : options.greeting;
      if (typeof greeting === 'string') connection.sendRaw(greeting);
      else if (greeting !== null) connection.send(greeting);
      peer.connections.push(connection);
      peer.waiting.shift()?.(connection);
    });
    server.listen(socketPath);
    await once(server, 'listening');
    return peer;
  }

  connection(index = 0): Promise<PeerConnection> {
    const existing = this.connections[index];
    if (existing) return Promise.resolve(existing);
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  async stop(): Promise<void> {
    for (const connection of this.connections) connection.socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    await rm(this.dir, { recursive: true, force: true });
  }
}

function event(name: string, data?: Record<string, unknown>): object {
  return data === undefined
    ? { event: name, timestamp: { seconds: 1700000000, microseconds: 1 } }
    : { event: name, data, timestamp: { seconds: 1700000000, microseconds: 1 } };
}

/** Runs body with a connected client and peer, and always tears both down. */
async function withClient(
  body: (client: QmpClient, connection: PeerConnection, peer: FakeQmpPeer) => Promise<void>,
  options: QmpConnectOptions = {},
  peerOptions: PeerOptions = {},
): Promise<void> {
  const peer = await FakeQmpPeer.start(peerOptions);
  try {
    const client = await QmpClient.connect(peer.socketPath, { connectTimeoutMs: 2000, defaultTimeoutMs: 2000, ...options });
    try {
      await body(client, await peer.connection(), peer);
    } finally {
      await client.close();
    }
  } finally {
    await peer.stop();
  }
}

function isCode(code: QbackupError['code']) {
  return (err: unknown): boolean => {
    assert.ok(isQbackupError(err, code), `expected ${code}, got ${String(err)}`);
    return true;
  };
}

/** Asserts a QMP_DISCONNECTED whose cause satisfies check, and returns that cause. */
async function rejectsDisconnected(promise: Promise<unknown>): Promise<unknown> {
  let cause: unknown;
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(isQbackupError(err, 'QMP_DISCONNECTED'), `expected QMP_DISCONNECTED, got ${String(err)}`);
    cause = err.cause;
    return true;
  });
  return cause;
}

// ---------------------------------------------------------------------------

test('connect reads the greeting, negotiates capabilities and becomes ready', async () => {
  const trace: Array<[string, object]> = [];
  await withClient(
    async (client, connection) => {
      assert.equal(client.state, 'ready');
      assert.deepEqual(client.greeting.version, { qemu: { major: 7, minor: 2, micro: 0 }, package: 'fake' });
      assert.deepEqual(client.greeting.capabilities, ['oob']);
      assert.equal(connection.log[0]?.execute, 'qmp_capabilities');
      assert.equal(connection.log[0]?.arguments, undefined);
      assert.equal(typeof connection.log[0]?.id, 'number');
      assert.deepEqual(
        trace.map(([direction, message]) => [direction, Object.keys(message)[0]]),
        [
          ['recv', 'QMP'],
          ['send', 'execute'],
          ['recv', 'return'],
        ],
      );
      const reply = client.execute('query-status');
      const command = await connection.nextCommand();
      assert.equal(command.execute, 'query-status');
      connection.reply(command, { status: 'running', running: true });
      assert.deepEqual(await reply, { status: 'running', running: true });
    },
    { onTrace: (direction, message) => trace.push([direction, message]) },
  );
});

test('replies that arrive out of order are routed by id', async () => {
  await withClient(async (client, connection) => {
    const a = client.execute('cmd-a', { n: 1 });
    const b = client.execute('cmd-b', { n: 2 });
    const c = client.execute('cmd-c');
    const [ca, cb, cc] = await connection.nextCommands(3);
    assert.ok(ca && cb && cc);
    assert.equal(new Set([ca.id, cb.id, cc.id]).size, 3, 'ids are unique');
    assert.deepEqual(cb.arguments, { n: 2 });
    connection.reply(cc, 'C');
    assert.equal(await c, 'C');
    connection.send({ return: 'A', id: ca.id }, { return: 'B', id: cb.id });
    assert.deepEqual(await Promise.all([a, b]), ['A', 'B']);
  });
});

test('events interleaved between replies are numbered and delivered in order', async () => {
  await withClient(async (client, connection) => {
    const seen: QmpEvent[] = [];
    const unsubscribe = client.onEvent((e) => seen.push(e));
    const first = client.execute('first');
    const second = client.execute('second');
    const [c1, c2] = await connection.nextCommands(2);
    assert.ok(c1 && c2);
    connection.send(
      event('STOP'),
      { return: 2, id: c2.id },
      event('BLOCK_JOB_READY', { device: 'job0' }),
      { return: 1, id: c1.id },
      event('RESUME'),
    );
    assert.deepEqual(await Promise.all([first, second]), [1, 2]);
    const third = await client.waitForEvent('RESUME');
    assert.equal(third.seq, 3);
    assert.deepEqual(
      seen.map((e) => [e.seq, e.event]),
      [
        [1, 'STOP'],
        [2, 'BLOCK_JOB_READY'],
        [3, 'RESUME'],
      ],
    );
    assert.deepEqual(seen[1]?.data, { device: 'job0' });
    assert.deepEqual(seen[0]?.data, {});
    assert.equal(client.eventCursor(), 3);
    unsubscribe();
    connection.send(event('STOP'));
    await client.waitForEvent('STOP', undefined, 1000, 3);
    assert.equal(seen.length, 3, 'no delivery after unsubscribe');
  });
});

test('an event that arrived before waitForEvent was called is still found', async () => {
  await withClient(async (client, connection) => {
    const ping = client.execute('ping');
    const command = await connection.nextCommand();
    // The events precede the reply, so they are in the client before the wait starts.
    connection.send(
      event('BLOCK_JOB_COMPLETED', { device: 'other' }),
      event('BLOCK_JOB_COMPLETED', { device: 'job1', offset: 10 }),
      { return: {}, id: command.id },
    );
    await ping;
    assert.equal(client.eventCursor(), 2);
    const found = await client.waitForEvent('BLOCK_JOB_COMPLETED', (e) => e.data['device'] === 'job1', 100);
    assert.equal(found.seq, 2);
    assert.equal(found.data['offset'], 10);

    // With a cursor, only later events count.
    const cursor = client.eventCursor();
    const later = client.waitForEvent('BLOCK_JOB_COMPLETED', (e) => e.data['device'] === 'job1', 2000, cursor);
    connection.send(event('BLOCK_JOB_COMPLETED', { device: 'job1', offset: 20 }));
    const next = await later;
    assert.equal(next.seq, 3);
    assert.equal(next.data['offset'], 20);
  });
});

test('waitForEvent times out with QMP_TIMEOUT, and a throwing predicate rejects the wait', async () => {
  await withClient(async (client, connection) => {
    await assert.rejects(client.waitForEvent('NEVER', undefined, 30), isCode('QMP_TIMEOUT'));
    const failing = client.waitForEvent('STOP', () => {
      throw new Error('predicate bug');
    });
    connection.send(event('STOP'));
    await assert.rejects(failing, /predicate bug/);
    assert.equal(client.state, 'ready');
  });
});

test('the event buffer is bounded', async () => {
  await withClient(
    async (client, connection) => {
      connection.send(event('E', { n: 1 }), event('E', { n: 2 }), event('E', { n: 3 }), event('E', { n: 4 }));
      const last = await client.waitForEvent('E', (e) => e.data['n'] === 4);
      assert.equal(last.seq, 4);
      await assert.rejects(client.waitForEvent('E', (e) => e.data['n'] === 1, 30), isCode('QMP_TIMEOUT'));
      assert.equal((await client.waitForEvent('E')).data['n'], 3, 'oldest retained event');
    },
    { eventBufferSize: 2 },
  );
});

test('a timed-out call leaves the others working and its late reply is dropped', async () => {
  await withClient(async (client, connection) => {
    const slow = client.execute('slow', {}, { timeoutMs: 50 });
    const fast = client.execute('fast');
    const [cs, cf] = await connection.nextCommands(2);
    assert.ok(cs && cf);
    await assert.rejects(slow, (err: unknown) => {
      assert.ok(isQbackupError(err, 'QMP_TIMEOUT'));
      assert.match(err.message, /"slow"/);
      return true;
    });
    connection.reply(cf, 'fast-result');
    assert.equal(await fast, 'fast-result');
    connection.reply(cs, 'too late');
    const after = client.execute('after');
    const ca = await connection.nextCommand();
    connection.reply(ca, 'ok');
    assert.equal(await after, 'ok');
    assert.equal(client.state, 'ready');
  });
});

test('a QEMU error reply surfaces as QmpCommandError with class and desc', async () => {
  await withClient(async (client, connection) => {
    const args = { driver: 'qcow2', 'node-name': 'disk0' };
    const pending = client.execute('blockdev-add', args);
    const command = await connection.nextCommand();
    connection.send({ error: { class: 'GenericError', desc: "Could not open 'x': No such file" }, id: command.id });
    await assert.rejects(pending, (err: unknown) => {
      assert.ok(err instanceof QmpCommandError);
      assert.ok(err instanceof QbackupError);
      assert.equal(err.code, 'QMP_ERROR');
      assert.equal(err.errorClass, 'GenericError');
      assert.equal(err.desc, "Could not open 'x': No such file");
      assert.equal(err.command, 'blockdev-add');
      assert.deepEqual(err.args, args);
      assert.equal(err.message, `QMP command "blockdev-add" failed: Could not open 'x': No such file`);
      return true;
    });
    assert.equal(client.state, 'ready');
  });
});

test('transaction and humanMonitorCommand send the documented payloads', async () => {
  await withClient(async (client, connection) => {
    const actions = [
      { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b1' } },
      { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'b2' } },
    ];
    const tx = client.transaction(actions, { completionMode: 'grouped' });
    const txCommand = await connection.nextCommand();
    assert.equal(txCommand.execute, 'transaction');
    assert.deepEqual(txCommand.arguments, { actions, properties: { 'completion-mode': 'grouped' } });
    connection.reply(txCommand);
    assert.equal(await tx, undefined);

    const hmp = client.humanMonitorCommand('info version');
    const hmpCommand = await connection.nextCommand();
    assert.equal(hmpCommand.execute, 'human-monitor-command');
    assert.deepEqual(hmpCommand.arguments, { 'command-line': 'info version' });
    connection.reply(hmpCommand, '7.2.0\r\n');
    assert.equal(await hmp, '7.2.0\r\n');

    await assert.rejects(client.transaction([{ type: '', data: {} }]), isCode('INVALID_ARGUMENT'));
  });
});

test('an oversized line closes the connection and fails pending calls with the cause', async () => {
  await withClient(
    async (client, connection) => {
      const pending = client.execute('query-block');
      const waiter = client.waitForEvent('NEVER');
      await connection.nextCommand();
      connection.sendRaw(`{"return": "${'x'.repeat(5000)}`);
      const cause = await rejectsDisconnected(pending);
      assert.ok(cause instanceof QmpProtocolError);
      assert.equal(cause.reason, 'line-too-long');
      assert.equal(await rejectsDisconnected(waiter), cause);
      assert.equal(await client.closed, cause);
      assert.equal(client.state, 'closed');
      await connection.ended;
    },
    { maxLineBytes: 1024 },
  );
});

test('a malformed line closes the connection and fails pending calls with the cause', async () => {
  await withClient(async (client, connection) => {
    const pending = client.execute('query-block');
    await connection.nextCommand();
    connection.sendRaw('{"return": oops}\n');
    const cause = await rejectsDisconnected(pending);
    assert.ok(cause instanceof QmpProtocolError);
    assert.equal(cause.reason, 'malformed-json');
    assert.equal(await client.closed, cause);
    await connection.ended;
  });
});

test('a message of no known shape, or a reply to an unknown id, is a protocol error', async () => {
  await withClient(async (client, connection) => {
    const pending = client.execute('x');
    await connection.nextCommand();
    connection.send({ hello: 'world' });
    const cause = await rejectsDisconnected(pending);
    assert.ok(cause instanceof QmpProtocolError);
    assert.equal(cause.reason, 'invalid-message');
  });
  await withClient(async (client, connection) => {
    const pending = client.execute('x');
    await connection.nextCommand();
    connection.send({ return: {}, id: 9999 });
    const cause = await rejectsDisconnected(pending);
    assert.ok(cause instanceof QmpProtocolError);
    assert.equal(cause.reason, 'unexpected-message');
  });
  await withClient(async (client, connection) => {
    const pending = client.execute('x');
    await connection.nextCommand();
    connection.send(GREETING);
    const cause = await rejectsDisconnected(pending);
    assert.ok(cause instanceof QmpProtocolError);
    assert.equal(cause.reason, 'unexpected-message');
  });
});

test('peer disconnect fails every pending call and waiter', async () => {
  await withClient(async (client, connection) => {
    const calls = [client.execute('a'), client.execute('b')];
    const waiters = [client.waitForEvent('SHUTDOWN'), client.waitForEvent('STOP', () => true, 60_000)];
    await connection.nextCommands(2);
    connection.socket.end();
    const causes = await Promise.all([...calls, ...waiters].map((p) => rejectsDisconnected(p)));
    const reason = await client.closed;
    assert.ok(reason instanceof QbackupError);
    assert.match(reason.message, /closed the connection/);
    for (const cause of causes) assert.equal(cause, reason);
    assert.equal(client.state, 'closed');
    await assert.rejects(client.waitForEvent('STOP'), isCode('QMP_DISCONNECTED'));
  });
});

test('a buffered event is still found after the connection closed', async () => {
  await withClient(async (client, connection) => {
    connection.send(event('SHUTDOWN', { guest: false, reason: 'host-qmp-quit' }));
    connection.socket.end();
    assert.ok((await client.closed) instanceof Error);
    const shutdown = await client.waitForEvent('SHUTDOWN');
    assert.equal(shutdown.data['reason'], 'host-qmp-quit');
  });
});

test('close() is idempotent, fails pending calls, and resolves closed with undefined', async () => {
  await withClient(async (client, connection) => {
    const pending = client.execute('query-status');
    const waiter = client.waitForEvent('STOP');
    await connection.nextCommand();
    const outcomes = Promise.all([rejectsDisconnected(pending), rejectsDisconnected(waiter)]);
    await Promise.all([client.close(), client.close()]);
    await client.close();
    assert.deepEqual(await outcomes, [undefined, undefined]);
    assert.equal(await client.closed, undefined);
    assert.equal(client.state, 'closed');
    await connection.ended;
  });
});

test('execute after close throws QMP_STATE', async () => {
  await withClient(async (client) => {
    await client.close();
    await assert.rejects(client.execute('query-status'), isCode('QMP_STATE'));
    await assert.rejects(client.transaction([]), isCode('QMP_STATE'));
    await assert.rejects(client.humanMonitorCommand('info version'), isCode('QMP_STATE'));
  });
});

test('await using closes the client at scope exit', async () => {
  const peer = await FakeQmpPeer.start();
  try {
    let escaped: QmpClient | undefined;
    {
      await using client = await QmpClient.connect(peer.socketPath);
      escaped = client;
      assert.equal(client.state, 'ready');
    }
    assert.equal(escaped.state, 'closed');
    assert.equal(await escaped.closed, undefined);
  } finally {
    await peer.stop();
  }
});

test('connect fails with QMP_TIMEOUT when no greeting arrives', async () => {
  const peer = await FakeQmpPeer.start({ greeting: null });
  try {
    await assert.rejects(QmpClient.connect(peer.socketPath, { connectTimeoutMs: 50 }), isCode('QMP_TIMEOUT'));
  } finally {
    await peer.stop();
  }
});

test('connect fails with QMP_PROTOCOL on a bad greeting or on a reply before the greeting', async () => {
  const badGreetings = [
    'hello\n',
    '{"QMP": {"version": 7}}\n',
    '{"return": {}, "id": 1}\n',
    // A valid greeting followed at once by garbage must not leave connect hanging.
    `${JSON.stringify(GREETING)}\nhello\n`,
  ];
  for (const greeting of badGreetings) {
    const peer = await FakeQmpPeer.start({ greeting });
    try {
      await assert.rejects(QmpClient.connect(peer.socketPath), (err: unknown) => {
        assert.ok(err instanceof QmpProtocolError, `${greeting}: ${String(err)}`);
        return true;
      });
    } finally {
      await peer.stop();
    }
  }
});

test('an event left over from the previous client before the greeting is dropped, not fatal', async () => {
  const stale = JSON.stringify({ event: 'JOB_STATUS_CHANGE', data: { id: 'old', status: 'concluded' }, timestamp: { seconds: 1, microseconds: 0 } });
  const peer = await FakeQmpPeer.start({ greeting: `${stale}\n${JSON.stringify(GREETING)}\n` });
  try {
    const client = await QmpClient.connect(peer.socketPath);
    await assert.rejects(client.waitForEvent('JOB_STATUS_CHANGE', undefined, 50), isCode('QMP_TIMEOUT'));
    await client.close();
  } finally {
    await peer.stop();
  }
});

test('connect fails with QMP_ERROR when capabilities negotiation is refused', async () => {
  const peer = await FakeQmpPeer.start({ autoCapabilities: false });
  try {
    const connecting = QmpClient.connect(peer.socketPath);
    const connection = await peer.connection();
    const command = await connection.nextCommand();
    assert.equal(command.execute, 'qmp_capabilities');
    connection.send({ error: { class: 'CommandNotFound', desc: 'nope' }, id: command.id });
    await assert.rejects(connecting, (err: unknown) => err instanceof QmpCommandError && err.errorClass === 'CommandNotFound');
    await connection.ended;
  } finally {
    await peer.stop();
  }
});

test('connect fails with QMP_DISCONNECTED when nothing listens, keeping the cause', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'qmp-none-'));
  try {
    await assert.rejects(QmpClient.connect(join(dir, 'missing.sock')), (err: unknown) => {
      assert.ok(isQbackupError(err, 'QMP_DISCONNECTED'));
      assert.equal((err.cause as NodeJS.ErrnoException).code, 'ENOENT');
      return true;
    });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('invalid options and arguments are refused with INVALID_ARGUMENT', async () => {
  await assert.rejects(QmpClient.connect('/nonexistent', { connectTimeoutMs: 0 }), isCode('INVALID_ARGUMENT'));
  await assert.rejects(QmpClient.connect('/nonexistent', { maxLineBytes: -1 }), isCode('INVALID_ARGUMENT'));
  await withClient(async (client) => {
    await assert.rejects(client.execute('x', {}, { timeoutMs: -5 }), isCode('INVALID_ARGUMENT'));
    await assert.rejects(client.waitForEvent('X', undefined, 10, -1), isCode('INVALID_ARGUMENT'));
    assert.equal(client.state, 'ready');
  });
});
