/**
 * Operations (issue 17): know when backups stop happening, and never hang. A freshness check for
 * monitoring systems, heartbeat pings, a Prometheus textfile and a stall watchdog, each tested
 * with real processes: a real HTTP receiver, real backups moved into the past, a real lock.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import http from 'node:http';
import type net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import { execa } from 'execa';
import fc from 'fast-check';
import parsePrometheus from 'parse-prometheus-text-format';
import {
  foreignMetrics,
  formatAge,
  judgeFreshness,
  parseMetrics,
  pingUrlFor,
  recordRunInMetrics,
  renderMetrics,
  type ListEntry,
  type MetricSeries,
} from '../backup_db.ts';
import { dbVars, runCli, startCli, tempDir, takeBackup, writeEnvFile, type TakenBackup } from './helpers/cli.ts';
import { clientDirHolding } from './helpers/clients.ts';
import { assertRestoresIdentically } from './helpers/compare.ts';
import { freePort, startTestServer, type TestServer } from './helpers/pg-server.ts';
import { within } from './helpers/processes.ts';
import { startGatingProxy, type GatingProxy } from './helpers/proxy.ts';
import { backendPid, flipMiddleByte, holdTableLock, waitFor, waitForNoBackupSessions } from './helpers/wait.ts';

let server: TestServer;
const COUNTED = ['c1', 'c2', 'c3', 'c4'];
before(async () => {
  server = await startTestServer();
  for (const db of ['ops_app', 'ops_other'])
    await server.createDatabase(db, 'CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 50)');
  await server.createDatabase(
    'ops_counts',
    COUNTED.map((t) => `CREATE TABLE ${t} (id int PRIMARY KEY); INSERT INTO ${t} SELECT generate_series(1, 50);`).join(
      '',
    ),
  );
});
after(() => server?.stop());

async function setup(vars: Record<string, string> = dbVars(server, 'DEV_DB_', 'ops_app')) {
  const configDir = await tempDir();
  await writeEnvFile(configDir, '.env', vars);
  const outputDir = path.join(configDir, 'out');
  return { configDir, outputDir, base: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir] };
}
const wrongPassword = (database = 'ops_app') => ({
  ...dbVars(server, 'DEV_DB_', database),
  DEV_DB_PASSWORD: 'Wr0ng-pa55word',
});

/**
 * A heartbeat receiver (healthchecks.io style) that records each request's method, path and body;
 * one whose path ends with `hold` is never answered.
 */
async function heartbeatReceiver({ hold }: { hold?: string } = {}) {
  const received: Array<{ method: string; path: string; body: string }> = [];
  const sockets = new Set<net.Socket>();
  const receiver = http.createServer((request, response) => {
    let body = '';
    request.on('data', (chunk) => (body += chunk));
    request.on('end', () => {
      received.push({ method: request.method!, path: request.url!, body });
      if (hold === undefined || !request.url!.endsWith(hold)) response.writeHead(200).end('OK');
    });
  });
  receiver.on('connection', (socket) => sockets.add(socket));
  await new Promise<void>((resolve) => receiver.listen(0, '127.0.0.1', resolve));
  const { port } = receiver.address() as net.AddressInfo;
  return {
    url: `http://127.0.0.1:${port}/ping/0d4c-secret-uuid`,
    received,
    close: () => {
      sockets.forEach((s) => s.destroy());
      return new Promise<void>((resolve) => receiver.close(() => resolve()));
    },
  };
}

describe('--ping-url (heartbeat)', () => {
  test('a successful backup pings URL/start, then URL, with a one-line outcome; the URL is never shown', async () => {
    const hb = await heartbeatReceiver();
    try {
      const s = await setup();
      const result = await runCli({ args: [...s.base, '--ping-url', hb.url] });
      assert.equal(result.exitCode, 0, result.stderr);
      assert.deepEqual(
        hb.received.map((r) => [r.method, r.path]),
        [
          ['POST', '/ping/0d4c-secret-uuid/start'],
          ['POST', '/ping/0d4c-secret-uuid'],
        ],
      );
      assert.match(
        hb.received[1]!.body,
        /^✓ backup_db: backup of ops_app \(dev\) succeeded on .+: ops_app_dev_.+\.dump/,
      );
      assert.ok(!`${result.stdout}${result.stderr}`.includes('0d4c-secret-uuid'));
    } finally {
      await hb.close();
    }
  });

  test('a failed backup pings URL/start, then URL/fail with why; BACKUP_PING_URL from .env works the same', async () => {
    const hb = await heartbeatReceiver();
    try {
      const s = await setup({ ...wrongPassword(), BACKUP_PING_URL: hb.url });
      const result = await runCli({ args: s.base });
      assert.equal(result.exitCode, 3, "the exit code is the backup's");
      assert.deepEqual(
        hb.received.map((r) => r.path),
        ['/ping/0d4c-secret-uuid/start', '/ping/0d4c-secret-uuid/fail'],
      );
      assert.match(hb.received[1]!.body, /FAILED .*\(exit 3\): Database authentication failed/);
      assert.ok(!hb.received.some((r) => r.body.includes('Wr0ng-pa55word')), 'no password in a ping');
    } finally {
      await hb.close();
    }
  });

  test('SIGTERM while the start ping waits for an answer: exit 143 at once, logged and pinged as failed, no backup', async () => {
    const hb = await heartbeatReceiver({ hold: '/start' });
    try {
      const s = await setup();
      const logFile = path.join(s.configDir, 'runs.log');
      const cli = startCli({ args: [...s.base, '--ping-url', hb.url, '--log-file', logFile] });
      await waitFor('the start ping', async () => (hb.received.length > 0 ? true : undefined));
      cli.kill('SIGTERM');
      const result = await cli;
      assert.equal(result.exitCode, 143, `${result.stdout}${result.stderr}`);
      assert.match(String(result.stderr).split('\n')[0]!, /^✗ Backup failed: Interrupted by SIGTERM$/);
      const logged = JSON.parse((await fs.readFile(logFile, 'utf8')).split('\n')[0]!);
      assert.deepEqual([logged.command, logged.outcome, logged.exit_code], ['backup', 'failure', 143]);
      assert.deepEqual(
        hb.received.map((r) => r.path),
        ['/ping/0d4c-secret-uuid/start', '/ping/0d4c-secret-uuid/fail'],
      );
      assert.equal(
        await fs
          .readdir(s.outputDir)
          .catch(() => [])
          .then((names) => names.length),
        0,
        'no backup',
      );
    } finally {
      await hb.close();
    }
  });

  test('an unreachable ping URL changes nothing but a single warning', async () => {
    const s = await setup();
    const url = `http://127.0.0.1:${await freePort()}/ping/0d4c-secret-uuid`;
    const result = await runCli({ args: [...s.base, '--ping-url', url] });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.equal(result.stderr.match(/Heartbeat ping failed/g)?.length, 1, result.stderr);
    assert.ok(!result.stderr.includes('0d4c-secret-uuid'));
    assert.equal(
      (await fs.readdir(s.outputDir)).filter((name) => name.endsWith('.dump')).length,
      1,
      'the backup was made',
    );
  });

  test('a ping host whose DNS never answers: warned, and the process ends with the run, not with the lookup', async () => {
    const s = await setup();
    // Aborting fetch does not cancel getaddrinfo: the lookup would hold a finished run for the resolver's timeout.
    const cli = startCli({
      args: [...s.base, '--ping-url', 'http://ping.hangs.test/p/x'],
      hangingDns: 'ping.hangs.test',
    });
    let ended = false;
    void cli.finally(() => (ended = true));
    try {
      // The start and the success ping give up after 5 s each.
      await within('the run to end', 30_000, async () => ended);
      const result = await cli;
      assert.equal(result.exitCode, 0, String(result.stderr));
      assert.match(String(result.stdout), /✓ Backup created successfully/);
      assert.equal(String(result.stderr).match(/Heartbeat ping failed: no answer within 5 s/g)?.length, 1);
    } finally {
      if (!ended) cli.kill('SIGKILL');
      await cli;
    }
  });

  test('a ping that fails from the start is in the log too, once', async () => {
    const s = await setup();
    const url = `http://127.0.0.1:${await freePort()}/ping/0d4c-secret-uuid`;
    const logFile = path.join(s.configDir, 'runs.log');
    const result = await runCli({ args: [...s.base, '--ping-url', url, '--log-file', logFile] });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.equal(result.stderr.match(/Heartbeat ping failed/g)?.length, 1, result.stderr);
    const events = (await fs.readFile(logFile, 'utf8'))
      .trim()
      .split('\n')
      .map((line) => JSON.parse(line));
    assert.deepEqual(
      events.filter((e) => e.event === 'ping_failed').map((e) => e.for),
      [events[0].time],
      'one ping_failed event, about this run',
    );
    assert.ok(!(await fs.readFile(logFile, 'utf8')).includes('0d4c-secret-uuid'));
  });

  // A URL with user:password@ is refused at start-up (secrets.test.ts); fetchFailure's unit test covers a quoted URL.
  test('a failed ping says why: the network error behind "fetch failed", never the URL or its token', async () => {
    const s = await setup();
    const port = await freePort();
    const refused = await runCli({ args: [...s.base, '--ping-url', `http://127.0.0.1:${port}/ping/0d4c-secret-uuid`] });
    assert.match(
      refused.stderr,
      new RegExp(`Heartbeat ping failed: fetch failed: connect ECONNREFUSED 127\\.0\\.0\\.1:${port}`),
    );
    assert.doesNotMatch(refused.stderr, /0d4c-secret-uuid/);
  });

  test('only backup runs ping: --list, --verify and --check with BACKUP_PING_URL set stay silent', async () => {
    const hb = await heartbeatReceiver();
    try {
      const s = await setup({ ...dbVars(server, 'DEV_DB_', 'ops_app'), BACKUP_PING_URL: hb.url });
      const backup = await takeBackup(server, 'ops_app', s.outputDir);
      for (const args of [['--list'], ['--verify', backup.dumpPath], ['--check', '--max-age', '1h']]) {
        const result = await runCli({ args: [...s.base, ...args] });
        assert.equal(result.exitCode, 0, `${args.join(' ')}: ${result.stderr}`);
      }
      assert.deepEqual(hb.received, []);
    } finally {
      await hb.close();
    }
  });

  test('a misused --verify, --check or --list fails as that command: logged so, and never pings /fail', async () => {
    const hb = await heartbeatReceiver();
    try {
      const s = await setup({ ...dbVars(server, 'DEV_DB_', 'ops_app'), BACKUP_PING_URL: hb.url });
      const logFile = path.join(s.configDir, 'runs.log');
      // A line that contradicts itself asked for no backup either: never recorded as one.
      const cases: Array<[string[], string, RegExp]> = [
        [['--verify', ''], 'verify', /^✗ Verification failed: /m],
        [['--max-age', '26h'], 'check', /^✗ Freshness check failed: /m],
        [['--list', '--check', '--max-age', '1h'], 'check', /^✗ Freshness check failed: /m],
        [['--list', '--verify', 'x.dump'], 'list', /^✗ Listing failed: /m],
        // Commander stops at the first bad value: the options after it still say what was asked for.
        [
          ['--max-age', '26x', '--check'],
          'check',
          /^✗ Freshness check failed: [^]*--max-age <duration>' argument '26x'/m,
        ],
        [
          ['--jobs', '0', '--restore-test', '--verify', 'x.dump'],
          'drill',
          /^✗ Restore test failed: [^]*'--jobs <n>' argument '0'/m,
        ],
      ];
      for (const [args, command, title] of cases) {
        const result = await runCli({ args: [...s.base, '--log-file', logFile, ...args] });
        assert.equal(result.exitCode, 2, `${args.join(' ')}: ${result.stderr}`);
        assert.match(result.stderr, title, args.join(' '));
        const lines = (await fs.readFile(logFile, 'utf8')).trim().split('\n');
        assert.equal(JSON.parse(lines.at(-1)!).command, command, args.join(' '));
      }
      assert.deepEqual(hb.received, [], 'no backup was asked for: no ping');
    } finally {
      await hb.close();
    }
  });

  test('a value that does not parse before --ping-url: pings URL/fail all the same, never showing it', async () => {
    const hb = await heartbeatReceiver();
    try {
      const s = await setup();
      const result = await runCli({ args: [...s.base, '--keep-daily', '7x', '--ping-url', hb.url] });
      assert.equal(result.exitCode, 2, result.stderr);
      assert.deepEqual(
        hb.received.map((r) => r.path),
        ['/ping/0d4c-secret-uuid/fail'],
      );
      assert.match(hb.received[0]!.body, /FAILED .*\(exit 2\): Configuration error/);
      assert.ok(!`${result.stdout}${result.stderr}`.includes('0d4c-secret-uuid'));
    } finally {
      await hb.close();
    }
  });

  test('a malformed ping URL is a configuration error that does not echo it', async () => {
    const s = await setup();
    const result = await runCli({ args: [...s.base, '--ping-url', 'hcio/0d4c-secret-uuid', '--json'] });
    assert.equal(result.exitCode, 2);
    assert.ok(!`${result.stdout}${result.stderr}`.includes('0d4c-secret-uuid'), `${result.stdout}${result.stderr}`);
  });

  test('pingUrlFor keeps the query string where it is', () => {
    assert.equal(pingUrlFor('https://hc-ping.com/abc', 'start'), 'https://hc-ping.com/abc/start');
    assert.equal(pingUrlFor('https://hc-ping.com/abc/', 'fail'), 'https://hc-ping.com/abc/fail');
    assert.equal(
      pingUrlFor('https://push.example/api/push/K?status=up', 'fail'),
      'https://push.example/api/push/K/fail?status=up',
    );
    assert.equal(pingUrlFor('https://hc-ping.com/abc', 'success'), 'https://hc-ping.com/abc');
  });
});

/** The samples of a metrics file, as a real Prometheus text-format parser reads them. */
async function readMetrics(file: string) {
  const text = await fs.readFile(file, 'utf8');
  // The exposition format, line by line: comments, or name{labels} value.
  for (const line of text.trimEnd().split('\n')) {
    assert.match(
      line,
      /^(# (HELP|TYPE) [a-z_]+ .+|[a-z_]+\{database="(?:[^"\\]|\\.)*",environment="(?:[^"\\]|\\.)*"\} -?[\d.e+]+)$/,
      line,
    );
  }
  const families = parsePrometheus(text);
  const samples: Record<string, Record<string, number>> = {};
  for (const family of families) {
    assert.equal(family.type, 'GAUGE', family.name);
    for (const metric of family.metrics) {
      const key = `${metric.labels!.database}/${metric.labels!.environment}`;
      (samples[key] ??= {})[family.name] = Number(metric.value);
    }
  }
  return samples;
}

/** A backup with `--metrics-file file`, `meanwhile` done while its pg_dump is held at its start. */
async function backupMeanwhile(base: string[], file: string, meanwhile: () => Promise<unknown>) {
  const clients = await clientDirHolding('pg_dump', '--snapshot');
  const cli = startCli({ args: [...base, '--pg-bin-dir', clients.dir, '--metrics-file', file] });
  await waitFor('pg_dump to start', async () =>
    (await fs.stat(clients.started).catch(() => null)) ? true : undefined,
  );
  await meanwhile();
  await fs.writeFile(clients.release, '');
  return cli;
}

describe('--metrics-file (node_exporter textfile collector)', () => {
  test("every backup run updates its own series and keeps the other databases' series", async () => {
    const dir = await tempDir();
    const metricsFile = path.join(dir, 'textfile', 'backup_db.prom');
    const a = await setup();
    const startedAt = Math.floor(Date.now() / 1000);
    assert.equal((await runCli({ args: [...a.base, '--metrics-file', metricsFile] })).exitCode, 0);
    const b = await setup({ ...wrongPassword('ops_other'), BACKUP_METRICS_FILE: metricsFile });
    assert.equal((await runCli({ args: b.base })).exitCode, 3);

    const first = await readMetrics(metricsFile);
    const app = first['ops_app/dev']!;
    const other = first['ops_other/dev']!;
    assert.equal(app.backup_db_last_exit_code, 0);
    assert.ok(app.backup_db_last_run_timestamp_seconds! >= startedAt);
    assert.equal(app.backup_db_last_success_timestamp_seconds, app.backup_db_last_run_timestamp_seconds);
    const dump = (await fs.readdir(a.outputDir)).find((name) => name.endsWith('.dump'))!;
    assert.equal(app.backup_db_last_size_bytes, (await fs.stat(path.join(a.outputDir, dump))).size);
    assert.ok(app.backup_db_last_duration_seconds! > 0);
    assert.equal(other.backup_db_last_exit_code, 3);
    assert.equal(other.backup_db_last_success_timestamp_seconds, undefined, 'it never succeeded');

    // A later failure of the first database keeps its last success and size.
    const aFails = await setup(wrongPassword());
    assert.equal((await runCli({ args: [...aFails.base, '--metrics-file', metricsFile] })).exitCode, 3);
    const second = await readMetrics(metricsFile);
    assert.equal(second['ops_app/dev']!.backup_db_last_exit_code, 3);
    assert.equal(
      second['ops_app/dev']!.backup_db_last_success_timestamp_seconds,
      app.backup_db_last_success_timestamp_seconds,
    );
    assert.equal(second['ops_app/dev']!.backup_db_last_size_bytes, app.backup_db_last_size_bytes);
    assert.deepEqual(second['ops_other/dev'], other);

    // Readable by node_exporter's user; no temp file the collector could pick up.
    assert.equal((await fs.stat(metricsFile)).mode & 0o777, 0o644);
    assert.deepEqual(await fs.readdir(path.dirname(metricsFile)), ['backup_db.prom']);
  });

  test('under a strict umask the metrics file is still 0644, made or replaced: node_exporter must read it', async () => {
    const metricsFile = path.join(await tempDir(), 'backup_db.prom');
    const s = await setup(wrongPassword());
    const strictUmask = ['sh', '-c', 'umask 077 && exec "$@"', 'sh'];
    for (const step of ['made', 'replaced']) {
      const result = await runCli({ args: [...s.base, '--metrics-file', metricsFile], wrapper: strictUmask });
      assert.equal(result.exitCode, 3, result.stderr);
      assert.equal((await fs.stat(metricsFile)).mode & 0o777, 0o644, step);
    }
  });

  test('a metrics file that is a symlink is written through, onto its target; a dangling one makes its target', async () => {
    const dir = await tempDir();
    const textfile = path.join(dir, 'textfile');
    await fs.mkdir(textfile);
    const [target, link] = [path.join(textfile, 'real.prom'), path.join(dir, 'link.prom')];
    await fs.writeFile(target, '');
    await fs.symlink(target, link);
    const s = await setup(wrongPassword());
    assert.equal((await runCli({ args: [...s.base, '--metrics-file', link] })).exitCode, 3);
    assert.equal((await fs.lstat(link)).isSymbolicLink(), true, 'the link stays a link');
    assert.equal((await readMetrics(target))['ops_app/dev']!.backup_db_last_exit_code, 3);
    assert.deepEqual(await fs.readdir(textfile), ['real.prom'], 'no lock or temp file left');

    // A relative link whose target does not exist yet, as open() would follow it for the log file.
    const dangling = path.join(dir, 'dangling.prom');
    await fs.symlink('textfile/new.prom', dangling);
    assert.equal((await runCli({ args: [...s.base, '--metrics-file', dangling] })).exitCode, 3);
    assert.equal((await fs.lstat(dangling)).isSymbolicLink(), true);
    assert.equal((await readMetrics(path.join(textfile, 'new.prom')))['ops_app/dev']!.backup_db_last_exit_code, 3);
  });

  test(
    'a FIFO or a directory as the metrics file is refused up front; one made during the run never hangs it',
    { timeout: 90_000 },
    async () => {
      const s = await setup();
      const dir = await tempDir();
      const fifo = path.join(dir, 'backup_db.prom');
      await execa('mkfifo', [fifo]);
      for (const file of [dir, fifo, `${path.join(dir, 'missing-dir')}/`]) {
        const result = await runCli({ args: [...s.base, '--metrics-file', file] });
        assert.equal(result.exitCode, 2, `${file}: ${result.stderr}`);
        assert.match(result.stderr, /not a regular file|ends in \//, file);
      }
      assert.deepEqual(await fs.readdir(dir), ['backup_db.prom'], 'nothing made of a path ending in /');

      const metricsFile = path.join(dir, 'during.prom');
      const result = await backupMeanwhile(s.base, metricsFile, () => execa('mkfifo', [metricsFile]));
      assert.equal(result.exitCode, 0, String(result.stderr));
      assert.match(String(result.stderr), /⚠ Could not write the metrics file .*: not a regular file/);
      assert.deepEqual((await fs.readdir(dir)).sort(), ['backup_db.prom', 'during.prom'], 'no lock or temp file left');
    },
  );

  test(
    "a metrics file holding lines it did not write (a mistyped path, another exporter's) is never overwritten",
    { timeout: 90_000 },
    async () => {
      const s = await setup();
      const dir = await tempDir();
      // A mistyped --metrics-file naming the .env file beside it, and a .prom file another exporter writes.
      const envLike = path.join(dir, '.env');
      const shared = path.join(dir, 'shared.prom');
      await fs.writeFile(envLike, 'DB_PASSWORD=Secret-env-pa55\n');
      const ours = await runCli({ args: [...(await setup(wrongPassword())).base, '--metrics-file', shared] });
      assert.equal(ours.exitCode, 3, ours.stderr);
      await fs.appendFile(shared, 'node_other_exporter_up 1\n');
      const lines = (await fs.readFile(shared, 'utf8')).trimEnd().split('\n').length;
      for (const [file, line] of [
        [envLike, 1],
        [shared, lines],
      ] as const) {
        const before = await fs.readFile(file, 'utf8');
        const result = await runCli({ args: [...s.base, '--metrics-file', file] });
        assert.equal(result.exitCode, 2, `${file}: ${result.stderr}`);
        assert.match(result.stderr, new RegExp(`holds lines this tool did not write \\(line ${line}\\)`), file);
        assert.doesNotMatch(result.stderr, /Secret-env-pa55|node_other/, 'the line itself is never shown');
        assert.equal(await fs.readFile(file, 'utf8'), before, `${file} is left as it was`);
      }
      assert.deepEqual(await fs.readdir(dir), ['.env', 'shared.prom'], 'no lock or temp file left');
      assert.deepEqual(await fs.readdir(s.outputDir).catch(() => []), [], 'refused before any backup');

      // Another program takes the file over while the run dumps: the run succeeds, the file stays theirs.
      const during = path.join(dir, 'during.prom');
      const result = await backupMeanwhile(s.base, during, () => fs.writeFile(during, 'theirs 1\n'));
      assert.equal(result.exitCode, 0, String(result.stderr));
      assert.match(
        String(result.stderr),
        /⚠ Could not write the metrics file .*: it holds lines this tool did not write \(line 1\)/,
      );
      assert.equal(await fs.readFile(during, 'utf8'), 'theirs 1\n');
    },
  );

  test('render and parse are inverse for any database name, and a real parser reads the labels back', () => {
    const name = fc
      .string({
        unit: fc.oneof(
          fc.constantFrom('"', '\\', '\n', '{', '}', ',', '=', ' '),
          fc.string({ unit: 'grapheme', minLength: 1, maxLength: 1 }),
        ),
        maxLength: 12,
      })
      .filter((s) => s.length > 0);
    const value = fc.integer({ min: 0, max: 2 ** 40 });
    const series = fc.uniqueArray(
      fc.record(
        {
          database: name,
          environment: fc.constantFrom('dev', 'prod'),
          values: fc.record(
            { backup_db_last_exit_code: value, backup_db_last_size_bytes: value },
            { noNullPrototype: true },
          ),
        },
        { noNullPrototype: true },
      ),
      { selector: (s) => `${s.database}\0${s.environment}`, maxLength: 5 },
    );
    fc.assert(
      fc.property(series, (list: MetricSeries[]) => {
        const text = renderMetrics(list);
        const sort = (l: MetricSeries[]) =>
          [...l].sort((x, y) => (`${x.database}\0${x.environment}` < `${y.database}\0${y.environment}` ? -1 : 1));
        assert.deepEqual(sort(parseMetrics(text)), sort(list));
        assert.equal(foreignMetrics(text), undefined, 'its own file is never refused');
        const lines = text.split('\n');
        const at = lines.length - 1;
        const withForeign = [
          ...lines.slice(0, at),
          'backup_db_not_ours{database="x",environment="dev"} 1',
          ...lines.slice(at),
        ];
        assert.equal(foreignMetrics(withForeign.join('\n')), `holds lines this tool did not write (line ${at + 1})`);
        const parsed = parsePrometheus(text).flatMap((family) => family.metrics.map((m) => m.labels!.database));
        assert.deepEqual(new Set(parsed), new Set(list.map((s) => s.database)));
      }),
      { numRuns: 300 },
    );
  });

  test('a line of one of its own series is foreign unless it is as this tool writes it: a gauge, a number', () => {
    const series = 'backup_db_last_exit_code{database="a",environment="dev"}';
    for (const line of [`${series} DROP_TABLE`, `${series} +Inf`, `${series} 0x10`, `${series} 1 1700000000`])
      assert.match(foreignMetrics(`${line}\n`) ?? '', /line 1/, line);
    assert.match(foreignMetrics('# TYPE backup_db_last_exit_code counter\n') ?? '', /line 1/);
    for (const value of ['0', '-1', '1.5', '1e+21', '123456789'])
      assert.equal(foreignMetrics(`${series} ${value}\n`), undefined, value);
    // An older version's help text is still its own.
    assert.equal(foreignMetrics('# HELP backup_db_last_exit_code Exit code of the last run.\n'), undefined);
  });

  test('a backup made, whose retention then failed, is a success for freshness; its exit code still says it failed', () => {
    const before: MetricSeries[] = [
      { database: 'a', environment: 'dev', values: { backup_db_last_success_timestamp_seconds: 1 } },
    ];
    const run = { database: 'a', environment: 'dev', endedAt: new Date(60_000), durationMs: 1000 };
    const madeButPruneFailed = recordRunInMetrics(before, { ...run, exitCode: 8, sizeBytes: 10 })[0]!.values;
    assert.equal(madeButPruneFailed.backup_db_last_exit_code, 8);
    assert.equal(madeButPruneFailed.backup_db_last_success_timestamp_seconds, 60);
    assert.equal(madeButPruneFailed.backup_db_last_size_bytes, 10);
    const notMade = recordRunInMetrics(before, { ...run, exitCode: 7 })[0]!.values;
    assert.equal(notMade.backup_db_last_success_timestamp_seconds, 1);
  });

  test("a run of one database never changes another's series", () => {
    const before: MetricSeries[] = [{ database: 'b', environment: 'dev', values: { backup_db_last_exit_code: 7 } }];
    const after = recordRunInMetrics(before, {
      database: 'a',
      environment: 'dev',
      endedAt: new Date(0),
      exitCode: 0,
      durationMs: 1500,
      sizeBytes: 10,
    });
    assert.deepEqual(
      after.find((s) => s.database === 'b'),
      before[0],
    );
    assert.deepEqual(after.find((s) => s.database === 'a')!.values, {
      backup_db_last_run_timestamp_seconds: 0,
      backup_db_last_exit_code: 0,
      backup_db_last_duration_seconds: 1.5,
      backup_db_last_success_timestamp_seconds: 0,
      backup_db_last_size_bytes: 10,
    });
  });
});

/** Move a real backup's files (names and metadata) `days` into the past, as if it had been taken then. */
async function moveIntoPast(backup: TakenBackup, days: number): Promise<string> {
  const iso = new Date(Date.parse(String(backup.metadata.backup_timestamp)) - days * 86_400_000)
    .toISOString()
    .replace(/\.\d{3}Z$/, 'Z');
  const name = `${backup.metadata.database_name}_${backup.metadata.environment}_${iso.replaceAll(':', '-')}.dump`;
  await fs.rename(backup.dumpPath, path.join(backup.outputDir, name));
  await fs.rm(backup.metadataPath);
  const metadata = { ...backup.metadata, backup_file: name, backup_timestamp: iso };
  await fs.writeFile(
    path.join(backup.outputDir, name.replace(/\.dump$/, '.metadata.json')),
    JSON.stringify(metadata, null, 2),
  );
  return name;
}

describe('--check --max-age (freshness, for monitoring)', () => {
  let fresh: Awaited<ReturnType<typeof setup>>;
  let backup: TakenBackup;
  before(async () => {
    fresh = await setup();
    backup = await takeBackup(server, 'ops_app', fresh.outputDir);
  });

  test('a fresh backup: exit 0, and --json says which, how old, and the limit', async () => {
    const text = await runCli({ args: [...fresh.base, '--check', '--max-age', '1h'] });
    assert.equal(text.exitCode, 0, text.stderr);
    assert.match(text.stdout, /Backups are fresh: the newest of ops_app \(dev\) is \d+ s old \(limit 1 h\)/);
    const json = await runCli({ args: [...fresh.base, '--check', '--max-age', '1h', '--json'] });
    const doc = JSON.parse(json.stdout);
    assert.equal(doc.ok, true);
    assert.equal(doc.command, 'check');
    assert.equal(doc.newest.file, path.basename(backup.dumpPath));
    assert.equal(doc.newest.timestamp, backup.metadata.backup_timestamp);
    assert.ok(doc.newest.age_seconds >= 0 && doc.newest.age_seconds < 3600);
    assert.equal(doc.max_age_seconds, 3600);
    assert.equal(doc.backups, 1);
  });

  test('a stale backup: exit 8 with its age, its file and how many backups exist; BACKUP_MAX_AGE works too', async () => {
    const s = await setup();
    const moved = await moveIntoPast(await takeBackup(server, 'ops_app', s.outputDir), 2);
    const result = await runCli({ args: [...s.base, '--check', '--max-age', '26h'] });
    assert.equal(result.exitCode, 8, result.stdout);
    assert.match(result.stderr, /The newest backup is too old/);
    assert.match(
      result.stderr,
      new RegExp(`is 2 d old, more than 1 d 2 h: ${moved.replaceAll('.', '\\.')} .*1 backup in all`),
    );
    await writeEnvFile(s.configDir, '.env', { ...dbVars(server, 'DEV_DB_', 'ops_app'), BACKUP_MAX_AGE: '3d' });
    const json = await runCli({ args: [...s.base, '--check', '--json'] });
    assert.equal(json.exitCode, 0, json.stderr);
    const doc = JSON.parse(json.stdout);
    assert.equal(doc.max_age_seconds, 3 * 86_400);
    assert.ok(doc.newest.age_seconds >= 2 * 86_400);
  });

  test('an empty or missing directory: exit 8, no backup', async () => {
    const s = await setup();
    const missing = await runCli({ args: [...s.base, '--check', '--max-age', '1d', '--json'] });
    assert.equal(missing.exitCode, 8);
    const doc = JSON.parse(missing.stdout);
    assert.deepEqual([doc.ok, doc.error, doc.newest, doc.backups], [false, 'No backup found', null, 0]);
    await fs.mkdir(s.outputDir);
    assert.equal((await runCli({ args: [...s.base, '--check', '--max-age', '1d'] })).exitCode, 8);
  });

  test('damaged backups: a truncated one does not count; a bit-flipped one passes the quick check but not --check --verify', async () => {
    const s = await setup();
    const truncated = await takeBackup(server, 'ops_app', s.outputDir);
    await fs.truncate(truncated.dumpPath, 100);
    const result = await runCli({ args: [...s.base, '--check', '--max-age', '1d'] });
    assert.equal(result.exitCode, 8);
    assert.match(result.stderr, /No backup found/);
    assert.match(
      result.stderr,
      /no backup of ops_app \(dev\) in .* passes the quick check; 1 file there does not count \(ops_app_dev_.*\.dump: .*Size mismatch\)/,
    );

    const flipped = await setup();
    const backup2 = await takeBackup(server, 'ops_app', flipped.outputDir);
    await flipMiddleByte(backup2.dumpPath);
    assert.equal(
      (await runCli({ args: [...flipped.base, '--check', '--max-age', '1d'] })).exitCode,
      0,
      'size and metadata still match',
    );
    const full = await runCli({ args: [...flipped.base, '--check', '--max-age', '1d', '--verify'] });
    assert.equal(full.exitCode, 8);
    assert.match(full.stderr, /checksum/i);
    // Still a check's document, for the monitor that reads it: the freshness fields beside the re-read's.
    const json = await runCli({ args: [...flipped.base, '--check', '--max-age', '1d', '--verify', '--json'] });
    assert.equal(json.exitCode, 8);
    const document = JSON.parse(json.stdout);
    assert.deepEqual(
      [document.ok, document.command, document.newest?.file, document.max_age_seconds, document.backups],
      [false, 'check', path.basename(backup2.dumpPath), 86_400, 1],
    );
    assert.deepEqual(document.not_counted, []);
    assert.equal(document.checks?.checksum?.ok, false, 'and the check that failed');
  });

  test('a backup dated in the future never looks fresh', async () => {
    const s = await setup();
    const backup2 = await takeBackup(server, 'ops_app', s.outputDir);
    await moveIntoPast(backup2, -30);
    const result = await runCli({ args: [...s.base, '--check', '--max-age', '1d'] });
    assert.equal(result.exitCode, 8);
    assert.match(
      result.stderr,
      /1 file there does not count \(ops_app_dev_.*\.dump: dated .*, after this machine's time\)/,
    );
  });

  test('a backup just over the limit: its age and the limit never read alike', async () => {
    const s = await setup();
    // 26 h 40 min old against 26 h: both used to read "1 d 2 h".
    const moved = await moveIntoPast(await takeBackup(server, 'ops_app', s.outputDir), (26 * 60 + 40) / 1440);
    const result = await runCli({ args: [...s.base, '--check', '--max-age', '26h'] });
    assert.equal(result.exitCode, 8, result.stdout);
    assert.match(
      result.stderr,
      new RegExp(`is 1 d 2 h 40 min( \\d+ s)? old, more than 1 d 2 h: ${moved.replaceAll('.', '\\.')}`),
    );
  });

  test('ages are whole seconds: within the second after the limit it is fresh; one second over reads over', async () => {
    const s = await setup();
    const backup = await takeBackup(server, 'ops_app', s.outputDir);
    const limit = Date.parse(String(backup.metadata.backup_timestamp)) + 86_400_000;
    const checkAt = (ms: number) =>
      runCli({
        args: [...s.base, '--check', '--max-age', '1d'],
        wallClock: { when: s.configDir, at: new Date(ms), rate: 0 },
      });
    const atLimit = await checkAt(limit + 999);
    assert.equal(atLimit.exitCode, 0, atLimit.stderr);
    assert.match(atLimit.stdout, /is 1 d old \(limit 1 d\)/);
    const over = await checkAt(limit + 1000);
    assert.equal(over.exitCode, 8, over.stdout);
    assert.match(over.stderr, /is 1 d 1 s old, more than 1 d:/);
  });

  test('--max-age 0 or a negative one is refused with a message true of both', async () => {
    const refusals = [];
    for (const value of ['0', '-1']) {
      const result = await runCli({ args: [...fresh.base, '--check', '--max-age', value] });
      assert.equal(result.exitCode, 2, result.stderr);
      refusals.push(result.stderr.replace(`'${value}'`, 'VALUE'));
    }
    assert.equal(refusals[0], refusals[1]);
    assert.match(refusals[0]!, /Use a duration of at least 1s, such as 26h or 8d, up to 400 d\./);
    assert.doesNotMatch(refusals[0]!, /0: no limit/);
  });

  test('--check needs --max-age; --check with a FILE or another command is refused', async () => {
    for (const args of [
      ['--check'],
      ['--check', '--max-age', '0'],
      ['--check', '--max-age', '1d', '--list'],
      ['--check', '--max-age', '1d', '--verify', 'x.dump'],
    ]) {
      const result = await runCli({ args: [...fresh.base, ...args] });
      assert.equal(result.exitCode, 2, `${args.join(' ')}: ${result.stderr}`);
    }
  });

  test('--max-age without --check is refused (exit 2) and takes no backup; BACKUP_MAX_AGE alone is no such request', async () => {
    const s = await setup();
    // A monitoring command that lost its --check must not take a backup at every poll.
    const result = await runCli({ args: [...s.base, '--max-age', '26h'] });
    assert.equal(result.exitCode, 2, result.stderr);
    assert.match(result.stderr, /--max-age only applies to --check/);
    assert.deepEqual(await fs.readdir(s.outputDir).catch(() => []), [], 'no backup taken');
    for (const args of [['--list'], ['--prune', '--keep-last', '3'], ['--restore', 'x.dump', '--target-db', 'copy']]) {
      const other = await runCli({ args: [...s.base, '--max-age', '26h', ...args] });
      assert.equal(other.exitCode, 2, `${args.join(' ')}: ${other.stderr}`);
      assert.match(other.stderr, /--max-age only applies to --check/);
    }
    // The variable may sit in a .env that every command reads.
    const withVariable = await setup({ ...dbVars(server, 'DEV_DB_', 'ops_app'), BACKUP_MAX_AGE: '26h' });
    const backup = await runCli({ args: withVariable.base });
    assert.equal(backup.exitCode, 0, backup.stderr);
  });

  test('a variable read by one command only is parsed, and can fail, only in that command', async () => {
    const misread = {
      BACKUP_MAX_AGE: '1d12h',
      BACKUP_MAINTENANCE_WORK_MEM: 'lots',
      BACKUP_STALL_TIMEOUT: 'soon',
      BACKUP_KEEP_DAILY: 'seven',
    };
    const s = await setup({ ...dbVars(server, 'DEV_DB_', 'ops_app'), ...misread });
    const cases: Array<[string[], number, RegExp | undefined]> = [
      [['--check', '--max-age', '1h'], 8, undefined],
      [['--check'], 2, /BACKUP_MAX_AGE \(from \.env\) is "1d12h"/],
      [['--list'], 0, undefined],
      [['--restore', 'x.dump', '--target-db', 'copy'], 2, /BACKUP_MAINTENANCE_WORK_MEM \(from \.env\) is "lots"/],
      [['--prune', '--keep-last', '3'], 2, /BACKUP_KEEP_DAILY \(from \.env\) is "seven"/],
      [[], 2, /BACKUP_(STALL_TIMEOUT|KEEP_DAILY) \(from \.env\)/],
    ];
    for (const [args, exitCode, message] of cases) {
      const result = await runCli({ args: [...s.base, ...args] });
      assert.equal(result.exitCode, exitCode, `${args.join(' ')}: ${result.stderr}`);
      if (message) assert.match(result.stderr, message, args.join(' '));
      else assert.doesNotMatch(result.stderr, /BACKUP_/, args.join(' '));
    }
    // BACKUP_MAX_AGE=0 (refused by --check) and the restores' memory take no backup run down.
    const backupOnly = await setup({ ...dbVars(server, 'DEV_DB_', 'ops_app'), ...misread, BACKUP_MAX_AGE: '0' });
    await fs.writeFile(
      path.join(backupOnly.configDir, '.env.local'),
      'BACKUP_STALL_TIMEOUT=15min\nBACKUP_KEEP_DAILY=7\n',
    );
    const backup = await runCli({ args: backupOnly.base });
    assert.equal(backup.exitCode, 0, backup.stderr);
  });

  /** A backup as --list finds it: verified, of `database` and `environment`, dated `timestamp`. */
  const entry = (file: string, database: string, environment: string, timestamp: string): ListEntry => ({
    file,
    status: 'verified',
    database,
    environment,
    timestamp,
    sizeBytes: 1,
    modifiedMs: 0,
    problems: [],
  });

  test('judgeFreshness ignores other databases and environments', () => {
    const now = new Date('2026-01-10T00:00:00Z');
    const entries = [
      entry('x_dev_a.dump', 'x', 'dev', '2026-01-01T00:00:00Z'),
      entry('y_dev_b.dump', 'y', 'dev', '2026-01-09T23:00:00Z'),
      entry('x_prod_c.dump', 'x', 'prod', '2026-01-09T23:00:00Z'),
    ];
    const result = judgeFreshness(entries, { database: 'x', environment: 'dev', now }, 86_400_000);
    assert.equal(result.ok, false);
    assert.equal(result.newest?.file, 'x_dev_a.dump');
    assert.equal(result.backups, 1);
  });

  test('judgeFreshness ages in whole seconds: an age is never over the limit while it reads as the limit', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 3 * 86_400 }), fc.integer({ min: 0, max: 3 * 86_400_000 }), (s, ms) => {
        const time = '2026-01-01T00:00:00Z';
        const now = new Date(Date.parse(time) + ms);
        const backups = [entry('x_dev_a.dump', 'x', 'dev', time)];
        const result = judgeFreshness(backups, { database: 'x', environment: 'dev', now }, s * 1000);
        assert.equal(result.ageMs, Math.floor(ms / 1000) * 1000);
        assert.equal(result.ok, Math.floor(ms / 1000) <= s);
        if (!result.ok) assert.notEqual(formatAge(result.ageMs!, true), formatAge(s * 1000, true));
      }),
    );
  });
});

describe('--stall-timeout (watchdog)', () => {
  test('a dump stalled behind a lock is stopped within the timeout, naming the blocking session; nothing is left', async () => {
    const s = await setup();
    const lock = await holdTableLock(() => server.connect('ops_app'), 't');
    try {
      const started = Date.now();
      const result = await runCli({ args: [...s.base, '--lock-wait-timeout', '0', '--stall-timeout', '2s'] });
      const elapsed = Date.now() - started;
      assert.equal(result.exitCode, 7, result.stderr);
      assert.match(result.stderr, /The backup stalled/);
      assert.match(result.stderr, /no byte was written for 2 s/);
      assert.match(
        result.stderr,
        /pg_dump's session \(pid \d+\) waits on Lock \(relation\) in "LOCK TABLE public\.t IN ACCESS SHARE MODE"/,
      );
      assert.doesNotMatch(result.stderr, /pg_stat_activity b WHERE/, "not the watchdog's own query");
      assert.match(result.stderr, new RegExp(`blocked by pid ${lock.holderPid} .*LOCK TABLE`));
      assert.match(result.stderr, new RegExp(`pg_terminate_backend\\(${lock.holderPid}\\)`));
      // Without the watchdog this run would wait for ever (--lock-wait-timeout 0): it ended.
      assert.ok(elapsed < 60_000, `ended after ${elapsed} ms`);
      // Its sessions, queued for the lock, were cancelled rather than left holding their place.
      await waitForNoBackupSessions(lock.observer);
      const left = await fs.readdir(s.outputDir).catch(() => [] as string[]);
      assert.deepEqual(
        left.filter((name) => !name.startsWith('.')),
        [],
        'no partial or lock file',
      );
    } finally {
      await lock.release();
    }
  });

  test(
    'a stalled backup stops only its own sessions, not those of another run with its pid (another pid namespace)',
    { timeout: 60_000 },
    async () => {
      const s = await setup();
      const lock = await holdTableLock(() => server.connect('ops_app'), 't');
      // The CLI waits at a gate, its pid known, until the other run's sessions (named as it would name them) are busy.
      const go = path.join(s.configDir, 'go');
      const gate = ['sh', '-c', 'while [ ! -e "$1" ]; do sleep 0.05; done; shift; exec "$@"', 'sh', go];
      const cli = startCli({ args: [...s.base, '--lock-wait-timeout', '0', '--stall-timeout', '2s'], wrapper: gate });
      const names = [`backup_db:${cli.pid}`, `backup_db:${cli.pid}:pg_dump`, `backup_db:${cli.pid}:feedc0de:pg_dump`];
      const others = await Promise.all(names.map(() => server.connect('ops_other')));
      const busy = async (pids: number[]) => {
        const { rows } = await lock.observer.query(
          "SELECT 1 FROM pg_stat_activity WHERE pid = ANY ($1) AND state = 'active' AND query = 'SELECT pg_sleep(60)'",
          [pids],
        );
        return rows.length === pids.length ? true : undefined;
      };
      let sleeping: Array<Promise<unknown>> = [];
      const pids = await Promise.all(
        others.map(async (other, i) => {
          await other.query(`SET application_name = '${names[i]}'`);
          return backendPid(other);
        }),
      );
      try {
        sleeping = others.map((other) => other.query('SELECT pg_sleep(60)').catch(() => undefined));
        await waitFor('the other run to be busy', () => busy(pids));
        await fs.writeFile(go, '');
        const result = await cli;
        assert.equal(result.exitCode, 7, String(result.stderr));
        assert.match(String(result.stderr), /^✗ Backup failed: The backup stalled$/m);
        assert.match(String(result.stderr), /pg_dump's session \(pid \d+\) waits on Lock \(relation\)/);
        for (const pid of pids) assert.doesNotMatch(String(result.stderr), new RegExp(`pid ${pid}\\b`));
        assert.equal(await busy(pids), true, "the other run's queries were not cancelled");
      } finally {
        await fs.writeFile(go, '');
        await lock.observer.query('SELECT pg_cancel_backend(pid) FROM unnest($1::int[]) AS pid', [pids]);
        await Promise.all(sleeping);
        await Promise.all(others.map((other) => other.end()));
        await cli;
        await lock.release();
      }
    },
  );

  test(
    'it measures real time: a wall clock running fast stops no dump early, one standing still keeps none waiting',
    { timeout: 120_000 },
    async (t) => {
      const lock = await holdTableLock(() => server.connect('ops_app'), 't');
      try {
        // An hour a second (or a clock that stands still) from the moment pg_dump starts, as repeated NTP steps would.
        for (const { rate, stallMs } of [
          { rate: 3600, stallMs: 20_000 },
          { rate: 0, stallMs: 2_000 },
        ]) {
          const clients = await clientDirHolding('pg_dump', '--snapshot');
          await fs.writeFile(clients.release, '');
          const s = await setup();
          const args = [...s.base, '--pg-bin-dir', clients.dir, '--lock-wait-timeout', '0'];
          const started = performance.now();
          const cli = startCli({
            args: [...args, '--stall-timeout', `${stallMs}ms`],
            wallClock: { when: clients.started, rate },
          });
          let ended = false;
          void cli.finally(() => (ended = true));
          try {
            await within(`the stalled backup to be stopped (wall clock at ${rate}x)`, 60_000, async () => ended);
          } finally {
            if (!ended) cli.kill('SIGKILL');
          }
          const elapsed = performance.now() - started;
          const result = await cli;
          t.diagnostic(
            `wall clock at ${rate}x: stopped after ${Math.round(elapsed)} ms (--stall-timeout ${stallMs}ms)`,
          );
          assert.equal(result.exitCode, 7, String(result.stderr));
          assert.match(String(result.stderr), /^✗ Backup failed: The backup stalled$/m);
          assert.ok(elapsed >= stallMs, `stopped after ${Math.round(elapsed)} ms, before --stall-timeout`);
          await waitForNoBackupSessions(lock.observer);
        }
      } finally {
        await lock.release();
      }
    },
  );

  test(
    'row counts that outlast pg_dump, one table after another, are progress; a count that never ends is a stall',
    { timeout: 120_000 },
    async () => {
      const stallMs = 3000;
      // The counts' COPYs ("COPY public.c1 (id) TO STDOUT"; pg_dump writes "TO stdout") are held at a proxy until released.
      const backupWithCountsHeld = async (release: (proxy: GatingProxy) => Promise<void>) => {
        const proxy = await startGatingProxy(server, ') TO STDOUT');
        const s = await setup({
          ...dbVars(server, 'DEV_DB_', 'ops_counts'),
          DEV_DB_HOST: proxy.host,
          DEV_DB_PORT: String(proxy.port),
        });
        const observer = await server.connect('ops_counts');
        const cli = startCli({ args: [...s.base, '--stall-timeout', `${stallMs}ms`] });
        try {
          await waitFor('pg_dump to have written the archive and ended, the first count held', async () => {
            const partial = (await fs.readdir(s.outputDir).catch(() => [])).find((n) => n.endsWith('.dump.partial'));
            const size = partial ? (await fs.stat(path.join(s.outputDir, partial))).size : 0;
            const { rows } = await observer.query(
              "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'backup_db:%:pg_dump'",
            );
            return size > 0 && rows.length === 0 && proxy.held === 1 ? true : undefined;
          });
          await release(proxy);
          return { result: await cli, outputDir: s.outputDir };
        } finally {
          while (proxy.held > 0) proxy.release();
          await cli.catch(() => undefined);
          await observer.end();
          await proxy.close();
        }
      };

      // The counts end one table at a time, each within the timeout but all of them well past it.
      const healthy = await backupWithCountsHeld(async (proxy) => {
        for (const [i] of COUNTED.entries()) {
          await delay(stallMs / 2);
          proxy.release();
          if (i < COUNTED.length - 1) await waitFor('the next count', async () => (proxy.held > 0 ? true : undefined));
        }
      });
      assert.equal(healthy.result.exitCode, 0, String(healthy.result.stderr));
      const [dump] = (await fs.readdir(healthy.outputDir)).filter((n) => n.endsWith('.dump'));
      const metadata = await fs.readFile(path.join(healthy.outputDir, `${dump!.slice(0, -5)}.metadata.json`), 'utf8');
      assert.deepEqual(JSON.parse(metadata).table_counts, Object.fromEntries(COUNTED.map((t) => [t, 50])));
      await assertRestoresIdentically(server, path.join(healthy.outputDir, dump!), 'ops_counts');

      // The first count never ends: the watchdog still stops the run.
      const stalled = await backupWithCountsHeld(async () => undefined);
      assert.equal(stalled.result.exitCode, 7, String(stalled.result.stderr));
      assert.match(String(stalled.result.stderr), /^✗ Backup failed: The backup stalled$/m);
      assert.match(String(stalled.result.stderr), /the backup's own session \(pid \d+\)/);
      assert.deepEqual(await fs.readdir(stalled.outputDir).catch(() => []), []);
    },
  );

  test('a bad --stall-timeout or BACKUP_STALL_TIMEOUT is a configuration error', async () => {
    const s = await setup({ ...dbVars(server, 'DEV_DB_', 'ops_app'), BACKUP_STALL_TIMEOUT: 'soon' });
    const fromEnv = await runCli({ args: s.base });
    assert.equal(fromEnv.exitCode, 2);
    assert.match(fromEnv.stderr, /BACKUP_STALL_TIMEOUT/);
    assert.equal((await runCli({ args: [...s.base, '--stall-timeout', '-1s'] })).exitCode, 2);
  });
});
