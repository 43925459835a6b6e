/**
 * Issue 4.7, security. A password that turns up inside PostgreSQL's own error text is masked;
 * PGPASSFILE and ~/.pgpass work the way libpq's do (and a password file others can read is
 * ignored); sslmode from DB_SSLMODE or the URL, else PGSSLMODE, is honoured by both the check
 * connection and pg_dump. (File modes 0600/0700 are checked in backup.test.ts, argv in secrets.test.ts.)
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { after, before, describe, test } from 'node:test';
import { dbVars, runCli, startCli, tempDir, uniqueName, writeEnvFile } from './helpers/cli.ts';
import { holdTableLock, waitForBlockedPgDump } from './helpers/wait.ts';
import { skipUnless, unmet } from './helpers/requirements.ts';
import { execa } from 'execa';
import { assertRestoresIdentically } from './helpers/compare.ts';
import { certificateNamesHost } from '../backup_db.ts';
import {
  certificateAuthority,
  selfSignedCertificate,
  startTestServer,
  startTestServers,
  type TestServer,
} from './helpers/pg-server.ts';

const noOpenssl = await unmet('openssl');
let server: TestServer;
let tlsServer: TestServer & { certificate?: string };
let certServer: TestServer;
before(async () => {
  // The TLS-only servers need openssl for their certificates; without it those tests skip.
  const tls = [{ tlsOnly: true }, { tlsOnly: true, clientCertificates: true }];
  [server, tlsServer, certServer] = (await startTestServers(noOpenssl ? [{}] : [{}, ...tls])) as [
    TestServer,
    TestServer,
    TestServer,
  ];
  for (const s of [server, tlsServer, certServer].filter(Boolean)) {
    await s.createDatabase(
      'sec_app',
      "CREATE TABLE secrets_table (id int, note text); INSERT INTO secrets_table VALUES (1, 'x')",
    );
  }
});
after(() => Promise.all([server?.stop(), tlsServer?.stop(), certServer?.stop()]));

async function backup(vars: Record<string, string>, env: Record<string, string> = {}) {
  const configDir = await tempDir();
  const outputDir = path.join(configDir, 'out');
  await writeEnvFile(configDir, '.env', vars);
  const result = await runCli({
    args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', outputDir],
    env: { HOME: configDir, ...env },
  });
  const files = await fs.readdir(outputDir).catch(() => [] as string[]);
  return { ...result, files, configDir };
}

describe('secrets in messages', () => {
  test("a password that turns up in the server's own error text is masked", async () => {
    // A realistic slip: the password pasted into the database-name field.
    const result = await backup({ ...dbVars(server, 'DEV_DB_', 'sec_app'), DEV_DB_NAME: server.password });
    assert.equal(result.exitCode, 3);
    assert.match(result.stderr, /database "\*\*\*\*" does not exist/);
    assert.ok(!result.stderr.includes(server.password) && !result.stdout.includes(server.password));
  });
});

describe('password files', () => {
  const withoutPassword = () => {
    const { DEV_DB_PASSWORD: _unused, ...vars } = dbVars(server, 'DEV_DB_', 'sec_app');
    return vars;
  };
  const pgpassLine = () => `${server.host}:${server.port}:sec_app:${server.user}:${server.password}\n`;

  test('PGPASSFILE is used by the connection check and by pg_dump alike', async () => {
    const file = path.join(await tempDir(), 'pgpass');
    await fs.writeFile(file, `# comment\nother:1:x:y:z\n${pgpassLine()}`, { mode: 0o600 });
    const result = await backup(withoutPassword(), { PGPASSFILE: file });
    assert.equal(result.exitCode, 0, result.stderr);
    assert.equal(result.files.filter((name) => name.endsWith('.dump')).length, 1);
  });

  test('~/.pgpass is used when PGPASSFILE is not set', async () => {
    const home = await tempDir();
    await fs.writeFile(path.join(home, '.pgpass'), pgpassLine(), { mode: 0o600 });
    const result = await backup(withoutPassword(), { HOME: home });
    assert.equal(result.exitCode, 0, result.stderr);
  });

  test('a password file that others can read is ignored, as libpq ignores it, and the error says why', async () => {
    const file = path.join(await tempDir(), 'pgpass');
    await fs.writeFile(file, pgpassLine(), { mode: 0o644 });
    await fs.chmod(file, 0o644);
    const result = await backup(withoutPassword(), { PGPASSFILE: file });
    assert.equal(result.exitCode, 3, result.stderr);
    assert.match(result.stderr, /^✗ Backup failed: Database authentication failed$/m);
    assert.match(result.stderr, /has group or world access/);
    assert.match(result.stderr, /chmod 0600/);
    assert.ok(!result.stderr.includes(server.password));
  });

  test("the password file's password is masked like a configured one: pasted as the database name, it leaks nowhere", async () => {
    const dir = await tempDir();
    const [file, log, hookEnv] = ['pgpass', 'run.log', 'hook.env'].map((name) => path.join(dir, name)) as [
      string,
      string,
      string,
    ];
    await fs.writeFile(file, `${server.host}:${server.port}:*:${server.user}:${server.password}\n`, { mode: 0o600 });
    const args = ['--log-file', log, '--on-failure', `env > '${hookEnv}'`];
    const result = await runCli({
      args: ['--env', 'dev', '--config-dir', dir, '--output-dir', path.join(dir, 'out'), ...args],
      env: { ...withoutPassword(), DEV_DB_NAME: server.password, PGPASSFILE: file, HOME: dir },
    });
    assert.equal(result.exitCode, 3, result.stderr);
    assert.match(result.stderr, /database "\*\*\*\*" does not exist/);
    const texts = { stderr: result.stderr, stdout: result.stdout, log: await fs.readFile(log, 'utf8') };
    const env = await fs.readFile(hookEnv, 'utf8');
    assert.match(env, /^BACKUP_DATABASE=\*\*\*\*$/m);
    for (const [where, text] of Object.entries({ ...texts, env })) assert.ok(!text.includes(server.password), where);
  });
});

describe('inherited libpq variables', () => {
  test('PGSERVICE, PGHOSTADDR, PGTARGETSESSIONATTRS cannot send pg_dump elsewhere than the checked server', async () => {
    const serviceFile = path.join(await tempDir(), 'pg_service.conf');
    await fs.writeFile(serviceFile, `[elsewhere]\nhost=127.0.0.1\nport=1\ndbname=nowhere\n`);
    const redirections: Record<string, string>[] = [
      { PGSERVICEFILE: serviceFile, PGSERVICE: 'elsewhere' },
      { PGHOSTADDR: '127.0.0.2' },
      { PGTARGETSESSIONATTRS: 'standby' },
    ];
    for (const env of redirections) {
      const result = await backup(dbVars(server, 'DEV_DB_', 'sec_app'), env);
      assert.equal(result.exitCode, 0, `${JSON.stringify(env)}: ${result.stderr}`);
      assert.equal(result.files.filter((name) => name.endsWith('.dump')).length, 1);
    }
  });
});

describe('sslmode, against a server without TLS', () => {
  test("a URL's ?ssl=true and ?requiressl=1 require TLS, as libpq reads them: no plaintext session", async () => {
    const url = `postgresql://${server.user}:${encodeURIComponent(server.password)}@${server.host}:${server.port}/sec_app`;
    for (const query of ['?ssl=true', '?requiressl=1', '?sslmode=disable&requiressl=1']) {
      const result = await backup({ DEV_DATABASE_URL: url + query });
      assert.equal(result.exitCode, 3, `${query}: ${result.stderr}`);
      assert.match(result.stderr, /server does not support SSL/, query);
      assert.deepEqual(result.files, [], query);
    }
    const prefer = await backup({ DEV_DATABASE_URL: `${url}?requiressl=0` });
    assert.equal(prefer.exitCode, 0, `requiressl=0 is prefer: ${prefer.stderr}`);
    const other = await backup({ DEV_DATABASE_URL: `${url}?ssl=false` });
    assert.equal(other.exitCode, 2, `libpq knows ssl=true only: ${other.stderr}`);
    assert.match(other.stderr, /sets \?ssl=, which this tool does not support/);
  });
});

describe('sslmode, against a server that serves TLS but admits plain connections only', skipUnless(noOpenssl), () => {
  let plainServer: TestServer;
  before(async () => {
    plainServer = await startTestServer({ tlsRefused: true });
    await plainServer.createDatabase('sec_app', 'CREATE TABLE t (id int); INSERT INTO t VALUES (1)');
  });
  after(() => plainServer?.stop());
  const vars = (extra: Record<string, string> = {}) => ({ ...dbVars(plainServer, 'DEV_DB_', 'sec_app'), ...extra });

  test("no sslmode (libpq's prefer): the refused TLS session is tried again plain, as libpq (pg_dump) does", async () => {
    const result = await backup(vars());
    assert.equal(result.exitCode, 0, result.stderr);
    const wrong = await backup(vars({ DEV_DB_PASSWORD: 'Wr0ng-pa55word' }));
    assert.equal(wrong.exitCode, 3, wrong.stderr);
    assert.match(wrong.stderr, /password authentication failed/);
  });

  test('sslmode=require is refused by the server: exit 3, no plain session tried', async () => {
    const result = await backup(vars({ DEV_DB_SSLMODE: 'require' }));
    assert.equal(result.exitCode, 3, result.stderr);
    assert.match(result.stderr, /no pg_hba\.conf entry/);
    assert.deepEqual(result.files, []);
  });
});

describe('sslmode, against a server that accepts TLS connections only', skipUnless(noOpenssl), () => {
  const vars = (extra: Record<string, string> = {}) => ({ ...dbVars(tlsServer, 'DEV_DB_', 'sec_app'), ...extra });

  test('DEV_DB_SSLMODE=require: both connections use TLS, the backup succeeds', async () => {
    const result = await backup(vars({ DEV_DB_SSLMODE: 'require' }));
    assert.equal(result.exitCode, 0, result.stderr);
  });

  test("no sslmode (libpq's prefer) still connects, over TLS", async () => {
    const result = await backup(vars());
    assert.equal(result.exitCode, 0, result.stderr);
  });

  test("sslmode=allow: the server's refusal of a plain session is answered with TLS, as libpq does", async () => {
    const result = await backup(vars({ DEV_DB_SSLMODE: 'allow' }));
    assert.equal(result.exitCode, 0, result.stderr);
    const wrong = await backup(vars({ DEV_DB_SSLMODE: 'allow', DEV_DB_PASSWORD: 'Wr0ng-pa55word' }));
    assert.equal(wrong.exitCode, 3, wrong.stderr);
    assert.match(wrong.stderr, /password authentication failed/);
  });

  test('sslmode=disable is refused by the server: exit 3 with its message', async () => {
    const result = await backup(vars({ DEV_DB_SSLMODE: 'disable' }));
    assert.equal(result.exitCode, 3);
    assert.match(result.stderr, /no pg_hba\.conf entry .* no encryption/);
  });

  test('verify-full with PGSSLROOTCERT naming the server CA succeeds, with no warning on stderr', async () => {
    const result = await backup(vars({ DEV_DB_SSLMODE: 'verify-full' }), { PGSSLROOTCERT: tlsServer.certificate! });
    assert.equal(result.exitCode, 0, result.stderr);
    // The host is an IP address (127.0.0.1), which TLS's server name (SNI) may not be: Node warns of one.
    assert.equal(result.stderr, '');
  });

  test('verify-full against another CA fails: exit 3, TLS connection failed', async () => {
    const other = await selfSignedCertificate(await tempDir());
    const result = await backup(vars({ DEV_DB_SSLMODE: 'verify-full' }), { PGSSLROOTCERT: other.cert });
    assert.equal(result.exitCode, 3);
    assert.match(result.stderr, /^✗ Backup failed: Database TLS connection failed$/m);
    assert.deepEqual(result.files, []);
  });

  test('verify-ca without any CA certificate: exit 3, saying where it looked', async () => {
    const result = await backup(vars({ DEV_DB_SSLMODE: 'verify-ca' }));
    assert.equal(result.exitCode, 3);
    assert.match(result.stderr, /^✗ Backup failed: TLS root certificate missing$/m);
    assert.match(result.stderr, /\.postgresql\/root\.crt cannot be read/);
  });

  test('sslmode in the connection URL works like DB_SSLMODE', async () => {
    const url = `postgresql://${tlsServer.user}:${encodeURIComponent(tlsServer.password)}@${tlsServer.host}:${tlsServer.port}/sec_app?sslmode=require`;
    const ok = await backup({ DEV_DATABASE_URL: url });
    assert.equal(ok.exitCode, 0, ok.stderr);
    const refused = await backup({ DEV_DATABASE_URL: url.replace('sslmode=require', 'sslmode=disable') });
    assert.equal(refused.exitCode, 3);
    assert.ok(!refused.stderr.includes(tlsServer.password), 'the URL password is masked');
  });

  test('sslrootcert in the connection URL is the CA of both connections, over PGSSLROOTCERT, as in libpq', async () => {
    const other = await selfSignedCertificate(await tempDir());
    const url = (ca: string) =>
      `postgresql://${tlsServer.user}:${encodeURIComponent(tlsServer.password)}@${tlsServer.host}:${tlsServer.port}/sec_app?sslmode=verify-full&sslrootcert=${encodeURIComponent(ca)}`;
    const ok = await backup({ DEV_DATABASE_URL: url(tlsServer.certificate!) }, { PGSSLROOTCERT: other.cert });
    assert.equal(ok.exitCode, 0, ok.stderr);
    const refused = await backup({ DEV_DATABASE_URL: url(other.cert) }, { PGSSLROOTCERT: tlsServer.certificate! });
    assert.equal(refused.exitCode, 3, refused.stderr);
    assert.match(refused.stderr, /^✗ Backup failed: Database TLS connection failed$/m);
  });
});

/**
 * A fake server behind a certificate nobody trusts: it accepts TLS and asks for the password in clear
 * text, recording every password it receives, and whether anyone asked it for TLS.
 */
async function startImpostor(certificate?: { cert: string; key: string }) {
  const { cert, key } = certificate ?? (await selfSignedCertificate(await tempDir()));
  const identity = { cert: await fs.readFile(cert), key: await fs.readFile(key) };
  const seen = { tlsRequests: 0, passwords: [] as string[] };
  const serve = (socket: net.Socket) => {
    let pending = Buffer.alloc(0);
    let started = false;
    socket.on('error', () => undefined);
    socket.on('data', (chunk: Buffer) => {
      pending = Buffer.concat([pending, chunk]);
      // Before the startup message, frames are a length and a code; after it, a type byte and a length.
      const header = started ? 5 : 8;
      if (pending.length < header) return;
      const length = started ? pending.readInt32BE(1) + 1 : pending.readInt32BE(0);
      if (pending.length < length) return;
      const frame = pending.subarray(0, length);
      pending = pending.subarray(length);
      if (!started && frame.readInt32BE(4) === 80877103) {
        seen.tlsRequests++;
        socket.removeAllListeners('data');
        socket.write('S');
        serve(new tls.TLSSocket(socket, { isServer: true, ...identity }));
      } else if (!started) {
        started = true;
        socket.write(Buffer.from([0x52, 0, 0, 0, 8, 0, 0, 0, 3])); // AuthenticationCleartextPassword
      } else {
        if (frame[0] === 0x70) seen.passwords.push(frame.subarray(5, -1).toString());
        socket.destroy();
      }
    });
  };
  const server = net.createServer(serve);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  return { host: '127.0.0.1', port, seen, close: () => new Promise((resolve) => server.close(resolve)) };
}

describe("the libpq environment's TLS settings: PGSSLMODE, the CA certificate", skipUnless(noOpenssl), () => {
  /** A backup of an impostor asking for a cleartext password: TLS refused, no password sent, exit 3. */
  async function assertImpostorRefused(
    extraVars: Record<string, string>,
    env: Record<string, string>,
    certificate?: { cert: string; key: string },
  ) {
    const impostor = await startImpostor(certificate);
    try {
      const vars = { ...dbVars(server, 'DEV_DB_', 'sec_app'), DEV_DB_HOST: impostor.host, ...extraVars };
      const result = await backup({ ...vars, DEV_DB_PORT: String(impostor.port) }, env);
      assert.ok(impostor.seen.tlsRequests > 0, 'the impostor was asked for TLS');
      assert.deepEqual(impostor.seen.passwords, [], 'no password was sent');
      assert.equal(result.exitCode, 3, result.stderr);
      assert.match(result.stderr, /^✗ Backup failed: Database TLS connection failed$/m);
      return result;
    } finally {
      await impostor.close();
    }
  }

  test('PGSSLMODE=verify-full: a server whose certificate fails verification never gets the password', async () => {
    const other = await selfSignedCertificate(await tempDir());
    await assertImpostorRefused({}, { PGSSLMODE: 'verify-full', PGSSLROOTCERT: other.cert });
  });

  test('sslmode=require with a CA certificate in ~/.postgresql checks the server against it, as libpq does', async () => {
    const home = await tempDir();
    await fs.mkdir(path.join(home, '.postgresql'));
    const other = await selfSignedCertificate(await tempDir());
    await fs.copyFile(other.cert, path.join(home, '.postgresql', 'root.crt'));
    await assertImpostorRefused({ DEV_DB_SSLMODE: 'require' }, { HOME: home });
    await fs.copyFile(tlsServer.certificate!, path.join(home, '.postgresql', 'root.crt'));
    const trusted = await backup(
      { ...dbVars(tlsServer, 'DEV_DB_', 'sec_app'), DEV_DB_SSLMODE: 'require' },
      { HOME: home },
    );
    assert.equal(trusted.exitCode, 0, trusted.stderr);
  });

  test('a server whose certificate its CA revoked never gets the password: PGSSLCRL, PGSSLCRLDIR, ~/.postgresql/root.crl', async () => {
    const ca = await certificateAuthority(await tempDir());
    const revoked = await ca.issue();
    // Before it is revoked, the certificate is one the tool trusts: the impostor gets the password.
    const impostor = await startImpostor(revoked);
    try {
      const vars = { ...dbVars(server, 'DEV_DB_', 'sec_app'), DEV_DB_HOST: impostor.host };
      await backup(
        { ...vars, DEV_DB_PORT: String(impostor.port) },
        { PGSSLMODE: 'verify-full', PGSSLROOTCERT: ca.cert },
      );
      assert.deepEqual(impostor.seen.passwords, [server.password], 'trusted before the revocation');
    } finally {
      await impostor.close();
    }
    await ca.revoke(revoked.cert);
    const verified = { PGSSLMODE: 'verify-full', PGSSLROOTCERT: ca.cert };
    await assertImpostorRefused({}, { ...verified, PGSSLCRL: ca.crl }, revoked);
    // A directory as `openssl rehash` prepares it: the CRL under its issuer's hash, a link to the file.
    const crlDir = await tempDir();
    await fs.copyFile(ca.crl, path.join(crlDir, 'ca.crl.pem'));
    await execa('openssl', ['rehash', crlDir]);
    await assertImpostorRefused({}, { ...verified, PGSSLCRLDIR: crlDir }, revoked);
    // The default ~/.postgresql/root.crl, with require checking against ~/.postgresql/root.crt, as libpq does.
    const home = await tempDir();
    await fs.mkdir(path.join(home, '.postgresql'));
    await fs.copyFile(ca.cert, path.join(home, '.postgresql', 'root.crt'));
    await fs.copyFile(ca.crl, path.join(home, '.postgresql', 'root.crl'));
    const { stderr } = await assertImpostorRefused({ DEV_DB_SSLMODE: 'require' }, { HOME: home }, revoked);
    assert.match(stderr, /certificate revoked/);
    assert.match(stderr, /^ {2}2\. PGSSLCRL, PGSSLCRLDIR \(else ~\/\.postgresql\/root\.crl\) must hold a CRL/m);
    // A CRL from another CA only: libpq, as Node, then wants one from the server's CA too, and refuses.
    const other = await certificateAuthority(await tempDir());
    const unchecked = await assertImpostorRefused({}, { ...verified, PGSSLCRL: other.crl }, revoked);
    assert.match(unchecked.stderr, /unable to get certificate CRL/);
  });

  test('a revocation list that cannot be used is an error (exit 3) before any password is sent', async () => {
    const ca = await certificateAuthority(await tempDir());
    const revoked = await ca.issue();
    await ca.revoke(revoked.cert);
    const dir = await tempDir();
    const garbage = path.join(dir, 'garbage.crl');
    await fs.writeFile(garbage, '-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n');
    const verified = { PGSSLMODE: 'verify-full', PGSSLROOTCERT: ca.cert };
    const cases: [Record<string, string>, RegExp][] = [
      [{ PGSSLCRL: garbage }, /garbage\.crl cannot be used: /],
      [{ PGSSLCRL: path.join(dir, 'missing.crl') }, /missing\.crl cannot be used: .*ENOENT/],
      [{ PGSSLCRL: ca.cert }, /ca\.crt cannot be used: it holds no CRL/],
      // Nothing named as `openssl rehash` names CRLs: libpq finds no CRL there and refuses every server.
      [{ PGSSLCRLDIR: dir }, /PGSSLCRLDIR .* holds no CRL/],
    ];
    for (const [env, message] of cases) {
      const impostor = await startImpostor(revoked);
      try {
        const vars = { ...dbVars(server, 'DEV_DB_', 'sec_app'), DEV_DB_HOST: impostor.host };
        const result = await backup({ ...vars, DEV_DB_PORT: String(impostor.port) }, { ...verified, ...env });
        assert.deepEqual(impostor.seen.passwords, [], 'no password was sent');
        assert.equal(result.exitCode, 3, result.stderr);
        assert.match(result.stderr, /^✗ Backup failed: TLS revocation list unusable$/m);
        assert.match(result.stderr, message);
        assert.match(result.stderr, /^ {2}1\. /m);
      } finally {
        await impostor.close();
      }
    }
  });

  test("verify-full checks the server's name against the host, an IP address too; verify-ca does not", async () => {
    const ca = await certificateAuthority(await tempDir());
    const elsewhere = await startTestServer({ tlsOnly: true, certificate: await ca.issue('DNS:db.example.com') });
    try {
      await elsewhere.createDatabase('name_app', 'CREATE TABLE t (id int); INSERT INTO t VALUES (1)');
      const vars = (sslmode: string) => ({ ...dbVars(elsewhere, 'DEV_DB_', 'name_app'), DEV_DB_SSLMODE: sslmode });
      const full = await backup(vars('verify-full'), { PGSSLROOTCERT: ca.cert });
      assert.equal(full.exitCode, 3, full.stderr);
      assert.match(full.stderr, /^✗ Backup failed: Database TLS connection failed$/m);
      assert.match(
        full.stderr,
        /names \(DNS:db\.example\.com; CN db\.example\.com\) do not name the host 127\.0\.0\.1/,
      );
      const chainOnly = await backup(vars('verify-ca'), { PGSSLROOTCERT: ca.cert });
      assert.equal(chainOnly.exitCode, 0, chainOnly.stderr);
    } finally {
      await elsewhere.stop();
    }
  });

  test("verify-full refuses an impostor whose name libpq refuses: an iPAddress SAN that is not the host's, its CN aside", async () => {
    const ca = await certificateAuthority(await tempDir());
    const verified = { PGSSLMODE: 'verify-full', PGSSLROOTCERT: ca.cert };
    const certificate = await ca.issue('CN:127.0.0.1,IP:10.9.9.9');
    const result = await assertImpostorRefused({}, verified, certificate);
    assert.match(result.stderr, /certificate's names \(IP Address:10\.9\.9\.9; CN 127\.0\.0\.1\) do not name the host/);
  });

  test('verify-full takes what libpq takes for an IP host: its CN when no SAN is an iPAddress, a dNSName spelling it', async () => {
    const ca = await certificateAuthority(await tempDir());
    // libpq checks the host string against dNSNames, wildcards included: "*.0.0.1" names 127.0.0.1.
    const layouts = ['CN:127.0.0.1', 'DNS:127.0.0.1', 'CN:127.0.0.1,DNS:other.example', 'CN:other.example,DNS:*.0.0.1'];
    for (const names of layouts) {
      const named = await startTestServer({ tlsOnly: true, certificate: await ca.issue(names) });
      try {
        await named.createDatabase('cn_app', 'CREATE TABLE t (id int); INSERT INTO t VALUES (1)');
        const vars = { ...dbVars(named, 'DEV_DB_', 'cn_app'), DEV_DB_SSLMODE: 'verify-full' };
        const result = await backup(vars, { PGSSLROOTCERT: ca.cert });
        assert.equal(result.exitCode, 0, `${names}: ${result.stderr}`);
      } finally {
        await named.stop();
      }
    }
  });

  test('a server whose certificate is not revoked is backed up with the CRL in place (verify-full), and restores the same', async () => {
    const ca = await certificateAuthority(await tempDir());
    await ca.revoke((await ca.issue()).cert);
    const signed = await startTestServer({ tlsOnly: true, certificate: await ca.issue() });
    try {
      await signed.createDatabase(
        'crl_app',
        "CREATE TABLE t (id int PRIMARY KEY, note text); INSERT INTO t VALUES (1, 'x')",
      );
      const vars = { ...dbVars(signed, 'DEV_DB_', 'crl_app'), DEV_DB_SSLMODE: 'verify-full' };
      const result = await backup(vars, { PGSSLROOTCERT: ca.cert, PGSSLCRL: ca.crl });
      assert.equal(result.exitCode, 0, result.stderr);
      const dump = result.files.find((file) => file.endsWith('.dump'));
      assert.ok(dump, `a backup was written: ${result.files.join(', ')}`);
      await assertRestoresIdentically(signed, path.join(result.configDir, 'out', dump), 'crl_app');
    } finally {
      await signed.stop();
    }
  });

  test('a server that demands a client certificate gets the one libpq sends: PGSSLCERT and PGSSLKEY, else ~/.postgresql', async () => {
    const { cert, key } = certServer.clientCertificate!;
    const vars = { ...dbVars(certServer, 'DEV_DB_', 'sec_app'), DEV_DB_SSLMODE: 'require' };
    const home = await tempDir();
    const without = await backup(vars, { HOME: home });
    assert.equal(without.exitCode, 3, without.stderr);
    assert.match(without.stderr, /^ {2}1\. The server wants a client certificate: PGSSLCERT and PGSSLKEY/m);
    const fromEnv = await backup(vars, { HOME: home, PGSSLCERT: cert, PGSSLKEY: key });
    assert.equal(fromEnv.exitCode, 0, fromEnv.stderr);
    await fs.mkdir(path.join(home, '.postgresql'));
    await fs.copyFile(cert, path.join(home, '.postgresql', 'postgresql.crt'));
    await fs.copyFile(key, path.join(home, '.postgresql', 'postgresql.key'));
    const fromHome = await backup(vars, { HOME: home });
    assert.equal(fromHome.exitCode, 0, fromHome.stderr);
    // A key others can read, which libpq refuses: refused before our session sends anything.
    const openKey = path.join(home, 'open.key');
    await fs.copyFile(key, openKey);
    await fs.chmod(openKey, 0o644);
    const tooOpen = await backup(vars, { HOME: home, PGSSLKEY: openKey });
    assert.equal(tooOpen.exitCode, 3, tooOpen.stderr);
    assert.match(tooOpen.stderr, /^✗ Backup failed: TLS client key unusable$/m);
    assert.match(tooOpen.stderr, /open\.key cannot be used: it is readable by others \(mode 644\)/);
    // A certificate without its key, against a server without TLS, as libpq: no TLS, no certificate needed.
    const noKey = await backup(dbVars(server, 'DEV_DB_', 'sec_app'), { HOME: home, PGSSLKEY: '/nonexistent' });
    assert.equal(noKey.exitCode, 0, noKey.stderr);
  });

  test('PGSSLROOTCERT=system: verify-full (the default it implies) checks the server against the default CA store', async () => {
    const envs: Array<Record<string, string>> = [
      { PGSSLROOTCERT: 'system' },
      { PGSSLMODE: 'verify-full', PGSSLROOTCERT: 'system' },
    ];
    for (const env of envs) {
      const { stderr } = await assertImpostorRefused({}, env);
      // The hints speak of the settings in force, not of the default sslmode or a CA file.
      assert.match(stderr, /Check the sslmode \(verify-full\)/);
      assert.match(stderr, /sslrootcert=system checks the server certificate against the default CA store/);
      assert.doesNotMatch(stderr, /prefer|root\.crt/);
    }
  });

  test('settings libpq enforces and node-postgres cannot are refused before a password is sent (exit 2)', async () => {
    type Impostor = { host: string; port: number };
    const vars = (impostor: Impostor, extra: Record<string, string> = {}) => ({
      ...dbVars(server, 'DEV_DB_', 'sec_app'),
      DEV_DB_HOST: impostor.host,
      DEV_DB_PORT: String(impostor.port),
      ...extra,
    });
    const url = (impostor: Impostor) => ({
      DEV_DATABASE_URL: `postgresql://u:${encodeURIComponent(server.password)}@${impostor.host}:${impostor.port}/sec_app?sslmode=require&sslrootcert=system`,
    });
    const cases: [(impostor: Impostor) => Record<string, string>, Record<string, string>, RegExp][] = [
      [vars, { PGREQUIREAUTH: 'scram-sha-256' }, /PGREQUIREAUTH is "scram-sha-256"/],
      [vars, { PGCHANNELBINDING: 'require' }, /PGCHANNELBINDING is "require"/],
      [vars, { PGGSSENCMODE: 'require' }, /PGGSSENCMODE is "require"/],
      // Spellings libpq rejects, but only once pg_dump runs, after our session sent the password.
      [vars, { PGCHANNELBINDING: 'Require' }, /PGCHANNELBINDING is "Require"/],
      [vars, { PGGSSENCMODE: ' require' }, /PGGSSENCMODE is " require"/],
      [vars, { PGSSLMODE: 'require', PGSSLROOTCERT: 'system' }, /weak sslmode "require" .*sslrootcert=system/],
      [(i) => vars(i, { DEV_DB_SSLMODE: 'verify-ca' }), { PGSSLROOTCERT: 'system' }, /weak sslmode "verify-ca"/],
      [url, {}, /weak sslmode "require" may not be used with sslrootcert=system/],
    ];
    for (const [settings, env, message] of cases) {
      const impostor = await startImpostor();
      try {
        const result = await backup(settings(impostor), env);
        assert.deepEqual(impostor.seen.passwords, [], 'no password was sent');
        assert.equal(result.exitCode, 2, result.stderr);
        assert.match(result.stderr, /^✗ Backup failed: Configuration error$/m);
        assert.match(result.stderr, message);
        assert.match(result.stderr, /^ {2}1\. /m);
      } finally {
        await impostor.close();
      }
    }
  });

  test('DB_SSLMODE and the URL sslmode win over PGSSLMODE, as they do for pg_dump', async () => {
    // verify-full with no CA certificate anywhere (HOME has no .postgresql/root.crt) cannot connect.
    const strict = { PGSSLMODE: 'verify-full' };
    const url = `postgresql://${tlsServer.user}:${encodeURIComponent(tlsServer.password)}@${tlsServer.host}:${tlsServer.port}/sec_app?sslmode=require`;
    const winners: Record<string, string>[] = [
      { ...dbVars(tlsServer, 'DEV_DB_', 'sec_app'), DEV_DB_SSLMODE: 'require' },
      { DEV_DATABASE_URL: url },
    ];
    for (const vars of winners) {
      const result = await backup(vars, strict);
      assert.equal(result.exitCode, 0, result.stderr);
    }
    const refused = await backup(dbVars(tlsServer, 'DEV_DB_', 'sec_app'), strict);
    assert.equal(refused.exitCode, 3, refused.stderr);
    assert.match(refused.stderr, /^✗ Backup failed: TLS root certificate missing$/m);
    assert.match(refused.stderr, /sslmode=verify-full needs the server's CA certificate/);
  });
});

describe("verify-full's name check, libpq's (PostgreSQL 15 fe-secure-common.c, fe-secure-openssl.c)", () => {
  // Host names cannot be resolved here without /etc/hosts, so they are checked here only; IP hosts end to end too.
  // [host, subjectaltname as Node prints it, CN, libpq's answer]
  const cases: [string, string | undefined, string | string[] | undefined, boolean][] = [
    // The three layouts reported, each against libpq's answer.
    ['127.0.0.1', 'IP Address:10.9.9.9', '127.0.0.1', false],
    ['db.example.com', 'DNS:d*.example.com', undefined, false],
    ['db.example.com', 'DNS:*b.example.com', undefined, false],
    ['127.0.0.1', 'DNS:other.example', '127.0.0.1', true],
    // Names: case-insensitive, no trailing-dot folding, a wildcard only as a whole leading "*." for one label.
    ['db.example.com', 'DNS:DB.Example.COM', undefined, true],
    ['db.example.com.', 'DNS:db.example.com', undefined, false],
    ['db.example.com', 'DNS:db.example.com.', undefined, false],
    ['db.example.com', 'DNS:*.EXAMPLE.com', undefined, true],
    ['a.db.example.com', 'DNS:*.example.com', undefined, false],
    ['example.com', 'DNS:*.example.com', undefined, false],
    ['example.com', 'DNS:*.com', undefined, true],
    ['db', 'DNS:*', undefined, false],
    ['db.example.com', 'DNS:*.*.com', undefined, false],
    ['db.example.com', 'DNS:other.example.com, DNS:db.example.com', undefined, true],
    // The CN: only with no SAN of the host's type (dNSName for a name, iPAddress for an IP), the first CN.
    ['db.example.com', undefined, 'db.example.com', true],
    ['db.example.com', undefined, 'DB.example.COM', true],
    ['db.example.com', 'DNS:other.example.com', 'db.example.com', false],
    ['db.example.com', 'IP Address:10.0.0.1', 'db.example.com', true],
    ['db.example.com', 'email:a@b, URI:http://db.example.com', 'db.example.com', true],
    ['db.example.com', undefined, ['other.example.com', 'db.example.com'], false],
    ['db.example.com', undefined, undefined, false],
    ['127.0.0.1', undefined, '127.0.0.1', true],
    ['127.0.0.1', 'IP Address:10.9.9.9', undefined, false],
    // An IP host: iPAddress SANs compared by address, dNSNames still as strings (a wildcard too).
    ['127.0.0.1', 'IP Address:127.0.0.1', undefined, true],
    ['127.0.0.1', 'IP Address:10.9.9.9, IP Address:127.0.0.1', undefined, true],
    ['127.0.0.1', 'DNS:127.0.0.1', undefined, true],
    ['127.0.0.1', 'DNS:*.0.0.1', undefined, true],
    ['127.0.0.1', 'IP Address:0:0:0:0:0:FFFF:7F00:1', '127.0.0.1', false],
    ['127.1', 'IP Address:127.0.0.1', undefined, true],
    ['0x7f.0.0.01', 'IP Address:127.0.0.1', undefined, true],
    ['2130706433', 'IP Address:127.0.0.1', undefined, true],
    ['127.0.0.256', 'IP Address:127.0.0.1', '127.0.0.256', true],
    ['db.example.com', 'IP Address:127.0.0.1', undefined, false],
    // IPv6 in any spelling, by its bytes; a zone makes it a name to libpq (inet_pton refuses it).
    ['::1', 'IP Address:0:0:0:0:0:0:0:1', undefined, true],
    ['0:0::0001', 'IP Address:0:0:0:0:0:0:0:1', undefined, true],
    ['2001:db8::A:1', 'IP Address:2001:DB8:0:0:0:0:A:1', undefined, true],
    ['::ffff:127.0.0.1', 'IP Address:0:0:0:0:0:FFFF:7F00:1', undefined, true],
    ['::2', 'IP Address:0:0:0:0:0:0:0:1', '::2', false],
    ['fe80::1%eth0', 'IP Address:FE80:0:0:0:0:0:0:1', undefined, false],
    ['::1', 'IP Address:127.0.0.1', undefined, false],
    // A name libpq cannot check stops the check there, refused: an embedded NUL, an address of another length.
    ['db.example.com', 'DNS:"db.example.com\\u0000.evil.example", DNS:db.example.com', undefined, false],
    ['db.example.com', undefined, 'db.example.com\0.evil.example', false],
    ['127.0.0.1', 'IP Address:<invalid length=5>, IP Address:127.0.0.1', undefined, false],
    ['127.0.0.1', 'IP Address:127.0.0.1, IP Address:<invalid length=5>', undefined, true],
    // Node quotes an entry with a comma as a JSON string; one that cannot be parsed never matches.
    ['db.example.com', 'DNS:"a\\u002c b.example.com", DNS:db.example.com', undefined, true],
    ['a, b.example.com', 'DNS:"a\\u002c b.example.com"', undefined, true],
    ['db.example.com', 'DNS:"db.example.com', undefined, false],
    ['db.example.com', 'DNS:x, garbage, DNS:db.example.com', 'db.example.com', false],
  ];
  for (const [host, subjectaltname, CN, expected] of cases) {
    test(`${JSON.stringify(host)} against ${JSON.stringify(subjectaltname)}, CN ${JSON.stringify(CN)}: ${expected}`, () => {
      assert.equal(certificateNamesHost(host, { subjectaltname, subject: { CN } }), expected);
    });
  }
});

describe('row-level security', () => {
  test('tables whose rows RLS would hide from the role: exit 4 before anything is written, naming them and the fixes', async () => {
    const admin = await server.connect('sec_app');
    try {
      await admin.query(`
        CREATE ROLE rls_user LOGIN PASSWORD 'rls-pw';
        GRANT CREATE ON SCHEMA public TO rls_user;
        CREATE TABLE shared_notes (id int, owner text);
        INSERT INTO shared_notes VALUES (1, 'a'), (2, 'b');
        ALTER TABLE shared_notes ENABLE ROW LEVEL SECURITY;
        CREATE POLICY only_a ON shared_notes USING (owner = 'a');
        GRANT SELECT ON ALL TABLES IN SCHEMA public TO rls_user;
        SET ROLE rls_user;
        CREATE TABLE own_forced (id int);
        INSERT INTO own_forced VALUES (1), (2), (3);
        ALTER TABLE own_forced ENABLE ROW LEVEL SECURITY;
        ALTER TABLE own_forced FORCE ROW LEVEL SECURITY;
        CREATE POLICY nothing ON own_forced USING (false);
        RESET ROLE;`);
    } finally {
      await admin.end();
    }
    const vars = { ...dbVars(server, 'DEV_DB_', 'sec_app'), DEV_DB_USER: 'rls_user', DEV_DB_PASSWORD: 'rls-pw' };
    const refused = await backup(vars);
    assert.equal(refused.exitCode, 4, refused.stderr);
    assert.match(refused.stderr, /^✗ Backup failed: Row-level security would hide rows from the backup$/m);
    assert.match(
      refused.stderr,
      /role "rls_user" does not bypass row-level security, which applies to it on 2 tables \(forced on 1, which binds the owner too\): public\.own_forced, public\.shared_notes/,
    );
    assert.match(
      refused.stderr,
      /1\. Back up with a role that has BYPASSRLS \(as a superuser: ALTER ROLE "rls_user" BYPASSRLS\)/,
    );
    assert.match(
      refused.stderr,
      /3\. For tables the role owns that FORCE row-level security: ALTER TABLE public\.own_forced NO FORCE ROW LEVEL SECURITY/,
    );
    assert.deepEqual(refused.files, [], 'nothing written');

    const su = await server.connect('sec_app');
    await su.query('ALTER ROLE rls_user BYPASSRLS').finally(() => su.end());
    const allowed = await backup(vars);
    assert.equal(allowed.exitCode, 0, allowed.stderr);
    const metadata = JSON.parse(
      await fs.readFile(
        path.join(
          allowed.configDir,
          'out',
          allowed.files.find((f) => f.endsWith('.metadata.json'))!,
        ),
        'utf8',
      ),
    );
    assert.equal(metadata.table_counts.shared_notes, 2, 'every row counted, none hidden');
    assert.equal(metadata.table_counts.own_forced, 3);
  });
});

describe('search_path', () => {
  test("a function the database's owner plants in public never stands in for a built-in in the tool's queries", async () => {
    // A non-superuser owner: public.format(text, text) matches the tool's format() calls more
    // exactly than the built-in variadic one, so an unguarded search_path would call it.
    const [owner, database, target] = [uniqueName('sp_owner'), uniqueName('sp_app'), uniqueName('sp_restored')];
    await server.createDatabase(database);
    const su = await server.connect(database);
    try {
      await su.query(`
        CREATE ROLE ${owner};
        ALTER DATABASE ${database} OWNER TO ${owner};
        ALTER DATABASE ${database} SET search_path = public, pg_catalog;
        SET ROLE ${owner};
        CREATE TABLE t (x int);
        INSERT INTO t SELECT generate_series(1, 5);
        CREATE TABLE planted_calls (by_role name);
        CREATE FUNCTION public.format(text, text) RETURNS text LANGUAGE plpgsql AS $$
        BEGIN
          BEGIN
            INSERT INTO public.planted_calls VALUES (current_user);
          EXCEPTION WHEN read_only_sql_transaction THEN NULL;
          END;
          RETURN 'SELECT 424242::text AS n';
        END$$;
        RESET ROLE;`);
    } finally {
      await su.end();
    }
    const backedUp = await backup(dbVars(server, 'DEV_DB_', database));
    assert.equal(backedUp.exitCode, 0, backedUp.stderr);
    const dumpName = backedUp.files.find((name) => name.endsWith('.dump'))!;
    const metadataName = backedUp.files.find((name) => name.endsWith('.metadata.json'))!;
    const metadata = JSON.parse(await fs.readFile(path.join(backedUp.configDir, 'out', metadataName), 'utf8'));
    assert.deepEqual(metadata.table_counts, { planted_calls: 0, t: 5 }, 'the true counts, not the forged ones');

    const restored = await runCli({
      args: [
        '--env',
        'dev',
        '--config-dir',
        backedUp.configDir,
        '--restore',
        path.join(backedUp.configDir, 'out', dumpName),
        '--target-db',
        target,
      ],
      env: { HOME: backedUp.configDir },
    });
    assert.equal(restored.exitCode, 0, restored.stdout + restored.stderr);
    for (const name of [database, target]) {
      const client = await server.connect(name);
      try {
        const { rows } = await client.query('SELECT count(*)::int AS n FROM public.planted_calls');
        assert.equal(rows[0].n, 0, `the planted function never ran in ${name}`);
      } finally {
        await client.end();
      }
    }
    await server.dropDatabase(target);
  });
});

describe("database failures get the contract's codes", () => {
  test(
    "the backup's own session terminated: exit 3 'Database connection lost', not 'Backup failed: Backup failed'",
    { timeout: 60_000 },
    async () => {
      const configDir = await tempDir();
      await writeEnvFile(configDir, '.env', dbVars(server, 'DEV_DB_', 'sec_app'));
      const lock = await holdTableLock(() => server.connect('sec_app'), 'secrets_table');
      const cli = startCli({
        args: ['--env', 'dev', '--config-dir', configDir, '--output-dir', path.join(configDir, 'out')],
      });
      try {
        await waitForBlockedPgDump(lock.observer);
        await lock.observer.query(
          "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name ~ '^backup_db:[0-9]+:[0-9a-f]+$'",
        );
      } finally {
        await lock.release();
      }
      const result = await cli;
      assert.equal(result.exitCode, 3, String(result.stderr));
      assert.match(String(result.stderr), /^✗ Backup failed: Database connection lost$/m);
      assert.match(String(result.stderr), /the session was terminated \(pg_terminate_backend\)/);
      assert.deepEqual(await fs.readdir(path.join(configDir, 'out')), [], 'nothing left');
    },
  );

  test('--lock-wait-timeout beyond what PostgreSQL takes is refused when parsed (exit 2)', async () => {
    const result = await runCli({ args: ['--list', '--lock-wait-timeout', '99999999999h'] });
    assert.equal(result.exitCode, 2);
    assert.match(result.stderr, /up to 24 d/);
  });
});
