/**
 * Environment detection and configuration precedence, through the real CLI process: which
 * database actually got backed up shows which settings won.
 * Precedence: process environment > .env.local > .env; DEV_DB_* falls back to DB_*.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { PROJECT_DIR, runCli, startCli, socketAt, tempDir, writeEnvFile } from './helpers/cli.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';

let server: TestServer;
const DBS = ['cfg_env', 'cfg_local', 'cfg_process', 'cfg_prod', 'cfg_url'] as const;

before(async () => {
  server = await startTestServer({ listenEverywhere: true });
  for (const db of DBS) {
    await server.createDatabase(db, `CREATE TABLE marker (name text); INSERT INTO marker VALUES ('${db}')`);
  }
});
after(() => server?.stop());

interface Layers {
  dotEnv?: Record<string, string>;
  dotEnvLocal?: Record<string, string>;
  processEnv?: Record<string, string>;
  args?: string[];
}

/** Run a backup with the given configuration layers; report what was backed up. */
async function backupWith({ dotEnv, dotEnvLocal, processEnv = {}, args = [] }: Layers) {
  const configDir = await tempDir();
  const outputDir = path.join(configDir, 'out');
  if (dotEnv) await writeEnvFile(configDir, '.env', dotEnv);
  if (dotEnvLocal) await writeEnvFile(configDir, '.env.local', dotEnvLocal);
  const result = await runCli({
    args: ['--config-dir', configDir, '--output-dir', outputDir, ...args],
    env: processEnv,
  });
  const files = await fs.readdir(outputDir).catch(() => [] as string[]);
  const metadataFile = files.find((file) => file.endsWith('.metadata.json'));
  const metadata = metadataFile
    ? (JSON.parse(await fs.readFile(path.join(outputDir, metadataFile), 'utf8')) as {
        database_name: string;
        environment: string;
      })
    : undefined;
  return { ...result, files, database: metadata?.database_name, environment: metadata?.environment };
}

const connection = () => ({
  DB_HOST: server.host,
  DB_PORT: String(server.port),
  DB_USER: server.user,
  DB_PASSWORD: server.password,
});

describe('precedence: process environment > .env.local > .env', () => {
  const dotEnv = () => ({ ...connection(), DEV_DB_NAME: 'cfg_env' });

  test('.env alone is used', async () => {
    const run = await backupWith({ dotEnv: dotEnv() });
    assert.equal(run.exitCode, 0, run.stderr);
    assert.equal(run.database, 'cfg_env');
  });

  test('.env.local wins over .env', async () => {
    const run = await backupWith({ dotEnv: dotEnv(), dotEnvLocal: { DEV_DB_NAME: 'cfg_local' } });
    assert.equal(run.exitCode, 0, run.stderr);
    assert.equal(run.database, 'cfg_local');
  });

  test('the process environment wins over both files', async () => {
    const run = await backupWith({
      dotEnv: dotEnv(),
      dotEnvLocal: { DEV_DB_NAME: 'cfg_local' },
      processEnv: { DEV_DB_NAME: 'cfg_process' },
    });
    assert.equal(run.exitCode, 0, run.stderr);
    assert.equal(run.database, 'cfg_process');
  });

  test('dotenv prints nothing of its own', async () => {
    const run = await backupWith({ dotEnv: dotEnv(), dotEnvLocal: { DEV_DB_NAME: 'cfg_local' } });
    assert.equal(run.exitCode, 0, run.stderr);
    assert.match(run.stdout, /^✓ Backup created successfully\n/);
    assert.equal(run.stderr, '');
  });
});

describe('dev settings fall back to DB_*', () => {
  test('DEV_DB_NAME alone plus DB_HOST/PORT/USER/PASSWORD backs up the dev database as dev', async () => {
    const run = await backupWith({
      dotEnv: { ...connection(), DB_NAME: 'cfg_prod' },
      dotEnvLocal: { DEV_DB_NAME: 'cfg_local' },
    });
    assert.equal(run.exitCode, 0, run.stderr);
    assert.equal(run.database, 'cfg_local');
    assert.equal(run.environment, 'dev');
    assert.match(run.files.join(' '), /cfg_local_dev_/);
  });

  test('a DEV_DB_* value wins over its DB_* fallback', async () => {
    const run = await backupWith({
      dotEnv: { ...connection(), DB_PORT: '1', DEV_DB_PORT: String(server.port), DEV_DB_NAME: 'cfg_env' },
    });
    assert.equal(run.exitCode, 0, run.stderr);
    assert.equal(run.database, 'cfg_env');
  });
});

describe('--env auto', () => {
  const both = () => ({ ...connection(), DEV_DB_NAME: 'cfg_env', DB_NAME: 'cfg_prod' });

  for (const [mode, database, environment] of [
    ['production', 'cfg_prod', 'prod'],
    ['PROD', 'cfg_prod', 'prod'],
    ['Development', 'cfg_env', 'dev'],
    ['dev', 'cfg_env', 'dev'],
  ] as const) {
    test(`ENV_MODE=${mode} backs up ${environment}`, async () => {
      const run = await backupWith({ dotEnv: both(), processEnv: { ENV_MODE: mode } });
      assert.equal(run.exitCode, 0, run.stderr);
      assert.equal(run.database, database);
      assert.equal(run.environment, environment);
    });
  }

  test('ENV_MODE in .env.local is read like any other setting', async () => {
    const run = await backupWith({ dotEnv: both(), dotEnvLocal: { ENV_MODE: 'prod' } });
    assert.equal(run.environment, 'prod', run.stderr);
  });

  test('an unknown ENV_MODE is exit 2, naming the value and where it came from; nothing written', async () => {
    const run = await backupWith({ dotEnv: both(), dotEnvLocal: { ENV_MODE: 'staging' } });
    assert.equal(run.exitCode, 2);
    assert.match(run.stderr, /^✗ Backup failed: Configuration error$/m);
    assert.match(run.stderr, /ENV_MODE \(from \.env\.local\) is "staging"/);
    assert.match(run.stderr, /Troubleshooting:\n {2}1\. /);
    assert.deepEqual(run.files, []);
  });

  test('without ENV_MODE, DEV_DB_NAME means dev', async () => {
    const run = await backupWith({ dotEnv: both() });
    assert.equal(run.environment, 'dev', run.stderr);
  });

  test('without ENV_MODE or DEV_DB_NAME, DB_NAME means prod', async () => {
    const run = await backupWith({ dotEnv: { ...connection(), DB_NAME: 'cfg_prod' } });
    assert.equal(run.exitCode, 0, run.stderr);
    assert.equal(run.environment, 'prod');
    assert.match(run.files.join(' '), /cfg_prod_prod_/);
  });

  test('nothing configured: exit 2 naming the variables to set', async () => {
    const run = await backupWith({});
    assert.equal(run.exitCode, 2);
    assert.match(run.stderr, /ENV_MODE, DEV_DB_NAME, DB_NAME/);
    assert.doesNotMatch(run.stderr, /\n\s+at /, 'no stack trace');
  });

  test('--env dev without DEV_DB_NAME: exit 2 naming DEV_DB_NAME and the files looked in', async () => {
    const run = await backupWith({ dotEnv: { ...connection(), DB_NAME: 'cfg_prod' }, args: ['--env', 'dev'] });
    assert.equal(run.exitCode, 2);
    assert.match(run.stderr, /DEV_DB_NAME is not set \(expected in .*\.env\.local or .*\.env/);
  });
});

describe('connection URLs', () => {
  test('DEV_DATABASE_URL wins over DEV_DB_NAME', async () => {
    const url = `postgresql://${server.user}:${encodeURIComponent(server.password)}@${server.host}:${server.port}/cfg_url`;
    const run = await backupWith({ dotEnv: { DEV_DB_NAME: 'cfg_env', DEV_DATABASE_URL: url } });
    assert.equal(run.exitCode, 0, run.stderr);
    assert.equal(run.database, 'cfg_url');
    assert.equal(run.environment, 'dev');
  });

  test('a URL in a file below a variable set higher up is refused (exit 2): the stale file would win in silence', async () => {
    const url = `postgresql://${server.user}:${encodeURIComponent(server.password)}@${server.host}:${server.port}/cfg_url`;
    const overridden = await backupWith({
      dotEnv: { DATABASE_URL: url },
      processEnv: { ...connection(), DB_NAME: 'cfg_prod' },
    });
    assert.equal(overridden.exitCode, 2, overridden.stdout + overridden.stderr);
    assert.match(
      overridden.stderr,
      /DB_NAME \(from the process environment\) would be ignored: DATABASE_URL \(from \.env\) is used whole/,
    );
    assert.match(overridden.stderr, /1\. Remove DATABASE_URL from .*\.env, or set DATABASE_URL where DB_NAME is set/);
    assert.deepEqual(overridden.files, []);
    // The URL higher up, or in the same place, wins as before; another environment's variables are no conflict.
    const higher = await backupWith({ dotEnvLocal: { DATABASE_URL: url }, dotEnv: { DB_NAME: 'cfg_prod' } });
    assert.equal(higher.exitCode, 0, higher.stderr);
    assert.equal(higher.database, 'cfg_url');
    const other = await backupWith({
      dotEnv: { DATABASE_URL: url },
      processEnv: { DEV_DB_NAME: 'x' },
      args: ['--env', 'prod'],
    });
    assert.equal(other.exitCode, 0, other.stderr);
  });

  test('a socket directory in ?host= is a socket, as libpq reads it, not localhost', async () => {
    const url = `postgresql://${server.user}:${encodeURIComponent(server.password)}@/cfg_url?host=${encodeURIComponent(server.socketDir!)}&port=${server.port}`;
    const run = await backupWith({ dotEnv: { DEV_DATABASE_URL: url } });
    assert.equal(run.exitCode, 0, run.stderr);
    // Read as a URL, this was localhost:5432, where nothing listens; the socket is in the unit tests.
    assert.equal(run.database, 'cfg_url');
  });

  test('DATABASE_URL alone means prod', async () => {
    const url = `postgres://${server.user}:${encodeURIComponent(server.password)}@${server.host}:${server.port}/cfg_prod`;
    const run = await backupWith({ processEnv: { DATABASE_URL: url } });
    assert.equal(run.exitCode, 0, run.stderr);
    assert.equal(run.environment, 'prod');
    assert.equal(run.database, 'cfg_prod');
  });

  test('the database is read as libpq reads it: every percent-escape decoded, ?dbname= over the path', async () => {
    const name = 'cfg_#/?:+@$&,;=';
    await server.createDatabase(name, `CREATE TABLE marker (name text)`);
    const base = `postgresql://${server.user}:${encodeURIComponent(server.password)}@${server.host}:${server.port}`;
    for (const url of [`${base}/${encodeURIComponent(name)}`, `${base}/cfg_prod?dbname=${encodeURIComponent(name)}`]) {
      const run = await backupWith({ processEnv: { DATABASE_URL: url } });
      assert.equal(run.exitCode, 0, run.stderr);
      assert.equal(run.database, name);
    }
  });
});

describe('Unix sockets', () => {
  test('sslmode require or verify-full over a socket connects without TLS, as libpq does', async () => {
    for (const sslmode of ['require', 'verify-full']) {
      const dotEnv = { ...connection(), DB_HOST: server.socketDir!, DB_SSLMODE: sslmode, DEV_DB_NAME: 'cfg_env' };
      const run = await backupWith({ dotEnv });
      assert.equal(run.exitCode, 0, `${sslmode}: ${run.stderr}`);
      assert.equal(run.database, 'cfg_env');
    }
  });
});

describe('bad values', () => {
  for (const [name, value, pattern] of [
    ['DB_PORT', 'abc', /DB_PORT \(from \.env\) is "abc", which is not a port number/],
    ['DB_PORT', '99999', /not a port number/],
    ['DB_HOST', 'has space', /DB_HOST .* not a host name/],
    ['DB_SSLMODE', 'maybe', /DB_SSLMODE .* not an sslmode/],
  ] as const) {
    test(`${name}=${value} is exit 2 naming the variable and its file`, async () => {
      const run = await backupWith({ dotEnv: { ...connection(), DB_NAME: 'cfg_prod', [name]: value } });
      assert.equal(run.exitCode, 2);
      assert.match(run.stderr, pattern);
      assert.deepEqual(run.files, []);
    });
  }

  test('a .env that is a FIFO is exit 2, not a hang', { timeout: 60_000 }, async () => {
    const configDir = await tempDir();
    await execa('mkfifo', [path.join(configDir, '.env')]);
    const run = await runCli({ args: ['--config-dir', configDir, '--env', 'dev'] });
    assert.equal(run.exitCode, 2, run.stderr);
    assert.match(run.stderr, /cannot read .*\.env: not a regular file/);
  });

  test('a .env that is a socket is exit 2, not a file to check the permissions of', { timeout: 60_000 }, async () => {
    const configDir = await tempDir();
    const socket = await socketAt(path.join(configDir, '.env'));
    try {
      const run = await runCli({ args: ['--config-dir', configDir, '--env', 'dev'] });
      assert.equal(run.exitCode, 2, run.stderr);
      assert.match(run.stderr, /cannot read .*\.env: not a regular file/);
      assert.doesNotMatch(run.stderr, /permission|chmod|chown/i);
    } finally {
      await new Promise((resolve) => socket.close(resolve));
    }
  });

  test('a dangling .env.local symlink (its target not mounted) is exit 2, not "no file": prod was chosen in silence', async () => {
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', { ...connection(), DB_NAME: 'cfg_prod' });
    await fs.symlink('/nonexistent-mount/dev.env', path.join(configDir, '.env.local'));
    const run = await runCli({ args: ['--config-dir', configDir] });
    assert.equal(run.exitCode, 2, run.stdout + run.stderr);
    assert.match(run.stderr, /\.env\.local is a symbolic link to \/nonexistent-mount\/dev\.env, which does not exist/);
    assert.match(run.stderr, /1\. Mount or restore \/nonexistent-mount\/dev\.env, or remove the link/);
  });

  test('a .env that is not UTF-8 is exit 2 naming its line, not read with replacement characters', async () => {
    const configDir = await tempDir();
    const lines = ['DEV_DB_HOST=localhost', 'DEV_DB_NAME=cfg_env', 'DEV_DB_PASSWORD=p\xe4ss'];
    await fs.writeFile(path.join(configDir, '.env'), Buffer.from(`${lines.join('\n')}\n`, 'latin1'));
    const run = await runCli({ args: ['--config-dir', configDir, '--env', 'dev'] });
    assert.equal(run.exitCode, 2, run.stdout + run.stderr);
    assert.match(run.stderr, /\.env is not UTF-8: line 3 holds a byte no UTF-8 text has/);
    assert.match(run.stderr, /iconv -f LATIN1 -t UTF-8/);
    assert.doesNotMatch(run.stderr, /p.ss/, 'the line is not shown: it may hold a password');
  });

  test('a .env that is a directory is exit 2, with no permissions hint', async () => {
    const configDir = await tempDir();
    await fs.mkdir(path.join(configDir, '.env'));
    const run = await runCli({ args: ['--config-dir', configDir, '--env', 'dev'] });
    assert.equal(run.exitCode, 2, run.stderr);
    assert.match(run.stderr, /cannot read .*\.env: EISDIR/);
    assert.match(run.stderr, /Make .*\.env a regular file/);
    assert.doesNotMatch(run.stderr, /permission/i);
  });

  test("an invalid --env choice is exit 2 with commander's message", async () => {
    const run = await backupWith({ args: ['--env', 'staging'] });
    assert.equal(run.exitCode, 2);
    assert.match(run.stderr, /argument 'staging' is invalid\. Allowed choices are dev, prod, auto/);
  });
});

describe("the tests never read the developer's own configuration (README: no database of yours is touched)", () => {
  test("a CLI started without --config-dir reads an empty directory's .env files, not the project's", async () => {
    const cli = startCli({ args: ['--env', 'dev'] });
    const given = cli.spawnargs.indexOf('--config-dir');
    assert.notEqual(given, -1, `no --config-dir in ${cli.spawnargs.join(' ')}: the project's .env.local would be read`);
    const configDir = cli.spawnargs[given + 1]!;
    assert.notEqual(path.resolve(configDir), PROJECT_DIR);
    assert.deepEqual(await fs.readdir(configDir), []);
    const run = await cli;
    assert.equal(run.exitCode, 2, String(run.stderr));
    assert.match(String(run.stderr), /DEV_DB_NAME is not set/);
  });

  test('a CLI started without HOME gets an empty one: libpq reads ~/.pgpass, ~/.pg_service.conf, ~/.postgresql/', async () => {
    const run = await runCli({ args: ['--list', '--output-dir', '~/nowhere', '--json'] });
    assert.equal(run.exitCode, 0, run.stdout + run.stderr);
    const home = path.dirname(JSON.parse(run.stdout).directory);
    assert.notEqual(home, os.homedir());
    assert.deepEqual(await fs.readdir(home), []);
  });

  test("the test files inherit none of the tool's settings (DB_*, BACKUP_*, PG*…) from the shell", () => {
    const inherited = Object.keys(process.env).filter((name) =>
      /^(DEV_)?DB_|DATABASE_URL|^BACKUP_|^PG|^ENV_MODE$/.test(name),
    );
    assert.deepEqual(inherited, []);
  });
});
