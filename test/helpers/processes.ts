/** Linux process facts from /proc, to find a CLI's own children wherever they were re-parented. */
import fs from 'node:fs/promises';
import { setTimeout as delay } from 'node:timers/promises';

/** Every live process whose environment holds NAME=value, or a value `value` matches (our own user's processes). */
export async function processesWithEnv(name: string, value: string | RegExp): Promise<number[]> {
  const wanted = (entry: string) =>
    entry.startsWith(`${name}=`) &&
    (typeof value === 'string' ? entry === `${name}=${value}` : value.test(entry.slice(name.length + 1)));
  const found: number[] = [];
  for (const entry of await fs.readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const environ = await fs.readFile(`/proc/${entry}/environ`, 'latin1').catch(() => undefined);
    if (environ?.split('\0').some(wanted) && (await alive(Number(entry)))) found.push(Number(entry));
  }
  return found;
}

/** The application name of the CLI with process id `cliPid` (its pid, then a random token), or with `suffix`. */
export const applicationNameOf = (cliPid: number, suffix = '') =>
  new RegExp(`^backup_db:${cliPid}:[0-9a-f]+${suffix}$`);

/** The pg_dump processes (leader and parallel workers) started by the CLI with process id `cliPid`. */
export const pgDumpsOf = (cliPid: number) => processesWithEnv('PGAPPNAME', applicationNameOf(cliPid, ':pg_dump'));

/** A process exists and is not a zombie. */
export async function alive(pid: number): Promise<boolean> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  return stat !== undefined && stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
}

/**
 * Poll (every 20 ms) until `condition` holds; resolve with the milliseconds it took, or reject
 * after `timeoutMs`. For conditions about processes, which give no event to wait on.
 */
export async function within(what: string, timeoutMs: number, condition: () => Promise<boolean>): Promise<number> {
  const started = Date.now();
  for (;;) {
    if (await condition()) return Date.now() - started;
    if (Date.now() - started > timeoutMs) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await delay(20);
  }
}
