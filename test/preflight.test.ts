/**
 * Every preflight failure ends with its contract exit code, a clear message and hints, no stack
 * trace, and nothing written: missing tools (6), connection problems (3), unwritable output (4),
 * missing configuration (2), an empty database (7).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { dbVars, runCli, tempDir, writeEnvFile, type CliRun } from './helpers/cli.ts';
import { hidingUsualClientLocations } from './helpers/clients.ts';
import { freePort, startTestServer, type TestServer } from './helpers/pg-server.ts';
import { skipUnless, unmet } from './helpers/requirements.ts';

const noTmpfs = await unmet('mountNamespace');
const noSetpriv = await unmet('setpriv');

let server: TestServer;
before(async () => {
  server = await startTestServer();
  await server.createDatabase('app_dev', 'CREATE TABLE t (id int); INSERT INTO t VALUES (1)');
  await server.createDatabase('empty_db');
});
after(() => server?.stop());

interface Attempt {
  vars?: Record<string, string>;
  outputDir?: string;
  run?: Partial<CliRun>;
}

async function attempt({ vars, outputDir, run = {} }: Attempt) {
  const configDir = await tempDir();
  await fs.chmod(configDir, 0o755);
  const out = outputDir ?? path.join(configDir, 'out');
  if (vars) await writeEnvFile(configDir, '.env', vars);
  const result = await runCli({
    ...run,
    args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', out, ...(run.args ?? [])],
  });
  const files = await fs.readdir(out).catch(() => [] as string[]);
  return { ...result, files };
}

function assertContractError(
  result: { exitCode: number; stderr: string; stdout: string },
  exitCode: number,
  title: RegExp,
) {
  assert.equal(result.exitCode, exitCode, result.stderr);
  const [first] = result.stderr.split('\n');
  assert.match(first!, /^✗ Backup failed: /);
  assert.match(first!, title);
  assert.match(result.stderr, /\n\nError: .+\n/);
  assert.match(result.stderr, /\n\nTroubleshooting:\n {2}1\. .+/);
  assert.doesNotMatch(result.stderr, /\n\s+at .+:\d+:\d+/, 'no stack trace');
  assert.equal(result.stdout, '');
}

const good = () => dbVars(server, 'DEV_DB_', 'app_dev');

describe('preflight failures', () => {
  test('no pg_dump on PATH or in any usual location → 6, with install hints', skipUnless(noTmpfs), async () => {
    const emptyBin = await tempDir();
    const result = await attempt({
      vars: good(),
      run: { env: { PATH: emptyBin }, wrapper: await hidingUsualClientLocations() },
    });
    assertContractError(result, 6, /pg_dump not found/);
    assert.match(result.stderr, /none on PATH or in the usual locations/);
    assert.match(result.stderr, /apt-get install -y postgresql-client/);
    assert.match(result.stderr, /brew install libpq/);
    assert.deepEqual(result.files, []);
  });

  test('wrong password → 3, authentication failed; the wrong password is not printed', async () => {
    const result = await attempt({ vars: { ...good(), DEV_DB_PASSWORD: 'wrong-Pa55word' } });
    assertContractError(result, 3, /authentication failed/);
    assert.match(result.stderr, /password authentication failed for user "postgres"/);
    assert.match(result.stderr, /DEV_DB_PASSWORD \(from \.env\)/);
    assert.doesNotMatch(result.stderr, /wrong-Pa55word/);
    assert.deepEqual(result.files, []);
  });

  test('no password, PGPASSWORD only in .env → 3; the hint says PGPASSWORD is read from the process environment', async () => {
    const { DEV_DB_PASSWORD, ...withoutPassword } = good();
    const home = await tempDir();
    const result = await attempt({
      vars: { ...withoutPassword, PGPASSWORD: DEV_DB_PASSWORD! },
      run: { env: { HOME: home } },
    });
    assertContractError(result, 3, /authentication failed/);
    assert.match(result.stderr, /none is configured/);
    assert.match(
      result.stderr,
      /^ {2}1\. Set DEV_DB_PASSWORD in \.env\.local \/ \.env, or PGPASSWORD in the process environment/m,
    );
    assert.deepEqual(result.files, []);
  });

  test('nobody listening on the port → 3, connection refused', async () => {
    const result = await attempt({ vars: { ...good(), DEV_DB_PORT: String(await freePort()) } });
    assertContractError(result, 3, /connection refused/);
    assert.match(result.stderr, /pg_isready/);
  });

  test('unknown host → 3, host not found', async () => {
    const result = await attempt({ vars: { ...good(), DEV_DB_HOST: 'no-such-host.invalid' } });
    assertContractError(result, 3, /host not found/);
  });

  test('missing database → 3, naming the database and how to create it', async () => {
    const result = await attempt({ vars: { ...good(), DEV_DB_NAME: 'no_such_db' } });
    assertContractError(result, 3, /Database does not exist/);
    assert.match(result.stderr, /database "no_such_db" does not exist/);
    assert.match(result.stderr, /createdb .* no_such_db/);
  });

  test('unwritable output directory → 4', skipUnless(noSetpriv), async () => {
    const parent = await tempDir();
    await fs.chmod(parent, 0o555);
    const result = await attempt({
      vars: good(),
      outputDir: path.join(parent, 'backups'),
      run: { withoutRootOverride: true },
    });
    assertContractError(result, 4, /Cannot write to the backup directory/);
    assert.match(result.stderr, /EACCES/);
    assert.deepEqual(await fs.readdir(parent), []);
  });

  test('output path is a file → 4', async () => {
    const dir = await tempDir();
    const file = path.join(dir, 'not-a-dir');
    await fs.writeFile(file, 'x');
    const result = await attempt({ vars: good(), outputDir: file });
    assertContractError(result, 4, /not a directory/);
    assert.equal(await fs.readFile(file, 'utf8'), 'x');
  });

  test('missing configuration → 2', async () => {
    const result = await attempt({ vars: { DEV_DB_HOST: server.host } });
    assertContractError(result, 2, /Configuration error/);
    assert.match(result.stderr, /DEV_DB_NAME is not set/);
  });

  test('a database without tables → 7, before anything is written', async () => {
    const result = await attempt({ vars: { ...good(), DEV_DB_NAME: 'empty_db' } });
    assertContractError(result, 7, /Nothing to back up/);
    assert.deepEqual(result.files, []);
  });
});
