// The one way passphrases and a helper process's environment reach the
// library: the caller (the CLI from its environment and password files, the
// daemon from its configuration) hands in a Credentials; nothing below the
// adapters reads the environment.

export interface Credentials {
  /** The passphrase of the encrypted repository at `repo`, when the caller has one. */
  repositoryPassword(repo: string): string | undefined;
  /**
   * What a helper process the library starts (the server of an instant
   * restore) inherits: PATH, and e.g. HOME and the AWS SDK's variables.
   */
  helperEnvironment(): Readonly<Record<string, string>>;
}

/** No passphrases, and helpers get only a standard PATH. */
export const noCredentials: Credentials = {
  repositoryPassword: () => undefined,
  helperEnvironment: () => ({ PATH: '/usr/local/bin:/usr/bin:/bin' }),
};
