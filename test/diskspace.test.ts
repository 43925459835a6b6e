/**
 * Issue 4.3, disk space. The preflight compares free space with the tables' size and fails early
 * (exit 5, with the figures) when the disk is clearly too small. A disk that fills up during the
 * write (ENOSPC on a real tmpfs, or EFBIG under RLIMIT_FSIZE) also ends with exit 5, no file of
 * the run kept, and the existing backups untouched.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { acquireBackupLock, metadataFileName, type DbConfig } from '../backup_db.ts';
import { dbVars, directoryWithExistingBackup, runCli, takeBackup, tempDir, writeEnvFile } from './helpers/cli.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { runCliOnTmpfs } from './helpers/tmpfs.ts';
import { directoryFingerprint } from './helpers/wait.ts';
import { skipUnless, unmet } from './helpers/requirements.ts';

const noPrlimit = await unmet('prlimit');
const noTmpfs = await unmet('mountNamespace');

let server: TestServer;
let configDir: string;
let existing: Awaited<ReturnType<typeof directoryWithExistingBackup>>;

before(async () => {
  server = await startTestServer();
  // ~4 MB of incompressible data (md5 output), so the dump really is ~4 MB.
  await server.createDatabase('space_app', [
    `CREATE TABLE blobs (id int PRIMARY KEY, payload bytea);
     INSERT INTO blobs SELECT i, (SELECT string_agg(decode(md5(i || '-' || j), 'hex'), ''::bytea) FROM generate_series(1, 6400) AS j)
       FROM generate_series(1, 40) AS i`,
    // The size estimate comes from the catalog, which VACUUM brings up to date.
    'VACUUM ANALYZE blobs',
  ]);
  // A small database whose real backup plays "the existing backups" on the full disk.
  await server.createDatabase('space_small', 'CREATE TABLE t (id int); INSERT INTO t VALUES (1)');
  existing = await directoryWithExistingBackup(server, 'space_small');
  configDir = await tempDir();
  await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'space_app'));
});
after(() => server?.stop());

const backupArgs = (outputDir: string) => ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir];

function assertDiskFull(result: { exitCode: number; stderr: string; stdout: string }) {
  assert.equal(result.exitCode, 5, `${result.stdout}\n${result.stderr}`);
  assert.match(result.stderr, /^✗ Backup failed: Not enough disk space$/m);
  assert.match(result.stderr, /Troubleshooting:\n {2}1\. Check free space: df -h /);
  assert.doesNotMatch(result.stderr, /\n\s+at .+:\d+:\d+/);
}

/**
 * A backup into a directory holding one already, under a file-size limit (RLIMIT_FSIZE) of `bytes`: exit 5, and
 * the directory exactly as it was. Its stderr, for what the tool said.
 */
async function backupOverFileSizeLimit(bytes: number, ...extra: string[]): Promise<string> {
  const seeded = await directoryWithExistingBackup(server, 'space_small');
  const result = await runCli({
    args: [...backupArgs(seeded.outputDir), ...extra],
    wrapper: ['prlimit', `--fsize=${bytes}`, '--'],
  });
  assertDiskFull(result);
  assert.deepEqual(await directoryFingerprint(seeded.outputDir), seeded.before);
  return result.stderr;
}

describe('disk space', () => {
  test(
    'preflight: clearly too little free space → exit 5 with the figures, before anything is written',
    skipUnless(noTmpfs),
    async () => {
      const result = await runCliOnTmpfs(128 * 1024, existing.outputDir, backupArgs);
      assertDiskFull(result);
      assert.match(
        result.stderr,
        /Error: \d+\.\d KB free in .*, but the tables hold \d+\.\d MB and even a well-compressed dump of them needs about \d+\.\d KB/,
      );
      assert.deepEqual(result.after, existing.before, 'only the existing backup; no partial, no lock');
    },
  );

  test(
    'a real ENOSPC during the write → exit 5, the partial removed, existing backups untouched',
    skipUnless(noTmpfs),
    async () => {
      const result = await runCliOnTmpfs(1024 * 1024, existing.outputDir, backupArgs);
      assertDiskFull(result);
      assert.match(result.stderr, /ENOSPC/);
      assert.deepEqual(result.after, existing.before);
    },
  );

  test(
    'the disk fills up while the metadata is written → exit 5, the hint names the output directory, nothing kept',
    skipUnless(noTmpfs),
    async () => {
      // Room for the lock and a one-page dump of the small database, not for its metadata too.
      const smallArgs = (outputDir: string) => [...existing.args.slice(0, 4), '--output-dir', outputDir];
      const result = await runCliOnTmpfs(8 * 1024, undefined, smallArgs);
      assertDiskFull(result);
      assert.match(result.stderr, /Error: Writing the metadata failed: .*ENOSPC/);
      assert.match(
        result.stderr,
        /1\. Check free space: df -h \/\S+\/mnt$/m,
        'the output directory, not the working directory',
      );
      assert.deepEqual(result.after, {}, 'no partial, no metadata, no lock');
    },
  );

  test(
    'RLIMIT_FSIZE (EFBIG) during the write, where no tmpfs can be mounted → exit 5, same guarantees',
    skipUnless(noPrlimit),
    async () => {
      const stderr = await backupOverFileSizeLimit(1_000_000);
      assert.match(stderr, /EFBIG/);
    },
  );

  test(
    'RLIMIT_FSIZE with --jobs: pg_dump writes the files itself and gets EFBIG too, not killed by SIGXFSZ → exit 5',
    skipUnless(noPrlimit),
    async () => {
      const stderr = await backupOverFileSizeLimit(200_000, '--jobs', '2');
      assert.match(stderr, /File too large/);
    },
  );

  test(
    'with room to spare the same backup succeeds, so the failures above are about space',
    skipUnless(noTmpfs),
    async () => {
      const result = await runCliOnTmpfs(64 * 1024 * 1024, undefined, backupArgs);
      assert.equal(result.exitCode, 0, result.stderr);
      assert.equal(Object.keys(result.after).filter((name) => name.endsWith('.dump')).length, 1);
    },
  );
});

/** The size of a tmpfs that `dir`'s files fill to the last byte: tmpfs counts whole pages. */
async function exactFit(dir: string): Promise<number> {
  const page = Number((await execa('getconf', ['PAGESIZE'])).stdout);
  let bytes = 0;
  for (const name of await fs.readdir(dir))
    bytes += Math.ceil((await fs.stat(path.join(dir, name))).size / page) * page;
  return bytes;
}

describe('--prune on a full disk', () => {
  // Three real backups of the small database, copied onto a tmpfs they fill to the last byte.
  let full: Awaited<ReturnType<typeof directoryWithExistingBackup>>;
  const reserve = 'space_small_dev.lock.reserve';
  before(async () => {
    full = await directoryWithExistingBackup(server, 'space_small');
    for (let i = 0; i < 2; i++) {
      const again = await takeBackup(server, 'space_small', full.outputDir);
      assert.doesNotMatch(again.stdout, /Cleaned up/, 'the reserve is no stale file');
    }
    full.before = await directoryFingerprint(full.outputDir);
  });
  const runOnFullDisk = async (extra: string[]) =>
    runCliOnTmpfs(await exactFit(full.outputDir), full.outputDir, (outputDir) => [
      ...full.args.slice(0, 4),
      '--output-dir',
      outputDir,
      ...extra,
    ]);

  test(
    '--prune deletes what the rules say and frees the space, then keeps the reserve again',
    skipUnless(noTmpfs),
    async () => {
      const dumps = Object.keys(full.before)
        .filter((name) => name.endsWith('.dump'))
        .sort();
      assert.equal(dumps.length, 3);
      const result = await runOnFullDisk(['--prune', '--keep-last', '1']);
      assert.equal(result.exitCode, 0, `${result.stdout}\n${result.stderr}`);
      assert.match(result.stdout, /^Deleted 2 backups \(/m);
      const newest = dumps.at(-1)!;
      assert.deepEqual(Object.keys(result.after).sort(), [newest, metadataFileName(newest), reserve].sort());
      assert.equal(result.after[newest], full.before[newest], 'the newest backup untouched');
    },
  );

  test('a backup there still fails with exit 5 and leaves everything as it was', skipUnless(noTmpfs), async () => {
    const result = await runOnFullDisk([]);
    assertDiskFull(result);
    assert.match(result.stderr, /ENOSPC/);
    assert.deepEqual(result.after, full.before, 'no partial, no lock, the reserve kept for --prune');
  });

  test(
    'the lock still holds: with a live run holding it, --prune exits 7 and deletes nothing',
    skipUnless(noTmpfs),
    async () => {
      const lock = await acquireBackupLock(full.outputDir, { database: 'space_small', environment: 'dev' } as DbConfig);
      try {
        const held = await directoryFingerprint(full.outputDir);
        const result = await runOnFullDisk(['--prune', '--keep-last', '1']);
        assert.equal(result.exitCode, 7, `${result.stdout}\n${result.stderr}`);
        assert.match(result.stderr, new RegExp(`backup already running \\(pid ${process.pid}, since `));
        // Everything as it was; the reserve, given up for a lock not won, is made again (new random bytes).
        assert.deepEqual(Object.keys(result.after).sort(), Object.keys(held).sort());
        for (const name of Object.keys(held).filter((n) => n !== reserve))
          assert.equal(result.after[name], held[name], `${name} untouched`);
      } finally {
        await lock.release();
      }
    },
  );

  test(
    'with the reserve already spent by a --prune that holds the lock, another --prune exits 7, not 5',
    skipUnless(noTmpfs),
    async () => {
      const seed = path.join(await tempDir(), 'spent');
      await fs.cp(full.outputDir, seed, { recursive: true });
      await fs.rm(path.join(seed, reserve));
      const lock = await acquireBackupLock(seed, { database: 'space_small', environment: 'dev' } as DbConfig);
      try {
        const held = await directoryFingerprint(seed);
        const result = await runCliOnTmpfs(await exactFit(seed), seed, (outputDir) => [
          ...full.args.slice(0, 4),
          '--output-dir',
          outputDir,
          '--prune',
          '--keep-last',
          '1',
        ]);
        assert.equal(result.exitCode, 7, `${result.stdout}\n${result.stderr}`);
        assert.match(result.stderr, new RegExp(`backup already running \\(pid ${process.pid}, since `));
        assert.deepEqual(result.after, held, 'nothing deleted');
      } finally {
        await lock.release();
      }
    },
  );
});
