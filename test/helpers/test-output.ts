/** What test/run.ts reads from a test file's output (Node's spec reporter): its counts and its skips. */

export type Counts = Record<'tests' | 'pass' | 'fail' | 'skipped' | 'todo' | 'cancelled', number>;

export function readTestOutput(output: string): { counts: Counts; skipped: string[] } {
  const count = (name: string) => Number(new RegExp(`^ℹ ${name} (\\d+)$`, 'm').exec(output)?.[1] ?? 0);
  const skipped = output
    .split('\n')
    .filter((line) => /^\s*﹣ /.test(line))
    .map((line) => line.trim().replace(/^﹣ /, ''));
  // The reporter counts a skipped describe among the suites, not the tests or the skipped: a file
  // whose every test sits in one would read "0 tests, 0 skipped". Each is counted as one skipped test.
  const skippedSuites = Math.max(0, skipped.length - count('skipped'));
  return {
    counts: {
      tests: count('tests') + skippedSuites,
      pass: count('pass'),
      fail: count('fail'),
      skipped: count('skipped') + skippedSuites,
      todo: count('todo'),
      cancelled: count('cancelled'),
    },
    skipped,
  };
}
