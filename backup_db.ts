/**
 * backup_db.ts: back up the dev or prod PostgreSQL database with pg_dump (custom format),
 * write a SHA256 + row-count metadata sidecar, verify it, list, prune, restore and monitor.
 *
 *   npx tsx backup_db.ts --env prod
 *
 * Sections, in the order data flows through a run (shared helpers first, main last):
 *   Types and constants                    the exit codes, the one error type
 *   Small helpers                          tethered child processes, quiet clean-up, error mapping
 *   Configuration: .env files              the layers; each file read, as UTF-8, or refused
 *   Configuration: settings                DEV_DB_* and DB_*, URLs, environment
 *   Client tools                           finding a pg_dump/pg_restore that fits the server
 *   Output directory                       writable, and still the one the run began in
 *   Lock: its owner                        who holds the per-database lock, alive or not
 *   Lock: taking it                        atomically, with or without hard links; takeover; the reserve
 *   Leftovers and disk space               what killed runs left, free space, file-system errors
 *   Connection                             libpq environment, child environments, sessions, passwords
 *   Connection: TLS                        server verification as libpq's, revocation lists, client certificates
 *   Connection errors                      failures mapped to exit codes and hints; the server's facts
 *   Backup names                           {database}_{env}_{timestamp}.dump, written and read in one place
 *   Dump                                   table inventory, row counts under the backup's locks
 *   Dump: pg_dump                          pg_dump streamed through SHA-256, its lock waits and errors
 *   Stall watchdog                         stop a dump that writes nothing, saying what it waits on
 *   Progress                               a progress line on terminals
 *   Backup run                             lock, snapshot, dump and counts, publish, retention
 *   Metadata                               the sidecar: build, validate, write atomically
 *   Archives                               header, client tools, checksum, table of contents
 *   Verification                           the checks (one table) and --verify
 *   Listing                                --list
 *   Retention                              the policy, pure; pruning, guarded by the newest kept
 *   Freshness check                        --check --max-age
 *   Restore: the production guard          never restore over production by another spelling of it
 *   Restore: the target server             extensions, the target database (claim, create), tablespaces
 *   Restore: dropping a database           sessions in the way, subscriptions, clean-up after a failure
 *   Restore: the backup's own database     encoding and locale, then its settings and comment
 *   Restore: pg_restore                    session settings, errors
 *   Restore: the archive                   verified, and pinned so that pg_restore reads what was verified
 *   Restore: one pipeline                  --restore and the drill (a scratch target)
 *   Restore: the drill's record            last_restore_test in the metadata
 *   Run records                            log file, webhook, --on-failure
 *   Operations                             heartbeat pings, Prometheus metrics
 *   Output: text for a person              what each command prints
 *   Output: secrets                        masking passwords, other sessions' SQL, tools' messages
 *   Output: problems and documents         the one failure record, --json, printing
 *   CLI: modes and settings                what the options ask for, settings from options and env
 *   CLI: the command line                  commander options and help
 *   Interrupts                             signals and the launchers going away
 *   main                                   run a mode, print, record
 *
 * A backup: configuration → client tools → output directory and lock → connection → dump (with
 * the watchdog) → metadata → verification → retention; the other commands reuse the same parts.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, existsSync, type Dirent, type Stats } from 'node:fs';
import fs from 'node:fs/promises';
import { BlockList, connect, isIP, type Socket } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as delay } from 'node:timers/promises';
import { domainToASCII, fileURLToPath, pathToFileURL } from 'node:url';
import { Chalk, supportsColor, supportsColorStderr, type ChalkInstance } from 'chalk';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import type { Options, ResultPromise } from 'execa';
import type pg from 'pg';
import { createSecureContext, type ConnectionOptions as TlsOptions } from 'node:tls';

// ─── Types and constants ─────────────────────────────────────────────────────────────────

/** Exit codes of the CLI contract (cli-contract.md, "Error Exit Codes"). */
export const EXIT = {
  OK: 0,
  GENERAL: 1,
  CONFIG: 2,
  CONNECTION: 3,
  PERMISSION: 4,
  DISK_SPACE: 5,
  TOOL_NOT_FOUND: 6,
  BACKUP_FAILED: 7,
  VERIFY_FAILED: 8,
  // Unix convention for "terminated by signal N": 128 + N.
  SIGHUP: 129,
  SIGINT: 130,
  SIGTERM: 143,
} as const;
/** The signals that stop a run cleanly (its exit code is 128 + N). */
const INTERRUPT_SIGNALS = ['SIGHUP', 'SIGINT', 'SIGTERM'] as const;
type InterruptSignal = (typeof INTERRUPT_SIGNALS)[number];

export type Environment = 'dev' | 'prod';
/** custom: one file, streamed through SHA-256 (the default); directory: parallel dump with --jobs. */
export type DumpFormat = 'custom' | 'directory';
const SSL_MODES = ['disable', 'allow', 'prefer', 'require', 'verify-ca', 'verify-full'] as const;
export type SslMode = (typeof SSL_MODES)[number];

const PROJECT_DIR = path.dirname(fileURLToPath(import.meta.url));
const DEFAULT_OUTPUT_DIR = path.join(PROJECT_DIR, 'db', 'backups');
const ENV_FILES = ['.env.local', '.env'] as const;
const PROCESS_ENVIRONMENT = 'the process environment';
/** PostgreSQL cuts names at 63 bytes (NAMEDATALEN), even when connecting: a longer one would reach another database. */
const MAX_NAME_BYTES = 63;
const DEFAULT_CONNECT_TIMEOUT_S = 10;
// pg_dump waits forever for a table lock by default, and while it waits every later query on
// that table queues behind it: better to fail fast and say which lock was in the way.
const DEFAULT_LOCK_WAIT_TIMEOUT = '30s';
const DEFAULT_STALL_TIMEOUT = '15min';
const DUMP_SUFFIX = '.dump';
const PARTIAL_SUFFIX = '.partial';
/** `<name>.dump.pin-<pid>`: a restore's private links to a directory-format backup (pinBackup). */
const PIN_INFIX = '.pin-';
const OWNER_SUFFIX = '.owner';
const METADATA_SUFFIX = '.metadata.json';
const LOCK_SUFFIX = '.lock';
/**
 * Random, for what must be this run's alone (a temp file, a session's name, a scratch database), never a pid
 * alone: a container's pid (often 1) repeats from run to run, and a killed run's file with it would be in the way
 * for ever. 8 characters: long database names leave no more room.
 */
function randomName(): string {
  return randomBytes(4).toString('hex');
}
// Names this run's sessions (pg_dump's add :pg_dump) for the watchdog, progress and lock-cycle queries.
const APPLICATION_NAME = `backup_db:${process.pid}:${randomName()}`;

/** Loaded on first use: execa and pg take 0.2 s to load, which --help, --list and a configuration error never need. */
let execaModule: Promise<typeof import('execa')> | undefined;
const loadExeca = () => (execaModule ??= import('execa'));
let pgModule: Promise<typeof import('pg')> | undefined;
const loadPg = () => (pgModule ??= import('pg'));

/**
 * The one error type. Thrown where a failure is understood; main turns it into one `Problem`
 * (masked once) that every channel renders: a one-line title, the tool's message, numbered hints.
 */
export class BackupError extends Error {
  constructor(
    readonly exitCode: number,
    readonly title: string,
    readonly details: string,
    readonly hints: string[] = [],
    /**
     * Extras: lines shown above the error (a verification report), fields for --json, and the step
     * that failed when it is not the command itself (a backup's verification).
     */
    readonly extra: { report?: string[]; data?: Record<string, unknown>; step?: string } = {},
  ) {
    super(`${title}: ${details}`);
    this.name = 'BackupError';
  }
}

// ─── Small helpers ───────────────────────────────────────────────────────────────────────

function errnoCode(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Pure: a table's entry for a key read from input; "__proto__" or "constructor" is no entry of it. */
function ownEntry<T>(table: Readonly<Record<string, T>>, key: string): T | undefined {
  return Object.hasOwn(table, key) ? table[key] : undefined;
}

/**
 * Start pg_dump or pg_restore so that it cannot outlive this process: in a process group of its
 * own, which a watcher (a shell blocked reading a pipe from us) stops, workers included, once the
 * pipe closes, which it does however we end, SIGKILL included; `signal` stops it too. In its own
 * session it never prompts on the terminal: a missing password fails instead of hanging.
 * One that does not connect (`connects: false`) gets no libpq variable, password sources included.
 */
async function startTethered<const O extends Options>(
  file: string,
  args: readonly string[],
  signal: AbortSignal,
  options: O,
  { connects = true } = {},
): Promise<{ child: ResultPromise<O> }> {
  const { execa } = await loadExeca();
  // detached changes how the child starts, not what its result looks like.
  const env = childEnv(process.env, options.env as Record<string, string> | undefined, { connects });
  // A child starts with every signal at its default, so the SIGXFSZ main ignores would kill pg_dump (its --jobs
  // workers write the files) rather than fail its write with EFBIG: a shell ignores it, and exec keeps that.
  const ignoringXfsz = ['-c', 'trap "" XFSZ; exec "$0" "$@"', file, ...args];
  const child = execa('/bin/sh', ignoringXfsz, {
    ...options,
    env,
    extendEnv: false,
    detached: true,
  }) as unknown as ResultPromise<O>;
  const pid = child.pid;
  if (pid === undefined) return { child }; // it could not start; the promise says why
  const killGroup = (name: NodeJS.Signals) => signalGroup(pid, name);
  const watcher = spawn(
    '/bin/sh',
    [
      '-c',
      'read -r _; kill -s TERM -- "-$1" 2>/dev/null; sleep 1; kill -s KILL -- "-$1" 2>/dev/null',
      'backup_db-tether',
      String(pid),
    ],
    { stdio: ['pipe', 'ignore', 'ignore'], detached: true, env: childEnv(process.env, {}, { connects: false }) },
  );
  // No process to spare for it (EAGAIN at the user's process limit): the child runs untethered, as it
  // started; an unheard 'error' would end this process with a stack trace, before anything is logged.
  watcher.on('error', () => liveWatchers.delete(watcher));
  watcher.unref();
  (watcher.stdin as unknown as { unref(): void }).unref();
  liveWatchers.add(watcher);
  let forceKill: NodeJS.Timeout | undefined;
  const stop = () => {
    killGroup('SIGTERM');
    forceKill = setTimeout(() => killGroup('SIGKILL'), 5000).unref();
  };
  if (signal.aborted) stop();
  else signal.addEventListener('abort', stop, { once: true });
  const done = () => {
    signal.removeEventListener('abort', stop);
    clearTimeout(forceKill);
    // The group is gone: the watcher must not outlive it, or a reused process group id could be hit.
    watcher.kill('SIGKILL');
    liveWatchers.delete(watcher);
  };
  child.then(done, done);
  // Wrapped: a ResultPromise is a thenable, and returning it bare would wait for the process.
  return { child };
}

/** Signal the process group led by `pid`, if it is still there. */
function signalGroup(pid: number, name: NodeJS.Signals): void {
  try {
    process.kill(-pid, name);
  } catch {
    // already gone
  }
}

const liveWatchers = new Set<ChildProcess>();
// A normal exit with a watcher still waiting would close its pipe too: stop the watchers first.
process.on('exit', () => liveWatchers.forEach((watcher) => watcher.kill('SIGKILL')));

/** `cache`'s promise for `key`, made by `make` when missing; a failure is forgotten, to be tried again. */
function cachedUnlessFailed<K, V>(cache: Map<K, Promise<V>>, key: K, make: () => Promise<V>): Promise<V> {
  const known = cache.get(key);
  if (known) return known;
  const made = make();
  cache.set(key, made);
  made.catch(() => cache.delete(key));
  return made;
}

/** Cleanup on a failure path must never replace the failure being reported. */
async function removeQuietly(filePath: string): Promise<void> {
  await fs.rm(filePath, { force: true, recursive: true }).catch(() => undefined);
}

/**
 * Whole milliseconds since `start`, a performance.now() reading: elapsed time on the monotonic clock,
 * which an NTP step of the wall clock (chrony at boot) neither makes negative nor stretches.
 */
function millisecondsSince(start: number): number {
  return Math.round(performance.now() - start);
}

/** Pure: an SQL identifier, quoted as the server quotes one. */
export const quoteIdentifier = (name: string) => `"${name.replaceAll('"', '""')}"`;

/** Pure: `\\xHH`, a byte (or a C0/C1 control's code) as an escape. */
const hexByte = (byte: number) => `\\x${byte.toString(16).padStart(2, '0')}`;

/** Pure: what a directory entry that is no regular file or directory is, in words. */
function fileKind(entry: Pick<Dirent, 'isSymbolicLink' | 'isFIFO' | 'isSocket'>): string {
  if (entry.isSymbolicLink()) return 'a symbolic link';
  return entry.isFIFO() ? 'a FIFO' : entry.isSocket() ? 'a socket' : 'not a regular file';
}

/** Pure: the first five of a list, and "..." when there are more. */
function listSome(items: string[]): string {
  return `${items.slice(0, 5).join(', ')}${items.length > 5 ? ', ...' : ''}`;
}

/**
 * Open a file to read that must be a regular file: non-blocking, so that a FIFO under its name
 * cannot hang the run, and with `noFollow` never through a symlink. A FIFO, socket or device
 * throws ENOTREG; a directory is returned, to fail on reading (EISDIR) as it always did.
 */
async function openRegularFile(file: string, { noFollow = false } = {}) {
  const { O_RDONLY, O_NONBLOCK, O_NOFOLLOW } = fs.constants;
  const handle = await fs.open(file, O_RDONLY | O_NONBLOCK | (noFollow ? O_NOFOLLOW : 0)).catch((error: unknown) => {
    // A socket (or a device with nothing behind it) cannot be opened at all: ENXIO.
    const code = errnoCode(error);
    throw (noFollow && code === 'ELOOP') || code === 'ENXIO' ? notRegularFile() : error;
  });
  const stat = await handle.stat();
  if (stat.isFile() || stat.isDirectory()) return handle;
  await handle.close();
  throw notRegularFile();
}

const notRegularFile = () => Object.assign(new Error('not a regular file'), { code: 'ENOTREG' });

async function pathExists(filePath: string): Promise<boolean> {
  return (await fs.lstat(filePath).catch(() => null)) !== null;
}

/**
 * Any failure as the contract's error: understood ones as they are, a database's through
 * databaseFailure, a file system's through fileSystemError; anything else is unexpected (exit 1).
 */
function asBackupError(error: unknown, server?: Pick<DbConfig, 'host' | 'port'>, dir?: string): BackupError {
  if (error instanceof BackupError) return error;
  const fromDatabase = databaseFailure(error, server);
  if (fromDatabase) return fromDatabase;
  if (errnoCode(error))
    return fileSystemError(
      error,
      'A file operation failed',
      dir ?? path.dirname(String((error as NodeJS.ErrnoException).path ?? '.')),
    );
  return new BackupError(EXIT.GENERAL, 'Unexpected error', errorText(error), [
    'This is a bug in backup_db.ts: please report it with the command that was run',
  ]);
}

/** Pure: a whole number from `min` to `max` (blanks around it allowed), or NaN. */
export function wholeNumber(value: string, min: number, max: number): number {
  const n = /^\s*\d{1,15}\s*$/.test(value) ? Number(value) : NaN;
  return n >= min && n <= max ? n : NaN;
}

// ─── Configuration: .env files (the layers, each file read and checked) ──────────────────

/** A configuration value and where it came from, so errors can name the file to fix. */
export interface EnvValue {
  value: string;
  source: string;
  /** In an .env file, written so that dotenv reads less than it shows (see misreadDotenvValues). */
  misread?: true;
}
export type EnvVars = ReadonlyMap<string, EnvValue>;

/**
 * Merge configuration layers: the first to set a variable wins (process environment > .env.local >
 * .env). Empty values count as unset: `DEV_DB_HOST=` in .env.local falls back to DB_HOST.
 */
export function mergeEnvLayers(
  layers: Array<{ source: string; vars: Record<string, string | undefined>; misread?: ReadonlySet<string> }>,
): EnvVars {
  const merged = new Map<string, EnvValue>();
  for (const { source, vars, misread } of layers) {
    for (const [name, value] of Object.entries(vars)) {
      if (value !== undefined && value !== '' && !merged.has(name))
        merged.set(name, { value, source, ...(misread?.has(name) ? { misread: true as const } : {}) });
    }
  }
  return merged;
}

/**
 * Pure: the variables of an .env text that dotenv reads differently from how they look. Unquoted,
 * a '#' starts a comment, so `PASSWORD=ab#cd` is read as "ab"; quotes inside a quoted value end
 * it early or are stripped; in double quotes \n and \r become line breaks. Such a password fails
 * authentication with no other sign.
 */
export function misreadDotenvValues(text: string): Set<string> {
  const misread = new Set<string>();
  for (const line of text.split(/\r?\n/)) {
    // dotenv's separators: '=', or ':' and a blank (`KEY: value`).
    const match = /^\s*(?:export\s+)?([\w.-]+)(?:\s*=|:\s)\s*(.*?)\s*$/.exec(line);
    if (!match) continue;
    const [, name, raw] = match as unknown as [string, string, string];
    const quote = raw[0];
    const quoted = (quote === "'" || quote === '"' || quote === '`') && raw.length > 1;
    const closing = quoted ? raw.indexOf(quote!, 1) : -1;
    // Quoted: fine when the value ends at its closing quote (a comment may follow).
    const whole = quoted ? closing > 0 && /^\s*(?:#.*)?$/.test(raw.slice(closing + 1)) : !raw.includes('#');
    // In double quotes (only), dotenv turns \n and \r into line breaks.
    const expanded = quote === '"' && /\\[nr]/.test(raw.slice(1, closing));
    if (whole && !expanded) continue;
    misread.add(name);
  }
  return misread;
}

/** Read .env.local then .env from `dir` without touching process.env; dotenv.parse prints nothing. */
async function loadEnvVars(dir: string, processEnv: NodeJS.ProcessEnv): Promise<EnvVars> {
  await assertConfigDir(dir);
  const layers: Parameters<typeof mergeEnvLayers>[0] = [{ source: PROCESS_ENVIRONMENT, vars: processEnv }];
  for (const file of ENV_FILES) {
    const filePath = path.join(dir, file);
    let bytes: Buffer;
    try {
      const handle = await openRegularFile(filePath);
      bytes = await handle.readFile().finally(() => handle.close());
    } catch (error) {
      if (errnoCode(error) !== 'ENOENT') throw unreadableEnvFile(filePath, error);
      // A link whose target is not there (not mounted yet) is no absent file: its settings would be lost in silence.
      const target = await fs.readlink(filePath).catch(() => undefined);
      if (target === undefined) continue;
      throw configError(`${filePath} is a symbolic link to ${target}, which does not exist`, [
        `Mount or restore ${target}, or remove the link`,
      ]);
    }
    const text = envFileText(bytes, filePath);
    const { default: dotenv } = await import('dotenv');
    layers.push({ source: file, vars: dotenv.parse(text), misread: misreadDotenvValues(text) });
  }
  return mergeEnvLayers(layers);
}

function unreadableEnvFile(filePath: string, error: unknown): BackupError {
  const notFile = errnoCode(error) === 'ENOTREG' || errnoCode(error) === 'EISDIR';
  return configError(`cannot read ${filePath}: ${errorText(error)}`, [
    notFile
      ? `Make ${filePath} a regular file (not a directory, FIFO or device)`
      : `Check the file's permissions: ls -l ${shellWord(filePath)}`,
  ]);
}

/**
 * Pure: an .env file's text. One that is not UTF-8 is refused, naming the line but never showing it (it may hold
 * a password): read with replacement characters, a password or name would differ from the file's in silence.
 */
export function envFileText(bytes: Buffer, filePath: string): string {
  const decode = (part: Buffer) => new TextDecoder('utf-8', { fatal: true }).decode(part);
  try {
    return decode(bytes);
  } catch {
    let [line, start] = [1, 0];
    for (let end = bytes.indexOf(10); end >= 0; end = bytes.indexOf(10, start), line++) {
      try {
        decode(bytes.subarray(start, end));
      } catch {
        break;
      }
      start = end + 1;
    }
    throw configError(`${filePath} is not UTF-8: line ${line} holds a byte no UTF-8 text has`, [
      `Convert it to UTF-8, e.g. from Latin-1: iconv -f LATIN1 -t UTF-8 ${shellWord(filePath)}, then check the result`,
    ]);
  }
}

/** A mistyped --config-dir would otherwise lose its .env files' settings (retention, log, hooks) in silence. */
async function assertConfigDir(dir: string): Promise<void> {
  const found = await fs.stat(dir).catch((error: unknown) => errnoCode(error));
  const missing = found === 'ENOENT' || found === 'ENOTDIR';
  if (missing || (typeof found === 'object' && !found.isDirectory()))
    throw configError(`--config-dir ${dir} ${missing ? 'does not exist' : 'is not a directory'}`, [
      'Give the directory that holds .env.local and .env (default: the project directory)',
    ]);
}

// ─── Configuration: settings (DEV_DB_* and DB_*, URLs, the environment) ──────────────────

export interface DbConfig {
  environment: Environment;
  host: string;
  port: number;
  database: string;
  user: string;
  password?: string;
  sslmode?: SslMode;
  /** A URL's ?sslrootcert=: the CA file, over PGSSLROOTCERT, as in libpq. */
  sslrootcert?: string;
  /** For each setting, the variable (and file) it came from: used in troubleshooting hints. */
  origin: Record<'host' | 'port' | 'database' | 'user' | 'password', string>;
  /** The password's line in its .env file reads other than it shows (an unquoted '#', stray quotes, \n). */
  passwordMisread?: true;
  /**
   * Where a session of ours reached `host` (pinnedTo): later sessions and the libpq tools connect there, the name
   * kept for the certificate check and the password file, so that a DNS answer changed meanwhile (a failover
   * flipping a CNAME) cannot send them to another server than the one checked.
   */
  address?: string;
}

const ENV_MODE_VALUES: Record<string, Environment> = {
  dev: 'dev',
  development: 'dev',
  prod: 'prod',
  production: 'prod',
};

function configError(details: string, hints: string[]): BackupError {
  return new BackupError(EXIT.CONFIG, 'Configuration error', details, hints);
}

/** A setting whose value is not `what` (a port number, a host name, ...). */
function invalidSetting(origin: string, value: string, what: string, hint: string): BackupError {
  return configError(`${origin} is "${value}", which is not ${what}`, [hint]);
}

function describeOrigin(name: string, found: EnvValue | undefined): string {
  return found ? `${name} (from ${found.source})` : name;
}

/**
 * Which environment to back up. Explicit --env wins; for `auto`, ENV_MODE decides, otherwise
 * the presence of DEV_DB_NAME (dev) or DB_NAME (prod), or their URL equivalents.
 */
export function detectEnvironment(vars: EnvVars, requested: Environment | 'auto'): Environment {
  if (requested !== 'auto') return requested;
  const mode = vars.get('ENV_MODE');
  if (mode) {
    const env = ownEntry(ENV_MODE_VALUES, mode.value.trim().toLowerCase());
    if (env) return env;
    throw configError(`ENV_MODE (from ${mode.source}) is "${mode.value}", which is not an environment`, [
      'Set ENV_MODE to one of: dev, development, prod, production (case-insensitive)',
      'Or choose explicitly: npx tsx backup_db.ts --env dev',
    ]);
  }
  if (vars.has('DEV_DB_NAME') || vars.has('DEV_DATABASE_URL')) return 'dev';
  if (vars.has('DB_NAME') || vars.has('DATABASE_URL')) return 'prod';
  throw configError('cannot tell which database to back up: none of ENV_MODE, DEV_DB_NAME, DB_NAME is set', [
    'For the dev database set DEV_DB_NAME (and DEV_DB_HOST, DEV_DB_PORT, DEV_DB_USER, DEV_DB_PASSWORD) in .env.local',
    'For the prod database set DB_NAME (and DB_HOST, DB_PORT, DB_USER, DB_PASSWORD) in .env',
    'Or set ENV_MODE=dev|prod, or pass --env dev|prod (see .env.example)',
  ]);
}

/**
 * A URL is used whole. The environment's own variables set in a higher place than it (the process environment,
 * cron's override, over a URL in .env) would be ignored, a stale file winning in silence: refused instead.
 */
function refuseVariablesAboveUrl(vars: EnvVars, url: EnvValue, urlVar: string, environment: Environment): void {
  const layers: string[] = [PROCESS_ENVIRONMENT, ...ENV_FILES];
  const prefix = environment === 'dev' ? 'DEV_DB_' : 'DB_';
  const above = ['NAME', 'HOST', 'PORT', 'USER', 'PASSWORD']
    .map((setting) => prefix + setting)
    .find((name) => layers.indexOf(vars.get(name)?.source ?? url.source) < layers.indexOf(url.source));
  if (above === undefined) return;
  throw configError(
    `${describeOrigin(above, vars.get(above))} would be ignored: ${describeOrigin(urlVar, url)} is used whole`,
    [`Remove ${urlVar} from ${url.source}, or set ${urlVar} where ${above} is set (a URL wins over the variables)`],
  );
}

/**
 * Connection settings for one environment. dev reads DEV_DB_*, falling back to DB_* except for the
 * database name (DEV_DB_NAME only, so dev never silently backs up prod); prod reads DB_*. A
 * connection URL (DEV_DATABASE_URL / DATABASE_URL) wins over the separate variables.
 */
export function resolveDbConfig(vars: EnvVars, environment: Environment, where = '.env.local or .env'): DbConfig {
  const urlVar = environment === 'dev' ? 'DEV_DATABASE_URL' : 'DATABASE_URL';
  const url = vars.get(urlVar);
  if (url) {
    refuseVariablesAboveUrl(vars, url, urlVar, environment);
    return withLibpqSslMode(configFromUrl(url, urlVar, environment), vars);
  }

  const prefixes = environment === 'dev' ? ['DEV_DB_', 'DB_'] : ['DB_'];
  // A setting as found, and its origin: the variable (and file) that set it, else the one to set.
  const pick = (suffix: string, allowFallback = true): Partial<EnvValue> & { origin: string } => {
    for (const prefix of allowFallback ? prefixes : prefixes.slice(0, 1)) {
      const found = vars.get(prefix + suffix);
      if (found) return { ...found, origin: describeOrigin(prefix + suffix, found) };
    }
    return { origin: prefixes[0] + suffix };
  };
  const name = pick('NAME', false);
  if (name.value === undefined) {
    throw configError(`${name.origin} is not set (expected in ${where} or the process environment)`, [
      `Add ${name.origin}=<database name> to ${where} (see .env.example)`,
      environment === 'dev' ? 'Or back up prod instead: --env prod' : 'Or back up dev instead: --env dev',
    ]);
  }
  const host = pick('HOST');
  const port = pick('PORT');
  const user = pick('USER');
  const password = pick('PASSWORD');
  const ssl = pick('SSLMODE');
  const config: DbConfig = {
    environment,
    host: validateHost(host.value ?? 'localhost', host.origin),
    port: parsePort(port.value ?? '5432', port.origin),
    database: validateName(name.value, name.origin),
    user: validateName(user.value ?? os.userInfo().username, user.origin),
    ...(password.value !== undefined ? { password: validatePassword(password.value, password.origin) } : {}),
    ...(password.misread ? { passwordMisread: true as const } : {}),
    ...(ssl.value !== undefined ? { sslmode: parseSslMode(ssl.value, ssl.origin) } : {}),
    origin: {
      host: host.origin,
      port: port.origin,
      database: name.origin,
      user: user.origin,
      password: password.origin,
    },
  };
  return withLibpqSslMode(config, vars);
}

/**
 * libpq's default for an sslmode the settings leave unset: PGSSLMODE, from the process environment
 * only, as libpq reads it. pg_dump inherits it, and our own session must be no less strict.
 */
function withLibpqSslMode(config: DbConfig, vars: EnvVars): DbConfig {
  const inherited = vars.get('PGSSLMODE');
  if (config.sslmode || inherited?.source !== PROCESS_ENVIRONMENT) return config;
  return { ...config, sslmode: parseSslMode(inherited.value, describeOrigin('PGSSLMODE', inherited)) };
}

/**
 * A libpq connection URL, read as libpq reads it (parseLibpqUrl): `?host=/var/run/postgresql` is a
 * socket directory, `?port=` a port, `?dbname=` the database. Read otherwise than pg_dump and psql
 * read it, the production guard would protect a database of another name.
 */
function configFromUrl(url: EnvValue, urlVar: string, environment: Environment): DbConfig {
  const origin = describeOrigin(urlVar, url);
  // Not written user:password@host: the masking of URL passwords would turn it into user:****@host.
  const form = 'Use the form postgresql://USER@HOST:5432/DATABASE, with the password after the user: USER:PASSWORD';
  // Never echo the URL: it usually holds the password.
  if (!/^[a-z][\w+.-]*:\/\//i.test(url.value.trim())) throw configError(`${origin} is not a valid URL`, [form]);
  if (!/^postgres(ql)?:\/\//i.test(url.value.trim()))
    throw configError(`${origin} must start with postgresql:// or postgres://`, [form]);
  // Read at the wrong '@', the rest of the password becomes a host name looked up and shown.
  if (ambiguousAuthority(url.value.trim()))
    throw configError(`${origin} cannot be split into user, password and host: it has an '@' out of place`, [
      "Percent-encode these characters in the password: '@' → %40, '/' → %2F, '?' → %3F, '#' → %23, ':' → %3A",
      form,
    ]);
  let parsed: ReturnType<typeof parseLibpqUrl>;
  try {
    parsed = parseLibpqUrl(url.value.trim());
  } catch {
    throw configError(`${origin} is not a valid URL`, [form]);
  }
  if (!parsed.dbname)
    throw configError(`${origin} names no database`, ['Add the database name: postgresql://user@host:5432/<database>']);
  assertImplementedUrlParameters(parsed, origin);
  // libpq reads no host as its Unix socket directory: localhost over TCP may be another server.
  if (!parsed.host)
    throw configError(`${origin} names no host`, [
      'Name the host: postgresql://user@host:5432/<database>',
      'Or the socket directory, as libpq would: postgresql://user@/<database>?host=/var/run/postgresql',
    ]);
  // Without its '@', "user:password" reads as host:port: a port that is no number is never echoed.
  const port = wholeNumber(parsed.port || '5432', 1, 65535);
  if (Number.isNaN(port))
    throw configError(`${origin}'s port is not a number (not shown: it may be a password)`, [
      "Is an '@' missing? A password goes after the user and a ':', then come an '@' and the host",
      'A port is a number from 1 to 65535, usually 5432',
    ]);
  return {
    environment,
    host: validateHost(parsed.host, origin),
    port,
    database: validateName(parsed.dbname, origin),
    user: validateName(parsed.user || os.userInfo().username, origin),
    ...(parsed.password ? { password: validatePassword(parsed.password, origin) } : {}),
    ...(parsed.sslmode ? { sslmode: parseSslMode(parsed.sslmode, origin) } : {}),
    ...(parsed.sslrootcert ? { sslrootcert: parsed.sslrootcert } : {}),
    origin: { host: origin, port: origin, database: origin, user: origin, password: origin },
  };
}

/** The URL parameters (libpq keywords) this tool reads. */
const URL_PARAMETERS = ['host', 'port', 'dbname', 'user', 'password', 'sslmode', 'sslrootcert'];

/**
 * Parameters whose only effect this tool sets itself: the sessions' names, the connection timeout
 * (--connect-timeout), and node-postgres's uselibpqcompat, which asks for libpq's meaning of sslmode.
 */
const URL_PARAMETERS_OVERRIDDEN = [
  'application_name',
  'fallback_application_name',
  'connect_timeout',
  'uselibpqcompat',
];

/**
 * Any other parameter (hostaddr, service, target_session_attrs, sslcert, …) would be dropped where
 * psql and pg_dump obey it, connecting elsewhere or otherwise; so would all hosts but one.
 */
function assertImplementedUrlParameters(parsed: Record<string, string | undefined>, origin: string): void {
  const list = (names: string[]) => names.map((name) => `?${name}=`).join(', ');
  const known = [...URL_PARAMETERS, ...URL_PARAMETERS_OVERRIDDEN];
  const others = Object.keys(parsed).filter((name) => !known.includes(name));
  if (others.length > 0)
    throw configError(`${origin} sets ${list(others)}, which this tool does not support`, [
      `Remove it: this tool reads ${list(URL_PARAMETERS)} and no other parameter`,
    ]);
  if (parsed.host?.includes(','))
    throw configError(`${origin} names several hosts, which this tool does not support`, ['Name one host']);
  if (parsed.sslrootcert?.includes('\0'))
    throw configError(`${origin} has a NUL byte in ?sslrootcert=`, ['Set it to the CA file (PEM)']);
}

/** Pure: whether a URL has more than one '@' before its path, or one in its path, query or fragment. */
export function ambiguousAuthority(url: string): boolean {
  const rest = url.slice(url.indexOf('://') + 3);
  const end = rest.search(/[/?#]/);
  const authority = end < 0 ? rest : rest.slice(0, end);
  return authority.split('@').length > 2 || (end >= 0 && rest.slice(end).includes('@'));
}

/**
 * Pure: a connection URL's settings by libpq keyword, read as libpq reads it: user, password, host,
 * port and the path's dbname, then the query's parameters over them; every part percent-decoded
 * (no '+' for a space, no '#' fragment: psql reads `prod%23db` and `?dbname=` so); ?ssl=true and
 * ?requiressl= as sslmode. Throws if malformed, a percent-escape included.
 */
function parseLibpqUrl(url: string): Record<string, string | undefined> {
  const parts = /^postgres(?:ql)?:\/\/(?:([^@/]*)@)?([^/?]*)(?:\/([^?]*))?(?:\?(.*))?$/is.exec(url);
  // The host as in libpq: an IPv6 address in brackets, else up to ':'; then the port.
  const hostPort = parts && /^(?:\[([^\]]*)\]|([^:[\]]*))(?::(.*))?$/s.exec(parts[2]!);
  if (!parts || !hostPort) throw new Error('malformed URL');
  const [, userInfo = '', , dbname = '', query = ''] = parts;
  const [user = '', ...password] = userInfo.split(':');
  const settings: Record<string, string | undefined> = {
    user: decodeURIComponent(user),
    password: password.length > 0 ? decodeURIComponent(password.join(':')) : '',
    host: decodeURIComponent(hostPort[1] ?? hostPort[2]!),
    port: decodeURIComponent(hostPort[3] ?? ''),
    dbname: decodeURIComponent(dbname),
  };
  for (const param of query.split('&').filter(Boolean)) {
    const [name, value, extra] = param.split('=');
    if (value === undefined || extra !== undefined) throw new Error('a query parameter is not name=value');
    const [keyword, setting] = sslmodeAlias(decodeURIComponent(name!), decodeURIComponent(value));
    settings[keyword] = setting;
  }
  return settings;
}

/** Pure: libpq's other spellings of sslmode: requiressl=1 is require (else prefer), and JDBC's ssl=true require. */
function sslmodeAlias(name: string, value: string): [string, string] {
  if (name === 'requiressl') return ['sslmode', value.startsWith('1') ? 'require' : 'prefer'];
  if (name === 'ssl' && value === 'true') return ['sslmode', 'require'];
  return [name, value];
}

export function parsePort(value: string, origin: string): number {
  const port = wholeNumber(value, 1, 65535);
  if (Number.isNaN(port))
    throw invalidSetting(origin, value, 'a port number', 'Use a number from 1 to 65535, usually 5432');
  return port;
}

/** A connection URL pasted into a host, database or user variable: refused, never echoed (it may hold a password). */
function refuseUrl(value: string, origin: string, what: string): void {
  if (value.includes('://'))
    throw configError(`${origin} holds a connection URL (not shown: it may hold a password), not ${what}`, [
      'Put a connection URL in DEV_DATABASE_URL (dev) or DATABASE_URL (prod) instead',
    ]);
}

function validateHost(value: string, origin: string): string {
  refuseUrl(value, origin, 'a host name');
  const host = value.trim();
  // user:password@host, pasted: no host has an '@' but where libpq's own start (a socket path, an abstract one).
  if (/^[^/@].*@/s.test(host))
    throw configError(`${origin} holds an '@' (not shown: it may hold a password), not a host name`, [
      'Put the host alone there, the user and password in their own settings (DEV_DB_USER, DB_PASSWORD, …)',
    ]);
  if (!host || /[\s\0]/.test(host))
    throw invalidSetting(origin, value, 'a host name', 'Use a host name or IP address, e.g. localhost');
  // Node looks up a name's ASCII (IDNA) form, libpq its bytes as given: one host, two servers perhaps, the production
  // guard checking one and pg_restore writing to the other. A socket directory is a path, looked up by no one.
  if (/[^\x00-\x7f]/.test(host) && !host.startsWith('/') && !host.startsWith('@')) {
    const ascii = domainToASCII(host);
    throw configError(
      `${origin} names the host "${host}", outside ASCII, which libpq and this tool look up differently`,
      [ascii ? `Write it as ${ascii}, its ASCII form` : 'Use its ASCII (IDNA) name or its IP address'],
    );
  }
  return host;
}

function validateName(value: string, origin: string): string {
  refuseUrl(value, origin, 'a database or user name');
  if (!value.trim() || value.includes('\0')) {
    throw configError(`${origin} is blank or contains a NUL byte`, ['Set it to the exact database or user name']);
  }
  if (Buffer.byteLength(value) > MAX_NAME_BYTES) {
    throw configError(
      `${origin} is ${Buffer.byteLength(value)} bytes long; PostgreSQL names are at most ${MAX_NAME_BYTES} bytes`,
      ['Set it to the exact database or user name (psql -l lists the databases)'],
    );
  }
  return value;
}

/**
 * A NUL byte cannot reach pg_dump (no environment variable holds one), and Node's refusal would quote the password.
 * Nor can more than Linux's 128 KiB a variable (MAX_ARG_STRLEN, `PGPASSWORD=` and its NUL included): E2BIG.
 */
function validatePassword(value: string, origin: string): string {
  if (value.includes('\0'))
    throw configError(`${origin} holds a password with a NUL byte, which no PostgreSQL client can send`, [
      'Remove the NUL byte (%00 in a URL) from the password',
    ]);
  const [bytes, most] = [Buffer.byteLength(value), 128 * 1024 - 'PGPASSWORD=\0'.length];
  if (bytes > most)
    throw configError(`${origin} is ${bytes} bytes long; pg_dump and pg_restore can be given at most ${most}`, [
      'Use a shorter password (PostgreSQL itself needs no more than a few dozen characters)',
    ]);
  return value;
}

function parseSslMode(value: string, origin: string): SslMode {
  const mode = value.trim().toLowerCase() as SslMode;
  if (!SSL_MODES.includes(mode))
    throw invalidSetting(origin, value, 'an sslmode', `Use one of: ${SSL_MODES.join(', ')}`);
  return mode;
}

function envFilesIn(dir: string): string {
  return ENV_FILES.map((file) => displayPath(path.join(dir, file))).join(' or ');
}

// ─── Client tools: pg_dump and pg_restore ────────────────────────────────────────────────

export interface PgTool {
  path: string;
  /** e.g. "15.18", as printed by `--version` without the packager's suffix. */
  version: string;
  major: number;
}

/** "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" → "15.18"; also handles "16beta1", "9.6.24". */
export function parsePgVersion(text: string): { version: string; major: number } | undefined {
  const match =
    /\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?(?:\.(\d+))?(\w*)/.exec(text) ??
    /^(\d+)(?:\.(\d+))?(?:\.(\d+))?(\w*)/.exec(text.trim());
  if (!match) return undefined;
  const [, a, b, c, suffix] = match;
  const version = [a, b, c].filter((part) => part !== undefined).join('.') + (suffix ?? '');
  const majorNumber = Number(a);
  // Before PostgreSQL 10 the major version had two parts (9.6).
  return { version, major: majorNumber >= 10 ? majorNumber : Number(`${a}.${b ?? 0}`) };
}

/**
 * Where PostgreSQL client tools live when they are not (only) on PATH: Debian/Ubuntu, RHEL/Fedora
 * (PGDG), Homebrew (versioned formulae and the keg-only libpq), Postgres.app. `*` is a version.
 */
const KNOWN_CLIENT_DIRS = [
  '/usr/lib/postgresql/*/bin',
  '/usr/pgsql-*/bin',
  '/opt/homebrew/opt/postgresql@*/bin',
  '/usr/local/opt/postgresql@*/bin',
  '/opt/homebrew/opt/libpq/bin',
  '/usr/local/opt/libpq/bin',
  '/Applications/Postgres.app/Contents/Versions/*/bin',
];

export type ClientSource = '--pg-bin-dir' | 'PATH' | 'usual location';

/** pg_dump and pg_restore from one directory: one installation, always used together. */
export interface PgClient {
  dir: string;
  source: ClientSource;
  pgDump: PgTool;
  pgRestore: PgTool;
}

async function isExecutableFile(file: string): Promise<boolean> {
  try {
    await fs.access(file, fs.constants.X_OK);
    return (await fs.stat(file)).isFile();
  } catch {
    return false;
  }
}

/** Expand one `*` in a directory pattern by listing its parent. */
async function expandPattern(pattern: string): Promise<string[]> {
  const star = pattern.indexOf('*');
  if (star < 0) return [pattern];
  const parent = pattern.slice(0, pattern.lastIndexOf('/', star));
  const [prefix, suffix] = [pattern.slice(parent.length + 1, star), pattern.slice(star + 1)];
  const [head, ...rest] = suffix.split('/');
  const names = await fs.readdir(parent).catch(() => [] as string[]);
  return names
    .filter((name) => name.startsWith(prefix) && name.endsWith(head!))
    .map((name) => [parent, name, ...rest].join('/'));
}

/** Candidate directories in search order: --pg-bin-dir / PG_BIN_DIR, then PATH, then the usual locations. */
async function clientDirs(pgBinDir: string | undefined): Promise<Array<{ dir: string; source: ClientSource }>> {
  const dirs: Array<{ dir: string; source: ClientSource }> = [];
  if (pgBinDir) dirs.push({ dir: path.resolve(pgBinDir), source: '--pg-bin-dir' });
  for (const dir of (process.env.PATH ?? '').split(path.delimiter).filter(Boolean)) dirs.push({ dir, source: 'PATH' });
  for (const pattern of KNOWN_CLIENT_DIRS)
    for (const dir of await expandPattern(pattern)) dirs.push({ dir, source: 'usual location' });
  const seen = new Set<string>();
  return dirs.filter(({ dir }) => !seen.has(dir) && seen.add(dir));
}

/** A client tool run that does not connect (pg_restore --list): its environment holds no password. */
async function runWithoutConnecting(file: string, args: string[], cancelSignal?: AbortSignal) {
  const { execa } = await loadExeca();
  return execa(file, args, withoutConnecting(cancelSignal));
}

/** execa's options for a client tool that only reads files: no libpq variable (no password), stopped by `signal`. */
function withoutConnecting(cancelSignal?: AbortSignal) {
  const env = childEnv(process.env, {}, { connects: false });
  return { env, extendEnv: false, reject: false, stdin: 'ignore', cancelSignal } as const;
}

/** Each executable's version, asked once per process: a run can look for clients several times. */
const probedTools = new Map<string, Promise<PgTool | undefined>>();
/** A tool that does not answer --version within this is broken: waiting on would hang every run. */
const VERSION_PROBE_TIMEOUT_S = 5;

function toolVersionIn(
  dir: string,
  command: 'pg_dump' | 'pg_restore',
  signal?: AbortSignal,
): Promise<PgTool | undefined> {
  const file = path.join(dir, command);
  // Only answers are kept: an interrupted probe says nothing about the tool.
  return cachedUnlessFailed(probedTools, file, () => probeToolVersion(file, command, signal));
}

/**
 * `file --version`, tethered: an interrupt (`signal`) or the timeout stops its whole process group, since a
 * wrapper script's own child would hold its output open. An interrupt wins over what the stopped probe said.
 */
async function probeToolVersion(
  file: string,
  command: 'pg_dump' | 'pg_restore',
  signal?: AbortSignal,
): Promise<PgTool | undefined> {
  if (!(await isExecutableFile(file))) return undefined;
  const timeout = AbortSignal.timeout(VERSION_PROBE_TIMEOUT_S * 1000);
  const stop = signal ? AbortSignal.any([signal, timeout]) : timeout;
  const options = { stdin: 'ignore', reject: false } as const;
  const result = await (await startTethered(file, ['--version'], stop, options, { connects: false })).child;
  signal?.throwIfAborted();
  if (result.failed) assertProcessStarts(result, file);
  const parsed = result.exitCode === 0 ? parsePgVersion(String(result.stdout)) : undefined;
  if (!parsed && timeout.aborted) {
    throw new BackupError(
      EXIT.TOOL_NOT_FOUND,
      `${command} did not answer --version within ${VERSION_PROBE_TIMEOUT_S} s`,
      `${file} --version was stopped after ${VERSION_PROBE_TIMEOUT_S} s without printing its version`,
      [
        `See what it waits for: ${shellWord(file)} --version`,
        'Or point --pg-bin-dir (or PG_BIN_DIR) at a working client',
      ],
    );
  }
  return parsed && { path: await bypassPgWrapper(file, command, parsed.major), ...parsed };
}

/** What the system says when it has no process, file or memory to spare for a new process. */
const NO_PROCESS_TO_SPARE: Record<string, string> = {
  EAGAIN: "This user's process limit is reached (ulimit -u; a container's pids.max)",
  EMFILE: 'This process has too many open files (ulimit -n)',
  ENFILE: 'The system has too many open files (fs.file-max)',
  ENOMEM: 'The system is out of memory',
};

/** A tool that could not be started for want of a process, not for want of the tool: never "not found". */
function assertProcessStarts(failed: unknown, file: string): void {
  const code = errnoCode(failed) ?? '';
  if (!Object.hasOwn(NO_PROCESS_TO_SPARE, code)) return;
  throw new BackupError(EXIT.GENERAL, `Cannot start ${path.basename(file)}`, `${file}: spawn ${code}`, [
    `${NO_PROCESS_TO_SPARE[code]}: end other processes of this user, or raise the limit; then run it again`,
  ]);
}

/**
 * Debian's /usr/bin/pg_dump and pg_restore are pg_wrapper, a Perl script that picks a version and
 * runs its binary: 30 ms a call. Knowing the version it picks, call that binary directly.
 */
async function bypassPgWrapper(file: string, command: string, major: number): Promise<string> {
  const real = await fs.realpath(file).catch(() => file);
  if (path.basename(real) !== 'pg_wrapper') return file;
  const direct = `/usr/lib/postgresql/${major}/bin/${command}`;
  return (await isExecutableFile(direct)) ? direct : file;
}

/**
 * A client is pg_dump and pg_restore of one major: clients are chosen by pg_dump's, and an older
 * pg_restore beside it could not read the archives it writes.
 */
async function inspectClientDir(
  { dir, source }: { dir: string; source: ClientSource },
  signal?: AbortSignal,
): Promise<PgClient | undefined> {
  const [pgDump, pgRestore] = await Promise.all([
    toolVersionIn(dir, 'pg_dump', signal),
    toolVersionIn(dir, 'pg_restore', signal),
  ]);
  return pgDump && pgRestore && pgDump.major === pgRestore.major ? { dir, source, pgDump, pgRestore } : undefined;
}

/**
 * Pure: the client for a server (or archive) of major `needed`: the first found, as the user
 * expects, unless too old; then the lowest new enough major, for the most compatible dump.
 */
export function chooseClient<T extends { pgDump: { major: number } }>(
  found: T[],
  needed: number | undefined,
): T | undefined {
  const first = found[0];
  if (!first || needed === undefined || first.pgDump.major >= needed) return first;
  // sort is stable: among clients of the same major, the first found.
  return found.filter((client) => client.pgDump.major >= needed).sort((a, b) => a.pgDump.major - b.pgDump.major)[0];
}

/** Pure: how to install client tools of a major version, per platform. */
export function clientInstallHints(major: number | undefined): string[] {
  const suffix = major === undefined ? '' : `-${major}`;
  const pgdg = major === undefined ? '' : ' (newer majors come from the PGDG repository, apt.postgresql.org)';
  return [
    `Debian/Ubuntu: sudo apt-get install -y postgresql-client${suffix}${pgdg}`,
    `macOS (Homebrew): brew install ${major === undefined ? 'libpq' : `postgresql@${major}`}`,
    `RHEL/Fedora (PGDG): sudo dnf install -y postgresql${major ?? ''}`,
    'Or point --pg-bin-dir (or PG_BIN_DIR) at the bin directory that holds them',
  ];
}

export interface ClientSearch {
  pgBinDir?: string;
  /** The setting pgBinDir came from, which its errors name. */
  pgBinDirFrom?: '--pg-bin-dir' | 'PG_BIN_DIR';
}

/**
 * Find pg_dump + pg_restore able to handle major `needed` (a server, or the pg_dump an archive
 * came from); undefined means any. Only the first directory is inspected unless it is too old.
 * `purpose` shapes the error: exit 6, naming every version found and where. `signal` (an interrupt) stops the search.
 */
async function findClient(
  search: ClientSearch,
  needed: number | undefined,
  purpose: (found: string) => { title: string; details: string },
  signal?: AbortSignal,
): Promise<PgClient> {
  const dirs = await clientDirs(search.pgBinDir);
  let first: PgClient | undefined;
  for (const dir of dirs) {
    first = await inspectClientDir(dir, signal);
    if (first) break;
  }
  // A directory the user named is never passed over in silence for one they did not.
  if (search.pgBinDir && first?.source !== '--pg-bin-dir')
    throw await pgBinDirError(dirs[0]!.dir, search.pgBinDirFrom ?? '--pg-bin-dir', signal);
  if (first && (needed === undefined || first.pgDump.major >= needed)) return first;
  const inspected = await Promise.all(dirs.map((dir) => inspectClientDir(dir, signal)));
  const found = inspected.filter((client) => client !== undefined);
  const chosen = chooseClient(found, needed);
  if (chosen) return chosen;
  const where =
    found.map((c) => `${c.pgDump.version} in ${c.dir} (${c.source})`).join('; ') ||
    'none on PATH or in the usual locations';
  const { title, details } = purpose(where);
  throw new BackupError(EXIT.TOOL_NOT_FOUND, title, details, clientInstallHints(needed));
}

/** Why --pg-bin-dir / PG_BIN_DIR holds no client, and the bin directory below it if that one does. */
async function pgBinDirError(dir: string, setting: string, signal?: AbortSignal): Promise<BackupError> {
  const [stat, pgDump, pgRestore, below] = await Promise.all([
    fs.stat(dir).catch(() => undefined),
    toolVersionIn(dir, 'pg_dump', signal),
    toolVersionIn(dir, 'pg_restore', signal),
    inspectClientDir({ dir: path.join(dir, 'bin'), source: '--pg-bin-dir' }, signal),
  ]);
  const nested = below && `pg_dump ${below.pgDump.version} and pg_restore ${below.pgRestore.version}`;
  const details = `${dir} ${stat ? toolsHeld(stat.isDirectory(), pgDump, pgRestore) : 'does not exist'}`;
  return new BackupError(EXIT.TOOL_NOT_FOUND, `No pg_dump and pg_restore in ${setting} ${dir}`, details, [
    ...(below ? [`Did you mean ${below.dir}? It holds ${nested}`] : []),
    'Point --pg-bin-dir (or PG_BIN_DIR) at the directory holding both, or unset it to search PATH and the usual places',
  ]);
}

/** Pure: what a directory holds that is not a client, e.g. "holds no pg_dump". */
function toolsHeld(isDirectory: boolean, pgDump: PgTool | undefined, pgRestore: PgTool | undefined): string {
  if (!isDirectory) return 'is not a directory';
  if (pgDump && pgRestore)
    return `holds pg_dump ${pgDump.version} and pg_restore ${pgRestore.version}, of different majors`;
  return `holds ${[pgDump ? '' : 'no pg_dump', pgRestore ? '' : 'no pg_restore'].filter(Boolean).join(' and ')}`;
}

/** The client for dumping a server of major `serverMajor` (undefined before the server is known). */
function findDumpClient(search: ClientSearch, signal: AbortSignal, server?: ServerInfo): Promise<PgClient> {
  return findClient(
    search,
    server?.major,
    (found) =>
      server
        ? {
            title: 'No pg_dump new enough for the server',
            details:
              `the server runs PostgreSQL ${server.version}, and pg_dump cannot dump a newer major version than ` +
              `its own; pg_dump found: ${found}`,
          }
        : {
            title: 'pg_dump not found',
            details: `pg_dump and pg_restore were not found: ${found} (PATH is ${process.env.PATH ?? ''})`,
          },
    signal,
  );
}

/** pg_dump's --compress value and the label recorded in the metadata. */
export interface Compression {
  arg: string;
  label: string;
}

/**
 * Validate --compress against the installed pg_dump. The default is fast rather than small: level 6
 * (the spec's original choice) measured ~5x slower than level 1 for ~10% smaller files, too slow
 * for 10 GB in 5 minutes. zstd (pg_dump 16+) at level 1 measured a third faster than gzip:1 for
 * files a quarter smaller, and 20% faster than its default (3) for files 4% larger.
 */
export function parseCompression(input: string | undefined, pgDumpMajor: number): Compression {
  const modern = pgDumpMajor >= 16;
  if (input === undefined) return modern ? { arg: 'zstd:1', label: 'zstd:1' } : { arg: '1', label: 'gzip:1' };
  const value = input.trim().toLowerCase();
  const gzipLevel = (level: string): Compression =>
    level === '0' ? { arg: '0', label: 'none' } : { arg: modern ? `gzip:${level}` : level, label: `gzip:${level}` };

  if (value === 'none') return gzipLevel('0');
  if (/^\d$/.test(value)) return gzipLevel(value);
  if (value === 'gzip') return gzipLevel('6');
  const gzip = /^gzip:(\d)$/.exec(value);
  if (gzip?.[1]) return gzipLevel(gzip[1]);

  const method = /^(zstd|lz4)(?::(\d{1,2}))?$/.exec(value);
  if (method?.[1]) {
    const [, name, level] = method;
    const max = name === 'zstd' ? 22 : 12;
    if (level !== undefined && (Number(level) < 1 || Number(level) > max)) {
      throw configError(`--compress ${input}: ${name} levels run from 1 to ${max}`, [
        `For example --compress ${name}:3`,
      ]);
    }
    if (!modern) {
      throw configError(`--compress ${input} needs pg_dump 16 or newer; the pg_dump found is version ${pgDumpMajor}`, [
        'Use a gzip level instead: --compress 0..9 (1 is fast, 6 is smaller)',
        'Or install the PostgreSQL 16+ client tools',
      ]);
    }
    return { arg: value, label: level === undefined ? name! : value };
  }
  throw configError(`--compress "${input}" is not a compression setting`, [
    'Use 0-9 (gzip level, 0 = none), gzip:N, or with pg_dump 16+: zstd, zstd:N, lz4, lz4:N',
  ]);
}

// ─── Output directory: writable, and still the one the run began in ──────────────────────

/**
 * Create the output directory (0700: backups hold all the data) and prove we can write there. Returns which
 * directory it is, for outputDirChange to tell if it is still the same one.
 */
async function prepareOutputDir(dir: string): Promise<DirIdentity> {
  const probe = path.join(dir, `${WRITE_PROBE_PREFIX}${randomName()}`);
  try {
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    await fs.writeFile(probe, '', { flag: 'wx', mode: 0o600 });
    await fs.unlink(probe);
    return await dirIdentity(dir);
  } catch (error) {
    throw fileSystemError(error, `Cannot write to the backup directory ${displayPath(dir)}`, dir);
  }
}

/** A directory as the file system knows it: the same path may name another one later. */
interface DirIdentity {
  dev: number;
  ino: number;
}

async function dirIdentity(dir: string): Promise<DirIdentity> {
  const { dev, ino } = await fs.stat(dir);
  return { dev, ino };
}

/**
 * The output directory removed, or moved away with another put in its place (a clean-up job, a deploy, a mount),
 * while a backup ran: said as such (exit 7), rather than as the ENOENT it caused (`cause`), or as a backup made in a
 * directory the run did not begin in. Undefined while the directory is still the one it began in.
 */
async function outputDirChange(dir: string, home: DirIdentity, cause?: BackupError): Promise<BackupError | undefined> {
  const now = await dirIdentity(dir).catch(() => undefined);
  if (now?.dev === home.dev && now.ino === home.ino) return undefined;
  const [shown, again] = [displayPath(dir), 'Keep backups in a directory that nothing else manages, then run again'];
  const details = cause?.details ?? `${shown} is another directory than the one this backup began in`;
  return now
    ? new BackupError(EXIT.BACKUP_FAILED, 'The backup directory was replaced during the run', details, [
        `${shown} was moved away, and another directory took its name (a mount, a deploy, a clean-up job): ` +
          'find what did it',
        "This run's partial file may have moved with it: the next backup in that directory removes it",
        again,
      ])
    : new BackupError(EXIT.BACKUP_FAILED, 'The backup directory was removed during the run', details, [
        'Something else deleted it while the backup ran: look for a clean-up job that manages it ' +
          '(systemd-tmpfiles, tmpreaper, cron)',
        again,
      ]);
}

const WRITE_PROBE_PREFIX = '.backup_db-write-test-';

// ─── Lock: its owner, alive or not ───────────────────────────────────────────────────────

/**
 * One backup per database at a time: a lock file in the output directory, named after the
 * database and environment, holding who owns it. It prevents overlapping load; correctness does
 * not depend on it, since every run claims its own file names with O_EXCL.
 */
export function lockFileName(database: string, environment: Environment): string {
  return `${fileNamePart(database)}_${environment}${LOCK_SUFFIX}`;
}

interface LockOwner {
  pid: number;
  hostname: string;
  started_at: string;
  /** Linux: the process's start time, which tells a reused pid from the lock's owner. */
  process_start: string | null;
  /** Linux: where the pid means something (containers of one hostname have their own); null in older locks. */
  pid_namespace: string | null;
  boot_id: string | null;
}

interface ProcessInfo {
  pid: number;
  ppid: number;
  pgrp: number;
  /** Start time since boot: a pid reused by another process has another one. */
  start: string;
  command: string;
  zombie: boolean;
}

/** Linux: a process as /proc/PID/stat describes it; the command name may hold spaces and ')'. */
async function processInfo(pid: number): Promise<ProcessInfo | undefined> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  if (stat === undefined) return undefined;
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return {
    pid,
    ppid: Number(fields[1]),
    pgrp: Number(fields[2]),
    start: fields[19]!,
    command: stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')),
    zombie: fields[0] === 'Z',
  };
}

/**
 * Linux: this process's pid namespace and the machine's current boot; null where unknown. Neither
 * changes while the process lives: read once, however many locks are taken or judged.
 */
function pidScope(): Promise<Pick<LockOwner, 'pid_namespace' | 'boot_id'>> {
  ownPidScope ??= Promise.all([
    fs.readlink('/proc/self/ns/pid').catch(() => null),
    fs.readFile('/proc/sys/kernel/random/boot_id', 'utf8').catch(() => null),
  ]).then(([pid_namespace, boot_id]) => ({ pid_namespace, boot_id: boot_id?.trim() ?? null }));
  return ownPidScope;
}

let ownPidScope: Promise<Pick<LockOwner, 'pid_namespace' | 'boot_id'>> | undefined;

function parseLockOwner(text: string): LockOwner | undefined {
  try {
    const { pid, hostname, started_at, ...linux } = JSON.parse(text) as Partial<LockOwner>;
    const valid = Number.isSafeInteger(pid) && typeof hostname === 'string' && typeof started_at === 'string';
    const { process_start = null, pid_namespace = null, boot_id = null } = linux;
    return valid ? { pid: pid!, hostname, started_at, process_start, pid_namespace, boot_id } : undefined;
  } catch {
    return undefined;
  }
}

/** Whether a process of this machine exists (signal 0 checks without sending anything). */
function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return errnoCode(error) !== 'ESRCH';
  }
}

/**
 * Alive unless provably gone: a lock from another machine (shared storage), or from another pid
 * namespace (a container of the same hostname sharing the volume), cannot be checked; one from an
 * earlier boot is gone. A zombie (killed, not yet reaped by its parent) is gone: it runs no code and
 * will never release the lock.
 */
async function lockOwnerAlive(owner: LockOwner): Promise<boolean> {
  if (owner.hostname !== os.hostname()) return true;
  const here = await pidScope();
  if (owner.boot_id !== null && here.boot_id !== null && owner.boot_id !== here.boot_id) return false;
  if (owner.pid_namespace !== null && owner.pid_namespace !== here.pid_namespace) return true;
  if (!processAlive(owner.pid)) return false;
  const info = await processInfo(owner.pid);
  if (info?.zombie) return false;
  return owner.process_start === null || info === undefined || info.start === owner.process_start;
}

/** A lock file as found: its inode (which identifies this very file), its text and its owner. */
interface FoundLock {
  ino: string;
  mtimeMs: number;
  text: string;
  owner: LockOwner | undefined;
}

/** Read a lock file through one open handle, so that its inode and its text belong together. */
async function readLock(file: string): Promise<FoundLock | undefined> {
  let handle;
  try {
    handle = await openRegularFile(file);
  } catch (error) {
    if (errnoCode(error) === 'ENOENT') return undefined;
    // A FIFO, socket or device (openRegularFile refuses them all as ENOTREG).
    throw errnoCode(error) === 'ENOTREG' ? lockNotRegularFile(file) : error;
  }
  try {
    const stat = await handle.stat({ bigint: true });
    if (!stat.isFile()) throw lockNotRegularFile(file);
    const text = await handle.readFile('utf8');
    return { ino: String(stat.ino), mtimeMs: Number(stat.mtimeMs), text, owner: parseLockOwner(text) };
  } finally {
    await handle.close();
  }
}

/** No run ever makes anything but a regular file there: it is not ours to delete, nor a matter of permissions. */
function lockNotRegularFile(file: string): BackupError {
  const shown = displayPath(file);
  return new BackupError(EXIT.BACKUP_FAILED, 'Could not take the backup lock', `${shown} is not a regular file`, [
    `See what it is: ls -ld ${shellWord(shown)}`,
    'backup_db only ever writes a regular file there: remove it by hand, then run again',
  ]);
}

const isStale = async (lock: FoundLock) => !lock.owner || !(await lockOwnerAlive(lock.owner));

// ─── Lock: taking it, taking it over, releasing; the reserve ─────────────────────────────

export interface BackupLock {
  path: string;
  release(): Promise<void>;
}

/**
 * The lock's owner record needs a data block, which a full disk does not have, and freeing space is why
 * an operator runs --prune then: every backup that succeeds keeps `<lock>.reserve` (4 KiB, at least the block
 * the record takes) for --prune alone to give up (a backup on a full disk fails anyway). Random bytes: a
 * compressing file system stores zeros in no block. Neither --list nor the stale-file clean-up matches its name.
 */
const LOCK_RESERVE_BYTES = 4096;
const lockReservePath = (lockPath: string) => `${lockPath}.reserve`;

/** Make the reserve if it is missing and there is room; a partial one is removed, since it holds less. */
async function keepLockReserve(lockPath: string): Promise<void> {
  const reserve = lockReservePath(lockPath);
  await fs.writeFile(reserve, randomBytes(LOCK_RESERVE_BYTES), { mode: 0o600, flag: 'wx' }).catch(async (error) => {
    if (errnoCode(error) !== 'EEXIST') await removeQuietly(reserve);
  });
}

/**
 * Take the database's lock. It is created complete (written to a temp file, then hard-linked
 * into place, which fails if the lock exists), so a lock is never seen half-written. With
 * `spendReserve` (--prune), a disk too full for it frees the reserve and tries once more, by the
 * same rules; the reserve is made again when the lock is released, or not won after all.
 */
export async function acquireBackupLock(
  dir: string,
  config: Pick<DbConfig, 'database' | 'environment'>,
  spendReserve = false,
): Promise<BackupLock> {
  const lockPath = path.join(dir, lockFileName(config.database, config.environment));
  const { pid_namespace: namespace } = await pidScope();
  const busy = (owner: LockOwner) => alreadyRunningError(config, owner, lockPath, namespace);
  const take = () => acquireLockFile(lockPath, busy);
  try {
    return await take();
  } catch (error) {
    const diskFull = error instanceof BackupError && error.exitCode === EXIT.DISK_SPACE;
    if (!spendReserve || !diskFull) throw error;
    // No reserve to give up: another --prune took it and holds the lock, or the disk is simply full.
    await fs.rm(lockReservePath(lockPath)).catch(async () => {
      const found = await readLock(lockPath).catch(() => undefined);
      throw found && !(await isStale(found)) ? busy(found.owner!) : error;
    });
    const lock = await take().catch(async (retryError: unknown) => {
      await keepLockReserve(lockPath);
      throw retryError;
    });
    // Made again once the deletions (or, after a dry run, the lock's own block) leave room.
    return { ...lock, release: () => lock.release().then(() => keepLockReserve(lockPath)) };
  }
}

/** This run as the owner of a lock (or of a restore's pinned copy): what lockOwnerAlive judges. */
async function thisRunAsOwner(): Promise<LockOwner> {
  return {
    pid: process.pid,
    hostname: os.hostname(),
    started_at: new Date().toISOString(),
    process_start: (await processInfo(process.pid))?.start ?? null,
    ...(await pidScope()),
  };
}

/** Take the lock at `lockPath`; `busy` is the error when a live owner holds it. */
async function acquireLockFile(lockPath: string, busy: (owner: LockOwner) => BackupError): Promise<BackupLock> {
  const dir = path.dirname(lockPath);
  const content = JSON.stringify(await thisRunAsOwner());
  const name = `${lockPath}.${process.pid}.${randomName()}`;
  const ours = { temp: `${name}.tmp`, swap: `${name}.swap`, content };
  try {
    await fs.writeFile(ours.temp, content, { mode: 0o600, flag: 'wx' });
    await claimLock(lockPath, ours, busy, 0);
    return {
      path: lockPath,
      // Only our own lock is removed, never one that replaced it.
      release: async () => {
        if ((await readLock(lockPath))?.text === content) await fs.rm(lockPath, { force: true });
      },
    };
  } catch (error) {
    throw error instanceof BackupError ? error : fileSystemError(error, 'Cannot create the lock file', dir);
  } finally {
    await Promise.all([removeQuietly(ours.temp), removeQuietly(ours.swap)]);
  }
}

/**
 * Where the file system has no hard links (exFAT, FAT, some FUSE and network file systems), link(2) fails
 * with one of these; EPERM is also a permission error elsewhere, but not for a file this run just made.
 */
const NO_HARD_LINKS = new Set(['EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'ENOSYS']);

/**
 * Put our lock record at `at` unless something is there: a hard link of the complete temp file, never seen
 * half-written. Without hard links, an exclusive create and one write: for an instant it is empty, which
 * readSettledLock waits out; a write that fails removes it.
 */
async function placeLock(ours: { temp: string; content: string }, at: string): Promise<void> {
  try {
    return await fs.link(ours.temp, at);
  } catch (error) {
    if (!NO_HARD_LINKS.has(errnoCode(error) ?? '')) throw error;
  }
  const handle = await fs.open(at, 'wx', 0o600);
  try {
    await handle.writeFile(ours.content);
  } catch (error) {
    await fs.rm(at, { force: true });
    throw error;
  } finally {
    await handle.close();
  }
}

/**
 * A lock as found once it is no longer being written (placeLock without hard links): an empty one is waited on
 * for a second; past that, if under a minute old, it is refused, never taken for a dead run's.
 */
async function readSettledLock(file: string): Promise<FoundLock | undefined> {
  for (let waits = 0; ; waits++) {
    const found = await readLock(file);
    if (found?.text !== '' || writtenLongAgo(found.mtimeMs)) return found;
    if (waits === 20) throw emptyLockError(file);
    await delay(50);
  }
}

function emptyLockError(file: string): BackupError {
  const shown = displayPath(file);
  return new BackupError(
    EXIT.BACKUP_FAILED,
    'Could not take the backup lock',
    `${shown} is empty: another run is writing it, or was killed as it did`,
    [
      'Run again in a minute: an empty lock older than that is taken over',
      `If no backup of this database is starting, remove it: rm ${shellWord(shown)}`,
    ],
  );
}

/**
 * Link our lock into place at `target`. A dead owner's lock may be replaced, but only by the one
 * run that first claims `<target>.takeover-<its inode>` (a lock taken the same way) and only while
 * that dead lock is still in place: two runs finding the same dead lock can never both replace it,
 * nor replace the winner's lock. The replacement is a rename: the lock never goes missing. False
 * where a takeover claim (depth > 0) went away meanwhile: its run is done, so the lock it was for changed.
 */
async function claimLock(
  target: string,
  ours: { temp: string; swap: string; content: string },
  busy: (owner: LockOwner) => BackupError,
  depth: number,
): Promise<boolean> {
  for (let attempt = 0; attempt < 5 && depth < 3; attempt++) {
    try {
      await placeLock(ours, target);
      return true;
    } catch (error) {
      if (errnoCode(error) !== 'EEXIST') throw error;
    }
    const found = await readSettledLock(target);
    if (!found && depth > 0) return false;
    if (!found) continue; // released in the meantime
    if (!(await isStale(found))) throw busy(found.owner!);
    const takeover = `${target}.takeover-${found.ino}`;
    if (!(await claimLock(takeover, ours, busy, depth + 1))) continue; // the lock is another now: read it again
    try {
      const still = await readLock(target);
      if (still?.ino === found.ino && still.text === found.text) {
        await placeLock(ours, ours.swap);
        await fs.rename(ours.swap, target);
        return true;
      }
    } finally {
      if ((await readLock(takeover))?.text === ours.content) await fs.rm(takeover, { force: true });
    }
  }
  throw new BackupError(
    EXIT.BACKUP_FAILED,
    'Could not take the backup lock',
    `${displayPath(target)} kept changing while other runs started`,
    ['Several backups of this database are starting at once; run one at a time'],
  );
}

/** Warnings printed during a run that its record logs as events too (recordRun). */
const runWarnings: Array<{ event: string; headline: string; why: string }> = [];

/** Print a warning now, and have the run's record log it as `event`. */
function runWarning(event: string, headline: string, why: string): void {
  printWarning(CONSOLE, warningProblem(headline, why, []));
  runWarnings.push({ event, headline, why });
}

/**
 * Release a command's lock. Failing to (the directory made read-only meanwhile) is a warning: it must not
 * replace the run's result, nor the failure being reported; the lock's owner is dead once the run ends.
 */
async function releaseLock(lock: BackupLock): Promise<void> {
  await lock.release().catch((error: unknown) => {
    const why = `${errorText(error)}; the next run takes it over, as a finished run's`;
    runWarning('lock_release_failed', `Could not remove the lock ${displayPath(lock.path)}`, why);
  });
}

/**
 * Run `use` holding the lock at `lockPath`, waiting (up to 10 s) while another run holds it: for
 * short read-modify-write updates of a shared file.
 */
async function withFileLock<T>(lockPath: string, use: () => Promise<T>): Promise<T> {
  const busy = new BackupError(EXIT.GENERAL, 'Busy', `${displayPath(lockPath)} is held by another run`, [
    'Try again in a moment',
  ]);
  for (let attempt = 0; ; attempt++) {
    let lock: BackupLock;
    try {
      lock = await acquireLockFile(lockPath, () => busy);
    } catch (error) {
      if (error !== busy || attempt >= 200) throw error;
      await new Promise((resolve) => setTimeout(resolve, 50));
      continue;
    }
    try {
      return await use();
    } finally {
      await lock.release();
    }
  }
}

function alreadyRunningError(
  config: Pick<DbConfig, 'database' | 'environment'>,
  owner: LockOwner,
  lockPath: string,
  namespace: string | null,
): BackupError {
  // A pid of another namespace (a container sharing the directory) means nothing here: say so, not "ps -p".
  const contained = owner.hostname === os.hostname() && owner.pid_namespace && owner.pid_namespace !== namespace;
  const where =
    owner.hostname !== os.hostname()
      ? `pid ${owner.pid} on ${owner.hostname}`
      : contained
        ? `pid ${owner.pid} in another pid namespace, a container, which cannot be checked from here`
        : `pid ${owner.pid}`;
  return new BackupError(
    EXIT.BACKUP_FAILED,
    'Backup already running',
    `backup already running (${where}, since ${owner.started_at}) for database "${config.database}" ` +
      `(${config.environment})`,
    [
      contained
        ? `Let it finish; to see it, look in the container that ran it (${owner.pid_namespace})`
        : `Let it finish; to see it: ps -o pid,etime,args -p ${owner.pid}`,
      'If no backup is running (its pid was reused by another program), remove the lock: ' +
        `rm ${shellWord(displayPath(lockPath))}`,
      'Backups of different databases can run at the same time; only the same database is serialised',
    ],
  );
}

// ─── Leftovers and disk space: what killed runs left, free space ────────────────────────

/**
 * With the lock held, no other backup of this database is writing here, so its leftovers are stale:
 * `.partial` dumps of runs that were killed, temp metadata and write probes of dead runs, metadata
 * whose dump never got its final name, and the pinned links of restores that are gone (pinBackup);
 * and of the lock itself, the temp files and takeover claims of runs that died while starting (a run
 * still starting, and losing to us, has a live pid, or one we cannot check). Names are matched exactly
 * (database, environment, timestamp), never by prefix. Best effort: one this user cannot remove
 * (another user's killed run left it) is named, and the backup goes on, as it claims its own names
 * exclusively.
 */
async function removeStaleFiles(dir: string, config: DbConfig): Promise<{ removed: string[]; left: string[] }> {
  const stem = backupStemOf(config);
  const partial = new RegExp(`^${stem}\\.dump\\.partial$`);
  const pin = new RegExp(`^(${stem}\\.dump${escapeRegExp(PIN_INFIX)}\\d+)(?:${escapeRegExp(OWNER_SUFFIX)})?$`);
  // A random name; older versions put their pid there.
  const tempMetadata = new RegExp(`^${stem}\\.metadata\\.json\\.tmp-[0-9a-f]+$`);
  const probe = new RegExp(`^${escapeRegExp(WRITE_PROBE_PREFIX)}[0-9a-f]+$`);
  const metadata = new RegExp(`^(${stem})\\.metadata\\.json$`);
  const lock = escapeRegExp(lockFileName(config.database, config.environment));
  const lockTemp = new RegExp(`^${lock}\\.(\\d+)(?:\\.[0-9a-f]+)?\\.(?:tmp|swap)$`);
  const takeover = new RegExp(`^${lock}(?:\\.takeover-\\d+)+$`);
  const names = await fs.readdir(dir);
  const isStaleFile = async (name: string) => {
    if (partial.test(name)) return true;
    if (tempMetadata.test(name) || probe.test(name)) return isOldTempFile(path.join(dir, name));
    const pinned = pin.exec(name)?.[1];
    if (pinned) return isStalePin(path.join(dir, pinned));
    const orphan = metadata.exec(name);
    if (orphan) return !names.includes(`${orphan[1]}${DUMP_SUFFIX}`);
    const tempOf = lockTemp.exec(name);
    if (tempOf) return isStaleLockTemp(path.join(dir, name), Number(tempOf[1]));
    if (!takeover.test(name)) return false;
    const claim = await readLock(path.join(dir, name));
    return claim !== undefined && (await isStale(claim));
  };
  const stale = (await Promise.all(names.map(async (name) => ((await isStaleFile(name)) ? [name] : [])))).flat();
  const removal = async (name: string) =>
    removeEntry(path.join(dir, name)).then(
      () => undefined,
      async (error: unknown) => `${name} (${await ownerOf(path.join(dir, name))}): ${errorText(error)}`,
    );
  const failures = await Promise.all(stale.map(removal));
  return {
    removed: stale.filter((_, i) => failures[i] === undefined),
    left: failures.filter((failure) => failure !== undefined),
  };
}

/**
 * Remove a file, or a directory (a directory-format dump or its partial) with what it holds. Only a
 * directory is removed recursively: fs.rm's recursion reports an unlink refused with EPERM (another
 * user's file in a sticky directory) as ENOTDIR. One already gone is no failure.
 */
async function removeEntry(file: string): Promise<void> {
  try {
    if ((await fs.lstat(file)).isDirectory()) await fs.rm(file, { recursive: true });
    else await fs.unlink(file);
  } catch (error) {
    if (errnoCode(error) !== 'ENOENT') throw error;
  }
}

/** "owned by root", by user name where /etc/passwd has one: who can remove what this user cannot. */
async function ownerOf(file: string): Promise<string> {
  const uid = (await fs.lstat(file).catch(() => undefined))?.uid;
  if (uid === undefined) return 'owner unknown';
  const passwd = await fs.readFile('/etc/passwd', 'utf8').catch(() => '');
  const user = passwd.split('\n').find((line) => line.split(':')[2] === String(uid));
  return `owned by ${user ? user.split(':')[0] : `uid ${uid}`}`;
}

/**
 * A lock temp file (or its swap link) holds its run's owner record. A pid of another pid namespace
 * or host means nothing here: that run is judged as its lock would be (alive unless of an earlier
 * boot). Found empty, it is being written, or its run died doing so: stale once older than a minute.
 * Otherwise by the pid in its name, ours being an earlier run's: our own were removed before this runs.
 */
async function isStaleLockTemp(file: string, pid: number): Promise<boolean> {
  const found = await readLock(file).catch(() => undefined);
  const { pid_namespace: namespace } = await pidScope();
  const owner = found?.owner;
  const foreign = owner && (owner.hostname !== os.hostname() || (owner.pid_namespace ?? namespace) !== namespace);
  if (foreign) return !(await lockOwnerAlive(owner));
  if (found?.text === '') return writtenLongAgo(found.mtimeMs);
  return pid === process.pid || !processAlive(pid);
}

/**
 * A restore's pinned copy (and its owner file) is stale once the run named beside it is provably gone,
 * judged as a lock's owner is: never one of another host or pid namespace, which may be restoring still.
 */
async function isStalePin(pinned: string): Promise<boolean> {
  const owner = (await readLock(`${pinned}${OWNER_SUFFIX}`).catch(() => undefined))?.owner;
  if (owner) return !(await lockOwnerAlive(owner));
  // No owner file, or one cut short (a run killed as it wrote it): judged by the pid its name holds.
  return !processAlive(Number(/(\d+)$/.exec(pinned)![1]));
}

/**
 * Temp metadata (writeFileAtomic's; a drill's too, which takes no lock) and write probes live for one
 * write, milliseconds: one over a minute old is a dead run's. A younger one may be being written.
 */
async function isOldTempFile(file: string): Promise<boolean> {
  const stat = await fs.lstat(file).catch(() => undefined);
  return stat !== undefined && writtenLongAgo(stat.mtimeMs);
}

/** A file written in one go, last modified over a minute ago: its writer is gone, not still writing it. */
const writtenLongAgo = (mtimeMs: number) => Date.now() - mtimeMs > 60_000;

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/**
 * A dump is rarely smaller than a tenth of the tables' heap + TOAST size compressed, or a quarter
 * uncompressed (row headers and page overhead are not dumped). Below that the disk is clearly too
 * small; anything above is left to the real write, whose ENOSPC is handled like any failure.
 * The sizes are the catalog's estimates: a table never vacuumed or analysed counts as empty,
 * which can only make this check more lenient, never refuse a backup that fits.
 */
export function minimumDumpBytes(tableBytes: number, compression: Compression): number {
  return Math.ceil(tableBytes * (compression.label === 'none' ? 0.25 : 0.1));
}

async function assertDiskSpace(dir: string, tableBytes: number, compression: Compression): Promise<void> {
  const { bavail, bsize } = await fs.statfs(dir);
  const free = bavail * bsize;
  const needed = minimumDumpBytes(tableBytes, compression);
  if (free >= needed) return;
  throw diskSpaceError(
    `${formatBytes(free)} free in ${displayPath(dir)}, but the tables hold ${formatBytes(tableBytes)} and even a ` +
      `well-compressed dump of them needs about ${formatBytes(needed)}`,
    dir,
  );
}

/** Exit 5, whether the preflight saw it coming or the disk filled up during the write. */
function diskSpaceError(details: string, dir: string): BackupError {
  return new BackupError(EXIT.DISK_SPACE, 'Not enough disk space', details, [
    `Check free space: df -h ${shellWord(displayPath(dir))}`,
    'Free space (remove old backups) or choose another --output-dir',
    'Plan for about 2x the database size of free space',
  ]);
}

/**
 * Map a filesystem error to the contract's exit codes (disk full → 5, permissions → 4). `owner` (ownerOf) marks a
 * failed read: the fix is to run as that user, never to chown a directory the nightly backup writes to.
 */
export function fileSystemError(error: unknown, title: string, dir: string, owner?: string): BackupError {
  const code = errnoCode(error);
  if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG')
    return diskSpaceError(`${title}: ${errorText(error)}`, dir);
  // The path the user gave cannot exist at all: configuration, not permissions.
  if (code === 'ENAMETOOLONG')
    return new BackupError(EXIT.CONFIG, `${title}: the path is too long`, errorText(error), [
      'Choose a shorter path with --output-dir (at most 255 bytes a name, 4095 in all)',
    ]);
  // A failing disk, which no owner or mode fixes; exit 4 as any failed file operation (the contract has none for it).
  if (code === 'EIO')
    return new BackupError(EXIT.PERMISSION, title, errorText(error), [
      'The disk reported an I/O error: see the kernel log (dmesg | tail) and check the disk',
      'Meanwhile choose another directory with --output-dir',
    ]);
  const notDirectory =
    code === 'ENOTDIR' || (code === 'EEXIST' && (error as NodeJS.ErrnoException).syscall === 'mkdir');
  const [shown, user] = [shellWord(dir), os.userInfo().username];
  // Ownership only helps where permissions were the problem.
  const permissions = code === 'EACCES' || code === 'EPERM';
  return new BackupError(
    EXIT.PERMISSION,
    notDirectory ? `${title}: a path component is not a directory` : title,
    errorText(error),
    [
      permissions ? `Check ownership and permissions: ls -ld ${shown}` : `Check the path: ls -ld ${shown}`,
      ...(!permissions
        ? []
        : owner
          ? [`It is ${owner}: run as that user, or give ${user} read access`]
          : [`Make it writable for ${user}, e.g. chown ${user} ${shown}`]),
      'Or choose another directory with --output-dir',
    ],
  );
}

// ─── Connection ──────────────────────────────────────────────────────────────────────────

/** Connection settings for libpq tools. Everything goes through the environment, never argv. */
export function libpqEnv(config: DbConfig, connectTimeoutSeconds = DEFAULT_CONNECT_TIMEOUT_S): Record<string, string> {
  return {
    PGHOST: config.host,
    ...(config.address ? { PGHOSTADDR: config.address } : {}),
    PGPORT: String(config.port),
    // PGDATABASE, unlike --dbname, is never expanded as a connection string.
    PGDATABASE: config.database,
    PGUSER: config.user,
    PGAPPNAME: APPLICATION_NAME,
    PGCONNECT_TIMEOUT: String(connectTimeoutSeconds),
    ...(config.password !== undefined ? { PGPASSWORD: config.password } : {}),
    ...(config.sslmode ? { PGSSLMODE: config.sslmode } : {}),
    ...(config.sslrootcert ? { PGSSLROOTCERT: config.sslrootcert } : {}),
  };
}

/**
 * Inherited PG* variables a child may keep: password sources, TLS files and stricter TLS or auth
 * settings, PGOPTIONS. Every other one (PGSERVICE, PGHOSTADDR, PGTARGETSESSIONATTRS, …) could send
 * pg_dump or pg_restore to another server or database than the one our own session checked.
 */
const INHERITED_LIBPQ_VARS = new Set(
  ['PASSWORD', 'PASSFILE', 'SSLMODE', 'SSLROOTCERT', 'SSLCERT', 'SSLKEY', 'SSLCRL', 'SSLCRLDIR', 'SSLNEGOTIATION']
    .concat(['GSSENCMODE', 'CHANNELBINDING', 'REQUIREAUTH', 'OPTIONS'])
    .map((name) => `PG${name}`),
);

/**
 * Pure: a child's whole environment: `inherited` without our own settings and credentials (none of
 * which a child needs) and without the libpq variables that pick a target, then `own`. A child that
 * does not connect keeps no libpq variable at all, password sources included.
 */
export function childEnv(
  inherited: NodeJS.ProcessEnv,
  own: Readonly<Record<string, string>> = {},
  { connects = true } = {},
) {
  const kept = Object.entries(inherited).filter(
    (entry): entry is [string, string] => entry[1] !== undefined && passedToChild(entry[0], connects),
  );
  return { ...Object.fromEntries(kept), ...own };
}

function passedToChild(name: string, connects: boolean): boolean {
  if (/^PG[A-Z]/.test(name)) return connects && INHERITED_LIBPQ_VARS.has(name);
  return !CREDENTIAL_VARIABLE.test(name) && !OWN_SETTING.test(name);
}

/**
 * Connect with node-postgres, turning each kind of failure into its own actionable message. `signal`
 * (an interrupt) ends a pending attempt at once, with its reason as the error.
 */
async function connectDb(config: DbConfig, connectTimeoutSeconds: number, signal?: AbortSignal): Promise<pg.Client> {
  const enforced = enforceableConfig(config);
  try {
    return await openConnection(enforced, connectTimeoutSeconds, signal);
  } catch (error) {
    throw connectionError(error, enforced, connectTimeoutSeconds);
  }
}

/**
 * connectDb without the translation of its failure, for callers that try another database; `config`
 * has been through enforceableConfig. node-postgres has no sslmode=prefer, libpq's default: try TLS
 * first and fall back to a plain connection when the server has no TLS or refuses the TLS session, as libpq does;
 * nor allow: plain first, then TLS (unverified, as prefer's) when the server refuses the plain session.
 */
async function openConnection(
  config: DbConfig,
  connectTimeoutSeconds: number,
  signal?: AbortSignal,
): Promise<pg.Client> {
  const ssl = await sslOptions(config);
  const preferred = config.sslmode === undefined || config.sslmode === 'prefer';
  try {
    return await openClient(config, connectTimeoutSeconds, ssl, signal);
  } catch (error) {
    // Or refuses the TLS session (a hostnossl pg_hba): libpq's prefer then tries a plain one too.
    if (preferred && ssl && (/does not support SSL/i.test(errorText(error)) || sqlStateOf(error)?.startsWith('28')))
      return await openClient(config, connectTimeoutSeconds, false, signal);
    if (config.sslmode === 'allow' && !ssl && sqlStateOf(error)?.startsWith('28')) {
      const tls = await sslOptions({ ...config, sslmode: 'prefer' });
      if (tls) return await openClient(config, connectTimeoutSeconds, tls, signal);
    }
    throw error;
  }
}

/**
 * libpq settings in the environment that pg_dump enforces and node-postgres cannot: with any of them,
 * our session would send the password to a server pg_dump would refuse.
 */
const UNENFORCEABLE_LIBPQ_SETTINGS: Record<string, (value: string) => boolean> = {
  PGREQUIREAUTH: () => true,
  // Any value but these (require, or a spelling libpq rejects only once pg_dump runs) is refused.
  PGCHANNELBINDING: (value) => !['disable', 'prefer'].includes(value),
  PGGSSENCMODE: (value) => !['disable', 'prefer'].includes(value),
};

/**
 * `config` as libpq connects with it, refused (before any password is sent) where our session could not
 * be as strict as pg_dump. sslrootcert=system, as in libpq, makes verify-full the default and refuses
 * any weaker sslmode.
 */
function enforceableConfig(config: DbConfig): DbConfig {
  for (const [name, unenforceable] of Object.entries(UNENFORCEABLE_LIBPQ_SETTINGS)) {
    const value = process.env[name];
    if (value && unenforceable(value))
      throw configError(`${name} is "${value}", which this tool's own sessions (node-postgres) cannot enforce`, [
        `Unset ${name} for this tool: its sessions would send the password to a server pg_dump would refuse`,
        'Enforce it on the server instead: scram-sha-256 in pg_hba.conf, and sslmode=verify-full for TLS',
      ]);
  }
  if ((config.sslrootcert || process.env.PGSSLROOTCERT) !== 'system') return config;
  const where = config.sslrootcert ? `the ?sslrootcert= of ${config.origin.host}` : 'PGSSLROOTCERT';
  if (config.sslmode !== undefined && config.sslmode !== 'verify-full')
    throw configError(`weak sslmode "${config.sslmode}" may not be used with sslrootcert=system (${where})`, [
      'Use sslmode=verify-full with sslrootcert=system, as libpq requires',
      'Or point sslrootcert at the CA certificate (PEM) that signed the server certificate',
    ]);
  return { ...config, sslmode: 'verify-full', sslrootcert: 'system' };
}

/**
 * Connect for administration (create, drop, inspect databases) through a maintenance database,
 * postgres and then template1, as createdb and pg_restore --create do, so that neither the
 * configured database nor the target need exist; the configured database last, for servers
 * where the role may connect to neither. `avoid` (a database about to be dropped) is never used.
 */
async function connectMaintenance(
  config: DbConfig,
  connectTimeoutSeconds: number,
  avoid?: string,
  signal?: AbortSignal,
): Promise<pg.Client> {
  const enforced = enforceableConfig(config);
  const candidates = [...new Set(['postgres', 'template1', config.database])].filter((name) => name !== avoid);
  let first: unknown;
  for (const database of candidates) {
    try {
      return await openConnection({ ...enforced, database }, connectTimeoutSeconds, signal);
    } catch (error) {
      first ??= error;
      // Only a missing database, or one this role may not connect to, makes another worth trying.
      const code = (error as { code?: unknown }).code;
      if (code !== '3D000' && code !== '42501') break;
    }
  }
  throw connectionError(first, { ...enforced, database: candidates[0] ?? config.database }, connectTimeoutSeconds);
}

/** Connect (to the maintenance database with `maintenance`), use the connection, and always close it. */
async function withClient<T>(
  config: DbConfig,
  connectTimeoutSeconds: number,
  use: (client: pg.Client) => Promise<T>,
  options: { maintenance?: boolean; avoid?: string; signal?: AbortSignal } = {},
): Promise<T> {
  const client = options.maintenance
    ? await connectMaintenance(config, connectTimeoutSeconds, options.avoid, options.signal)
    : await connectDb(config, connectTimeoutSeconds, options.signal);
  try {
    return await use(client);
  } finally {
    await closeClient(client);
  }
}

/**
 * `work` on `client` until `signal` aborts, which cuts the connection, so that a connection attempt or
 * a query waiting on a lock stops at once, and throws the signal's reason: for a connection of its
 * own, used no further. Without a signal, just `work`.
 * With `cancelWithin` (statements that create or drop databases), the abort asks the server to cancel
 * the statement instead, and the connection, kept for the clean-up, is cut only if that many seconds
 * pass without an answer (a frozen server): a cut alone stops nothing on the server, where a drop
 * waiting on a lock or a barrier would go on, and be done after the run had said it stopped.
 */
async function untilAborted<T>(
  client: pg.Client,
  signal: AbortSignal | undefined,
  work: () => Promise<T>,
  cancelWithin?: number,
): Promise<T> {
  if (!signal) return work();
  const cut = () => client.connection.stream.destroy();
  let deadline: NodeJS.Timeout | undefined;
  let cancelling: Promise<void> | undefined;
  const stop = () => {
    if (cancelWithin === undefined) return cut();
    cancelling = requestCancel(client, cancelWithin);
    deadline = setTimeout(cut, cancelWithin * 1000);
  };
  signal.addEventListener('abort', stop, { once: true });
  try {
    signal.throwIfAborted();
    return await work();
  } catch (error) {
    throw signal.aborted ? signal.reason : error;
  } finally {
    signal.removeEventListener('abort', stop);
    clearTimeout(deadline);
    // Sent, the cancel reaches the session: a statement sent after it must not be the one it cancels.
    await cancelling;
  }
}

/** The address a session is connected to; undefined over a Unix socket, which no lookup can redirect. */
function sessionAddress(client: pg.Client): string | undefined {
  return (client.connection.stream as Socket).remoteAddress;
}

/** `config`, pinned to the address `client`'s session reached (see DbConfig's address). */
function pinnedTo(config: DbConfig, client: pg.Client): DbConfig {
  const address = sessionAddress(client);
  return address ? { ...config, address } : config;
}

/**
 * Ask the server to cancel the statement `client`'s session runs, as libpq's PQcancel does: a CancelRequest
 * (length 16, code 80877102, the session's process id and secret key) on a connection of its own to the same
 * server, which answers by closing it. Best effort, given up after `seconds`.
 */
async function requestCancel(client: pg.Client, seconds: number): Promise<void> {
  const { processID, secretKey, host, port } = client as pg.Client & { processID: number | null; secretKey: number };
  if (processID === null) return;
  const request = Buffer.alloc(16);
  [16, 80877102, processID, secretKey].forEach((value, i) => request.writeInt32BE(value, i * 4));
  const address = sessionAddress(client);
  // The address the session is connected to, not its host name again, which may lead to another server.
  const to = address
    ? { host: address, port: (client.connection.stream as Socket).remotePort ?? port }
    : { path: `${host}/.s.PGSQL.${port}` };
  await new Promise<void>((resolve) => {
    const socket = connect(to, () => socket.end(request));
    socket.setTimeout(seconds * 1000, () => socket.destroy());
    socket.on('error', () => undefined).on('close', () => resolve());
  });
}

/**
 * End a connection, waiting for the server a second at most: node-postgres's end() says goodbye and
 * then waits for the server to close its side, which a frozen server or a dead network never does.
 */
async function closeClient(client: pg.Client): Promise<void> {
  const cut = setTimeout(() => client.connection.stream.destroy(), 1000);
  await client.end().catch(() => undefined);
  clearTimeout(cut);
}

async function openClient(
  config: DbConfig,
  connectTimeoutSeconds: number,
  ssl: pg.ClientConfig['ssl'],
  signal?: AbortSignal,
): Promise<pg.Client> {
  const { default: pg } = await loadPg();
  const client = new pg.Client({
    host: config.address ?? config.host,
    port: config.port,
    database: config.database,
    user: config.user,
    // Asked only if the server wants a password. Without a configured one, behave like libpq.
    password: config.password ?? (() => passwordFromLibpqSources(config)),
    application_name: APPLICATION_NAME,
    // Sessions idle for long (a restore's admin, a dump's snapshot) must not be cut by a NAT or firewall.
    keepAlive: true,
    // Connecting to an address, node-postgres would send no server name (SNI) of its own: the host's, as libpq.
    ssl:
      typeof ssl === 'object' && config.address && isIP(config.host) === 0 ? { ...ssl, servername: config.host } : ssl,
  });
  // A connection that drops later surfaces as a failed query; keep the process alive until then.
  client.on('error', () => undefined);
  try {
    // The connection is made once its set-up query has answered too: one deadline for both, for a server
    // that accepts (or authenticates) and then never answers. node-postgres's own timeout ends at login.
    // A server that never answers would hold an interrupt for the whole connect timeout: cut the socket.
    await answeredWithin(client, connectTimeoutSeconds, () =>
      untilAborted(client, signal, async () => {
        await client.connect();
        // As pg_dump does: names in our queries resolve to built-ins only, or a function a database's
        // users created (a public.format(text, text) matches better than the variadic built-in) runs
        // with our role, a superuser maybe. Set after connecting, it overrides ALTER ROLE/DATABASE SET.
        await client.query(SESSION_SETUP_SQL);
      }),
    );
    return client;
  } catch (error) {
    await client.end().catch(() => undefined);
    throw error;
  }
}

/**
 * A session of ours as pg_dump and pg_restore make theirs. Timeouts an application sets for its role or
 * database (statement_timeout = 30s, idle_in_transaction_session_timeout = 1min) would cancel a count
 * or end the snapshot held while pg_dump runs: off. A role read-only by default could restore nothing:
 * writable, as in pg_dumpall's scripts (a backup's own transaction says READ ONLY). The first SET ends
 * the statement timeout for the statements after it; the newer timeouts where this server has them. Not
 * as startup options: a pooler (PgBouncer) refuses those.
 */
const SESSION_SETUP_SQL = `SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0;
  SET default_transaction_read_only = off;
  SELECT pg_catalog.set_config(name, CASE name WHEN 'search_path' THEN 'pg_catalog, pg_temp' ELSE '0' END, false)
    FROM pg_catalog.pg_settings
   WHERE name IN ('search_path', 'idle_session_timeout', 'transaction_timeout')`;

/** `work` on `client`, whose socket is cut unless it is done within `seconds`: a frozen server fails it. */
async function answeredWithin<T>(client: pg.Client, seconds: number, work: () => Promise<T>): Promise<T> {
  const deadline = setTimeout(() => client.connection.stream.destroy(new Error('timeout expired')), seconds * 1000);
  try {
    return await work();
  } finally {
    clearTimeout(deadline);
  }
}

/**
 * libpq's fallbacks when no password is configured: PGPASSWORD, then the password file
 * (PGPASSFILE or ~/.pgpass), which libpq ignores when group or others can read it.
 */
async function passwordFromLibpqSources(config: DbConfig): Promise<string> {
  if (process.env.PGPASSWORD) return process.env.PGPASSWORD;
  try {
    const found = await passwordFileEntry(config);
    if (found !== undefined) return found;
  } catch (error) {
    if (errnoCode(error) !== 'ENOENT')
      throw noPasswordError(config, `the password file was not used: ${errorText(error)}`);
  }
  throw noPasswordError(config, 'the server asked for a password and none is configured');
}

/** The password file's password for `config` (PGPASSFILE or ~/.pgpass), refusing one that group or others can read. */
async function passwordFileEntry(config: DbConfig): Promise<string | undefined> {
  const file = process.env.PGPASSFILE || path.join(os.homedir(), '.pgpass');
  const stat = await fs.stat(file);
  if (process.platform !== 'win32' && (stat.mode & 0o077) !== 0) throw new Error(`${file} has group or world access`);
  return pgpassLookup(await fs.readFile(file, 'utf8'), config);
}

function noPasswordError(config: DbConfig, why: string): BackupError {
  return new BackupError(EXIT.CONNECTION, 'Database authentication failed', why, [
    `Set ${config.origin.password} in .env.local / .env, or PGPASSWORD in the process environment (not in the files)`,
    'Or add a line host:port:database:user:password to ~/.pgpass (or PGPASSFILE) and chmod 0600 it',
  ]);
}

/** Pure: the password for `target` from pgpass text (fields split on unescaped ':', '*' matches all). */
export function pgpassLookup(
  contents: string,
  target: Pick<DbConfig, 'host' | 'port' | 'database' | 'user'>,
): string | undefined {
  const wanted = [target.host, String(target.port), target.database, target.user];
  for (const line of contents.split(/\r?\n/)) {
    if (line.trim() === '' || line.startsWith('#')) continue;
    const fields: string[] = [];
    let field = '';
    for (let i = 0; i < line.length; i++) {
      const char = line[i]!;
      if (char === '\\' && i + 1 < line.length) field += line[++i];
      else if (char === ':' && fields.length < 4) {
        fields.push(field);
        field = '';
      } else field += char;
    }
    fields.push(field);
    if (fields.length === 5 && wanted.every((value, i) => fields[i] === '*' || fields[i] === value)) return fields[4];
  }
  return undefined;
}

// ─── Connection: TLS (server verification, revocation lists, client certificates) ────────

/**
 * libpq's sslmode for node-postgres. The CA certificate is where libpq looks for it (the URL's
 * sslrootcert, PGSSLROOTCERT, else ~/.postgresql/root.crt): verify-ca and verify-full need it, and
 * require, as in libpq, verifies the chain against it when it exists, so that pg_dump never refuses a
 * server we sent the password to.
 */
async function sslOptions(config: DbConfig): Promise<pg.ClientConfig['ssl']> {
  const mode = config.sslmode;
  // libpq never uses TLS on a Unix socket (a host that is a directory), whatever the sslmode.
  if (mode === 'disable' || mode === 'allow' || config.host.startsWith('/')) return false;
  return { ...(await serverVerification(config)), ...(await clientCertificate(mode)) };
}

/** How the server's certificate is checked, by sslmode; see sslOptions. */
async function serverVerification(config: DbConfig): Promise<TlsOptions> {
  const mode = config.sslmode;
  // prefer (the default) encrypts without verifying.
  if (mode !== 'require' && mode !== 'verify-ca' && mode !== 'verify-full') return { rejectUnauthorized: false };
  const file = config.sslrootcert || process.env.PGSSLROOTCERT || path.join(os.homedir(), '.postgresql', 'root.crt');
  // libpq's "system": the default CA store (here Node's), the host name checked; see enforceableConfig.
  if (file === 'system') return { rejectUnauthorized: true, ...identityOf(config.host) };
  const ca = await fs.readFile(file, 'utf8').catch((error: unknown) => {
    if (mode === 'require' && ['ENOENT', 'ENOTDIR'].includes(errnoCode(error) ?? '')) return undefined;
    throw new BackupError(
      EXIT.CONNECTION,
      'TLS root certificate missing',
      `sslmode=${mode} needs the server's CA certificate, but ${file} cannot be read: ${errorText(error)}`,
      [
        'Point PGSSLROOTCERT at the CA certificate (PEM) that signed the server certificate',
        mode === 'require'
          ? `Or make ${file} readable, or remove it to encrypt without verifying the server`
          : 'Or use sslmode=require to encrypt without verifying the server',
      ],
    );
  });
  if (ca === undefined) return { rejectUnauthorized: false };
  // libpq checks revocation wherever it verifies against a CA file (so not with "system").
  const crl = await revocationLists();
  const verified: TlsOptions = { rejectUnauthorized: true, ca, ...(crl.length > 0 ? { crl } : {}) };
  // verify-ca (and require) check the chain only; verify-full also checks that the name matches the host.
  return mode !== 'verify-full'
    ? { ...verified, checkServerIdentity: () => undefined }
    : { ...verified, ...identityOf(config.host) };
}

/**
 * verify-full's check of the server's name, libpq's alone (Node's checkServerIdentity takes names libpq refuses):
 * against the configured host, an IP address included. Not as the TLS server name (SNI), which node-postgres sets
 * for a host name and may not be an IP address.
 */
function identityOf(host: string): Pick<TlsOptions, 'checkServerIdentity'> {
  return {
    checkServerIdentity: (_name, certificate) => {
      if (certificateNamesHost(host, certificate)) return undefined;
      const cn = [certificate.subject?.CN ?? []].flat()[0];
      const names = [certificate.subjectaltname, cn === undefined ? undefined : `CN ${cn}`].filter(Boolean);
      return new Error(
        `the server certificate's names (${names.join('; ') || 'none'}) do not name the host ${host} ` +
          '(as libpq matches them, for verify-full)',
      );
    },
  };
}

/** What a certificate names, as Node gives it: its subjectAltNames printed, and the subject (one CN or several). */
export interface CertificateNames {
  subjectaltname?: string | undefined;
  subject?: { CN?: string | string[] | undefined } | undefined;
}

/**
 * Whether the certificate names the host, by libpq's rule (PostgreSQL 15,
 * pgtls_verify_peer_name_matches_certificate_guts): the subjectAltNames in order until one matches, a dNSName
 * by name and an iPAddress by address; then the first CN, but only if no subjectAltName is of the host's own
 * type (iPAddress for an IP address, dNSName for a name). A name libpq cannot check (an embedded NUL, an
 * address neither IPv4 nor IPv6) ends the check, refused, as it does; so does an entry we cannot parse.
 */
export function certificateNamesHost(host: string, certificate: CertificateNames): boolean {
  const hostType = ipv4Number(host) !== undefined || isIpv6(host) ? 'IP Address' : 'DNS';
  let checkCn = true;
  const text = certificate.subjectaltname ?? '';
  // Node prints "DNS:a, IP Address:1.2.3.4", quoting a value with a comma (or worse) as a JSON string.
  const entry = /([^:,"]+):("(?:[^"\\]|\\.)*"|[^,"]*)(?:, |$)/y;
  while (entry.lastIndex < text.length) {
    const [, type, printed] = entry.exec(text) ?? [];
    const value = type === undefined ? undefined : unquoted(printed!);
    if (value === undefined) return false;
    if (type === hostType) checkCn = false;
    const verdict = type === 'DNS' ? nameVerdict(value, host) : type === 'IP Address' ? addressVerdict(value, host) : 0;
    if (verdict !== 0) return verdict === 1;
  }
  const cn = [certificate.subject?.CN ?? []].flat()[0];
  return checkCn && cn !== undefined && nameVerdict(cn, host) === 1;
}

/** A subjectAltName's value as Node printed it, unquoted; undefined if it does not parse. */
function unquoted(printed: string): string | undefined {
  if (!printed.startsWith('"')) return printed;
  try {
    return String(JSON.parse(printed));
  } catch {
    return undefined;
  }
}

/** libpq's answer for a name (pq_verify_peer_name_matches_certificate_name): 1 a match, 0 none, -1 refused. */
function nameVerdict(name: string, host: string): 1 | 0 | -1 {
  // CVE-2009-4034: a NUL would let "db.example.com\0.evil" pass for db.example.com.
  if (name.includes('\0')) return -1;
  const lower = (text: string) => text.replace(/[A-Z]/g, (c) => c.toLowerCase());
  if (lower(name) === lower(host)) return 1;
  // A wildcard only as a whole leading "*." standing for exactly one label (wildcard_certificate_match).
  const suffix = name.slice(1);
  const wildcard =
    name.length >= 3 && name.startsWith('*.') && name.length <= host.length && lower(host).endsWith(lower(suffix));
  return wildcard && host.indexOf('.') >= host.length - name.length ? 1 : 0;
}

/** libpq's answer for an iPAddress (pq_verify_peer_name_matches_certificate_ip), as Node prints one. */
function addressVerdict(address: string, host: string): 1 | 0 | -1 {
  const v4 = /^\d+\.\d+\.\d+\.\d+$/.test(address) ? ipv4Number(address) : undefined;
  if (v4 !== undefined) return v4 === ipv4Number(host) ? 1 : 0;
  // Node prints an IPv6 address as eight groups, and "<invalid length=N>" for any other length.
  if (!/^[0-9A-F]{1,4}(:[0-9A-F]{1,4}){7}$/.test(address)) return -1;
  const same = new BlockList();
  same.addAddress(address, 'ipv6');
  return isIpv6(host) && same.check(host, 'ipv6') ? 1 : 0;
}

/** An IPv6 address as inet_pton reads it (so no zone), the way libpq tells one from a name. */
function isIpv6(host: string): boolean {
  return !host.includes('%') && isIP(host) === 6;
}

/**
 * An IPv4 address as inet_aton reads it, which libpq uses on purpose, as one number: one to four numbers
 * (decimal, 0x hex or 0 octal), the last filling the bytes left ("127.1" is 127.0.0.1). Undefined if not one.
 */
function ipv4Number(host: string): number | undefined {
  const parts = host.split('.');
  if (parts.length > 4 || !parts.every((part) => /^(0x[0-9a-f]+|0[0-7]*|[1-9]\d*)$/i.test(part))) return undefined;
  const numbers = parts.map((part) => (/^0[0-7]/.test(part) ? parseInt(part, 8) : Number(part)));
  const last = numbers.pop()!;
  if (numbers.some((n) => n > 255) || last >= 256 ** (4 - numbers.length)) return undefined;
  return numbers.reduce((sum, n, i) => sum + n * 256 ** (3 - i), last);
}

/** The names `openssl rehash` gives CRLs (issuer hash, .r, a number): all libpq looks up in PGSSLCRLDIR. */
const HASHED_CRL_NAME = /^[0-9a-f]{8}\.r\d+$/;

/**
 * The certificate revocation lists libpq checks the server against: PGSSLCRL and those of PGSSLCRLDIR,
 * else ~/.postgresql/root.crl if it exists. Given any, libpq, as Node given `crl`, then wants a CRL from
 * the issuer of every certificate of the chain. A CRL file libpq cannot load makes it check none, silently;
 * we refuse it instead, so that a typo never turns revocation off for our sessions, which send the password.
 */
async function revocationLists(): Promise<string[]> {
  const { PGSSLCRL: file, PGSSLCRLDIR: dir } = process.env;
  if (!file && !dir) return crlsOf(path.join(os.homedir(), '.postgresql', 'root.crl'), { optional: true });
  // libpq finds nothing in a directory it cannot read, as in one without CRLs.
  const hashed = dir ? (await fs.readdir(dir).catch(() => [])).filter((name) => HASHED_CRL_NAME.test(name)) : [];
  const files = [...(file ? [file] : []), ...hashed.sort().map((name) => path.join(dir!, name))];
  const lists = (await Promise.all(files.map((each) => crlsOf(each)))).flat();
  // With no CRL at all, libpq refuses every server ("unable to get certificate CRL"): say why here.
  if (lists.length === 0) throw crlUnusable(`PGSSLCRLDIR ${dir} holds no CRL named as openssl rehash names them`);
  return lists;
}

/** The CRLs (PEM) in a file, one string each: Node's `crl` reads only the first of a string. */
async function crlsOf(file: string, { optional = false } = {}): Promise<string[]> {
  try {
    const handle = await openRegularFile(file);
    const text = await handle.readFile('utf8').finally(() => handle.close());
    const lists = text.match(/-----BEGIN X509 CRL-----[\s\S]*?-----END X509 CRL-----/g) ?? [];
    if (lists.length === 0) throw new Error('it holds no CRL (PEM, -----BEGIN X509 CRL-----)');
    // Parsed now, to name the file: Node would only fail at the connection, with no file named.
    for (const crl of lists) createSecureContext({ crl });
    return lists;
  } catch (error) {
    if (optional && ['ENOENT', 'ENOTDIR'].includes(errnoCode(error) ?? '')) return [];
    throw crlUnusable(`${file} cannot be used: ${errorText(error)}`);
  }
}

const crlUnusable = (details: string) =>
  new BackupError(EXIT.CONNECTION, 'TLS revocation list unusable', details, [
    'Point PGSSLCRL at the CRL (PEM) of the CA that signed the server certificate, as openssl ca -gencrl writes it',
    'PGSSLCRLDIR must hold CRLs (PEM) under the names openssl rehash gives them; unset what you do not use',
  ]);

/**
 * The client certificate libpq sends when the server asks for one: PGSSLCERT and PGSSLKEY, else
 * ~/.postgresql/postgresql.crt and .key. None when the certificate file is absent, as in libpq. A key
 * libpq would refuse (unreadable, or readable by others: more than 0600, 0640 if root owns it) fails
 * a connection that must use TLS; with prefer, the default, the certificate is left out instead,
 * since libpq then falls back to a connection without it (a server without TLS takes it so).
 */
async function clientCertificate(mode: SslMode | undefined): Promise<{ cert: string; key: string } | undefined> {
  const dir = path.join(os.homedir(), '.postgresql');
  const [certFile, keyFile] = [
    process.env.PGSSLCERT || `${dir}/postgresql.crt`,
    process.env.PGSSLKEY || `${dir}/postgresql.key`,
  ];
  const cert = await fs.readFile(certFile, 'utf8').catch(() => undefined);
  if (cert === undefined) return undefined;
  try {
    const handle = await openRegularFile(keyFile);
    try {
      const { mode: bits, uid } = await handle.stat();
      if (bits & (uid === 0 ? 0o037 : 0o077))
        throw new Error(`it is readable by others (mode ${(bits & 0o777).toString(8)}), which libpq refuses`);
      return { cert, key: await handle.readFile('utf8') };
    } finally {
      await handle.close();
    }
  } catch (error) {
    if (mode === undefined || mode === 'prefer') return undefined;
    throw new BackupError(
      EXIT.CONNECTION,
      'TLS client key unusable',
      `the client certificate ${certFile} is there, but its key ${keyFile} cannot be used: ${errorText(error)}`,
      ['Point PGSSLKEY at the private key (PEM) of the certificate PGSSLCERT names, mode 0600 (chmod 600)'],
    );
  }
}

// ─── Connection errors: exit codes and hints; server facts ───────────────────────────────

/** Pure: classify a connection failure (pg error codes and socket errors) into message + hints. */
export function connectionError(
  error: unknown,
  config: DbConfig,
  connectTimeoutSeconds = DEFAULT_CONNECT_TIMEOUT_S,
): BackupError {
  if (error instanceof BackupError) return error;
  const code = errnoCode(error);
  const message = errorText(error);
  const where = `connection to server at "${config.host}", port ${config.port} failed: ${message}`;
  const [host, user, database] = [config.host, config.user, config.database].map(shellWord);
  const psql = `psql -h ${host} -p ${config.port} -U ${user} -d ${database}`;
  const fail = (title: string, hints: string[]) => new BackupError(EXIT.CONNECTION, title, where, hints);

  if (code === '28P01' || code === '28000' || /password must be a string|password authentication/i.test(message)) {
    return fail('Database authentication failed', [
      ...(config.passwordMisread
        ? [
            `${config.origin.password} holds a '#' or quotes that the .env file does not read as part of the ` +
              `password ('#' starts a comment): write it in single quotes, ` +
              `${config.origin.password.split(' ')[0]}='…' (backquotes if it holds a single quote; ` +
              'in double quotes, \\n and \\r are read as line breaks)',
          ]
        : []),
      ...(/client certificate/i.test(message)
        ? ['The server wants a client certificate: PGSSLCERT and PGSSLKEY (else ~/.postgresql/postgresql.crt, .key)']
        : []),
      `Check the password in ${config.origin.password} and the user in ${config.origin.user}`,
      `Try the same credentials by hand: ${psql}`,
      'Check that pg_hba.conf allows this user from this host',
    ]);
  }
  if (code === '3D000') {
    return fail('Database does not exist', [
      `Verify the database exists: psql -h ${host} -p ${config.port} -U ${user} -l`,
      `Check the database name in ${config.origin.database}`,
      `Create it if needed: createdb -h ${host} -p ${config.port} -U ${user} ${database}`,
    ]);
  }
  if (code === 'ENOTFOUND' || code === 'EAI_AGAIN' || code === 'EAI_NONAME') {
    return fail('Database host not found', [
      `Check the host name in ${config.origin.host}`,
      `Check that it resolves: getent hosts ${host}`,
    ]);
  }
  if (code === 'ECONNREFUSED') {
    return fail('Database connection refused', [
      `Check that the server is running: pg_isready -h ${host} -p ${config.port}`,
      `Check the host and port in ${config.origin.host} and ${config.origin.port}`,
      "Check the server's listen_addresses and any firewall",
    ]);
  }
  if (code === 'ETIMEDOUT' || code === 'EHOSTUNREACH' || code === 'ENETUNREACH' || /timeout/i.test(message)) {
    return fail(`Database did not answer within ${connectTimeoutSeconds} s`, [
      `Check that the server is reachable: pg_isready -h ${host} -p ${config.port}`,
      'Check firewalls, VPNs and security groups between this machine and the server',
      `Check the host and port in ${config.origin.host} and ${config.origin.port}`,
    ]);
  }
  if (/certificate|self[- ]signed|SSL|TLS|CRL/i.test(message)) {
    const check = `Check the sslmode (${config.sslmode ?? 'prefer, the default'}) and the server's certificate`;
    if (config.sslrootcert === 'system')
      return fail('Database TLS connection failed', [
        check,
        "sslrootcert=system checks the server certificate against the default CA store (Node's list): " +
          'for a private CA, point PGSSLROOTCERT at its certificate (PEM) instead',
      ]);
    return fail('Database TLS connection failed', [
      check,
      ...(/\bCRL\b|revoked/.test(message)
        ? [
            'PGSSLCRL, PGSSLCRLDIR (else ~/.postgresql/root.crl) must hold a CRL from each CA of the chain; ' +
              'a revoked certificate is refused, as pg_dump refuses it',
          ]
        : []),
      'PGSSLROOTCERT (else ~/.postgresql/root.crt) must hold the CA that signed the server certificate: ' +
        'verify-ca and verify-full need it, and require checks the server against it when it exists',
      'If the server has no TLS, use sslmode=prefer or disable; if it requires TLS, use require or stricter',
    ]);
  }
  return fail('Database connection error', [
    `Try the same settings by hand: ${psql}`,
    `Check the settings in ${config.origin.host}, ${config.origin.database}, ${config.origin.user}`,
  ]);
}

/** Pure: the SQLSTATE of a server's error; undefined for any other (a lost connection, a timeout). */
function sqlStateOf(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  // SQLSTATEs hold a digit (3D000, 08006, XX000); errno codes such as EPIPE do not.
  return typeof code === 'string' && /^(?=.*\d)[0-9A-Z]{5}$/.test(code) ? code : undefined;
}

/** How a session's connection ends when the server, not the network, ends it; node-postgres adds its own words. */
const CONNECTION_LOST = /Connection terminated|server closed the connection|ECONNRESET|EPIPE|not queryable/i;

/**
 * Pure: a failure of the database (a pg error, or the connection lost under a query) as the
 * contract's error, or undefined if it is none. SQLSTATE classes decide the exit code and hints;
 * every command hands what it does not understand itself to this one function.
 */
export function databaseFailure(error: unknown, server?: Pick<DbConfig, 'host' | 'port'>): BackupError | undefined {
  const sqlstate = sqlStateOf(error);
  const message = errorText(error);
  if (!sqlstate && !CONNECTION_LOST.test(message)) return undefined;
  const where = server ? `${server.host}:${server.port}` : 'the database server';
  const serverLog = `Check the server log of ${where} around this time`;
  const fail = (exitCode: number, title: string, hints: string[]) =>
    new BackupError(exitCode, title, sqlstate ? `${message} (SQLSTATE ${sqlstate})` : message, hints);
  const constraint = (error as { constraint?: unknown }).constraint;

  if (sqlstate?.startsWith('08') && /could not connect to server "|foreign/i.test(message)) {
    return fail(EXIT.CONNECTION, 'A foreign server could not be reached', [
      'A query read a foreign table (postgres_fdw and the like) whose server did not answer; the message names it',
      'Check that server, or its CREATE SERVER / USER MAPPING settings',
    ]);
  }
  if (!sqlstate || sqlstate.startsWith('08') || ['57P01', '57P02', '57P03', '57P04'].includes(sqlstate)) {
    return fail(EXIT.CONNECTION, 'Database connection lost', [
      `The server ended this session: it restarted or shut down, or the session was terminated (pg_terminate_backend)`,
      serverLog,
      'Run it again once the server is back',
    ]);
  }
  if (sqlstate === '53300') {
    return fail(EXIT.CONNECTION, 'The server has no free connection', [
      'Wait for other sessions to end, or raise max_connections on the server',
      serverLog,
    ]);
  }
  const details = `${message} (SQLSTATE ${sqlstate})`;
  if (sqlstate === '42501') return privilegeError(details);
  if (sqlstate === '55P03') return lockedTableError(details);
  if (sqlstate === '53200') return lockSpaceError(details, (error as { hint?: unknown }).hint);
  if (sqlstate === '57014') {
    return fail(EXIT.BACKUP_FAILED, 'A query was cancelled', [
      'A statement timeout, or another session (pg_cancel_backend), ended it',
      serverLog,
    ]);
  }
  if (sqlstate === '42P04' || (sqlstate === '23505' && constraint === 'pg_database_datname_index')) {
    return fail(EXIT.CONFIG, 'The database was created by someone else at the same moment', [
      'Another run (or a person) created a database of this name while this one was starting',
      'Restore into another database name, or wait for the other run and use --clean to replace it',
    ]);
  }
  if (sqlstate === '53100') {
    return fail(EXIT.DISK_SPACE, "The database server's disk is full", [
      `Free space on ${where} (df -h on its data directory)`,
      serverLog,
    ]);
  }
  if (sqlstate === '42P01') {
    return fail(EXIT.BACKUP_FAILED, 'A table was dropped while this run used it', [
      'Another session dropped or renamed a table after this run listed it (a deployment, a migration)',
      'Run it again once no DDL runs; schedule backups outside deployments',
    ]);
  }
  if (sqlstate === '40001' || sqlstate === '40P01') {
    return fail(EXIT.BACKUP_FAILED, 'A query lost a conflict with another session', [
      'Run it again; such conflicts are transient',
      serverLog,
    ]);
  }
  return fail(EXIT.BACKUP_FAILED, 'A database query failed', [
    serverLog,
    'Run it again; if it fails the same way, the message names the cause',
  ]);
}

/** The server's words for refusing a new session while it starts, stops or recovers (SQLSTATE 57P03). */
const SERVER_NOT_READY =
  'the database system is (shutting down|starting up|in recovery mode|not yet accepting connections)';

/** libpq's and the server's words for a client tool's session that its server ended, or would not start. */
const TOOL_CONNECTION_LOST = new RegExp(
  [
    'terminating connection due to (administrator command|unexpected postmaster exit|immediate shutdown)',
    'Connection refused',
    'Is the server running',
    'server closed the connection unexpectedly',
    'no connection to the server',
    'could not (send|receive) data (to|from) server',
    'SSL SYSCALL error',
    SERVER_NOT_READY,
  ].join('|'),
);

/**
 * Pure: pg_dump's or pg_restore's connection lost, or none to be had, in libpq's and the server's words: a
 * connection error (exit 3) like our own session's, not a failure of the tool. With --jobs, each job is a
 * connection of its own.
 */
export function toolConnectionError(tool: 'pg_dump' | 'pg_restore', details: string): BackupError | undefined {
  if (/too many connections for (role|database)|too many clients already|connection slots are reserved/.test(details)) {
    return new BackupError(EXIT.CONNECTION, `No free connection for ${tool}`, details, [
      "The CONNECTION LIMIT of the role (or database) and the server's free connections must allow this tool's " +
        `session and ${tool}'s: one, or ${tool === 'pg_dump' ? 'N + 1' : 'N'} with --jobs N (then lower --jobs)`,
      'Or raise the limit: ALTER ROLE <user> CONNECTION LIMIT <n>, or max_connections on the server',
    ]);
  }
  if (!TOOL_CONNECTION_LOST.test(details)) return undefined;
  return new BackupError(EXIT.CONNECTION, `${tool} lost its connection to the server`, details, [
    'The server ended the session: it restarted or shut down, or the session was terminated (pg_terminate_backend)',
    'Check the server log around this time',
    'Run it again once the server is back',
  ]);
}

/**
 * The same failure whether pg_dump or the tool's own session meets it first, with the hints for what it names:
 * data a backup reads gets no restore hint. A large object has privileges of its own, which neither a table's
 * GRANT nor (before PostgreSQL 19) pg_read_all_data gives; pg_dump stops at the first one it may not read.
 */
function privilegeError(details: string, user?: string): BackupError {
  const largeObject = /permission denied for large object (\d+)/i.exec(details)?.[1];
  const role = user ? quoteIdentifier(user) : '<user>';
  const hints = largeObject
    ? [
        `To back up: GRANT SELECT ON LARGE OBJECT ${largeObject} TO ${role} (as a superuser or the large object's ` +
          'owner), or back up as a superuser',
        "pg_dump stops at the first it cannot read; the others' owners: SELECT oid, lomowner::regrole FROM " +
          'pg_largeobject_metadata',
      ]
    : [
        'To back up: GRANT SELECT ON ALL TABLES IN SCHEMA <schema> TO <user> (and USAGE on the schema and its ' +
          'sequences), or use the owner or a member of pg_read_all_data',
      ];
  if (!/permission denied for (table|view|materialized view|foreign table|sequence|schema|large object)/i.test(details))
    hints.push(
      'To restore: the user needs CREATEDB (ALTER ROLE <user> CREATEDB), or restore into an empty database it owns',
    );
  return new BackupError(EXIT.PERMISSION, 'The database user lacks a privilege', details, hints);
}

function lockedTableError(details: string): BackupError {
  return new BackupError(EXIT.BACKUP_FAILED, 'A table is locked', details, [
    'Another session holds or awaits an exclusive lock (ALTER TABLE, TRUNCATE, VACUUM FULL, ...) for longer than ' +
      '--lock-wait-timeout; see pg_locks / pg_stat_activity',
    'Run it again when that session has finished',
  ]);
}

/** Out of shared memory: for a backup, the lock table, which must hold a lock per table in two sessions. */
function lockSpaceError(details: string, serverHint?: unknown): BackupError {
  return new BackupError(EXIT.BACKUP_FAILED, 'The database server ran out of lock space', details, [
    ...(typeof serverHint === 'string' && serverHint ? [`The server says: ${serverHint}`] : []),
    "A backup locks every table and partition in two sessions, pg_dump's session and the one counting rows: the " +
      "server's lock table (max_locks_per_transaction × (max_connections + max_prepared_transactions) locks, shared " +
      'by all sessions) needs room for about twice the number of tables and partitions',
    'Raise it (ALTER SYSTEM SET max_locks_per_transaction = …, then restart the server) and run it again',
  ]);
}

export interface ServerInfo {
  version: string;
  major: number;
  /** server_version_num: 150018 for 15.18. */
  num: number;
}

async function readServerInfo(client: pg.Client): Promise<ServerInfo> {
  const { rows } = await client.query<{ version: string; num: number }>(
    "SELECT current_setting('server_version') AS version, current_setting('server_version_num')::int AS num",
  );
  const row = rows[0]!;
  // server_version may carry a packager suffix ("15.18 (Debian 15.18-0+deb12u1)"); the metadata wants "15.18".
  return { version: row.version.split(' ')[0]!, major: Math.floor(row.num / 10000), num: row.num };
}

// ─── Backup names ────────────────────────────────────────────────────────────────────────

/** "2025-01-27T14:30:00Z": the metadata's backup_timestamp, whole seconds. */
export function isoSeconds(date: Date): string {
  return date.toISOString().replace(/\.\d{3}Z$/, 'Z');
}

/**
 * A database name as a file-name part, injectively, so that distinct databases never share a lock
 * or a file: letters, digits, '_', '-' and (but first) '.' stay; anything else, '%' included,
 * becomes %XX of its UTF-8 bytes ("a b" → "a%20b", never "a_b"). Case-insensitive file systems
 * (macOS) would still fold "App" onto "app", so a name with capitals also gets a short hash of
 * itself. Names are at most 63 bytes (validateName), so this stays far below 255 bytes.
 */
export function fileNamePart(name: string): string {
  const encoded = [...name]
    .map((char, i) => (/^[\p{L}\p{N}_-]$/u.test(char) || (char === '.' && i > 0) ? char : percentEncode(char)))
    .join('');
  return name.toLowerCase() === name
    ? encoded
    : `${encoded}~${createHash('sha256').update(name).digest('hex').slice(0, 8)}`;
}

const percentEncode = (char: string) =>
  [...Buffer.from(char)].map((byte) => `%${byte.toString(16).toUpperCase().padStart(2, '0')}`).join('');

/** Pure: the database name a file-name part stands for (the inverse of fileNamePart). */
export function databaseFromFileNamePart(part: string): string {
  const name = part.replace(/~[0-9a-f]{8}$/, '');
  try {
    return decodeURIComponent(name);
  } catch {
    return name; // not written by this tool
  }
}

/** A regular expression source for a backup's stem; groups: name part, environment, day, hours, minutes, seconds. */
function backupStemPattern(namePart = '.+', environment = 'dev|prod'): string {
  return String.raw`(${namePart})_(${environment})_(\d{4}-\d{2}-\d{2})T(\d{2})-(\d{2})-(\d{2})Z`;
}

/** `{database}_{env}_{YYYY-MM-DDTHH-MM-SSZ}.dump` */
export function backupFileName(database: string, environment: Environment, date: Date): string {
  return `${fileNamePart(database)}_${environment}_${isoSeconds(date).replaceAll(':', '-')}${DUMP_SUFFIX}`;
}

/**
 * Pure: refuse a clock outside the years 1970 to 9999, which backup names and metadata timestamps
 * cannot hold (year 10000 prints as "+010000"): a backup named after it would fall outside the spec.
 */
function assertClockUsable(now: Date, named = now): void {
  const year = named.getUTCFullYear();
  if (year >= 1970 && year <= 9999) return;
  // The seconds taken before it can push a backup's name past the clock's own second, and past 9999.
  const pushed = named === now ? '' : `, and the first free backup name is dated ${named.toISOString()}`;
  throw new BackupError(
    EXIT.BACKUP_FAILED,
    'The system clock is wrong',
    `the system clock says ${now.toISOString()}${pushed}: backups are named after the time, in the years 1970 to 9999`,
    ['Fix the clock (timedatectl status; chronyc tracking), then run the backup again'],
  );
}

const BACKUP_NAME = new RegExp(
  `^${backupStemPattern()}${escapeRegExp(DUMP_SUFFIX)}(?:${escapeRegExp(PARTIAL_SUFFIX)})?$`,
);

/** Pure: what a file name says (the inverse of backupFileName), for files without (valid) metadata. */
export function parseBackupFileName(name: string) {
  const match = BACKUP_NAME.exec(name);
  if (!match) return undefined;
  const [, database, environment, day, hh, mm, ss] = match;
  return {
    database: databaseFromFileNamePart(database!),
    environment: environment as Environment,
    timestamp: `${day}T${hh}:${mm}:${ss}Z`,
  };
}

/** Pure: the stem of any backup of this database, for finding what its interrupted runs left. */
function backupStemOf(config: Pick<DbConfig, 'database' | 'environment'>): string {
  return backupStemPattern(escapeRegExp(fileNamePart(config.database)), config.environment);
}

export function metadataFileName(dumpFileName: string): string {
  return dumpFileName.slice(0, -DUMP_SUFFIX.length) + METADATA_SUFFIX;
}

/**
 * Claim a name by creating its `.partial` exclusively: a file (O_EXCL, 0600), or an empty directory
 * (0700) for a directory-format dump, which pg_dump accepts. Names have one-second resolution: if a
 * backup of this database holds this second, take the next free one; nothing is overwritten.
 */
async function reserveBackupName(
  dir: string,
  database: string,
  environment: Environment,
  start: Date,
  format: DumpFormat,
): Promise<{ name: string; timestamp: Date; dumpPath: string; partialPath: string }> {
  for (let offset = 0; offset < 60; offset++) {
    const timestamp = new Date(Math.floor(start.getTime() / 1000) * 1000 + offset * 1000);
    assertClockUsable(start, timestamp);
    const name = backupFileName(database, environment, timestamp);
    const dumpPath = path.join(dir, name);
    const partialPath = dumpPath + PARTIAL_SUFFIX;
    if (await pathExists(dumpPath)) continue;
    try {
      if (format === 'directory') await fs.mkdir(partialPath, { mode: 0o700 });
      else await (await fs.open(partialPath, 'wx', 0o600)).close();
      return { name, timestamp, dumpPath, partialPath };
    } catch (error) {
      if (errnoCode(error) !== 'EEXIST') throw fileSystemError(error, 'Cannot create the backup file', dir);
    }
  }
  throw new BackupError(
    EXIT.BACKUP_FAILED,
    'Backup failed',
    `no free backup file name for ${database} in ${displayPath(dir)}`,
    [`Look for leftover *${PARTIAL_SUFFIX} files in ${displayPath(dir)}`],
  );
}

// ─── Dump: tables and row counts ─────────────────────────────────────────────────────────

/** SQL: relation `c`, in schema `n`, is the user's: not temporary, in no system schema, no extension's own. */
const USER_RELATION_SQL = `c.relpersistence <> 't' AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
     AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend dep
                      WHERE dep.classid = 'pg_catalog.pg_class'::regclass AND dep.objid = c.oid AND dep.deptype = 'e')`;

/**
 * Every user table pg_dump writes data for: all schemas but the system ones; partitioned tables
 * once (their partitions count through the parent); no temp tables nor tables owned by extensions.
 * The server quotes identifiers (format %I); nothing is pasted. data_oids are the relations whose
 * TABLE DATA the archive must hold (the table, or a partitioned table's leaves through pg_inherits,
 * which every server version has); copy_sql counts exactly those: a foreign table attached as a
 * partition is not dumped, so its remote rows must not count. Each is read as pg_dump reads it, by a
 * COPY (of a narrow column), never by a count(*): planning one constant-folds the table's index
 * expressions and predicates and its statistics' expressions (plancat.c), running the database's own
 * functions as this role, and from the catalog as it is then, not as the snapshot saw it (an index
 * made meanwhile would be planned, unchecked). data_bytes (heap + TOAST; pg_dump
 * copies no indexes) and data_rows are catalog estimates (relpages, reltuples, kept by
 * VACUUM/ANALYZE): pg_table_size() would lock every table, queueing behind any exclusive lock
 * before pg_dump even starts, and the snapshot gives exact counts later. A hot standby holds no
 * unlogged relation's data: pg_dump leaves it out there, and so do these (unlogged_left_out says so).
 */
const LIST_TABLES_SQL = `
  SELECT n.nspname AS schema, c.relname AS table,
         coalesce(pg_catalog.array_to_json(d.copies), '[]') AS copy_sql,
         coalesce(pg_catalog.array_to_json(d.oids), '[]') AS data_oids,
         d.bytes::float8 AS data_bytes,
         d.rows::float8 AS data_rows,
         coalesce(d.left_out, false) AS unlogged_left_out
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    CROSS JOIN LATERAL (
      SELECT pg_catalog.array_agg(leaf.oid::int8 ORDER BY leaf.oid) FILTER (WHERE s.dumped) AS oids,
             pg_catalog.array_agg(pg_catalog.format('COPY %I.%I%s TO STDOUT (ENCODING ''SQL_ASCII'')',
                                                    ln.nspname, leaf.relname, r.columns)
               ORDER BY leaf.oid) FILTER (WHERE s.dumped) AS copies,
             coalesce(pg_catalog.sum(leaf.relpages + coalesce(toast.relpages, 0)) FILTER (WHERE s.dumped), 0)
               * pg_catalog.current_setting('block_size')::int8 AS bytes,
             coalesce(pg_catalog.sum(greatest(leaf.reltuples, 0)) FILTER (WHERE s.dumped), 0) AS rows,
             pg_catalog.bool_or(NOT s.dumped) AS left_out
        FROM (WITH RECURSIVE tree(relid) AS (
                SELECT c.oid
                UNION ALL
                SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.relid
                 WHERE c.relkind = 'p')
              SELECT relid FROM tree) AS t
        JOIN pg_catalog.pg_class leaf ON leaf.oid = t.relid AND leaf.relkind = 'r'
        JOIN pg_catalog.pg_namespace ln ON ln.oid = leaf.relnamespace
        LEFT JOIN pg_catalog.pg_class toast ON toast.oid = leaf.reltoastrelid
        -- pg_dump on a standby (pg_dump.c: isStandby) skips unlogged tables' data, which it could not read.
        CROSS JOIN LATERAL (SELECT leaf.relpersistence <> 'u' OR NOT pg_catalog.pg_is_in_recovery() AS dumped) AS s
        CROSS JOIN LATERAL (
          -- The smallest fixed-size column keeps the stream small (COPY refuses generated ones);
          -- none: no column list, one empty line a row.
          SELECT coalesce((SELECT pg_catalog.format(' (%I)', a.attname)
                             FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid
                            WHERE a.attrelid = leaf.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                            ORDER BY ty.typlen < 1, ty.typlen, a.attnum LIMIT 1), '') AS columns) AS r) AS d
   WHERE c.relkind IN ('r', 'p')
     AND NOT c.relispartition
     AND ${USER_RELATION_SQL}
   ORDER BY n.nspname, c.relname`;

/**
 * `table_counts` key: the bare name in public, `schema.table` elsewhere. A part holding a '.' or
 * starting with '"' is quoted as SQL quotes it, so that no two tables share a key: public
 * "coll.t" is `"coll.t"` while coll.t is `coll.t`.
 */
export function tableKey(schema: string, table: string): string {
  const part = (name: string) => (name.includes('.') || name.startsWith('"') ? quoteIdentifier(name) : name);
  return schema === 'public' ? part(table) : `${part(schema)}.${part(table)}`;
}

interface UserTable {
  schema: string;
  table: string;
  copy_sql: string[];
  data_oids: number[];
  data_bytes: number;
  data_rows: number;
  /** On a hot standby: some of its data is unlogged, so neither dumped nor counted. */
  unlogged_left_out: boolean;
}

/**
 * The tables to back up. None at all almost always means the wrong database (and the data model
 * requires at least one table), so refuse before anything is written.
 */
async function listUserTables(client: pg.Client, config: DbConfig): Promise<UserTable[]> {
  const rows = await readUserTables(client, config.database);
  if (rows.length > 0) return rows;
  throw new BackupError(
    EXIT.BACKUP_FAILED,
    'Nothing to back up',
    `database "${config.database}" on ${config.host}:${config.port} has no tables`,
    [
      `Check that ${config.origin.database} names the application's database`,
      `List the tables: psql -h ${shellWord(config.host)} -p ${config.port} -U ${shellWord(config.user)} ` +
        `-d ${shellWord(config.database)} -c '\\dt *.*'`,
    ],
  );
}

/** LIST_TABLES_SQL's rows; in a SQL_ASCII database, once no name the session cannot read is found. */
async function readUserTables(client: pg.Client, database: string): Promise<UserTable[]> {
  const { rows } = await client.query<{ encoding: string }>('SELECT pg_catalog.getdatabaseencoding() AS encoding');
  if (rows[0]?.encoding === 'SQL_ASCII') await refuseNamesNotUtf8(client, database);
  return (await client.query<UserTable>(LIST_TABLES_SQL)).rows;
}

/**
 * Schemas, tables and columns holding a byte past ASCII, by their bytes: a SQL_ASCII database stores
 * names unchecked, and the server refuses to send one that is not UTF-8 to a UTF-8 session (22021).
 */
const TABLE_NAMES_AS_BYTES_SQL = `
  SELECT pg_catalog.convert_to(n.nspname::text, 'SQL_ASCII') AS schema,
         pg_catalog.convert_to(c.relname::text, 'SQL_ASCII') AS table,
         pg_catalog.convert_to(a.attname::text, 'SQL_ASCII') AS column
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
   WHERE c.relkind IN ('r', 'p') AND ${USER_RELATION_SQL}
     AND (n.nspname || c.relname || coalesce(a.attname, '')) ~ '[^\x01-\x7f]'
   ORDER BY 1, 2, 3`;

/**
 * A name that is not UTF-8 can be neither read nor sent back in a COPY: pg_dump, which reads the
 * database's own encoding, could dump such a table, but this tool could not count it. Refused, named.
 */
async function refuseNamesNotUtf8(client: pg.Client, database: string): Promise<void> {
  const { rows } = await client.query<Record<'schema' | 'table', Buffer> & { column: Buffer | null }>(
    TABLE_NAMES_AS_BYTES_SQL,
  );
  const shown = (raw: Buffer) => utf8FileName(raw) ?? `"${bytesShown(raw)}"`;
  const tableOf = (row: (typeof rows)[number]) =>
    `${utf8FileName(row.schema) === 'public' ? '' : `${shown(row.schema)}.`}${shown(row.table)}`;
  const names = new Set<string>();
  for (const row of rows) {
    if (!utf8FileName(row.schema) || !utf8FileName(row.table)) names.add(`table ${tableOf(row)}`);
    else if (row.column && !utf8FileName(row.column)) names.add(`column ${shown(row.column)} of table ${tableOf(row)}`);
  }
  if (names.size === 0) return;
  throw new BackupError(
    EXIT.BACKUP_FAILED,
    'Names this tool cannot read in a SQL_ASCII database',
    `"${visibleControls(database)}" has ${plural(names.size, 'name')} that ${names.size === 1 ? 'is' : 'are'} ` +
      `not UTF-8, the only encoding this tool's sessions read: ${listSome([...names])}`,
    [
      'Rename them to UTF-8 names, as their owner: ALTER TABLE … RENAME (TO | COLUMN … TO) …, ' +
        "in psql after SET client_encoding = 'SQL_ASCII'",
      'Or back it up with pg_dump -Fc directly, without the counts and checks of this tool',
    ],
  );
}

/** Pure: the metadata's note of the tables whose unlogged rows a backup from a standby leaves out; none elsewhere. */
function unloggedDataLeftOut(tables: UserTable[]): Pick<BackupMetadata, 'unlogged_data_left_out'> {
  const names = tables.filter((t) => t.unlogged_left_out).map((t) => tableKey(t.schema, t.table));
  return names.length > 0 ? { unlogged_data_left_out: names } : {};
}

/**
 * The relations whose rows row-level security would hide from this role: pg_dump turns row
 * security off and then fails on them, and the counts would silently leave rows out. Owners are
 * exempt unless FORCE ROW LEVEL SECURITY; superusers and BYPASSRLS roles always are.
 */
const RLS_HIDDEN_SQL = `
  SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) AS name, c.relforcerowsecurity AS forced, c.oid
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
   WHERE c.oid = ANY($1::oid[]) AND c.relrowsecurity
     AND NOT (SELECT rolsuper OR rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user)
     AND (c.relforcerowsecurity OR NOT pg_catalog.pg_has_role(c.relowner, 'USAGE'))
   ORDER BY 1`;

/** Refuse, before anything is written, a backup that row-level security would make incomplete (exit 4). */
async function assertNoRowSecurity(client: pg.Client, config: DbConfig, tables: UserTable[]): Promise<void> {
  const { rows } = await client.query<{ name: string; forced: boolean }>(RLS_HIDDEN_SQL, [
    tables.flatMap((t) => t.data_oids),
  ]);
  if (rows.length === 0) return;
  const forced = rows.filter((row) => row.forced);
  const why =
    forced.length > 0 ? ` (forced on ${forced.length}, which binds the owner too)` : ', which it does not own';
  throw new BackupError(
    EXIT.PERMISSION,
    'Row-level security would hide rows from the backup',
    `role "${config.user}" does not bypass row-level security, which applies to it on ` +
      `${plural(rows.length, 'table')}${why}: ${listSome(rows.map((row) => row.name))}`,
    [
      `Back up with a role that has BYPASSRLS (as a superuser: ALTER ROLE ${quoteIdentifier(config.user)} BYPASSRLS)`,
      'Or back up with a superuser',
      ...(forced[0]
        ? [
            `For tables the role owns that FORCE row-level security: ALTER TABLE ${forced[0].name} ` +
              'NO FORCE ROW LEVEL SECURITY',
          ]
        : []),
    ],
  );
}

/**
 * What pg_dump will read and this role may not: the tables counted (a partitioned one's leaves and itself,
 * which pg_dump locks), the user sequences, or their schema (USAGE). pg_dump stops at the first of them;
 * all are named at once, with the GRANTs. Column privileges do not do: pg_dump copies whole tables.
 */
const UNREADABLE_SQL = `
  SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) AS name, pg_catalog.quote_ident(n.nspname) AS schema,
         c.relkind = 'S' AS sequence, pg_catalog.has_schema_privilege(n.oid, 'USAGE') AS usage
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
   WHERE (c.oid = ANY($1::oid[])
          OR (n.nspname, c.relname) IN
             (SELECT * FROM ROWS FROM (pg_catalog.unnest($2::text[]), pg_catalog.unnest($3::text[])))
          OR c.relkind = 'S' AND ${USER_RELATION_SQL})
     AND NOT (pg_catalog.has_schema_privilege(n.oid, 'USAGE') AND pg_catalog.has_table_privilege(c.oid, 'SELECT'))
   ORDER BY 1`;

/** Refuse, before anything is written, a backup pg_dump would stop for want of a privilege (exit 4). */
async function assertReadable(client: pg.Client, config: DbConfig, tables: UserTable[]): Promise<void> {
  const { rows } = await client.query<{ name: string; schema: string; sequence: boolean; usage: boolean }>(
    UNREADABLE_SQL,
    [tables.flatMap((t) => t.data_oids), tables.map((t) => t.schema), tables.map((t) => t.table)],
  );
  if (rows.length === 0) return;
  const role = quoteIdentifier(config.user);
  const grant = (what: string, names: string[]) =>
    names.length ? [`GRANT ${what} ${names.join(', ')} TO ${role};`] : [];
  const named = (sequence: boolean) => rows.filter((r) => r.sequence === sequence).map((r) => r.name);
  const grants = [
    ...grant('USAGE ON SCHEMA', [...new Set(rows.filter((r) => !r.usage).map((r) => r.schema))]),
    ...grant('SELECT ON TABLE', named(false)),
    ...grant('SELECT ON SEQUENCE', named(true)),
  ];
  throw new BackupError(
    EXIT.PERMISSION,
    'The database user lacks a privilege',
    `role "${config.user}" may not read ${plural(rows.length, 'relation')}: ${listSome(rows.map((r) => r.name))}`,
    [
      `To back up, as their owner or a superuser: ${grants.join(' ')}`,
      'Or back up as their owner, a superuser or a member of pg_read_all_data',
    ],
  );
}

/**
 * The statement locking every relation counted (`ONLY`: exactly those) in pg_dump's order; the server
 * quotes names. NULL when none holds data (a partitioned table without partitions): nothing to lock.
 */
const LOCK_COUNTED_SQL = `
  SELECT 'LOCK TABLE ' ||
         pg_catalog.string_agg(pg_catalog.format('ONLY %I.%I', n.nspname, c.relname), ', ' ORDER BY c.oid) ||
         ' IN ACCESS SHARE MODE' AS sql
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
   WHERE c.oid = ANY($1::oid[])`;

async function lockStatement(client: pg.Client, tables: UserTable[]): Promise<string | null> {
  const { rows } = await client.query<{ sql: string | null }>(LOCK_COUNTED_SQL, [tables.flatMap((t) => t.data_oids)]);
  return rows[0]!.sql;
}

/**
 * Exact row counts of every table, read inside the caller's snapshot transaction, after `lock`
 * (lockStatement), which is sent at the call: call it before pg_dump starts. TRUNCATE is not
 * MVCC-safe: one queued behind pg_dump's lock and committed before a count took its own would
 * show our snapshot an empty table whose rows the dump holds. Taken ahead of pg_dump, in its
 * order, our locks make a TRUNCATE wait for this transaction; the worst left is pg_dump waiting
 * behind it (a clean "A table is locked"). Not awaited before pg_dump starts, so that a lock held
 * elsewhere keeps pg_dump waiting on it, where --stall-timeout and the messages look.
 */
async function countRows(
  client: pg.Client,
  tables: UserTable[],
  lock: string | null,
  onCounted: () => void,
): Promise<Record<string, number>> {
  if (lock) await client.query(lock);
  const counts: Array<[string, number]> = [];
  for (const table of tables) {
    counts.push([tableKey(table.schema, table.table), await tableRows(client, table)]);
    onCounted();
  }
  // fromEntries defines own properties: a table called "__proto__" is a key like any other.
  return Object.fromEntries(counts);
}

/**
 * One table's rows: the lines of each of its COPYs (text COPY escapes the newlines in values). They write
 * the server's own bytes (ENCODING 'SQL_ASCII': no conversion), as a SQL_ASCII database may hold bytes no
 * conversion to UTF-8 accepts; every server encoding is ASCII-safe, so a newline byte is a newline. The
 * statement itself, naming the table, is read in the session's UTF-8 like any other.
 */
async function tableRows(client: pg.Client, table: UserTable): Promise<number> {
  let rows = 0;
  const { to: copyTo } = await import('pg-copy-streams');
  for (const sql of table.copy_sql) {
    // Streamed and counted chunk by chunk: memory stays flat, whatever the table's size.
    for await (const chunk of client.query(copyTo(sql)) as AsyncIterable<Buffer>)
      for (let at = chunk.indexOf(10); at !== -1; at = chunk.indexOf(10, at + 1)) rows++;
  }
  return rows;
}

// ─── Dump: pg_dump, streamed through SHA-256 ─────────────────────────────────────────────

/**
 * pg_dump waiting, through any chain of sessions, for one (TRUNCATE, ALTER TABLE) that waits for
 * this backup's own session, which holds its table locks until pg_dump ends: a cycle through this
 * process, which the server's deadlock detector cannot see. Names the session waiting on ours.
 */
const LOCK_CYCLE_SQL = `
  WITH RECURSIVE chain(pid, seen) AS (
    SELECT b.pid, ARRAY[b.pid]
      FROM pg_catalog.pg_stat_activity d
     CROSS JOIN LATERAL pg_catalog.unnest(pg_catalog.pg_blocking_pids(d.pid)) AS b(pid)
     WHERE d.application_name = $1
    UNION ALL
    SELECT n.pid, c.seen || n.pid
      FROM chain c CROSS JOIN LATERAL pg_catalog.unnest(pg_catalog.pg_blocking_pids(c.pid)) AS n(pid)
     WHERE n.pid <> ALL (c.seen) AND pg_catalog.cardinality(c.seen) < 50)
  SELECT w.pid, w.query_start::text AS since, pg_catalog.left(w.query, 200) AS query
    FROM chain c JOIN pg_catalog.pg_stat_activity w ON w.pid = c.pid
   WHERE pg_catalog.pg_backend_pid() = ANY (pg_catalog.pg_blocking_pids(c.pid))
   LIMIT 1`;

/** How long the same session must stay in the cycle: one with a lock_timeout of its own gives up first. */
const LOCK_CYCLE_GRACE_MS = 10_000;

/**
 * With --lock-wait-timeout 0 (pg_dump's lock waits are otherwise bounded, cycle or not), look for
 * that cycle every second while pg_dump runs, and fail once the same session has stayed in it for
 * LOCK_CYCLE_GRACE_MS. pg_stat_activity is read afresh each time (else kept for the transaction).
 */
async function refuseLockCycle(client: pg.Client, dumping: Promise<unknown>): Promise<void> {
  let ended = false;
  const end = dumping.catch(() => undefined).then(() => (ended = true));
  let seen: { key: string; at: number } | undefined;
  while (!ended) {
    await client.query('SELECT pg_catalog.pg_stat_clear_snapshot()');
    const { rows } = await client.query<CycleWaiter>(LOCK_CYCLE_SQL, [PG_DUMP_APPLICATION_NAME]);
    const key = rows[0] && `${rows[0].pid} ${rows[0].since}`;
    if (!key) seen = undefined;
    else if (seen?.key !== key) seen = { key, at: performance.now() };
    else if (millisecondsSince(seen.at) >= LOCK_CYCLE_GRACE_MS) throw lockCycleError(rows[0]!);
    await Promise.race([end, delay(1000, undefined, { ref: false })]);
  }
}

interface CycleWaiter {
  pid: number;
  since: string;
  query: string;
}

function lockCycleError(waiter: CycleWaiter): BackupError {
  return new BackupError(
    EXIT.BACKUP_FAILED,
    'A table is locked',
    `session ${waiter.pid} (${foreignQuery(waiter.query)}) waits for a table the backup has counted, and pg_dump ` +
      'waits behind it: neither can go on',
    [
      'That session asked for an exclusive lock (TRUNCATE, ALTER TABLE, ...) after the backup had begun',
      `Run the backup again once it has finished, or end it first: SELECT pg_terminate_backend(${waiter.pid});`,
    ],
  );
}

export function pgDumpArgs(snapshot: string, compression: Compression, lockWaitTimeoutMs: number, jobs = 1): string[] {
  // The connection (and the password) travel in the environment: see libpqEnv. Parallel workers
  // all import the same snapshot.
  const format = jobs > 1 ? ['--format=directory', `--jobs=${jobs}`] : ['--format=custom'];
  return [
    ...format,
    `--compress=${compression.arg}`,
    '--no-owner',
    '--no-acl',
    `--snapshot=${snapshot}`,
    `--lock-wait-timeout=${lockWaitTimeoutMs}`,
  ];
}

interface DumpOutcome {
  sha256: string;
  size: number;
}

/**
 * Run pg_dump and stream its stdout through SHA256 into the partial file, with back-pressure, so
 * memory stays flat whatever the size. Writing through a pipe (rather than `pg_dump -f`) leaves
 * the archive without data offsets; pg_restore -j still restores it in parallel (measured: same
 * time), only size-based job ordering is lost, and we avoid reading the whole file a second time.
 */
async function streamPgDump(
  pgDump: PgTool,
  args: string[],
  env: Record<string, string>,
  partialPath: string,
  signal: AbortSignal,
): Promise<DumpOutcome> {
  const hash = createHash('sha256');
  let size = 0;
  const tap = new Transform({
    transform(chunk: Buffer, _encoding, done) {
      hash.update(chunk);
      size += chunk.length;
      done(null, chunk);
    },
  });
  // r+: the file reserveBackupName made, never a new one where it went missing (its directory removed meanwhile);
  // opened before pg_dump starts, so that what it writes goes to that file wherever the directory is moved.
  const file = await fs.open(partialPath, 'r+').catch((error: unknown) => {
    throw fileSystemError(error, 'Writing the backup file failed', path.dirname(partialPath));
  });
  const stopDump = new AbortController();
  const { child } = await startTethered(pgDump.path, args, AbortSignal.any([signal, stopDump.signal]), {
    env,
    stdin: 'ignore',
    buffer: { stdout: false, stderr: true },
  }).catch(async (error: unknown) => {
    await file.close();
    throw error;
  });
  const written = pipeline(child.stdout, tap, file.createWriteStream({ flush: true })).catch((error: unknown) => {
    stopDump.abort(); // the file side failed (disk full, ...): stop pg_dump rather than let it block
    throw error;
  });
  const [write, dump] = await Promise.allSettled([written, child]);

  if (signal.aborted) throw signal.reason;
  if (write.status === 'rejected')
    throw fileSystemError(write.reason, 'Writing the backup file failed', path.dirname(partialPath));
  if (dump.status === 'rejected') throw pgDumpError(dump.reason, path.dirname(partialPath), env.PGUSER);
  return { sha256: hash.digest('hex'), size };
}

/** What an interrupt's message claims, dropped (notCleanedUp) where the run left something behind. */
const CLEANED_UP = ' and cleaned up after itself';
const notCleanedUp = (details: string) => details.replace(CLEANED_UP, '');

function interruptedError(signal: InterruptSignal): BackupError {
  return new BackupError(
    EXIT[signal],
    `Interrupted by ${signal}`,
    // True of every command: a backup removes its partial file, a drill its scratch database (withTargetFate adds
    // what a restore did to its target).
    `the run was stopped${CLEANED_UP}; existing backups are untouched`,
    ['Run it again when convenient'],
  );
}

/**
 * A parallel dump into a directory-format archive. pg_dump writes (and fsyncs) the files itself,
 * so the checksum is the manifest's, read once afterwards; memory stays flat all the same. That read
 * writes nothing: `onRead` tells the stall watchdog it moves on.
 */
async function dumpToDirectory(
  pgDump: PgTool,
  args: string[],
  env: Record<string, string>,
  partialDir: string,
  { signal, onRead }: { signal: AbortSignal; onRead: () => void },
): Promise<DumpOutcome> {
  const options = { env, stdin: 'ignore', stdout: 'ignore', reject: false } as const;
  const { child } = await startTethered(pgDump.path, [...args, `--file=${partialDir}`], signal, options);
  const result = await child;
  if (signal.aborted) throw signal.reason;
  if (result.failed) throw pgDumpError(result, path.dirname(partialDir), env.PGUSER);
  // pg_dump creates them under the umask (0644): private, as a -Fc file is, whoever copies the directory on.
  for (const file of await fs.readdir(partialDir)) await fs.chmod(path.join(partialDir, file), 0o600);
  // Minutes on a large dump: an interrupt stops the read too, not only pg_dump.
  return hashBackup(partialDir, signal, onRead);
}

/** Pure: pg_dump's exit status and stderr → contract error, with hints for the common causes; `user`: its role. */
export function pgDumpError(error: unknown, outputDir = '.', user?: string): BackupError {
  // pg_dump stopped by a signal from outside (kill, the OOM killer's SIGTERM): an interruption, not a failure.
  const signal = (error as { signal?: unknown } | null)?.signal;
  if (signal === 'SIGINT' || signal === 'SIGTERM') return interruptedError(signal);
  const stderr = String((error as { stderr?: unknown } | null)?.stderr ?? '').trim();
  const details = toolMessage(stderr) || errorText(error);
  // In directory format pg_dump writes the files itself, so a full disk is its error to report.
  if (/No space left on device|Disk quota exceeded|File too large/i.test(details))
    return diskSpaceError(details, outputDir);
  if (/server version mismatch/i.test(details)) {
    return new BackupError(EXIT.TOOL_NOT_FOUND, 'pg_dump is older than the server', details, [
      "Install client tools of the server's major version and put them first on PATH",
    ]);
  }
  const known = parallelDumpError(details) ?? toolConnectionError('pg_dump', details);
  if (known) return known;
  if (/permission denied/i.test(details)) return privilegeError(details, user);
  if (/out of shared memory/i.test(details)) return lockSpaceError(details, /^HINT:\s+(.+)$/m.exec(details)?.[1]);
  // --lock-wait-timeout is a statement_timeout around pg_dump's LOCK TABLE; its workers use NOWAIT.
  if (/could not obtain lock|lock timeout|statement timeout[\s\S]*\bLOCK TABLE\b/i.test(details))
    return lockedTableError(details);
  return new BackupError(EXIT.BACKUP_FAILED, 'pg_dump failed', details, [
    'Read the pg_dump message above; it names the object or setting at fault',
    'Run pg_dump by hand with the same settings to reproduce: pg_dump -Fc -f /tmp/test.dump <database>',
  ]);
}

/** Pure: the failure --jobs brings, in pg_dump's words: its workers lock without waiting. */
function parallelDumpError(details: string): BackupError | undefined {
  if (/after the pg_dump parent process had gotten the initial ACCESS SHARE lock/.test(details)) {
    return new BackupError(EXIT.BACKUP_FAILED, 'DDL on a table aborted the parallel dump', details, [
      'A session asked for an exclusive lock (ALTER TABLE, DROP, TRUNCATE, ...) on a table during the dump: ' +
        '--jobs workers do not wait for locks, so the dump stopped (without --jobs, such DDL waits for the dump)',
      'Run it again when no DDL runs (not during deployments or migrations), or without --jobs',
    ]);
  }
}

// ─── Stall watchdog ──────────────────────────────────────────────────────────────────────

/**
 * Watch a backup from its connection on: if no byte is written to its file (`watchFile`; before that,
 * nothing counts) for `timeoutMs`, find out what its sessions wait on and abort `run` with that error
 * (exit 7). The most common failure of scheduled backups after not running at all is a dump that
 * hangs for hours behind a lock; a server that stops answering hangs its queries before the dump as
 * well. `progressed` says the backup moved on otherwise: the row counts can outlast a parallel pg_dump
 * by far on a big database. `waitingFor` names the step before the dump, in case nothing else can.
 */
function watchForStall(
  timeoutMs: number,
  config: DbConfig,
  connectTimeoutSeconds: number,
  run: AbortController,
): { stop(): void; progressed(): void; waitingFor(step: string): void; watchFile(partialPath: string): void } {
  let partialPath: string | undefined;
  let step: string | undefined;
  let lastSize = -1;
  let since = performance.now();
  // Set once it fires or is stopped; a tick still reading sizes then does nothing.
  let done = false;
  const stop = () => {
    done = true;
    clearInterval(timer);
  };
  const timer = setInterval(
    async () => {
      const size = partialPath === undefined ? lastSize : await backupSize(partialPath).catch(() => lastSize);
      if (size !== lastSize) {
        [lastSize, since] = [size, performance.now()];
        return;
      }
      if (done || millisecondsSince(since) < timeoutMs) return;
      stop();
      const onStall = (error: BackupError) => run.abort(error);
      await stopStalledSessions(config, connectTimeoutSeconds, timeoutMs, onStall, run.signal, step);
    },
    Math.min(5000, Math.max(100, timeoutMs / 4)),
  );
  timer.unref();
  return {
    stop,
    progressed: () => (since = performance.now()),
    waitingFor: (what) => (step = what),
    watchFile: (file) => ([partialPath, step] = [file, undefined]),
  };
}

export interface SessionWait {
  pid: number;
  application: string;
  state: string | null;
  wait_event_type: string | null;
  wait_event: string | null;
  query: string | null;
  blockers: Array<{ pid: number } & Record<'user' | 'application' | 'state' | 'since' | 'query', string | null>> | null;
}

/** Other sessions (pg_stat_activity `b`) as a JSON array of what describeSession reads: an OtherSession each. */
const OTHER_SESSIONS_JSON = `json_agg(json_build_object('pid', b.pid, 'user', b.usename, 'application',
  b.application_name, 'state', b.state, 'since', b.xact_start, 'query', left(b.query, 200)))`;

/** What the backup's sessions (its own and pg_dump's) wait on, and who blocks them, read on a connection of its own. */
const SESSION_WAITS_SQL = `
  SELECT a.pid, a.application_name AS application, a.state, a.wait_event_type, a.wait_event,
         left(a.query, 200) AS query,
         (SELECT ${OTHER_SESSIONS_JSON}
            FROM pg_catalog.pg_stat_activity b WHERE b.pid = ANY (pg_catalog.pg_blocking_pids(a.pid))) AS blockers
    FROM pg_catalog.pg_stat_activity a
   WHERE a.application_name IN ($1, $2) AND a.pid <> pg_catalog.pg_backend_pid()
   ORDER BY a.wait_event_type = 'Lock' DESC, a.pid`;

/** Pure: one session's wait, as a person reads it. */
export function describeWait(wait: SessionWait): string {
  const who = wait.application.endsWith(':pg_dump')
    ? `pg_dump's session (pid ${wait.pid})`
    : `the backup's own session (pid ${wait.pid})`;
  const on = wait.wait_event_type
    ? `waits on ${wait.wait_event_type}${wait.wait_event ? ` (${wait.wait_event})` : ''}`
    : `is ${wait.state ?? 'busy'}`;
  const blocked = (wait.blockers ?? []).map((b) => `blocked by ${describeSession(b)}`);
  return [`${who} ${on}${wait.query ? ` in "${foreignQuery(wait.query)}"` : ''}`, ...blocked].join('; ');
}

/** A session of someone else's, as pg_stat_activity shows it (SESSION_WAITS_SQL's blockers). */
type OtherSession = NonNullable<SessionWait['blockers']>[number];

/** Pure: another session, as a person reads it: its pid, who and since when, and its query, literals masked. */
export function describeSession(b: OtherSession): string {
  return (
    `pid ${b.pid} (user ${b.user ?? '?'}${b.application ? `, ${b.application}` : ''}, ` +
    `${b.state ?? '?'}${b.since ? ` since ${b.since}` : ''}): ${foreignQuery(b.query ?? '')}`
  );
}

/**
 * Say what the stalled backup's sessions wait on (`onStall` stops the run), then cancel their
 * queries: a session waiting for a lock notices that its client has gone only once it gets the
 * lock, and until then it would sit in the lock queue holding the locks it already has.
 */
async function stopStalledSessions(
  config: DbConfig,
  connectTimeoutSeconds: number,
  timeoutMs: number,
  onStall: (error: BackupError) => void,
  signal: AbortSignal,
  step?: string,
): Promise<void> {
  let stopped = false;
  try {
    // Each query answers within the connect timeout: a server that froze meanwhile must not hold the watchdog.
    const stopSessions = async (client: pg.Client) => {
      const { rows } = await answeredWithin(client, connectTimeoutSeconds, () =>
        client.query<SessionWait>(SESSION_WAITS_SQL, [APPLICATION_NAME, PG_DUMP_APPLICATION_NAME]),
      );
      onStall(stallError(rows, timeoutMs, undefined, step));
      stopped = true;
      const cancel = 'SELECT pg_catalog.pg_cancel_backend(pid) FROM unnest($1::int[]) AS pid';
      await answeredWithin(client, connectTimeoutSeconds, () => client.query(cancel, [rows.map((row) => row.pid)]));
    };
    await withClient(config, connectTimeoutSeconds, stopSessions, { signal });
  } catch (error) {
    const why = error instanceof BackupError ? error.details : errorText(error);
    if (!stopped) onStall(stallError([], timeoutMs, `what its sessions wait on could not be read: ${why}`, step));
  }
}

/** Pure: the error of a stalled backup, from what its sessions were waiting on (and before the dump, `step`). */
export function stallError(
  waits: SessionWait[],
  timeoutMs: number,
  unknown = 'its sessions were not found waiting',
  step?: string,
): BackupError {
  const blockers = [...new Set(waits.flatMap((w) => (w.blockers ?? []).map((b) => b.pid)))];
  return new BackupError(
    EXIT.BACKUP_FAILED,
    'The backup stalled',
    `no byte was written for ${formatDuration(timeoutMs)} (--stall-timeout)` +
      `${step ? ` while the backup waited for ${step}, before the dump` : ''}: ` +
      `${waits.length > 0 ? waits.map(describeWait).join('; ') : unknown}`,
    [
      ...(blockers.length > 0
        ? [`End or wait for the blocking session: SELECT pg_terminate_backend(${blockers[0]}); (or let it finish)`]
        : []),
      'A table lock waits at most --lock-wait-timeout (0 waits for ever); see pg_locks / pg_stat_activity',
      'If the dump is only slow (a huge table, a slow disk), raise --stall-timeout',
    ],
  );
}

// ─── Progress (terminals only) ───────────────────────────────────────────────────────────

/** pg_dump's own application_name, so its backend can be told from ours. */
const PG_DUMP_APPLICATION_NAME = `${APPLICATION_NAME}:pg_dump`;

interface CopyProgress {
  relid: number;
  table: string;
  tuples: number;
}

/**
 * Pure: the estimated share of the data dumped so far. Tables weigh by their catalog size; a
 * finished table counts whole, the ones being copied (one per --jobs worker) by their rows copied
 * against their estimated rows. Capped below 100%, which only the end of the dump can claim.
 */
export function dumpedFraction(
  tables: Array<Pick<UserTable, 'data_oids' | 'data_bytes' | 'data_rows'>>,
  finished: ReadonlySet<number>,
  copying: Array<Pick<CopyProgress, 'relid' | 'tuples'>>,
): number | undefined {
  const leaves = new Map<number, { bytes: number; rows: number }>();
  for (const { data_oids: oids, data_bytes: bytes, data_rows: rows } of tables)
    for (const oid of oids) leaves.set(oid, { bytes: bytes / oids.length, rows: rows / oids.length });
  const total = [...leaves.values()].reduce((sum, leaf) => sum + leaf.bytes, 0);
  if (total <= 0) return undefined;
  const inProgress = new Set(copying.map((copy) => copy.relid));
  let done = [...finished].reduce((sum, oid) => sum + (inProgress.has(oid) ? 0 : (leaves.get(oid)?.bytes ?? 0)), 0);
  for (const copy of copying) {
    const leaf = leaves.get(copy.relid);
    if (leaf) done += leaf.bytes * (leaf.rows > 0 ? Math.min(1, copy.tuples / leaf.rows) : 0.5);
  }
  return Math.min(0.99, done / total);
}

/** Pure: one line of progress. */
export function progressLine(state: {
  copying: Array<Pick<CopyProgress, 'table' | 'tuples'>>;
  fraction?: number;
  writtenBytes: number;
  elapsedMs: number;
}): string {
  const seconds = Math.floor(state.elapsedMs / 1000);
  const [first, ...others] = state.copying;
  const rows = state.copying.reduce((sum, copy) => sum + copy.tuples, 0);
  const parts = [
    first
      ? `dumping ${first.table}${others.length > 0 ? ` +${others.length} more` : ''}: ` +
        `${rows.toLocaleString('en-US')} rows`
      : 'dumping',
    ...(state.fraction !== undefined ? [`~${Math.round(state.fraction * 100)}%`] : []),
    `${formatBytes(state.writtenBytes)} written`,
    `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, '0')}`,
  ];
  // Written to the terminal as it is: a table's name must not clear the screen or retitle the window.
  return visibleControls(parts.join(' · '));
}

/** Tables named as regclass names them on a default search_path (public's bare), not on ours (pg_catalog only). */
const COPY_PROGRESS_SQL = `
  SELECT p.relid::int8::float8 AS relid, p.tuples_processed::float8 AS tuples,
         CASE WHEN n.nspname = 'public' THEN pg_catalog.quote_ident(c.relname)
              ELSE pg_catalog.format('%I.%I', n.nspname, c.relname) END AS table
    FROM pg_catalog.pg_stat_progress_copy p JOIN pg_catalog.pg_stat_activity a ON a.pid = p.pid
    JOIN pg_catalog.pg_class c ON c.oid = p.relid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
   WHERE a.application_name = $1`;

/**
 * Show live progress on stderr, polling once a second on a connection of its own: statistics
 * views read inside the snapshot transaction would stay frozen at their first read. Progress is
 * a nicety; nothing here may fail the backup (pg_stat_progress_copy needs PostgreSQL 14). Its
 * connection waits for the dump's first bytes, written once pg_dump's sessions are in: under a
 * CONNECTION LIMIT of --jobs + 2, one taken before would be one of theirs.
 */
async function startProgress(
  config: DbConfig,
  tables: UserTable[],
  partialPath: string,
  connectTimeoutSeconds: number,
  signal: AbortSignal,
): Promise<{ stop(): Promise<void> }> {
  const started = performance.now();
  let client: pg.Client | undefined;
  let connected: Promise<unknown> | undefined;
  const finished = new Set<number>();
  let copying: CopyProgress[] = [];
  const poll = async () => {
    const writtenBytes = await backupSize(partialPath).catch(() => 0);
    if (writtenBytes > 0)
      await (connected ??= connectDb(config, connectTimeoutSeconds, signal).then(
        (c) => (client = c),
        () => undefined,
      ));
    if (client) {
      const { rows } = await client.query<CopyProgress>(COPY_PROGRESS_SQL, [PG_DUMP_APPLICATION_NAME]).catch(() => {
        if (client) void closeClient(client);
        client = undefined;
        return { rows: [] as CopyProgress[] };
      });
      // A table that was being copied and no longer is has been dumped.
      for (const copy of copying) if (!rows.some((row) => row.relid === copy.relid)) finished.add(copy.relid);
      copying = rows;
    }
    const line = progressLine({
      copying,
      ...(client ? { fraction: dumpedFraction(tables, finished, copying) } : {}),
      writtenBytes,
      elapsedMs: millisecondsSince(started),
    });
    const width = process.stderr.columns || 80;
    process.stderr.write(`\r\x1b[K${err.dim(line.slice(0, width - 1))}`);
  };
  let inFlight = poll().catch(() => undefined);
  const timer = setInterval(() => {
    inFlight = inFlight.then(poll).catch(() => undefined);
  }, 1000);
  return {
    async stop() {
      clearInterval(timer);
      // Closed first: a poll still waiting on a server that stopped answering then fails at once.
      if (client) await closeClient(client);
      await inFlight;
      if (client) await closeClient(client); // connected by that last poll
      process.stderr.write('\r\x1b[K');
    },
  };
}

// ─── Backup run: lock, snapshot, dump and counts, publish ────────────────────────────────

export interface BackupOptions {
  outputDir: string;
  compress?: string;
  search: ClientSearch;
  connectTimeoutSeconds: number;
  lockWaitTimeoutMs: number;
  /** Live progress on stderr: only for a person at a terminal. */
  progress: boolean;
  /** pg_dump workers: 1 writes one custom-format file; more write a directory-format archive in parallel. */
  jobs: number;
  /** Stop a backup that writes nothing for this long (0: never). */
  stallTimeoutMs: number;
  /** Applied after a successful backup, under the same lock; no rule means keep everything. */
  retention: RetentionPolicy;
  dryRun: boolean;
}

export interface BackupResult {
  dumpPath: string;
  metadataPath: string;
  metadata: BackupMetadata;
  checks: FileChecks;
  /** Leftovers of earlier interrupted runs of this database, removed under the lock. */
  removedStaleFiles: string[];
  /** Those this user could not remove: name, owner and why. */
  staleFilesLeft: string[];
  retention?: RetentionReport;
  /** The backup succeeded but pruning did not: reported; a refusal (exit 8) or an interrupt sets the exit code. */
  retentionError?: BackupError;
}

/** preflight → lock → clean up after killed runs → connect → the snapshot backup → retention. */
async function runBackup(config: DbConfig, options: BackupOptions, signal: AbortSignal): Promise<BackupResult> {
  const started = performance.now();
  assertClockUsable(new Date());
  // The server's version is not known yet: this only proves client tools exist at all.
  const preferred = await findDumpClient(options.search, signal);
  const home = await prepareOutputDir(options.outputDir);
  const lock = await acquireBackupLock(options.outputDir, config);
  try {
    signal.throwIfAborted();
    const stale = await removeStaleFiles(options.outputDir, config);
    const cleanup = { removedStaleFiles: stale.removed, staleFilesLeft: stale.left };
    const published = await withClient(
      config,
      options.connectTimeoutSeconds,
      (client) => snapshotBackup({ client, config, preferred, options, started, home }, signal),
      { signal },
    );
    await keepLockReserve(lock.path);
    // Only after a backup that succeeded, so a failing run can never thin out the good ones.
    if (!hasRetentionRule(options.retention)) return { ...published, ...cleanup };
    try {
      const { backup_file: justMade, system_identifier: systemIdentifier } = published.metadata;
      const server = { justMade, systemIdentifier: systemIdentifier ?? null };
      const retention = await applyRetention(config, options, server, signal);
      return { ...published, ...cleanup, retention };
    } catch (error) {
      const title = 'Applying the retention policy failed';
      const retentionError =
        error instanceof BackupError
          ? error
          : errnoCode(error)
            ? fileSystemError(error, title, options.outputDir)
            : new BackupError(EXIT.GENERAL, title, errorText(error));
      return { ...published, ...cleanup, retentionError };
    }
  } catch (error) {
    // An interrupt wins over what failed meanwhile, such as a connection attempt it outlasted.
    throw signal.aborted ? signal.reason : error;
  } finally {
    await releaseLock(lock);
  }
}

interface BackupJob {
  client: pg.Client;
  config: DbConfig;
  /** The client tools found first; replaced by newer ones if the server needs them. */
  preferred: PgClient;
  options: BackupOptions;
  /** performance.now() when the run began. */
  started: number;
  /** The output directory the run began in (prepareOutputDir). */
  home: DirIdentity;
}

/**
 * snapshot → pg_dump ∥ counts → verify → metadata → publish.
 * The dump gets its final name last, so a `.dump` that exists is always complete, verified and
 * described by its metadata; on any failure this run's files are removed and nothing else is touched.
 */
async function snapshotBackup(
  job: BackupJob,
  signal: AbortSignal,
): Promise<Omit<BackupResult, 'removedStaleFiles' | 'staleFilesLeft'>> {
  const { client, config, options } = job;
  const { outputDir } = options;
  // Aborted by the user's Ctrl-C / SIGTERM or by the first failure; either way pg_dump and the
  // database session stop, and the reason is what gets reported.
  const run = new AbortController();
  const onInterrupt = () => run.abort(signal.reason);
  signal.addEventListener('abort', onInterrupt, { once: true });
  run.signal.addEventListener('abort', () => void closeClient(client), { once: true });
  const created: string[] = [];
  let moved: BackupError | undefined; // the output directory, found replaced or removed before publishing
  // Armed from the connection on: a server that stops answering the queries before the dump stalls the run too.
  const watchdog =
    options.stallTimeoutMs > 0
      ? watchForStall(options.stallTimeoutMs, config, options.connectTimeoutSeconds, run)
      : undefined;
  try {
    // A listener added after the abort never hears of it: an interrupt while connecting stops here.
    signal.throwIfAborted();
    watchdog?.waitingFor("the server's version (server_version_num)");
    const server = await readServerInfo(client);
    const systemIdentifier = await clusterIdentifier(client);
    // pg_dump refuses servers of a newer major: pick one that fits before anything is written.
    const tools =
      job.preferred.pgDump.major >= server.major ? job.preferred : await findDumpClient(options.search, signal, server);
    const compression = parseCompression(options.compress, tools.pgDump.major);

    // One snapshot for the dump and the counts: they describe the same instant. The counts wait
    // for table locks no longer than pg_dump does.
    watchdog?.waitingFor('the snapshot export (pg_export_snapshot)');
    await client.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
    const { rows } = await client.query<{ snapshot: string }>('SELECT pg_catalog.pg_export_snapshot() AS snapshot');
    await client.query(`SET LOCAL lock_timeout = ${options.lockWaitTimeoutMs}`);
    watchdog?.waitingFor('the list of tables (pg_class)');
    const tables = await listUserTables(client, config);
    await assertReadable(client, config, tables);
    await assertNoRowSecurity(client, config, tables);
    const lock = await lockStatement(client, tables);
    const { rows: extensions } = await client.query<ExtensionVersion>(
      'SELECT extname AS name, extversion AS version FROM pg_catalog.pg_extension ORDER BY 1',
    );
    const tableBytes = tables.reduce((sum, table) => sum + table.data_bytes, 0);
    watchdog?.waitingFor("the output directory's free space");
    await assertDiskSpace(outputDir, tableBytes, compression);
    const format: DumpFormat = options.jobs > 1 ? 'directory' : 'custom';
    const reserved = await reserveBackupName(outputDir, config.database, config.environment, new Date(), format);
    created.push(reserved.partialPath);
    watchdog?.watchFile(reserved.partialPath);

    const dumpArgs = pgDumpArgs(rows[0]!.snapshot, compression, options.lockWaitTimeoutMs, options.jobs);
    const dumpEnv = {
      ...libpqEnv(pinnedTo(config, client), options.connectTimeoutSeconds),
      PGAPPNAME: PG_DUMP_APPLICATION_NAME,
    };
    const progress = options.progress
      ? await startProgress(config, tables, reserved.partialPath, options.connectTimeoutSeconds, run.signal)
      : undefined;
    let dump: DumpOutcome;
    let tableCounts: Record<string, number>;
    try {
      const progressed = () => watchdog?.progressed();
      const counting = countRows(client, tables, lock, progressed);
      const dumping =
        format === 'directory'
          ? dumpToDirectory(tools.pgDump, dumpArgs, dumpEnv, reserved.partialPath, {
              signal: run.signal,
              onRead: progressed,
            })
          : streamPgDump(tools.pgDump, dumpArgs, dumpEnv, reserved.partialPath, run.signal);
      const counted =
        options.lockWaitTimeoutMs === 0
          ? counting.then(async (counts) => (await refuseLockCycle(client, dumping), counts))
          : counting;
      [dump, tableCounts] = await bothOrNeither(run, [dumping, counted]);
    } finally {
      watchdog?.stop();
      await progress?.stop();
    }
    // Only now may the exporting transaction end: pg_dump has long since imported the snapshot.
    await client.query('COMMIT');

    const metadata: BackupMetadata = {
      backup_timestamp: isoSeconds(reserved.timestamp),
      environment: config.environment,
      database_name: config.database,
      backup_file: reserved.name,
      backup_size_bytes: dump.size,
      checksum_sha256: dump.sha256,
      table_counts: tableCounts,
      pg_dump_version: tools.pgDump.version,
      postgresql_version: server.version,
      format,
      ...(format === 'directory' ? { jobs: options.jobs } : {}),
      compression: compression.label,
      duration_ms: millisecondsSince(job.started),
      snapshot_consistent: true,
      tool_version: await toolVersion(),
      table_data_oids: Object.fromEntries(tables.map((t) => [tableKey(t.schema, t.table), t.data_oids])),
      ...unloggedDataLeftOut(tables),
      extensions,
      ...(systemIdentifier === undefined ? {} : { system_identifier: systemIdentifier }),
    };
    // Check the file before it gets its final name: size on disk, archive structure, table data.
    const metadataPath = path.join(outputDir, metadataFileName(reserved.name));
    const inspection = await checkBackupFile(tools.pgRestore, reserved.partialPath, metadata, dump);
    if (failedChecks(inspection.checks).length > 0) {
      throw verificationError({ filePath: reserved.dumpPath, metadataPath, metadata, inspection });
    }
    created.push(metadataPath);
    await writeFileAtomic(metadataPath, `${JSON.stringify(metadata, null, 2)}\n`).catch((error: unknown) => {
      throw fileSystemError(error, 'Writing the metadata failed', outputDir);
    });
    run.signal.throwIfAborted();
    moved = await outputDirChange(outputDir, job.home);
    if (moved) throw moved;
    await publishDump(reserved.partialPath, reserved.dumpPath).catch(async (error: unknown) => {
      // Still under its final name (even the rename back failed): it keeps its metadata, never a dump without.
      if (await pathExists(reserved.dumpPath)) created.length = 0;
      throw error;
    });
    return { dumpPath: reserved.dumpPath, metadataPath, metadata, checks: inspection.checks };
  } catch (error) {
    await removeRunFiles(created, config);
    const failure = asBackupError(run.signal.aborted ? run.signal.reason : error, config, outputDir);
    // A directory gone is why the run's files went missing; the user's interrupt is reported as such.
    throw (signal.aborted || moved ? undefined : await outputDirChange(outputDir, job.home, failure)) ?? failure;
  } finally {
    watchdog?.stop();
    signal.removeEventListener('abort', onInterrupt);
  }
}

/**
 * Remove what a failed run made. One that stays (the directory made read-only meanwhile) is a warning, never a
 * silent leftover: the next backup of this database removes it, under the lock (removeStaleFiles).
 */
async function removeRunFiles(files: string[], config: DbConfig): Promise<void> {
  const next = `the next backup of ${config.database} (${config.environment}) removes it`;
  const remove = (file: string) =>
    removeEntry(file).catch((error: unknown) => {
      runWarning('cleanup_failed', `Could not remove this run's ${displayPath(file)}`, `${errorText(error)}; ${next}`);
    });
  await Promise.all(files.map(remove));
}

/**
 * Give the checked dump its final name, durably. A failed fsync of the directory (EIO) means the disk cannot
 * be trusted with this backup: no backup is claimed, and the dump takes its `.partial` name back, for the
 * failure's clean-up to remove it with its metadata. `sync`: syncDirectory, or a test's failing one.
 */
export async function publishDump(partialPath: string, dumpPath: string, sync = syncDirectory): Promise<void> {
  await fs.rename(partialPath, dumpPath);
  try {
    await sync(path.dirname(dumpPath));
  } catch (error) {
    await fs.rename(dumpPath, partialPath).catch(() => undefined);
    throw error;
  }
}

/**
 * Await two concurrent steps. The first failure aborts `run` (stopping the other step), and both
 * are awaited before returning, so no pg_dump is still writing when cleanup removes its file.
 */
async function bothOrNeither<A, B>(run: AbortController, steps: [Promise<A>, Promise<B>]): Promise<[A, B]> {
  const stopOthers = (error: unknown) => {
    if (!run.signal.aborted) run.abort(error);
    throw error;
  };
  const [a, b] = await Promise.allSettled([steps[0].catch(stopOthers), steps[1].catch(stopOthers)]);
  if (a.status === 'fulfilled' && b.status === 'fulfilled' && !run.signal.aborted) return [a.value, b.value];
  throw run.signal.reason;
}

// ─── Metadata ────────────────────────────────────────────────────────────────────────────

export interface BackupMetadata {
  backup_timestamp: string;
  environment: Environment;
  database_name: string;
  backup_file: string;
  backup_size_bytes: number;
  checksum_sha256: string;
  table_counts: Record<string, number>;
  pg_dump_version: string;
  postgresql_version: string;
  // Extras beyond the seed schema; optional, since metadata written by other tools lacks them.
  format?: DumpFormat;
  /** pg_dump workers of a directory-format dump. */
  jobs?: number;
  compression?: string;
  duration_ms?: number;
  snapshot_consistent?: boolean;
  tool_version?: string;
  /** Per table_counts key, the OIDs whose TABLE DATA the archive holds, so --verify matches exactly. */
  table_data_oids?: Record<string, number[]>;
  /** From a hot standby: the tables (table_counts keys) whose unlogged rows are neither in it nor counted. */
  unlogged_data_left_out?: string[];
  /** The last restore drill (--verify FILE --restore-test) of this backup. */
  last_restore_test?: RestoreTestRecord;
  /** Every extension of the database and its version, in the backup's snapshot: what a restore needs. */
  extensions?: ExtensionVersion[];
  /** The cluster's pg_control_system() identifier: retention never judges another server's backups. */
  system_identifier?: string;
}

export type ExtensionVersion = { name: string; version: string };

const ISO_8601 = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})$/;

const isNonEmptyString = (value: unknown): value is string => typeof value === 'string' && value.trim() !== '';
const isPlainObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === 'object' && value !== null && !Array.isArray(value);
const isWholeNumber = (value: unknown, min = 0, max = Number.MAX_SAFE_INTEGER) =>
  Number.isSafeInteger(value) && (value as number) >= min && (value as number) <= max;
/**
 * An ISO 8601 timestamp of a date and time that exist: V8 parses 2025-02-29 as March 1st and 24:00
 * as the next day, which would put a backup in another day's retention bucket, so the date and time
 * as written must read back unchanged. A leap second (23:59:60), which no Date holds, is refused.
 */
function isTimestamp(value: unknown): boolean {
  if (typeof value !== 'string' || !ISO_8601.test(value) || Number.isNaN(Date.parse(value))) return false;
  const written = value.slice(0, 19);
  return new Date(`${written}Z`).toISOString().startsWith(written);
}

/** A map from table names (which may be "__proto__" or "constructor") to values that pass `valid`. */
const isTableMap = (value: unknown, valid: (entry: unknown) => boolean) =>
  isPlainObject(value) && Object.values(value).every(valid);

type FieldRule = { required: boolean; valid: (value: unknown) => boolean; rule: string };
const required = (valid: FieldRule['valid'], rule: string): FieldRule => ({ required: true, valid, rule });
const optional = (valid: FieldRule['valid'], rule: string): FieldRule => ({ required: false, valid, rule });

/**
 * The data model's fields (all required) and the tool's own (optional, since metadata written by
 * other tools lacks them): every field the tool reads, with the shape it must have. A metadata
 * file is untrusted input, so nothing is read from one that breaks a rule.
 */
const METADATA_RULES: Record<string, FieldRule> = {
  backup_timestamp: required(isTimestamp, 'must be an ISO 8601 timestamp of a date and time that exist'),
  environment: required((v) => v === 'dev' || v === 'prod', 'must be "dev" or "prod"'),
  database_name: required(isNonEmptyString, 'must be a non-empty string'),
  backup_file: required(isNonEmptyString, 'must be a file name'),
  backup_size_bytes: required((v) => isWholeNumber(v, 1), 'must be a positive integer'),
  checksum_sha256: required((v) => typeof v === 'string' && /^[0-9a-f]{64}$/i.test(v), 'must be 64 hexadecimal digits'),
  table_counts: required(
    (v) => isTableMap(v, (n) => isWholeNumber(n)) && Object.keys(v as object).length > 0,
    'must map at least one table to a row count',
  ),
  pg_dump_version: required(isNonEmptyString, 'must be a version string'),
  postgresql_version: required(isNonEmptyString, 'must be a version string'),
  format: optional((v) => v === 'custom' || v === 'directory', 'must be "custom" or "directory"'),
  jobs: optional((v) => isWholeNumber(v, 1, 1024), 'must be a whole number of workers'),
  compression: optional(isNonEmptyString, 'must be a compression setting'),
  duration_ms: optional((v) => isWholeNumber(v), 'must be a whole number of milliseconds'),
  snapshot_consistent: optional((v) => typeof v === 'boolean', 'must be true or false'),
  tool_version: optional(isNonEmptyString, 'must be a version string'),
  table_data_oids: optional(
    (v) => isTableMap(v, (oids) => Array.isArray(oids) && oids.every((oid) => isWholeNumber(oid, 1))),
    'must map tables to lists of OIDs',
  ),
  unlogged_data_left_out: optional(
    (v) => Array.isArray(v) && v.every((table) => typeof table === 'string'),
    'must list table names',
  ),
  last_restore_test: optional(
    (v) =>
      isPlainObject(v) &&
      isTimestamp(v.time) &&
      typeof v.ok === 'boolean' &&
      isWholeNumber(v.duration_ms) &&
      typeof v.server === 'string' &&
      typeof v.server_version === 'string' &&
      isWholeNumber(v.tables) &&
      Array.isArray(v.mismatches) &&
      v.mismatches.every((table) => typeof table === 'string'),
    'must be a restore test record (time, ok, duration_ms, server, server_version, tables, mismatches)',
  ),
  extensions: optional(
    (v) =>
      Array.isArray(v) && v.every((e) => isPlainObject(e) && isNonEmptyString(e.name) && isNonEmptyString(e.version)),
    'must list extensions with their versions',
  ),
  system_identifier: optional((v) => typeof v === 'string' && /^\d+$/.test(v), 'must be a string of digits'),
};

/** Pure: everything wrong with a parsed metadata document under the rules above; [] if valid. */
export function metadataProblems(value: unknown, dumpFileName?: string): string[] {
  if (!isPlainObject(value)) return ['it is not a JSON object'];
  const problems: string[] = [];
  for (const [field, { required: isRequired, valid, rule }] of Object.entries(METADATA_RULES)) {
    if (!Object.hasOwn(value, field)) {
      if (isRequired) problems.push(`${field} is missing`);
    } else if (!valid(value[field])) {
      problems.push(`${field} ${rule} (found ${String(JSON.stringify(value[field])).slice(0, 80)})`);
    }
  }
  if (dumpFileName !== undefined && isNonEmptyString(value.backup_file) && value.backup_file !== dumpFileName) {
    problems.push(`backup_file is "${value.backup_file}" but the file is named "${dumpFileName}"`);
  }
  const named = dumpFileName === undefined ? undefined : parseBackupFileName(dumpFileName);
  return named ? [...problems, ...nameDisagreements(value, named)] : problems;
}

/**
 * Pure: what valid metadata says against what its file's name (of this tool's pattern) says. Listing,
 * retention and --check read the metadata: one edited by hand to another time or database would make a
 * backup look fresh, or the oldest of another series, to be deleted.
 */
function nameDisagreements(
  metadata: Record<string, unknown>,
  named: NonNullable<ReturnType<typeof parseBackupFileName>>,
) {
  const { backup_timestamp: time, environment, database_name: database } = metadata;
  const second = (iso: string) => Math.floor(Date.parse(iso) / 1000);
  const disagree = (field: string, value: unknown, name: string) =>
    `${field} is ${JSON.stringify(value)} but the file is named for ${name}`;
  return [
    isTimestamp(time) &&
      second(String(time)) !== second(named.timestamp) &&
      disagree('backup_timestamp', time, named.timestamp),
    environment !== named.environment &&
      METADATA_RULES.environment!.valid(environment) &&
      disagree('environment', environment, `"${named.environment}"`),
    isNonEmptyString(database) &&
      database !== named.database &&
      disagree('database_name', database, `"${named.database}"`),
  ].filter((problem) => typeof problem === 'string');
}

/** Far beyond any real metadata, far below what would exhaust memory. */
const MAX_METADATA_BYTES = 256 * 1024 * 1024;
/** The deepest real metadata nests 4 levels (table_data_oids → table → OIDs). */
const MAX_METADATA_DEPTH = 16;
/**
 * A table takes 3 values (its row count, its table_data_oids entry, an OID): 600,000 tables, parsed
 * in seconds. V8 parses an object of millions of keys in time that grows faster than the keys
 * (8.3 million: minutes on end, deaf to SIGTERM), so such a file must never reach JSON.parse.
 */
const MAX_METADATA_VALUES = 2_000_000;

/**
 * Pure: how deeply arrays and objects nest in JSON text and about how many values they hold (a
 * container or a comma each), counted without parsing it (strings skipped).
 */
export function jsonShape(text: string): { depth: number; values: number } {
  let depth = 0;
  let deepest = 0;
  let values = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const char = text[i];
    if (inString) {
      if (char === '\\') i++;
      else if (char === '"') inString = false;
    } else if (char === '"') inString = true;
    else if (char === ',') values++;
    else if (char === '[' || char === '{') {
      deepest = Math.max(deepest, ++depth);
      values++;
    } else if (char === ']' || char === '}') depth--;
  }
  return { depth: deepest, values };
}

export type MetadataLoad =
  | { status: 'ok'; metadata: BackupMetadata }
  | { status: 'missing' }
  | { status: 'invalid'; problems: string[] }
  | { status: 'unreadable'; why: string };

/** Read and validate the metadata of `dumpFileName`; never throws, so --list can show every state. */
async function loadMetadata(metadataPath: string, dumpFileName: string): Promise<MetadataLoad> {
  const invalid = (problem: string): MetadataLoad => ({ status: 'invalid', problems: [problem] });
  let value: unknown;
  try {
    // Not through a symlink: a link to ~/.pgpass must not have its content quoted back.
    const handle = await openRegularFile(metadataPath, { noFollow: true });
    let text: string;
    try {
      const { size } = await handle.stat();
      if (size > MAX_METADATA_BYTES)
        return invalid(`the metadata file is ${formatBytes(size)}, more than this tool ever writes`);
      text = await handle.readFile('utf8');
    } finally {
      await handle.close();
    }
    const shape = jsonShape(text);
    if (shape.depth > MAX_METADATA_DEPTH) return invalid(`it nests more than ${MAX_METADATA_DEPTH} levels deep`);
    if (shape.values > MAX_METADATA_VALUES)
      return invalid(`it holds more than ${MAX_METADATA_VALUES.toLocaleString('en-US')} values`);
    value = JSON.parse(text);
  } catch (error) {
    if (errnoCode(error) === 'ENOENT') return { status: 'missing' };
    if (errnoCode(error) === 'ENOTREG') return invalid('not a regular file');
    // Another user's (metadata is always 0600): who can read it, not damage.
    if (['EACCES', 'EPERM'].includes(errnoCode(error) ?? '')) {
      const why = `${os.userInfo().username} may not read it; it is ${await ownerOf(metadataPath)}`;
      return { status: 'unreadable', why };
    }
    // JSON.parse quotes the start of its input in its message: give only the position.
    const at = /at position (\d+)/.exec(errorText(error));
    return invalid(
      error instanceof SyntaxError
        ? `it is not valid JSON${at ? ` (at position ${at[1]})` : ''}`
        : `it cannot be read: ${errorText(error)}`,
    );
  }
  const problems = metadataProblems(value, dumpFileName);
  return problems.length === 0 ? { status: 'ok', metadata: value as BackupMetadata } : { status: 'invalid', problems };
}

export function metadataPathFor(dumpPath: string): string {
  return path.join(path.dirname(dumpPath), metadataFileName(path.basename(dumpPath)));
}

async function toolVersion(): Promise<string> {
  const pkg = JSON.parse(await fs.readFile(path.join(PROJECT_DIR, 'package.json'), 'utf8')) as { version?: string };
  return pkg.version ?? 'unknown';
}

/**
 * Write a file so that readers see either nothing or all of it: temp file, fsync, rename, fsync dir.
 * `mode` is set exactly, whatever the umask: a metrics file under umask 077 must stay readable to node_exporter.
 * `like`: the file it replaces, whose mode and owner the new one takes exactly (or it fails).
 */
export async function writeFileAtomic(
  filePath: string,
  contents: string,
  mode = 0o600,
  like?: Pick<Stats, 'mode' | 'uid' | 'gid'>,
): Promise<void> {
  const temp = `${filePath}.tmp-${randomName()}`;
  try {
    const handle = await fs.open(temp, 'wx', mode);
    try {
      if (like) {
        // Compared with the new file itself: a setgid directory gives it the directory's group.
        const made = await handle.stat();
        if (made.uid !== like.uid || made.gid !== like.gid) await handle.chown(like.uid, like.gid);
      }
      await handle.chmod(like ? like.mode & 0o7777 : mode);
      await handle.writeFile(contents);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fs.rename(temp, filePath);
    await syncDirectory(path.dirname(filePath));
  } catch (error) {
    await removeQuietly(temp);
    throw error;
  }
}

/** Make a rename durable: on Linux a rename survives a crash only once the directory is synced. */
async function syncDirectory(dir: string): Promise<void> {
  const handle = await fs.open(dir, 'r');
  try {
    await handle.sync();
  } catch (error) {
    // Some filesystems (and Windows) cannot fsync a directory; the rename itself is still atomic.
    if (!['EINVAL', 'EPERM', 'EISDIR', 'ENOTSUP'].includes(errnoCode(error) ?? '')) throw error;
  } finally {
    await handle.close();
  }
}

// ─── Archives: header, client tools, checksum, contents ─────────────────────────────────

/** What a custom-format archive says about itself, from its first bytes. */
export interface ArchiveHeader {
  /** K_VERS of pg_backup_archiver.h, e.g. [1, 14, 0] */
  archiveVersion: [number, number, number];
  database: string | null;
  serverVersion: string | null;
  pgDumpVersion: string | null;
}

/**
 * Pure: parse the header pg_dump writes (WriteHead in pg_backup_archiver.c): "PGDMP", version
 * bytes, int and offset sizes, format, then the compression (an int before archive 1.15, an
 * algorithm byte since), the creation time as 7 ints, and the database, server and pg_dump
 * versions as strings. Ints are a sign byte and intSize little-endian bytes.
 */
export function parseArchiveHeader(bytes: Buffer): ArchiveHeader | undefined {
  if (bytes.length < 11 || bytes.toString('latin1', 0, 5) !== 'PGDMP') return undefined;
  const archiveVersion: [number, number, number] = [bytes[5]!, bytes[6]!, bytes[7]!];
  const header: ArchiveHeader = { archiveVersion, database: null, serverVersion: null, pgDumpVersion: null };
  const intSize = bytes[8]!;
  let position = 11;
  const readInt = () => {
    if (intSize < 1 || intSize > 8 || position + 1 + intSize > bytes.length) throw new RangeError('truncated header');
    let value = 0;
    for (let i = 0; i < intSize; i++) value += bytes[position + 1 + i]! * 2 ** (8 * i);
    const negative = bytes[position] !== 0;
    position += 1 + intSize;
    return negative ? -value : value;
  };
  const readString = () => {
    const length = readInt();
    if (length < 0) return null;
    if (position + length > bytes.length) throw new RangeError('truncated header');
    const text = bytes.toString('utf8', position, position + length);
    position += length;
    return text;
  };
  // Layouts older than archive 1.10 (pg_dump 8.0) differ; the version bytes are all they give here.
  if (archiveVersion[0] !== 1 || archiveVersion[1] < 10) return header;
  try {
    if (archiveVersion[1] >= 15) position += 1;
    else readInt();
    for (let i = 0; i < 7; i++) readInt();
    header.database = readString();
    header.serverVersion = readString();
    header.pgDumpVersion = readString();
  } catch {
    // A damaged header still has its version bytes; pg_restore will say what else is wrong.
  }
  return header;
}

/**
 * Pure: the oldest pg_restore major that reads an archive. Format 1.14 came with pg_dump 14 (and
 * stayed in 15), 1.15 with 16, 1.16 with 17; an unknown newer format needs the pg_dump's own major.
 */
export function minimumPgRestoreMajor(header: ArchiveHeader): number {
  const [major, minor] = header.archiveVersion;
  const known: Record<number, number> = { 14: 14, 15: 16, 16: 17 };
  if (major === 1 && minor <= 13) return 10;
  if (major === 1 && known[minor] !== undefined) return known[minor];
  return parsePgVersion(header.pgDumpVersion ?? '')?.major ?? 99;
}

async function readArchiveHeader(backupPath: string): Promise<ArchiveHeader | undefined> {
  // A directory-format archive keeps its header at the top of toc.dat.
  const isDirectory = (await fs.stat(backupPath)).isDirectory();
  const handle = await fs.open(isDirectory ? path.join(backupPath, 'toc.dat') : backupPath, 'r');
  try {
    const { buffer, bytesRead } = await handle.read(Buffer.alloc(4096), 0, 4096, 0);
    return parseArchiveHeader(buffer.subarray(0, bytesRead));
  } finally {
    await handle.close();
  }
}

/**
 * findRestoreClient, remembered per required major, so that --list --verify searches once rather
 * than once per backup. Only successes are kept: an error names the archive it was about.
 */
function restoreClientLookup(search: ClientSearch): (header: ArchiveHeader | undefined) => Promise<PgClient> {
  const found = new Map<number | undefined, Promise<PgClient>>();
  return (header) =>
    cachedUnlessFailed(found, header ? minimumPgRestoreMajor(header) : undefined, () =>
      findRestoreClient(search, header),
    );
}

/** The client whose pg_restore reads this archive; unknown archives get the default one. */
function findRestoreClient(
  search: ClientSearch,
  header: ArchiveHeader | undefined,
  signal?: AbortSignal,
): Promise<PgClient> {
  const needed = header ? minimumPgRestoreMajor(header) : undefined;
  const purpose = (found: string) => ({
    title: 'No pg_restore new enough for this archive',
    details:
      `the archive was written by pg_dump ${header?.pgDumpVersion ?? 'of an unknown version'} (archive format ` +
      `${header?.archiveVersion.join('.')}), which needs pg_restore ${needed} or newer; found: ${found}`,
  });
  return findClient(search, needed, purpose, signal);
}

/** SHA256 and size of a file, streamed in 1 MiB chunks: flat memory for any size. `signal` stops the read. */
export async function hashFile(filePath: string, signal?: AbortSignal, onRead?: () => void): Promise<DumpOutcome> {
  const hash = createHash('sha256');
  let size = 0;
  for await (const chunk of createReadStream(filePath, { highWaterMark: 1 << 20, signal }) as AsyncIterable<Buffer>) {
    hash.update(chunk);
    size += chunk.length;
    onRead?.();
  }
  return { sha256: hash.digest('hex'), size };
}

/**
 * Pure: a file name's bytes as text, or undefined where they are not UTF-8: Node decodes those to
 * U+FFFD, which another file's name can hold, so the decoded name could open, check or delete that file.
 */
export function utf8FileName(raw: Buffer): string | undefined {
  const name = raw.toString('utf8');
  return Buffer.from(name).equals(raw) ? name : undefined;
}

/** Pure: a name that is not UTF-8, shown: bytes outside printable ASCII as \xHH, as bash's $'…' reads them. */
export function bytesShown(raw: Buffer): string {
  return [...raw].map((b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : hexByte(b))).join('');
}

/**
 * The files of a directory-format archive, by path relative to it, sorted: a deterministic order.
 * pg_dump writes only regular files; anything else (a symlink, a FIFO, a device) pg_restore would
 * read while the checksum skipped it, so it fails the archive, named, and is never followed; so does
 * a name that is not UTF-8, which no path this tool opens reaches. Walked by hand: Node 20's recursive
 * readdir cannot give names as bytes.
 */
async function archiveFiles(dir: string, below = ''): Promise<string[]> {
  const entries = await fs.readdir(path.join(dir, below), { withFileTypes: true, encoding: 'buffer' });
  const relative = (entry: (typeof entries)[number]) =>
    path.join(below, utf8FileName(entry.name) ?? bytesShown(entry.name));
  const foreign = entries.find((entry) => !utf8FileName(entry.name) || (!entry.isFile() && !entry.isDirectory()));
  if (foreign) {
    const notUtf8 = !utf8FileName(foreign.name);
    const kind = notUtf8 ? 'a file whose name is not UTF-8' : fileKind(foreign);
    const why = notUtf8
      ? 'pg_dump never writes such a name, and the checksum cannot name it'
      : 'pg_dump writes only regular files, and pg_restore would read it, unchecked by the checksum';
    throw verifyInputError(
      `${relative(foreign)} in the archive is ${kind}`,
      `${displayPath(path.join(dir, relative(foreign)))} is ${kind}: ${why}`,
      [
        'Do not restore from this backup',
        `Inspect it: ls -l ${shellWord(displayPath(dir))}`,
        'Use another backup or take a new one',
      ],
    );
  }
  const files = [];
  for (const entry of entries)
    files.push(...(entry.isDirectory() ? await archiveFiles(dir, relative(entry)) : [relative(entry)]));
  return files.sort();
}

/** Pure: what a directory-format backup's checksum covers: each file's SHA-256, size and path, one per line. */
export function manifestText(files: Array<{ name: string; sha256: string; size: number }>): string {
  return [...files]
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
    .map((f) => `${f.sha256}  ${f.size}  ${f.name}\n`)
    .join('');
}

/**
 * SHA-256 and size of a backup: a custom-format file's bytes, or for a directory-format archive
 * (--jobs) the SHA-256 of its manifest and the files' total size. Either way streamed: flat memory.
 * `onRead` hears of each megabyte read.
 */
export async function hashBackup(backupPath: string, signal?: AbortSignal, onRead?: () => void): Promise<DumpOutcome> {
  if (!(await fs.stat(backupPath)).isDirectory()) return hashFile(backupPath, signal, onRead);
  const files = [];
  for (const name of await archiveFiles(backupPath))
    files.push({ name, ...(await hashFile(path.join(backupPath, name), signal, onRead)) });
  return {
    sha256: createHash('sha256').update(manifestText(files)).digest('hex'),
    size: files.reduce((sum, file) => sum + file.size, 0),
  };
}

/** Size in bytes of a backup: the file, or the files of a directory-format archive. */
async function backupSize(backupPath: string): Promise<number> {
  const stat = await fs.stat(backupPath);
  if (!stat.isDirectory()) return stat.size;
  const sizes = await Promise.all(
    (await archiveFiles(backupPath)).map(async (name) => (await fs.stat(path.join(backupPath, name))).size),
  );
  return sizes.reduce((sum, size) => sum + size, 0);
}

/** Throws unless this user can read every file of a backup, as pg_restore and the checksum must. */
async function assertFilesReadable(backupPath: string): Promise<void> {
  const files = (await fs.stat(backupPath)).isDirectory()
    ? (await archiveFiles(backupPath)).map((name) => path.join(backupPath, name))
    : [backupPath];
  await Promise.all(files.map((file) => fs.access(file, fs.constants.R_OK)));
}

interface ArchiveListing {
  ok: boolean;
  toc: string;
  error: string;
}

/**
 * `pg_restore --list` reads the archive header and table of contents; pg_dump writes the TOC
 * first, so this is fast whatever the size. Its output is proportional to the number of objects,
 * not to the data, so buffering it is fine.
 */
async function listArchive(pgRestore: PgTool, filePath: string, signal?: AbortSignal): Promise<ArchiveListing> {
  const result = await runWithoutConnecting(pgRestore.path, ['--list', filePath], signal);
  return {
    ok: result.exitCode === 0,
    toc: String(result.stdout),
    error: String(result.stderr).trim() || `pg_restore exited with code ${result.exitCode}`,
  };
}

export interface TocTableEntry {
  kind: 'TABLE' | 'TABLE DATA';
  oid: number;
  /** "schema name owner", unquoted as pg_restore prints it. */
  tag: string;
}

/** Pure: the archive's TABLE and TABLE DATA entries from `pg_restore --list` output. */
export function tocTableEntries(toc: string): TocTableEntry[] {
  const entries: TocTableEntry[] = [];
  for (const line of toc.split('\n')) {
    const match = /^\d+; \d+ (\d+) (TABLE DATA|TABLE) (.*)$/.exec(line);
    if (match) entries.push({ oid: Number(match[1]), kind: match[2] as TocTableEntry['kind'], tag: match[3]! });
  }
  return entries;
}

/**
 * Pure: the table_counts keys whose data the archive does not hold. With the OIDs this tool
 * records, exact: every relation holding a table's rows (the table, or a partitioned table's
 * leaves) needs a TABLE DATA entry. Metadata without them (written by another tool) can only be
 * matched by name, and pg_restore does not say which parent a partition belongs to, so there
 * the table itself must be in the archive; a key "a.b" may be table b in schema a or a public
 * table called "a.b". Owner names with spaces would make such a match fail: never a false pass.
 */
export function tablesWithoutData(
  metadata: Pick<BackupMetadata, 'table_counts' | 'table_data_oids'>,
  entries: TocTableEntry[],
): string[] {
  const dataOids = new Set(entries.filter((entry) => entry.kind === 'TABLE DATA').map((entry) => entry.oid));
  const recorded = metadata.table_data_oids ?? {};
  return Object.keys(metadata.table_counts).filter((key) => {
    const expected = Object.hasOwn(recorded, key) ? recorded[key] : undefined;
    if (expected) return !expected.every((oid) => dataOids.has(oid));
    return !tableNameCandidates(key).some(([schema, table]) =>
      entries.some((entry) => tagNames(entry.tag, schema, table)),
    );
  });
}

/** A tag is "schema name owner"; after the name only the owner (one word, possibly empty) may follow. */
function tagNames(tag: string, schema: string, table: string): boolean {
  const prefix = `${schema} ${table} `;
  return tag.startsWith(prefix) && !tag.slice(prefix.length).includes(' ');
}

function tableNameCandidates(key: string): Array<[string, string]> {
  const candidates: Array<[string, string]> = [['public', key]];
  for (let dot = key.indexOf('.'); dot > 0; dot = key.indexOf('.', dot + 1))
    candidates.push([key.slice(0, dot), key.slice(dot + 1)]);
  return candidates;
}

// ─── Verification: the checks and --verify ──────────────────────────────────────────────

export interface Check {
  ok: boolean;
  /** What the report line says after ✓ / ✗. */
  summary: string;
}
export type FileChecks = Record<'checksum' | 'size' | 'structure' | 'tables', Check>;
export interface FileInspection {
  checks: FileChecks;
  sha256: string;
  size: number;
  missingTables: string[];
  /** The archive's table of contents (`pg_restore --list`), for restores to read. */
  toc: string;
}

const shortHash = (hex: string) => `${hex.slice(0, 12)}...`;

/** What reading a little of a backup tells: its size on disk, its table of contents, the tables without data. */
type StructureInspection = Pick<FileInspection, 'size' | 'missingTables'> & { listing: ArchiveListing };

async function inspectStructure(
  pgRestore: PgTool | undefined,
  filePath: string,
  metadata: BackupMetadata,
  whyNoClient = 'no pg_restore',
  signal?: AbortSignal,
): Promise<StructureInspection> {
  const unread = { ok: false, toc: '', error: `not read: ${whyNoClient}` };
  const [size, listing] = await Promise.all([
    backupSize(filePath),
    pgRestore ? listArchive(pgRestore, filePath, signal) : unread,
  ]);
  return { size, listing, missingTables: listing.ok ? tablesWithoutData(metadata, tocTableEntries(listing.toc)) : [] };
}

/**
 * Pure: a backup's four checks against its metadata. `hash` is the SHA-256 re-read from disk
 * ('read'), computed on the way to disk by a new backup ('streamed'), or not known yet (undefined:
 * a restore re-reads it while it checks the target server).
 */
function fileInspection(
  metadata: BackupMetadata,
  structure: StructureInspection,
  hash?: { sha256: string; how: 'read' | 'streamed' },
): FileInspection {
  const { size, listing, missingTables } = structure;
  const expectedHash = metadata.checksum_sha256.toLowerCase();
  const expected = shortHash(expectedHash);
  const tableCount = Object.keys(metadata.table_counts).length;
  const checks: FileChecks = {
    checksum: !hash
      ? { ok: true, summary: 'Being re-read' }
      : hash.sha256 !== expectedHash
        ? { ok: false, summary: `Mismatch (expected ${expected}, found ${shortHash(hash.sha256)})` }
        : { ok: true, summary: `${hash.how === 'streamed' ? 'Computed while writing' : 'Match'} (${expected})` },
    size:
      size === metadata.backup_size_bytes
        ? { ok: true, summary: formatBytes(size) }
        : { ok: false, summary: `${size} bytes, but the metadata says ${metadata.backup_size_bytes}` },
    structure: listing.ok
      ? { ok: true, summary: 'Valid (pg_restore --list succeeded)' }
      : { ok: false, summary: `Invalid: ${listing.error.split('\n')[0]}` },
    tables: !listing.ok
      ? { ok: false, summary: 'Not checked: the archive cannot be read' }
      : missingTables.length === 0
        ? { ok: true, summary: `${tableCount} of ${tableCount} tables have data in the archive` }
        : {
            ok: false,
            summary:
              `No data in the archive for ${missingTables.length} of ${tableCount} tables: ` + listSome(missingTables),
          },
  };
  return { checks, sha256: hash?.sha256 ?? '', size, missingTables, toc: listing.toc };
}

/**
 * Check a backup file against its metadata: its bytes (SHA-256, size), archive structure, table data.
 * `streamed` is the hash a new backup computed while writing: hashing the file just written again would
 * cost a full read (from the page cache) and prove nothing more. Later checks (--verify) read every byte.
 */
async function checkBackupFile(
  pgRestore: PgTool,
  filePath: string,
  metadata: BackupMetadata,
  streamed?: DumpOutcome,
  signal?: AbortSignal,
): Promise<FileInspection> {
  const [structure, bytes] = await Promise.all([
    inspectStructure(pgRestore, filePath, metadata, undefined, signal),
    streamed ?? hashBackup(filePath, signal),
  ]);
  return fileInspection(metadata, structure, { sha256: bytes.sha256, how: streamed ? 'streamed' : 'read' });
}

interface CheckKind {
  /** What a failure is called in an error's title. */
  failure: string;
  /** The status, and its label, that a failure gives a backup in --list. */
  status: ListStatus;
  label: string;
  /** Why a failure matters, for the error's details. */
  why(result: VerifyResult): string;
}

/** The checks of a backup file, one row each, in the order failures are named. */
const FILE_CHECKS: Record<keyof FileChecks, CheckKind> = {
  size: {
    failure: 'size mismatch',
    status: 'size_mismatch',
    label: '✗ Size mismatch',
    why: ({ inspection, metadata }) =>
      `the file is ${inspection.size} bytes but was ${metadata.backup_size_bytes} when the backup was taken: it was ` +
      `truncated, extended or replaced`,
  },
  checksum: {
    failure: 'checksum mismatch',
    status: 'checksum_mismatch',
    label: '✗ Checksum mismatch',
    why: () => "the file's SHA-256 is not the one recorded when the backup was taken: its content changed",
  },
  structure: {
    failure: 'archive unreadable',
    status: 'unreadable_archive',
    label: '✗ Unreadable archive',
    why: ({ inspection }) =>
      `pg_restore cannot read the archive: ${inspection.checks.structure.summary.replace(/^Invalid: /, '')}`,
  },
  tables: {
    failure: 'table data missing',
    status: 'missing_table_data',
    label: '✗ Table data missing',
    why: ({ inspection }) =>
      `the archive holds no data for: ${inspection.missingTables.map(visibleControls).join(', ')}`,
  },
};

/** The checks that failed; table data is not among them when the archive could not be read to check it. */
export function failedChecks(checks: FileChecks): Array<keyof FileChecks> {
  const notRun = (name: keyof FileChecks) => name === 'tables' && !checks.structure.ok;
  return (Object.keys(FILE_CHECKS) as Array<keyof FileChecks>).filter((name) => !checks[name].ok && !notRun(name));
}

export interface VerifyResult {
  filePath: string;
  metadataPath: string;
  metadata: BackupMetadata;
  inspection: FileInspection;
  /** The client tools that read the archive, for a restore to use too. */
  client?: PgClient;
}

const VERIFICATION_STEP = 'Backup verification';

/** A failed check as the contract's error: what failed, why it matters, what to do. */
function verificationError(result: VerifyResult): BackupError {
  const failed = failedChecks(result.inspection.checks).map((name) => FILE_CHECKS[name]);
  return new BackupError(
    EXIT.VERIFY_FAILED,
    failed.map((check) => check.failure).join(', '),
    failed.map((check) => check.why(result)).join('; '),
    [
      'Do not restore from this file',
      `Use another backup (list them: npx tsx backup_db.ts --list --output-dir ` +
        `${shellWord(displayPath(path.dirname(result.filePath)))}) or take a new one`,
      'If backups change on their own, check the disk and filesystem (dmesg, smartctl -a)',
    ],
    { report: verifyReportLines(result), data: verifyDocument(result), step: VERIFICATION_STEP },
  );
}

/** Problems with the --verify argument or its metadata, before any check can run (exit 8). */
function verifyInputError(title: string, details: string, hints: string[]): BackupError {
  // Both quote the file's name: escaped here, a line break in it cannot start a line of the error.
  const [shownTitle, shownDetails] = [visibleControls(title), visibleControls(details)];
  return new BackupError(EXIT.VERIFY_FAILED, shownTitle, shownDetails, hints, { step: VERIFICATION_STEP });
}

/** What a failed check throws: a backup deleted meanwhile (by a concurrent retention) is missing, not damaged. */
async function unlessDeleted(error: unknown, readPath: string, filePath: string): Promise<never> {
  if (await pathExists(readPath)) throw error;
  throw verifyInputError('backup file not found', `${displayPath(filePath)} was deleted while it was being verified`, [
    "Another run's retention (--prune, or a backup's) removed it; list the backups with: npx tsx backup_db.ts --list",
  ]);
}

/**
 * The --verify argument must be a readable regular file (symlinks are followed), or a directory-format
 * backup (--jobs): a directory with a toc.dat in it, every file of which is readable.
 */
async function assertReadableFile(filePath: string): Promise<void> {
  const shown = displayPath(filePath);
  let stat;
  try {
    stat = await fs.stat(filePath);
    await fs.access(filePath, fs.constants.R_OK);
    if (stat.isDirectory() && (await fs.stat(path.join(filePath, 'toc.dat')).catch(() => undefined))?.isFile())
      return await assertFilesReadable(filePath);
  } catch (error) {
    if (error instanceof BackupError) throw error;
    const code = errnoCode(error);
    if (code === 'ENOENT')
      throw verifyInputError('backup file not found', `${shown} does not exist`, [
        'Check the path; list the backups with: npx tsx backup_db.ts --list',
      ]);
    if (code === 'ELOOP')
      throw verifyInputError('symbolic link loop', `${shown} is a symbolic link that loops back on itself`, [
        `Inspect it: ls -l ${shellWord(shown)}`,
      ]);
    throw verifyInputError('backup file cannot be read', `${shown}: ${errorText(error)}`, [
      `Check its permissions: ls -l ${shellWord(shown)}`,
      `Make it readable for ${os.userInfo().username}, the user this runs as`,
    ]);
  }
  if (stat.isDirectory()) {
    throw verifyInputError('not a file', `${shown} is a directory`, [
      'Pass a .dump file, e.g. db/backups/<database>_<env>_<timestamp>.dump',
    ]);
  }
  if (!stat.isFile()) throw verifyInputError('not a file', `${shown} is not a regular file`, ['Pass a .dump file']);
}

/**
 * Why `argument` cannot say which file it means, if a name that is not UTF-8 may stand for a U+FFFD in it:
 * Node decodes argv and the environment lossily, so `app_\xff.dump` arrives as `app_\uFFFD.dump`, which may
 * be another file's name (made, written, deleted in its stead). With the hint to rename it.
 */
async function misreadPath(argument: string): Promise<{ why: string; hint: string } | undefined> {
  if (!argument.includes('\uFFFD')) return undefined;
  const parts = path.resolve(argument).split(path.sep);
  for (const [i, part] of parts.entries()) {
    const parent = parts.slice(0, i).join(path.sep) || path.sep;
    const names = part.includes('\uFFFD') ? await fs.readdir(parent, { encoding: 'buffer' }).catch(() => []) : [];
    const raw = names.find((name) => !utf8FileName(name) && name.toString() === part);
    if (raw)
      return {
        why:
          `${displayPath(argument)}: ${bytesShown(raw)} in ${displayPath(parent)} has a name that is not UTF-8, ` +
          `which reaches this tool as ${part}, so the command line cannot say which file it means`,
        hint: `Rename it to a UTF-8 name (ls -b ${shellWord(displayPath(parent))} shows its bytes)`,
      };
  }
  return undefined;
}

/** A backup to verify or restore named through a name that is not UTF-8 (misreadPath): exit 8. */
async function assertPathArgumentKnown(argument: string): Promise<void> {
  const misread = await misreadPath(argument);
  if (misread) throw verifyInputError('file name is not UTF-8', misread.why, [misread.hint]);
}

/** --verify FILE: the file against its metadata. Every problem is exit 8, each with its own message. */
async function runVerify(fileArgument: string, search: ClientSearch, signal?: AbortSignal): Promise<VerifyResult> {
  return unlessInterrupted(
    startVerify(fileArgument, search, signal).then((verification) => verification.complete),
    signal,
  );
}

export interface Verification {
  /** Every check but the SHA-256, which is still being computed (its check says so). */
  quick: VerifyResult;
  /** The whole result once every byte has been re-read; rejects (exit 8) if any check failed. */
  complete: Promise<VerifyResult>;
}

/**
 * --verify's checks, the quick ones now: metadata, size, archive structure and table data, which
 * read a little of the file. The SHA-256 re-read of every byte goes on in `complete`, so that a
 * restore can check its target server meanwhile. If a quick check fails, the re-read is awaited
 * first, so that the report names every check that failed. The checks read `readPath`: a restore's
 * pinned backup (pinBackup), which its names may no longer reach.
 */
async function startVerify(
  fileArgument: string,
  search: ClientSearch,
  signal?: AbortSignal,
  readPath = path.resolve(fileArgument),
): Promise<Verification> {
  const filePath = path.resolve(fileArgument);
  await assertReadableFile(filePath);
  if (!filePath.endsWith(DUMP_SUFFIX)) {
    throw verifyInputError('not a backup file', `${displayPath(filePath)} does not end in ${DUMP_SUFFIX}`, [
      'Pass the .dump file itself; its metadata is found next to it',
    ]);
  }
  const metadataPath = metadataPathFor(filePath);
  const loaded = await loadMetadata(metadataPath, path.basename(filePath));
  if (loaded.status === 'missing') {
    throw verifyInputError('metadata file not found', `${displayPath(metadataPath)} does not exist`, [
      'Without its metadata there is no checksum to verify against',
      'Copy the .metadata.json file along with the .dump file, or take a new backup',
    ]);
  }
  if (loaded.status === 'unreadable') {
    throw verifyInputError('metadata file cannot be read', `${displayPath(metadataPath)}: ${loaded.why}`, [
      `Check its permissions: ls -l ${shellWord(displayPath(metadataPath))}`,
      'Metadata is always mode 0600: run this as the user the backups run as (sudo -u)',
    ]);
  }
  if (loaded.status === 'invalid') {
    throw verifyInputError('metadata is invalid', `${displayPath(metadataPath)}: ${loaded.problems.join('; ')}`, [
      'The metadata was edited or damaged; restore it from wherever the backup was copied from',
      'Or take a new backup',
    ]);
  }
  // A damaged header can claim any archive format: without a client for it, the checksum decides
  // whether the file needs a newer pg_restore (intact: exit 6) or is simply damaged (exit 8).
  let client: PgClient | undefined;
  let noClient: BackupError | undefined;
  const failed = (error: unknown) => unlessDeleted(error, readPath, filePath);
  try {
    client = await findRestoreClient(search, await readArchiveHeader(readPath), signal);
  } catch (error) {
    if (!(error instanceof BackupError) || error.exitCode !== EXIT.TOOL_NOT_FOUND) return failed(error);
    noClient = error;
  }
  const { metadata } = loaded;
  const hashing = hashBackup(readPath, signal);
  hashing.catch(() => undefined); // awaited below; a read error must not go unhandled meanwhile
  const structure = await inspectStructure(client?.pgRestore, readPath, metadata, noClient?.details, signal).catch(
    failed,
  );
  const resultWith = (hash?: DumpOutcome): VerifyResult => ({
    filePath,
    metadataPath,
    metadata,
    inspection: fileInspection(metadata, structure, hash && { sha256: hash.sha256, how: 'read' }),
    ...(client ? { client } : {}),
  });
  const complete = hashing
    .then((hash) => {
      const result = resultWith(hash);
      if (noClient && result.inspection.checks.checksum.ok && result.inspection.checks.size.ok) throw noClient;
      if (failedChecks(result.inspection.checks).length > 0) throw verificationError(result);
      return result;
    })
    .catch(failed);
  const quick = resultWith();
  if (noClient || failedChecks(quick.inspection.checks).length > 0) await complete;
  complete.catch(() => undefined); // the caller awaits it; until then a failure must not go unhandled
  return { quick, complete };
}

// ─── Listing ─────────────────────────────────────────────────────────────────────────────

export type ListStatus =
  | 'verified'
  | 'no_metadata'
  | 'invalid_metadata'
  | 'unreadable_metadata'
  | 'size_mismatch'
  | 'checksum_mismatch'
  | 'unreadable_archive'
  | 'missing_table_data'
  | 'needs_newer_pg_restore'
  | 'in_progress'
  | 'incomplete';

export interface ListEntry {
  file: string;
  status: ListStatus;
  timestamp?: string;
  environment?: string;
  database?: string;
  sizeBytes: number;
  /** File modification time: orders backups whose second-resolution timestamps are equal. */
  modifiedMs: number;
  problems: string[];
  /** The last restore drill, if any. */
  restoreTest?: { time: string; ok: boolean };
  /** The cluster the backup was taken from, where its metadata records it. */
  systemIdentifier?: string;
}

export interface Listing {
  directory: string;
  exists: boolean;
  fullCheck: boolean;
  backups: ListEntry[];
  /** *.dump.partial files, of running backups or left by killed ones: shown, never counted as backups. */
  incomplete: ListEntry[];
}

/**
 * Pure: newest first by timestamp; equal timestamps (one-second resolution) by modification time;
 * entries without a readable timestamp last.
 */
export function sortNewestFirst<T extends { timestamp?: string | undefined; modifiedMs: number; file: string }>(
  entries: T[],
): T[] {
  const time = (entry: T) => {
    const ms = entry.timestamp ? Date.parse(entry.timestamp) : NaN;
    return Number.isNaN(ms) ? -Infinity : ms;
  };
  // Two undated entries give NaN (-Infinity minus itself), which is falsy: they fall to the next key.
  return [...entries].sort((a, b) => time(b) - time(a) || b.modifiedMs - a.modifiedMs || (a.file > b.file ? 1 : -1));
}

/** Why reading a backup failed, in the words its --list row gives. */
const failureText = (error: unknown) => (error instanceof BackupError ? error.details : errorText(error));

/**
 * One backup's row. One deleted while it is checked (a concurrent --prune or retention) has none: it was
 * deleted, not damaged. Any other failure to read this one file is its row's status, not the listing's.
 */
async function describeBackup(
  dir: string,
  name: string,
  restoreClientFor?: ReturnType<typeof restoreClientLookup>,
  signal?: AbortSignal,
): Promise<ListEntry | undefined> {
  const described = await checkListedBackup(dir, name, restoreClientFor, signal).catch((error: unknown) => {
    signal?.throwIfAborted();
    const found = { file: name, ...parseBackupFileName(name), sizeBytes: 0, modifiedMs: 0 };
    return { ...found, status: 'unreadable_archive', problems: [failureText(error)] } satisfies ListEntry;
  });
  return described?.status === 'verified' || (await pathExists(path.join(dir, name))) ? described : undefined;
}

/**
 * One backup's status. The quick check (metadata valid, size matches) reads no data; with a
 * pg_restore to use, the full check re-hashes the file and reads its table of contents.
 */
async function checkListedBackup(
  dir: string,
  name: string,
  restoreClientFor?: ReturnType<typeof restoreClientLookup>,
  signal?: AbortSignal,
): Promise<ListEntry | undefined> {
  const filePath = path.join(dir, name);
  const found = await inspectEntry(dir, name);
  if (!found) return undefined;
  const { unreadable, ...facts } = found;
  const entry: ListEntry = { ...facts, status: 'verified', problems: [] };
  const loaded = await loadMetadata(metadataPathFor(filePath), name);
  if (loaded.status === 'missing') return { ...entry, status: 'no_metadata', problems: ['no metadata file'] };
  if (loaded.status === 'invalid') return { ...entry, status: 'invalid_metadata', problems: loaded.problems };
  if (loaded.status === 'unreadable') return { ...entry, status: 'unreadable_metadata', problems: [loaded.why] };

  const { metadata } = loaded;
  const drill = metadata.last_restore_test;
  const described = {
    ...entry,
    timestamp: metadata.backup_timestamp,
    environment: metadata.environment,
    database: metadata.database_name,
    ...(drill ? { restoreTest: { time: drill.time, ok: drill.ok } } : {}),
    ...(metadata.system_identifier ? { systemIdentifier: metadata.system_identifier } : {}),
  };
  const failing = (status: ListStatus, problems: string[]): ListEntry => ({ ...described, status, problems });
  if (unreadable) return failing('unreadable_archive', [unreadable]);
  if (entry.sizeBytes !== metadata.backup_size_bytes) {
    return failing('size_mismatch', [`${entry.sizeBytes} bytes, but the metadata says ${metadata.backup_size_bytes}`]);
  }
  if (!restoreClientFor) return described;
  const cannotRead = await assertFilesReadable(filePath).then(() => undefined, failureText);
  if (cannotRead) return failing('unreadable_archive', [cannotRead]);
  let client: PgClient;
  try {
    client = await restoreClientFor(await readArchiveHeader(filePath));
  } catch (error) {
    const why = failureText(error);
    if (!(error instanceof BackupError) || error.exitCode !== EXIT.TOOL_NOT_FOUND)
      return failing('unreadable_archive', [why]);
    // As --verify: a damaged header can claim any format; the checksum tells an intact backup from a damaged one.
    const { sha256 } = await hashBackup(filePath, signal);
    const expected = metadata.checksum_sha256.toLowerCase();
    if (sha256 === expected) return failing('needs_newer_pg_restore', [why]);
    return failing('checksum_mismatch', [`Mismatch (expected ${shortHash(expected)}, found ${shortHash(sha256)})`]);
  }
  const { checks } = await checkBackupFile(client.pgRestore, filePath, metadata, undefined, signal);
  const failed = failedChecks(checks);
  const problems = failed.map((check) => checks[check].summary);
  return failed.length === 0 ? described : failing(FILE_CHECKS[failed[0]!].status, problems);
}

/**
 * What a directory entry says by itself (name, size, age); undefined unless a file or directory. A
 * directory this user cannot read is `unreadable` (why), for its row to say: one root-owned 0700
 * directory must not break the listing, and with it retention and --check. A link to a directory
 * is never walked: it may lead anywhere (/usr, /), while pg_dump writes a directory in place.
 */
async function inspectEntry(
  dir: string,
  name: string,
): Promise<(Omit<ListEntry, 'status' | 'problems'> & { unreadable?: string }) | undefined> {
  const entryPath = path.join(dir, name);
  const entry = await fs.lstat(entryPath).catch(() => undefined);
  if (!entry) return undefined; // deleted meanwhile (a concurrent --prune): no backup, no row
  const stat = await fs.stat(entryPath).catch(() => undefined);
  const found = { file: name, ...parseBackupFileName(name), sizeBytes: 0, modifiedMs: (stat ?? entry).mtimeMs };
  // Never read, but never left out either: its metadata describes a backup that is not there to restore.
  if (!stat) return { ...found, unreadable: 'a symbolic link to nothing (its target is gone)' };
  if (!(stat.isFile() || stat.isDirectory())) return { ...found, unreadable: `${fileKind(stat)}, not an archive` };
  if (entry.isSymbolicLink() && stat.isDirectory())
    return { ...found, unreadable: 'a symbolic link to a directory, not followed' };
  try {
    return { ...found, sizeBytes: await backupSize(entryPath) };
  } catch (error) {
    return { ...found, unreadable: failureText(error) };
  }
}

/**
 * A partial is a running backup's while its database's lock has a live owner, else a leftover. A lock
 * that cannot be read (not a regular file, another user's) is that row's problem, not the listing's.
 */
async function describePartial(dir: string, name: string): Promise<ListEntry | undefined> {
  const found = await inspectEntry(dir, name);
  if (!found) return undefined;
  const fromName = parseBackupFileName(name);
  const lockPath = fromName && path.join(dir, lockFileName(fromName.database, fromName.environment));
  const lock = lockPath ? await readLock(lockPath).catch((error: unknown) => new Error(failureText(error))) : undefined;
  if (lock instanceof Error) {
    const why = `its database's lock ${displayPath(lockPath!)} cannot be read: ${lock.message}`;
    return { ...found, status: 'incomplete', problems: [why] };
  }
  const owner = lock?.owner;
  const running = owner !== undefined && (await lockOwnerAlive(owner));
  return {
    ...found,
    status: running ? 'in_progress' : 'incomplete',
    problems: [
      running
        ? `being written by pid ${owner.pid}`
        : 'left by a backup that did not finish; the next backup of this database removes it',
    ],
  };
}

/**
 * With the full check, any backup that fails a check makes the listing fail (exit 8) for monitoring;
 * else one that only this machine's pg_restore cannot read is exit 6, as --verify says of it.
 */
export function listingExitCode(listing: Listing): number {
  const statuses = listing.fullCheck ? listing.backups.map((backup) => backup.status) : [];
  if (statuses.some((status) => status !== 'verified' && status !== 'needs_newer_pg_restore'))
    return EXIT.VERIFY_FAILED;
  return statuses.includes('needs_newer_pg_restore') ? EXIT.TOOL_NOT_FOUND : EXIT.OK;
}

/** Pure: why a listing fails (the backups behind listingExitCode) as the contract's one error; none if it passes. */
export function listingFailure(listing: Listing): BackupError | undefined {
  const exitCode = listingExitCode(listing);
  if (exitCode === EXIT.OK) return undefined;
  const needsNewer = exitCode === EXIT.TOOL_NOT_FOUND;
  const failed = listing.backups.filter((b) =>
    needsNewer ? b.status === 'needs_newer_pg_restore' : !['verified', 'needs_newer_pg_restore'].includes(b.status),
  );
  const first = path.join(listing.directory, failed[0]!.file);
  const verify = `npx tsx backup_db.ts --verify ${shellWord(displayPath(first))}`;
  const title = needsNewer
    ? `${plural(failed.length, 'backup')} cannot be verified without a newer pg_restore`
    : `${plural(failed.length, 'backup')} failed verification`;
  // Names escaped: a line break in one must not start a line of the error.
  const details = failed
    .map((b) => visibleControls(`${b.file}: ${b.problems.join(', ') || STATUS_LABELS[b.status]}`))
    .join('; ');
  const hints = needsNewer
    ? [`See which pg_restore it needs: ${verify}`, ...clientInstallHints(undefined)]
    : [`See why: ${verify}`, 'Do not restore from a backup that failed; take a new one'];
  return new BackupError(exitCode, title, details, hints);
}

/**
 * The names in the backup directory, as bytes (see utf8FileName), or undefined where none exists yet (a
 * dangling symlink too); any other failure to read it (not a directory, no permission) is an error, for
 * every command alike.
 */
async function backupDirNames(dir: string): Promise<Buffer[] | undefined> {
  try {
    return await fs.readdir(dir, { encoding: 'buffer' });
  } catch (error) {
    if (errnoCode(error) === 'ENOENT') return undefined;
    throw fileSystemError(error, `Cannot read the backup directory ${displayPath(dir)}`, dir, await ownerOf(dir));
  }
}

/**
 * A name that is not UTF-8, shown by its bytes: what it decodes to may be another file's name, so it is
 * never read, counted or deleted by that name; it names no database, so retention and --check skip it.
 */
async function notUtf8Entry(dir: string, raw: Buffer): Promise<ListEntry> {
  const stat = await fs.stat(Buffer.concat([Buffer.from(dir + path.sep), raw])).catch(() => undefined);
  const why = 'its name is not UTF-8, so this tool cannot open it by name; rename it to check it';
  return {
    file: bytesShown(raw),
    status: 'unreadable_archive',
    sizeBytes: stat?.size ?? 0,
    modifiedMs: 0,
    problems: [why],
  };
}

/** --list: every *.dump in the directory with its status; *.dump.partial files apart. */
async function runList(
  dir: string,
  fullCheck: boolean,
  search: ClientSearch = {},
  signal?: AbortSignal,
): Promise<Listing> {
  const names = await backupDirNames(dir);
  if (!names) return { directory: dir, exists: false, fullCheck, backups: [], incomplete: [] };
  const restoreClientFor = fullCheck ? restoreClientLookup(search) : undefined;
  // A named client directory without pg_restore verifies nothing: say so, as --verify does, not "needs newer" per file.
  if (restoreClientFor && search.pgBinDir) await restoreClientFor(undefined);
  const backups: ListEntry[] = [];
  const incomplete: ListEntry[] = [];
  for (const raw of names) {
    const name = utf8FileName(raw);
    const shown = name ?? bytesShown(raw);
    const partial = shown.endsWith(DUMP_SUFFIX + PARTIAL_SUFFIX);
    if (!partial && !shown.endsWith(DUMP_SUFFIX)) continue;
    const described =
      name === undefined
        ? notUtf8Entry(dir, raw)
        : partial
          ? describePartial(dir, name)
          : describeBackup(dir, name, restoreClientFor, signal);
    const entry = await unlessInterrupted(described, signal);
    if (entry) (partial ? incomplete : backups).push(entry);
  }
  return {
    directory: dir,
    exists: true,
    fullCheck,
    backups: sortNewestFirst(backups),
    incomplete: sortNewestFirst(incomplete),
  };
}

// ─── Retention ───────────────────────────────────────────────────────────────────────────

/** How many backups each rule keeps; 0 turns a rule off. Like restic's `forget --keep-*`. */
export interface RetentionPolicy {
  last: number;
  daily: number;
  weekly: number;
  monthly: number;
}

const RETENTION_RULES = ['last', 'daily', 'weekly', 'monthly'] as const;

export function hasRetentionRule(policy: RetentionPolicy): boolean {
  return RETENTION_RULES.some((rule) => policy[rule] > 0);
}

export function describePolicy(policy: RetentionPolicy): string {
  return RETENTION_RULES.filter((rule) => policy[rule] > 0)
    .map((rule) => `keep-${rule} ${policy[rule]}`)
    .join(', ');
}

/** Building an Intl formatter costs far more than using one: one per time zone. */
const dayFormatters = new Map<string, Intl.DateTimeFormat>();
function dayFormatter(timeZone: string): Intl.DateTimeFormat {
  const options = { timeZone, year: 'numeric', month: '2-digit', day: '2-digit' } as const;
  if (!dayFormatters.has(timeZone)) dayFormatters.set(timeZone, new Intl.DateTimeFormat('en-US', options));
  return dayFormatters.get(timeZone)!;
}

/**
 * The zone retention counts days in. Node names none for TZ=UTC0, TZ=localtime or a zoneinfo path,
 * an unusable "Etc/Unknown" for an empty TZ (which the C library takes as UTC), and "UTC" for a path
 * outside the zoneinfo directory: the zone file's path (see localTimeFile) names its zone, its
 * posix/ or right/ variant that zone's, and decides when TZ is a path, as it does for the C
 * library; anything else unusable means UTC, so the header always names the zone used.
 */
export function retentionTimeZone(resolved: string | undefined, tz: string | undefined, zoneFile = tz): string {
  const fromPath = /\/zoneinfo\/(?:(?:posix|right)\/)?(.+)$/.exec(zoneFile ?? '')?.[1];
  const zones = tz?.replace(/^:/, '').startsWith('/') ? [fromPath, resolved] : [resolved, fromPath];
  return zones.find((zone) => zone !== undefined && isUsableTimeZone(zone)) ?? 'UTC';
}

/**
 * The file the C library takes local time from, as TZ says (a leading ':' dropped, a relative name
 * under the zoneinfo directory) or /etc/localtime when TZ is unset; its links resolved, since
 * systemd's TZ=:/etc/localtime and /etc/localtime itself are usually links to the zone's own file.
 */
async function localTimeFile(tz: string | undefined): Promise<string | undefined> {
  if (tz === '') return undefined;
  const file = path.resolve('/usr/share/zoneinfo', tz?.replace(/^:/, '') ?? '/etc/localtime');
  return fs.realpath(file).catch(() => file);
}

function isUsableTimeZone(zone: string): boolean {
  try {
    dayFormatter(zone);
    return true;
  } catch {
    return false;
  }
}

/**
 * Pure: the calendar day, ISO week and month of an instant in a time zone. Days are local days, so
 * a backup at 00:30 and one at 23:30 on a DST change day share a day, as an operator expects.
 */
export function calendarBuckets(date: Date, timeZone: string): { day: string; week: string; month: string } {
  const parts = dayFormatter(timeZone).formatToParts(date);
  const part = (type: string) => parts.find((p) => p.type === type)!.value;
  const [year, month, day] = [part('year'), part('month'), part('day')];
  // ISO 8601 week: the week (Monday to Sunday) belongs to the year of its Thursday.
  const thursday = new Date(Date.UTC(Number(year), Number(month) - 1, Number(day)));
  thursday.setUTCDate(thursday.getUTCDate() + 4 - (thursday.getUTCDay() || 7));
  const weekYear = thursday.getUTCFullYear();
  const week = Math.ceil(((thursday.getTime() - Date.UTC(weekYear, 0, 1)) / 86_400_000 + 1) / 7);
  return {
    day: `${year}-${month}-${day}`,
    week: `${weekYear}-W${String(week).padStart(2, '0')}`,
    month: `${year}-${month}`,
  };
}

export interface RetentionDecision<T> {
  item: T;
  keep: boolean;
  /** Why it is kept: "newest backup", "last 2", "daily 2025-01-27", "weekly 2025-W05", "monthly 2025-01". */
  reasons: string[];
}

/** Pure: newest first; equal times by file name, so that the input's order never changes a decision. */
function newestFirst<T extends { time: Date; file: string }>(items: T[]): T[] {
  return [...items].sort(
    (a, b) => b.time.getTime() - a.time.getTime() || (a.file < b.file ? 1 : a.file > b.file ? -1 : 0),
  );
}

/**
 * Pure: grandfather-father-son selection, restic's algorithm. Newest first, each rule keeps the
 * first backup of every new bucket (for `last`, every backup) until its count is used up; a backup
 * is kept if any rule keeps it. The newest backup is always kept, whatever the policy.
 */
export function selectRetention<T extends { time: Date; file: string }>(
  items: T[],
  policy: RetentionPolicy,
  timeZone: string,
): Array<RetentionDecision<T>> {
  const rules = RETENTION_RULES.map((name) => ({ name, previous: undefined as string | undefined, kept: 0 }));
  return newestFirst(items).map((item, index) => {
    const { day, week, month } = calendarBuckets(item.time, timeZone);
    const buckets = { last: String(index), daily: day, weekly: week, monthly: month };
    const reasons = index === 0 ? ['newest backup'] : [];
    for (const rule of rules) {
      const bucket = buckets[rule.name];
      if (rule.kept >= policy[rule.name] || bucket === rule.previous) continue;
      rule.previous = bucket;
      rule.kept++;
      reasons.push(rule.name === 'last' ? `last ${rule.kept}` : `${rule.name} ${bucket}`);
    }
    return { item, keep: reasons.length > 0, reasons };
  });
}

/**
 * How far ahead of this machine's clock a backup may be dated and still count: the clocks of
 * machines sharing a backup directory differ by seconds, not by minutes.
 */
export const CLOCK_TOLERANCE_MS = 5 * 60_000;

export interface RetentionCandidate {
  file: string;
  time: Date;
  timestamp: string;
  sizeBytes: number;
}

export interface RetentionPlan {
  /** Every backup the policy judges: this database and environment, quick check passed, not future-dated. */
  decisions: Array<RetentionDecision<RetentionCandidate>>;
  /** This database's files the policy does not judge (damaged, undescribed, dated after now): never deleted. */
  leftAlone: Array<{ file: string; why: string }>;
  /** The newest backup to keep, when it must pass the full check before anything is deleted. */
  mustVerify?: RetentionCandidate;
}

export interface RetentionScope {
  database: string;
  environment: Environment;
  policy: RetentionPolicy;
  timeZone: string;
  now: Date;
  /** The backup this run has just made (its hash computed on the way to disk): never deleted, already checked. */
  justMade?: string;
  /**
   * The configured server's cluster: backups recording another are never judged; null where it cannot be
   * read (then none recording one is); left out by --check, which judges no server's backups apart.
   */
  systemIdentifier?: string | null;
}

/**
 * Pure: the retention plan for one database and environment on one server (a backup whose metadata
 * names no server, older or another tool's, counts as this server's). Only backups that pass the quick check
 * count; one dated after now (a wrong clock, a copied file) is left alone, so it can neither be kept in
 * place of real ones nor displace them; the run's own new backup is always kept; and unless it is the
 * newest kept, the newest kept is named for a full check, because deleting anything relies on it.
 */
export function planRetention(entries: ListEntry[], scope: RetentionScope): RetentionPlan {
  const ours = entries.filter((e) => e.database === scope.database && e.environment === scope.environment);
  const horizon = scope.now.getTime() + CLOCK_TOLERANCE_MS;
  const leftAlone: RetentionPlan['leftAlone'] = [];
  const candidates: RetentionCandidate[] = [];
  for (const entry of ours) {
    const time = new Date(entry.timestamp ?? NaN);
    const server = entry.systemIdentifier;
    if (server !== undefined && scope.systemIdentifier !== undefined && server !== scope.systemIdentifier)
      leftAlone.push({
        file: entry.file,
        why:
          scope.systemIdentifier === null
            ? `this server does not say which cluster it is; the backup names ${server}`
            : `from another server (system identifier ${server})`,
      });
    else if (entry.status !== 'verified' || Number.isNaN(time.getTime()))
      leftAlone.push({ file: entry.file, why: STATUS_LABELS[entry.status] });
    else if (time.getTime() > horizon)
      leftAlone.push({ file: entry.file, why: `dated ${entry.timestamp}, after this machine's time` });
    else candidates.push({ file: entry.file, time, timestamp: entry.timestamp!, sizeBytes: entry.sizeBytes });
  }
  // Defence in depth: a name listed twice (misread) may be the very file another entry keeps: never deleted.
  const names = entries.map((e) => e.file);
  const listedTwice = (file: string) => names.indexOf(file) !== names.lastIndexOf(file);
  const decisions = selectRetention(candidates, scope.policy, scope.timeZone).map((decision) =>
    decision.keep
      ? decision
      : decision.item.file === scope.justMade
        ? { ...decision, keep: true, reasons: ["this run's backup"] }
        : listedTwice(decision.item.file)
          ? { ...decision, keep: true, reasons: ['its name is listed twice'] }
          : decision,
  );
  const newest = decisions[0]?.item;
  const deletes = decisions.some((d) => !d.keep);
  return {
    decisions,
    leftAlone,
    ...(deletes && newest && newest.file !== scope.justMade ? { mustVerify: newest } : {}),
  };
}

export interface RetentionReport extends RetentionPlan {
  policy: RetentionPolicy;
  timeZone: string;
  dryRun: boolean;
  deleted: string[];
  freedBytes: number;
}

/**
 * Apply the policy to one database+environment, under its lock. Nothing is deleted until the newest
 * backup that stays has passed the full check (a re-read of every byte), unless this run has just made
 * it; if it fails, nothing is deleted (exit 8). Each backup is deleted by deleteBackup: a crash midway leaves
 * only leftovers that the next backup removes.
 */
async function applyRetention(
  config: DbConfig,
  options: Pick<BackupOptions, 'outputDir' | 'retention' | 'dryRun' | 'search'>,
  server: Pick<RetentionScope, 'justMade' | 'systemIdentifier'>,
  signal: AbortSignal,
): Promise<RetentionReport> {
  const { outputDir: dir, retention: policy, dryRun } = options;
  const listing = await runList(dir, false);
  const { TZ: tz } = process.env;
  const timeZone = retentionTimeZone(Intl.DateTimeFormat().resolvedOptions().timeZone, tz, await localTimeFile(tz));
  const { database, environment } = config;
  const plan = planRetention(listing.backups, { database, environment, policy, timeZone, now: new Date(), ...server });
  if (plan.mustVerify) await assertNewestKeptIsSound(path.join(dir, plan.mustVerify.file), options.search, signal);
  const doomed = plan.decisions.filter((d) => !d.keep).map((d) => d.item);
  signal.throwIfAborted();
  if (!dryRun) {
    for (const [deleted, backup] of doomed.entries()) {
      // An interrupt stops pruning between backups, never between a dump and its metadata.
      if (signal.aborted) throw pruningInterrupted(signal.reason, deleted, doomed.length);
      await deleteBackup(dir, backup.file);
    }
    if (doomed.length > 0) await syncDirectory(dir);
  }
  return {
    ...plan,
    policy,
    timeZone,
    dryRun,
    deleted: doomed.map((b) => b.file),
    freedBytes: doomed.reduce((sum, b) => sum + b.sizeBytes, 0),
  };
}

/**
 * Delete a backup: its dump first loses its name, durably (a `.partial`, which the next backup's clean-up
 * removes), then its metadata goes, then its files. A run killed while deleting a directory's files
 * (SIGKILL, power loss) so leaves a leftover, never a `.dump` that looks damaged for ever. A directory this
 * user cannot empty is refused before it is renamed, so that it stays a backup. A refusal names the owner.
 */
async function deleteBackup(dir: string, file: string): Promise<void> {
  const dumpPath = path.join(dir, file);
  const doomed = dumpPath + PARTIAL_SUFFIX;
  try {
    if ((await fs.lstat(dumpPath)).isDirectory()) await fs.access(dumpPath, fs.constants.W_OK | fs.constants.X_OK);
    await fs.rename(dumpPath, doomed);
    await syncDirectory(dir);
    await fs.rm(path.join(dir, metadataFileName(file)), { force: true });
    await removeEntry(doomed);
  } catch (error) {
    const code = errnoCode(error);
    if (code !== 'EPERM' && code !== 'EACCES') throw error;
    const owner = await ownerOf((error as NodeJS.ErrnoException).path ?? dumpPath);
    // Escaped: the name, also in the system's message, must not start a line of the error.
    const why = visibleControls(`not allowed to delete ${file} (${owner}): ${errorText(error)}`);
    throw Object.assign(new Error(why), { code });
  }
}

/** An interrupt between deletions: the rules' other deletions had been done, which the usual words deny. */
function pruningInterrupted(interrupt: BackupError, deleted: number, doomed: number): BackupError {
  if (deleted === 0) return interrupt;
  const details = `retention was stopped after deleting ${deleted} of the ${doomed} backups its rules delete`;
  return new BackupError(interrupt.exitCode, interrupt.title, details, interrupt.hints);
}

/** The full check of the backup retention would leave as the newest; a failure stops all deletion, as does `signal`. */
async function assertNewestKeptIsSound(file: string, search: ClientSearch, signal: AbortSignal): Promise<void> {
  try {
    await runVerify(file, search, signal);
  } catch (error) {
    // Stopped by an interrupt, the check proves nothing either way.
    signal.throwIfAborted();
    if (!(error instanceof BackupError) || error.exitCode !== EXIT.VERIFY_FAILED) throw error;
    throw new BackupError(
      EXIT.VERIFY_FAILED,
      'Retention refused: the newest backup to keep failed verification',
      `${visibleControls(path.basename(file))} would be the newest backup kept, so deleting older ones relies on ` +
        `it, but ${error.title}: ${error.details}`,
      [
        'Nothing was deleted',
        `Inspect it: npx tsx backup_db.ts --verify ${shellWord(displayPath(file))}`,
        'Take a new backup (it becomes the newest), then prune again; move the damaged file away if it cannot be ' +
          'repaired',
      ],
      { ...error.extra, step: undefined },
    );
  }
}

/**
 * --prune: the retention policy alone, for the configured database, under its lock. It asks the server
 * which cluster it is, so that a same-named database's backups from another server are never judged.
 */
async function runPrune(
  config: DbConfig,
  options: Pick<BackupOptions, 'outputDir' | 'retention' | 'dryRun' | 'search' | 'connectTimeoutSeconds'>,
  signal: AbortSignal,
): Promise<RetentionReport | undefined> {
  if (!hasRetentionRule(options.retention)) {
    throw configError('--prune needs a retention rule', [
      'Add one or more of --keep-last N, --keep-daily N, --keep-weekly N, --keep-monthly N',
      'Or set BACKUP_KEEP_LAST / BACKUP_KEEP_DAILY / BACKUP_KEEP_WEEKLY / BACKUP_KEEP_MONTHLY',
    ]);
  }
  if (!(await backupDirNames(options.outputDir))) return undefined;
  const seconds = options.connectTimeoutSeconds;
  const systemIdentifier = await withClient(config, seconds, clusterIdentifierWithin(seconds), { signal }).catch(
    (error: unknown) => {
      // An interrupt wins over a connection attempt it outlasted.
      signal.throwIfAborted();
      const failure = connectionError(error, config, seconds);
      const why = "--prune asks the server which server it is, so as never to delete another server's backups";
      throw new BackupError(failure.exitCode, failure.title, failure.details, [...failure.hints, why], failure.extra);
    },
  );
  signal.throwIfAborted();
  const lock = await acquireBackupLock(options.outputDir, config, true);
  try {
    return await applyRetention(config, options, { systemIdentifier: systemIdentifier ?? null }, signal);
  } finally {
    await releaseLock(lock);
  }
}

// ─── Freshness check ─────────────────────────────────────────────────────────────────────

export interface Freshness {
  /** The newest backup of this database and environment that passes the quick check, not dated after now. */
  newest?: RetentionCandidate;
  ageMs?: number;
  maxAgeMs: number;
  /** This database's backups that pass the quick check and count. */
  backups: number;
  /** This database's files that do not count: damaged, undescribed, or dated after now. */
  notCounted: Array<{ file: string; why: string }>;
  ok: boolean;
}

/** Pure: an age in whole seconds, as backups are named: within the second after a limit it reads, and is, the limit. */
const ageAt = (now: Date, timeMs: number) => Math.max(0, Math.floor((now.getTime() - timeMs) / 1000) * 1000);

/**
 * Pure: is the newest usable backup of this database and environment at most `maxAgeMs` old?
 * The same candidates as retention's: a damaged backup, or one dated after now (which would look
 * fresh for ever), does not count.
 */
export function judgeFreshness(
  entries: ListEntry[],
  scope: Pick<RetentionScope, 'database' | 'environment' | 'now'>,
  maxAgeMs: number,
): Freshness {
  const noRules = { last: 0, daily: 0, weekly: 0, monthly: 0 };
  const plan = planRetention(entries, { ...scope, policy: noRules, timeZone: 'UTC' });
  const newest = plan.decisions[0]?.item;
  const ageMs = newest && ageAt(scope.now, newest.time.getTime());
  return {
    ...(newest ? { newest, ageMs } : {}),
    maxAgeMs,
    backups: plan.decisions.length,
    notCounted: plan.leftAlone,
    ok: ageMs !== undefined && ageMs <= maxAgeMs,
  };
}

/** Pure: an age as people read it: "3 d 4 h", "2 h 5 min", "45 s"; `exact` keeps every unit, "1 d 2 h 40 min 5 s". */
export function formatAge(ms: number, exact = false): string {
  const [d, h, m, s] = [
    Math.floor(ms / 86_400_000),
    Math.floor(ms / 3_600_000) % 24,
    Math.floor(ms / 60_000) % 60,
    Math.floor(ms / 1000) % 60,
  ];
  if (exact) return [d && `${d} d`, h && `${h} h`, m && `${m} min`, s && `${s} s`].filter(Boolean).join(' ') || '0 s';
  if (d > 0) return h > 0 ? `${d} d ${h} h` : `${d} d`;
  if (h > 0) return m > 0 ? `${h} h ${m} min` : `${h} h`;
  return m > 0 ? `${m} min` : `${s} s`;
}

/** Pure: "1 file there does not count", "2 files that do not count". */
const filesNotCounted = (n: number, link: 'there' | 'that') =>
  `${plural(n, 'file')} ${link} ${n === 1 ? 'does' : 'do'} not count`;

/**
 * --check --max-age: for a monitoring system. Exit 0 if the newest usable backup is young enough;
 * otherwise, or without any, exit 8 saying how old it is, which file, and how many there are. With
 * --verify the newest backup is re-read too.
 */
async function runCheck(
  { database, environment }: Pick<DbConfig, 'database' | 'environment'>,
  outputDir: string,
  maxAgeMs: number,
  fullCheck: boolean,
  search: ClientSearch,
  signal?: AbortSignal,
): Promise<Freshness> {
  const listing = await runList(outputDir, false, {}, signal);
  const now = new Date();
  const freshness = judgeFreshness(listing.backups, { database, environment, now }, maxAgeMs);
  const what = `${database} (${environment}) in ${displayPath(outputDir)}${path.sep}`;
  const data = freshnessDocument(freshness, outputDir, fullCheck);
  const hints = [
    'Check that the scheduled job still runs: crontab -l, systemctl list-timers, and its log',
    `Take a backup now: npx tsx backup_db.ts --env ${environment} --output-dir ${shellWord(displayPath(outputDir))}`,
    `See what is there: npx tsx backup_db.ts --list --output-dir ${shellWord(displayPath(outputDir))}`,
  ];
  // The details quote file names: escaped, a line break in one cannot start a line of the error.
  const stale = (title: string, details: string) =>
    new BackupError(EXIT.VERIFY_FAILED, title, visibleControls(details), hints, { data });
  // Not "no backup": this user cannot see them (metadata is always 0600), one of which, by its name's date, might
  // pass. The fix is who runs it. Ones that would be too old all the same are not why it fails.
  const mightPass = (e: ListEntry) => !(ageAt(now, Date.parse(e.timestamp ?? '')) > maxAgeMs);
  const hidden = listing.backups.filter(
    (e) =>
      e.status === 'unreadable_metadata' && e.database === database && e.environment === environment && mightPass(e),
  );
  if (!freshness.ok && hidden.length > 0) {
    const which = hidden.map((e) => `${e.file}: ${e.problems[0]}`).join('; ');
    throw new BackupError(
      EXIT.PERMISSION,
      "Cannot read the backups' metadata",
      visibleControls(`${plural(hidden.length, 'backup')} of ${what} cannot be judged: ${which}`),
      ['Metadata is always mode 0600: run the check as the user the backups run as (sudo -u)', ...hints.slice(2)],
      { data },
    );
  }
  if (!freshness.newest) {
    const { notCounted } = freshness;
    const why = notCounted.map((f) => `${f.file}: ${f.why}`).join('; ');
    const others = notCounted.length > 0 ? `; ${filesNotCounted(notCounted.length, 'there')} (${why})` : '';
    throw stale('No backup found', `no backup of ${what} passes the quick check${others}`);
  }
  if (!freshness.ok) {
    // Just over the limit, both would read alike ("1 d 2 h old, more than 1 d 2 h"): then both exactly.
    const exact = formatAge(freshness.ageMs!) === formatAge(maxAgeMs);
    throw stale(
      'The newest backup is too old',
      `the newest backup of ${what} is ${formatAge(freshness.ageMs!, exact)} old, ` +
        `more than ${formatAge(maxAgeMs, exact)}: ` +
        `${freshness.newest.file} (${freshness.newest.timestamp}); ${plural(freshness.backups, 'backup')} in all`,
    );
  }
  // A failed re-read is still a check's failure: its --json keeps the check's fields beside the verification's.
  if (fullCheck)
    await runVerify(path.join(outputDir, freshness.newest.file), search, signal).catch((error: unknown) => {
      if (!(error instanceof BackupError)) throw error;
      const { exitCode, title, details, hints: steps, extra } = error;
      throw new BackupError(exitCode, title, details, steps, { ...extra, data: { ...data, ...extra.data } });
    });
  return freshness;
}

/** The --json document of a check (`ok` and `command` are added when printed). */
function freshnessDocument(f: Freshness, outputDir: string, fullCheck: boolean): Record<string, unknown> {
  return {
    directory: outputDir,
    newest: f.newest
      ? {
          file: f.newest.file,
          timestamp: f.newest.timestamp,
          age_seconds: Math.round(f.ageMs! / 1000),
          size_bytes: f.newest.sizeBytes,
        }
      : null,
    max_age_seconds: Math.round(f.maxAgeMs / 1000),
    backups: f.backups,
    not_counted: f.notCounted,
    full_check: fullCheck,
  };
}

function freshnessText(f: Freshness, config: DbConfig, fullCheck: boolean): Text {
  const checked = fullCheck
    ? '✓ every byte re-read (checksum, size, structure, table data)'
    : 'metadata and size (add --verify to re-read it)';
  const others = f.notCounted.length > 0 ? `, and ${filesNotCounted(f.notCounted.length, 'that')}` : '';
  return {
    err: [],
    out: [
      `✓ Backups are fresh: the newest of ${config.database} (${config.environment}) is ${formatAge(f.ageMs!)} old ` +
        `(limit ${formatAge(f.maxAgeMs)})`,
      '',
      `Newest:      ${f.newest!.file} (${f.newest!.timestamp}, ${formatBytes(f.newest!.sizeBytes)})`,
      `Checked:     ${checked}`,
      `Backups:     ${f.backups}${others}`,
    ],
  };
}

// ─── Restore: the production guard ───────────────────────────────────────────────────────

/**
 * What the production guard knows about a restore target: its database name, and the cluster it
 * is on, by pg_control_system()'s system_identifier (any role may read it on PostgreSQL 10+),
 * which no spelling of the host (127.1, localhost, ::1, a socket directory) can change.
 */
export interface ProdCheck {
  target: string;
  targetCluster?: string;
  prod?: { database: string; cluster?: string; unknownWhy?: string };
}

/**
 * Pure: does restoring into `target` risk the configured production database? `yes` when it is
 * that database on that cluster; `unknown` when the name matches but either cluster cannot be
 * identified (then only a non-destructive restore may go ahead); `no` otherwise.
 */
export function isProductionTarget(check: ProdCheck): 'yes' | 'no' | 'unknown' {
  if (!check.prod || check.target !== check.prod.database) return 'no';
  if (check.targetCluster === undefined || check.prod.cluster === undefined) return 'unknown';
  return check.targetCluster === check.prod.cluster ? 'yes' : 'no';
}

/**
 * The cluster's system identifier, or undefined where the server cannot say (PostgreSQL 9.6 and older);
 * a lost connection is not an answer.
 */
async function clusterIdentifier(client: pg.Client): Promise<string | undefined> {
  const sql = 'SELECT system_identifier::text AS id FROM pg_catalog.pg_control_system()';
  const result = await client.query<{ id: string }>(sql).catch((error: unknown) => {
    if (!sqlStateOf(error)) throw error;
  });
  const id = result?.rows[0]?.id;
  return id === undefined ? undefined : unsignedIdentifier(id);
}

/** clusterIdentifier on a connection of its own, which a server that froze after login fails in `seconds`. */
function clusterIdentifierWithin(seconds: number): (client: pg.Client) => Promise<string | undefined> {
  return (client) => answeredWithin(client, seconds, () => clusterIdentifier(client));
}

/**
 * Pure: a system identifier as the unsigned 64-bit number PostgreSQL makes it (initdb's time << 32):
 * bigint shows those of clusters made from 2038 on (or under a wrong clock) as negative.
 */
export function unsignedIdentifier(id: string): string {
  return BigInt.asUintN(64, BigInt(id)).toString();
}

export interface ProdGuard {
  /** --env as given on the command line: the guard wants an explicit `prod`. */
  requestedEnv: Environment | 'auto';
  iKnowThisIsProd: boolean;
  /** Ask on the terminal; resolves to what was typed. Absent when there is no terminal (cron, --json). */
  ask?: (question: string, signal: AbortSignal) => Promise<string>;
}

/**
 * Pure: the production database's name from settings that do not resolve (a bad sslmode or port):
 * DATABASE_URL's database (path or ?dbname=), or DB_NAME; undefined when no valid name can be read.
 */
export function lenientProdDatabase(vars: EnvVars): string | undefined {
  const url = vars.get('DATABASE_URL')?.value.trim();
  // An '@' out of place (a password's '/' unencoded) leaves no telling where the path starts.
  if (url !== undefined && ambiguousAuthority(url)) return undefined;
  try {
    const name = url === undefined ? vars.get('DB_NAME')?.value : parseLibpqUrl(url).dbname;
    return name ? validateName(name, 'the production database name') : undefined;
  } catch {
    return undefined; // a malformed URL or escape, a blank or over-long name
  }
}

/**
 * Restoring over production needs intent twice over: `--env prod`, and either `--i-know-this-is-prod`
 * or the database's name typed on a terminal. When the configured production server cannot be reached
 * or identified (or its settings are invalid), a --clean restore into a database of its name needs the
 * same: it might be production.
 */
async function assertProdRestoreAllowed(
  vars: EnvVars,
  admin: pg.Client,
  server: DbConfig,
  request: Pick<RestoreRequest, 'clean' | 'guard' | 'connectTimeoutSeconds'> & { target: string; signal: AbortSignal },
): Promise<void> {
  const { target, guard, connectTimeoutSeconds } = request;
  let prodConfig: DbConfig | undefined;
  let prod: NonNullable<ProdCheck['prod']>;
  try {
    prodConfig = resolveDbConfig(vars, 'prod');
    prod = { database: prodConfig.database };
  } catch (error) {
    if (!vars.has('DB_NAME') && !vars.has('DATABASE_URL')) return; // no production database configured
    // Configured but invalid: production is on a server we cannot know; a name we cannot read may be any target's.
    const why = error instanceof BackupError ? error.details : errorText(error);
    prod = { database: lenientProdDatabase(vars) ?? target, unknownWhy: `its settings are invalid: ${why}` };
  }
  if (target !== prod.database) return;
  if (prodConfig) {
    try {
      const options = { maintenance: true, signal: request.signal };
      const ask = clusterIdentifierWithin(connectTimeoutSeconds);
      prod.cluster = await withClient(prodConfig, connectTimeoutSeconds, ask, options);
      if (prod.cluster === undefined) prod.unknownWhy = 'it does not say which cluster it is (pg_control_system)';
    } catch (error) {
      request.signal.throwIfAborted();
      prod.unknownWhy = `it cannot be reached: ${error instanceof BackupError ? error.title : errorText(error)}`;
    }
  }
  const verdict = isProductionTarget({ target, targetCluster: await clusterIdentifier(admin), prod });
  if (verdict === 'no' || (verdict === 'unknown' && !request.clean)) return;
  const where = prodConfig ? ` ${prodConfig.host}:${prodConfig.port}` : '';
  const shown = visibleControls(target); // a name in a message must not forge lines
  const what =
    verdict === 'yes'
      ? `"${shown}" on ${server.host}:${server.port} is the configured production database (${where.trim()}, the ` +
        `same cluster)`
      : `"${shown}" may be the configured production database: the production server${where} cannot be ` +
        `identified, as ${prod.unknownWhy}`;
  // With invalid production settings, --env prod cannot run at all: they must be fixed first.
  const consent = prodConfig
    ? `To really overwrite production: --env prod --i-know-this-is-prod (or --env prod on a terminal, and type ` +
      `${target})`
    : 'Fix (or unset) the production settings, DATABASE_URL or DB_*: until they are valid, where production is ' +
      'cannot be told';
  const refuse = (why: string) =>
    configError(`refusing to restore into it: ${what}; ${why}`, [
      consent,
      'To look at a backup, restore it into another database: --target-db <new name>',
    ]);
  if (guard.requestedEnv !== 'prod') throw refuse('--env prod was not given');
  if (guard.iKnowThisIsProd) return;
  if (!guard.ask) throw refuse('--i-know-this-is-prod was not given');
  const typed = await guard.ask(
    `This will overwrite the PRODUCTION database "${shown}" on ${server.host}:${server.port}.\nType its name to ` +
      `continue: `,
    request.signal,
  );
  if (typed.trim() !== target) throw refuse('the typed name did not match');
}

// ─── Restore: the target server (extensions, the target database) ────────────────────────

/** Pure: the extensions an archive creates, from its `pg_restore --list` table of contents. */
export function archiveExtensions(toc: string): string[] {
  return [...toc.matchAll(/^\d+; \d+ \d+ EXTENSION - (\S+)/gm)].map((match) => match[1]!);
}

const CONTRIB_EXTENSIONS = new Set(
  (
    'adminpack amcheck autoinc bloom btree_gin btree_gist citext cube dblink dict_int dict_xsyn earthdistance ' +
    'file_fdw fuzzystrmatch hstore insert_username intagg intarray isn lo ltree moddatetime old_snapshot ' +
    'pageinspect pg_buffercache pg_freespacemap pg_prewarm pg_stat_statements pg_surgery pg_trgm pg_visibility ' +
    'pg_walinspect pgcrypto pgrowlocks pgstattuple postgres_fdw refint seg sslinfo tablefunc tcn ' +
    'tsm_system_rows tsm_system_time unaccent uuid-ossp xml2'
  ).split(' '),
);
const EXTENSION_PACKAGES: Record<string, (major: number) => string> = {
  vector: (major) => `postgresql-${major}-pgvector`,
  postgis: (major) => `postgresql-${major}-postgis-3`,
  timescaledb: (major) => `timescaledb-2-postgresql-${major}`,
  pg_cron: (major) => `postgresql-${major}-cron`,
  pgaudit: (major) => `postgresql-${major}-pgaudit`,
};

/** Pure: where an extension the server lacks comes from. */
export function extensionInstallHint(name: string, major: number): string {
  const known = ownEntry(EXTENSION_PACKAGES, name);
  if (known) return `${name}: install ${known(major)} on the database server (Debian/Ubuntu, PGDG repository)`;
  if (CONTRIB_EXTENSIONS.has(name)) {
    return (
      `${name}: part of PostgreSQL's contrib (Debian/Ubuntu: in postgresql-${major}); if it is missing, it may ` +
      `have been removed in PostgreSQL ${major}, as adminpack was in 17`
    );
  }
  return (
    `${name}: install the package that provides it for PostgreSQL ${major} (Debian/Ubuntu: apt-cache search ` +
    `postgresql-${major}-${name})`
  );
}

/** Pure: a libpq conninfo naming only the database, quoted so that no name is read as settings. */
export function dbnameConninfo(database: string): string {
  return `dbname='${database.replace(/\\/g, '\\\\').replace(/'/g, "\\'")}'`;
}

export interface ReconciliationRow {
  table: string;
  backup?: number;
  restored?: number;
  ok: boolean;
}

/** Pure: every table in either list, with both counts; any difference or absence is a mismatch. */
export function reconcileCounts(backup: Record<string, number>, restored: Record<string, number>): ReconciliationRow[] {
  const tables = [...Object.keys(backup), ...Object.keys(restored).filter((table) => !Object.hasOwn(backup, table))];
  return tables.map((table) => {
    // Own properties only: table names such as "constructor" must not find Object.prototype's.
    const [inBackup, inRestored] = [Object.hasOwn(backup, table), Object.hasOwn(restored, table)];
    return {
      table,
      ...(inBackup ? { backup: backup[table]! } : {}),
      ...(inRestored ? { restored: restored[table]! } : {}),
      ok: inBackup && inRestored && backup[table] === restored[table],
    };
  });
}

/**
 * One restore into a target at a time: two that found it missing (or empty) would both create (or fill)
 * it. A session-level advisory lock on the administrative connection, held until the run ends, however it ends.
 */
async function claimRestoreTarget(admin: pg.Client, config: DbConfig, target: string): Promise<void> {
  if (await claimed(admin, target)) return;
  throw configError(`a restore into "${visibleControls(target)}" on ${config.host}:${config.port} is already running`, [
    'Wait for it to finish and check its result',
    'Or restore into another database: --target-db <new name>',
  ]);
}

/** Take the claim on `target` for `client`'s session, if no other session holds it. */
async function claimed(client: pg.Client, target: string): Promise<boolean> {
  const { rows } = await client.query<{ ok: boolean }>(
    "SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtext('backup_db restore'), pg_catalog.hashtext($1)) AS ok",
    [target],
  );
  return rows[0]?.ok === true;
}

/**
 * The claim lives as long as the admin session: once that ends (terminated, the server restarted), another
 * restore may start into the target, so this one stops rather than restore alongside it.
 */
function claimLostError(config: DbConfig, target: string): BackupError {
  return new BackupError(
    EXIT.CONNECTION,
    'The restore lost its claim on the target',
    `its session on ${config.host}:${config.port}, whose lock keeps other restores out of ` +
      `"${visibleControls(target)}", was ended (terminated, or the server restarted): it stopped rather than ` +
      'restore alongside another',
    ['See whether another restore into the same target runs, and wait for its result', 'Run it again once none does'],
  );
}

/** Why a target this run created is not dropped after all: it is another restore's now. */
const TAKEN_OVER = 'another restore into it has started meanwhile, and holds it now';

type TargetState = 'missing' | 'empty' | 'non-empty';

/**
 * Does the database hold anything of its own, not only tables? Objects created after initdb have OIDs
 * from 16384 (FirstNormalObjectId; the public schema and plpgsql are below it): schemas, functions,
 * types, large objects (any OID), publications, ... Temporary schemas, which any session that used a
 * temporary table leaves behind, are not content. Checked on PostgreSQL 13 to 18.
 */
const OTHER_OBJECT_CATALOGS = (
  'pg_proc pg_collation pg_operator pg_opfamily pg_opclass pg_am pg_cast pg_conversion pg_language pg_transform ' +
  'pg_ts_config pg_ts_dict pg_ts_parser pg_ts_template pg_foreign_data_wrapper pg_foreign_server pg_event_trigger ' +
  'pg_publication pg_statistic_ext pg_default_acl'
).split(' ');
const HOLDS_OBJECTS_SQL = `
  WITH temporary AS (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname ~ '^pg_(toast_)?temp_')
  SELECT EXISTS (
    SELECT FROM pg_catalog.pg_namespace WHERE oid >= 16384 AND oid NOT IN (SELECT oid FROM temporary)
    UNION ALL SELECT FROM pg_catalog.pg_class WHERE oid >= 16384 AND relnamespace NOT IN (SELECT oid FROM temporary)
    UNION ALL SELECT FROM pg_catalog.pg_type WHERE oid >= 16384 AND typnamespace NOT IN (SELECT oid FROM temporary)
    UNION ALL SELECT FROM pg_catalog.pg_extension WHERE extname <> 'plpgsql'
    UNION ALL SELECT FROM pg_catalog.pg_largeobject_metadata
    UNION ALL SELECT FROM pg_catalog.pg_subscription
      WHERE subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
    UNION ALL SELECT FROM (
      ${OTHER_OBJECT_CATALOGS.map((name) => `SELECT oid FROM pg_catalog.${name}`).join(' UNION ALL ')}
    ) other WHERE oid >= 16384
  ) AS holds`;

async function targetState(
  admin: pg.Client,
  config: DbConfig,
  target: string,
  connectTimeoutSeconds: number,
  signal: AbortSignal,
): Promise<TargetState> {
  const { rows } = await admin.query<{ template: boolean }>(
    'SELECT datistemplate AS template FROM pg_catalog.pg_database WHERE datname = $1',
    [target],
  );
  if (rows.length === 0) return 'missing';
  // New databases are copied from a template (template0 takes no connections): a restore would spread to them.
  if (rows[0]!.template) {
    throw configError(
      `"${visibleControls(target)}" on ${config.host}:${config.port} is a template database; it is never restored into`,
      ['Restore into a new database: --target-db <new name> (it is created)'],
    );
  }
  const holdsObjects = async (client: pg.Client) => {
    const { rows: objects } = await untilAborted(client, signal, () =>
      client.query<{ holds: boolean }>(HOLDS_OBJECTS_SQL),
    );
    return objects[0]!.holds ? 'non-empty' : 'empty';
  };
  // A failure to connect names where the database came from: --target-db, not the configured one.
  const targetConfig = { ...config, database: target, origin: { ...config.origin, database: '--target-db' } };
  return withClient(targetConfig, connectTimeoutSeconds, holdsObjects, { signal });
}

/**
 * --clean drops the target and creates it again: a role that owns its database but lacks CREATEDB
 * could do the first and not the second, and lose it. Refused before anything is touched.
 */
async function assertMayCreateDatabase(admin: pg.Client, config: DbConfig, target: string): Promise<void> {
  const sql = 'SELECT rolsuper OR rolcreatedb AS may FROM pg_catalog.pg_roles WHERE rolname = current_user';
  if ((await admin.query<{ may: boolean }>(sql)).rows[0]?.may) return;
  throw new BackupError(
    EXIT.PERMISSION,
    'The target cannot be replaced',
    `role "${config.user}" could drop "${visibleControls(target)}" but not create it again (it has no CREATEDB): ` +
      'nothing was touched',
    [
      `Grant it (as a superuser): ALTER ROLE ${quoteIdentifier(config.user)} CREATEDB; or restore as a role with it`,
      'Or restore into a new database that a role with CREATEDB creates, then switch the application to it',
    ],
  );
}

/**
 * Every extension the archive creates must be installable on the target server, in a version no
 * older than the backup's, checked before anything is written. pg_dump writes CREATE EXTENSION
 * without a version, so the target creates its default version: an older one (a pgvector without
 * halfvec, say) would make the restore fail halfway. Versions come from the metadata (taken in the
 * backup's snapshot); metadata without them (other tools) can only be checked by name.
 */
async function assertExtensionsAvailable(
  admin: pg.Client,
  toc: string,
  server: ServerInfo,
  recorded?: ExtensionVersion[],
): Promise<void> {
  const needed: Array<{ name: string; version?: string }> = archiveExtensions(toc).map(
    (name) => recorded?.find((e) => e.name === name) ?? { name },
  );
  if (needed.length === 0) return;
  const { rows } = await admin.query<{ name: string; default_version: string; versions: string[] }>(
    `SELECT a.name, a.default_version, array_agg(v.version ORDER BY v.version) AS versions
       FROM pg_catalog.pg_available_extensions a JOIN pg_catalog.pg_available_extension_versions v ON v.name = a.name
      WHERE a.name = ANY($1) GROUP BY a.name, a.default_version`,
    [needed.map((e) => e.name)],
  );
  const offered = new Map(rows.map((row) => [row.name, row]));
  const missing = needed.filter((e) => !offered.has(e.name)).map((e) => e.name);
  if (missing.length > 0) {
    throw new BackupError(
      EXIT.BACKUP_FAILED,
      'The target server lacks extensions the backup needs',
      `the archive creates ${plural(missing.length, 'extension')} that PostgreSQL ${server.version} on this server ` +
        `does not have: ${missing.join(', ')}`,
      [
        ...missing.map((name) => extensionInstallHint(name, server.major)),
        'Nothing was restored or created; run again once they are installed',
      ],
    );
  }
  const older = needed.filter(
    (e) => e.version !== undefined && compareVersions(offered.get(e.name)!.default_version, e.version) < 0,
  );
  if (older.length === 0) return;
  const describe = ({ name, version }: (typeof needed)[number]) =>
    `${name}: the backup has ${version}, this server would create ${offered.get(name)!.default_version} ` +
    `(available: ${offered.get(name)!.versions.join(', ')})`;
  throw new BackupError(
    EXIT.BACKUP_FAILED,
    "The target server's extensions are older than the backup's",
    `PostgreSQL ${server.version} on this server has older versions of ${plural(older.length, 'extension')} the ` +
      `backup was taken with; ${older.map(describe).join('; ')}`,
    [
      ...older.map((e) => `${extensionInstallHint(e.name, server.major)}, version ${e.version} or newer`),
      'Nothing was restored or created; run again once they are upgraded',
    ],
  );
}

/** Pure: the tablespace a line of pg_restore's script switches to ('' is the database's own), if it is one. */
export function tablespaceSetBy(line: string): string | undefined {
  const value = /^SET default_tablespace = (.*);$/.exec(line)?.[1];
  if (value === undefined) return undefined;
  if (value === "''") return '';
  return value.startsWith('"') ? value.slice(1, -1).replaceAll('""', '"') : value;
}

/**
 * No I/O: reads pg_restore's script line by line and returns the tablespace an entry is created in, once its header
 * confirms it: `SET default_tablespace = x;` (then blank lines, a table access method, `--`), and the header
 * `-- Name: …; Tablespace: x` (newlines printed as spaces). The SET alone may be a line inside a function's body.
 */
export function tablespaceReader(): (line: string) => string | undefined {
  let pending: string | undefined;
  return (line) => {
    const set = tablespaceSetBy(line);
    if (set !== undefined) pending = set || undefined;
    if (set !== undefined || pending === undefined) return undefined;
    if (line === '' || line === '--' || /^SET default_table_access_method = .*;$/.test(line)) return undefined;
    const tablespace = pending;
    pending = undefined;
    const header =
      /^-- (Data for )?Name: /.test(line) && line.endsWith(`; Tablespace: ${tablespace.replace(/[\r\n]/g, ' ')}`);
    return header ? tablespace : undefined;
  };
}

/**
 * The tablespaces the archive creates objects in, which `pg_restore --list` does not show: its script sets
 * default_tablespace before each. Streamed, never buffered: a large schema prints a large script. A script
 * pg_restore cannot print whole (a name it refuses to print) gives what it printed: the restore itself says the rest.
 */
async function archiveTablespaces({ pgRestore, readPath }: RestorableArchive, signal: AbortSignal): Promise<string[]> {
  const { execa } = await loadExeca();
  const options = { ...withoutConnecting(signal), buffer: false } as const;
  const script = execa(pgRestore.path, ['--schema-only', '--file=-', readPath], options);
  const found = new Set<string>();
  const read = tablespaceReader();
  for await (const line of script) {
    const tablespace = read(line);
    if (tablespace) found.add(tablespace);
  }
  await script;
  signal.throwIfAborted();
  return [...found];
}

/**
 * Every tablespace the archive's objects are created in must exist on the target server, checked before
 * anything is created or dropped: pg_restore would fail at the first (after --clean dropped the target).
 */
async function assertTablespacesExist(admin: pg.Client, config: DbConfig, needed: string[]): Promise<void> {
  const sql = 'SELECT spcname AS name FROM pg_catalog.pg_tablespace WHERE spcname = ANY($1)';
  const present = new Set((await admin.query<{ name: string }>(sql, [needed])).rows.map((row) => row.name));
  const missing = needed.filter((name) => !present.has(name));
  if (missing.length === 0) return;
  throw new BackupError(
    EXIT.BACKUP_FAILED,
    'The target server lacks tablespaces the backup needs',
    `the archive creates objects in ${plural(missing.length, 'tablespace')} that ${config.host}:${config.port} ` +
      `does not have: ${missing.map((name) => `"${visibleControls(name)}"`).join(', ')}`,
    [
      ...missing.map(
        (name) =>
          `Create it (as a superuser): CREATE TABLESPACE ${quoteIdentifier(name)} LOCATION '<empty directory>';`,
      ),
      'Or restore into a server that has them',
      'Nothing was restored, created or dropped; run again once they exist',
    ],
  );
}

/** Pure: compare extension versions part by part ("0.8.0" > "0.5.1", "1.10" > "1.9"); numbers as numbers. */
export function compareVersions(a: string, b: string): number {
  const [pa, pb] = [a.split(/[.\-_]/), b.split(/[.\-_]/)];
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const [x = '0', y = '0'] = [pa[i], pb[i]];
    const order = /^\d+$/.test(x) && /^\d+$/.test(y) ? Number(x) - Number(y) : x < y ? -1 : x > y ? 1 : 0;
    if (order !== 0) return Math.sign(order);
  }
  return 0;
}

// ─── Restore: dropping a database (sessions in the way, subscriptions, clean-up) ─────────

/**
 * Drop a database even while sessions (a pg_restore that was stopped, say) are still attached. One
 * holding a logical replication subscription is refused by the server (55006): that is said by name.
 */
async function dropDatabase(admin: pg.Client, name: string, serverMajor: number): Promise<void> {
  const drop = `DROP DATABASE IF EXISTS ${admin.escapeIdentifier(name)}`;
  const force = serverMajor >= 13; // WITH (FORCE) is PostgreSQL 13+: before, the sessions are ended first
  const terminate = 'SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE datname = $1';
  if (!force) await admin.query(terminate, [name]);
  try {
    await (force ? dropForced(admin, drop, name) : admin.query(drop));
  } catch (error) {
    const { rows } =
      sqlStateOf(error) === '55006' ? await admin.query<{ name: string }>(SUBSCRIPTIONS_OF_SQL, [name]) : {};
    if (!rows?.length) throw error;
    const names = listSome(rows.map((row) => `"${row.name}"`));
    throw new BackupError(
      EXIT.CONFIG,
      'The database holds a logical replication subscription',
      `"${name}" cannot be dropped while it holds subscriptions (${names}): ${errorText(error)}; nothing was dropped`,
      [
        `In "${name}", for each: ALTER SUBSCRIPTION s DISABLE; ALTER SUBSCRIPTION s SET (slot_name = NONE); ` +
          'DROP SUBSCRIPTION s; (its replication slot on the publisher is then yours to drop)',
        'Or restore into a new database: --target-db <new name> (it is created)',
      ],
    );
  }
}

/** A session in `name` that this role may not end (a superuser's, another role's): not a privilege to GRANT. */
function sessionsInTheWay(name: string, error: unknown): BackupError {
  const why = errorText(error);
  return new BackupError(
    EXIT.PERMISSION,
    `"${visibleControls(name)}" is in use by a session this role may not end`,
    why,
    [
      `As a superuser, end it: SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ` +
        `'${name.replaceAll("'", "''")}';`,
      // Only a superuser may end a superuser's session; pg_signal_backend ends any other role's.
      /superuser process/.test(why)
        ? 'Or run this as a superuser'
        : 'Or run this as a superuser, or a member of pg_signal_backend',
    ],
  );
}

/**
 * `drop` (of `name`) WITH (FORCE). A role that is not a superuser may not end an autovacuum worker that way
 * (it runs as no role: 42501), and autovacuum starts on its own in a freshly restored database. A plain
 * DROP DATABASE ends autovacuum workers itself, waiting up to 5 s for them: tried then. A session of
 * another role still stops it; the refusal to end that session is what is reported.
 */
async function dropForced(admin: pg.Client, drop: string, name: string): Promise<void> {
  try {
    await admin.query(`${drop} WITH (FORCE)`);
  } catch (error) {
    if (sqlStateOf(error) !== '42501') throw error;
    await admin.query(drop).catch(() => {
      // 42501 is also "must be owner of database": only a refused termination means a session is in the way.
      throw /terminate/.test(errorText(error)) ? sessionsInTheWay(name, error) : error;
    });
  }
}

const SUBSCRIPTIONS_OF_SQL = `SELECT subname AS name FROM pg_catalog.pg_subscription
  WHERE subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = $1) ORDER BY 1`;

/**
 * Detach the subscriptions a restore created in `database`, as PostgreSQL prescribes before dropping
 * one whose slot is not its own: without slot_name = NONE, DROP SUBSCRIPTION would drop the slot of the
 * subscriber the backup was taken from on its publisher.
 */
async function detachSubscriptions(config: DbConfig, database: string, connectTimeoutSeconds: number) {
  await withClient({ ...config, database }, connectTimeoutSeconds, (client) =>
    answeredWithin(client, connectTimeoutSeconds, async () => {
      const { rows } = await client.query<{ name: string }>(SUBSCRIPTIONS_OF_SQL, [database]);
      for (const { name } of rows) {
        const subscription = client.escapeIdentifier(name);
        await client.query(`ALTER SUBSCRIPTION ${subscription} DISABLE`);
        await client.query(`ALTER SUBSCRIPTION ${subscription} SET (slot_name = NONE)`);
        await client.query(`DROP SUBSCRIPTION ${subscription}`);
      }
    }),
  );
}

/**
 * Drop a database this run created: on the admin session, else (a server timeout ended it, or the
 * restore left subscriptions) on a fresh one once its subscriptions are detached, and, once the admin
 * session has ended and its claim on a named target with it (`claimLost`), once the fresh one has claimed
 * it again. Returns why it could not be dropped, if it could not: a copy of the backup's data is then left.
 */
async function dropCreatedDatabase(
  admin: pg.Client,
  config: DbConfig,
  name: string,
  { serverMajor, timeout: connectTimeoutSeconds }: { serverMajor: number; timeout: number },
  created: CreatedDatabase,
): Promise<string | undefined> {
  // A frozen server (or one holding the drop on a lock) must not hold an interrupted run: each try gets a deadline.
  const drop = (client: pg.Client) =>
    answeredWithin(client, connectTimeoutSeconds, () => dropDatabase(client, name, serverMajor));
  try {
    await drop(admin);
    return undefined;
  } catch {
    // On a fresh connection below.
  }
  // A server that restarted (or recovers from a crash) refuses connections for a moment: tried again until
  // --connect-timeout has passed.
  const deadline = performance.now() + connectTimeoutSeconds * 1000;
  const claimedDrop = async (client: pg.Client) => {
    if (created.claimLost.aborted) await reclaim(client, name, created, connectTimeoutSeconds);
    // Best effort: whatever still stops the drop, the drop says.
    await detachSubscriptions(config, name, connectTimeoutSeconds).catch(() => undefined);
    await drop(client);
  };
  for (;;) {
    try {
      await withClient(config, connectTimeoutSeconds, claimedDrop, { maintenance: true, avoid: name });
      return undefined;
    } catch (error) {
      if (!SERVER_COMING_BACK.test(errorText(error)) || performance.now() > deadline) return errorText(error);
      await delay(200);
    }
  }
}

/**
 * The claim on `name` again, on `client`, once the admin session (`adminPid`) that held it is gone, or cut by us
 * while its server still runs it (a drop waiting on a checkpoint or a lock): that session is ended first, so
 * that its lock, still ours, is not taken for another restore's. Under the claim, the database must still be
 * the one this run created (`oid`): another restore may have replaced it, and finished, meanwhile.
 */
async function reclaim(client: pg.Client, name: string, created: CreatedDatabase, seconds: number): Promise<void> {
  const endOld =
    'SELECT pg_catalog.pg_terminate_backend(pid, $2) FROM pg_catalog.pg_stat_activity ' +
    'WHERE pid = $1 AND application_name = $3';
  await answeredWithin(client, seconds, async () => {
    if (created.adminPid) await client.query(endOld, [created.adminPid, seconds * 1000, APPLICATION_NAME]);
    if (!(await claimed(client, name))) throw new Error(TAKEN_OVER);
    const { rows } = await client.query<{ oid: number }>(DATABASE_OID_SQL, [name]);
    if (rows[0] && created.oid !== undefined && Number(rows[0].oid) !== created.oid) throw new Error(TAKEN_OVER);
  });
}

const DATABASE_OID_SQL = 'SELECT oid FROM pg_catalog.pg_database WHERE datname = $1';

/** What the clean-up knows of a database this run created, and of the session that claimed it. */
interface CreatedDatabase {
  /** Aborted once the admin session, and with it the claim on a named target, is gone. */
  claimLost: AbortSignal;
  adminPid?: number | undefined;
  oid?: number | undefined;
}

/** A server restarting, or recovering after a crash, as a new connection meets it (its socket file gone: ENOENT). */
const SERVER_COMING_BACK = new RegExp(`${SERVER_NOT_READY}|ECONNREFUSED|ENOENT`);

/**
 * What holds a lock on database $1: sessions (a migration's open transaction that touched it, a createdb -T
 * copy), and prepared transactions, which no session holds: their locks' pid is null, and their xid is
 * the one their own transactionid lock, under the same virtual transaction, names.
 */
const DATABASE_LOCK_HOLDERS_SQL = `
  WITH held AS (
    SELECT l.pid, l.virtualtransaction FROM pg_catalog.pg_locks l
     WHERE l.locktype = 'object' AND l.granted AND l.pid IS DISTINCT FROM pg_catalog.pg_backend_pid()
       AND l.classid = 'pg_catalog.pg_database'::pg_catalog.regclass
       AND l.objid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = $1))
  SELECT (SELECT ${OTHER_SESSIONS_JSON}
            FROM pg_catalog.pg_stat_activity b WHERE b.pid IN (SELECT pid FROM held)) AS holders,
         (SELECT json_agg(p.gid) FROM pg_catalog.pg_prepared_xacts p
           WHERE p.transaction IN (SELECT x.transactionid FROM pg_catalog.pg_locks x
                                    WHERE x.locktype = 'transactionid' AND x.pid IS NULL AND x.virtualtransaction
                                          IN (SELECT virtualtransaction FROM held WHERE pid IS NULL)))
         AS prepared`;

/**
 * --clean's drop of `target`, not granted its lock within --lock-wait-timeout (`waitedMs`): as a backup
 * gives up on a locked table, naming the sessions that hold it, read back within `seconds`.
 */
async function targetLockedError(admin: pg.Client, target: string, waitedMs: number, seconds: number, error: unknown) {
  type Held = { holders: OtherSession[] | null; prepared: string[] | null };
  const held = await answeredWithin(admin, seconds, () => admin.query<Held>(DATABASE_LOCK_HOLDERS_SQL, [target]))
    .then(({ rows }) => ({ sessions: rows[0]?.holders ?? [], prepared: rows[0]?.prepared ?? [] }))
    .catch(() => ({ sessions: [], prepared: [] }));
  const { sessions, prepared } = held;
  const gids = prepared.map((gid) => `'${gid.replaceAll("'", "''")}'`);
  const by = [...sessions.map(describeSession), ...gids.map((gid) => `the prepared transaction ${gid}`)];
  const ends = sessions.map((session) => `pg_terminate_backend(${session.pid})`).join(', ');
  return new BackupError(
    EXIT.BACKUP_FAILED,
    `"${visibleControls(target)}" stayed locked by another session`,
    `DROP DATABASE waited ${formatDuration(waitedMs)} (--lock-wait-timeout) for its lock, ` +
      (by.length > 0 ? `held by ${visibleControls(by.join('; '))}` : errorText(error)),
    [
      ...(ends
        ? [`End or wait for the session holding it: SELECT ${ends}; (or let it finish), then restore again`]
        : []),
      // A prepared transaction outlives every session and restart: it is ended by COMMIT or ROLLBACK PREPARED only.
      ...gids.map((gid) => `Finish the prepared transaction (it never ends by itself): ROLLBACK PREPARED ${gid};`),
      `${ends || gids.length ? 'Or wait' : 'Wait'} longer for it: --lock-wait-timeout 5min (0 waits for ever)`,
    ],
  );
}

/**
 * What an interrupt left of a database it stopped the drop of: untouched, half-dropped (invalid), gone; or
 * there, but maybe without some of its files, on a server that does not mark a drop cut short (unsure).
 */
type DropFate = 'kept' | 'invalid' | 'gone' | 'unknown' | 'unsure';

/**
 * Pure: `name`'s fate from pg_database's rows, if read: datconnlimit -2 marks a drop cut short, on a server
 * that `marksInvalid` (marksHalfDroppedInvalid); on one that does not, a database still there is not proof.
 */
export function dropFate(name: string, rows: Array<{ name: string; limit: number }> | undefined, marksInvalid = true) {
  const row = rows?.find((r) => r.name === name);
  const there: DropFate = marksInvalid ? 'kept' : 'unsure';
  return !rows ? 'unknown' : !row ? 'gone' : row.limit === -2 ? 'invalid' : there;
}

/** Pure: whether a server (server_version_num) marks a database whose drop was cut short invalid (August 2023 on). */
export function marksHalfDroppedInvalid(num: number): boolean {
  const major = Math.floor(num / 10000);
  const fixedIn = ownEntry<number>({ 15: 4, 14: 9, 13: 12, 12: 16, 11: 21 }, String(major));
  return major >= 16 || (fixedIn !== undefined && num % 10000 >= fixedIn);
}

/**
 * An interrupt that stopped --clean's drop of the target (or of the locale probe before it), with what the
 * server had done by then, read back: the target as it was, half-dropped, or gone; a probe left behind.
 */
async function withDropInterrupted(
  error: unknown,
  admin: pg.Client,
  config: DbConfig,
  facts: {
    target: string;
    probe?: string | undefined;
    filePath: string;
    seconds: number;
    server: ServerInfo;
    /** Stopped before the drop began (its lock not granted): a database still there is as it was, on any server. */
    untouched: boolean;
  },
): Promise<unknown> {
  const { target, probe, filePath, seconds, server, untouched } = facts;
  const sql = 'SELECT datname AS name, datconnlimit AS limit FROM pg_catalog.pg_database WHERE datname = ANY($1)';
  const rows = await answeredWithin(admin, seconds, () => admin.query(sql, [[target, probe]]))
    .then((result) => result.rows as Array<{ name: string; limit: number }>)
    .catch(() => undefined);
  const targetFate = dropFate(target, rows, untouched || marksHalfDroppedInvalid(server.num));
  const fated = targetFate === 'gone' ? withTargetFate(error, target, 'replaced', filePath) : error;
  if (!(fated instanceof BackupError)) return fated;
  const shown = visibleControls(target);
  const where = `${config.host}:${config.port}`;
  const dropIt = (name: string) => `DROP DATABASE ${quoteIdentifier(name)};`;
  const lines: string[] = [];
  const hints: string[] = [];
  if (targetFate === 'kept') lines.push(`"${shown}" was not dropped: it is as it was`);
  if (targetFate === 'invalid') {
    lines.push(`"${shown}" was being dropped: its old content is gone, and what is left of it cannot be used`);
    hints.push(`Drop it, ${dropIt(target)} then restore it again`);
  }
  if (targetFate === 'unsure') {
    lines.push(
      `"${shown}" is still there, but PostgreSQL ${server.version} may have removed some of its files before the ` +
        'drop was stopped (15.4, 14.9, 13.12, 12.16, 11.21 and later mark such a database as invalid)',
    );
    hints.push('Check its tables before using it; if in doubt, restore it again with --clean');
  }
  if (targetFate === 'unknown') {
    lines.push(`${where} did not answer: "${shown}" may or may not have been dropped`);
    hints.push(`Check with psql -l; if connecting to "${target}" fails as invalid, drop it: ${dropIt(target)}`);
  }
  const probeFate = probe === undefined ? 'gone' : dropFate(probe, rows);
  if (probe !== undefined && probeFate !== 'gone') {
    const left = probeFate === 'unknown' ? 'may be left' : 'is left';
    lines.push(`"${probe}", an empty database made to check the backup's locale, ${left} on ${where}`);
    hints.push(`Drop it: ${dropIt(probe)}`);
  }
  const { exitCode, title, details, extra } = fated;
  const said = hints.length > 0 ? notCleanedUp(details) : details;
  return new BackupError(exitCode, title, [said, ...lines].join('\n'), [...hints, ...fated.hints], extra);
}

// ─── Restore: the backup's own database (encoding, locale, settings, comment) ────────────

/** The archive's entries for its own database, its settings and comment, which only `pg_restore --create` restores. */
const DATABASE_ENTRY = /^\d+; \d+ \d+ (?:DATABASE - |DATABASE PROPERTIES - |COMMENT - DATABASE )/;

/**
 * The SQL of the archive's own database entries, as `pg_restore --create` would run it (and as pg_dump
 * wrote it: a stable format), printed, never run; empty when it has none (another tool's archive).
 * pg_restore reads the entries to print from a list file (--use-list), kept private meanwhile.
 */
async function archiveDatabaseSql({ pgRestore, readPath }: RestorableArchive, signal: AbortSignal): Promise<string> {
  const listed = await runWithoutConnecting(pgRestore.path, ['--create', '--list', readPath], signal);
  signal.throwIfAborted();
  if (listed.exitCode !== 0)
    throw new BackupError(
      EXIT.BACKUP_FAILED,
      'pg_restore cannot read the archive',
      toolMessage(String(listed.stderr)),
      ['Nothing was restored or created'],
    );
  const entries = String(listed.stdout)
    .split('\n')
    .filter((line) => DATABASE_ENTRY.test(line));
  if (entries.length === 0) return '';
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'backup_db-'));
  try {
    const list = path.join(dir, 'database.list');
    await fs.writeFile(list, `${entries.join('\n')}\n`, { mode: 0o600 });
    const args = ['--create', '--schema-only', `--use-list=${list}`, '--file=-', readPath];
    const printed = await runWithoutConnecting(pgRestore.path, args, signal);
    signal.throwIfAborted();
    if (printed.exitCode === 0) return String(printed.stdout);
    // pg_restore refuses to print some (a name holding a line break), yet restores the rest of the archive.
    const why = `pg_restore cannot print its entry: ${toolMessage(String(printed.stderr))}`;
    warnNotCarriedOver('encoding, locale, settings and comment', why);
    return '';
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/** How the backup's database stored and sorted text: CREATE DATABASE options (ENCODING, LOCALE, ...). */
export type DatabaseOptions = Record<string, string>;

const DATABASE_OPTIONS =
  'ENCODING LOCALE_PROVIDER LOCALE LC_COLLATE LC_CTYPE ICU_LOCALE ICU_RULES BUILTIN_LOCALE'.split(' ');

/**
 * Pure: the encoding and locale options of pg_dump's own CREATE DATABASE statement (`pg_restore --create`
 * of the archive's DATABASE entry), read from the end of the line, where no database name can reach;
 * undefined when there is none, or when it cannot be read. Values are single-quoted literals, words
 * (LOCALE_PROVIDER) or quoted names (TABLESPACE, not used). Only the first CREATE DATABASE line is the
 * entry's: the entry is printed first, and a later one is a comment's text.
 */
export function archiveDatabaseOptions(sql: string): DatabaseOptions | undefined {
  const entry = /^CREATE DATABASE .*$/m.exec(sql)?.[0] ?? '';
  const option = String.raw` (\w+) = (?:'((?:[^']|'')*)'|(\w+)|"((?:[^"]|"")*)")`;
  const statement = new RegExp(`^CREATE DATABASE .* WITH TEMPLATE = template0((?:${option})*);$`).exec(entry);
  if (!statement) return undefined;
  const options = [...statement[1]!.matchAll(new RegExp(option, 'g'))]
    .filter(([, name]) => DATABASE_OPTIONS.includes(name!))
    .map(([, name, literal, word, quoted]) => [name!, literal?.replaceAll("''", "'") ?? word ?? quoted!]);
  return Object.fromEntries(options);
}

/** Pure: the options a server of `major` takes: before 15, libc was its only provider and had no option. */
export function databaseOptionsFor(options: DatabaseOptions, major: number): DatabaseOptions {
  const { LOCALE_PROVIDER: provider, ...rest } = options;
  return major < 15 && provider === 'libc' ? rest : options;
}

/** The first major whose databases take each locale provider but libc. */
const PROVIDER_SINCE: Record<string, { name: string; since: number }> = {
  icu: { name: 'ICU', since: 15 },
  builtin: { name: 'builtin', since: 17 },
};

/** Pure: why a server of `major` cannot create a database of the backup's locale provider. */
export function unsupportedProvider(options: DatabaseOptions, major: number): string | undefined {
  const provider = ownEntry(PROVIDER_SINCE, options.LOCALE_PROVIDER ?? '');
  if (!provider || major >= provider.since) return undefined;
  const name = `PostgreSQL ${major} has no ${provider.name} provider for databases`;
  return `${name}: restore to PostgreSQL ${provider.since} or later`;
}

/**
 * Create a database from template0 (a clean one, whatever was added to template1), `like` the backup's:
 * created with the server's defaults, a SQL_ASCII database's bytes would be stored unchecked in a UTF8
 * one that no backup of it could restore. Options the server refuses (a locale it lacks) are exit 7.
 * Returns its oid, by which the clean-up knows it is still the one this run created.
 */
async function createDatabase(admin: pg.Client, name: string, like: DatabaseOptions = {}): Promise<number> {
  const options = Object.entries(like).map(([option, value]) => ` ${option} ${admin.escapeLiteral(value)}`);
  try {
    await admin.query(`CREATE DATABASE ${admin.escapeIdentifier(name)} TEMPLATE template0${options.join('')}`);
    const { rows } = await admin.query<{ oid: number }>(DATABASE_OID_SQL, [name]);
    return Number(rows[0]!.oid);
  } catch (error) {
    const code = errnoCode(error) ?? '';
    if (options.length === 0 || !/^(22|42)/.test(code) || ['42501', '42P04'].includes(code)) throw error;
    const described = Object.entries(like).map(([option, value]) => `${option} '${visibleControls(value)}'`);
    throw new BackupError(
      EXIT.BACKUP_FAILED,
      "The target server cannot create the backup's database",
      `${errorText(error)}; the backup's database has ${described.join(', ')}`,
      [
        'Install the locale on the database server (Debian/Ubuntu: locale-gen, then restart PostgreSQL), or ' +
          'restore to a server that has it',
        'Nothing was restored, created or dropped',
      ],
    );
  }
}

const SQL_NAME = String.raw`(?:"(?:[^"]|"")*"|[a-z_][a-z0-9_$]*)`;
// pg_dump writes a setting's value holding a backslash as E'...' (appendStringLiteralConn), read whole here.
const SQL_LITERAL = String.raw`(?:'(?:[^']|'')*'|E'(?:[^'\\]|''|\\.)*')`;
const SQL_VALUES = `${SQL_LITERAL}(?:, ${SQL_LITERAL})*`;
/** The forms pg_dump writes a database's settings and comment in, each rebuilt for the target (`$db`). */
const DATABASE_PROPERTY_FORMS: Array<{ form: RegExp; build: (db: string, ...parts: string[]) => [string, string] }> = [
  {
    form: new RegExp(`^ALTER DATABASE ${SQL_NAME} SET (${SQL_NAME}) TO (${SQL_VALUES});$`),
    build: (db, name, values) => [`ALTER DATABASE ${db} SET ${name} TO ${values}`, `SET ${name}`],
  },
  {
    form: new RegExp(`^ALTER ROLE (${SQL_NAME}) IN DATABASE ${SQL_NAME} SET (${SQL_NAME}) TO (${SQL_VALUES});$`),
    build: (db, role, name, values) => [
      `ALTER ROLE ${role} IN DATABASE ${db} SET ${name} TO ${values}`,
      `SET ${name} for role ${role}`,
    ],
  },
  {
    form: new RegExp(`^COMMENT ON DATABASE ${SQL_NAME} IS (${SQL_LITERAL});$`),
    build: (db, comment) => [`COMMENT ON DATABASE ${db} IS ${comment}`, 'comment'],
  },
];

/**
 * Pure: the statements that give `target` the backup's database's settings and comment, from the SQL
 * pg_dump wrote for them (`archiveDatabaseSql`): each rebuilt from the names and literals read, for
 * the target, never run as written. `skipped`: what else they say (CONNECTION LIMIT, IS_TEMPLATE),
 * not carried over; the owner is not either, as with every object a restore creates (--no-owner).
 */
export function databasePropertyStatements(sql: string, target: string) {
  const db = quoteIdentifier(target);
  const statements: Array<{ sql: string; what: string }> = [];
  const skipped: string[] = [];
  const anyStatement =
    /^(?:ALTER DATABASE|ALTER ROLE|COMMENT ON DATABASE) (?:[^'";]|'(?:[^']|'')*'|"(?:[^"]|"")*")*;$/gm;
  for (const [statement] of sql.matchAll(anyStatement)) {
    const known = DATABASE_PROPERTY_FORMS.map(({ form, build }) => {
      const parts = form.exec(statement);
      return parts && build(db, ...parts.slice(1));
    }).find(Boolean);
    if (known) statements.push({ sql: known[0], what: known[1] });
    else if (!new RegExp(`^ALTER DATABASE ${SQL_NAME} OWNER TO ${SQL_NAME};$`).test(statement))
      skipped.push(statement.replace(new RegExp(`^ALTER DATABASE ${SQL_NAME} `), '').replace(/ TO E?'.*|;$/s, ''));
  }
  return { statements, skipped };
}

/** Part of the backup's database that the target does not get: a warning, printed and logged. */
function warnNotCarriedOver(what: string, why: string): void {
  const headline = `The backup's database's ${what} are not carried over`;
  runWarning('database_options_not_read', headline, `${why}; a target this run creates gets the server's defaults`);
}

/** The backup's database's encoding and locale; an entry that holds them in a form not known here, a warning. */
function readDatabaseOptions(sql: string): DatabaseOptions | undefined {
  const options = archiveDatabaseOptions(sql);
  if (!options && /^CREATE DATABASE /m.test(sql))
    warnNotCarriedOver('encoding and locale', "pg_dump's CREATE DATABASE for it is in a form not known here");
  return options;
}

/**
 * Give a restored target the backup's database's settings (search_path, say, which its queries may
 * need) and comment: pg_restore restores them only with --create, into the source's name. One that
 * fails (a role missing here, no privilege) is a warning naming it: the rows are restored.
 */
async function applyDatabaseProperties(admin: pg.Client, target: string, sql: string): Promise<void> {
  const { statements, skipped } = databasePropertyStatements(sql, target);
  const warn = (headline: string, why: string) => runWarning('database_setting_not_applied', headline, why);
  const shown = visibleControls(target);
  for (const { sql: statement, what } of statements) {
    await admin.query(statement).catch((error: unknown) => {
      warn(`"${shown}" did not get the backup's ${what}`, `${errorText(error)}; set it yourself if the copy needs it`);
    });
  }
  if (skipped.length > 0)
    warn(`Not carried over to "${shown}"`, `the backup's database's ${skipped.join('; ')}; set it yourself if needed`);
}

/** A provider the server predates: its own error ("option not recognized") would point at the locale. */
function assertProviderSupported(like: DatabaseOptions, major: number): void {
  const missing = unsupportedProvider(like, major);
  if (missing)
    throw new BackupError(EXIT.BACKUP_FAILED, "The target server cannot create the backup's database", missing, [
      'Nothing was restored, created or dropped',
    ]);
}

/**
 * --clean drops the target before creating it again, so a locale the server lacks must stop it before
 * the drop. Only CREATE DATABASE knows (the locale must also suit the encoding): an empty database of a
 * unique name is created like the backup's and dropped.
 */
async function assertCreatable(admin: pg.Client, probe: string, like: DatabaseOptions): Promise<void> {
  await createDatabase(admin, probe, like);
  await admin.query(`DROP DATABASE ${admin.escapeIdentifier(probe)}`);
}

/**
 * An existing empty target is used as it is, and the server converts the rows to its encoding; but not
 * from or to SQL_ASCII, whose bytes are never checked or converted: they would be stored as text of an
 * encoding they are not in, and a backup of the copy could not be restored.
 */
async function assertEncodingFits(admin: pg.Client, config: DbConfig, target: string, like: DatabaseOptions) {
  const sql =
    'SELECT pg_catalog.pg_encoding_to_char(encoding) AS encoding FROM pg_catalog.pg_database WHERE datname = $1';
  const encoding = (await admin.query<{ encoding: string }>(sql, [target])).rows[0]?.encoding;
  const backup = like.ENCODING;
  if (!backup || !encoding || backup === encoding || ![backup, encoding].includes('SQL_ASCII')) return;
  throw configError(
    `the target database "${visibleControls(target)}" on ${config.host}:${config.port} is ${encoding}, the ` +
      `backup's database ${visibleControls(backup)}: SQL_ASCII text is never converted or checked`,
    [
      "Restore into a new database: --target-db <new name> (it is created with the backup's encoding and locale)",
      `Or replace it: add --clean, which drops "${target}" and creates it again like the backup's`,
    ],
  );
}

// ─── Restore: pg_restore and its session settings ───────────────────────────────────────

/**
 * Pure: the settings pg_restore could not set because the server does not have them, when those
 * are its only errors; undefined when anything else failed or the output cannot be accounted for.
 * pg_restore 17+ starts every session with `SET transaction_timeout = 0`, which servers before 17
 * reject: the timeout it turns off does not exist there, so nothing is lost by going on without it.
 */
export function unknownSettingsOnly(stderr: string): string[] | undefined {
  const unknownSetting = new RegExp(
    String.raw`^pg_restore: error: could not execute query: ERROR: {2}unrecognized configuration parameter "(\w+)"` +
      String.raw`\nCommand was: SET \1 = [^;\n]*;$`,
    'gm',
  );
  const unknown = [...stderr.matchAll(unknownSetting)].map((m) => m[1]!);
  const errors = stderr.match(/^pg_restore: error: /gm)?.length ?? 0;
  const ignored = Number(/^pg_restore: warning: errors ignored on restore: (\d+)$/m.exec(stderr)?.[1]);
  return unknown.length > 0 && errors === unknown.length && ignored === unknown.length
    ? [...new Set(unknown)]
    : undefined;
}

export interface PgRestoreRun {
  jobs: number;
  /** The session settings pg_restore's connections ran with (PGOPTIONS). */
  settings: Record<string, string>;
  /** Session settings the server lacked and pg_restore went on without (a newer pg_restore). */
  skippedSettings: string[];
}

/** How a restore may use the target server: pg_restore jobs, and index-build memory per job. */
export interface RestoreTuning {
  jobs?: number;
  maintenanceWorkMemKb?: number;
}

/** Index-build memory shared by the pg_restore jobs when --maintenance-work-mem is not given. */
const RESTORE_MEMORY_BUDGET_KB = 1024 * 1024;
/** Never less per job than this (twice PostgreSQL's default of 64 MB). */
const MIN_RESTORE_MEMORY_KB = 128 * 1024;

/**
 * Pure: the session settings a restore runs with, for every pg_restore connection (PGOPTIONS);
 * the server's configuration is never changed. maintenance_work_mem: index builds get what
 * pgvector asks for (an IVFFlat index built in a session with more memory fails to rebuild within
 * the default 64 MB, and an HNSW build that outgrows it slows to a crawl), 1 GB shared by the jobs
 * unless given per job. synchronous_commit off: a restore interrupted by a crash is redone from the
 * file, so waiting for every commit to reach the disk buys nothing.
 */
export function restoreSessionSettings(
  serverMajor: number,
  jobs: number,
  maintenanceWorkMemKb?: number,
): Record<string, string> {
  const memoryKb = maintenanceWorkMemKb ?? Math.max(MIN_RESTORE_MEMORY_KB, Math.floor(RESTORE_MEMORY_BUDGET_KB / jobs));
  return {
    maintenance_work_mem: formatMemory(memoryKb),
    synchronous_commit: 'off',
    // Parallel index builds (PostgreSQL 11+): more than the default 2 only with cores the jobs leave free.
    ...(serverMajor >= 11
      ? { max_parallel_maintenance_workers: String(Math.max(2, Math.floor(os.availableParallelism() / jobs) - 1)) }
      : {}),
  };
}

/** Pure: kilobytes as PostgreSQL writes a memory setting, in the largest whole unit. */
export function formatMemory(kb: number): string {
  if (kb % (1024 * 1024) === 0) return `${kb / 1024 / 1024}GB`;
  if (kb % 1024 === 0) return `${kb / 1024}MB`;
  return `${kb}kB`;
}

/** Pure: "512MB", "1GB", "65536kB" (PostgreSQL's units; a bare number is MB) → kilobytes, within its limits. */
export function parseMemory(value: string): number {
  const match = /^\s*(\d+)\s*(kB|MB|GB|TB)?\s*$/i.exec(value);
  const factor = { kb: 1, mb: 1024, gb: 1024 ** 2, tb: 1024 ** 3 }[
    (match?.[2] ?? 'MB').toLowerCase() as 'kb' | 'mb' | 'gb' | 'tb'
  ];
  const kb = match ? Number(match[1]) * factor : NaN;
  if (!(kb >= 1024 && kb <= MAX_TIMEOUT_MS))
    throw new InvalidArgumentError('Use a size such as 256MB or 1GB (from 1MB to 2047GB).');
  return kb;
}

/** PGOPTIONS for pg_restore: the restore's settings, writable as ours are (SESSION_SETUP_SQL), then the user's. */
function pgOptions(settings: Record<string, string>): string {
  const all = { ...settings, default_transaction_read_only: 'off' };
  const ours = Object.entries(all).map(([name, value]) => `-c ${name}=${value}`);
  return [...ours, ...(process.env.PGOPTIONS ? [process.env.PGOPTIONS] : [])].join(' ');
}

/**
 * pg_restore into `target`; any SQL error is a failure, never a partial success. A pg_restore
 * newer than the server may begin its sessions with settings the server lacks, so then it runs
 * without --exit-on-error and every error must be one of those. One job then, because parallel
 * workers interleave their messages and pg_restore's error count leaves out the workers' errors.
 */
async function runPgRestore(
  { pgRestore, readPath: file }: { pgRestore: PgTool; readPath: string },
  config: DbConfig,
  target: string,
  server: ServerInfo,
  { connectTimeoutSeconds, tuning, drill }: { connectTimeoutSeconds: number; tuning: RestoreTuning; drill: boolean },
  signal: AbortSignal,
): Promise<PgRestoreRun> {
  const newerClient = pgRestore.major > server.major;
  const jobs = newerClient ? 1 : (tuning.jobs ?? Math.max(1, os.availableParallelism()));
  const settings = restoreSessionSettings(server.major, jobs, tuning.maintenanceWorkMemKb);
  const stopOnError = newerClient ? [] : ['--exit-on-error'];
  // A drill proves rows come back; a subscription holds none, and would tie its scratch database to a publisher.
  const subscriptions = drill ? ['--no-subscriptions'] : [];
  const args = [
    '--no-owner',
    '--no-acl',
    ...stopOnError,
    ...subscriptions,
    `--jobs=${jobs}`,
    `--dbname=${dbnameConninfo(target)}`,
    file,
  ];
  const libpq = libpqEnv({ ...config, database: target }, connectTimeoutSeconds);
  // pg_restore's own messages in English, which is what unknownSettingsOnly reads.
  const env = { ...libpq, LC_MESSAGES: 'C', PGOPTIONS: pgOptions(settings) };
  const { child } = await startTethered(pgRestore.path, args, signal, { env, stdin: 'ignore', reject: false });
  const result = await child;
  if (signal.aborted) throw signal.reason;
  if (result.exitCode === 0) return { jobs, settings, skippedSettings: [] };
  const stderr = String(result.stderr).trim();
  const skippedSettings = newerClient && result.exitCode === 1 ? unknownSettingsOnly(stderr) : undefined;
  if (skippedSettings) return { jobs, settings, skippedSettings };
  const message = toolMessage(stderr);
  const lost = toolConnectionError('pg_restore', message);
  if (lost) throw lost;
  const memory = /memory required is (\d+) MB, maintenance_work_mem is (\d+) MB/.exec(stderr);
  // The server quotes the name as it is, a quote in it undoubled: to the line's last `" does not exist`.
  const role = /ERROR: {2}role "(.+)" does not exist$/m.exec(stderr)?.[1];
  throw new BackupError(
    EXIT.BACKUP_FAILED,
    'pg_restore failed',
    message || `pg_restore exited with code ${result.exitCode}`,
    [
      ...(memory || /out of memory|could not resize shared memory/i.test(stderr)
        ? [
            `An index build needed more memory than maintenance_work_mem (${settings.maintenance_work_mem} per ` +
              `pg_restore job here, with --jobs ${jobs}): run again with --maintenance-work-mem ` +
              `${memory ? `${Math.ceil((Number(memory[1]) * 1.5) / 64) * 64}MB` : 'larger'} (per job), or fewer ` +
              `--jobs`,
          ]
        : []),
      // A policy or a SET ROLE names a role: roles are kept apart from backups (--no-owner --no-acl).
      ...(role
        ? [`Roles are not in the backup (README): create it on the target first: CREATE ROLE ${quoteIdentifier(role)};`]
        : []),
      newerClient
        ? `pg_restore ${pgRestore.version} is newer than the server (PostgreSQL ${server.version}): loading into an ` +
          `older major is not guaranteed; a backup taken with pg_dump ${server.major} restores with pg_restore ` +
          `${server.major}`
        : 'pg_restore stopped at the first error above',
      'The target was not left half-restored if this run created it',
      'Check that the target server is the same major version as the backup or newer, and has the extensions it needs',
    ],
  );
}

// ─── Restore: the archive, verified and pinned ───────────────────────────────────────────

interface RestorableArchive {
  filePath: string;
  /** What every reader opens: the pinned backup (see pinBackup), else the file itself. */
  readPath: string;
  metadataPath: string;
  toc: string;
  /** The pg_restore that reads this archive's format. */
  pgRestore: PgTool;
  /** Undefined when the backup has no valid metadata (--force). */
  metadata?: BackupMetadata;
  /** The verification failure that --force went past. */
  forcedPast?: string;
  /** The re-read of every byte: resolves when the SHA-256 matches, rejects (exit 8) when not. */
  checksum: Promise<unknown>;
}

/**
 * What a restore needs to know about the file, verified unless --force says otherwise. The quick
 * checks have passed on return; the SHA-256 re-read may still be going on (`checksum`).
 */
async function restorableArchive(
  search: ClientSearch,
  { file, pinned }: Pick<RestoreRequest, 'file' | 'pinned'>,
  force: boolean,
  signal: AbortSignal,
): Promise<RestorableArchive> {
  const readPath = pinned ?? path.resolve(file);
  try {
    const { quick, complete } = await startVerify(file, search, signal, readPath);
    // --force needs to know now what it goes past.
    if (force) await complete;
    const { filePath, metadataPath, metadata, inspection, client } = quick;
    const pgRestore = client!.pgRestore;
    return { filePath, readPath, metadataPath, toc: inspection.toc, pgRestore, metadata, checksum: complete };
  } catch (error) {
    signal.throwIfAborted(); // a check the interrupt cut short proves nothing
    if (!(error instanceof BackupError) || error.exitCode !== EXIT.VERIFY_FAILED || !force) throw error;
    const filePath = path.resolve(file);
    // Past a damaged backup, never past none: missing, a directory, a FIFO (whose open would wait for ever).
    await assertReadableFile(filePath);
    const { pgRestore } = await findRestoreClient(search, await readArchiveHeader(readPath), signal);
    const listing = await listArchive(pgRestore, readPath, signal);
    if (!listing.ok) {
      throw new BackupError(EXIT.BACKUP_FAILED, 'pg_restore cannot read the archive', listing.error, [
        'Even --force cannot restore an unreadable archive',
      ]);
    }
    const metadataPath = metadataPathFor(filePath);
    const loaded = await loadMetadata(metadataPath, path.basename(filePath));
    return {
      filePath,
      readPath,
      metadataPath,
      toc: listing.toc,
      pgRestore,
      ...(loaded.status === 'ok' ? { metadata: loaded.metadata } : {}),
      forcedPast: error.title,
      checksum: Promise.resolve(),
    };
  }
}

/** A backup held for the readers of one restore: `readPath` reaches what was there when it was pinned. */
interface PinnedBackup {
  readPath: string;
  release(): Promise<void>;
}

/**
 * Pin a backup, so that verification and pg_restore read the same bytes whatever happens to its
 * names meanwhile (retention deleting it, a file put in its place): pg_restore reopens the archive
 * by path (its --jobs workers, each data file of a directory-format backup). A file is held open
 * and read as /proc/<our pid>/fd/<n>, which any process of ours can open; without /proc (macOS) it
 * is read by its name, unpinned. A directory-format backup's files are hard-linked into a private
 * directory beside it (`<name>.dump.pin-<pid>`: never listed as a backup; the next backup of the
 * database removes it once its run is gone). Undefined where it cannot be pinned (not there: its
 * verification says so; not linkable here): read by its name, as before.
 */
async function pinBackup(filePath: string): Promise<PinnedBackup | undefined> {
  const stat = await fs.stat(filePath).catch(() => undefined);
  // Only what could be a backup: verification refuses anything else, which must not be linked first.
  if (stat?.isDirectory() && filePath.endsWith(DUMP_SUFFIX)) return pinDirectory(filePath).catch(() => undefined);
  const handle = stat?.isFile() ? await fs.open(filePath, 'r').catch(() => undefined) : undefined; // never a FIFO
  if (!handle) return undefined;
  const readPath = `/proc/${process.pid}/fd/${handle.fd}`;
  if (!(await pathExists(readPath))) {
    await handle.close();
    return undefined;
  }
  return { readPath, release: () => handle.close() };
}

async function pinDirectory(dir: string): Promise<PinnedBackup> {
  const pinned = `${dir}${PIN_INFIX}${process.pid}`;
  // Whose it is, beside it (inside, the checks would find a file the backup lacks): another run's of the
  // same pid (in another pid namespace) is left alone, and the next backup removes it only once it is gone.
  const ownerFile = `${pinned}${OWNER_SUFFIX}`;
  if (existsSync(ownerFile) && !(await isStalePin(pinned))) throw new Error(`${pinned} belongs to another run`);
  await fs.rm(pinned, { recursive: true, force: true }); // an earlier, dead run's of this pid
  await fs.writeFile(ownerFile, JSON.stringify(await thisRunAsOwner()), { mode: 0o600 });
  await fs.mkdir(pinned, { mode: 0o700 });
  const release = async () => {
    await fs.rm(pinned, { recursive: true, force: true });
    await fs.rm(ownerFile, { force: true });
  };
  try {
    for (const name of await archiveFiles(dir)) {
      await fs.mkdir(path.dirname(path.join(pinned, name)), { recursive: true });
      await fs.link(path.join(dir, name), path.join(pinned, name));
    }
  } catch (error) {
    await release();
    throw error;
  }
  return { readPath: pinned, release };
}

// ─── Restore: one pipeline for --restore and the drill ───────────────────────────────────

/** A restore's result; a drill's (`drill`) went into a scratch database that is dropped again. */
export interface RestoreOutcome extends Pick<RestorableArchive, 'filePath' | 'metadata' | 'forcedPast'> {
  target: string;
  drill: boolean;
  server: string;
  serverVersion: string;
  /** What happened to the target: created, dropped and created again (--clean), or used as found (empty). */
  targetAction: 'created' | 'replaced' | 'used empty';
  durationMs: number;
  run: PgRestoreRun;
  /** Undefined when the backup had no valid metadata to reconcile with (--force). */
  reconciliation?: ReconciliationRow[];
  /** A drill's result, as recorded in the metadata. */
  recorded?: { metadataPath: string; record: RestoreTestRecord; notRecorded?: string | undefined };
}

/**
 * Row counts of every table of a restored `database`, keyed like table_counts, on `parallel`
 * connections: the largest tables (by the backup's counts) first, so that they do not end alone.
 */
async function countTablesIn(
  config: DbConfig,
  database: string,
  connectTimeoutSeconds: number,
  parallel: number,
  expected: Record<string, number>,
  signal: AbortSignal,
): Promise<Record<string, number>> {
  const connect = () => connectDb({ ...config, database }, connectTimeoutSeconds, signal);
  const clients = await connectAll(Math.max(1, parallel), connect);
  try {
    const tables = await readUserTables(clients[0]!, database);
    // After a --no-owner restore the role owns every table: only FORCE makes policies hide rows from it.
    const { rows: forced } = await clients[0]!.query<{ name: string; oid: number }>(RLS_HIDDEN_SQL, [
      tables.flatMap((t) => t.data_oids),
    ]);
    const weight = (t: UserTable) => ownEntry(expected, tableKey(t.schema, t.table)) ?? 0;
    const queue = [...tables].sort((a, b) => weight(b) - weight(a));
    const counted = new Map<UserTable, number>();
    await Promise.all(
      clients.map(async (client) => {
        for (let table = queue.shift(); table; table = queue.shift())
          counted.set(table, await countRestoredTable(client, table, forced));
      }),
    );
    return Object.fromEntries(tables.map((t) => [tableKey(t.schema, t.table), counted.get(t)!]));
  } finally {
    await Promise.all(clients.map(closeClient));
  }
}

/** `count` connections, or none: when one is refused, those made are closed, not left open until the run ends. */
export async function connectAll(count: number, connect: () => Promise<pg.Client>): Promise<pg.Client[]> {
  const settled = await Promise.allSettled(Array.from({ length: count }, connect));
  const clients = settled.flatMap((result) => (result.status === 'fulfilled' ? [result.value] : []));
  const refused = settled.find((result) => result.status === 'rejected');
  if (!refused) return clients;
  await Promise.all(clients.map(closeClient));
  throw refused.reason;
}

/**
 * One table's rows, FORCE ROW LEVEL SECURITY lifted for the count in a transaction rolled back. A role
 * that does not own the table could not lift it (must be owner: exit 4), rather than count too few.
 */
async function countRestoredTable(
  client: pg.Client,
  table: UserTable,
  forced: Array<{ name: string; oid: number }>,
): Promise<number> {
  const lift = forced.filter((f) => table.data_oids.includes(f.oid));
  const count = () => tableRows(client, table);
  if (lift.length === 0) return count();
  await client.query('BEGIN');
  try {
    for (const { name } of lift) await client.query(`ALTER TABLE ${name} NO FORCE ROW LEVEL SECURITY`);
    return await count();
  } finally {
    await client.query('ROLLBACK');
  }
}

function reconciliationError(rows: ReconciliationRow[]): BackupError {
  const bad = rows.filter((row) => !row.ok);
  const describe = (row: ReconciliationRow) =>
    `${visibleControls(row.table)} (backup ${row.backup ?? 'absent'}, restored ${row.restored ?? 'absent'})`;
  const listed = listSome(bad.map(describe));
  return new BackupError(
    EXIT.VERIFY_FAILED,
    'row counts differ from the backup',
    `${bad.length} of ${rows.length} tables differ from the backup's same-snapshot counts: ${listed}`,
    [
      'Do not trust this backup for a full recovery; investigate the tables listed',
      'If the metadata was edited, the counts no longer describe the dump: take a new backup',
    ],
    { report: reconciliationLines(rows), data: { reconciliation: rows } },
  );
}

export interface RestoreRequest {
  file: string;
  /** --target-db; absent for the drill, which restores into a scratch database of its own. */
  target?: string;
  clean: boolean;
  force: boolean;
  connectTimeoutSeconds: number;
  /** How long --clean's drop waits for another session's lock on the target; 0: for ever. */
  lockWaitTimeoutMs: number;
  guard: ProdGuard;
  search: ClientSearch;
  tuning: RestoreTuning;
  /** The pinned backup that verification and pg_restore read (pinBackup); else the file by its name. */
  pinned?: string;
}

/**
 * --restore FILE --target-db NAME, and the drill (--verify FILE --restore-test): verify, check
 * extensions, prepare the target, pg_restore, then reconcile row counts with the metadata.
 * A named target is guarded (production, one restore at a time, not over data unless --clean); a
 * drill's scratch database has a unique name, is dropped whatever happens, and its result is
 * recorded in the metadata.
 */
async function runRestore(config: DbConfig, vars: EnvVars, request: RestoreRequest, signal: AbortSignal) {
  const pin = await pinBackup(path.resolve(request.file));
  try {
    return await restoreOrDrill(config, vars, { ...request, pinned: pin?.readPath }, signal);
  } finally {
    await pin?.release();
  }
}

async function restoreOrDrill(config: DbConfig, vars: EnvVars, request: RestoreRequest, signal: AbortSignal) {
  if (request.target !== undefined)
    return restorePipeline(config, vars, request, validateName(request.target, '--target-db'), signal);
  const started = performance.now();
  const scratch = `backup_db_drill_${process.pid}_${randomName()}`;
  try {
    return await restorePipeline(config, vars, request, scratch, signal);
  } catch (error) {
    const server = `${config.host}:${config.port}`;
    await recordFailedDrill(path.resolve(request.file), server, error, millisecondsSince(started));
    throw error;
  }
}

async function restorePipeline(
  config: DbConfig,
  vars: EnvVars,
  request: RestoreRequest,
  target: string,
  signal: AbortSignal,
): Promise<RestoreOutcome> {
  const drill = request.target === undefined;
  const archive = await restorableArchive(request.search, request, request.force && !drill, signal);
  const databaseSql = await archiveDatabaseSql(archive, signal);
  const backupDatabase = readDatabaseOptions(databaseSql);
  const timeout = request.connectTimeoutSeconds;
  // Administer from a maintenance database, never the target, which --clean may drop.
  return withClient(
    config,
    timeout,
    async (admin) => {
      // A named target's claim (claimRestoreTarget) ends with the admin session, and with it the restore.
      const claimLost = new AbortController();
      if (!drill) admin.once('end', () => claimLost.abort(claimLostError(config, target)));
      const { processID } = admin as pg.Client & { processID: number | null };
      const created: CreatedDatabase = { claimLost: claimLost.signal, adminPid: processID ?? undefined };
      // Until the target is touched, an interrupt cuts the connection: a check stuck on a frozen server
      // or a lock ends at once. From the create or drop on, the connection is needed to clean up.
      const { server, state, like } = await untilAborted(admin, signal, async () => {
        // This session waits, idle, for the whole restore, then drops what it created: its idle_session_timeout
        // is off, as every session's of ours is (SESSION_SETUP_SQL).
        const server = await readServerInfo(admin);
        if (!drill) {
          await assertProdRestoreAllowed(vars, admin, config, { ...request, target, signal });
          await claimRestoreTarget(admin, config, target);
        }
        await assertExtensionsAvailable(admin, archive.toc, server, archive.metadata?.extensions);
        await assertTablespacesExist(admin, config, await archiveTablespaces(archive, signal));
        const state = drill ? 'missing' : await targetState(admin, config, target, timeout, signal);
        if (state === 'non-empty' && !request.clean) {
          throw configError(
            `the target database "${visibleControls(target)}" on ${config.host}:${config.port} is not empty`,
            [
              'Restore into a new database: --target-db <new name> (it is created)',
              `Or replace it: add --clean, which drops "${target}" and creates it again`,
            ],
          );
        }
        // pg_restore runs the SQL in the file, so no target is created or touched, and nothing of it runs,
        // before the file has been proven; the re-read went on during the checks above. An interrupt
        // stops it: the target is left exactly as it was.
        const like = backupDatabase && databaseOptionsFor(backupDatabase, server.major);
        if (like) assertProviderSupported(like, server.major);
        if (like && state === 'empty' && !request.clean) await assertEncodingFits(admin, config, target, like);
        if (state !== 'missing' && request.clean) await assertMayCreateDatabase(admin, config, target);
        await archive.checksum;
        return { server, state, like };
      });
      const drops = state !== 'missing' && request.clean;
      const probe = like && drops ? `backup_db_probe_${process.pid}_${randomName()}` : undefined;
      // An interrupt cancels these on the server, and then what they had done is read back and said. Another
      // session's lock on the target is waited for as a backup waits for a table's: --lock-wait-timeout.
      const { lockWaitTimeoutMs } = request;
      let dropping = false;
      await untilAborted(
        admin,
        signal,
        async () => {
          if (probe) await assertCreatable(admin, probe, like!);
          signal.throwIfAborted();
          if (!drops) return;
          await admin.query(`SET lock_timeout = ${lockWaitTimeoutMs}`);
          dropping = true;
          await dropDatabase(admin, target, server.major);
          dropping = false;
          await admin.query('RESET lock_timeout');
        },
        timeout,
      ).catch(async (error: unknown) => {
        // lock_not_available: the drop's lock_timeout, before it did anything (its locks precede its first file).
        const locked = dropping && !signal.aborted && sqlStateOf(error) === '55P03';
        if (!drops || !(signal.aborted || locked)) throw error;
        const stopped = locked ? await targetLockedError(admin, target, lockWaitTimeoutMs, timeout, error) : error;
        const facts = { target, probe, filePath: archive.filePath, seconds: timeout, server, untouched: locked };
        throw await withDropInterrupted(stopped, admin, config, facts);
      });
      const targetAction = state === 'missing' ? 'created' : request.clean ? 'replaced' : 'used empty';
      // Stopped or failed from here until a restore has filled it and counted its rows, a replaced target is
      // gone and an empty one may hold part of the restore, which the message must say.
      if (signal.aborted) throw withTargetFate(signal.reason, target, targetAction, archive.filePath);
      if (state === 'missing' || request.clean)
        created.oid = await untilAborted(admin, signal, () => createDatabase(admin, target, like), timeout).catch(
          (error: unknown) => {
            throw withTargetFate(asBackupError(error, config), target, targetAction, archive.filePath);
          },
        );
      const started = performance.now();
      let run: PgRestoreRun | undefined;
      let durationMs = 0;
      let counts: Record<string, number> | undefined;
      let failure: { error: unknown } | undefined;
      const restoring = AbortSignal.any([signal, claimLost.signal]);
      try {
        // Where the guard's session is, whatever the name's DNS answer is by now.
        const pinned = pinnedTo(config, admin);
        run = await runPgRestore(archive, pinned, target, server, { ...request, drill }, restoring);
        durationMs = millisecondsSince(started);
        const expected = archive.metadata?.table_counts;
        if (expected) counts = await countTablesIn(pinned, target, timeout, run.jobs, expected, restoring);
        // A drill proves rows come back: its scratch database needs no settings.
        if (!drill) await applyDatabaseProperties(admin, target, databaseSql);
      } catch (error) {
        failure = { error: restoring.aborted ? restoring.reason : error };
      }
      // A drill's database is scratch; one this run created whose restore failed (pg_restore, or the count
      // after it) holds a restore nobody checked: removed rather than left as a trap. If it cannot be, every
      // channel says so.
      const notDropped =
        drill || (failure && targetAction !== 'used empty')
          ? await dropCreatedDatabase(admin, config, target, { serverMajor: server.major, timeout }, created)
          : undefined;
      const leftBehind = (error: unknown) => (notDropped ? withLeftBehind(error, config, target, notDropped) : error);
      if (failure) throw leftBehind(withTargetFate(failure.error, target, targetAction, archive.filePath, notDropped));
      const outcome: RestoreOutcome = {
        filePath: archive.filePath,
        target,
        drill,
        server: `${config.host}:${config.port}`,
        serverVersion: server.version,
        targetAction,
        durationMs,
        run: run!, // set whenever nothing failed
        metadata: archive.metadata,
        forcedPast: archive.forcedPast,
        reconciliation: counts && reconcileCounts(archive.metadata!.table_counts, counts),
      };
      if (drill) outcome.recorded = await recordRestoreTest(archive, outcome);
      if (outcome.reconciliation?.some((row) => !row.ok)) {
        const error = reconciliationError(outcome.reconciliation);
        throw leftBehind(drill ? error : withKeptTarget(error, target));
      }
      if (notDropped) throw leftBehind(scratchLeftError(outcome));
      return outcome;
    },
    { maintenance: true, ...(drill ? {} : { avoid: target }), signal },
  );
}

/**
 * A restore stopped or failed before it filled its target and counted its rows, with what became of an existing
 * target: the usual words ("cleaned up after itself") would hide that --clean dropped it, or that an empty
 * one left in place may now hold part of the restore. One this run created is dropped: nothing to add.
 * Restoring again needs the backup (`filePath`), which retention may have deleted meanwhile.
 */
function withTargetFate(
  error: unknown,
  target: string,
  action: RestoreOutcome['targetAction'],
  filePath: string,
  notDropped?: string,
): unknown {
  if (!(error instanceof BackupError) || action === 'created') return error;
  const shown = visibleControls(target);
  const again = existsSync(filePath)
    ? `Run the same restore again to bring "${target}" back from the backup`
    : `${displayPath(filePath)} has been deleted meanwhile (by retention?): restore "${target}" from another ` +
      `backup (list them: npx tsx backup_db.ts --list --output-dir ${shellWord(displayPath(path.dirname(filePath)))})`;
  // A partial restore that could not be dropped is withLeftBehind's to say.
  const noPartial = notDropped ? '' : ', and no partial restore is left there';
  const [fate, hint] =
    action === 'replaced'
      ? [`"${shown}" had been dropped (--clean): its old content is gone${noPartial}`, again]
      : [
          `"${shown}" was an existing empty database and may now hold part of the restore`,
          `Empty "${target}" (or drop it) before restoring into it again`,
        ];
  const { exitCode, title, details, hints, extra } = error;
  const said = action === 'used empty' ? notCleanedUp(details) : details;
  return new BackupError(exitCode, title, `${said}\n${fate}`, [hint, ...hints], extra);
}

/**
 * A restore whose counts differ keeps its target as restored, to investigate: the message says so, and how
 * to drop it.
 */
function withKeptTarget(error: BackupError, target: string): BackupError {
  const { exitCode, title, details, hints, extra } = error;
  const kept = `"${visibleControls(target)}" is kept as restored, to investigate`;
  const drop = `Drop it when done: DROP DATABASE ${quoteIdentifier(target)};`;
  return new BackupError(exitCode, title, `${details}\n${kept}`, [...hints, drop], extra);
}

/** target_action of a database this run created and could not drop. */
const LEFT_BEHIND = 'created and left behind';

/**
 * A run that could not drop the database it created says so, and how to: it holds the backup's data
 * (production's, maybe) and stays on the server until someone drops it.
 */
function withLeftBehind(error: unknown, config: DbConfig, target: string, why: string): BackupError {
  const { exitCode, title, details, hints, extra } = asBackupError(error, config);
  const where = `${config.host}:${config.port}`;
  const fate =
    `"${visibleControls(target)}", created by this run, could not be dropped and is left on ${where} ` +
    `with its data: ${why}`;
  const drop =
    why === TAKEN_OVER
      ? "Leave it to the restore that holds it now, and check that one's result"
      : `Drop it now: DROP DATABASE ${quoteIdentifier(target)} WITH (FORCE); as a role that may end the sessions ` +
        'still attached to it (a superuser)';
  const data = { ...extra.data, target_database: target, target_action: LEFT_BEHIND };
  const untrue = /not left half-restored/; // pg_restore's hint, no longer true
  const kept = hints.filter((h) => !untrue.test(h));
  return new BackupError(exitCode, title, `${notCleanedUp(details)}\n${fate}`, [drop, ...kept], { ...extra, data });
}

/**
 * A drill whose restore matched but whose scratch database stays on the server fails (exit 7): a copy
 * of the backup's data is left where it does not belong, and only an operator can remove it.
 */
function scratchLeftError(outcome: RestoreOutcome): BackupError {
  const rows = outcome.reconciliation ?? [];
  const recorded = outcome.recorded ? `; ${recordedText(outcome.recorded)}` : '';
  return new BackupError(
    EXIT.BACKUP_FAILED,
    'The scratch database was not dropped',
    `the restore test matched the backup (${rows.length} tables${recorded}), but its scratch database remains`,
    ['The backup itself is good: only the scratch database needs removing'],
    { report: reconciliationLines(rows), data: restoreDocument(outcome) },
  );
}

// ─── Restore: the drill's record in the metadata ─────────────────────────────────────────

export interface RestoreTestRecord {
  time: string;
  ok: boolean;
  duration_ms: number;
  server: string;
  /** "unknown" in the record of a drill that failed before comparing row counts. */
  server_version: string;
  tables: number;
  mismatches: string[];
  /** Why a drill failed before it could compare row counts. */
  error?: string;
}

/**
 * A drill's result, added to the metadata as last_restore_test: atomically, and only while the
 * backup still exists; `notRecorded` says why it was not.
 */
async function recordRestoreTest(archive: RestorableArchive, outcome: RestoreOutcome) {
  const rows = outcome.reconciliation ?? [];
  const record: RestoreTestRecord = {
    time: new Date().toISOString(),
    ok: rows.every((row) => row.ok),
    duration_ms: outcome.durationMs,
    server: outcome.server,
    server_version: outcome.serverVersion,
    tables: rows.length,
    mismatches: rows.filter((row) => !row.ok).map((row) => row.table),
  };
  const checksum = archive.metadata?.checksum_sha256;
  const notRecorded = await writeRestoreTest(archive.filePath, archive.metadataPath, record, checksum);
  return { metadataPath: archive.metadataPath, record, notRecorded };
}

/**
 * A drill that failed on the backup (its verification, pg_restore, the target server's
 * extensions: exit 7 or 8) is a failed restore test, and says so in the metadata, so that --list
 * does not go on showing an earlier success. One that never got that far (configuration,
 * connection, an interrupt) leaves the record alone, as does a backup whose metadata is not valid.
 * Best effort: recording never replaces the failure being reported.
 */
async function recordFailedDrill(filePath: string, server: string, error: unknown, durationMs: number): Promise<void> {
  if (!(error instanceof BackupError) || ![EXIT.BACKUP_FAILED, EXIT.VERIFY_FAILED].includes(error.exitCode as 7 | 8)) {
    return;
  }
  if (error.extra.data?.reconciliation) return; // a row-count mismatch: recorded with its tables already
  const metadataPath = metadataPathFor(filePath);
  if ((await loadMetadata(metadataPath, path.basename(filePath))).status !== 'ok') return;
  const record: RestoreTestRecord = {
    time: new Date().toISOString(),
    ok: false,
    duration_ms: durationMs,
    server,
    server_version: 'unknown',
    tables: 0,
    mismatches: [],
    error: error.extra.step ? `${error.extra.step} failed: ${error.title}` : error.title,
  };
  await writeRestoreTest(filePath, metadataPath, record).catch(() => undefined);
}

/**
 * last_restore_test into the metadata: atomically, and only while the backup still exists. The file
 * keeps its mode and owner, so that a drill run by root leaves the backup its owner's; where this
 * user cannot give it them (another user's file), nothing is recorded. Returns why not, if not.
 */
async function writeRestoreTest(
  filePath: string,
  metadataPath: string,
  record: RestoreTestRecord,
  checksum?: string,
): Promise<string | undefined> {
  if (!(await pathExists(filePath))) return 'the backup was deleted meanwhile';
  // Read again: it may have been edited or removed while the drill ran, and a drill that matched stays a success.
  const old = await fs.stat(metadataPath).catch((error: unknown) => errorText(error));
  const loaded = await loadMetadata(metadataPath, path.basename(filePath));
  if (loaded.status === 'missing') return 'the metadata was deleted meanwhile';
  if (loaded.status === 'invalid') return `the metadata is no longer valid: ${loaded.problems[0]}`;
  if (loaded.status === 'unreadable') return `the metadata cannot be read: ${loaded.why}`;
  if (typeof old === 'string') return `the metadata cannot be read: ${old}`;
  // The drill read the backup it pinned: metadata that now describes another file is not its to record in.
  if (checksum && loaded.metadata.checksum_sha256 !== checksum)
    return 'the backup was replaced meanwhile (its metadata names another checksum)';
  const text = `${JSON.stringify({ ...loaded.metadata, last_restore_test: record }, null, 2)}\n`;
  try {
    await writeFileAtomic(metadataPath, text, 0o600, old);
  } catch (error) {
    if (errnoCode(error) !== 'EPERM') throw error;
    return `the metadata is ${await ownerOf(metadataPath)} and would not stay so: run the drill as its owner or root`;
  }
  // No lock is taken (a backup may hold it for hours): a retention that deleted the backup meanwhile
  // is seen now, and the metadata just written for it would be an orphan.
  if (!(await pathExists(filePath))) {
    await removeQuietly(metadataPath);
    return 'the backup was deleted meanwhile';
  }
}

// ─── Run records: log file, notifications, failure hook ──────────────────────────────────

/** What happened in one run, as written to the log, POSTed to --notify-url and given to --on-failure. */
export interface RunRecord {
  time: string;
  host: string;
  command: CommandName;
  outcome: 'success' | 'failure';
  exit_code: number;
  duration_ms: number;
  environment?: string;
  database?: string;
  file?: string;
  size_bytes?: number;
  error?: string;
  details?: string;
  /** Retention after a backup, or --prune: what was deleted. */
  deleted?: string[];
}

export interface Automation {
  logFile?: string;
  notifyUrl?: string;
  notifyOnSuccess: boolean;
  onFailure?: string;
  /** Heartbeat base URL (a credential): backup runs ping URL/start, URL, URL/fail. */
  pingUrl?: string;
  /** Prometheus textfile updated after every backup run. */
  metricsFile?: string;
  /** Why the start ping failed, already printed: the log still gets it, and a run prints a failing heartbeat once. */
  startPingFailure?: string;
}

/**
 * Pure: a run in one line, from a redacted record: what webhooks and heartbeat pings carry. A name's line
 * break is shown escaped (it would forge a line of its own in Slack); the details' lines are joined. At most
 * 2,000 characters, Discord's limit for a message: a longer one is refused whole.
 */
export function runSummary(record: RunRecord): string {
  const what = record.database ? `${record.command} of ${record.database} (${record.environment})` : record.command;
  const details = record.details?.split(/\r?\n/).join('; ');
  const line =
    record.outcome === 'success'
      ? `✓ backup_db: ${what} succeeded on ${record.host}${record.file ? `: ${record.file}` : ''}` +
        (record.size_bytes ? ` (${formatBytes(record.size_bytes)})` : '')
      : `✗ backup_db: ${what} FAILED on ${record.host} (exit ${record.exit_code}): ${record.error}` +
        (details ? ` (${details})` : '');
  return cutText(visibleControls(line), 2000);
}

/** Pure: `text` cut to at most `max` characters (code points), saying how many were cut. */
export function cutText(text: string, max: number): string {
  const chars = [...text];
  const note = (count: number) => ` … (${count} more characters cut)`;
  const kept = Math.max(0, max - note(chars.length).length);
  return chars.length <= max ? text : chars.slice(0, kept).join('') + note(chars.length - kept);
}

/** How long a webhook or heartbeat receiver gets to answer one POST: exit is never held up for long. */
const HTTP_TIMEOUT_MS = 5_000;

/** POST once: undefined when the receiver took it, else why not, and whether trying again may help. */
async function postOnce(url: string, contentType: string, body: string, signal?: AbortSignal) {
  try {
    const timeout = AbortSignal.timeout(HTTP_TIMEOUT_MS);
    const response = await fetch(url, {
      method: 'POST',
      headers: { 'content-type': contentType, 'user-agent': 'backup_db' },
      body,
      // Following a 301, 302 or 303 turns the POST into a GET without its body, and any redirect may hand
      // the run's details to another host: a redirect is a failure, and the URL to use is the final one.
      redirect: 'manual',
      signal: signal ? AbortSignal.any([timeout, signal]) : timeout,
    });
    await response.body?.cancel();
    if (response.ok) return undefined;
    if (response.status >= 300 && response.status < 400)
      return {
        why: `HTTP ${response.status} ${response.statusText}: the URL redirects; use the one it redirects to`,
        transient: false,
      };
    const transient = response.status === 429 || response.status >= 500;
    return { why: `HTTP ${response.status} ${response.statusText}`, transient };
  } catch (error) {
    if (signal?.aborted) return { why: interruption(signal), transient: false };
    const timedOut = error instanceof Error && error.name === 'TimeoutError';
    return {
      why: timedOut ? `no answer within ${HTTP_TIMEOUT_MS / 1000} s` : fetchFailure(error, url),
      transient: true,
    };
  }
}

/** Pure: what stopped a step, as the end of a sentence: "interrupted by SIGTERM". */
function interruption(signal: AbortSignal): string {
  const title = signal.reason instanceof BackupError ? signal.reason.title : 'Interrupted';
  return title.charAt(0).toLowerCase() + title.slice(1);
}

/**
 * Pure: why fetch failed. Its message is mostly just "fetch failed": the network error is its cause
 * ("connect ECONNREFUSED 10.0.0.5:443"; an AggregateError has only a code). Some messages quote the
 * URL, a credential (and one a ping URL's mask may not cover): it is left out.
 */
export function fetchFailure(error: unknown, url: string): string {
  const cause = error instanceof Error ? error.cause : undefined;
  const because = cause instanceof Error ? cause.message || errnoCode(cause) : undefined;
  const said = `${errorText(error)}${because ? `: ${because}` : ''}`.split(url).join('the URL');
  // DNS and TLS errors name the host, which some receivers make the token (https://<token>.m.pipedream.net);
  // an address is no token, and says which one refused.
  const host = URL.canParse(url) ? new URL(url).hostname.replace(/^\[|\]$/g, '') : '';
  const named = new RegExp(`(?<![\\w.-])${escapeRegExp(host)}(?![\\w-])`, 'gi');
  return host && !isIP(host) ? said.replace(named, "the URL's host") : said;
}

/** POST the payload, retrying once on a network error, a timeout, 429 or 5xx: two attempts at most. */
async function postNotification(url: string, payload: Record<string, unknown>, signal: AbortSignal): Promise<void> {
  const post = () => postOnce(url, 'application/json', JSON.stringify(payload), signal);
  let failure = await post();
  if (failure?.transient) failure = await post();
  if (failure) throw new Error(failure.why);
}

/**
 * The failure command's environment, from a redacted record: the details as BACKUP_* variables.
 * Of the inherited environment, credentials are dropped and our own settings holding a secret (a
 * password pasted into DEV_DB_NAME, say) are masked; the rest (HOME, PATH, ...) is left as it is.
 */
export function hookEnvironment(record: RunRecord, base: NodeJS.ProcessEnv, secrets: readonly string[]) {
  const env: Record<string, string> = {};
  for (const [name, value] of Object.entries(base)) {
    if (value === undefined || CREDENTIAL_VARIABLE.test(name)) continue;
    env[name] = OWN_SETTING.test(name) ? maskSecrets(value, secrets) : value;
  }
  // Linux refuses a variable over 128 KiB (the command would not start): the details are cut, whole in the log.
  const details = cutText(record.details ?? '', HOOK_DETAILS_MAX);
  const own = {
    BACKUP_COMMAND: record.command,
    BACKUP_OUTCOME: record.outcome,
    BACKUP_EXIT_CODE: String(record.exit_code),
    BACKUP_ERROR: record.error ?? '',
    BACKUP_DETAILS: details,
    BACKUP_ENVIRONMENT: record.environment ?? '',
    BACKUP_DATABASE: record.database ?? '',
    BACKUP_FILE: record.file ?? '',
    BACKUP_HOST: record.host,
    BACKUP_TIME: record.time,
    BACKUP_RECORD: JSON.stringify(record.details === undefined ? record : { ...record, details }),
  };
  // A variable cannot hold a NUL byte (a setting may: the command would not start): shown as on the terminal.
  for (const [name, value] of Object.entries(own)) env[name] = value.replaceAll('\0', '\\x00');
  return env;
}

/** Characters of details in the failure command's variables: 6 bytes each at most in JSON, far below 128 KiB. */
const HOOK_DETAILS_MAX = 8000;

/** Variables that hold credentials whole: never handed to the failure command. */
const CREDENTIAL_VARIABLE = /PASSWORD$|DATABASE_URL$|^BACKUP_NOTIFY_URL$|^BACKUP_PING_URL$/;
const OWN_SETTING = /^(DEV_)?DB_|^ENV_MODE$|^BACKUP_|^PG_BIN_DIR$/;

/**
 * After the run: log it, then notify. What to do is decided from the record as it is; what is sent
 * is its redacted copy. None of this changes the exit code; a failure here is reported on stderr
 * and logged, since the run itself is already over. An interrupt (`signal`) stops what is still
 * being sent or run, and is reported as such a failure.
 */
async function recordRun(
  raw: RunRecord,
  automation: Automation,
  { secrets, named }: { secrets: readonly string[]; named: readonly string[] },
  io: Io,
  signal: AbortSignal,
): Promise<void> {
  const record = redact(raw, secrets, named);
  const [isBackup, isFailure] = [raw.command === 'backup', raw.outcome === 'failure'];
  // JSON Lines: one object per line, greppable and parseable with jq. O_APPEND and a single write() per
  // line, so lines of concurrent runs never interleave on a local filesystem. Created 0600 like the backups.
  const append = async (entry: object) => {
    const file = automation.logFile;
    if (!file) return;
    try {
      await fs.mkdir(path.dirname(file), { recursive: true });
      await appendToRegularFile(file, `${JSON.stringify(entry)}\n`, 0o600);
    } catch (error) {
      printWarning(io, warningProblem(`Could not write the log file ${file}`, errorText(error), secrets));
    }
  };
  // A failure after the run is a warning: printed (unless it already was), and logged as an event about this run.
  const warn = async (event: string, headline: string, why: unknown, printed = false) => {
    const warning = warningProblem(headline, why instanceof Error ? errorText(why) : String(why), secrets);
    if (!printed) printWarning(io, warning);
    await append({ time: new Date().toISOString(), event, error: warning.details, for: record.time });
  };
  await append(record);
  for (const { event, headline, why } of runWarnings.splice(0)) await warn(event, headline, why, true);

  const notify = isFailure || automation.notifyOnSuccess;
  const tasks: Array<Promise<void>> = [];
  if (notify && automation.notifyUrl) {
    const failed = (error: unknown) => warn('notification_failed', 'Notification failed', error);
    // The POST body: `text` for Slack, `content` for Discord, the rest for machines.
    const text = runSummary(record);
    tasks.push(postNotification(automation.notifyUrl, { text, content: text, ...record }, signal).catch(failed));
  }
  if (isBackup && automation.pingUrl) {
    const ping = sendPing(automation.pingUrl, isFailure ? 'fail' : 'success', runSummary(record), signal);
    const { startPingFailure } = automation;
    tasks.push(
      ping.then((why) =>
        startPingFailure || why
          ? warn('ping_failed', 'Heartbeat ping failed', startPingFailure ?? why, startPingFailure !== undefined)
          : undefined,
      ),
    );
  }
  if (isBackup && automation.metricsFile && record.database && record.environment) {
    const { database, environment, exit_code: exitCode, duration_ms: durationMs, size_bytes: sizeBytes } = record;
    const run = { database, environment, endedAt: new Date(), exitCode, durationMs, sizeBytes };
    const failed = (error: unknown) =>
      warn('metrics_failed', `Could not write the metrics file ${automation.metricsFile}`, error);
    tasks.push(updateMetricsFile(automation.metricsFile, run).catch(failed));
  }
  if (isFailure && automation.onFailure)
    tasks.push(runFailureCommand(automation.onFailure, record, { secrets, signal }, warn));
  await Promise.all(tasks);
}

/**
 * Append to a file that must be a regular one, created if missing: non-blocking, so that a FIFO
 * under its name cannot hold the run up. A FIFO, socket or device throws ENOTREG. A line is whole or
 * absent: it starts on a line of its own after another run's unfinished one, and a write cut short
 * (the disk full, the file at its size limit) is taken back and thrown, never left for the next line to join.
 */
async function appendToRegularFile(file: string, text: string, mode: number): Promise<void> {
  const { handle, readable } = await openToAppend(file, mode);
  try {
    const stat = await handle.stat();
    if (!stat.isFile()) throw notRegularFile();
    const startsMidLine = readable && (await endsMidLine(handle, stat.size));
    const bytes = Buffer.from(startsMidLine ? `\n${text}` : text);
    const { bytesWritten } = await handle.write(bytes);
    if (bytesWritten < bytes.length) await takeBackShortWrite(handle, stat.size, bytesWritten, bytes.length);
  } finally {
    await handle.close();
  }
}

/** Opened to append, and to read its last byte where we may: a log may be one we can append to but not read. */
async function openToAppend(file: string, mode: number): Promise<{ handle: fs.FileHandle; readable: boolean }> {
  const { O_RDWR, O_WRONLY, O_APPEND, O_CREAT, O_NONBLOCK } = fs.constants;
  const open = (access: number) =>
    fs.open(file, access | O_APPEND | O_CREAT | O_NONBLOCK, mode).catch((error: unknown) => {
      // A FIFO nobody reads, or a socket, cannot be opened to write at all.
      throw errnoCode(error) === 'ENXIO' ? notRegularFile() : error;
    });
  try {
    return { handle: await open(O_RDWR), readable: true };
  } catch (error) {
    if (errnoCode(error) !== 'EACCES') throw error;
    return { handle: await open(O_WRONLY), readable: false };
  }
}

/** Whether the byte before `size` is not a newline: another run's line left unfinished (its write cut short). */
async function endsMidLine(handle: fs.FileHandle, size: number): Promise<boolean> {
  if (size === 0) return false;
  const { buffer, bytesRead } = await handle.read(Buffer.alloc(1), 0, 1, size - 1);
  return bytesRead === 1 && buffer[0] !== 0x0a;
}

/**
 * A short write left part of our line at the end: remove it (ftruncate back to where it started) while the
 * file is still as our write left it. Once another run has appended after it, truncating would cut that run's
 * line too, so ours stays. Either way the write failed.
 */
async function takeBackShortWrite(handle: fs.FileHandle, start: number, written: number, length: number) {
  const ours = (await handle.stat()).size === start + written;
  // An append-only file (chattr +a) refuses the truncation: then the fragment stays, and the warning says so.
  const removed = ours && (await handle.truncate(start).then(() => undefined, errorText));
  const partial =
    removed === undefined
      ? 'the partial line was removed'
      : `the partial line stays: ${removed === false ? 'another run has written after it' : removed}`;
  throw new Error(
    `only ${written} of ${length} bytes were written (the disk is full, or the file at its size limit); ${partial}`,
  );
}

/** The paths the settings name must be the ones meant (see misreadPath): exit 2 before anything is written. */
async function assertSettingPathsKnown(paths: Array<[setting: string, path: string | undefined]>): Promise<void> {
  for (const [setting, given] of paths) {
    const misread = given === undefined ? undefined : await misreadPath(given);
    if (misread) throw configError(`${setting} ${misread.why}`, [misread.hint]);
  }
}

/**
 * The log and metrics files must be regular files or not exist yet: a directory can never be
 * written, and a FIFO would hold the run up once its work is done. Refused before the run.
 */
async function checkRecordFiles({ logFile, metricsFile }: Automation): Promise<void> {
  const files = [
    ['log file', '--log-file (or BACKUP_LOG_FILE)', logFile],
    ['metrics file', '--metrics-file (or BACKUP_METRICS_FILE)', metricsFile],
  ] as const;
  for (const [what, setting, file] of files) {
    const stat = file ? await fs.stat(file).catch(() => undefined) : undefined;
    if (!stat || stat.isFile()) continue;
    const kind = stat.isDirectory() ? 'a directory, ' : stat.isFIFO() ? 'a FIFO, ' : '';
    throw configError(`The ${what} ${displayPath(file!)} is ${kind}not a regular file`, [
      `Give ${setting} the path of a file; it is created if missing`,
    ]);
  }
  // One it cannot read now is reported after the run, as a warning: the backup matters more.
  const read = metricsFile ? await readMetricsFile(metricsFile).catch(() => undefined) : undefined;
  if (read?.foreign)
    throw configError(`The metrics file ${displayPath(metricsFile!)} ${read.foreign}`, [
      'Check --metrics-file (or BACKUP_METRICS_FILE): this tool rewrites that file whole, so only it may write there',
      "Give it a file of its own in node_exporter's textfile directory (backup_db.prom): it reads every .prom file",
    ]);
}

const HOOK_TIMEOUT_MS = 60_000;
/** Of the command's stderr only the end is kept: its last line is what is reported. */
const HOOK_STDERR_KEPT = 4096;

/**
 * --on-failure: a shell command, given the record as BACKUP_* variables, for at most a minute. In a
 * process group of its own, so that a timeout stops all it started; the run waits for the shell,
 * not for a child left in the background holding its stderr. Its stdout is discarded. An interrupt
 * (`signal`) stops it too: in its own group it would not hear the terminal's Ctrl-C, and outlive the run.
 */
async function runFailureCommand(
  command: string,
  record: RunRecord,
  { secrets, signal }: { secrets: readonly string[]; signal: AbortSignal },
  warn: (event: string, headline: string, why: unknown) => Promise<void>,
): Promise<void> {
  const env = hookEnvironment(record, process.env, secrets);
  const why = await new Promise<string | undefined>((resolve) => {
    const child = spawn('/bin/sh', ['-c', command], { env, stdio: ['ignore', 'ignore', 'pipe'], detached: true });
    let [stderr, stoppedWhy] = [Buffer.alloc(0), undefined as string | undefined];
    child.stderr.on('data', (chunk: Buffer) => (stderr = Buffer.concat([stderr, chunk]).subarray(-HOOK_STDERR_KEPT)));
    const stopAll = (why: string) => {
      stoppedWhy ??= why;
      signalGroup(child.pid!, 'SIGKILL');
    };
    const timer = setTimeout(() => stopAll(`timed out after ${HOOK_TIMEOUT_MS / 1000} s`), HOOK_TIMEOUT_MS);
    const onInterrupt = () => stopAll(interruption(signal));
    if (signal.aborted) onInterrupt();
    else signal.addEventListener('abort', onInterrupt, { once: true });
    const end = (result?: string) => {
      clearTimeout(timer);
      signal.removeEventListener('abort', onInterrupt);
      child.stderr.destroy();
      resolve(result);
    };
    child.on('error', (error) => end(errorText(error)));
    child.on('exit', (code, signal) => {
      const report = () => {
        const lastLine = stderr.toString().trim().split('\n').at(-1);
        if (stoppedWhy) end(stoppedWhy);
        else end(code === 0 ? undefined : `exit ${code ?? signal}${lastLine ? `: ${lastLine}` : ''}`);
      };
      // The shell's last words reach us before the pipe's end, unless a child still holds it: then a second at most.
      if (child.stderr.readableEnded) return report();
      child.stderr.once('end', report);
      setTimeout(report, 1000).unref();
    });
  }).catch(errorText);
  if (why) await warn('on_failure_command_failed', 'The --on-failure command failed', why);
}

// ─── Operations: heartbeat pings and metrics ─────────────────────────────────────────────

/**
 * Pure: a heartbeat URL, by the convention healthchecks.io, Uptime Kuma push monitors and Cronitor
 * share: URL/start when a run starts, URL on success, URL/fail on failure (a query string stays
 * where it was).
 */
export function pingUrlFor(base: string, kind: 'start' | 'success' | 'fail'): string {
  const url = new URL(base);
  if (kind !== 'success') url.pathname = `${url.pathname.replace(/\/+$/, '')}/${kind}`;
  return url.toString();
}

/**
 * POST one heartbeat with a short text body (the run's outcome in one line). Resolves with why it
 * failed, or undefined: a ping never fails a run, and waits at most 5 s, or until `signal`.
 */
async function sendPing(
  base: string,
  kind: 'start' | 'success' | 'fail',
  body: string,
  signal?: AbortSignal,
): Promise<string | undefined> {
  return (await postOnce(pingUrlFor(base, kind), 'text/plain; charset=utf-8', body, signal))?.why;
}

/** The series the metrics file holds, each labelled by database and environment. */
const METRICS = {
  backup_db_last_run_timestamp_seconds: 'When the last backup run ended (Unix time), whatever its outcome.',
  backup_db_last_success_timestamp_seconds: 'When the last successful backup ended (Unix time).',
  backup_db_last_exit_code: 'The exit code of the last backup run (0: success).',
  backup_db_last_duration_seconds: 'How long the last backup run took.',
  backup_db_last_size_bytes: 'The size of the last successful backup.',
} as const;
export type MetricName = keyof typeof METRICS;

export interface MetricSeries {
  database: string;
  environment: string;
  values: Partial<Record<MetricName, number>>;
}

const escapeLabel = (value: string) => value.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
const unescapeLabel = (value: string) => value.replace(/\\(["\\n])/g, (_, c: string) => (c === 'n' ? '\n' : c));

// A value as String(number) writes it (1.5, -1, 1e+21), never +Inf, 0x10 or a timestamp after it.
const SERIES_LINE =
  /^(backup_db_\w+)\{database="((?:[^"\\]|\\.)*)",environment="((?:[^"\\]|\\.)*)"\} (-?\d+(?:\.\d+)?(?:e[+-]\d+)?)$/;
// Any help text (an older version's wording is still its own), but only the one type it writes.
const COMMENT_LINE = /^# (?:HELP (backup_db_\w+) .*|TYPE (backup_db_\w+) gauge)$/;
/** Larger than this, a file is not one this tool wrote: a series is under 200 bytes. */
const METRICS_MAX_MIB = 16;
const METRICS_MAX_BYTES = METRICS_MAX_MIB * 2 ** 20;

/**
 * Pure: why a metrics file's text is not this tool's to rewrite, if it is not: it is rewritten whole, so a
 * mistyped path (the .env beside it) or another exporter's file would lose every line not this tool's.
 */
export function foreignMetrics(text: string): string | undefined {
  const isOwn = (line: string) => {
    const match = SERIES_LINE.exec(line) ?? COMMENT_LINE.exec(line);
    const name = match?.[1] ?? match?.[2];
    return name !== undefined && Object.hasOwn(METRICS, name);
  };
  const index = text.split('\n').findIndex((line) => line !== '' && !isOwn(line));
  return index < 0 ? undefined : `holds lines this tool did not write (line ${index + 1})`;
}

/** Pure: the series of a metrics file this tool wrote. */
export function parseMetrics(text: string): MetricSeries[] {
  const series = new Map<string, MetricSeries>();
  for (const raw of text.split('\n')) {
    const match = SERIES_LINE.exec(raw);
    if (!match || !Object.hasOwn(METRICS, match[1]!)) continue;
    const [database, environment] = [unescapeLabel(match[2]!), unescapeLabel(match[3]!)];
    const key = JSON.stringify([database, environment]);
    const entry = series.get(key) ?? { database, environment, values: {} };
    entry.values[match[1] as MetricName] = Number(match[4]);
    series.set(key, entry);
  }
  return [...series.values()];
}

/** Pure: the Prometheus text format (version 0.0.4) of the series, as node_exporter's textfile collector reads it. */
export function renderMetrics(series: MetricSeries[]): string {
  const key = (s: MetricSeries) => `${s.database}\0${s.environment}`;
  const sorted = [...series].sort((a, b) => (key(a) < key(b) ? -1 : 1));
  const lines: string[] = [];
  for (const [name, help] of Object.entries(METRICS) as Array<[MetricName, string]>) {
    const samples = sorted.filter((s) => s.values[name] !== undefined);
    if (samples.length === 0) continue;
    lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} gauge`);
    for (const s of samples)
      lines.push(
        `${name}{database="${escapeLabel(s.database)}",environment="${escapeLabel(s.environment)}"} ${s.values[name]}`,
      );
  }
  return `${lines.join('\n')}\n`;
}

export interface MetricsRun extends Pick<MetricSeries, 'database' | 'environment'> {
  endedAt: Date;
  exitCode: number;
  durationMs: number;
  /** The backup's size: set when the run made one, even if the retention after it failed. */
  sizeBytes?: number;
}

/**
 * Pure: the series after one run of `database`; the last success and size stay as they were when it made
 * no backup. One made whose retention failed is a success for freshness: its exit code says what failed.
 */
export function recordRunInMetrics(series: MetricSeries[], run: MetricsRun): MetricSeries[] {
  const isThis = (s: MetricSeries) => s.database === run.database && s.environment === run.environment;
  const previous = series.find(isThis)?.values ?? {};
  const ended = Math.round(run.endedAt.getTime() / 1000);
  const values: MetricSeries['values'] = {
    ...previous,
    backup_db_last_run_timestamp_seconds: ended,
    backup_db_last_exit_code: run.exitCode,
    backup_db_last_duration_seconds: run.durationMs / 1000,
    ...(run.exitCode === 0 || run.sizeBytes !== undefined
      ? {
          backup_db_last_success_timestamp_seconds: ended,
          ...(run.sizeBytes !== undefined ? { backup_db_last_size_bytes: run.sizeBytes } : {}),
        }
      : {}),
  };
  return [...series.filter((s) => !isThis(s)), { database: run.database, environment: run.environment, values }];
}

/**
 * Update the metrics file after a backup run: read it, change this database's series, write it
 * atomically (temp file, fsync, rename; the temp name does not end in .prom, which the textfile
 * collector would read). Runs of other databases writing the same file take turns under a lock.
 * A symlink is written through, onto its target: node_exporter reads the target, not the link.
 */
async function updateMetricsFile(link: string, run: MetricsRun): Promise<void> {
  await fs.mkdir(path.dirname(link), { recursive: true });
  const file = await symlinkTarget(link);
  await withFileLock(`${file}.lock`, async () => {
    const { text, foreign } = await readMetricsFile(file);
    // Checked before the run too, but another program may have taken the file over since.
    if (foreign) throw new Error(`it ${foreign}`);
    const updated = renderMetrics(recordRunInMetrics(parseMetrics(text), run));
    // Never a file the next run would refuse as too large for one of this tool's.
    if (Buffer.byteLength(updated) > METRICS_MAX_BYTES) throw new Error(`it would hold over ${METRICS_MAX_MIB} MiB`);
    await writeFileAtomic(file, updated, 0o644);
  });
}

/** A metrics file's text ('' if it does not exist yet), and why it is not this tool's to rewrite, if it is not. */
async function readMetricsFile(file: string): Promise<{ text: string; foreign?: string }> {
  const handle = await openRegularFile(file).catch((error: unknown) => {
    if (errnoCode(error) === 'ENOENT') return undefined;
    throw error;
  });
  if (!handle) return { text: '' };
  try {
    if ((await handle.stat()).size > METRICS_MAX_BYTES)
      return { text: '', foreign: `holds over ${METRICS_MAX_MIB} MiB, more than this tool writes` };
    const text = await handle.readFile('utf8');
    return { text, foreign: foreignMetrics(text) };
  } finally {
    await handle.close();
  }
}

/** The file that writing `file` reaches through its symlinks, as open() follows them: a dangling one's target too. */
async function symlinkTarget(file: string): Promise<string> {
  try {
    return await fs.realpath(file);
  } catch (error) {
    if (errnoCode(error) !== 'ENOENT') throw error;
    const target = await fs.readlink(file).catch(() => undefined);
    return target === undefined ? file : symlinkTarget(path.resolve(path.dirname(file), target));
  }
}

// ─── Output: text for a person ──────────────────────────────────────────────────────────

/** chalk honours FORCE_COLOR and TTYs; NO_COLOR (no-color.org) we honour ourselves. */
function colours(level: number | false): ChalkInstance {
  const noColor = (process.env.NO_COLOR ?? '') !== '';
  return new Chalk({ level: noColor || level === false ? 0 : (level as 0 | 1 | 2 | 3) });
}
const out = colours(supportsColor ? supportsColor.level : false);
const err = colours(supportsColorStderr ? supportsColorStderr.level : false);

/** Colour the status marks of an otherwise plain line. */
function paint(line: string, c: ChalkInstance): string {
  return line.replace(/✓|✗|\? No metadata|\? Needs newer pg_restore/g, (mark) =>
    mark === '✓' ? c.green(mark) : mark === '✗' ? c.red(mark) : c.yellow(mark),
  );
}

/** What a terminal shows two columns wide (East Asian wide and full-width characters, emoji), as wcwidth. */
const WIDE_CJK =
  /[\u1100-\u115f\u2e80-\u303e\u3041-\u33ff\u3400-\u4dbf\u4e00-\u9fff\ua000-\ua4cf\uac00-\ud7a3\uf900-\ufaff]/u;
const WIDE_OTHER = /[\ufe30-\ufe4f\uff00-\uff60\uffe0-\uffe6\u{20000}-\u{3fffd}]|\p{Emoji_Presentation}/u;

/** Pure: the columns `text` takes on a terminal: wide characters two, combining marks and format characters none. */
export function displayWidth(text: string): number {
  let width = 0;
  for (const char of text)
    width += /[\p{Mn}\p{Me}\p{Cf}]/u.test(char) ? 0 : WIDE_CJK.test(char) || WIDE_OTHER.test(char) ? 2 : 1;
  return width;
}

/** Pure: `text` padded with spaces to `width` terminal columns. */
function padColumns(text: string, width: number): string {
  return text + ' '.repeat(Math.max(0, width - displayWidth(text)));
}

/** "50.0 MB" with 1024-based units, as in the contract's examples. */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let unit = 0;
  while (bytes >= 1024 ** (unit + 1) && unit < units.length - 1) unit++;
  return unit === 0 ? `${bytes} B` : `${(bytes / 1024 ** unit).toFixed(1)} ${units[unit]}`;
}

/** "4 (150 conversations, 3420 messages, …)": the biggest tables first when there are many. */
export function summarizeTables(counts: Record<string, number>, shown = 6): string {
  const entries = Object.entries(counts);
  const listed = entries.length > shown ? [...entries].sort((a, b) => b[1] - a[1]).slice(0, shown) : entries;
  const more = entries.length - listed.length;
  const parts = listed.map(([name, count]) => `${count} ${name}`);
  return `${entries.length} (${parts.join(', ')}${more > 0 ? `, and ${more} more` : ''})`;
}

/** Pure: a value as one word that a shell reads back unchanged, for hints that are commands to paste. */
export function shellWord(value: string): string {
  if (/^[\w@%+=:,./-]+$/.test(value)) return value;
  if (!/[\x00-\x1f\x7f-\x9f]/.test(value)) return `'${value.replaceAll("'", "'\\''")}'`;
  // $'…' (bash, zsh, ksh), control characters (C1 too) as their UTF-8 bytes, \xHH: the hint then prints,
  // and pastes, as it reads.
  const bytes = (c: string) => [...Buffer.from(c)].map(hexByte).join('');
  return `$'${value.replace(/[\\'\x00-\x1f\x7f-\x9f]/g, (c) => (c === '\\' || c === "'" ? `\\${c}` : bytes(c)))}'`;
}

/** Paths as the user would type them: relative to the working directory when below it (./~, not ~, the home). */
export function displayPath(filePath: string): string {
  const relative = path.relative(process.cwd(), filePath);
  if (!relative || relative.startsWith('..') || path.isAbsolute(relative)) return filePath;
  return relative.startsWith('~') ? `.${path.sep}${relative}` : relative;
}

/** What a run prints for a person: lines for stdout and for stderr, plain (marks are coloured when printed). */
export type Text = Record<'out' | 'err', string[]>;

function backupSummaryText(result: BackupResult): Text {
  const { dumpPath, metadataPath, metadata, removedStaleFiles, retention, retentionError } = result;
  const lines = [
    '✓ Backup created successfully',
    '',
    `Backup File: ${displayPath(dumpPath)}`,
    `Metadata:    ${displayPath(metadataPath)}`,
    `Size:        ${formatBytes(metadata.backup_size_bytes)}`,
    `Environment: ${metadata.environment}`,
    `Database:    ${metadata.database_name}`,
    `Tables:      ${summarizeTables(metadata.table_counts)}`,
    ...(metadata.unlogged_data_left_out
      ? [
          `Left out:    the rows of unlogged tables (${listSome(metadata.unlogged_data_left_out)}): a standby has ` +
            'none; back up the primary to include them',
        ]
      : []),
    `Checksum:    ${shortHash(metadata.checksum_sha256)}`,
    'Verified:    ✓ Integrity check passed',
  ];
  const stale = `${plural(removedStaleFiles.length, 'stale file')} left by an interrupted earlier run`;
  if (removedStaleFiles.length > 0) lines.push(`Cleaned up:  ${stale} (${removedStaleFiles.join(', ')})`);
  if (retention?.dryRun) {
    const target = { database: metadata.database_name, environment: metadata.environment };
    lines.push('', ...retentionLines(retention, path.dirname(dumpPath), target));
  } else if (retention) {
    const { decisions, deleted, freedBytes, policy } = retention;
    const gone = deleted.length > 0 ? `deleted ${deleted.length} (${formatBytes(freedBytes)})` : 'deleted none';
    lines.push(`Retention:   kept ${decisions.length - deleted.length}, ${gone} by ${describePolicy(policy)}`);
    // Never judged (damaged, dated ahead, another server's): said, so that none piles up unseen.
    const left = retention.leftAlone.length;
    if (left > 0) lines.push(`             left alone ${left} (see why: --prune --dry-run with the same rules)`);
  }
  const stuck = result.staleFilesLeft;
  const notRemoved = `Could not remove ${plural(stuck.length, 'stale file')} left by an interrupted earlier run`;
  const err = stuck.length > 0 ? problemLines(warningProblem(notRemoved, stuck.join('; '), [])) : [];
  if (!retentionError) return { out: lines, err };
  const { title, details } = retentionError;
  const headline = `The backup is fine, but ${title.charAt(0).toLowerCase()}${title.slice(1)}`;
  return { out: lines, err: [...err, ...problemLines(warningProblem(headline, details, []))] };
}

/** Pure: the retention decision for each backup of one database, and what it amounts to. */
export function retentionLines(
  report: RetentionReport,
  dir: string,
  target: Pick<DbConfig, 'database' | 'environment'>,
): string[] {
  const header =
    `Retention for ${target.database} (${target.environment}) in ${displayPath(dir)}${path.sep}: ` +
    `${describePolicy(report.policy)}, days in ${report.timeZone}`;
  const width = Math.max(0, ...report.decisions.map((d) => d.item.file.length));
  const rows = report.decisions.map(({ keep, item, reasons }) =>
    `  ${keep ? 'keep  ' : 'delete'}  ${item.timestamp}  ${item.file.padEnd(width)}  ${reasons.join(', ')}`.trimEnd(),
  );
  const leftAlone = report.leftAlone.map(({ file, why }) => `  leave   ${file}  (${why}; not judged by the policy)`);
  const count = report.deleted.length;
  const total =
    count === 0
      ? 'Nothing to delete.'
      : report.dryRun
        ? `Dry run: would delete ${plural(count, 'backup')} (${formatBytes(report.freedBytes)}); nothing was deleted.`
        : `Deleted ${plural(count, 'backup')} (${formatBytes(report.freedBytes)}).`;
  return [header, '', ...rows, ...leftAlone, '', total];
}

/** The contract's verification lines (plain text; marks are coloured when printed). */
function verifyReportLines({ filePath, metadata, inspection: { checks } }: VerifyResult): string[] {
  const mark = (check: Check) => `${check.ok ? '✓' : '✗'} ${check.summary}`;
  return [
    `File:        ${displayPath(filePath)}`,
    `Checksum:    ${mark(checks.checksum)}`,
    `Structure:   ${mark(checks.structure)}`,
    `Tables:      ${mark(checks.tables)}`,
    `Size:        ${checks.size.ok ? checks.size.summary : mark(checks.size)}`,
    `Timestamp:   ${metadata.backup_timestamp}`,
    `Database:    ${metadata.database_name} (${metadata.environment})`,
  ];
}

function verificationText(result: VerifyResult): Text {
  return { out: ['✓ Backup verification passed', '', ...verifyReportLines(result)], err: [] };
}

/** Every status's label in --list: those of a failed check from FILE_CHECKS. */
const STATUS_LABELS = {
  verified: '✓ Verified',
  no_metadata: '? No metadata',
  invalid_metadata: '✗ Invalid metadata',
  unreadable_metadata: '✗ Unreadable metadata',
  needs_newer_pg_restore: '? Needs newer pg_restore',
  in_progress: '… In progress',
  incomplete: '✗ Incomplete',
  ...Object.fromEntries(Object.values(FILE_CHECKS).map((check) => [check.status, check.label])),
} as Record<ListStatus, string>;

const plural = (n: number, word: string) => `${n} ${word}${n === 1 ? '' : 's'}`;

/** Pure: the contract's list table, columns sized to their content, newest first. */
export function listingLines(listing: Listing): string[] {
  const where = `${displayPath(listing.directory)}${path.sep}`;
  if (!listing.exists) return [`No backups: ${where} does not exist yet.`];
  const entries = sortNewestFirst([...listing.backups, ...listing.incomplete]);
  if (entries.length === 0) return [`No backups in ${where}`];

  // The restore-test column appears once any backup has been through a restore drill.
  const drilled = entries.some((e) => e.restoreTest);
  const nameless = (e: ListEntry) => !e.timestamp && !e.environment && !e.database;
  const drill = (e: ListEntry) =>
    e.restoreTest ? `${e.restoreTest.ok ? '✓' : '✗'} ${e.restoreTest.time.slice(0, 10)}` : '-';
  const rows = [
    ['Timestamp', 'Environment', 'Database', 'Size', 'Status', ...(drilled ? ['Restore test'] : [])],
    ...entries.map((e) => [
      ...(nameless(e) ? ['', '', ''] : [e.timestamp ?? '-', e.environment ?? '-', e.database ?? '-']),
      formatBytes(e.sizeBytes),
      STATUS_LABELS[e.status],
      ...(drilled ? [drill(e)] : []),
    ]),
  ];
  const widths = rows[0]!.map((_, column) => Math.max(...rows.map((row) => displayWidth(row[column]!))));
  const lead = widths[0]! + widths[1]! + widths[2]! + 6;
  const table = rows.map((row, i) => {
    const line = row.map((cell, column) => (column === row.length - 1 ? cell : padColumns(cell, widths[column]! + 2)));
    const entry = entries[i - 1];
    // Neither its name nor metadata says what it holds: the file's name stands across the first three columns.
    return entry && nameless(entry) ? `${padColumns(entry.file, lead - 2)}  ${line.slice(3).join('')}` : line.join('');
  });

  const unverifiable = listing.backups.filter((b) => b.status === 'needs_newer_pg_restore').length;
  const failed = listing.backups.filter((b) => b.status !== 'verified').length - unverifiable;
  const findings = [
    ...(failed > 0 ? [`${plural(failed, 'backup')} failed verification`] : []),
    ...(unverifiable > 0 ? [`${plural(unverifiable, 'backup')} cannot be verified without a newer pg_restore`] : []),
  ];
  const summary = [plural(listing.backups.length, 'backup')];
  const running = listing.incomplete.filter((e) => e.status === 'in_progress').length;
  const leftovers = listing.incomplete.length - running;
  if (running > 0) summary.push(`${running} in progress`);
  if (leftovers > 0)
    summary.push(`${plural(leftovers, 'incomplete file')} (left by runs that did not finish; not backups)`);
  const check = listing.fullCheck
    ? findings.length === 0
      ? 'Every backup was re-read: checksum, size, archive structure and table data verified.'
      : `${findings.join(', ')}; run --verify FILE for details.`
    : 'Status checks metadata and size only; add --verify to re-read every file.';
  return [`Backup Files (${where}):`, '', ...table, '', `${summary.join(', ')}. ${check}`];
}

/** Pure: each table's rows in the backup's metadata and in the restored database. */
export function reconciliationLines(rows: ReconciliationRow[]): string[] {
  const cells = [
    ['Table', 'Backup', 'Restored', ''],
    // Escaped here, not when printed: the columns are measured as shown.
    ...rows.map((r) => [
      visibleControls(r.table),
      String(r.backup ?? '-'),
      String(r.restored ?? '-'),
      r.ok ? '✓' : '✗',
    ]),
  ];
  const widths = [0, 1, 2].map((column) => Math.max(...cells.map((row) => displayWidth(row[column]!))));
  return cells.map(([table, backup, restored, mark]) =>
    [padColumns(table!, widths[0]!), backup!.padStart(widths[1]!), restored!.padStart(widths[2]!), mark]
      .join('  ')
      .trimEnd(),
  );
}

/** Pure: where a drill's result went, or why it went nowhere. */
function recordedText({ metadataPath, notRecorded }: NonNullable<RestoreOutcome['recorded']>): string {
  return notRecorded ? `not recorded: ${notRecorded}` : `last_restore_test in ${displayPath(metadataPath)}`;
}

function restoreText(outcome: RestoreOutcome): Text {
  const { run, reconciliation, recorded } = outcome;
  const where = outcome.drill
    ? `Scratch DB:  ${outcome.target} on ${outcome.server} (PostgreSQL ${outcome.serverVersion}; dropped)`
    : `Target:      ${outcome.target} on ${outcome.server} (${outcome.targetAction})`;
  const skipped = run.skippedSettings;
  const newer = `pg_restore is newer than the server, which lacks ${skipped.length === 1 ? 'it' : 'them'}`;
  const session = Object.entries(run.settings).map(([name, value]) => `${name}=${value}`);
  const matched = reconciliation?.filter((r) => r.ok).length;
  const lines = [
    outcome.drill ? '✓ Restore test passed' : '✓ Restore completed',
    '',
    `File:        ${displayPath(outcome.filePath)}`,
    ...(outcome.forcedPast ? [`Verified:    ✗ ${outcome.forcedPast} (restored anyway: --force)`] : []),
    where,
    `Restored in: ${(outcome.durationMs / 1000).toFixed(1)} s (pg_restore --jobs ${run.jobs})`,
    `Session:     ${session.join(', ')}`,
    ...(skipped.length > 0 ? [`Skipped:     SET ${skipped.join(', ')}: ${newer} (restored with one job)`] : []),
    reconciliation
      ? `Tables:      ${matched} of ${reconciliation.length} match the backup's row counts`
      : 'Tables:      not reconciled: the backup has no valid metadata',
    ...(recorded ? [`Recorded:    ${recordedText(recorded)}`] : []),
    ...(reconciliation ? ['', ...reconciliationLines(reconciliation)] : []),
  ];
  return { out: lines, err: [] };
}

// ─── Output: secrets (masking) ───────────────────────────────────────────────────────────

/**
 * SQL read left to right, so that a quote inside one never opens another: line comments, quoted
 * names ("…"), string literals (E'…' with backslash escapes, '…', $tag$…$tag$, a tag of any letters);
 * block comments, which nest, are read by blockCommentEnd. Open to the end when the text was cut short.
 */
const SQL_TOKEN = new RegExp(
  [
    /--[^\n]*/,
    /"(?:[^"]|"")*"?/,
    /(?<![\w$])[Ee]'(?:[^'\\]|''|\\[\s\S])*'?/,
    /'(?:[^']|'')*'?/,
    /\$([A-Za-z_\u0080-\uffff][\w\u0080-\uffff]*)?\$[\s\S]*?(?:\$\1\$|$)/,
  ]
    .map((part) => part.source)
    .join('|'),
  'y',
);
/** A numeric constant (an id, a card number): 42, -2.5e3's 2.5e3, .5, 0x1F, 1_000; never a name's digits or $1. */
const SQL_NUMBER =
  /(?<![\w$\u0080-\uffff])(?:0[xXoObB][\da-fA-F_]+|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?)/y;
/** SET name = value, SET LOCAL name TO value: a setting's value (an API key, say) need not be quoted. */
const SET_VALUE =
  /(\bSET\s+(?:SESSION\s+|LOCAL\s+)?[\w.]+\s*(?:=|\bTO\b)\s*)(?:"(?:[^"]|"")*"?|[^\s;,'"()]+(?![\w']))/gi;

/** Pure: where the block comment that opens at `from` ends, nesting as in PostgreSQL; the text's end if open. */
function blockCommentEnd(text: string, from: number): number {
  let depth = 0;
  for (let i = from; i < text.length; i++) {
    if (text.startsWith('/*', i)) depth++;
    else if (text.startsWith('*/', i)) depth--;
    else continue;
    i++; // past the pair's second character
    if (depth === 0) return i + 1;
  }
  return text.length;
}

/**
 * Pure: another session's query as a message quotes it: on one line (its line breaks would forge
 * lines of ours), every literal (numbers too), comment and setting value masked, as any may carry a secret (a
 * PASSWORD, a key, a connection string) or personal data. What it does and to which tables stays readable.
 */
export function foreignQuery(query: string): string {
  const mask = (token: string, tag = '') => {
    if (token.startsWith('"')) return token;
    if (token.startsWith('--')) return '-- ****';
    return token.startsWith('$') ? `$${tag}$****$${tag}$` : `${/^[Ee]/.test(token) ? 'E' : ''}'****'`;
  };
  let read = '';
  for (let i = 0; i < query.length;) {
    if (query.startsWith('/*', i)) {
      [read, i] = [`${read}/* **** */`, blockCommentEnd(query, i)];
      continue;
    }
    SQL_TOKEN.lastIndex = SQL_NUMBER.lastIndex = i;
    const token = SQL_TOKEN.exec(query);
    if (token) [read, i] = [read + mask(token[0], token[1]), tokenEnd(query, token[0], SQL_TOKEN.lastIndex)];
    else if (SQL_NUMBER.test(query)) [read, i] = [`${read}****`, SQL_NUMBER.lastIndex];
    else [read, i] = [read + query[i], i + 1];
  }
  return read.replace(SET_VALUE, '$1****').replace(/\s+/g, ' ');
}

/**
 * Pure: where masking a token read up to `end` stops. A plain '…' holding a backslash ends at \' only when
 * the session has standard_conforming_strings off: it is masked to the query's last quote, which covers both.
 */
function tokenEnd(query: string, token: string, end: number): number {
  return /^'[\s\S]*\\/.test(token) ? Math.max(end, query.lastIndexOf("'") + 1) : end;
}

/** A line that pg_restore, pg_dump or the server began: a message of theirs, or a field of one (DETAIL:, HINT:). */
const TOOL_LINE = /^(?:pg_\w+: |[A-Z]+: {2})/;
/** Where pg_restore and pg_dump quote the SQL that failed: to the next line of their own outside it. */
const QUOTED_SQL = /^(?:pg_\w+: detail: )?(?:Command|Query) was: /;

/** Pure: where SQL quoted from `from` ends: at the first line of the tool's own outside a literal, comment or name. */
function quotedSqlEnd(text: string, from: number): number {
  for (let i = from; i < text.length;) {
    if (text[i] === '\n' && /^pg_\w+: /.test(text.slice(i + 1, i + 40))) return i;
    if (text.startsWith('/*', i)) {
      i = blockCommentEnd(text, i);
      continue;
    }
    SQL_TOKEN.lastIndex = i;
    i = SQL_TOKEN.exec(text) ? SQL_TOKEN.lastIndex : i + 1;
  }
  return text.length;
}

/**
 * Pure: pg_restore's or pg_dump's stderr as a message quotes it. The SQL it quotes goes through
 * foreignQuery (a user mapping's password, a subscription's connection string), the row data the
 * server quotes is masked (withoutRowData: personal data, tokens), and the position of an error (LINE,
 * ^) is left out: it would quote the SQL unmasked. The tool's lines stay its own; a line it did not
 * begin (a name's or a value's line break) is joined to the one before, as \n, so that none starts a line.
 */
export function toolMessage(stderr: string): string {
  const fields: string[] = [];
  for (let i = 0, end = 0; i < stderr.length; i = end + 1) {
    const quoted = QUOTED_SQL.exec(stderr.slice(i, i + 60))?.[0];
    end = quoted ? quotedSqlEnd(stderr, i + quoted.length) : lineEnd(stderr, i);
    const line = stderr.slice(i, end);
    if (quoted) fields.push(quoted + foreignQuery(line.slice(quoted.length)).trim());
    else if (/^LINE \d+: |^\s*\^$/.test(line)) continue;
    else if (fields.length > 0 && !TOOL_LINE.test(line)) fields[fields.length - 1] += `\n${line}`;
    else fields.push(line);
  }
  const masked = fields.map((field, at) =>
    withoutRowData(aboutCopiedRow(fields, at) ? withoutCopiedValue(field) : field),
  );
  return masked.map((field) => field.split('\n').join('\\n')).join('\n');
}

/** Pure: whether fields[at] is about a row COPY read: in its own words, or by its message's CONTEXT. */
function aboutCopiedRow(fields: string[], at: number): boolean {
  if (fields[at]!.includes('COPY failed for table ')) return true;
  for (let i = at + 1; i < fields.length && !/^pg_\w+: /.test(fields[i]!); i++)
    if (fields[i]!.startsWith('CONTEXT:  ') && COPY_ROW.test(fields[i]!)) return true;
  return false;
}

/** How the server's errors that quote the value COPY read begin: the value last, after the type named. */
const COPIED_VALUE_ERRORS = [
  'invalid input syntax for type ',
  'invalid input value for enum ',
  'malformed ',
  'date/time field value out of range',
]
  .map(escapeRegExp)
  .join('|');
const COPIED_VALUE = new RegExp(String.raw`(ERROR: {2}(?:${COPIED_VALUE_ERRORS})[\s\S]*?: ")[\s\S]*`);
/** value "…" is out of range for type X: the value inside, the type after it. */
const OUT_OF_RANGE = /(ERROR: {2}value ")[\s\S]*(" is out of range for type )/;

/** A json or jsonb value's own context, before COPY's: the text up to the error. */
const JSON_CONTEXT = /^(CONTEXT: {2}JSON data, line \d+: )[\s\S]*?(\nCOPY )/;

/**
 * Pure: a field of a COPY failure with the row's value it quotes masked: in the ERROR (to the field's end;
 * the type stays), and in any DETAIL but a key's or a failing row's (masked after, by withoutRowData): a
 * type's input quotes the value there in its own words (json's Token "…", xml's tags).
 */
function withoutCopiedValue(field: string): string {
  if (field.startsWith('DETAIL:  ') && !KEY_ROW.test(field) && !FAILING_ROW.test(field)) return 'DETAIL:  ****';
  return field.replace(COPIED_VALUE, '$1****"').replace(OUT_OF_RANGE, '$1****$2');
}

/** COPY's line, or a column's value, in any line of CONTEXT: the outermost context, so the field's last. */
const COPY_ROW = /((?:^CONTEXT: {2}|\n)COPY [\s\S]*?, line \d+(?:, column [\s\S]*?)?: ")[\s\S]*/;
/** A failing row, or its partition key's values (after the columns). */
const FAILING_ROW =
  /^(DETAIL: {2}(?:Failing row contains|Partition key of the failing row contains \([\s\S]*?\) =) \()[\s\S]*/;
/** How a key's DETAIL (unique, foreign or exclusion key) goes on after its values. */
const KEY_ENDING = [
  'already exists',
  'is duplicated',
  'is not present in table "',
  'is still referenced from table "',
  'conflicts with key (',
  'conflicts with existing key (',
]
  .map(escapeRegExp)
  .join('|');
/** Key (columns)=(values) and its ending: the last one, as a value may hold one too. */
const KEY_ROW = new RegExp(String.raw`^(DETAIL: {2}Key \(([\s\S]*?)\)=\()(?:[\s\S]*(\) (?:${KEY_ENDING})))?([\s\S]*)`);

/**
 * Pure: one field of a server's message (DETAIL:, CONTEXT:, with the lines a value broke it into) with the
 * row values it quotes masked; the columns and tables it names stay, as they say where to look. A value
 * may hold any text (")", line breaks), so each is masked to the field's end or to the last ending of its message.
 */
function withoutRowData(field: string): string {
  if (field.startsWith('CONTEXT:  ')) return field.replace(COPY_ROW, '$1****"').replace(JSON_CONTEXT, '$1****$2');
  const key = KEY_ROW.exec(field);
  if (!key) return field.replace(FAILING_ROW, '$1****).');
  const [, kept, columns, ending, rest] = key;
  if (!ending) return `${kept}****)`;
  return `${kept}****${ending}${ending.endsWith('(') ? `${columns})=(****).` : rest}`;
}

/** Pure: where the line that begins at `from` ends (its newline, or the text's end). */
function lineEnd(text: string, from: number): number {
  const newline = text.indexOf('\n', from);
  return newline < 0 ? text.length : newline;
}

/** Every password the configuration could hold, so no message can ever print one. */
export function secretsIn(vars: EnvVars): string[] {
  const secrets: string[] = [];
  for (const [name, { value }] of vars) {
    if (/PASSWORD$/.test(name)) secrets.push(value);
    if (/DATABASE_URL$/.test(name)) {
      // All between "user:" and the last '@': a password with an unencoded '@' or '/' in it, whole.
      const raw = /^[a-z][\w+.-]*:\/\/[^:@/]*:(.*)@/is.exec(value.trim())?.[1];
      if (raw) secrets.push(raw);
      try {
        // As written (percent-encoded) and as meant, whether in the authority or as ?password=.
        const written = new URL(value).password;
        const { password } = parseLibpqUrl(value);
        secrets.push(...[written, password].filter((p): p is string => Boolean(p)));
      } catch {
        // Not a URL; nothing to mask beyond the URL pattern maskSecrets already covers.
      }
    }
  }
  return [...new Set(secrets)];
}

/**
 * Pure: `text` with every occurrence of each secret (the longest first) and any URL's password
 * replaced by ****. A secret of under 4 characters (a password cut short by an unquoted '#') is
 * masked where it stands alone, not inside every word that happens to contain it.
 */
export function maskSecrets(text: string, secrets: readonly string[], kept: readonly string[] = []): string {
  // The secrets first: one that is a whole URL (a webhook's) is masked whole, before a URL pattern cuts into it.
  return maskSecretsOnly(text, secrets, kept)
    .replace(/([a-z][\w+.-]*:\/\/[^:@/\s]*:)[^@\s]*@/gi, '$1****@')
    .replace(/([?&]password=)[^&\s]*/gi, '$1****');
}

function maskSecretsOnly(text: string, secrets: readonly string[], kept: readonly string[]): string {
  // A secret inside a kept value (a path, a name) is masked only outside such values; any other
  // secret everywhere first, so that one holding a kept value is still masked whole.
  const holdsSecret = (value: string) => secrets.some((secret) => secret && value.includes(secret));
  const order = kept.filter((value) => value && holdsSecret(value)).sort((a, b) => b.length - a.length);
  if (order.length === 0) return maskEach(text, secrets);
  const inKept = (secret: string) => order.some((value) => value.includes(secret));
  const elsewhere = secrets.filter((secret) => !inKept(secret));
  // Split on the kept values (captured: at the odd indexes), and mask the rest between them.
  const parts = maskEach(text, elsewhere).split(new RegExp(`(${order.map(escapeRegExp).join('|')})`));
  return parts.map((part, i) => (i % 2 === 1 ? part : maskEach(part, secrets.filter(inKept)))).join('');
}

/** Pure: a secret as shellWord writes it inside a quoted word (hints are commands to paste), or itself. */
function shellQuotedForm(secret: string): string {
  const word = shellWord(secret);
  return word.startsWith("$'") ? word.slice(2, -1) : word.startsWith("'") ? word.slice(1, -1) : word;
}

function maskEach(text: string, secrets: readonly string[]): string {
  let masked = text;
  for (const secret of [...secrets].sort((a, b) => b.length - a.length)) {
    const quoted = shellQuotedForm(secret);
    // Quoted, a short one ("a'b") is long and distinct enough to be masked anywhere, as a long one is.
    if (quoted !== secret && quoted.length >= 4) masked = masked.split(quoted).join('****');
    if (secret.length >= 4) masked = masked.split(secret).join('****');
    else if (secret)
      masked = masked.replace(new RegExp(`(?<![\\p{L}\\p{N}])${escapeRegExp(secret)}(?![\\p{L}\\p{N}])`, 'gu'), '****');
  }
  return masked;
}

/**
 * The tool's own words, by the field that holds them: a password that is one of them ("failure",
 * "dev") must not change what a run reports, nor what is decided from it (notify, ping /fail,
 * --on-failure, metrics, a warning printed as one). Any other value in these fields is masked.
 */
const OWN_WORDS = new Map<string, readonly string[]>([
  ['command', ['backup', 'prune', 'verify', 'list', 'restore', 'drill', 'check'] satisfies CommandName[]],
  ['outcome', ['success', 'failure'] satisfies RunRecord['outcome'][]],
  ['environment', ['dev', 'prod'] satisfies Environment[]],
  ['status', Object.keys(STATUS_LABELS)],
  ['status_label', Object.values(STATUS_LABELS)],
  ['target_action', ['created', 'replaced', 'used empty', 'created and dropped', LEFT_BEHIND]],
  ['format', ['custom', 'directory'] satisfies DumpFormat[]],
  ['level', ['failure', 'warning'] satisfies Problem['level'][]],
]);
/**
 * Values the tool makes or reads (times, checksums, cluster ids, versions, compression), kept when in their
 * field and form: a short numeric password ("2026") would otherwise turn every timestamp in --json and the
 * log into "****-11-24…", and "15" pg_dump_version into "****.20".
 */
const ISO_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{3})?Z$/;
const OWN_FORMATS = new Map<string, RegExp>([
  ...['time', 'timestamp', 'backup_timestamp', 'started_at', 'for'].map((field) => [field, ISO_TIME] as const),
  ['checksum_sha256', /^[0-9a-f]{64}$/i],
  ['system_identifier', /^\d+$/],
  ...['pg_dump_version', 'postgresql_version', 'server_version', 'tool_version', 'version'].map(
    (field) => [field, /^\d+(?:\.\d+)*(?:[a-z]+\d*)?(?:-[\w.]+)?$/i] as const,
  ),
  ['compression', /^(?:none|(?:gzip|zstd|lz4)(?::\d{1,2})?)$/],
]);
/** Maps keyed by table names: their keys are names, masked like any. */
const NAME_MAPS = new Set(['table_counts', 'table_data_oids']);
/** The form of the tool's own field names ("backup_file"); a key of another form came from data. */
const FIELD_NAME = /^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$/;

/**
 * Pure: `value` with every secret masked in its text at any depth, but not in the tool's own
 * field names and words (OWN_WORDS). Every channel (terminal, --json, log, webhook, failure
 * command) redacts its structured data with this before serialising it: masked after serialising,
 * a secret with a quote or backslash in it would be escaped (\" or \\) and no longer match.
 */
export function redact<T>(value: T, secrets: readonly string[], kept: readonly string[] = []): T {
  const mask = (text: string) => maskSecrets(text, secrets, kept);
  const walk = (node: unknown, field = ''): unknown => {
    if (typeof node === 'string')
      return OWN_WORDS.get(field)?.includes(node) || OWN_FORMATS.get(field)?.test(node) ? node : mask(node);
    if (Array.isArray(node)) return node.map((item) => walk(item, field));
    if (node !== null && typeof node === 'object' && [Object.prototype, null].includes(Object.getPrototypeOf(node))) {
      const names = NAME_MAPS.has(field);
      return Object.fromEntries(
        Object.entries(node).map(([key, inner]) =>
          names || !FIELD_NAME.test(key) ? [mask(key), walk(inner)] : [key, walk(inner, key)],
        ),
      );
    }
    return node;
  };
  return walk(value) as T;
}

// ─── Output: problems and documents (--json), printing ───────────────────────────────────

/**
 * A failure or a warning as every channel reports it (terminal, --json, log, webhook, failure
 * command, heartbeat). Built once from what went wrong, with every secret masked once; each
 * channel only renders it.
 */
export interface Problem
  extends Pick<BackupError, 'exitCode' | 'details' | 'hints'>, Required<Pick<BackupError['extra'], 'report' | 'data'>> {
  level: 'failure' | 'warning';
  /** What failed, and how: "Backup failed: Database authentication failed". */
  headline: string;
  /** The `error` of documents and records: the title, or the headline when a step other than the command failed. */
  error: string;
}

/** Pure: a failure of `operation` (or of the step it names) as a Problem, secrets masked. */
export function failureProblem(
  error: BackupError,
  operation: string,
  secrets: readonly string[],
  kept: readonly string[] = [],
): Problem {
  const { title, details, hints, exitCode } = error;
  const { step, report = [], data = {} } = error.extra;
  const headline = `${step ?? operation} failed: ${title}`;
  return redact<Problem>(
    { level: 'failure', exitCode, headline, error: step ? headline : title, details, hints, report, data },
    secrets,
    kept,
  );
}

/** Pure: something that went wrong without failing the run, secrets masked. */
export function warningProblem(headline: string, details: string, secrets: readonly string[]): Problem {
  return redact(
    { level: 'warning', exitCode: EXIT.OK, headline, error: headline, details, hints: [], report: [], data: {} },
    secrets,
  );
}

/** Pure: the contract's error text (what failed, the report, the tool's message, numbered steps), or a warning. */
export function problemLines(problem: Problem): string[] {
  // A tool's message of several lines stays several lines (each printed as one).
  if (problem.level === 'warning') return `⚠ ${problem.headline}: ${problem.details}`.split(/\r?\n/);
  const lines = [`✗ ${problem.headline}`, ''];
  if (problem.report.length > 0) lines.push(...problem.report, '');
  lines.push(...`Error: ${problem.details}`.split(/\r?\n/));
  if (problem.hints.length > 0)
    lines.push('', 'Troubleshooting:', ...problem.hints.map((hint, i) => `  ${i + 1}. ${hint}`));
  return lines;
}

/** Pure: a problem in a --json document. */
export function problemDocument(problem: Problem): Record<string, unknown> {
  const { data, exitCode, error, details, hints } = problem;
  return { ...data, exit_code: exitCode, error, details, hints };
}

// --json: one document on stdout per run, for cron wrappers and monitoring.

function backupDocument(result: BackupResult): Record<string, unknown> {
  return {
    backup_file: result.dumpPath,
    metadata_file: result.metadataPath,
    metadata: result.metadata,
    checks: result.checks,
    removed_stale_files: result.removedStaleFiles,
    stale_files_left: result.staleFilesLeft,
    retention: result.retention ? retentionDocument(result.retention) : null,
    ...(result.retentionError
      ? { retention_error: problemDocument(failureProblem(result.retentionError, 'Retention', [])) }
      : {}),
  };
}

function verifyDocument(result: VerifyResult): Record<string, unknown> {
  return {
    file: result.filePath,
    metadata_file: result.metadataPath,
    actual: {
      checksum_sha256: result.inspection.sha256,
      size_bytes: result.inspection.size,
      tables_without_data: result.inspection.missingTables,
    },
    checks: result.inspection.checks,
    metadata: result.metadata,
  };
}

function listingDocument(listing: Listing): Record<string, unknown> {
  const entry = (e: ListEntry) => ({
    file: e.file,
    status: e.status,
    status_label: STATUS_LABELS[e.status],
    timestamp: e.timestamp ?? null,
    environment: e.environment ?? null,
    database: e.database ?? null,
    size_bytes: e.sizeBytes,
    problems: e.problems,
    last_restore_test: e.restoreTest ?? null,
  });
  return {
    directory: listing.directory,
    exists: listing.exists,
    full_check: listing.fullCheck,
    backups: listing.backups.map(entry),
    incomplete: listing.incomplete.map(entry),
  };
}

function retentionDocument(report: RetentionReport): Record<string, unknown> {
  return {
    policy: report.policy,
    time_zone: report.timeZone,
    dry_run: report.dryRun,
    decisions: report.decisions.map((d) => ({
      file: d.item.file,
      timestamp: d.item.timestamp,
      keep: d.keep,
      reasons: d.reasons,
    })),
    deleted: report.deleted,
    freed_bytes: report.freedBytes,
    left_alone: report.leftAlone,
  };
}

function restoreDocument(outcome: RestoreOutcome): Record<string, unknown> {
  const { run, recorded } = outcome;
  return {
    file: outcome.filePath,
    drill: outcome.drill,
    target_database: outcome.target,
    server: outcome.server,
    server_version: outcome.serverVersion,
    target_action: outcome.drill ? 'created and dropped' : outcome.targetAction,
    duration_ms: outcome.durationMs,
    jobs: run.jobs,
    session_settings: run.settings,
    skipped_settings: run.skippedSettings,
    forced_past: outcome.forcedPast ?? null,
    reconciliation: outcome.reconciliation ?? null,
    metadata_file: recorded?.metadataPath ?? null,
    last_restore_test: recorded && !recorded.notRecorded ? recorded.record : null,
    ...(recorded?.notRecorded ? { not_recorded: recorded.notRecorded } : {}),
  };
}

/** Where a run prints: one call per block of text, as console.log and console.error would print it. */
export type Io = Record<'out' | 'err', (text: string) => void>;
const CONSOLE: Io = { out: (text) => console.log(text), err: (text) => console.error(text) };

/**
 * Print a run's human text or its --json document: a result, masked here before it is serialised
 * or painted, or the run's problem, masked when it was built.
 */
function printOutcome(
  io: Io,
  json: boolean,
  { command, exitCode, result }: Outcome,
  { secrets, named }: { secrets: readonly string[]; named: readonly string[] },
  problem?: Problem,
): void {
  const kept = [...named, ...(result ? keptValues(result.document, secrets) : [])];
  if (json) {
    // A run that did its job and still failed (a listing with bad backups, a retention that failed after
    // the backup) has the failure's fields too, where every failed run's document has them.
    const failure = problem ? problemDocument({ ...problem, data: {} }) : {};
    const document = result ? { ...redact(result.document, secrets, kept), ...failure } : problemDocument(problem!);
    io.out(JSON.stringify({ ok: exitCode === EXIT.OK, command, ...document }, null, 2));
    return;
  }
  const { out: outLines, err: errLines } = result
    ? redact(result.text(), secrets, kept)
    : { out: [], err: problemLines(problem!) };
  if (outLines.length > 0) io.out(outLines.map((line) => paint(visibleControls(line), out)).join('\n'));
  if (errLines.length > 0) io.err(errLines.map((line, i) => paintErrorLine(visibleControls(line), i)).join('\n'));
}

/** Fields the tool fills itself (paths, file, database and table names, checksums): not free text. */
const STRUCTURED_FIELDS = new Set([
  ...['backup_file', 'metadata_file', 'file', 'directory', 'database', 'database_name', 'checksum_sha256'],
  ...['deleted', 'removed_stale_files'],
]);

/**
 * Pure: the structured values of a result document, as written and as displayed, that hold a
 * secret (a password that is a common word, or the database's name): masking them would corrupt
 * paths and names, and give away what the password is.
 */
export function keptValues(document: unknown, secrets: readonly string[]): string[] {
  const found = new Set<string>();
  const walk = (node: unknown, field?: string): void => {
    if (Array.isArray(node)) return node.forEach((item) => walk(item, field));
    if (typeof node === 'string' && field && STRUCTURED_FIELDS.has(field))
      [node, path.basename(node), displayPath(node)].forEach((value) => found.add(value));
    if (node === null || typeof node !== 'object') return;
    for (const [key, value] of Object.entries(node)) {
      if (key === 'table_counts' && value && typeof value === 'object')
        Object.keys(value).forEach((name) => found.add(name));
      walk(value, key);
    }
  };
  walk(document);
  return [...found].filter((value) => secrets.some((secret) => secret && value.includes(secret)));
}

/**
 * Pure: a line for the terminal with its control characters (C0, DEL, C1) shown as escapes: names
 * from a database, a metadata file or a file name must not clear the screen, retitle the window,
 * write the clipboard or forge lines. Applied before our own colours; our lines are one per item.
 */
export function visibleControls(line: string): string {
  const named: Record<string, string> = { '\n': '\\n', '\r': '\\r', '\t': '\\t' };
  return line.replace(/[\u0000-\u001f\u007f-\u009f]/g, (char) => named[char] ?? hexByte(char.charCodeAt(0)));
}

/** The first line of an error is its title, in red; a warning is yellow. */
function paintErrorLine(line: string, index: number): string {
  if (index === 0 && line.startsWith('✗')) return err.red(line);
  return line.startsWith('⚠') ? err.yellow(line) : paint(line, err);
}

/** A warning on stderr, in yellow. */
function printWarning(io: Io, warning: Problem): void {
  const lines = problemLines(warning).map((line) => err.yellow(visibleControls(line)));
  io.err(lines.join('\n'));
}

// ─── CLI: modes and settings ────────────────────────────────────────────────────────────

/** The command line as commander parses it: a flag is true or absent, a value is what its parser returned. */
type CliOptions = {
  env: Environment | 'auto';
  configDir: string;
  connectTimeout: number;
  lockWaitTimeout: number;
  jobs: number;
  /** Those of the options with a default that the command line gave. */
  given?: ReadonlySet<Defaulted>;
  verify?: string | true;
} & Partial<Record<CliFlag, true> & Record<CliPath | CliText, string> & Record<CliNumber, number>>;
/** The options with a default value: whether one was given, its value cannot say. */
const DEFAULTED = { jobs: true, connectTimeout: true, lockWaitTimeout: true } as const;
type Defaulted = keyof typeof DEFAULTED;
type CliFlag = 'list' | 'prune' | 'check' | 'json' | 'dryRun' | 'notifyOnSuccess' | 'restoreTest' | RestoreFlag;
type RestoreFlag = 'clean' | 'force' | 'iKnowThisIsProd';
type CliPath = 'outputDir' | 'logFile' | 'metricsFile' | 'pgBinDir' | 'restore';
type CliText = 'compress' | 'notifyUrl' | 'pingUrl' | 'onFailure' | 'targetDb';
type CliNumber =
  'keepLast' | 'keepDaily' | 'keepWeekly' | 'keepMonthly' | 'maintenanceWorkMem' | 'maxAge' | 'stallTimeout';

type CommandName = 'backup' | 'prune' | 'verify' | 'list' | 'restore' | 'drill' | 'check';
export type Mode =
  | { command: 'backup' }
  | { command: 'prune' }
  | { command: 'check'; fullCheck: boolean }
  | { command: 'verify'; file: string }
  | { command: 'list'; fullCheck: boolean }
  | { command: 'restore'; file: string; target: string }
  | { command: 'drill'; file: string };

/** Pure: what the options ask for. `--verify` takes a FILE, except after --list: "re-read every file". */
export function chooseMode(opts: Partial<CliOptions>): Mode {
  const mode = modeOf(opts);
  // Ignored elsewhere, in silence: a --verify given --metrics-file would never update it.
  const given = (option: keyof CliOptions) =>
    option in DEFAULTED ? opts.given?.has(option as Defaulted) : opts[option] !== undefined;
  const [misplaced, use] = Object.entries(OPTION_COMMANDS).find(
    ([option, { by }]) => given(option as keyof CliOptions) && !by.includes(mode.command),
  ) ?? [undefined, { by: [] }];
  if (misplaced) {
    const words = use.by.map((command) => COMMAND_WORDS[command]);
    const these = words.length > 1 ? `${words.slice(0, -1).join(', ')} or ${words.at(-1)}` : words[0];
    throw configError(`--${kebab(misplaced)} only applies to ${these}`, [
      use.hint ??
        'Drop it from this command: it reads no such setting (a BACKUP_* variable in .env is read where it applies)',
    ]);
  }
  return mode;
}

const RESTORE_ONLY_OPTIONS = ['targetDb', 'clean', 'force', 'iKnowThisIsProd'] as const;
const RETENTION_OPTIONS = ['keepLast', 'keepDaily', 'keepWeekly', 'keepMonthly', 'dryRun'] as const;

/** The options only some commands read, and how to use one where it applies. */
const OPTION_COMMANDS: Partial<Record<keyof CliOptions, { by: readonly CommandName[]; hint?: string }>> = {
  // A --dry-run ignored elsewhere would not stop a --clean restore. BACKUP_KEEP_* are not options: never refused.
  ...Object.fromEntries(
    RETENTION_OPTIONS.map((option) => [
      option,
      {
        by: ['backup', 'prune'],
        hint: 'Retention runs after each backup, or alone: --prune --keep-daily 7 [--dry-run]',
      },
    ]),
  ),
  maintenanceWorkMem: {
    by: ['restore', 'drill'],
    hint: 'For example: --restore FILE --target-db NAME --maintenance-work-mem 512MB',
  },
  compress: { by: ['backup'] },
  stallTimeout: { by: ['backup'] },
  pingUrl: { by: ['backup'] },
  metricsFile: { by: ['backup'] },
  jobs: { by: ['backup', 'restore', 'drill'] },
  connectTimeout: { by: ['backup', 'prune', 'restore', 'drill'] },
  lockWaitTimeout: { by: ['backup', 'restore'] },
};
const COMMAND_WORDS: Record<CommandName, string> = {
  backup: 'a backup',
  prune: '--prune',
  restore: '--restore FILE',
  drill: '--verify FILE --restore-test',
  verify: '--verify FILE',
  list: '--list',
  check: '--check',
};

function modeOf(opts: Partial<CliOptions>): Mode {
  if (opts.check) {
    if (opts.restore !== undefined || opts.list || opts.prune || opts.restoreTest || typeof opts.verify === 'string') {
      throw configError('--check goes alone, or with --verify to re-read the newest backup', [
        'Check freshness: --check --max-age 26h [--verify]',
      ]);
    }
    return { command: 'check', fullCheck: opts.verify === true };
  }
  // A monitoring command that lost its --check would otherwise take a backup at every poll.
  if (opts.maxAge !== undefined)
    throw configError('--max-age only applies to --check', ['Check freshness: --check --max-age 26h [--verify]']);
  if (opts.restore !== undefined) return chooseRestore(opts);
  const onlyForRestore = RESTORE_ONLY_OPTIONS.find((option) => opts[option] !== undefined);
  if (onlyForRestore)
    throw configError(`--${kebab(onlyForRestore)} only applies to --restore FILE`, [
      'For example: --restore FILE --target-db NAME [--clean]',
    ]);
  if (opts.prune && (opts.list || opts.verify !== undefined)) {
    throw configError('--prune cannot be combined with --list or --verify', [
      'Prune alone: --prune --keep-daily 7 [--dry-run]',
      'Then list: --list',
    ]);
  }
  if (opts.restoreTest) {
    if (typeof opts.verify !== 'string' || opts.verify.trim() === '' || opts.list) {
      throw configError('--restore-test goes with --verify FILE', [
        'Run the drill: --verify db/backups/<file>.dump --restore-test',
      ]);
    }
    return { command: 'drill', file: opts.verify };
  }
  if (opts.prune) return { command: 'prune' };
  if (opts.list) {
    if (typeof opts.verify === 'string') {
      throw configError(`--list --verify takes no FILE (got "${opts.verify}")`, [
        'Verify one file: --verify FILE',
        'Verify every backup in a directory: --list --verify [--output-dir DIR]',
      ]);
    }
    return { command: 'list', fullCheck: opts.verify === true };
  }
  if (opts.verify === true || opts.verify?.trim() === '') {
    throw configError('--verify needs the backup FILE to check', [
      'For example: --verify db/backups/<database>_<env>_<timestamp>.dump',
      'Or check every backup: --list --verify',
    ]);
  }
  return opts.verify === undefined ? { command: 'backup' } : { command: 'verify', file: opts.verify };
}

function chooseRestore(opts: Partial<CliOptions>): Mode {
  if (opts.list || opts.prune || opts.verify !== undefined || opts.restoreTest) {
    throw configError('--restore cannot be combined with --list, --prune, --verify or --restore-test', [
      'Restore: --restore FILE --target-db NAME',
      'It verifies FILE first on its own',
    ]);
  }
  if (opts.restore!.trim() === '')
    throw configError('--restore needs the backup FILE', [
      'For example: --restore db/backups/<file>.dump --target-db NAME',
    ]);
  if (opts.targetDb === undefined) {
    throw configError('--restore needs --target-db NAME, the database to restore into', [
      'A new name is created; an existing empty database is used; a non-empty one needs --clean',
    ]);
  }
  return { command: 'restore', file: opts.restore!, target: opts.targetDb };
}

const kebab = (name: string) => name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);

/** PostgreSQL's timeouts (lock_timeout, statement_timeout) are ints of milliseconds: about 24.8 days. */
export const MAX_TIMEOUT_MS = 2_147_483_647;
const DURATION_UNITS = { ms: 1, s: 1000, min: 60_000, h: 3_600_000, d: 86_400_000 } as const;

/**
 * Pure: "30s", "500ms", "2min", "1h", "7d", or a bare number of seconds → milliseconds, at most
 * `maxMs`. 0 means no limit. A value beyond the limit is refused here, not by the server later.
 */
export function parseDuration(value: string, maxMs = MAX_TIMEOUT_MS): number {
  const ms = durationMs(value);
  if (!(ms >= 0 && ms <= maxMs)) {
    throw new InvalidArgumentError(
      `Use a duration such as 500ms, 30s, 2min, 1h or 2d, up to ${formatDuration(maxMs)} (0: no limit).`,
    );
  }
  return ms;
}

/**
 * Pure: a duration's milliseconds, NaN if it is none. Only 0 means "no limit", so a value under 1 ms is
 * 1 ms, never 0: rounding up keeps every value that parsed before and its meaning, a limit. (Math.ceil
 * throughout would not do: 1.1 * 1000 is 1100.0000000000002 in floating point.)
 */
function durationMs(value: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h|d)?\s*$/.exec(value);
  if (!match) return NaN;
  const ms = Number(match[1]) * DURATION_UNITS[(match[2] ?? 's') as keyof typeof DURATION_UNITS];
  return ms > 0 ? Math.max(1, Math.round(ms)) : 0;
}

/** Pure: milliseconds as the largest whole unit that fits, e.g. "24 d", "90 s". */
export function formatDuration(ms: number): string {
  const [unit, size] = (Object.entries(DURATION_UNITS) as Array<[string, number]>)
    .reverse()
    .find(([, size]) => ms >= size) ?? ['ms', 1];
  return `${Math.floor(ms / size)} ${unit}`;
}

/**
 * Pure: a timeout option or variable, at most MAX_TIMEOUT_MS. One argument only: commander passes
 * the previous value too, which parseDuration would take for its limit.
 */
const parseTimeout = (value: string) => parseDuration(value);

/** Pure: --max-age, a duration above 0 (0 is no limit elsewhere, but not here) of up to a year and a bit. */
export function parseMaxAge(value: string): number {
  const [ms, maxMs] = [durationMs(value), 400 * DURATION_UNITS.d];
  // Backups are named (and aged) in whole seconds: a shorter age could never be told, nor reported.
  if (!(ms >= DURATION_UNITS.s && ms <= maxMs))
    throw new InvalidArgumentError(`Use a duration of at least 1s, such as 26h or 8d, up to ${formatDuration(maxMs)}.`);
  return ms;
}

/** Pure: a command-line parser of whole numbers from `min` to `max`. */
function wholeNumberOption(min: number, max: number, explanation: string): (value: string) => number {
  return (value) => {
    const n = wholeNumber(value, min, max);
    if (Number.isNaN(n)) throw new InvalidArgumentError(explanation);
    return n;
  };
}

/** Pure: a positive whole number of seconds, as libpq's connect_timeout takes it. */
export const parseTimeoutSeconds = wholeNumberOption(1, 3600, 'Use a whole number of seconds from 1 to 3600.');
/** Pure: pg_dump workers; more than one means a directory-format archive. */
export const parseJobs = wholeNumberOption(1, 64, 'Use a whole number of workers from 1 to 64.');
/** Pure: how many backups a retention rule keeps. */
export const parseKeepCount = wholeNumberOption(0, 100_000, 'Use a whole number from 0 (rule off) upwards.');

/** Pure: a directory argument; an empty one would silently mean "the default", so refuse it. */
function nonEmptyPath(value: string): string {
  if (value.trim() === '') throw new InvalidArgumentError('The path is empty.');
  if (value.includes('\0')) throw new InvalidArgumentError('The path contains a NUL byte.');
  return expandHome(value);
}

/**
 * Pure: a leading ~ or ~/ as the home directory, as a shell expands it (~user is left alone). No
 * shell reads --output-dir=~/bk, a systemd ExecStart or a .env file: without this, ./~/bk is made.
 */
export function expandHome(value: string): string {
  return value === '~' || value.startsWith('~/') ? path.join(os.homedir(), value.slice(1)) : value;
}

/** Pure: a file argument. A path ending in / names a directory, which path.resolve would quietly turn into a file. */
function filePath(value: string): string {
  const expanded = nonEmptyPath(value);
  if (expanded.endsWith('/')) throw new InvalidArgumentError("The path ends in /: give a file's path.");
  return expanded;
}

/** Pure: a shell command (--on-failure, BACKUP_ON_FAILURE); blank would turn the hook off. Its shell expands ~. */
function nonEmptyCommand(value: string): string {
  nonEmptyPath(value);
  return value;
}

/** Pure: an http(s) URL for --notify-url. Never echoed: webhook URLs carry their credentials. */
function webhookUrl(value: string): string {
  try {
    const url = new URL(value.trim());
    if (url.protocol === 'http:' || url.protocol === 'https:') {
      // fetch refuses a URL with credentials in it: such a URL could never be called.
      if (url.username || url.password)
        throw new InvalidArgumentError(
          'Remove user:password@ (fetch cannot send it); use the token the service puts in the path.',
        );
      return url.toString();
    }
  } catch (error) {
    if (error instanceof InvalidArgumentError) throw error;
    // Reported below, without the value.
  }
  throw new InvalidArgumentError('Use an http:// or https:// URL.');
}

/** Pure: a yes-or-no setting. Any other word is refused: "enabled" read as off would silence what was asked for. */
function asFlag(value: string): boolean {
  if (/^\s*(1|true|yes|on)\s*$/i.test(value)) return true;
  if (/^\s*(0|false|no|off)\s*$/i.test(value)) return false;
  throw new InvalidArgumentError('Use 1, true, yes, on to turn it on, or 0, false, no, off.');
}

export interface Settings {
  retention: RetentionPolicy;
  dryRun: boolean;
  automation: Automation;
  search: ClientSearch;
  restore: RestoreTuning;
  /** --check: how old the newest backup may be. */
  maxAgeMs?: number;
  /** Stop a backup that writes nothing for this long (0: never). */
  stallTimeoutMs: number;
}

/**
 * The variables only some commands read (README, .env.example). They sit in a .env that every command
 * reads, so the others leave them unread: BACKUP_MAX_AGE=0 must not stop the backups.
 */
const READ_ONLY_BY: Readonly<Record<string, readonly CommandName[]>> = {
  BACKUP_MAX_AGE: ['check'],
  BACKUP_MAINTENANCE_WORK_MEM: ['restore', 'drill'],
  BACKUP_STALL_TIMEOUT: ['backup'],
  BACKUP_PING_URL: ['backup'],
  BACKUP_METRICS_FILE: ['backup'],
  ...Object.fromEntries(
    ['LAST', 'DAILY', 'WEEKLY', 'MONTHLY'].map((rule) => [`BACKUP_KEEP_${rule}`, ['backup', 'prune']]),
  ),
};

/**
 * Pure: the settings meant for scheduled runs, each from its option or else its BACKUP_* variable
 * (which, like every setting, may come from the process environment, .env.local or .env), for `command`.
 */
export function resolveSettings(opts: SettingOptions, vars: EnvVars, command: CommandName): Settings {
  const fromVar = settingReader(vars, command);
  const keep = (option: number | undefined, name: string) => option ?? fromVar(name, parseKeepCount) ?? 0;
  const pgBinDir = opts.pgBinDir ?? fromVar('PG_BIN_DIR', nonEmptyPath);
  const maintenanceWorkMemKb = opts.maintenanceWorkMem ?? fromVar('BACKUP_MAINTENANCE_WORK_MEM', parseMemory);
  const maxAgeMs = opts.maxAge ?? fromVar('BACKUP_MAX_AGE', parseMaxAge);
  const stallTimeoutMs = opts.stallTimeout ?? fromVar('BACKUP_STALL_TIMEOUT', parseTimeout);
  // --compress's syntax, before anything is created or connected; whether pg_dump has it, once it is chosen.
  if (command === 'backup') parseCompression(opts.compress, Number.POSITIVE_INFINITY);
  return {
    ...(maxAgeMs !== undefined ? { maxAgeMs } : {}),
    stallTimeoutMs: stallTimeoutMs ?? parseDuration(DEFAULT_STALL_TIMEOUT),
    search: pgBinDir ? { pgBinDir, pgBinDirFrom: opts.pgBinDir ? '--pg-bin-dir' : 'PG_BIN_DIR' } : {},
    // --jobs sets the restore's pg_restore jobs only when given; else one per core.
    restore: {
      ...(opts.given?.has('jobs') ? { jobs: opts.jobs } : {}),
      ...(maintenanceWorkMemKb ? { maintenanceWorkMemKb } : {}),
    },
    retention: {
      last: keep(opts.keepLast, 'BACKUP_KEEP_LAST'),
      daily: keep(opts.keepDaily, 'BACKUP_KEEP_DAILY'),
      weekly: keep(opts.keepWeekly, 'BACKUP_KEEP_WEEKLY'),
      monthly: keep(opts.keepMonthly, 'BACKUP_KEEP_MONTHLY'),
    },
    dryRun: opts.dryRun === true,
    automation: resolveAutomation(opts, fromVar),
  };
}

type SettingOptions = Partial<Omit<CliOptions, 'env' | 'configDir' | 'connectTimeout' | 'lockWaitTimeout'>>;
type SettingReader = <T>(name: string, parse: (value: string) => T) => T | undefined;

/** A variable's parsed value; one that does not parse is a configuration error, or with `lenient` unset. */
function settingReader(vars: EnvVars, command: CommandName, lenient = false): SettingReader {
  return (name, parse) => {
    const found = vars.get(name);
    if (!found || !(READ_ONLY_BY[name]?.includes(command) ?? true)) return undefined;
    try {
      return parse(found.value);
    } catch (error) {
      if (lenient) return undefined;
      const shown = /URL/.test(name) ? '(value hidden)' : `"${found.value}"`;
      throw configError(`${name} (from ${found.source}) is ${shown}: ${errorText(error)}`, [`Fix ${name} or unset it`]);
    }
  };
}

/** Pure: where a run is logged, announced and measured. */
function resolveAutomation(opts: SettingOptions, fromVar: SettingReader): Automation {
  const logFile = opts.logFile ?? fromVar('BACKUP_LOG_FILE', filePath);
  const notifyUrl = opts.notifyUrl ?? fromVar('BACKUP_NOTIFY_URL', webhookUrl);
  const onFailure = opts.onFailure ?? fromVar('BACKUP_ON_FAILURE', nonEmptyCommand);
  const pingUrl = opts.pingUrl ?? fromVar('BACKUP_PING_URL', webhookUrl);
  const metricsFile = opts.metricsFile ?? fromVar('BACKUP_METRICS_FILE', filePath);
  return {
    ...(logFile ? { logFile: path.resolve(logFile) } : {}),
    ...(notifyUrl ? { notifyUrl } : {}),
    notifyOnSuccess: opts.notifyOnSuccess === true || (fromVar('BACKUP_NOTIFY_ON_SUCCESS', asFlag) ?? false),
    ...(onFailure ? { onFailure } : {}),
    ...(pingUrl ? { pingUrl } : {}),
    ...(metricsFile ? { metricsFile: path.resolve(metricsFile) } : {}),
  };
}

// ─── CLI: the command line (commander) ──────────────────────────────────────────────────

/** Options whose values are credentials: never shown, not even in a usage error. */
const CREDENTIAL_OPTIONS = ['--notify-url', '--ping-url'];

/** Pure: the values given on the command line to credential options (`--opt value` or `--opt=value`). */
export function credentialArguments(argv: readonly string[]): string[] {
  const values: string[] = [];
  argv.forEach((arg, i) => {
    for (const option of CREDENTIAL_OPTIONS) {
      if (arg === option && argv[i + 1] !== undefined) values.push(argv[i + 1]!);
      else if (arg.startsWith(`${option}=`)) values.push(arg.slice(option.length + 1));
    }
  });
  return values.filter((value) => value.trim() !== '');
}

/** The command line. Its errors are thrown, not written: main prints them as any other (commandLineError). */
function buildProgram(): Command {
  const keep = (flag: string, what: string) =>
    new Option(`${flag} <n>`, `retention: keep ${what}`).argParser(parseKeepCount);
  return new Command()
    .name('backup_db.ts')
    .description('Back up the dev or prod PostgreSQL database with pg_dump, write checksummed metadata, and verify it.')
    .addOption(
      new Option('--env <env>', 'environment to back up; auto reads ENV_MODE, then DEV_DB_NAME / DB_NAME')
        .choices(['dev', 'prod', 'auto'])
        .default('auto'),
    )
    .option('--output-dir <dir>', 'directory for backups (default: db/backups/ in the project directory)', nonEmptyPath)
    .option(
      '--verify [file]',
      'verify FILE against its metadata (checksum, size, archive structure, table data); after --list, fully ' +
        'verify every backup',
      expandHome,
    )
    .option('--list', 'list the backups in the output directory, newest first')
    .option('--json', 'print one JSON document on stdout instead of text')
    .option(
      '--compress <method>',
      'pg_dump compression: 0-9, gzip:N, or with pg_dump 16+ zstd[:N], lz4[:N] (default: gzip:1, zstd:1 on pg_dump ' +
        '16+)',
    )
    .addOption(
      new Option(
        '--jobs <n>',
        'dump with n parallel pg_dump workers into a directory-format archive; with --restore or --restore-test, n ' +
          'pg_restore jobs (default there: one per core)',
      )
        .argParser(parseJobs)
        .default(1, '1, one custom-format file'),
    )
    .option(
      '--connect-timeout <seconds>',
      'give up connecting after this many seconds',
      parseTimeoutSeconds,
      DEFAULT_CONNECT_TIMEOUT_S,
    )
    .addOption(
      new Option(
        '--lock-wait-timeout <duration>',
        "fail if a table lock (or --clean's on the target) is not granted in this time (500ms, 30s, 2min; 0: forever)",
      )
        .argParser(parseTimeout)
        .default(parseDuration(DEFAULT_LOCK_WAIT_TIMEOUT), DEFAULT_LOCK_WAIT_TIMEOUT),
    )
    .addOption(keep('--keep-last', 'the N newest backups (env BACKUP_KEEP_LAST)'))
    .addOption(keep('--keep-daily', 'the newest backup of each of the last N days (env BACKUP_KEEP_DAILY)'))
    .addOption(keep('--keep-weekly', 'the newest backup of each of the last N ISO weeks (env BACKUP_KEEP_WEEKLY)'))
    .addOption(keep('--keep-monthly', 'the newest backup of each of the last N months (env BACKUP_KEEP_MONTHLY)'))
    .option('--prune', 'apply the retention rules without taking a backup')
    .option('--dry-run', 'with retention: show what would be deleted and why the rest is kept; delete nothing')
    .option('--log-file <path>', 'append one JSON line per run to this file (env BACKUP_LOG_FILE)', filePath)
    .option('--notify-url <url>', 'POST a JSON summary here when a run fails (env BACKUP_NOTIFY_URL)', webhookUrl)
    .option('--notify-on-success', 'also notify when a run succeeds (env BACKUP_NOTIFY_ON_SUCCESS=1)')
    .option(
      '--ping-url <url>',
      'heartbeat: ping URL/start when a backup starts, URL when it succeeds, URL/fail when it fails (env ' +
        'BACKUP_PING_URL)',
      webhookUrl,
    )
    .option(
      '--metrics-file <path>',
      'after each backup run, update this Prometheus textfile for node_exporter (env BACKUP_METRICS_FILE)',
      filePath,
    )
    .option(
      '--stall-timeout <duration>',
      `stop a backup that writes nothing for this long, saying what it waits on (default ${DEFAULT_STALL_TIMEOUT}; ` +
        `0: never; env BACKUP_STALL_TIMEOUT)`,
      parseTimeout,
    )
    .option(
      '--check',
      'exit 0 if the newest backup is younger than --max-age, else 8 (for monitoring); with --verify, re-read it ' +
        'fully',
    )
    .option(
      '--max-age <duration>',
      'with --check: how old the newest backup may be, e.g. 26h or 8d (env BACKUP_MAX_AGE)',
      parseMaxAge,
    )
    .option(
      '--on-failure <command>',
      'run this shell command when a run fails, details in BACKUP_* variables (env BACKUP_ON_FAILURE)',
      nonEmptyCommand,
    )
    .option(
      '--restore <file>',
      'restore FILE (verified first) into --target-db on the configured server, then reconcile row counts',
      expandHome,
    )
    .option('--target-db <name>', 'with --restore: the database to restore into (created if absent)')
    .option('--clean', 'with --restore: drop and recreate a non-empty target database')
    .option('--force', 'with --restore: restore even if the file fails verification')
    .option(
      '--i-know-this-is-prod',
      'with --restore and --env prod: allow overwriting the configured production database',
    )
    .option(
      '--restore-test',
      'with --verify FILE: restore into a scratch database, reconcile, record the result, drop it',
    )
    .option(
      '--maintenance-work-mem <size>',
      'with --restore or --restore-test: index-build memory per pg_restore job, e.g. 512MB (default: 1GB shared by ' +
        'the jobs, at least 128MB each; env BACKUP_MAINTENANCE_WORK_MEM)',
      parseMemory,
    )
    .option(
      '--pg-bin-dir <dir>',
      'look here first for pg_dump and pg_restore (env PG_BIN_DIR); then PATH, then the usual install locations',
      nonEmptyPath,
    )
    .addOption(
      new Option('--config-dir <dir>', 'directory holding .env.local and .env')
        .argParser(nonEmptyPath)
        .default(PROJECT_DIR, 'the project directory'),
    )
    .configureOutput({ writeErr: () => undefined })
    .exitOverride();
}

/**
 * Pure: commander's message without the value of an option it does not know, given as --opt=VALUE:
 * a mistyped --ping-url=… holds a credential that no mask knows of.
 */
export function withoutUnknownValues(text: string): string {
  // To the line's last quote: the value may hold quotes of its own.
  return text.replace(/(unknown option '--[^=']*)=.*'/g, "$1=…'");
}

/** Pure: commander's message as the contract's error: its first line the details, its "Did you mean" a hint. */
function commandLineError(message: string): BackupError {
  const [first = '', ...rest] = withoutUnknownValues(message)
    .replace(/^error: /, '')
    .split('\n');
  const suggestions = rest.flatMap((line) => /^\((Did you mean .+\?)\)$/.exec(line)?.[1] ?? []);
  // `--verify -x.dump`: a file name that starts with '-' is read as an option.
  const fileLike = /^unknown option '(-[^'=/]*[./][^'=]*)'$/.exec(first)?.[1];
  const asFile = fileLike ? [`If ${fileLike} is a file, write ./${fileLike}: a leading - reads as an option`] : [];
  return configError(first, [...asFile, ...suggestions, 'Run with --help for usage']);
}

/**
 * Pure: the options `argv` gives, in order, read as commander reads them, but on past a bad value: `--name=value`,
 * or `--name value` (a required value is the next argument, whatever it is; an optional one, unless that looks
 * like an option), up to `--`. Unknown options are skipped; a required value missing at the end is undefined.
 */
function optionArguments(program: Command, argv: string[]): Array<{ option: Option; value: string | undefined }> {
  const found: Array<{ option: Option; value: string | undefined }> = [];
  const optionNamed = (name: string) => program.options.find((option) => option.long === name);
  const args = argv.slice(2); // after node and the script, as program.parse(argv)
  for (let i = 0; i < args.length && args[i] !== '--'; i++) {
    const [arg, next] = [args[i]!, args[i + 1]];
    const option = optionNamed(arg);
    if (option) {
      // As commander: an optional value is the next argument unless that looks like an option (-2 is a number).
      const isValue = next !== undefined && (!/^-./.test(next) || /^-(\d+|\d*\.\d+)(e[+-]?\d+)?$/.test(next));
      const takesNext = option.required || (option.optional && isValue);
      found.push({ option, value: takesNext ? args[++i] : undefined });
      continue;
    }
    const equals = arg.indexOf('=');
    const inline = arg.startsWith('--') && equals > 0 ? optionNamed(arg.slice(0, equals)) : undefined;
    if (inline && (inline.required || inline.optional)) found.push({ option: inline, value: arg.slice(equals + 1) });
  }
  return found;
}

/** Pure: every option `argv` names, as set, whatever its value: only which were given. */
function optionsNamedIn(program: Command, argv: string[]): Partial<CliOptions> {
  return Object.fromEntries(optionArguments(program, argv).map(({ option }) => [option.attributeName(), true]));
}

/**
 * Pure: the options `argv` gives whose values their own parsers accept. The `conflicting` ones (given twice with
 * different values) are left out: which was meant cannot be known.
 */
function optionsReadableIn(program: Command, argv: string[], conflicting: Set<Option>): Partial<CliOptions> {
  const readable: Record<string, unknown> = {};
  for (const { option, value } of optionArguments(program, argv)) {
    if ((value === undefined && option.required) || conflicting.has(option)) continue;
    try {
      const parsed = value === undefined ? true : option.parseArg ? option.parseArg(value, undefined) : value;
      readable[option.attributeName()] = parsed;
    } catch {
      // Refused, as commander refuses it: left out, as an option that cannot be read.
    }
  }
  return readable;
}

/** Pure: the options `argv` gives twice or more, with different values. */
function conflictingOptions(program: Command, argv: string[]): Set<Option> {
  const [seen, conflicting] = [new Map<Option, string | undefined>(), new Set<Option>()];
  for (const { option, value } of optionArguments(program, argv)) {
    if (seen.has(option) && seen.get(option) !== value) conflicting.add(option);
    seen.set(option, value);
  }
  return conflicting;
}

/**
 * Pure: the refusal of an option given twice with different values (`--env dev … --env prod`, a wrapper adding its
 * own): commander takes the last in silence, which may not be the one meant. The values are not shown: one may be
 * a credential.
 */
function repeatedOption(conflicting: Set<Option>): BackupError | undefined {
  const [first] = conflicting;
  if (!first) return undefined;
  return configError(`${first.long} is given twice, with different values`, [
    'Give it once: the last one would be used, which may not be the one meant',
    'A wrapper script or a crontab line may be adding its own',
  ]);
}

/**
 * Pure: `opts` with the `conflicting` options back to their defaults (or unset), for the record of the run that
 * refused them: it names neither value's database, log or hook.
 */
function withoutConflicting(opts: CliOptions, conflicting: Set<Option>): CliOptions {
  const reset = [...conflicting].map((option) => [option.attributeName(), option.defaultValue]);
  return { ...opts, ...Object.fromEntries(reset) };
}

// ─── Interrupts: signals, and the launchers going away ──────────────────────────────────

/**
 * Turn SIGINT/SIGTERM/SIGHUP, and the end of the processes that started this one, into an abort
 * of `work`, which then cleans up after itself.
 * `on`, not `once`: execa's exit hook re-raises a signal it thinks nobody else handles, and a
 * `once` listener has already removed itself by then, so the process would die mid-cleanup.
 */
async function withInterruptSignal<T>(work: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const interrupt = new AbortController();
  const handlers = INTERRUPT_SIGNALS.map((name) => [name, () => interrupt.abort(interruptedError(name))] as const);
  for (const [name, handler] of handlers) process.on(name, handler);
  const stopWatching = watchLaunchers((who) => interrupt.abort(launcherGoneError(who)));
  try {
    return await work(interrupt.signal);
  } finally {
    stopWatching();
    for (const [name, handler] of handlers) process.off(name, handler);
  }
}

/** `work`'s result, unless `signal` stopped it: a check that an interrupt cut short proves nothing, either way. */
async function unlessInterrupted<T>(work: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  try {
    const result = await work;
    signal?.throwIfAborted();
    return result;
  } catch (error) {
    throw signal?.aborted ? signal.reason : error;
  }
}

/**
 * The processes that started this one and wait for it: the parent, and above it those of our
 * process group (npx, the sh it runs, tsx; cron's or systemd's job). A signal sent to npx ends
 * npx but not its children, so each of them is watched rather than only the parent.
 */
async function launcherChain(): Promise<ProcessInfo[]> {
  const self = await processInfo(process.pid);
  if (!self) return []; // no /proc: only the parent pid is watched
  const chain: ProcessInfo[] = [];
  for (let pid = self.ppid; pid > 1;) {
    const info = await processInfo(pid);
    if (!info || (chain.length > 0 && info.pgrp !== self.pgrp)) break;
    chain.push(info);
    if (info.pid === self.pgrp) break;
    pid = info.ppid;
  }
  return chain;
}

/** Poll, four times a second, that the launchers are still there; `onGone` names the first one missing. */
function watchLaunchers(onGone: (who: string) => void): () => void {
  const parent = process.ppid;
  let chain: ProcessInfo[] = [];
  void launcherChain().then((found) => (chain = found));
  const check = async () => {
    if (process.ppid !== parent) return onGone(`its parent process (pid ${parent})`);
    for (const launcher of chain) {
      const now = await processInfo(launcher.pid);
      if (!now || now.zombie || now.start !== launcher.start)
        return onGone(`pid ${launcher.pid} (${launcher.command})`);
    }
  };
  const timer = setInterval(() => void check(), 250);
  timer.unref();
  return () => clearInterval(timer);
}

function launcherGoneError(who: string): BackupError {
  return new BackupError(
    EXIT.SIGHUP,
    'Interrupted: the process that started this run ended',
    `${who} ended, so nothing waits for this run any more: it stopped${CLEANED_UP}, and existing ` +
      `backups are untouched`,
    [
      'This is what stopping the launcher (npx, tsx, a script, a scheduler) is meant to do',
      'To run one that outlives its terminal or script, start it with setsid, or from cron or systemd',
    ],
  );
}

// ─── main: run a mode, print, record ─────────────────────────────────────────────────────

/** One run's result, before it is printed, logged and notified. */
interface Outcome {
  command: CommandName;
  exitCode: number;
  /** What a run that did its job prints: the --json document (without ok/command) and the human text. */
  result?: { document: Record<string, unknown>; text(): Text };
  /** What the run record says about it. */
  facts: Pick<RunRecord, 'environment' | 'database' | 'file' | 'size_bytes' | 'deleted'>;
  /** Why the run failed; or, for a backup that stands, what retention refused. */
  failure?: BackupError;
}

/** The configured database (the server, for restores), resolved first so that even a failure can name it. */
function configuredDatabase(mode: Mode, opts: CliOptions, vars: EnvVars): DbConfig | undefined {
  if (mode.command === 'verify' || mode.command === 'list') return undefined;
  return resolveDbConfig(vars, detectEnvironment(vars, opts.env), envFilesIn(path.resolve(opts.configDir)));
}

/** What a run record can say before the run: which database it is about. */
function knownFacts(mode: Mode, config: DbConfig | undefined): Outcome['facts'] {
  if (!config) return {};
  if (mode.command === 'restore')
    return { environment: config.environment, database: mode.target, file: path.basename(mode.file) };
  if (mode.command === 'drill') return { file: path.basename(mode.file) };
  return { environment: config.environment, database: config.database };
}

function outputDirOf(opts: Pick<CliOptions, 'outputDir'>): string {
  return opts.outputDir ? path.resolve(opts.outputDir) : DEFAULT_OUTPUT_DIR;
}

/** Pure: the names a run reports itself (its database, file, output directory), as written and as displayed. */
function namedByTheRun({ database, file }: Outcome['facts'], outputDir: string): string[] {
  return [database, file, outputDir, displayPath(outputDir)].filter((name): name is string => Boolean(name));
}

async function runMode(
  mode: Mode,
  opts: CliOptions,
  vars: EnvVars,
  config: DbConfig | undefined,
  settings: Settings,
): Promise<Outcome> {
  const outputDir = outputDirOf(opts);
  if ('file' in mode) await assertPathArgumentKnown(mode.file);
  switch (mode.command) {
    case 'restore':
    case 'drill': {
      const request: RestoreRequest = {
        file: mode.file,
        ...(mode.command === 'restore' ? { target: mode.target } : {}),
        clean: opts.clean === true,
        force: opts.force === true,
        connectTimeoutSeconds: opts.connectTimeout,
        lockWaitTimeoutMs: opts.lockWaitTimeout,
        guard: {
          requestedEnv: opts.env,
          iKnowThisIsProd: opts.iKnowThisIsProd === true,
          ...(opts.json ? {} : terminalPrompt()),
        },
        search: settings.search,
        tuning: settings.restore,
      };
      const restored = await withInterruptSignal((signal) => runRestore(config!, vars, request, signal));
      const { metadata } = restored;
      // A drill is about the backup's database; a restore's facts (the target) are known before it starts.
      const facts =
        restored.drill && metadata ? { environment: metadata.environment, database: metadata.database_name } : {};
      return completed(mode.command, restoreDocument(restored), () => restoreText(restored), facts);
    }
    case 'verify': {
      const result = await withInterruptSignal((signal) => runVerify(mode.file, settings.search, signal));
      return completed('verify', verifyDocument(result), () => verificationText(result), {
        environment: result.metadata.environment,
        database: result.metadata.database_name,
        file: path.basename(result.filePath),
        size_bytes: result.inspection.size,
      });
    }
    case 'list': {
      const listing = await withInterruptSignal((signal) =>
        runList(outputDir, mode.fullCheck, settings.search, signal),
      );
      const failure = listingFailure(listing);
      // The listing stands (on stdout, and in the document), with the failure as every failure is reported.
      const problem = failure && failureProblem(failure, OPERATION_NAMES.list, []);
      const text = () => ({ out: listingLines(listing), err: problem ? problemLines(problem) : [] });
      const listed = completed('list', listingDocument(listing), text);
      return failure ? { ...listed, exitCode: failure.exitCode, failure } : listed;
    }
    case 'check': {
      const { maxAgeMs } = settings;
      if (maxAgeMs === undefined)
        throw configError('--check needs --max-age DURATION (or BACKUP_MAX_AGE)', [
          'For example: --check --max-age 26h for a daily backup',
        ]);
      const freshness = await withInterruptSignal((signal) =>
        runCheck(config!, outputDir, maxAgeMs, mode.fullCheck, settings.search, signal),
      );
      return completed('check', freshnessDocument(freshness, outputDir, mode.fullCheck), () =>
        freshnessText(freshness, config!, mode.fullCheck),
      );
    }
    case 'prune': {
      const { retention, dryRun, search } = settings;
      const pruning = { outputDir, retention, dryRun, search, connectTimeoutSeconds: opts.connectTimeout };
      const report = await withInterruptSignal((signal) => runPrune(config!, pruning, signal));
      const lines = report
        ? retentionLines(report, outputDir, config!)
        : [`No backups: ${displayPath(outputDir)}${path.sep} does not exist yet.`];
      const document = { retention: report ? retentionDocument(report) : null };
      const facts = { deleted: dryRun ? [] : (report?.deleted ?? []) };
      return completed('prune', document, () => ({ out: lines, err: [] }), facts);
    }
    case 'backup': {
      const result = await withInterruptSignal((signal) =>
        runBackup(
          config!,
          {
            outputDir,
            search: settings.search,
            connectTimeoutSeconds: opts.connectTimeout,
            lockWaitTimeoutMs: opts.lockWaitTimeout,
            // Never under cron, with --json, or when either stream is piped.
            progress: !opts.json && process.stdout.isTTY === true && process.stderr.isTTY === true,
            jobs: opts.jobs,
            retention: settings.retention,
            dryRun: settings.dryRun,
            stallTimeoutMs: settings.stallTimeoutMs,
            ...(opts.compress !== undefined ? { compress: opts.compress } : {}),
          },
          signal,
        ),
      );
      const { metadata } = result;
      const facts = {
        file: metadata.backup_file,
        size_bytes: metadata.backup_size_bytes,
        ...(result.retention && !result.retention.dryRun ? { deleted: result.retention.deleted } : {}),
      };
      const done = completed('backup', backupDocument(result), () => backupSummaryText(result), facts);
      // The backup stands, but a retention that failed (refused, interrupted, or a deletion that failed)
      // fails the run with its own code, so that cron, the log and the alerts see it before the disk fills.
      if (!result.retentionError) return done;
      return { ...done, exitCode: result.retentionError.exitCode, failure: result.retentionError };
    }
  }
}

/** A run that did its job: its --json document, its text, and what its record says. */
function completed(
  command: CommandName,
  document: Record<string, unknown>,
  text: () => Text,
  facts: Outcome['facts'] = {},
): Outcome {
  return { command, exitCode: EXIT.OK, result: { document, text }, facts };
}

function failedOutcome(command: CommandName, failure: BackupError): Outcome {
  // A failed verification still knows which backup it was about.
  const metadata = failure.extra.data?.metadata as BackupMetadata | undefined;
  const facts = metadata
    ? { environment: metadata.environment, database: metadata.database_name, file: metadata.backup_file }
    : {};
  return { command, exitCode: failure.exitCode, facts, failure };
}

const OPERATION_NAMES: Record<CommandName, string> = {
  backup: 'Backup',
  prune: 'Pruning',
  verify: 'Verification',
  list: 'Listing',
  restore: 'Restore',
  drill: 'Restore test',
  check: 'Freshness check',
};

/** A typed confirmation needs a person at a terminal; cron and pipes get none. */
function terminalPrompt(): Pick<ProdGuard, 'ask'> {
  if (!process.stdin.isTTY || !process.stderr.isTTY) return {};
  return {
    ask: async (question, signal) => {
      const { createInterface } = await import('node:readline/promises');
      const prompt = createInterface({ input: process.stdin, output: process.stderr });
      try {
        return await prompt.question(question, { signal });
      } catch (error) {
        signal.throwIfAborted();
        // Ctrl-C typed at the prompt reaches readline as a key, not as SIGINT: an interrupt all the same.
        throw errnoCode(error) === 'ABORT_ERR' ? interruptedError('SIGINT') : error;
      } finally {
        prompt.close();
      }
    },
  };
}

/**
 * Where a run that failed on its command line or settings (a typo in a crontab) is logged and
 * announced, as any failure is: those of its settings that can be read (options come checked by
 * commander), less a log or metrics path refused as not a regular file. Their secrets join `secrets`.
 */
async function readableAutomation(
  command: CommandName,
  opts: CliOptions,
  loaded: EnvVars | undefined,
  secrets: string[],
) {
  const vars: EnvVars = loaded ?? new Map();
  const { logFile, metricsFile, ...usable } = resolveAutomation(opts, settingReader(vars, command, true));
  const files = { logFile, metricsFile };
  const known = assertSettingPathsKnown([
    ['--log-file', logFile],
    ['--metrics-file', metricsFile],
  ]);
  const refused = await Promise.all([known, checkRecordFiles({ ...usable, ...files })]).then(
    () => false,
    () => true,
  );
  secrets.push(...secretsIn(vars), ...automationSecrets(usable));
  return refused ? usable : { ...usable, ...files };
}

/**
 * The database `mode` works on, and what its run's record says of it. The password libpq would read for it
 * from the password file joins `secrets`: masked even when the run fails before connecting.
 */
async function databaseOf(mode: Mode, opts: CliOptions, vars: EnvVars, secrets: string[]) {
  const config = configuredDatabase(mode, opts, vars);
  const fromFile = config && !config.password && (await passwordFileEntry(config).catch(() => undefined));
  if (fromFile) secrets.push(fromFile);
  return { config, facts: knownFacts(mode, config) };
}

/** What a run that failed on its command line or settings can say of its database, from the settings that parse. */
async function readableFacts(opts: CliOptions, vars: EnvVars, secrets: string[]): Promise<Outcome['facts']> {
  try {
    return (await databaseOf(chooseMode(opts), opts, vars, secrets)).facts;
  } catch {
    return {};
  }
}

/** The automation settings that are credentials: webhook and ping URLs carry their tokens. */
const automationSecrets = ({ notifyUrl, pingUrl }: Automation) => [notifyUrl ?? '', pingUrl ?? ''].filter(Boolean);

/**
 * Pure: the command a command line asks for, as a run that failed on it is recorded (log, webhook,
 * ping): one refused or that failed to parse is the first command its flags name, then the command
 * a stray option belongs to; 'backup' only when none does. A misused --verify, --check or --list
 * (a Nagios line that lost its --check) is no failed backup: it must not alarm the backup's monitor.
 */
function commandAskedFor(opts: Partial<CliOptions>): CommandName {
  try {
    return chooseMode(opts).command;
  } catch {
    if (opts.check) return 'check';
    if (opts.restore !== undefined) return 'restore';
    if (opts.restoreTest) return 'drill';
    if (opts.prune) return 'prune';
    if (opts.list) return 'list';
    if (opts.verify !== undefined) return 'verify';
    if (opts.maxAge !== undefined) return 'check';
    const forRestore = [...RESTORE_ONLY_OPTIONS, 'maintenanceWorkMem' as const].some((o) => opts[o] !== undefined);
    return forRestore ? 'restore' : 'backup';
  }
}

/** Run the CLI and return its exit code; printing, logging and notifying happen here and only here. */
export async function main(argv: string[], io: Io = CONSOLE): Promise<number> {
  const [startedAt, started] = [new Date(), performance.now()];
  const json = argv.includes('--json');
  // Webhook URLs are credentials (Slack, Discord): masked even in commander's own messages.
  const secrets: string[] = credentialArguments(argv);
  const program = buildProgram();
  let parseFailure: BackupError | undefined;
  const conflicting = conflictingOptions(program, argv);
  try {
    program.parse(argv);
    parseFailure = repeatedOption(conflicting);
  } catch (error) {
    if (error instanceof CommanderError && error.exitCode === 0) return EXIT.OK;
    // A bad command line is a configuration error, printed once the settings' secrets are known (a value may be one).
    parseFailure = commandLineError(errorText(error));
  }
  const given = (Object.keys(DEFAULTED) as Defaulted[]).filter((name) => program.getOptionValueSource(name) === 'cli');
  const opts: CliOptions = { ...program.opts<CliOptions>(), given: new Set(given) };
  // Commander stops at the first bad value: the options after it still say which command was asked for.
  const namedIn = parseFailure ? optionsNamedIn(program, argv) : {};
  const command = commandAskedFor({ ...namedIn, ...opts });
  let automation: Automation | undefined;
  let vars: EnvVars | undefined;
  let known: Outcome['facts'] = {};
  let config: DbConfig | undefined;
  let outcome: Outcome;
  try {
    if (parseFailure) throw parseFailure;
    const mode = chooseMode(opts);
    vars = await loadEnvVars(path.resolve(opts.configDir), process.env);
    secrets.push(...secretsIn(vars));
    const settings = resolveSettings(opts, vars, mode.command);
    await assertSettingPathsKnown([
      ['--output-dir', outputDirOf(opts)],
      ['--log-file', settings.automation.logFile],
      ['--metrics-file', settings.automation.metricsFile],
    ]);
    await checkRecordFiles(settings.automation);
    automation = settings.automation;
    secrets.push(...automationSecrets(automation));
    ({ config, facts: known } = await databaseOf(mode, opts, vars, secrets));
    if (mode.command === 'backup' && settings.automation.pingUrl) {
      const { database, environment } = config!;
      const text = `backup of ${redact(database, secrets)} (${environment}) started on ${os.hostname()}`;
      // An interrupt while the receiver takes its time ends the run at once, as one at any other step does.
      const why = await withInterruptSignal(async (signal) => {
        const failed = await sendPing(settings.automation.pingUrl!, 'start', text, signal);
        signal.throwIfAborted();
        return failed;
      });
      if (why) {
        printWarning(io, warningProblem('Heartbeat ping failed', why, secrets));
        automation = { ...settings.automation, startPingFailure: why };
      }
    }
    outcome = await runMode(mode, opts, vars, config, settings);
  } catch (error) {
    outcome = failedOutcome(command, asBackupError(error, config));
  }
  // Commander stops at the first bad value: the settings after it are read as it would have read them.
  const readableIn = parseFailure ? optionsReadableIn(program, argv, conflicting) : {};
  const readable = { ...withoutConflicting(opts, conflicting), ...readableIn };
  // A --config-dir that could not be read (or was given twice) is no reason to read the project's .env instead.
  if (!namedIn.configDir || 'configDir' in readableIn)
    vars ??= await loadEnvVars(path.resolve(readable.configDir), process.env).catch(() => undefined);
  const recordTo = automation ?? (await readableAutomation(command, readable, vars, secrets));
  // A run that failed on another setting (BACKUP_KEEP_DAILY=7days) is still its database's: logged and in its metrics,
  // unless what picks the database is what could not be read (--env prdo would be taken for the default, auto).
  const unread = Object.keys(namedIn).filter((name) => !(name in readableIn));
  const picksDatabase = ['env', 'restore', 'targetDb', 'configDir'];
  if (!config && vars && !unread.some((name) => picksDatabase.includes(name)))
    known = await readableFacts(readable, vars, secrets);

  const operation = OPERATION_NAMES[outcome.command];
  // Names of a run that worked, which it reports itself: a password inside one is masked only outside
  // it (see maskSecrets). A failed run's names are unconfirmed (a password pasted into DEV_DB_NAME).
  const named = outcome.result ? namedByTheRun({ ...known, ...outcome.facts }, outputDirOf(opts)) : [];
  let problem = outcome.failure && failureProblem(outcome.failure, operation, secrets, named);
  try {
    printOutcome(io, json, outcome, { secrets, named }, problem);
  } catch (error) {
    // A bug, never an expected failure: still the contract's error, no stack trace, and a general failure.
    const bug = new BackupError(EXIT.GENERAL, 'its result could not be printed', errorText(error));
    problem = failureProblem(bug, operation, secrets, named);
    io.err(problemLines(problem).map(visibleControls).join('\n'));
    outcome = { ...outcome, exitCode: EXIT.GENERAL };
  }
  const record: RunRecord = {
    time: startedAt.toISOString(),
    host: os.hostname(),
    command: outcome.command,
    outcome: outcome.exitCode === EXIT.OK ? 'success' : 'failure',
    exit_code: outcome.exitCode,
    duration_ms: millisecondsSince(started),
    ...known,
    ...outcome.facts,
    ...(problem ? { error: problem.error, details: problem.details } : {}),
    ...(outcome.exitCode !== EXIT.OK && !problem ? { error: `${outcome.command} found problems` } : {}),
  };
  await withInterruptSignal((signal) => recordRun(record, recordTo, { secrets, named }, io, signal));
  return outcome.exitCode;
}

const isDirectRun =
  process.argv[1] !== undefined && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href;
if (isDirectRun) {
  // Whoever reads our output may be gone (npx killed, a closed pipe): a failed write must not
  // crash the cleanup that follows.
  process.stdout.on('error', () => undefined);
  process.stderr.on('error', () => undefined);
  // Node ignores SIGXFSZ, so a write beyond RLIMIT_FSIZE fails with EFBIG and is cleaned up like a
  // full disk. execa's exit hook re-raises signals nobody else listens to, which would kill us
  // mid-write instead: this listener keeps Node's behaviour.
  if (process.platform !== 'win32') process.on('SIGXFSZ', () => undefined);
  // Exit once the run is recorded and its output flushed: what still runs is what it gave up on, e.g. the DNS
  // lookup of a ping that timed out, which fetch cannot cancel and which would hold the process (and its exit
  // code) for the resolver's timeout. A pipe whose reader is slow holds output back: flushed first, never cut.
  const exitCode = await main(process.argv);
  await Promise.all([process.stdout, process.stderr].map((out) => new Promise((done) => out.write('', done))));
  process.exit(exitCode);
}
