/** Linux process facts from /proc, to find a CLI's own children wherever they were re-parented. */
import fs from 'node:fs/promises';
import { setTimeout as delay } from 'node:timers/promises';

/** Every live process whose environment holds NAME=value (readable for our own user's processes). */
export async function processesWithEnv(name: string, value: string): Promise<number[]> {
  const wanted = Buffer.from(`${name}=${value}\0`);
  const found: number[] = [];
  for (const entry of await fs.readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const environ = await fs.readFile(`/proc/${entry}/environ`).catch(() => undefined);
    if (
      environ &&
      Buffer.concat([Buffer.from('\0'), environ]).includes(Buffer.concat([Buffer.from('\0'), wanted])) &&
      (await alive(Number(entry)))
    ) {
      found.push(Number(entry));
    }
  }
  return found;
}

/** The pg_dump processes (leader and parallel workers) started by the CLI with process id `cliPid`. */
export const pgDumpsOf = (cliPid: number) => processesWithEnv('PGAPPNAME', `backup_db:${cliPid}:pg_dump`);

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
