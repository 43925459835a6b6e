/** Synchronise on real conditions (a row in pg_stat_activity, a file on disk), never on time. */
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import type pg from 'pg';

/** Poll `probe` until it returns a value; the short interval only paces the polling. */
export async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await delay(25);
  }
}

/**
 * Wait until a backup's pg_dump is blocked on a table lock the test holds. `observer` must not be
 * the lock holder: inside a transaction the statistics views stay frozen at their first read.
 */
export async function waitForBlockedPgDump(observer: pg.Client): Promise<number> {
  return waitFor('pg_dump to wait for the table lock', async () => {
    const { rows } = await observer.query<{ pid: number }>(
      "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'backup_db:%' AND wait_event_type = 'Lock' AND query LIKE 'LOCK TABLE%'",
    );
    return rows[0]?.pid;
  });
}

/** Name → SHA-256 of every file in a directory: to prove a failed run touched nothing. */
export async function directoryFingerprint(dir: string): Promise<Record<string, string>> {
  const result: Record<string, string> = {};
  for (const name of (await fs.readdir(dir)).sort()) {
    result[name] = createHash('sha256').update(await fs.readFile(path.join(dir, name))).digest('hex');
  }
  return result;
}
