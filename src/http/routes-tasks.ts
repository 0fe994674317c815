// Task and schedule endpoints: list and show tasks, follow one as
// server-sent events (a `task` event with the whole task on every change of
// state, progress or log, ending after the final state), cancel; list, add,
// change, pause, resume, run now and remove schedules.

import type { FastifyInstance } from 'fastify';
import type { QbackupService } from '../service/daemon-service.js';
import type { ScheduleSpec } from '../service/schedules.js';
import type { TaskEvent, TaskInfo } from '../service/tasks.js';
import { addRoute, bool, int, object, str } from './route.js';

const taskParams = object({ id: str({ maxLength: 64 }) }, ['id']);
type IdParams = { id: string };

export function taskRoutes(app: FastifyInstance, service: QbackupService): void {
  const tasks = service.tasks;
  const tag = 'tasks';
  addRoute<unknown, { limit?: string }, unknown>(app, service, {
    method: 'GET', url: '/api/tasks', tag, summary: 'Recent tasks, newest first (?limit=, default 100)',
    query: object({ limit: str({ pattern: '^[0-9]{1,3}$' }) }),
    handler: ({ query }) => tasks.list(query.limit !== undefined ? Math.max(1, Number(query.limit)) : 100),
  });
  addRoute<IdParams, unknown, unknown>(app, service, {
    method: 'GET', url: '/api/tasks/:id', tag, params: taskParams, summary: 'A task: state, progress (bytes done and total, rate), log lines, result or error',
    handler: ({ params }) => tasks.get(params.id),
  });
  addRoute<IdParams, unknown, unknown>(app, service, {
    method: 'DELETE', url: '/api/tasks/:id', tag, params: taskParams,
    summary: 'Cancel a task: a queued one at once; a running one only if it can stop mid-way (else 409 TASK_NOT_CANCELLABLE)',
    handler: ({ params }) => tasks.cancel(params.id),
  });
  addRoute<IdParams, unknown, unknown>(app, service, {
    method: 'GET', url: '/api/tasks/:id/events', tag, params: taskParams, summary: 'Server-sent events: a "task" event with the task on every change, until it ends',
    handler: ({ params, reply }) => {
      const first = tasks.get(params.id);
      reply.hijack();
      const res = reply.raw;
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-accel-buffering': 'no' });
      const send = (task: TaskInfo): void => {
        res.write(`event: task\ndata: ${JSON.stringify(task)}\n\n`);
      };
      send(first);
      if (first.endedMs !== null) {
        res.end();
        return;
      }
      const heartbeat = setInterval(() => res.write(': keep-alive\n\n'), 15_000);
      const stop = (): void => {
        clearInterval(heartbeat);
        unsubscribe();
        if (!res.writableEnded) res.end();
      };
      const unsubscribe = tasks.subscribe((e: TaskEvent) => {
        if (e.task.id !== params.id) return;
        send(e.task);
        if (e.task.endedMs !== null) stop();
      });
      // the response closes when the client goes away (or after end())
      res.on('close', stop);
    },
  });
  scheduleRoutes(app, service);
}

function scheduleRoutes(app: FastifyInstance, service: QbackupService): void {
  const tag = 'schedules';
  const retention = object({ keepLast: int(1), keepHourly: int(1), keepDaily: int(1), keepWeekly: int(1), keepMonthly: int(1), keepYearly: int(1) });
  addRoute(app, service, {
    method: 'GET', url: '/api/schedules', tag, summary: 'Backup schedules with their next run',
    handler: () => service.schedules.list(),
  });
  const spec = object(
    { action: { type: 'string', enum: ['backup', 'verify', 'gc', 'copy'] }, domain: str({ maxLength: 256 }), connection: str({ maxLength: 1024 }), when: str({ maxLength: 128 }), repo: str({ minLength: 1 }), passwordFile: str(), to: str({ minLength: 1 }), toPasswordFile: str(), retention, full: bool, readDataPercent: { type: 'number' } },
    ['when', 'repo'],
  );
  // repo and to: a configured name or a location, stored as the location (refused when the configuration does not allow it);
  // connection: a configured name or a URI, stored as the URI.
  const resolve = (body: ScheduleSpec): ScheduleSpec => ({
    ...body,
    repo: service.location(body.repo),
    ...(body.to !== undefined ? { to: service.location(body.to) } : {}),
    ...(body.connection !== undefined ? { connection: service.connectionUri(body.connection) } : {}),
  });
  addRoute<unknown, unknown, ScheduleSpec>(app, service, {
    method: 'POST', url: '/api/schedules', tag, status: 201,
    summary: 'Add a schedule: action (backup, verify, gc or copy), domain, connection (backup: a configured name or a URI; default the daemon\'s), when (cron or "daily 02:00", "weekly sun 03:00", "hourly :15"), repo (a configured name or a location), retention and full (backup), readDataPercent (verify), to and toPasswordFile (copy: the target), passwordFile',
    body: spec,
    handler: ({ body }) => service.schedules.add(resolve(body)),
  });
  addRoute<IdParams, unknown, ScheduleSpec>(app, service, {
    method: 'PUT', url: '/api/schedules/:id', tag, params: taskParams,
    summary: 'Change a schedule: the same fields as when adding it, all given again (its id, last run and paused state stay); one from the configuration file is changed there (409)',
    body: spec,
    handler: ({ params, body }) => service.schedules.update(params.id, resolve(body)),
  });
  addRoute<IdParams, unknown, unknown>(app, service, {
    method: 'POST', url: '/api/schedules/:id/pause', tag, params: taskParams, summary: 'Pause a schedule: it does not run until resumed',
    handler: ({ params }) => service.schedules.setPaused(params.id, true),
  });
  addRoute<IdParams, unknown, unknown>(app, service, {
    method: 'POST', url: '/api/schedules/:id/resume', tag, params: taskParams, summary: 'Resume a schedule: it runs at its next time after now (runs missed while paused are not made up)',
    handler: ({ params }) => service.schedules.setPaused(params.id, false),
  });
  addRoute<IdParams, unknown, unknown>(app, service, {
    method: 'POST', url: '/api/schedules/:id/run', tag, params: taskParams, status: 202, summary: 'Run a schedule now (paused or not; its next run stays); returns the task',
    handler: ({ params, who }) => service.runScheduleNow(params.id, who),
  });
  addRoute<IdParams, unknown, unknown>(app, service, {
    method: 'GET', url: '/api/schedules/:id', tag, params: taskParams, summary: 'A schedule',
    handler: ({ params }) => service.schedules.get(params.id),
  });
  addRoute<IdParams, unknown, unknown>(app, service, {
    method: 'DELETE', url: '/api/schedules/:id', tag, params: taskParams, summary: 'Remove a schedule (its backups stay)',
    handler: ({ params }) => {
      service.schedules.remove(params.id);
      return { id: params.id, removed: true };
    },
  });
}
