/**
 * The password never appears on a command line (visible to every user through ps), in output or
 * in any file. pg_dump is caught while it runs: the test holds an exclusive lock on a table, so
 * pg_dump waits on it (observed in pg_stat_activity, not guessed with a sleep) while /proc is read.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { startCli, tempDir, writeEnvFile } from './helpers/cli.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { holdTableLock, waitForBlockedPgDump } from './helpers/wait.ts';

let server: TestServer;
before(async () => {
  server = await startTestServer();
  await server.createDatabase('secret_app', "CREATE TABLE notes (id int, body text); INSERT INTO notes SELECT i, 'note ' || i FROM generate_series(1, 100) i");
});
after(() => server?.stop());

interface ProcessInfo {
  pid: number;
  argv: string[];
  environ: string[];
}

async function processes(): Promise<ProcessInfo[]> {
  const found: ProcessInfo[] = [];
  for (const entry of await fs.readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const [cmdline, environ] = await Promise.all([fs.readFile(`/proc/${entry}/cmdline`), fs.readFile(`/proc/${entry}/environ`)]);
      found.push({ pid: Number(entry), argv: cmdline.toString().split('\0'), environ: environ.toString().split('\0') });
    } catch {
      // The process ended while we looked, or is not ours to read.
    }
  }
  return found;
}

test('the password travels in the environment of pg_dump, never in any argv, output or file', { timeout: 60_000 }, async () => {
  const configDir = await tempDir();
  const outputDir = path.join(configDir, 'out');
  await writeEnvFile(configDir, '.env.local', {
    DEV_DB_HOST: server.host,
    DEV_DB_PORT: String(server.port),
    DEV_DB_NAME: 'secret_app',
    DEV_DB_USER: server.user,
    DEV_DB_PASSWORD: server.password,
  });

  const lock = await holdTableLock(() => server.connect('secret_app'), 'notes');
  const cli = startCli({ args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir] });
  try {
    await waitForBlockedPgDump(lock.observer);

    const all = await processes();
    const pgDump = all.filter((p) => path.basename(p.argv[0] ?? '') === 'pg_dump');
    assert.equal(pgDump.length, 1, 'caught exactly one pg_dump running');
    assert.ok(pgDump[0]!.environ.includes(`PGPASSWORD=${server.password}`), "the password is in pg_dump's environment");
    assert.ok(pgDump[0]!.argv.some((arg) => arg.startsWith('--snapshot=')), 'it is our snapshot-sharing pg_dump');
    const leaking = all.filter((p) => p.argv.some((arg) => arg.includes(server.password)));
    assert.deepEqual(leaking.map((p) => p.argv.join(' ')), [], 'no process shows the password in its command line');
  } finally {
    await lock.release();
  }

  const result = await cli;
  assert.equal(result.exitCode, 0, String(result.stderr));
  assert.ok(!String(result.stdout).includes(server.password) && !String(result.stderr).includes(server.password));
  const files = await fs.readdir(outputDir);
  assert.equal(files.length, 2, 'a dump and its metadata');
  for (const file of files) {
    const bytes = await fs.readFile(path.join(outputDir, file));
    assert.equal(bytes.indexOf(server.password), -1, `${file} does not contain the password`);
  }
});
