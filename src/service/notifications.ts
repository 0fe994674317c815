// Telling people what happened without their asking: when a task ends
// (failed always, succeeded when a target asks for it) each notification
// target of the configuration gets it — a webhook as a JSON POST (retried
// with growing pauses), an email through the local sendmail (Debian's
// interface to whatever MTA is installed) — and a schedule's dead man's
// switch URL is fetched (healthchecks style: the URL on success, URL/fail on
// failure), so silence itself raises the alarm when the daemon stops.
//
// Invariants: a notification never fails the task nor throws into the
// caller (a target that cannot be reached is logged); a message carries the
// task's error sentence, never a passphrase (the library's messages name
// objects, not secrets); URLs are logged masked.

import { spawn } from 'node:child_process';
import { hostname } from 'node:os';
import type { NotificationTarget, NotifyOn } from '../config/config.js';
import { maskUrl } from '../config/show.js';
import { describeError } from '../errors.js';
import { silentLogger, type Logger } from '../util/operation.js';

/** What ended, as the notifications tell it. */
export interface Outcome {
  event: NotifyOn;
  taskId: string | null;
  kind: string;
  domain: string | null;
  /** The configured schedule's name (or a schedule id), when a schedule started it. */
  schedule: string | null;
  repository: string | null;
  message: string;
  timeMs: number;
}

export interface NotifierOptions {
  logger?: Logger | undefined;
  /** Pause before the first retry of a webhook; doubles each time (default 2 s). */
  retryDelayMs?: number | undefined;
  /** Time allowed for one HTTP request (default 10 s). */
  requestTimeoutMs?: number | undefined;
}

export class Notifier {
  private readonly logger: Logger;
  private readonly pending = new Set<Promise<void>>();

  constructor(
    private readonly targets: () => readonly NotificationTarget[],
    private readonly options: NotifierOptions = {},
  ) {
    this.logger = options.logger ?? silentLogger;
  }

  /** Sends `outcome` to the targets that want its kind (only those named in `only`, when given); resolves when all are done. */
  notify(outcome: Outcome, only?: readonly string[]): Promise<void> {
    const chosen = this.targets().filter((t) => t.on.includes(outcome.event) && (only === undefined || only.includes(t.name)));
    return this.track(Promise.all(chosen.map((t) => this.send(t, outcome))).then(() => undefined));
  }

  /** Fetches a dead man's switch URL: as given after a success, with /fail appended after a failure. */
  ping(url: string, ok: boolean, schedule: string): Promise<void> {
    const target = ok ? url : `${url.replace(/\/+$/, '')}/fail`;
    return this.track(
      this.request(target, { method: 'GET' }).then(
        () => this.logger.log({ level: 'info', msg: 'ping sent', fields: { schedule, url: maskUrl(target), ok } }),
        (err: unknown) => this.logger.log({ level: 'warn', msg: 'ping failed', fields: { schedule, url: maskUrl(target), error: describeError(err) } }),
      ),
    );
  }

  /** Resolves when every notification under way has been sent or given up. */
  async idle(): Promise<void> {
    while (this.pending.size > 0) await Promise.all([...this.pending]);
  }

  private track(p: Promise<void>): Promise<void> {
    this.pending.add(p);
    void p.finally(() => this.pending.delete(p));
    return p;
  }

  private async send(t: NotificationTarget, o: Outcome): Promise<void> {
    try {
      if (t.webhook !== undefined) await this.webhook(t, t.webhook, o);
      if (t.email !== undefined) await sendmail(t.sendmail ?? '/usr/sbin/sendmail', t.email, o);
      this.logger.log({ level: 'info', msg: 'notification sent', fields: { target: t.name, event: o.event, task: o.taskId, schedule: o.schedule } });
    } catch (err) {
      this.logger.log({ level: 'error', msg: 'notification failed', fields: { target: t.name, event: o.event, task: o.taskId, error: describeError(err) } });
    }
  }

  private async webhook(t: NotificationTarget, url: string, o: Outcome): Promise<void> {
    const body = JSON.stringify({ source: 'qbackup', host: hostname(), ...o, time: new Date(o.timeMs).toISOString() });
    const attempts = 1 + (t.retries ?? 3);
    let delay = this.options.retryDelayMs ?? 2000;
    for (let attempt = 1; ; attempt++) {
      try {
        await this.request(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
        return;
      } catch (err) {
        if (attempt >= attempts) throw new Error(`webhook ${maskUrl(url)} failed ${attempts} time(s); last: ${describeError(err)}`);
        await new Promise((r) => setTimeout(r, delay));
        delay *= 2;
      }
    }
  }

  private async request(url: string, init: RequestInit): Promise<void> {
    const res = await fetch(url, { ...init, signal: AbortSignal.timeout(this.options.requestTimeoutMs ?? 10_000) });
    await res.arrayBuffer();
    if (!res.ok) throw new Error(`HTTP status ${res.status}`);
  }
}

/** One message through sendmail -t (the recipients come from the headers). */
function sendmail(program: string, to: string, o: Outcome): Promise<void> {
  const subject = `qbackup: ${o.kind}${o.domain !== null ? ` of ${o.domain}` : ''} ${o.event === 'failure' ? 'FAILED' : 'succeeded'}${o.schedule !== null ? ` (schedule ${o.schedule})` : ''}`;
  const lines = [
    `To: ${to}`,
    `Subject: ${subject.replace(/[\r\n]/g, ' ')}`,
    'Content-Type: text/plain; charset=utf-8',
    'Auto-Submitted: auto-generated',
    '',
    o.message,
    '',
    `Host:       ${hostname()}`,
    `Task:       ${o.taskId ?? '-'}`,
    `Schedule:   ${o.schedule ?? '-'}`,
    `Repository: ${o.repository ?? '-'}`,
    `Time:       ${new Date(o.timeMs).toISOString()}`,
    '',
  ];
  return new Promise((resolve, reject) => {
    const child = spawn(program, ['-t', '-oi'], { stdio: ['pipe', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (b: Buffer) => (stderr = (stderr + b.toString()).slice(-500)));
    child.on('error', (err) => reject(new Error(`cannot run ${program}: ${describeError(err)}`)));
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`${program} exited with status ${String(code)}${stderr !== '' ? `: ${stderr.trim()}` : ''}`))));
    child.stdin.on('error', () => undefined);
    child.stdin.end(lines.join('\n'));
  });
}
