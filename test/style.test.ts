/**
 * The source stays formatted (Prettier, .prettierrc.json) and backup_db.ts stays readable at 120
 * columns: Prettier does not break strings or comments, so long hints and messages are checked here.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { execa } from 'execa';
import { PROJECT_DIR, SCRIPT } from './helpers/cli.ts';

const MAX_COLUMNS = 120;

test('every file Prettier formats is formatted as .prettierrc.json says (npm run format fixes it)', async () => {
  const prettier = path.join(PROJECT_DIR, 'node_modules', '.bin', 'prettier');
  const result = await execa(prettier, ['--check', '.'], { cwd: PROJECT_DIR, reject: false });
  assert.equal(result.exitCode, 0, `not formatted:\n${result.stderr}`);
});

test(`no line of backup_db.ts is longer than ${MAX_COLUMNS} characters, hints and messages included`, async () => {
  const lines = (await fs.readFile(SCRIPT, 'utf8')).split('\n');
  const long = lines.flatMap((line, i) =>
    [...line].length > MAX_COLUMNS ? [`${i + 1}: ${line.trim().slice(0, 60)}…`] : [],
  );
  assert.ok(lines.length > 1000, 'read the whole script');
  assert.deepEqual(long, []);
});

test("backup_db.ts's table of contents names its sections, one line each, in their order", async () => {
  const source = await fs.readFile(SCRIPT, 'utf8');
  const toc = source.slice(source.indexOf(' * Sections,'), source.indexOf(' * A backup:'));
  const listed = toc
    .split('\n')
    .filter((line) => line.startsWith(' *   '))
    .map((line) => line.slice(5).split(/\s{2,}/)[0]!);
  const sections = source
    .split('\n')
    .filter((line) => line.startsWith('// ─── '))
    .map((line) => line.slice(7).replace(/[ ─]+$/, ''));
  assert.ok(sections.length > 20, 'found the section headers');
  assert.deepEqual(
    sections.map((title, i) => (listed[i] && title.startsWith(listed[i]) ? listed[i] : title)),
    listed,
    'each section header starts with its line in the table of contents',
  );
});
