/**
 * Preloaded into the CLI (startCli's `renameGate`): the first rename whose target ends with
 * RENAME_GATE_TARGET (a temp file put in place, as writeFileAtomic does) creates the file
 * RENAME_GATE_REACHED and waits until RENAME_GATE_OPEN exists: a test acts at that exact moment.
 */
import { existsSync, writeFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import { setTimeout as delay } from 'node:timers/promises';

const { RENAME_GATE_TARGET: target, RENAME_GATE_REACHED: reached, RENAME_GATE_OPEN: open } = process.env;
const rename = fs.rename;
let passed = false;

fs.rename = async (from, to) => {
  if (!passed && target && String(to).endsWith(target)) {
    passed = true;
    writeFileSync(reached!, '');
    while (!existsSync(open!)) await delay(20); // polls only the test's own signal file
  }
  return rename(from, to);
};
