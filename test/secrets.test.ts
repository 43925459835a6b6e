/**
 * The password never appears on a command line (visible to every user through ps), in output or
 * in any file. pg_dump is caught while it runs: the test holds an exclusive lock on a table, so
 * pg_dump waits on it (observed in pg_stat_activity, not guessed with a sleep) while /proc is read.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { dbVars, runCli, startCli, tempDir, writeEnvFile } from './helpers/cli.ts';
import { envLine, runMain } from './helpers/in-process.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { pgDumpsOf } from './helpers/processes.ts';
import { shellWord } from '../backup_db.ts';
import { holdTableLock, waitForBlockedPgDump } from './helpers/wait.ts';
import { skipUnless, unmet } from './helpers/requirements.ts';

let server: TestServer;
before(async () => {
  server = await startTestServer();
  await server.createDatabase(
    'secret_app',
    "CREATE TABLE notes (id int, body text); INSERT INTO notes SELECT i, 'note ' || i FROM generate_series(1, 100) i",
  );
});
after(() => server?.stop());

interface ProcessInfo {
  pid: number;
  argv: string[];
  environ: string[];
}

async function processes(): Promise<ProcessInfo[]> {
  const found: ProcessInfo[] = [];
  for (const entry of await fs.readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const [cmdline, environ] = await Promise.all([
        fs.readFile(`/proc/${entry}/cmdline`),
        fs.readFile(`/proc/${entry}/environ`),
      ]);
      found.push({ pid: Number(entry), argv: cmdline.toString().split('\0'), environ: environ.toString().split('\0') });
    } catch {
      // The process ended while we looked, or is not ours to read.
    }
  }
  return found;
}

test(
  'the password travels in the environment of pg_dump, never in any argv, output or file',
  { timeout: 60_000, ...skipUnless(await unmet('proc')) },
  async () => {
    const configDir = await tempDir();
    const outputDir = path.join(configDir, 'out');
    await writeEnvFile(configDir, '.env.local', {
      DEV_DB_HOST: server.host,
      DEV_DB_PORT: String(server.port),
      DEV_DB_NAME: 'secret_app',
      DEV_DB_USER: server.user,
      DEV_DB_PASSWORD: server.password,
    });

    const lock = await holdTableLock(() => server.connect('secret_app'), 'notes');
    const cli = startCli({ args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir] });
    try {
      await waitForBlockedPgDump(lock.observer);

      const [all, ours] = await Promise.all([processes(), pgDumpsOf(cli.pid!)]);
      // This CLI's own pg_dump, whatever else runs on the machine: its environment names the CLI's pid.
      const pgDump = all.filter((p) => path.basename(p.argv[0] ?? '') === 'pg_dump' && ours.includes(p.pid));
      assert.equal(pgDump.length, 1, "caught this backup's pg_dump running");
      assert.ok(
        pgDump[0]!.environ.includes(`PGPASSWORD=${server.password}`),
        "the password is in pg_dump's environment",
      );
      assert.ok(
        pgDump[0]!.argv.some((arg) => arg.startsWith('--snapshot=')),
        'it is our snapshot-sharing pg_dump',
      );
      const leaking = all.filter((p) => p.argv.some((arg) => arg.includes(server.password)));
      assert.deepEqual(
        leaking.map((p) => p.argv.join(' ')),
        [],
        'no process shows the password in its command line',
      );
    } finally {
      await lock.release();
    }

    const result = await cli;
    assert.equal(result.exitCode, 0, String(result.stderr));
    assert.ok(!String(result.stdout).includes(server.password) && !String(result.stderr).includes(server.password));
    const files = await fs.readdir(outputDir);
    assert.equal(files.length, 3, "a dump, its metadata and the lock's reserve");
    for (const file of files) {
      const bytes = await fs.readFile(path.join(outputDir, file));
      assert.equal(bytes.indexOf(server.password), -1, `${file} does not contain the password`);
    }
  },
);

test(
  'client tools get no secret of the environment: none at all when they do not connect, PGPASSWORD alone when they do',
  { timeout: 60_000, ...skipUnless(await unmet('proc')) },
  async () => {
    const dir = await tempDir();
    const calls = path.join(dir, 'calls');
    const other = `prod-${randomBytes(6).toString('hex')}`;
    const env = {
      DEV_DB_HOST: server.host,
      DEV_DB_PORT: String(server.port),
      DEV_DB_NAME: 'secret_app',
      DEV_DB_USER: server.user,
      DEV_DB_PASSWORD: server.password,
      // Production's, and libpq's own: a dev backup's tools need neither.
      DB_PASSWORD: other,
      DATABASE_URL: `postgresql://app:${other}@prod.invalid:5432/app`,
      PGPASSWORD: other,
      PG_BIN_DIR: await environmentRecordingShims(calls),
    };
    const secrets = [server.password, other];
    const variables = (environ: string[]) =>
      environ.filter(Boolean).map((entry) => entry.split(/=(.*)/s).slice(0, 2) as [string, string]);
    const secretIn = ([name, value]: [string, string]) =>
      /PASSWORD|DATABASE_URL/.test(name) || secrets.some((secret) => value.includes(secret));
    const lock = await holdTableLock(() => server.connect('secret_app'), 'notes');
    const cli = startCli({ args: ['--env', 'dev', '--config-dir', dir, '--output-dir', path.join(dir, 'out')], env });
    try {
      await waitForBlockedPgDump(lock.observer);
      const [all, ours] = await Promise.all([processes(), pgDumpsOf(cli.pid!)]);
      const pgDump = all.find((p) => ours.includes(p.pid));
      // The shell that stops pg_dump's process group if this run goes away.
      const watcher = all.find((p) => p.argv[p.argv.indexOf('backup_db-tether') + 1] === String(pgDump?.pid));
      assert.ok(watcher, "caught pg_dump's watcher");
      const leaked = variables(watcher.environ).filter(secretIn);
      assert.deepEqual(leaked, [], "the watcher's environment");
    } finally {
      await lock.release();
    }
    const result = await cli;
    assert.equal(result.exitCode, 0, String(result.stderr));
    const recorded = await Promise.all(
      (await fs.readdir(calls)).map(async (name) => {
        const [command, ...entries] = (await fs.readFile(path.join(calls, name), 'utf8')).split('\0').slice(0, -1);
        return { command: command!, env: variables(entries) };
      }),
    );
    const connecting = recorded.filter((call) => call.command.includes('--snapshot='));
    const others = recorded.filter((call) => !connecting.includes(call));
    assert.equal(connecting.length, 1, recorded.map((call) => call.command).join('\n'));
    for (const kind of [/pg_dump --version$/, /pg_restore --version$/, /pg_restore --list /])
      assert.ok(
        others.some((call) => kind.test(call.command)),
        `${kind} ran: ${others.map((c) => c.command).join(', ')}`,
      );
    for (const call of others) assert.deepEqual(call.env.filter(secretIn), [], call.command);
    assert.deepEqual(connecting[0]!.env.filter(secretIn), [['PGPASSWORD', server.password]], 'pg_dump');
  },
);

/**
 * One matrix: passwords made of the characters that break quoting and escaping, each placed in
 * every variable a user could paste it into, and every channel searched for it afterwards:
 * stdout and stderr (text and --json), the log file, the webhook body as a real HTTP server
 * received it, the failure command's whole environment, the metadata, and the command line of
 * every client tool started (through shims that record their argv and run the real tool).
 */
describe('no channel ever carries a password, whatever it holds and wherever it was pasted', () => {
  const id = randomBytes(3).toString('hex');
  const passwords = [
    `dq"uote-${id}`,
    `back\\slash-${id}`,
    `single'quote-${id}`,
    `co:lon-${id}`,
    `ha#sh-${id}`,
    `equ=als-${id}`,
    `sp ace s-${id}`,
    `unïcødé-密码-🔑-${id}`,
    `${'long-'.repeat(38)}${id}xx`,
  ];
  /** Where the password goes, besides DEV_DB_PASSWORD (where it belongs, and is right unless said). */
  const placements: Record<string, (role: string, password: string) => Record<string, string>> = {
    'DEV_DB_PASSWORD (a good backup)': () => ({}),
    'DEV_DB_PASSWORD, for another user (authentication fails)': () => ({ DEV_DB_USER: 'postgres' }),
    DEV_DB_NAME: (_role, password) => ({ DEV_DB_NAME: password }),
    DEV_DB_PORT: (_role, password) => ({ DEV_DB_PORT: password }),
    DEV_DB_HOST: (_role, password) => ({ DEV_DB_HOST: password }),
    DEV_DB_USER: (_role, password) => ({ DEV_DB_USER: password }),
    'DEV_DATABASE_URL (a good backup)': (role, password) => ({
      DEV_DATABASE_URL: `postgresql://${role}:${encodeURIComponent(password)}@127.0.0.1:${server.port}/secret_app`,
    }),
  };
  let receiver: Awaited<ReturnType<typeof webhookReceiver>>;
  before(async () => {
    const admin = await server.connect();
    try {
      for (const [i, password] of passwords.entries()) {
        const { rows } = await admin.query<{ sql: string }>(
          'SELECT format($$CREATE ROLE %I LOGIN SUPERUSER PASSWORD %L$$, $1::text, $2::text) AS sql',
          [`sec_${i}`, password],
        );
        await admin.query(rows[0]!.sql);
      }
    } finally {
      await admin.end();
    }
    receiver = await webhookReceiver();
  });
  after(() => receiver?.close());

  /** The forms a password can take in text: as is, JSON-escaped, percent-encoded, shell-quoted (in hints). */
  const formsOf = (password: string) => [
    ...new Set([password, JSON.stringify(password).slice(1, -1), encodeURIComponent(password), shellWord(password)]),
  ];

  test('9 passwords × 7 placements × text and --json, every channel searched', { timeout: 180_000 }, async () => {
    const runs = passwords.flatMap((password, i) =>
      Object.entries(placements).flatMap(([placement, place]) =>
        [false, true].map((json) => ({ password, role: `sec_${i}`, placement, place, json })),
      ),
    );
    const leaks: string[] = [];
    const check = (where: string, text: string, password: string) => {
      for (const form of formsOf(password))
        if (text.includes(form)) leaks.push(`${where}: holds ${JSON.stringify(form)}`);
    };
    let successes = 0;
    for (const { password, role, placement, place, json } of runs) {
      const label = `${JSON.stringify(password.slice(0, 12))} in ${placement}${json ? ' --json' : ''}`;
      const dir = await tempDir();
      const out = path.join(dir, 'out');
      const argvLog = path.join(dir, 'argv.log');
      const vars = {
        DEV_DB_HOST: '127.0.0.1',
        DEV_DB_PORT: String(server.port),
        DEV_DB_NAME: 'secret_app',
        DEV_DB_USER: role,
        DEV_DB_PASSWORD: password,
        PG_BIN_DIR: await recordingShims(argvLog),
        ...place(role, password),
      };
      await fs.writeFile(
        path.join(dir, '.env'),
        `${Object.entries(vars)
          .map(([name, value]) => envLine(name, value))
          .join('\n')}\n`,
      );
      const hookEnv = path.join(dir, 'hook.env');
      const before = receiver.bodies.length;
      const result = await runMain([
        '--env',
        'dev',
        '--config-dir',
        dir,
        '--output-dir',
        out,
        '--connect-timeout',
        '3',
        '--log-file',
        path.join(dir, 'runs.log'),
        '--notify-url',
        `${receiver.url}/${id}`,
        '--notify-on-success',
        '--on-failure',
        `env > '${hookEnv}'; cat '${argvLog}' >> '${hookEnv}' 2>/dev/null; true`,
        ...(json ? ['--json'] : []),
      ]);
      if (result.exitCode === 0) successes++;
      else
        assert.ok(
          await fs.stat(hookEnv).catch(() => undefined),
          `${label}: the failure command ran (exit ${result.exitCode}: ${result.stderr})`,
        );
      check(`${label} stdout`, result.stdout, password);
      check(`${label} stderr`, result.stderr, password);
      if (json) JSON.parse(result.stdout);
      for (const file of ['runs.log', 'hook.env', 'argv.log']) {
        const text = await fs.readFile(path.join(dir, file), 'utf8').catch(() => '');
        check(`${label} ${file}`, text, password);
      }
      for (const name of await fs.readdir(out).catch(() => [] as string[])) {
        if (name.endsWith('.metadata.json'))
          check(`${label} ${name}`, await fs.readFile(path.join(out, name), 'utf8'), password);
      }
      const bodies = receiver.bodies.slice(before);
      assert.ok(bodies.length > 0, `${label}: the webhook was called`);
      check(`${label} webhook`, bodies.join('\n'), password);
      await fs.rm(dir, { recursive: true, force: true });
    }
    assert.deepEqual(leaks, []);
    assert.equal(successes, passwords.length * 2 * 2, 'the good placements backed up (text and --json)');
  });

  test('a password with an unquoted # in .env: authentication fails, and the error says how to quote it', async () => {
    const dir = await tempDir();
    await fs.writeFile(
      path.join(dir, '.env.local'),
      `DEV_DB_HOST=127.0.0.1\nDEV_DB_PORT=${server.port}\nDEV_DB_NAME=secret_app\nDEV_DB_USER=sec_4\nDEV_DB_PASSWORD=${passwords[4]}\n`,
    );
    const cut = await runCli({ args: ['--env', 'dev', '--config-dir', dir, '--output-dir', path.join(dir, 'out')] });
    assert.equal(cut.exitCode, 3, cut.stderr);
    assert.match(
      cut.stderr,
      /^ {2}1\. DEV_DB_PASSWORD \(from \.env\.local\) holds a '#' or quotes that the \.env file does not read as part of the password \('#' starts a comment\): write it in single quotes, DEV_DB_PASSWORD='…'/m,
    );
    await fs.writeFile(
      path.join(dir, '.env.local'),
      `DEV_DB_HOST=127.0.0.1\nDEV_DB_PORT=${server.port}\nDEV_DB_NAME=secret_app\nDEV_DB_USER=sec_4\nDEV_DB_PASSWORD='${passwords[4]}'\n`,
    );
    const quoted = await runCli({ args: ['--env', 'dev', '--config-dir', dir, '--output-dir', path.join(dir, 'out')] });
    assert.equal(quoted.exitCode, 0, quoted.stderr);
  });

  test('a password with a backslash-n in double quotes in .env: authentication fails, and the error says how to quote it', async () => {
    const password = 'ab\\ncd';
    const admin = await server.connect();
    try {
      await admin.query(`CREATE ROLE sec_escape LOGIN SUPERUSER PASSWORD 'ab\\ncd'`);
    } finally {
      await admin.end();
    }
    const dir = await tempDir();
    const envFile = (value: string) =>
      `DEV_DB_HOST=127.0.0.1\nDEV_DB_PORT=${server.port}\nDEV_DB_NAME=secret_app\nDEV_DB_USER=sec_escape\nDEV_DB_PASSWORD=${value}\n`;
    await fs.writeFile(path.join(dir, '.env.local'), envFile(`"${password}"`));
    const expanded = await runCli({
      args: ['--env', 'dev', '--config-dir', dir, '--output-dir', path.join(dir, 'out')],
    });
    assert.equal(expanded.exitCode, 3, expanded.stderr);
    assert.match(expanded.stderr, /^ {2}1\. DEV_DB_PASSWORD \(from \.env\.local\) .*write it in single quotes/m);
    assert.match(expanded.stderr, /in double quotes, \\n and \\r are read as line breaks/);
    await fs.writeFile(path.join(dir, '.env.local'), envFile(`'${password}'`));
    const quoted = await runCli({ args: ['--env', 'dev', '--config-dir', dir, '--output-dir', path.join(dir, 'out')] });
    assert.equal(quoted.exitCode, 0, quoted.stderr);
  });

  test("a password pasted into a variable of the process environment is masked in the failure command's environment", async () => {
    const dir = await tempDir();
    const hookEnv = path.join(dir, 'hook.env');
    const password = passwords[0]!;
    const result = await runCli({
      args: [
        '--env',
        'dev',
        '--config-dir',
        dir,
        '--output-dir',
        path.join(dir, 'out'),
        '--on-failure',
        `env > '${hookEnv}'`,
      ],
      env: {
        DEV_DB_HOST: '127.0.0.1',
        DEV_DB_PORT: String(server.port),
        DEV_DB_USER: 'sec_0',
        DEV_DB_PASSWORD: password,
        DEV_DB_NAME: password,
      },
    });
    assert.equal(result.exitCode, 3, result.stderr);
    const env = await fs.readFile(hookEnv, 'utf8');
    assert.match(env, /^DEV_DB_NAME=\*\*\*\*$/m);
    assert.match(env, /^BACKUP_DATABASE=\*\*\*\*$/m);
    assert.doesNotMatch(env, /^DEV_DB_PASSWORD=/m);
    for (const form of formsOf(password)) assert.ok(!env.includes(form) && !result.stderr.includes(form), form);
  });

  test("a URL password with an unencoded '@' before a '/' is refused (exit 2), no part of it shown or looked up", async () => {
    const password = 'Qw3@rTy8Ui/oP9aSdF';
    const configDir = await tempDir();
    const url = `postgresql://${server.user}:${password}@${server.host}:${server.port}/secret_app`;
    await writeEnvFile(configDir, '.env', { DEV_DATABASE_URL: url });
    for (const json of [[], ['--json']]) {
      const result = await runCli({
        args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', path.join(configDir, 'out'), ...json],
      });
      assert.equal(result.exitCode, 2, result.stderr);
      assert.match(result.stdout + result.stderr, /DEV_DATABASE_URL \(from \.env\) cannot be split/);
      assert.match(result.stdout + result.stderr, /'@' → %40, '\/' → %2F/);
      for (const part of ['Qw3', 'rTy8Ui', 'oP9aSdF']) assert.ok(!(result.stdout + result.stderr).includes(part), part);
    }
  });

  test('a URL without its \'@\' (user:password read as host:port) is refused (exit 2), the "port" never shown', async () => {
    const configDir = await tempDir();
    const logFile = path.join(configDir, 'runs.log');
    await writeEnvFile(configDir, '.env', { DEV_DATABASE_URL: 'postgresql://app:Hunter2Secret/secret_app' });
    for (const json of [[], ['--json']]) {
      const result = await runCli({
        args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', path.join(configDir, 'out'), ...json],
        env: { BACKUP_LOG_FILE: logFile },
      });
      assert.equal(result.exitCode, 2, result.stderr);
      assert.match(result.stdout + result.stderr, /DEV_DATABASE_URL \(from \.env\)'s port is not a number/);
      assert.match(
        result.stdout + result.stderr,
        /Is an '@' missing\? A password goes after the user and a ':', then come an '@' and the host/,
      );
      assert.ok(!(result.stdout + result.stderr).includes('Hunter2'), result.stdout + result.stderr);
    }
    assert.ok(!(await fs.readFile(logFile, 'utf8')).includes('Hunter2'), 'the log never holds it');
  });

  test('a password with a NUL byte (which no child environment can carry) is refused (exit 2), naming the variable only', async () => {
    // trust: the tool's own session gets in whatever the password, and pg_dump is started with it.
    const admin = await server.connect();
    try {
      const hbaFile = (await admin.query<{ hba_file: string }>('SHOW hba_file')).rows[0]!.hba_file;
      const hba = await fs.readFile(hbaFile, 'utf8');
      if (!hba.startsWith('host all nul_trust'))
        await fs.writeFile(hbaFile, `host all nul_trust 127.0.0.1/32 trust\n${hba}`);
      await admin.query(
        'DROP ROLE IF EXISTS nul_trust; CREATE ROLE nul_trust LOGIN SUPERUSER; SELECT pg_reload_conf()',
      );
    } finally {
      await admin.end();
    }
    const dir = await tempDir();
    const connection = `DEV_DB_HOST=127.0.0.1\nDEV_DB_PORT=${server.port}\nDEV_DB_NAME=secret_app\nDEV_DB_USER=nul_trust\n`;
    const configs = {
      DEV_DATABASE_URL: `DEV_DATABASE_URL=postgresql://nul_trust:Hunter2xyz%00tailsecret@127.0.0.1:${server.port}/secret_app\n`,
      DEV_DB_PASSWORD: `${connection}DEV_DB_PASSWORD='Hunter2xyz\0tailsecret'\n`,
    };
    for (const [variable, text] of Object.entries(configs)) {
      await fs.writeFile(path.join(dir, '.env'), text);
      for (const json of [[], ['--json']]) {
        const result = await runCli({
          args: ['--env', 'dev', '--config-dir', dir, '--output-dir', path.join(dir, 'out'), ...json],
        });
        const output = result.stdout + result.stderr;
        assert.equal(result.exitCode, 2, output);
        assert.match(output, new RegExp(`${variable} \\(from \\.env\\) .*NUL`));
        for (const part of ['Hunter2xyz', 'tailsecret']) assert.ok(!output.includes(part), `${variable}: ${output}`);
      }
    }
  });

  test('a password that is a common word or the database name leaves paths, file and database names whole', async () => {
    const admin = await server.connect();
    try {
      await admin.query("CREATE ROLE sec_word LOGIN SUPERUSER PASSWORD 'dump'");
      await admin.query("CREATE ROLE sec_same LOGIN SUPERUSER PASSWORD 'sec_same_db'");
    } finally {
      await admin.end();
    }
    await server.createDatabase('sec_same_db', 'CREATE TABLE t (id int)');
    for (const [user, password, database] of [
      ['sec_word', 'dump', 'secret_app'],
      ['sec_same', 'sec_same_db', 'sec_same_db'],
    ] as const) {
      const dir = await tempDir();
      const out = path.join(dir, 'out');
      await writeEnvFile(dir, '.env', {
        DEV_DB_HOST: '127.0.0.1',
        DEV_DB_PORT: String(server.port),
        DEV_DB_NAME: database,
        DEV_DB_USER: user,
        DEV_DB_PASSWORD: password,
      });
      const args = ['--env', 'dev', '--config-dir', dir, '--output-dir', out];
      const text = await runCli({ args });
      assert.equal(text.exitCode, 0, text.stderr);
      assert.match(text.stdout, new RegExp(`^Backup File: .*/${database}_dev_[0-9TZ-]+\\.dump$`, 'm'));
      assert.match(text.stdout, new RegExp(`^Database: {4}${database}$`, 'm'));
      const doc = JSON.parse((await runCli({ args: [...args, '--json'] })).stdout);
      assert.match(doc.backup_file, new RegExp(`/${database}_dev_[0-9TZ-]+\\.dump$`));
      assert.equal(doc.metadata.database_name, database);
      const listed = JSON.parse((await runCli({ args: ['--list', ...args.slice(2), '--json'] })).stdout);
      for (const entry of listed.backups) assert.match(entry.file, new RegExp(`^${database}_dev_[0-9TZ-]+\\.dump$`));
      // The same everywhere: a name shown whole in one place and masked in another would give the password away.
      const pruned = await runCli({ args: [...args, '--prune', '--keep-last', '1', '--dry-run'] });
      assert.match(pruned.stdout, new RegExp(`^Retention for ${database} \\(dev\\) in .*/out/:`, 'm'));
      const logFile = path.join(dir, 'runs.log');
      assert.equal((await runCli({ args: [...args, '--log-file', logFile] })).exitCode, 0);
      const logged = JSON.parse((await fs.readFile(logFile, 'utf8')).trim().split('\n').at(-1)!);
      assert.equal(logged.database, database);
      assert.match(logged.file, new RegExp(`^${database}_dev_`));
    }
  });

  test(
    "a password that is one of the tool's own words: every decision and machine-readable word stays right",
    { timeout: 300_000 },
    async () => {
      const words = ['failure', 'success', 'backup', 'dev', 'prod', 'file', 'out'];
      const admin = await server.connect();
      try {
        for (const word of words) await admin.query(`CREATE ROLE sec_is_${word} LOGIN SUPERUSER PASSWORD '${word}'`);
      } finally {
        await admin.end();
      }
      for (const word of words) {
        const env = word === 'prod' ? 'prod' : 'dev';
        const prefix = env === 'prod' ? 'DB_' : 'DEV_DB_';
        const dir = await tempDir();
        const out = path.join(dir, 'out');
        const logFile = path.join(dir, 'runs.log');
        const metricsFile = path.join(dir, 'backup_db.prom');
        const hookEnv = path.join(dir, 'hook.env');
        const channels = [
          ...['--log-file', logFile, '--metrics-file', metricsFile, '--on-failure', `env > '${hookEnv}'`],
          ...['--notify-url', `${receiver.url}/notify-${word}`],
          ...['--ping-url', `${receiver.url}/ping-${word}`],
        ];
        /** A backup of `database` by the role whose password is the word, and what each channel got. */
        const backup = async (database: string, more: string[]) => {
          const vars = { ...dbVars(server, prefix, database), [`${prefix}USER`]: `sec_is_${word}` };
          await writeEnvFile(dir, '.env', { ...vars, [`${prefix}PASSWORD`]: word });
          const sent = receiver.requests.length;
          const args = ['--env', env, '--config-dir', dir, '--output-dir', out, ...channels, ...more];
          const result = await runCli({ args });
          const requests = receiver.requests.slice(sent);
          const to = (where: string) => requests.filter((r) => r.path.startsWith(`/hooks/${where}-${word}`));
          return {
            ...result,
            notified: to('notify').map((r) => JSON.parse(r.body)),
            pinged: to('ping').map((r) => r.path.slice(`/hooks/ping-${word}`.length)),
            logged: JSON.parse((await fs.readFile(logFile, 'utf8')).trim().split('\n').at(-1)!),
            metrics: await fs.readFile(metricsFile, 'utf8'),
          };
        };
        const label = `password ${JSON.stringify(word)}`;

        const good = await backup('secret_app', ['--notify-on-success']);
        assert.equal(good.exitCode, 0, `${label}: ${good.stdout}${good.stderr}`);
        assert.match(good.stdout, /^Backup File: .*secret_app_/m, label);
        assert.deepEqual(
          good.notified.map((body) => [body.command, body.outcome, body.environment, body.database]),
          [['backup', 'success', env, 'secret_app']],
          label,
        );
        assert.match(
          good.notified[0].text,
          new RegExp(`^✓ backup_db: backup of secret_app \\(${env}\\) succeeded`),
          label,
        );
        assert.deepEqual(good.pinged, ['/start', ''], `${label}: pinged URL/start, then URL`);
        assert.deepEqual(
          [good.logged.command, good.logged.outcome, good.logged.environment],
          ['backup', 'success', env],
        );
        assert.match(
          good.metrics,
          new RegExp(`^backup_db_last_exit_code\\{database="secret_app",environment="${env}"\\} 0$`, 'm'),
        );
        assert.equal(await fs.stat(hookEnv).catch(() => undefined), undefined, `${label}: no failure command`);

        const list = await runCli({ args: ['--list', '--config-dir', dir, '--output-dir', out, '--json'] });
        const listed = JSON.parse(list.stdout);
        assert.equal(listed.command, 'list', label);
        const keys = ['file', 'status', 'status_label', 'timestamp', 'environment', 'database', 'size_bytes'];
        assert.deepEqual(Object.keys(listed.backups[0]), [...keys, 'problems', 'last_restore_test'], label);
        assert.deepEqual([listed.backups[0].status, listed.backups[0].environment], ['verified', env], label);

        // The password pasted into the database's name as well: the server's error quotes it.
        const bad = await backup(word, ['--json']);
        const failed = JSON.parse(bad.stdout);
        assert.notEqual(bad.exitCode, 0, label);
        assert.deepEqual([failed.ok, failed.command, failed.exit_code], [false, 'backup', bad.exitCode], label);
        assert.match(failed.details, /database "\*\*\*\*" does not exist/, label);
        assert.deepEqual(
          bad.notified.map((body) => [body.command, body.outcome, body.environment, body.database, body.details]),
          [['backup', 'failure', env, '****', failed.details]],
          label,
        );
        assert.match(bad.notified[0].text, new RegExp(`^✗ backup_db: backup of \\*{4} \\(${env}\\) FAILED`), label);
        assert.deepEqual(bad.pinged, ['/start', '/fail'], `${label}: pinged URL/start, then URL/fail`);
        assert.deepEqual([bad.logged.command, bad.logged.outcome, bad.logged.environment], ['backup', 'failure', env]);
        assert.match(
          bad.metrics,
          new RegExp(`^backup_db_last_exit_code\\{database="\\*{4}",environment="${env}"\\} ${bad.exitCode}$`, 'm'),
        );
        const hook = await fs.readFile(hookEnv, 'utf8');
        for (const line of ['BACKUP_COMMAND=backup', 'BACKUP_OUTCOME=failure', `BACKUP_ENVIRONMENT=${env}`])
          assert.match(hook, new RegExp(`^${line}$`, 'm'), label);
        const log = await fs.readFile(logFile, 'utf8');
        const forms = [`database "${word}"`, `database \\"${word}\\"`, `database="${word}"`];
        for (const text of [bad.stdout, bad.stderr, JSON.stringify(bad.notified), hook, log, bad.metrics])
          for (const form of forms) assert.ok(!text.includes(form), `${label}: ${form} in ${text}`);
      }
    },
  );

  test('a mistyped --notify-url is never echoed, on stderr or in --json', async () => {
    const url = `htps//hooks.example/T0/B0/${id}-token`;
    for (const args of [['--notify-url', url], [`--notify-url=${url}`], ['--notify-url', url, '--json']]) {
      const result = await runCli({ args: ['--list', ...args] });
      assert.equal(result.exitCode, 2);
      // With --json the message is in the one document, and only there.
      const said = args.includes('--json') ? result.stdout : result.stderr;
      assert.match(said, /--notify-url <url>' argument '\*\*\*\*' is invalid/);
      assert.ok(!(result.stdout + result.stderr).includes(`${id}-token`), JSON.stringify(args));
    }
  });

  test('a --notify-url or BACKUP_PING_URL with user:password@, which fetch cannot send, is refused (exit 2), unechoed', async () => {
    const url = `https://hookuser:${id}-pw@hooks.example/T0`;
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', { BACKUP_PING_URL: url });
    for (const args of [
      ['--notify-url', url],
      ['--config-dir', configDir],
      ['--config-dir', configDir, '--json'],
    ]) {
      // A backup: the one command that reads BACKUP_PING_URL. Refused before anything is made or connected.
      const result = await runCli({ args: ['--env', 'dev', '--output-dir', configDir, ...args] });
      assert.equal(result.exitCode, 2, result.stdout + result.stderr);
      assert.match(result.stdout + result.stderr, /Remove user:password@ \(fetch cannot send it\)/);
      assert.ok(!(result.stdout + result.stderr).includes(`${id}-pw`), JSON.stringify(args));
      assert.ok(!(result.stdout + result.stderr).includes('hookuser'), JSON.stringify(args));
    }
  });
});

/** A local webhook receiver that keeps every body as it arrived, and where it was sent. */
async function webhookReceiver() {
  const bodies: string[] = [];
  const requests: Array<{ path: string; body: string }> = [];
  const receiver = http.createServer((request, response) => {
    let text = '';
    request.on('data', (chunk) => (text += chunk));
    request.on('end', () => {
      bodies.push(text);
      requests.push({ path: request.url ?? '', body: text });
      response.writeHead(200).end();
    });
  });
  await new Promise<void>((resolve) => receiver.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/hooks`,
    bodies,
    requests,
    close: () => new Promise<void>((resolve) => receiver.close(() => resolve())),
  };
}

/** pg_dump and pg_restore shims (in `log`'s directory) that append their own command line to `log` and run the real tool. */
async function recordingShims(log: string): Promise<string> {
  const dir = path.join(path.dirname(log), 'shims');
  await fs.mkdir(dir, { recursive: true });
  for (const tool of ['pg_dump', 'pg_restore']) {
    await fs.writeFile(
      path.join(dir, tool),
      `#!/bin/sh\nprintf '%s\\n' "$0 $*" >> '${log}'\nexec '${realTools.get(tool)}' "$@"\n`,
      { mode: 0o755 },
    );
  }
  return dir;
}

const realTools = new Map(
  await Promise.all(
    ['pg_dump', 'pg_restore'].map(
      async (tool) => [tool, (await execa('sh', ['-c', `command -v ${tool}`])).stdout.trim()] as const,
    ),
  ),
);

/**
 * pg_dump and pg_restore shims that write their command line and whole environment (NUL-separated)
 * to a file of their own in `dir`, then run the real tool.
 */
async function environmentRecordingShims(dir: string): Promise<string> {
  const shims = await tempDir('backup-db-shim-');
  await fs.mkdir(dir, { recursive: true });
  for (const tool of ['pg_dump', 'pg_restore']) {
    await fs.writeFile(
      path.join(shims, tool),
      `#!/bin/sh\n{ printf '%s\\0' "$0 $*"; env -0; } > '${dir}/'$$\nexec '${realTools.get(tool)}' "$@"\n`,
      { mode: 0o755 },
    );
  }
  return shims;
}
