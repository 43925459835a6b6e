/**
 * The README's scheduling examples, run as written: the crontab command and the systemd service's
 * ExecStart (with its WorkingDirectory and PATH), each in an empty environment like the one cron
 * and systemd give, against a copy of the project whose .env points at a throwaway server. Only
 * the placeholder paths (/path/to/project, /var/log/backup_db) are replaced.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { dbVars, PROJECT_DIR, tempDir, writeEnvFile } from './helpers/cli.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';

let server: TestServer;
let readme: string;
before(async () => {
  server = await startTestServer();
  await server.createDatabase('sched_prod', 'CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 10)');
  readme = await fs.readFile(path.join(PROJECT_DIR, 'README.md'), 'utf8');
});
after(() => server?.stop());

/** A deployable copy of the project: the script, package.json, its node_modules and a .env. */
async function deployedProject() {
  const root = await tempDir('backup-db-deploy-');
  const project = path.join(root, 'project');
  const logs = path.join(root, 'log');
  await fs.mkdir(project);
  await fs.mkdir(logs);
  for (const file of ['backup_db.ts', 'package.json'])
    await fs.copyFile(path.join(PROJECT_DIR, file), path.join(project, file));
  await fs.symlink(path.join(PROJECT_DIR, 'node_modules'), path.join(project, 'node_modules'));
  await writeEnvFile(project, '.env', dbVars(server, 'DB_', 'sched_prod'));
  const place = (text: string) => text.replaceAll('/path/to/project', project).replaceAll('/var/log/backup_db', logs);
  return { root, project, logs, place };
}

async function assertOneGoodBackup(project: string, logs: string) {
  const backups = (await fs.readdir(path.join(project, 'db', 'backups'))).filter((name) => name.endsWith('.dump'));
  assert.equal(backups.length, 1);
  assert.match(backups[0]!, /^sched_prod_prod_.*\.dump$/);
  const runs = (await fs.readFile(path.join(logs, 'runs.log'), 'utf8'))
    .trim()
    .split('\n')
    .map((line) => JSON.parse(line));
  assert.deepEqual(
    runs.map((r) => [r.command, r.outcome, r.environment, r.database]),
    [['backup', 'success', 'prod', 'sched_prod']],
  );
}

describe('README scheduling examples', () => {
  test("the crontab line works in cron's environment", { timeout: 120_000 }, async () => {
    const line = readme.split('\n').find((l) => /^\d+ \d+ \* \* \* /.test(l));
    assert.ok(line, 'the README has a crontab line');
    const deploy = await deployedProject();
    const command = deploy.place(line.split(' ').slice(5).join(' '));
    // What cron provides: HOME, LOGNAME, SHELL and PATH=/usr/bin:/bin, nothing else.
    const cron = await execa(
      '/usr/bin/env',
      [
        '-i',
        `HOME=${deploy.root}`,
        `LOGNAME=${os.userInfo().username}`,
        'SHELL=/bin/sh',
        'PATH=/usr/bin:/bin',
        '/bin/sh',
        '-c',
        command,
      ],
      { reject: false },
    );
    assert.equal(
      cron.exitCode,
      0,
      `${cron.stderr}\n${await fs.readFile(path.join(deploy.logs, 'cron.log'), 'utf8').catch(() => '')}`,
    );
    const cronLog = await fs.readFile(path.join(deploy.logs, 'cron.log'), 'utf8');
    assert.match(cronLog, /✓ Backup created successfully/);
    assert.match(cronLog, /Retention: {3}kept 1, deleted none by keep-daily 7, keep-weekly 4, keep-monthly 6/);
    assert.doesNotMatch(cronLog, /\x1b\[/, 'no colour codes in a log file');
    await assertOneGoodBackup(deploy.project, deploy.logs);
  });

  test('the systemd service runs as written; the timer is persistent', { timeout: 120_000 }, async () => {
    const service = /```ini\n(\[Unit\][^`]*\[Service\][^`]*)```/.exec(readme)?.[1];
    const timer = /```ini\n(\[Unit\][^`]*\[Timer\][^`]*)```/.exec(readme)?.[1];
    assert.ok(service && timer, 'the README has a service and a timer');
    const setting = (unit: string, key: string) => new RegExp(`^${key}=(.*)$`, 'm').exec(unit)?.[1];
    assert.equal(setting(timer, 'Persistent'), 'true');
    assert.match(setting(timer, 'OnCalendar') ?? '', /\d\d:\d\d/);
    assert.equal(setting(service, 'Type'), 'oneshot');

    const deploy = await deployedProject();
    const workingDirectory = deploy.place(setting(service, 'WorkingDirectory')!);
    const [pathVar, pathValue] = setting(service, 'Environment')!.split(/=(.*)/s) as [string, string];
    assert.equal(pathVar, 'PATH');
    const [executable, ...args] = deploy.place(setting(service, 'ExecStart')!).split(/\s+/);
    assert.ok(path.isAbsolute(executable!), 'ExecStart starts with an absolute path, as systemd requires');
    // What systemd provides a service: its Environment= lines, plus HOME/USER/LOGNAME for User=.
    const unitEnv = {
      [pathVar]: pathValue,
      HOME: deploy.root,
      USER: os.userInfo().username,
      LOGNAME: os.userInfo().username,
    };
    const run = await execa(executable!, args, {
      cwd: workingDirectory,
      env: unitEnv,
      extendEnv: false,
      reject: false,
    });
    assert.equal(run.exitCode, 0, `${run.stdout}\n${run.stderr}`);
    assert.match(String(run.stdout), /✓ Backup created successfully/, 'the journal gets the human summary');
    await assertOneGoodBackup(deploy.project, deploy.logs);
  });
});
