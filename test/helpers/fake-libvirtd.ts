// Fake libvirt daemons on a unix socket, for what a real libvirtd cannot be
// made to do on this machine. FakeLibvirtServer owns the socket and the
// framing (each connection's bytes through our own frame parser, replies
// through our own encoder), and hands every whole message to its subclass.
// FakeLibvirtd answers as an old version: it speaks just enough of the RPC
// protocol for a client to connect (auth list with none, connect-open,
// connect-get-lib-version, connect-close) and lists no domains; any other
// call gets libvirt's "this function is not supported".

import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LIBVIRT, LibvirtFrameParser, PROCEDURES, encodeMessage, encodeXdr, remoteError, type LibvirtFrame, type LibvirtHeader, type LibvirtProtocolError } from '../../src/drivers/libvirt/index.js';

/** The reply message to `call` with the given body. */
export function replyMessage(call: LibvirtHeader, payload: Buffer, status: number = LIBVIRT.VIR_NET_OK): Buffer {
  return encodeMessage({ ...call, type: LIBVIRT.VIR_NET_REPLY, status }, payload);
}

/** The body of a VIR_NET_ERROR reply: libvirt's error `code` of error domain `domain` with its message. */
export function remoteErrorBody(code: number, message: string, domain: number): Buffer {
  return encodeXdr(remoteError, { code, domain, message, level: 2, dom: undefined, str1: undefined, str2: undefined, str3: undefined, int1: -1, int2: -1, net: undefined });
}

/** A unix-socket server speaking libvirt's framing; a subclass decides what each message gets. */
export abstract class FakeLibvirtServer {
  readonly dir = mkdtempSync(join(tmpdir(), 'qbt-fake-libvirtd-'));
  readonly path = join(this.dir, 'libvirt-sock');
  private readonly server: Server;
  private readonly sockets = new Set<Socket>();

  constructor() {
    chmodSync(this.dir, 0o755);
    this.server = createServer((socket) => {
      this.sockets.add(socket);
      socket.on('close', () => this.sockets.delete(socket));
      socket.on('error', () => undefined);
      const parser = new LibvirtFrameParser({
        onFrame: (frame) => this.onFrame(frame, socket),
        onError: (error) => this.onProtocolError(error, socket),
      });
      socket.on('data', (b: Buffer) => parser.push(b));
    });
  }

  /** A whole message from the client on `socket`. */
  protected abstract onFrame(frame: LibvirtFrame, socket: Socket): void;

  /** Bytes from the client that break the protocol: the connection is dropped. */
  protected onProtocolError(_error: LibvirtProtocolError, socket: Socket): void {
    socket.destroy();
  }

  /** The URI that reaches this daemon. */
  get uri(): string {
    return `qemu+unix:///system?socket=${this.path}`;
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

export class FakeLibvirtd extends FakeLibvirtServer {
  /** Procedure numbers of every call received, in order. */
  readonly calls: number[] = [];

  /** `version` as libvirt reports it: major * 1_000_000 + minor * 1000 + micro. */
  constructor(public version: number) {
    super();
  }

  protected override onFrame(frame: LibvirtFrame, socket: Socket): void {
    if (frame.header.type === LIBVIRT.VIR_NET_CALL) this.answer(socket, frame.header);
  }

  private answer(socket: Socket, call: LibvirtHeader): void {
    this.calls.push(call.procedure);
    const reply = (payload: Buffer, status: number = LIBVIRT.VIR_NET_OK): void => {
      socket.write(replyMessage(call, payload, status));
    };
    switch (call.procedure) {
      case LIBVIRT.REMOTE_PROC_AUTH_LIST:
        return reply(encodeXdr(PROCEDURES.authList.ret, { types: [LIBVIRT.REMOTE_AUTH_NONE] }));
      case LIBVIRT.REMOTE_PROC_CONNECT_OPEN:
      case LIBVIRT.REMOTE_PROC_CONNECT_CLOSE:
        return reply(Buffer.alloc(0));
      case LIBVIRT.REMOTE_PROC_CONNECT_GET_LIB_VERSION:
        return reply(encodeXdr(PROCEDURES.connectGetLibVersion.ret, { libVer: BigInt(this.version) }));
      case LIBVIRT.REMOTE_PROC_CONNECT_LIST_ALL_DOMAINS:
        return reply(encodeXdr(PROCEDURES.connectListAllDomains.ret, { domains: [], ret: 0 }));
      default:
        return reply(remoteErrorBody(LIBVIRT.VIR_ERR_NO_SUPPORT, 'this function is not supported by the connection driver', 0), LIBVIRT.VIR_NET_ERROR);
    }
  }
}
