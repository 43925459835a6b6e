// Preloaded into the CLI by the benchmark (node --import): at exit, write this process's peak
// resident set size (getrusage ru_maxrss, in kilobytes on Linux) to $BENCH_MAX_RSS_FILE.
import { writeFileSync } from 'node:fs';

const file = process.env.BENCH_MAX_RSS_FILE;
if (file) process.on('exit', () => writeFileSync(file, String(process.resourceUsage().maxRSS * 1024)));
