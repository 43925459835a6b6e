/**
 * A real PostgreSQL 17 pg_dump and pg_restore, newer than the machine's (Debian bookworm ships
 * 15), for what only a newer client shows: zstd, the default compression from pg_dump 16 on;
 * dumping 16 and 17 servers; restoring with a pg_restore newer than the target server.
 *
 * The npm releases of PostgreSQL hold only the server, and PGDG's repository is out of reach
 * here, so this builds the two tools from Debian's own source package (trixie's postgresql-17,
 * see debian-source.ts) into node_modules/.cache, once: about a minute on two cores. Part of
 * `npm run test:setup`; `npm run bench -- --pg-bin-dir <NEWER_CLIENT_DIR>` measures with it.
 * The Debian packages it builds with are the caller's to install (BUILD_PACKAGES).
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { buildFromSource, type SourceRequest } from './debian-source.ts';

export const NEWER_MAJOR = 17;
const PROJECT_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const PREFIX = path.join(PROJECT_DIR, 'node_modules', '.cache', `pg-client-${NEWER_MAJOR}`);
/** Written last: a build that was interrupted has no marker and is started again. */
const COMPLETE = path.join(PREFIX, '.complete');
export const NEWER_CLIENT_DIR = path.join(PREFIX, 'bin');

/** Debian packages the build needs: compilers and parser generators, and zlib, zstd, lz4, OpenSSL headers. */
export const BUILD_PACKAGES = [
  'gcc',
  'make',
  'bison',
  'flex',
  'pkg-config',
  'bzip2',
  'zlib1g-dev',
  'libzstd-dev',
  'liblz4-dev',
  'libssl-dev',
];

/** trixie's postgresql-17; the pin's SHA-256 is from postgresql-17_17.11-0+deb13u1.dsc, signed by its Debian uploader. */
const POSTGRESQL_17_SOURCE: SourceRequest = {
  package: `postgresql-${NEWER_MAJOR}`,
  suite: 'trixie',
  pinned: {
    poolPath: 'main/p/postgresql-17/postgresql-17_17.11.orig.tar.bz2',
    sha256: 'dd27f2b3c59e73ed14aa3324901242bf69a032a6347805f274e6260322d42979',
  },
};

const exists = (file: string) =>
  fs.access(file).then(
    () => true,
    () => false,
  );

/** Whether the client has been built (by test:setup). */
export const newerClientBuilt = () => exists(COMPLETE);

/** The bin directory of the newer client, built first if it is not there yet. */
export async function ensureNewerClient(log: (line: string) => void = () => undefined): Promise<string> {
  if (await exists(COMPLETE)) return NEWER_CLIENT_DIR;
  await buildFromSource(POSTGRESQL_17_SOURCE, log, (source) => build(source, log));
  return NEWER_CLIENT_DIR;
}

/** Configure and build only pg_dump, pg_restore and the libpq they link to, into PREFIX. */
async function build(source: string, log: (line: string) => void): Promise<void> {
  await fs.rm(PREFIX, { recursive: true, force: true });
  const run = (command: string, args: string[]) => execa(command, args, { cwd: source, stdout: 'ignore' });
  const jobs = `-j${os.availableParallelism()}`;
  log(`configuring ${path.basename(source)}`);
  await run('./configure', [
    `--prefix=${PREFIX}`,
    '--with-zstd',
    '--with-lz4',
    '--with-openssl',
    '--without-icu',
    '--without-readline',
  ]);
  log('building pg_dump and pg_restore');
  // The libraries first, each on its own: pg_dump's make alone runs submake-libpq and submake-libpgport at
  // once, and both build src/port's libpgport.a, a race that fails ('ar: unable to copy file').
  const steps = [['src/backend', 'generated-headers'], ['src/port'], ['src/common'], ['src/interfaces/libpq']];
  for (const [dir, ...targets] of [...steps, ['src/fe_utils'], ['src/bin/pg_dump']])
    await run('make', [jobs, '-C', dir!, ...targets]);
  await run('make', ['-C', 'src/bin/pg_dump', 'install']);
  await run('make', ['-C', 'src/interfaces/libpq', 'install']);
  const { stdout } = await execa(path.join(NEWER_CLIENT_DIR, 'pg_dump'), ['--version']);
  if (!stdout.includes(`(PostgreSQL) ${NEWER_MAJOR}.`))
    throw new Error(`the built pg_dump says "${stdout}", not ${NEWER_MAJOR}`);
  await fs.writeFile(COMPLETE, `${stdout}\n`);
  log(`built ${stdout}`);
}
