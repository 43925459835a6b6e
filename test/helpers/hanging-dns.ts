/**
 * Preloaded into the CLI (startCli's `hangingDns`): a lookup of HANGING_DNS_HOST never answers, as with a
 * resolver that does not reply. Like a getaddrinfo call in libuv's thread pool, which an aborted fetch
 * cannot cancel, the pending lookup keeps the process alive (here for an hour).
 */
import dns from 'node:dns';

const host = process.env.HANGING_DNS_HOST;
const lookup = dns.lookup;

dns.lookup = ((hostname: string, ...rest: unknown[]) => {
  if (hostname !== host) return (lookup as (...args: unknown[]) => unknown)(hostname, ...rest);
  setTimeout(() => undefined, 3_600_000);
}) as typeof dns.lookup;
