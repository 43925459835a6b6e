/**
 * Preloaded into the CLI (runCli's `hangingDns`, `privateDns`): node's lookups of one host name answered
 * otherwise than the system resolver would answer them.
 * - HANGING_DNS_HOST never answers, as with a resolver that does not reply. Like a getaddrinfo call in
 *   libuv's thread pool, which an aborted fetch cannot cancel, the pending lookup keeps the process alive
 *   (here for an hour).
 * - PRIVATE_DNS_HOST is PRIVATE_DNS_ADDRESS to this process only: pg_dump or pg_restore, looking it up
 *   again, would find nothing, as when a name's DNS answer changes during a run. Once the file
 *   PRIVATE_DNS_FLIP_FILE exists, it is PRIVATE_DNS_FLIP_ADDRESS: a failover flipping a CNAME.
 */
import dns from 'node:dns';
import { existsSync } from 'node:fs';

const { HANGING_DNS_HOST: hanging, PRIVATE_DNS_HOST: privateHost, PRIVATE_DNS_ADDRESS: first } = process.env;
const { PRIVATE_DNS_FLIP_FILE: flipFile, PRIVATE_DNS_FLIP_ADDRESS: flipped } = process.env;
const lookup = dns.lookup;

dns.lookup = ((hostname: string, ...rest: unknown[]) => {
  if (hostname === hanging) return void setTimeout(() => undefined, 3_600_000);
  if (hostname !== privateHost) return (lookup as (...args: unknown[]) => unknown)(hostname, ...rest);
  const callback = rest.at(-1) as (error: null, address: unknown, family?: number) => void;
  const address = flipFile && existsSync(flipFile) ? flipped : first;
  const all = typeof rest[0] === 'object' && (rest[0] as { all?: boolean } | null)?.all === true;
  process.nextTick(() => (all ? callback(null, [{ address, family: 4 }]) : callback(null, address, 4)));
}) as typeof dns.lookup;
