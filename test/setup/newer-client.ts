/**
 * A real PostgreSQL 17 pg_dump and pg_restore, newer than the machine's (Debian bookworm ships
 * 15), for what only a newer client shows: zstd, the default compression from pg_dump 16 on;
 * dumping 16 and 17 servers; restoring with a pg_restore newer than the target server.
 *
 * The npm releases of PostgreSQL hold only the server, and PGDG's repository is out of reach
 * here, so this builds the two tools from Debian's own source package (trixie's postgresql-17,
 * fetched and signature-checked by apt) into node_modules/.cache, once: about a minute on two
 * cores. `npm test` runs it first (pretest); `npm run bench -- --pg-bin-dir <the printed dir>`
 * measures with it. Build tools missing from the machine are installed with apt-get when running
 * as root (or through password-less sudo).
 *
 *   node --import tsx test/helpers/newer-client.ts     # build if missing, print the bin dir
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { fetchUpstreamTarball, unpack, type SourceRequest } from '../setup/debian-source.ts';

export const NEWER_MAJOR = 17;
const PROJECT_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const PREFIX = path.join(PROJECT_DIR, 'node_modules', '.cache', `pg-client-${NEWER_MAJOR}`);
/** Written last: a build that was interrupted has no marker and is started again. */
const COMPLETE = path.join(PREFIX, '.complete');
export const NEWER_CLIENT_DIR = path.join(PREFIX, 'bin');

/** Debian packages the build needs: compilers and parser generators, and zlib, zstd, lz4, OpenSSL headers. */
const BUILD_PACKAGES = ['gcc', 'make', 'bison', 'flex', 'pkg-config', 'bzip2', 'zlib1g-dev', 'libzstd-dev', 'liblz4-dev', 'libssl-dev'];

/** trixie's postgresql-17; the pin's SHA-256 is from postgresql-17_17.11-0+deb13u1.dsc, signed by its Debian uploader. */
const POSTGRESQL_17_SOURCE: SourceRequest = {
  package: `postgresql-${NEWER_MAJOR}`,
  suite: 'trixie',
  pinned: { poolPath: 'main/p/postgresql-17/postgresql-17_17.11.orig.tar.bz2', sha256: 'dd27f2b3c59e73ed14aa3324901242bf69a032a6347805f274e6260322d42979' },
};

const exists = (file: string) => fs.access(file).then(() => true, () => false);

/** The bin directory of the newer client, built first if it is not there yet. */
export async function ensureNewerClient(log: (line: string) => void = () => undefined): Promise<string> {
  if (await exists(COMPLETE)) return NEWER_CLIENT_DIR;
  await installBuildPackages(log);
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'pg-client-build-'));
  try {
    const source = await unpack(await fetchUpstreamTarball(POSTGRESQL_17_SOURCE, work, log));
    await build(source, log);
  } finally {
    await fs.rm(work, { recursive: true, force: true });
  }
  return NEWER_CLIENT_DIR;
}

async function missingPackages(): Promise<string[]> {
  const result = await execa('dpkg-query', ['-W', '-f=${Package} ${db:Status-Status}\n', ...BUILD_PACKAGES], { reject: false });
  const installed = new Set(String(result.stdout).split('\n').filter((line) => line.endsWith(' installed')).map((line) => line.split(' ')[0]));
  return BUILD_PACKAGES.filter((name) => !installed.has(name));
}

async function installBuildPackages(log: (line: string) => void): Promise<void> {
  const missing = await missingPackages();
  if (missing.length === 0) return;
  // As root, apt-get itself; otherwise through sudo, if it works without a password.
  const [command, ...prefix] = os.userInfo().uid === 0 ? ['apt-get'] : ['sudo', '-n', 'apt-get'];
  if (command === 'sudo' && (await execa('sudo', ['-n', 'true'], { reject: false })).exitCode !== 0) {
    throw new Error(`building pg_dump ${NEWER_MAJOR} for the tests needs these Debian packages: ${missing.join(' ')}\nInstall them: sudo apt-get install -y ${missing.join(' ')}`);
  }
  log(`installing ${missing.join(' ')}`);
  const apt = (args: string[]) => execa(command!, [...prefix, ...args], { stdout: 'ignore', env: { DEBIAN_FRONTEND: 'noninteractive' } });
  await apt(['update']);
  await apt(['install', '-y', ...missing]);
}

/** Configure and build only pg_dump, pg_restore and the libpq they link to, into PREFIX. */
async function build(source: string, log: (line: string) => void): Promise<void> {
  await fs.rm(PREFIX, { recursive: true, force: true });
  const run = (command: string, args: string[]) => execa(command, args, { cwd: source, stdout: 'ignore' });
  const jobs = `-j${os.availableParallelism()}`;
  log(`configuring ${path.basename(source)}`);
  await run('./configure', [`--prefix=${PREFIX}`, '--with-zstd', '--with-lz4', '--with-openssl', '--without-icu', '--without-readline']);
  log('building pg_dump and pg_restore');
  await run('make', [jobs, '-C', 'src/backend', 'generated-headers']);
  await run('make', [jobs, '-C', 'src/bin/pg_dump']);
  await run('make', ['-C', 'src/bin/pg_dump', 'install']);
  await run('make', ['-C', 'src/interfaces/libpq', 'install']);
  const { stdout } = await execa(path.join(NEWER_CLIENT_DIR, 'pg_dump'), ['--version']);
  if (!stdout.includes(`(PostgreSQL) ${NEWER_MAJOR}.`)) throw new Error(`the built pg_dump says "${stdout}", not ${NEWER_MAJOR}`);
  await fs.writeFile(COMPLETE, `${stdout}\n`);
  log(`built ${stdout}`);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const dir = await ensureNewerClient((line) => process.stderr.write(`pg client ${NEWER_MAJOR}: ${line}\n`));
  console.log(dir);
}
