/**
 * Preloaded into the CLI (startCli's `wallClock`): once the file WALL_CLOCK_WHEN exists, the wall
 * clock steps by WALL_CLOCK_STEP_MS (or to the instant WALL_CLOCK_AT, in ms since the epoch, exactly),
 * as an NTP step would (chrony at boot, while a Persistent=true timer runs a backup), and then runs
 * at WALL_CLOCK_RATE times real speed (1 unless set; 0 stands still). The monotonic clock,
 * performance.now(), is left alone.
 */
import { existsSync } from 'node:fs';

const RealDate = Date;
const when = process.env.WALL_CLOCK_WHEN;
const step = Number(process.env.WALL_CLOCK_STEP_MS ?? 0);
const rate = Number(process.env.WALL_CLOCK_RATE ?? 1);
const at = process.env.WALL_CLOCK_AT === undefined ? undefined : Number(process.env.WALL_CLOCK_AT);
let steppedAt: number | undefined;

function now(): number {
  const real = RealDate.now();
  if (steppedAt === undefined && when !== undefined && existsSync(when)) steppedAt = real;
  if (steppedAt === undefined) return real;
  return (at ?? steppedAt + step) + (real - steppedAt) * rate;
}

globalThis.Date = class extends RealDate {
  constructor(...args: unknown[]) {
    if (args.length > 0) super(...(args as [number]));
    else super(now());
  }
  static override now(): number {
    return now();
  }
} as DateConstructor;
