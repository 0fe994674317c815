// A fault for the oracle: a dropped QMP connection. QEMU's monitor socket is
// moved aside and a proxy listens at its path, passing lines both ways, until
// the `at`-th command from qbackup that changes something (counted over
// every connection; handshakes and queries pass): then it
// closes both sides, either before the command reaches QEMU or after QEMU
// answered it (so the command ran but qbackup never hears). Later connections
// pass through untouched. remove() puts QEMU's socket back.
//
// The library is not changed for this: it sees a real socket closing under it.

import type { Socket } from 'node:net';
import { SocketInterposer } from '../helpers/socket-interposer.js';

/** Commands that change nothing are passed and not counted, so `at` lands on the ones that matter. */
const READ_ONLY = /^(qmp_capabilities|query-)/;

export interface DropPlan {
  at: number;
  when: 'before' | 'after';
}

export class QmpDropProxy {
  /** The command the connection was dropped at, once it was. */
  dropped: string | undefined;
  private commands = 0;
  private interposer: SocketInterposer | undefined;

  private constructor(private readonly plan: DropPlan) {}

  static async install(path: string, plan: DropPlan): Promise<QmpDropProxy> {
    const proxy = new QmpDropProxy(plan);
    proxy.interposer = await SocketInterposer.install(path, (client, upstream) => proxy.relay(client, upstream));
    return proxy;
  }

  private relay(client: Socket, upstream: Socket): void {
    let dropping = false;
    let fromClient = '';
    let fromQemu = '';
    const drop = (): void => {
      client.destroy();
      upstream.destroy();
    };
    client.on('data', (chunk) => {
      if (dropping) return;
      fromClient += chunk.toString('utf8');
      for (let nl = fromClient.indexOf('\n'); nl >= 0; nl = fromClient.indexOf('\n')) {
        const line = fromClient.slice(0, nl + 1);
        fromClient = fromClient.slice(nl + 1);
        const command = /"execute"\s*:\s*"([^"]+)"/.exec(line)?.[1];
        if (this.dropped === undefined && command !== undefined && !READ_ONLY.test(command) && ++this.commands === this.plan.at) {
          this.dropped = command;
          dropping = true;
          if (this.plan.when === 'before') return drop();
          upstream.write(line);
          return; // closed when QEMU's answer arrives
        }
        upstream.write(line);
      }
    });
    upstream.on('data', (chunk) => {
      if (!dropping) {
        client.write(chunk);
        return;
      }
      fromQemu += chunk.toString('utf8');
      if (fromQemu.split('\n').some((l) => /"(return|error)"/.test(l))) drop();
    });
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
    client.on('error', () => undefined);
    upstream.on('error', () => undefined);
  }

  async remove(): Promise<void> {
    await this.interposer?.remove();
  }
}
