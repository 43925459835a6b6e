/**
 * npm test: every test file in test/, several at a time, each in a process of its own (Node's test
 * runner, through tsx). A file's output is printed whole when it ends, longest files first, then
 * a table of each file's time. The files run with TMPDIR set to a fresh directory: whatever is
 * left in it afterwards is a test that did not clean up after itself, and fails the run. Under
 * CI=true a skipped test fails the run too, so CI proves everything.
 *
 *   npm test                        every file
 *   npm test -- retention fuzz      the files whose names contain one of these words
 *   TEST_CONCURRENCY=1 npm test     one file at a time
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { readTestOutput, type Counts } from './helpers/test-output.ts';

const PROJECT_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const TEST_DIR = path.join(PROJECT_DIR, 'test');
/** The last run's time per file: the longest start first, so that they do not end the run alone. */
const TIMES_FILE = path.join(PROJECT_DIR, 'node_modules', '.cache', 'backup-db-test-times.json');
/** The servers and CLI processes a file starts wait on I/O much of the time: one more file than cores. */
const CONCURRENCY = Number(process.env.TEST_CONCURRENCY) || os.availableParallelism() + 1;
/** A file that hangs must not hang CI: its process is killed after this long. */
const FILE_TIMEOUT_MS = 15 * 60_000;
const IN_CI = process.env.CI === 'true';

interface FileResult {
  file: string;
  exitCode: number | null;
  ms: number;
  output: string;
  counts: Counts;
  skipped: string[];
}

async function testFiles(filters: string[]): Promise<string[]> {
  const names = (await fs.readdir(TEST_DIR)).filter((name) => name.endsWith('.test.ts'));
  const chosen = filters.length === 0 ? names : names.filter((name) => filters.some((word) => name.includes(word)));
  const times: Record<string, number> = JSON.parse(await fs.readFile(TIMES_FILE, 'utf8').catch(() => '{}'));
  return chosen.sort((a, b) => (times[b] ?? 60_000) - (times[a] ?? 60_000) || a.localeCompare(b));
}

/** The tool's own settings in the developer's shell (their database, hooks, log): no test may inherit them. */
const TOOL_SETTING = /^(DEV_)?(DB_|DATABASE_URL$)|^(BACKUP_|PG)|^ENV_MODE$/;
const fileEnv = () => Object.fromEntries(Object.entries(process.env).filter(([name]) => !TOOL_SETTING.test(name)));

function runFile(file: string, tmpdir: string): Promise<FileResult> {
  const started = Date.now();
  return new Promise((resolve) => {
    const child = spawn(
      process.execPath,
      ['--import', 'tsx', '--test', '--test-reporter=spec', path.join('test', file)],
      {
        cwd: PROJECT_DIR,
        env: { ...fileEnv(), TMPDIR: tmpdir, FORCE_COLOR: '0' },
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    const chunks: Buffer[] = [];
    child.stdout.on('data', (chunk: Buffer) => chunks.push(chunk));
    child.stderr.on('data', (chunk: Buffer) => chunks.push(chunk));
    const timer = setTimeout(() => child.kill('SIGKILL'), FILE_TIMEOUT_MS);
    child.on('close', (exitCode) => {
      clearTimeout(timer);
      const output = Buffer.concat(chunks).toString();
      const { counts, skipped } = readTestOutput(output);
      resolve({ file, exitCode, ms: Date.now() - started, output, counts, skipped });
    });
  });
}

async function runAll(files: string[], tmpdir: string): Promise<FileResult[]> {
  const queue = [...files];
  const results: FileResult[] = [];
  await Promise.all(
    Array.from({ length: Math.min(CONCURRENCY, files.length) }, async () => {
      for (let file = queue.shift(); file !== undefined; file = queue.shift()) {
        const result = await runFile(file, tmpdir);
        results.push(result);
        const verdict = result.exitCode === 0 ? 'passed' : `FAILED (exit ${result.exitCode ?? 'killed'})`;
        process.stdout.write(
          `\n── test/${file}: ${verdict} in ${(result.ms / 1000).toFixed(1)} s ${'─'.repeat(20)}\n${result.output}`,
        );
      }
    }),
  );
  return results;
}

/** What the run left in its temp directory, apart from tsx's own compile cache. */
async function leftovers(tmpdir: string): Promise<string[]> {
  return (await fs.readdir(tmpdir)).filter((name) => !/^tsx-\d+$/.test(name));
}

const started = Date.now();
const files = await testFiles(process.argv.slice(2));
const tmpdir = await fs.mkdtemp(path.join(os.tmpdir(), 'backup-db-tests-'));
// Test servers run as the postgres user when the tests run as root: it must reach into here.
await fs.chmod(tmpdir, 0o755);
let results: FileResult[];
let left: string[];
try {
  console.log(
    `Running ${files.length} test files, ${CONCURRENCY} at a time${IN_CI ? ' (CI: a skipped test fails the run)' : ''}.`,
  );
  results = await runAll(files, tmpdir);
  left = await leftovers(tmpdir);
} finally {
  await fs.rm(tmpdir, { recursive: true, force: true });
}

const byTime = [...results].sort((a, b) => b.ms - a.ms);
const total = (key: keyof FileResult['counts']) => results.reduce((sum, r) => sum + r.counts[key], 0);
console.log(`\nTime per file (${CONCURRENCY} at a time):`);
for (const r of byTime)
  console.log(
    `  ${(r.ms / 1000).toFixed(1).padStart(6)} s  ${r.exitCode === 0 ? ' ' : '✗'} test/${r.file}  (${r.counts.tests} tests${r.counts.skipped ? `, ${r.counts.skipped} skipped` : ''})`,
  );
console.log(
  `\n${total('tests')} tests: ${total('pass')} passed, ${total('fail')} failed, ${total('skipped')} skipped, ${total('cancelled')} cancelled; ${((Date.now() - started) / 1000).toFixed(1)} s in all.`,
);
await fs.mkdir(path.dirname(TIMES_FILE), { recursive: true });
await fs.writeFile(TIMES_FILE, JSON.stringify(Object.fromEntries(results.map((r) => [r.file, r.ms]))));

const failed = results.filter((r) => r.exitCode !== 0);
const skipped = results.flatMap((r) => r.skipped.map((name) => `test/${r.file}: ${name}`));
if (failed.length > 0) console.log(`\n✗ Failed: ${failed.map((r) => `test/${r.file}`).join(', ')}`);
if (skipped.length > 0)
  console.log(
    `\n${IN_CI ? '✗' : '-'} Skipped (what they need is missing here${IN_CI ? '; CI must run everything' : ''}):\n${skipped.map((s) => `  ${s}`).join('\n')}`,
  );
if (left.length > 0)
  console.log(`\n✗ Left in the temp directory by the tests (each must clean up what it creates): ${left.join(', ')}`);
process.exitCode = failed.length > 0 || left.length > 0 || (IN_CI && skipped.length > 0) ? 1 : 0;
