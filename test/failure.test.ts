/**
 * A backup that fails after pg_dump started removes its own partial file and metadata, leaves
 * every existing backup byte-identical, and exits with the contract's code.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { dbVars, runCli, startCli, tempDir, writeEnvFile } from './helpers/cli.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { directoryFingerprint, waitFor, waitForBlockedPgDump } from './helpers/wait.ts';

let server: TestServer;
before(async () => {
  server = await startTestServer();
  await server.createDatabase('fail_app');
  const client = await server.connect('fail_app');
  await client.query(`
    CREATE TABLE public_notes (id int, body text);
    INSERT INTO public_notes SELECT i, 'note ' || i FROM generate_series(1, 1000) i;
    CREATE TABLE secrets (id int);
    CREATE ROLE limited LOGIN PASSWORD 'limited-pw';
    GRANT SELECT ON public_notes TO limited;`);
  await client.end();
});
after(() => server?.stop());

/** A directory holding one real, earlier backup, and the settings to back up into it again. */
async function directoryWithExistingBackup(vars = dbVars(server, 'DEV_DB_', 'fail_app')) {
  const configDir = await tempDir();
  const outputDir = path.join(configDir, 'out');
  await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'fail_app'));
  const first = await runCli({ args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir] });
  assert.equal(first.exitCode, 0, first.stderr);
  await writeEnvFile(configDir, '.env', vars);
  const args = ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir];
  return { outputDir, args, before: await directoryFingerprint(outputDir) };
}

describe('failure after the dump started', () => {
  test('pg_dump killed mid-run (its server session terminated) → 7, partial removed, old backup untouched', { timeout: 60_000 }, async () => {
    const { outputDir, args, before: existing } = await directoryWithExistingBackup();
    assert.equal(Object.keys(existing).length, 2);

    const blocker = await server.connect('fail_app');
    const observer = await server.connect('fail_app');
    await blocker.query('BEGIN; LOCK TABLE public_notes IN ACCESS EXCLUSIVE MODE');
    const cli = startCli({ args });
    try {
      const pgDumpBackend = await waitForBlockedPgDump(observer);
      const partial = await waitFor('the partial file', async () => (await fs.readdir(outputDir)).find((name) => name.endsWith('.dump.partial')));
      assert.match(partial, /^fail_app_dev_.*\.dump\.partial$/);
      await observer.query('SELECT pg_terminate_backend($1)', [pgDumpBackend]);
    } finally {
      await blocker.query('ROLLBACK');
      await Promise.all([blocker.end(), observer.end()]);
    }
    const result = await cli;

    assert.equal(result.exitCode, 7, String(result.stderr));
    assert.match(String(result.stderr), /^✗ Backup failed: pg_dump failed$/m);
    assert.match(String(result.stderr), /^Error: pg_dump: error: .*(terminat|server closed the connection)/m);
    assert.match(String(result.stderr), /Troubleshooting:\n {2}1\./);
    assert.deepEqual(await directoryFingerprint(outputDir), existing, 'only the earlier backup, byte for byte');
  });

  test('a table the user may not read → 4; pg_dump and the counting both stop; nothing left behind', { timeout: 60_000 }, async () => {
    const { outputDir, args, before: existing } = await directoryWithExistingBackup({
      ...dbVars(server, 'DEV_DB_', 'fail_app'),
      DEV_DB_USER: 'limited',
      DEV_DB_PASSWORD: 'limited-pw',
    });
    const result = await runCli({ args });
    assert.equal(result.exitCode, 4, result.stderr);
    assert.match(result.stderr, /permission denied for table secrets/);
    assert.match(result.stderr, /GRANT SELECT/);
    assert.deepEqual(await directoryFingerprint(outputDir), existing);
    // The server reaps a closed session asynchronously, so wait (bounded) for it to go.
    const observer = await server.connect('fail_app');
    try {
      await waitFor('backup sessions to end', async () => {
        const { rows } = await observer.query("SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'backup_db:%'");
        return rows.length === 0 ? true : undefined;
      }, 10_000);
    } finally {
      await observer.end();
    }
  });
});
