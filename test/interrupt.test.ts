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
import { dbVars, directoryWithExistingBackup, runCli, startCli, type CliRun } from './helpers/cli.ts';
import { clientDirHolding } from './helpers/clients.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { alive, pgDumpsOf, processesWithEnv, within } from './helpers/processes.ts';
import { startProxy } from './helpers/proxy.ts';
import {
  directoryFingerprint,
  holdTableLock,
  waitFor,
  waitForBlockedPgDump,
  waitForNoBackupSessions,
} from './helpers/wait.ts';
import { skipUnless, unmet } from './helpers/requirements.ts';

const noBash = await unmet('bash');

let server: TestServer;
before(async () => {
  server = await startTestServer();
  await server.createDatabase(
    'int_app',
    "CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes SELECT i, repeat('x', 100) FROM generate_series(1, 5000) i",
  );
});
after(() => server?.stop());

/** Start a backup and return once its pg_dump is running (waiting on a lock the test holds). */
async function backupCaughtMidDump(options: { extraArgs?: string[] } & Omit<CliRun, 'args'> = {}) {
  const existing = await directoryWithExistingBackup(server, 'int_app');
  const lock = await holdTableLock(() => server.connect('int_app'), 'notes');
  const { extraArgs = [], ...run } = options;
  const cli = startCli({ ...run, args: [...existing.args, ...extraArgs] });
  await waitForBlockedPgDump(lock.observer);
  const names = await fs.readdir(existing.outputDir);
  assert.ok(
    names.some((name) => name.endsWith('.dump.partial')),
    'the partial file exists while pg_dump runs',
  );
  assert.ok(names.includes('int_app_dev.lock'), 'the lock is held while the backup runs');
  // The CLI's own session is named after its pid: found this way even when npx started it.
  const { rows } = await lock.observer.query<{ name: string }>(
    "SELECT application_name AS name FROM pg_stat_activity WHERE application_name ~ '^backup_db:[0-9]+:[0-9a-f]+$'",
  );
  const cliPid = Number(rows[0]!.name.split(':')[1]);
  return { ...existing, lock, cli, cliPid };
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
  for (const [signal, code] of [
    ['SIGINT', 130],
    ['SIGTERM', 143],
  ] as const) {
    test(
      `${signal} during pg_dump → exit ${code}, one-line reason, nothing left, old backup byte-identical`,
      { timeout: 60_000 },
      async () => {
        const run = await backupCaughtMidDump();
        try {
          run.cli.kill(signal);
          const result = await run.cli;
          assert.equal(result.exitCode, code, String(result.stderr));
          const stderr = String(result.stderr);
          assert.match(stderr.split('\n')[0]!, new RegExp(`^✗ Backup failed: Interrupted by ${signal}$`));
          assert.doesNotMatch(stderr, /\n\s+at .+:\d+:\d+/, 'no stack trace');
          assert.deepEqual(
            await directoryFingerprint(run.outputDir),
            run.before,
            'no partial, no metadata, no lock; the old backup untouched',
          );
        } finally {
          await run.lock.release();
        }
        await assertNoBackupSessionLeft();
      },
    );
  }
});

/** A directory with a backup of int_app, and settings that reach the server through a frozen proxy. */
async function behindFrozenProxy() {
  const proxy = await startProxy(server);
  proxy.freeze();
  const vars = { ...dbVars(server, 'DEV_DB_', 'int_app'), DEV_DB_HOST: proxy.host, DEV_DB_PORT: String(proxy.port) };
  try {
    return { proxy, existing: await directoryWithExistingBackup(server, 'int_app', vars) };
  } catch (error) {
    await proxy.close();
    throw error;
  }
}

describe('interrupted before the dump starts', () => {
  test(
    'SIGTERM while the server is slow to accept the connection: exit 143, nothing published',
    { timeout: 60_000 },
    async () => {
      // A server that takes its time: the connection waits until the test lets it through.
      const { proxy, existing } = await behindFrozenProxy();
      try {
        const cli = startCli({ args: existing.args });
        await waitFor('the backup to connect', async () => (proxy.connections > 0 ? true : undefined));
        assert.ok((await fs.readdir(existing.outputDir)).includes('int_app_dev.lock'), 'it holds the lock');
        cli.kill('SIGTERM');
        proxy.thaw();
        const result = await cli;
        assert.equal(result.exitCode, 143, String(result.stdout) + String(result.stderr));
        assert.match(String(result.stderr).split('\n')[0]!, /^✗ Backup failed: Interrupted by SIGTERM$/);
        assert.deepEqual(await directoryFingerprint(existing.outputDir), existing.before, 'no new backup, no lock');
      } finally {
        await proxy.close();
      }
      await assertNoBackupSessionLeft();
    },
  );

  const whileConnecting = [
    { mode: 'a backup', args: [], signal: 'SIGINT', code: 130, failed: 'Backup' },
    { mode: '--prune', args: ['--prune', '--keep-last', '1'], signal: 'SIGTERM', code: 143, failed: 'Pruning' },
    {
      mode: '--restore',
      args: ['--restore', '%dump', '--target-db', 'int_new'],
      signal: 'SIGHUP',
      code: 129,
      failed: 'Restore',
    },
    {
      mode: 'the drill',
      args: ['--verify', '%dump', '--restore-test'],
      signal: 'SIGTERM',
      code: 143,
      failed: 'Restore test',
    },
  ] as const;
  for (const { mode, args, signal, code, failed } of whileConnecting) {
    test(
      `${signal} while ${mode} waits for a server that never answers: exit ${code} at once, not after --connect-timeout`,
      // Long enough for a run that waits out the connect timeout to fail on the assertion, not here.
      { timeout: 120_000 },
      async () => {
        // It accepts the connection and then never answers, however long the client waits.
        const { proxy, existing } = await behindFrozenProxy();
        try {
          const dump = (await fs.readdir(existing.outputDir)).find((name) => name.endsWith('.dump'))!;
          const modeArgs = args.map((arg) => (arg === '%dump' ? path.join(existing.outputDir, dump) : arg));
          const cli = startCli({ args: [...existing.args, ...modeArgs, '--connect-timeout', '60'] });
          await waitFor(`${mode} to connect`, async () => (proxy.connections > 0 ? true : undefined));
          const signalled = Date.now();
          cli.kill(signal);
          const result = await cli;
          const waited = Date.now() - signalled;
          assert.equal(result.exitCode, code, String(result.stdout) + String(result.stderr));
          assert.ok(waited < 20_000, `it ended ${waited} ms after the signal, with 60 s left to wait`);
          assert.match(
            String(result.stderr).split('\n')[0]!,
            new RegExp(`^✗ ${failed} failed: Interrupted by ${signal}$`),
          );
          // The drill records its failure in the backup's metadata; the others leave the directory as it was.
          if (mode !== 'the drill')
            assert.deepEqual(await directoryFingerprint(existing.outputDir), existing.before, 'nothing left, no lock');
        } finally {
          await proxy.close();
        }
      },
    );
  }
  // The server answers the connection, then freezes on one of the checks made before the target is touched.
  const whileChecking = [
    { mode: '--restore', args: ['--target-db', 'int_new'], query: 'pg_try_advisory_lock', failed: 'Restore' },
    { mode: 'the drill', args: ['--restore-test'], query: 'server_version_num', failed: 'Restore test' },
  ] as const;
  for (const { mode, args, query, failed } of whileChecking) {
    test(
      `SIGINT while ${mode}'s check waits on a frozen server: exit 130 at once, no database created`,
      { timeout: 120_000 },
      async () => {
        const { proxy, existing } = await behindFrozenProxy();
        proxy.thaw();
        proxy.freezeOn(query);
        try {
          const dump = (await fs.readdir(existing.outputDir)).find((name) => name.endsWith('.dump'))!;
          const modeArgs = [mode === '--restore' ? '--restore' : '--verify', path.join(existing.outputDir, dump)];
          const cli = startCli({ args: [...existing.args, ...modeArgs, ...args] });
          await waitFor(`${mode} to send ${query}`, async () => (proxy.frozen ? true : undefined));
          const signalled = Date.now();
          cli.kill('SIGINT');
          const result = await cli;
          const waited = Date.now() - signalled;
          assert.equal(result.exitCode, 130, String(result.stdout) + String(result.stderr));
          assert.ok(waited < 20_000, `it ended ${waited} ms after the signal`);
          assert.match(
            String(result.stderr).split('\n')[0]!,
            new RegExp(`^✗ ${failed} failed: Interrupted by SIGINT$`),
          );
        } finally {
          await proxy.close();
        }
        const client = await server.connect('postgres');
        try {
          const { rows } = await client.query(
            "SELECT datname FROM pg_database WHERE datname ~ '^(int_new|backup_db_drill_)'",
          );
          assert.deepEqual(rows, [], 'no target or scratch database was created');
        } finally {
          await client.end();
        }
      },
    );
  }
});

describe('interrupted while pg_restore loads a frozen server', () => {
  const modes = [
    { mode: '--restore', args: ['--target-db', 'frz1'], failed: 'Restore', signal: 'SIGINT', code: 130 },
    { mode: 'the drill', args: ['--restore-test'], failed: 'Restore test', signal: 'SIGINT', code: 130 },
    { mode: '--restore', args: ['--target-db', 'frz2'], failed: 'Restore', signal: 'SIGTERM', code: 143 },
    { mode: 'the drill', args: ['--restore-test'], failed: 'Restore test', signal: 'SIGTERM', code: 143 },
    { mode: '--restore', args: ['--target-db', 'frz3', '--clean'], failed: 'Restore', signal: 'SIGTERM', code: 143 },
  ] as const;
  for (const { mode, args, failed, signal, code } of modes) {
    test(
      `${signal} while ${mode}'s COPY waits on a frozen server: exit ${code} within the connect timeouts, the database it left named`,
      { timeout: 120_000 },
      async () => {
        const { proxy, existing } = await behindFrozenProxy();
        const clean = (args as readonly string[]).includes('--clean');
        if (clean) await server.createDatabase('frz3', ['CREATE TABLE old_rows (id int)']);
        proxy.thaw();
        proxy.freezeOn('COPY ');
        let stderr = '';
        try {
          const dump = (await fs.readdir(existing.outputDir)).find((name) => name.endsWith('.dump'))!;
          const modeArgs = [mode === '--restore' ? '--restore' : '--verify', path.join(existing.outputDir, dump)];
          const cli = startCli({ args: [...existing.args, ...modeArgs, ...args, '--connect-timeout', '3'] });
          await waitFor(`${mode} to send COPY`, async () => (proxy.frozen ? true : undefined));
          const signalled = Date.now();
          cli.kill(signal);
          const result = await cli;
          const waited = Date.now() - signalled;
          stderr = String(result.stderr);
          assert.equal(result.exitCode, code, String(result.stdout) + stderr);
          // The drop on the frozen session, and one on a new connection, get 3 s each (--connect-timeout).
          assert.ok(waited < 30_000, `it ended ${waited} ms after the signal, the server still frozen`);
          assert.match(stderr.split('\n')[0]!, new RegExp(`^✗ ${failed} failed: Interrupted by ${signal}$`));
          assert.match(stderr, /created by this run, could not be dropped and is left on/);
          assert.match(stderr, /DROP DATABASE "(frz[123]|backup_db_drill_\w+)" WITH \(FORCE\)/);
          // One story: the old target is gone, its half-restored successor is left; nothing was cleaned up.
          assert.doesNotMatch(stderr, /no partial restore is left|cleaned up after itself/);
          if (clean) assert.match(stderr, /^"frz3" had been dropped \(--clean\): its old content is gone$/m);
        } finally {
          await proxy.close();
          const left = /DROP DATABASE ("[^"]+")/.exec(stderr)?.[1];
          const client = await server.connect('postgres');
          try {
            if (left ?? args[0] === '--target-db')
              await client.query(`DROP DATABASE IF EXISTS ${left ?? args[1]} WITH (FORCE)`);
          } finally {
            await client.end();
          }
        }
      },
    );
  }
});

// Nagios and Icinga send SIGTERM to a check that times out: the run must say so, and be recorded, like any other.
describe('--verify, --check and --list interrupted while pg_restore reads the archive', () => {
  const readers = [
    { mode: '--verify FILE', args: ['--verify', '%dump'], signal: 'SIGTERM', code: 143, failed: 'Verification' },
    {
      mode: '--check --verify',
      args: ['--check', '--max-age', '1h', '--verify'],
      signal: 'SIGINT',
      code: 130,
      failed: 'Freshness check',
    },
    { mode: '--list --verify', args: ['--list', '--verify'], signal: 'SIGHUP', code: 129, failed: 'Listing' },
  ] as const;
  for (const { mode, args, signal, code, failed } of readers) {
    test(
      `${signal} during ${mode}: exit ${code} at once, one line saying so, and a log line`,
      { timeout: 60_000 },
      async () => {
        const existing = await directoryWithExistingBackup(server, 'int_app');
        const dump = (await fs.readdir(existing.outputDir)).find((name) => name.endsWith('.dump'))!;
        const clients = await clientDirHolding('pg_restore', '--list');
        const logFile = path.join(clients.dir, 'runs.log');
        const modeArgs = args.map((arg) => (arg === '%dump' ? path.join(existing.outputDir, dump) : arg));
        const cli = startCli({
          args: [...existing.args, ...modeArgs, '--pg-bin-dir', clients.dir, '--log-file', logFile],
        });
        await waitFor('pg_restore --list to start', async () =>
          (await fs.stat(clients.started).catch(() => undefined)) ? true : undefined,
        );
        const signalled = Date.now();
        cli.kill(signal);
        const result = await cli;
        const waited = Date.now() - signalled;
        assert.equal(result.exitCode, code, `${result.signal ?? ''} ${result.stdout} ${result.stderr}`);
        // The held pg_restore would have waited a minute: the run stopped it.
        assert.ok(waited < 20_000, `it ended ${waited} ms after the signal`);
        const stderr = String(result.stderr);
        assert.match(stderr.split('\n')[0]!, new RegExp(`^✗ ${failed} failed: Interrupted by ${signal}$`));
        assert.doesNotMatch(stderr, /\n\s+at .+:\d+:\d+/, 'no stack trace');
        const [logged] = (await fs.readFile(logFile, 'utf8'))
          .trim()
          .split('\n')
          .map((line) => JSON.parse(line));
        assert.deepEqual(
          [logged.outcome, logged.exit_code, logged.error],
          ['failure', code, `Interrupted by ${signal}`],
        );
        assert.deepEqual(await directoryFingerprint(existing.outputDir), existing.before, 'the backups untouched');
      },
    );
  }
});

describe('interrupted while the client tools are being found', () => {
  const modes = [
    { mode: 'a backup', args: [], signal: 'SIGTERM', code: 143, failed: 'Backup' },
    {
      mode: '--restore',
      args: ['--restore', '%dump', '--target-db', 'int_new'],
      signal: 'SIGINT',
      code: 130,
      failed: 'Restore',
    },
  ] as const;
  for (const { mode, args, signal, code, failed } of modes) {
    test(
      `${signal} while ${mode}'s pg_dump --version does not answer: exit ${code} at once, nothing written`,
      { timeout: 60_000 },
      async () => {
        const existing = await directoryWithExistingBackup(server, 'int_app');
        const dump = (await fs.readdir(existing.outputDir)).find((name) => name.endsWith('.dump'))!;
        const modeArgs = args.map((arg) => (arg === '%dump' ? path.join(existing.outputDir, dump) : arg));
        // It holds `pg_dump --version` for a minute: longer than the run would wait for it.
        const clients = await clientDirHolding('pg_dump', '--version');
        const cli = startCli({ args: [...existing.args, ...modeArgs, '--pg-bin-dir', clients.dir] });
        await waitFor('pg_dump --version to start', async () =>
          (await fs.stat(clients.started).catch(() => null)) ? true : undefined,
        );
        const signalled = Date.now();
        cli.kill(signal);
        const result = await cli;
        const waited = Date.now() - signalled;
        assert.equal(result.exitCode, code, String(result.stdout) + String(result.stderr));
        assert.ok(waited < 10_000, `it ended ${waited} ms after the signal`);
        assert.match(
          String(result.stderr).split('\n')[0]!,
          new RegExp(`^✗ ${failed} failed: Interrupted by ${signal}$`),
        );
        assert.deepEqual(await directoryFingerprint(existing.outputDir), existing.before, 'nothing left, no lock');
      },
    );
  }
});

describe('killed with SIGKILL', () => {
  test(
    'the partial is shown as Incomplete and never counted or verified; the next run removes it and says so',
    { timeout: 90_000 },
    async () => {
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
      assert.deepEqual(
        listed.incomplete.map((e: { file: string; status: string }) => [e.file, e.status]),
        [[partial, 'incomplete']],
        'its lock owner is dead',
      );
      const human = await runCli({ args: ['--list', '--output-dir', run.outputDir] });
      assert.match(human.stdout, /✗ Incomplete/);
      assert.match(human.stdout, /1 backup, 1 incomplete file/);

      const verified = await runCli({ args: ['--verify', path.join(run.outputDir, partial)] });
      assert.equal(verified.exitCode, 8);
      assert.match(verified.stderr, /not a backup file/);

      const next = await runCli({ args: run.args });
      assert.equal(next.exitCode, 0, next.stderr);
      assert.match(
        next.stdout,
        new RegExp(
          `^Cleaned up: {2}1 stale file left by an interrupted earlier run \\(${partial.replaceAll('.', '\\.')}\\)$`,
          'm',
        ),
      );
      const after = await fs.readdir(run.outputDir);
      assert.ok(!after.includes(partial), 'the stale partial is gone');
      assert.ok(!after.includes('int_app_dev.lock'), 'the stale lock was taken over and released');
      assert.equal(after.filter((name) => name.endsWith('.dump')).length, 2);
      for (const [name, hash] of Object.entries(run.before)) {
        assert.equal((await directoryFingerprint(run.outputDir))[name], hash, `${name} untouched`);
      }
    },
  );

  test('while a backup runs, its partial is listed as In progress, not Incomplete', { timeout: 60_000 }, async () => {
    const run = await backupCaughtMidDump();
    try {
      const listed = JSON.parse((await runCli({ args: ['--list', '--json', '--output-dir', run.outputDir] })).stdout);
      assert.deepEqual(
        listed.incomplete.map((e: { status: string }) => e.status),
        ['in_progress'],
      );
      assert.match(listed.incomplete[0].problems[0], new RegExp(`being written by pid ${run.cli.pid}`));
    } finally {
      await run.lock.release();
    }
    const result = await run.cli;
    assert.equal(result.exitCode, 0, String(result.stderr));
  });
});

describe('the tool and what it started live and die together', skipUnless(await unmet('proc')), () => {
  test(
    'killed with SIGKILL while pg_dump waits on a lock: pg_dump does not outlive it by more than 2 seconds',
    { timeout: 60_000 },
    async () => {
      const run = await backupCaughtMidDump();
      try {
        assert.equal((await pgDumpsOf(run.cliPid)).length, 1, 'pg_dump is running');
        run.cli.kill('SIGKILL');
        await run.cli;
        // pg_dump waits on the table lock, so it writes nothing and no SIGPIPE could end it.
        await within('pg_dump of the killed CLI to end', 2000, async () => (await pgDumpsOf(run.cliPid)).length === 0);
      } finally {
        await run.lock.release();
      }
      await assertNoBackupSessionLeft();
    },
  );

  test(
    'killed with SIGKILL while --jobs 2 workers copy data: no pg_dump outlives it by more than 2 seconds',
    { timeout: 90_000 },
    async () => {
      // Two tables that take the workers seconds to write at gzip level 9; they write the files
      // themselves, so nothing but the tether can stop them.
      const database = 'int_big';
      await server.createDatabase(database, [
        'CREATE TABLE a (v text)',
        'CREATE TABLE b (v text)',
        'INSERT INTO a SELECT md5(i::text) || md5((-i)::text) || i FROM generate_series(1, 500000) AS i',
        'INSERT INTO b SELECT md5((-i)::text) || md5(i::text) || i FROM generate_series(1, 500000) AS i',
      ]);
      const existing = await directoryWithExistingBackup(server, 'int_app', dbVars(server, 'DEV_DB_', database));
      const cli = startCli({ args: [...existing.args, '--jobs', '2', '--compress', '9'] });
      try {
        await within(
          'the leader and both workers to run',
          60_000,
          async () => (await pgDumpsOf(cli.pid!)).length === 3,
        );
      } finally {
        cli.kill('SIGKILL');
      }
      await cli;
      await within(
        'every pg_dump of the killed CLI to end',
        2000,
        async () => (await pgDumpsOf(cli.pid!)).length === 0,
      );
      await assertNoBackupSessionLeft();
    },
  );

  const launchers = [
    {
      what: 'SIGTERM to npx',
      signal: 'SIGTERM' as const,
      at: 'npx',
      exitCode: 143,
      message: /^✗ Backup failed: Interrupted by SIGTERM$/m,
    },
    {
      what: 'SIGINT to npx',
      signal: 'SIGINT' as const,
      at: 'npx',
      exitCode: 130,
      message: /^✗ Backup failed: Interrupted by SIGINT$/m,
    },
    {
      what: 'SIGKILL to npx',
      signal: 'SIGKILL' as const,
      at: 'npx',
      message: /^✗ Backup failed: Interrupted: the process that started this run ended$/m,
    },
    {
      what: 'SIGKILL to tsx (the parent)',
      signal: 'SIGKILL' as const,
      at: 'tsx',
      message: /^✗ Backup failed: Interrupted: the process that started this run ended$/m,
    },
  ];
  for (const { what, signal, at, exitCode, message } of launchers) {
    test(
      `run as README says (npx tsx backup_db.ts), ${what}: the backup stops, cleans up, publishes nothing`,
      { timeout: 90_000, ...skipUnless(noBash) },
      async () => {
        const run = await backupCaughtMidDump({ viaNpx: true });
        let result;
        try {
          process.kill(at === 'npx' ? run.cli.pid! : await parentOf(run.cliPid), signal);
          await within('the CLI to stop', 15_000, async () => !(await alive(run.cliPid)));
          assert.deepEqual(await pgDumpsOf(run.cliPid), [], 'its pg_dump is gone too');
          assert.deepEqual(
            await directoryFingerprint(run.outputDir),
            run.before,
            'no partial, no metadata, no lock, no new backup',
          );
          result = await run.cli;
        } finally {
          await run.lock.release();
        }
        // npx waits for the backup to clean up and returns its exit code; killed outright, it cannot.
        if (exitCode !== undefined) assert.equal(result.exitCode, exitCode, String(result.stderr));
        assert.match(String(result.stderr), message);
        assert.doesNotMatch(String(result.stderr), /\n\s+at .+:\d+:\d+/, 'no stack trace');
        await assertNoBackupSessionLeft();
        // Had it run on, it would have published a backup once the lock was released.
        assert.deepEqual(await directoryFingerprint(run.outputDir), run.before);
      },
    );
  }

  test('SIGHUP (a closed terminal) is handled like SIGTERM: exit 129, nothing left', { timeout: 60_000 }, async () => {
    const run = await backupCaughtMidDump();
    try {
      run.cli.kill('SIGHUP');
      const result = await run.cli;
      assert.equal(result.exitCode, 129, String(result.stderr));
      assert.match(String(result.stderr), /^✗ Backup failed: Interrupted by SIGHUP$/m);
      assert.deepEqual(await directoryFingerprint(run.outputDir), run.before);
    } finally {
      await run.lock.release();
    }
    await assertNoBackupSessionLeft();
  });

  test('a backup that succeeds leaves no process behind, the tether watchers included', async () => {
    const existing = await directoryWithExistingBackup(server, 'int_app');
    // Every process the CLI starts inherits this mark, which other test files' backups lack.
    const mark = `tether-check-${process.pid}-${Date.now()}`;
    const result = await runCli({ args: existing.args, env: { BACKUP_TEST_MARK: mark } });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.deepEqual(await processesWithEnv('BACKUP_TEST_MARK', mark), []);
  });
});

async function parentOf(pid: number): Promise<number> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
}
