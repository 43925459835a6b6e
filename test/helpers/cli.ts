/** Run backup_db.ts as a real process, the way users and cron do, with a clean environment. */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa, type Options, type ResultPromise } from 'execa';
import type { TestServer } from './pg-server.ts';
import { directoryFingerprint } from './wait.ts';

export const PROJECT_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const SCRIPT = path.join(PROJECT_DIR, 'backup_db.ts');

/** The test runner's own configuration must not leak into the CLI under test. */
/**
 * The developer's HOME holds what libpq reads unasked (~/.pgpass, ~/.pg_service.conf, ~/.postgresql/
 * certificates): a CLI whose test names no HOME gets an empty one.
 */
function baseEnv(): Record<string, string> {
  const keep = ['PATH', 'LANG', 'TMPDIR', 'USER', 'LOGNAME'];
  const kept = Object.fromEntries(keep.flatMap((name) => (process.env[name] ? [[name, process.env[name]!]] : [])));
  return { ...kept, HOME: emptyDir('home') };
}

/**
 * The CLI's .env files come from its project directory unless --config-dir names another: there lie
 * the developer's own .env.local (their database, hooks, log). A test that names none gets an empty one.
 */
export function ownConfigDir(args: string[]): string[] {
  if (args.some((arg) => arg === '--config-dir' || arg.startsWith('--config-dir='))) return [];
  return ['--config-dir', emptyDir('config')];
}

/** One empty directory per purpose and test process, removed when it exits. */
const emptyDirs = new Map<string, string>();
function emptyDir(purpose: string): string {
  if (!emptyDirs.has(purpose)) {
    const dir = mkdtempSync(path.join(os.tmpdir(), `backup-db-${purpose}-`));
    madeDirs.add(dir);
    emptyDirs.set(purpose, dir);
  }
  return emptyDirs.get(purpose)!;
}

export interface CliRun {
  args: string[];
  env?: Record<string, string>;
  cwd?: string;
  /** Make file permission bits bind even when the tests run as root (CI does). */
  withoutRootOverride?: boolean;
  /** A command the CLI runs under, e.g. ['prlimit', '--fsize=1000000', '--']. */
  wrapper?: string[];
  /** Start it as README documents: `npx tsx backup_db.ts …` (npx → sh → tsx → node). */
  viaNpx?: boolean;
  /** Step the CLI's wall clock once the file `when` exists, then let it run at `rate` (see wall-clock.ts). */
  wallClock?: WallClock;
  /** Hold the CLI's first rename onto a name ending with `target` (see rename-gate.ts). */
  renameGate?: RenameGate;
  /** A host name whose lookups never answer (see dns.ts). */
  hangingDns?: string;
  /** A host name only the CLI's own process resolves, to `address`, then to `flip.address` once `flip.file` exists. */
  privateDns?: { host: string; address: string; flip?: { file: string; address: string } };
  /** Every hard link fails, as on exFAT (see no-hard-links.ts). */
  noHardLinks?: boolean;
}

/** The CLI reached the rename when `reached` exists; it goes on once `open` exists. */
export interface RenameGate {
  target: string;
  reached: string;
  open: string;
}

/**
 * A wall clock that steps by `stepMs` (or to the instant `at`, exactly) once the file `when` exists,
 * then runs at `rate` times real speed.
 */
export interface WallClock {
  when: string;
  stepMs?: number;
  at?: Date;
  rate?: number;
}

/** The module node preloads (`--import`) into a CLI whose wall clock a test controls. */
export const WALL_CLOCK_MODULE = path.join(PROJECT_DIR, 'test', 'helpers', 'wall-clock.ts');
const RENAME_GATE_MODULE = path.join(PROJECT_DIR, 'test', 'helpers', 'rename-gate.ts');
const DNS_MODULE = path.join(PROJECT_DIR, 'test', 'helpers', 'dns.ts');
export const NO_HARD_LINKS_MODULE = path.join(PROJECT_DIR, 'test', 'helpers', 'no-hard-links.ts');

export function wallClockEnv({ when, stepMs = 0, at, rate = 1 }: WallClock): Record<string, string> {
  const exactly: Record<string, string> = at ? { WALL_CLOCK_AT: String(at.getTime()) } : {};
  return { WALL_CLOCK_WHEN: when, WALL_CLOCK_STEP_MS: String(stepMs), WALL_CLOCK_RATE: String(rate), ...exactly };
}

/**
 * Root ignores permission bits through CAP_DAC_OVERRIDE; setpriv (util-linux) drops it from the
 * bounding set so a root-run CLI meets EACCES like any other user would.
 */
const ROOT_WITHOUT_DAC_OVERRIDE = ['setpriv', '--bounding-set=-dac_override,-dac_read_search', '--'];

export function startCli({
  args,
  env = {},
  cwd = PROJECT_DIR,
  withoutRootOverride = false,
  wrapper = [],
  viaNpx = false,
  wallClock,
  renameGate,
  hangingDns,
  privateDns,
  noHardLinks = false,
}: CliRun): ResultPromise<Options & { reject: false }> {
  const preload = [
    ...(wallClock ? [WALL_CLOCK_MODULE] : []),
    ...(renameGate ? [RENAME_GATE_MODULE] : []),
    ...(hangingDns || privateDns ? [DNS_MODULE] : []),
    ...(noHardLinks ? [NO_HARD_LINKS_MODULE] : []),
  ].flatMap((module) => ['--import', module]);
  const command = [
    ...wrapper,
    ...(viaNpx ? ['npx', 'tsx', SCRIPT] : [process.execPath, '--import', 'tsx', ...preload, SCRIPT]),
    // First: a wrapper may append an argument of its own after them (see retention.test.ts).
    ...ownConfigDir(args),
    ...args,
  ];
  const argv = withoutRootOverride && os.userInfo().uid === 0 ? [...ROOT_WITHOUT_DAC_OVERRIDE, ...command] : command;
  return execa(argv[0]!, argv.slice(1), {
    env: {
      ...baseEnv(),
      ...(wallClock ? wallClockEnv(wallClock) : {}),
      ...(renameGate
        ? {
            RENAME_GATE_TARGET: renameGate.target,
            RENAME_GATE_REACHED: renameGate.reached,
            RENAME_GATE_OPEN: renameGate.open,
          }
        : {}),
      ...(hangingDns ? { HANGING_DNS_HOST: hangingDns } : {}),
      ...(privateDns ? { PRIVATE_DNS_HOST: privateDns.host, PRIVATE_DNS_ADDRESS: privateDns.address } : {}),
      ...(privateDns?.flip
        ? { PRIVATE_DNS_FLIP_FILE: privateDns.flip.file, PRIVATE_DNS_FLIP_ADDRESS: privateDns.flip.address }
        : {}),
      ...env,
    },
    extendEnv: false,
    cwd,
    reject: false,
    stdin: 'ignore',
    // execa SIGKILLs a child still running 5 s after kill('SIGTERM'): a test's SIGTERM must be the only signal sent.
    forceKillAfterDelay: false,
  }) as ResultPromise<Options & { reject: false }>;
}

export async function runCli(run: CliRun) {
  const result = await startCli(run);
  return { exitCode: result.exitCode ?? -1, stdout: String(result.stdout), stderr: String(result.stderr) };
}

/** The temp directories this test process made: removed when it exits, however its tests ended. */
const madeDirs = new Set<string>();
process.on('exit', () => {
  for (const dir of madeDirs) {
    // A test may have taken the write bit away (an unwritable output directory): give it back first.
    spawnSync('chmod', ['-R', 'u+rwX', dir]);
    rmSync(dir, { recursive: true, force: true });
  }
});

/** A fresh directory for one test: its own .env files and backups. Removed when the test process exits. */
export async function tempDir(prefix = 'backup-db-test-'): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
  madeDirs.add(dir);
  return dir;
}

/**
 * A Unix socket listening at `file`. A socket's path holds 107 bytes at most (node cuts a longer one
 * short, silently) and a long TMPDIR (macOS's is ~50 bytes) exceeds it: then it is bound in a short
 * directory under /tmp and moved into place.
 */
export async function socketAt(file: string): Promise<net.Server> {
  const listen = async (at: string) => {
    const server = net.createServer().listen(at);
    await once(server, 'listening');
    return server;
  };
  if (Buffer.byteLength(file) <= 107) return listen(file);
  const short = await fs.mkdtemp('/tmp/sock-');
  try {
    const server = await listen(path.join(short, 's'));
    await fs.rename(path.join(short, 's'), file);
    return server;
  } finally {
    await fs.rm(short, { recursive: true, force: true });
  }
}

/** Write an env file from a map, one VAR=value per line. */
export async function writeEnvFile(dir: string, name: string, vars: Record<string, string>): Promise<void> {
  const text = Object.entries(vars)
    .map(([key, value]) => `${key}=${JSON.stringify(value)}`)
    .join('\n');
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

export interface TakenBackup {
  stdout: string;
  stderr: string;
  outputDir: string;
  dumpPath: string;
  metadataPath: string;
  metadata: Record<string, unknown>;
}

/** Take a real backup of `database` through the CLI into `outputDir`; fail loudly if it does not work. */
export async function takeBackup(
  server: TestServer,
  database: string,
  outputDir: string,
  env: 'dev' | 'prod' = 'dev',
): Promise<TakenBackup> {
  const configDir = await tempDir();
  await writeEnvFile(configDir, '.env', dbVars(server, env === 'dev' ? 'DEV_DB_' : 'DB_', database));
  const before = new Set(await fs.readdir(outputDir).catch(() => [] as string[]));
  const result = await runCli({ args: ['--env', env, '--config-dir', configDir, '--output-dir', outputDir] });
  if (result.exitCode !== 0)
    throw new Error(`backup of ${database} failed (${result.exitCode}):\n${result.stdout}\n${result.stderr}`);
  const created = (await fs.readdir(outputDir)).filter((name) => !before.has(name) && name.endsWith('.dump'));
  if (created.length !== 1) throw new Error(`expected one new dump in ${outputDir}, found ${created.join(', ')}`);
  const dumpPath = path.join(outputDir, created[0]!);
  const metadataPath = dumpPath.replace(/\.dump$/, '.metadata.json');
  const metadata = JSON.parse(await fs.readFile(metadataPath, 'utf8')) as Record<string, unknown>;
  return { stdout: result.stdout, stderr: result.stderr, outputDir, dumpPath, metadataPath, metadata };
}

/**
 * A directory holding one real, earlier backup of `database`, the arguments to back it up there
 * again, and the fingerprint that later runs must leave untouched.
 */
export async function directoryWithExistingBackup(
  server: TestServer,
  database: string,
  vars: Record<string, string> = dbVars(server, 'DEV_DB_', database),
) {
  const outputDir = path.join(await tempDir(), 'out');
  await takeBackup(server, database, outputDir);
  const configDir = await tempDir();
  await writeEnvFile(configDir, '.env', vars);
  const args = ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir];
  return { outputDir, args, before: await directoryFingerprint(outputDir) };
}

/**
 * A --pg-bin-dir whose pg_restore deletes `files` when asked its version: after the archive's header
 * is read and before its bytes are, as a concurrent --prune can.
 */
export async function clientThatDeletes(files: string[]): Promise<string> {
  const bin = await tempDir();
  const which = async (tool: string) => (await execa('sh', ['-c', `command -v ${tool}`])).stdout.trim();
  const rm = files.map((file) => `rm -f '${file}'`).join('; ');
  await fs.writeFile(path.join(bin, 'pg_dump'), `#!/bin/sh\nexec '${await which('pg_dump')}' "$@"\n`, { mode: 0o755 });
  const restore = `#!/bin/sh\n[ "$1" = --version ] && { ${rm}; }\nexec '${await which('pg_restore')}' "$@"\n`;
  await fs.writeFile(path.join(bin, 'pg_restore'), restore, { mode: 0o755 });
  return bin;
}
