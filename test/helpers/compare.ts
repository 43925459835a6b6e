/**
 * Compare two databases table by table: an ordered hash of every row of every table (partitions
 * included), sequence states, constraints and indexes.
 */
import assert from 'node:assert/strict';
import { execa } from 'execa';
import type pg from 'pg';
import { uniqueName } from './cli.ts';
import type { TestServer } from './pg-server.ts';

export interface DatabaseSnapshot {
  tables: Record<string, { rows: number; hash: string }>;
  sequences: Record<string, string>;
  constraints: string[];
  indexes: string[];
}

export async function snapshotDatabase(client: pg.Client): Promise<DatabaseSnapshot> {
  const { rows: tables } = await client.query<{ schema: string; name: string }>(`
    SELECT n.nspname AS schema, c.relname AS name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind = 'r' AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
     ORDER BY 1, 2`);
  const snapshot: DatabaseSnapshot = { tables: {}, sequences: {}, constraints: [], indexes: [] };
  for (const { schema, name } of tables) {
    const ident = `${client.escapeIdentifier(schema)}.${client.escapeIdentifier(name)}`;
    const { rows } = await client.query<{ rows: string; hash: string | null }>(
      `SELECT count(*) AS rows, md5(string_agg(t::text, E'\\n' ORDER BY t::text)) AS hash FROM ONLY ${ident} AS t`,
    );
    snapshot.tables[`${schema}.${name}`] = { rows: Number(rows[0]!.rows), hash: rows[0]!.hash ?? 'empty' };
  }
  const { rows: sequences } = await client.query<{ name: string; state: string }>(
    `SELECT schemaname || '.' || sequencename AS name, concat_ws(' ', last_value, increment_by, start_value) AS state FROM pg_sequences ORDER BY 1`,
  );
  for (const { name, state } of sequences) snapshot.sequences[name] = state;
  const { rows: constraints } = await client.query<{ def: string }>(
    `SELECT conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid) AS def
       FROM pg_constraint WHERE connamespace::regnamespace::text !~ '^pg_' AND connamespace::regnamespace::text <> 'information_schema' ORDER BY 1`,
  );
  snapshot.constraints = constraints.map((row) => row.def);
  const { rows: indexes } = await client.query<{ def: string }>(
    `SELECT indexdef AS def FROM pg_indexes WHERE schemaname !~ '^pg_' AND schemaname <> 'information_schema' ORDER BY 1`,
  );
  snapshot.indexes = indexes.map((row) => row.def);
  return snapshot;
}

/** Assert that `restored` holds exactly what `source` held, naming the first difference. */
export async function assertSameContent(source: pg.Client, restored: pg.Client): Promise<DatabaseSnapshot> {
  const [expected, actual] = await Promise.all([snapshotDatabase(source), snapshotDatabase(restored)]);
  assert.ok(Object.keys(expected.tables).length > 0, 'the source has tables to compare');
  assert.deepEqual(Object.keys(actual.tables), Object.keys(expected.tables), 'same set of tables');
  for (const [table, summary] of Object.entries(expected.tables)) {
    assert.deepEqual(actual.tables[table], summary, `table ${table}: rows and content hash`);
  }
  assert.deepEqual(actual.sequences, expected.sequences, 'sequence states');
  assert.deepEqual(actual.constraints, expected.constraints, 'constraints (PK, FK, UNIQUE, CHECK)');
  assert.deepEqual(actual.indexes, expected.indexes, 'indexes');
  return expected;
}

/** Restore a dump with the real pg_restore into a new database on `server`; returns its name. */
export async function restoreIntoNewDatabase(
  server: TestServer,
  dumpPath: string,
  pgRestoreArgs: string[] = [],
): Promise<string> {
  const target = uniqueName('restored');
  await server.createDatabase(target);
  await execa(
    'pg_restore',
    ['--no-owner', '--no-acl', '--exit-on-error', ...pgRestoreArgs, '--dbname', target, dumpPath],
    {
      env: { PGHOST: server.host, PGPORT: String(server.port), PGUSER: server.user, PGPASSWORD: server.password },
    },
  );
  return target;
}

/** Assert that `restoredDatabase` on `server` holds exactly what `sourceDatabase` holds. */
export async function assertSameDatabases(
  server: TestServer,
  sourceDatabase: string,
  restoredDatabase: string,
): Promise<void> {
  const [source, restored] = await Promise.all([server.connect(sourceDatabase), server.connect(restoredDatabase)]);
  try {
    await assertSameContent(source, restored);
  } finally {
    await Promise.all([source.end(), restored.end()]);
  }
}

/** Restore a dump into a new database and assert it holds exactly what `sourceDatabase` holds. */
export async function assertRestoresIdentically(
  server: TestServer,
  dumpPath: string,
  sourceDatabase: string,
  pgRestoreArgs: string[] = [],
): Promise<void> {
  await assertSameDatabases(server, sourceDatabase, await restoreIntoNewDatabase(server, dumpPath, pgRestoreArgs));
}
