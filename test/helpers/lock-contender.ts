/**
 * One contender for a backup lock, driven line by line on stdin so that many processes can be
 * told to go at the same instant, round after round:
 *   go DIR     take the lock of database "app" (dev) in DIR; answers "won" or "lost <reason>"
 *   release    release a lock won; answers "released"
 */
import { createInterface } from 'node:readline';
import { acquireBackupLock, type BackupLock, type DbConfig } from '../../backup_db.ts';

const config = { database: 'app', environment: 'dev' } as DbConfig;
let held: BackupLock | undefined;
for await (const line of createInterface({ input: process.stdin })) {
  const [command, dir] = line.split(' ');
  if (command === 'go') {
    try {
      held = await acquireBackupLock(dir!, config);
      console.log('won');
    } catch (error) {
      console.log(`lost ${(error as Error).message.split('\n')[0]}`);
    }
  } else if (command === 'release') {
    await held?.release();
    held = undefined;
    console.log('released');
  }
}
