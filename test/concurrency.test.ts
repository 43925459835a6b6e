/**
 * Issue 4.2, concurrent runs. One backup per database at a time (a lock file in the output
 * directory); a second run for the same database exits 7 naming the running one; different
 * databases back up in parallel; locks of dead processes, or of pids since reused, are taken over.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { execa } from 'execa';
import {
  dbVars,
  NO_HARD_LINKS_MODULE,
  PROJECT_DIR,
  runCli,
  startCli,
  socketAt,
  tempDir,
  writeEnvFile,
} from './helpers/cli.ts';
import { clientDirHolding } from './helpers/clients.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { holdTableLock, waitFor, waitForBlockedPgDump } from './helpers/wait.ts';
import { PID_NAMESPACE, skipUnless, unmet } from './helpers/requirements.ts';

const noProc = await unmet('proc');
const noPidNamespace = await unmet('pidNamespace');

let server: TestServer;
before(async () => {
  server = await startTestServer();
  for (const db of ['conc_a', 'conc_b', 'a b', 'a_b']) {
    await server.createDatabase(db, 'CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(1, 1000)');
  }
});
after(() => server?.stop());

async function backupArgs(database: string, outputDir: string): Promise<string[]> {
  const configDir = await tempDir();
  await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', database));
  return ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir];
}

const dumpsIn = async (dir: string) => (await fs.readdir(dir)).filter((name) => name.endsWith('.dump'));

/** The start time /proc records for a process: what the lock compares to tell a reused pid. */
async function procStartTime(pid: number): Promise<string> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]!;
}

describe('two runs for the same database', () => {
  test(
    'started together: one backs up, the other exits 7 with "backup already running (pid N, since T)"',
    { timeout: 60_000 },
    async () => {
      const outputDir = path.join(await tempDir(), 'out');
      const args = await backupArgs('conc_a', outputDir);
      // The winner's pg_dump waits on this lock, so the two runs certainly overlap.
      const lock = await holdTableLock(() => server.connect('conc_a'), 'items');
      const runs = [startCli({ args }), startCli({ args })] as const;
      const firstToExit = await Promise.race(runs.map((run, index) => run.then(() => index)));
      const [loser, winner] = [runs[firstToExit]!, runs[1 - firstToExit]!];
      try {
        const lost = await loser;
        assert.equal(lost.exitCode, 7, String(lost.stderr));
        const stderr = String(lost.stderr);
        assert.match(stderr, /^✗ Backup failed: Backup already running$/m);
        const match = /backup already running \(pid (\d+), since (\S+)\) for database "conc_a" \(dev\)/.exec(stderr);
        assert.ok(match, stderr);
        assert.equal(Number(match[1]), winner.pid, 'it names the run that holds the lock');
        assert.ok(!Number.isNaN(Date.parse(match[2]!)));
      } finally {
        await lock.release();
      }
      const won = await winner;
      assert.equal(won.exitCode, 0, String(won.stderr));
      assert.equal((await dumpsIn(outputDir)).length, 1);
      assert.ok(
        !(await fs.readdir(outputDir)).some((name) => name.endsWith('.lock') || name.endsWith('.partial')),
        'lock released, nothing left over',
      );
    },
  );
});

describe('runs for different databases', () => {
  test('proceed in parallel in the same directory', { timeout: 60_000 }, async () => {
    const outputDir = path.join(await tempDir(), 'out');
    const [argsA, argsB] = await Promise.all([backupArgs('conc_a', outputDir), backupArgs('conc_b', outputDir)]);
    const lockA = await holdTableLock(() => server.connect('conc_a'), 'items');
    const lockB = await holdTableLock(() => server.connect('conc_b'), 'items');
    const runs = [startCli({ args: argsA }), startCli({ args: argsB })];
    try {
      // Both pg_dumps running at once, each waiting on its own database's lock.
      await waitFor('two pg_dumps running at once', async () => {
        const { rows } = await lockA.observer.query(
          "SELECT count(DISTINCT datname)::int AS n FROM pg_stat_activity WHERE application_name LIKE 'backup_db:%' AND query LIKE 'LOCK TABLE%'",
        );
        return rows[0].n === 2 ? true : undefined;
      });
    } finally {
      await Promise.all([lockA.release(), lockB.release()]);
    }
    for (const run of await Promise.all(runs)) assert.equal(run.exitCode, 0, String(run.stderr));
    assert.equal((await dumpsIn(outputDir)).length, 2);
  });
});

describe('stale locks', () => {
  async function runWithLock(owner: Record<string, unknown>) {
    const outputDir = path.join(await tempDir(), 'out');
    await fs.mkdir(outputDir);
    await fs.writeFile(path.join(outputDir, 'conc_a_dev.lock'), JSON.stringify(owner));
    const result = await runCli({ args: await backupArgs('conc_a', outputDir) });
    return { ...result, files: await fs.readdir(outputDir) };
  }
  const base = () => ({ hostname: os.hostname(), started_at: new Date(Date.now() - 3_600_000).toISOString() });

  test(
    'a FIFO where the lock belongs is refused at once, not waited on, and left in place',
    { timeout: 60_000 },
    async () => {
      const outputDir = path.join(await tempDir(), 'out');
      await fs.mkdir(outputDir);
      await execa('mkfifo', [path.join(outputDir, 'conc_a_dev.lock')]);
      const result = await runCli({ args: await backupArgs('conc_a', outputDir) });
      assert.notEqual(result.exitCode, 0);
      assert.match(result.stderr, /not a regular file/);
      assert.deepEqual(await fs.readdir(outputDir), ['conc_a_dev.lock']);
    },
  );

  test(
    'a FIFO, directory or socket where the lock belongs: exit 7 naming it, to remove by hand, no permission hints',
    { timeout: 60_000 },
    async () => {
      const makers: Record<string, (file: string) => Promise<() => Promise<void>>> = {
        FIFO: async (file) => (await execa('mkfifo', [file]), async () => undefined),
        directory: async (file) => (await fs.mkdir(file), async () => undefined),
        socket: async (file) => {
          const socket = await socketAt(file);
          return () => new Promise((resolve) => socket.close(() => resolve()));
        },
      };
      for (const [kind, make] of Object.entries(makers)) {
        const outputDir = path.join(await tempDir(), 'out');
        await fs.mkdir(outputDir);
        const lockPath = path.join(outputDir, 'conc_a_dev.lock');
        const close = await make(lockPath);
        try {
          const result = await runCli({ args: await backupArgs('conc_a', outputDir) });
          assert.equal(result.exitCode, 7, `${kind}: ${result.stderr}`);
          assert.match(result.stderr, /^✗ Backup failed: Could not take the backup lock$/m, kind);
          assert.ok(result.stderr.includes(`${lockPath} is not a regular file`), `${kind}: ${result.stderr}`);
          assert.match(result.stderr, /remove it by hand/, kind);
          assert.doesNotMatch(result.stderr, /permission|writable|chown|--output-dir/i, kind);
          assert.deepEqual(await fs.readdir(outputDir), ['conc_a_dev.lock'], `${kind}: left in place`);
        } finally {
          await close();
        }
      }
    },
  );

  test('a lock whose process is dead is taken over', async () => {
    const dead = execa('true');
    const deadPid = dead.pid;
    await dead;
    const result = await runWithLock({ ...base(), pid: deadPid, process_start: null });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.ok(!result.files.some((name) => name.endsWith('.lock')), 'taken over, then released');
  });

  test(
    'a lock whose pid now belongs to another program (start time differs) is taken over',
    skipUnless(noProc),
    async () => {
      const result = await runWithLock({ ...base(), pid: process.pid, process_start: '1' });
      assert.equal(result.exitCode, 0, result.stderr);
    },
  );

  test('a lock held by a live process is respected (exit 7) and left in place', skipUnless(noProc), async () => {
    const owner = { ...base(), pid: process.pid, process_start: await procStartTime(process.pid) };
    const result = await runWithLock(owner);
    assert.equal(result.exitCode, 7);
    assert.match(
      result.stderr,
      new RegExp(`backup already running \\(pid ${process.pid}, since ${owner.started_at}\\)`),
    );
    assert.match(result.stderr, /rm .*conc_a_dev\.lock/, 'says how to clear a lock if the owner is really gone');
    assert.deepEqual(result.files, ['conc_a_dev.lock']);
  });

  test('a lock from another machine (shared storage) cannot be checked, so it is respected', async () => {
    const result = await runWithLock({ ...base(), hostname: 'some-other-host', pid: 1, process_start: null });
    assert.equal(result.exitCode, 7);
    assert.match(result.stderr, /pid 1 on some-other-host/);
  });

  test(
    'a live run in another pid namespace (a container with the same hostname) keeps its lock and its partial',
    { timeout: 60_000, ...skipUnless(noPidNamespace) },
    async () => {
      const outputDir = path.join(await tempDir(), 'out');
      const args = await backupArgs('conc_a', outputDir);
      const lock = await holdTableLock(() => server.connect('conc_a'), 'items');
      // pid 1 in its own namespace; here pid 1 is another process, with another start time.
      const contained = startCli({ args, wrapper: ['unshare', ...PID_NAMESPACE] });
      try {
        await waitForBlockedPgDump(lock.observer);
        const second = await runCli({ args });
        assert.equal(second.exitCode, 7, second.stderr);
        assert.match(second.stderr, /backup already running \(pid 1 in another pid namespace, a container\b/);
        assert.doesNotMatch(second.stderr, /ps -o pid,etime,args -p 1\b/, 'pid 1 here is not that run');
      } finally {
        await lock.release();
      }
      const first = await contained;
      assert.equal(first.exitCode, 0, String(first.stderr));
      assert.equal((await dumpsIn(outputDir)).length, 1);
    },
  );

  test('a lock from an earlier boot of this machine is taken over, even in another pid namespace', async () => {
    const owner = { ...base(), pid: process.pid, process_start: await procStartTime(process.pid) };
    const result = await runWithLock({ ...owner, pid_namespace: 'pid:[1]', boot_id: 'an-earlier-boot' });
    assert.equal(result.exitCode, 0, result.stderr);
  });

  test('a lock whose process was killed but not yet reaped (a zombie) is taken over', skipUnless(noProc), async () => {
    // The shell's child is killed; the shell, replaced by sleep, never reaps it.
    const parent = execa('sh', ['-c', 'sleep 60 & echo $!; exec sleep 60'], { reject: false });
    try {
      const zombie = Number((await createInterface({ input: parent.stdout! })[Symbol.asyncIterator]().next()).value);
      const start = await procStartTime(zombie);
      process.kill(zombie, 'SIGKILL');
      await waitFor('the killed child to become a zombie', async () =>
        (await fs.readFile(`/proc/${zombie}/stat`, 'utf8')).includes(') Z ') ? true : undefined,
      );
      const result = await runWithLock({ ...base(), pid: zombie, process_start: start });
      assert.equal(result.exitCode, 0, result.stderr);
    } finally {
      parent.kill();
    }
  });
});

/** A pid that certainly belongs to no process: one that has just exited. */
async function deadPid(): Promise<number> {
  const dead = execa('true');
  await dead;
  return dead.pid!;
}

describe('a file system without hard links (exFAT, FAT, some FUSE)', () => {
  test('a backup takes the lock all the same: a second run meanwhile exits 7; the lock is gone after', async () => {
    const outputDir = path.join(await tempDir(), 'out');
    const args = await backupArgs('conc_a', outputDir);
    const held = await clientDirHolding('pg_dump', '--snapshot');
    const first = startCli({ args: [...args, '--pg-bin-dir', held.dir], noHardLinks: true });
    try {
      await waitFor('the first backup to dump', async () => (existsSync(held.started) ? true : undefined));
      const second = await runCli({ args, noHardLinks: true });
      assert.equal(second.exitCode, 7, second.stderr);
      assert.match(second.stderr, new RegExp(`backup already running \\(pid ${first.pid}, since `));
    } finally {
      await fs.writeFile(held.release, '');
    }
    const done = await first;
    assert.equal(done.exitCode, 0, String(done.stderr));
    const files = await fs.readdir(outputDir);
    assert.equal((await dumpsIn(outputDir)).length, 1);
    assert.ok(!files.some((name) => name.endsWith('.lock')), `lock released: ${files.join(', ')}`);
  });

  test("a dead run's lock is taken over", async () => {
    const outputDir = path.join(await tempDir(), 'out');
    await fs.mkdir(outputDir);
    const dead = { pid: await deadPid(), hostname: os.hostname(), started_at: new Date().toISOString() };
    await fs.writeFile(path.join(outputDir, 'conc_a_dev.lock'), JSON.stringify(dead));
    const result = await runCli({ args: await backupArgs('conc_a', outputDir), noHardLinks: true });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.ok(
      !(await fs.readdir(outputDir)).some((name) => /\.lock\.(?!reserve$)/.test(name)),
      'no temp, swap or claim left',
    );
  });
});

describe('an empty lock (a run without hard links writing it, or killed as it did)', () => {
  async function backupWithEmptyLock(ageMs: number) {
    const outputDir = path.join(await tempDir(), 'out');
    await fs.mkdir(outputDir);
    const lock = path.join(outputDir, 'conc_a_dev.lock');
    await fs.writeFile(lock, '');
    const then = new Date(Date.now() - ageMs);
    await fs.utimes(lock, then, then);
    const result = await runCli({ args: await backupArgs('conc_a', outputDir) });
    return { ...result, lock, files: await fs.readdir(outputDir) };
  }

  test("just written: not taken for a dead run's, exit 7 saying so; left in place", async () => {
    const result = await backupWithEmptyLock(0);
    assert.equal(result.exitCode, 7, result.stderr);
    assert.match(result.stderr, /^✗ Backup failed: Could not take the backup lock$/m);
    assert.ok(result.stderr.includes(`${result.lock} is empty: another run is writing it`), result.stderr);
    assert.match(result.stderr, /1\. Run again in a minute/);
    assert.ok(result.files.includes('conc_a_dev.lock'));
    assert.equal(result.files.filter((name) => name.endsWith('.dump')).length, 0);
  });

  test("over a minute old: a dead run's, taken over", async () => {
    const result = await backupWithEmptyLock(120_000);
    assert.equal(result.exitCode, 0, result.stderr);
    assert.ok(!result.files.includes('conc_a_dev.lock'));
  });
});

describe('stale-lock takeover under contention', () => {
  // Where the file system has no hard links (exFAT), the lock is created otherwise (see no-hard-links.ts).
  for (const [where, preload, rounds] of [
    ['', [], 240],
    [', without hard links', ['--import', NO_HARD_LINKS_MODULE], 120],
  ] as const)
    test(
      `many processes finding one dead lock at the same instant${where}: never two holders, round after round`,
      { timeout: 120_000 },
      async () => {
        const contenders = Array.from({ length: 6 }, () => {
          const child = spawn(
            process.execPath,
            ['--import', 'tsx', ...preload, path.join(PROJECT_DIR, 'test', 'helpers', 'lock-contender.ts')],
            { cwd: PROJECT_DIR, stdio: ['pipe', 'pipe', 'inherit'] },
          );
          const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
          return {
            child,
            say: (line: string) => child.stdin.write(`${line}\n`),
            answer: async () => String((await lines.next()).value),
          };
        });
        const pid = await deadPid();
        const owner = (p: number) =>
          JSON.stringify({
            pid: p,
            hostname: os.hostname(),
            started_at: new Date().toISOString(),
            process_start: null,
          });
        // What a directory can hold when the runs start: a dead run's lock; that lock and the takeover
        // claim of a run that died taking it over; a lock that is not JSON; no lock at all.
        const setups: Array<(dir: string) => Promise<void>> = [
          (dir) => fs.writeFile(path.join(dir, 'app_dev.lock'), owner(pid)),
          async (dir) => {
            await fs.writeFile(path.join(dir, 'app_dev.lock'), owner(pid));
            const { ino } = await fs.stat(path.join(dir, 'app_dev.lock'), { bigint: true });
            await fs.writeFile(path.join(dir, `app_dev.lock.takeover-${ino}`), owner(pid));
          },
          (dir) => fs.writeFile(path.join(dir, 'app_dev.lock'), 'not json'),
          async () => undefined,
        ];
        const violations: string[] = [];
        try {
          for (let round = 0; round < rounds; round++) {
            const dir = await tempDir('backup-db-lock-');
            await setups[round % setups.length]!(dir);
            for (const c of contenders) c.say(`go ${dir}`);
            const answers = await Promise.all(contenders.map((c) => c.answer()));
            const winners = contenders.filter((_, i) => answers[i] === 'won');
            if (winners.length !== 1)
              violations.push(`round ${round}: ${winners.length} holders (${answers.join(' | ')})`);
            for (const loser of answers.filter((a) => a !== 'won'))
              assert.match(loser, /^lost Backup already running: /);
            for (const winner of winners) {
              winner.say('release');
              assert.equal(await winner.answer(), 'released');
            }
            assert.deepEqual(
              (await fs.readdir(dir)).filter((n) => !n.includes('.takeover-')),
              [],
              'no lock, temp or swap file left behind',
            );
            await fs.rm(dir, { recursive: true, force: true });
          }
        } finally {
          for (const c of contenders) c.child.kill();
        }
        assert.deepEqual(violations, []);
      },
    );

  test(
    "five real backups started together against a dead run's lock: one runs, four exit 7",
    { timeout: 120_000 },
    async () => {
      for (let round = 0; round < 3; round++) {
        const outputDir = path.join(await tempDir(), 'out');
        await fs.mkdir(outputDir);
        await fs.writeFile(
          path.join(outputDir, 'conc_a_dev.lock'),
          JSON.stringify({
            pid: await deadPid(),
            hostname: os.hostname(),
            started_at: new Date().toISOString(),
            process_start: null,
          }),
        );
        const args = await backupArgs('conc_a', outputDir);
        // Every run's pg_dump would wait on this lock: a winner that got through holds the lock for as
        // long as the others take to start.
        const lock = await holdTableLock(() => server.connect('conc_a'), 'items');
        const runs = Array.from({ length: 5 }, () => startCli({ args }));
        let exited = 0;
        for (const run of runs) void run.then(() => exited++);
        try {
          // The one that got the lock waits on the table; the four others must give up meanwhile.
          await waitFor('four of the five runs to give up', async () => (exited >= 4 ? true : undefined), 60_000);
        } finally {
          await lock.release();
        }
        const exits = (await Promise.all(runs)).map((run) => run.exitCode).sort();
        assert.deepEqual(exits, [0, 7, 7, 7, 7], `round ${round}`);
        assert.equal((await dumpsIn(outputDir)).length, 1);
      }
    },
  );
});

describe('lock leftovers and names', () => {
  test('temp files and takeover claims of runs killed while taking the lock are removed by the next backup', async () => {
    const outputDir = path.join(await tempDir(), 'out');
    await fs.mkdir(outputDir);
    const pid = await deadPid();
    const leftovers = [`conc_a_dev.lock.${pid}.tmp`, `conc_a_dev.lock.${pid}.swap`, 'conc_a_dev.lock.takeover-12345'];
    for (const name of leftovers)
      await fs.writeFile(
        path.join(outputDir, name),
        JSON.stringify({ pid, hostname: os.hostname(), started_at: new Date().toISOString(), process_start: null }),
      );
    // A starting run of this database that is still alive, and another database's leftover: kept.
    const live = `conc_a_dev.lock.${process.pid}.tmp`;
    await fs.writeFile(path.join(outputDir, live), '{}');
    const other = `conc_b_dev.lock.${pid}.tmp`;
    await fs.writeFile(path.join(outputDir, other), '{}');
    const result = await runCli({ args: [...(await backupArgs('conc_a', outputDir)), '--json'] });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.deepEqual(JSON.parse(result.stdout).removed_stale_files.sort(), [...leftovers].sort());
    const after = await fs.readdir(outputDir);
    assert.ok(after.includes(live) && after.includes(other));
    assert.ok(!leftovers.some((name) => after.includes(name)));
  });

  test('a leftover partial this user cannot remove is named in a warning; the backups go on', async () => {
    const outputDir = path.join(await tempDir(), 'out');
    // What a killed --jobs run of another user leaves: a directory this user can neither read nor empty.
    const partial = 'conc_a_dev_2026-01-01T00-00-00Z.dump.partial';
    await fs.mkdir(path.join(outputDir, partial), { recursive: true });
    await fs.writeFile(path.join(outputDir, partial, 'toc.dat'), 'x');
    await fs.chmod(path.join(outputDir, partial), 0o000);
    const args = await backupArgs('conc_a', outputDir);
    const first = await runCli({ args, withoutRootOverride: true });
    assert.equal(first.exitCode, 0, first.stdout + first.stderr);
    assert.match(
      first.stderr,
      new RegExp(`^⚠ Could not remove 1 stale file left by an interrupted earlier run: ${partial} \\(owned by .+\\)`),
    );
    const second = await runCli({ args: [...args, '--json'], withoutRootOverride: true });
    assert.equal(second.exitCode, 0, second.stdout + second.stderr);
    const doc = JSON.parse(second.stdout);
    assert.deepEqual(doc.removed_stale_files, []);
    assert.match(doc.stale_files_left.join(), /EACCES/);
    assert.equal((await dumpsIn(outputDir)).length, 2);
  });

  test(
    "a starting run's lock temp files from another pid namespace are left alone, unless from an earlier boot",
    skipUnless(noProc),
    async () => {
      const outputDir = path.join(await tempDir(), 'out');
      await fs.mkdir(outputDir);
      // Dead here; in its own namespace (a container sharing the directory), the run that wrote them.
      const pid = await deadPid();
      const bootId = (await fs.readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim();
      const owner = (boot_id: string) =>
        JSON.stringify({
          pid,
          hostname: os.hostname(),
          started_at: new Date().toISOString(),
          process_start: '1',
          pid_namespace: 'pid:[1]',
          boot_id,
        });
      const write = (name: string, text: string) => fs.writeFile(path.join(outputDir, name), text);
      const live = [`conc_a_dev.lock.${pid}.0a1b2c3d.tmp`, `conc_a_dev.lock.${pid}.0a1b2c3d.swap`];
      for (const name of live) await write(name, owner(bootId));
      const earlierBoot = `conc_a_dev.lock.${pid}.4e5f6a7b.tmp`;
      await write(earlierBoot, owner('an-earlier-boot'));
      // Caught between its creation and its write: no record yet to judge it by, so judged by its age.
      const beingWritten = `conc_a_dev.lock.${pid}.8c9d0e1f.tmp`;
      await write(beingWritten, '');
      const diedWriting = `conc_a_dev.lock.${pid}.2a3b4c5d.tmp`;
      await write(diedWriting, '');
      const hourAgo = new Date(Date.now() - 3_600_000);
      await fs.utimes(path.join(outputDir, diedWriting), hourAgo, hourAgo);
      const result = await runCli({ args: [...(await backupArgs('conc_a', outputDir)), '--json'] });
      assert.equal(result.exitCode, 0, result.stderr);
      assert.deepEqual(JSON.parse(result.stdout).removed_stale_files.sort(), [diedWriting, earlierBoot].sort());
      const after = await fs.readdir(outputDir);
      for (const name of [...live, beingWritten]) assert.ok(after.includes(name), `${name} kept`);
    },
  );

  test(
    "a leftover lock temp file named with this run's own pid (pid 1 in a container) is stale, not in the way",
    skipUnless(noPidNamespace),
    async () => {
      const outputDir = path.join(await tempDir(), 'out');
      await fs.mkdir(outputDir);
      const leftover = 'conc_a_dev.lock.1.tmp';
      await fs.writeFile(path.join(outputDir, leftover), '{}');
      const args = [...(await backupArgs('conc_a', outputDir)), '--json'];
      const result = await runCli({ args, wrapper: ['unshare', ...PID_NAMESPACE] });
      assert.equal(result.exitCode, 0, result.stderr);
      assert.deepEqual(JSON.parse(result.stdout).removed_stale_files, [leftover]);
    },
  );

  test("temp metadata (a drill's, which takes no lock): kept while being written, removed once a minute old", async () => {
    const outputDir = path.join(await tempDir(), 'out');
    await fs.mkdir(outputDir);
    // Each lives for one write: a young one may be another run's (a drill's) being written.
    const temp = (pid: number) => `conc_a_dev_2025-01-01T00-00-00Z.metadata.json.tmp-${pid}`;
    const [young, old] = [temp(process.pid), temp(await deadPid())];
    const hourAgo = new Date(Date.now() - 3_600_000);
    for (const name of [young, old]) await fs.writeFile(path.join(outputDir, name), '{}');
    await fs.utimes(path.join(outputDir, old), hourAgo, hourAgo);
    const result = await runCli({ args: [...(await backupArgs('conc_a', outputDir)), '--json'] });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.deepEqual(JSON.parse(result.stdout).removed_stale_files, [old]);
    assert.ok((await fs.readdir(outputDir)).includes(young), `${young} kept`);
  });

  test(
    "write probes and temp metadata named with this run's own pid (pid 1 in a container) are not in the way",
    skipUnless(noPidNamespace),
    async () => {
      const outputDir = path.join(await tempDir(), 'out');
      await fs.mkdir(outputDir);
      // Left by a run killed between creating and removing (renaming) them, whose pid was 1 too.
      const leftovers = ['.backup_db-write-test-1', 'conc_a_dev_2025-01-01T00-00-00Z.metadata.json.tmp-1'];
      const hourAgo = new Date(Date.now() - 3_600_000);
      for (const name of leftovers) {
        await fs.writeFile(path.join(outputDir, name), '');
        await fs.utimes(path.join(outputDir, name), hourAgo, hourAgo);
      }
      // Another run's probe, young: it may be being written.
      const young = '.backup_db-write-test-0a1b2c3d';
      await fs.writeFile(path.join(outputDir, young), '');
      const args = [...(await backupArgs('conc_a', outputDir)), '--json'];
      const result = await runCli({ args, wrapper: ['unshare', ...PID_NAMESPACE] });
      assert.equal(result.exitCode, 0, result.stderr);
      assert.deepEqual(JSON.parse(result.stdout).removed_stale_files.sort(), leftovers.sort());
      assert.ok((await fs.readdir(outputDir)).includes(young), `${young} kept`);
    },
  );

  test(
    'databases "a b" and "a_b" back up at the same time in one directory, each under its own lock',
    { timeout: 60_000 },
    async () => {
      const outputDir = path.join(await tempDir(), 'out');
      const [argsSpace, argsUnderscore] = await Promise.all([
        backupArgs('a b', outputDir),
        backupArgs('a_b', outputDir),
      ]);
      const lockSpace = await holdTableLock(() => server.connect('a b'), 'items');
      const lockUnderscore = await holdTableLock(() => server.connect('a_b'), 'items');
      const runs = [startCli({ args: argsSpace }), startCli({ args: argsUnderscore })];
      try {
        await waitFor('both pg_dumps running at once', async () => {
          const { rows } = await lockSpace.observer.query(
            "SELECT count(DISTINCT datname)::int AS n FROM pg_stat_activity WHERE application_name LIKE 'backup_db:%' AND query LIKE 'LOCK TABLE%'",
          );
          return rows[0].n === 2 ? true : undefined;
        });
        assert.deepEqual((await fs.readdir(outputDir)).filter((n) => n.endsWith('.lock')).sort(), [
          'a%20b_dev.lock',
          'a_b_dev.lock',
        ]);
      } finally {
        await Promise.all([lockSpace.release(), lockUnderscore.release()]);
      }
      for (const run of await Promise.all(runs)) assert.equal(run.exitCode, 0, String(run.stderr));
      const listed = JSON.parse((await runCli({ args: ['--list', '--json', '--output-dir', outputDir] })).stdout);
      assert.deepEqual(listed.backups.map((b: { database: string }) => b.database).sort(), ['a b', 'a_b']);
    },
  );
});
