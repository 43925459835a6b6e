/**
 * Preloaded into the CLI (startCli's `noHardLinks`) or a lock contender: every link(2) fails as on a file
 * system without hard links (exFAT, FAT, some FUSE and network file systems), where Linux answers EPERM.
 * There a lock is created and then written: as on a slow network file system, the write comes a few
 * milliseconds later, so that contenders do meet a lock still empty.
 */
import fs from 'node:fs/promises';
import { setTimeout as later } from 'node:timers/promises';

fs.link = async (existing, made) => {
  const message = `EPERM: operation not permitted, link '${String(existing)}' -> '${String(made)}'`;
  throw Object.assign(new Error(message), { code: 'EPERM', errno: -1, syscall: 'link', path: String(existing) });
};

const open = fs.open;
fs.open = (async (file: string, flags?: string, mode?: number) => {
  const handle = await open(file, flags, mode);
  if (flags === 'wx' && /\.lock(\.|$)/.test(String(file))) {
    const writeFile = handle.writeFile.bind(handle);
    handle.writeFile = async (data, options) => (await later(5), writeFile(data, options));
  }
  return handle;
}) as typeof fs.open;
