/**
 * --verify FILE on real backups: an untouched backup passes; every kind of damage to the dump or
 * its metadata is rejected with exit 8 and a message naming the check that failed.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { clientThatDeletes, runCli, takeBackup, socketAt, tempDir, type TakenBackup } from './helpers/cli.ts';
import { FIXTURE_SQL } from './helpers/fixture.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { directoryFingerprint, flipMiddleByte } from './helpers/wait.ts';

let server: TestServer;
let app: TakenBackup;
let other: TakenBackup;

before(async () => {
  server = await startTestServer();
  await server.createDatabase('verify_app', FIXTURE_SQL);
  await server.createDatabase(
    'verify_other',
    "CREATE TABLE unrelated (id int, note text); INSERT INTO unrelated SELECT i, 'x' FROM generate_series(1, 50) i",
  );
  const dir = path.join(await tempDir(), 'backups');
  app = await takeBackup(server, 'verify_app', dir);
  other = await takeBackup(server, 'verify_other', dir);
});
after(() => server?.stop());

/** A private copy of the app backup (dump + metadata, same names) to damage. */
async function copyOfBackup() {
  const dir = await tempDir();
  const dumpPath = path.join(dir, path.basename(app.dumpPath));
  const metadataPath = path.join(dir, path.basename(app.metadataPath));
  await fs.copyFile(app.dumpPath, dumpPath);
  await fs.copyFile(app.metadataPath, metadataPath);
  const editMetadata = async (edit: (m: Record<string, unknown>) => void) => {
    const metadata = JSON.parse(await fs.readFile(metadataPath, 'utf8')) as Record<string, unknown>;
    edit(metadata);
    await fs.writeFile(metadataPath, JSON.stringify(metadata, null, 2));
  };
  return { dir, dumpPath, metadataPath, editMetadata };
}

const verify = (file: string, ...extra: string[]) => runCli({ args: ['--verify', file, ...extra] });

function assertRejected(result: { exitCode: number; stdout: string; stderr: string }, check: RegExp) {
  assert.equal(result.exitCode, 8, `${result.stdout}\n${result.stderr}`);
  const [headline] = result.stderr.split('\n');
  assert.match(headline!, /^✗ Backup verification failed: /);
  assert.match(headline!, check);
  assert.match(result.stderr, /\nError: .+/);
  assert.match(result.stderr, /\nTroubleshooting:\n {2}1\. /);
  assert.doesNotMatch(result.stderr, /\n\s+at .+:\d+:\d+/, 'no stack trace');
  assert.equal(result.stdout, '');
}

describe('--verify on an untouched backup', () => {
  test('passes with the contract output, exit 0, and changes nothing', async () => {
    const copy = await copyOfBackup();
    const before = await directoryFingerprint(copy.dir);
    const result = await verify(copy.dumpPath);
    assert.equal(result.exitCode, 0, result.stderr);
    assert.match(result.stdout, /^✓ Backup verification passed\n\n/);
    assert.match(result.stdout, new RegExp(`^File: {8}.*${path.basename(copy.dumpPath)}$`, 'm'));
    assert.match(
      result.stdout,
      new RegExp(`^Checksum: {4}✓ Match \\(${String(app.metadata.checksum_sha256).slice(0, 12)}\\.\\.\\.\\)$`, 'm'),
    );
    assert.match(result.stdout, /^Structure: {3}✓ Valid \(pg_restore --list succeeded\)$/m);
    assert.match(result.stdout, /^Tables: {6}✓ 10 of 10 tables have data in the archive$/m);
    assert.match(result.stdout, /^Size: {8}\d+\.\d MB$/m);
    assert.match(result.stdout, new RegExp(`^Timestamp: {3}${String(app.metadata.backup_timestamp)}$`, 'm'));
    assert.equal(result.stderr, '');
    assert.deepEqual(await directoryFingerprint(copy.dir), before);
  });

  test('--json prints one document with every check', async () => {
    const result = await verify(app.dumpPath, '--json');
    assert.equal(result.exitCode, 0);
    const doc = JSON.parse(result.stdout);
    assert.equal(doc.ok, true);
    assert.equal(doc.command, 'verify');
    assert.equal(doc.file, app.dumpPath);
    for (const check of ['checksum', 'size', 'structure', 'tables']) assert.equal(doc.checks[check].ok, true, check);
    assert.equal(doc.actual.checksum_sha256, app.metadata.checksum_sha256);
    assert.deepEqual(doc.metadata, app.metadata);
  });
});

describe('--verify of a hostile file name', () => {
  test('a line break in the name never starts a line of the error: it is shown as \\n', async () => {
    const dir = await tempDir();
    const file = path.join(dir, 'x\n✓ Backup verified: all good\nfoo.dump');
    await fs.writeFile(file, 'not an archive');
    const result = await runCli({ args: ['--verify', file] });
    assert.equal(result.exitCode, 8, result.stderr);
    assert.doesNotMatch(result.stderr, /^✓/m, 'no forged line');
    assert.match(result.stderr, /x\\n✓ Backup verified: all good\\nfoo\.metadata\.json does not exist/);
  });
});

describe('--verify rejects damage to the dump', () => {
  test('one byte flipped in the middle → checksum mismatch', async () => {
    const copy = await copyOfBackup();
    await flipMiddleByte(copy.dumpPath);
    const result = await verify(copy.dumpPath);
    assertRejected(result, /checksum mismatch/);
    assert.doesNotMatch(result.stderr.split('\n')[0]!, /size/);
    assert.match(result.stderr, /^Checksum: {4}✗ Mismatch/m);
  });

  test('truncated → size mismatch', async () => {
    const copy = await copyOfBackup();
    const { size } = await fs.stat(copy.dumpPath);
    await fs.truncate(copy.dumpPath, Math.floor(size / 2));
    assertRejected(await verify(copy.dumpPath), /size mismatch/);
  });

  test('one byte appended → size mismatch and checksum mismatch', async () => {
    const copy = await copyOfBackup();
    await fs.appendFile(copy.dumpPath, Buffer.from([0]));
    const result = await verify(copy.dumpPath);
    assertRejected(result, /size mismatch, checksum mismatch/);
  });

  /** --verify of a copy whose archive header is overwritten. */
  async function verifyDamagedHeader() {
    const copy = await copyOfBackup();
    const handle = await fs.open(copy.dumpPath, 'r+');
    await handle.write(Buffer.from('XXXXX'), 0, 5, 0);
    await handle.close();
    return verify(copy.dumpPath);
  }

  test("header damaged → archive unreadable, with pg_restore's own message", async () => {
    const result = await verifyDamagedHeader();
    assertRejected(result, /archive unreadable/);
    assert.match(result.stderr, /pg_restore: error: /);
  });

  test('an unreadable archive is not also "table data missing": that check was not run', async () => {
    const result = await verifyDamagedHeader();
    assertRejected(result, /^✗ Backup verification failed: checksum mismatch, archive unreadable$/m);
    assert.doesNotMatch(result.stderr, /table data missing|holds no data for/);
    assert.match(result.stderr, /✗ Not checked: the archive cannot be read/);
  });

  test('replaced by a valid dump of another database → checksum, size and table data all fail', async () => {
    const copy = await copyOfBackup();
    await fs.copyFile(other.dumpPath, copy.dumpPath);
    const result = await verify(copy.dumpPath);
    assertRejected(result, /size mismatch, checksum mismatch/);
    assert.match(result.stderr.split('\n')[0]!, /table data missing/);
    assert.match(result.stderr, /^Structure: {3}✓ Valid/m, 'it is a readable archive, just not this one');
  });
});

describe('--verify rejects damage to the metadata', () => {
  test('metadata deleted → metadata file not found', async () => {
    const copy = await copyOfBackup();
    await fs.rm(copy.metadataPath);
    const result = await verify(copy.dumpPath);
    assertRejected(result, /metadata file not found/);
    assert.match(result.stderr, /\.metadata\.json does not exist/);
  });

  test('metadata not valid JSON → metadata is invalid, with the parse error', async () => {
    const copy = await copyOfBackup();
    const text = await fs.readFile(copy.metadataPath, 'utf8');
    await fs.writeFile(copy.metadataPath, text.slice(0, text.length / 2));
    const result = await verify(copy.dumpPath);
    assertRejected(result, /metadata is invalid/);
    assert.match(result.stderr, /not valid JSON/);
  });

  test('metadata that is not JSON is reported by position, never quoted', async () => {
    const copy = await copyOfBackup();
    await fs.writeFile(copy.metadataPath, '*:*:*:*:hunter2pass\n');
    const result = await verify(copy.dumpPath);
    assertRejected(result, /metadata is invalid/);
    assert.match(result.stderr, /not valid JSON/);
    assert.ok(!result.stderr.includes('hunter2pass'), result.stderr);
  });

  test('metadata that is a symlink (to a password file, say) → not a regular file, its content never shown', async () => {
    const copy = await copyOfBackup();
    const secret = path.join(copy.dir, 'pgpass');
    await fs.writeFile(secret, '*:*:*:*:hunter2pass\n', { mode: 0o600 });
    await fs.rm(copy.metadataPath);
    await fs.symlink(secret, copy.metadataPath);
    const result = await verify(copy.dumpPath);
    assertRejected(result, /metadata is invalid/);
    assert.match(result.stderr, /metadata\.json: not a regular file/);
    assert.ok(!result.stderr.includes('hunter2pass'), result.stderr);
  });

  test('metadata that is a FIFO → not a regular file, at once (no writer needed)', { timeout: 60_000 }, async () => {
    const copy = await copyOfBackup();
    await fs.rm(copy.metadataPath);
    await execa('mkfifo', [copy.metadataPath]);
    const result = await verify(copy.dumpPath);
    assertRejected(result, /metadata is invalid/);
    assert.match(result.stderr, /metadata\.json: not a regular file/);
  });

  test('metadata that is a socket → not a regular file', { timeout: 60_000 }, async () => {
    const copy = await copyOfBackup();
    await fs.rm(copy.metadataPath);
    const socket = await socketAt(copy.metadataPath);
    try {
      const result = await verify(copy.dumpPath);
      assertRejected(result, /metadata is invalid/);
      assert.match(result.stderr, /metadata\.json: not a regular file/);
    } finally {
      await new Promise((resolve) => socket.close(resolve));
    }
  });

  test('checksum_sha256 changed → checksum mismatch', async () => {
    const copy = await copyOfBackup();
    await copy.editMetadata((m) => {
      m.checksum_sha256 = String(m.checksum_sha256).replace(/^./, (c) => (c === '0' ? '1' : '0'));
    });
    assertRejected(await verify(copy.dumpPath), /checksum mismatch/);
  });

  test('backup_size_bytes changed → size mismatch', async () => {
    const copy = await copyOfBackup();
    await copy.editMetadata((m) => {
      m.backup_size_bytes = Number(m.backup_size_bytes) + 1;
    });
    assertRejected(await verify(copy.dumpPath), /size mismatch/);
  });

  test('backup_file changed → metadata is invalid, naming both names', async () => {
    const copy = await copyOfBackup();
    await copy.editMetadata((m) => {
      m.backup_file = 'someone_else_dev_2020-01-01T00-00-00Z.dump';
    });
    const result = await verify(copy.dumpPath);
    assertRejected(result, /metadata is invalid/);
    assert.match(
      result.stderr,
      /backup_file is "someone_else_dev_2020-01-01T00-00-00Z\.dump" but the file is named "verify_app_dev_/,
    );
  });

  test('what the file name says (time, environment, database) changed in the metadata → invalid, naming both', async () => {
    const monthEarlier = (m: Record<string, unknown>) =>
      new Date(Date.parse(String(m.backup_timestamp)) - 30 * 86_400_000).toISOString().replace(/\.\d{3}Z$/, 'Z');
    for (const [field, edit, problem] of [
      ['backup_timestamp', monthEarlier, /backup_timestamp is "\d{4}-.*" but the file is named for \d{4}-/],
      ['environment', () => 'prod', /environment is "prod" but the file is named for "dev"/],
      ['database_name', () => 'other_app', /database_name is "other_app" but the file is named for "verify_app/],
    ] as const) {
      const copy = await copyOfBackup();
      await copy.editMetadata((m) => {
        m[field] = edit(m);
      });
      const result = await verify(copy.dumpPath);
      assertRejected(result, /metadata is invalid/);
      assert.match(result.stderr, problem, field);
      const listed = await runCli({ args: ['--list', '--output-dir', copy.dir] });
      assert.match(listed.stdout, /Invalid metadata/, field);
    }
  });

  for (const [field, value, problem] of [
    ['environment', 'staging', /environment must be "dev" or "prod"/],
    ['backup_timestamp', 'yesterday', /backup_timestamp must be an ISO 8601 timestamp/],
    ['backup_size_bytes', -5, /backup_size_bytes must be a positive integer/],
    ['checksum_sha256', 'abc123', /checksum_sha256 must be 64 hexadecimal digits/],
    ['table_counts', {}, /table_counts must map at least one table/],
    ['database_name', undefined, /database_name is missing/],
  ] as const) {
    test(`${field} = ${JSON.stringify(value) ?? '(removed)'} → metadata is invalid`, async () => {
      const copy = await copyOfBackup();
      await copy.editMetadata((m) => {
        if (value === undefined) delete m[field];
        else m[field] = value;
      });
      const result = await verify(copy.dumpPath);
      assertRejected(result, /metadata is invalid/);
      assert.match(result.stderr, problem);
    });
  }

  test('--json failure: ok false, exit_code 8, hints, and which checks failed', async () => {
    const copy = await copyOfBackup();
    await fs.appendFile(copy.dumpPath, 'x');
    const result = await verify(copy.dumpPath, '--json');
    assert.equal(result.exitCode, 8);
    const doc = JSON.parse(result.stdout);
    assert.equal(doc.ok, false);
    assert.equal(doc.exit_code, 8);
    assert.match(doc.error, /size mismatch/);
    assert.ok(Array.isArray(doc.hints) && doc.hints.length > 0);
    assert.equal(doc.checks.size.ok, false);
    assert.equal(doc.checks.structure.ok, true);
  });
});

describe('--verify of a backup deleted while it is checked (a concurrent --prune)', () => {
  test('deleted after its header is read: exit 8, backup file not found (not a failed file operation)', async () => {
    const copy = await copyOfBackup();
    const result = await verify(copy.dumpPath, '--pg-bin-dir', await clientThatDeletes([copy.dumpPath]));
    assertRejected(result, /backup file not found/);
  });
});

describe('--verify with a bad argument', () => {
  test('a missing file → exit 8, backup file not found', async () => {
    const result = await verify(path.join(await tempDir(), 'nope_dev_2020-01-01T00-00-00Z.dump'));
    assertRejected(result, /backup file not found/);
  });

  test('a directory → exit 8, not a file', async () => {
    assertRejected(await verify(await tempDir()), /not a file/);
  });

  test('a symlink loop → exit 8, symbolic link loop', async () => {
    const dir = await tempDir();
    await fs.symlink(path.join(dir, 'b.dump'), path.join(dir, 'a.dump'));
    await fs.symlink(path.join(dir, 'a.dump'), path.join(dir, 'b.dump'));
    assertRejected(await verify(path.join(dir, 'a.dump')), /symbolic link loop/);
  });

  test('path traversal to a non-backup file (../../etc/passwd) → exit 8, not a backup file; nothing printed from it', async () => {
    const result = await verify('../../../../../../etc/passwd');
    assertRejected(result, /not a backup file/);
    assert.doesNotMatch(result.stderr, /root:/);
  });

  test('a non-dump file with a .dump suffix and metadata → archive unreadable', async () => {
    const copy = await copyOfBackup();
    await fs.writeFile(copy.dumpPath, 'just some text, not an archive\n');
    const result = await verify(copy.dumpPath);
    assertRejected(result, /archive unreadable/);
  });

  test('--verify without a FILE → exit 2 pointing at --list --verify', async () => {
    const result = await runCli({ args: ['--verify'] });
    assert.equal(result.exitCode, 2);
    assert.match(result.stderr, /--verify needs the backup FILE/);
  });
});

describe('a metadata file is untrusted input', () => {
  const hostile: Array<[string, (text: string) => string, RegExp]> = [
    [
      'nested 200,000 levels deep',
      (text) =>
        text.replace('"tool_version":', `"tool_version":${'['.repeat(200_000)}${']'.repeat(200_000)},"_tool_version":`),
      /it nests more than 16 levels deep/,
    ],
    [
      '"last_restore_test": "garbage"',
      (text) => text.replace(/\}\s*$/, ', "last_restore_test": "garbage"}'),
      /last_restore_test must be a restore test record .*\(found "garbage"\)/,
    ],
    [
      '"__proto__" among the table counts',
      (text) => text.replace('"table_counts": {', '"table_counts": {"__proto__": 1, "constructor": 2,'),
      /the archive holds no data for: __proto__, constructor/,
    ],
  ];
  for (const [what, edit, reason] of hostile) {
    test(`${what}: --verify exits 8 saying why, --list shows it and lists the rest, no stack trace`, async () => {
      const copy = await copyOfBackup();
      await fs.copyFile(other.dumpPath, path.join(copy.dir, path.basename(other.dumpPath)));
      await fs.copyFile(other.metadataPath, path.join(copy.dir, path.basename(other.metadataPath)));
      await fs.writeFile(copy.metadataPath, edit(await fs.readFile(copy.metadataPath, 'utf8')));
      const verified = await verify(copy.dumpPath);
      assert.equal(verified.exitCode, 8, verified.stderr);
      assert.match(verified.stderr, reason);
      const listed = await runCli({ args: ['--list', '--json', '--output-dir', copy.dir] });
      assert.equal(listed.exitCode, 0, listed.stderr);
      const statuses = Object.fromEntries(
        JSON.parse(listed.stdout).backups.map((b: { file: string; status: string }) => [b.file, b.status]),
      );
      assert.equal(statuses[path.basename(other.dumpPath)], 'verified', 'the rest of the directory works normally');
      assert.equal(
        statuses[path.basename(copy.dumpPath)],
        what.startsWith('"__proto__"') ? 'verified' : 'invalid_metadata',
      );
      for (const run of [verified, listed, await runCli({ args: ['--list', '--output-dir', copy.dir] })]) {
        assert.doesNotMatch(run.stdout + run.stderr, /\n\s+at .+:\d+:\d+/, 'no stack trace');
      }
    });
  }

  test('a table name with a line break among the counts: named escaped, it forges no line', async () => {
    const copy = await copyOfBackup();
    const text = await fs.readFile(copy.metadataPath, 'utf8');
    const forged = JSON.stringify('x\n✓ Backup verification passed');
    await fs.writeFile(copy.metadataPath, text.replace('"table_counts": {', `"table_counts": {${forged}: 1,`));
    const verified = await verify(copy.dumpPath);
    assert.equal(verified.exitCode, 8, verified.stderr);
    assert.match(verified.stderr, /the archive holds no data for: x\\n✓ Backup verification passed/);
    assert.doesNotMatch(verified.stdout + verified.stderr, /^✓ Backup verification passed/m);
  });
});
