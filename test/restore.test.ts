/**
 * Restore and the restore drill (SC-002): real round trips through the CLI. A restored database
 * equals its source table by table; a non-empty target, a failed verification and the production
 * database are refused; a restore that hits an error never reports success; the drill's scratch
 * database is gone after success, failure and Ctrl-C; a missing extension stops a restore before
 * anything is written.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import type pg from 'pg';
import { assertSameContent, assertSameDatabases, snapshotDatabase } from './helpers/compare.ts';
import {
  dbVars,
  PROJECT_DIR,
  runCli,
  SCRIPT,
  startCli,
  takeBackup,
  tempDir,
  uniqueName,
  writeEnvFile,
  type TakenBackup,
} from './helpers/cli.ts';
import { hashFile } from '../backup_db.ts';
import { clientDirHolding, clientDirRunning } from './helpers/clients.ts';
import { FIXTURE_SQL } from './helpers/fixture.ts';
import { freePort, serverUser, startTestServer, startTestServers, type TestServer } from './helpers/pg-server.ts';
import { alive, applicationNameOf, processesWithEnv, within } from './helpers/processes.ts';
import { backendPid, flipMiddleByte, waitFor } from './helpers/wait.ts';
import { NEWER_CLIENT_DIR, PID_NAMESPACE, skipUnless, unmet } from './helpers/requirements.ts';

const noTerminal = await unmet('script');
const noProc = await unmet('proc');
const noSetpriv = await unmet('setpriv');
const noPidNamespace = await unmet('pidNamespace');
const noOldServers = await unmet('oldServers');
const noNewerClient = await unmet('newerClient');

let server: TestServer;
let pg17: TestServer;
let backup: TakenBackup;
let configDir: string;

before(async () => {
  // Prepared transactions allowed: one may hold a lock on a --clean target that no session holds.
  const main = { listenEverywhere: true, settings: { max_prepared_transactions: '2' } };
  [server, pg17] = (await startTestServers([main, { major: 17 }])) as [TestServer, TestServer];
  await server.createDatabase('rs_app', FIXTURE_SQL);
  backup = await takeBackup(server, 'rs_app', path.join(await tempDir(), 'backups'));
  configDir = await tempDir();
  // dev and prod live on the same server here; prod's database is rs_prod.
  await writeEnvFile(configDir, '.env', {
    ...dbVars(server, 'DEV_DB_', 'rs_app'),
    ...dbVars(server, 'DB_', 'rs_prod'),
  });
  await server.createDatabase('rs_prod', 'CREATE TABLE live_orders (id int); INSERT INTO live_orders VALUES (1), (2)');
});
after(() => Promise.all([server?.stop(), pg17?.stop()]));

const restore = (file: string, target: string, ...extra: string[]) =>
  runCli({ args: ['--restore', file, '--target-db', target, '--env', 'dev', '--config-dir', configDir, ...extra] });

async function withDatabase<T>(
  name: string,
  use: (client: pg.Client) => Promise<T>,
  on: TestServer = server,
): Promise<T> {
  const client = await on.connect(name);
  try {
    return await use(client);
  } finally {
    await client.end();
  }
}

/** Wait until the test server's pg_stat_activity has a session matching `where`. */
async function waitForActivity(what: string, where: string): Promise<void> {
  await waitFor(what, async () => {
    const { rows } = await withDatabase('postgres', (c) => c.query(`SELECT 1 FROM pg_stat_activity WHERE ${where}`));
    return rows.length > 0 ? true : undefined;
  });
}

async function databases(on: TestServer = server): Promise<string[]> {
  return withDatabase(
    'postgres',
    async (c) =>
      (await c.query<{ datname: string }>('SELECT datname FROM pg_database ORDER BY 1')).rows.map((r) => r.datname),
    on,
  );
}

/** A --clean target holding rows, and its snapshot, for tests that must leave it exactly as it was. */
async function targetToKeep(prefix: string) {
  const target = uniqueName(prefix);
  await server.createDatabase(target, ['CREATE TABLE precious (id int)', 'INSERT INTO precious VALUES (1), (2)']);
  return { target, before: await withDatabase(target, snapshotDatabase) };
}

/** `--restore FILE --target-db TARGET`, then `extra`, with this file's configuration. */
const restoreArgs = (file: string, target: string, ...extra: string[]) => [
  '--restore',
  file,
  '--target-db',
  target,
  ...extra,
  '--config-dir',
  configDir,
];

/**
 * Another session's open transaction that commented on `target` (as a migration might), holding the lock on the
 * database that DROP DATABASE waits for, until `release`.
 */
async function holdDatabaseLock(target: string) {
  const holder = await server.connect('postgres');
  const pid = await backendPid(holder);
  await holder.query('BEGIN');
  await holder.query(`COMMENT ON DATABASE ${target} IS 'held'`);
  const release = async () => {
    await holder.query('ROLLBACK');
    await holder.end();
  };
  return { holder, pid, release };
}

/** `target` exactly as it was (`before`), and no locale probe database left on the server. */
async function assertKeptWithoutProbe(target: string, before: unknown) {
  assert.deepEqual(await withDatabase(target, snapshotDatabase), before, 'the target is exactly as it was');
  assert.deepEqual(
    (await databases()).filter((name) => name.startsWith('backup_db_probe_')),
    [],
  );
}

/** A config directory for the test server as `role` (created with `attributes`, password 'role-pw'). */
async function configAs(role: string, attributes: string, ...settings: string[]) {
  await withDatabase('postgres', async (c) => {
    await c.query(`CREATE ROLE ${role} LOGIN ${attributes} PASSWORD 'role-pw'`);
    for (const setting of settings) await c.query(`ALTER ROLE ${role} SET ${setting}`);
  });
  const dir = await tempDir();
  await writeEnvFile(dir, '.env', {
    ...dbVars(server, 'DEV_DB_', 'rs_app'),
    DEV_DB_USER: role,
    DEV_DB_PASSWORD: 'role-pw',
  });
  return dir;
}

/** A private copy of the backup (dump + metadata) to edit. */
async function copyOfBackup(edit?: (metadata: Record<string, unknown>) => void) {
  const dir = await tempDir();
  const dumpPath = path.join(dir, path.basename(backup.dumpPath));
  const metadataPath = path.join(dir, path.basename(backup.metadataPath));
  await fs.copyFile(backup.dumpPath, dumpPath);
  const metadata = JSON.parse(await fs.readFile(backup.metadataPath, 'utf8'));
  edit?.(metadata);
  await fs.writeFile(metadataPath, JSON.stringify(metadata));
  return { dumpPath, metadataPath };
}

/**
 * `copy` with the SQL that creates `table` replaced in place by `sql` (padded with spaces: the same
 * size), then padded past its end to 2 GiB (sparse), which pg_restore never reads: its re-read takes
 * seconds, pg_restore would run the new SQL at once. The metadata claims the padded size.
 */
async function tamperedLargeCopy(copy: { dumpPath: string; metadataPath: string }, table: string, sql: string) {
  const bytes = await fs.readFile(copy.dumpPath);
  const start = bytes.indexOf(`CREATE TABLE public.${table} (`);
  const end = bytes.indexOf(');\n', start) + 3;
  assert.ok(start >= 0 && end - start >= sql.length, `the dump creates ${table}`);
  bytes.write(sql.padEnd(end - start, ' '), start);
  await fs.writeFile(copy.dumpPath, bytes);
  const size = 2 * 1024 ** 3;
  await fs.truncate(copy.dumpPath, size);
  const metadata = JSON.parse(await fs.readFile(copy.metadataPath, 'utf8'));
  await fs.writeFile(copy.metadataPath, JSON.stringify({ ...metadata, backup_size_bytes: size }));
}

/**
 * A backup whose restore waits at a gate: a table whose CHECK reads a shared catalog, which
 * holdGate locks, so pg_restore's COPY waits on it, from whichever database, for as long as the
 * test needs. Dropping a database needs pg_shdescription too, creating or dropping one does not need
 * pg_replication_origin (there pg_restore waits as it connects to the new database). `moreSql`
 * runs in its database after the gated table is made.
 */
async function gatedBackupOf(catalog = 'pg_shdescription', moreSql = ''): Promise<TakenBackup> {
  const gated = uniqueName('rs_gated');
  await server.createDatabase(gated);
  await withDatabase(gated, (c) =>
    c.query(`
      CREATE FUNCTION gate() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN PERFORM count(*) FROM pg_catalog.${catalog}; RETURN true; END $$;
      CREATE TABLE gated (id int CHECK (gate()));
      INSERT INTO gated VALUES (1);${moreSql}`),
  );
  return takeBackup(server, gated, path.join(await tempDir(), 'b'));
}

/** Lock `catalog` (of `database`, unless it is a shared one) until the holder rolls back. */
async function holdGate(catalog = 'pg_shdescription', database = 'postgres') {
  const holder = await server.connect(database);
  const observer = await server.connect('postgres');
  await holder.query(`BEGIN; LOCK TABLE pg_catalog.${catalog} IN ACCESS EXCLUSIVE MODE`);
  return { holder, observer };
}

/** How far process `pid` has read `file`, by the offset of its descriptor on it; undefined if it has none open. */
async function readOffset(pid: number, file: string): Promise<number | undefined> {
  for (const fd of await fs.readdir(`/proc/${pid}/fd`).catch(() => [])) {
    if ((await fs.readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')) !== file) continue;
    const info = await fs.readFile(`/proc/${pid}/fdinfo/${fd}`, 'utf8').catch(() => '');
    const pos = /^pos:\s+(\d+)$/m.exec(info)?.[1];
    if (pos !== undefined) return Number(pos);
  }
  return undefined;
}

/** Wait until a session (one still starting included) waits for the lock holdGate holds on `catalog`. */
async function waitAtGate(observer: pg.Client, catalog: string) {
  await waitFor(`a session to wait for ${catalog}`, async () => {
    const { rows } = await observer.query(
      'SELECT 1 FROM pg_catalog.pg_locks WHERE relation = $1::regclass AND NOT granted',
      [`pg_catalog.${catalog}`],
    );
    return rows.length > 0 ? true : undefined;
  });
}

describe('--restore', () => {
  test('into a new database: created, identical to the source table by table, counts reconciled', async () => {
    const target = uniqueName('rs_new');
    const result = await restore(backup.dumpPath, target);
    assert.equal(result.exitCode, 0, result.stderr);
    assert.match(result.stdout, /^✓ Restore completed$/m);
    assert.match(result.stdout, new RegExp(`^Target: {6}${target} on 127\\.0\\.0\\.1:\\d+ \\(created\\)$`, 'm'));
    assert.match(result.stdout, /^Tables: {6}10 of 10 match the backup's row counts$/m);
    assert.match(result.stdout, /^messages +3422 +3422 {2}✓$/m);
    await assertSameDatabases(server, 'rs_app', target);
  });

  test('pg_restore and the counts connect to the address the guard checked, never looking the name up again', async () => {
    // A name only the CLI's own process resolves: a pg_restore that looked it up again would find nothing,
    // as it might find another server if the name's DNS answer changed after the guard. When pg_restore
    // starts, the name flips to an address where no server is: the counts must not follow it.
    const host = 'db.pinned.test';
    const pinnedConfig = await tempDir();
    await writeEnvFile(pinnedConfig, '.env', { ...dbVars(server, 'DEV_DB_', 'rs_app'), DEV_DB_HOST: host });
    const flip = { file: path.join(pinnedConfig, 'flipped'), address: '127.0.0.2' };
    const clients = await clientDirRunning('pg_restore', '--exit-on-error', `: > '${flip.file}'`);
    const target = uniqueName('rs_pinned');
    const args = ['--restore', backup.dumpPath, '--target-db', target, '--env', 'dev', '--pg-bin-dir', clients];
    args.push('--config-dir', pinnedConfig);
    const result = await runCli({ args, privateDns: { host, address: server.host, flip } });
    assert.ok(existsSync(flip.file), 'the name flipped while pg_restore ran');
    assert.equal(result.exitCode, 0, result.stderr);
    assert.match(result.stdout, /^Tables: {6}10 of 10 match the backup's row counts$/m);
    await assertSameDatabases(server, 'rs_app', target);
  });

  test('into an existing empty database: used as it is', async () => {
    const target = uniqueName('rs_empty');
    await server.createDatabase(target);
    const result = await restore(backup.dumpPath, target);
    assert.equal(result.exitCode, 0, result.stderr);
    assert.match(result.stdout, /\(used empty\)$/m);
  });

  test('a non-empty target is refused and left alone; --clean drops and recreates it', async () => {
    const target = uniqueName('rs_busy');
    await server.createDatabase(target);
    await withDatabase(target, (c) =>
      c.query("CREATE TABLE precious (v text); INSERT INTO precious VALUES ('keep me')"),
    );
    const before = await withDatabase(target, snapshotDatabase);
    const refused = await restore(backup.dumpPath, target);
    assert.equal(refused.exitCode, 2);
    assert.match(refused.stderr, new RegExp(`the target database "${target}" on .* is not empty`));
    assert.match(refused.stderr, /add --clean/);
    assert.deepEqual(await withDatabase(target, snapshotDatabase), before, 'untouched');

    const cleaned = await restore(backup.dumpPath, target, '--clean');
    assert.equal(cleaned.exitCode, 0, cleaned.stderr);
    assert.match(cleaned.stdout, /\(replaced\)$/m);
    const tables = await withDatabase(
      target,
      async (c) => (await c.query("SELECT count(*)::int AS n FROM pg_tables WHERE tablename = 'precious'")).rows[0].n,
    );
    assert.equal(tables, 0, 'the old content is gone');
  });

  test('pg_restore failing after --clean dropped the target, or in an existing empty one: the message says what became of it', async () => {
    // pg_restore answers --version and --list, and prints SQL (--file=-), as the real one, and fails every restore.
    const failing = await tempDir('backup-db-failing-');
    const realRestore = (await execa('sh', ['-c', 'command -v pg_restore'])).stdout.trim();
    const realDump = (await execa('sh', ['-c', 'command -v pg_dump'])).stdout.trim();
    await fs.writeFile(path.join(failing, 'pg_dump'), `#!/bin/sh\nexec '${realDump}' "$@"\n`, { mode: 0o755 });
    await fs.writeFile(
      path.join(failing, 'pg_restore'),
      `#!/bin/sh\ncase "$*" in *--version*|*--list*|*--file=-*) exec '${realRestore}' "$@";; esac\n` +
        `echo 'pg_restore: error: simulated failure' >&2\nexit 1\n`,
      { mode: 0o755 },
    );
    const replaced = uniqueName('rs_lost_to_failure');
    await server.createDatabase(replaced, "CREATE TABLE precious (v text); INSERT INTO precious VALUES ('old')");
    const lost = await restore(backup.dumpPath, replaced, '--clean', '--pg-bin-dir', failing);
    assert.equal(lost.exitCode, 7, lost.stderr);
    assert.match(lost.stderr, /simulated failure/);
    assert.match(lost.stderr, new RegExp(`"${replaced}" had been dropped \\(--clean\\)`));
    assert.match(lost.stderr, /its old content is gone/);
    assert.match(lost.stderr, /Run the same restore again/);

    const empty = uniqueName('rs_empty_failed');
    await server.createDatabase(empty);
    const failed = await restore(backup.dumpPath, empty, '--pg-bin-dir', failing);
    assert.equal(failed.exitCode, 7, failed.stderr);
    assert.match(failed.stderr, new RegExp(`"${empty}" was an existing empty database and may now hold part of`));
    assert.ok((await databases()).includes(empty), 'not ours to drop');
  });

  test('a target holding objects but no tables (a function, a large object, a schema) is not empty', async () => {
    const holdings = [
      "CREATE FUNCTION important() RETURNS int LANGUAGE sql AS 'SELECT 42'",
      "SELECT lo_from_bytea(0, 'precious')",
      'CREATE SCHEMA app',
      "CREATE TYPE mood AS ENUM ('ok')",
    ];
    for (const setup of holdings) {
      const target = uniqueName('rs_objects');
      await server.createDatabase(target, setup);
      const before = await withDatabase(target, snapshotDatabase);
      const refused = await restore(backup.dumpPath, target);
      assert.equal(refused.exitCode, 2, `${setup}: ${refused.stderr}`);
      assert.match(refused.stderr, new RegExp(`the target database "${target}" on .* is not empty`));
      assert.deepEqual(await withDatabase(target, snapshotDatabase), before, 'untouched');
    }
    // A session's temporary table leaves its temporary schema behind: that is not content.
    const target = uniqueName('rs_temp_used');
    await server.createDatabase(target);
    await withDatabase(target, (c) => c.query('CREATE TEMPORARY TABLE scratch (v int)'));
    const used = await restore(backup.dumpPath, target);
    assert.equal(used.exitCode, 0, used.stderr);
    assert.match(used.stdout, /\(used empty\)$/m);
  });

  test('a target that takes no connections: exit 3, its hint names --target-db, not the configured database', async () => {
    const target = uniqueName('rs_noconn');
    await server.createDatabase(target, 'CREATE TABLE t (v int)');
    await withDatabase('postgres', (c) => c.query(`ALTER DATABASE ${target} ALLOW_CONNECTIONS false`));
    const result = await restore(backup.dumpPath, target);
    assert.equal(result.exitCode, 3, result.stderr);
    assert.match(result.stderr, /--target-db/);
    assert.doesNotMatch(result.stderr, /DEV_DB_NAME/);
  });

  test('a template database (template0, template1) is refused as a target (exit 2), with or without --clean', async () => {
    for (const [target, extra] of [
      ['template1', ['--clean']],
      ['template0', ['--clean']],
      ['template0', []],
    ] as const) {
      const refused = await restore(backup.dumpPath, target, ...extra);
      assert.equal(refused.exitCode, 2, `${target} ${extra}: ${refused.stderr}`);
      assert.match(refused.stderr, new RegExp(`"${target}" on .* is a template database`));
      assert.match(refused.stderr, /--target-db <new name>/);
    }
    assert.ok((await databases()).includes('template1'), 'template1 is still there');
  });

  test('a file that fails verification is refused (exit 8); --force restores it anyway and says so', async () => {
    const copy = await copyOfBackup((m) => {
      m.checksum_sha256 = '0'.repeat(64);
    });
    const target = uniqueName('rs_forced');
    const refused = await restore(copy.dumpPath, target);
    assert.equal(refused.exitCode, 8);
    assert.match(refused.stderr, /checksum mismatch/);
    assert.ok(!(await databases()).includes(target), 'nothing created');

    const forced = await restore(copy.dumpPath, target, '--force');
    assert.equal(forced.exitCode, 0, forced.stderr);
    assert.match(forced.stdout, /^Verified: {4}✗ checksum mismatch \(restored anyway: --force\)$/m);
    assert.match(forced.stdout, /10 of 10 match/);
  });

  test('a file whose bytes changed (exit 8): no new target is created; an existing one, with --clean, is never touched', async () => {
    const copy = await copyOfBackup();
    await flipMiddleByte(copy.dumpPath);
    const fresh = uniqueName('rs_bad_new');
    const intoNew = await restore(copy.dumpPath, fresh);
    assert.equal(intoNew.exitCode, 8, intoNew.stderr);
    assert.match(intoNew.stderr, /checksum mismatch/);
    assert.ok(!(await databases()).includes(fresh), 'never created');

    const existing = uniqueName('rs_bad_old');
    await server.createDatabase(existing, "CREATE TABLE precious (v text); INSERT INTO precious VALUES ('keep me')");
    const before = await withDatabase(existing, snapshotDatabase);
    const overExisting = await restore(copy.dumpPath, existing, '--clean');
    assert.equal(overExisting.exitCode, 8, overExisting.stderr);
    assert.deepEqual(
      await withDatabase(existing, snapshotDatabase),
      before,
      'proven bad before the existing database was dropped',
    );
  });

  test(
    'a tampered file whose SQL pg_restore would run before the re-read ends: never run, the checksum reported (exit 8)',
    {
      timeout: 120_000,
    },
    async () => {
      const keep = uniqueName('rs_keepme');
      await server.createDatabase(keep);
      const copy = await copyOfBackup();
      await tamperedLargeCopy(copy, 'project_knowledge', `DROP DATABASE ${keep} WITH (FORCE);`);
      const target = uniqueName('rs_unverified');
      const restored = await restore(copy.dumpPath, target);
      assert.equal(restored.exitCode, 8, restored.stderr);
      assert.match(restored.stderr, /^✗ Backup verification failed: checksum mismatch$/m);
      assert.match(restored.stderr, /Do not restore from this file/);
      assert.ok((await databases()).includes(keep), 'the tampered SQL never ran');
      assert.ok(!(await databases()).includes(target), 'no target left behind');

      const drill = await runCli({
        args: ['--verify', copy.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir],
      });
      assert.equal(drill.exitCode, 8, drill.stderr);
      assert.match(drill.stderr, /^✗ Backup verification failed: checksum mismatch$/m);
      assert.ok((await databases()).includes(keep), 'the tampered SQL never ran in the drill');
      assert.deepEqual(
        (await databases()).filter((name) => name.startsWith('backup_db_drill_')),
        [],
      );
      const record = JSON.parse(await fs.readFile(copy.metadataPath, 'utf8')).last_restore_test;
      assert.deepEqual([record.ok, record.error], [false, 'Backup verification failed: checksum mismatch']);
    },
  );

  test('--force goes past a damaged backup, never past no backup: missing, a directory, a FIFO are exit 8 at once', async () => {
    const dir = await tempDir();
    const fifo = path.join(dir, 'x_dev_2026-01-01T00-00-00Z.dump');
    await execa('mkfifo', [fifo]);
    const notArchive = path.join(dir, 'y_dev_2026-01-01T00-00-00Z.dump');
    await fs.mkdir(notArchive);
    for (const [file, why] of [
      [path.join(dir, 'gone_dev_2026-01-01T00-00-00Z.dump'), /backup file not found/],
      [notArchive, /not a file/],
      // Opened, a FIFO would wait for a writer for ever, deaf to Ctrl-C.
      [fifo, /not a file/],
    ] as const) {
      const target = uniqueName('rs_forced');
      const result = await restore(file, target, '--force');
      assert.equal(result.exitCode, 8, result.stderr);
      assert.match(result.stderr, why);
      assert.ok(!(await databases()).includes(target), 'nothing created');
    }
    assert.deepEqual((await fs.readdir(dir)).sort(), [path.basename(fifo), path.basename(notArchive)].sort());
  });

  test('a restore that hits an error fails with exit 7, and the target it created is removed', async () => {
    const copy = await copyOfBackup();
    await flipMiddleByte(copy.dumpPath);
    const target = uniqueName('rs_broken');
    const result = await restore(copy.dumpPath, target, '--force');
    assert.equal(result.exitCode, 7, result.stdout);
    assert.match(result.stderr, /^✗ Restore failed: pg_restore failed$/m);
    assert.match(result.stderr, /pg_restore: error: /);
    assert.doesNotMatch(result.stdout, /Restore completed/);
    assert.ok(!(await databases()).includes(target), 'no half-restored database left behind');
  });

  test(
    'a count that fails after pg_restore succeeded (a login trigger restored with the rows): the target it created is removed',
    skipUnless(noNewerClient),
    async () => {
      // PostgreSQL 17's login event trigger, open only in the source database: pg_restore creates it last,
      // on its one connection (--jobs 1), and the count's new connections to the copy are refused.
      const source = uniqueName('rs_login');
      await pg17.createDatabase(source, [
        'CREATE TABLE t (v int); INSERT INTO t VALUES (1)',
        `CREATE FUNCTION deny() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN
           IF current_database() <> '${source}' THEN RAISE EXCEPTION 'logins closed here'; END IF; END $$`,
        'CREATE EVENT TRIGGER deny ON login EXECUTE FUNCTION deny()',
      ]);
      const [config, output] = [await tempDir(), await tempDir()];
      await writeEnvFile(config, '.env', dbVars(pg17, 'DEV_DB_', source));
      const common = ['--env', 'dev', '--config-dir', config, '--pg-bin-dir', NEWER_CLIENT_DIR];
      const taken = await runCli({ args: [...common, '--output-dir', output] });
      assert.equal(taken.exitCode, 0, taken.stderr);
      const dump = path.join(
        output,
        (await fs.readdir(output)).find((name) => name.endsWith('.dump'))!,
      );
      const target = uniqueName('rs_login_copy');
      const result = await runCli({ args: ['--restore', dump, '--target-db', target, '--jobs', '1', ...common] });
      assert.equal(result.exitCode, 3, result.stdout);
      assert.match(result.stderr, /logins closed here/);
      assert.doesNotMatch(result.stdout, /Restore completed/);
      assert.ok(!(await databases(pg17)).includes(target), 'no restored database left behind, unmentioned');
    },
  );

  test('tampered counts in the metadata: the restore completes but fails reconciliation (exit 8)', async () => {
    const copy = await copyOfBackup((m) => {
      (m.table_counts as Record<string, number>).messages = 9999;
    });
    const target = uniqueName('rs_tampered');
    const result = await restore(copy.dumpPath, target);
    assert.equal(result.exitCode, 8);
    assert.match(result.stderr, /^✗ Restore failed: row counts differ from the backup$/m);
    assert.match(result.stderr, /^messages +9999 +3422 {2}✗$/m);
    // Kept, as restored, to investigate: the message says so, and how to drop it.
    assert.ok((await databases()).includes(target));
    assert.match(result.stderr, new RegExp(`^"${target}" is kept as restored, to investigate$`, 'm'));
    assert.match(result.stderr, new RegExp(`Drop it when done: DROP DATABASE "${target}";$`, 'm'));
  });

  test(
    'two restores into one new target at once: one restores it, the other is refused (exit 2), never both',
    { timeout: 90_000 },
    async () => {
      const gatedBackup = await gatedBackupOf();
      const target = uniqueName('rs_race');
      const { holder, observer } = await holdGate();
      const first = startCli({
        args: restoreArgs(gatedBackup.dumpPath, target, '--env', 'dev'),
      });
      let second;
      try {
        await waitFor('the first restore to wait at the gate', async () => {
          const { rows } = await observer.query(
            "SELECT 1 FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
            [target],
          );
          return rows.length > 0 ? true : undefined;
        });
        second = await restore(gatedBackup.dumpPath, target);
      } finally {
        await holder.query('ROLLBACK');
        await Promise.all([holder.end(), observer.end()]);
      }
      assert.equal(second.exitCode, 2, second.stderr);
      assert.match(second.stderr, new RegExp(`a restore into "${target}" on .* is already running`));
      const won = await first;
      assert.equal(won.exitCode, 0, String(won.stderr));
      assert.equal(
        await withDatabase(target, async (c) => (await c.query('SELECT count(*)::int AS n FROM gated')).rows[0].n),
        1,
        'restored once',
      );
    },
  );

  test(
    'Ctrl-C while it checks a --clean target → exit 130 at once; the target, not yet dropped, stays as it was',
    { timeout: 90_000 },
    async () => {
      const target = uniqueName('rs_kept');
      await server.createDatabase(target, [
        'CREATE TABLE precious (id int PRIMARY KEY, v text)',
        "INSERT INTO precious SELECT i, 'keep me ' || i FROM generate_series(1, 1000) i",
      ]);
      const before = await withDatabase(target, snapshotDatabase);
      // The check of what the target holds reads pg_ts_template: locked there, it waits, before any drop.
      const { holder, observer } = await holdGate('pg_ts_template', target);
      const run = startCli({ args: restoreArgs(backup.dumpPath, target, '--clean', '--env', 'dev') });
      try {
        await waitAtGate(observer, 'pg_ts_template');
        run.kill('SIGINT');
        // Still locked: stopping must not wait for the check, and must not go on to the drop.
        await within('the restore to stop while its check waits', 15_000, async () => !(await alive(run.pid!)));
      } finally {
        await holder.query('ROLLBACK');
        await Promise.all([holder.end(), observer.end()]);
      }
      const result = await run;
      assert.equal(result.exitCode, 130, String(result.stderr));
      assert.match(String(result.stderr).split('\n')[0]!, /^✗ Restore failed: Interrupted by SIGINT$/);
      assert.match(String(result.stderr), /^Error: the run was stopped and cleaned up after itself; existing backups/m);
      assert.doesNotMatch(String(result.stderr), /partial file/, "a restore's own words, not a backup's");
      assert.doesNotMatch(String(result.stderr), /\n\s+at .+:\d+:\d+/, 'no stack trace');
      assert.deepEqual(await withDatabase(target, snapshotDatabase), before, 'the target is exactly as it was');
    },
  );

  test(
    "Ctrl-C while --clean's drop waits on a lock → the server cancels the drop, exit 130 at once; the target stays",
    { timeout: 90_000 },
    async () => {
      const { target, before } = await targetToKeep('rs_lockdrop');
      // A session of another role or tool, in a transaction that locks the database: DROP DATABASE waits for it.
      const { holder, release } = await holdDatabaseLock(target);
      const run = startCli({ args: restoreArgs(backup.dumpPath, target, '--clean', '--env', 'dev') });
      try {
        const dropping = `datname <> '${target}' AND query LIKE 'DROP DATABASE%' AND wait_event_type = 'Lock'`;
        await waitForActivity('the drop to wait on the lock', dropping);
        run.kill('SIGINT');
        // Still locked: cutting the connection would leave the drop waiting on the server, to run once released.
        await within('the restore to stop while its drop waits', 15_000, async () => !(await alive(run.pid!)));
        const { rows } = await holder.query(`SELECT 1 FROM pg_stat_activity WHERE query LIKE 'DROP DATABASE%'`);
        assert.deepEqual(rows, [], 'no drop is left waiting on the server');
      } finally {
        await release();
      }
      const result = await run;
      const stderr = String(result.stderr);
      assert.equal(result.exitCode, 130, stderr);
      assert.match(stderr.split('\n')[0]!, /^✗ Restore failed: Interrupted by SIGINT$/);
      assert.match(stderr, new RegExp(`"${target}" was not dropped: it is as it was`));
      assert.doesNotMatch(stderr, /had been dropped/);
      await assertKeptWithoutProbe(target, before);
    },
  );

  test(
    "--clean's drop waits for a lock past --lock-wait-timeout → exit 7 naming the holder; the target stays",
    { timeout: 90_000 },
    async () => {
      const { target, before } = await targetToKeep('rs_lockheld');
      // A migration's open transaction that touched the database (or a createdb -T copying it) holds its lock.
      const { pid, release } = await holdDatabaseLock(target);
      try {
        const result = await runCli({
          args: restoreArgs(backup.dumpPath, target, '--clean', '--env', 'dev', '--lock-wait-timeout', '1s'),
        });
        const stderr = String(result.stderr);
        assert.equal(result.exitCode, 7, stderr);
        assert.match(
          stderr.split('\n')[0]!,
          new RegExp(`^✗ Restore failed: "${target}" stayed locked by another session$`),
        );
        assert.match(stderr, /DROP DATABASE waited 1 s \(--lock-wait-timeout\) for its lock/);
        assert.match(
          stderr,
          new RegExp(`held by pid ${pid} \\(user \\w+, idle in transaction since [^)]+\\): COMMENT ON DATABASE`),
        );
        assert.match(stderr, new RegExp(`"${target}" was not dropped: it is as it was`));
        assert.match(stderr, new RegExp(`SELECT pg_terminate_backend\\(${pid}\\);`));
        assert.match(stderr, /--lock-wait-timeout 5min/);
      } finally {
        await release();
      }
      await assertKeptWithoutProbe(target, before);
    },
  );

  test(
    "--clean's target locked by a prepared transaction (no session holds it): named, with the ROLLBACK PREPARED to run",
    { timeout: 90_000 },
    async () => {
      const { target, before } = await targetToKeep('rs_prepared');
      const gid = `mig'${target}`;
      const preparer = await server.connect('postgres');
      await preparer.query('BEGIN');
      await preparer.query(`COMMENT ON DATABASE ${target} IS 'migrating'`);
      await preparer.query(`PREPARE TRANSACTION '${gid.replaceAll("'", "''")}'`);
      await preparer.end(); // gone: the prepared transaction keeps the lock
      try {
        // A role whose own lock_timeout is shorter: the locale probe's CREATE DATABASE is not the drop's to report.
        const result = await runCli({
          args: restoreArgs(backup.dumpPath, target, '--clean', '--env', 'dev', '--lock-wait-timeout', '1s'),
        });
        const stderr = String(result.stderr);
        assert.equal(result.exitCode, 7, stderr);
        assert.match(stderr, new RegExp(`held by the prepared transaction 'mig''${target}'`));
        assert.match(stderr, new RegExp(`ROLLBACK PREPARED 'mig''${target}';`));
        assert.match(stderr, /^ {2}\d\. Or wait longer for it: --lock-wait-timeout 5min/m);
        assert.match(stderr, new RegExp(`"${target}" was not dropped: it is as it was`));
      } finally {
        await withDatabase('postgres', (c) => c.query(`ROLLBACK PREPARED '${gid.replaceAll("'", "''")}'`));
      }
      assert.deepEqual(await withDatabase(target, snapshotDatabase), before, 'the target is exactly as it was');
    },
  );

  test(
    "a lock_timeout of the role's own that stops the locale probe is not reported as --clean's drop waiting",
    { timeout: 90_000 },
    async () => {
      const { target, before } = await targetToKeep('rs_roletimeout');
      const role = uniqueName('rs_hasty');
      const asRole = await configAs(role, 'SUPERUSER', "lock_timeout = '1s'");
      // pg_database itself locked: the probe's CREATE DATABASE waits, and the role's 1 s gives up first.
      const holder = await server.connect('postgres');
      await holder.query('BEGIN');
      await holder.query('LOCK TABLE pg_catalog.pg_database IN SHARE MODE');
      try {
        // The last --config-dir is the one read: this role's.
        const args = [...restoreArgs(backup.dumpPath, target, '--clean', '--env', 'dev'), '--config-dir', asRole];
        const result = await runCli({ args });
        const stderr = String(result.stderr);
        assert.notEqual(result.exitCode, 0, stderr);
        assert.doesNotMatch(stderr, /stayed locked|DROP DATABASE waited/);
      } finally {
        await holder.query('ROLLBACK');
        await holder.end();
        await withDatabase('postgres', (c) => c.query(`DROP ROLE ${role}`));
      }
      assert.deepEqual(await withDatabase(target, snapshotDatabase), before, 'the target is exactly as it was');
    },
  );

  test(
    'SIGTERM while a frozen backend holds up the drop of the locale probe → exit 143 at once, the probe named to drop',
    { timeout: 90_000 },
    async () => {
      const { target, before } = await targetToKeep('rs_frozen');
      // A backend that never answers the barrier every DROP DATABASE waits for (a process stopped, swapped out).
      const frozen = await server.connect('postgres');
      const pid = await backendPid(frozen);
      process.kill(pid, 'SIGSTOP');
      const run = startCli({ args: restoreArgs(backup.dumpPath, target, '--clean', '--env', 'dev') });
      try {
        const barrier = `query LIKE 'DROP DATABASE%backup_db_probe_%' AND wait_event = 'ProcSignalBarrier'`;
        await waitForActivity('the probe to wait for the barrier', barrier);
        run.kill('SIGTERM');
        await within('the restore to stop while the barrier waits', 15_000, async () => !(await alive(run.pid!)));
      } finally {
        process.kill(pid, 'SIGCONT');
        await frozen.end();
      }
      const result = await run;
      const stderr = String(result.stderr);
      assert.equal(result.exitCode, 143, stderr);
      // Cancelled in the barrier, the drop leaves the probe invalid: said by name, with the statement that removes it.
      const probe = (await databases()).find((name) => name.startsWith('backup_db_probe_'));
      assert.ok(probe, 'the cancelled drop leaves the probe (invalid) on the server');
      await withDatabase('postgres', (c) => c.query(`DROP DATABASE ${probe}`));
      assert.ok(stderr.includes(`DROP DATABASE "${probe}";`), stderr);
      assert.match(stderr, new RegExp(`"${probe}", an empty database made to check the backup's locale, is left`));
      assert.doesNotMatch(stderr, /cleaned up after itself/, 'not when it left a database behind');
      assert.match(stderr, new RegExp(`"${target}" was not dropped: it is as it was`));
      assert.deepEqual(await withDatabase(target, snapshotDatabase), before, 'the target is exactly as it was');
    },
  );

  test(
    'SIGHUP while it re-reads a large file, before --clean drops the target → exit 129 at once; the target stays as it was',
    { timeout: 120_000, ...skipUnless(noProc) },
    async () => {
      // Padded past its end, which pg_restore never reads: 2 GiB to re-read (sparse: no disk used).
      const copy = await copyOfBackup();
      const size = 2 * 1024 ** 3;
      await fs.truncate(copy.dumpPath, size);
      const { sha256 } = await hashFile(copy.dumpPath);
      const metadata = JSON.parse(await fs.readFile(copy.metadataPath, 'utf8'));
      await fs.writeFile(
        copy.metadataPath,
        JSON.stringify({ ...metadata, checksum_sha256: sha256, backup_size_bytes: size }),
      );
      const target = uniqueName('rs_reread');
      await server.createDatabase(target, "CREATE TABLE precious (v text); INSERT INTO precious VALUES ('keep me')");
      const before = await withDatabase(target, snapshotDatabase);
      // Held at the target check, the last step before the wait for the re-read, until the re-read is under way.
      const { holder, observer } = await holdGate('pg_ts_template', target);
      const run = startCli({ args: restoreArgs(copy.dumpPath, target, '--clean', '--env', 'dev') });
      try {
        await waitAtGate(observer, 'pg_ts_template');
        await holder.query('ROLLBACK');
        await waitFor('the target check to end', async () => {
          const { rows } = await observer.query(
            "SELECT 1 FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE 'backup_db:%'",
            [target],
          );
          return rows.length === 0 ? true : undefined;
        });
        const offset = await readOffset(run.pid!, copy.dumpPath);
        assert.ok(offset !== undefined && offset < size / 2, `the re-read is far from its end (at ${offset} bytes)`);
        run.kill('SIGHUP');
      } finally {
        await Promise.all([holder.end(), observer.end()]);
      }
      const result = await run;
      assert.equal(result.exitCode, 129, String(result.stderr));
      assert.match(String(result.stderr).split('\n')[0]!, /^✗ Restore failed: Interrupted by SIGHUP$/);
      assert.deepEqual(await withDatabase(target, snapshotDatabase), before, 'the target is exactly as it was');
    },
  );

  test(
    'SIGTERM after --clean dropped the target, while pg_restore fills its successor → exit 143: the partial one is removed, and the message says the old one is gone',
    { timeout: 90_000, ...skipUnless(noProc) },
    async () => {
      const gatedBackup = await gatedBackupOf('pg_replication_origin');
      const target = uniqueName('rs_lost');
      await server.createDatabase(target, "CREATE TABLE precious (v text); INSERT INTO precious VALUES ('old')");
      const { holder, observer } = await holdGate('pg_replication_origin');
      const run = startCli({ args: restoreArgs(gatedBackup.dumpPath, target, '--clean', '--env', 'dev') });
      // pg_restore runs with the CLI's application name in its environment.
      const pgRestores = () => processesWithEnv('PGAPPNAME', applicationNameOf(run.pid!));
      try {
        await waitAtGate(observer, 'pg_replication_origin');
        assert.ok((await pgRestores()).length > 0, 'pg_restore waits at the gate');
        run.kill('SIGTERM');
        // Once pg_restore is stopped, the run has taken the interrupt; the gate can open for its clean-up.
        await within('pg_restore to be stopped', 15_000, async () => (await pgRestores()).length === 0);
      } finally {
        await holder.query('ROLLBACK');
        await Promise.all([holder.end(), observer.end()]);
      }
      const result = await run;
      assert.equal(result.exitCode, 143, String(result.stderr));
      const stderr = String(result.stderr);
      assert.match(stderr.split('\n')[0]!, /^✗ Restore failed: Interrupted by SIGTERM$/);
      assert.match(stderr, new RegExp(`"${target}" had been dropped \\(--clean\\)`));
      assert.match(stderr, /its old content is gone/);
      assert.match(stderr, /Run the same restore again/);
      assert.ok(!(await databases()).includes(target), 'no half-restored target left behind');
    },
  );

  /**
   * A --restore into a new `target`, then a drill, of a gated backup, each cut by `cut` while pg_restore's COPY
   * waits at the gate: each exits 3 saying pg_restore lost its connection, neither leaves a database behind, and
   * the drill records nothing (README: a lost connection says nothing about the backup). Their stderr.
   */
  async function cutAtTheGate(
    target: string,
    cut: (observer: pg.Client) => Promise<void>,
    claimMayGo = false,
  ): Promise<string[]> {
    const gatedBackup = await gatedBackupOf();
    const recorded = await fs.readFile(gatedBackup.metadataPath, 'utf8');
    const drill = ['--verify', gatedBackup.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir];
    const runs = [
      { args: restoreArgs(gatedBackup.dumpPath, target, '--env', 'dev'), failed: 'Restore' },
      { args: drill, failed: 'Restore test' },
    ];
    const stderrs: string[] = [];
    for (const { args, failed } of runs) {
      const { holder, observer } = await holdGate();
      const run = startCli({ args });
      try {
        await waitAtGate(observer, 'pg_shdescription');
        await cut(observer);
      } finally {
        // Ending the holder's session rolls its lock back: the gate opens.
        await Promise.all([holder.end(), observer.end()].map((ended) => ended.catch(() => undefined)));
      }
      const result = await run;
      const stderr = String(result.stderr);
      assert.equal(result.exitCode, 3, stderr);
      // A crash ends the restore's own session too, which may be seen first: its claim on the target lost.
      const lost = failed === 'Restore' && claimMayGo ? '|The restore lost its claim on the target' : '';
      const firstLine = new RegExp(`^✗ ${failed} failed: (pg_restore lost its connection to the server${lost})$`);
      assert.match(stderr.split('\n')[0]!, firstLine);
      stderrs.push(stderr);
    }
    const left = (await databases()).filter((name) => name === target || name.startsWith('backup_db_drill_'));
    assert.deepEqual(left, [], 'no half-restored target or scratch database');
    assert.equal(await fs.readFile(gatedBackup.metadataPath, 'utf8'), recorded, 'the drill recorded nothing');
    return stderrs;
  }

  test(
    "pg_restore's session terminated mid-restore → exit 3 (connection lost), nothing left; the drill records no failure",
    { timeout: 120_000 },
    async () => {
      const stderrs = await cutAtTheGate(uniqueName('rs_cut'), async (observer) => {
        const cut = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'COPY public.gated %'";
        assert.equal((await observer.query(cut)).rowCount, 1, "pg_restore's session was found, and ended");
      });
      for (const stderr of stderrs) {
        assert.match(stderr, /terminating connection due to administrator command/);
        assert.match(stderr, /the session was terminated \(pg_terminate_backend\)/);
      }
    },
  );

  test(
    'the server crash-restarts mid-restore → exit 3; the half-restored target and scratch database are still dropped',
    { timeout: 120_000 },
    async () => {
      const stderrs = await cutAtTheGate(
        uniqueName('rs_crash'),
        async (observer) => {
          const copying = "SELECT pid FROM pg_stat_activity WHERE query LIKE 'COPY public.gated %'";
          const { pid } = (await observer.query<{ pid: number }>(copying)).rows[0]!;
          // A backend killed: the server ends every session and recovers, refusing connections meanwhile.
          process.kill(pid, 'SIGKILL');
        },
        true,
      );
      for (const stderr of stderrs) assert.doesNotMatch(stderr, /could not be dropped/);
    },
  );

  test(
    "the restore's own session terminated while pg_restore runs → it stops at once (exit 3), and a restore that took the target over keeps it",
    { timeout: 90_000 },
    async () => {
      const gatedBackup = await gatedBackupOf();
      const target = uniqueName('rs_claim');
      const { holder, observer } = await holdGate();
      const run = startCli({ args: restoreArgs(gatedBackup.dumpPath, target, '--env', 'dev') });
      const pgRestores = () => processesWithEnv('PGAPPNAME', applicationNameOf(run.pid!));
      try {
        await waitAtGate(observer, 'pg_shdescription');
        // Its session in the maintenance database ends, and its claim on the target (an advisory lock there) is
        // taken at once by another session, as a second restore's would be.
        const takeOver = `SELECT CASE WHEN pg_terminate_backend(pid, 10000) THEN pg_try_advisory_lock(hashtext('backup_db restore'), hashtext($1)) END AS ok
          FROM pg_stat_activity WHERE datname = 'postgres' AND application_name ~ ('^backup_db:' || $2 || ':')`;
        // The CLI paused meanwhile, so that the other session surely takes the claim before its clean-up can.
        process.kill(run.pid!, 'SIGSTOP');
        try {
          const { rows } = await observer.query(takeOver, [target, String(run.pid)]);
          assert.deepEqual(rows, [{ ok: true }], 'its one administrative session was ended, its claim taken');
        } finally {
          process.kill(run.pid!, 'SIGCONT');
        }
        // Still at the gate: nothing but the lost session can have stopped it.
        await within('pg_restore to be stopped', 15_000, async () => (await pgRestores()).length === 0);
      } finally {
        await holder.query('ROLLBACK');
        await holder.end();
      }
      const result = await run;
      const stderr = String(result.stderr);
      try {
        assert.equal(result.exitCode, 3, stderr);
        assert.match(stderr.split('\n')[0]!, /^✗ Restore failed: The restore lost its claim on the target$/);
        assert.match(stderr, new RegExp(`"${target}", created by this run, could not be dropped .*another restore`));
        assert.ok((await databases()).includes(target), 'the other restore keeps its target');
      } finally {
        await observer.end();
        await server.dropDatabase(target);
      }
    },
  );

  test('a missing --target-db, or restore options without --restore, are usage errors', async () => {
    assert.equal((await runCli({ args: ['--restore', backup.dumpPath] })).exitCode, 2);
    const stray = await runCli({ args: ['--target-db', 'x'] });
    assert.equal(stray.exitCode, 2);
    assert.match(stray.stderr, /--target-db only applies to --restore FILE/);
  });
});

describe("the backup's own database: its encoding and locale, its settings and comment", () => {
  /** How a database stores and sorts text, as pg_database has it (the ICU locale's column was renamed in 17). */
  const textSettings = (name: string) =>
    withDatabase('postgres', async (c) => {
      const sql = `SELECT pg_encoding_to_char(encoding) AS encoding, datcollate, datctype, datlocprovider AS provider,
          coalesce(to_jsonb(d) ->> 'daticulocale', to_jsonb(d) ->> 'datlocale') AS icu_locale
        FROM pg_database d WHERE datname = $1`;
      return (await c.query(sql, [name])).rows[0];
    });
  /** A database created by `create` (CREATE DATABASE <name> ...), filled by `setup`, and its backup. */
  async function backupOfDatabase(prefix: string, create: string, setup: string[]) {
    const source = uniqueName(prefix);
    await withDatabase('postgres', (c) => c.query(`CREATE DATABASE ${source} TEMPLATE template0 ${create}`));
    await withDatabase(source, async (c) => {
      for (const sql of setup) await c.query(sql);
    });
    return { source, backup: await takeBackup(server, source, await tempDir()) };
  }

  /** `dumpPath` restored into a new database (named from `copy`) and drilled: both count `counts` back (--json). */
  async function assertRestoredAndDrilled(dumpPath: string, copy: string, counts: Record<string, number>) {
    const restored = await restore(dumpPath, uniqueName(copy), '--json');
    assert.equal(restored.exitCode, 0, restored.stderr);
    const drill = await runCli({
      args: ['--verify', dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir, '--json'],
    });
    assert.equal(drill.exitCode, 0, drill.stderr);
    const reconciliation = Object.entries(counts).map(([table, n]) => ({ table, backup: n, restored: n, ok: true }));
    for (const run of [restored, drill]) assert.deepEqual(JSON.parse(run.stdout).reconciliation, reconciliation);
  }

  test('a LATIN1 database with C collation is restored as one, into a new target and with --clean', async () => {
    const { source, backup: taken } = await backupOfDatabase(
      'rs_latin1',
      "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'",
      ["CREATE TABLE t (id int, name text); INSERT INTO t VALUES (1, 'café'), (2, 'Zebra'), (3, 'apple')"],
    );
    const target = uniqueName('rs_latin1_copy');
    const created = await restore(taken.dumpPath, target);
    assert.equal(created.exitCode, 0, created.stderr);
    assert.deepEqual(await textSettings(target), await textSettings(source));
    assert.equal((await textSettings(target)).encoding, 'LATIN1');
    await assertSameDatabases(server, source, target);

    const replaced = uniqueName('rs_latin1_clean');
    await server.createDatabase(replaced, 'CREATE TABLE old (v int)');
    const clean = await restore(taken.dumpPath, replaced, '--clean');
    assert.equal(clean.exitCode, 0, clean.stderr);
    assert.deepEqual(await textSettings(replaced), await textSettings(source));
  });

  test('a SQL_ASCII database holding a byte that is not UTF-8 stays SQL_ASCII: its copy backs up and restores again', async () => {
    const { backup: taken } = await backupOfDatabase('rs_ascii', "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'", [
      "SET client_encoding = 'SQL_ASCII'",
      "CREATE TABLE notes (id int, body text); INSERT INTO notes VALUES (1, 'plain'), (2, convert_from('\\x63616ff6', 'SQL_ASCII'))",
    ]);
    const body = (database: string) =>
      withDatabase(database, async (c) => {
        const sql = "SELECT encode(convert_to(body, 'SQL_ASCII'), 'hex') AS hex FROM notes WHERE id = 2";
        return (await c.query<{ hex: string }>(sql)).rows[0]?.hex;
      });
    const first = uniqueName('rs_ascii_copy');
    const restored = await restore(taken.dumpPath, first);
    assert.equal(restored.exitCode, 0, restored.stderr);
    assert.equal((await textSettings(first)).encoding, 'SQL_ASCII');
    assert.equal(await body(first), '63616ff6');

    const ofCopy = await takeBackup(server, first, await tempDir());
    const second = uniqueName('rs_ascii_again');
    const again = await restore(ofCopy.dumpPath, second);
    assert.equal(again.exitCode, 0, again.stderr);
    assert.equal(await body(second), '63616ff6');

    // An existing empty UTF8 target would store the bytes unchecked: refused, left as it was.
    const empty = uniqueName('rs_utf8_empty');
    await server.createDatabase(empty);
    const refused = await restore(taken.dumpPath, empty);
    assert.equal(refused.exitCode, 2, refused.stderr);
    assert.match(refused.stderr, new RegExp(`"${empty}" on .* is UTF8, the backup's database SQL_ASCII`));
    assert.match(refused.stderr, /add --clean/);
    assert.equal(
      await withDatabase(
        empty,
        async (c) => (await c.query('SELECT count(*)::int AS n FROM pg_class WHERE oid >= 16384')).rows[0].n,
      ),
      0,
    );
  });

  test('a database whose name holds a line break, which pg_restore cannot print: restored and drilled with a warning', async () => {
    const source = `${uniqueName('rs_line')}\nbreak`;
    await server.createDatabase(source, 'CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2)');
    const taken = await takeBackup(server, source, await tempDir());
    const target = uniqueName('rs_line_copy');
    const restored = await restore(taken.dumpPath, target);
    assert.equal(restored.exitCode, 0, restored.stderr);
    const warning = /⚠ The backup's database's encoding, locale, settings and comment are not carried over: .*newline/;
    assert.match(restored.stderr, warning);
    await assertSameDatabases(server, source, target);
    const drill = await runCli({
      args: ['--verify', taken.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir],
    });
    assert.equal(drill.exitCode, 0, drill.stderr);
    assert.match(drill.stderr, warning);
  });

  test('a LATIN1 table whose name is not ASCII: counted, restored and drilled', async () => {
    // The counts' COPY names it; sent in another encoding than UTF-8, the name would not be found.
    const { backup: taken } = await backupOfDatabase('rs_latin1_name', "ENCODING 'LATIN1' LOCALE 'C'", [
      `CREATE TABLE "café" (v text); INSERT INTO "café" VALUES ('crème'), ('brûlée')`,
    ]);
    assert.deepEqual(taken.metadata.table_counts, { café: 2 });
    await assertRestoredAndDrilled(taken.dumpPath, 'rs_latin1_name_copy', { café: 2 });
  });

  test('a SQL_ASCII table of text only, holding a byte that is not UTF-8: backed up, verified, restored, drilled', async () => {
    // Counted as the server's bytes: converted to UTF-8, COPY of the text column fails on 0xf6.
    const { backup: taken } = await backupOfDatabase('rs_ascii_text', "ENCODING 'SQL_ASCII' LOCALE 'C'", [
      "SET client_encoding = 'SQL_ASCII'",
      "CREATE TABLE t (v text); INSERT INTO t VALUES ('plain'), (convert_from('\\x63616ff6', 'SQL_ASCII'))",
    ]);
    assert.deepEqual(taken.metadata.table_counts, { t: 2 });
    const verified = await runCli({ args: ['--verify', taken.dumpPath] });
    assert.equal(verified.exitCode, 0, verified.stderr);
    await assertRestoredAndDrilled(taken.dumpPath, 'rs_ascii_text_copy', { t: 2 });
  });

  test('a SQL_ASCII database whose table or column names are not UTF-8: refused (exit 7) naming them, nothing left', async () => {
    // pg_dump reads them in the database's encoding; the tool's sessions read UTF-8, which they are not.
    const source = uniqueName('rs_ascii_names');
    await withDatabase('postgres', (c) =>
      c.query(`CREATE DATABASE ${source} TEMPLATE template0 ENCODING 'SQL_ASCII' LOCALE 'C'`),
    );
    await withDatabase(source, (c) =>
      c.query(`SET client_encoding = 'SQL_ASCII';
        DO $$ BEGIN
          EXECUTE pg_catalog.format('CREATE TABLE %I (x int)', convert_from('\\x636166e9', 'SQL_ASCII'));
          EXECUTE pg_catalog.format('CREATE TABLE cafe2 (%I int)', convert_from('\\x636f6ce9', 'SQL_ASCII'));
          CREATE TABLE plain (y int);
          CREATE TABLE "naïve" ("ça" int);
        END $$`),
    );
    const outputDir = path.join(await tempDir(), 'out');
    const dir = await tempDir();
    await writeEnvFile(dir, '.env', dbVars(server, 'DEV_DB_', source));
    const result = await runCli({ args: ['--env', 'dev', '--config-dir', dir, '--output-dir', outputDir] });
    assert.equal(result.exitCode, 7, result.stderr);
    assert.match(result.stderr, /^✗ Backup failed: Names this tool cannot read in a SQL_ASCII database$/m);
    assert.match(result.stderr, /table "caf\\xe9"/);
    assert.match(result.stderr, /column "col\\xe9" of table cafe2/);
    assert.doesNotMatch(result.stderr, /plain|naïve|ça|Run it again/);
    assert.deepEqual(
      (await fs.readdir(outputDir).catch(() => [])).filter((name) => !name.endsWith('.lock.reserve')),
      [],
    );
  });

  test('an ICU database keeps its provider and ICU locale, and so its sort order', async (t) => {
    const sql = "SELECT count(*)::int AS n FROM pg_collation WHERE collprovider = 'i'";
    const icu = await withDatabase('postgres', async (c) => (await c.query<{ n: number }>(sql)).rows[0]!.n);
    if (icu === 0) return t.skip('this PostgreSQL build has no ICU');
    const { source, backup: taken } = await backupOfDatabase(
      'rs_icu',
      "LOCALE_PROVIDER icu ICU_LOCALE 'de' LOCALE 'C'",
      ["CREATE TABLE w (s text); INSERT INTO w VALUES ('a'), ('B'), ('c'), ('Ä')"],
    );
    const target = uniqueName('rs_icu_copy');
    const restored = await restore(taken.dumpPath, target);
    assert.equal(restored.exitCode, 0, restored.stderr);
    assert.deepEqual(await textSettings(target), await textSettings(source));
    const order = (database: string) =>
      withDatabase(
        database,
        async (c) => (await c.query("SELECT string_agg(s, ',' ORDER BY s) AS o FROM w")).rows[0].o,
      );
    assert.equal(await order(target), 'a,Ä,B,c');
  });

  test('a database in a tablespace whose name must be quoted keeps its encoding and locale, and no comment sets them', async () => {
    const [location, user, space] = [await tempDir(), await serverUser(), uniqueName('Fast')];
    if (user) await fs.chown(location, user.uid, user.gid);
    await withDatabase('postgres', (c) => c.query(`CREATE TABLESPACE "${space}" LOCATION '${location}'`));
    const { source, backup: taken } = await backupOfDatabase(
      'rs_space',
      `ENCODING 'LATIN1' LOCALE 'C' TABLESPACE "${space}"`,
      ['CREATE TABLE t (id int); INSERT INTO t VALUES (1)'],
    );
    // A comment holding a line in pg_dump's CREATE DATABASE form is never read as the database's.
    const forged = 'CREATE DATABASE y WITH TEMPLATE = template0 ENCODING = SQL_ASCII LOCALE = C;';
    await withDatabase('postgres', (c) => c.query(`COMMENT ON DATABASE ${source} IS E'x\\n${forged}\\ny'`));
    const commented = await takeBackup(server, source, await tempDir());
    for (const file of [taken.dumpPath, commented.dumpPath]) {
      const target = uniqueName('rs_space_copy');
      const restored = await restore(file, target);
      assert.equal(restored.exitCode, 0, restored.stderr);
      assert.doesNotMatch(restored.stderr, /⚠/);
      assert.deepEqual(await textSettings(target), await textSettings(source));
    }
  });

  test(
    'an ICU database restored to PostgreSQL 14: exit 7 saying it has no ICU provider, the --clean target intact',
    { timeout: 120_000, ...skipUnless(noOldServers) },
    async (t) => {
      const sql = "SELECT count(*)::int AS n FROM pg_collation WHERE collprovider = 'i'";
      const icu = await withDatabase('postgres', async (c) => (await c.query<{ n: number }>(sql)).rows[0]!.n);
      if (icu === 0) return t.skip('this PostgreSQL build has no ICU');
      const { backup: taken } = await backupOfDatabase('rs_icu14', "LOCALE_PROVIDER icu ICU_LOCALE 'de' LOCALE 'C'", [
        'CREATE TABLE w (s text)',
      ]);
      const pg14 = await startTestServer({ major: 14 });
      try {
        const dir = await tempDir();
        await writeEnvFile(dir, '.env', dbVars(pg14, 'DEV_DB_', 'postgres'));
        await pg14.createDatabase('kept', 'CREATE TABLE old (v int); INSERT INTO old VALUES (1)');
        const args = [
          '--restore',
          taken.dumpPath,
          '--target-db',
          'kept',
          '--clean',
          '--env',
          'dev',
          '--config-dir',
          dir,
        ];
        const refused = await runCli({ args });
        assert.equal(refused.exitCode, 7, refused.stderr);
        assert.match(
          refused.stderr,
          /PostgreSQL 14 has no ICU provider for databases: restore to PostgreSQL 15 or later/,
        );
        assert.doesNotMatch(refused.stderr, /locale-gen/);
        const kept = await withDatabase('kept', async (c) => (await c.query('SELECT v FROM old')).rows, pg14);
        assert.deepEqual(kept, [{ v: 1 }]);
      } finally {
        await pg14.stop();
      }
    },
  );

  test("its settings and comment are the target's too; one that cannot be applied (a role missing here) is a warning", async () => {
    const [source, role, gone] = [uniqueName('rs_props'), uniqueName('rs_role'), uniqueName('rs_gone')];
    await server.createDatabase(source);
    await withDatabase(source, (c) => c.query(`CREATE ROLE ${role}; CREATE ROLE ${gone}`));
    await withDatabase(source, (c) =>
      c.query(`CREATE SCHEMA app; CREATE TABLE app.t (id int); INSERT INTO app.t VALUES (1), (2);
        ALTER DATABASE ${source} SET search_path = app, public, "we'ird"; ALTER DATABASE ${source} SET statement_timeout = '7s';
        ALTER DATABASE ${source} SET "x.dir" = 'C:\\app';
        ALTER ROLE ${role} IN DATABASE ${source} SET work_mem = '77MB'; ALTER ROLE ${gone} IN DATABASE ${source} SET work_mem = '5MB';
        COMMENT ON DATABASE ${source} IS 'the app''s db; ALTER DATABASE postgres SET work_mem = ''1MB'';';
        ALTER DATABASE ${source} CONNECTION LIMIT 50`),
    );
    const taken = await takeBackup(server, source, await tempDir());
    await withDatabase('postgres', (c) => c.query(`DROP ROLE ${gone}`));
    const target = uniqueName('rs_props_copy');
    const restored = await restore(taken.dumpPath, target);
    assert.equal(restored.exitCode, 0, restored.stderr);
    assert.match(
      restored.stderr,
      new RegExp(`"${target}" did not get the backup's SET work_mem for role ${gone}: .*does not exist`),
    );
    assert.match(
      restored.stderr,
      new RegExp(`Not carried over to "${target}": the backup's database's CONNECTION LIMIT = 50`),
    );

    // What the application sees on connecting: its search_path finds t unqualified.
    const seen = await withDatabase(target, async (c) => ({
      searchPath: (await c.query('SHOW search_path')).rows[0].search_path,
      timeout: (await c.query('SHOW statement_timeout')).rows[0].statement_timeout,
      rows: (await c.query('SELECT count(*)::int AS n FROM t')).rows[0].n,
    }));
    assert.deepEqual(seen, { searchPath: `app, public, "we'ird"`, timeout: '7s', rows: 2 });
    const settings = (database: string) =>
      withDatabase('postgres', async (c) => {
        const sql = `SELECT shobj_description(d.oid, 'pg_database') AS comment,
            (SELECT array_agg(coalesce(r.rolname, '') || ' ' || s.setconfig::text ORDER BY r.rolname NULLS FIRST)
               FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole WHERE s.setdatabase = d.oid) AS settings
          FROM pg_database d WHERE datname = $1`;
        return (await c.query(sql, [database])).rows[0];
      });
    assert.deepEqual(await settings(target), await settings(source));
    // The comment's text was never run: postgres keeps its own work_mem.
    const postgres = await settings('postgres');
    assert.equal(postgres.settings, null);
  });

  test('a locale the target server lacks: exit 7 naming it, before anything is created or dropped', async () => {
    // The archive's CREATE DATABASE asks for locale 'X' (same length, so the archive stays readable).
    const copy = await copyOfBackup();
    const bytes = await fs.readFile(copy.dumpPath);
    const at = bytes.indexOf("LOCALE = 'C';");
    assert.ok(at > 0, "the archive's CREATE DATABASE has LOCALE 'C'");
    bytes.write("LOCALE = 'X';", at);
    await fs.writeFile(copy.dumpPath, bytes);
    const metadata = JSON.parse(await fs.readFile(copy.metadataPath, 'utf8'));
    const { sha256 } = await hashFile(copy.dumpPath);
    await fs.writeFile(copy.metadataPath, JSON.stringify({ ...metadata, checksum_sha256: sha256 }));

    const target = uniqueName('rs_locale');
    const created = await restore(copy.dumpPath, target);
    assert.equal(created.exitCode, 7, created.stderr);
    assert.match(created.stderr, /The target server cannot create the backup's database/);
    assert.match(created.stderr, /invalid locale name: "X".*LOCALE 'X'/);
    const existing = uniqueName('rs_locale_clean');
    await server.createDatabase(existing, 'CREATE TABLE precious (v int); INSERT INTO precious VALUES (1)');
    const clean = await restore(copy.dumpPath, existing, '--clean');
    assert.equal(clean.exitCode, 7, clean.stderr);
    const names = await databases();
    assert.ok(!names.includes(target), 'no target created');
    assert.ok(!names.some((name) => name.startsWith('backup_db_probe_')), 'no probe database left');
    const kept = await withDatabase(
      existing,
      async (c) => (await c.query('SELECT count(*)::int AS n FROM precious')).rows[0].n,
    );
    assert.equal(kept, 1, '--clean did not drop the target');
  });

  test('a table in a tablespace the target server lacks: exit 7 naming it, the --clean target intact', async () => {
    const [location, user, space] = [await tempDir(), await serverUser(), uniqueName('gone_ts')];
    if (user) await fs.chown(location, user.uid, user.gid);
    await withDatabase('postgres', (c) => c.query(`CREATE TABLESPACE ${space} LOCATION '${location}'`));
    const { source, backup: taken } = await backupOfDatabase('rs_tsapp', '', [
      `CREATE TABLE a (x int) TABLESPACE ${space}`,
      'CREATE TABLE b (y int)',
    ]);
    await withDatabase(source, (c) => c.query('ALTER TABLE a SET TABLESPACE pg_default'));
    await withDatabase('postgres', (c) => c.query(`DROP TABLESPACE ${space}`));
    const existing = uniqueName('rs_goodcopy');
    await server.createDatabase(existing, 'CREATE TABLE precious (v int); INSERT INTO precious VALUES (1), (2), (3)');
    const clean = await restore(taken.dumpPath, existing, '--clean');
    assert.equal(clean.exitCode, 7, clean.stderr);
    assert.match(clean.stderr, new RegExp(`tablespace.*${space}`));
    assert.doesNotMatch(clean.stderr, /Run the same restore again/);
    const kept = await withDatabase(
      existing,
      async (c) => (await c.query('SELECT count(*)::int AS n FROM precious')).rows[0].n,
    );
    assert.equal(kept, 3, '--clean did not drop the target');
    const target = uniqueName('rs_tsnew');
    const created = await restore(taken.dumpPath, target);
    assert.equal(created.exitCode, 7, created.stderr);
    assert.ok(!(await databases()).includes(target), 'no target created');
  });

  test(
    'a pg_restore that writes much to stderr while its script is read for tablespaces does not hang the restore',
    { timeout: 60_000 },
    async () => {
      // Past a pipe's 64 KiB, a stderr nobody drained would block pg_restore and the restore with it: execa
      // discards what it is not asked to buffer (buffer: false), which this holds to.
      const bin = await clientDirRunning('pg_restore', '--schema-only', 'head -c 262144 /dev/zero | tr "\\0" w >&2');
      const target = uniqueName('rs_noisy');
      const result = await restore(backup.dumpPath, target, '--pg-bin-dir', bin);
      assert.equal(result.exitCode, 0, result.stderr);
      await assertSameDatabases(server, 'rs_app', target);
    },
  );

  test('a policy naming a role the target server lacks: exit 7, and the hint says roles are not in the backup', async () => {
    // A name that must be quoted: the server's message quotes it without doubling its own quote.
    const role = `${uniqueName('rs_reader')} "q`;
    const quoted = `"${role.replaceAll('"', '""')}"`;
    await withDatabase('postgres', (c) => c.query(`CREATE ROLE ${quoted}`));
    const { source, backup: taken } = await backupOfDatabase('rs_roles', '', [
      'CREATE TABLE t (v int)',
      `CREATE POLICY readers ON t TO ${quoted} USING (true)`,
    ]);
    await withDatabase('postgres', async (c) => {
      await c.query(`DROP DATABASE ${source}`);
      await c.query(`DROP ROLE ${quoted}`);
    });
    const restored = await restore(taken.dumpPath, uniqueName('rs_roles_new'));
    assert.equal(restored.exitCode, 7, restored.stderr);
    assert.ok(restored.stderr.includes(`role "${role}" does not exist`), restored.stderr);
    assert.ok(restored.stderr.includes(`Roles are not in the backup (README): `), restored.stderr);
    assert.ok(restored.stderr.includes(`: CREATE ROLE ${quoted};`), restored.stderr);
  });

  test('a function whose body sets default_tablespace needs no such tablespace: it restores', async () => {
    const { backup: taken } = await backupOfDatabase('rs_tsbody', '', [
      // pg_dump prints the body as written: these lines stand alone in pg_restore's script, as a real entry's would.
      'CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$\nBEGIN\nSET default_tablespace = nowhere;\n\n--\nEND $$',
      'CREATE TABLE b (y int)',
      'INSERT INTO b VALUES (1), (2)',
    ]);
    const restored = await restore(taken.dumpPath, uniqueName('rs_tsbody_new'));
    assert.equal(restored.exitCode, 0, restored.stderr);
    assert.match(restored.stdout, /^b +2 +2 {2}✓$/m);
  });

  test("a CREATE DATABASE whose options cannot be read: the server's defaults, with a warning, never silently", async () => {
    const copy = await copyOfBackup();
    const bytes = await fs.readFile(copy.dumpPath);
    const at = bytes.indexOf("LOCALE = 'C';");
    assert.ok(at > 0, "the archive's CREATE DATABASE has LOCALE 'C'");
    bytes.write("LOCALE ~ 'C';", at);
    await fs.writeFile(copy.dumpPath, bytes);
    const metadata = JSON.parse(await fs.readFile(copy.metadataPath, 'utf8'));
    const { sha256 } = await hashFile(copy.dumpPath);
    await fs.writeFile(copy.metadataPath, JSON.stringify({ ...metadata, checksum_sha256: sha256 }));
    const restored = await restore(copy.dumpPath, uniqueName('rs_unread'));
    assert.equal(restored.exitCode, 0, restored.stderr);
    assert.match(
      restored.stderr,
      /⚠ The backup's database's encoding and locale are not carried over: .*not known here/,
    );
  });
});

describe('what a failed restore quotes: no secret, no forged line', () => {
  /** A backup of a database set up by `setup` (with roles `roles` that exist only while it is taken), then dropped. */
  async function backupWithoutRoles(roles: string[], setup: string[]) {
    const source = uniqueName('rs_quoted');
    await withDatabase('postgres', (c) => c.query(roles.map((role) => `CREATE ROLE ${role};`).join('')));
    await server.createDatabase(source, setup);
    const taken = await takeBackup(server, source, path.join(await tempDir(), 'b'));
    // The usual production-to-development restore: the roles are missing where the backup goes.
    await server.dropDatabase(source);
    await withDatabase('postgres', (c) => c.query(roles.map((role) => `DROP ROLE ${role};`).join('')));
    return taken;
  }

  test('a password in the SQL pg_restore quotes is in no channel (stderr, --json, log file), for --restore and the drill', async () => {
    const role = uniqueName('rs_mapped');
    const password = 'FdwS3cretPassw0rd';
    const taken = await backupWithoutRoles(
      [role],
      [
        'CREATE EXTENSION postgres_fdw',
        "CREATE SERVER remote FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host 'remote.example', dbname 'x')",
        `CREATE USER MAPPING FOR ${role} SERVER remote OPTIONS (user 'remote_user', password '${password}')`,
        'CREATE TABLE t (id int)',
        'INSERT INTO t VALUES (1)',
      ],
    );
    const logFile = path.join(await tempDir(), 'run.log');
    const restored = await restore(taken.dumpPath, uniqueName('rs_fdwcopy'), '--log-file', logFile);
    assert.equal(restored.exitCode, 7, restored.stderr);
    assert.match(
      restored.stderr,
      new RegExp(`^Command was: CREATE USER MAPPING FOR ${role} SERVER remote OPTIONS \\(`, 'm'),
    );
    const json = await restore(taken.dumpPath, uniqueName('rs_fdwcopy'), '--json', '--log-file', logFile);
    assert.equal(json.exitCode, 7, json.stderr);
    assert.match(JSON.parse(json.stdout).details, new RegExp(`CREATE USER MAPPING FOR ${role} SERVER remote`));
    const drill = await runCli({
      args: ['--verify', taken.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir, '--json'],
    });
    assert.equal(drill.exitCode, 7, drill.stderr);
    const channels = [restored, json, drill].flatMap((run) => [run.stdout, run.stderr]);
    for (const text of [...channels, await fs.readFile(logFile, 'utf8'), await fs.readFile(taken.metadataPath, 'utf8')])
      assert.ok(!text.includes(password), `the password is masked in:\n${text}`);
  });

  test("a row an error quotes (COPY's line under a function's context, DETAIL's failing row) is in no channel, --jobs 1 and 2, the drill", async () => {
    const token = 'sk_live_SUPERSECRET123';
    // A CHECK calling a function. Reading `plans` unqualified, it fails under pg_restore's empty
    // search_path, and COPY's line is the context's second line; true only in the source database
    // (as one reading a table restored later is, with any order of --jobs 2), the check fails and
    // DETAIL quotes the row.
    const cases = [
      [
        'RETURN EXISTS (SELECT 1 FROM plans WHERE name = p)',
        /^CONTEXT: {2}PL\/pgSQL function public\.plan_ok\(text\) line 1 at RETURN\\nCOPY users, line 1: "\*{4}"$/m,
      ],
      [
        'RETURN current_database() = %L',
        /^DETAIL: {2}Failing row contains \(\*{4}\)\.\nCONTEXT: {2}COPY users, line 1: "\*{4}"$/m,
      ],
    ] as const;
    for (const [check, masked] of cases) {
      const source = uniqueName('rs_rowdata');
      await server.createDatabase(source, [
        "CREATE TABLE plans (name text PRIMARY KEY); INSERT INTO plans VALUES ('pro')",
        `CREATE FUNCTION plan_ok(p text) RETURNS boolean LANGUAGE plpgsql STABLE
           AS $$ BEGIN ${check.replace('%L', `'${source}'`)}; END $$`,
        'CREATE TABLE users (id int, email text, api_token text, plan text CHECK (plan_ok(plan)))',
        `INSERT INTO users VALUES (1, 'alice@example.com', '${token}', 'pro')`,
      ]);
      const taken = await takeBackup(server, source, path.join(await tempDir(), 'b'));
      const logFile = path.join(await tempDir(), 'run.log');
      const single = await restore(taken.dumpPath, uniqueName('rs_rowcopy'), '--jobs', '1', '--log-file', logFile);
      assert.equal(single.exitCode, 7, single.stderr);
      assert.match(single.stderr, masked);
      const json = await restore(
        taken.dumpPath,
        uniqueName('rs_rowcopy'),
        '--jobs',
        '2',
        '--json',
        '--log-file',
        logFile,
      );
      assert.equal(json.exitCode, 7, json.stderr);
      assert.match(JSON.parse(json.stdout).details, masked);
      const drill = await runCli({
        args: [
          '--verify',
          taken.dumpPath,
          '--restore-test',
          '--env',
          'dev',
          '--config-dir',
          configDir,
          '--log-file',
          logFile,
        ],
      });
      assert.equal(drill.exitCode, 7, drill.stderr);
      assert.match(drill.stderr, masked);
      const channels = [single, json, drill].flatMap((run) => [run.stdout, run.stderr]);
      for (const text of [
        ...channels,
        await fs.readFile(logFile, 'utf8'),
        await fs.readFile(taken.metadataPath, 'utf8'),
      ])
        assert.ok(!text.includes('SUPERSECRET') && !text.includes('alice@'), `the row is masked in:\n${text}`);
    }
  });

  test('a value a COPY failure quotes (ERROR line, json DETAIL and context) is in no channel of the drill', async () => {
    // The CHECK's function casts the token, true only where z_allow holds it: restored later, it fails.
    for (const [cast, quoted] of [
      ['int > 0', /ERROR: {2}invalid input syntax for type integer: "\*{4}"$/m],
      [
        'json IS NOT NULL',
        /ERROR: {2}invalid input syntax for type json\nDETAIL: {2}\*{4}\nCONTEXT: {2}JSON data, line 1: \*{4}\\nCOPY a_main, line 1: "\*{4}"$/m,
      ],
    ] as const) {
      const source = uniqueName('rs_rowerror');
      await server.createDatabase(source, [
        'CREATE TABLE z_allow (a text)',
        `CREATE FUNCTION ok(t text) RETURNS bool LANGUAGE sql
           AS $$ SELECT EXISTS (SELECT 1 FROM public.z_allow WHERE a = t) OR t::${cast} $$`,
        'CREATE TABLE a_main (id int, token text CHECK (public.ok(token)))',
        "INSERT INTO z_allow VALUES ('tok_SECRETVALUE'); INSERT INTO a_main VALUES (1, 'tok_SECRETVALUE')",
      ]);
      const taken = await takeBackup(server, source, path.join(await tempDir(), 'b'));
      const logFile = path.join(await tempDir(), 'run.log');
      const drill = (...extra: string[]) =>
        runCli({
          args: [
            '--verify',
            taken.dumpPath,
            '--restore-test',
            '--jobs',
            '1',
            '--env',
            'dev',
            '--config-dir',
            configDir,
            ...extra,
          ],
        });
      const text = await drill('--log-file', logFile);
      const json = await drill('--json', '--log-file', logFile);
      assert.equal(text.exitCode, 7, text.stderr);
      assert.equal(json.exitCode, 7, json.stderr);
      assert.match(text.stderr, quoted);
      const channels = [text, json].flatMap((run) => [run.stdout, run.stderr]);
      for (const out of [
        ...channels,
        await fs.readFile(logFile, 'utf8'),
        await fs.readFile(taken.metadataPath, 'utf8'),
      ])
        assert.ok(!out.includes('SECRETVALUE'), `the value is masked in:\n${out}`);
    }
  });

  test('a line break in a table name, or in --target-db, never starts a line of the error', async () => {
    const role = uniqueName('rs_policy');
    const table = 'x\n\n✓ Restore completed\n\nTables:      all match';
    const taken = await backupWithoutRoles(
      [role],
      [`CREATE TABLE "${table}" (id int)`, `CREATE POLICY p ON "${table}" TO ${role} USING (true)`],
    );
    const restored = await restore(taken.dumpPath, uniqueName('rs_forged'));
    assert.equal(restored.exitCode, 7, restored.stderr);
    assert.match(
      restored.stderr,
      /^Command was: CREATE POLICY p ON public\."x ✓ Restore completed Tables: all match" TO /m,
    );
    assert.doesNotMatch(restored.stderr, /^(✓|Tables:)/m);

    const counted = await backupWithoutRoles([role], [`CREATE TABLE "${table}" (id int)`]);
    const metadata = JSON.parse(await fs.readFile(counted.metadataPath, 'utf8'));
    await fs.writeFile(counted.metadataPath, JSON.stringify({ ...metadata, table_counts: { [table]: 5 } }));
    const mismatched = await restore(counted.dumpPath, uniqueName('rs_forged'));
    assert.equal(mismatched.exitCode, 8, mismatched.stderr);
    assert.match(mismatched.stderr, /^Error: 1 of 1 tables differ .*: x\\n\\n✓ Restore completed/m);
    assert.doesNotMatch(mismatched.stderr, /^(✓|Tables:)/m);

    const suffix = uniqueName('name');
    const target = `ev\n${suffix}`;
    await server.createDatabase(target, 'CREATE TABLE t (id int)');
    const refused = await restore(backup.dumpPath, target);
    assert.equal(refused.exitCode, 2, refused.stderr);
    assert.match(refused.stderr, new RegExp(`the target database "ev\\\\n${suffix}" on .* is not empty`));
    assert.doesNotMatch(refused.stderr, new RegExp(`^${suffix}`, 'm'));
  });
});

describe('the production guard', () => {
  test('refuses the configured prod database without --env prod and --i-know-this-is-prod', async () => {
    const before = await withDatabase('rs_prod', snapshotDatabase);
    for (const extra of [['--clean'], ['--clean', '--i-know-this-is-prod']]) {
      const viaDev = await restore(backup.dumpPath, 'rs_prod', ...extra);
      assert.equal(viaDev.exitCode, 2);
      assert.match(
        viaDev.stderr,
        /refusing to restore into it: "rs_prod" on .* is the configured production database \(.*, the same cluster\); --env prod was not given/,
      );
    }
    const noFlag = await runCli({
      args: restoreArgs(backup.dumpPath, 'rs_prod', '--env', 'prod', '--clean'),
    });
    assert.equal(noFlag.exitCode, 2);
    assert.match(noFlag.stderr, /--i-know-this-is-prod was not given/);
    assert.deepEqual(await withDatabase('rs_prod', snapshotDatabase), before, 'production untouched');
  });

  test('another spelling of the production host (127.1, localhost, ::1, its socket directory) is still production', async () => {
    const before = await withDatabase('rs_prod', snapshotDatabase);
    for (const host of ['127.1', 'localhost', '::1', server.socketDir!, '127.0.0.1']) {
      const spelled = await tempDir();
      await writeEnvFile(spelled, '.env', {
        ...dbVars(server, 'DEV_DB_', 'rs_app'),
        DEV_DB_HOST: host,
        ...dbVars(server, 'DB_', 'rs_prod'),
      });
      const result = await runCli({
        args: [
          '--restore',
          backup.dumpPath,
          '--target-db',
          'rs_prod',
          '--clean',
          '--env',
          'dev',
          '--config-dir',
          spelled,
        ],
      });
      assert.equal(result.exitCode, 2, `${host}: ${result.stdout}${result.stderr}`);
      assert.match(
        result.stderr,
        /is the configured production database \(127\.0\.0\.1:\d+, the same cluster\); --env prod was not given/,
        host,
      );
    }
    assert.deepEqual(await withDatabase('rs_prod', snapshotDatabase), before, 'production untouched');
  });

  test('the same database name on another cluster is not production; a production server that cannot be identified stops --clean', async () => {
    // Production is a database on the PostgreSQL 17 server; one of that name on this server is not it.
    const name = uniqueName('rs_named');
    const elsewhere = await tempDir();
    await writeEnvFile(elsewhere, '.env', { ...dbVars(server, 'DEV_DB_', 'rs_app'), ...dbVars(pg17, 'DB_', name) });
    await server.createDatabase(name, 'CREATE TABLE local_only (v int)');
    const allowed = await runCli({
      args: ['--restore', backup.dumpPath, '--target-db', name, '--clean', '--env', 'dev', '--config-dir', elsewhere],
    });
    assert.equal(allowed.exitCode, 0, allowed.stderr);

    // Production configured on a port where nothing listens: it might be any server.
    const unreachable = await tempDir();
    const dead = await freePort();
    await writeEnvFile(unreachable, '.env', {
      ...dbVars(server, 'DEV_DB_', 'rs_app'),
      ...dbVars(server, 'DB_', name),
      DB_PORT: String(dead),
    });
    const refused = await runCli({
      args: ['--restore', backup.dumpPath, '--target-db', name, '--clean', '--env', 'dev', '--config-dir', unreachable],
    });
    assert.equal(refused.exitCode, 2, refused.stderr);
    assert.match(
      refused.stderr,
      new RegExp(
        `"${name}" may be the configured production database: the production server 127\\.0\\.0\\.1:${dead} cannot be identified, as it cannot be reached: Database connection refused; --env prod was not given`,
      ),
    );
    // Without --clean nothing can be overwritten: a new database of that name is fine.
    const fresh = uniqueName('rs_fresh');
    await writeEnvFile(unreachable, '.env', {
      ...dbVars(server, 'DEV_DB_', 'rs_app'),
      ...dbVars(server, 'DB_', fresh),
      DB_PORT: String(dead),
    });
    const created = await runCli({
      args: ['--restore', backup.dumpPath, '--target-db', fresh, '--env', 'dev', '--config-dir', unreachable],
    });
    assert.equal(created.exitCode, 0, created.stderr);
  });

  test('production settings that are invalid are not "no production": --clean into its name, or any name when unreadable, is refused', async () => {
    const name = uniqueName('rs_badprod');
    await server.createDatabase(name, 'CREATE TABLE live (v int); INSERT INTO live VALUES (1)');
    const before = await withDatabase(name, snapshotDatabase);
    const url = (query: string, database = name) =>
      `postgresql://${server.user}:${server.password}@${server.host}:${server.port}/${database}${query}`;
    const invalid: Array<Record<string, string>> = [
      { DATABASE_URL: url('?sslmode=no-verify') },
      { ...dbVars(server, 'DB_', name), DB_SSLMODE: 'verify_full', DEV_DB_SSLMODE: 'prefer' },
      { ...dbVars(server, 'DB_', name), DB_PORT: '5432x' },
      { ...dbVars(server, 'DB_', name), DB_USER: 'u'.repeat(64) },
    ];
    const dir = await tempDir();
    const restoreWith = (target: string, ...extra: string[]) =>
      runCli({
        args: ['--restore', backup.dumpPath, '--target-db', target, ...extra, '--env', 'dev', '--config-dir', dir],
      });
    for (const prodVars of invalid) {
      await writeEnvFile(dir, '.env', { ...dbVars(server, 'DEV_DB_', 'rs_app'), ...prodVars });
      const refused = await restoreWith(name, '--clean');
      assert.equal(refused.exitCode, 2, `${Object.keys(prodVars)}: ${refused.stderr}`);
      assert.match(
        refused.stderr,
        new RegExp(`"${name}" may be the configured production database: .*its settings are invalid: .*--env prod`),
      );
      assert.doesNotMatch(refused.stderr, new RegExp(server.password));
      // --env prod cannot run with these settings: the way out is to fix them.
      assert.match(refused.stderr, /Fix \(or unset\) the production settings, DATABASE_URL or DB_\*/);
      assert.doesNotMatch(refused.stderr, /--env prod --i-know-this-is-prod/);
    }
    // A URL whose database name cannot be read: production might be any database.
    await writeEnvFile(dir, '.env', { ...dbVars(server, 'DEV_DB_', 'rs_app'), DATABASE_URL: 'postgresql://[bad' });
    const other = uniqueName('rs_other');
    await server.createDatabase(other, 'CREATE TABLE t (v int)');
    const anyName = await restoreWith(other, '--clean');
    assert.equal(anyName.exitCode, 2, anyName.stderr);
    assert.match(anyName.stderr, new RegExp(`"${other}" may be the configured production database`));
    assert.deepEqual(await withDatabase(name, snapshotDatabase), before, 'production untouched');
    // Without --clean nothing can be overwritten: a new database is fine.
    const created = await restoreWith(uniqueName('rs_new'));
    assert.equal(created.exitCode, 0, created.stderr);
  });

  test('DATABASE_URL names production as libpq reads it: a percent-escaped name (prod%23db), a ?dbname= over the path', async () => {
    const name = `${uniqueName('rs_url')}#/?:+@$&,;=`;
    await server.createDatabase(name, 'CREATE TABLE live (v int); INSERT INTO live VALUES (1)');
    const before = await withDatabase(name, snapshotDatabase);
    const base = `postgresql://${server.user}:${encodeURIComponent(server.password)}@${server.host}:${server.port}`;
    for (const url of [`${base}/${encodeURIComponent(name)}`, `${base}/rs_app?dbname=${encodeURIComponent(name)}`]) {
      const dir = await tempDir();
      await writeEnvFile(dir, '.env', { ...dbVars(server, 'DEV_DB_', 'rs_app'), DATABASE_URL: url });
      const result = await runCli({
        args: ['--restore', backup.dumpPath, '--target-db', name, '--clean', '--env', 'dev', '--config-dir', dir],
      });
      assert.equal(result.exitCode, 2, `${url}: ${result.stdout}${result.stderr}`);
      assert.match(result.stderr, /is the configured production database \(.*, the same cluster\); --env prod was not/);
    }
    assert.deepEqual(await withDatabase(name, snapshotDatabase), before, 'production untouched');
  });

  test('an inherited PGSERVICE naming production does not redirect pg_restore from the server the guard checked', async () => {
    // Production is prod_db on the PostgreSQL 17 server, reached through a pg_service.conf entry.
    const name = uniqueName('rs_svc');
    await pg17.createDatabase(name, "CREATE TABLE live (v text); INSERT INTO live VALUES ('production row')");
    await server.createDatabase(name, 'CREATE TABLE scratch (v int)');
    const serviceFile = path.join(await tempDir(), 'pg_service.conf');
    const { host, port, user, password } = pg17;
    await fs.writeFile(
      serviceFile,
      `[prod]\nhost=${host}\nport=${port}\ndbname=${name}\nuser=${user}\npassword=${password}\n`,
    );
    const production = await withDatabase(name, snapshotDatabase, pg17);
    const result = await runCli({
      args: ['--restore', backup.dumpPath, '--target-db', name, '--clean', '--env', 'dev', '--config-dir', configDir],
      env: { PGSERVICEFILE: serviceFile, PGSERVICE: 'prod' },
    });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.deepEqual(await withDatabase(name, snapshotDatabase, pg17), production, 'production untouched');
    await assertSameDatabases(server, 'rs_app', name);
  });

  test(
    'on a terminal, typing the database name is the confirmation; a wrong name is refused',
    skipUnless(noTerminal),
    async () => {
      const command = (typed: string) =>
        execa(
          'script',
          [
            '-qec',
            `'${process.execPath}' --import tsx '${SCRIPT}' --restore '${backup.dumpPath}' --target-db rs_prod --env prod --clean --config-dir '${configDir}'`,
            '/dev/null',
          ],
          {
            input: `${typed}\n`,
            cwd: PROJECT_DIR,
            reject: false,
          },
        );
      const wrong = await command('rs_prd');
      assert.notEqual(wrong.exitCode, 0);
      assert.match(String(wrong.stdout), /Type its name to continue/);
      assert.match(String(wrong.stdout), /the typed name did not match/);
      assert.equal(
        await withDatabase(
          'rs_prod',
          async (c) =>
            (await c.query("SELECT count(*)::int AS n FROM pg_tables WHERE tablename = 'live_orders'")).rows[0].n,
        ),
        1,
      );

      const right = await command('rs_prod');
      assert.equal(right.exitCode, 0, String(right.stdout));
      assert.match(String(right.stdout), /Restore completed/);
    },
  );

  test(
    'on a terminal, Ctrl-C or SIGTERM at the prompt stops the run as an interrupt (exit 130, 143); production untouched',
    { timeout: 90_000, ...skipUnless(noTerminal) },
    async () => {
      const before = await withDatabase('rs_prod', snapshotDatabase);
      const atPrompt = (stop: (cli: ReturnType<typeof execa>) => Promise<void>) => {
        const cli = execa(
          'script',
          [
            '-qec',
            `'${process.execPath}' --import tsx '${SCRIPT}' --restore '${backup.dumpPath}' --target-db rs_prod --env prod --clean --config-dir '${configDir}'`,
            '/dev/null',
          ],
          { cwd: PROJECT_DIR, reject: false },
        );
        let stopped = false;
        cli.stdout!.on('data', (chunk) => {
          if (stopped || !String(chunk).includes('Type its name to continue')) return;
          stopped = true;
          void stop(cli);
        });
        return cli;
      };
      // Typed on the terminal, Ctrl-C reaches the prompt as a key, not as a signal.
      const ctrlC = await atPrompt(async (cli) => void cli.stdin!.write('\x03'));
      assert.equal(ctrlC.exitCode, 130, String(ctrlC.stdout));
      assert.match(String(ctrlC.stdout), /✗ Restore failed: Interrupted by SIGINT/);
      // SIGTERM to the CLI itself (named in its session's application_name), which script does not relay.
      const terminated = await atPrompt(async () => {
        const pid = await withDatabase('postgres', async (c) => {
          const { rows } = await c.query<{ name: string }>(
            "SELECT application_name AS name FROM pg_stat_activity WHERE application_name ~ '^backup_db:[0-9]+:[0-9a-f]+$'",
          );
          return Number(rows[0]!.name.split(':')[1]);
        });
        process.kill(pid, 'SIGTERM');
        // A prompt deaf to it would wait for ever: killed after a while, it fails on the exit code below.
        await within('the run to stop', 15_000, async () => !(await alive(pid))).catch(() =>
          process.kill(pid, 'SIGKILL'),
        );
      });
      assert.equal(terminated.exitCode, 143, String(terminated.stdout));
      assert.match(String(terminated.stdout), /✗ Restore failed: Interrupted by SIGTERM/);
      assert.deepEqual(await withDatabase('rs_prod', snapshotDatabase), before, 'production untouched');
    },
  );

  test('--env prod --i-know-this-is-prod restores over production', async () => {
    const result = await runCli({
      args: restoreArgs(backup.dumpPath, 'rs_prod', '--env', 'prod', '--clean', '--i-know-this-is-prod'),
    });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.match(result.stdout, /rs_prod on .* \(replaced\)/);
  });
});

describe('--verify FILE --restore-test (the drill)', () => {
  const drillDatabases = async () => (await databases()).filter((name) => name.startsWith('backup_db_drill_'));

  test('restores into a scratch database, reconciles, records the result, drops the scratch database', async () => {
    const copy = await copyOfBackup();
    const result = await runCli({
      args: ['--verify', copy.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir],
    });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.match(result.stdout, /^✓ Restore test passed$/m);
    assert.match(
      result.stdout,
      /^Scratch DB: {2}backup_db_drill_\d+_[0-9a-f]{8} on .* \(PostgreSQL 15\.\d+; dropped\)$/m,
    );
    assert.deepEqual(await drillDatabases(), []);
    const metadata = JSON.parse(await fs.readFile(copy.metadataPath, 'utf8'));
    assert.equal(metadata.last_restore_test.ok, true);
    assert.equal(metadata.last_restore_test.tables, 10);
    assert.deepEqual(metadata.last_restore_test.mismatches, []);
    assert.ok(Date.now() - Date.parse(metadata.last_restore_test.time) < 120_000);

    // The drill is the restore pipeline with a scratch target: the same --json document.
    const json = await runCli({
      args: ['--verify', copy.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir, '--json'],
    });
    assert.equal(json.exitCode, 0, json.stderr);
    const doc = JSON.parse(json.stdout);
    assert.deepEqual([doc.command, doc.drill, doc.target_action], ['drill', true, 'created and dropped']);
    assert.match(doc.target_database, /^backup_db_drill_\d+_[0-9a-f]{8}$/);
    assert.equal(doc.metadata_file, copy.metadataPath);
    assert.deepEqual(doc.last_restore_test, JSON.parse(await fs.readFile(copy.metadataPath, 'utf8')).last_restore_test);
    assert.ok(doc.reconciliation.length === 10 && doc.reconciliation.every((row: { ok: boolean }) => row.ok));
    assert.deepEqual(await drillDatabases(), []);

    const listed = await runCli({ args: ['--list', '--output-dir', path.dirname(copy.dumpPath)] });
    assert.match(listed.stdout, /Status +Restore test\n.*✓ Verified +✓ \d{4}-\d{2}-\d{2}/);
    assert.equal(
      (await runCli({ args: ['--verify', copy.dumpPath] })).exitCode,
      0,
      'recording the drill leaves the backup verifiable',
    );
  });

  test(
    "a drill run by root keeps the metadata's owner and mode: the backup stays its owner's",
    skipUnless(process.getuid?.() === 0 ? noSetpriv : 'needs root, to give files to another user'),
    async () => {
      const copy = await copyOfBackup();
      await fs.chmod(copy.metadataPath, 0o644);
      await fs.chown(copy.metadataPath, 12345, 12346);
      const result = await runCli({
        args: ['--verify', copy.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir],
      });
      assert.equal(result.exitCode, 0, result.stderr);
      assert.match(result.stdout, /^Recorded: {4}last_restore_test in /m);
      const stat = await fs.stat(copy.metadataPath);
      assert.deepEqual([stat.uid, stat.gid, stat.mode & 0o7777], [12345, 12346, 0o644]);
      assert.equal(JSON.parse(await fs.readFile(copy.metadataPath, 'utf8')).last_restore_test.ok, true);

      // Without the power to give a file away, the owner cannot be kept: nothing recorded, and it says so.
      const before = await fs.readFile(copy.metadataPath, 'utf8');
      const withoutChown = await runCli({
        args: ['--verify', copy.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir, '--json'],
        wrapper: ['setpriv', '--bounding-set=-chown', '--'],
      });
      assert.equal(withoutChown.exitCode, 0, withoutChown.stderr);
      const doc = JSON.parse(withoutChown.stdout);
      assert.equal(doc.last_restore_test, null);
      assert.match(doc.not_recorded, /^the metadata is owned by uid 12345 and would not stay so/);
      assert.equal(await fs.readFile(copy.metadataPath, 'utf8'), before);
      assert.equal((await fs.stat(copy.metadataPath)).uid, 12345);
    },
  );

  test('tampered counts → exit 8, the failure recorded, the scratch database dropped', async () => {
    const copy = await copyOfBackup((m) => {
      (m.table_counts as Record<string, number>).conversations = 1;
    });
    const result = await runCli({
      args: ['--verify', copy.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir],
    });
    assert.equal(result.exitCode, 8);
    assert.match(result.stderr, /^✗ Restore test failed: row counts differ from the backup$/m);
    assert.match(result.stderr, /conversations \(backup 1, restored 150\)/);
    assert.deepEqual(await drillDatabases(), []);
    const metadata = JSON.parse(await fs.readFile(copy.metadataPath, 'utf8'));
    assert.deepEqual(
      [metadata.last_restore_test.ok, metadata.last_restore_test.mismatches],
      [false, ['conversations']],
    );
  });

  test('a drill that fails on the backup records the failure: --list no longer shows the earlier success', async () => {
    const copy = await copyOfBackup();
    const drill = (extra: string[] = []) =>
      runCli({
        args: ['--verify', copy.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir, ...extra],
      });
    assert.equal((await drill()).exitCode, 0);
    const listed = async () => (await runCli({ args: ['--list', '--output-dir', path.dirname(copy.dumpPath)] })).stdout;
    assert.match(await listed(), /Restore test\n.* ✓ \d{4}-\d{2}-\d{2}\n/);

    // A configuration error never reached the backup: the earlier result stands.
    const unconfigured = await drill(['--config-dir', await tempDir()]);
    assert.equal(unconfigured.exitCode, 2, unconfigured.stderr);
    assert.equal(JSON.parse(await fs.readFile(copy.metadataPath, 'utf8')).last_restore_test.ok, true);

    await flipMiddleByte(copy.dumpPath);
    const failed = await drill();
    assert.equal(failed.exitCode, 8, failed.stderr);
    assert.match(failed.stderr, /^✗ Backup verification failed: checksum mismatch$/m);
    const record = JSON.parse(await fs.readFile(copy.metadataPath, 'utf8')).last_restore_test;
    assert.deepEqual(
      [record.ok, record.error, record.tables, record.server_version],
      [false, 'Backup verification failed: checksum mismatch', 0, 'unknown'],
    );
    assert.ok(Date.now() - Date.parse(record.time) < 120_000);
    assert.match(await listed(), /Restore test\n.* ✗ \d{4}-\d{2}-\d{2}\n/);
    assert.deepEqual(await drillDatabases(), []);
  });

  test('a wall clock stepping back during the drill (NTP at boot): its recorded duration is real, the backup stays valid', async () => {
    // pg_restore is never held (released up front): `started` only marks that the restore has begun.
    const clients = await clientDirHolding('pg_restore', '--dbname');
    await fs.writeFile(clients.release, '');
    const drill = (file: string) =>
      runCli({
        args: [
          '--verify',
          file,
          '--restore-test',
          '--env',
          'dev',
          '--config-dir',
          configDir,
          '--pg-bin-dir',
          clients.dir,
        ],
        wallClock: { stepMs: -120_000, when: clients.started },
      });
    const copy = await copyOfBackup();
    const passed = await drill(copy.dumpPath);
    assert.equal(passed.exitCode, 0, passed.stderr);
    const record = JSON.parse(await fs.readFile(copy.metadataPath, 'utf8')).last_restore_test;
    assert.ok(record.ok && record.duration_ms >= 0, `duration_ms ${record.duration_ms}`);
    assert.equal((await runCli({ args: ['--verify', copy.dumpPath] })).exitCode, 0, 'the backup stays valid');

    const tampered = await copyOfBackup((m) => {
      (m.table_counts as Record<string, number>).conversations = 1;
    });
    assert.equal((await drill(tampered.dumpPath)).exitCode, 8);
    const failure = JSON.parse(await fs.readFile(tampered.metadataPath, 'utf8')).last_restore_test;
    assert.ok(!failure.ok && failure.duration_ms >= 0, `failed drill's duration_ms ${failure.duration_ms}`);
  });

  /** A drill of `backup` whose pg_restore waits at the gate: `meanwhile` runs then, and the gate opens. */
  async function drillHeldAtGate(
    backup: { dumpPath: string },
    meanwhile: (drill: ReturnType<typeof startCli>) => Promise<void>,
    options: string[] = ['--config-dir', configDir],
  ) {
    const { holder, observer } = await holdGate();
    const drill = startCli({ args: ['--verify', backup.dumpPath, '--restore-test', '--env', 'dev', ...options] });
    try {
      await waitFor('pg_restore to wait at the gate', async () => {
        const { rows } = await observer.query(
          "SELECT 1 FROM pg_stat_activity WHERE datname LIKE 'backup_db_drill_%' AND wait_event_type = 'Lock'",
        );
        return rows.length > 0 ? true : undefined;
      });
      await meanwhile(drill);
    } finally {
      // Dropping a database also needs that catalog: let go so the drill can clean up.
      await holder.query('ROLLBACK');
      await Promise.all([holder.end(), observer.end()]);
    }
    return drill;
  }

  test(
    'Ctrl-C while pg_restore runs → exit 130, and the scratch database is dropped',
    { timeout: 90_000 },
    async () => {
      const gatedBackup = await gatedBackupOf();
      const result = await drillHeldAtGate(gatedBackup, async (drill) => {
        assert.equal((await drillDatabases()).length, 1, 'the scratch database exists while the drill runs');
        drill.kill('SIGINT');
      });
      assert.equal(result.exitCode, 130, String(result.stderr));
      assert.match(String(result.stderr), /Interrupted by SIGINT/);
      assert.deepEqual(await drillDatabases(), []);
      const metadata = JSON.parse(await fs.readFile(gatedBackup.metadataPath, 'utf8'));
      assert.equal(metadata.last_restore_test, undefined, 'an interrupted drill is no verdict on the backup');
    },
  );

  test(
    'a backup deleted during its drill (by retention, say): the drill says nothing was recorded',
    { timeout: 90_000 },
    async () => {
      const gatedBackup = await gatedBackupOf();
      const result = await drillHeldAtGate(gatedBackup, async () => {
        await fs.rm(gatedBackup.dumpPath);
        await fs.rm(gatedBackup.metadataPath);
      });
      assert.equal(result.exitCode, 0, String(result.stderr));
      assert.match(String(result.stdout), /^Recorded: {4}not recorded: the backup was deleted meanwhile$/m);
      assert.doesNotMatch(String(result.stdout), /last_restore_test in/);
      const left = await fs.readdir(path.dirname(gatedBackup.dumpPath));
      assert.ok(!left.some((name) => name.includes('.metadata.json')), `no metadata written: ${left.join(', ')}`);
    },
  );

  test(
    'a backup deleted (by retention, say) as the drill records its result: nothing recorded, no metadata left behind',
    { timeout: 90_000 },
    async () => {
      const taken = await takeBackup(server, 'rs_app', path.join(await tempDir(), 'b'));
      const gates = await tempDir();
      const renameGate = {
        target: path.basename(taken.metadataPath),
        reached: path.join(gates, 'reached'),
        open: path.join(gates, 'open'),
      };
      const drill = startCli({
        args: ['--verify', taken.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir],
        renameGate,
      });
      // The drill checked that the backup exists and is about to put its new metadata in place.
      await waitFor('the drill to record its result', async () => (existsSync(renameGate.reached) ? true : undefined));
      await fs.rm(taken.dumpPath);
      await fs.rm(taken.metadataPath);
      await fs.writeFile(renameGate.open, '');
      const result = await drill;
      assert.equal(result.exitCode, 0, String(result.stderr));
      assert.match(String(result.stdout), /^Recorded: {4}not recorded: the backup was deleted meanwhile$/m);
      const left = await fs.readdir(path.dirname(taken.dumpPath));
      assert.deepEqual(
        left.filter((name) => name.includes('.metadata.json')),
        [],
        'no orphan metadata',
      );
    },
  );

  test(
    'a backup replaced during its drill (its metadata now describes another file): its result is not recorded there',
    { timeout: 90_000 },
    async () => {
      const gatedBackup = await gatedBackupOf();
      let replaced = '';
      const result = await drillHeldAtGate(gatedBackup, async () => {
        const metadata = JSON.parse(await fs.readFile(gatedBackup.metadataPath, 'utf8'));
        replaced = JSON.stringify({ ...metadata, checksum_sha256: 'f'.repeat(64) });
        await fs.writeFile(gatedBackup.metadataPath, replaced);
      });
      assert.equal(result.exitCode, 0, String(result.stderr));
      assert.match(String(result.stdout), /^Recorded: {4}not recorded: the backup was replaced meanwhile/m);
      assert.equal(await fs.readFile(gatedBackup.metadataPath, 'utf8'), replaced, 'left as it was found');
    },
  );

  test(
    'metadata made invalid or removed during its drill: the restore matched, the drill says nothing was recorded',
    { timeout: 120_000 },
    async () => {
      const gatedBackup = await gatedBackupOf();
      const original = await fs.readFile(gatedBackup.metadataPath, 'utf8');
      const broken = await drillHeldAtGate(gatedBackup, () => fs.writeFile(gatedBackup.metadataPath, '{"broken":\n'));
      assert.equal(broken.exitCode, 0, String(broken.stderr));
      assert.match(
        String(broken.stdout),
        /^Recorded: {4}not recorded: the metadata is no longer valid: it is not valid JSON/m,
      );
      assert.equal(await fs.readFile(gatedBackup.metadataPath, 'utf8'), '{"broken":\n', 'left as it was found');

      await fs.writeFile(gatedBackup.metadataPath, original);
      const vanished = await drillHeldAtGate(gatedBackup, () => fs.rm(gatedBackup.metadataPath));
      assert.equal(vanished.exitCode, 0, String(vanished.stderr));
      assert.match(String(vanished.stdout), /^Recorded: {4}not recorded: the metadata was deleted meanwhile$/m);
      await assert.rejects(fs.stat(gatedBackup.metadataPath), { code: 'ENOENT' }, 'no metadata written in its place');
    },
  );

  /** Terminate this server's sessions that `where` (SQL on pg_stat_activity) picks; how many there were. */
  const terminate = (where: string) =>
    withDatabase('postgres', async (c) => {
      const { rows } = await c.query(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE ${where}`);
      return rows.length;
    });
  const adminSession = "datname = 'postgres' AND application_name ~ '^backup_db:[0-9]+:[0-9a-f]+$'";

  test(
    "the admin session outlives a role's idle_session_timeout, and a dead one does not leave the scratch database",
    { timeout: 120_000 },
    async () => {
      const gatedBackup = await gatedBackupOf();
      const asOp = await configAs(uniqueName('rs_op'), 'SUPERUSER', "idle_session_timeout = '1s'");
      const held = await drillHeldAtGate(
        gatedBackup,
        // The admin session has been idle since pg_restore started: held past the timeout, it would be gone.
        async () => {
          await waitForActivity(
            'the drill to be held past idle_session_timeout',
            "datname LIKE 'backup_db_drill_%' AND wait_event_type = 'Lock' " +
              "AND clock_timestamp() - state_change > interval '2 seconds'",
          );
        },
        ['--config-dir', asOp],
      );
      assert.equal(held.exitCode, 0, String(held.stderr));
      assert.match(String(held.stdout), /; dropped\)$/m);
      assert.deepEqual(await drillDatabases(), []);

      // Ended anyway (a server restart, a DBA): the drop goes through a new connection.
      const cut = await drillHeldAtGate(gatedBackup, async () => assert.equal(await terminate(adminSession), 1));
      assert.equal(cut.exitCode, 0, String(cut.stderr));
      assert.deepEqual(await drillDatabases(), []);
    },
  );

  test(
    'a restore whose admin session was ended stops at once (its claim on the target is gone): the target it created is dropped all the same',
    { timeout: 120_000 },
    async () => {
      const gatedBackup = await gatedBackupOf();
      const target = uniqueName('rs_cut_off');
      const { holder, observer } = await holdGate();
      const run = startCli({ args: [...restoreArgs(gatedBackup.dumpPath, target, '--jobs', '1'), '--env', 'dev'] });
      try {
        await waitAtGate(observer, 'pg_shdescription');
        assert.equal(await terminate(adminSession), 1);
        // Still at the gate: only the lost session can have stopped pg_restore.
        const pgRestores = () => processesWithEnv('PGAPPNAME', applicationNameOf(run.pid!));
        await within('pg_restore to be stopped', 15_000, async () => (await pgRestores()).length === 0);
      } finally {
        await holder.query('ROLLBACK');
        await Promise.all([holder.end(), observer.end()]);
      }
      const result = await run;
      assert.equal(result.exitCode, 3, String(result.stderr));
      assert.match(String(result.stderr), /^✗ Restore failed: The restore lost its claim on the target$/m);
      assert.ok(!(await databases()).includes(target), 'no half-restored database left behind');
    },
  );

  test(
    'a backup holding a logical replication subscription: the drill leaves none, a failed restore drops its target, --clean says why it cannot',
    { timeout: 120_000 },
    async () => {
      const subscribe =
        "CREATE SUBSCRIPTION s1 CONNECTION 'host=127.0.0.1 port=1 dbname=nowhere' PUBLICATION p WITH (connect = false)";
      const [subscribed, failing] = [uniqueName('rs_sub'), uniqueName('rs_sub_boom')];
      await server.createDatabase(subscribed, ['CREATE TABLE t (id int)', 'INSERT INTO t VALUES (1), (2)', subscribe]);
      // A materialized view refreshed last (after the subscription) that fails anywhere but in its source database.
      await server.createDatabase(failing, [
        'CREATE TABLE t (id int)',
        `CREATE FUNCTION boom() RETURNS int LANGUAGE plpgsql AS $$ BEGIN IF current_database() <> '${failing}' THEN RAISE EXCEPTION 'boom'; END IF; RETURN 1; END $$`,
        'CREATE MATERIALIZED VIEW mv AS SELECT public.boom() AS v',
        subscribe.replace('s1', 's2'),
      ]);
      const dir = path.join(await tempDir(), 'b');
      const [withSubscription, failingOne] = [
        await takeBackup(server, subscribed, dir),
        await takeBackup(server, failing, dir),
      ];

      const drill = await runCli({
        args: ['--verify', withSubscription.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir],
      });
      assert.equal(drill.exitCode, 0, drill.stderr);
      assert.match(drill.stdout, /Tables: {6}1 of 1 match/);
      assert.deepEqual(await drillDatabases(), []);

      const target = uniqueName('rs_sub_failed');
      const failed = await restore(failingOne.dumpPath, target);
      assert.equal(failed.exitCode, 7, failed.stderr);
      assert.match(failed.stderr, /boom/);
      assert.ok(!(await databases()).includes(target), 'no half-restored database left behind');

      const clean = await restore(withSubscription.dumpPath, subscribed, '--clean');
      assert.equal(clean.exitCode, 2, clean.stderr);
      assert.match(clean.stderr, /^✗ Restore failed: The database holds a logical replication subscription$/m);
      assert.match(
        clean.stderr,
        new RegExp(`"${subscribed}" cannot be dropped while it holds subscriptions \\("s1"\\)`),
      );
      assert.match(clean.stderr, /nothing was dropped/);
      const left = await withDatabase(subscribed, (c) =>
        c.query(
          'SELECT subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid WHERE d.datname = current_database()',
        ),
      );
      assert.deepEqual(left.rows, [{ subname: 's1' }], 'the target and its subscription are untouched');
    },
  );

  test('--clean of a target a superuser is connected to, as a role that may not end that session: exit 4 saying so', async () => {
    const role = uniqueName('rs_cleaner');
    const asOwner = await configAs(role, 'CREATEDB');
    const target = uniqueName('rs_inuse');
    await withDatabase('postgres', (c) => c.query(`CREATE DATABASE ${target} OWNER ${role}`));
    const intruder = await server.connect(target);
    try {
      const { dumpPath } = await gatedBackupOf();
      const args = ['--restore', dumpPath, '--target-db', target, '--clean', '--env', 'dev', '--config-dir', asOwner];
      const result = await runCli({ args });
      assert.equal(result.exitCode, 4, result.stderr);
      assert.match(
        result.stderr,
        new RegExp(`^✗ Restore failed: "${target}" is in use by a session this role may not end$`, 'm'),
      );
      assert.match(result.stderr, /must be a superuser to terminate superuser process/);
      assert.match(
        result.stderr,
        new RegExp(`pg_terminate_backend\\(pid\\) FROM pg_stat_activity WHERE datname = '${target}'`),
      );
      assert.ok((await databases()).includes(target), 'the target is still there');
      // Not its database and nobody in it: 42501 too, but a matter of ownership, not of sessions.
      const notMine = uniqueName('rs_notmine');
      await server.createDatabase(notMine, 'CREATE TABLE x (a int)');
      const refused = await runCli({ args: [...args.slice(0, 3), notMine, ...args.slice(4)] });
      assert.equal(refused.exitCode, 4, refused.stderr);
      assert.match(refused.stderr, /must be owner of database/);
      assert.doesNotMatch(refused.stderr, /in use by a session|pg_terminate_backend/);
    } finally {
      await intruder.end();
    }
  });

  test(
    'a scratch database that cannot be dropped (a superuser is connected to it): exit 7, and every channel says so',
    { timeout: 120_000 },
    async () => {
      const gatedBackup = await gatedBackupOf();
      const asCreator = await configAs(uniqueName('rs_creator'), 'CREATEDB');
      let intruder: pg.Client | undefined;
      try {
        const held = await drillHeldAtGate(gatedBackup, async () => {
          intruder = await server.connect((await drillDatabases())[0]);
        }, ['--config-dir', asCreator, '--json']);
        assert.equal(held.exitCode, 7, String(held.stdout));
        const [scratch] = await drillDatabases();
        assert.ok(scratch, 'the scratch database is still there');
        const doc = JSON.parse(String(held.stdout));
        assert.equal(doc.error, 'The scratch database was not dropped');
        assert.deepEqual([doc.target_database, doc.target_action], [scratch, 'created and left behind']);
        assert.match(doc.details, new RegExp(`"${scratch}", created by this run, could not be dropped and is left on`));
        assert.match(doc.details, /must be a superuser to terminate superuser process/);
        assert.ok(
          doc.hints.includes(
            `Drop it now: DROP DATABASE "${scratch}" WITH (FORCE); as a role that may end the sessions still attached to it (a superuser)`,
          ),
        );
        const record = JSON.parse(await fs.readFile(gatedBackup.metadataPath, 'utf8')).last_restore_test;
        assert.equal(record.ok, true, 'the restore itself matched: recorded as such');
      } finally {
        await intruder?.end();
      }
      for (const name of await drillDatabases()) await server.dropDatabase(name);
    },
  );

  test(
    'autovacuum at work in the scratch database as a role that is not a superuser drops it: dropped all the same',
    { timeout: 120_000 },
    async () => {
      // Restored with the table, these reloptions make autovacuum start on it at once and crawl through it.
      const crawling =
        'autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0, ' +
        'autovacuum_vacuum_insert_threshold = 0, autovacuum_vacuum_insert_scale_factor = 0, ' +
        'autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1';
      // No index or constraint on it: pg_restore would create it after the data, cancelling autovacuum to do so.
      const gatedBackup = await gatedBackupOf(
        'pg_shdescription',
        `CREATE TABLE crawled (id int) WITH (${crawling}); INSERT INTO crawled SELECT generate_series(1, 50000);`,
      );
      const asCreator = await configAs(uniqueName('rs_creator'), 'CREATEDB');
      const naptime = (sql: string) =>
        withDatabase('postgres', async (c) => {
          await c.query(sql); // ALTER SYSTEM runs outside a transaction: a statement of its own
          await c.query('SELECT pg_reload_conf()');
        });
      await naptime("ALTER SYSTEM SET autovacuum_naptime = '1s'");
      try {
        const drill = await drillHeldAtGate(gatedBackup, async () => {
          // Its data restored, the table's autovacuum starts while pg_restore waits at the gate.
          await waitForActivity(
            'autovacuum to work in the scratch database',
            "backend_type = 'autovacuum worker' AND datname LIKE 'backup_db_drill_%' AND query LIKE '%public.crawled%'",
          );
        }, ['--config-dir', asCreator]);
        assert.equal(drill.exitCode, 0, String(drill.stderr));
        assert.match(String(drill.stdout), /; dropped\)$/m);
        assert.deepEqual(await drillDatabases(), [], 'no copy of the data left behind');
      } finally {
        await naptime('ALTER SYSTEM RESET autovacuum_naptime');
        for (const name of await drillDatabases()) await server.dropDatabase(name);
      }
    },
  );
});

describe('row-level security in the restored database', () => {
  test(
    'a FORCE ROW LEVEL SECURITY table restored by a role that is not a superuser: every row counted, FORCE kept',
    { timeout: 90_000 },
    async () => {
      // After a --no-owner restore the role owns the table, and FORCE applies its policy to the role's own count.
      const [role, database, target] = [uniqueName('rls_restorer'), uniqueName('rs_rls'), uniqueName('rs_rls_copy')];
      await server.createDatabase(database, [
        `CREATE ROLE ${role} LOGIN CREATEDB PASSWORD 'restorer-pw'`,
        'CREATE TABLE rls (owner text, x int)',
        `INSERT INTO rls VALUES ('a', 1), ('b', 2), ('${role}', 3)`,
        'ALTER TABLE rls ENABLE ROW LEVEL SECURITY',
        'ALTER TABLE rls FORCE ROW LEVEL SECURITY',
        'CREATE POLICY own_rows ON rls USING (owner = current_user)',
      ]);
      const taken = await takeBackup(server, database, path.join(await tempDir(), 'backups'));
      const asRole = await tempDir();
      await writeEnvFile(asRole, '.env', {
        ...dbVars(server, 'DEV_DB_', database),
        DEV_DB_USER: role,
        DEV_DB_PASSWORD: 'restorer-pw',
      });
      const restored = await runCli({
        args: ['--restore', taken.dumpPath, '--target-db', target, '--env', 'dev', '--config-dir', asRole],
      });
      assert.equal(restored.exitCode, 0, restored.stdout + restored.stderr);
      assert.match(restored.stdout, /^rls +3 +3 {2}✓$/m);
      await withDatabase(target, async (client) => {
        const { rows } = await client.query("SELECT relforcerowsecurity AS forced FROM pg_class WHERE relname = 'rls'");
        assert.equal(rows[0].forced, true, 'lifted for the count only, in a transaction rolled back');
      });
      const drill = await runCli({
        args: ['--verify', taken.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', asRole],
      });
      assert.equal(drill.exitCode, 0, drill.stdout + drill.stderr);
      assert.match(drill.stdout, /^rls +3 +3 {2}✓$/m);
    },
  );
});

describe('--clean by a role that owns its database but may not create one', () => {
  test('is refused before the drop (exit 4): the target and its rows stay', { timeout: 90_000 }, async () => {
    const [role, target] = [uniqueName('rs_owner'), uniqueName('rs_owned')];
    await withDatabase('postgres', async (admin) => {
      await admin.query(`CREATE ROLE ${role} LOGIN NOCREATEDB PASSWORD 'owner-pw'`);
      await admin.query(`CREATE DATABASE ${target} OWNER ${role}`);
    });
    await withDatabase(target, (c) =>
      c.query(
        `CREATE TABLE precious (v text); INSERT INTO precious VALUES ('keep'); ALTER TABLE precious OWNER TO ${role}`,
      ),
    );
    const before = await withDatabase(target, snapshotDatabase);
    const asOwner = await tempDir();
    await writeEnvFile(asOwner, '.env', {
      ...dbVars(server, 'DEV_DB_', target),
      DEV_DB_USER: role,
      DEV_DB_PASSWORD: 'owner-pw',
    });
    const result = await runCli({
      args: ['--restore', backup.dumpPath, '--target-db', target, '--clean', '--env', 'dev', '--config-dir', asOwner],
    });
    assert.equal(result.exitCode, 4, result.stdout + result.stderr);
    assert.match(result.stderr, new RegExp(`role "${role}" could drop "${target}" but not create it again`));
    assert.deepEqual(await withDatabase(target, snapshotDatabase), before, 'untouched');
  });
});

describe('a role whose sessions are read-only by default (default_transaction_read_only)', () => {
  test(
    'restores and drills all the same, as a pg_dumpall script would (it turns the default off)',
    { timeout: 90_000 },
    async () => {
      const role = uniqueName('rs_reader_role');
      await withDatabase('postgres', async (admin) => {
        await admin.query(`CREATE ROLE ${role} LOGIN CREATEDB PASSWORD 'reader-pw'`);
        await admin.query(`ALTER ROLE ${role} SET default_transaction_read_only = on`);
      });
      const asReader = await tempDir();
      await writeEnvFile(asReader, '.env', {
        ...dbVars(server, 'DEV_DB_', 'rs_app'),
        DEV_DB_USER: role,
        DEV_DB_PASSWORD: 'reader-pw',
      });
      const target = uniqueName('rs_read_only');
      const restored = await runCli({
        args: ['--restore', backup.dumpPath, '--target-db', target, '--env', 'dev', '--config-dir', asReader],
      });
      assert.equal(restored.exitCode, 0, restored.stdout + restored.stderr);
      await assertSameDatabases(server, 'rs_app', target);
      const drill = await runCli({
        args: ['--verify', backup.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', asReader],
      });
      assert.equal(drill.exitCode, 0, drill.stdout + drill.stderr);
    },
  );
});

describe('administering the target server through a maintenance database', () => {
  test(
    'a server without the configured database, and a role that may not connect to postgres: restore and drill still work',
    { timeout: 90_000 },
    async () => {
      const admin = await pg17.connect();
      try {
        await admin.query("CREATE ROLE restorer LOGIN CREATEDB PASSWORD 'restorer-pw'");
        await admin.query('REVOKE CONNECT ON DATABASE postgres FROM PUBLIC');
      } finally {
        await admin.end();
      }
      // DEV_DB_NAME names a database this server does not have; postgres is closed to the role: template1 it is.
      const elsewhere = await tempDir();
      await writeEnvFile(elsewhere, '.env', {
        ...dbVars(pg17, 'DEV_DB_', 'no_such_app'),
        DEV_DB_USER: 'restorer',
        DEV_DB_PASSWORD: 'restorer-pw',
      });
      const target = uniqueName('rs_fresh');
      const restored = await runCli({
        args: ['--restore', backup.dumpPath, '--target-db', target, '--env', 'dev', '--config-dir', elsewhere],
      });
      assert.equal(restored.exitCode, 0, restored.stderr);
      assert.match(restored.stdout, /10 of 10 match/);
      const drill = await runCli({
        args: ['--verify', backup.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', elsewhere],
      });
      assert.equal(drill.exitCode, 0, drill.stderr);
      const [source, copy] = await Promise.all([server.connect('rs_app'), pg17.connect(target)]);
      try {
        await assertSameContent(source, copy);
      } finally {
        await Promise.all([source.end(), copy.end()]);
      }
    },
  );
});

describe('extensions missing on the target server', () => {
  test('a backup that needs adminpack, restored to PostgreSQL 17 (which dropped it): a clear error before anything is written', async () => {
    await server.createDatabase('rs_ext');
    await withDatabase('rs_ext', (c) =>
      c.query('CREATE EXTENSION adminpack; CREATE TABLE t (id int); INSERT INTO t VALUES (1)'),
    );
    const withExtension = await takeBackup(server, 'rs_ext', path.join(await tempDir(), 'b'));
    const on17 = await tempDir();
    await writeEnvFile(on17, '.env', dbVars(pg17, 'DEV_DB_', 'postgres'));
    const before = await databases(pg17);

    const restored = await runCli({
      args: ['--restore', withExtension.dumpPath, '--target-db', 'ext_target', '--env', 'dev', '--config-dir', on17],
    });
    assert.equal(restored.exitCode, 7, restored.stderr);
    assert.match(restored.stderr, /^✗ Restore failed: The target server lacks extensions the backup needs$/m);
    assert.match(restored.stderr, /PostgreSQL 17\.\d+ on this server does not have: adminpack/);
    assert.match(restored.stderr, /adminpack: part of PostgreSQL's contrib .* as adminpack was in 17/);

    const drilled = await runCli({
      args: ['--verify', withExtension.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', on17],
    });
    assert.equal(drilled.exitCode, 7);
    assert.deepEqual(await databases(pg17), before, 'no database was created on the target server');
  });
});

describe('a restore reads the backup it verified, whatever becomes of its names (retention, a replacement)', () => {
  /** A --jobs 2 (directory-format) backup of rs_app in a directory of its own. */
  async function directoryBackup() {
    const outputDir = await tempDir();
    const taken = await runCli({
      args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir, '--jobs', '2'],
    });
    assert.equal(taken.exitCode, 0, taken.stderr);
    const name = (await fs.readdir(outputDir)).find((entry) => entry.endsWith('.dump'))!;
    const dumpPath = path.join(outputDir, name);
    return { outputDir, dumpPath, metadataPath: dumpPath.replace(/\.dump$/, '.metadata.json') };
  }

  /**
   * A restore of `dumpPath` (--jobs 2) whose pg_restore is held before it starts, after verification (and, with
   * --clean, after the target was dropped and created again): `meanwhile` runs then, and pg_restore goes on.
   */
  async function restoreHeld(
    dumpPath: string,
    target: string,
    meanwhile: (cli: ReturnType<typeof startCli>) => Promise<void>,
    ...extra: string[]
  ) {
    const clients = await clientDirHolding('pg_restore', '--dbname');
    const args = restoreArgs(dumpPath, target, '--env', 'dev', '--jobs', '2', '--pg-bin-dir', clients.dir, ...extra);
    const cli = startCli({ args });
    try {
      await waitFor('pg_restore to be held', async () =>
        (await fs.stat(clients.started).catch(() => null)) ? true : undefined,
      );
      await meanwhile(cli);
    } finally {
      await fs.writeFile(clients.release, '');
    }
    const result = await cli;
    return { exitCode: result.exitCode, stderr: String(result.stderr) };
  }

  /** A non-empty target for --clean: its old content is what a failed restore would lose. */
  async function oldTarget(): Promise<string> {
    const target = uniqueName('rs_pinned');
    await server.createDatabase(target, 'CREATE TABLE old_content (id int); INSERT INTO old_content VALUES (1)');
    return target;
  }

  const assertRestoredFromBackup = (target: string) =>
    withDatabase('rs_app', (source) => withDatabase(target, (restored) => assertSameContent(source, restored)));

  test('--clean, the backup deleted (as retention does) while pg_restore is about to open it: the restore completes', async () => {
    const copy = await copyOfBackup();
    const target = await oldTarget();
    const result = await restoreHeld(
      copy.dumpPath,
      target,
      async () => {
        await fs.unlink(copy.dumpPath);
        await fs.unlink(copy.metadataPath);
      },
      '--clean',
    );
    assert.equal(result.exitCode, 0, result.stderr);
    await assertRestoredFromBackup(target);
  });

  test('--clean of a directory-format backup (--jobs 2), its directory removed meanwhile: the restore completes', async () => {
    const taken = await directoryBackup();
    const target = await oldTarget();
    const result = await restoreHeld(
      taken.dumpPath,
      target,
      async () => {
        await fs.rm(taken.dumpPath, { recursive: true });
        await fs.unlink(taken.metadataPath);
      },
      '--clean',
    );
    assert.equal(result.exitCode, 0, result.stderr);
    await assertRestoredFromBackup(target);
    const left = (await fs.readdir(taken.outputDir)).filter((name) => name.includes('.pin-'));
    assert.deepEqual(left, [], 'the private links are removed at the end');
  });

  test('the file replaced under its name (other bytes, metadata untouched): what was verified is restored, never the replacement', async () => {
    const copy = await copyOfBackup();
    await server.createDatabase(
      'rs_replacement',
      'CREATE TABLE replacement (id int); INSERT INTO replacement VALUES (1)',
    );
    const other = await takeBackup(server, 'rs_replacement', await tempDir());
    const target = await oldTarget();
    const result = await restoreHeld(
      copy.dumpPath,
      target,
      async () => {
        await fs.copyFile(other.dumpPath, `${copy.dumpPath}.new`);
        await fs.rename(`${copy.dumpPath}.new`, copy.dumpPath);
      },
      '--clean',
    );
    assert.equal(result.exitCode, 0, result.stderr);
    await assertRestoredFromBackup(target);
  });

  test('--clean stopped after the drop, its backup deleted meanwhile: no hint to restore again from it', async () => {
    const copy = await copyOfBackup();
    const target = await oldTarget();
    const result = await restoreHeld(
      copy.dumpPath,
      target,
      async (cli) => {
        await fs.unlink(copy.dumpPath);
        await fs.unlink(copy.metadataPath);
        cli.kill('SIGTERM');
        await cli;
      },
      '--clean',
    );
    assert.equal(result.exitCode, 143, result.stderr);
    assert.match(result.stderr, /its old content is gone/);
    assert.doesNotMatch(result.stderr, /Run the same restore again/);
    assert.match(result.stderr, /rs_app_dev_.*\.dump has been deleted meanwhile .*: restore ".*" from another backup/);
  });

  test(
    "a backup run in another pid namespace (a container sharing the volume) leaves a live restore's private copy alone",
    skipUnless(noPidNamespace),
    async () => {
      const taken = await directoryBackup();
      const target = await oldTarget();
      let contained = { exitCode: -1, stdout: '', stderr: '' };
      const result = await restoreHeld(
        taken.dumpPath,
        target,
        async () => {
          const args = ['--env', 'dev', '--config-dir', configDir, '--output-dir', taken.outputDir];
          contained = await runCli({ args, wrapper: ['unshare', ...PID_NAMESPACE] });
        },
        '--clean',
      );
      assert.equal(contained.exitCode, 0, contained.stderr);
      assert.doesNotMatch(`${contained.stdout}${contained.stderr}`, /\.pin-/);
      assert.equal(result.exitCode, 0, result.stderr);
      await assertRestoredFromBackup(target);
    },
  );

  test("a dead run's private copy without an owner file, or with one cut short, is removed by the next backup", async () => {
    const taken = await directoryBackup();
    // Pids of processes that have ended.
    const deadPid = async () => {
      const child = execa('true');
      await child;
      return child.pid!;
    };
    const [first, second] = [await deadPid(), await deadPid()];
    await fs.mkdir(`${taken.dumpPath}.pin-${first}`);
    await fs.mkdir(`${taken.dumpPath}.pin-${second}`);
    await fs.writeFile(`${taken.dumpPath}.pin-${second}.owner`, '{"pid":99');
    const next = await runCli({ args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', taken.outputDir] });
    assert.equal(next.exitCode, 0, next.stderr);
    assert.match(`${next.stdout}${next.stderr}`, /Cleaned up: +3 stale files/);
    assert.deepEqual(
      (await fs.readdir(taken.outputDir)).filter((name) => name.includes('.pin-')),
      [],
    );
  });

  test('SIGKILLed while restoring a directory-format backup: nothing listed as a backup is left, the next backup removes the rest', async () => {
    const taken = await directoryBackup();
    const listed = async () => {
      const doc = JSON.parse((await runCli({ args: ['--list', '--output-dir', taken.outputDir, '--json'] })).stdout);
      return [doc.backups.map((b: { file: string }) => b.file), doc.incomplete];
    };
    const before = await listed();
    let left: string[] = [];
    await restoreHeld(taken.dumpPath, uniqueName('rs_pinned'), async (cli) => {
      cli.kill('SIGKILL');
      await cli;
      left = (await fs.readdir(taken.outputDir)).filter((name) => name.includes('.pin-'));
    });
    // The private copy, and beside it whose it is.
    assert.deepEqual(left.map((name) => name.replace(/pin-\d+/, 'pin-N')).sort(), [
      `${path.basename(taken.dumpPath)}.pin-N`,
      `${path.basename(taken.dumpPath)}.pin-N.owner`,
    ]);
    assert.deepEqual(await listed(), before);

    const next = await runCli({ args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', taken.outputDir] });
    assert.equal(next.exitCode, 0, next.stderr);
    assert.match(`${next.stdout}${next.stderr}`, /Cleaned up: /);
    assert.ok(!(await fs.readdir(taken.outputDir)).some((name) => name.includes('.pin-')), 'the private copy is gone');
  });
});
