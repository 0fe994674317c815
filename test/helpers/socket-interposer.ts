// A stand-in at a unix socket's path (QEMU's monitor socket, say): the real
// socket is moved aside to PATH.real and a server listens at PATH, handing
// each connection, with a new connection to the real socket, to a relay that
// passes (or holds, or drops) what goes between them. The code under test
// sees a real socket. remove() closes the stand-in and every connection and
// puts the real socket back.

import { renameSync, rmSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';

export class SocketInterposer {
  private readonly sockets = new Set<Socket>();

  private constructor(
    readonly path: string,
    private readonly server: Server,
  ) {}

  /** Interposes at `path`; `relay` gets each client and its own connection to the real socket. */
  static async install(path: string, relay: (client: Socket, upstream: Socket) => void): Promise<SocketInterposer> {
    renameSync(path, `${path}.real`);
    const server = createServer();
    const interposer = new SocketInterposer(path, server);
    server.on('connection', (client) => {
      const upstream = createConnection({ path: `${path}.real` });
      interposer.sockets.add(client).add(upstream);
      relay(client, upstream);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, resolve);
    });
    return interposer;
  }

  async remove(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    rmSync(this.path, { force: true });
    renameSync(`${this.path}.real`, this.path);
  }
}
