/**
 * Issue 4.4, unreachable or slow databases. The tool gives up within the connection timeout
 * (exit 3) whether nobody listens, the address leads nowhere, or a server accepts and then never
 * answers; and it fails fast (exit 7) instead of queueing behind an exclusive table lock.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import { execa } from 'execa';
import type pg from 'pg';
import { dbVars, runCli, startCli, tempDir, uniqueName, writeEnvFile } from './helpers/cli.ts';
import { clientDirHolding } from './helpers/clients.ts';
import { freePort, startTestServer, type TestServer } from './helpers/pg-server.ts';
import { within } from './helpers/processes.ts';
import { startProxy, type FreezableProxy } from './helpers/proxy.ts';
import {
  backendPid,
  holdTableLock,
  waitFor,
  waitForCountsDoneAndDumpStarted,
  waitForNoBackupSessions,
} from './helpers/wait.ts';

let server: TestServer;
before(async () => {
  server = await startTestServer();
  await server.createDatabase(
    'slow_app',
    'CREATE TABLE busy (id int); INSERT INTO busy SELECT generate_series(1, 100)',
  );
});
after(() => server?.stop());

async function backup(vars: Record<string, string>, extra: string[] = []) {
  const configDir = await tempDir();
  const outputDir = path.join(configDir, 'out');
  await writeEnvFile(configDir, '.env', vars);
  const started = Date.now();
  const result = await runCli({
    args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir, ...extra],
  });
  const files = await fs.readdir(outputDir).catch(() => [] as string[]);
  return { ...result, seconds: (Date.now() - started) / 1000, files };
}

describe('unreachable or silent database', () => {
  test(
    'a server that accepts the connection and never answers: exit 3 after the connection timeout, no hang',
    { timeout: 60_000 },
    async (t) => {
      const sockets: net.Socket[] = [];
      const silent = net.createServer((socket) => sockets.push(socket));
      const port = await freePort();
      await new Promise<void>((resolve) => silent.listen(port, '127.0.0.1', resolve));
      try {
        const result = await backup({ ...dbVars(server, 'DEV_DB_', 'slow_app'), DEV_DB_PORT: String(port) }, [
          '--connect-timeout',
          '2',
        ]);
        t.diagnostic(`gave up after ${result.seconds.toFixed(1)} s (timeout 2 s, plus process start-up)`);
        assert.equal(result.exitCode, 3, result.stderr);
        assert.match(result.stderr, /^✗ Backup failed: Database did not answer within 2 s$/m);
        assert.ok(sockets.length > 0, 'the tool did connect, so it was the silence it timed out on');
        assert.ok(result.seconds >= 2, 'it waited for the timeout');
        assert.ok(result.seconds < 15, 'and not much longer');
        assert.deepEqual(result.files, []);
      } finally {
        sockets.forEach((socket) => socket.destroy());
        silent.close();
      }
    },
  );

  test(
    "a server that accepts the connection and never answers the session's first query: exit 3, no hang",
    { timeout: 60_000 },
    async (t) => {
      const run = await backupFreezingOn('set_config', ['--connect-timeout', '2']);
      try {
        const ms = await run.endsWhileFrozen();
        t.diagnostic(`ended ${(ms / 1000).toFixed(1)} s after the server froze (connect timeout 2 s)`);
        const result = await run.cli;
        assert.equal(result.exitCode, 3, String(result.stderr));
        assert.match(String(result.stderr), /^✗ Backup failed: Database did not answer within 2 s$/m);
        assert.deepEqual(await fs.readdir(run.outputDir), [], 'no partial, no lock file');
      } finally {
        await run.close();
      }
    },
  );

  test('an address nobody routes (TEST-NET-1): exit 3 within the timeout', { timeout: 60_000 }, async (t) => {
    const result = await backup({ ...dbVars(server, 'DEV_DB_', 'slow_app'), DEV_DB_HOST: '192.0.2.1' }, [
      '--connect-timeout',
      '2',
    ]);
    // Depending on the network, packets to it are dropped (a timeout) or refused at once.
    const title =
      /^✗ Backup failed: (Database did not answer within 2 s|Database connection refused|Database connection error)$/m.exec(
        result.stderr,
      );
    t.diagnostic(`gave up after ${result.seconds.toFixed(1)} s: ${title?.[1]}`);
    assert.equal(result.exitCode, 3, result.stderr);
    assert.ok(title, result.stderr);
    assert.ok(result.seconds < 15);
  });

  test('a closed port: exit 3 at once', async () => {
    const result = await backup({ ...dbVars(server, 'DEV_DB_', 'slow_app'), DEV_DB_PORT: String(await freePort()) });
    assert.equal(result.exitCode, 3);
    assert.match(result.stderr, /connection refused/);
  });
});

describe('client tools that never answer', () => {
  test(
    'a pg_dump whose --version never answers: exit 6 within seconds, naming it, nothing written',
    { timeout: 60_000 },
    async () => {
      // A wrapper script stuck on a child of its own: the child holds the output open once the script is stopped.
      const dir = await tempDir('backup-db-hung-');
      await fs.writeFile(path.join(dir, 'pg_dump'), '#!/bin/sh\nsleep 1000\n', { mode: 0o755 });
      await fs.symlink((await execa('sh', ['-c', 'command -v pg_restore'])).stdout, path.join(dir, 'pg_restore'));
      const result = await backup(dbVars(server, 'DEV_DB_', 'slow_app'), ['--pg-bin-dir', dir]);
      assert.equal(result.exitCode, 6, result.stderr);
      assert.match(result.stderr, /^✗ Backup failed: pg_dump did not answer --version within 5 s$/m);
      assert.ok(result.stderr.includes(path.join(dir, 'pg_dump')), result.stderr);
      assert.ok(result.seconds < 20, `it ended after ${result.seconds} s`);
      assert.deepEqual(result.files, [], 'nothing written');
    },
  );
});

/**
 * A backup through a freezable proxy whose pg_dump writes nothing until stopped: the dump runs, the counts are
 * done, and the stall watchdog (1 s) must end it, however the server stops answering (`freeze`).
 */
async function stalledBackup(t: TestContext, freeze: (proxy: FreezableProxy) => Promise<void>) {
  const proxy = await startProxy(server);
  const clients = await clientDirHolding('pg_dump', '--snapshot');
  const observer = await server.connect('slow_app');
  const vars = { ...dbVars(server, 'DEV_DB_', 'slow_app'), DEV_DB_HOST: proxy.host, DEV_DB_PORT: String(proxy.port) };
  const configDir = await tempDir();
  const outputDir = path.join(configDir, 'out');
  await writeEnvFile(configDir, '.env', vars);
  const args = ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir, '--pg-bin-dir', clients.dir];
  const cli = startCli({ args: [...args, '--stall-timeout', '1s', '--connect-timeout', '2'] });
  let ended = false;
  void cli.finally(() => (ended = true));
  try {
    await waitForCountsDoneAndDumpStarted(observer, clients.started);
    await freeze(proxy);
    const ms = await within('the backup to end while the server does not answer', 30_000, async () => ended);
    t.diagnostic(`ended ${(ms / 1000).toFixed(1)} s after the server froze (stall 1 s, connect timeout 2 s)`);
    const result = await cli;
    assert.equal(result.exitCode, 7, String(result.stderr));
    assert.match(String(result.stderr), /^✗ Backup failed: The backup stalled$/m);
    assert.deepEqual(await fs.readdir(outputDir), [], 'no partial, no lock file');
    return String(result.stderr);
  } finally {
    if (!ended) cli.kill('SIGKILL');
    await cli;
    await proxy.close();
    await observer.end();
  }
}

describe('a server that stops answering mid-dump', () => {
  test(
    'the watchdog stops the backup and it ends (exit 7, nothing left) while the server is still frozen',
    { timeout: 60_000 },
    async (t) => {
      await stalledBackup(t, async (proxy) => proxy.freeze());
    },
  );

  test(
    'frozen once the watchdog asks what the dump waits on: it still stops the backup (exit 7, nothing left)',
    { timeout: 60_000 },
    async (t) => {
      const stderr = await stalledBackup(t, async (proxy) => {
        // Logged in, its query is the first thing the server does not answer.
        proxy.freezeOn('pg_blocking_pids');
        await waitFor('the watchdog to ask', async () => (proxy.frozen ? true : undefined));
      });
      assert.match(stderr, /what its sessions wait on could not be read/);
    },
  );
});

describe('a server that stops answering before the dump', () => {
  test(
    'frozen on the snapshot export: the watchdog stops the backup (exit 7, naming the query, nothing left)',
    { timeout: 60_000 },
    async (t) => {
      const run = await backupFreezingOn('pg_export_snapshot', ['--stall-timeout', '1s', '--connect-timeout', '2']);
      try {
        const ms = await run.endsWhileFrozen();
        t.diagnostic(`ended ${(ms / 1000).toFixed(1)} s after the server froze (stall 1 s, connect timeout 2 s)`);
        const result = await run.cli;
        assert.equal(result.exitCode, 7, String(result.stderr));
        assert.match(String(result.stderr), /^✗ Backup failed: The backup stalled$/m);
        assert.match(
          String(result.stderr),
          /no byte was written for 1 s \(--stall-timeout\) while .*pg_export_snapshot/,
        );
        assert.deepEqual(await fs.readdir(run.outputDir), [], 'no partial, no lock file');
      } finally {
        await run.close();
      }
    },
  );
});

describe('--lock-wait-timeout', () => {
  test(
    'an exclusive lock on a table: exit 7 after the lock wait timeout, naming the lock; nothing kept',
    { timeout: 60_000 },
    async (t) => {
      const lock = await holdTableLock(() => server.connect('slow_app'), 'busy');
      try {
        const result = await backup(dbVars(server, 'DEV_DB_', 'slow_app'), ['--lock-wait-timeout', '1s']);
        t.diagnostic(`failed after ${result.seconds.toFixed(1)} s while the lock was still held`);
        assert.equal(result.exitCode, 7, result.stderr);
        assert.match(result.stderr, /^✗ Backup failed: A table is locked$/m);
        assert.match(result.stderr, /lock timeout|could not obtain lock/);
        assert.match(result.stderr, /pg_locks/);
        assert.deepEqual(result.files, [], 'no partial, no lock file');
      } finally {
        await lock.release();
      }
    },
  );

  test(
    'a TRUNCATE queued behind the counts, and pg_dump behind it: exit 7, a table is locked, not a generic failure',
    { timeout: 60_000 },
    async () => {
      // pg_dump is held before it starts; the backup's own session asked for its table locks before that.
      const [truncator, observer] = await Promise.all([server.connect('slow_app'), server.connect('slow_app')]);
      const { cli, outputDir, release } = await backupWithHeldPgDump('slow_app', ['--lock-wait-timeout', '1s']);
      let truncated: Promise<unknown> = Promise.resolve();
      try {
        await waitForBackupHoldingBusy(observer, { countsDone: false });
        truncated = truncator.query('BEGIN; TRUNCATE busy; ROLLBACK').catch(() => undefined);
        await waitForQueuedOnBusy(observer);
      } finally {
        await release();
      }
      const result = await cli;
      await truncated;
      await Promise.all([truncator.end(), observer.end()]);
      assert.equal(result.exitCode, 7, String(result.stderr));
      assert.match(String(result.stderr), /^✗ Backup failed: A table is locked$/m);
      assert.match(String(result.stderr), /statement timeout[\s\S]*LOCK TABLE public\.busy/);
      assert.deepEqual(await fs.readdir(outputDir), [], 'no partial, no lock file');
    },
  );

  test(
    'with --lock-wait-timeout 0: a TRUNCATE waiting for the counted table while pg_dump waits for it is a cycle, ' +
      'ended at once (exit 7, naming that session), never a hang',
    { timeout: 60_000 },
    async () => {
      // The counts are done and their locks held when pg_dump asks for busy, queued behind the TRUNCATE,
      // which waits for the backup's own session, which waits (in the tool) for pg_dump: no timeout ends it.
      const [truncator, observer] = await Promise.all([server.connect('slow_app'), server.connect('slow_app')]);
      const { cli, outputDir, release } = await backupWithHeldPgDump('slow_app', [
        '--lock-wait-timeout',
        '0',
        '--stall-timeout',
        '0',
      ]);
      let truncated: Promise<unknown> = Promise.resolve();
      let truncatorPid = 0;
      try {
        await waitForBackupHoldingBusy(observer);
        truncatorPid = await backendPid(truncator);
        truncated = truncator.query('BEGIN; TRUNCATE busy; ROLLBACK').catch(() => undefined);
        await waitForQueuedOnBusy(observer);
      } finally {
        await release();
      }
      const result = await cli;
      await truncated;
      await Promise.all([truncator.end(), observer.end()]);
      assert.equal(result.exitCode, 7, String(result.stderr));
      assert.match(String(result.stderr), /^✗ Backup failed: A table is locked$/m);
      assert.match(String(result.stderr), new RegExp(`session ${truncatorPid} .*TRUNCATE busy`));
      assert.match(String(result.stderr), new RegExp(`pg_terminate_backend\\(${truncatorPid}\\)`));
      assert.deepEqual(await fs.readdir(outputDir), [], 'no partial, no lock file');
    },
  );

  test(
    'with --lock-wait-timeout 0: a session in that cycle with a lock_timeout of its own gives up first, and the backup goes on',
    { timeout: 60_000 },
    async () => {
      const [migration, observer] = await Promise.all([server.connect('slow_app'), server.connect('slow_app')]);
      const { cli, release } = await backupWithHeldPgDump('slow_app', [
        '--lock-wait-timeout',
        '0',
        '--stall-timeout',
        '0',
      ]);
      let migrated: Promise<unknown> = Promise.resolve();
      try {
        await waitForBackupHoldingBusy(observer);
        // As migration tools do: give up on the lock rather than queue every query behind it.
        migrated = migration.query("SET lock_timeout = '2s'; ALTER TABLE busy ADD COLUMN added_by_migration int").then(
          () => 'done',
          (error: Error) => error.message,
        );
        await waitForQueuedOnBusy(observer);
      } finally {
        await release();
      }
      const result = await cli;
      assert.equal(await migrated, 'canceling statement due to lock timeout');
      await Promise.all([migration.end(), observer.end()]);
      assert.equal(result.exitCode, 0, String(result.stderr));
    },
  );

  test(
    'with --lock-wait-timeout 0: a cycle through another session (pg_dump → B → A → the backup) is found too',
    { timeout: 60_000 },
    async () => {
      const database = uniqueName('cycle');
      await server.createDatabase(database, [
        'CREATE TABLE parted (k int) PARTITION BY LIST (k)',
        'CREATE TABLE parted_a PARTITION OF parted FOR VALUES IN (1)',
        'CREATE TABLE busy (id int)',
        'INSERT INTO busy SELECT generate_series(1, 100)',
        'CREATE VIEW v AS SELECT 1 AS one',
      ]);
      const connect = () => server.connect(database);
      const [a, b, observer] = await Promise.all([connect(), connect(), connect()]);
      const { cli, release } = await backupWithHeldPgDump(database, [
        '--lock-wait-timeout',
        '0',
        '--stall-timeout',
        '0',
      ]);
      const aPid = await backendPid(a);
      const waiting: Array<Promise<unknown>> = [];
      try {
        await waitForBackupHoldingBusy(observer);
        // A holds v and waits for busy (the backup's); B holds parted, which pg_dump will want, and waits for v.
        waiting.push(a.query('BEGIN; LOCK TABLE v IN ACCESS EXCLUSIVE MODE; TRUNCATE busy').catch(() => undefined));
        await waitForQueuedOnBusy(observer);
        waiting.push(
          b.query('BEGIN; LOCK TABLE ONLY parted IN ACCESS EXCLUSIVE MODE; LOCK TABLE v').catch(() => undefined),
        );
        await waitFor('B to wait for v', async () => {
          const { rows } = await observer.query(
            "SELECT 1 FROM pg_locks WHERE relation = 'v'::regclass AND NOT granted",
          );
          return rows.length > 0 ? true : undefined;
        });
      } finally {
        await release();
      }
      const result = await cli;
      await Promise.all([a.query('ROLLBACK').catch(() => undefined), b.query('ROLLBACK').catch(() => undefined)]);
      await Promise.all(waiting);
      await Promise.all([a.end(), b.end(), observer.end()]);
      assert.equal(result.exitCode, 7, String(result.stderr));
      assert.match(String(result.stderr), /^✗ Backup failed: A table is locked$/m);
      assert.match(String(result.stderr), new RegExp(`session ${aPid} \\(BEGIN; LOCK TABLE v .*TRUNCATE busy\\)`));
    },
  );

  test(
    "with --lock-wait-timeout 0: other runs' pg_dumps with this run's pid (another pid namespace) in a lock queue are no cycle",
    { timeout: 60_000 },
    async () => {
      const connect = () => server.connect('slow_app');
      const [truncator, observer] = await Promise.all([connect(), connect()]);
      const { cli, release } = await backupWithHeldPgDump('slow_app', [
        '--lock-wait-timeout',
        '0',
        '--stall-timeout',
        '0',
      ]);
      let ended = false;
      void cli.finally(() => (ended = true));
      // Named as another run with this pid names its pg_dump's session, before and after the run's token.
      const names = [`backup_db:${cli.pid}:pg_dump`, `backup_db:${cli.pid}:feedc0de:pg_dump`];
      const others = await Promise.all(names.map(() => connect()));
      const pids = await Promise.all([truncator, ...others].map(backendPid));
      const waiting: Array<Promise<unknown>> = [];
      try {
        await waitForBackupHoldingBusy(observer);
        // The TRUNCATE waits for this backup; the other runs' pg_dumps wait behind it.
        waiting.push(truncator.query('BEGIN; TRUNCATE busy').catch(() => undefined));
        await waitForQueuedOnBusy(observer);
        for (const [i, other] of others.entries()) {
          await other.query(`SET application_name = '${names[i]}'`);
          waiting.push(other.query('BEGIN; LOCK TABLE busy IN ACCESS SHARE MODE').catch(() => undefined));
        }
        // Well past the grace period (10 s) after which a real cycle ends the run.
        await waitFor('the other pg_dumps to wait 15 s, or the run to end', async () => {
          const { rows } = await observer.query(
            "SELECT 1 FROM pg_stat_activity WHERE pid = ANY ($1) AND wait_event_type = 'Lock' AND now() - query_start > '15 s'",
            [pids.slice(1)],
          );
          return rows.length === others.length || ended ? true : undefined;
        });
        if (ended) assert.fail(`the run ended: ${String((await cli).stderr)}`);
      } finally {
        await observer.query('SELECT pg_cancel_backend(pid) FROM unnest($1::int[]) AS pid', [pids]);
        await Promise.all(waiting);
        await Promise.all([truncator, ...others].map((client) => client.query('ROLLBACK')));
        await Promise.all([truncator, observer, ...others].map((client) => client.end()));
        await release();
      }
      const result = await cli;
      assert.equal(result.exitCode, 0, String(result.stderr));
    },
  );

  test('bad values are refused by the parser (exit 2)', async () => {
    for (const value of ['forever', '-1s', '10 parsecs', '']) {
      const result = await runCli({ args: ['--lock-wait-timeout', value] });
      assert.equal(result.exitCode, 2, value);
      assert.match(result.stderr, /Use a duration such as 500ms, 30s, 2min, 1h or 2d, up to 24 d/);
    }
  });
});

/** Until the backup's own session holds its lock on busy, with `countsDone` its counts done too (idle in its transaction). */
async function waitForBackupHoldingBusy(observer: pg.Client, { countsDone = true } = {}): Promise<void> {
  const done = countsDone ? ', its counts done' : '';
  await waitFor(`the backup's own session to hold its lock on busy${done}`, async () => {
    const { rows } = await observer.query(
      `SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE a.application_name ~ '^backup_db:[0-9]+:[0-9a-f]+$' AND l.relation = 'busy'::regclass AND l.granted
          ${countsDone ? "AND a.state = 'idle in transaction'" : ''}`,
    );
    return rows.length > 0 ? true : undefined;
  });
}

/** Until a session queues for busy. */
async function waitForQueuedOnBusy(observer: pg.Client): Promise<void> {
  await waitFor('a session to queue for busy', async () => {
    const { rows } = await observer.query("SELECT 1 FROM pg_locks WHERE relation = 'busy'::regclass AND NOT granted");
    return rows.length > 0 ? true : undefined;
  });
}

/** A backup of `database` whose pg_dump is held before it starts (its session's locks asked for), until release(). */
async function backupWithHeldPgDump(database: string, extra: string[]) {
  const clients = await clientDirHolding('pg_dump', '--snapshot');
  const configDir = await tempDir();
  const outputDir = path.join(configDir, 'out');
  await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', database));
  const args = ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir, '--pg-bin-dir', clients.dir];
  const cli = startCli({ args: [...args, ...extra] });
  const release = () => fs.writeFile(clients.release, '');
  try {
    await waitFor('pg_dump to be started', async () => await fs.stat(clients.started).catch(() => undefined));
  } catch (error) {
    await release();
    throw error;
  }
  return { cli, outputDir, release };
}

/**
 * A backup of slow_app through a proxy that freezes once the tool sends `query`. endsWhileFrozen: how
 * long the run took to end after the freeze, the server still frozen. close: the run ended, the proxy
 * closed, and with it the frozen sessions on the server.
 */
async function backupFreezingOn(query: string, extra: string[]) {
  const proxy = await startProxy(server);
  proxy.freezeOn(query);
  const configDir = await tempDir();
  const outputDir = path.join(configDir, 'out');
  const vars = { ...dbVars(server, 'DEV_DB_', 'slow_app'), DEV_DB_HOST: proxy.host, DEV_DB_PORT: String(proxy.port) };
  await writeEnvFile(configDir, '.env', vars);
  const cli = startCli({ args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir, ...extra] });
  let ended = false;
  void cli.finally(() => (ended = true));
  return {
    cli,
    outputDir,
    async endsWhileFrozen() {
      await waitFor(`the tool to send ${query}`, async () => (proxy.frozen || ended ? true : undefined));
      if (!proxy.frozen) assert.fail(`it ended before sending ${query}: ${String((await cli).stderr)}`);
      const ms = await within('the backup to end while the server does not answer', 30_000, async () => ended);
      assert.ok(proxy.frozen, 'the server was frozen all along');
      return ms;
    },
    async close() {
      if (!ended) cli.kill('SIGKILL');
      await cli;
      await proxy.close();
      const observer = await server.connect('slow_app');
      try {
        await waitForNoBackupSessions(observer);
      } finally {
        await observer.end();
      }
    },
  };
}
