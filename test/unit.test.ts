/** The pure functions of backup_db.ts, fed values and checked on the values they return. */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import {
  displayPath,
  envFileText,
  dropFate,
  marksHalfDroppedInvalid,
  toolConnectionError,
  expandHome,
  shellWord,
  foreignQuery,
  toolMessage,
  dumpedFraction,
  progressLine,
  chooseClient,
  clientInstallHints,
  minimumPgRestoreMajor,
  parseArchiveHeader,
  archiveExtensions,
  tablespaceReader,
  tablespaceSetBy,
  archiveDatabaseOptions,
  databasePropertyStatements,
  databaseOptionsFor,
  unsupportedProvider,
  BackupError,
  dbnameConninfo,
  fetchFailure,
  extensionInstallHint,
  isProductionTarget,
  reconcileCounts,
  reconciliationLines,
  chooseMode,
  listingLines,
  metadataProblems,
  parseBackupFileName,
  sortNewestFirst,
  tablesWithoutData,
  tocTableEntries,
  unknownSettingsOnly,
  backupFileName,
  connectionError,
  detectEnvironment,
  fileSystemError,
  EXIT,
  formatBytes,
  isoSeconds,
  libpqEnv,
  maskSecrets,
  redact,
  failureProblem,
  warningProblem,
  problemLines,
  problemDocument,
  misreadDotenvValues,
  hookEnvironment,
  cutText,
  runSummary,
  databaseFailure,
  restoreSessionSettings,
  parseMemory,
  formatMemory,
  compareVersions,
  parseDuration,
  parseMaxAge,
  mergeEnvLayers,
  metadataFileName,
  parseCompression,
  parsePgVersion,
  parsePort,
  pgDumpError,
  pgDumpArgs,
  pgpassLookup,
  resolveDbConfig,
  fileNamePart,
  databaseFromFileNamePart,
  lockFileName,
  tableKey,
  secretsIn,
  visibleControls,
  keptValues,
  summarizeTables,
  lenientProdDatabase,
  unsignedIdentifier,
  type DbConfig,
} from '../backup_db.ts';

const env = (vars: Record<string, string>, source = '.env') => mergeEnvLayers([{ source, vars }]);

function expectBackupError(fn: () => unknown, exitCode: number, pattern: RegExp): BackupError {
  try {
    fn();
  } catch (error) {
    assert.ok(error instanceof BackupError, `expected a BackupError, got ${String(error)}`);
    assert.equal(error.exitCode, exitCode);
    assert.match(`${error.title}: ${error.details}`, pattern);
    assert.ok(error.hints.length > 0, 'every error tells the user what to do');
    return error;
  }
  assert.fail('expected an error');
}

describe('envFileText', () => {
  const utf8 = (text: string) => Buffer.from(text, 'utf8');
  const notUtf8Line = (bytes: Buffer) => {
    try {
      envFileText(bytes, '.env');
      return undefined;
    } catch (error) {
      assert.ok(error instanceof BackupError);
      return Number(/line (\d+)/.exec(error.details)![1]);
    }
  };
  test('UTF-8 is read as it is; a byte-order mark is dropped', () => {
    assert.equal(envFileText(utf8('A=päss\nB=🎉\n'), '.env'), 'A=päss\nB=🎉\n');
    assert.equal(envFileText(utf8('\ufeffA=1'), '.env'), 'A=1');
  });
  test('the first line that is not UTF-8 is named, whatever follows, last line or not', () => {
    const latin1 = (text: string) => Buffer.from(text, 'latin1');
    assert.equal(notUtf8Line(latin1('A=\xe4\nB=1\n')), 1);
    assert.equal(notUtf8Line(latin1('A=1\n\nB=\xe4\xe4\nC=\xe4\n')), 3);
    assert.equal(notUtf8Line(latin1('A=1\r\nB=\xff')), 2);
    // A character cut between two lines is no character on either.
    assert.equal(notUtf8Line(Buffer.concat([utf8('A=1\nB='), utf8('ä').subarray(0, 1)])), 2);
  });
});

describe('mergeEnvLayers', () => {
  test('the first layer that sets a variable wins and records where it came from', () => {
    const vars = mergeEnvLayers([
      { source: 'the process environment', vars: { A: 'process' } },
      { source: '.env.local', vars: { A: 'local', B: 'local' } },
      { source: '.env', vars: { A: 'env', B: 'env', C: 'env' } },
    ]);
    assert.deepEqual(vars.get('A'), { value: 'process', source: 'the process environment' });
    assert.deepEqual(vars.get('B'), { value: 'local', source: '.env.local' });
    assert.deepEqual(vars.get('C'), { value: 'env', source: '.env' });
  });

  test('an empty value counts as unset, so a later layer can supply it', () => {
    const vars = mergeEnvLayers([
      { source: '.env.local', vars: { DEV_DB_HOST: '' } },
      { source: '.env', vars: { DEV_DB_HOST: 'db.internal' } },
    ]);
    assert.equal(vars.get('DEV_DB_HOST')?.value, 'db.internal');
  });
});

describe('detectEnvironment', () => {
  test('an explicit --env wins over everything', () => {
    assert.equal(detectEnvironment(env({ ENV_MODE: 'prod', DEV_DB_NAME: 'x' }), 'dev'), 'dev');
    assert.equal(detectEnvironment(env({ ENV_MODE: 'nonsense' }), 'prod'), 'prod');
  });

  test('ENV_MODE accepts dev/development/prod/production in any case', () => {
    for (const [mode, expected] of [
      ['dev', 'dev'],
      ['Development', 'dev'],
      ['PROD', 'prod'],
      [' production ', 'prod'],
    ] as const) {
      assert.equal(detectEnvironment(env({ ENV_MODE: mode, DEV_DB_NAME: 'a', DB_NAME: 'b' }), 'auto'), expected, mode);
    }
  });

  test('an unknown ENV_MODE is a configuration error naming the value and its file', () => {
    expectBackupError(
      () => detectEnvironment(env({ ENV_MODE: 'staging', DEV_DB_NAME: 'x' }, '.env.local'), 'auto'),
      EXIT.CONFIG,
      /ENV_MODE \(from \.env\.local\) is "staging"/,
    );
  });

  test("an ENV_MODE naming one of Object's own properties is unknown too, not an environment", () => {
    for (const mode of ['__proto__', 'constructor', 'toString', 'hasOwnProperty', 'valueOf']) {
      expectBackupError(
        () => detectEnvironment(env({ ENV_MODE: mode, DEV_DB_NAME: 'x' }), 'auto'),
        EXIT.CONFIG,
        new RegExp(`ENV_MODE \\(from \\.env\\) is "${mode}", which is not an environment`),
      );
    }
  });

  test('without ENV_MODE: dev when DEV_DB_NAME is set, else prod when DB_NAME is set', () => {
    assert.equal(detectEnvironment(env({ DEV_DB_NAME: 'a', DB_NAME: 'b' }), 'auto'), 'dev');
    assert.equal(detectEnvironment(env({ DB_NAME: 'b' }), 'auto'), 'prod');
    assert.equal(detectEnvironment(env({ DEV_DATABASE_URL: 'postgres://h/a' }), 'auto'), 'dev');
    assert.equal(detectEnvironment(env({ DATABASE_URL: 'postgres://h/b' }), 'auto'), 'prod');
  });

  test('nothing set: exit 2 naming the variables to set', () => {
    const error = expectBackupError(
      () => detectEnvironment(env({}), 'auto'),
      EXIT.CONFIG,
      /ENV_MODE, DEV_DB_NAME, DB_NAME/,
    );
    assert.match(error.hints.join('\n'), /DEV_DB_NAME/);
  });
});

describe('resolveDbConfig', () => {
  test('dev reads DEV_DB_* and falls back to DB_* for everything but the name', () => {
    const config = resolveDbConfig(
      env({
        DEV_DB_NAME: 'app_dev',
        DB_HOST: 'db',
        DB_PORT: '6543',
        DB_USER: 'u',
        DB_PASSWORD: 'p',
        DB_NAME: 'app_prod',
      }),
      'dev',
    );
    assert.deepEqual(
      { host: config.host, port: config.port, database: config.database, user: config.user, password: config.password },
      { host: 'db', port: 6543, database: 'app_dev', user: 'u', password: 'p' },
    );
    assert.equal(config.origin.host, 'DB_HOST (from .env)');
    assert.equal(config.origin.database, 'DEV_DB_NAME (from .env)');
  });

  test('dev never falls back to DB_NAME: that would back up prod under a dev label', () => {
    expectBackupError(
      () => resolveDbConfig(env({ DB_NAME: 'app_prod' }), 'dev'),
      EXIT.CONFIG,
      /DEV_DB_NAME is not set/,
    );
  });

  test('prod reads DB_* only', () => {
    const config = resolveDbConfig(env({ DEV_DB_HOST: 'devhost', DB_NAME: 'app', DB_HOST: 'prodhost' }), 'prod');
    assert.equal(config.host, 'prodhost');
    expectBackupError(() => resolveDbConfig(env({ DEV_DB_NAME: 'x' }), 'prod'), EXIT.CONFIG, /DB_NAME is not set/);
  });

  test('defaults: localhost:5432', () => {
    const config = resolveDbConfig(env({ DB_NAME: 'app' }), 'prod');
    assert.equal(config.host, 'localhost');
    assert.equal(config.port, 5432);
    assert.equal(config.password, undefined);
  });

  test('a connection URL wins over the separate variables and is decoded', () => {
    const config = resolveDbConfig(
      env({
        DATABASE_URL: 'postgresql://app%40corp:p%3Ass@db.example.com:6000/my%20db?sslmode=require',
        DB_NAME: 'ignored',
        DB_HOST: 'ignored',
      }),
      'prod',
    );
    assert.deepEqual(
      {
        host: config.host,
        port: config.port,
        database: config.database,
        user: config.user,
        password: config.password,
        sslmode: config.sslmode,
      },
      { host: 'db.example.com', port: 6000, database: 'my db', user: 'app@corp', password: 'p:ss', sslmode: 'require' },
    );
  });

  test('a URL is read as libpq reads it: a socket directory in ?host=, ?port=, IPv6, ?password=', () => {
    const read = (url: string) => {
      const c = resolveDbConfig(env({ DATABASE_URL: url }), 'prod');
      return { host: c.host, port: c.port, database: c.database, user: c.user, password: c.password };
    };
    assert.deepEqual(read('postgresql:///app?host=/var/run/postgresql'), {
      host: '/var/run/postgresql',
      port: 5432,
      database: 'app',
      user: os.userInfo().username,
      password: undefined,
    });
    assert.deepEqual(read('postgresql://u@/app?host=%2Ftmp&port=6000'), {
      host: '/tmp',
      port: 6000,
      database: 'app',
      user: 'u',
      password: undefined,
    });
    assert.deepEqual(read('postgresql://u@[::1]:5433/app'), {
      host: '::1',
      port: 5433,
      database: 'app',
      user: 'u',
      password: undefined,
    });
    assert.deepEqual(read('postgresql://u@h/app?password=s%3Ecret&sslrootcert=/x.crt'), {
      host: 'h',
      port: 5432,
      database: 'app',
      user: 'u',
      password: 's>cret',
    });
    assert.ok(
      secretsIn(env({ DATABASE_URL: 'postgresql://u@h/app?password=s%3Ecret' })).includes('s>cret'),
      'a ?password= is masked too',
    );
  });

  test('a URL without a host is refused, not read as localhost: libpq would use its socket directory', () => {
    for (const url of [
      'postgresql:///app',
      'postgresql://u:s3cret@/app?port=5999',
      'postgresql://u:s3cret@h/app?host=',
    ]) {
      const error = expectBackupError(
        () => resolveDbConfig(env({ DATABASE_URL: url }), 'prod'),
        EXIT.CONFIG,
        /DATABASE_URL \(from \.env\) names no host/,
      );
      assert.match(error.hints.join('\n'), /\?host=\/var\/run\/postgresql/);
      const text = `${error.title} ${error.details} ${error.hints.join(' ')}`;
      assert.ok(!text.includes('s3cret') && !text.includes(url), 'the URL is never echoed');
    }
  });

  test('a URL is decoded as libpq decodes it: every percent-escape, no + for a space, no # fragment; ?dbname= wins', () => {
    const read = (url: string) => {
      const c = resolveDbConfig(env({ DATABASE_URL: url }), 'prod');
      return { database: c.database, user: c.user, password: c.password };
    };
    assert.deepEqual(read('postgresql://a%2Fb%3Ac:p%23w%2Bx@h/prod%23db%2F%3F%3A%2B%40%24%26%2C%3B%3D'), {
      database: 'prod#db/?:+@$&,;=',
      user: 'a/b:c',
      password: 'p#w+x',
    });
    assert.deepEqual(read('postgresql://u@h/appdb?dbname=prod+db&password=a+b-pass'), {
      database: 'prod+db',
      user: 'u',
      password: 'a+b-pass',
    });
    assert.equal(read('postgresql://u@h/prod#db').database, 'prod#db', "psql has no fragment: '#' is the name's");
    for (const url of ['postgresql://u@h/prod%23db', 'postgresql://u@h/appdb?dbname=prod%23db&sslmode=x'])
      assert.equal(lenientProdDatabase(env({ DATABASE_URL: url })), 'prod#db', url);
  });

  test('a URL parameter this tool does not implement (hostaddr, service, …), or several hosts: exit 2, never the value', () => {
    for (const [query, name] of [
      ['?hostaddr=10.9.8.7', 'hostaddr'],
      ['?sslmode=require&service=secretsvc', 'service'],
      ['?target_session_attrs=read-write', 'target_session_attrs'],
      ['?sslcert=%2Fsecret%2Fclient.crt', 'sslcert'],
    ]) {
      const error = expectBackupError(
        () => resolveDbConfig(env({ DATABASE_URL: `postgresql://u:pw@h/app${query}` }), 'prod'),
        EXIT.CONFIG,
        new RegExp(`: DATABASE_URL \\(from \\.env\\) sets \\?${name}=, which this tool does not support$`),
      );
      assert.doesNotMatch(`${error.details} ${error.hints.join(' ')}`, /10\.9|secret/);
    }
    expectBackupError(
      () => resolveDbConfig(env({ DATABASE_URL: 'postgresql://u@h1,h2/app' }), 'prod'),
      EXIT.CONFIG,
      /names several hosts/,
    );
    const c = resolveDbConfig(
      env({ DATABASE_URL: 'postgresql://u@h/app?sslmode=verify-ca&sslrootcert=%2Fca.crt' }),
      'prod',
    );
    assert.equal(c.sslrootcert, '/ca.crt');
    assert.equal(libpqEnv(c).PGSSLROOTCERT, '/ca.crt', 'pg_dump gets the same CA');
  });

  test('URL parameters whose only effect the tool sets itself (session names, connect timeout) are accepted', () => {
    const url = 'postgresql://u@h/app?application_name=web&connect_timeout=5&fallback_application_name=x';
    const c = resolveDbConfig(env({ DATABASE_URL: url }), 'prod');
    assert.deepEqual([c.host, c.database], ['h', 'app']);
  });

  test('a broken URL is reported without echoing it (it holds the password)', () => {
    const error = expectBackupError(
      () => resolveDbConfig(env({ DEV_DATABASE_URL: 'postgres://u:s3cret@[bad/db' }), 'dev'),
      EXIT.CONFIG,
      /DEV_DATABASE_URL/,
    );
    assert.doesNotMatch(`${error.details} ${error.hints.join(' ')}`, /s3cret/);
    expectBackupError(
      () => resolveDbConfig(env({ DATABASE_URL: 'mysql://h/db' }), 'prod'),
      EXIT.CONFIG,
      /postgresql:\/\//,
    );
    expectBackupError(
      () => resolveDbConfig(env({ DATABASE_URL: 'postgres://h:5432/' }), 'prod'),
      EXIT.CONFIG,
      /names no database/,
    );
  });

  test('invalid values name the variable and its file', () => {
    expectBackupError(
      () => resolveDbConfig(env({ DB_NAME: 'a', DB_PORT: 'abc' }, '.env.local'), 'prod'),
      EXIT.CONFIG,
      /DB_PORT \(from \.env\.local\) is "abc"/,
    );
    expectBackupError(
      () => resolveDbConfig(env({ DB_NAME: 'a', DB_HOST: 'two words' }), 'prod'),
      EXIT.CONFIG,
      /DB_HOST/,
    );
    expectBackupError(() => resolveDbConfig(env({ DB_NAME: '   ' }), 'prod'), EXIT.CONFIG, /DB_NAME .*blank/);
    expectBackupError(
      () => resolveDbConfig(env({ DB_NAME: 'a', DB_SSLMODE: 'sometimes' }), 'prod'),
      EXIT.CONFIG,
      /DB_SSLMODE/,
    );
  });

  test('an sslmode left unset is PGSSLMODE from the process environment, as libpq reads it', () => {
    const inherited = (vars: Record<string, string>) =>
      env({ PGSSLMODE: 'verify-full', ...vars }, 'the process environment');
    const sslmode = (vars: ReturnType<typeof env>, environment: 'dev' | 'prod' = 'prod') =>
      resolveDbConfig(vars, environment).sslmode;
    assert.equal(sslmode(inherited({ DB_NAME: 'a' })), 'verify-full');
    assert.equal(sslmode(inherited({ DEV_DB_NAME: 'a' }), 'dev'), 'verify-full');
    assert.equal(sslmode(inherited({ DATABASE_URL: 'postgresql://h/a' })), 'verify-full');
    assert.equal(sslmode(inherited({ DB_NAME: 'a', DB_SSLMODE: 'require' })), 'require', 'DB_SSLMODE wins');
    assert.equal(sslmode(inherited({ DATABASE_URL: 'postgresql://h/a?sslmode=disable' })), 'disable', 'the URL wins');
    assert.equal(sslmode(env({ DB_NAME: 'a', PGSSLMODE: 'verify-full' })), undefined, 'libpq reads no .env file');
    expectBackupError(
      () => sslmode(inherited({ DB_NAME: 'a', PGSSLMODE: 'sometimes' })),
      EXIT.CONFIG,
      /PGSSLMODE \(from the process environment\) is "sometimes", which is not an sslmode/,
    );
  });

  test('parsePort accepts 1-65535 only', () => {
    assert.equal(parsePort('5432', 'P'), 5432);
    assert.equal(parsePort(' 65535 ', 'P'), 65535);
    for (const bad of ['0', '65536', '-1', '54.32', '', '5432abc', '١٢٣']) {
      expectBackupError(() => parsePort(bad, 'P'), EXIT.CONFIG, /not a port number/);
    }
  });
});

describe('parsePgVersion', () => {
  test('reads the version pg_dump prints, without packager suffixes', () => {
    assert.deepEqual(parsePgVersion('pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)'), {
      version: '15.18',
      major: 15,
    });
    assert.deepEqual(parsePgVersion('pg_restore (PostgreSQL) 17.2'), { version: '17.2', major: 17 });
    assert.deepEqual(parsePgVersion('pg_dump (PostgreSQL) 18beta1'), { version: '18beta1', major: 18 });
    assert.deepEqual(parsePgVersion('pg_dump (PostgreSQL) 9.6.24'), { version: '9.6.24', major: 9.6 });
    assert.equal(parsePgVersion('something else'), undefined);
  });
});

describe('parseCompression', () => {
  test('defaults: gzip level 1 before pg_dump 16, zstd level 1 from 16', () => {
    assert.deepEqual(parseCompression(undefined, 15), { arg: '1', label: 'gzip:1' });
    assert.deepEqual(parseCompression(undefined, 16), { arg: 'zstd:1', label: 'zstd:1' });
  });

  test("accepts pg_dump's own values and labels them for the metadata", () => {
    assert.deepEqual(parseCompression('0', 15), { arg: '0', label: 'none' });
    assert.deepEqual(parseCompression('none', 15), { arg: '0', label: 'none' });
    assert.deepEqual(parseCompression('9', 15), { arg: '9', label: 'gzip:9' });
    assert.deepEqual(parseCompression('gzip:4', 15), { arg: '4', label: 'gzip:4' });
    assert.deepEqual(parseCompression('gzip', 15), { arg: '6', label: 'gzip:6' });
    assert.deepEqual(parseCompression('gzip:4', 16), { arg: 'gzip:4', label: 'gzip:4' });
    assert.deepEqual(parseCompression('zstd:19', 17), { arg: 'zstd:19', label: 'zstd:19' });
    assert.deepEqual(parseCompression('LZ4', 16), { arg: 'lz4', label: 'lz4' });
  });

  test('rejects what the installed pg_dump cannot do, and nonsense', () => {
    expectBackupError(() => parseCompression('zstd', 15), EXIT.CONFIG, /pg_dump 16 or newer/);
    expectBackupError(() => parseCompression('lz4:3', 15), EXIT.CONFIG, /pg_dump 16 or newer/);
    expectBackupError(() => parseCompression('zstd:23', 16), EXIT.CONFIG, /1 to 22/);
    for (const bad of ['10', 'gzip:10', 'brotli', '', ' ', '-1', '1; rm -rf /']) {
      expectBackupError(() => parseCompression(bad, 16), EXIT.CONFIG, /compress/);
    }
  });
});

describe('file names', () => {
  const at = new Date('2025-01-27T14:30:00.789Z');

  test('{database}_{env}_{YYYY-MM-DDTHH-MM-SSZ}.dump, with a matching metadata name', () => {
    assert.equal(backupFileName('project_chat_dev', 'dev', at), 'project_chat_dev_dev_2025-01-27T14-30-00Z.dump');
    assert.equal(
      metadataFileName('project_chat_dev_dev_2025-01-27T14-30-00Z.dump'),
      'project_chat_dev_dev_2025-01-27T14-30-00Z.metadata.json',
    );
    assert.equal(isoSeconds(at), '2025-01-27T14:30:00Z');
  });

  test('database names cannot escape the directory or hide the file', () => {
    assert.equal(fileNamePart('../../etc/passwd'), '%2E.%2F..%2Fetc%2Fpasswd');
    assert.equal(fileNamePart('.hidden'), '%2Ehidden');
    assert.equal(fileNamePart('données'), 'données');
    assert.ok(!backupFileName('a/b\\c', 'prod', at).includes('/'));
  });

  test('distinct databases get distinct file and lock names, even on case-insensitive file systems', () => {
    const names = [
      'a b',
      'a_b',
      'a%20b',
      'a.b',
      'a-b',
      'A_b',
      'a_B',
      'app',
      'App',
      'APP',
      'e\u0301',
      '\u00e9',
      'x'.repeat(63),
      'x'.repeat(62) + 'X',
      '~',
      'a~0d04bfeb',
    ];
    const folded = (name: string) => lockFileName(name, 'dev').toLowerCase().normalize('NFC');
    assert.equal(new Set(names.map(folded)).size, names.length, 'no two lock names collide, even folded');
    assert.equal(new Set(names.map((name) => backupFileName(name, 'dev', at).toLowerCase())).size, names.length);
    assert.equal(lockFileName('a b', 'dev'), 'a%20b_dev.lock');
    assert.equal(lockFileName('project_chat', 'prod'), 'project_chat_prod.lock', 'ordinary names read as before');
    for (const name of names) {
      assert.equal(databaseFromFileNamePart(fileNamePart(name)), name, `${name} round-trips`);
      assert.equal(parseBackupFileName(backupFileName(name, 'prod', at))?.database, name);
      assert.ok(Buffer.byteLength(backupFileName(name, 'prod', at) + '.metadata.json.tmp-0a1b2c3d') < 255);
    }
  });

  test('table_counts keys: plain in public, schema.table elsewhere, quoted only where a name could be misread', () => {
    assert.equal(tableKey('public', 'messages'), 'messages');
    assert.equal(tableKey('archive', 'old_messages'), 'archive.old_messages');
    assert.equal(tableKey('public', 'coll.t'), '"coll.t"');
    assert.equal(tableKey('coll', 't'), 'coll.t');
    assert.equal(tableKey('public', 'weird "quoted"; x'), 'weird "quoted"; x');
    const pairs: Array<[string, string]> = [
      ['public', 'coll.t'],
      ['coll', 't'],
      ['public', '"coll.t"'],
      ['"s', 't"'],
      ['public', 's.t'],
      ['s', 't'],
      ['s.t', 'u'],
      ['s', 't.u'],
      ['public', 'a'],
      ['a', 'public'],
      ['public', '"a"'],
      ['x', '"y"'],
      ['"x"', 'y'],
    ];
    assert.equal(
      new Set(pairs.map(([schema, table]) => tableKey(schema, table))).size,
      pairs.length,
      'every table its own key',
    );
  });
});

describe('output formatting', () => {
  test('formatBytes uses 1024-based units as the contract examples do', () => {
    assert.equal(formatBytes(0), '0 B');
    assert.equal(formatBytes(1023), '1023 B');
    assert.equal(formatBytes(52428800), '50.0 MB');
    assert.equal(formatBytes(1.5 * 1024 ** 3), '1.5 GB');
  });

  test('summarizeTables lists counts, the biggest first when there are many', () => {
    assert.equal(summarizeTables({ conversations: 150, messages: 3420 }), '2 (150 conversations, 3420 messages)');
    const many = Object.fromEntries(Array.from({ length: 8 }, (_, i) => [`t${i}`, i]));
    assert.equal(summarizeTables(many, 2), '8 (7 t7, 6 t6, and 6 more)');
  });
});

describe('secrets', () => {
  test('maskSecrets hides configured passwords and URL credentials', () => {
    assert.equal(
      maskSecrets('auth failed for pw hunter2 at postgres://u:hunter2@h/db', ['hunter2']),
      'auth failed for pw **** at postgres://u:****@h/db',
    );
    assert.equal(maskSecrets('see postgresql://app:other@h/db', []), 'see postgresql://app:****@h/db');
    assert.equal(
      maskSecrets('that password "ha" is ha, hat', ['ha']),
      'that password "****" is ****, hat',
      'a short secret only where it stands alone',
    );
    assert.equal(maskSecrets('pw1 and pw12', ['pw12', 'pw1']), '**** and ****', 'the longest secret first');
    assert.equal(maskSecrets('at postgres+psycopg2://app:SECRETQ9@h/app', []), 'at postgres+psycopg2://app:****@h/app');
    assert.equal(
      maskSecrets('at postgresql://app@h/app?sslmode=require&password=SECRETQ9 x', []),
      'at postgresql://app@h/app?sslmode=require&password=**** x',
    );
  });

  test('misreadDotenvValues: lines dotenv reads as less than they show (an unquoted #, stray quotes)', () => {
    const text = [
      'A=ab#cd',
      "B='ab#cd'",
      'C="ab#cd"',
      'D=plain',
      "E='ab' # a comment",
      'F="ab"cd"',
      'H=`it\'s #"x"`',
      'I=ab # a comment?',
      "J='unclosed",
      'K=',
    ].join('\n');
    assert.deepEqual([...misreadDotenvValues(text)].sort(), ['A', 'F', 'I', 'J']);
  });

  test('misreadDotenvValues: a \\n or \\r in double quotes, which dotenv reads as a line break', () => {
    const text = ['A="ab\\ncd"', "B='ab\\ncd'", 'C=ab\\ncd', 'D="ab\\rcd"', 'E="ab\\tcd"', 'F=`ab\\ncd`'].join('\n');
    assert.deepEqual([...misreadDotenvValues(text)].sort(), ['A', 'D']);
  });

  test("misreadDotenvValues: dotenv's `KEY: value` form too", () => {
    const text = ['A: ab#cd', "B: 'ab#cd'", 'C:  ab # a comment?', 'D: plain', 'E:ab#cd'].join('\n');
    assert.deepEqual([...misreadDotenvValues(text)].sort(), ['A', 'C']);
  });

  test('redact masks strings and keys at any depth before anything is serialised', () => {
    const secret = 'p"a\\ss';
    const document = { error: `bad ${secret}`, nested: [{ [secret]: secret }], count: 3, flag: true, none: null };
    const redacted = redact(document, [secret]);
    assert.deepEqual(redacted, { error: 'bad ****', nested: [{ '****': '****' }], count: 3, flag: true, none: null });
    assert.ok(!JSON.stringify(redacted).includes(JSON.stringify(secret).slice(1, -1)));
    // What masking the serialised text missed: the escaped form no longer contains the secret.
    assert.ok(maskSecrets(JSON.stringify(document), [secret]).includes(JSON.stringify(secret).slice(1, -1)));
  });

  test("redact keeps the tool's own field names and words, whatever the password, and masks them anywhere else", () => {
    const secrets = ['failure', 'dev', 'file', 'messages'];
    const record = { command: 'backup', outcome: 'failure', environment: 'dev', metadata_file: 'x', file: 'dev' };
    assert.deepEqual(redact({ ...record, details: 'database "failure" does not exist' }, secrets), {
      ...record,
      file: '****',
      details: 'database "****" does not exist',
    });
    // A word in a field that does not hold it, and a table's name as a key, are masked like any text.
    assert.deepEqual(redact({ environment: 'failure', error: 'dev', table_counts: { messages: 1 } }, secrets), {
      environment: '****',
      error: '****',
      table_counts: { '****': 1 },
    });
    // The tool's own times, checksums and cluster ids are data a password cannot be in, whatever it matches.
    const made = {
      time: '2026-11-24T03:06:43.788Z',
      backup_timestamp: '2026-11-24T03:04:51Z',
      checksum_sha256: `2026${'a'.repeat(60)}`,
      system_identifier: '7320262026',
    };
    assert.deepEqual(redact({ ...made, details: 'at 2026-11-24' }, ['2026']), { ...made, details: 'at ****-11-24' });
    assert.deepEqual(redact({ time: 'on 2026-11-24', checksum_sha256: '2026' }, ['2026']), {
      time: 'on ****-11-24',
      checksum_sha256: '****',
    });
    // Versions and the compression setting are the tool's too: a password "15", "1" or "gzip" leaves them whole.
    const versions = {
      pg_dump_version: '15.20',
      postgresql_version: '15.18',
      tool_version: '1.0.0',
      compression: 'gzip:1',
      extensions: [{ name: 'vector', version: '0.8.0' }],
    };
    assert.deepEqual(redact(versions, ['15', '1', 'gzip', '0']), {
      ...versions,
      extensions: [{ name: 'vector', version: '0.8.0' }],
    });
    assert.deepEqual(redact({ tool_version: 'v 15', compression: 'gzip 1' }, ['15', 'gzip']), {
      tool_version: 'v ****',
      compression: '**** 1',
    });
    // A warning stays one, printed as a warning.
    assert.deepEqual(problemLines(warningProblem('Notification failed', 'HTTP 500', ['warning'])), [
      '⚠ Notification failed: HTTP 500',
    ]);
  });

  test('one failure record: masked once in every field, then rendered the same way for text and --json', () => {
    const secret = 'p"a\\ss';
    const failure = new BackupError(
      EXIT.VERIFY_FAILED,
      'checksum mismatch',
      `read ${secret}`,
      [`retry without ${secret}`],
      {
        report: [`File: ${secret}.dump`],
        data: { metadata: { database_name: secret } },
        step: 'Backup verification',
      },
    );
    const problem = failureProblem(failure, 'Restore', [secret]);
    assert.ok(
      !JSON.stringify(problem).includes(JSON.stringify(secret).slice(1, -1)),
      'no field keeps the secret, escaped or not',
    );
    assert.equal(
      problem.headline,
      'Backup verification failed: checksum mismatch',
      'the step that failed names the headline, not the command',
    );
    assert.equal(problem.error, problem.headline);
    assert.deepEqual(problemLines(problem), [
      '✗ Backup verification failed: checksum mismatch',
      '',
      'File: ****.dump',
      '',
      'Error: read ****',
      '',
      'Troubleshooting:',
      '  1. retry without ****',
    ]);
    assert.deepEqual(problemDocument(problem), {
      metadata: { database_name: '****' },
      exit_code: EXIT.VERIFY_FAILED,
      error: 'Backup verification failed: checksum mismatch',
      details: 'read ****',
      hints: ['retry without ****'],
    });
    const own = failureProblem(new BackupError(EXIT.CONNECTION, 'Database connection error', 'refused'), 'Backup', []);
    assert.deepEqual(
      [own.headline, own.error],
      ['Backup failed: Database connection error', 'Database connection error'],
    );
    assert.deepEqual(problemLines(warningProblem('Notification failed', `HTTP 500 for ${secret}`, [secret])), [
      '⚠ Notification failed: HTTP 500 for ****',
    ]);
  });

  test('fetchFailure: the cause behind "fetch failed" (its message, else its code), never the URL', () => {
    const url = 'https://hb:pw@example.com/ping/uuid/start';
    const refused = Object.assign(new Error('connect ECONNREFUSED 10.0.0.5:443'), { code: 'ECONNREFUSED' });
    assert.equal(
      fetchFailure(new TypeError('fetch failed', { cause: refused }), url),
      'fetch failed: connect ECONNREFUSED 10.0.0.5:443',
    );
    const both = Object.assign(new AggregateError([refused], ''), { code: 'ECONNREFUSED' });
    assert.equal(fetchFailure(new TypeError('fetch failed', { cause: both }), url), 'fetch failed: ECONNREFUSED');
    assert.equal(fetchFailure(new TypeError(`URL with credentials: ${url}`), url), 'URL with credentials: the URL');
  });

  test("fetchFailure never names the URL's host, which some receivers make the secret (https://<token>.m.pipedream.net)", () => {
    const url = 'https://Eo9f3k2SecretToken.m.pipedream.net/';
    const notFound = Object.assign(new Error('getaddrinfo ENOTFOUND eo9f3k2secrettoken.m.pipedream.net'), {
      code: 'ENOTFOUND',
    });
    assert.equal(
      fetchFailure(new TypeError('fetch failed', { cause: notFound }), url),
      "fetch failed: getaddrinfo ENOTFOUND the URL's host",
    );
    const altnames = new Error(
      "Hostname/IP does not match certificate's altnames: Host: eo9f3k2secrettoken.m.pipedream.net. is not in the " +
        "cert's altnames: DNS:*.example.com",
    );
    assert.doesNotMatch(fetchFailure(new TypeError('fetch failed', { cause: altnames }), url), /secrettoken/i);
    // An address is no token: it says which one refused.
    const refused = new Error('connect ECONNREFUSED 127.0.0.1:8080');
    assert.equal(
      fetchFailure(new TypeError('fetch failed', { cause: refused }), 'http://127.0.0.1:8080/ping/T0KEN'),
      'fetch failed: connect ECONNREFUSED 127.0.0.1:8080',
    );
  });

  test('hookEnvironment: credentials dropped, any inherited value holding a secret masked, the record as given', () => {
    const record = {
      time: 't',
      host: 'h',
      command: 'backup' as const,
      outcome: 'failure' as const,
      exit_code: 3,
      duration_ms: 1,
      database: '****',
      error: 'e',
    };
    const env = hookEnvironment(
      record,
      {
        PATH: '/bin',
        DEV_DB_NAME: 'x-s3cret-x',
        PGPASSWORD: 's3cret',
        DATABASE_URL: 'postgres://u:p@h/d',
        BACKUP_NOTIFY_URL: 'https://hook',
        BACKUP_PING_URL: 'https://ping',
      },
      ['s3cret'],
    );
    assert.equal(env.PATH, '/bin');
    assert.equal(env.DEV_DB_NAME, 'x-****-x');
    for (const name of ['PGPASSWORD', 'DATABASE_URL', 'BACKUP_NOTIFY_URL', 'BACKUP_PING_URL'])
      assert.equal(env[name], undefined, name);
    assert.equal(env.BACKUP_DATABASE, '****');
    assert.equal(JSON.parse(env.BACKUP_RECORD!).exit_code, 3);
  });

  test('hookEnvironment leaves HOME, PATH and other inherited values alone, even holding a common-word password', () => {
    const record = { time: 't', host: 'h', command: 'backup' as const, outcome: 'failure' as const, exit_code: 3 };
    const base = { PATH: '/usr/local/bin:/bin', HOME: '/home/dump', DEV_DB_NAME: 'x-dump-x' };
    const env = hookEnvironment({ ...record, duration_ms: 1 }, base, ['dump', 'bin']);
    assert.equal(env.PATH, '/usr/local/bin:/bin');
    assert.equal(env.HOME, '/home/dump');
    assert.equal(env.DEV_DB_NAME, 'x-****-x');
  });

  test("hookEnvironment masks a password pasted into any of the tool's own settings, PG_BIN_DIR too", () => {
    const record = { time: 't', host: 'h', command: 'backup' as const, outcome: 'failure' as const, exit_code: 6 };
    const base = { PG_BIN_DIR: 'p"w$1é', BACKUP_LOG_FILE: '/l/p"w$1é', ENV_MODE: 'p"w$1é' };
    const env = hookEnvironment({ ...record, duration_ms: 1 }, base, ['p"w$1é']);
    assert.deepEqual([env.PG_BIN_DIR, env.BACKUP_LOG_FILE, env.ENV_MODE], ['****', '/l/****', '****']);
  });

  test('hookEnvironment cuts details the OS would refuse (128 KiB a variable), so the command still runs', () => {
    const record = { time: 't', host: 'h', command: 'check' as const, outcome: 'failure' as const, exit_code: 8 };
    const details = `${'x.dump: Size mismatch; '.repeat(6000)}é\u0001`;
    const env = hookEnvironment({ ...record, duration_ms: 1, details }, {}, []);
    for (const name of ['BACKUP_DETAILS', 'BACKUP_RECORD'])
      assert.ok(Buffer.byteLength(env[name]!) <= 64 * 1024, `${name}: ${Buffer.byteLength(env[name]!)} bytes`);
    assert.match(env.BACKUP_DETAILS!, /^x\.dump: Size mismatch; .* … \(\d+ more characters cut\)$/);
    const inRecord = JSON.parse(env.BACKUP_RECORD!);
    assert.equal(inRecord.details, env.BACKUP_DETAILS);
    assert.equal(inRecord.exit_code, 8);
    const short = hookEnvironment({ ...record, duration_ms: 1, details: 'short' }, {}, []);
    assert.equal(short.BACKUP_DETAILS, 'short');
    // A limit shorter than the note keeps none of the text, never all of it; astral characters are never split.
    assert.equal(cutText('a'.repeat(100), 10), ' … (100 more characters cut)');
    assert.equal(cutText('😀'.repeat(100), 40), `${'😀'.repeat(12)} … (88 more characters cut)`);
  });

  test('runSummary: one line, whatever a name holds, and short enough for Discord (2,000 characters)', () => {
    const record = { time: 't', host: 'vm', command: 'backup' as const, exit_code: 0, duration_ms: 1 };
    const forged = 'nl\n✓ backup_db: backup of prod OK';
    const ok = runSummary({ ...record, outcome: 'success', database: forged, environment: 'dev' });
    assert.equal(ok, '✓ backup_db: backup of nl\\n✓ backup_db: backup of prod OK (dev) succeeded on vm');
    const failed = runSummary({
      ...record,
      outcome: 'failure',
      exit_code: 8,
      database: 'app',
      environment: 'dev',
      error: 'Check failed',
      details: `first line\nsecond line\r\n${'a.dump: Size mismatch; '.repeat(200)}`,
    });
    assert.ok(!/[\u0000-\u001f]/.test(failed), failed);
    assert.ok([...failed].length <= 2000, String([...failed].length));
    assert.match(
      failed,
      /^✗ backup_db: backup of app \(dev\) FAILED on vm \(exit 8\): Check failed \(first line; second line; a\.dump/,
    );
    assert.match(failed, /… \(\d+ more characters cut\)$/);
  });

  test('hookEnvironment escapes the NUL bytes a variable cannot hold, and keeps the record whole in JSON', () => {
    const record = { time: 't', host: 'h', command: 'backup' as const, outcome: 'failure' as const, exit_code: 2 };
    const env = hookEnvironment({ ...record, duration_ms: 1, details: 'is "a\0b"', database: 'd\0' }, {}, []);
    assert.equal(env.BACKUP_DETAILS, 'is "a\\x00b"');
    assert.equal(env.BACKUP_DATABASE, 'd\\x00');
    assert.equal(JSON.parse(env.BACKUP_RECORD!).details, 'is "a\0b"');
    assert.ok(Object.values(env).every((value) => !value.includes('\0')));
  });

  test('maskSecrets masks a secret as shellWord quotes it in a hint, alone or inside a longer word', () => {
    for (const secret of ["s3cr'et-XyZ", "q'uo\\te\nNL\tTAB-Zz9"]) {
      for (const word of [secret, `${secret}.dump`]) {
        const hint = `createdb -h h -U ${shellWord(word)}`;
        assert.ok(!maskSecrets(hint, [secret]).includes(shellWord(secret).slice(2, -1)), hint);
        assert.match(maskSecrets(hint, [secret]), /\*\*\*\*/, hint);
      }
    }
    // Under 4 characters a secret is masked as a word only; its quoted form is long enough to be masked anywhere.
    for (const secret of ["a'b", "x'", "'1"]) {
      for (const [word, masked] of [
        [secret, "'****'"],
        [`${secret}.dump`, "'****.dump'"],
      ] as const) {
        assert.equal(maskSecrets(`createdb -U ${shellWord(word)}`, [secret]), `createdb -U ${masked}`, secret);
      }
    }
  });

  test('maskSecrets with kept values: a secret inside one is masked only elsewhere, one holding one is masked whole', () => {
    const kept = keptValues({ backup_file: '/b/app_dev_2025-01-01T00-00-00Z.dump', database: 'app' }, ['dump', 'app']);
    assert.deepEqual(
      maskSecrets('/b/app_dev_2025-01-01T00-00-00Z.dump: pg_dump said app', ['dump', 'app'], kept),
      '/b/app_dev_2025-01-01T00-00-00Z.dump: pg_**** said app',
    );
    assert.equal(maskSecrets('x happy1234 app', ['happy1234', 'app'], ['app']), 'x **** app');
  });

  test('secretsIn collects every *PASSWORD and the passwords inside URLs', () => {
    const secrets = secretsIn(
      env({ DB_PASSWORD: 'a', DEV_DB_PASSWORD: 'b', DATABASE_URL: 'postgres://u:c%21d@h/db', DB_USER: 'not-secret' }),
    );
    assert.deepEqual(secrets.sort(), ['a', 'b', 'c!d', 'c%21d']);
  });

  test("secretsIn takes a URL password up to the last '@' whole, unencoded '@' and '/' included", () => {
    const secrets = secretsIn(env({ DATABASE_URL: 'postgresql://postgres:Qw3@rTy8Ui/oP9aSdF@127.0.0.1:5432/app' }));
    assert.ok(secrets.includes('Qw3@rTy8Ui/oP9aSdF'), secrets.join(' '));
  });

  test('visibleControls shows C0, DEL and C1 characters as escapes and leaves the rest alone', () => {
    assert.equal(
      visibleControls('a\x1b[2J\x1b]52;c;eA==\x07 t\nn\r\t\x7f\x9b é 密'),
      'a\\x1b[2J\\x1b]52;c;eA==\\x07 t\\nn\\r\\t\\x7f\\x9b é 密',
    );
  });

  test('pg_dump gets the password in its environment and never in argv', () => {
    const config = resolveDbConfig(env({ DB_NAME: 'app', DB_PASSWORD: 'hunter2', DB_SSLMODE: 'require' }), 'prod');
    const childEnv = libpqEnv(config, 7);
    assert.equal(childEnv.PGPASSWORD, 'hunter2');
    assert.equal(childEnv.PGDATABASE, 'app');
    assert.equal(childEnv.PGSSLMODE, 'require');
    assert.equal(childEnv.PGCONNECT_TIMEOUT, '7');
    const args = pgDumpArgs('00000003-00000002-1', { arg: '1', label: 'gzip:1' }, 30_000);
    assert.ok(!args.join(' ').includes('hunter2'));
    assert.deepEqual(args, [
      '--format=custom',
      '--compress=1',
      '--no-owner',
      '--no-acl',
      '--snapshot=00000003-00000002-1',
      '--lock-wait-timeout=30000',
    ]);
  });

  test('pgpassLookup follows libpq: first match wins, * matches anything, \\: and \\\\ escape', () => {
    const target = { host: 'db', port: 5432, database: 'app', user: 'u' };
    const file = ['# comment', 'other:5432:app:u:nope', 'db:5432:app:u:pa\\:ss\\\\word', '*:*:*:*:fallback'].join('\n');
    assert.equal(pgpassLookup(file, target), 'pa:ss\\word');
    assert.equal(pgpassLookup(file, { ...target, user: 'x' }), 'fallback');
    assert.equal(pgpassLookup('db:5432:app:u:with:colon', target), 'with:colon');
    assert.equal(pgpassLookup('db:5432:other:u:pw', target), undefined);
  });
});

describe('parseDuration', () => {
  test('units ms, s, min, h, d; a bare number is seconds; 0 is no limit', () => {
    assert.deepEqual(
      ['500ms', '30s', '2min', '1h', '2d', '45', '0', '1.5s'].map((v) => parseDuration(v)),
      [500, 30_000, 120_000, 3_600_000, 172_800_000, 45_000, 0, 1500],
    );
  });
  test('beyond the limit (PostgreSQL timeouts: about 24.8 days) or not a duration: refused', () => {
    for (const value of ['99999999999h', '25d', '-1s', '1 week', '', 'abc', '5 m'])
      assert.throws(() => parseDuration(value), /Use a duration/, value);
    assert.equal(parseDuration('24d'), 24 * 86_400_000);
    assert.throws(() => parseDuration('2h', 3_600_000), /up to 1 h/);
  });
  test('only 0 is no limit: a duration under 1 ms is 1 ms, never 0; the others round to the nearest ms', () => {
    assert.deepEqual(
      ['0.4ms', '0.0004s', '0.00001min', '0.5ms', '1.1s', '0.3s', '0.0', '0ms'].map((v) => parseDuration(v)),
      [1, 1, 1, 1, 1100, 300, 0, 0],
    );
    // A backup's age is told in whole seconds (its name's): a --max-age under 1 s is refused, not reported as 0.
    for (const value of ['0.4ms', '500ms', '0.9s', '0']) assert.throws(() => parseMaxAge(value), /at least 1s/, value);
    assert.equal(parseMaxAge('1s'), 1000);
  });
});

describe('restores: session settings, memory sizes, extension versions', () => {
  test('restoreSessionSettings: 1 GB of index-build memory shared by the jobs, at least 128 MB each, or as given', () => {
    assert.equal(restoreSessionSettings(15, 1).maintenance_work_mem, '1GB');
    assert.equal(restoreSessionSettings(15, 2).maintenance_work_mem, '512MB');
    assert.equal(restoreSessionSettings(15, 16).maintenance_work_mem, '128MB');
    assert.equal(restoreSessionSettings(15, 4, 96 * 1024).maintenance_work_mem, '96MB');
    assert.equal(restoreSessionSettings(15, 2).synchronous_commit, 'off');
    assert.ok('max_parallel_maintenance_workers' in restoreSessionSettings(11, 1));
    assert.ok(
      !('max_parallel_maintenance_workers' in restoreSessionSettings(10, 1)),
      'PostgreSQL 10 has no such setting',
    );
  });
  test("parseMemory and formatMemory use PostgreSQL's units", () => {
    assert.deepEqual(
      ['512MB', '1GB', '65536kB', '2gb', '300'].map(parseMemory),
      [524288, 1048576, 65536, 2097152, 307200],
    );
    for (const bad of ['0', '512KB-ish', '-1GB', '3TB', '2TB', '1000kB', ''])
      assert.throws(() => parseMemory(bad), /Use a size such as 256MB or 1GB \(from 1MB to 2047GB\)/, bad);
    // The limits the message names are accepted: PostgreSQL's int of kB ends 1 kB short of 2 TB.
    assert.deepEqual(['1MB', '2047GB', '2147483647kB'].map(parseMemory), [1024, 2146435072, 2147483647]);
    assert.deepEqual([1048576, 524288, 1500].map(formatMemory), ['1GB', '512MB', '1500kB']);
  });
  test('compareVersions compares extension versions part by part', () => {
    assert.equal(compareVersions('0.8.0', '0.5.1'), 1);
    assert.equal(compareVersions('1.10', '1.9'), 1);
    assert.equal(compareVersions('1.5', '1.5.0'), 0);
    assert.equal(compareVersions('1.7', '1.8'), -1);
    assert.equal(compareVersions('2.0-beta', '2.0-alpha'), 1);
  });
  test('--maintenance-work-mem only goes with a restore or the drill', () => {
    assert.equal(chooseMode({ restore: 'x.dump', targetDb: 'copy', maintenanceWorkMem: 1024 }).command, 'restore');
    assert.equal(chooseMode({ verify: 'x.dump', restoreTest: true, maintenanceWorkMem: 1024 }).command, 'drill');
    assert.throws(() => chooseMode({ maintenanceWorkMem: 1024 }), /--maintenance-work-mem only applies to --restore/);
  });
  test('--dry-run and the --keep-* rules only go with a backup or --prune', () => {
    for (const option of ['dryRun', 'keepLast', 'keepDaily', 'keepWeekly', 'keepMonthly'] as const) {
      const given = { [option]: option === 'dryRun' ? true : 3 };
      assert.equal(chooseMode(given).command, 'backup', option);
      assert.equal(chooseMode({ prune: true, ...given }).command, 'prune', option);
      for (const other of [
        { restore: 'x.dump', targetDb: 'copy', clean: true as const },
        { verify: 'x.dump' },
        { verify: 'x.dump', restoreTest: true as const },
        { list: true as const },
        { list: true as const, verify: true as const },
        { check: true as const, maxAge: 1000 },
      ]) {
        const message = new RegExp(`--${option.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} only applies to`);
        expectBackupError(() => chooseMode({ ...other, ...given }), EXIT.CONFIG, message);
      }
    }
  });
});

describe("databaseFailure: every database error of every command to the contract's codes", () => {
  const pgError = (code: string | undefined, message: string, extra: Record<string, unknown> = {}) =>
    Object.assign(new Error(message), code ? { code } : {}, extra);
  const server = { host: 'db.internal', port: 5432 };
  const cases: Array<[string, Error, number, RegExp]> = [
    [
      'its own session terminated',
      pgError('57P01', 'terminating connection due to administrator command'),
      EXIT.CONNECTION,
      /^Database connection lost$/,
    ],
    [
      'the connection dropped under a query',
      pgError(undefined, 'Connection terminated unexpectedly'),
      EXIT.CONNECTION,
      /^Database connection lost$/,
    ],
    [
      'a foreign server unreachable',
      pgError('08001', 'could not connect to server "remote"'),
      EXIT.CONNECTION,
      /^A foreign server could not be reached$/,
    ],
    [
      'too many connections',
      pgError('53300', 'sorry, too many clients already'),
      EXIT.CONNECTION,
      /no free connection/,
    ],
    [
      'two restores creating one target',
      pgError('23505', 'duplicate key value violates unique constraint "pg_database_datname_index"', {
        constraint: 'pg_database_datname_index',
      }),
      EXIT.CONFIG,
      /created by someone else at the same moment/,
    ],
    [
      'CREATE DATABASE of a name that exists',
      pgError('42P04', 'database "x" already exists'),
      EXIT.CONFIG,
      /created by someone else/,
    ],
    [
      'no permission',
      pgError('42501', 'permission denied for table t'),
      EXIT.PERMISSION,
      /^The database user lacks a privilege$/,
    ],
    [
      'a lock not granted in time',
      pgError('55P03', 'canceling statement due to lock timeout'),
      EXIT.BACKUP_FAILED,
      /^A table is locked$/,
    ],
    ['the server disk full', pgError('53100', 'could not extend file'), EXIT.DISK_SPACE, /disk is full/],
    ['a deadlock', pgError('40P01', 'deadlock detected'), EXIT.BACKUP_FAILED, /conflict/],
    [
      'a listed table dropped before its lock (DDL at the start of a backup)',
      pgError('42P01', 'relation "public.t12" does not exist'),
      EXIT.BACKUP_FAILED,
      /^A table was dropped while this run used it$/,
    ],
    ['anything else', pgError('XX000', 'internal error'), EXIT.BACKUP_FAILED, /^A database query failed$/],
  ];
  for (const [what, error, exitCode, title] of cases) {
    test(what, () => {
      const failure = databaseFailure(error, server)!;
      assert.equal(failure.exitCode, exitCode);
      assert.match(failure.title, title);
      assert.ok(failure.hints.length > 0, 'hints say what to do');
      assert.match(failure.details, new RegExp(error.message.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')));
    });
  }
  test("the server's lock table full (53200): names max_locks_per_transaction and why a backup needs twice the tables, passes on the server's hint", () => {
    const error = pgError('53200', 'out of shared memory', {
      hint: 'You might need to increase "max_locks_per_transaction".',
    });
    const failure = databaseFailure(error, server)!;
    assert.equal(failure.exitCode, EXIT.BACKUP_FAILED);
    assert.equal(failure.title, 'The database server ran out of lock space');
    assert.equal(failure.details, 'out of shared memory (SQLSTATE 53200)');
    assert.equal(failure.hints[0], 'The server says: You might need to increase "max_locks_per_transaction".');
    assert.match(failure.hints.join('\n'), /twice the number of tables and partitions/);
    assert.match(failure.hints.join('\n'), /pg_dump's session and the one counting rows/);
    assert.match(failure.hints.join('\n'), /ALTER SYSTEM SET max_locks_per_transaction/);
    assert.equal(databaseFailure(pgError('53200', 'out of shared memory'))!.hints[0]!.startsWith('The server'), false);
  });

  test('not a database failure: an errno code such as EPIPE is not a SQLSTATE', () => {
    assert.equal(databaseFailure(Object.assign(new Error('write failed'), { code: 'EACCES' })), undefined);
    assert.equal(databaseFailure(new Error('something else')), undefined);
    assert.equal(
      databaseFailure(Object.assign(new Error('write EPIPE'), { code: 'EPIPE' }))?.title,
      'Database connection lost',
    );
  });
});

describe('error classification', () => {
  const config: DbConfig = {
    environment: 'dev',
    host: 'db',
    port: 5432,
    database: 'app',
    user: 'u',
    origin: {
      host: 'DEV_DB_HOST (from .env)',
      port: 'DEV_DB_PORT',
      database: 'DEV_DB_NAME (from .env.local)',
      user: 'DEV_DB_USER',
      password: 'DEV_DB_PASSWORD',
    },
  };
  const withCode = (message: string, code: string) => Object.assign(new Error(message), { code });

  test('each connection failure gets its own title, exit 3, and names the variable to check', () => {
    const cases: Array<[Error, RegExp, RegExp]> = [
      [withCode('password authentication failed for user "u"', '28P01'), /authentication failed/, /DEV_DB_PASSWORD/],
      [withCode('database "app" does not exist', '3D000'), /does not exist/, /DEV_DB_NAME \(from \.env\.local\)/],
      [withCode('getaddrinfo ENOTFOUND db', 'ENOTFOUND'), /host not found/, /DEV_DB_HOST/],
      [withCode('connect ECONNREFUSED 10.0.0.1:5432', 'ECONNREFUSED'), /refused/, /pg_isready/],
      [new Error('timeout expired'), /did not answer/, /firewall/i],
      [withCode('too many clients', '53300'), /connection error/, /psql/],
    ];
    for (const [cause, title, hint] of cases) {
      const error = connectionError(cause, config);
      assert.equal(error.exitCode, EXIT.CONNECTION);
      assert.match(error.title, title);
      assert.match(error.hints.join('\n'), hint);
      assert.match(error.details, /^connection to server at "db", port 5432 failed: /);
    }
  });

  test('EEXIST means "a path component is not a directory" only from mkdir', () => {
    const failed = (syscall: string) =>
      Object.assign(new Error(`EEXIST: file already exists, ${syscall}`), { code: 'EEXIST', syscall });
    assert.match(fileSystemError(failed('mkdir'), 'Cannot create', '/b').title, /a path component is not a directory/);
    const linked = fileSystemError(failed('link'), 'Cannot create the lock file', '/b');
    assert.equal(linked.exitCode, EXIT.PERMISSION);
    assert.equal(linked.title, 'Cannot create the lock file');
    assert.match(linked.details, /EEXIST/);
  });

  test('EIO is a failing disk, never a matter of ownership and permissions', () => {
    const eio = Object.assign(new Error('EIO: i/o error, fsync'), { code: 'EIO', syscall: 'fsync' });
    const error = fileSystemError(eio, 'A file operation failed', '/b');
    assert.match(error.details, /EIO/);
    assert.doesNotMatch(error.hints.join('\n'), /ownership|permissions|chown/);
    assert.match(error.hints.join('\n'), /dmesg/);
  });

  test("pg_dump failures carry pg_dump's own message and the right exit code", () => {
    const failed = (stderr: string) =>
      pgDumpError(Object.assign(new Error('Command failed with exit code 1'), { stderr }));
    const cases: Array<[string, number]> = [
      ['pg_dump: error: query failed: ERROR:  permission denied for table secrets', EXIT.PERMISSION],
      ['pg_dump: error: aborting because of server version mismatch', EXIT.TOOL_NOT_FOUND],
      ['pg_dump: error: query failed: ERROR:  canceling statement due to lock timeout', EXIT.BACKUP_FAILED],
      ['pg_dump: error: connection to server lost', EXIT.BACKUP_FAILED],
    ];
    for (const [stderr, exitCode] of cases) {
      const error = failed(stderr);
      assert.equal(error.exitCode, exitCode, stderr);
      assert.equal(error.details, stderr);
      assert.ok(error.hints.length > 0);
    }
  });

  test('a privilege a backup lacks gets the GRANT for what the message names, and no hint about restores', () => {
    const failed = (stderr: string) =>
      pgDumpError(Object.assign(new Error('Command failed with exit code 1'), { stderr }), '/b', 'bk');
    const largeObject = failed(
      'pg_dump: error: could not open large object 16390: ERROR:  permission denied for large object 16390',
    );
    assert.equal(largeObject.exitCode, EXIT.PERMISSION);
    assert.match(largeObject.hints[0]!, /^To back up: GRANT SELECT ON LARGE OBJECT 16390 TO "bk" \(as a superuser/);
    assert.doesNotMatch(largeObject.hints.join('\n'), /ALL TABLES|To restore/);
    const table = failed('pg_dump: error: query failed: ERROR:  permission denied for table secrets');
    assert.match(table.hints.join('\n'), /GRANT SELECT ON ALL TABLES IN SCHEMA/);
    assert.doesNotMatch(table.hints.join('\n'), /To restore/);
    // A restore's own session meets other privileges: those keep the restore hint.
    const createDatabase = databaseFailure(
      Object.assign(new Error('permission denied to create database'), { code: '42501' }),
    )!;
    assert.equal(createDatabase.exitCode, EXIT.PERMISSION);
    assert.match(createDatabase.hints.join('\n'), /To restore: the user needs CREATEDB/);
  });

  test("pg_dump's table lock not granted within --lock-wait-timeout (a statement timeout on LOCK TABLE): a locked table", () => {
    const failed = (stderr: string) =>
      pgDumpError(Object.assign(new Error('Command failed with exit code 1'), { stderr }));
    const lockWait =
      'pg_dump: error: query failed: ERROR:  canceling statement due to statement timeout\n' +
      'pg_dump: detail: Query was: LOCK TABLE public.a_tr IN ACCESS SHARE MODE';
    for (const stderr of [lockWait, 'pg_dump: error: query failed: ERROR:  canceling statement due to lock timeout']) {
      const error = failed(stderr);
      assert.equal(error.exitCode, EXIT.BACKUP_FAILED);
      assert.equal(error.title, 'A table is locked', stderr);
      assert.equal(error.details, stderr);
      assert.match(error.hints.join('\n'), /--lock-wait-timeout/);
    }
    const otherTimeout = failed(
      'pg_dump: error: query failed: ERROR:  canceling statement due to statement timeout\n' +
        'pg_dump: detail: Query was: SELECT pg_catalog.pg_get_viewdef(16390)',
    );
    assert.equal(otherTimeout.title, 'pg_dump failed', 'a statement timeout elsewhere is no lock');
  });

  test("pg_dump out of lock space: the same error as the tool's own session gets, the server's hint passed on", () => {
    const stderr =
      'pg_dump: error: query failed: ERROR:  out of shared memory\n' +
      'HINT:  You might need to increase "max_locks_per_transaction".\n' +
      'pg_dump: detail: Query was: LOCK TABLE public.t4021 IN ACCESS SHARE MODE';
    const error = pgDumpError(Object.assign(new Error('Command failed with exit code 1'), { stderr }));
    assert.equal(error.exitCode, EXIT.BACKUP_FAILED);
    assert.equal(error.title, 'The database server ran out of lock space');
    assert.equal(error.details, stderr);
    assert.equal(error.hints[0], 'The server says: You might need to increase "max_locks_per_transaction".');
    assert.match(error.hints.join('\n'), /twice the number of tables and partitions/);
  });

  test('the two failures only --jobs meets get hints about --jobs, not about lock timeouts or pg_dump -Fc', () => {
    const failed = (stderr: string) =>
      pgDumpError(Object.assign(new Error('Command failed with exit code 1'), { stderr }));
    // pg_dump 15's words, captured from real runs: ALTER TABLE t4 queued behind the parent's lock...
    const ddl = failed(
      'pg_dump: error: could not obtain lock on relation "public.t4"\nThis usually means that someone requested an ' +
        'ACCESS EXCLUSIVE lock on the table after the pg_dump parent process had gotten the initial ACCESS SHARE lock ' +
        'on the table.\npg_dump: error: a worker process died unexpectedly',
    );
    assert.equal(ddl.exitCode, EXIT.BACKUP_FAILED);
    assert.equal(ddl.title, 'DDL on a table aborted the parallel dump');
    assert.doesNotMatch(ddl.hints.join('\n'), /--lock-wait-timeout/);
    assert.match(ddl.hints.join('\n'), /when no DDL runs.*, or without --jobs/);
    // ...and --jobs 8 for a role WITH CONNECTION LIMIT 4; the server-wide limit is worded differently.
    const role =
      'pg_dump: error: reconnection failed: connection to server at "127.0.0.1", port 35927 failed: FATAL:  ' +
      'too many connections for role "limited"\npg_dump: error: a worker process died unexpectedly';
    const server = role.replace('too many connections for role "limited"', 'sorry, too many clients already');
    for (const error of [failed(role), failed(server)]) {
      assert.equal(error.exitCode, EXIT.CONNECTION);
      assert.equal(error.title, 'No free connection for pg_dump');
      assert.match(
        error.hints[0]!,
        /must allow this tool's session and pg_dump's: one, or N \+ 1 with --jobs N \(then lower --jobs\)/,
      );
      assert.doesNotMatch(error.hints.join('\n'), /pg_dump -Fc/);
    }
  });

  test("toolConnectionError: a client tool's session ended by its server, or none to be had, is exit 3", () => {
    const ended = [
      'pg_restore: error: COPY failed for table "t": FATAL:  terminating connection due to administrator command',
      'pg_restore: error: could not execute query: server closed the connection unexpectedly',
      'pg_restore: error: connection to server at "db" (10.0.0.5), port 5432 failed: FATAL:  the database system is ' +
        'shutting down',
      'pg_dump: error: Dumping the contents of table "t" failed: PQgetResult() failed.\npg_dump: detail: Error message ' +
        'from server: SSL SYSCALL error: EOF detected',
      // A --jobs worker connecting while the server is down, by TCP and by its socket.
      'pg_restore: error: connection to server at "127.0.0.1", port 5432 failed: Connection refused\n\tIs the server ' +
        'running on that host and accepting TCP/IP connections?',
      'pg_restore: error: connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: No such file or ' +
        'directory\n\tIs the server running locally and accepting connections on that socket?',
    ];
    for (const details of ended) {
      const error = toolConnectionError('pg_restore', details);
      assert.equal(error?.exitCode, EXIT.CONNECTION, details);
      assert.equal(error?.title, 'pg_restore lost its connection to the server');
    }
    const full = toolConnectionError('pg_restore', 'FATAL:  sorry, too many clients already');
    assert.equal(full?.title, 'No free connection for pg_restore');
    assert.match(full!.hints[0]!, /session and pg_restore's: one, or N with --jobs N \(then lower --jobs\)$/);
    // A standby's conflict ends the session too, but the server is there: its own failure, not a lost connection.
    const conflict = 'FATAL:  terminating connection due to conflict with recovery';
    for (const other of ['ERROR:  relation "t" does not exist', 'ERROR:  permission denied for table t', conflict])
      assert.equal(toolConnectionError('pg_restore', other), undefined, other);
  });
});

describe('metadataProblems', () => {
  const valid = {
    backup_timestamp: '2025-01-27T14:30:00Z',
    environment: 'dev',
    database_name: 'project_chat_dev',
    backup_file: 'project_chat_dev_dev_2025-01-27T14-30-00Z.dump',
    backup_size_bytes: 52428800,
    checksum_sha256: 'a'.repeat(64),
    table_counts: { conversations: 150 },
    pg_dump_version: '15.1',
    postgresql_version: '15.11',
  };

  test('the data model example is valid, with or without extra fields', () => {
    assert.deepEqual(metadataProblems(valid, valid.backup_file), []);
    assert.deepEqual(
      metadataProblems({
        ...valid,
        compression: 'gzip:1',
        table_data_oids: { conversations: [16384] },
        system_identifier: '7312345678901234567',
      }),
      [],
    );
    assert.deepEqual(metadataProblems({ ...valid, backup_timestamp: '2025-01-27T14:30:00.123+01:00' }), []);
  });

  test('every rule of the data model is enforced, each with its own message', () => {
    const cases: Array<[Record<string, unknown>, RegExp]> = [
      [{ backup_timestamp: '2025-01-27 14:30' }, /backup_timestamp must be an ISO 8601/],
      [{ backup_timestamp: '2025-13-45T99:99:99Z' }, /backup_timestamp must be an ISO 8601/],
      [{ environment: 'Dev' }, /environment must be "dev" or "prod"/],
      [{ checksum_sha256: 'g'.repeat(64) }, /checksum_sha256 must be 64 hexadecimal/],
      [{ checksum_sha256: 'a'.repeat(63) }, /checksum_sha256 must be 64 hexadecimal/],
      [{ backup_size_bytes: 0 }, /backup_size_bytes must be a positive integer/],
      [{ backup_size_bytes: 1.5 }, /backup_size_bytes must be a positive integer/],
      [{ backup_size_bytes: '100' }, /backup_size_bytes must be a positive integer/],
      [{ table_counts: {} }, /table_counts must map at least one table/],
      [{ table_counts: { t: -1 } }, /table_counts must map/],
      [{ table_counts: [] }, /table_counts must map/],
      [{ database_name: '' }, /database_name must be a non-empty string/],
      [{ pg_dump_version: 15 }, /pg_dump_version must be a version string/],
      [{ table_data_oids: { t: ['x'] } }, /table_data_oids must map/],
      [{ system_identifier: 7312345678901234567 }, /system_identifier must be a string of digits/],
      [{ system_identifier: '' }, /system_identifier must be a string of digits/],
      [{ system_identifier: '12a' }, /system_identifier must be a string of digits/],
    ];
    for (const [change, problem] of cases) {
      const problems = metadataProblems({ ...valid, ...change });
      assert.equal(problems.length, 1, `${JSON.stringify(change)} → ${problems.join('; ')}`);
      assert.match(problems[0]!, problem);
    }
  });

  test('a timestamp must name a date and time that exist: none that V8 would roll over, no leap second', () => {
    for (const impossible of [
      '2025-02-29T12:00:00Z',
      '2025-04-31T00:00:00Z',
      '2100-02-29T00:00:00Z',
      '2025-01-01T24:00:00Z',
      '2025-01-01T12:60:00Z',
      '2016-12-31T23:59:60Z',
      '2025-00-10T00:00:00Z',
      '2025-01-00T00:00:00Z',
    ]) {
      const problems = metadataProblems({ ...valid, backup_timestamp: impossible });
      assert.equal(problems.length, 1, impossible);
      assert.match(problems[0]!, /backup_timestamp must be an ISO 8601 timestamp of a date and time that exist/);
      const record = { time: impossible, ok: true, duration_ms: 1, server: 's', server_version: '15', tables: 1 };
      assert.equal(metadataProblems({ ...valid, last_restore_test: { ...record, mismatches: [] } }).length, 1);
    }
    for (const real of ['2024-02-29T12:00:00Z', '2000-02-29T23:59:59.999+14:00', '2025-12-31T23:59:59-12:00'])
      assert.deepEqual(metadataProblems({ ...valid, backup_timestamp: real }), [], real);
  });

  test('missing fields are each named; non-objects are rejected; backup_file must match the file', () => {
    const { checksum_sha256: _c, table_counts: _t, ...partial } = valid;
    assert.deepEqual(metadataProblems(partial), ['checksum_sha256 is missing', 'table_counts is missing']);
    assert.deepEqual(metadataProblems([1, 2]), ['it is not a JSON object']);
    assert.deepEqual(metadataProblems(null), ['it is not a JSON object']);
    assert.match(metadataProblems(valid, 'other.dump')[0]!, /backup_file is ".*" but the file is named "other\.dump"/);
  });

  test('what a name of this tool says must agree with the metadata: the same second, environment and database', () => {
    const agree = [
      { ...valid, backup_timestamp: '2025-01-27T14:30:00.999Z' },
      { ...valid, backup_timestamp: '2025-01-27T15:30:00+01:00' },
      { ...valid, database_name: 'Chat', backup_file: `${fileNamePart('Chat')}_dev_2025-01-27T14-30-00Z.dump` },
      { ...valid, backup_file: 'written-by-another-tool.dump' },
    ];
    for (const metadata of agree)
      assert.deepEqual(metadataProblems(metadata, metadata.backup_file), [], metadata.backup_file);
    const disagree: Array<[Record<string, unknown>, RegExp]> = [
      [
        { backup_timestamp: '2025-01-27T14:30:01Z' },
        /^backup_timestamp is "2025-01-27T14:30:01Z" but the file is named for 2025-01-27T14:30:00Z$/,
      ],
      [{ backup_timestamp: '2025-01-27T14:29:59.999Z' }, /^backup_timestamp is/],
      [{ backup_timestamp: '2025-01-27T14:30:00+01:00' }, /^backup_timestamp is/],
      [{ environment: 'prod' }, /^environment is "prod" but the file is named for "dev"$/],
      [
        { database_name: 'project_chat' },
        /^database_name is "project_chat" but the file is named for "project_chat_dev"$/,
      ],
    ];
    for (const [change, problem] of disagree) {
      const problems = metadataProblems({ ...valid, ...change }, valid.backup_file);
      assert.equal(problems.length, 1, `${JSON.stringify(change)} → ${problems.join('; ')}`);
      assert.match(problems[0]!, problem);
    }
  });
});

describe('archive table of contents', () => {
  const toc = [
    ';     dbname: app',
    '224; 1259 16670 TABLE public events postgres',
    '225; 1259 16673 TABLE public events_2024 postgres',
    '228; 1259 16692 TABLE public Mixed Case Table postgres',
    '3399; 0 16673 TABLE DATA public events_2024 postgres',
    '3402; 0 16692 TABLE DATA public Mixed Case Table postgres',
    '3401; 0 16684 TABLE DATA archive old_messages postgres',
    '3416; 0 0 SEQUENCE SET public conversations_id_seq postgres',
  ].join('\n');
  const entries = tocTableEntries(toc);

  test('tocTableEntries reads TABLE and TABLE DATA lines with their OIDs', () => {
    assert.deepEqual(
      entries.map((e) => [e.kind, e.oid]),
      [
        ['TABLE', 16670],
        ['TABLE', 16673],
        ['TABLE', 16692],
        ['TABLE DATA', 16673],
        ['TABLE DATA', 16692],
        ['TABLE DATA', 16684],
      ],
    );
    assert.equal(entries[2]!.tag, 'public Mixed Case Table postgres');
  });

  test('with recorded OIDs, every data-holding relation needs TABLE DATA (partitions through their leaves)', () => {
    const metadata = {
      table_counts: { events: 1, 'Mixed Case Table': 3, 'archive.old_messages': 2 },
      table_data_oids: { events: [16673], 'Mixed Case Table': [16692], 'archive.old_messages': [16684] },
    };
    assert.deepEqual(tablesWithoutData(metadata, entries), []);
    assert.deepEqual(
      tablesWithoutData(
        { ...metadata, table_data_oids: { ...metadata.table_data_oids, events: [16673, 16678] } },
        entries,
      ),
      ['events'],
    );
  });

  test('without OIDs (metadata from elsewhere), tables are matched by name, schema.table or public', () => {
    assert.deepEqual(
      tablesWithoutData({ table_counts: { 'Mixed Case Table': 3, 'archive.old_messages': 2, events: 0 } }, entries),
      [],
    );
    assert.deepEqual(tablesWithoutData({ table_counts: { missing: 1, 'archive.missing': 1, Mixed: 1 } }, entries), [
      'missing',
      'archive.missing',
      'Mixed',
    ]);
  });
});

describe('listing', () => {
  test('parseBackupFileName reads database, environment and timestamp from a name', () => {
    assert.deepEqual(parseBackupFileName('project_chat_dev_dev_2025-01-27T14-30-00Z.dump'), {
      database: 'project_chat_dev',
      environment: 'dev',
      timestamp: '2025-01-27T14:30:00Z',
    });
    assert.deepEqual(parseBackupFileName('app_prod_2025-01-27T14-30-00Z.dump.partial')?.environment, 'prod');
    assert.equal(parseBackupFileName('random.dump'), undefined);
  });

  test('sortNewestFirst: by timestamp, ties by modification time, undated last', () => {
    const e = (file: string, timestamp: string | undefined, modifiedMs: number) => ({ file, timestamp, modifiedMs });
    const sorted = sortNewestFirst([
      e('old', '2024-01-01T00:00:00Z', 5),
      e('undated', undefined, 99),
      e('tie-early', '2025-01-01T00:00:00Z', 1),
      e('tie-late', '2025-01-01T00:00:00Z', 2),
      e('offset', '2025-01-01T00:30:00+01:00', 0),
    ]);
    assert.deepEqual(
      sorted.map((x) => x.file),
      ['tie-late', 'tie-early', 'offset', 'old', 'undated'],
    );
  });

  test('listingLines pads columns to their content and summarises', () => {
    const entry = (file: string, status: 'verified' | 'incomplete', database: string) => ({
      file,
      status,
      timestamp: '2025-01-27T15:00:00Z',
      environment: 'prod',
      database,
      sizeBytes: 131386982,
      modifiedMs: 0,
      problems: [],
    });
    const lines = listingLines({
      directory: '/b',
      exists: true,
      fullCheck: false,
      backups: [entry('a.dump', 'verified', 'project_chat_prod')],
      incomplete: [entry('b.dump.partial', 'incomplete', 'p')],
    });
    assert.deepEqual(lines.slice(0, 5), [
      'Backup Files (/b/):',
      '',
      'Timestamp             Environment  Database           Size      Status',
      '2025-01-27T15:00:00Z  prod         project_chat_prod  125.3 MB  ✓ Verified',
      '2025-01-27T15:00:00Z  prod         p                  125.3 MB  ✗ Incomplete',
    ]);
    assert.match(lines.at(-1)!, /^1 backup, 1 incomplete file/);
    const wide = listingLines({
      directory: '/b',
      exists: true,
      fullCheck: false,
      backups: [entry('a.dump', 'verified', '日本語'), entry('c.dump', 'verified', 'app')],
      incomplete: [],
    });
    assert.deepEqual(wide.slice(3, 5), [
      '2025-01-27T15:00:00Z  prod         日本語    125.3 MB  ✓ Verified',
      '2025-01-27T15:00:00Z  prod         app       125.3 MB  ✓ Verified',
    ]);
    assert.deepEqual(
      listingLines({ directory: '/none', exists: false, fullCheck: false, backups: [], incomplete: [] }),
      ['No backups: /none/ does not exist yet.'],
    );
  });
});

describe('paths: ~ and how paths are shown', () => {
  test('expandHome expands a leading ~ or ~/ as a shell does, and nothing else', () => {
    assert.equal(expandHome('~'), os.homedir());
    assert.equal(expandHome('~/bk'), path.join(os.homedir(), 'bk')); // HOME=/ gives /bk, not //bk
    for (const kept of ['~user/bk', 'a/~/bk', './~/bk', '/~', '~bk']) assert.equal(expandHome(kept), kept);
  });

  test('shellWord: a path a shell reads back as one word, unchanged', () => {
    assert.equal(shellWord('/var/backups/db_1.dump'), '/var/backups/db_1.dump');
    assert.equal(shellWord('/tmp/sp ace/b'), "'/tmp/sp ace/b'");
    assert.equal(shellWord("it's"), "'it'\\''s'");
    assert.equal(shellWord('./~/bk'), "'./~/bk'");
    assert.equal(shellWord('$HOME;rm'), "'$HOME;rm'");
    // Read back by a real shell, control characters included, and printable as it is: a hint is printed with its
    // control characters escaped (\n), which inside plain quotes would name another path.
    for (const word of ['/tmp/a\nb', "it's $HOME `x`", 'tab\there', 'esc\x1b[31m', "back\\slash's\n", 'c1\u0085x']) {
      assert.doesNotMatch(shellWord(word), /[\x00-\x1f\x7f-\x9f]/);
      assert.equal(spawnSync('bash', ['-c', `printf %s ${shellWord(word)}`], { encoding: 'utf8' }).stdout, word);
    }
  });

  test('displayPath never shows a path that a shell would read as the home directory', () => {
    assert.equal(displayPath(`${process.cwd()}/~/bk`), './~/bk');
    assert.equal(displayPath(`${process.cwd()}/~`), './~');
    assert.equal(displayPath(`${process.cwd()}/a/~`), 'a/~');
  });
});

describe('listing: files whose names do not parse', () => {
  test('listingLines shows such a file by its name, across the first three columns; other rows keep their layout', () => {
    const base = { status: 'verified' as const, sizeBytes: 5, modifiedMs: 0, problems: [] };
    const named = { ...base, file: 'a.dump', timestamp: '2025-01-27T15:00:00Z', environment: 'prod', database: 'app' };
    const rows = (...names: string[]) =>
      listingLines({
        directory: '/b',
        exists: true,
        fullCheck: false,
        backups: [named, ...names.map((file) => ({ ...base, status: 'no_metadata' as const, file }))],
        incomplete: [],
      }).slice(2, 3 + 1 + names.length);
    assert.deepEqual(rows('random.dump'), [
      'Timestamp             Environment  Database  Size  Status',
      '2025-01-27T15:00:00Z  prod         app       5 B   ✓ Verified',
      'random.dump                                  5 B   ? No metadata',
    ]);
    const long = `${'x'.repeat(60)}.dump`;
    assert.deepEqual(rows(long).slice(1), [
      '2025-01-27T15:00:00Z  prod         app       5 B   ✓ Verified',
      `${long}  5 B   ? No metadata`,
    ]);
  });
});

describe('chooseMode', () => {
  test('backup by default; --verify FILE; --list; --list --verify is the full check', () => {
    assert.deepEqual(chooseMode({}), { command: 'backup' });
    assert.deepEqual(chooseMode({ verify: 'x.dump' }), { command: 'verify', file: 'x.dump' });
    assert.deepEqual(chooseMode({ list: true }), { command: 'list', fullCheck: false });
    assert.deepEqual(chooseMode({ list: true, verify: true }), { command: 'list', fullCheck: true });
  });

  test('contradictions are configuration errors', () => {
    expectBackupError(() => chooseMode({ verify: true }), EXIT.CONFIG, /--verify needs the backup FILE/);
    expectBackupError(() => chooseMode({ verify: '  ' }), EXIT.CONFIG, /--verify needs the backup FILE/);
    expectBackupError(() => chooseMode({ list: true, verify: 'x.dump' }), EXIT.CONFIG, /takes no FILE/);
    expectBackupError(() => chooseMode({ maxAge: 1000 }), EXIT.CONFIG, /--max-age only applies to --check/);
    assert.deepEqual(chooseMode({ check: true, maxAge: 1000 }), { command: 'check', fullCheck: false });
  });

  test('every mix of commands README does not name is refused (exit 2), none silently dropped', () => {
    const flags = {
      prune: { prune: true },
      list: { list: true },
      verify: { verify: 'x.dump' },
      restoreTest: { restoreTest: true },
      restore: { restore: 'x.dump', targetDb: 'copy' },
      check: { check: true, maxAge: 1000 },
    } as const;
    const named = ['', 'prune', 'list', 'verify', 'verify restoreTest', 'restore', 'check'];
    const names = Object.keys(flags) as Array<keyof typeof flags>;
    for (let set = 0; set < 1 << names.length; set++) {
      const chosen = names.filter((_, i) => set & (1 << i));
      const opts = Object.assign({}, ...chosen.map((name) => flags[name]));
      if (named.includes(chosen.join(' '))) assert.doesNotThrow(() => chooseMode(opts), chosen.join(' '));
      else expectBackupError(() => chooseMode(opts), EXIT.CONFIG, /./);
    }
  });
});

describe('restore helpers', () => {
  test("dropFate: what an interrupted drop left, from pg_database's rows, or unknown when they could not be read", () => {
    const rows = [
      { name: 'kept', limit: -1 },
      { name: 'limited', limit: 3 },
      { name: 'half', limit: -2 },
    ];
    assert.equal(dropFate('kept', rows), 'kept');
    assert.equal(dropFate('limited', rows), 'kept', 'a connection limit is not a half-dropped database');
    assert.equal(dropFate('half', rows), 'invalid');
    assert.equal(dropFate('gone', rows), 'gone');
    assert.equal(dropFate('kept', undefined), 'unknown');
    assert.equal(dropFate('gone', []), 'gone');
    // A server that does not mark a drop cut short invalid: a database still there may have lost its files.
    assert.equal(dropFate('kept', rows, false), 'unsure');
    assert.equal(dropFate('half', rows, false), 'invalid');
    assert.equal(dropFate('gone', rows, false), 'gone');
  });

  test('marksHalfDroppedInvalid: the releases that mark a database whose drop was cut short (August 2023 on)', () => {
    for (const [num, marks] of [
      [170000, true],
      [160000, true],
      [150004, true],
      [150003, false],
      [140009, true],
      [140008, false],
      [130012, true],
      [130011, false],
      [120016, true],
      [120015, false],
      [110021, true],
      [110020, false],
      [100023, false],
      [90624, false],
    ] as const) {
      assert.equal(marksHalfDroppedInvalid(num), marks, String(num));
    }
  });

  test('archiveExtensions reads the EXTENSION entries of a table of contents', () => {
    const toc = [
      '2; 3079 16385 EXTENSION - cube ',
      '3412; 0 0 COMMENT - EXTENSION cube ',
      '3; 3079 16400 EXTENSION - uuid-ossp ',
      '224; 1259 16670 TABLE public events postgres',
    ].join('\n');
    assert.deepEqual(archiveExtensions(toc), ['cube', 'uuid-ossp']);
  });

  test("tablespaceSetBy reads pg_restore's SET default_tablespace lines, quoted names unquoted", () => {
    assert.equal(tablespaceSetBy('SET default_tablespace = fast;'), 'fast');
    assert.equal(tablespaceSetBy("SET default_tablespace = '';"), '');
    assert.equal(tablespaceSetBy('SET default_tablespace = "My ""TS""";'), 'My "TS"');
    assert.equal(tablespaceSetBy('SET default_table_access_method = heap;'), undefined);
    assert.equal(tablespaceSetBy('CREATE TABLE a (x int);'), undefined);
  });

  test("tablespaceReader: an entry's tablespace once its header confirms the SET, never a SET inside a body", () => {
    const read = tablespaceReader();
    const script = [
      'SET default_tablespace = "my ts";',
      '',
      'SET default_table_access_method = heap;',
      '',
      '--',
      '-- Name: a; Type: TABLE; Schema: public; Owner: postgres; Tablespace: my ts',
      '--',
      'CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$',
      'SET default_tablespace = nowhere;',
      '',
      '--',
      'END $$;',
      "SET default_tablespace = '';",
      '',
      '--',
      '-- Name: b; Type: TABLE; Schema: public; Owner: postgres',
      'SET default_tablespace = fast;',
      '',
      '--',
      '-- Data for Name: c; Type: TABLE DATA; Schema: public; Owner: postgres; Tablespace: fast',
    ];
    assert.deepEqual(
      script.map(read).filter((found) => found !== undefined),
      ['my ts', 'fast'],
    );
  });

  test("archiveDatabaseOptions reads pg_dump's CREATE DATABASE options from the end of its line, never from the name", () => {
    const printed = [
      '-- Name: db props; Type: DATABASE; Schema: -; Owner: postgres',
      `CREATE DATABASE "x WITH TEMPLATE = template0 ENCODING = 'UTF8';" WITH TEMPLATE = template0 ENCODING = ` +
        `'SQL_ASCII' LOCALE_PROVIDER = icu LOCALE = 'C' ICU_LOCALE = 'de''x' TABLESPACE = ts;`,
      'ALTER DATABASE "db props" OWNER TO postgres;',
    ].join('\n');
    assert.deepEqual(archiveDatabaseOptions(printed), {
      ENCODING: 'SQL_ASCII',
      LOCALE_PROVIDER: 'icu',
      LOCALE: 'C',
      ICU_LOCALE: "de'x",
    });
    const pg13 =
      "CREATE DATABASE app WITH TEMPLATE = template0 ENCODING = 'LATIN1' LC_COLLATE = 'C' LC_CTYPE = 'de_DE';";
    assert.deepEqual(archiveDatabaseOptions(pg13), { ENCODING: 'LATIN1', LC_COLLATE: 'C', LC_CTYPE: 'de_DE' });
    assert.equal(archiveDatabaseOptions(''), undefined);
    assert.equal(archiveDatabaseOptions('CREATE DATABASE app;'), undefined);
  });

  test("archiveDatabaseOptions reads only the DATABASE entry's statement, whose tablespace may be a quoted name", () => {
    const header = '-- Name: src; Type: DATABASE; Schema: -; Owner: postgres\n--\n\n';
    const quoted = `${header}CREATE DATABASE src WITH TEMPLATE = template0 ENCODING = 'LATIN1' LOCALE = 'C' TABLESPACE = "Fa""st";`;
    assert.deepEqual(archiveDatabaseOptions(quoted), { ENCODING: 'LATIN1', LOCALE: 'C' });
    // A comment's text is printed after the entry; a CREATE DATABASE line in it is never read.
    const comment =
      `-- Name: DATABASE src; Type: COMMENT; Schema: -; Owner: postgres\n\nCOMMENT ON DATABASE src IS E'x\n` +
      `CREATE DATABASE y WITH TEMPLATE = template0 ENCODING = SQL_ASCII LOCALE = C;\ny';`;
    const unreadable = `${header}CREATE DATABASE src WITH TEMPLATE = template0 ENCODING = 'LATIN1' ODD = +;`;
    assert.equal(archiveDatabaseOptions(`${unreadable}\n${comment}`), undefined);
  });

  test("databasePropertyStatements takes the E'' literals pg_dump writes for values holding a backslash", () => {
    const printed = String.raw`ALTER DATABASE src SET search_path TO E'C:\\app', 'public';
ALTER DATABASE src SET "x.dir" TO E'it''s\\';`;
    assert.deepEqual(databasePropertyStatements(printed, 'copy'), {
      statements: [
        { sql: String.raw`ALTER DATABASE "copy" SET search_path TO E'C:\\app', 'public'`, what: 'SET search_path' },
        { sql: String.raw`ALTER DATABASE "copy" SET "x.dir" TO E'it''s\\'`, what: 'SET "x.dir"' },
      ],
      skipped: [],
    });
  });

  test('unsupportedProvider: a server before 15 has only libc databases, before 17 no builtin provider', () => {
    const icu = { ENCODING: 'UTF8', LOCALE_PROVIDER: 'icu', ICU_LOCALE: 'de' };
    const icu14 = 'PostgreSQL 14 has no ICU provider for databases: restore to PostgreSQL 15 or later';
    assert.equal(unsupportedProvider(icu, 14), icu14);
    assert.equal(unsupportedProvider(icu, 15), undefined);
    const builtin = { ENCODING: 'UTF8', LOCALE_PROVIDER: 'builtin', BUILTIN_LOCALE: 'C' };
    const builtin16 = 'PostgreSQL 16 has no builtin provider for databases: restore to PostgreSQL 17 or later';
    assert.equal(unsupportedProvider(builtin, 16), builtin16);
    assert.equal(unsupportedProvider(builtin, 17), undefined);
    assert.equal(unsupportedProvider({ LOCALE_PROVIDER: 'libc' }, 13), undefined);
    assert.equal(unsupportedProvider({ ENCODING: 'LATIN1' }, 13), undefined);
    assert.equal(unsupportedProvider({ LOCALE_PROVIDER: 'constructor' }, 13), undefined);
  });

  test('databasePropertyStatements rebuilds the settings and comment for the target from what it read, never the text', () => {
    const printed = [
      '-- Name: DATABASE "db props"; Type: COMMENT; Schema: -; Owner: postgres',
      `COMMENT ON DATABASE "db props" IS 'line one;`,
      `ALTER DATABASE postgres SET work_mem TO ''1MB'';';`,
      'ALTER DATABASE "db props" OWNER TO postgres;',
      'ALTER DATABASE "db props" CONNECTION LIMIT = 5;',
      `ALTER DATABASE "db props" SET search_path TO 'app', 'we''ird';`,
      `ALTER DATABASE "db props" SET "x.tenant" TO 'a"b';`,
      `ALTER ROLE "a pp" IN DATABASE "db props" SET work_mem TO '77MB';`,
      `ALTER DATABASE "db props" SET statement_timeout TO '1s'; DROP TABLE t;`,
      '\\connect -reuse-previous=on "dbname=\'db props\'"',
    ].join('\n');
    const { statements, skipped } = databasePropertyStatements(printed, 'new "copy"');
    assert.deepEqual(statements, [
      {
        sql: `COMMENT ON DATABASE "new ""copy""" IS 'line one;\nALTER DATABASE postgres SET work_mem TO ''1MB'';'`,
        what: 'comment',
      },
      { sql: `ALTER DATABASE "new ""copy""" SET search_path TO 'app', 'we''ird'`, what: 'SET search_path' },
      { sql: `ALTER DATABASE "new ""copy""" SET "x.tenant" TO 'a"b'`, what: 'SET "x.tenant"' },
      {
        sql: `ALTER ROLE "a pp" IN DATABASE "new ""copy""" SET work_mem TO '77MB'`,
        what: 'SET work_mem for role "a pp"',
      },
    ]);
    assert.deepEqual(skipped, ['CONNECTION LIMIT = 5']);
  });

  test('databaseOptionsFor leaves out LOCALE_PROVIDER = libc before PostgreSQL 15, which had no such option', () => {
    const libc = { ENCODING: 'UTF8', LOCALE_PROVIDER: 'libc', LOCALE: 'C' };
    assert.deepEqual(databaseOptionsFor(libc, 14), { ENCODING: 'UTF8', LOCALE: 'C' });
    assert.deepEqual(databaseOptionsFor(libc, 15), libc);
    const icu = { ...libc, LOCALE_PROVIDER: 'icu', ICU_LOCALE: 'de' };
    assert.deepEqual(databaseOptionsFor(icu, 14), icu); // the server refuses it, with its own words
  });

  test('extensionInstallHint names the package for well-known extensions and explains contrib ones', () => {
    assert.match(extensionInstallHint('vector', 16), /postgresql-16-pgvector/);
    assert.match(extensionInstallHint('postgis', 15), /postgresql-15-postgis-3/);
    assert.match(extensionInstallHint('adminpack', 17), /contrib .* removed in PostgreSQL 17/);
    assert.match(extensionInstallHint('my_ext', 15), /apt-cache search postgresql-15-my_ext/);
    assert.match(extensionInstallHint('constructor', 15), /apt-cache search postgresql-15-constructor/);
  });

  test('dbnameConninfo quotes any name so that libpq never reads it as settings', () => {
    assert.equal(dbnameConninfo('plain'), "dbname='plain'");
    assert.equal(dbnameConninfo("it's host=evil"), "dbname='it\\'s host=evil'");
    assert.equal(dbnameConninfo('back\\slash'), "dbname='back\\\\slash'");
  });

  test('reconcileCounts flags differences and tables missing on either side', () => {
    const rows = reconcileCounts({ a: 1, b: 2, c: 3 }, { a: 1, b: 5, d: 0 });
    assert.deepEqual(rows, [
      { table: 'a', backup: 1, restored: 1, ok: true },
      { table: 'b', backup: 2, restored: 5, ok: false },
      { table: 'c', backup: 3, ok: false },
      { table: 'd', restored: 0, ok: false },
    ]);
    assert.deepEqual(reconciliationLines(rows.slice(0, 2)), [
      'Table  Backup  Restored',
      'a           1         1  ✓',
      'b           2         5  ✗',
    ]);
  });

  test('reconciliationLines aligns names as a terminal shows them: escaped controls, wide CJK and emoji, accents', () => {
    const names = ['new\nline', '表表', 'ünïcødé 🐘', 'e\u0301'];
    const rows = names.map((table) => ({ table, backup: 7, restored: 7, ok: true }));
    assert.deepEqual(reconciliationLines(rows), [
      'Table       Backup  Restored',
      'new\\nline        7         7  ✓',
      '表表             7         7  ✓',
      'ünïcødé 🐘       7         7  ✓',
      'e\u0301                7         7  ✓',
    ]);
  });

  test('isProductionTarget: the production database name on the production cluster, however the host is spelled', () => {
    const prod = { database: 'app', cluster: '7311' };
    assert.equal(isProductionTarget({ target: 'app', targetCluster: '7311', prod }), 'yes');
    assert.equal(
      isProductionTarget({ target: 'app', targetCluster: '9999', prod }),
      'no',
      'same name on another cluster',
    );
    assert.equal(isProductionTarget({ target: 'app_copy', targetCluster: '7311', prod }), 'no');
    assert.equal(isProductionTarget({ target: 'app', targetCluster: '7311' }), 'no', 'no production configured');
    assert.equal(
      isProductionTarget({
        target: 'app',
        targetCluster: '7311',
        prod: { database: 'app', unknownWhy: 'unreachable' },
      }),
      'unknown',
    );
    assert.equal(isProductionTarget({ target: 'app', prod }), 'unknown', 'the target cluster cannot be identified');
  });

  test('chooseMode: --restore needs --target-db; the drill needs --verify FILE; restore options need --restore', () => {
    assert.deepEqual(chooseMode({ restore: 'x.dump', targetDb: 'copy' }), {
      command: 'restore',
      file: 'x.dump',
      target: 'copy',
    });
    assert.deepEqual(chooseMode({ verify: 'x.dump', restoreTest: true }), { command: 'drill', file: 'x.dump' });
    expectBackupError(() => chooseMode({ restore: 'x.dump' }), EXIT.CONFIG, /needs --target-db/);
    expectBackupError(
      () => chooseMode({ restore: 'x.dump', targetDb: 'c', list: true }),
      EXIT.CONFIG,
      /cannot be combined/,
    );
    expectBackupError(() => chooseMode({ clean: true }), EXIT.CONFIG, /--clean only applies to --restore/);
    expectBackupError(() => chooseMode({ iKnowThisIsProd: true }), EXIT.CONFIG, /--i-know-this-is-prod only applies/);
    expectBackupError(() => chooseMode({ restoreTest: true }), EXIT.CONFIG, /--restore-test goes with --verify FILE/);
  });
});

describe('unknownSettingsOnly (pg_restore newer than the server)', () => {
  // Verbatim from pg_restore 17.11 restoring into PostgreSQL 15.18 with --jobs=1.
  const unknown =
    'pg_restore: error: could not execute query: ERROR:  unrecognized configuration parameter "transaction_timeout"\nCommand was: SET transaction_timeout = 0;';
  const exists =
    'pg_restore: error: could not execute query: ERROR:  relation "t" already exists\nCommand was: CREATE TABLE public.t (\n    a integer,\n    b text\n);\n\n';
  const ignored = (n: number) => `pg_restore: warning: errors ignored on restore: ${n}`;

  test('a setting the server lacks, and nothing else, is named', () => {
    assert.deepEqual(unknownSettingsOnly([unknown, ignored(1)].join('\n')), ['transaction_timeout']);
  });

  test('any other error makes it a failure', () => {
    assert.equal(unknownSettingsOnly([unknown, exists, ignored(2)].join('\n')), undefined);
    assert.equal(
      unknownSettingsOnly(
        [
          'pg_restore: error: COPY failed for table "t": ERROR:  invalid input syntax for type integer: "x"',
          ignored(1),
        ].join('\n'),
      ),
      undefined,
    );
  });

  test('output that does not add up is a failure', () => {
    assert.equal(unknownSettingsOnly(unknown), undefined, 'no count of ignored errors: pg_restore did not finish');
    assert.equal(
      unknownSettingsOnly([unknown, ignored(2)].join('\n')),
      undefined,
      'an error it counted that we cannot see',
    );
    assert.equal(
      unknownSettingsOnly([unknown, 'pg_restore: error: could not read from input file: end of file'].join('\n')),
      undefined,
    );
    assert.equal(unknownSettingsOnly(''), undefined);
  });

  test('the failed command must be the SET of that same setting', () => {
    const inFunction =
      'pg_restore: error: could not execute query: ERROR:  unrecognized configuration parameter "transaction_timeout"\nCommand was: CREATE FUNCTION public.f() RETURNS int LANGUAGE sql SET transaction_timeout = 0 AS $$select 1$$;';
    assert.equal(unknownSettingsOnly([inFunction, ignored(1)].join('\n')), undefined);
  });
});

describe('client tools and archive versions', () => {
  const client = (dir: string, major: number) => ({ dir, pgDump: { major } });

  test('chooseClient keeps the first one found when it is new enough', () => {
    const found = [client('/usr/bin', 15), client('/usr/lib/postgresql/17/bin', 17)];
    assert.equal(chooseClient(found, 15)?.dir, '/usr/bin');
    assert.equal(chooseClient(found, 13)?.dir, '/usr/bin');
    assert.equal(chooseClient(found, undefined)?.dir, '/usr/bin');
  });

  test('chooseClient otherwise takes the lowest major that is new enough, first found on ties', () => {
    const found = [
      client('--pg-bin-dir', 13),
      client('/usr/bin', 15),
      client('/usr/lib/postgresql/18/bin', 18),
      client('/usr/lib/postgresql/17/bin', 17),
      client('/opt/homebrew/opt/postgresql@17/bin', 17),
    ];
    assert.equal(chooseClient(found, 16)?.dir, '/usr/lib/postgresql/17/bin');
    assert.equal(chooseClient(found, 18)?.dir, '/usr/lib/postgresql/18/bin');
    assert.equal(chooseClient(found, 14)?.dir, '/usr/bin');
    assert.equal(chooseClient(found, 19), undefined);
    assert.equal(chooseClient([], 15), undefined);
  });

  const int = (n: number) => Buffer.from([n < 0 ? 1 : 0, Math.abs(n) & 255, (Math.abs(n) >> 8) & 255, 0, 0]);
  const str = (s: string) => Buffer.concat([int(Buffer.byteLength(s)), Buffer.from(s)]);
  const header = (minor: number, versions: [string, string]) =>
    Buffer.concat([
      Buffer.from('PGDMP'),
      Buffer.from([1, minor, 0, 4, 8, 1]),
      minor >= 15 ? Buffer.from([2]) : int(6),
      ...[5, 4, 3, 2, 1, 125, 0].map(int),
      str('app_db'),
      str(versions[0]),
      str(versions[1]),
    ]);

  test('parseArchiveHeader reads both layouts: compression as int (≤1.14) or as a byte (≥1.15)', () => {
    assert.deepEqual(parseArchiveHeader(header(14, ['15.11', '15.18 (Debian 15.18-0+deb12u1)'])), {
      archiveVersion: [1, 14, 0],
      database: 'app_db',
      serverVersion: '15.11',
      pgDumpVersion: '15.18 (Debian 15.18-0+deb12u1)',
    });
    assert.equal(parseArchiveHeader(header(16, ['17.2', '17.2']))?.pgDumpVersion, '17.2');
  });

  test('parseArchiveHeader: not an archive → undefined; a truncated header keeps its version', () => {
    assert.equal(parseArchiveHeader(Buffer.from('-- PostgreSQL database dump\n')), undefined);
    assert.deepEqual(parseArchiveHeader(header(16, ['17.2', '17.2']).subarray(0, 20)), {
      archiveVersion: [1, 16, 0],
      database: null,
      serverVersion: null,
      pgDumpVersion: null,
    });
  });

  test('minimumPgRestoreMajor follows the archive format history', () => {
    const of = (minor: number, pgDump = '99.0') =>
      minimumPgRestoreMajor({
        archiveVersion: [1, minor, 0],
        database: null,
        serverVersion: null,
        pgDumpVersion: pgDump,
      });
    assert.deepEqual([of(12), of(13), of(14), of(15), of(16)], [10, 10, 14, 16, 17]);
    assert.equal(of(17, '19.1'), 19, "an unknown newer format needs the pg_dump's own major");
  });

  test('clientInstallHints name the package of the right major for each platform', () => {
    const hints = clientInstallHints(17).join('\n');
    assert.match(hints, /apt-get install -y postgresql-client-17/);
    assert.match(hints, /brew install postgresql@17/);
    assert.match(hints, /dnf install -y postgresql17/);
    assert.match(hints, /--pg-bin-dir/);
    assert.match(clientInstallHints(undefined).join('\n'), /apt-get install -y postgresql-client\b/);
  });
});

describe('progress', () => {
  const tables = [
    { data_oids: [1], data_bytes: 600, data_rows: 6000 },
    { data_oids: [2, 3], data_bytes: 400, data_rows: 400 },
  ];

  test('dumpedFraction weighs tables by size and the ones being copied by rows copied', () => {
    assert.equal(dumpedFraction(tables, new Set(), []), 0);
    assert.equal(dumpedFraction(tables, new Set(), [{ relid: 1, tuples: 3000 }]), 0.3);
    assert.equal(dumpedFraction(tables, new Set([1]), [{ relid: 2, tuples: 100 }]), 0.7);
    assert.equal(
      dumpedFraction(tables, new Set(), [
        { relid: 1, tuples: 6000 },
        { relid: 3, tuples: 100 },
      ]),
      0.7,
      'parallel workers (--jobs)',
    );
    assert.equal(dumpedFraction(tables, new Set([1, 2, 3]), []), 0.99, 'never 100% before the dump ends');
    assert.equal(
      dumpedFraction([{ data_oids: [9], data_bytes: 0, data_rows: 0 }], new Set(), []),
      undefined,
      'no sizes, no estimate',
    );
  });

  test('progressLine', () => {
    assert.equal(
      progressLine({
        copying: [{ table: 'messages', tuples: 1234567 }],
        fraction: 0.42,
        writtenBytes: 220_000_000,
        elapsedMs: 85_000,
      }),
      'dumping messages: 1,234,567 rows · ~42% · 209.8 MB written · 1:25',
    );
    assert.equal(
      progressLine({
        copying: [
          { table: 'messages', tuples: 10 },
          { table: 'events', tuples: 5 },
        ],
        writtenBytes: 0,
        elapsedMs: 0,
      }),
      'dumping messages +1 more: 15 rows · 0 B written · 0:00',
    );
    assert.equal(progressLine({ copying: [], writtenBytes: 0, elapsedMs: 0 }), 'dumping · 0 B written · 0:00');
  });
});

describe('found by the re-test of the fixes', () => {
  test('unsignedIdentifier: a cluster made from 2038 on has an identifier bigint shows negative', () => {
    assert.equal(unsignedIdentifier('-8802513974888333708'), '9644230098821217908');
    assert.equal(unsignedIdentifier('7312345678901234567'), '7312345678901234567');
    const metadata = { system_identifier: unsignedIdentifier('-1') };
    assert.equal(metadata.system_identifier, '18446744073709551615');
  });

  test("lenientProdDatabase: a URL whose '@' is out of place names no database (any --clean needs consent)", () => {
    assert.equal(lenientProdDatabase(env({ DATABASE_URL: 'postgresql://u:p/w@127.0.0.1:5432/prodlike' })), undefined);
    assert.equal(lenientProdDatabase(env({ DATABASE_URL: 'postgresql://u:p%2Fw@h/prodlike?sslmode=x' })), 'prodlike');
    assert.equal(lenientProdDatabase(env({ DB_NAME: 'prod_db' })), 'prod_db');
  });

  test('maskSecrets: an empty kept value keeps nothing (it must not split the text into characters)', () => {
    assert.equal(maskSecrets('pw hunter2 here', ['hunter2'], ['']), 'pw **** here');
  });

  test('maskSecrets with kept values: text holding U+E000 or U+E100 comes back as it was', () => {
    const text = 'table x\uE000ay and z\uE000\uE100q in /b/app_dev.dump, pw app';
    assert.equal(maskSecrets(text, ['app'], ['/b/app_dev.dump']), text.replace(/pw app$/, 'pw ****'));
  });

  test('progressLine shows control characters of a table name as escapes', () => {
    const line = progressLine({
      copying: [{ table: 'evil\x1b]0;PWNED\x07\x1b[2Jx', tuples: 1 }],
      writtenBytes: 0,
      elapsedMs: 0,
    });
    assert.ok(!/[\x00-\x1f]/.test(line), line);
    assert.match(line, /evil\\x1b\]0;PWNED\\x07/);
  });
});

test("another session's query in a message: one line, its password literals masked", () => {
  assert.equal(foreignQuery('BEGIN;\n  TRUNCATE t;\r\nCOMMIT'), 'BEGIN; TRUNCATE t; COMMIT');
  assert.equal(
    foreignQuery("ALTER ROLE app PASSWORD 'it''s secret'; TRUNCATE t"),
    "ALTER ROLE app PASSWORD '****'; TRUNCATE t",
  );
  assert.equal(foreignQuery("CREATE ROLE x password\n'cut sho"), "CREATE ROLE x password '****'");
});

test("another session's query: numbers masked too (a card number, an id), never a name's digits or a parameter", () => {
  assert.equal(
    foreignQuery(
      "UPDATE t1 SET t = 'k' WHERE id=4111111111111111 AND x > -2.5e3 AND y = .5 AND z = $1; SELECT pg_sleep(15)",
    ),
    "UPDATE t1 SET t = '****' WHERE id=**** AND x > -**** AND y = **** AND z = $1; SELECT pg_sleep(****)",
  );
  assert.equal(
    foreignQuery('SELECT 0x1F, 1_000_000, col2, "x 9" FROM s3.t4'),
    'SELECT ****, ****, col2, "x 9" FROM s3.t4',
  );
});

test("another session's query with a backslash in a plain literal: masked under either standard_conforming_strings", () => {
  // Off, \' does not end the literal; on, it does: masked to the query's last quote, both readings are covered.
  assert.equal(foreignQuery("SELECT 'it\\'s-Secret99 and api_key=HUNTER2'"), "SELECT '****'");
  assert.equal(foreignQuery("SELECT 'a\\', 'sec\\'ret' FROM notes"), "SELECT '****' FROM notes");
  assert.equal(foreignQuery("SELECT 'C:\\dir' FROM notes"), "SELECT '****' FROM notes");
});

test("pg_restore's and pg_dump's messages: the SQL they quote masked, whole, COPY's row data masked", () => {
  // A line of the tool's own inside a literal does not end the quoted SQL.
  const stderr = [
    'pg_restore: error: could not execute query: ERROR:  syntax error at or near "p"',
    "LINE 2:     password 'Hunter2secret',",
    '            ^',
    'Command was: CREATE USER MAPPING FOR app SERVER remote OPTIONS (',
    "    password 'Hunter2secret\npg_restore: x', \"user\" 'remote_user'",
    ');',
    '',
    'pg_restore: error: COPY failed for table "t": ERROR:  invalid input syntax for type integer: "abc"',
    'CONTEXT:  COPY t, line 1, column id: "abc"',
    'CONTEXT:  COPY t, line 2: "jane@example.com\t42"',
    "pg_dump: detail: Query was: SELECT 's3cret'",
  ].join('\n');
  assert.equal(
    toolMessage(stderr),
    [
      'pg_restore: error: could not execute query: ERROR:  syntax error at or near "p"',
      "Command was: CREATE USER MAPPING FOR app SERVER remote OPTIONS ( password '****', \"user\" '****' );",
      'pg_restore: error: COPY failed for table "t": ERROR:  invalid input syntax for type integer: "****"',
      'CONTEXT:  COPY t, line 1, column id: "****"',
      'CONTEXT:  COPY t, line 2: "****"',
      "pg_dump: detail: Query was: SELECT '****'",
    ].join('\n'),
  );
});

test("the server's messages: the row values quoted in CONTEXT (any line) and DETAIL masked, columns and tables kept", () => {
  const failed = 'pg_restore: error: COPY failed for table "users": ERROR:  a failure';
  const cases: [string[], string[]][] = [
    // COPY's line under a function's context; a column's value broken over lines; a name with a line break.
    [
      ['CONTEXT:  PL/pgSQL function public.plan_ok(text) line 1 at RETURN', 'COPY users, line 1: "1\talice\tsk_1"'],
      ['CONTEXT:  PL/pgSQL function public.plan_ok(text) line 1 at RETURN\\nCOPY users, line 1: "****"'],
    ],
    [
      ['CONTEXT:  COPY users, line 3, column note: "alice', 'sk_2"'],
      ['CONTEXT:  COPY users, line 3, column note: "****"'],
    ],
    [['CONTEXT:  COPY us', 'ers, line 3: "alice sk_3"'], ['CONTEXT:  COPY us\\ners, line 3: "****"']],
    [
      ['DETAIL:  Failing row contains (1, alice', ') sk_4).', 'CONTEXT:  COPY users, line 1: "1\talice"'],
      ['DETAIL:  Failing row contains (****).', 'CONTEXT:  COPY users, line 1: "****"'],
    ],
    [
      ['DETAIL:  Partition key of the failing row contains (region, lower(email)) = (eu, alice sk_5).'],
      ['DETAIL:  Partition key of the failing row contains (region, lower(email)) = (****).'],
    ],
    [['DETAIL:  Key (api_token)=(sk_6) already exists.'], ['DETAIL:  Key (api_token)=(****) already exists.']],
    [['DETAIL:  Key (lower(email))=(alice) is duplicated.'], ['DETAIL:  Key (lower(email))=(****) is duplicated.']],
    [
      ['DETAIL:  Key (user_id)=(sk_7) is not present in table "users".'],
      ['DETAIL:  Key (user_id)=(****) is not present in table "users".'],
    ],
    [
      ['DETAIL:  Key (id)=(sk_8) already exists. x) is still referenced from table "orders".'],
      ['DETAIL:  Key (id)=(****) is still referenced from table "orders".'],
    ],
    [
      ['DETAIL:  Key (room, during)=(1, [sk_9,)) conflicts with existing key (room, during)=(1, [alice,)).'],
      ['DETAIL:  Key (room, during)=(****) conflicts with existing key (room, during)=(****).'],
    ],
    [
      ['DETAIL:  Key (during)=([sk_10,)) conflicts with key (during)=([alice', ',)).'],
      ['DETAIL:  Key (during)=(****) conflicts with key (during)=(****).'],
    ],
    // A form not known here: the values to the field's end.
    [['DETAIL:  Key (id)=(sk_11) collides.'], ['DETAIL:  Key (id)=(****)']],
  ];
  for (const [stderr, masked] of cases) {
    const message = toolMessage(
      [failed, ...stderr, 'pg_restore: error: a worker process died unexpectedly'].join('\n'),
    );
    assert.deepEqual(message.split('\n'), [failed, ...masked, 'pg_restore: error: a worker process died unexpectedly']);
    assert.doesNotMatch(message, /sk_|alice/);
  }
  // A line of another field that begins "COPY" (a name's line break) is not row data.
  const named = 'pg_restore: from TOC entry 3; 1259 16385 TABLE x\nCOPY t, line 1: "kept"';
  assert.equal(toolMessage(named), named.replace('\n', '\\n'));
});

test("a COPY failure's ERROR line: the value it quotes masked, the type kept; another message's words kept", () => {
  const failed = 'pg_restore: error: COPY failed for table "users": ERROR:  ';
  const cases: [string, string][] = [
    ['invalid input syntax for type integer: "sk_1"', 'invalid input syntax for type integer: "****"'],
    ['invalid input value for enum public.plan: "sk_2" x"', 'invalid input value for enum public.plan: "****"'],
    ['malformed array literal: "{sk_3"', 'malformed array literal: "****"'],
    ['value "sk_4" is out of range for type bigint', 'value "****" is out of range for type bigint'],
    ['value too long for type character varying(3)', 'value too long for type character varying(3)'],
    ['date/time field value out of range: "sk_5"', 'date/time field value out of range: "****"'],
    ['invalid byte sequence for encoding "UTF8": 0xf6', 'invalid byte sequence for encoding "UTF8": 0xf6'],
  ];
  for (const [error, masked] of cases) {
    assert.equal(toolMessage(failed + error), failed + masked);
    // Known as a COPY failure by its CONTEXT alone (a server's message without pg_restore's words).
    const context = 'CONTEXT:  SQL function "ok" statement 1\nCOPY users, line 1: "sk_6"';
    assert.equal(
      toolMessage(`pg_restore: error: could not execute query: ERROR:  ${error}\n${context}`),
      `pg_restore: error: could not execute query: ERROR:  ${masked}\nCONTEXT:  SQL function "ok" statement 1\\nCOPY users, line 1: "****"`,
    );
  }
  // Not about a row COPY read (a default's or a query's literal): the server's words stay; the SQL's are masked.
  const other = 'pg_restore: error: could not execute query: ERROR:  invalid input syntax for type integer: "abc"';
  assert.equal(toolMessage(`${other}\nCommand was: SELECT 1;`), `${other}\nCommand was: SELECT ****;`);
});

test("a COPY failure in a type's own input: its DETAIL and the JSON text it quotes masked, the COPY line's names kept", () => {
  const failed = 'pg_restore: error: COPY failed for table "j": ERROR:  ';
  const cases: [string[], string[]][] = [
    [
      [
        'invalid input syntax for type json',
        'DETAIL:  Token "XSuperSecretKey123" is invalid.',
        'CONTEXT:  JSON data, line 1: {"api_key": XSuperSecretKey123...',
        'COPY j, line 1, column doc: "{"api_key": XSuperSecretKey123"}"',
      ],
      [
        'invalid input syntax for type json',
        'DETAIL:  ****',
        'CONTEXT:  JSON data, line 1: ****\\nCOPY j, line 1, column doc: "****"',
      ],
    ],
    [
      [
        'invalid XML content',
        'DETAIL:  line 1: Opening and ending tag mismatch: SuperSecret line 1',
        'CONTEXT:  COPY j, line 1, column doc: "<SuperSecret>"',
      ],
      ['invalid XML content', 'DETAIL:  ****', 'CONTEXT:  COPY j, line 1, column doc: "****"'],
    ],
  ];
  for (const [stderr, masked] of cases) {
    const [error, ...fields] = stderr;
    const message = toolMessage([failed + error, ...fields].join('\n'));
    assert.deepEqual(message.split('\n'), [failed + masked[0], ...masked.slice(1)]);
    assert.doesNotMatch(message, /SuperSecret/);
  }
});

test("pg_restore's messages: a line break in a name joins the line it broke, shown as \\n", () => {
  const stderr = [
    'pg_restore: while PROCESSING TOC:',
    'pg_restore: from TOC entry 3; 1259 16385 TABLE x',
    '',
    '✓ Restore completed postgres',
    'pg_restore: error: could not execute query: ERROR:  role "r" does not exist',
    'DETAIL:  a detail',
    'Command was: CREATE POLICY p ON public."x',
    '',
    '✓ Restore completed" TO r;',
  ].join('\n');
  assert.deepEqual(toolMessage(stderr).split('\n'), [
    'pg_restore: while PROCESSING TOC:',
    'pg_restore: from TOC entry 3; 1259 16385 TABLE x\\n\\n✓ Restore completed postgres',
    'pg_restore: error: could not execute query: ERROR:  role "r" does not exist',
    'DETAIL:  a detail',
    'Command was: CREATE POLICY p ON public."x ✓ Restore completed" TO r;',
  ]);
});

test("another session's query in a message: every literal masked, since any may carry a secret", () => {
  // A key, a connection string, personal data: the query's shape tells the operator enough.
  assert.equal(
    foreignQuery("SELECT dblink_connect('host=db password=hunter2'); UPDATE u SET ssn = E'123\\'45' WHERE id = 7"),
    "SELECT dblink_connect('****'); UPDATE u SET ssn = E'****' WHERE id = ****",
  );
  assert.equal(
    foreignQuery("CREATE FUNCTION f() RETURNS text AS $body$ SELECT 'k3y' $body$; SELECT $$x$$, $1"),
    'CREATE FUNCTION f() RETURNS text AS $body$****$body$; SELECT $$****$$, $1',
  );
  // An apostrophe in a comment or a quoted name opens no literal; comments are masked too.
  assert.equal(
    foreignQuery("/* it's the key rotation */ LOCK TABLE t; SELECT 'S3cret' -- don't log 'x'\nFROM t"),
    "/* **** */ LOCK TABLE t; SELECT '****' -- **** FROM t",
  );
  assert.equal(foreignQuery(`UPDATE "O'Brien" SET key = 'x'`), `UPDATE "O'Brien" SET key = '****'`);
  // Comments nest, and a dollar quote's tag may hold any letter, as in PostgreSQL.
  assert.equal(
    foreignQuery("/* outer /* inner */ it's */ SELECT 'hunter2secret' FROM t"),
    "/* **** */ SELECT '****' FROM t",
  );
  assert.equal(foreignQuery('SELECT $é$hunter2secret$é$; TRUNCATE t'), 'SELECT $é$****$é$; TRUNCATE t');
  // A setting's value need not be quoted, or may be quoted as a name, or hold a $.
  assert.equal(foreignQuery('SET app.key = "sk_live_SECRET"; SET b = sk$SECRET;'), 'SET app.key = ****; SET b = ****;');
  assert.equal(
    foreignQuery('SET app.api_key = Secr3tPw; SET LOCAL x TO y'),
    'SET app.api_key = ****; SET LOCAL x TO ****',
  );
  // Cut short by track_activity_query_size: an open literal is masked to the end.
  assert.equal(foreignQuery('INSERT INTO t VALUES ($q$sec'), 'INSERT INTO t VALUES ($q$****$q$');
  assert.equal(foreignQuery("INSERT INTO t VALUES ('sec"), "INSERT INTO t VALUES ('****'");
});
