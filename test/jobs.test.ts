/**
 * --jobs N: a parallel dump into a directory-format archive, named like any backup, with the same
 * metadata, a checksum over a deterministic manifest of its files, and the same verify, list,
 * restore, retention and failure semantics as a single-file backup.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { gunzipSync } from 'node:zlib';
import { execa } from 'execa';
import pg from 'pg';
import { connectAll } from '../backup_db.ts';
import { assertRestoresIdentically } from './helpers/compare.ts';
import { dbVars, runCli, startCli, tempDir, uniqueName, writeEnvFile } from './helpers/cli.ts';
import { FIXTURE_SQL } from './helpers/fixture.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { within } from './helpers/processes.ts';
import { skipUnless, unmet } from './helpers/requirements.ts';
import { directoryFingerprint, flipMiddleByte, holdTableLock, waitFor, waitForBlockedPgDump } from './helpers/wait.ts';

const noProc = await unmet('proc');

let server: TestServer;
let configDir: string;
before(async () => {
  server = await startTestServer();
  await server.createDatabase('jobs_app', FIXTURE_SQL);
  configDir = await tempDir();
  await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'jobs_app'));
});
after(() => server?.stop());

async function parallelBackup(outputDir: string, ...extra: string[]) {
  const result = await runCli({
    args: ['--env', 'dev', '--jobs', '2', '--config-dir', configDir, '--output-dir', outputDir, '--json', ...extra],
  });
  assert.equal(result.exitCode, 0, result.stdout);
  return JSON.parse(result.stdout) as { backup_file: string; metadata_file: string; metadata: Record<string, unknown> };
}

/** The checksum recomputed independently: SHA-256 of "sha256  size  name" lines of the sorted files. */
async function manifestChecksum(dir: string): Promise<{ sha256: string; size: number }> {
  const names = (await fs.readdir(dir)).sort();
  let manifest = '';
  let size = 0;
  for (const name of names) {
    const bytes = await fs.readFile(path.join(dir, name));
    manifest += `${createHash('sha256').update(bytes).digest('hex')}  ${bytes.length}  ${name}\n`;
    size += bytes.length;
  }
  return { sha256: createHash('sha256').update(manifest).digest('hex'), size };
}

describe('--jobs 2 (directory format)', () => {
  let backup: Awaited<ReturnType<typeof parallelBackup>>;
  let outputDir: string;
  before(async () => {
    outputDir = path.join(await tempDir(), 'backups');
    backup = await parallelBackup(outputDir);
  });

  test('writes a directory-format archive under the usual name, described by the usual metadata', async () => {
    assert.match(path.basename(backup.backup_file), /^jobs_app_dev_\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z\.dump$/);
    assert.ok((await fs.stat(backup.backup_file)).isDirectory());
    assert.ok((await fs.readdir(backup.backup_file)).includes('toc.dat'));
    assert.equal(backup.metadata.format, 'directory');
    assert.equal(backup.metadata.jobs, 2);
    assert.deepEqual(await manifestChecksum(backup.backup_file), {
      sha256: backup.metadata.checksum_sha256,
      size: backup.metadata.backup_size_bytes,
    });
    assert.equal((await fs.stat(backup.backup_file)).mode & 0o777, 0o700);
    // As a -Fc file is: a copy (cp -r, rsync without -p) must not make the table data readable by all.
    for (const file of await fs.readdir(backup.backup_file))
      assert.equal((await fs.stat(path.join(backup.backup_file, file))).mode & 0o777, 0o600, file);
  });

  test('restores (pg_restore -j 2) into a database identical to the source', async () => {
    await assertRestoresIdentically(server, backup.backup_file, 'jobs_app', ['--jobs=2']);
  });

  test('--verify, --list, --list --verify, --restore and the drill all take it as a backup', async () => {
    assert.equal((await runCli({ args: ['--verify', backup.backup_file] })).exitCode, 0);
    const listed = JSON.parse((await runCli({ args: ['--list', '--json', '--output-dir', outputDir] })).stdout);
    assert.deepEqual(
      listed.backups.map((b: { status: string; size_bytes: number }) => [b.status, b.size_bytes]),
      [['verified', backup.metadata.backup_size_bytes]],
    );
    assert.equal((await runCli({ args: ['--list', '--verify', '--output-dir', outputDir] })).exitCode, 0);
    const restored = await runCli({
      args: [
        '--restore',
        backup.backup_file,
        '--target-db',
        uniqueName('jobs_cli_restore'),
        '--env',
        'dev',
        '--config-dir',
        configDir,
      ],
    });
    assert.equal(restored.exitCode, 0, restored.stderr);
    assert.match(restored.stdout, /10 of 10 match the backup's row counts/);
  });

  for (const [damage, how, check] of [
    [
      'a flipped byte in a data file',
      async (dir: string) =>
        flipMiddleByte(
          path.join(
            dir,
            (await fs.readdir(dir)).find((n) => n.endsWith('.dat.gz'))!,
          ),
        ),
      /checksum mismatch/,
    ],
    [
      'a data file deleted',
      async (dir: string) =>
        fs.rm(
          path.join(
            dir,
            (await fs.readdir(dir)).find((n) => n.endsWith('.dat.gz'))!,
          ),
        ),
      /size mismatch/,
    ],
    [
      'a stray file added',
      async (dir: string) => fs.writeFile(path.join(dir, 'extra.dat'), 'x'),
      /size mismatch, checksum mismatch/,
    ],
    [
      'a FIFO among its files',
      async (dir: string) => execa('mkfifo', [path.join(dir, '9999.dat')]),
      /9999\.dat in the archive is a FIFO/,
    ],
    [
      'a file whose name is not UTF-8 (Node would read it as another name)',
      async (dir: string) => fs.writeFile(Buffer.from([...Buffer.from(`${dir}/x`), 0xff]), ''),
      /x\\xff in the archive is a file whose name is not UTF-8/,
    ],
  ] as const) {
    test(`--verify rejects ${damage} (exit 8)`, async () => {
      const copyDir = path.join(await tempDir(), 'copy');
      await fs.mkdir(copyDir);
      const name = path.basename(backup.backup_file);
      await fs.cp(backup.backup_file, path.join(copyDir, name), { recursive: true });
      await fs.copyFile(backup.metadata_file, path.join(copyDir, path.basename(backup.metadata_file)));
      await how(path.join(copyDir, name));
      const result = await runCli({ args: ['--verify', path.join(copyDir, name)] });
      assert.equal(result.exitCode, 8, result.stdout);
      assert.match(result.stderr.split('\n')[0]!, check);
    });
  }

  test('a data file shadowed by a symlink out of the backup: --verify, --list --verify, --restore and the drill refuse it', async () => {
    // pg_restore reads NNNN.dat before NNNN.dat.gz: the link would restore whatever it points to.
    const copyDir = path.join(await tempDir(), 'copy');
    const copy = path.join(copyDir, path.basename(backup.backup_file));
    await fs.cp(backup.backup_file, copy, { recursive: true });
    await fs.copyFile(backup.metadata_file, path.join(copyDir, path.basename(backup.metadata_file)));
    const data = (await fs.readdir(copy)).find((n) => n.endsWith('.dat.gz'))!;
    const substitute = path.join(await tempDir(), 'substitute.dat');
    await fs.writeFile(substitute, gunzipSync(await fs.readFile(path.join(copy, data))));
    const link = data.replace(/\.gz$/, '');
    await fs.symlink(substitute, path.join(copy, link));
    const refused = new RegExp(`${link.replace('.', '\\.')} in the archive is a symbolic link`);

    const verified = await runCli({ args: ['--verify', copy] });
    assert.equal(verified.exitCode, 8, verified.stdout);
    assert.match(verified.stderr.split('\n')[0]!, refused);
    assert.equal((await runCli({ args: ['--list', '--verify', '--output-dir', copyDir] })).exitCode, 8);
    const [row] = JSON.parse((await runCli({ args: ['--list', '--json', '--output-dir', copyDir] })).stdout).backups;
    assert.equal(row.status, 'unreadable_archive', 'its own row says so; the listing goes on');
    assert.match(row.problems[0], new RegExp(`/${link.replace('.', '\\.')} is a symbolic link`));
    const target = uniqueName('jobs_symlink_restore');
    const restored = await runCli({
      args: ['--restore', copy, '--target-db', target, '--env', 'dev', '--config-dir', configDir],
    });
    assert.equal(restored.exitCode, 8, restored.stdout);
    assert.match(restored.stderr.split('\n')[0]!, refused);
    const admin = await server.connect('postgres');
    try {
      const { rows } = await admin.query('SELECT 1 FROM pg_database WHERE datname = $1', [target]);
      assert.deepEqual(rows, [], 'nothing was restored');
    } finally {
      await admin.end();
    }
    const drill = await runCli({
      args: ['--verify', copy, '--restore-test', '--env', 'dev', '--config-dir', configDir],
    });
    assert.equal(drill.exitCode, 8, drill.stdout);
  });
});

describe('--jobs failures and retention', () => {
  test('SIGINT mid-dump removes the partial directory; the old backup is untouched', { timeout: 60_000 }, async () => {
    const outputDir = path.join(await tempDir(), 'backups');
    await parallelBackup(outputDir);
    const before = await directoryFingerprint(outputDir);
    const lock = await holdTableLock(() => server.connect('jobs_app'), 'messages');
    const cli = startCli({
      args: ['--env', 'dev', '--jobs', '2', '--config-dir', configDir, '--output-dir', outputDir],
    });
    try {
      await waitForBlockedPgDump(lock.observer);
      assert.ok((await fs.readdir(outputDir)).some((n) => n.endsWith('.dump.partial')));
      cli.kill('SIGINT');
      assert.equal((await cli).exitCode, 130);
    } finally {
      await lock.release();
    }
    assert.deepEqual(await directoryFingerprint(outputDir), before);
  });

  test(
    'SIGTERM while the finished dump is read back for its checksum stops the read at once: exit 143, nothing left',
    skipUnless(noProc),
    async () => {
      const outputDir = path.join(await tempDir(), 'backups');
      await parallelBackup(outputDir);
      const before = await directoryFingerprint(outputDir);
      // pg_dump, then a 1 TiB sparse file in its directory: reading it back for the checksum takes many minutes.
      const bin = await tempDir();
      const which = async (tool: string) => (await execa('sh', ['-c', `command -v ${tool}`])).stdout.trim();
      const sparse = 'for a; do case "$a" in --file=*) truncate -s 1T "${a#--file=}/zz.dat";; esac; done';
      const shim = `#!/bin/sh\n'${await which('pg_dump')}' "$@" || exit $?\n${sparse}\n`;
      await fs.writeFile(path.join(bin, 'pg_dump'), shim, { mode: 0o755 });
      await fs.writeFile(path.join(bin, 'pg_restore'), `#!/bin/sh\nexec '${await which('pg_restore')}' "$@"\n`, {
        mode: 0o755,
      });
      const args = ['--env', 'dev', '--jobs', '2', '--config-dir', configDir, '--output-dir', outputDir];
      const cli = startCli({ args: [...args, '--pg-bin-dir', bin] });
      try {
        const fds = `/proc/${cli.pid}/fd`;
        await waitFor('the checksum to read the large file', async () => {
          const links = await Promise.all(
            (await fs.readdir(fds).catch(() => [])).map((fd) => fs.readlink(path.join(fds, fd)).catch(() => '')),
          );
          return links.some((link) => link.endsWith('/zz.dat')) ? true : undefined;
        });
        cli.kill('SIGTERM');
        await within('the CLI to end after SIGTERM', 10_000, async () => cli.exitCode !== null);
      } finally {
        cli.kill('SIGKILL');
      }
      assert.equal((await cli).exitCode, 143);
      assert.deepEqual(await directoryFingerprint(outputDir), before, 'the partial directory is removed');
    },
  );

  test('more workers than the role may open connections: exit 3, with the hint to lower --jobs', async () => {
    const [role, password] = [uniqueName('limited'), uniqueName('pw')];
    const admin = await server.connect('jobs_app');
    try {
      await admin.query(`CREATE ROLE ${role} LOGIN PASSWORD '${password}' CONNECTION LIMIT 2`);
      await admin.query(`GRANT pg_read_all_data TO ${role}`);
    } finally {
      await admin.end();
    }
    const limitedConfig = await tempDir();
    const vars = { ...dbVars(server, 'DEV_DB_', 'jobs_app'), DEV_DB_USER: role, DEV_DB_PASSWORD: password };
    await writeEnvFile(limitedConfig, '.env', vars);
    const outputDir = path.join(await tempDir(), 'backups');
    const result = await runCli({
      args: ['--env', 'dev', '--jobs', '4', '--config-dir', limitedConfig, '--output-dir', outputDir, '--json'],
    });
    assert.equal(result.exitCode, 3, result.stdout);
    const doc = JSON.parse(result.stdout);
    assert.equal(doc.error, 'No free connection for pg_dump');
    assert.match(doc.details, new RegExp(`too many connections for role "${role}"`));
    assert.match(
      doc.hints[0],
      /must allow this tool's session and pg_dump's: one, or N \+ 1 with --jobs N \(then lower --jobs\)/,
    );
    assert.ok(!result.stdout.includes(password));
    assert.deepEqual(await fs.readdir(outputDir), [], 'the partial directory is removed');
  });

  test("connectAll: when one of the workers' connections is refused, the ones made are closed, not leaked", async () => {
    const [role, password] = [uniqueName('limited'), uniqueName('pw')];
    const admin = await server.connect('jobs_app');
    try {
      await admin.query(`CREATE ROLE ${role} LOGIN PASSWORD '${password}' CONNECTION LIMIT 2`);
      const connect = async () => {
        const client = new pg.Client({
          host: server.host,
          port: server.port,
          database: 'jobs_app',
          user: role,
          password,
        });
        await client.connect();
        return client;
      };
      await assert.rejects(connectAll(4, connect), new RegExp(`too many connections for role "${role}"`));
      const sessions = `SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = '${role}'`;
      await waitFor('no session of the role left', async () =>
        (await admin.query(sessions)).rows[0].n === 0 ? true : undefined,
      );
    } finally {
      await admin.end();
    }
  });

  test('a partial directory left by a killed run is removed by the next backup; retention deletes whole directories', async () => {
    const outputDir = path.join(await tempDir(), 'backups');
    const old = await parallelBackup(outputDir);
    const stale = 'jobs_app_dev_2020-01-01T00-00-00Z.dump.partial';
    await fs.mkdir(path.join(outputDir, stale));
    await fs.writeFile(path.join(outputDir, stale, 'toc.dat'), 'half');
    const next = await parallelBackup(outputDir, '--keep-last', '1');
    const names = await fs.readdir(outputDir);
    assert.ok(!names.includes(stale), 'the stale partial directory is gone');
    assert.ok(
      !names.includes(path.basename(old.backup_file)) && !names.includes(path.basename(old.metadata_file)),
      'retention removed the older directory backup and its metadata',
    );
    const kept = [path.basename(next.backup_file), path.basename(next.metadata_file), 'jobs_app_dev.lock.reserve'];
    assert.deepEqual(names.sort(), kept.sort());
  });
});

describe('a directory backup this user cannot read', () => {
  // As cron's user sees the root-owned 0700 directory one `sudo … --jobs N` run leaves behind.
  const asCron = { withoutRootOverride: true };
  const statuses = (stdout: string) =>
    (JSON.parse(stdout).backups as Array<{ file: string; status: string }>).map((b) => [b.file, b.status]);

  test(
    "is that backup's ✗ Unreadable archive; --list, --check and retention go on with the rest",
    { timeout: 120_000 },
    async () => {
      const outputDir = path.join(await tempDir(), 'backups');
      const [oldest, middle, newest] = [
        await parallelBackup(outputDir),
        await parallelBackup(outputDir),
        await parallelBackup(outputDir),
      ].map((backup) => path.basename(backup.backup_file));
      await fs.chmod(path.join(outputDir, oldest!), 0);
      const where = ['--output-dir', outputDir];

      const listed = await runCli({ args: ['--list', '--json', ...where], ...asCron });
      assert.equal(listed.exitCode, 0, listed.stdout);
      assert.deepEqual(statuses(listed.stdout), [
        [newest, 'verified'],
        [middle, 'verified'],
        [oldest, 'unreadable_archive'],
      ]);
      assert.match(JSON.parse(listed.stdout).backups[2].problems[0], /permission denied/);
      const full = await runCli({ args: ['--list', '--verify', '--json', ...where], ...asCron });
      assert.equal(full.exitCode, 8, full.stdout);
      assert.deepEqual(statuses(full.stdout), statuses(listed.stdout));

      const config = ['--env', 'dev', '--config-dir', configDir, ...where];
      const checked = await runCli({ args: [...config, '--check', '--max-age', '1h'], ...asCron });
      assert.equal(checked.exitCode, 0, checked.stderr);
      const pruned = await runCli({ args: [...config, '--jobs', '2', '--keep-last', '2'], ...asCron });
      assert.equal(pruned.exitCode, 0, pruned.stderr);
      assert.equal(pruned.stderr, '', 'retention worked: no warning');
      assert.match(pruned.stdout, /left alone 1/);
      const names = await fs.readdir(outputDir);
      assert.ok(names.includes(oldest!), 'the unreadable backup is left alone');
      assert.ok(!names.includes(middle!), 'the readable older backup was pruned');
    },
  );

  test('one unreadable file in it: --verify says make it readable (exit 8); --list --verify shows that row', async () => {
    const outputDir = path.join(await tempDir(), 'backups');
    const backup = await parallelBackup(outputDir);
    const data = (await fs.readdir(backup.backup_file)).find((n) => n.endsWith('.dat.gz'))!;
    await fs.chmod(path.join(backup.backup_file, data), 0);

    const verified = await runCli({ args: ['--verify', backup.backup_file], ...asCron });
    assert.equal(verified.exitCode, 8, verified.stderr);
    assert.match(verified.stderr.split('\n')[0]!, /^✗ Backup verification failed: backup file cannot be read$/);
    assert.match(verified.stderr, new RegExp(`permission denied.*${data.replace('.', '\\.')}`));
    assert.match(verified.stderr, /Make it readable/);
    assert.doesNotMatch(verified.stderr, /writable/);
    const full = await runCli({ args: ['--list', '--verify', '--json', '--output-dir', outputDir], ...asCron });
    assert.equal(full.exitCode, 8, full.stdout);
    assert.deepEqual(statuses(full.stdout), [[path.basename(backup.backup_file), 'unreadable_archive']]);
  });

  test('a symlink named like a backup is never walked into', async () => {
    const outputDir = path.join(await tempDir(), 'backups');
    const backup = await parallelBackup(outputDir);
    // Were it walked, the unreadable directory at the far end would be the error.
    const elsewhere = await tempDir();
    await fs.mkdir(path.join(elsewhere, 'locked'));
    await fs.chmod(path.join(elsewhere, 'locked'), 0);
    const link = 'jobs_app_dev_2020-01-01T00-00-00Z.dump';
    await fs.symlink(elsewhere, path.join(outputDir, link));
    const metadata = { ...backup.metadata, backup_file: link, backup_timestamp: '2020-01-01T00:00:00Z' };
    await fs.writeFile(path.join(outputDir, link.replace(/\.dump$/, '.metadata.json')), JSON.stringify(metadata));

    const listed = await runCli({ args: ['--list', '--json', '--output-dir', outputDir], ...asCron });
    assert.equal(listed.exitCode, 0, listed.stdout);
    assert.deepEqual(statuses(listed.stdout), [
      [path.basename(backup.backup_file), 'verified'],
      [link, 'unreadable_archive'],
    ]);
    assert.match(JSON.parse(listed.stdout).backups[1].problems[0], /symbolic link to a directory/);
  });
});
