// A small fake libvirt daemon on a unix socket, for what a real libvirtd
// cannot be made to do on this machine: answer as an old version. It speaks
// just enough of the RPC protocol for a client to connect (auth list with
// none, connect-open, connect-get-lib-version, connect-close) and lists no
// domains; any other call gets libvirt's "this function is not supported".

import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LIBVIRT, LibvirtFrameParser, PROCEDURES, XdrWriter, encodeMessage, remoteError, type LibvirtHeader, type XdrType } from '../../src/drivers/libvirt/index.js';

function body<T>(codec: XdrType<T>, value: T): Buffer {
  const w = new XdrWriter();
  codec.encode(w, value);
  return Buffer.from(w.finish());
}

export class FakeLibvirtd {
  readonly dir = mkdtempSync(join(tmpdir(), 'qbt-fake-libvirtd-'));
  readonly path = join(this.dir, 'libvirt-sock');
  /** Procedure numbers of every call received, in order. */
  readonly calls: number[] = [];
  private readonly server: Server;
  private readonly sockets = new Set<Socket>();

  /** `version` as libvirt reports it: major * 1_000_000 + minor * 1000 + micro. */
  constructor(public version: number) {
    chmodSync(this.dir, 0o755);
    this.server = createServer((socket) => {
      this.sockets.add(socket);
      socket.on('close', () => this.sockets.delete(socket));
      socket.on('error', () => undefined);
      const parser = new LibvirtFrameParser({
        onFrame: (frame) => {
          if (frame.header.type === LIBVIRT.VIR_NET_CALL) this.answer(socket, frame.header);
        },
        onError: () => socket.destroy(),
      });
      socket.on('data', (b: Buffer) => parser.push(b));
    });
  }

  /** The URI that reaches this daemon. */
  get uri(): string {
    return `qemu+unix:///system?socket=${this.path}`;
  }

  private answer(socket: Socket, call: LibvirtHeader): void {
    this.calls.push(call.procedure);
    const reply = (payload: Buffer, status: number = LIBVIRT.VIR_NET_OK): void => {
      socket.write(encodeMessage({ ...call, type: LIBVIRT.VIR_NET_REPLY, status }, payload));
    };
    switch (call.procedure) {
      case LIBVIRT.REMOTE_PROC_AUTH_LIST:
        return reply(body(PROCEDURES.authList.ret, { types: [LIBVIRT.REMOTE_AUTH_NONE] }));
      case LIBVIRT.REMOTE_PROC_CONNECT_OPEN:
      case LIBVIRT.REMOTE_PROC_CONNECT_CLOSE:
        return reply(Buffer.alloc(0));
      case LIBVIRT.REMOTE_PROC_CONNECT_GET_LIB_VERSION:
        return reply(body(PROCEDURES.connectGetLibVersion.ret, { libVer: BigInt(this.version) }));
      case LIBVIRT.REMOTE_PROC_CONNECT_LIST_ALL_DOMAINS:
        return reply(body(PROCEDURES.connectListAllDomains.ret, { domains: [], ret: 0 }));
      default: {
        const e = { code: LIBVIRT.VIR_ERR_NO_SUPPORT, domain: 0, message: 'this function is not supported by the connection driver', level: 2, dom: undefined, str1: undefined, str2: undefined, str3: undefined, int1: -1, int2: -1, net: undefined };
        return reply(body(remoteError, e), LIBVIRT.VIR_NET_ERROR);
      }
    }
  }

  listen(): Promise<void> {
    return new Promise((resolve) => this.server.listen(this.path, resolve));
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise((resolve) => this.server.close(resolve));
    rmSync(this.dir, { recursive: true, force: true });
  }
}
