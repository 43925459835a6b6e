/**
 * Retention (user story 3): the grandfather-father-son selection as a pure function over many
 * synthetic timestamp sets, checked against an independent reference; then the safety rules end
 * to end on real backup files.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import {
  calendarBuckets,
  CLOCK_TOLERANCE_MS,
  hashBackup,
  metadataFileName,
  planRetention,
  retentionTimeZone,
  selectRetention,
  type ListEntry,
  type ListStatus,
  type RetentionPolicy,
  type RetentionScope,
} from '../backup_db.ts';
import { dbVars, runCli, startCli, takeBackup, tempDir, writeEnvFile, type TakenBackup } from './helpers/cli.ts';
import { clientDirHolding } from './helpers/clients.ts';
import { startProxy, type FreezableProxy } from './helpers/proxy.ts';
import { startTestServer, type TestServer } from './helpers/pg-server.ts';
import { directoryFingerprint, flipMiddleByte, waitFor } from './helpers/wait.ts';
import { skipUnless, unmet } from './helpers/requirements.ts';

const noSetpriv = await unmet('setpriv');

const policy = (p: Partial<RetentionPolicy>): RetentionPolicy => ({ last: 0, daily: 0, weekly: 0, monthly: 0, ...p });
const at = (...isoTimes: string[]) => isoTimes.map((iso) => ({ file: iso, time: new Date(iso) }));
const kept = (items: Array<{ file: string; time: Date }>, p: Partial<RetentionPolicy>, timeZone = 'UTC') =>
  selectRetention(items, policy(p), timeZone)
    .filter((d) => d.keep)
    .map((d) => d.item.file);

describe('calendarBuckets', () => {
  test('local day, ISO week and month, in the given time zone', () => {
    assert.deepEqual(calendarBuckets(new Date('2025-01-27T14:30:00Z'), 'UTC'), {
      day: '2025-01-27',
      week: '2025-W05',
      month: '2025-01',
    });
    // 23:30 in New York on Jan 31 is already February in UTC.
    assert.deepEqual(calendarBuckets(new Date('2025-02-01T04:30:00Z'), 'America/New_York'), {
      day: '2025-01-31',
      week: '2025-W05',
      month: '2025-01',
    });
    assert.equal(calendarBuckets(new Date('2025-02-01T04:30:00Z'), 'UTC').month, '2025-02');
  });

  test('ISO weeks cross year boundaries the ISO way', () => {
    assert.equal(calendarBuckets(new Date('2024-12-29T12:00:00Z'), 'UTC').week, '2024-W52'); // Sunday
    assert.equal(calendarBuckets(new Date('2024-12-30T12:00:00Z'), 'UTC').week, '2025-W01'); // Monday
    assert.equal(calendarBuckets(new Date('2021-01-03T12:00:00Z'), 'UTC').week, '2020-W53');
    assert.equal(calendarBuckets(new Date('2026-01-01T12:00:00Z'), 'UTC').week, '2026-W01');
  });
});

describe('retentionTimeZone', () => {
  test('a usable zone as Node resolves it; from a zoneinfo path; else UTC, never "undefined" or "Etc/Unknown"', () => {
    assert.equal(retentionTimeZone('Europe/Berlin', 'Europe/Berlin'), 'Europe/Berlin');
    // TZ= (empty): Node 20 resolves "Etc/Unknown", which no formatter accepts; the C library means UTC.
    assert.equal(retentionTimeZone('Etc/Unknown', ''), 'UTC');
    // TZ=UTC0, TZ=localtime, TZ=/path: Node names no zone.
    assert.equal(retentionTimeZone(undefined, 'UTC0'), 'UTC');
    assert.equal(retentionTimeZone(undefined, 'localtime'), 'UTC');
    assert.equal(retentionTimeZone(undefined, '/usr/share/zoneinfo/Europe/Berlin'), 'Europe/Berlin');
    assert.equal(retentionTimeZone(undefined, '/usr/share/zoneinfo/No/Such_Zone'), 'UTC');
    assert.equal(retentionTimeZone(undefined, undefined), 'UTC');
    // The same zone's POSIX and leap-second variants (TZ=/usr/share/zoneinfo/posix/…, right/…).
    assert.equal(retentionTimeZone(undefined, '/usr/share/zoneinfo/posix/Europe/Paris'), 'Europe/Paris');
    assert.equal(retentionTimeZone(undefined, '/usr/share/zoneinfo/right/Europe/Paris'), 'Europe/Paris');
    assert.equal(retentionTimeZone(undefined, '/var/db/timezone/zoneinfo/Europe/Paris'), 'Europe/Paris');
    // TZ=:/path/to/a/link: the file it leads to decides, not Node's "UTC" for a path it does not know.
    assert.equal(retentionTimeZone('UTC', ':/etc/tz-link', '/usr/share/zoneinfo/Europe/Paris'), 'Europe/Paris');
    assert.equal(retentionTimeZone('UTC', '/tmp/tz-copy', '/tmp/tz-copy'), 'UTC');
  });
});

describe('selectRetention', () => {
  test('keep-last N keeps exactly the N newest, whatever the input order', () => {
    const items = at(
      '2025-01-03T00:00:00Z',
      '2025-01-01T00:00:00Z',
      '2025-01-05T00:00:00Z',
      '2025-01-02T00:00:00Z',
      '2025-01-04T00:00:00Z',
    );
    assert.deepEqual(kept(items, { last: 2 }), ['2025-01-05T00:00:00Z', '2025-01-04T00:00:00Z']);
  });

  test('several backups a day: keep-daily keeps the newest of each day', () => {
    const items = at(
      '2025-03-01T02:00:00Z',
      '2025-03-01T14:00:00Z',
      '2025-03-01T20:00:00Z',
      '2025-03-02T02:00:00Z',
      '2025-03-02T14:00:00Z',
    );
    assert.deepEqual(kept(items, { daily: 2 }), ['2025-03-02T14:00:00Z', '2025-03-01T20:00:00Z']);
  });

  test('gaps: "the last N days" means the last N days that have backups', () => {
    const items = at('2025-03-20T02:00:00Z', '2025-03-10T02:00:00Z', '2025-02-01T02:00:00Z', '2025-01-01T02:00:00Z');
    assert.deepEqual(kept(items, { daily: 3 }), [
      '2025-03-20T02:00:00Z',
      '2025-03-10T02:00:00Z',
      '2025-02-01T02:00:00Z',
    ]);
  });

  test('the newest backup is kept even by a policy that keeps nothing else', () => {
    const decisions = selectRetention(at('2025-01-01T00:00:00Z', '2025-01-02T00:00:00Z'), policy({}), 'UTC');
    assert.deepEqual(
      decisions.map((d) => [d.item.file, d.keep, d.reasons]),
      [
        ['2025-01-02T00:00:00Z', true, ['newest backup']],
        ['2025-01-01T00:00:00Z', false, []],
      ],
    );
  });

  test('DST fall-back day in Berlin: 00:30 and 23:30 local are one day (they are two UTC days)', () => {
    // 2025-10-26: clocks go back 03:00 → 02:00. 00:30 CEST = 22:30Z on the 25th; 23:30 CET = 22:30Z on the 26th.
    const items = at('2025-10-25T22:30:00Z', '2025-10-26T22:30:00Z', '2025-10-24T22:30:00Z');
    assert.deepEqual(kept(items, { daily: 2 }, 'Europe/Berlin'), ['2025-10-26T22:30:00Z', '2025-10-24T22:30:00Z']);
    assert.deepEqual(kept(items, { daily: 2 }, 'UTC'), ['2025-10-26T22:30:00Z', '2025-10-25T22:30:00Z']);
  });

  test('DST spring-forward day in New York: the hour that does not exist does not split the day', () => {
    // 2025-03-09: 02:00 → 03:00. 01:30 EST = 06:30Z, 03:30 EDT = 07:30Z, 23:30 EDT = 03:30Z on the 10th.
    const items = at('2025-03-09T06:30:00Z', '2025-03-09T07:30:00Z', '2025-03-10T03:30:00Z', '2025-03-08T12:00:00Z');
    assert.deepEqual(kept(items, { daily: 2 }, 'America/New_York'), ['2025-03-10T03:30:00Z', '2025-03-08T12:00:00Z']);
  });

  test('month ends: the last backup of each month is its monthly, in local time', () => {
    const items = at(
      '2025-01-31T23:30:00Z',
      '2025-02-01T00:30:00Z',
      '2025-02-28T23:59:59Z',
      '2025-03-01T00:00:00Z',
      '2024-12-31T23:59:59Z',
    );
    assert.deepEqual(kept(items, { monthly: 4 }), [
      '2025-03-01T00:00:00Z',
      '2025-02-28T23:59:59Z',
      '2025-01-31T23:30:00Z',
      '2024-12-31T23:59:59Z',
    ]);
    // In New York, 2025-03-01T00:00Z is still February 28th and 2025-02-01T00:30Z still January
    // 31st: three months, each kept by its newest backup.
    assert.deepEqual(kept(items, { monthly: 4 }, 'America/New_York'), [
      '2025-03-01T00:00:00Z',
      '2025-02-01T00:30:00Z',
      '2024-12-31T23:59:59Z',
    ]);
  });

  test('rules combine like restic: kept if any rule keeps it, every reason named', () => {
    const daily = Array.from({ length: 40 }, (_, i) => new Date(Date.UTC(2025, 0, 1 + i, 2)).toISOString());
    const decisions = selectRetention(at(...daily), policy({ last: 2, daily: 7, weekly: 4, monthly: 3 }), 'UTC');
    const byId = new Map(decisions.map((d) => [d.item.file, d.reasons]));
    assert.deepEqual(byId.get('2025-02-09T02:00:00.000Z'), [
      'newest backup',
      'last 1',
      'daily 2025-02-09',
      'weekly 2025-W06',
      'monthly 2025-02',
    ]);
    assert.deepEqual(byId.get('2025-02-02T02:00:00.000Z'), ['weekly 2025-W05']);
    assert.deepEqual(byId.get('2025-01-31T02:00:00.000Z'), ['monthly 2025-01']);
    assert.equal(decisions.filter((d) => d.keep).length, 11);
  });
});

/**
 * An independent reference for restic's rules: for each rule, the distinct buckets newest first,
 * the first N, and the newest backup in each; keep-last is the N newest; plus the newest backup
 * overall. Equal times are ordered by file name, descending, as the tool orders them.
 */
function reference(items: Array<{ file: string; time: Date }>, p: RetentionPolicy, timeZone: string): Set<string> {
  const newestFirst = [...items].sort(
    (a, b) => b.time.getTime() - a.time.getTime() || (a.file < b.file ? 1 : a.file > b.file ? -1 : 0),
  );
  const keep = new Set(newestFirst.slice(0, Math.max(p.last, 1)).map((i) => i.file));
  for (const [rule, key] of [
    ['daily', 'day'],
    ['weekly', 'week'],
    ['monthly', 'month'],
  ] as const) {
    const newestOfBucket = new Map<string, string>();
    for (const item of newestFirst) {
      const bucket = calendarBuckets(item.time, timeZone)[key];
      if (!newestOfBucket.has(bucket)) newestOfBucket.set(bucket, item.file);
    }
    [...newestOfBucket.values()].slice(0, p[rule]).forEach((file) => keep.add(file));
  }
  return keep;
}

const NOW = new Date('2026-06-15T12:00:00Z');
const DAY = 86_400_000;
const ZONES = ['UTC', 'Europe/Berlin', 'America/New_York', 'Australia/Lord_Howe', 'Asia/Kolkata'];
const STATUSES: ListStatus[] = [
  'verified',
  'no_metadata',
  'invalid_metadata',
  'unreadable_metadata',
  'size_mismatch',
  'checksum_mismatch',
  'unreadable_archive',
  'missing_table_data',
];

/** Random policies, and histories of a directory: this database and others, damaged files, future dates, equal times. */
const arbitraryPolicy = fc.record({ last: fc.nat(4), daily: fc.nat(8), weekly: fc.nat(5), monthly: fc.nat(4) });
const arbitraryTime = fc.oneof(
  { weight: 6, arbitrary: fc.integer({ min: -400 * DAY, max: 0 }) },
  // Around midnight and DST changes, bursts within an hour, and exact duplicates of a few instants.
  { weight: 2, arbitrary: fc.constantFrom(-DAY, -DAY - 1000, -2 * DAY, -30 * DAY, -30 * DAY + 3_600_000) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: CLOCK_TOLERANCE_MS }) },
  // Wrong clocks: dated well after now.
  { weight: 2, arbitrary: fc.integer({ min: CLOCK_TOLERANCE_MS + 1, max: 400 * DAY }) },
);
const arbitraryEntry = fc.record({
  offset: arbitraryTime,
  status: fc.oneof(
    { weight: 8, arbitrary: fc.constant<ListStatus>('verified') },
    { weight: 3, arbitrary: fc.constantFrom(...STATUSES) },
  ),
  database: fc.oneof({ weight: 8, arbitrary: fc.constant('app') }, { weight: 1, arbitrary: fc.constant('other') }),
  environment: fc.oneof(
    { weight: 8, arbitrary: fc.constant<'dev' | 'prod'>('dev') },
    { weight: 1, arbitrary: fc.constant<'dev' | 'prod'>('prod') },
  ),
  undated: fc.boolean(),
  // The cluster it was taken from: this server ("1"), another with a same-named database, or not recorded.
  server: fc.constantFrom<string | undefined>('1', '1', '1', '2', undefined),
});
const arbitraryHistory = fc.array(arbitraryEntry, { maxLength: 40 }).map((raw) =>
  raw.map((r, i): ListEntry => {
    const timestamp = new Date(NOW.getTime() + r.offset).toISOString().replace(/\.\d{3}Z$/, 'Z');
    const undated = r.undated && r.status !== 'verified';
    return {
      file: `f${String(i).padStart(2, '0')}_${r.database}_${r.environment}.dump`,
      status: r.status,
      ...(undated ? {} : { timestamp, database: r.database, environment: r.environment }),
      ...(undated || r.server === undefined ? {} : { systemIdentifier: r.server }),
      sizeBytes: 100 + i,
      modifiedMs: 0,
      problems: [],
    };
  }),
);
const arbitraryCase = fc
  .record({
    history: arbitraryHistory,
    policy: arbitraryPolicy,
    zone: fc.constantFrom(...ZONES),
    withNewBackup: fc.boolean(),
    seed: fc.integer(),
  })
  .map(({ history, policy: p, zone, withNewBackup, seed }) => {
    // The run's own new backup: this database, just now, quick check passed.
    const justMade: ListEntry = {
      file: 'new_app_dev.dump',
      status: 'verified',
      timestamp: NOW.toISOString().replace(/\.\d{3}Z$/, 'Z'),
      database: 'app',
      environment: 'dev',
      systemIdentifier: '1',
      sizeBytes: 1,
      modifiedMs: 0,
      problems: [],
    };
    const entries = withNewBackup ? [...history, justMade] : history;
    const scope: RetentionScope = {
      database: 'app',
      environment: 'dev',
      policy: p,
      timeZone: zone,
      now: NOW,
      systemIdentifier: '1',
      ...(withNewBackup ? { justMade: justMade.file } : {}),
    };
    return { entries, scope, seed };
  });

/** Fisher-Yates with a seeded LCG: a reproducible permutation per case. */
function shuffle<T>(items: T[], seed: number): T[] {
  const copy = [...items];
  let state = seed >>> 0;
  for (let i = copy.length - 1; i > 0; i--) {
    state = (state * 1664525 + 1013904223) >>> 0;
    const j = state % (i + 1);
    [copy[i], copy[j]] = [copy[j]!, copy[i]!];
  }
  return copy;
}

const deletedBy = (plan: ReturnType<typeof planRetention>) =>
  plan.decisions.filter((d) => !d.keep).map((d) => d.item.file);
const isFuture = (e: ListEntry) =>
  e.timestamp !== undefined && Date.parse(e.timestamp) > NOW.getTime() + CLOCK_TOLERANCE_MS;
const RUNS = { numRuns: 3000 };

describe('planRetention: invariants over thousands of random histories', () => {
  test("only this server's backups of this database that passed the quick check and are not dated after now are ever deleted", () => {
    fc.assert(
      fc.property(arbitraryCase, ({ entries, scope }) => {
        const byFile = new Map(entries.map((e) => [e.file, e]));
        for (const file of deletedBy(planRetention(entries, scope))) {
          const entry = byFile.get(file)!;
          assert.equal(entry.database, 'app');
          assert.equal(entry.environment, 'dev');
          assert.ok(entry.systemIdentifier !== '2', `${file} is a backup of another server`);
          assert.equal(entry.status, 'verified');
          assert.ok(!isFuture(entry), `${file} is dated after now`);
        }
      }),
      RUNS,
    );
  });

  test('the backup a run has just made is never deleted by that run', () => {
    fc.assert(
      fc.property(arbitraryCase, ({ entries, scope }) => {
        const plan = planRetention(entries, scope);
        if (scope.justMade) assert.ok(plan.decisions.some((d) => d.item.file === scope.justMade && d.keep));
      }),
      RUNS,
    );
  });

  test('backups dated after now are left alone, reported, and change no other decision', () => {
    fc.assert(
      fc.property(arbitraryCase, ({ entries, scope }) => {
        const plan = planRetention(entries, scope);
        const future = entries.filter((e) => isFuture(e) && e.database === 'app' && e.environment === 'dev');
        for (const entry of future)
          assert.ok(
            plan.leftAlone.some((l) => l.file === entry.file),
            `${entry.file} reported`,
          );
        const without = planRetention(
          entries.filter((e) => !isFuture(e)),
          scope,
        );
        assert.deepEqual(plan.decisions, without.decisions);
      }),
      RUNS,
    );
  });

  test("nothing is deleted unless the newest backup kept is the run's own or is named for the full check", () => {
    fc.assert(
      fc.property(arbitraryCase, ({ entries, scope }) => {
        const plan = planRetention(entries, scope);
        const newest = plan.decisions[0];
        if (deletedBy(plan).length === 0) {
          assert.equal(plan.mustVerify, undefined, 'no full check when nothing is deleted');
          return;
        }
        assert.ok(newest?.keep, 'the newest backup stays');
        if (newest.item.file === scope.justMade) assert.equal(plan.mustVerify, undefined);
        else assert.equal(plan.mustVerify?.file, newest.item.file);
        for (const d of plan.decisions.filter((d) => !d.keep))
          assert.ok(d.item.time <= newest.item.time, 'only older backups go');
      }),
      RUNS,
    );
  });

  test("the decisions are restic's (an independent reference), and the input order never matters", () => {
    fc.assert(
      fc.property(arbitraryCase, ({ entries, scope, seed }) => {
        const plan = planRetention(entries, scope);
        const candidates = plan.decisions.map((d) => d.item);
        const expected = reference(candidates, scope.policy, scope.timeZone);
        if (scope.justMade) expected.add(scope.justMade);
        assert.deepEqual(new Set(plan.decisions.filter((d) => d.keep).map((d) => d.item.file)), expected);
        assert.deepEqual(deletedBy(planRetention(shuffle(entries, seed), scope)).sort(), deletedBy(plan).sort());
      }),
      RUNS,
    );
  });
});

describe('planRetention: the server a backup comes from', () => {
  const entry = (file: string, systemIdentifier?: string): ListEntry => ({
    file,
    status: 'verified',
    timestamp: '2025-01-01T00:00:00Z',
    database: 'app',
    environment: 'dev',
    sizeBytes: 1,
    modifiedMs: 0,
    problems: [],
    ...(systemIdentifier === undefined ? {} : { systemIdentifier }),
  });
  const entries = [entry('ours', '1'), entry('theirs', '2'), entry('unrecorded')];
  const scope = {
    database: 'app',
    environment: 'dev' as const,
    policy: policy({ last: 1 }),
    timeZone: 'UTC',
    now: NOW,
  };
  const judged = (systemIdentifier?: string | null) =>
    planRetention(entries, { ...scope, ...(systemIdentifier === undefined ? {} : { systemIdentifier }) })
      .decisions.map((d) => d.item.file)
      .sort();

  test("this server's and unrecorded ones are judged; where this server's cannot be read, only unrecorded ones", () => {
    assert.deepEqual(judged('1'), ['ours', 'unrecorded']);
    assert.deepEqual(judged(null), ['unrecorded']);
    const unknown = planRetention(entries, { ...scope, systemIdentifier: null }).leftAlone;
    assert.match(unknown.find((left) => left.file === 'ours')!.why, /this server does not say which cluster it is/);
    // --check (freshness) names no server: every backup of the database counts, as before.
    assert.deepEqual(judged(undefined), ['ours', 'theirs', 'unrecorded']);
  });
});

test('planRetention never deletes a name listed twice (one file read under two names): the newest is always kept', () => {
  const entry = (file: string, timestamp: string): ListEntry => ({
    ...{ file, status: 'verified', timestamp, database: 'app', environment: 'dev' },
    ...{ sizeBytes: 1, modifiedMs: 0, problems: [] },
  });
  const entries = [
    entry('app_dev_\uFFFD.dump', '2025-01-03T00:00:00Z'),
    entry('app_dev_\uFFFD.dump', '2025-01-02T00:00:00Z'),
  ];
  const older = entry('app_dev_2025-01-01T00-00-00Z.dump', '2025-01-01T00:00:00Z');
  const scope = {
    database: 'app',
    environment: 'dev' as const,
    policy: policy({ last: 1 }),
    timeZone: 'UTC',
    now: NOW,
  };
  const doomed = planRetention([...entries, older], scope)
    .decisions.filter((d) => !d.keep)
    .map((d) => d.item.file);
  assert.deepEqual(doomed, [older.file]);
});

describe('retention on real backups', () => {
  let server: TestServer;
  let seed: TakenBackup;
  before(async () => {
    server = await startTestServer();
    for (const db of ['ret_app', 'ret_other']) {
      await server.createDatabase(db, 'CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)');
    }
    seed = await takeBackup(server, 'ret_app', path.join(await tempDir(), 'seed'));
  });
  after(() => server?.stop());

  /** Put a valid copy of a real backup into `dir` as if it had been taken at `iso`. */
  async function pastBackup(dir: string, iso: string, from: TakenBackup = seed, environment = 'dev') {
    const database = String(from.metadata.database_name);
    return backupNamed(dir, `${database}_${environment}_${iso.replaceAll(':', '-')}.dump`, iso, from, environment);
  }

  /** The same under any name, as a renamed copy is. */
  async function backupNamed(dir: string, name: string, iso: string, from: TakenBackup = seed, environment = 'dev') {
    await fs.copyFile(from.dumpPath, path.join(dir, name));
    const metadata = { ...from.metadata, backup_file: name, backup_timestamp: iso, environment };
    await fs.writeFile(path.join(dir, name.replace(/\.dump$/, '.metadata.json')), JSON.stringify(metadata));
    return name;
  }

  async function history() {
    const dir = path.join(await tempDir(), 'backups');
    await fs.mkdir(dir);
    const ours = [];
    for (const iso of [
      '2025-01-01T02:00:00Z',
      '2025-01-15T02:00:00Z',
      '2025-02-01T02:00:00Z',
      '2025-02-02T02:00:00Z',
      '2025-02-02T14:00:00Z',
      '2025-02-03T02:00:00Z',
    ]) {
      ours.push(await pastBackup(dir, iso));
    }
    // Things retention must never touch:
    const other = await takeBackup(server, 'ret_other', path.join(await tempDir(), 'o'));
    const foreign = await pastBackup(dir, '2020-01-01T00:00:00Z', other);
    const otherEnv = await pastBackup(dir, '2020-01-01T00:00:00Z', seed, 'prod');
    // A partial of another database: a backup run only ever clears its own database's leftovers.
    const partial = 'ret_other_dev_2019-01-01T00-00-00Z.dump.partial';
    await fs.writeFile(path.join(dir, partial), 'x');
    // A leftover of this database, from a killed run: retention never judges it, the next backup
    // of this database removes it as a stale file (issue 4), and --prune leaves it alone.
    const stalePartial = 'ret_app_dev_2019-01-01T00-00-00Z.dump.partial';
    await fs.writeFile(path.join(dir, stalePartial), 'x');
    const undescribed = 'ret_app_dev_2019-02-01T00-00-00Z.dump';
    await fs.copyFile(seed.dumpPath, path.join(dir, undescribed));
    const damaged = await pastBackup(dir, '2019-03-01T00:00:00Z');
    await fs.appendFile(path.join(dir, damaged), 'x');
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'ret_app'));
    /** The CLI's arguments for this history: `extra`, then its environment, configuration and directory. */
    const args = (...extra: string[]) => [...extra, '--env', 'dev', '--config-dir', configDir, '--output-dir', dir];
    return {
      dir,
      ours,
      untouchable: [foreign, otherEnv, partial, undescribed, damaged],
      stalePartial,
      configDir,
      args,
    };
  }

  const metadataOf = (name: string) => name.replace(/\.dump$/, '.metadata.json');

  test('--prune --dry-run explains every decision and deletes nothing', async () => {
    const h = await history();
    const before = await directoryFingerprint(h.dir);
    const result = await runCli({
      args: h.args('--prune', '--keep-daily', '2', '--keep-monthly', '2', '--dry-run'),
      env: { TZ: 'UTC' },
    });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.deepEqual(await directoryFingerprint(h.dir), before);
    assert.match(result.stdout, /^Retention for ret_app \(dev\) in .*: keep-daily 2, keep-monthly 2, days in UTC$/m);
    assert.match(
      result.stdout,
      /^ {2}keep {4}2025-02-03T02:00:00Z {2}ret_app_dev_2025-02-03T02-00-00Z\.dump +newest backup, daily 2025-02-03, monthly 2025-02$/m,
    );
    assert.match(result.stdout, /^ {2}keep {4}2025-02-02T14:00:00Z .* daily 2025-02-02$/m);
    assert.match(result.stdout, /^ {2}delete {2}2025-02-02T02:00:00Z /m);
    assert.match(result.stdout, /^ {2}keep {4}2025-01-15T02:00:00Z .* monthly 2025-01$/m);
    assert.match(
      result.stdout,
      /^ {2}leave {3}ret_app_dev_2019-02-01T00-00-00Z\.dump {2}\(\? No metadata; not judged by the policy\)$/m,
    );
    assert.match(
      result.stdout,
      /^ {2}leave {3}ret_app_dev_2019-03-01T00-00-00Z\.dump {2}\(✗ Size mismatch; not judged by the policy\)$/m,
    );
    assert.match(result.stdout, /^Dry run: would delete 3 backups \(.+\); nothing was deleted\.$/m);
  });

  test('with TZ empty (which Node cannot name), --prune counts days in UTC and says so', async () => {
    const h = await history();
    const result = await runCli({ args: h.args('--prune', '--keep-daily', '2', '--dry-run'), env: { TZ: '' } });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.match(result.stdout, /^Retention for ret_app \(dev\) in .*: keep-daily 2, days in UTC$/m);
    assert.match(result.stdout, /^ {2}keep {4}2025-02-02T14:00:00Z .* daily 2025-02-02$/m);
  });

  test('a backup whose metadata names an impossible date (Feb 29 of 2025) is left alone, never taken for March 1st', async () => {
    const h = await history();
    const real = await pastBackup(h.dir, '2025-03-01T02:00:00Z');
    const impossible = await pastBackup(h.dir, '2025-02-29T12:00:00Z');
    const result = await runCli({ args: h.args('--prune', '--keep-daily', '5', '--dry-run'), env: { TZ: 'UTC' } });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.match(
      result.stdout,
      new RegExp(`^ {2}keep {4}2025-03-01T02:00:00Z {2}${real} +newest backup, daily 2025-03-01$`, 'm'),
    );
    assert.match(
      result.stdout,
      new RegExp(`^ {2}leave {3}${impossible} {2}\\(✗ Invalid metadata; not judged by the policy\\)$`, 'm'),
    );
  });

  test("TZ as a file (systemd's TZ=:/etc/localtime, a posix/ or right/ zone): days are that zone's, as TZ=Europe/Paris", async () => {
    const h = await history();
    // 00:30 on Feb 3 in Paris: the same Paris day as the newest backup, but Feb 2 in UTC.
    await pastBackup(h.dir, '2025-02-02T23:30:00Z');
    const localtime = path.join(await tempDir(), 'localtime');
    await fs.symlink('/usr/share/zoneinfo/Europe/Paris', localtime);
    const prune = (TZ: string) => runCli({ args: h.args('--prune', '--keep-daily', '2', '--dry-run'), env: { TZ } });
    const paris = await prune('Europe/Paris');
    assert.equal(paris.exitCode, 0, paris.stderr);
    assert.match(paris.stdout, /^Retention for ret_app \(dev\) in .*: keep-daily 2, days in Europe\/Paris$/m);
    assert.match(paris.stdout, /^ {2}delete {2}2025-02-02T23:30:00Z /m);
    for (const tz of [
      `:${localtime}`,
      '/usr/share/zoneinfo/posix/Europe/Paris',
      ':/usr/share/zoneinfo/right/Europe/Paris',
    ])
      assert.deepEqual(await prune(tz), paris, `TZ=${tz}`);
  });

  test(
    "a same-named database on another server in the same directory: neither prunes the other's backups",
    { timeout: 120_000 },
    async () => {
      const other = await startTestServer();
      const dir = path.join(await tempDir(), 'backups');
      const configFor = async (s: TestServer) => {
        const configDir = await tempDir();
        await writeEnvFile(configDir, '.env', dbVars(s, 'DEV_DB_', 'ret_app'));
        return configDir;
      };
      const run = async (configDir: string, ...extra: string[]) => {
        const result = await runCli({
          args: [...extra, '--env', 'dev', '--config-dir', configDir, '--output-dir', dir, '--json'],
        });
        assert.equal(result.exitCode, 0, result.stderr);
        return JSON.parse(result.stdout);
      };
      let there: string;
      const here = await configFor(server);
      try {
        await other.createDatabase('ret_app', 'CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 10)');
        there = await configFor(other);
        const mine = [(await run(here)).metadata, (await run(here)).metadata];
        assert.match(mine[0].system_identifier, /^\d+$/, 'the metadata records the cluster');
        const theirs = await run(there, '--keep-last', '1');
        assert.notEqual(theirs.metadata.system_identifier, mine[0].system_identifier);
        assert.deepEqual(theirs.retention.deleted, []);
        assert.deepEqual(
          theirs.retention.left_alone.map((e: { file: string }) => e.file).sort(),
          mine.map((m) => m.backup_file).sort(),
        );
        const dry = await runCli({
          args: [
            '--prune',
            '--keep-last',
            '1',
            '--dry-run',
            '--env',
            'dev',
            '--config-dir',
            there,
            '--output-dir',
            dir,
          ],
        });
        assert.equal(dry.exitCode, 0, dry.stderr);
        assert.match(
          dry.stdout,
          new RegExp(
            `^ {2}leave {3}${mine[0].backup_file.replaceAll('.', '\\.')} {2}\\(from another server \\(system ` +
              `identifier ${mine[0].system_identifier}\\); not judged by the policy\\)$`,
            'm',
          ),
        );
        // This server's own pruning still works, and leaves the other server's backup alone.
        const pruned = await run(here, '--prune', '--keep-last', '1');
        assert.deepEqual(pruned.retention.deleted, [mine[0].backup_file]);
        const left = (await fs.readdir(dir)).filter((n) => n.endsWith('.dump')).sort();
        assert.deepEqual(left, [mine[1].backup_file, theirs.metadata.backup_file].sort());
      } finally {
        await other.stop();
      }
      // --prune must know which server it prunes for: an unreachable one is a connection failure.
      const before = await directoryFingerprint(dir);
      const unreachable = await runCli({
        args: ['--prune', '--keep-last', '1', '--env', 'dev', '--config-dir', there!, '--output-dir', dir],
      });
      assert.equal(unreachable.exitCode, 3, unreachable.stdout + unreachable.stderr);
      assert.match(unreachable.stderr, /which server/);
      assert.deepEqual(await directoryFingerprint(dir), before);
    },
  );

  test('a backup with a policy deletes what the policy drops, dump and metadata together, nothing else', async () => {
    const h = await history();
    const untouchedBefore = await directoryFingerprint(h.dir);
    const result = await runCli({
      args: h.args('--keep-last', '1', '--keep-daily', '2', '--json'),
      env: { TZ: 'UTC' },
    });
    assert.equal(result.exitCode, 0, result.stderr);
    const doc = JSON.parse(result.stdout);
    // The new backup (today) and the newest old day (2025-02-03) are kept; every other old one goes.
    const expectedDeleted = h.ours.filter((name) => !name.includes('2025-02-03')).sort();
    assert.deepEqual([...doc.retention.deleted].sort(), expectedDeleted);
    const after = await fs.readdir(h.dir);
    for (const name of expectedDeleted) {
      assert.ok(!after.includes(name) && !after.includes(metadataOf(name)), `${name} and its metadata are gone`);
    }
    for (const name of h.untouchable) {
      assert.equal((await directoryFingerprint(h.dir))[name], untouchedBefore[name], `${name} untouched`);
    }
    assert.ok(after.includes(doc.metadata.backup_file), 'the new backup is kept');
    assert.deepEqual(
      doc.removed_stale_files,
      [h.stalePartial],
      'the leftover of a killed run is cleared as stale, not by retention',
    );
    assert.ok(!doc.retention.deleted.includes(h.stalePartial));
  });

  test('a backup with --dry-run takes the backup, says what its retention would delete, and deletes nothing', async () => {
    const h = await history();
    const before = await directoryFingerprint(h.dir);
    const rules = ['--keep-last', '1', '--keep-daily', '2'];
    const text = await runCli({ args: h.args(...rules, '--dry-run'), env: { TZ: 'UTC' } });
    assert.equal(text.exitCode, 0, text.stderr);
    assert.match(text.stdout, /^Dry run: would delete \d+ backups \(.+\); nothing was deleted\.$/m);
    const json = await runCli({ args: h.args(...rules, '--dry-run', '--json'), env: { TZ: 'UTC' } });
    assert.equal(json.exitCode, 0, json.stderr);
    const doc = JSON.parse(json.stdout);
    assert.equal(doc.retention.dry_run, true);
    assert.ok(doc.retention.deleted.length > 0, 'the rules would delete some');
    const after = await directoryFingerprint(h.dir);
    const { [h.stalePartial]: _cleared, ...kept } = before;
    for (const [name, print] of Object.entries(kept)) assert.equal(after[name], print, `${name} untouched`);
    assert.ok(after[doc.metadata.backup_file], 'the new backup stands');
  });

  test('retention settings can come from BACKUP_KEEP_* variables (for cron), options winning', async () => {
    const h = await history();
    await writeEnvFile(h.configDir, '.env', {
      ...dbVars(server, 'DEV_DB_', 'ret_app'),
      BACKUP_KEEP_LAST: '3',
      BACKUP_KEEP_DAILY: '0',
    });
    const result = await runCli({
      args: h.args('--prune', '--json'),
    });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.equal(JSON.parse(result.stdout).retention.deleted.length, 3);
    const overridden = await runCli({
      args: h.args('--prune', '--keep-last', '2', '--json'),
    });
    assert.equal(JSON.parse(overridden.stdout).retention.deleted.length, 1);
    await writeEnvFile(h.configDir, '.env', { ...dbVars(server, 'DEV_DB_', 'ret_app'), BACKUP_KEEP_DAILY: 'lots' });
    const bad = await runCli({ args: h.args('--prune') });
    assert.equal(bad.exitCode, 2);
    assert.match(bad.stderr, /BACKUP_KEEP_DAILY \(from \.env\) is "lots"/);
  });

  test('no backup is deleted when the backup fails', async () => {
    const h = await history();
    const { [h.stalePartial]: _stale, ...backupsBefore } = await directoryFingerprint(h.dir);
    await writeEnvFile(h.configDir, '.env', { ...dbVars(server, 'DEV_DB_', 'ret_app'), DEV_DB_PASSWORD: 'wrong' });
    const result = await runCli({
      args: h.args('--keep-last', '1'),
    });
    assert.equal(result.exitCode, 3);
    const { [h.stalePartial]: _gone, ...backupsAfter } = await directoryFingerprint(h.dir);
    assert.deepEqual(backupsAfter, backupsBefore, 'every backup and its metadata is still there');
  });

  test('--prune never touches partial files', async () => {
    const h = await history();
    const result = await runCli({
      args: h.args('--prune', '--keep-last', '1'),
    });
    assert.equal(result.exitCode, 0, result.stderr);
    const after = await fs.readdir(h.dir);
    assert.ok(after.includes(h.stalePartial) && after.includes('ret_other_dev_2019-01-01T00-00-00Z.dump.partial'));
    assert.match(result.stdout, /^Deleted 5 backups \(.+\)\.$/m);
  });

  test('a backup dated after now (a wrong clock once) neither gets the new backup deleted nor counts', async () => {
    const dir = path.join(await tempDir(), 'backups');
    await fs.mkdir(dir);
    // The reported case: a verified backup copied under a name dated months ahead, the original gone.
    const ahead = new Date(Date.now() + 200 * 86_400_000).toISOString().replace(/\.\d{3}Z$/, 'Z');
    const future = await pastBackup(dir, ahead);
    assert.equal(
      (await runCli({ args: ['--verify', path.join(dir, future)] })).exitCode,
      0,
      'the future-dated copy verifies',
    );
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'ret_app'));
    const result = await runCli({
      args: ['--keep-last', '1', '--env', 'dev', '--config-dir', configDir, '--output-dir', dir, '--json'],
    });
    assert.equal(result.exitCode, 0, result.stderr);
    const doc = JSON.parse(result.stdout);
    const names = await fs.readdir(dir);
    assert.ok(names.includes(doc.metadata.backup_file), 'the run kept the backup it has just made');
    assert.ok(names.includes(future), 'the future-dated backup is left alone');
    assert.deepEqual(doc.retention.deleted, []);
    assert.deepEqual(doc.retention.left_alone, [{ file: future, why: `dated ${ahead}, after this machine's time` }]);

    // And with older backups: keep-last 1 keeps the new one, not the future-dated one in its place.
    await pastBackup(dir, '2025-01-01T02:00:00Z');
    const again = await runCli({
      args: ['--prune', '--keep-last', '1', '--env', 'dev', '--config-dir', configDir, '--output-dir', dir],
    });
    assert.equal(again.exitCode, 0, again.stderr);
    assert.match(
      again.stdout,
      new RegExp(
        `^ {2}leave {3}${future.replaceAll('.', '\\.')} {2}\\(dated ${ahead}, after this machine's time; not judged by the policy\\)$`,
        'm',
      ),
    );
    assert.deepEqual(
      (await fs.readdir(dir)).filter((n) => n.endsWith('.dump')).sort(),
      [doc.metadata.backup_file, future].sort(),
    );
  });

  test('the newest backup bit-flipped (same size): --prune deletes nothing, says why, exits 8', async () => {
    const dir = path.join(await tempDir(), 'backups');
    await fs.mkdir(dir);
    const good = await pastBackup(dir, '2025-01-01T02:00:00Z');
    const newest = await pastBackup(dir, '2025-01-02T02:00:00Z');
    await flipMiddleByte(path.join(dir, newest));
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'ret_app'));
    const before = await directoryFingerprint(dir);
    for (const extra of [['--dry-run'], []]) {
      const result = await runCli({
        args: ['--prune', '--keep-last', '1', ...extra, '--env', 'dev', '--config-dir', configDir, '--output-dir', dir],
      });
      assert.equal(result.exitCode, 8, result.stdout + result.stderr);
      assert.match(
        result.stderr,
        /^✗ Pruning failed: Retention refused: the newest backup to keep failed verification$/m,
      );
      assert.match(
        result.stderr,
        new RegExp(`${newest.replaceAll('.', '\\.')} would be the newest backup kept, .*checksum mismatch`),
      );
      assert.match(result.stderr, /^ {2}1\. Nothing was deleted$/m);
      assert.deepEqual(await directoryFingerprint(dir), before, `nothing deleted (${extra.join(' ') || 'real run'})`);
    }
    assert.ok((await fs.readdir(dir)).includes(good));
  });

  test('after a backup, a damaged backup dated just ahead (within the clock tolerance) stops deletion: exit 8, the new backup kept', async () => {
    const dir = path.join(await tempDir(), 'backups');
    await fs.mkdir(dir);
    const old = await pastBackup(dir, '2025-01-01T02:00:00Z');
    // Another machine's clock, a minute ahead: it counts, and is newer than this run's backup.
    const ahead = new Date(Date.now() + 60_000).toISOString().replace(/\.\d{3}Z$/, 'Z');
    const newest = await pastBackup(dir, ahead);
    await flipMiddleByte(path.join(dir, newest));
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'ret_app'));
    const logFile = path.join(configDir, 'runs.log');
    const result = await runCli({
      args: ['--keep-last', '1', '--env', 'dev', '--config-dir', configDir, '--output-dir', dir, '--log-file', logFile],
    });
    assert.equal(result.exitCode, 8, result.stdout + result.stderr);
    assert.match(result.stdout, /^✓ Backup created successfully$/m);
    const logged = JSON.parse(await fs.readFile(logFile, 'utf8'));
    assert.deepEqual(
      [logged.outcome, logged.exit_code, logged.error],
      ['failure', 8, 'Retention refused: the newest backup to keep failed verification'],
    );
    assert.match(
      result.stderr,
      /^⚠ The backup is fine, but retention refused: the newest backup to keep failed verification: .*checksum mismatch/m,
    );
    const dumps = (await fs.readdir(dir)).filter((n) => n.endsWith('.dump'));
    assert.equal(dumps.length, 3, 'nothing deleted: the old one, the damaged one and the new one');
    assert.ok(dumps.includes(old) && dumps.includes(newest));
  });

  /** A directory (--jobs) backup of ret_app, `old`, in a fresh `dir`, for a later run's retention to delete. */
  async function directoryBackupToDelete() {
    const dir = path.join(await tempDir(), 'backups');
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'ret_app'));
    const where = ['--env', 'dev', '--config-dir', configDir, '--output-dir', dir];
    const first = await runCli({ args: [...where, '--jobs', '2'] });
    assert.equal(first.exitCode, 0, first.stdout + first.stderr);
    return { dir, configDir, where, old: (await fs.readdir(dir)).find((n) => n.endsWith('.dump'))! };
  }

  test(
    'after a backup, a deletion that fails (permission denied) fails the run: exit 4, logged, hooked, the new backup kept',
    skipUnless(noSetpriv),
    async () => {
      // A directory backup (--jobs) whose files cannot be removed: the rule's deletion of it fails.
      const { dir, configDir, where, old } = await directoryBackupToDelete();
      await fs.chmod(path.join(dir, old), 0o555);
      const [logFile, hooked] = [path.join(configDir, 'runs.log'), path.join(configDir, 'hooked')];
      try {
        const result = await runCli({
          args: [
            ...where,
            '--keep-last',
            '1',
            '--log-file',
            logFile,
            '--on-failure',
            `echo "$BACKUP_EXIT_CODE" > ${hooked}`,
          ],
          withoutRootOverride: true,
        });
        assert.equal(result.exitCode, 4, result.stdout + result.stderr);
        assert.match(result.stdout, /^✓ Backup created successfully$/m);
        assert.match(result.stderr, /^⚠ The backup is fine, but applying the retention policy failed: .*EACCES/m);
        const logged = JSON.parse((await fs.readFile(logFile, 'utf8')).split('\n')[0]!);
        assert.deepEqual(
          [logged.outcome, logged.exit_code, logged.error],
          ['failure', 4, 'Applying the retention policy failed'],
        );
        assert.equal(await fs.readFile(hooked, 'utf8'), '4\n');
        const dumps = (await fs.readdir(dir)).filter((n) => n.endsWith('.dump'));
        assert.equal(dumps.length, 2, 'the new backup, and the one that could not be deleted');
        assert.ok(dumps.includes(old));
        // As JSON: the backup's document, and the failure where every failed run's document has it.
        const json = await runCli({ args: [...where, '--keep-last', '1', '--json'], withoutRootOverride: true });
        assert.equal(json.exitCode, 4, json.stderr);
        const document = JSON.parse(json.stdout);
        assert.deepEqual(
          [document.ok, document.exit_code, document.error, typeof document.backup_file],
          [false, 4, 'Applying the retention policy failed', 'string'],
        );
        assert.match(document.details, /EACCES/);
        assert.ok(document.hints.length > 0);
      } finally {
        await fs.chmod(path.join(dir, old), 0o755);
      }
    },
  );

  test(
    'a --jobs backup whose deletion stops midway is no backup any more, never a damaged one; the next run removes the rest',
    skipUnless(noSetpriv),
    async () => {
      const { dir, where, old } = await directoryBackupToDelete();
      // An empty file (the size, so the quick check, unchanged) in a subdirectory the CLI cannot empty: the
      // recursive deletion fails midway, as a run killed (SIGKILL, power loss) while deleting would stop.
      const stuck = path.join(dir, old, 'stuck');
      await fs.mkdir(stuck);
      await fs.writeFile(path.join(stuck, 'empty'), '');
      await fs.chmod(stuck, 0o555);
      try {
        const result = await runCli({ args: [...where, '--keep-last', '1'], withoutRootOverride: true });
        assert.equal(result.exitCode, 4, result.stdout + result.stderr);
        assert.match(result.stderr, /^⚠ The backup is fine, but applying the retention policy failed: .*EACCES/m);
        const listed = JSON.parse((await runCli({ args: ['--list', '--json', '--output-dir', dir] })).stdout);
        const rows = (entries: Array<{ file: string; status: string }>) => entries.map((e) => [e.file, e.status]);
        assert.equal(listed.backups.length, 1, 'only the new backup');
        assert.deepEqual(rows(listed.backups)[0]![1], 'verified');
        assert.deepEqual(rows(listed.incomplete), [[`${old}.partial`, 'incomplete']]);
        assert.ok(!(await fs.readdir(dir)).includes(metadataOf(old)), 'its metadata is gone');
      } finally {
        await fs.chmod(stuck, 0o755).catch(() => undefined);
        await fs.chmod(path.join(dir, `${old}.partial`, 'stuck'), 0o755).catch(() => undefined);
      }
      const next = await runCli({ args: where });
      assert.equal(next.exitCode, 0, next.stdout + next.stderr);
      assert.match(next.stdout, new RegExp(`^Cleaned up: .*\\(${old.replaceAll('.', '\\.')}\\.partial\\)$`, 'm'));
      const after = await fs.readdir(dir);
      assert.ok(!after.includes(old) && !after.includes(`${old}.partial`), 'nothing of it is left');
    },
  );

  /**
   * --prune --keep-last 1 in a /tmp-like directory: anyone may create files, only a file's owner (or the
   * directory's) may delete it; uid 12345 owns `files` and the directory; root's overrides dropped.
   */
  async function pruneInStickyDirectory(dir: string, files: string[]) {
    for (const name of files) await fs.chown(path.join(dir, name), 12345, 12345);
    await fs.chown(dir, 12345, 12345);
    await fs.chmod(dir, 0o1777);
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'ret_app'));
    return runCli({
      args: ['--prune', '--keep-last', '1', '--env', 'dev', '--config-dir', configDir, '--output-dir', dir],
      wrapper: ['setpriv', '--bounding-set=-dac_override,-dac_read_search,-fowner', '--'],
    });
  }

  test(
    "another user's backup in a sticky directory: --prune says it may not delete it (EPERM), not ENOTDIR",
    skipUnless(process.getuid?.() === 0 ? noSetpriv : 'needs root, to give files to another user'),
    async () => {
      const dir = path.join(await tempDir(), 'backups');
      await fs.mkdir(dir);
      const names = [];
      for (const iso of ['2025-01-01T02:00:00Z', '2025-01-02T02:00:00Z']) names.push(await pastBackup(dir, iso));
      for (const name of [...names, ...names.map(metadataOf)]) await fs.chmod(path.join(dir, name), 0o644);
      const result = await pruneInStickyDirectory(dir, [...names, ...names.map(metadataOf)]);
      assert.equal(result.exitCode, 4, result.stdout + result.stderr);
      assert.match(
        result.stderr,
        new RegExp(`not allowed to delete ${names[0]!.replaceAll('.', '\\.')} \\(owned by uid 12345\\)`),
      );
      assert.match(result.stderr, /EPERM/);
      assert.doesNotMatch(result.stderr, /not a directory|ENOTDIR/);
      assert.ok((await fs.readdir(dir)).includes(names[0]!));
    },
  );

  test(
    'a backup --prune may not delete, with a line break in its name: the error shows it as \\n, never as a line',
    skipUnless(process.getuid?.() === 0 ? noSetpriv : 'needs root, to give files to another user'),
    async () => {
      const dir = path.join(await tempDir(), 'backups');
      await fs.mkdir(dir);
      const forged = await backupNamed(dir, 'ret_app_dev_Y\n✓ Deleted 0 backups\n.dump', '2025-01-01T02:00:00Z');
      await pastBackup(dir, '2025-01-02T02:00:00Z');
      const result = await pruneInStickyDirectory(dir, [forged]);
      assert.equal(result.exitCode, 4, result.stdout + result.stderr);
      assert.match(result.stderr, /not allowed to delete ret_app_dev_Y\\n✓ Deleted 0 backups\\n\.dump \(owned/);
      assert.doesNotMatch(result.stderr, /^✓/m);
      assert.ok((await fs.readdir(dir)).includes(forged));
    },
  );

  /**
   * Run ret_app's backup or prune with `args`, and SIGTERM it while its (held) pg_restore checks `newest`;
   * released at once, or with `holdOn` only once the run has ended. `afterSignalMs`: how long the run took to end.
   */
  async function terminatedWhileChecking(dir: string, newest: string, args: string[], { holdOn = false } = {}) {
    const clients = await clientDirHolding('pg_restore', newest);
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'ret_app'));
    const where = ['--pg-bin-dir', clients.dir, '--env', 'dev', '--config-dir', configDir, '--output-dir', dir];
    const cli = startCli({ args: [...args, ...where] });
    await waitFor('retention to verify the newest backup', async () =>
      (await fs.stat(clients.started).catch(() => undefined)) ? true : undefined,
    );
    cli.kill('SIGTERM');
    const signalled = Date.now();
    if (!holdOn) await fs.writeFile(clients.release, '');
    try {
      return { ...(await cli), afterSignalMs: Date.now() - signalled };
    } finally {
      await fs.writeFile(clients.release, '');
    }
  }

  test('SIGTERM while retention verifies the newest backup it keeps: nothing deleted, the new backup kept, exit 143', async () => {
    const dir = path.join(await tempDir(), 'backups');
    await fs.mkdir(dir);
    const old = await pastBackup(dir, '2025-01-01T02:00:00Z');
    // Newer than this run's backup, so retention re-reads it before deleting anything.
    const ahead = new Date(Date.now() + 60_000).toISOString().replace(/\.\d{3}Z$/, 'Z');
    const newest = await pastBackup(dir, ahead);
    const result = await terminatedWhileChecking(dir, newest, ['--keep-last', '1']);
    assert.equal(result.exitCode, 143, String(result.stdout) + String(result.stderr));
    assert.match(String(result.stdout), /^✓ Backup created successfully$/m);
    assert.match(String(result.stderr), /^⚠ The backup is fine, but interrupted by SIGTERM/m);
    const names = await fs.readdir(dir);
    const dumps = names.filter((n) => n.endsWith('.dump'));
    assert.equal(dumps.length, 3, 'nothing deleted: the old one, the newest one and the new one');
    assert.ok(dumps.includes(old) && dumps.includes(newest));
    assert.ok(!names.includes('ret_app_dev.lock'), 'the lock is released');
  });

  test('SIGTERM while --prune verifies the newest backup it keeps: nothing deleted, lock released, exit 143', async () => {
    const dir = path.join(await tempDir(), 'backups');
    await fs.mkdir(dir);
    const old = await pastBackup(dir, '2025-01-01T02:00:00Z');
    const newest = await pastBackup(dir, '2025-01-02T02:00:00Z');
    const result = await terminatedWhileChecking(dir, newest, ['--prune', '--keep-last', '1']);
    assert.equal(result.exitCode, 143, String(result.stdout) + String(result.stderr));
    assert.match(String(result.stderr), /Interrupted by SIGTERM/);
    assert.deepEqual((await fs.readdir(dir)).filter((n) => n.endsWith('.dump')).sort(), [old, newest].sort());
    assert.ok(!(await fs.readdir(dir)).includes('ret_app_dev.lock'), 'the lock is released');
  });

  for (const run of ['a backup', '--prune']) {
    test(`SIGTERM while ${run} verifies the newest backup it keeps stops the check at once: exit 143, nothing deleted`, async () => {
      const dir = path.join(await tempDir(), 'backups');
      await fs.mkdir(dir);
      const old = await pastBackup(dir, '2025-01-01T02:00:00Z');
      // For a backup, newer than the one it makes, so that retention re-reads it before deleting anything.
      const iso = run === '--prune' ? '2025-01-02T02:00:00Z' : new Date(Date.now() + 60_000).toISOString();
      const newest = await pastBackup(dir, iso.replace(/\.\d{3}Z$/, 'Z'));
      const args = [...(run === '--prune' ? ['--prune'] : []), '--keep-last', '1'];
      // Its pg_restore --list is held for a minute unless the run stops it.
      const result = await terminatedWhileChecking(dir, newest, args, { holdOn: true });
      assert.equal(result.exitCode, 143, String(result.stdout) + String(result.stderr));
      assert.ok(result.afterSignalMs < 20_000, `it ended ${result.afterSignalMs} ms after the signal`);
      assert.match(String(result.stderr), /[Ii]nterrupted by SIGTERM/);
      const names = await fs.readdir(dir);
      const dumps = names.filter((n) => n.endsWith('.dump'));
      assert.ok(dumps.includes(old) && dumps.includes(newest), 'nothing deleted');
      assert.equal(dumps.length, run === '--prune' ? 2 : 3, 'the new backup kept');
      assert.ok(!names.includes('ret_app_dev.lock'), 'the lock is released');
    });
  }

  test("the re-read of the newest backup kept stops on the run's interrupt", async () => {
    const interrupted = AbortSignal.abort(new Error('interrupted'));
    await assert.rejects(hashBackup(seed.dumpPath, interrupted), { name: 'AbortError' });
    assert.equal((await hashBackup(seed.dumpPath)).sha256, seed.metadata.checksum_sha256);
  });

  /** The arguments of --prune --keep-last 1 of ret_app's backups in `dir`, connecting through `proxy` (2 s timeout). */
  async function pruneThrough(proxy: FreezableProxy, dir: string): Promise<string[]> {
    const configDir = await tempDir();
    const vars = { ...dbVars(server, 'DEV_DB_', 'ret_app'), DEV_DB_HOST: proxy.host, DEV_DB_PORT: String(proxy.port) };
    await writeEnvFile(configDir, '.env', vars);
    const args = ['--prune', '--keep-last', '1', '--connect-timeout', '2', '--env', 'dev'];
    return [...args, '--config-dir', configDir, '--output-dir', dir];
  }

  test('SIGTERM while --prune waits for a server that never answers: exit 143, not exit 3', async () => {
    const dir = path.join(await tempDir(), 'backups');
    await fs.mkdir(dir);
    const [old, newest] = [
      await pastBackup(dir, '2025-01-01T02:00:00Z'),
      await pastBackup(dir, '2025-01-02T02:00:00Z'),
    ];
    const proxy = await startProxy(server);
    try {
      proxy.freeze();
      const args = await pruneThrough(proxy, dir);
      const cli = startCli({ args });
      await waitFor('--prune to connect', async () => (proxy.connections > 0 ? true : undefined));
      cli.kill('SIGTERM');
      const result = await cli;
      assert.equal(result.exitCode, 143, String(result.stdout) + String(result.stderr));
      assert.match(String(result.stderr), /Interrupted by SIGTERM/);
      assert.deepEqual((await fs.readdir(dir)).sort(), [old, newest].flatMap((n) => [n, metadataFileName(n)]).sort());
    } finally {
      await proxy.close();
    }
  });

  test('--prune on a server that freezes on its identifier query: exit 3 within the connect timeout, nothing deleted', async () => {
    const dir = path.join(await tempDir(), 'backups');
    await fs.mkdir(dir);
    const kept = [await pastBackup(dir, '2025-01-01T02:00:00Z'), await pastBackup(dir, '2025-01-02T02:00:00Z')];
    const proxy = await startProxy(server);
    try {
      proxy.freezeOn('pg_control_system');
      const args = await pruneThrough(proxy, dir);
      const result = await runCli({ args });
      assert.ok(proxy.frozen, 'the server froze on the query');
      assert.equal(result.exitCode, 3, String(result.stdout) + String(result.stderr));
      assert.match(String(result.stderr), /Database did not answer within 2 s/);
      assert.deepEqual((await fs.readdir(dir)).sort(), kept.flatMap((n) => [n, metadataFileName(n)]).sort());
    } finally {
      await proxy.close();
    }
  });

  test('a backup run says how many backups retention left alone (here a damaged one)', async () => {
    const dir = path.join(await tempDir(), 'backups');
    await fs.mkdir(dir);
    await fs.truncate(path.join(dir, await pastBackup(dir, '2025-01-01T02:00:00Z')), 100);
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'ret_app'));
    const result = await runCli({
      args: ['--keep-last', '1', '--env', 'dev', '--config-dir', configDir, '--output-dir', dir],
    });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.match(result.stdout, /^Retention: {3}kept 1, deleted none by keep-last 1$/m);
    assert.match(result.stdout, /^ +left alone 1 \(see why: --prune --dry-run with the same rules\)$/m);
  });

  test("a line break in a backup's name never starts a line of an error (--list --verify, --check, --prune)", async () => {
    const forged = 'ret_app_dev_X\n✓ Backup verification passed\n.dump';
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'ret_app'));
    const run = async (dir: string, ...extra: string[]) => {
      const result = await runCli({ args: [...extra, '--env', 'dev', '--config-dir', configDir, '--output-dir', dir] });
      assert.equal(result.exitCode, 8, result.stdout + result.stderr);
      assert.doesNotMatch(result.stderr, /^✓/m, `no forged line (${extra.join(' ')})`);
      assert.match(result.stderr, /ret_app_dev_X\\n✓ Backup verification passed\\n\.dump/, extra.join(' '));
    };
    // The newest backup, damaged (a flipped byte passes the quick check), and too old for --max-age.
    const damaged = path.join(await tempDir(), 'backups');
    await fs.mkdir(damaged);
    await pastBackup(damaged, '2025-01-01T02:00:00Z');
    await flipMiddleByte(path.join(damaged, await backupNamed(damaged, forged, '2025-01-02T02:00:00Z')));
    await run(damaged, '--list', '--verify');
    await run(damaged, '--check', '--max-age', '1h');
    await run(damaged, '--prune', '--keep-last', '1');
    // No backup that counts, only this one, of the wrong size.
    const none = path.join(await tempDir(), 'backups');
    await fs.mkdir(none);
    await fs.appendFile(path.join(none, await backupNamed(none, forged, '2025-01-02T02:00:00Z')), 'x');
    await run(none, '--check', '--max-age', '1h');
  });

  test('a file whose name is not UTF-8 is its own unreadable entry: never taken for the backup its name decodes to', async () => {
    // Node reads the bytes ff as U+FFFD, which a real backup's name (bytes ef bf bd) holds.
    const dir = path.join(await tempDir(), 'backups');
    await fs.mkdir(dir);
    const older = await pastBackup(dir, '2025-01-01T02:00:00Z');
    const newest = await backupNamed(dir, 'ret_app_dev_\uFFFD.dump', '2025-01-02T02:00:00Z');
    const junk = Buffer.from([...Buffer.from(`${dir}/ret_app_dev_`), 0xff, ...Buffer.from('.dump')]);
    await fs.writeFile(junk, 'junk');
    const configDir = await tempDir();
    await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'ret_app'));
    const where = ['--env', 'dev', '--config-dir', configDir, '--output-dir', dir];

    const listed = await runCli({ args: ['--list', '--json', ...where] });
    assert.equal(listed.exitCode, 0, listed.stderr);
    assert.deepEqual(
      JSON.parse(listed.stdout).backups.map((b: { file: string; status: string }) => [b.file, b.status]),
      [
        [newest, 'verified'],
        [older, 'verified'],
        ['ret_app_dev_\\xff.dump', 'unreadable_archive'],
      ],
    );
    const pruned = await runCli({ args: ['--prune', '--keep-last', '1', ...where] });
    assert.equal(pruned.exitCode, 0, pruned.stdout + pruned.stderr);
    assert.match(pruned.stdout, /^Deleted 1 backup /m);
    const left = await fs.readdir(dir, { encoding: 'buffer' });
    assert.deepEqual(
      left.map((name) => name.toString('hex')).sort(),
      [
        ...[newest, metadataOf(newest)].map((name) => Buffer.from(name).toString('hex')),
        junk.subarray(dir.length + 1).toString('hex'),
      ].sort(),
      'the newest backup and the junk file are both kept',
    );

    // The same bytes on the command line reach the CLI as the newest backup's name: refused, not verified.
    const verified = await runCli({
      args: ['--verify'],
      wrapper: ['sh', '-c', 'exec "$@" "$(printf "$RAW_PATH")"', 'sh'],
      env: { RAW_PATH: `${dir}/ret_app_dev_\\377.dump` },
    });
    assert.equal(verified.exitCode, 8, verified.stdout + verified.stderr);
    assert.match(verified.stderr, /^✗ Backup verification failed: .*not UTF-8/m);
  });

  test('--prune without any rule is a configuration error', async () => {
    const h = await history();
    const result = await runCli({
      args: h.args('--prune'),
    });
    assert.equal(result.exitCode, 2);
    assert.match(result.stderr, /--prune needs a retention rule/);
  });
});
