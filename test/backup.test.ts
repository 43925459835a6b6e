/**
 * The main job (user stories 1 and 2): a real backup of the app fixture, restored with the real
 * pg_restore into a fresh database and compared row for row with the source.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import type pg from 'pg';
import { assertSameContent, restoreIntoNewDatabase, snapshotDatabase } from './helpers/compare.ts';
import { dbVars, runCli, startCli, takeBackup, tempDir, uniqueName, writeEnvFile } from './helpers/cli.ts';
import { clientDirHolding } from './helpers/clients.ts';
import { FIXTURE_COUNTS, FIXTURE_PHYSICAL_TABLES, FIXTURE_SQL } from './helpers/fixture.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { startGatingProxy, startStrictPooler } from './helpers/proxy.ts';
import { waitFor } from './helpers/wait.ts';

const NAME_PATTERN = /^(.+)_(dev|prod)_(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z)\.dump$/;

let server: TestServer;
let source: pg.Client;
const pgDumpVersion = /\(PostgreSQL\) (\d+\.\d+)/.exec((await execa('pg_dump', ['--version'])).stdout)![1]!;
const pgDumpMajor = Number(pgDumpVersion.split('.')[0]);
let serverVersion: string;
const devDb = uniqueName('app_dev');
const prodDb = uniqueName('app_prod');

before(async () => {
  server = await startTestServer();
  for (const db of [devDb, prodDb]) await server.createDatabase(db, FIXTURE_SQL);
  source = await server.connect(devDb);
  serverVersion = (await source.query<{ v: string }>("SELECT current_setting('server_version') AS v")).rows[0]!.v.split(
    ' ',
  )[0]!;
});

after(async () => {
  await source?.end();
  await server?.stop();
});

async function backupInto(env: 'dev' | 'prod') {
  const outputDir = path.join(await tempDir(), 'backups');
  return takeBackup(server, env === 'dev' ? devDb : prodDb, outputDir, env);
}

async function restoreInto(dumpPath: string): Promise<pg.Client> {
  return server.connect(await restoreIntoNewDatabase(server, dumpPath));
}

/** The one backup in `outputDir`, restored into a fresh database, holds exactly what the dev database holds. */
async function assertBackupInRestoresIdentical(outputDir: string): Promise<void> {
  const [dump, ...more] = (await fs.readdir(outputDir)).filter((name) => name.endsWith('.dump'));
  assert.deepEqual(more, [], 'one backup');
  const restored = await restoreInto(path.join(outputDir, dump!));
  try {
    await assertSameContent(source, restored);
  } finally {
    await restored.end();
  }
}

describe('backup --env dev', () => {
  let run: Awaited<ReturnType<typeof backupInto>>;
  before(async () => {
    run = await backupInto('dev');
  });

  test('restores into a fresh database with every table, row, sequence, FK and index identical', async () => {
    const restored = await restoreInto(run.dumpPath);
    try {
      const expected = await assertSameContent(source, restored);
      assert.deepEqual(
        Object.keys(expected.tables),
        FIXTURE_PHYSICAL_TABLES,
        'the comparison covered the whole fixture, partitions included',
      );
      const next = async (client: pg.Client) =>
        (await client.query<{ n: string }>("SELECT nextval('ticket_numbers') AS n")).rows[0]!.n;
      assert.equal(await next(restored), await next(source), 'the next sequence value continues where the source was');
    } finally {
      await restored.end();
    }
  });

  test('binary data, embeddings and special floats survive byte for byte', async () => {
    const restored = await restoreInto(run.dumpPath);
    try {
      const probe = `SELECT (SELECT md5(attachment) FROM messages WHERE content = 'all 256 byte values') AS all_bytes,
                            (SELECT length(attachment) FROM messages WHERE content = 'large binary') AS large_len,
                            (SELECT embedding[1:5]::text FROM conversation_index WHERE conversation_id = 1) AS specials`;
      const [a, b] = await Promise.all([source.query(probe), restored.query(probe)]);
      assert.deepEqual(b.rows[0], a.rows[0]);
      assert.ok(Number(a.rows[0].large_len) > 1_000_000, 'the large value is over 1 MB');
      assert.equal(a.rows[0].specials, '{NaN,Infinity,-Infinity,-0,1e-45}');
    } finally {
      await restored.end();
    }
  });

  test('metadata has every field of the data model, typed as it says', () => {
    const m = run.metadata;
    assert.match(String(m.backup_timestamp), /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$/);
    assert.ok(!Number.isNaN(Date.parse(String(m.backup_timestamp))));
    assert.equal(m.environment, 'dev');
    assert.equal(m.database_name, devDb);
    assert.equal(m.backup_file, path.basename(run.dumpPath));
    assert.ok(Number.isInteger(m.backup_size_bytes) && (m.backup_size_bytes as number) > 0);
    assert.match(String(m.checksum_sha256), /^[0-9a-f]{64}$/);
    assert.match(String(m.pg_dump_version), /^\d+\.\d+$/);
    assert.match(String(m.postgresql_version), /^\d+\.\d+$/);
    assert.equal(m.postgresql_version, serverVersion);
    assert.equal(typeof m.table_counts, 'object');
    assert.equal(m.compression, pgDumpMajor >= 16 ? 'zstd:1' : 'gzip:1', 'the fast default for this pg_dump');
    assert.equal(m.pg_dump_version, pgDumpVersion);
    assert.equal(m.snapshot_consistent, true);
  });

  test('table_counts hold the real count of every table, partitioned tables once', () => {
    assert.deepEqual(run.metadata.table_counts, FIXTURE_COUNTS);
  });

  test('checksum and size match a fresh read of the file', async () => {
    const bytes = await fs.readFile(run.dumpPath);
    assert.equal(run.metadata.checksum_sha256, createHash('sha256').update(bytes).digest('hex'));
    assert.equal(run.metadata.backup_size_bytes, bytes.length);
  });

  test('file name follows {database}_{env}_{timestamp}.dump and matches the metadata timestamp', () => {
    const match = NAME_PATTERN.exec(path.basename(run.dumpPath));
    assert.ok(match, path.basename(run.dumpPath));
    assert.equal(match[1], devDb);
    assert.equal(match[2], 'dev');
    assert.equal(match[3]!.replace(/T(\d{2})-(\d{2})-(\d{2})Z/, 'T$1:$2:$3Z'), run.metadata.backup_timestamp);
  });

  test('prints the contract summary on stdout', () => {
    assert.match(run.stdout, /^✓ Backup created successfully$/m);
    assert.match(run.stdout, new RegExp(`^Backup File: .*${path.basename(run.dumpPath)}$`, 'm'));
    assert.match(run.stdout, /^Metadata: {4}.*\.metadata\.json$/m);
    assert.match(run.stdout, /^Size: {8}\d+(\.\d)? (B|KB|MB)$/m);
    assert.match(run.stdout, /^Environment: dev$/m);
    assert.match(run.stdout, new RegExp(`^Database: {4}${devDb}$`, 'm'));
    assert.match(run.stdout, /^Tables: {6}10 \(/m);
    assert.match(
      run.stdout,
      new RegExp(`^Checksum: {4}${String(run.metadata.checksum_sha256).slice(0, 12)}\\.\\.\\.$`, 'm'),
    );
    assert.match(run.stdout, /^Verified: {4}✓ Integrity check passed$/m);
    assert.equal(run.stderr, '');
  });

  test('backup and metadata are private to their owner; nothing else is left behind but the lock reserve', async () => {
    // The lock's reserve: the block --prune gives up to take the lock on a full disk (diskspace.test.ts).
    const reserve = path.join(run.outputDir, `${devDb}_dev.lock.reserve`);
    for (const file of [run.dumpPath, run.metadataPath, reserve]) {
      assert.equal((await fs.stat(file)).mode & 0o777, 0o600, file);
    }
    assert.equal((await fs.stat(run.outputDir)).mode & 0o777, 0o700);
    assert.deepEqual(
      (await fs.readdir(run.outputDir)).sort(),
      [path.basename(run.dumpPath), path.basename(run.metadataPath), path.basename(reserve)].sort(),
    );
  });

  test('the archive is what pg_restore calls a custom-format dump', () => {
    const header = readFileSync(run.dumpPath).subarray(0, 5).toString('latin1');
    assert.equal(header, 'PGDMP');
  });
});

describe('backup --env prod', () => {
  test('names the file and the metadata after prod and backs up the prod database', async () => {
    const run = await backupInto('prod');
    const match = NAME_PATTERN.exec(path.basename(run.dumpPath));
    assert.equal(match?.[1], prodDb);
    assert.equal(match?.[2], 'prod');
    assert.equal(run.metadata.environment, 'prod');
    assert.equal(run.metadata.database_name, prodDb);
    assert.deepEqual(run.metadata.table_counts, FIXTURE_COUNTS);
    assert.match(run.stdout, /^Environment: prod$/m);
  });
});

/** The restore drill (--verify FILE --restore-test) of `dumpPath`, on the test server, configured for `database`. */
async function drillOf(database: string, dumpPath: string) {
  const configDir = await tempDir();
  await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', database));
  return runCli({ args: ['--verify', dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir] });
}

describe("the database's or role's timeouts (set for the application) do not apply to the tool's sessions", () => {
  test('statement and idle-in-transaction timeouts of 50 ms: backed up, drilled, and restored identical', async () => {
    const database = uniqueName('timeouts');
    await server.createDatabase(
      database,
      // Counting it takes far longer than the timeouts, and so does dumping it while the snapshot's session waits.
      `${FIXTURE_SQL}; CREATE TABLE big AS SELECT g AS id FROM generate_series(1, 2000000) g`,
    );
    // As pg_dump and pg_restore do for theirs: the tool's own sessions (the snapshot held while pg_dump
    // runs, the counts, a drill's reconciliation) turn these off, or every backup of this database fails.
    const timeouts = ["statement_timeout = '50ms'", "idle_in_transaction_session_timeout = '50ms'"];
    const admin = await server.connect('postgres');
    try {
      for (const setting of [...timeouts, "idle_session_timeout = '200ms'"])
        await admin.query(`ALTER DATABASE ${database} SET ${setting}`);
    } finally {
      await admin.end();
    }
    const run = await takeBackup(server, database, path.join(await tempDir(), 'backups'));
    assert.equal((run.metadata.table_counts as Record<string, number>).big, 2000000);
    const drill = await drillOf(database, run.dumpPath);
    assert.equal(drill.exitCode, 0, drill.stderr);
    assert.match(drill.stdout, /^big +2000000 +2000000 {2}✓$/m);
    const restored = await restoreInto(run.dumpPath);
    const source = await server.connect(database);
    try {
      await source.query(
        'SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; SET idle_session_timeout = 0',
      );
      await assertSameContent(source, restored);
    } finally {
      await Promise.all([source.end(), restored.end()]);
    }
  });
});

describe('through a connection pooler', () => {
  test('one that refuses startup parameters but its own (PgBouncer by default): backed up, and it restores', async () => {
    const pooler = await startStrictPooler(server);
    try {
      const vars = { ...dbVars(server, 'DEV_DB_', devDb), DEV_DB_HOST: pooler.host, DEV_DB_PORT: String(pooler.port) };
      const configDir = await tempDir();
      await writeEnvFile(configDir, '.env', vars);
      const outputDir = path.join(configDir, 'out');
      const result = await runCli({ args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir] });
      assert.equal(result.exitCode, 0, result.stderr);
      await assertBackupInRestoresIdentical(outputDir);
    } finally {
      await pooler.close();
    }
  });
});

describe("a host name whose DNS answer changes during the run (a failover's CNAME)", () => {
  test("pg_dump connects to the address the tool's session reached, never looking the name up again", async () => {
    // A name only the CLI's own process resolves: a pg_dump that looked it up again would find nothing.
    const host = 'db.pinned.test';
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', { ...dbVars(server, 'DEV_DB_', devDb), DEV_DB_HOST: host });
    const outputDir = path.join(configDir, 'out');
    for (const jobs of ['1', '2']) {
      const args = ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir, '--jobs', jobs];
      const result = await runCli({ args, privateDns: { host, address: server.host } });
      assert.equal(result.exitCode, 0, result.stderr);
      await assertBackupInRestoresIdentical(outputDir);
      await fs.rm(outputDir, { recursive: true });
    }
  });
});

describe('counts describe exactly what is in the file', () => {
  test('public "coll.t" and coll.t get a key each, tables named "__proto__" and "constructor" keep theirs, and verify, restore and the drill check them', async () => {
    const database = uniqueName('keys');
    await server.createDatabase(database, [
      'CREATE SCHEMA coll',
      'CREATE TABLE coll.t (v int)',
      'INSERT INTO coll.t SELECT generate_series(1, 3)',
      'CREATE TABLE public."coll.t" (v int)',
      'INSERT INTO public."coll.t" SELECT generate_series(1, 5)',
      'CREATE TABLE "__proto__" (v int)',
      'INSERT INTO "__proto__" VALUES (1), (2)',
      'CREATE TABLE "constructor" (v int)',
    ]);
    const run = await takeBackup(server, database, path.join(await tempDir(), 'backups'));
    assert.deepEqual(
      JSON.parse(await fs.readFile(run.metadataPath, 'utf8')).table_counts,
      JSON.parse('{"\\"coll.t\\"": 5, "__proto__": 2, "coll.t": 3, "constructor": 0}'),
    );
    assert.equal((await runCli({ args: ['--verify', run.dumpPath] })).exitCode, 0);

    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', database));
    const restored = await runCli({
      args: [
        '--restore',
        run.dumpPath,
        '--target-db',
        uniqueName('keys_copy'),
        '--env',
        'dev',
        '--config-dir',
        configDir,
      ],
    });
    assert.equal(restored.exitCode, 0, restored.stderr);
    assert.match(restored.stdout, /^"coll\.t" +5 +5 {2}✓$/m);
    assert.match(restored.stdout, /^coll\.t +3 +3 {2}✓$/m);
    assert.match(restored.stdout, /^__proto__ +2 +2 {2}✓$/m);
    assert.match(restored.stdout, /^constructor +0 +0 {2}✓$/m);

    // A backup whose metadata claims one count for either table fails, whichever it is.
    const metadata = JSON.parse(await fs.readFile(run.metadataPath, 'utf8'));
    metadata.table_counts['"coll.t"'] = 3;
    await fs.writeFile(run.metadataPath, JSON.stringify(metadata));
    const drill = await runCli({
      args: ['--verify', run.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir],
    });
    assert.equal(drill.exitCode, 8, drill.stdout);
    assert.match(drill.stderr, /"coll\.t" \(backup 3, restored 5\)/);
  });

  test("a backup from a hot standby leaves out unlogged tables' rows as pg_dump does, says so, and verifies, restores and drills", async () => {
    const database = uniqueName('standby');
    await server.createDatabase(database, [
      'CREATE TABLE orders (id int PRIMARY KEY)',
      'INSERT INTO orders SELECT generate_series(1, 100)',
      'CREATE UNLOGGED TABLE cache (k int)',
      'INSERT INTO cache SELECT generate_series(1, 50)',
      'CREATE TABLE m (id int) PARTITION BY RANGE (id)',
      'CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10)',
      'CREATE UNLOGGED TABLE m2 PARTITION OF m FOR VALUES FROM (10) TO (20)',
      'INSERT INTO m VALUES (1), (2), (3), (11), (12), (13), (14)',
    ]);
    const standby = await startTestServer({ standbyOf: server });
    try {
      // A standby has no data of an unlogged relation (only its init fork): reading it fails.
      const run = await takeBackup(standby, database, path.join(await tempDir(), 'backups'));
      assert.deepEqual(run.metadata.table_counts, { cache: 0, m: 3, orders: 100 });
      assert.deepEqual(run.metadata.unlogged_data_left_out, ['cache', 'm']);
      assert.match(run.stdout, /^Left out: +the rows of unlogged tables \(cache, m\): a standby has none/m);
      const verified = await runCli({ args: ['--verify', run.dumpPath] });
      assert.equal(verified.exitCode, 0, verified.stdout);

      // Restored on the primary, the unlogged tables are there, empty, as in the backup.
      const configDir = await tempDir();
      await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', database));
      const target = uniqueName('from_standby');
      const restore = ['--restore', run.dumpPath, '--target-db', target, '--env', 'dev', '--config-dir', configDir];
      const restored = await runCli({ args: restore });
      assert.equal(restored.exitCode, 0, restored.stderr);
      assert.match(restored.stdout, /^cache +0 +0 {2}✓$/m);
      assert.match(restored.stdout, /^m +3 +3 {2}✓$/m);
      const drill = await drillOf(database, run.dumpPath);
      assert.equal(drill.exitCode, 0, drill.stderr);
      assert.match(drill.stdout, /^orders +100 +100 {2}✓$/m);
    } finally {
      await standby.stop();
    }
  });

  test('an index on an SQL function reading an unqualified table is backed up, and a user operator never counts', async () => {
    const database = uniqueName('exprindex');
    await server.createDatabase(database, [
      'CREATE TABLE lookup (k int PRIMARY KEY, v int)',
      'INSERT INTO lookup SELECT g, g * 10 FROM generate_series(1, 3) g',
      // Planning a count would inline lk(), reading its body on the session's search_path: t1 is read by COPY.
      'CREATE FUNCTION lk(int) RETURNS int LANGUAGE sql IMMUTABLE AS $$ SELECT v FROM lookup WHERE k = $1 $$',
      'CREATE TABLE t (id int) PARTITION BY RANGE (id)',
      'CREATE TABLE t1 PARTITION OF t FOR VALUES FROM (0) TO (100)',
      'CREATE TABLE t2 PARTITION OF t FOR VALUES FROM (100) TO (200)',
      'INSERT INTO t SELECT g % 3 + 1 FROM generate_series(1, 7) g',
      'INSERT INTO t SELECT 150 FROM generate_series(1, 4)',
      'CREATE INDEX ON t1 (lk(id))',
      // The counts of t's partitions are added up: an operator of the database's own must not do it.
      'CREATE FUNCTION public.evil_plus(bigint, bigint) RETURNS bigint LANGUAGE sql AS $$ SELECT 0::bigint $$',
      'CREATE OPERATOR public.+ (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.evil_plus)',
    ]);
    const run = await takeBackup(server, database, path.join(await tempDir(), 'backups'));
    assert.deepEqual(run.metadata.table_counts, { lookup: 3, t: 11 });
    // Restoring that index fails on any server (pg_restore reads lk() on an empty search_path): the data is compared.
    const restored = await restoreIntoNewDatabase(server, run.dumpPath, ['--section=pre-data', '--section=data']);
    const [from, to] = await Promise.all([server.connect(database), server.connect(restored)]);
    try {
      const [expected, actual] = await Promise.all([snapshotDatabase(from), snapshotDatabase(to)]);
      assert.deepEqual(actual.tables, expected.tables);
    } finally {
      await Promise.all([from.end(), to.end()]);
    }
  });

  // Raises in this tool's own sessions as a superuser; pg_restore building the index (PostgreSQL's own doing) is let be.
  const EVIL_SQL = [
    `CREATE FUNCTION evil() RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN
       IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
          AND current_setting('application_name') LIKE 'backup_db:%' AND current_query() !~* 'CREATE INDEX' THEN
         RAISE EXCEPTION 'attacker code ran as superuser % in %', current_user, current_query();
       END IF;
       RETURN 0;
     END $$`,
  ];

  test("a table owner's function in an index predicate never runs in the counts, of the backup or of the drill", async () => {
    const database = uniqueName('evilindex');
    await server.createDatabase(database, [
      ...EVIL_SQL,
      'CREATE TABLE t (id int)',
      'INSERT INTO t SELECT generate_series(1, 10)',
      'CREATE INDEX ON t (id) WHERE id > evil()',
    ]);
    const run = await takeBackup(server, database, path.join(await tempDir(), 'backups'));
    assert.deepEqual(run.metadata.table_counts, { t: 10 });
    const restored = await restoreIntoNewDatabase(server, run.dumpPath, ['--section=pre-data', '--section=data']);
    const [from, to] = await Promise.all([server.connect(database), server.connect(restored)]);
    try {
      const [expected, actual] = await Promise.all([snapshotDatabase(from), snapshotDatabase(to)]);
      assert.deepEqual(actual.tables, expected.tables);
    } finally {
      await Promise.all([from.end(), to.end()]);
    }
    const drill = await drillOf(database, run.dumpPath);
    assert.equal(drill.exitCode, 0, drill.stderr);
    assert.match(drill.stdout, /^t +10 +10 {2}✓$/m);
  });

  test('an index made after the backup listed its tables (while it waits for a lock) never runs its function either', async () => {
    const database = uniqueName('evilrace');
    await server.createDatabase(database, [
      ...EVIL_SQL,
      'CREATE TABLE a (id int)',
      'CREATE TABLE b (id int)',
      'INSERT INTO b SELECT generate_series(1, 10)',
    ]);
    const [holder, owner, observer] = [
      await server.connect(database),
      await server.connect(database),
      await server.connect(database),
    ];
    await holder.query('BEGIN; LOCK TABLE a IN ACCESS EXCLUSIVE MODE');
    const outputDir = path.join(await tempDir(), 'backups');
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', database));
    const cli = startCli({ args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir] });
    try {
      // The backup has listed its tables (and judged them) and waits for the lock on a, before it locks b.
      await waitFor('the backup to wait for the lock on a', async () => {
        const { rows } = await observer.query(
          "SELECT 1 FROM pg_stat_activity WHERE application_name ~ '^backup_db:[0-9]+:[0-9a-f]+$' AND wait_event_type = 'Lock'",
        );
        return rows.length > 0 ? true : undefined;
      });
      await owner.query('CREATE INDEX b_evil ON b (id) WHERE id > evil()');
      await holder.query('COMMIT');
      const result = await cli;
      assert.equal(result.exitCode, 0, String(result.stderr));
      const [metadata] = (await fs.readdir(outputDir)).filter((name) => name.endsWith('.metadata.json'));
      const counts = JSON.parse(await fs.readFile(path.join(outputDir, metadata!), 'utf8')).table_counts;
      assert.deepEqual(counts, { a: 0, b: 10 });
    } finally {
      await holder.query('ROLLBACK').catch(() => undefined);
      await cli.catch(() => undefined);
      await Promise.all([holder, owner, observer].map((client) => client.end()));
    }
  });

  test("a table owner's function in an extended statistics expression never runs in the counts", async () => {
    const database = uniqueName('evilstats');
    await server.createDatabase(database, [
      ...EVIL_SQL,
      'CREATE TABLE t (id int)',
      'INSERT INTO t SELECT generate_series(1, 10)',
      'CREATE STATISTICS t_evil ON (id + evil()) FROM t',
      'ANALYZE t',
    ]);
    const run = await takeBackup(server, database, path.join(await tempDir(), 'backups'));
    assert.deepEqual(run.metadata.table_counts, { t: 10 });
  });

  test('counts read by COPY are exact: no rows, no columns, newlines and backslashes, a partition of each kind', async () => {
    const database = uniqueName('copycount');
    await server.createDatabase(database, [
      'CREATE TABLE empty (id int, note text)',
      'CREATE INDEX ON empty (lower(note))',
      'CREATE TABLE nocols ()',
      'INSERT INTO nocols SELECT FROM generate_series(1, 4)',
      'CREATE INDEX ON nocols ((1)) WHERE true',
      'CREATE TABLE notes (note text)',
      "INSERT INTO notes VALUES (E'a\\nb\\n'), (E'\\\\'), (E'\\\\n'), (''), (NULL), (E'\\r\\n\\n')",
      'CREATE INDEX ON notes (length(note))',
      'CREATE TABLE events (k int, note text) PARTITION BY RANGE (k)',
      'CREATE TABLE events_risky PARTITION OF events FOR VALUES FROM (0) TO (100)',
      'CREATE TABLE events_plain PARTITION OF events FOR VALUES FROM (100) TO (200)',
      "INSERT INTO events SELECT g, E'x\\ny' FROM generate_series(1, 7) g",
      'INSERT INTO events SELECT 150 FROM generate_series(1, 5)',
      'CREATE INDEX ON events_risky (k) WHERE k > 2',
    ]);
    const run = await takeBackup(server, database, path.join(await tempDir(), 'backups'));
    assert.deepEqual(run.metadata.table_counts, { empty: 0, events: 12, nocols: 4, notes: 6 });
    const drill = await drillOf(database, run.dumpPath);
    assert.equal(drill.exitCode, 0, drill.stderr);
    assert.match(drill.stdout, /^nocols +4 +4 {2}✓$/m);
    assert.match(drill.stdout, /^notes +6 +6 {2}✓$/m);
    assert.match(drill.stdout, /^events +12 +12 {2}✓$/m);
  });

  test('a partitioned table with no partitions yet (no relation holds data): backed up, 0 rows, and it restores', async () => {
    const database = uniqueName('noparts');
    await server.createDatabase(database, ['CREATE TABLE events (k int, at date) PARTITION BY RANGE (at)']);
    const run = await takeBackup(server, database, path.join(await tempDir(), 'backups'));
    assert.deepEqual(run.metadata.table_counts, { events: 0 });
    const drill = await drillOf(database, run.dumpPath);
    assert.equal(drill.exitCode, 0, drill.stderr);
    assert.match(drill.stdout, /^events +0 +0 {2}✓$/m);
  });

  test('a foreign table attached as a partition: its remote rows are not counted, and restores match with the remote gone', async () => {
    const [database, remote] = [uniqueName('fdw'), uniqueName('fdw_remote')];
    await server.createDatabase(remote, [
      'CREATE TABLE readings_2025 (id int, at date)',
      "INSERT INTO readings_2025 SELECT i, date '2025-03-01' FROM generate_series(1, 7) AS i",
    ]);
    await server.createDatabase(database, [
      'CREATE EXTENSION postgres_fdw',
      `CREATE SERVER remote FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '127.0.0.1', port '${server.port}', dbname '${remote}')`,
      `CREATE USER MAPPING FOR CURRENT_USER SERVER remote OPTIONS (user 'postgres', password '${server.password}')`,
      'CREATE TABLE readings (id int, at date) PARTITION BY RANGE (at)',
      "CREATE TABLE readings_2024 PARTITION OF readings FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
      "CREATE FOREIGN TABLE readings_remote PARTITION OF readings FOR VALUES FROM ('2025-01-01') TO ('2026-01-01') SERVER remote OPTIONS (table_name 'readings_2025')",
      "INSERT INTO readings_2024 SELECT i, date '2024-03-01' FROM generate_series(1, 10) AS i",
    ]);
    const viaParent = await server.connect(database);
    try {
      assert.equal(
        (await viaParent.query('SELECT count(*)::int AS n FROM readings')).rows[0].n,
        17,
        'the parent shows the remote rows too',
      );
    } finally {
      await viaParent.end();
    }
    const run = await takeBackup(server, database, path.join(await tempDir(), 'backups'));
    assert.deepEqual(run.metadata.table_counts, { readings: 10 }, 'only the rows the archive holds');

    await server.dropDatabase(remote);
    const drill = await drillOf(database, run.dumpPath);
    assert.equal(drill.exitCode, 0, drill.stderr);
    assert.match(drill.stdout, /^readings +10 +10 {2}✓$/m);
  });

  test('a TRUNCATE queued behind pg_dump before the counts reach its table does not empty the count', async () => {
    // pg_dump locks tables in OID order, the counts go by name. Two gates stop each where the race
    // lies: a proxy holds the counts' first COPY, of aa_counts_gate (pg_dump writes "TO stdout"), and
    // an exclusive lock on the partitioned parent mm_dump_gate alone (the counts read its partition
    // without it) holds pg_dump after it locked zz_truncated.
    const database = uniqueName('truncated');
    await server.createDatabase(database, [
      'CREATE TABLE zz_truncated (x int)',
      'INSERT INTO zz_truncated SELECT generate_series(1, 1000)',
      'CREATE TABLE aa_counts_gate (id int PRIMARY KEY)',
      'CREATE TABLE mm_dump_gate (id int) PARTITION BY RANGE (id)',
      'CREATE TABLE mm_dump_gate_1 PARTITION OF mm_dump_gate FOR VALUES FROM (0) TO (10)',
    ]);
    const proxy = await startGatingProxy(server, ') TO STDOUT');
    const connect = () => server.connect(database);
    const [dumpGate, truncator, observer] = await Promise.all([connect(), connect(), connect()]);
    const found = (sql: string) => async () => ((await observer.query(sql)).rows.length > 0 ? true : undefined);
    await dumpGate.query('BEGIN; LOCK TABLE ONLY mm_dump_gate IN ACCESS EXCLUSIVE MODE');
    const configDir = await tempDir();
    const viaProxy = { DEV_DB_HOST: proxy.host, DEV_DB_PORT: String(proxy.port) };
    await writeEnvFile(configDir, '.env', { ...dbVars(server, 'DEV_DB_', database), ...viaProxy });
    const cli = startCli({
      args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', path.join(configDir, 'out'), '--json'],
    });
    let truncated: Promise<unknown> = Promise.resolve();
    try {
      await waitFor('the first count held', async () => (proxy.held === 1 ? true : undefined));
      await waitFor(
        'pg_dump to hold zz_truncated and wait at its gate',
        found(`SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                WHERE a.application_name LIKE 'backup_db:%:pg_dump' AND a.wait_event_type = 'Lock'
                  AND l.relation = 'zz_truncated'::regclass AND l.granted`),
      );
      truncated = truncator.query('BEGIN; TRUNCATE zz_truncated; INSERT INTO zz_truncated VALUES (42); COMMIT');
      await waitFor(
        'the TRUNCATE to queue behind pg_dump',
        found("SELECT 1 FROM pg_locks WHERE relation = 'zz_truncated'::regclass AND NOT granted"),
      );
      proxy.open();
      // Only a session that took its lock before pg_dump started can be past the table here.
      await waitFor(
        "the backup's own session to wait for zz_truncated, or to be done with it",
        found(`SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                WHERE a.application_name ~ '^backup_db:[0-9]+:[0-9a-f]+$' AND l.relation = 'zz_truncated'::regclass
                  AND (NOT l.granted OR a.state = 'idle in transaction')`),
      );
    } finally {
      proxy.open();
      await dumpGate.query('ROLLBACK');
    }
    const result = await cli;
    await truncated;
    await Promise.all([dumpGate, truncator, observer].map((client) => client.end()));
    await proxy.close();
    assert.equal(result.exitCode, 0, String(result.stderr));
    const { metadata } = JSON.parse(String(result.stdout));
    assert.equal(metadata.table_counts.zz_truncated, 1000, 'the rows pg_dump wrote, not the table TRUNCATE emptied');
  });
});

describe('the wall clock steps back during a backup (an NTP step at boot)', () => {
  test('durations are still real: the backup is valid, listed and verifiable, and the log and metrics agree', async () => {
    // pg_dump is never held (released up front): `started` only marks that the dump has begun.
    const clients = await clientDirHolding('pg_dump', '--snapshot');
    await fs.writeFile(clients.release, '');
    const dir = await tempDir();
    const outputDir = path.join(dir, 'backups');
    const [logFile, metricsFile] = [path.join(dir, 'runs.log'), path.join(dir, 'backup_db.prom')];
    await writeEnvFile(dir, '.env', dbVars(server, 'DEV_DB_', devDb));
    const [output, log, metrics] = [
      `--output-dir=${outputDir}`,
      `--log-file=${logFile}`,
      `--metrics-file=${metricsFile}`,
    ];
    const result = await runCli({
      args: ['--env', 'dev', '--config-dir', dir, output, log, metrics, '--pg-bin-dir', clients.dir],
      wallClock: { stepMs: -120_000, when: clients.started },
    });
    assert.equal(result.exitCode, 0, result.stderr);
    const metadataFile = (await fs.readdir(outputDir)).find((name) => name.endsWith('.metadata.json'))!;
    const metadata = JSON.parse(await fs.readFile(path.join(outputDir, metadataFile), 'utf8'));
    assert.ok(metadata.duration_ms >= 0, `duration_ms ${metadata.duration_ms}`);
    const listed = await runCli({ args: ['--list', '--output-dir', outputDir] });
    assert.match(listed.stdout, /✓ Verified/, listed.stdout);
    const dumpPath = path.join(outputDir, metadata.backup_file);
    assert.equal((await runCli({ args: ['--verify', dumpPath] })).exitCode, 0);
    const logged = JSON.parse(await fs.readFile(logFile, 'utf8'));
    assert.ok(logged.duration_ms >= 0, `logged duration_ms ${logged.duration_ms}`);
    const seconds = Number(
      /^backup_db_last_duration_seconds\{.*\} (\S+)$/m.exec(await fs.readFile(metricsFile, 'utf8'))![1],
    );
    assert.ok(seconds >= 0, `backup_db_last_duration_seconds ${seconds}`);
  });
});

describe('a system clock outside the years 1970 to 9999', () => {
  test('no backup is started (exit 7, nothing written), naming the clock to fix', async () => {
    const dir = await tempDir();
    await writeEnvFile(dir, '.env', dbVars(server, 'DEV_DB_', devDb));
    const outputDir = path.join(dir, 'backups');
    for (const [year, shown] of [
      [10000, /the system clock says \+010000-01-01T/],
      [1969, /the system clock says 1969-12-31T/],
    ] as const) {
      // Stepped from the start: the configuration directory exists already.
      const stepMs = Date.UTC(year, year > 1970 ? 0 : 11, year > 1970 ? 1 : 31) - Date.now();
      const result = await runCli({
        args: ['--env', 'dev', '--config-dir', dir, '--output-dir', outputDir],
        wallClock: { when: dir, stepMs },
      });
      assert.equal(result.exitCode, 7, result.stderr);
      assert.match(result.stderr, /^✗ Backup failed: The system clock is wrong$/m);
      assert.match(result.stderr, shown);
      assert.match(result.stderr, /fix the clock/i);
      assert.deepEqual(await fs.readdir(outputDir).catch(() => []), [], 'nothing written');
    }
  });

  test('a name pushed past 9999 by the seconds already taken is refused too (exit 7), not written as +010000', async () => {
    const dir = await tempDir();
    await writeEnvFile(dir, '.env', dbVars(server, 'DEV_DB_', devDb));
    const outputDir = path.join(dir, 'backups');
    await fs.mkdir(outputDir);
    // The clock itself is valid, standing still at 23:59:58.5; this second and the next are taken.
    const taken = ['58', '59'].map((s) => `${devDb}_dev_9999-12-31T23-59-${s}Z.dump`);
    for (const name of taken) await fs.writeFile(path.join(outputDir, name), 'taken');
    const result = await runCli({
      args: ['--env', 'dev', '--config-dir', dir, '--output-dir', outputDir],
      wallClock: { when: dir, at: new Date(Date.UTC(9999, 11, 31, 23, 59, 58, 500)), rate: 0 },
    });
    assert.equal(result.exitCode, 7, result.stderr);
    assert.match(result.stderr, /^✗ Backup failed: The system clock is wrong$/m);
    assert.match(result.stderr, /\+010000-01-01T00:00:00/);
    assert.deepEqual((await fs.readdir(outputDir)).sort(), taken, 'nothing written, nothing touched');
    for (const name of taken) assert.equal(await fs.readFile(path.join(outputDir, name), 'utf8'), 'taken');
  });
});

describe('names already taken', () => {
  test('a whole minute of names taken fails the run (exit 7, as README says), overwriting none of them', async () => {
    const dir = await tempDir();
    await writeEnvFile(dir, '.env', dbVars(server, 'DEV_DB_', devDb));
    const outputDir = path.join(dir, 'backups');
    await fs.mkdir(outputDir);
    const at = Date.UTC(2030, 0, 1, 12, 0, 0, 250);
    const taken = Array.from({ length: 60 }, (_, s) => backupFileNameAt(new Date(at + s * 1000)));
    for (const name of taken) await fs.writeFile(path.join(outputDir, name), 'taken');
    const result = await runCli({
      args: ['--env', 'dev', '--config-dir', dir, '--output-dir', outputDir],
      wallClock: { when: dir, at: new Date(at), rate: 0 },
    });
    assert.equal(result.exitCode, 7, result.stderr);
    assert.match(result.stderr, /^✗ Backup failed/m);
    assert.match(result.stderr, new RegExp(`no free backup file name for ${devDb}`));
    assert.deepEqual((await fs.readdir(outputDir)).sort(), taken.sort(), 'nothing written, nothing touched');
    for (const name of taken) assert.equal(await fs.readFile(path.join(outputDir, name), 'utf8'), 'taken');
    // The second after that minute is free: a name is found, the backup made.
    await fs.rm(path.join(outputDir, taken[59]!));
    const later = await runCli({
      args: ['--env', 'dev', '--config-dir', dir, '--output-dir', outputDir],
      wallClock: { when: dir, at: new Date(at), rate: 0 },
    });
    assert.equal(later.exitCode, 0, later.stderr);
  });
});

function backupFileNameAt(time: Date): string {
  return `${devDb}_dev_${time.toISOString().slice(0, 19).replaceAll(':', '-')}Z.dump`;
}
