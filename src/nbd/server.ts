// qbackup's NBD server: read-only exports on a unix socket or TCP, each
// client a session (server-session.ts) over its socket, optionally upgraded
// to TLS by NBD_OPT_STARTTLS with x509 credentials laid out as QEMU and
// libvirt keep them (ca-cert.pem, server-cert.pem, server-key.pem).
//
// Invariants:
// - A client can only hurt its own connection: a protocol violation, a
//   failed read, a disconnect mid-reply or a TLS failure close or answer
//   that client; the server and every other client go on.
// - With TLS, client certificates are required and checked against the CA
//   (QEMU's default, verify-peer), and nothing is served in clear text.
// - A unix socket is made 0600 as soon as it exists; the caller puts it in
//   a directory only its owner can enter, so there is no window.
// - close() is idempotent: it stops listening, hangs up every client and
//   removes the socket file.

import { formatNbdUri } from './uri.js';
import { readFileSync } from 'node:fs';
import { chmod, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { createSecureContext, createServer as createTlsServer, type TLSSocket } from 'node:tls';
import { QbackupError } from '../errors.js';
import { assert } from '../util/assert.js';
import { encodeServerGreeting as encodeGreeting } from './server-codec.js';
import { ByteBudget, NbdServerSession, type NbdServerExport, type NbdSessionTransport } from './server-session.js';

export type NbdListen = { transport: 'unix'; socket: string } | { transport: 'tcp'; host: string; port: number };

/** x509 credentials for STARTTLS. */
export interface NbdTlsCredentials {
  /** The directory they came from (for messages). */
  dir: string;
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
}

export interface NbdServerOptions {
  exports: readonly NbdServerExport[];
  listen: NbdListen;
  /** TLS credentials: STARTTLS is then offered and required. */
  tls?: NbdTlsCredentials;
  /** One line per noteworthy event (a failed read, a dropped client). */
  log?: (line: string) => void;
  /** Clients at once; more are refused at accept. Default 64. */
  maxConnections?: number;
  /** How long a client may take from connecting to its first request phase. Default 30 s. */
  handshakeTimeoutMs?: number;
  /** Bytes of reads served at once over all clients. Default 256 MiB. */
  readBudgetBytes?: number;
}

const DEFAULT_MAX_CONNECTIONS = 64;
const DEFAULT_HANDSHAKE_TIMEOUT_MS = 30_000;
const DEFAULT_READ_BUDGET_BYTES = 256 * 1024 * 1024;
/** sun_path holds 108 bytes with the terminating NUL. */
const MAX_SOCKET_PATH_BYTES = 107;
/** After we hang up, how long the peer gets to read our last bytes before the socket is destroyed. */
const LINGER_MS = 2_000;

/** Reads ca-cert.pem, server-cert.pem and server-key.pem from `dir`. */
export function loadTlsCredentials(dir: string): NbdTlsCredentials {
  const read = (name: string): Buffer => {
    try {
      return readFileSync(join(dir, name));
    } catch (err) {
      throw new QbackupError('INVALID_ARGUMENT', `Cannot use TLS certificate directory "${dir}": cannot read ${name} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, { cause: err });
    }
  };
  const creds = { dir, ca: read('ca-cert.pem'), cert: read('server-cert.pem'), key: read('server-key.pem') };
  try {
    createSecureContext({ ca: creds.ca, cert: creds.cert, key: creds.key }); // refuses a key that does not fit its certificate, or bad PEM
    return creds;
  } catch (err) {
    if (err instanceof QbackupError) throw err;
    throw new QbackupError('INVALID_ARGUMENT', `Cannot use TLS certificate directory "${dir}": ${(err as Error).message}`, { cause: err });
  }
}

/** `nbd+unix:///NAME?socket=PATH`, `nbd://HOST:PORT/NAME`, or `nbds://…` with TLS. */
/** The URI of one export of a server listening at `listen` (src/nbd/uri.ts spells it). */
export function listenUri(listen: NbdListen, exportName: string, tls: boolean): string {
  const address = listen.transport === 'unix' ? { socket: listen.socket } : { host: listen.host, port: listen.port };
  return formatNbdUri({ address, exportName, tls });
}

export class NbdServer implements AsyncDisposable {
  /** Where the server listens (a TCP port of 0 is replaced by the real one). */
  readonly listen: NbdListen;
  readonly exports: ReadonlyMap<string, NbdServerExport>;
  readonly tls: boolean;
  private readonly sessions = new Set<NbdServerSession>();
  private readonly budget: ByteBudget;
  private closing: Promise<void> | undefined;

  private constructor(
    private readonly server: Server,
    listen: NbdListen,
    private readonly options: NbdServerOptions,
  ) {
    this.listen = listen;
    this.exports = new Map(options.exports.map((e) => [e.name, e]));
    this.tls = options.tls !== undefined;
    this.budget = new ByteBudget(options.readBudgetBytes ?? DEFAULT_READ_BUDGET_BYTES);
    server.on('connection', (socket) => this.accept(socket));
    server.on('error', (err) => this.log(`NBD server error: ${err.message}`));
  }

  /** Starts listening; the socket (or port) accepts clients when this resolves. */
  static async start(options: NbdServerOptions): Promise<NbdServer> {
    const names = new Set<string>();
    for (const e of options.exports) {
      assert(!names.has(e.name), `export names must be unique ("${e.name}")`);
      names.add(e.name);
    }
    if (options.listen.transport === 'unix' && Buffer.byteLength(options.listen.socket) > MAX_SOCKET_PATH_BYTES) {
      throw new QbackupError('INVALID_ARGUMENT', `Cannot serve NBD on socket "${options.listen.socket}": the path is ${Buffer.byteLength(options.listen.socket)} bytes long, and a unix socket path may have at most ${MAX_SOCKET_PATH_BYTES}`);
    }
    const server = createServer({ pauseOnConnect: false, noDelay: true });
    server.maxConnections = options.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
    const listen = options.listen;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      const done = (): void => {
        server.off('error', reject);
        resolve();
      };
      if (listen.transport === 'unix') server.listen(listen.socket, done);
      else server.listen({ host: listen.host, port: listen.port }, done);
    }).catch((err: NodeJS.ErrnoException) => {
      const where = listen.transport === 'unix' ? `socket "${listen.socket}"` : `${listen.host}:${listen.port}`;
      throw new QbackupError('INVALID_ARGUMENT', `Cannot serve NBD on ${where}: ${err.code ?? err.message}`, { cause: err });
    });
    let actual = listen;
    if (listen.transport === 'unix') {
      await chmod(listen.socket, 0o600);
    } else {
      const address = server.address();
      assert(address !== null && typeof address === 'object', 'a TCP server has an address');
      actual = { transport: 'tcp', host: listen.host, port: address.port };
    }
    return new NbdServer(server, actual, options);
  }

  /** URI of an export for nbdinfo, nbdcopy, qemu-img. */
  uri(exportName: string): string {
    return listenUri(this.listen, exportName, this.tls);
  }

  /** Clients connected now. */
  get clientCount(): number {
    return this.sessions.size;
  }

  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  private async shutdown(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of [...this.sessions]) s.close();
    await closed;
    if (this.listen.transport === 'unix') await rm(this.listen.socket, { force: true });
  }

  private log(line: string): void {
    this.options.log?.(line);
  }

  private accept(raw: Socket): void {
    if (this.closing !== undefined) {
      raw.destroy();
      return;
    }
    const peer = raw.remoteAddress !== undefined ? `${raw.remoteAddress}:${raw.remotePort ?? 0}` : 'on the unix socket';
    let stream: Socket = raw;
    let ended = false;
    const hangUp = (): void => {
      if (ended) return;
      ended = true;
      stream.end();
      setTimeout(() => {
        stream.destroy();
        raw.destroy();
      }, LINGER_MS).unref();
    };
    const transport: NbdSessionTransport = {
      write: (bytes, done) => {
        if (ended || stream.destroyed) {
          done?.();
          return true;
        }
        stream.cork();
        let ok = true;
        // Writes complete in order (or all fail when the stream dies): the last one's callback says every buffer was let go.
        for (const [i, b] of bytes.entries()) ok = i === bytes.length - 1 && done !== undefined ? stream.write(b, () => done()) : stream.write(b);
        if (bytes.length === 0) done?.();
        stream.uncork();
        return ok;
      },
      flow: (on) => (on ? stream.resume() : stream.pause()),
      startTls: () => {
        this.upgrade(raw, session, (secure) => {
          stream = secure;
        });
      },
      close: hangUp,
      log: (line) => this.log(line),
    };
    const session = new NbdServerSession({ exports: this.exports, tls: this.tls, transport, peer, budget: this.budget });
    this.sessions.add(session);
    const timer = setTimeout(() => {
      if (session.state !== 'transmission' && session.state !== 'draining' && session.state !== 'closed') {
        this.log(`NBD client ${peer} dropped: no export chosen within the handshake timeout`);
        session.close();
      }
    }, this.options.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS);
    timer.unref();
    raw.on('data', (b: Buffer) => session.push(b));
    raw.on('drain', () => session.drained());
    // A client that vanishes mid-reply is an ordinary event, not a server failure.
    raw.on('error', () => session.close());
    raw.on('close', () => {
      clearTimeout(timer);
      session.close();
      this.sessions.delete(session);
    });
    raw.write(encodeGreeting());
  }

  /**
   * Hands the raw socket to a TLS server after STARTTLS (a tls.Server, not a
   * bare TLSSocket, because only the server checks the client's certificate
   * against the CA and refuses it); the session resumes once it checks out.
   */
  private upgrade(raw: Socket, session: NbdServerSession, attach: (secure: TLSSocket) => void): void {
    const tls = this.options.tls;
    assert(tls !== undefined, 'STARTTLS is acknowledged only when TLS is configured');
    raw.removeAllListeners('data');
    raw.removeAllListeners('drain');
    const handshake = createTlsServer({ ca: tls.ca, cert: tls.cert, key: tls.key, requestCert: true, rejectUnauthorized: true });
    handshake.on('secureConnection', (secure: TLSSocket) => {
      secure.on('data', (b: Buffer) => session.push(b));
      secure.on('drain', () => session.drained());
      secure.on('error', () => session.close());
      attach(secure);
      session.tlsReady();
    });
    handshake.on('tlsClientError', (err) => {
      this.log(`NBD client dropped: TLS handshake failed: ${err.message}`);
      session.close();
      raw.destroy();
    });
    handshake.emit('connection', raw);
  }
}
