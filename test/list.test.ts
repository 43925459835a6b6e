/**
 * --list on a directory of real backups: newest first, the right status for each file, partial
 * files shown but never counted, quick (metadata + size) versus full (--list --verify) checks.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { fileNamePart, metadataFileName } from '../backup_db.ts';
import {
  clientThatDeletes,
  dbVars,
  ownConfigDir,
  PROJECT_DIR,
  runCli,
  SCRIPT,
  takeBackup,
  tempDir,
  writeEnvFile,
  type TakenBackup,
} from './helpers/cli.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { NEWER_CLIENT_DIR, NEWER_MAJOR, skipUnless, unmet } from './helpers/requirements.ts';
import { flipMiddleByte } from './helpers/wait.ts';

const noNewerClient = await unmet('newerClient');
let server: TestServer;
let dir: string;
let dev1: TakenBackup;
let dev2: TakenBackup;
let prod: TakenBackup;
const NO_METADATA = 'legacy_dev_2020-01-01T00-00-00Z.dump';
const PARTIAL = 'list_prod_2099-01-01T00-00-00Z.dump.partial';

before(async () => {
  server = await startTestServer();
  for (const db of ['list_dev', 'list_prod']) {
    await server.createDatabase(db, `CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(1, 10)`);
  }
  dir = path.join(await tempDir(), 'backups');
  dev1 = await takeBackup(server, 'list_dev', dir, 'dev');
  dev2 = await takeBackup(server, 'list_dev', dir, 'dev');
  prod = await takeBackup(server, 'list_prod', dir, 'prod');
  // A dump nobody described, and what an interrupted run leaves behind.
  await fs.copyFile(dev1.dumpPath, path.join(dir, NO_METADATA));
  await fs.writeFile(path.join(dir, PARTIAL), Buffer.alloc(1234));
});
after(() => server?.stop());

const list = (directory: string, ...extra: string[]) =>
  runCli({ args: ['--list', '--output-dir', directory, ...extra] });

/** The table rows of the human listing: [timestamp, environment, database, size, status]. */
function tableRows(stdout: string): string[][] {
  const lines = stdout.split('\n');
  const header = lines.findIndex((line) => line.startsWith('Timestamp'));
  assert.ok(header > 0, 'has a header row');
  const rows: string[][] = [];
  for (const line of lines.slice(header + 1)) {
    if (line === '') break;
    rows.push(line.split(/ {2,}/));
  }
  return rows;
}

describe('--list', () => {
  test('shows every file newest first with its status; the partial is shown but not counted', async () => {
    const result = await list(dir);
    assert.equal(result.exitCode, 0, result.stderr);
    assert.match(result.stdout, /^Backup Files \(.+backups\/\):\n\nTimestamp +Environment +Database +Size +Status\n/);
    const rows = tableRows(result.stdout);
    assert.deepEqual(
      rows.map(([timestamp, env, db, , status]) => [timestamp, env, db, status]),
      [
        ['2099-01-01T00:00:00Z', 'prod', 'list', '✗ Incomplete'],
        [prod.metadata.backup_timestamp, 'prod', 'list_prod', '✓ Verified'],
        [dev2.metadata.backup_timestamp, 'dev', 'list_dev', '✓ Verified'],
        [dev1.metadata.backup_timestamp, 'dev', 'list_dev', '✓ Verified'],
        ['2020-01-01T00:00:00Z', 'dev', 'legacy', '? No metadata'],
      ],
    );
    assert.ok(
      String(dev2.metadata.backup_timestamp) > String(dev1.metadata.backup_timestamp),
      'two backups in the same second get distinct names',
    );
    assert.match(rows[4]![3]!, /^\d+\.\d KB$/);
    assert.match(
      result.stdout,
      /\n4 backups, 1 incomplete file \(left by runs that did not finish; not backups\)\. Status checks metadata and size only/,
    );
  });

  test('--json: one document; partials apart from backups; same order and statuses', async () => {
    const result = await list(dir, '--json');
    assert.equal(result.exitCode, 0);
    const doc = JSON.parse(result.stdout);
    assert.equal(doc.ok, true);
    assert.equal(doc.command, 'list');
    assert.equal(doc.directory, dir);
    assert.deepEqual(
      doc.backups.map((b: { file: string; status: string }) => [b.file, b.status]),
      [
        [path.basename(prod.dumpPath), 'verified'],
        [path.basename(dev2.dumpPath), 'verified'],
        [path.basename(dev1.dumpPath), 'verified'],
        [NO_METADATA, 'no_metadata'],
      ],
    );
    assert.deepEqual(
      doc.incomplete.map((b: { file: string; status: string; size_bytes: number }) => [b.file, b.status, b.size_bytes]),
      [[PARTIAL, 'incomplete', 1234]],
    );
    assert.equal(doc.backups[0].size_bytes, prod.metadata.backup_size_bytes);
  });

  test(
    "a FIFO named as a backup's metadata is that backup's invalid metadata; the rest lists as usual",
    { timeout: 60_000 },
    async () => {
      const copy = path.join(await tempDir(), 'backups');
      await fs.mkdir(copy);
      for (const file of [dev1.dumpPath, dev2.dumpPath, dev2.metadataPath])
        await fs.copyFile(file, path.join(copy, path.basename(file)));
      await execa('mkfifo', [path.join(copy, path.basename(dev1.metadataPath))]);
      const result = await list(copy);
      assert.equal(result.exitCode, 0, result.stderr);
      assert.deepEqual(
        tableRows(result.stdout).map((row) => row[4]),
        ['✓ Verified', '✗ Invalid metadata'],
      );
    },
  );

  test(
    'metadata of 100,000 tables lists; one of millions of values is refused unparsed (V8 would take minutes)',
    { timeout: 120_000 },
    async () => {
      const copy = path.join(await tempDir(), 'backups');
      await fs.mkdir(copy);
      for (const file of [dev1.dumpPath, dev1.metadataPath, dev2.dumpPath, dev2.metadataPath])
        await fs.copyFile(file, path.join(copy, path.basename(file)));
      const withTables = async (backup: TakenBackup, count: number) => {
        const tables = Array.from({ length: count }, (_, i) => `"public.t${i.toString(36)}":${i}`).join(',');
        const metadata = JSON.parse(await fs.readFile(backup.metadataPath, 'utf8'));
        const text = JSON.stringify({ ...metadata, table_counts: {} }).replace(
          '"table_counts":{}',
          `"table_counts":{${tables}}`,
        );
        await fs.writeFile(path.join(copy, path.basename(backup.metadataPath)), text);
      };
      await withTables(dev2, 100_000);
      await withTables(dev1, 2_000_001);
      const result = await list(copy, '--json');
      assert.equal(result.exitCode, 0, result.stderr);
      const doc = JSON.parse(result.stdout);
      assert.deepEqual(
        doc.backups.map((b: { status: string }) => b.status),
        ['verified', 'invalid_metadata'],
      );
      assert.deepEqual(doc.backups[1].problems, ['it holds more than 2,000,000 values']);
    },
  );

  test("another database's lock that is a directory or unreadable, next to its partial: that row only", async () => {
    const copy = path.join(await tempDir(), 'backups');
    await fs.mkdir(copy);
    for (const file of [dev1.dumpPath, dev1.metadataPath])
      await fs.copyFile(file, path.join(copy, path.basename(file)));
    await fs.mkdir(path.join(copy, 'other_dev.lock'));
    await fs.writeFile(path.join(copy, 'locked_dev.lock'), '', { mode: 0o000 });
    for (const db of ['other', 'locked'])
      await fs.writeFile(path.join(copy, `${db}_dev_2026-11-24T02-00-00Z.dump.partial`), '');
    const asUser = { withoutRootOverride: true };
    const listed = await runCli({ args: ['--list', '--output-dir', copy, '--json'], ...asUser });
    assert.equal(listed.exitCode, 0, listed.stdout + listed.stderr);
    const doc = JSON.parse(listed.stdout);
    assert.deepEqual(
      doc.backups.map((b: { status: string }) => b.status),
      ['verified'],
    );
    assert.deepEqual(
      doc.incomplete.map((e: { file: string; status: string }) => [e.file.split('_')[0], e.status]),
      [
        ['locked', 'incomplete'],
        ['other', 'incomplete'],
      ],
    );
    assert.match(doc.incomplete[0].problems.join(' '), /lock .*EACCES/);
    assert.match(doc.incomplete[1].problems.join(' '), /lock .*not a regular file/);
    const checked = await runCli({
      args: ['--check', '--max-age', '1d', '--output-dir', copy],
      env: dbVars(server, 'DEV_DB_', 'list_dev'),
      ...asUser,
    });
    assert.equal(checked.exitCode, 0, checked.stdout + checked.stderr);
  });

  test('a dump whose size differs from its metadata → ✗ Size mismatch', async () => {
    const copy = path.join(await tempDir(), 'backups');
    await fs.mkdir(copy);
    for (const file of [dev1.dumpPath, dev1.metadataPath])
      await fs.copyFile(file, path.join(copy, path.basename(file)));
    await fs.appendFile(path.join(copy, path.basename(dev1.dumpPath)), 'x');
    const rows = tableRows((await list(copy)).stdout);
    assert.deepEqual(
      rows.map((row) => row[4]),
      ['✗ Size mismatch'],
    );
  });

  test('a flipped byte passes the quick check but fails --list --verify (exit 8)', async () => {
    const copy = path.join(await tempDir(), 'backups');
    await fs.mkdir(copy);
    for (const backup of [dev1, prod]) {
      for (const file of [backup.dumpPath, backup.metadataPath])
        await fs.copyFile(file, path.join(copy, path.basename(file)));
    }
    const damaged = path.join(copy, path.basename(dev1.dumpPath));
    const bytes = await fs.readFile(damaged);
    bytes[bytes.length - 10] = bytes[bytes.length - 10]! ^ 1;
    await fs.writeFile(damaged, bytes);

    const quick = await list(copy);
    assert.equal(quick.exitCode, 0);
    assert.deepEqual(
      tableRows(quick.stdout).map((row) => row[4]),
      ['✓ Verified', '✓ Verified'],
    );

    const full = await list(copy, '--verify');
    assert.equal(full.exitCode, 8, 'a full check that finds a bad backup fails, for monitoring');
    assert.deepEqual(
      tableRows(full.stdout).map((row) => row[4]),
      ['✓ Verified', '✗ Checksum mismatch'],
    );
    assert.match(full.stdout, /1 backup failed verification; run --verify FILE for details\./);

    const fullJson = JSON.parse((await list(copy, '--verify', '--json')).stdout);
    assert.equal(fullJson.ok, false);
    assert.equal(fullJson.full_check, true);
    assert.match(fullJson.backups[1].problems[0], /^Mismatch/);
  });

  test('a failed --list --verify is the contract error: exit_code, error, details and hints in --json, the error lines in text', async () => {
    const copy = path.join(await tempDir(), 'backups');
    await fs.mkdir(copy);
    await fs.writeFile(path.join(copy, 'random.dump'), '12345');

    const doc = JSON.parse((await list(copy, '--verify', '--json')).stdout);
    assert.deepEqual([doc.ok, doc.command, doc.exit_code], [false, 'list', 8]);
    assert.equal(doc.error, '1 backup failed verification');
    assert.match(doc.details, /^random\.dump: no metadata file$/);
    assert.match(doc.hints[0], /--verify .*random\.dump/);
    assert.deepEqual(
      doc.backups.map((b: { file: string }) => b.file),
      ['random.dump'],
      'the listing is still there',
    );

    const text = await list(copy, '--verify');
    assert.equal(text.exitCode, 8);
    assert.match(text.stdout, /^random\.dump +5 B +\? No metadata$/m, 'the table stays on stdout');
    assert.match(
      text.stderr,
      /^✗ Listing failed: 1 backup failed verification\n\nError: random\.dump: no metadata file\n/,
    );
    assert.match(text.stderr, /\n\nTroubleshooting:\n {2}1\. .*--verify .*random\.dump/);
  });

  test('--list --verify on healthy backups re-reads them all and passes', async () => {
    const copy = path.join(await tempDir(), 'backups');
    await fs.mkdir(copy);
    for (const file of [dev2.dumpPath, dev2.metadataPath])
      await fs.copyFile(file, path.join(copy, path.basename(file)));
    const full = await list(copy, '--verify');
    assert.equal(full.exitCode, 0, full.stdout);
    assert.match(full.stdout, /Every backup was re-read: checksum, size, archive structure and table data verified\./);
  });

  test(
    `--list --verify with only an older pg_restore: an intact pg_dump ${NEWER_MAJOR} backup needs a newer one (exit 6, as --verify), a damaged one fails (exit 8)`,
    skipUnless(noNewerClient),
    async () => {
      const copy = path.join(await tempDir(), 'backups');
      const configDir = await tempDir();
      await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'list_dev'));
      const taken = await runCli({
        args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', copy, '--pg-bin-dir', NEWER_CLIENT_DIR],
      });
      assert.equal(taken.exitCode, 0, taken.stderr);

      const full = await list(copy, '--verify');
      assert.equal(full.exitCode, 6, full.stdout);
      assert.deepEqual(
        tableRows(full.stdout).map((row) => row[4]),
        ['? Needs newer pg_restore'],
      );
      assert.match(
        full.stdout,
        /1 backup cannot be verified without a newer pg_restore; run --verify FILE for details\./,
      );
      const json = JSON.parse((await list(copy, '--verify', '--json')).stdout);
      assert.equal(json.backups[0].status, 'needs_newer_pg_restore');
      assert.match(json.backups[0].problems[0], new RegExp(`needs pg_restore ${NEWER_MAJOR} or newer; found: `));

      // Its bytes changed: damaged, whatever pg_restore it needs.
      await flipMiddleByte(
        path.join(
          copy,
          (await fs.readdir(copy)).find((name) => name.endsWith('.dump'))!,
        ),
      );
      const damaged = await list(copy, '--verify');
      assert.equal(damaged.exitCode, 8, damaged.stdout);
      assert.deepEqual(
        tableRows(damaged.stdout).map((row) => row[4]),
        ['✗ Checksum mismatch'],
      );
    },
  );

  test('--list --verify with a --pg-bin-dir (or PG_BIN_DIR) lacking pg_restore says so, as --verify does (exit 6)', async () => {
    const onlyDump = await tempDir('backup-db-nopgrestore-');
    await fs.symlink((await execa('sh', ['-c', 'command -v pg_dump'])).stdout, path.join(onlyDump, 'pg_dump'));
    const listed = await runCli({ args: ['--list', '--verify', '--output-dir', dir, '--pg-bin-dir', onlyDump] });
    const verified = await runCli({ args: ['--verify', dev1.dumpPath, '--pg-bin-dir', onlyDump] });
    for (const result of [listed, verified]) {
      assert.equal(result.exitCode, 6, result.stdout + result.stderr);
      assert.match(
        result.stderr,
        new RegExp(`^✗ \\w+ failed: No pg_dump and pg_restore in --pg-bin-dir ${onlyDump}$`, 'm'),
      );
      assert.match(result.stderr, new RegExp(`Error: ${onlyDump} holds no pg_restore`));
      assert.doesNotMatch(result.stdout + result.stderr, /newer pg_restore/);
    }
    const fromVariable = await runCli({
      args: ['--list', '--verify', '--output-dir', dir],
      env: { PG_BIN_DIR: onlyDump },
    });
    assert.equal(fromVariable.exitCode, 6, fromVariable.stdout + fromVariable.stderr);
    assert.match(
      fromVariable.stderr,
      new RegExp(`^✗ \\w+ failed: No pg_dump and pg_restore in PG_BIN_DIR ${onlyDump}$`, 'm'),
    );
  });

  test('control characters in names (tables, metadata, file names) are shown escaped, never sent raw; --json as before', async () => {
    const db = 'list_ctrl';
    await server.createDatabase(db, [
      `CREATE TABLE "evil\x1b[31mRED\x1b[0m" (id int)`,
      `CREATE SCHEMA "sch\x1b]0;pwned\x07"`,
      `CREATE TABLE "sch\x1b]0;pwned\x07"."t\nnewline" (id int)`,
    ]);
    const copy = path.join(await tempDir(), 'backups');
    const taken = await takeBackup(server, db, copy);
    assert.ok(!taken.stdout.includes('\x1b') && !taken.stdout.includes('\x07'), taken.stdout);
    assert.match(taken.stdout, /evil\\x1b\[31mRED\\x1b\[0m/);
    assert.match(taken.stdout, /sch\\x1b\]0;pwned\\x07\.t\\nnewline/);

    const hostile = 'app\x1b[2J\x1b]52;c;ZXZpbA==\x07';
    const metadata = JSON.parse(await fs.readFile(taken.metadataPath, 'utf8'));
    // Renamed as this tool would name that database's backup: metadata must agree with its file's name.
    const hostileFile = path.basename(taken.dumpPath).replace(db, fileNamePart(hostile));
    await fs.rename(taken.dumpPath, path.join(copy, hostileFile));
    await fs.rm(taken.metadataPath);
    await fs.writeFile(
      path.join(copy, metadataFileName(hostileFile)),
      JSON.stringify({ ...metadata, database_name: hostile, backup_file: hostileFile }, null, 2),
    );
    await fs.copyFile(
      path.join(copy, hostileFile),
      path.join(copy, 'x\x1b[2J\x1b]0;pwned\x07_dev_2025-01-01T00-00-00Z.dump'),
    );
    const verified = await runCli({ args: ['--verify', path.join(copy, hostileFile)] });
    for (const result of [await list(copy), verified]) {
      assert.equal(result.exitCode, 0, result.stderr);
      assert.ok(!/[\x00-\x09\x0b-\x1f\x7f-\x9f]/.test(result.stdout + result.stderr), result.stdout);
      assert.match(result.stdout, /app\\x1b\[2J\\x1b\]52;c;ZXZpbA==\\x07/);
    }
    assert.match((await list(copy)).stdout, /x\\x1b\[2J\\x1b\]0;pwned\\x07/);
    const doc = JSON.parse((await list(copy, '--json')).stdout);
    assert.ok(
      doc.backups.some((b: { database: string }) => b.database === hostile),
      'JSON carries the name as it is',
    );
  });

  test('metadata too large to be ours is invalid, and the problem names the metadata file, not the dump', async () => {
    const copy = path.join(await tempDir(), 'backups');
    await fs.mkdir(copy);
    await fs.copyFile(dev1.dumpPath, path.join(copy, path.basename(dev1.dumpPath)));
    await fs.writeFile(path.join(copy, path.basename(dev1.metadataPath)), '');
    await fs.truncate(path.join(copy, path.basename(dev1.metadataPath)), 2 ** 30); // sparse: no disk used
    const listed = await list(copy, '--json');
    const [backup] = JSON.parse(listed.stdout).backups as Array<{ status: string; problems: string[] }>;
    assert.equal(backup!.status, 'invalid_metadata');
    assert.match(backup!.problems[0]!, /^the metadata file is 1\.0 GB, more than this tool ever writes$/);
  });

  test('a described backup whose .dump became a FIFO or a dangling symlink keeps its row: ✗ Unreadable archive, --verify exit 8', async () => {
    const copy = path.join(await tempDir(), 'backups');
    await fs.mkdir(copy);
    for (const file of [dev1.dumpPath, dev1.metadataPath, dev2.dumpPath, dev2.metadataPath])
      await fs.copyFile(file, path.join(copy, path.basename(file)));
    const [fifo, dangling] = [dev1, dev2].map((b) => path.join(copy, path.basename(b.dumpPath)));
    await fs.rm(fifo!);
    await execa('mkfifo', [fifo!]);
    await fs.rm(dangling!);
    await fs.symlink(path.join(copy, 'gone.dump'), dangling!);
    const listed = await list(copy, '--json');
    assert.equal(listed.exitCode, 0, listed.stderr);
    const backups = JSON.parse(listed.stdout).backups as Array<{ file: string; status: string; problems: string[] }>;
    assert.deepEqual(
      backups.map((b) => [b.file, b.status]),
      [
        [path.basename(dangling!), 'unreadable_archive'],
        [path.basename(fifo!), 'unreadable_archive'],
      ],
    );
    assert.match(backups[0]!.problems[0]!, /symbolic link to nothing/);
    assert.match(backups[1]!.problems[0]!, /a FIFO/);
    const verified = await list(copy, '--verify');
    assert.equal(verified.exitCode, 8, verified.stdout);
    assert.doesNotMatch(verified.stdout, /Every backup was re-read/);
  });

  test('--list --verify: a backup deleted while it is checked (a concurrent --prune) has no row, and fails nothing', async () => {
    const copy = path.join(await tempDir(), 'backups');
    await fs.mkdir(copy);
    for (const file of [prod.dumpPath, prod.metadataPath])
      await fs.copyFile(file, path.join(copy, path.basename(file)));
    const deleted = path.join(copy, path.basename(prod.dumpPath));
    const result = await list(copy, '--verify', '--pg-bin-dir', await clientThatDeletes([deleted]));
    assert.equal(result.exitCode, 0, `${result.stdout}\n${result.stderr}`);
    assert.match(result.stdout, /^No backups in .+\/$/m);
  });

  test('a backup directory this user cannot read: --list and --check say to run as its owner, never to chown it', async () => {
    const copy = path.join(await tempDir(), 'backups');
    await fs.mkdir(copy, { mode: 0o000 });
    const env = dbVars(server, 'DEV_DB_', 'list_dev');
    for (const args of [['--list'], ['--check', '--max-age', '1d', '--env', 'dev']]) {
      const result = await runCli({ args: [...args, '--output-dir', copy], env, withoutRootOverride: true });
      assert.equal(result.exitCode, 4, result.stdout + result.stderr);
      assert.match(result.stderr, /Cannot read the backup directory/);
      const me = os.userInfo().username; // the directory's owner: whoever runs the tests
      assert.ok(
        result.stderr.includes(`It is owned by ${me}: run as that user, or give ${me} read access`),
        result.stderr,
      );
      assert.doesNotMatch(result.stderr, /chown|writable/);
    }
  });

  test("metadata this user cannot read is unreadable, not invalid: its row, --verify, and --check's exit 4", async () => {
    const copy = path.join(await tempDir(), 'backups');
    await fs.mkdir(copy);
    for (const file of [dev1.dumpPath, dev1.metadataPath])
      await fs.copyFile(file, path.join(copy, path.basename(file)));
    // What a monitoring agent meets when it is not the backup user: metadata is always 0600.
    await fs.chmod(path.join(copy, path.basename(dev1.metadataPath)), 0o000);
    const asAgent = { env: dbVars(server, 'DEV_DB_', 'list_dev'), withoutRootOverride: true };
    const owner = /owned by [^\s;)]+/;

    const listed = await runCli({ args: ['--list', '--output-dir', copy, '--json'], ...asAgent });
    assert.equal(listed.exitCode, 0, listed.stdout + listed.stderr);
    const [row] = JSON.parse(listed.stdout).backups;
    assert.equal(row.status, 'unreadable_metadata');
    assert.match(row.problems.join(' '), owner);
    const text = await runCli({ args: ['--list', '--output-dir', copy], ...asAgent });
    assert.deepEqual(
      tableRows(text.stdout).map((r) => r[4]),
      ['✗ Unreadable metadata'],
    );

    const verified = await runCli({ args: ['--verify', path.join(copy, path.basename(dev1.dumpPath))], ...asAgent });
    assert.equal(verified.exitCode, 8, verified.stdout + verified.stderr);
    assert.match(verified.stderr, /metadata file cannot be read/);
    assert.match(verified.stderr, owner);
    assert.doesNotMatch(verified.stderr, /invalid|edited or damaged/);

    const checked = await runCli({ args: ['--check', '--max-age', '1d', '--output-dir', copy], ...asAgent });
    assert.equal(checked.exitCode, 4, checked.stdout + checked.stderr);
    assert.match(checked.stderr, /Cannot read the backups' metadata/);
    assert.match(checked.stderr, owner);
    assert.match(checked.stderr, /run the check as the user the backups run as/);
    assert.doesNotMatch(checked.stderr, /No backup found|chown/);

    // One that, readable, would be too old all the same: not why the check fails, so stale it is (exit 8).
    const old = path.join(await tempDir(), 'backups');
    await fs.mkdir(old);
    await fs.copyFile(dev1.dumpPath, path.join(old, 'list_dev_dev_2020-01-01T00-00-00Z.dump'));
    await fs.copyFile(dev1.metadataPath, path.join(old, 'list_dev_dev_2020-01-01T00-00-00Z.metadata.json'));
    await fs.chmod(path.join(old, 'list_dev_dev_2020-01-01T00-00-00Z.metadata.json'), 0o000);
    const stale = await runCli({ args: ['--check', '--max-age', '1d', '--output-dir', old], ...asAgent });
    assert.equal(stale.exitCode, 8, stale.stdout + stale.stderr);
    assert.match(stale.stderr, /No backup found[^]*✗ Unreadable metadata/);
  });

  test('--list --json of hundreds of backups into a pipe whose reader is slow: the whole document, then the exit', async () => {
    const copy = path.join(await tempDir(), 'backups');
    await fs.mkdir(copy);
    for (let i = 0; i < 400; i++) {
      const at = new Date(Date.UTC(2020, 0, 1, 0, i))
        .toISOString()
        .replace(/:/g, '-')
        .replace(/\.\d+Z$/, 'Z');
      await fs.writeFile(path.join(copy, `shop_dev_${at}.dump`), 'x');
    }
    const args = ['--list', '--json', '--output-dir', copy];
    const whole = await runCli({ args });
    assert.ok(whole.stdout.length > 65_536, 'more than a pipe holds');
    // The reader takes its time (a pager, ssh, a loaded jq): what the pipe cannot hold yet waits in the CLI.
    const piped = await execa(
      'sh',
      ['-c', '"$0" --import tsx "$@" | (sleep 1; cat)', process.execPath, SCRIPT, ...ownConfigDir([]), ...args],
      { env: { PATH: process.env.PATH!, HOME: copy } },
    );
    assert.equal(piped.stdout, whole.stdout.trimEnd());
    assert.equal(JSON.parse(piped.stdout).backups.length, 400);
  });

  test('a missing directory: a friendly message, exit 0', async () => {
    const missing = path.join(await tempDir(), 'never-created');
    const result = await list(missing);
    assert.equal(result.exitCode, 0);
    assert.match(result.stdout, /^No backups: .*never-created\/ does not exist yet\.$/m);
    const doc = JSON.parse((await list(missing, '--json')).stdout);
    assert.deepEqual([doc.ok, doc.exists, doc.backups], [true, false, []]);
    await assert.rejects(fs.stat(missing), 'listing does not create the directory');
  });

  test('an empty directory: a friendly message, exit 0', async () => {
    const result = await list(await tempDir());
    assert.equal(result.exitCode, 0);
    assert.match(result.stdout, /^No backups in .+\/$/m);
  });

  test('a literal ~ in path options is the home directory, as a shell would read it; ./~ is shown as ./~', async () => {
    const [home, cwd] = [await tempDir(), await tempDir()];
    await fs.mkdir(path.join(home, 'bk'));
    for (const file of [dev1.dumpPath, dev1.metadataPath])
      await fs.copyFile(file, path.join(home, 'bk', path.basename(file)));
    const file = path.basename(dev1.dumpPath);
    // A working directory of its own, where node still finds tsx.
    await fs.symlink(path.join(PROJECT_DIR, 'node_modules'), path.join(cwd, 'node_modules'));
    const run = (...args: string[]) => runCli({ args, cwd, env: { HOME: home } });

    const listed = await run('--list', '--output-dir=~/bk', '--log-file=~/run.log', '--config-dir=~');
    assert.equal(listed.exitCode, 0, listed.stderr);
    assert.match(listed.stdout, new RegExp(`^Backup Files \\(${home}/bk/\\):$`, 'm'));
    assert.deepEqual(
      tableRows(listed.stdout).map((row) => row[4]),
      ['✓ Verified'],
    );
    assert.match(await fs.readFile(path.join(home, 'run.log'), 'utf8'), /"command":"list"/);
    const verified = await run('--verify', `~/bk/${file}`);
    assert.equal(verified.exitCode, 0, verified.stderr);
    assert.deepEqual(await fs.readdir(cwd), ['node_modules'], 'nothing made below the working directory');

    await fs.cp(path.join(home, 'bk'), path.join(cwd, '~', 'bk'), { recursive: true });
    const local = await run('--list', '--output-dir', './~/bk');
    assert.equal(local.exitCode, 0, local.stderr);
    assert.match(local.stdout, /^Backup Files \(\.\/~\/bk\/\):$/m);
  });

  test('--list --verify FILE is a usage error (exit 2)', async () => {
    const result = await list(dir, '--verify', dev1.dumpPath);
    assert.equal(result.exitCode, 2);
    assert.match(result.stderr, /--list --verify takes no FILE/);
  });
});

describe('--json for backups and errors', () => {
  test('a backup prints one document with the metadata and its checks', async () => {
    const out = path.join(await tempDir(), 'b');
    const taken = await takeBackup(server, 'list_dev', out);
    assert.equal(taken.stdout.includes('{'), false, 'the human summary by default');
    const configDir = await tempDir();
    await fs.writeFile(
      path.join(configDir, '.env'),
      `DEV_DB_HOST=${server.host}\nDEV_DB_PORT=${server.port}\nDEV_DB_NAME=list_dev\nDEV_DB_USER=${server.user}\nDEV_DB_PASSWORD=${server.password}\n`,
    );
    const result = await runCli({ args: ['--json', '--config-dir', configDir, '--output-dir', out] });
    assert.equal(result.exitCode, 0, result.stderr);
    const doc = JSON.parse(result.stdout);
    assert.equal(doc.ok, true);
    assert.equal(doc.command, 'backup');
    assert.equal(doc.metadata.database_name, 'list_dev');
    assert.equal(doc.metadata_file, doc.backup_file.replace(/\.dump$/, '.metadata.json'));
    for (const check of ['checksum', 'size', 'structure', 'tables']) assert.equal(doc.checks[check].ok, true);
    assert.equal(result.stderr, '');
  });

  test('a failed backup prints {ok:false, exit_code, error, hints} and never the password', async () => {
    const configDir = await tempDir();
    await fs.writeFile(
      path.join(configDir, '.env'),
      `DEV_DB_HOST=${server.host}\nDEV_DB_PORT=${server.port}\nDEV_DB_NAME=list_dev\nDEV_DB_USER=${server.user}\nDEV_DB_PASSWORD=not-the-Pa55word\n`,
    );
    const result = await runCli({
      args: ['--json', '--config-dir', configDir, '--output-dir', path.join(configDir, 'out')],
    });
    assert.equal(result.exitCode, 3);
    const doc = JSON.parse(result.stdout);
    assert.deepEqual([doc.ok, doc.command, doc.exit_code], [false, 'backup', 3]);
    assert.match(doc.error, /authentication failed/);
    assert.ok(doc.hints.length > 0);
    assert.ok(!result.stdout.includes('not-the-Pa55word'));
  });

  test('a bad command line with --json still prints a JSON error (exit 2)', async () => {
    const result = await runCli({ args: ['--json', '--env', 'staging'] });
    assert.equal(result.exitCode, 2);
    const doc = JSON.parse(result.stdout);
    assert.deepEqual([doc.ok, doc.exit_code], [false, 2]);
    assert.match(doc.details, /staging/);
  });
});

describe('colour', () => {
  test('plain text when stdout is not a terminal, and with NO_COLOR even when forced', async () => {
    const piped = await list(dir);
    assert.doesNotMatch(piped.stdout, /\x1b\[/);
    const forced = await runCli({ args: ['--list', '--output-dir', dir], env: { FORCE_COLOR: '1' } });
    assert.match(forced.stdout, /\x1b\[32m✓/, 'FORCE_COLOR shows that colour is otherwise used');
    const noColor = await runCli({ args: ['--list', '--output-dir', dir], env: { FORCE_COLOR: '1', NO_COLOR: '1' } });
    assert.doesNotMatch(noColor.stdout, /\x1b\[/);
  });
});
