/**
 * Fetch an upstream source tarball through Debian: from the mirror this machine's apt is already
 * configured with (never a host written here), via a suite's signed source index, so apt checks
 * the index's signature and the files' hashes. Mirrors lag: a suite's index can name a version
 * the mirror's pool does not hold yet. Then the pinned version is fetched from the same pool and
 * checked against a SHA-256 read from its Debian-signed .dsc (checked with debian-keyring once,
 * when the pin was written).
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa } from 'execa';

export interface AptSource {
  types: string[];
  uris: string[];
  suites: string[];
  components: string[];
}

/** Pure: the entries of a one-line sources.list (`deb [options] uri suite components…`). */
export function parseOneLineSources(text: string): AptSource[] {
  const sources: AptSource[] = [];
  for (const raw of text.split('\n')) {
    const line = raw
      .replace(/#.*/, '')
      .replace(/\[[^\]]*\]/, ' ')
      .trim();
    const [type, uri, suite, ...components] = line.split(/\s+/);
    if ((type === 'deb' || type === 'deb-src') && uri && suite)
      sources.push({ types: [type], uris: [uri], suites: [suite], components });
  }
  return sources;
}

/** Pure: the stanzas of a deb822 `.sources` file (Types, URIs, Suites, Components; Enabled: no skipped). */
export function parseDeb822Sources(text: string): AptSource[] {
  const sources: AptSource[] = [];
  for (const stanza of text.split(/\n\s*\n/)) {
    const fields = new Map<string, string>();
    let last = '';
    for (const line of stanza.split('\n')) {
      if (line.startsWith('#')) continue;
      if (/^\s/.test(line) && last) fields.set(last, `${fields.get(last)} ${line.trim()}`);
      const match = /^([\w-]+):\s*(.*)$/.exec(line);
      if (match) fields.set((last = match[1]!.toLowerCase()), match[2]!);
    }
    const list = (name: string) => (fields.get(name) ?? '').split(/\s+/).filter(Boolean);
    if (fields.get('enabled')?.trim().toLowerCase() === 'no') continue;
    if (list('types').length && list('uris').length) {
      sources.push({
        types: list('types'),
        uris: list('uris'),
        suites: list('suites'),
        components: list('components'),
      });
    }
  }
  return sources;
}

/** Pure: the mirror serving Debian's main archive for `codename` (not its security archive). */
export function debianMirrorIn(sources: AptSource[], codename: string): string | undefined {
  const main = sources.find((s) => s.suites.includes(codename) && s.components.includes('main'));
  return main?.uris[0]?.replace(/\/+$/, '');
}

/** This machine's Debian mirror, from /etc/apt/sources.list and sources.list.d. */
export async function debianMirror(): Promise<string> {
  const osRelease = await fs.readFile('/etc/os-release', 'utf8').catch(() => '');
  const codename = /^VERSION_CODENAME=(\S+)$/m.exec(osRelease)?.[1];
  if (!codename || !/^ID=debian$/m.test(osRelease))
    throw new Error('this is not a Debian machine (/etc/os-release); the test set-up fetches Debian source packages');
  const files = [
    '/etc/apt/sources.list',
    ...(await fs.readdir('/etc/apt/sources.list.d').catch(() => [] as string[])).map(
      (name) => `/etc/apt/sources.list.d/${name}`,
    ),
  ];
  const sources: AptSource[] = [];
  for (const file of files) {
    const text = await fs.readFile(file, 'utf8').catch(() => '');
    if (file.endsWith('.sources')) sources.push(...parseDeb822Sources(text));
    else if (file.endsWith('.list')) sources.push(...parseOneLineSources(text));
  }
  const mirror = debianMirrorIn(sources, codename);
  if (!mirror) throw new Error(`no Debian mirror for ${codename} main in /etc/apt/sources.list{,.d}`);
  return mirror;
}

export interface PinnedSource {
  /** Path of the tarball in the pool, e.g. main/p/postgresql-17/postgresql-17_17.11.orig.tar.bz2 */
  poolPath: string;
  sha256: string;
}

export interface SourceRequest {
  /** Debian source package, e.g. postgresql-17. */
  package: string;
  /** The suite whose signed index names the version, e.g. trixie. */
  suite: string;
  pinned: PinnedSource;
}

const apt = (dir: string) =>
  [
    `Dir::Etc::SourceList=${path.join(dir, 'sources.list')}`,
    'Dir::Etc::SourceParts=/nonexistent',
    `Dir::State::Lists=${path.join(dir, 'lists')}`,
    `Dir::Cache=${path.join(dir, 'cache')}`,
    'Debug::NoLocking=1',
    'APT::Sandbox::User=root',
  ].flatMap((option) => ['-o', option]);

/** The upstream tarball of `request` in `work`: the suite's current one if the pool has it, else the pin. */
export async function fetchUpstreamTarball(
  request: SourceRequest,
  work: string,
  log: (line: string) => void,
): Promise<string> {
  const mirror = await debianMirror();
  const aptDir = path.join(work, 'apt');
  await fs.mkdir(path.join(aptDir, 'lists', 'partial'), { recursive: true });
  await fs.mkdir(path.join(aptDir, 'cache', 'archives', 'partial'), { recursive: true });
  await fs.writeFile(path.join(aptDir, 'sources.list'), `deb-src ${mirror} ${request.suite} main\n`);
  log(`fetching Debian's ${request.package} source (${request.suite}) from ${mirror}`);
  await execa('apt-get', [...apt(aptDir), 'update'], { stdout: 'ignore' });
  const fetched = await execa('apt-get', [...apt(aptDir), 'source', '--download-only', request.package], {
    cwd: work,
    stdout: 'ignore',
    reject: false,
  });
  const tarball = (await fs.readdir(work)).find((name) => /\.orig\.tar\.(bz2|gz|xz)$/.test(name));
  if (fetched.exitCode === 0 && tarball) return path.join(work, tarball);

  const missing = / 404 /.test(String(fetched.stderr));
  if (!missing) throw new Error(`apt-get source ${request.package} failed:\n${String(fetched.stderr)}`);
  const name = path.basename(request.pinned.poolPath);
  log(`the mirror's pool lacks ${request.suite}'s current ${request.package}; using the pinned ${name}`);
  const response = await fetch(`${mirror}/pool/${request.pinned.poolPath}`);
  if (!response.ok) throw new Error(`${mirror}/pool/${request.pinned.poolPath}: HTTP ${response.status}`);
  const bytes = Buffer.from(await response.arrayBuffer());
  const sha256 = createHash('sha256').update(bytes).digest('hex');
  if (sha256 !== request.pinned.sha256)
    throw new Error(`${name} has SHA-256 ${sha256}, not the pinned ${request.pinned.sha256}`);
  await fs.writeFile(path.join(work, name), bytes);
  return path.join(work, name);
}

/** Unpack a tarball in its directory; returns the top directory it created. */
export async function unpack(tarball: string): Promise<string> {
  const dir = path.dirname(tarball);
  const before = new Set(await fs.readdir(dir));
  await execa('tar', ['-xf', tarball], { cwd: dir });
  const created = (await fs.readdir(dir)).filter((name) => !before.has(name));
  if (created.length !== 1) throw new Error(`${path.basename(tarball)} unpacked into ${created.length} entries`);
  return path.join(dir, created[0]!);
}

/**
 * Fetch a pinned Debian source into a temp directory, unpack it, run `build` in it, and remove the
 * temp directory whatever happens.
 */
export async function buildFromSource(
  request: SourceRequest,
  log: (line: string) => void,
  build: (source: string) => Promise<void>,
): Promise<void> {
  const work = await fs.mkdtemp(path.join(os.tmpdir(), `${request.package}-build-`));
  try {
    await build(await unpack(await fetchUpstreamTarball(request, work, log)));
  } finally {
    await fs.rm(work, { recursive: true, force: true });
  }
}
