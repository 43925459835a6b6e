/**
 * Fuzzing: thousands of random mutations of a real metadata file and of real dump bytes. Every
 * --verify, --list, --list --verify and --prune over them ends with a contract code (0, 2, 4, 8),
 * never 1, and never prints a stack trace; a dump whose bytes changed never verifies. The runs
 * call main() in-process (see helpers/in-process.ts); the files, pg_restore and the locks are real.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import { dbVars, takeBackup, tempDir, writeEnvFile, type TakenBackup } from './helpers/cli.ts';
import { inPool, runMain, type InProcessRun } from './helpers/in-process.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';

let server: TestServer;
let original: TakenBackup;
let older: TakenBackup;
let originalDump: Buffer;
let originalMetadata: Record<string, unknown>;
let configDir: string;
let workDir: string;

before(async () => {
  server = await startTestServer();
  await server.createDatabase('fuzz_app', [
    'CREATE TABLE notes (id int, body text)',
    "INSERT INTO notes SELECT i, repeat('note ', i % 20) FROM generate_series(1, 300) AS i",
    'CREATE TABLE "__proto__" (v int)',
    'CREATE TABLE "constructor" (v int)',
    'INSERT INTO "__proto__" VALUES (1), (2)',
  ]);
  workDir = await tempDir('backup-db-fuzz-');
  // One directory, so that the second is named after the first even within the same second.
  older = await takeBackup(server, 'fuzz_app', path.join(workDir, 'taken'));
  original = await takeBackup(server, 'fuzz_app', path.join(workDir, 'taken'));
  assert.ok(String(older.metadata.backup_timestamp) < String(original.metadata.backup_timestamp), 'original is newest');
  originalDump = await fs.readFile(original.dumpPath);
  originalMetadata = original.metadata;
  configDir = path.join(workDir, 'config');
  await fs.mkdir(configDir);
  await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'fuzz_app'));
});
after(async () => {
  await server?.stop();
  // Retried: a test cut short by its timeout may still be writing there.
  if (workDir) await fs.rm(workDir, { recursive: true, force: true, maxRetries: 10 });
});

const CONTRACT_CODES = [0, 2, 4, 8];
/** Printed with every failure: FUZZ_SEED=<seed> npm test replays the same inputs. */
const SEED = Number(process.env.FUZZ_SEED ?? Math.floor(Math.random() * 2 ** 31));
const PARALLEL = 4;

/**
 * `count` values of `arbitrary`, reproducible from SEED, generated as they are consumed: every
 * pg_restore is a fork of this process, which costs more the more memory it holds.
 */
function lazySample<T>(arbitrary: fc.Arbitrary<T>, count: number): Iterable<T> {
  return {
    *[Symbol.iterator]() {
      for (let chunk = 0; chunk * 100 < count; chunk++)
        yield* fc.sample(arbitrary, { numRuns: Math.min(100, count - chunk * 100), seed: SEED + chunk });
    },
  };
}
const STACK_TRACE = /\n\s+at .+:\d+:\d+\)?$/m;

function assertContract(run: InProcessRun, what: string): void {
  assert.ok(CONTRACT_CODES.includes(run.exitCode), `${what}: exit ${run.exitCode}\n${run.stdout}${run.stderr}`);
  assert.doesNotMatch(run.stdout + run.stderr, STACK_TRACE, `${what}: a stack trace`);
  assert.doesNotMatch(run.stderr, /Unexpected error/, what);
}

let round = 0;
/** A directory holding an older good backup and the mutated newest one. */
async function directoryWith(dump: Buffer | string, metadataText: string): Promise<{ dir: string; dumpPath: string }> {
  const dir = path.join(workDir, `case-${round++}`);
  await fs.mkdir(dir);
  for (const file of [older.dumpPath, older.metadataPath]) await fs.link(file, path.join(dir, path.basename(file)));
  const dumpPath = path.join(dir, path.basename(original.dumpPath));
  if (typeof dump === 'string') await fs.link(dump, dumpPath);
  else await fs.writeFile(dumpPath, dump);
  await fs.writeFile(path.join(dir, path.basename(original.metadataPath)), metadataText);
  return { dir, dumpPath };
}

// ── Metadata mutations ──────────────────────────────────────────────────────────────────

const FIELDS = [
  'backup_timestamp',
  'environment',
  'database_name',
  'backup_file',
  'backup_size_bytes',
  'checksum_sha256',
  'table_counts',
  'pg_dump_version',
  'postgresql_version',
  'format',
  'jobs',
  'compression',
  'duration_ms',
  'snapshot_consistent',
  'tool_version',
  'table_data_oids',
  'last_restore_test',
  'system_identifier',
];
const NAMES_THAT_ARE_PROPERTIES = ['__proto__', 'constructor', 'toString', 'hasOwnProperty', 'valueOf', 'notes'];
const oddValue = fc.oneof(
  fc.jsonValue({ maxDepth: 3 }),
  fc.constantFrom(-1, 0, 1.5, 2 ** 53 + 2, -0, 1e308, '', ' ', 'garbage', '2025-13-45T99:99:99Z', [], {}, null, true),
  fc.string({ unit: 'grapheme', maxLength: 40 }),
);
type Edit = (m: Record<string, unknown>) => void;
const edits: fc.Arbitrary<Edit> = fc.oneof(
  fc.record({ field: fc.constantFrom(...FIELDS), value: oddValue }).map(
    ({ field, value }) =>
      (m: Record<string, unknown>) =>
        void (m[field] = value),
  ),
  fc.constantFrom(...FIELDS).map((field) => (m: Record<string, unknown>) => void delete m[field]),
  fc
    .record({
      map: fc.constantFrom('table_counts', 'table_data_oids', 'last_restore_test'),
      key: fc.constantFrom(...NAMES_THAT_ARE_PROPERTIES),
      value: oddValue,
    })
    .map(({ map, key, value }) => (m: Record<string, unknown>) => {
      const target =
        typeof m[map] === 'object' && m[map] !== null ? (m[map] as Record<string, unknown>) : (m[map] = {});
      Object.defineProperty(target, key, { value, enumerable: true, configurable: true, writable: true });
    }),
);
/** The metadata's text after edits, then perhaps deep nesting or byte damage to the text itself. */
const metadataText = fc
  .record({
    edits: fc.array(edits, { maxLength: 4 }),
    nest: fc.option(fc.record({ field: fc.constantFrom(...FIELDS), depth: fc.integer({ min: 2, max: 20_000 }) }), {
      freq: 6,
    }),
    damage: fc.option(
      fc.array(
        fc.record({
          at: fc.nat(),
          byte: fc.integer({ min: 0, max: 255 }),
          kind: fc.constantFrom('set', 'insert', 'delete'),
        }),
        { minLength: 1, maxLength: 4 },
      ),
      { freq: 3 },
    ),
  })
  .map(({ edits: changes, nest, damage }) => {
    const metadata = structuredClone(originalMetadata);
    for (const change of changes) change(metadata);
    let text = JSON.stringify(metadata);
    if (nest)
      text = text.replace(
        `"${nest.field}":`,
        `"${nest.field}":${'['.repeat(nest.depth)}${']'.repeat(nest.depth)},"_${nest.field}":`,
      );
    if (!damage) return text;
    const bytes = [...Buffer.from(text)];
    for (const { at, byte, kind } of damage) {
      const i = at % (bytes.length + 1);
      if (kind === 'set') bytes[Math.min(i, bytes.length - 1)] = byte;
      else if (kind === 'insert') bytes.splice(i, 0, byte);
      else bytes.splice(i, 1);
    }
    return Buffer.from(bytes).toString('latin1');
  });

describe('fuzzing metadata files', () => {
  test(
    `2000 mutated metadata files: --verify, --list and --prune keep to the contract (seed ${SEED})`,
    { timeout: 600_000 },
    async () => {
      let verified = 0;
      await inPool(lazySample(fc.tuple(metadataText, fc.nat(4)), 2000), PARALLEL, async ([text, pick], i) => {
        const what = `case ${i} of seed ${SEED}, metadata ${JSON.stringify(text.slice(0, 300))}`;
        const { dir, dumpPath } = await directoryWith(original.dumpPath, text);
        const verify = await runMain(['--verify', dumpPath]);
        assertContract(verify, `--verify, ${what}`);
        if (verify.exitCode === 0) verified++;
        assertContract(await runMain(['--list', '--output-dir', dir]), `--list, ${what}`);
        if (pick === 0)
          assertContract(await runMain(['--list', '--verify', '--output-dir', dir]), `--list --verify, ${what}`);
        if (pick === 1)
          assertContract(
            await runMain([
              '--prune',
              '--keep-last',
              '1',
              '--env',
              'dev',
              '--config-dir',
              configDir,
              '--output-dir',
              dir,
            ]),
            `--prune, ${what}`,
          );
        await fs.rm(dir, { recursive: true, force: true });
      });
      assert.ok(verified > 0, 'some mutations leave valid metadata, and those still verify');
    },
  );
});

// ── Dump mutations ──────────────────────────────────────────────────────────────────────

const dumpBytes = fc.oneof(
  fc
    .array(fc.record({ at: fc.nat(), xor: fc.integer({ min: 1, max: 255 }) }), { minLength: 1, maxLength: 8 })
    .map((flips) => {
      const bytes = Buffer.from(originalDump);
      for (const { at, xor } of flips) bytes[at % bytes.length] = bytes[at % bytes.length]! ^ xor;
      return bytes;
    }),
  fc.nat().map((at) => originalDump.subarray(0, at % originalDump.length)),
  fc.uint8Array({ minLength: 1, maxLength: 300 }).map((tail) => Buffer.concat([originalDump, tail])),
  fc.record({ at: fc.nat(), length: fc.integer({ min: 1, max: 4096 }) }).map(({ at, length }) => {
    const bytes = Buffer.from(originalDump);
    bytes.fill(0, at % bytes.length, Math.min(bytes.length, (at % bytes.length) + length));
    return bytes;
  }),
  // The header: archive version, int size, format, the versions and names pg_restore reads first.
  fc
    .array(fc.record({ at: fc.nat(80), byte: fc.integer({ min: 0, max: 255 }) }), { minLength: 1, maxLength: 6 })
    .map((sets) => {
      const bytes = Buffer.from(originalDump);
      for (const { at, byte } of sets) bytes[at] = byte;
      return bytes;
    }),
);

describe('fuzzing dump bytes', () => {
  test(
    `600 damaged dumps, with the recorded size or a matching one: never verified, always the contract (seed ${SEED})`,
    { timeout: 600_000 },
    async () => {
      await inPool(lazySample(fc.tuple(dumpBytes, fc.boolean()), 600), PARALLEL, async ([bytes, matchingSize], i) => {
        if (bytes.equals(originalDump)) return;
        const what = `case ${i} of seed ${SEED} (${bytes.length} bytes${matchingSize ? ', size recorded' : ''})`;
        const metadata = matchingSize
          ? { ...originalMetadata, backup_size_bytes: Math.max(1, bytes.length) }
          : originalMetadata;
        const { dir, dumpPath } = await directoryWith(bytes, JSON.stringify(metadata));
        const verify = await runMain(['--verify', dumpPath]);
        assertContract(verify, `--verify, ${what}`);
        assert.equal(verify.exitCode, 8, `a damaged dump must not verify, ${what}:\n${verify.stdout}`);
        const listed = await runMain(['--list', '--verify', '--output-dir', dir]);
        assertContract(listed, `--list --verify, ${what}`);
        assert.equal(listed.exitCode, 8, what);
        await fs.rm(dir, { recursive: true, force: true });
      });
    },
  );
});
