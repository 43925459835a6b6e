/**
 * A backup that fails after pg_dump started removes its own partial file and metadata, leaves
 * every existing backup byte-identical, and exits with the contract's code.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { publishDump } from '../backup_db.ts';
import {
  dbVars,
  directoryWithExistingBackup,
  runCli,
  startCli,
  tempDir,
  uniqueName,
  writeEnvFile,
} from './helpers/cli.ts';
import { clientDirHolding, clientDirRunning } from './helpers/clients.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { skipUnless, unmet } from './helpers/requirements.ts';
import {
  directoryFingerprint,
  holdTableLock,
  waitFor,
  waitForBlockedPgDump,
  waitForNoBackupSessions,
} from './helpers/wait.ts';

const noSetpriv = await unmet('setpriv');

let server: TestServer;
before(async () => {
  server = await startTestServer();
  await server.createDatabase(
    'fail_app',
    `
    CREATE TABLE public_notes (id int, body text);
    INSERT INTO public_notes SELECT i, 'note ' || i FROM generate_series(1, 1000) i;
    CREATE TABLE secrets (id int);
    CREATE ROLE limited LOGIN PASSWORD 'limited-pw';
    GRANT SELECT ON public_notes TO limited;`,
  );
});
after(() => server?.stop());

/** `database` as the role "limited" (SELECT on public_notes only) sees it. */
const asLimited = (database: string) => ({
  ...dbVars(server, 'DEV_DB_', database),
  DEV_DB_USER: 'limited',
  DEV_DB_PASSWORD: 'limited-pw',
});

/** A backup of `database` as "limited", into an output directory of its own. */
async function backupAsLimited(database: string) {
  const configDir = await tempDir();
  await writeEnvFile(configDir, '.env', asLimited(database));
  const outputDir = path.join(await tempDir(), 'out');
  return { outputDir, args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir] };
}

describe('failure after the dump started', () => {
  test(
    "pg_dump's server session terminated mid-run → 3 (connection lost, as the contract says), partial removed, old backup untouched",
    { timeout: 60_000 },
    async () => {
      const { outputDir, args, before: existing } = await directoryWithExistingBackup(server, 'fail_app');
      assert.equal(Object.keys(existing).length, 3, "a dump, its metadata and the lock's reserve");

      const lock = await holdTableLock(() => server.connect('fail_app'), 'public_notes');
      const cli = startCli({ args });
      try {
        const pgDumpBackend = await waitForBlockedPgDump(lock.observer);
        const partial = await waitFor('the partial file', async () =>
          (await fs.readdir(outputDir)).find((name) => name.endsWith('.dump.partial')),
        );
        assert.match(partial, /^fail_app_dev_.*\.dump\.partial$/);
        await lock.observer.query('SELECT pg_terminate_backend($1)', [pgDumpBackend]);
      } finally {
        await lock.release();
      }
      const result = await cli;

      assert.equal(result.exitCode, 3, String(result.stderr));
      assert.match(String(result.stderr), /^✗ Backup failed: pg_dump lost its connection to the server$/m);
      assert.match(String(result.stderr), /^Error: pg_dump: error: .*(terminat|server closed the connection)/m);
      assert.match(String(result.stderr), /Troubleshooting:\n {2}1\./);
      assert.deepEqual(await directoryFingerprint(outputDir), existing, 'only the earlier backup, byte for byte');
    },
  );

  test(
    'a table the user may not read → 4, refused before pg_dump starts, with its GRANT; nothing left behind',
    { timeout: 60_000 },
    async () => {
      const {
        outputDir,
        args,
        before: existing,
      } = await directoryWithExistingBackup(server, 'fail_app', asLimited('fail_app'));
      const result = await runCli({ args });
      assert.equal(result.exitCode, 4, result.stderr);
      assert.match(result.stderr, /^Error: role "limited" may not read 1 relation: public\.secrets$/m);
      assert.match(result.stderr, /GRANT SELECT ON TABLE public\.secrets TO "limited";$/m);
      assert.deepEqual(await directoryFingerprint(outputDir), existing);
      const observer = await server.connect('fail_app');
      try {
        await waitForNoBackupSessions(observer);
      } finally {
        await observer.end();
      }
    },
  );

  test('every relation the user may not read is named at once (exit 4), and the GRANTs the hint gives let it back up', async () => {
    const database = uniqueName('fail_grants');
    await server.createDatabase(database, [
      'CREATE TABLE open_t (id int)',
      'CREATE TABLE closed_t (id int)',
      'CREATE SCHEMA "Hidden"',
      'CREATE TABLE "Hidden".t (id int)',
      'CREATE TABLE parts (id int) PARTITION BY RANGE (id)',
      'CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM (0) TO (10)',
      'CREATE TABLE parts_2 PARTITION OF parts FOR VALUES FROM (10) TO (20)',
      'CREATE SEQUENCE counter_seq',
      'GRANT SELECT ON open_t, parts, parts_1, "Hidden".t TO limited',
    ]);
    const { outputDir, args } = await backupAsLimited(database);
    const result = await runCli({ args });
    assert.equal(result.exitCode, 4, result.stderr);
    assert.match(result.stderr, /^✗ Backup failed: The database user lacks a privilege$/m);
    assert.match(
      result.stderr,
      /^Error: role "limited" may not read 4 relations: "Hidden"\.t, public\.closed_t, public\.counter_seq, public\.parts_2$/m,
    );
    const grants = /^ {2}1\. To back up, as their owner or a superuser: (.+)$/m.exec(result.stderr)?.[1];
    assert.ok(grants, result.stderr);
    assert.deepEqual(
      (await fs.readdir(outputDir).catch(() => [])).filter((name) => !name.endsWith('.lock.reserve')),
      [],
    );
    const owner = await server.connect(database);
    try {
      await owner.query(grants);
    } finally {
      await owner.end();
    }
    const again = await runCli({ args });
    assert.equal(again.exitCode, 0, again.stderr);
  });

  test('a large object the user may not read → 4, with the GRANT for that large object and no restore hint', async () => {
    const database = uniqueName('fail_lo');
    await server.createDatabase(database, [
      'CREATE TABLE docs (id int, f oid)',
      "INSERT INTO docs VALUES (1, lo_from_bytea(0, 'owned by postgres'))",
      'GRANT SELECT ON docs TO limited',
    ]);
    const client = await server.connect(database);
    const oid = (await client.query<{ f: number }>('SELECT f FROM docs')).rows[0]!.f;
    await client.end();
    const { args } = await backupAsLimited(database);
    const result = await runCli({ args });
    assert.equal(result.exitCode, 4, result.stderr);
    assert.match(result.stderr, new RegExp(`permission denied for large object ${oid}`));
    assert.match(
      result.stderr,
      new RegExp(`^ {2}1\\. To back up: GRANT SELECT ON LARGE OBJECT ${oid} TO "limited"`, 'm'),
    );
    assert.doesNotMatch(result.stderr, /GRANT SELECT ON ALL TABLES|To restore/);
  });
});

describe('a lock that cannot be removed', () => {
  /** Run the backup `args` until `tool` runs with `match`; there make `outputDir` read-only (0500), then let it go on. */
  async function madeReadOnlyAt(outputDir: string, args: string[], tool: 'pg_dump' | 'pg_restore', match: string) {
    const clients = await clientDirHolding(tool, match);
    const cli = startCli({ args: [...args, '--pg-bin-dir', clients.dir], withoutRootOverride: true });
    try {
      await waitFor(`${tool} to run`, async () =>
        (await fs.stat(clients.started).catch(() => undefined)) ? true : undefined,
      );
      await fs.chmod(outputDir, 0o500);
    } finally {
      await fs.writeFile(clients.release, '');
    }
    const result = await cli.finally(() => fs.chmod(outputDir, 0o700));
    return { exitCode: result.exitCode, stdout: String(result.stdout), stderr: String(result.stderr) };
  }

  test('after a backup that succeeded: a warning, the run still succeeds', skipUnless(noSetpriv), async () => {
    // A valid copy of the earlier backup dated just ahead: retention checks it after the new backup is made.
    const { outputDir, args } = await directoryWithExistingBackup(server, 'fail_app');
    const existing = (await fs.readdir(outputDir)).find((name) => name.endsWith('.dump'))!;
    const ahead = new Date(Math.floor(Date.now() / 1000) * 1000 + 120_000).toISOString().replace('.000', '');
    const name = `fail_app_dev_${ahead.replaceAll(':', '-')}.dump`;
    const metadataOf = (dump: string) => path.join(outputDir, dump.replace(/\.dump$/, '.metadata.json'));
    const metadata = JSON.parse(await fs.readFile(metadataOf(existing), 'utf8'));
    await fs.copyFile(path.join(outputDir, existing), path.join(outputDir, name));
    await fs.writeFile(metadataOf(name), JSON.stringify({ ...metadata, backup_file: name, backup_timestamp: ahead }));
    const rules = ['--keep-last', '1', '--dry-run'];
    const result = await madeReadOnlyAt(outputDir, [...args, ...rules], 'pg_restore', name);
    assert.equal(result.exitCode, 0, result.stdout + result.stderr);
    assert.match(result.stdout, /^✓ Backup created successfully$/m);
    assert.match(result.stderr, /^⚠ Could not remove the lock .*fail_app_dev\.lock: EACCES/m);
  });

  test(
    'after a failure: the failure is reported; the lock and the partial dump left are warnings, logged too',
    skipUnless(noSetpriv),
    async () => {
      const { outputDir, args } = await directoryWithExistingBackup(server, 'fail_app');
      const logFile = path.join(await tempDir(), 'runs.log');
      const result = await madeReadOnlyAt(outputDir, [...args, '--log-file', logFile], 'pg_dump', '--snapshot');
      assert.equal(result.exitCode, 4, result.stdout + result.stderr);
      assert.match(result.stderr, /^✗ Backup failed: Writing the metadata failed$/m);
      assert.match(result.stderr, /^⚠ Could not remove the lock .*fail_app_dev\.lock: EACCES/m);
      // The run's own partial dump stays too: named, so that no one takes it for a backup or wonders whose it is.
      const partial = (await fs.readdir(outputDir)).find((name) => name.endsWith('.dump.partial'));
      assert.ok(partial, 'the partial dump could not be removed either');
      const partialWarning = new RegExp(
        `^⚠ Could not remove this run's .*/${partial.replaceAll('.', '\\.')}: EACCES`,
        'm',
      );
      assert.match(result.stderr, partialWarning);
      assert.match(result.stderr, /the next backup of fail_app \(dev\) removes it/);
      const [run, ...events] = (await fs.readFile(logFile, 'utf8'))
        .trim()
        .split('\n')
        .map((line) => JSON.parse(line));
      assert.equal(run.outcome, 'failure');
      assert.deepEqual(
        events.map((event) => [event.event, event.for]),
        [
          ['cleanup_failed', run.time],
          ['lock_release_failed', run.time],
        ],
      );
      assert.match(events[0].error, /^EACCES: permission denied, unlink '.*\.dump\.partial'; the next backup of/);
      assert.match(events[1].error, /^EACCES: permission denied, unlink '.*fail_app_dev\.lock'; the next run takes it/);
      // As the warning says: the next backup of this database removes it.
      const next = await runCli({ args });
      assert.equal(next.exitCode, 0, next.stdout + next.stderr);
      assert.ok(!(await fs.readdir(outputDir)).includes(partial), 'the next backup removed the partial dump');
    },
  );
});

describe('the output directory removed or replaced while the backup runs', () => {
  /** A backup (`extra` options) whose pg_dump first runs `script` on the output directory `$OUT`. */
  async function backupWhile(script: string, extra: string[] = []) {
    const existing = await directoryWithExistingBackup(server, 'fail_app');
    const bin = await clientDirRunning('pg_dump', '--snapshot', script.replaceAll('$OUT', existing.outputDir));
    const result = await runCli({ args: [...existing.args, ...extra, '--pg-bin-dir', bin] });
    return { ...existing, ...result, output: `${result.stdout}${result.stderr}` };
  }

  for (const jobs of [[], ['--jobs', '2']])
    test(`removed ${jobs.join(' ') || '(one file)'}: exit 7, saying so; nothing made anew there`, async () => {
      const run = await backupWhile('rm -rf "$OUT"', jobs);
      assert.equal(run.exitCode, 7, run.output);
      assert.match(run.stderr, /^✗ Backup failed: The backup directory was removed during the run$/m);
      assert.match(run.stderr, /ENOENT|No such file or directory/, "the underlying tool's message");
      assert.match(run.stderr, /1\. Something else deleted it while the backup ran/);
      assert.equal(await fs.stat(run.outputDir).catch(() => undefined), undefined, 'not made again');
    });

  for (const jobs of [[], ['--jobs', '2']])
    test(`replaced ${jobs.join(' ') || '(one file)'}: exit 7, no backup in either directory`, async () => {
      const run = await backupWhile('mv "$OUT" "$OUT.moved" && mkdir "$OUT"', jobs);
      assert.equal(run.exitCode, 7, run.output);
      assert.match(run.stderr, /^✗ Backup failed: The backup directory was replaced during the run$/m);
      assert.match(run.stderr, /moved away, and another directory took its name/);
      assert.deepEqual(await fs.readdir(run.outputDir), [], 'nothing published in the new directory');
      const moved = await directoryFingerprint(`${run.outputDir}.moved`);
      for (const [name, hash] of Object.entries(run.before)) assert.equal(moved[name], hash, `${name} untouched`);
      const dumps = Object.keys(moved).filter((name) => name.endsWith('.dump'));
      assert.equal(dumps.length, 1, 'only the earlier backup is a .dump');
    });
});

describe('publishing the dump', () => {
  test('a failed fsync of the directory after the rename (EIO) takes the name back: no backup is claimed', async () => {
    const dir = await tempDir();
    const [partial, dump] = [path.join(dir, 'a.dump.partial'), path.join(dir, 'a.dump')];
    await fs.writeFile(partial, 'dump');
    const eio = Object.assign(new Error('EIO: i/o error, fsync'), { code: 'EIO' });
    await assert.rejects(
      publishDump(partial, dump, async () => {
        throw eio;
      }),
      eio,
    );
    assert.deepEqual(await fs.readdir(dir), ['a.dump.partial'], 'the clean-up finds its partial, not a .dump');
    await publishDump(partial, dump);
    assert.deepEqual(await fs.readdir(dir), ['a.dump']);
  });
});

describe("the server's lock table", () => {
  test(
    'too small for a lock per table in both sessions (though enough for pg_dump alone) → 7, naming max_locks_per_transaction',
    { timeout: 120_000 },
    async () => {
      // 10 × 20 lock slots (and some slack): 600 tables fit pg_dump's session, not two sessions.
      const small = await startTestServer({ settings: { max_locks_per_transaction: '10', max_connections: '20' } });
      try {
        await small.createDatabase(
          'many_tables',
          "DO $$BEGIN FOR i IN 1..600 LOOP EXECUTE format('CREATE TABLE t%s (x int)', i); END LOOP; END$$",
        );
        const configDir = await tempDir();
        const outputDir = path.join(configDir, 'out');
        await writeEnvFile(configDir, '.env', dbVars(small, 'DEV_DB_', 'many_tables'));
        const result = await runCli({ args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir] });
        assert.equal(result.exitCode, 7, result.stderr);
        assert.match(result.stderr, /^✗ Backup failed: The database server ran out of lock space$/m);
        assert.match(result.stderr, /out of shared memory/);
        assert.match(result.stderr, /1\. The server says: You might need to increase "?max_locks_per_transaction"?\./);
        assert.match(result.stderr, /twice the number of tables and partitions/);
        assert.deepEqual(await fs.readdir(outputDir), [], 'no partial, no lock file');
      } finally {
        await small.stop();
      }
    },
  );
});
