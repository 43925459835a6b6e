/**
 * Run the CLI's exported main() inside the test process, capturing what it prints: for matrices
 * and fuzzing, where thousands of runs would take minutes as processes. Everything it does apart
 * from printing is real (files, connections, client tools, webhooks, the failure command). Runs
 * are serialised, since main() prints through the process-wide console. The contract about the
 * process itself (exit status, signals, argv) is tested with real processes elsewhere.
 */
import { format } from 'node:util';
import { main } from '../../backup_db.ts';

export interface InProcessRun {
  exitCode: number;
  stdout: string;
  stderr: string;
}

let previous: Promise<unknown> = Promise.resolve();

export function runMain(args: string[]): Promise<InProcessRun> {
  const run = previous.then(async () => {
    const stdout: string[] = [];
    const stderr: string[] = [];
    const saved = { log: console.log, error: console.error };
    console.log = (...parts: unknown[]) => void stdout.push(`${format(...parts)}\n`);
    console.error = (...parts: unknown[]) => void stderr.push(`${format(...parts)}\n`);
    try {
      const exitCode = await main([process.execPath, 'backup_db.ts', ...args]);
      return { exitCode, stdout: stdout.join(''), stderr: stderr.join('') };
    } finally {
      Object.assign(console, saved);
    }
  });
  previous = run.catch(() => undefined);
  return run;
}

/** A .env line that dotenv reads back as exactly `value`: single quotes, or backquotes around a single quote. */
export function envLine(name: string, value: string): string {
  if (!value.includes("'")) return `${name}='${value}'`;
  if (!value.includes('`')) return `${name}=\`${value}\``;
  throw new Error(`${name}: a value with both kinds of quote cannot be written to a .env file`);
}
