/**
 * Control which PostgreSQL client tools the CLI can find: hide the usual install locations under
 * empty tmpfs mounts in a private mount namespace (unshare; a user namespace too when not root),
 * and fake a client directory with shims that report a chosen version.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa } from 'execa';
import { tempDir } from './cli.ts';

/** The parents of the locations backup_db.ts searches, as far as they exist here. */
async function usualClientLocations(): Promise<string[]> {
  const fixed = ['/usr/lib/postgresql', '/opt/homebrew/opt', '/usr/local/opt', '/Applications/Postgres.app'];
  const pgsql = (await fs.readdir('/usr').catch(() => [] as string[]))
    .filter((n) => n.startsWith('pgsql-'))
    .map((n) => `/usr/${n}`);
  const existing = [];
  for (const dir of [...fixed, ...pgsql]) if (await fs.stat(dir).catch(() => undefined)) existing.push(dir);
  return existing;
}

const which = async (command: string) => (await execa('sh', ['-c', `command -v ${command}`])).stdout.trim();

/** A wrapper command under which the usual client locations look empty. */
export async function hidingUsualClientLocations(): Promise<string[]> {
  const dirs = await usualClientLocations();
  const [unshare, mount] = await Promise.all([which('unshare'), which('mount')]);
  const namespace = os.userInfo().uid === 0 ? [unshare, '--mount'] : [unshare, '--mount', '--user', '--map-root-user'];
  const script = `n=$1; shift; while [ "$n" -gt 0 ]; do ${mount} -t tmpfs tmpfs "$1" || exit 99; shift; n=$((n-1)); done; exec "$@"`;
  return [...namespace, '/bin/sh', '-c', script, 'sh', String(dirs.length), ...dirs];
}

/**
 * A directory with pg_dump and pg_restore shims that report `version` and otherwise run the real
 * tools, logging each real invocation to `log`: proof of which client was chosen.
 */
export async function shimClientDir(version: string): Promise<{ dir: string; log: string }> {
  const dir = await tempDir('backup-db-shim-');
  const log = path.join(dir, 'invocations.log');
  for (const tool of ['pg_dump', 'pg_restore']) {
    const real = await which(tool);
    await fs.writeFile(
      path.join(dir, tool),
      `#!/bin/sh\nif [ "$1" = "--version" ]; then echo "${tool} (PostgreSQL) ${version}"; exit 0; fi\necho "${tool} $*" >> '${log}'\nexec '${real}' "$@"\n`,
      { mode: 0o755 },
    );
  }
  return { dir, log };
}

/**
 * A client directory whose `tool` holds each run whose arguments contain `match`: it creates
 * `started`, then waits (a minute at most) until `release` exists before running the real tool.
 * It keeps a backup at a point a test can see, for as long as the test needs; it writes nothing.
 */
export async function clientDirHolding(tool: 'pg_dump' | 'pg_restore', match: string) {
  const dir = await tempDir('backup-db-held-');
  const [started, release] = [path.join(dir, 'started'), path.join(dir, 'release')];
  const hold =
    `: > '${started}'; i=0\n` + `  while [ ! -e '${release}' ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done`;
  await writeClientShims(dir, tool, match, hold);
  return { dir, started, release };
}

/** A client directory whose `tool` first runs `script` (sh) on each run whose arguments contain `match`. */
export async function clientDirRunning(tool: 'pg_dump' | 'pg_restore', match: string, script: string) {
  const dir = await tempDir('backup-db-shim-');
  await writeClientShims(dir, tool, match, script);
  return dir;
}

/** pg_dump and pg_restore in `dir`, running the real tools; `tool` runs `script` first when its arguments hold `match`. */
async function writeClientShims(dir: string, tool: string, match: string, script: string): Promise<void> {
  for (const name of ['pg_dump', 'pg_restore']) {
    const before = name === tool ? `case "$*" in *'${match}'*) ${script};; esac\n` : '';
    await fs.writeFile(path.join(dir, name), `#!/bin/sh\n${before}exec '${await which(name)}' "$@"\n`, { mode: 0o755 });
  }
}

/** The newest pg_dump major on this machine, in PATH or the usual locations (a test's expectation). */
export async function newestInstalledClientMajor(): Promise<number> {
  const candidates = [await which('pg_dump').catch(() => '')];
  for (const dir of await fs.readdir('/usr/lib/postgresql').catch(() => [] as string[]))
    candidates.push(`/usr/lib/postgresql/${dir}/bin/pg_dump`);
  let newest = 0;
  for (const file of candidates.filter(Boolean)) {
    const result = await execa(file, ['--version'], { reject: false });
    const major = Number(/\(PostgreSQL\) (\d+)/.exec(String(result.stdout))?.[1] ?? 0);
    newest = Math.max(newest, major);
  }
  return newest;
}
