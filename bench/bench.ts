/**
 * Benchmark: backup_db.ts against the raw tools doing the same work, on an app-like database.
 *
 *   npm run bench -- [--size-mb 1000] [--runs 5] [--compress gzip:1] [--pg-bin-dir DIR]
 *
 * Starts a throwaway PostgreSQL server, generates two databases (size/4 and size) server-side,
 * then times, interleaved over several runs: (a) `pg_dump -Fc` into a file plus `sha256sum`, and
 * (b) `backup_db.ts` doing the whole job (snapshot, counts, dump, streamed hash, structure check,
 * metadata); the same pair for the parallel mode, `pg_dump -Fd -j2` plus `sha256sum` of its files
 * against `backup_db.ts --jobs 2`; and (b) once more on a terminal, where it shows progress.
 * Prints medians, ratios (the median of the runs' own ratios), throughput, dump size, the CLI's
 * peak RSS, verify time against sha256sum, projections to 10 GB, and a compression guide. Exits 1
 * if a target is missed. `--pg-bin-dir` measures another client (the raw runs and the CLI both use
 * it), e.g. the pg_dump 17 that `npm run test:setup` builds into node_modules/.cache/pg-client-17/bin.
 * Shared virtual machines are noisy (±10% run to run here): trust medians of several runs.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { execa } from 'execa';
import { parseCompression, parsePgVersion, restoreSessionSettings, type Compression } from '../backup_db.ts';
import { startTestServer, type TestServer } from '../test/helpers/pg-server.ts';
import { pgvectorServerBuilt } from '../test/setup/pgvector.ts';
import { generateAppDatabase } from './generate.ts';

const { values } = parseArgs({
  options: {
    'size-mb': { type: 'string', default: '1000' },
    runs: { type: 'string', default: '5' },
    compress: { type: 'string' },
    'pg-bin-dir': { type: 'string' },
    only: { type: 'string' },
  },
});
const PG_BIN_DIR = values['pg-bin-dir'] && path.resolve(values['pg-bin-dir']);
/** The client under test: the one the CLI would find on PATH, unless --pg-bin-dir names another. */
const PG_DUMP = PG_BIN_DIR ? path.join(PG_BIN_DIR, 'pg_dump') : 'pg_dump';
const CLIENT_ARGS = PG_BIN_DIR ? ['--pg-bin-dir', PG_BIN_DIR] : [];
/** The CLI on the bench database: `extra`, with the bench's configuration and client tools. */
const cliArgs = (configDir: string, ...extra: string[]) => [
  CLI,
  '--env',
  'dev',
  '--config-dir',
  configDir,
  ...extra,
  ...CLIENT_ARGS,
];
const SIZE_MB = Number(values['size-mb']);
const RUNS = Number(values.runs);
const PROJECT = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const CLI = path.join(PROJECT, 'backup_db.ts');
const MAX_RSS = path.join(PROJECT, 'bench', 'max-rss.mjs');

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
/**
 * Each run times the pair back to back, so the ratio of the two is taken within a run: this VM's
 * speed drifts by ±10% over minutes, which a ratio of separate medians would partly measure.
 */
const pairedRatios = (base: number[], other: number[]) => other.map((t, i) => t / base[i]!);
const mb = (bytes: number) => bytes / 1024 / 1024;
const seconds = async <T>(work: () => Promise<T>): Promise<[number, T]> => {
  const started = performance.now();
  const result = await work();
  return [(performance.now() - started) / 1000, result];
};

interface Measurement {
  database: string;
  dbBytes: number;
  raw: number[];
  tool: number[];
  rawParallel: number[];
  toolParallel: number[];
  toolTty: number[];
  rss: number[];
  dumpBytes: number;
  verify: number[];
  sha256sum: number[];
}

/** The libpq environment of raw pg_dump and pg_restore runs on the bench server. */
function libpqEnvFor(server: TestServer, database?: string): Record<string, string> {
  const env = { PGHOST: server.host, PGPORT: String(server.port), PGUSER: server.user, PGPASSWORD: server.password };
  return database === undefined ? env : { ...env, PGDATABASE: database };
}

/** A configuration directory under `work` whose .env points the CLI at `database` (as dev). */
async function writeConfig(work: string, server: TestServer, database: string): Promise<string> {
  const configDir = path.join(work, 'config');
  await fs.mkdir(configDir);
  const vars = { HOST: server.host, PORT: server.port, NAME: database, USER: server.user, PASSWORD: server.password };
  const lines = Object.entries(vars).map(([name, value]) => `DEV_DB_${name}=${value}\n`);
  await fs.writeFile(path.join(configDir, '.env'), lines.join(''));
  return configDir;
}

async function measure(
  server: TestServer,
  database: string,
  dbBytes: number,
  compress: string | undefined,
): Promise<Measurement> {
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'backup-db-bench-'));
  const configDir = await writeConfig(work, server, database);
  const pgEnv = libpqEnvFor(server, database);
  const level = (await compressionFor(compress)).arg;
  const m: Measurement = {
    database,
    dbBytes,
    raw: [],
    tool: [],
    rawParallel: [],
    toolParallel: [],
    toolTty: [],
    rss: [],
    dumpBytes: 0,
    verify: [],
    sha256sum: [],
  };

  const raw = async () => {
    const file = path.join(work, 'raw.dump');
    const [t] = await seconds(async () => {
      await execa(PG_DUMP, ['-Fc', `--compress=${level}`, '-f', file], { env: pgEnv });
      await execa('sha256sum', [file]);
    });
    m.raw.push(t);
    await fs.rm(file);
  };
  const tool = async () => {
    const outputDir = path.join(work, 'out');
    const rssFile = path.join(work, 'rss');
    const compression = compress ? ['--compress', compress] : [];
    const args = [
      '--import',
      'tsx',
      '--import',
      MAX_RSS,
      ...cliArgs(configDir, '--output-dir', outputDir, ...compression),
    ];
    const [t] = await seconds(() =>
      execa(process.execPath, args, { cwd: PROJECT, env: { BENCH_MAX_RSS_FILE: rssFile } }),
    );
    m.tool.push(t);
    m.rss.push(Number(await fs.readFile(rssFile, 'utf8')));
    const dump = (await fs.readdir(outputDir)).find((name) => name.endsWith('.dump'))!;
    m.dumpBytes = (await fs.stat(path.join(outputDir, dump))).size;
    // Verifying a dump: the CLI against sha256sum of the same file.
    const file = path.join(outputDir, dump);
    m.verify.push(
      (
        await seconds(() =>
          execa(process.execPath, ['--import', 'tsx', CLI, '--verify', file, ...CLIENT_ARGS], { cwd: PROJECT }),
        )
      )[0],
    );
    m.sha256sum.push((await seconds(() => execa('sha256sum', [file])))[0]);
    await fs.rm(outputDir, { recursive: true });
  };
  const rawParallel = async () => {
    const dir = path.join(work, 'raw.dir');
    const [t] = await seconds(async () => {
      await execa(PG_DUMP, ['-Fd', '-j2', `--compress=${level}`, '-f', dir], { env: pgEnv });
      await execa('sh', ['-c', 'sha256sum "$1"/* > /dev/null', 'sh', dir]);
    });
    m.rawParallel.push(t);
    await fs.rm(dir, { recursive: true });
  };
  const toolParallel = async () => {
    const outputDir = path.join(work, 'parallel');
    const compression = compress ? ['--compress', compress] : [];
    const args = ['--import', 'tsx', ...cliArgs(configDir, '--jobs', '2', '--output-dir', outputDir, ...compression)];
    m.toolParallel.push((await seconds(() => execa(process.execPath, args, { cwd: PROJECT })))[0]);
    await fs.rm(outputDir, { recursive: true });
  };
  const toolOnTerminal = async () => {
    const outputDir = path.join(work, 'tty');
    const command = `'${process.execPath}' --import tsx '${CLI}' --env dev --config-dir '${configDir}' --output-dir '${outputDir}' ${CLIENT_ARGS.map((a) => `'${a}'`).join(' ')} ${compress ? `--compress ${compress}` : ''}`;
    m.toolTty.push((await seconds(() => execa('script', ['-qec', command, '/dev/null'], { cwd: PROJECT })))[0]);
    await fs.rm(outputDir, { recursive: true });
  };
  // Interleaved, alternating the order, so that drift (caches, other load) hits both alike.
  for (let run = 0; run < RUNS; run++) {
    const steps = [raw, tool, rawParallel, toolParallel, toolOnTerminal];
    for (const step of run % 2 === 0 ? steps : [...steps].reverse()) await step();
    process.stderr.write('.');
  }
  await fs.rm(work, { recursive: true });
  return m;
}

/**
 * What the CLI passes to pg_dump for `--compress input` (or its default) with this machine's
 * pg_dump, so that the raw runs compress exactly as the CLI's do.
 */
async function compressionFor(input: string | undefined): Promise<Compression> {
  return parseCompression(input, await pgDumpMajor());
}

async function pgDumpMajor(): Promise<number> {
  return parsePgVersion((await execa(PG_DUMP, ['--version'])).stdout)?.major ?? 0;
}

/** Raw pg_dump at several settings, for the --compress guide and the directory-format question. */
async function compressionGuide(
  server: TestServer,
  database: string,
): Promise<Array<{ setting: string; seconds: number; bytes: number }>> {
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'backup-db-bench-'));
  const env = libpqEnvFor(server, database);
  const rows = [];
  const level = (await compressionFor(undefined)).arg;
  // zstd and lz4 came with pg_dump 16.
  const newer = (await pgDumpMajor()) >= 16 ? ['zstd:1', 'zstd:3', 'zstd:9', 'lz4:1'] : [];
  const settings: Array<[string, string[]]> = [
    ...['0', '1', '3', '6', '9', ...newer].map((c): [string, string[]] => [`-Fc -Z${c}`, ['-Fc', `-Z${c}`]]),
    [`-Fd -Z${level} -j1`, ['-Fd', `-Z${level}`, '-j1']],
    [`-Fd -Z${level} -j2`, ['-Fd', `-Z${level}`, '-j2']],
  ];
  for (const [setting, args] of settings) {
    const target = path.join(work, randomBytes(4).toString('hex'));
    const [t] = await seconds(() => execa(PG_DUMP, [...args, '-f', target], { env }));
    const { stdout } = await execa('du', ['-sb', target]);
    rows.push({ setting, seconds: t, bytes: Number(stdout.split('\t')[0]) });
    await fs.rm(target, { recursive: true });
    process.stderr.write('.');
  }
  await fs.rm(work, { recursive: true });
  return rows;
}

/**
 * The fixed cost every command pays before any work: `npx tsx backup_db.ts --list` of an empty
 * directory, beside `npx tsx` of a one-line file (the floor no script can go below), and the
 * same through `node --import tsx`, as the timings above run the tool. Medians of alternating runs.
 */
async function measureStartup(
  runs: number,
): Promise<Record<'npxFloor' | 'npxTool' | 'npxHelp' | 'nodeFloor' | 'nodeTool', number>> {
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'backup-db-bench-'));
  const trivial = path.join(work, 'trivial.ts');
  await fs.writeFile(trivial, 'export const one: number = 1;\n');
  const empty = path.join(work, 'empty');
  const commands = {
    npxFloor: ['npx', 'tsx', trivial],
    npxTool: ['npx', 'tsx', CLI, '--list', '--output-dir', empty],
    npxHelp: ['npx', 'tsx', CLI, '--help'],
    nodeFloor: [process.execPath, '--import', 'tsx', trivial],
    nodeTool: [process.execPath, '--import', 'tsx', CLI, '--list', '--output-dir', empty],
  };
  const times = Object.fromEntries(Object.keys(commands).map((name) => [name, [] as number[]])) as Record<
    keyof typeof commands,
    number[]
  >;
  for (let run = 0; run < runs; run++) {
    for (const [name, [command, ...args]] of Object.entries(commands) as Array<[keyof typeof commands, string[]]>) {
      times[name].push((await seconds(() => execa(command!, args, { cwd: PROJECT })))[0]);
    }
  }
  await fs.rm(work, { recursive: true });
  return Object.fromEntries(Object.entries(times).map(([name, xs]) => [name, median(xs)])) as Record<
    keyof typeof commands,
    number
  >;
}

interface RestoreMeasurement {
  label: string;
  dumpBytes: number;
  raw: number[];
  rawTuned: number[];
  tool: number[];
}

/**
 * --restore against raw `pg_restore -j N` into a fresh database, on the same archive; and raw
 * pg_restore with the session settings the tool uses, to show what they do on their own. The tool
 * also verifies the file first (a full SHA-256 read) and reconciles every table's count after.
 */
async function measureRestore(server: TestServer, database: string, label: string): Promise<RestoreMeasurement> {
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'backup-db-bench-'));
  const configDir = await writeConfig(work, server, database);
  const outputDir = path.join(work, 'out');
  await execa(process.execPath, ['--import', 'tsx', ...cliArgs(configDir, '--output-dir', outputDir)], {
    cwd: PROJECT,
  });
  const file = path.join(
    outputDir,
    (await fs.readdir(outputDir)).find((name) => name.endsWith('.dump'))!,
  );
  const jobs = os.availableParallelism();
  const tuned = Object.entries(restoreSessionSettings(server.major, jobs))
    .map(([k, v]) => `-c ${k}=${v}`)
    .join(' ');
  const env = libpqEnvFor(server);
  const pgRestore = PG_BIN_DIR ? path.join(PG_BIN_DIR, 'pg_restore') : 'pg_restore';
  const m: RestoreMeasurement = { label, dumpBytes: (await fs.stat(file)).size, raw: [], rawTuned: [], tool: [] };
  let n = 0;
  // Raw: createdb and pg_restore, what the tool does for a new target.
  const raw = (into: number[], options: Record<string, string>) => async () => {
    const target = `bench_restore_${n++}`;
    into.push(
      (
        await seconds(async () => {
          await server.createDatabase(target);
          await execa(
            pgRestore,
            ['--no-owner', '--no-acl', '--exit-on-error', `--jobs=${jobs}`, `--dbname=${target}`, file],
            { env: { ...env, ...options } },
          );
        })
      )[0],
    );
    await server.dropDatabase(target);
  };
  const tool = async () => {
    const target = `bench_restore_${n++}`;
    m.tool.push(
      (
        await seconds(() =>
          execa(
            process.execPath,
            ['--import', 'tsx', ...cliArgs(configDir, '--restore', file, '--target-db', target)],
            { cwd: PROJECT },
          ),
        )
      )[0],
    );
    await server.dropDatabase(target);
  };
  for (let run = 0; run < RUNS; run++) {
    const steps = [raw(m.raw, {}), raw(m.rawTuned, { PGOPTIONS: tuned }), tool];
    for (const step of run % 2 === 0 ? steps : [...steps].reverse()) await step();
    process.stderr.write('.');
  }
  await fs.rm(work, { recursive: true });
  return m;
}

const server = await startTestServer();
try {
  if (values.only === 'restore') {
    const database = `bench_${SIZE_MB}`;
    process.stderr.write(`generating ~${SIZE_MB} MB ... `);
    await generateAppDatabase(server, database, SIZE_MB);
    process.stderr.write('\n');
    await reportRestore(server, database);
    process.exit(process.exitCode ?? 0);
  }
  process.stderr.write('start-up ');
  const startup = await measureStartup(Math.max(RUNS * 2, 11));
  process.stderr.write('\n');
  const sizes = [Math.round(SIZE_MB / 4), SIZE_MB];
  const results: Measurement[] = [];
  for (const size of sizes) {
    process.stderr.write(`generating ~${size} MB ... `);
    const [t, dbBytes] = await seconds(() => generateAppDatabase(server, `bench_${size}`, size));
    process.stderr.write(`${mb(dbBytes).toFixed(0)} MB in ${t.toFixed(0)} s; measuring `);
    results.push(await measure(server, `bench_${size}`, dbBytes, values.compress));
    process.stderr.write('\n');
  }
  process.stderr.write('compression guide ');
  const guide = await compressionGuide(server, `bench_${SIZE_MB}`);
  process.stderr.write('\n\n');

  const { label } = await compressionFor(values.compress);
  const setting = values.compress === undefined ? `default (${label})` : label;
  const client = (await execa(PG_DUMP, ['--version'])).stdout.trim();
  console.log(
    `backup_db.ts benchmark: ${os.cpus().length} CPUs (${os.cpus()[0]?.model.trim()}), node ${process.version}, ${client}, compression ${setting}, ${RUNS} runs, medians\n`,
  );
  console.log(
    '| Database | Raw `pg_dump -Fc` + sha256sum | backup_db.ts | Ratio | Raw `pg_dump -Fd -j2` + sha256sum | backup_db.ts --jobs 2 | Ratio | On a terminal (progress) | Throughput | Dump size | Peak RSS |',
  );
  console.log('|---|---|---|---|---|---|---|---|---|---|---|');
  for (const r of results) {
    const [raw, tool, rawP, toolP, tty] = [
      median(r.raw),
      median(r.tool),
      median(r.rawParallel),
      median(r.toolParallel),
      median(r.toolTty),
    ];
    const [ratio, ratioP] = [median(pairedRatios(r.raw, r.tool)), median(pairedRatios(r.rawParallel, r.toolParallel))];
    console.log(
      `| ${mb(r.dbBytes).toFixed(0)} MB | ${raw.toFixed(1)} s | ${tool.toFixed(1)} s | ${ratio.toFixed(2)} | ${rawP.toFixed(1)} s | ${toolP.toFixed(1)} s | ${ratioP.toFixed(2)} | ${tty.toFixed(1)} s | ${(mb(r.dbBytes) / tool).toFixed(0)} / ${(mb(r.dbBytes) / toolP).toFixed(0)} MB/s | ${mb(r.dumpBytes).toFixed(0)} MB | ${mb(median(r.rss)).toFixed(0)} MB |`,
    );
  }
  console.log(
    `\nFixed start-up cost, paid by every command before any work: ${startup.npxTool.toFixed(2)} s for \`npx tsx backup_db.ts --list\` of an empty directory (--help ${startup.npxHelp.toFixed(2)} s), of which \`npx tsx\` itself takes ${startup.npxFloor.toFixed(2)} s (a one-line file): the tool adds ${(startup.npxTool - startup.npxFloor).toFixed(2)} s. Through \`node --import tsx\`, as timed above: ${startup.nodeTool.toFixed(2)} s (floor ${startup.nodeFloor.toFixed(2)} s).`,
  );
  for (const r of results) {
    const overhead = median(r.tool) - median(r.raw) - startup.nodeTool;
    console.log(
      `Overhead beyond the start-up, ${mb(r.dbBytes).toFixed(0)} MB: ${overhead.toFixed(2)} s, ${(overhead / (r.dbBytes / 1024 ** 3)).toFixed(2)} s per GB of database`,
    );
  }
  const large = results.at(-1)!;
  const small = results[0]!;
  const verify = median(large.verify);
  const sha = median(large.sha256sum);
  const projection = ((10 * 1024) / mb(large.dbBytes)) * median(large.tool);
  const projectionParallel = ((10 * 1024) / mb(large.dbBytes)) * median(large.toolParallel);
  console.log(
    `\nVerify ${mb(large.dumpBytes).toFixed(0)} MB dump: backup_db.ts --verify ${verify.toFixed(1)} s, sha256sum ${sha.toFixed(1)} s (${(verify / sha).toFixed(2)}x)`,
  );
  console.log(
    `Projection to a 10 GB database: ${(projection / 60).toFixed(1)} min (one file), ${(projectionParallel / 60).toFixed(1)} min (--jobs 2)\n`,
  );
  console.log('| pg_dump setting | Time | Size | Throughput |');
  console.log('|---|---|---|---|');
  for (const row of guide)
    console.log(
      `| \`${row.setting}\` | ${row.seconds.toFixed(1)} s | ${mb(row.bytes).toFixed(0)} MB | ${(mb(large.dbBytes) / row.seconds).toFixed(0)} MB/s |`,
    );

  const ratios = pairedRatios(large.raw, large.tool);
  const ratiosParallel = pairedRatios(large.rawParallel, large.toolParallel);
  const listed = (xs: number[]) =>
    [...xs]
      .sort((a, b) => a - b)
      .map((x) => x.toFixed(2))
      .join(' ');
  console.log(
    `\nEach run's ratio on ${mb(large.dbBytes).toFixed(0)} MB, sorted: one file ${listed(ratios)}; --jobs 2 ${listed(ratiosParallel)}`,
  );

  const rssGrowth = median(large.rss) - median(small.rss);
  const targets: Array<[string, boolean]> = [
    [
      `ratio ≤ 1.05 (${median(ratios).toFixed(2)}; --jobs 2: ${median(ratiosParallel).toFixed(2)})`,
      median(ratios) <= 1.05,
    ],
    [`peak RSS ≤ 150 MB (${mb(median(large.rss)).toFixed(0)} MB)`, mb(median(large.rss)) <= 150],
    [
      `peak RSS flat across sizes (+${mb(rssGrowth).toFixed(1)} MB for ${(large.dbBytes / small.dbBytes).toFixed(1)}x the data)`,
      mb(rssGrowth) <= 10,
    ],
    [`verify ≤ 1.5x sha256sum (${(verify / sha).toFixed(2)}x)`, verify <= 1.5 * sha],
    // The defaults: one file, the default compression. --jobs 2 is shown, not counted.
    [
      `10 GB projected < 3 min at the default settings (${(projection / 60).toFixed(1)} min as one file; ${(projectionParallel / 60).toFixed(1)} min with --jobs 2)`,
      projection < 180,
    ],
  ];
  console.log('\nTargets:');
  for (const [what, met] of targets) console.log(`  ${met ? '✓' : '✗'} ${what}`);
  process.exitCode = targets.every(([, met]) => met) ? 0 : 1;
  await reportRestore(server, large.database);
} finally {
  await server.stop();
}

/**
 * The restore benchmark: `database` as it is, with a GIN full-text index on its messages, and
 * (where npm run test:setup has built the pgvector server) a table of 12,000 vector(1536) with an
 * HNSW index, whose graph outgrows the default 64 MB of maintenance_work_mem.
 */
async function reportRestore(on: TestServer, database: string): Promise<void> {
  process.stderr.write('restores ');
  const plain = await measureRestore(on, database, 'app database, no extra index');
  const client = await on.connect(database);
  await client.query("CREATE INDEX messages_fts ON messages USING gin (to_tsvector('simple', content))");
  await client.end();
  const gin = await measureRestore(on, database, 'the same with a GIN full-text index');
  let vector: RestoreMeasurement | undefined;
  if (await pgvectorServerBuilt()) {
    const vectors = await startTestServer({ pgvector: true });
    try {
      await vectors.createDatabase('bench_vectors', [
        'CREATE EXTENSION vector',
        'CREATE TABLE embeddings (id int PRIMARY KEY, v vector(1536))',
        'INSERT INTO embeddings SELECT i, (SELECT array_agg(random()) FROM generate_series(1, 1536) WHERE i > 0)::vector FROM generate_series(1, 12000) AS i',
        "SET maintenance_work_mem = '1GB'",
        'CREATE INDEX ON embeddings USING hnsw (v vector_l2_ops)',
      ]);
      vector = await measureRestore(vectors, 'bench_vectors', '12,000 vector(1536), HNSW index');
    } finally {
      await vectors.stop();
    }
  }
  process.stderr.write('\n');
  const measured = [plain, gin, ...(vector ? [vector] : [])];
  const ratio = (r: RestoreMeasurement) => median(pairedRatios(r.raw, r.tool));
  console.log(
    `\nRestore: --restore against createdb + raw pg_restore --jobs ${os.availableParallelism()} into a fresh database, same archive; the server at its default settings (maintenance_work_mem 64 MB). Medians of ${RUNS}; ratios are medians of each run's own.\n`,
  );
  console.log(
    '| Database | Dump | Raw pg_restore | Raw, with the session settings | backup_db.ts --restore (verify + restore + counts) | Ratio | Settings alone |',
  );
  console.log('|---|---|---|---|---|---|---|');
  for (const r of measured) {
    console.log(
      `| ${r.label} | ${mb(r.dumpBytes).toFixed(0)} MB | ${median(r.raw).toFixed(1)} s | ${median(r.rawTuned).toFixed(1)} s | ${median(r.tool).toFixed(1)} s | ${ratio(r).toFixed(2)} | ${median(pairedRatios(r.raw, r.rawTuned)).toFixed(2)} |`,
    );
  }
  const dominated = vector ?? gin;
  const targets: Array<[string, boolean]> = [
    [
      `--restore ≤ 1.05 × raw pg_restore (${ratio(plain).toFixed(2)}, of which the fixed start-up is about 0.5 s)`,
      ratio(plain) <= 1.05,
    ],
    [
      `--restore faster than raw pg_restore where an index build dominates (${dominated.label}: ${ratio(dominated).toFixed(2)})`,
      ratio(dominated) < 1,
    ],
  ];
  console.log('\nRestore targets:');
  for (const [what, met] of targets) console.log(`  ${met ? '✓' : '✗'} ${what}`);
  if (!targets.every(([, met]) => met)) process.exitCode = 1;
}
