/** Run backup_db.ts as a real process, the way users and cron do, with a clean environment. */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa, type Options, type ResultPromise } from 'execa';
import type { TestServer } from './pg-server.ts';

export const PROJECT_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const SCRIPT = path.join(PROJECT_DIR, 'backup_db.ts');

/** The test runner's own configuration must not leak into the CLI under test. */
function baseEnv(): Record<string, string> {
  const keep = ['PATH', 'HOME', 'LANG', 'TMPDIR', 'USER', 'LOGNAME'];
  return Object.fromEntries(keep.flatMap((name) => (process.env[name] ? [[name, process.env[name]!]] : [])));
}

export interface CliRun {
  args: string[];
  env?: Record<string, string>;
  cwd?: string;
  /** Make file permission bits bind even when the tests run as root (CI does). */
  withoutRootOverride?: boolean;
}

/**
 * Root ignores permission bits through CAP_DAC_OVERRIDE; setpriv (util-linux) drops it from the
 * bounding set so a root-run CLI meets EACCES like any other user would.
 */
const ROOT_WITHOUT_DAC_OVERRIDE = ['setpriv', '--bounding-set=-dac_override,-dac_read_search', '--'];

export function startCli({ args, env = {}, cwd = PROJECT_DIR, withoutRootOverride = false }: CliRun): ResultPromise<Options & { reject: false }> {
  const command = [process.execPath, '--import', 'tsx', SCRIPT, ...args];
  const argv = withoutRootOverride && os.userInfo().uid === 0 ? [...ROOT_WITHOUT_DAC_OVERRIDE, ...command] : command;
  return execa(argv[0]!, argv.slice(1), {
    env: { ...baseEnv(), ...env },
    extendEnv: false,
    cwd,
    reject: false,
    stdin: 'ignore',
  }) as ResultPromise<Options & { reject: false }>;
}

export async function runCli(run: CliRun) {
  const result = await startCli(run);
  return { exitCode: result.exitCode ?? -1, stdout: String(result.stdout), stderr: String(result.stderr) };
}

/** A fresh directory for one test: its own .env files and backups. */
export async function tempDir(prefix = 'backup-db-test-'): Promise<string> {
  return fs.mkdtemp(path.join(os.tmpdir(), prefix));
}

/** Write an env file from a map, one VAR=value per line. */
export async function writeEnvFile(dir: string, name: string, vars: Record<string, string>): Promise<void> {
  const text = Object.entries(vars).map(([key, value]) => `${key}=${JSON.stringify(value)}`).join('\n');
  await fs.writeFile(path.join(dir, name), `${text}\n`);
}

/** DEV_DB_* or DB_* settings that reach `database` on the test server. */
export function dbVars(server: TestServer, prefix: 'DEV_DB_' | 'DB_', database: string): Record<string, string> {
  return {
    [`${prefix}HOST`]: server.host,
    [`${prefix}PORT`]: String(server.port),
    [`${prefix}NAME`]: database,
    [`${prefix}USER`]: server.user,
    [`${prefix}PASSWORD`]: server.password,
  };
}

export function uniqueName(prefix: string): string {
  return `${prefix}_${randomBytes(4).toString('hex')}`;
}
