/**
 * Issue 4.6, bad input. Every option and variable given garbage (empty, blank, unicode, very long,
 * the wrong kind of path) ends with a clear one-line error, the right exit code, no stack trace,
 * and nothing written. (--verify's bad paths are in verify.test.ts; SQL-hostile table names are
 * in the fixture every backup test uses.)
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { dbVars, PROJECT_DIR, runCli, takeBackup, tempDir, writeEnvFile } from './helpers/cli.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { directoryFingerprint } from './helpers/wait.ts';

let server: TestServer;
let defaultDirBefore: Record<string, string>;
before(async () => {
  server = await startTestServer();
  await server.createDatabase('input_app', 'CREATE TABLE t (id int); INSERT INTO t VALUES (1)');
  defaultDirBefore = await directoryFingerprint(path.join(PROJECT_DIR, 'db', 'backups'));
});
after(async () => {
  assert.deepEqual(
    await directoryFingerprint(path.join(PROJECT_DIR, 'db', 'backups')),
    defaultDirBefore,
    'no bad input ever wrote to the default directory',
  );
  await server?.stop();
});

async function attempt(args: string[], vars: Record<string, string> = dbVars(server, 'DEV_DB_', 'input_app')) {
  const configDir = await tempDir();
  const outputDir = path.join(configDir, 'out');
  await writeEnvFile(configDir, '.env', vars);
  const result = await runCli({ args: ['--config-dir', configDir, '--output-dir', outputDir, ...args] });
  return { ...result, files: await fs.readdir(outputDir).catch(() => [] as string[]) };
}

function assertCleanFailure(
  result: { exitCode: number; stdout: string; stderr: string; files: string[] },
  exitCode: number,
  message: RegExp,
) {
  assert.equal(result.exitCode, exitCode, `${result.stdout}\n${result.stderr}`);
  assert.match(result.stderr, message);
  // The contract's error, whoever found the problem (commander's own text included): what failed, why, what to do.
  assert.match(result.stderr, /^✗ [\w ]+ failed: .+\n\nError: .+(\n.+)*\n\nTroubleshooting:\n {2}1\. /, result.stderr);
  assert.doesNotMatch(result.stderr, /\n\s+at .+:\d+:\d+/, 'no stack trace');
  assert.doesNotMatch(result.stderr, /TypeError|ReferenceError|undefined|\[object Object\]/, 'no internal error text');
  assert.deepEqual(result.files, [], 'nothing written');
}

describe('options with garbage → exit 2', () => {
  const cases: Array<[string, string[], RegExp]> = [
    ['empty --env', ['--env', ''], /argument '' is invalid\. Allowed choices are dev, prod, auto/],
    ['unicode --env', ['--env', 'prød'], /Allowed choices are dev, prod, auto/],
    ['empty --output-dir', ['--output-dir', ''], /--output-dir <dir>' argument '' is invalid\. The path is empty/],
    ['blank --config-dir', ['--config-dir', '   '], /The path is empty/],
    [
      'empty --on-failure',
      ['--env', 'dev', '--on-failure', ''],
      /--on-failure <command>' argument '' is invalid\. The path/,
    ],
    [
      'blank --on-failure',
      ['--env', 'dev', '--on-failure', '   '],
      /--on-failure <command>' argument '   ' is invalid/,
    ],
    ['empty --compress', ['--env', 'dev', '--compress', ''], /--compress "" is not a compression setting/],
    ['shell in --compress', ['--env', 'dev', '--compress', '1; rm -rf /'], /is not a compression setting/],
    ['negative --connect-timeout', ['--connect-timeout', '-1'], /Use a whole number of seconds from 1 to 3600/],
    ['huge --connect-timeout', ['--connect-timeout', '9'.repeat(400)], /Use a whole number of seconds/],
    ['word --lock-wait-timeout', ['--lock-wait-timeout', 'soon'], /Use a duration/],
    ['empty --verify', ['--verify', ''], /--verify needs the backup FILE/],
    ['unknown option', ['--retention', '5'], /unknown option '--retention'/],
    ['mistyped option', ['--lsit'], /unknown option '--lsit'\n\nTroubleshooting:\n {2}1\. Did you mean --list\?/],
    ['stray argument', ['prod'], /too many arguments/],
    [
      'a file name that starts with -',
      ['--verify', '-x.dump'],
      /unknown option '-x\.dump'\n\nTroubleshooting:\n {2}1\. If -x\.dump is a file, write \.\/-x\.dump: a leading - reads as an option/,
    ],
  ];
  for (const [name, args, message] of cases) {
    test(name, async () => assertCleanFailure(await attempt(args), 2, message));
  }
});

describe('an option given twice', () => {
  test('with different values is refused (exit 2), naming the option, never its values: which was meant?', async () => {
    const cases: Array<[string[], string]> = [
      [['--env', 'dev', '--env', 'prod'], '--env'],
      [['--env', 'dev', '--compress=9', '--compress', '0'], '--compress'],
      [
        ['--env', 'dev', '--notify-url', 'https://a.example/h/s3cret-1', '--notify-url=https://b.example/h/s3cret-2'],
        '--notify-url',
      ],
      [['--env', 'dev', '--list', '--verify', '--verify', 'x.dump'], '--verify'],
      [['--env', 'dev', '--verify', '-1', '--verify', '-2'], '--verify'],
    ];
    for (const [args, option] of cases) {
      const result = await attempt(args);
      assertCleanFailure(result, 2, new RegExp(`${option} is given twice, with different values`));
      assert.doesNotMatch(result.stderr + result.stdout, /s3cret/, 'a value may be a credential');
    }
  });

  test('is recorded with neither value: no environment or database named, no log file of the two written', async () => {
    const dir = await tempDir();
    const log = path.join(dir, 'run.log');
    const bothConfigured = { ...dbVars(server, 'DEV_DB_', 'input_app'), ...dbVars(server, 'DB_', 'input_app') };
    const envTwice = await attempt(['--env', 'dev', '--env', 'prod', '--log-file', log], bothConfigured);
    assertCleanFailure(envTwice, 2, /--env is given twice, with different values/);
    const [line, ...more] = (await fs.readFile(log, 'utf8'))
      .trim()
      .split('\n')
      .map((text) => JSON.parse(text));
    assert.deepEqual(more, []);
    assert.equal(line.exit_code, 2);
    assert.equal(line.environment, undefined, 'neither dev nor prod');
    assert.equal(line.database, undefined);

    const [a, b] = [path.join(dir, 'a.log'), path.join(dir, 'b.log')];
    assertCleanFailure(await attempt(['--env', 'dev', '--log-file', a, '--log-file', b]), 2, /--log-file is given/);
    assert.deepEqual(await fs.readdir(dir), ['run.log'], 'neither log file written');

    // Nor the log file of either config directory's .env, nor the project's.
    const other = await tempDir();
    await writeEnvFile(other, '.env', { ...bothConfigured, BACKUP_LOG_FILE: path.join(dir, 'other.log') });
    const vars = { ...bothConfigured, BACKUP_LOG_FILE: path.join(dir, 'first.log') };
    assertCleanFailure(await attempt(['--env', 'dev', '--config-dir', other], vars), 2, /--config-dir is given/);
    assert.deepEqual(await fs.readdir(dir), ['run.log'], "neither directory's log file written");
  });

  test('with the same value, or a flag twice, is the one command it always was', async () => {
    const result = await attempt(['--env', 'dev', '--env=dev', '--json', '--json']);
    assert.equal(result.exitCode, 0, result.stderr);
    assert.equal(JSON.parse(result.stdout).ok, true);
    assert.equal(result.files.filter((name) => name.endsWith('.dump')).length, 1);
  });
});

describe('options that do not apply to the command', () => {
  test('--restore --clean --dry-run is refused (exit 2) and leaves the target as it was', async () => {
    const outputDir = path.join(await tempDir(), 'out');
    const { dumpPath } = await takeBackup(server, 'input_app', outputDir);
    await server.createDatabase('input_target', "CREATE TABLE precious (v text); INSERT INTO precious VALUES ('keep')");
    const result = await runCli({
      args: ['--env', 'dev', '--restore', dumpPath, '--target-db', 'input_target', '--clean', '--dry-run'],
      env: dbVars(server, 'DEV_DB_', 'input_app'),
    });
    assertCleanFailure({ ...result, files: [] }, 2, /--dry-run only applies to a backup or --prune/);
    const client = await server.connect('input_target');
    try {
      assert.deepEqual((await client.query('SELECT v FROM precious')).rows, [{ v: 'keep' }], 'the target untouched');
    } finally {
      await client.end();
    }
  });

  test('BACKUP_KEEP_* in .env do not stop --list; the --keep-* and --dry-run options there are refused', async () => {
    const keep = { BACKUP_KEEP_LAST: '3', BACKUP_KEEP_DAILY: '7' };
    const listed = await attempt(['--env', 'dev', '--list'], { ...dbVars(server, 'DEV_DB_', 'input_app'), ...keep });
    assert.equal(listed.exitCode, 0, listed.stderr);
    for (const args of [
      ['--list', '--keep-last', '3'],
      ['--verify', 'x.dump', '--keep-daily', '7'],
      ['--list', '--dry-run'],
    ]) {
      assertCleanFailure(await attempt(['--env', 'dev', ...args]), 2, /only applies to a backup or --prune/);
    }
  });

  test("a backup's own options given to another command are refused (exit 2): --verify never updates metrics", async () => {
    const cases: Array<[string[], RegExp]> = [
      [['--verify', 'x.dump', '--metrics-file', 'm.prom'], /--metrics-file only applies to a backup/],
      [['--list', '--compress', '9'], /--compress only applies to a backup/],
      [['--prune', '--keep-last', '3', '--stall-timeout', '1h'], /--stall-timeout only applies to a backup/],
      [['--check', '--max-age', '1d', '--ping-url', 'https://hc.example/p/s3cret'], /--ping-url only applies to a/],
      [['--list', '--jobs', '4'], /--jobs only applies to a backup, --restore FILE or --verify FILE --restore-test/],
      [['--verify', 'x.dump', '--connect-timeout', '3'], /--connect-timeout only applies to a backup, --prune,/],
      [['--check', '--max-age', '1d', '--lock-wait-timeout', '5s'], /--lock-wait-timeout only applies to a backup or/],
    ];
    for (const [args, message] of cases) {
      const result = await attempt(['--env', 'dev', ...args]);
      assertCleanFailure(result, 2, message);
      assert.doesNotMatch(result.stderr, /s3cret/);
    }
  });
});

describe('--compress with garbage', () => {
  test('is refused before connecting or creating anything: exit 2 even when the server is unreachable', async () => {
    const configDir = await tempDir();
    const outputDir = path.join(configDir, 'n', 'deep', 'er');
    await writeEnvFile(configDir, '.env', { ...dbVars(server, 'DEV_DB_', 'input_app'), DEV_DB_PORT: '1' });
    for (const value of ['bogus', 'zstd:23']) {
      const result = await runCli({
        args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir, '--compress', value],
      });
      assertCleanFailure({ ...result, files: [] }, 2, /--compress (zstd:23: zstd levels run from 1 to 22|"bogus")/);
      await assert.rejects(fs.access(path.join(configDir, 'n')), `--compress ${value}: no directory created`);
    }
  });
});

describe('--json with a bad command line', () => {
  test('prints the one JSON document, on stdout only, as for any other failure', async () => {
    for (const args of [
      ['--keep-daily', 'seven'],
      ['--retention', '5'],
      ['--verify', ''],
    ]) {
      const result = await attempt(['--env', 'dev', '--json', ...args]);
      assert.equal(result.exitCode, 2, `${args.join(' ')}: ${result.stdout}\n${result.stderr}`);
      assert.equal(JSON.parse(result.stdout).ok, false, args.join(' '));
      assert.equal(result.stderr, '', `${args.join(' ')}: nothing but the document`);
    }
  });
});

describe('variables with garbage', () => {
  const good = () => dbVars(server, 'DEV_DB_', 'input_app');
  const cases: Array<[string, Record<string, string>, number, RegExp]> = [
    ['blank DEV_DB_NAME', { DEV_DB_NAME: '   ' }, 2, /DEV_DB_NAME \(from \.env\) is blank/],
    [
      'unicode ENV_MODE',
      { ENV_MODE: 'prøduction' },
      2,
      /ENV_MODE \(from \.env\) is "prøduction", which is not an environment/,
    ],
    ['blank DEV_DB_PORT', { DEV_DB_PORT: '  ' }, 2, /DEV_DB_PORT \(from \.env\) is "  ", which is not a port number/],
    ['unicode digits in DEV_DB_PORT', { DEV_DB_PORT: '٥٤٣٢' }, 2, /not a port number/],
    ['very long DEV_DB_PORT', { DEV_DB_PORT: '5'.repeat(5000) }, 2, /not a port number/],
    ['spaces in DEV_DB_HOST', { DEV_DB_HOST: 'db host' }, 2, /DEV_DB_HOST .* not a host name/],
    ['garbage URL', { DEV_DATABASE_URL: '::::' }, 2, /DEV_DATABASE_URL \(from \.env\) is not a valid URL/],
    [
      'very long DEV_DB_NAME',
      { DEV_DB_NAME: 'd'.repeat(10_000) },
      2,
      /DEV_DB_NAME \(from \.env\) is 10000 bytes long; PostgreSQL names are at most 63 bytes/,
    ],
    ['64-byte DEV_DB_USER', { DEV_DB_USER: 'u'.repeat(64) }, 2, /DEV_DB_USER \(from \.env\) is 64 bytes long/],
    [
      // Linux passes no environment variable over 128 KiB to a child: pg_dump would fail to start (E2BIG).
      'DEV_DB_PASSWORD over 128 KiB',
      { DEV_DB_PASSWORD: 'p'.repeat(140_000) },
      2,
      /DEV_DB_PASSWORD \(from \.env\) is 140000 bytes long; pg_dump and pg_restore can be given at most 131060/,
    ],
    [
      'very long DEV_DB_HOST',
      { DEV_DB_HOST: `${'h'.repeat(300)}.invalid` },
      3,
      /✗ Backup failed: Database (host not found|connection error)/,
    ],
    ['unicode DEV_DB_USER', { DEV_DB_USER: 'ünïcødé_👤' }, 3, /authentication failed/],
    [
      'unicode DEV_DB_NAME that does not exist',
      { DEV_DB_NAME: 'données_🎉' },
      3,
      /database "données_🎉" does not exist/,
    ],
  ];
  for (const [name, change, exitCode, message] of cases) {
    // --env auto, so that ENV_MODE is consulted (an explicit --env would rightly override it).
    test(name, async () =>
      assertCleanFailure(await attempt(['--env', 'auto'], { ...good(), ...change }), exitCode, message),
    );
  }

  test("a backup's own variables stop only a backup: --list, --check and --verify never read them", async () => {
    const dir = await tempDir();
    const foreign = path.join(dir, 'notes.prom');
    await fs.writeFile(foreign, '# my note\n');
    const changes: Array<Record<string, string>> = [
      { BACKUP_METRICS_FILE: foreign },
      { BACKUP_METRICS_FILE: dir },
      { BACKUP_PING_URL: 'notaurl' },
    ];
    for (const change of changes) {
      const vars = { ...good(), ...change };
      assertCleanFailure(await attempt(['--env', 'dev'], vars), 2, /BACKUP_|metrics file/);
      for (const args of [['--list'], ['--check', '--max-age', '1d'], ['--verify', path.join(dir, 'missing.dump')]]) {
        const result = await attempt(['--env', 'dev', ...args], vars);
        assert.notEqual(result.exitCode, 2, `${JSON.stringify(change)} ${args.join(' ')}: ${result.stderr}`);
      }
    }
    assert.equal(await fs.readFile(foreign, 'utf8'), '# my note\n');
  });

  test('a connection URL pasted into DEV_DB_HOST, _NAME or _USER is refused (exit 2), naming the variable, unechoed', async () => {
    const urls = [
      'postgresql://app@db.example.invalid:5432/app?password=SECRETQ9',
      'postgres+psycopg2://app:SECRETQ9@db.example.invalid/app',
    ];
    for (const variable of ['DEV_DB_HOST', 'DEV_DB_NAME', 'DEV_DB_USER'])
      for (const url of urls) {
        const result = await attempt(['--env', 'dev'], { ...good(), [variable]: url });
        assertCleanFailure(result, 2, new RegExp(`${variable} \\(from \\.env\\) holds a connection URL`));
        assert.match(result.stderr, /DEV_DATABASE_URL/);
        assert.ok(!`${result.stdout}${result.stderr}`.includes('SECRETQ9'), `${variable}=${url}: ${result.stderr}`);
      }
  });

  test('user:password@host pasted into DEV_DB_HOST is refused (exit 2), its user and password unechoed', async () => {
    for (const host of ['app:SECRETQ9@db.example.invalid', 'SECRETQ9@db.example.invalid', 'a:b:SECRETQ9@[::1]']) {
      const result = await attempt(['--env', 'dev'], { ...good(), DEV_DB_HOST: host });
      assertCleanFailure(result, 2, /DEV_DB_HOST \(from \.env\) holds an '@'/);
      assert.match(result.stderr, /the user and password in their own settings \(DEV_DB_USER, DB_PASSWORD/);
      assert.ok(!`${result.stdout}${result.stderr}`.includes('SECRETQ9'), `${host}: ${result.stderr}`);
    }
  });
});

describe('host names outside ASCII', () => {
  // Node's resolver looks up a name's ASCII (IDNA) form, libpq the bytes as given: one host could be two
  // servers, the production guard checking one and pg_restore writing to the other.
  const good = () => dbVars(server, 'DEV_DB_', 'input_app');
  test("DEV_DB_HOST or a URL's host is refused (exit 2), with its ASCII form to use instead", async () => {
    const hosts: Array<[Record<string, string>, RegExp, string]> = [
      [
        { DEV_DB_HOST: 'ＬＯＣＡＬＨＯＳＴ' },
        /DEV_DB_HOST \(from \.env\) names the host "ＬＯＣＡＬＨＯＳＴ", outside ASCII/,
        'localhost',
      ],
      [
        { DEV_DB_HOST: 'bücher.invalid' },
        /DEV_DB_HOST \(from \.env\) names the host "bücher\.invalid", outside ASCII/,
        'xn--bcher-kva.invalid',
      ],
      [
        { DEV_DATABASE_URL: 'postgresql://app:SECRETQ9@bücher.invalid/app' },
        /DEV_DATABASE_URL \(from \.env\) names the host "bücher\.invalid", outside ASCII/,
        'xn--bcher-kva.invalid',
      ],
    ];
    for (const [change, message, ascii] of hosts) {
      const result = await attempt(['--env', 'dev'], { ...good(), ...change });
      assertCleanFailure(result, 2, message);
      assert.ok(result.stderr.includes(`Write it as ${ascii}`), result.stderr);
      assert.ok(!result.stderr.includes('SECRETQ9'), result.stderr);
    }
  });

  test('a socket directory may be named outside ASCII: it is a path, looked up by no one', async () => {
    const result = await attempt(['--env', 'dev'], { ...good(), DEV_DB_HOST: '/tmp/no-sockét-here' });
    assertCleanFailure(result, 3, /✗ Backup failed: Database/);
  });
});

describe('URL hints', () => {
  test('an option value with terminal escapes is shown escaped in the error, never sent raw', async () => {
    const result = await attempt(['--env', 'dev', '--keep-daily', '\x1b]0;PWNED\x07\x1b[2J']);
    assertCleanFailure(result, 2, /--keep-daily/);
    assert.ok(!/[\x07\x1b]/.test(result.stderr), result.stderr);
    assert.match(result.stderr, /\\x1b\]0;PWNED\\x07/);
  });

  test('the hint for a malformed URL shows the form whole, not masked like a password', async () => {
    const result = await attempt(['--env', 'dev'], { DEV_DATABASE_URL: 'mysql://h/db' });
    assertCleanFailure(result, 2, /must start with postgresql:\/\/ or postgres:\/\//);
    assert.match(
      result.stderr,
      /postgresql:\/\/USER@HOST:5432\/DATABASE, with the password after the user: USER:PASSWORD/,
    );
    assert.doesNotMatch(result.stderr, /\*\*\*\*/);
  });
});

describe('paths with garbage', () => {
  test('an output directory path that is far too long → exit 2 (configuration), no chown hint', async () => {
    const result = await runCli({
      args: [
        '--env',
        'dev',
        '--config-dir',
        await tempDir(),
        '--output-dir',
        path.join(await tempDir(), 'x'.repeat(5000)),
      ],
      env: dbVars(server, 'DEV_DB_', 'input_app'),
    });
    assert.equal(result.exitCode, 2, result.stderr);
    assert.match(result.stderr, /ENAMETOOLONG/);
    assert.match(result.stderr, /^ {2}1\. Choose a shorter path with --output-dir/m);
    assert.doesNotMatch(result.stderr, /chown|writable/);
  });

  test('a path whose name is not UTF-8 (--output-dir, --log-file, --metrics-file) → exit 2, nothing written', async () => {
    // Node decodes argv lossily: o\xff arrives as o\uFFFD, another directory's name, which would be made and used.
    const parent = await tempDir();
    const raw = Buffer.from([...Buffer.from(`${parent}/o`), 0xff]);
    await fs.mkdir(raw);
    const configDir = await tempDir();
    const elsewhere = path.join(await tempDir(), 'backups');
    for (const option of ['--output-dir', '--log-file', '--metrics-file']) {
      const target = option === '--output-dir' ? '$RAW' : '$RAW/x';
      const result = await runCli({
        args: [
          '--env',
          'dev',
          '--config-dir',
          configDir,
          ...(option === '--output-dir' ? [] : ['--output-dir', elsewhere]),
        ],
        wrapper: ['sh', '-c', `exec "$@" ${option} "$(printf "${target}")"`, 'sh'],
        env: { ...dbVars(server, 'DEV_DB_', 'input_app'), RAW: `${parent}/o\\377` },
      });
      assert.equal(result.exitCode, 2, `${option}: ${result.stdout}${result.stderr}`);
      assert.match(result.stderr, new RegExp(`^Error: ${option}.*o\\\\xff in .* has a name that is not UTF-8`, 'm'));
      assert.deepEqual(await fs.readdir(parent), [raw.subarray(parent.length + 1).toString()], option);
      assert.deepEqual(await fs.readdir(raw), [], `${option}: nothing written in the directory meant`);
      assert.equal(await fs.stat(elsewhere).catch(() => undefined), undefined, `${option}: no backup taken`);
    }
  });

  test('an output directory that is a device or a file → exit 4, hints about the path, not about its owner', async () => {
    const file = path.join(await tempDir(), 'a file');
    await fs.writeFile(file, 'keep me');
    for (const [dir, shown] of [
      ['/dev/null', '/dev/null'],
      [file, `'${file}'`],
    ]) {
      const result = await runCli({
        args: ['--env', 'dev', '--config-dir', await tempDir(), '--output-dir', dir!],
        env: dbVars(server, 'DEV_DB_', 'input_app'),
      });
      assert.equal(result.exitCode, 4, result.stderr);
      assert.match(result.stderr, /not a directory/);
      assert.ok(result.stderr.includes(`  1. Check the path: ls -ld ${shown}\n`), result.stderr);
      assert.doesNotMatch(result.stderr, /chown|writable/);
    }
    assert.equal(await fs.readFile(file, 'utf8'), 'keep me');
  });

  test('hints that are commands quote the paths in them, so that they run as printed', async () => {
    const dir = path.join(await tempDir(), "it's a dir", 'b');
    const result = await runCli({
      args: ['--env', 'dev', '--config-dir', await tempDir(), '--output-dir', dir, '--check', '--max-age', '1d'],
      env: dbVars(server, 'DEV_DB_', 'input_app'),
    });
    assert.equal(result.exitCode, 8, result.stderr);
    const quoted = `'${dir.replace("'", "'\\''")}'`;
    const lines = result.stderr.split('\n');
    assert.ok(
      lines.some((line) => line.endsWith(`npx tsx backup_db.ts --list --output-dir ${quoted}`)),
      result.stderr,
    );
    assert.ok(
      lines.some((line) => line.endsWith(`npx tsx backup_db.ts --env dev --output-dir ${quoted}`)),
      result.stderr,
    );
  });

  test('an output directory inside a file → exit 4', async () => {
    const file = path.join(await tempDir(), 'file');
    await fs.writeFile(file, 'keep me');
    const result = await runCli({
      args: ['--env', 'dev', '--config-dir', await tempDir(), '--output-dir', path.join(file, 'sub')],
      env: dbVars(server, 'DEV_DB_', 'input_app'),
    });
    assert.equal(result.exitCode, 4, result.stderr);
    assert.match(result.stderr, /not a directory/);
    assert.equal(await fs.readFile(file, 'utf8'), 'keep me');
  });

  test('--list, --prune and --check agree on an output directory inside a file (4) and on a dangling symlink (none yet)', async () => {
    const dir = await tempDir();
    await fs.writeFile(path.join(dir, 'file'), 'keep me');
    await fs.symlink(path.join(dir, 'nowhere'), path.join(dir, 'dangling'));
    const modes = [['--list'], ['--prune', '--keep-last', '1'], ['--check', '--max-age', '1d']];
    const run = (outputDir: string, mode: string[]) =>
      runCli({
        args: ['--env', 'dev', '--config-dir', dir, '--output-dir', outputDir, ...mode],
        env: dbVars(server, 'DEV_DB_', 'input_app'),
      });
    for (const mode of modes) {
      const inFile = await run(path.join(dir, 'file', 'sub'), mode);
      assert.equal(inFile.exitCode, 4, `${mode[0]}: ${inFile.stderr}`);
      assert.match(inFile.stderr, /Cannot read the backup directory .*: a path component is not a directory/);
    }
    for (const mode of modes.slice(0, 2)) {
      const dangling = await run(path.join(dir, 'dangling'), mode);
      assert.equal(dangling.exitCode, 0, `${mode[0]}: ${dangling.stderr}`);
      assert.match(dangling.stdout, /^No backups: .*dangling\/ does not exist yet\.$/m);
    }
    assert.equal(await fs.readFile(path.join(dir, 'file'), 'utf8'), 'keep me');
    assert.deepEqual((await fs.readdir(dir)).sort(), ['dangling', 'file']);
  });

  test('a --config-dir that does not exist or is no directory → exit 2 naming it, its settings not silently lost', async () => {
    const dir = await tempDir();
    await fs.writeFile(path.join(dir, 'file'), 'x');
    for (const configDir of [path.join(dir, 'missing'), path.join(dir, 'file'), path.join(dir, 'file', 'sub')]) {
      const outputDir = path.join(dir, 'out');
      const result = await runCli({
        args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir],
        env: dbVars(server, 'DEV_DB_', 'input_app'),
      });
      assertCleanFailure({ ...result, files: [] }, 2, /--config-dir .* (does not exist|is not a directory)/);
      assert.ok(result.stderr.includes(configDir), result.stderr);
      await assert.rejects(fs.access(outputDir), 'no backup taken');
    }
  });

  test('a .env that is a directory → exit 2 naming the file', async () => {
    const configDir = await tempDir();
    await fs.mkdir(path.join(configDir, '.env'));
    const result = await runCli({
      args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', path.join(configDir, 'out')],
    });
    assert.equal(result.exitCode, 2, result.stderr);
    assert.match(result.stderr, /cannot read .*\.env: EISDIR/);
  });

  test('--list on a file instead of a directory → exit 4', async () => {
    const file = path.join(await tempDir(), 'file');
    await fs.writeFile(file, 'x');
    const result = await runCli({ args: ['--list', '--output-dir', file] });
    assert.equal(result.exitCode, 4, result.stderr);
    assert.match(result.stderr, /^✗ Listing failed: /m);
  });
});
