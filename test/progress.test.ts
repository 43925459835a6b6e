/**
 * Live progress: on a terminal (script(1) provides one) it shows the table being dumped, rows,
 * an estimated percentage, bytes written and elapsed time, and disappears cleanly on success and
 * on error; with stdout piped, or --json, there is none.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import {
  dbVars,
  PROJECT_DIR,
  SCRIPT,
  tempDir,
  WALL_CLOCK_MODULE,
  wallClockEnv,
  writeEnvFile,
  type WallClock,
} from './helpers/cli.ts';
import { clientDirHolding } from './helpers/clients.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { within } from './helpers/processes.ts';
import { startProxy } from './helpers/proxy.ts';
import { holdTableLock, waitForCountsDoneAndDumpStarted } from './helpers/wait.ts';
import { skipUnless, unmet } from './helpers/requirements.ts';

let server: TestServer;
let configDir: string;
before(async () => {
  server = await startTestServer();
  // Enough rows that a level-9 dump takes a few seconds: several one-second progress updates.
  await server.createDatabase('progress_app', [
    `CREATE TABLE messages (id bigserial PRIMARY KEY, content text);
     INSERT INTO messages (content) SELECT repeat(md5(i::text), 6) FROM generate_series(1, 700000) i`,
    'VACUUM ANALYZE messages',
  ]);
  configDir = await tempDir();
  await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'progress_app'));
});
after(() => server?.stop());

/** Run the CLI on a pseudo-terminal; `shellSuffix` can redirect its stdout inside it. */
async function onTerminal(args: string[], shellSuffix = '', wallClock?: WallClock, config = configDir) {
  const outputDir = path.join(await tempDir(), 'out');
  const preload = wallClock ? `--import '${WALL_CLOCK_MODULE}'` : '';
  const command = `'${process.execPath}' --import tsx ${preload} '${SCRIPT}' --env dev --config-dir '${config}' --output-dir '${outputDir}' ${args.join(' ')} ${shellSuffix}`;
  const env = wallClock ? wallClockEnv(wallClock) : {};
  const result = await execa('script', ['-qec', command, '/dev/null'], { cwd: PROJECT_DIR, env, reject: false });
  return { exitCode: result.exitCode, terminal: String(result.stdout) };
}

const PROGRESS = /dumping messages: [\d,]+ rows · ~\d+% · [\d.]+ (B|KB|MB) written · \d+:\d\d/;
const CLEAR = '\r\x1b[K';

describe('progress on a terminal', skipUnless(await unmet('script')), () => {
  test('takes no connection pg_dump needs: --jobs 2 with a CONNECTION LIMIT of N + 2 still backs up', async () => {
    const admin = await server.connect('progress_app');
    try {
      await admin.query(`DROP ROLE IF EXISTS progress_lim;
        CREATE ROLE progress_lim LOGIN PASSWORD 'Lim-pa55word' CONNECTION LIMIT 4;
        GRANT pg_read_all_data TO progress_lim`);
    } finally {
      await admin.end();
    }
    const limited = await tempDir();
    await writeEnvFile(limited, '.env', {
      ...dbVars(server, 'DEV_DB_', 'progress_app'),
      DEV_DB_USER: 'progress_lim',
      DEV_DB_PASSWORD: 'Lim-pa55word',
    });
    const { exitCode, terminal } = await onTerminal(['--jobs', '2'], '', undefined, limited);
    assert.equal(exitCode, 0, terminal);
    assert.match(terminal, /Backup created successfully/);
  });

  test('updates while pg_dump copies, then is cleared before the summary', { timeout: 120_000 }, async () => {
    const { exitCode, terminal } = await onTerminal(['--compress', '9']);
    assert.equal(exitCode, 0, terminal);
    const lines = terminal.split(CLEAR).filter((part) => part.includes('dumping'));
    const updates = lines.filter((part) => PROGRESS.test(part));
    assert.ok(updates.length >= 1, `updates name the table being copied: ${JSON.stringify(terminal.slice(0, 400))}`);
    // About one update a second, however long this machine took: none of the elapsed seconds shown is skipped.
    const seconds = lines.map((line) => /(\d+):(\d\d)/.exec(line)!).map(([, m, s]) => Number(m) * 60 + Number(s));
    assert.ok(lines.length >= seconds.at(-1)!, `${lines.length} updates over ${seconds.at(-1)} s`);
    assert.deepEqual(
      [...seconds].sort((a, b) => a - b),
      seconds,
      'elapsed time only grows',
    );
    const percents = updates.map((u) => Number(/~(\d+)%/.exec(u)![1]));
    assert.deepEqual(
      [...percents].sort((a, b) => a - b),
      percents,
      'the estimate only grows',
    );
    const summary = terminal.indexOf('Backup created successfully');
    assert.ok(summary > 0);
    assert.ok(
      terminal.lastIndexOf(CLEAR, summary) > terminal.lastIndexOf('dumping', summary),
      'the last progress line was cleared first',
    );
  });

  test(
    'its elapsed time is real: a wall clock stepping an hour ahead mid-dump (NTP) does not show',
    { timeout: 120_000 },
    async () => {
      // pg_dump is never held (released up front): `started` only marks that the dump has begun.
      const clients = await clientDirHolding('pg_dump', '--snapshot');
      await fs.writeFile(clients.release, '');
      const started = performance.now();
      const args = ['--compress', '9', '--pg-bin-dir', `'${clients.dir}'`];
      const { exitCode, terminal } = await onTerminal(args, '', { when: clients.started, stepMs: 3_600_000 });
      const runSeconds = (performance.now() - started) / 1000;
      assert.equal(exitCode, 0, terminal);
      const lines = terminal.split(CLEAR).filter((part) => part.includes('dumping'));
      assert.ok(lines.length >= 1);
      for (const line of lines) {
        const [, minutes, seconds] = /written · (-?\d+):(-?\d+)/.exec(line) ?? [];
        const shown = Number(minutes) * 60 + Number(seconds);
        assert.ok(
          shown >= 0 && shown <= runSeconds,
          `shows ${minutes}:${seconds} in a run of ${runSeconds} s: ${line}`,
        );
      }
    },
  );

  test('is cleared when the backup fails, leaving the error readable', { timeout: 120_000 }, async () => {
    const lock = await holdTableLock(() => server.connect('progress_app'), 'messages');
    try {
      const { exitCode, terminal } = await onTerminal(['--lock-wait-timeout', '2s']);
      assert.equal(exitCode, 7, terminal);
      const error = terminal.indexOf('✗');
      assert.ok(
        terminal.lastIndexOf(CLEAR, error) > terminal.lastIndexOf('dumping', error),
        'progress cleared before the error',
      );
      assert.match(terminal, /Backup failed: A table is locked/);
    } finally {
      await lock.release();
    }
  });

  test(
    'a server that stops answering mid-dump: the stalled run ends all the same, its progress cleared',
    { timeout: 120_000 },
    async () => {
      const proxy = await startProxy(server);
      // A pg_dump that writes nothing until it is stopped, while progress polls the server.
      const clients = await clientDirHolding('pg_dump', '--snapshot');
      const observer = await server.connect('progress_app');
      const dir = await tempDir();
      const vars = { ...dbVars(server, 'DEV_DB_', 'progress_app'), DEV_DB_HOST: proxy.host };
      await writeEnvFile(dir, '.env', { ...vars, DEV_DB_PORT: String(proxy.port) });
      const command =
        `'${process.execPath}' --import tsx '${SCRIPT}' --env dev --config-dir '${dir}' --output-dir '${dir}/out' ` +
        `--pg-bin-dir '${clients.dir}' --stall-timeout 1s --connect-timeout 2`;
      const run = execa('script', ['-qec', command, '/dev/null'], { cwd: PROJECT_DIR, reject: false });
      let ended = false;
      void run.finally(() => (ended = true));
      try {
        await waitForCountsDoneAndDumpStarted(observer, clients.started);
        proxy.freeze();
        await within('the backup to end while the server does not answer', 30_000, async () => ended);
        const result = await run;
        const terminal = String(result.stdout);
        assert.equal(result.exitCode, 7, terminal);
        const error = terminal.indexOf('✗ Backup failed: The backup stalled');
        assert.ok(error > 0, terminal);
        assert.ok(terminal.lastIndexOf(CLEAR, error) > terminal.lastIndexOf('dumping', error), 'progress cleared');
      } finally {
        if (!ended) run.kill('SIGKILL');
        await run;
        await proxy.close();
        await observer.end();
      }
    },
  );

  test(
    'is not shown when stdout is piped or with --json, even with a terminal at hand',
    { timeout: 120_000 },
    async () => {
      const piped = await onTerminal([], `> '${path.join(await tempDir(), 'stdout.txt')}'`);
      assert.equal(piped.exitCode, 0, piped.terminal);
      assert.doesNotMatch(piped.terminal, /dumping/);
      const json = await onTerminal(['--json']);
      assert.equal(json.exitCode, 0);
      assert.doesNotMatch(json.terminal, /dumping/);
      assert.equal(JSON.parse(json.terminal.replaceAll('\r', '')).ok, true, 'stdout is nothing but the JSON document');
    },
  );
});
