/**
 * What a test needs from the machine beyond Node, npm ci and the PostgreSQL client tools. Each
 * check answers undefined (present) or a one-line reason; `skipUnless` turns a reason into the
 * test's skip option. The runner (test/run.ts) fails a run with skips under CI=true, so CI still
 * proves everything while a developer's machine runs what it can.
 */
import fs from 'node:fs/promises';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { NEWER_CLIENT_DIR, NEWER_MAJOR, newerClientBuilt } from '../setup/newer-client.ts';
import { pgvectorServerBuilt } from '../setup/pgvector.ts';

export { NEWER_CLIENT_DIR, NEWER_MAJOR };

const SERVERS_PACKAGE = path.join(
  path.dirname(fileURLToPath(import.meta.url)),
  '..',
  'setup',
  'servers',
  'package.json',
);

/** unshare's options for a private pid namespace with its own /proc (as root, or in a user namespace). */
export const PID_NAMESPACE = [
  ...(os.userInfo().uid === 0 ? [] : ['--user', '--map-root-user']),
  '--pid',
  '--fork',
  '--mount-proc',
];

const onPath = async (command: string) =>
  (await execa('sh', ['-c', `command -v ${command}`], { reject: false })).exitCode === 0;
const linuxOnly = (what: string) => (os.platform() === 'linux' ? undefined : `${what} is Linux only`);

const checks = {
  /** A pg_dump and pg_restore newer than Debian 12's, built by npm run test:setup. */
  newerClient: async () =>
    (await newerClientBuilt()) ? undefined : `no pg_dump ${NEWER_MAJOR} (npm run test:setup builds it)`,
  /** PostgreSQL 13 and 14 server binaries, installed by npm run test:setup on linux-x64. */
  oldServers: async () => {
    const require = createRequire(SERVERS_PACKAGE);
    try {
      require.resolve('postgres-13-linux-x64');
      require.resolve('postgres-14-linux-x64');
      return undefined;
    } catch {
      return os.platform() === 'linux' && os.arch() === 'x64'
        ? 'no PostgreSQL 13/14 servers (npm run test:setup installs them)'
        : 'PostgreSQL 13/14 test servers exist for linux-x64 only';
    }
  },
  /** A PostgreSQL 15 server with pgvector, built by npm run test:setup. */
  pgvector: async () =>
    (await pgvectorServerBuilt()) ? undefined : 'no PostgreSQL with pgvector (npm run test:setup builds it, on Debian)',
  /** /proc: process start times, environments and parents. */
  proc: async () =>
    linuxOnly('/proc') ??
    ((await fs.access('/proc/self/stat').then(
      () => true,
      () => false,
    ))
      ? undefined
      : 'no /proc'),
  /** A tmpfs in a private mount namespace (util-linux unshare, as root or in a user namespace). */
  mountNamespace: async () => {
    if (linuxOnly('unshare')) return linuxOnly('unshare');
    const namespace = os.userInfo().uid === 0 ? ['--mount'] : ['--mount', '--user', '--map-root-user'];
    const result = await execa('unshare', [...namespace, 'sh', '-c', 'mount -t tmpfs tmpfs /mnt'], { reject: false });
    return result.exitCode === 0
      ? undefined
      : `no tmpfs in a private mount namespace here (unshare: ${String(result.stderr).trim() || result.exitCode})`;
  },
  /** A private pid namespace (util-linux unshare): a run whose pid is 1, as in a container. */
  pidNamespace: async () => {
    if (linuxOnly('unshare')) return linuxOnly('unshare');
    const result = await execa('unshare', [...PID_NAMESPACE, 'true'], { reject: false });
    return result.exitCode === 0
      ? undefined
      : `no private pid namespace here (unshare: ${String(result.stderr).trim() || result.exitCode})`;
  },
  prlimit: async () => ((await onPath('prlimit')) ? undefined : 'no prlimit (util-linux)'),
  /** Root ignores permission bits; setpriv drops that power so a root-run test meets EACCES. */
  setpriv: async () =>
    os.userInfo().uid !== 0 || (await onPath('setpriv'))
      ? undefined
      : 'no setpriv (util-linux) to drop root’s override of file permissions',
  /** A pseudo-terminal for the CLI: util-linux's script. */
  script: async () =>
    (await execa('script', ['-qec', 'true', '/dev/null'], { reject: false })).exitCode === 0
      ? undefined
      : 'no util-linux script (a pseudo-terminal)',
  openssl: async () => ((await onPath('openssl')) ? undefined : 'no openssl (for test certificates)'),
  /** The project's .npmrc runs npm scripts (npx's too) with bash. */
  bash: async () =>
    (await fs.access('/bin/bash').then(
      () => true,
      () => false,
    ))
      ? undefined
      : 'no /bin/bash',
};

export type Requirement = keyof typeof checks;

/** undefined when every requirement is met, else the reasons of those that are not, in one line. */
export async function unmet(...requirements: Requirement[]): Promise<string | undefined> {
  const reasons = (await Promise.all(requirements.map((name) => checks[name]()))).filter(Boolean);
  return reasons.length > 0 ? reasons.join('; ') : undefined;
}

/** A test's options: skipped with the reason when something it needs is missing. */
export function skipUnless(reason: string | undefined): { skip?: string } {
  return reason ? { skip: reason } : {};
}
