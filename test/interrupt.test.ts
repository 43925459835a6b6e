/**
 * Issue 4.1, interrupted runs. SIGINT/SIGTERM during pg_dump: pg_dump is stopped, this run's files
 * and lock are removed, the exit code says which signal, existing backups stay byte-identical.
 * SIGKILL (no cleanup possible): the leftover partial is never listed or verified as a backup, and
 * the next run removes it and says so.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { directoryWithExistingBackup, runCli, startCli } from './helpers/cli.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { directoryFingerprint, holdTableLock, waitForBlockedPgDump, waitForNoBackupSessions } from './helpers/wait.ts';

let server: TestServer;
before(async () => {
  server = await startTestServer();
  await server.createDatabase('int_app', "CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes SELECT i, repeat('x', 100) FROM generate_series(1, 5000) i");
});
after(() => server?.stop());

/** Start a backup and return once its pg_dump is running (waiting on a lock the test holds). */
async function backupCaughtMidDump() {
  const existing = await directoryWithExistingBackup(server, 'int_app');
  const lock = await holdTableLock(() => server.connect('int_app'), 'notes');
  const cli = startCli({ args: existing.args });
  await waitForBlockedPgDump(lock.observer);
  const names = await fs.readdir(existing.outputDir);
  assert.ok(names.some((name) => name.endsWith('.dump.partial')), 'the partial file exists while pg_dump runs');
  assert.ok(names.includes('int_app_dev.lock'), 'the lock is held while the backup runs');
  return { ...existing, lock, cli };
}

async function assertNoBackupSessionLeft() {
  const client = await server.connect('int_app');
  try {
    await waitForNoBackupSessions(client);
  } finally {
    await client.end();
  }
}

describe('interrupted by a signal', () => {
  for (const [signal, code] of [['SIGINT', 130], ['SIGTERM', 143]] as const) {
    test(`${signal} during pg_dump → exit ${code}, one-line reason, nothing left, old backup byte-identical`, { timeout: 60_000 }, async () => {
      const run = await backupCaughtMidDump();
      try {
        run.cli.kill(signal);
        const result = await run.cli;
        assert.equal(result.exitCode, code, String(result.stderr));
        const stderr = String(result.stderr);
        assert.match(stderr.split('\n')[0]!, new RegExp(`^✗ Backup failed: Interrupted by ${signal}$`));
        assert.doesNotMatch(stderr, /\n\s+at .+:\d+:\d+/, 'no stack trace');
        assert.deepEqual(await directoryFingerprint(run.outputDir), run.before, 'no partial, no metadata, no lock; the old backup untouched');
      } finally {
        await run.lock.release();
      }
      await assertNoBackupSessionLeft();
    });
  }
});

describe('killed with SIGKILL', () => {
  test('the partial is shown as Incomplete and never counted or verified; the next run removes it and says so', { timeout: 90_000 }, async () => {
    const run = await backupCaughtMidDump();
    const partial = (await fs.readdir(run.outputDir)).find((name) => name.endsWith('.dump.partial'))!;
    try {
      run.cli.kill('SIGKILL');
      const killed = await run.cli;
      assert.equal(killed.signal, 'SIGKILL');
    } finally {
      // The orphaned pg_dump resumes, finds nobody reading its output, and exits.
      await run.lock.release();
    }
    await assertNoBackupSessionLeft();

    const listed = JSON.parse((await runCli({ args: ['--list', '--json', '--output-dir', run.outputDir] })).stdout);
    assert.equal(listed.backups.length, 1, 'only the earlier backup counts');
    assert.deepEqual(listed.incomplete.map((e: { file: string; status: string }) => [e.file, e.status]), [[partial, 'incomplete']], 'its lock owner is dead');
    const human = await runCli({ args: ['--list', '--output-dir', run.outputDir] });
    assert.match(human.stdout, /✗ Incomplete/);
    assert.match(human.stdout, /1 backup, 1 incomplete file/);

    const verified = await runCli({ args: ['--verify', path.join(run.outputDir, partial)] });
    assert.equal(verified.exitCode, 8);
    assert.match(verified.stderr, /not a backup file/);

    const next = await runCli({ args: run.args });
    assert.equal(next.exitCode, 0, next.stderr);
    assert.match(next.stdout, new RegExp(`^Cleaned up: {2}1 stale file left by an interrupted earlier run \\(${partial.replaceAll('.', '\\.')}\\)$`, 'm'));
    const after = await fs.readdir(run.outputDir);
    assert.ok(!after.includes(partial), 'the stale partial is gone');
    assert.ok(!after.includes('int_app_dev.lock'), 'the stale lock was taken over and released');
    assert.equal(after.filter((name) => name.endsWith('.dump')).length, 2);
    for (const [name, hash] of Object.entries(run.before)) {
      assert.equal((await directoryFingerprint(run.outputDir))[name], hash, `${name} untouched`);
    }
  });

  test('while a backup runs, its partial is listed as In progress, not Incomplete', { timeout: 60_000 }, async () => {
    const run = await backupCaughtMidDump();
    try {
      const listed = JSON.parse((await runCli({ args: ['--list', '--json', '--output-dir', run.outputDir] })).stdout);
      assert.deepEqual(listed.incomplete.map((e: { status: string }) => e.status), ['in_progress']);
      assert.match(listed.incomplete[0].problems[0], new RegExp(`being written by pid ${run.cli.pid}`));
    } finally {
      await run.lock.release();
    }
    const result = await run.cli;
    assert.equal(result.exitCode, 0, String(result.stderr));
  });
});
