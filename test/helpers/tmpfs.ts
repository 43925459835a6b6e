/**
 * Run the CLI with its output directory on a tiny tmpfs, for real "disk full" conditions. The
 * tmpfs lives in a private mount namespace (unshare; as a non-root user also a user namespace),
 * so nothing is mounted on the host and it vanishes with the run. What the directory holds
 * afterwards is reported back as name → SHA-256.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { runCli, tempDir } from './cli.ts';

const SCRIPT = `
set -u
dir=$1 report=$2 size=$3 seed=$4
shift 4
mount -t tmpfs -o "size=$size,mode=0755" tmpfs "$dir" || { echo "cannot mount a tmpfs here" >&2; exit 99; }
if [ -n "$seed" ]; then cp -p "$seed"/. "$dir"/ -R; fi
"$@"
code=$?
(cd "$dir" && for f in * .[!.]*; do [ -e "$f" ] && sha256sum -- "$f"; done) > "$report"
exit $code
`;

export interface TmpfsRun {
  exitCode: number;
  stdout: string;
  stderr: string;
  /** The output directory's files after the run: name → SHA-256. */
  after: Record<string, string>;
}

export async function runCliOnTmpfs(
  sizeBytes: number,
  seedDir: string | undefined,
  args: (outputDir: string) => string[],
): Promise<TmpfsRun> {
  const work = await tempDir('backup-db-tmpfs-');
  const dir = path.join(work, 'mnt');
  const report = path.join(work, 'report.txt');
  await fs.mkdir(dir);
  const unshare =
    os.userInfo().uid === 0 ? ['unshare', '--mount'] : ['unshare', '--mount', '--user', '--map-root-user'];
  const result = await runCli({
    args: args(dir),
    wrapper: [...unshare, 'sh', '-c', SCRIPT, 'sh', dir, report, String(sizeBytes), seedDir ?? ''],
  });
  if (result.exitCode === 99)
    throw new Error(`this machine does not allow a tmpfs in a private mount namespace: ${result.stderr}`);
  const after: Record<string, string> = {};
  for (const line of (await fs.readFile(report, 'utf8')).split('\n').filter(Boolean)) {
    const [hash, name] = [line.slice(0, 64), line.slice(66)];
    after[name] = hash;
  }
  return { ...result, after };
}
