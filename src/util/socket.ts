// Whether a unix socket accepts connections yet. A server creates the socket
// file at bind(), before listen(), so the file existing is not enough.

import { connect } from 'node:net';

export function socketAccepts(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}
