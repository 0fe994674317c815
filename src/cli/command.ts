// The shape of a CLI command: one short definition (name, description,
// arguments, options, run) that registerCommands turns into commander calls.
// Arguments and options are records whose keys are the names commander gives
// their values (asserted at registration), so `run` receives typed values:
// `<x>` is a string, `[x]` a string or undefined, `<x...>` a string array,
// a flag a boolean. Checks of what a user typed (a bad --mode, an unreadable
// file) belong in `run`, inside the error reporting of CliContext; a
// definition that does not match commander is a bug and fails an assertion.

import assert from 'node:assert/strict';
import { Command } from 'commander';
import type { Qbackup } from '../qbackup.js';
import type { CliContext, CommandEnv } from './context.js';
import type { OutputOptions } from './output.js';

/** A positional argument: its commander syntax and how to read commander's value. */
export interface ArgumentSpec<T> {
  readonly syntax: string;
  readonly description?: string;
  read(raw: unknown): T;
}

/** An option: its commander flags and how to read commander's value. */
export interface OptionSpec<T> {
  readonly flags: string;
  readonly description: string;
  readonly mandatory?: boolean;
  readonly defaultValue?: string;
  readonly repeatable?: boolean;
  read(raw: unknown): T;
}

type Specs<T> = Readonly<Record<string, T>>;
type NoSpecs = Readonly<Record<never, never>>;
type ValuesOf<S> = { [K in keyof S]: S[K] extends { read(raw: unknown): infer T } ? T : never };

export interface RunInput<A, O> {
  qb: Qbackup;
  out: OutputOptions;
  /** The environment main() was handed, the configuration and the credentials built from them. */
  cli: CommandEnv;
  args: ValuesOf<A>;
  opts: ValuesOf<O>;
}

export interface CommandDefinition<A extends Specs<ArgumentSpec<unknown>>, O extends Specs<OptionSpec<unknown>>> {
  readonly name: string;
  readonly description: string;
  /** Left out of help (commands for scripts, such as the completion helper). */
  readonly hidden?: boolean;
  /** In command-line order. */
  readonly args?: A;
  /** In the order help lists them. */
  readonly options?: O;
  run(input: RunInput<A, O>): Promise<void>;
}

/** A definition with its value types erased, so definitions of any shape share one list. */
export interface CliCommand {
  readonly name: string;
  register(program: Command, cli: CliContext): void;
}

export function defineCommand<A extends Specs<ArgumentSpec<unknown>> = NoSpecs, O extends Specs<OptionSpec<unknown>> = NoSpecs>(
  def: CommandDefinition<A, O>,
): CliCommand {
  return { name: def.name, register: (program, cli) => register(program, cli, def) };
}

export function registerCommands(program: Command, cli: CliContext, commands: readonly CliCommand[]): void {
  for (const c of commands) c.register(program, cli);
}

function register<A extends Specs<ArgumentSpec<unknown>>, O extends Specs<OptionSpec<unknown>>>(
  program: Command,
  cli: CliContext,
  def: CommandDefinition<A, O>,
): void {
  const cmd = program.command(def.name, { hidden: def.hidden ?? false }).description(def.description);
  const argKeys = Object.keys(def.args ?? {});
  for (const [key, spec] of Object.entries<ArgumentSpec<unknown>>(def.args ?? {})) {
    const arg = cmd.createArgument(spec.syntax, spec.description);
    assert.equal(arg.name(), key, `argument ${spec.syntax} of command ${def.name} must be keyed "${arg.name()}"`);
    cmd.addArgument(arg);
  }
  for (const [key, spec] of Object.entries<OptionSpec<unknown>>(def.options ?? {})) {
    const option = cmd.createOption(spec.flags, spec.description).makeOptionMandatory(spec.mandatory ?? false);
    if (spec.repeatable) option.default([]).argParser(collect);
    else option.default(spec.defaultValue);
    assert.equal(option.attributeName(), key, `option ${spec.flags} of command ${def.name} must be keyed "${option.attributeName()}"`);
    cmd.addOption(option);
  }
  // commander calls the action with the arguments, the options and the command.
  cmd.action(async (...params: unknown[]) => {
    const self = params.at(-1);
    assert.ok(self instanceof Command, 'commander passes the command last');
    await cli.run(self, async (qb, out, ce) => {
      const args = readAll(def.args ?? {}, (key) => params[argKeys.indexOf(key)]);
      const rawOpts = self.opts();
      const opts = readAll(def.options ?? {}, (key) => rawOpts[key]);
      await def.run({ qb, out, cli: ce, args: args as ValuesOf<A>, opts: opts as ValuesOf<O> });
    });
  });
}

function readAll(specs: Specs<{ read(raw: unknown): unknown }>, raw: (key: string) => unknown): Record<string, unknown> {
  return Object.fromEntries(Object.entries(specs).map(([key, spec]) => [key, spec.read(raw(key))]));
}

// ---- arguments ----

/** `<name>`: a required argument. */
export function arg(name: string, description?: string): ArgumentSpec<string> {
  return { syntax: `<${name}>`, ...(description !== undefined ? { description } : {}), read: readString };
}

/** `[name]`: an optional argument. */
export function optionalArg(name: string, description?: string): ArgumentSpec<string | undefined> {
  return { syntax: `[${name}]`, ...(description !== undefined ? { description } : {}), read: readOptionalString };
}

/** `<name...>`: one or more words, the last argument. */
export function variadicArg(name: string, description?: string): ArgumentSpec<string[]> {
  return { syntax: `<${name}...>`, ...(description !== undefined ? { description } : {}), read: readStrings };
}

// ---- options ----

/** `--flag`, or `--no-thing` (then keyed `thing`, true unless given). */
export function flag(flags: string, description: string): OptionSpec<boolean> {
  return { flags, description, read: (raw) => (assertType(raw, 'boolean', flags), raw === true) };
}

/** `--name <value>`, absent unless given. */
export function value(flags: string, description: string): OptionSpec<string | undefined> {
  return { flags, description, read: readOptionalString };
}

/** `--name <value>` that commander insists on. */
export function requiredValue(flags: string, description: string): OptionSpec<string> {
  return { flags, description, mandatory: true, read: readString };
}

/** `--name <value>` with a default shown in help. */
export function valueWithDefault(flags: string, description: string, defaultValue: string): OptionSpec<string> {
  return { flags, description, defaultValue, read: readString };
}

/** `--name <value>`, repeatable: `--disk a --disk b` gives ['a', 'b']. */
export function repeatable(flags: string, description: string): OptionSpec<string[]> {
  return { flags, description, repeatable: true, read: readStrings };
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function readString(raw: unknown): string {
  assert.equal(typeof raw, 'string', 'commander gives a required value as a string');
  return raw as string;
}

function readOptionalString(raw: unknown): string | undefined {
  assertType(raw, 'string', 'an optional value');
  return raw as string | undefined;
}

function readStrings(raw: unknown): string[] {
  assert.ok(Array.isArray(raw) && raw.every((w) => typeof w === 'string'), 'commander gives a list of values as a string array');
  return raw as string[];
}

function assertType(raw: unknown, type: 'string' | 'boolean', what: string): void {
  assert.ok(raw === undefined || typeof raw === type, `commander gives ${what} as ${type} or undefined`);
}
