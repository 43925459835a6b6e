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
      "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'backup_db:%:pg_dump' AND wait_event_type = 'Lock' AND query LIKE 'LOCK TABLE%'",
    );
    return rows[0]?.pid;
  });
}

/**
 * Wait until a held pg_dump (clientDirHolding) has started and the backup's own session, its row
 * counts done, sits idle in its snapshot transaction: the moment to make the server stop answering.
 */
export async function waitForCountsDoneAndDumpStarted(observer: pg.Client, dumpStarted: string): Promise<true> {
  return waitFor('the dump to start with the counts done', async () => {
    if (!(await fs.stat(dumpStarted).catch(() => undefined))) return undefined;
    const { rows } = await observer.query(
      "SELECT 1 FROM pg_stat_activity WHERE application_name ~ '^backup_db:[0-9]+:[0-9a-f]+$' AND state = 'idle in transaction'",
    );
    return rows.length > 0 ? true : undefined;
  });
}

/**
 * Name → SHA-256 of every entry in a directory (a subdirectory, such as a directory-format
 * backup, hashed over its own fingerprint): to prove a failed run touched nothing.
 */
export async function directoryFingerprint(dir: string): Promise<Record<string, string>> {
  const result: Record<string, string> = {};
  for (const name of (await fs.readdir(dir)).sort()) {
    const entry = path.join(dir, name);
    const content = (await fs.stat(entry)).isDirectory()
      ? JSON.stringify(await directoryFingerprint(entry))
      : await fs.readFile(entry);
    result[name] = createHash('sha256').update(content).digest('hex');
  }
  return result;
}

/** A session's backend pid, as pg_stat_activity and pg_locks show it. */
export async function backendPid(client: pg.Client): Promise<number> {
  return (await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
}

/**
 * Hold an ACCESS EXCLUSIVE lock on a table, so a backup's pg_dump waits on it for as long as a
 * test needs to look at the running backup. `observer` is a second connection for polling.
 */
export async function holdTableLock(connect: () => Promise<pg.Client>, table: string) {
  const [holder, observer] = await Promise.all([connect(), connect()]);
  const holderPid = await backendPid(holder);
  await holder.query('BEGIN');
  await holder.query(`LOCK TABLE ${holder.escapeIdentifier(table)} IN ACCESS EXCLUSIVE MODE`);
  let released = false;
  return {
    observer,
    /** The holder's backend pid, as pg_stat_activity shows it. */
    holderPid,
    async release() {
      if (released) return;
      released = true;
      await holder.query('ROLLBACK');
      await Promise.all([holder.end(), observer.end()]);
    },
  };
}

/** Wait (bounded) until no backup session is left on the server: pg_dump's included. */
export async function waitForNoBackupSessions(client: pg.Client): Promise<void> {
  await waitFor(
    'backup sessions to end',
    async () => {
      const { rows } = await client.query("SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'backup_db:%'");
      return rows.length === 0 ? true : undefined;
    },
    15_000,
  );
}

/** Damage a file the way bit rot would: invert the byte in its middle. */
export async function flipMiddleByte(file: string): Promise<void> {
  const bytes = await fs.readFile(file);
  const middle = Math.floor(bytes.length / 2);
  bytes[middle] = bytes[middle]! ^ 0xff;
  await fs.writeFile(file, bytes);
}
