/**
 * Real restores of a pgvector database (issue 16) on a PostgreSQL 15 server with default settings
 * (maintenance_work_mem 64 MB), as npm run test:setup builds it. The app's embeddings, vector(1536),
 * with an IVFFlat index (lists = 100) built, as pgvector tells users to, in a session with more
 * memory: rebuilding it needs 65 MB, so a restore in a default session fails. And an HNSW index.
 * --restore and the drill must bring both back, valid, with every row identical.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { assertSameDatabases } from './helpers/compare.ts';
import { dbVars, runCli, takeBackup, tempDir, uniqueName, writeEnvFile, type TakenBackup } from './helpers/cli.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { skipUnless, unmet } from './helpers/requirements.ts';

const noPgvector = await unmet('pgvector');
let server: TestServer;
let backup: TakenBackup;
let configDir: string;

before(async () => {
  if (noPgvector) return;
  server = await startTestServer({ pgvector: true });
  await server.createDatabase('vec_app', [
    'CREATE EXTENSION vector',
    'CREATE TABLE items (id int PRIMARY KEY, embedding vector(1536))',
    // 10,000 rows: the least that makes IVFFlat sample its full 10,000 and need 65 MB.
    'INSERT INTO items SELECT i, (SELECT array_agg(random()) FROM generate_series(1, 1536) WHERE i > 0)::vector FROM generate_series(1, 10000) AS i',
    'CREATE TABLE notes (id int PRIMARY KEY, body text, embedding vector(384))',
    "INSERT INTO notes SELECT i, 'note ' || i, (SELECT array_agg(random()) FROM generate_series(1, 384) WHERE i > 0)::vector FROM generate_series(1, 2000) AS i",
    "SET maintenance_work_mem = '256MB'",
    'CREATE INDEX items_ivfflat ON items USING ivfflat (embedding vector_l2_ops) WITH (lists = 100)',
    'CREATE INDEX notes_hnsw ON notes USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)',
    'ANALYZE',
  ]);
  backup = await takeBackup(server, 'vec_app', path.join(await tempDir(), 'backups'));
  configDir = await tempDir();
  await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'vec_app'));
});
after(() => server?.stop());

async function vectorIndexes(database: string): Promise<Array<{ name: string; method: string; valid: boolean }>> {
  const client = await server.connect(database);
  try {
    const { rows } = await client.query(`
      SELECT c.relname AS name, am.amname AS method, i.indisvalid AND i.indisready AS valid
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
       WHERE am.amname IN ('ivfflat', 'hnsw') ORDER BY 1`);
    return rows;
  } finally {
    await client.end();
  }
}

describe('a pgvector database, restored on a server with default settings', skipUnless(noPgvector), () => {
  test('the server is as users have it: 64 MB, too little to rebuild the IVFFlat index in a default session', async () => {
    const client = await server.connect('vec_app');
    try {
      assert.equal((await client.query('SHOW maintenance_work_mem')).rows[0].maintenance_work_mem, '64MB');
      await assert.rejects(
        client.query('REINDEX INDEX items_ivfflat'),
        /memory required is 65 MB, maintenance_work_mem is 64 MB/,
      );
    } finally {
      await client.end();
    }
    assert.deepEqual(
      backup.metadata.extensions,
      [
        { name: 'plpgsql', version: '1.0' },
        { name: 'vector', version: '0.8.0' },
      ],
      'the metadata records each extension and its version',
    );
  });

  test(
    '--restore brings back every row and both indexes, valid, in a session suited to a restore',
    { timeout: 180_000 },
    async () => {
      const target = uniqueName('vec_copy');
      const result = await runCli({
        args: ['--restore', backup.dumpPath, '--target-db', target, '--env', 'dev', '--config-dir', configDir],
      });
      assert.equal(result.exitCode, 0, result.stderr);
      assert.match(
        result.stdout,
        /^Session: {5}maintenance_work_mem=\d+MB, synchronous_commit=off, max_parallel_maintenance_workers=\d+$/m,
      );
      await assertSameDatabases(server, 'vec_app', target);
      assert.deepEqual(await vectorIndexes(target), [
        { name: 'items_ivfflat', method: 'ivfflat', valid: true },
        { name: 'notes_hnsw', method: 'hnsw', valid: true },
      ]);
    },
  );

  test('the drill passes, and the scratch database is gone', { timeout: 180_000 }, async () => {
    const result = await runCli({
      args: ['--verify', backup.dumpPath, '--restore-test', '--env', 'dev', '--config-dir', configDir, '--json'],
    });
    assert.equal(result.exitCode, 0, result.stdout);
    const drill = JSON.parse(result.stdout);
    assert.equal(drill.last_restore_test.ok, true);
    assert.ok(Number.parseInt(drill.session_settings.maintenance_work_mem, 10) >= 128);
  });

  test(
    'with the memory of a default session the restore fails, and the error names the setting to raise',
    { timeout: 180_000 },
    async () => {
      const target = uniqueName('vec_small');
      const result = await runCli({
        args: [
          '--restore',
          backup.dumpPath,
          '--target-db',
          target,
          '--env',
          'dev',
          '--config-dir',
          configDir,
          '--maintenance-work-mem',
          '64MB',
          '--jobs',
          '1',
        ],
      });
      assert.equal(result.exitCode, 7, result.stdout);
      assert.match(result.stderr, /memory required is 65 MB, maintenance_work_mem is 64 MB/);
      assert.match(
        result.stderr,
        /1\. An index build needed more memory than maintenance_work_mem \(64MB per pg_restore job here, with --jobs 1\): run again with --maintenance-work-mem 128MB \(per job\), or fewer --jobs/,
      );
    },
  );
});
