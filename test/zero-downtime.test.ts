/**
 * Issue 4.5 / SC-003, zero downtime. Writers insert (with foreign keys) and update rows before and
 * during a backup. They must see no errors and no stall: a backup that blocked them would show
 * as a latency close to the backup's whole duration, so the backup is made long enough (a few
 * seconds, at compression level 9) for the check to be able to fail. The restored copy must be
 * consistent: every FK holds, and the row counts equal the metadata's same-snapshot counts even
 * though the tables kept growing during the dump.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, test } from 'node:test';
import type pg from 'pg';
import { startCli, tempDir, dbVars, writeEnvFile } from './helpers/cli.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { restoreIntoNewDatabase } from './helpers/compare.ts';
import { waitFor } from './helpers/wait.ts';

let server: TestServer;
before(async () => {
  server = await startTestServer();
  await server.createDatabase('live_app', `
    CREATE TABLE conversations (id bigserial PRIMARY KEY, title text, created_at timestamptz DEFAULT now());
    CREATE TABLE messages (id bigserial PRIMARY KEY, conversation_id bigint NOT NULL REFERENCES conversations(id), content text, edited int DEFAULT 0);
    CREATE INDEX ON messages (conversation_id);
    INSERT INTO conversations (title) SELECT 'conversation ' || i FROM generate_series(1, 2000) i;
    INSERT INTO messages (conversation_id, content)
      SELECT 1 + i % 2000, repeat(md5(i::text), 6) FROM generate_series(1, 700000) i;`);
});
after(() => server?.stop());

interface Latencies {
  ops: number;
  maxMs: number;
  errors: string[];
}

/** A writer doing what the app does, timing every statement, until `stop` says so. */
async function writeLoad(client: pg.Client, stop: () => boolean): Promise<Latencies> {
  const result: Latencies = { ops: 0, maxMs: 0, errors: [] };
  while (!stop()) {
    const started = performance.now();
    try {
      const { rows } = await client.query<{ id: string }>("INSERT INTO conversations (title) VALUES ('live') RETURNING id");
      await client.query("INSERT INTO messages (conversation_id, content) VALUES ($1, 'written during the backup')", [rows[0]!.id]);
      await client.query('UPDATE messages SET edited = edited + 1 WHERE id = $1', [1 + Math.floor(Math.random() * 700000)]);
    } catch (error) {
      result.errors.push(String(error));
    }
    result.maxMs = Math.max(result.maxMs, performance.now() - started);
    result.ops++;
  }
  return result;
}

test('writers see no errors and no stall during a backup; the restored copy is consistent', { timeout: 180_000 }, async (t) => {
  const writers = await Promise.all([server.connect('live_app'), server.connect('live_app')]);
  try {
    // Without a backup: the baseline.
    const baselineUntil = Date.now() + 2000;
    const baseline = await Promise.all(writers.map((w) => writeLoad(w, () => Date.now() > baselineUntil)));

    // With a backup running.
    const configDir = await tempDir();
    const outputDir = path.join(configDir, 'out');
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'live_app'));
    const cli = startCli({ args: ['--env', 'dev', '--compress', '9', '--config-dir', configDir, '--output-dir', outputDir, '--json'] });
    let done = false;
    void cli.finally(() => (done = true));
    const observer = await server.connect('live_app');
    await waitFor('pg_dump to start copying', async () => {
      const { rows } = await observer.query("SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'backup_db:%' AND query LIKE 'COPY%'");
      return rows.length > 0 || done ? true : undefined;
    });
    await observer.end();
    const during = await Promise.all(writers.map((w) => writeLoad(w, () => done)));
    const result = await cli;
    assert.equal(result.exitCode, 0, String(result.stderr));
    const backup = JSON.parse(String(result.stdout));

    const summary = (l: Latencies[]) => `${l.reduce((n, x) => n + x.ops, 0)} writes, max ${Math.max(...l.map((x) => x.maxMs)).toFixed(1)} ms`;
    t.diagnostic(`without backup: ${summary(baseline)}; during the ${backup.metadata.duration_ms} ms backup: ${summary(during)}`);

    assert.ok(backup.metadata.duration_ms >= 2500, 'the backup lasts long enough for a stall to be visible');
    for (const l of [...baseline, ...during]) assert.deepEqual(l.errors, [], 'writers saw no errors');
    const writesDuring = during.reduce((n, x) => n + x.ops, 0);
    assert.ok(writesDuring >= 50, `writers kept going during the backup (${writesDuring} writes)`);
    const worst = Math.max(...during.map((x) => x.maxMs));
    assert.ok(worst < 1000, `no writer waited ${worst.toFixed(0)} ms; a blocked writer would wait most of ${backup.metadata.duration_ms} ms`);

    // The restored copy: consistent, and exactly the snapshot the metadata describes.
    const restored = await server.connect(await restoreIntoNewDatabase(server, backup.backup_file));
    const source = await server.connect('live_app');
    try {
      const count = async (client: pg.Client, table: string) => Number((await client.query(`SELECT count(*) AS n FROM ${table}`)).rows[0].n);
      for (const table of ['conversations', 'messages']) {
        assert.equal(await count(restored, table), backup.metadata.table_counts[table], `${table}: restored rows = same-snapshot count`);
        assert.ok((await count(source, table)) > backup.metadata.table_counts[table], `${table} kept growing after the snapshot`);
      }
      const orphans = await restored.query('SELECT count(*)::int AS n FROM messages m LEFT JOIN conversations c ON c.id = m.conversation_id WHERE c.id IS NULL');
      assert.equal(orphans.rows[0].n, 0, 'every foreign key holds');
      const fk = await restored.query("SELECT count(*)::int AS n FROM pg_constraint WHERE contype = 'f' AND convalidated");
      assert.equal(fk.rows[0].n, 1, 'the FK constraint was restored and validated');
    } finally {
      await Promise.all([restored.end(), source.end()]);
    }
  } finally {
    await Promise.all(writers.map((w) => w.end()));
  }
});
