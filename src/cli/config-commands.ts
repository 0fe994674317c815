// `qbackup config check`: reads the configuration file as every command does
// (--config F, else the default file), and prints the effective
// configuration with secrets masked (src/config/show.ts); a bad file is one
// sentence naming the file and line, and exit status 1.

import { QbackupError } from '../errors.js';
import { describeConfig, effectiveConfig } from '../config/show.js';
import { arg, defineCommand, type CliCommand } from './command.js';
import { oneOf } from './options.js';
import { emit } from './output.js';

export const configCommands: readonly CliCommand[] = [
  defineCommand({
    name: 'config',
    description: 'check the configuration file and print the effective configuration, secrets masked',
    args: { action: arg('action', 'check') },
    run: async ({ out, cli, args }) => {
      oneOf('action', args.action, ['check']);
      if (cli.config.file === undefined) {
        throw new QbackupError('CONFIG_INVALID', `There is no configuration file "${cli.configFile}": create one (see docs/config.md) or give --config`);
      }
      emit(out, effectiveConfig(cli.config), () => `Configuration "${cli.configFile}" is valid.\n${describeConfig(cli.config)}`);
    },
  }),
];
