/**
 * Run the CLI's exported main() inside the test process, with its output captured: for matrices
 * and fuzzing, where thousands of runs would take minutes as processes. Everything it does apart
 * from printing is real (files, connections, client tools, webhooks, the failure command), and
 * runs may overlap. The contract about the process itself (exit status, signals, argv) is tested
 * with real processes elsewhere.
 */
import { main } from '../../backup_db.ts';
import { ownConfigDir } from './cli.ts';

export interface InProcessRun {
  exitCode: number;
  stdout: string;
  stderr: string;
}

export async function runMain(args: string[]): Promise<InProcessRun> {
  const stdout: string[] = [];
  const stderr: string[] = [];
  const exitCode = await main([process.execPath, 'backup_db.ts', ...args, ...ownConfigDir(args)], {
    out: (text) => stdout.push(`${text}\n`),
    err: (text) => stderr.push(`${text}\n`),
  });
  return { exitCode, stdout: stdout.join(''), stderr: stderr.join('') };
}

/** Run `work` over `items` (taken as needed), at most `limit` at a time; the first failure ends it. */
export async function inPool<T>(
  items: Iterable<T>,
  limit: number,
  work: (item: T, index: number) => Promise<void>,
): Promise<void> {
  const iterator = items[Symbol.iterator]();
  let index = 0;
  await Promise.all(
    Array.from({ length: limit }, async () => {
      for (let next = iterator.next(); !next.done; next = iterator.next()) await work(next.value, index++);
    }),
  );
}

/** A .env line that dotenv reads back as exactly `value`: single quotes, or backquotes around a single quote. */
export function envLine(name: string, value: string): string {
  if (!value.includes("'")) return `${name}='${value}'`;
  if (!value.includes('`')) return `${name}=\`${value}\``;
  throw new Error(`${name}: a value with both kinds of quote cannot be written to a .env file`);
}
