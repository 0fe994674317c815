// The connection lifecycle shared by QmpClient and NbdConnection
// (src/util/connection.ts), on its own: forward-only states, pending tables
// with timeouts, and one idempotent shutdown that fails everything pending
// with the root cause. The clients' own tests cover it over real sockets.

import { AssertionError, strict as assert } from 'node:assert';
import { Socket } from 'node:net';
import { afterEach, describe, it, mock } from 'node:test';
import { isQbackupError, QbackupError } from '../../src/errors.js';
import { ConnectionLifecycle, PendingTable, checkTimeoutMs } from '../../src/util/connection.js';

type State = 'connecting' | 'ready' | 'closing' | 'closed';

interface Entry {
  name: string;
  reject: (error: Error) => void;
  rejected: Error[];
}

function entry(name: string): Entry {
  const rejected: Error[] = [];
  return { name, rejected, reject: (error) => rejected.push(error) };
}

function lifecycle(onShutdown?: (reason: Error | undefined) => void): ConnectionLifecycle<State> {
  return new ConnectionLifecycle<State>({
    socket: new Socket(),
    states: ['connecting', 'ready', 'closing', 'closed'],
    address: 'unix:/test.sock',
    connectionName: 'connection to unix:/test.sock',
    stateCode: 'NBD_STATE',
    disconnectedCode: 'NBD_DISCONNECTED',
    details: { exportName: 'e' },
    ...(onShutdown === undefined ? {} : { onShutdown }),
  });
}

describe('ConnectionLifecycle', () => {
  it('moves only forward, and only shutdown enters the closed state', () => {
    const c = lifecycle();
    assert.equal(c.state, 'connecting');
    c.advance('ready');
    assert.equal(c.is('ready'), true);
    assert.throws(() => c.advance('connecting'), AssertionError);
    assert.throws(() => c.advance('ready'), AssertionError);
    assert.throws(() => c.advance('closed'), AssertionError);
    const error = c.stateError('NBD_CMD_READ not sent', { command: 'read' });
    assert.equal(error.code, 'NBD_STATE');
    assert.equal(error.message, 'NBD_CMD_READ not sent: the connection to unix:/test.sock is ready');
    assert.deepEqual(error.details, { exportName: 'e', command: 'read', state: 'ready' });
  });

  it('shuts down once: the first reason wins and every tracked entry fails with it as the cause', async () => {
    const hooks: Array<Error | undefined> = [];
    const c = lifecycle((reason) => hooks.push(reason));
    const table = c.track(new PendingTable({ describe: (e: Entry) => `${e.name} got no reply` }));
    const a = entry('a');
    const b = entry('b');
    table.add(1, a, undefined, () => new Error('unused'));
    table.add(2, b, 0, () => new Error('unused'));
    const root = new Error('peer vanished');
    assert.equal(c.shutdown(root), true);
    assert.equal(c.shutdown(new Error('later')), false);
    assert.equal(c.state, 'closed');
    assert.deepEqual(hooks, [root]);
    assert.equal(table.size, 0);
    for (const e of [a, b]) {
      assert.equal(e.rejected.length, 1);
      const err = e.rejected[0];
      assert.ok(isQbackupError(err, 'NBD_DISCONNECTED'));
      assert.equal(err.message, `${e.name} got no reply: connection to unix:/test.sock lost: peer vanished`);
      assert.equal(err.cause, root);
    }
    assert.equal(await c.closed, root);
    await c.socketClosed;
  });

  it('calls a clean close a close, and runs a graceful close only once', async () => {
    const c = lifecycle();
    let runs = 0;
    const close = (): Promise<void> =>
      c.closeOnce(async () => {
        runs++;
        c.shutdown(undefined);
        await c.socketClosed;
      });
    await Promise.all([close(), close()]);
    await close();
    assert.equal(runs, 1);
    assert.equal(await c.closed, undefined);
    assert.equal(c.disconnectedError('x').message, 'x: the connection to unix:/test.sock was closed');
  });
});

describe('PendingTable', () => {
  afterEach(() => mock.timers.reset());

  it('times an entry out once, removes it, and reports the timeout to its owner', () => {
    mock.timers.enable({ apis: ['setTimeout'] });
    const seen: Error[] = [];
    const table = new PendingTable({ describe: (e: Entry) => e.name, afterTimeout: (error) => seen.push(error) });
    const slow = entry('slow');
    const fast = entry('fast');
    table.add('s', slow, 100, (e) => new QbackupError('NBD_TIMEOUT', `${e.name} timed out`));
    table.add('f', fast, 100, () => new Error('unused'));
    assert.equal(table.take('f'), fast, 'a reply stops the timer');
    mock.timers.tick(100);
    assert.equal(table.has('s'), false);
    assert.deepEqual(slow.rejected.map((e) => e.message), ['slow timed out']);
    assert.deepEqual(seen, slow.rejected);
    assert.deepEqual(fast.rejected, []);
    assert.equal(table.take('s'), undefined, 'a late reply finds nothing');
    table.add('f', fast, undefined, () => new Error('unused'));
    assert.throws(() => table.add('f', fast, undefined, () => new Error('unused')), AssertionError, 'a key in use is a bug');
  });
});

describe('checkTimeoutMs', () => {
  it('accepts positive numbers and Infinity, 0 only where it means none', () => {
    assert.equal(checkTimeoutMs('t', undefined), undefined);
    assert.equal(checkTimeoutMs('t', 5), 5);
    assert.equal(checkTimeoutMs('t', Infinity), Infinity);
    assert.equal(checkTimeoutMs('t', 0, { allowZero: true }), 0);
    for (const bad of [0, -1, Number.NaN]) assert.throws(() => checkTimeoutMs('t', bad), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT'));
    assert.throws(() => checkTimeoutMs('t', -1, { allowZero: true }), /non-negative number of milliseconds \(0 for none\), got -1/);
  });
});
