/**
 * The test tooling itself (test/run.ts, test/helpers): what every other test file relies on, on a
 * fresh machine, as root (CI) or not.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { execa } from 'execa';
import { PROJECT_DIR, socketAt, tempDir } from './helpers/cli.ts';
import type { ServerOptions } from './helpers/pg-server.ts';
import { readTestOutput } from './helpers/test-output.ts';
import { skipUnless, unmet } from './helpers/requirements.ts';

const PG_SERVER = path.join(PROJECT_DIR, 'test', 'helpers', 'pg-server.ts');
const asRoot = os.userInfo().uid === 0 ? await unmet('mountNamespace') : 'needs root, to create a user';

/** A copy of /etc without the postgres user and group: a fresh machine's, for a private mount namespace. */
async function etcWithoutPostgres(): Promise<string> {
  const etc = await tempDir();
  await execa('cp', ['-a', '/etc/.', etc]);
  for (const name of ['passwd', 'shadow', 'group', 'gshadow']) {
    const file = path.join(etc, name);
    const text = await fs.readFile(file, 'utf8').catch(() => undefined);
    if (text !== undefined) await fs.writeFile(file, text.replace(/^postgres:.*\n/gm, ''));
  }
  return etc;
}

/**
 * In a process of its own with this TMPDIR (and umask): start a test server, query it (on its Unix
 * socket if it has one), stop it, print its socket directory.
 */
function serveOnce(tmpdir: string, options: ServerOptions, umask = '022') {
  const serve =
    `import { startTestServer } from '${PG_SERVER}';` +
    `const server = await startTestServer(${JSON.stringify(options)});` +
    'const client = await server.connect(); await client.query("SELECT 1"); await client.end();' +
    'if (server.socketDir) { const pg = (await import("pg")).default;' +
    'const local = new pg.Client({ host: server.socketDir, port: server.port, user: server.user, password: server.password });' +
    'await local.connect(); await local.end(); }' +
    'await server.stop(); console.log(server.socketDir ?? "");';
  const node = `umask ${umask} && exec '${process.execPath}' --import tsx --input-type=module -e "$0"`;
  return execa('sh', ['-c', node, serve], { cwd: PROJECT_DIR, env: { TMPDIR: tmpdir }, reject: false });
}

describe('the postgres user the servers run as, as root', () => {
  test('test files that start at once on a machine without it all get it', skipUnless(asRoot), async () => {
    const lookUp = `import { serverUser } from '${PG_SERVER}'; console.log(JSON.stringify(await serverUser()));`;
    const files = 'for i in 1 2 3 4; do node --import tsx --input-type=module -e "$1" & pids="$pids $!"; done';
    const script = `mount --bind "$0" /etc || exit 1; ${files}; for p in $pids; do wait $p || exit 1; done`;
    const run = await execa('unshare', ['--mount', 'sh', '-c', script, await etcWithoutPostgres(), lookUp], {
      cwd: PROJECT_DIR,
      reject: false,
    });
    assert.equal(run.exitCode, 0, `${run.stdout}\n${run.stderr}`);
    const users = run.stdout.trim().split('\n');
    assert.equal(users.length, 4);
    assert.equal(new Set(users).size, 1, `one user for all: ${users.join(' ')}`);
  });
});

describe('a long TMPDIR (a Unix socket path holds 107 bytes)', () => {
  /** As root the test server runs as the postgres user, who must reach into it. */
  const longDir = async () => {
    const parent = await tempDir();
    await fs.chmod(parent, 0o755);
    const dir = path.join(parent, 'd'.repeat(80));
    await fs.mkdir(dir, { mode: 0o755 });
    return dir;
  };

  test('socketAt makes the socket where asked, under its full name', async () => {
    const file = path.join(await longDir(), 'metadata.json');
    const server = await socketAt(file);
    try {
      assert.ok((await fs.stat(file)).isSocket());
    } finally {
      await new Promise((resolve) => server.close(resolve));
    }
  });

  test('a test server with a Unix socket starts, answers there and leaves nothing', async () => {
    const tmpdir = await longDir();
    const run = await serveOnce(tmpdir, { listenEverywhere: true });
    assert.equal(run.exitCode, 0, `${run.stdout}\n${run.stderr}`);
    // tsx's compile cache stays, as the runner allows.
    assert.deepEqual(
      (await fs.readdir(tmpdir)).filter((name) => !/^tsx-\d+$/.test(name)),
      [],
    );
    await assert.rejects(fs.access(run.stdout.trim()), 'the socket directory is removed too');
  });
});

describe('as root, where the postgres user cannot reach', () => {
  const noRoot = os.userInfo().uid === 0 ? undefined : 'needs root: only then does the server run as postgres';

  test('a umask of 077 changes nothing: the server, with TLS, starts and answers', skipUnless(noRoot), async () => {
    const tmpdir = await tempDir();
    await fs.chmod(tmpdir, 0o755);
    const run = await serveOnce(tmpdir, { tlsOnly: true }, '077');
    assert.equal(run.exitCode, 0, `${run.stdout}\n${run.stderr}`);
  });

  test('a TMPDIR of mode 0700 is a failure naming it, in one line', skipUnless(noRoot), async () => {
    const tmpdir = await tempDir();
    const run = await serveOnce(tmpdir, {});
    assert.notEqual(run.exitCode, 0);
    const lines = run.stderr.split('\n').filter((line) => line.includes('cannot reach'));
    assert.equal(lines.length, 1, run.stderr);
    assert.match(
      lines[0]!,
      new RegExp(
        `postgres user, who cannot reach ${tmpdir}/backup-db-pg-\\w+: let it through ${tmpdir} \\(chmod o\\+x\\)`,
      ),
    );
  });
});

describe('.ci/run', () => {
  test('refuses to start as another user than root, before installing anything', async () => {
    // A copy, in a project of its own with nothing to install: were it to go on, it would fail elsewhere.
    const project = await tempDir();
    await fs.mkdir(path.join(project, '.ci'));
    await fs.copyFile(path.join(PROJECT_DIR, '.ci', 'run'), path.join(project, '.ci', 'run'));
    await execa('chmod', ['-R', 'a+rX', project]);
    const nobody = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', '--'];
    const [command, ...args] = [...(os.userInfo().uid === 0 ? nobody : []), 'bash', path.join(project, '.ci', 'run')];
    const run = await execa(command!, args, { cwd: project, reject: false });
    assert.equal(run.exitCode, 1, `${run.stdout}\n${run.stderr}`);
    assert.match(run.stderr, /^✗ \.ci\/run runs as root .*: sudo \.ci\/run$/m);
    assert.equal(run.stdout, '', 'npm ci did not start');
  });
});

describe("the runner's summary", () => {
  test('a skipped describe counts as a skipped test, not as nothing', async () => {
    const file = path.join(await tempDir(), 'skips.test.mjs');
    await fs.writeFile(
      file,
      "import { describe, test } from 'node:test';\n" +
        "describe('needs pgvector', { skip: 'no pgvector here' }, () => { test('a', () => {}); test('b', () => {}); });\n" +
        "test('needs openssl', { skip: 'no openssl here' }, () => {});\n" +
        "test('runs', () => {});\n",
    );
    const run = await execa(process.execPath, ['--test', '--test-reporter=spec', file], {
      // As test/run.ts starts a file: not as a subtest of this one (NODE_TEST_CONTEXT).
      env: { PATH: process.env.PATH, FORCE_COLOR: '0' },
      extendEnv: false,
      reject: false,
    });
    const { counts, skipped } = readTestOutput(String(run.stdout));
    assert.deepEqual(
      skipped.map((line) => line.replace(/ \([\d.]+ms\)/, '')),
      ['needs pgvector # no pgvector here', 'needs openssl # no openssl here'],
    );
    assert.deepEqual([counts.tests, counts.pass, counts.skipped, counts.fail], [3, 1, 2, 0]);
  });
});
