/**
 * A TCP proxy in front of a test server that can stop answering at a chosen moment, the way a
 * frozen server (SIGSTOP, a VM paused) or a dead network does: while frozen it accepts new
 * connections but forwards nothing, in either direction, and closes nothing; thawed, it passes on
 * what it held back, in order.
 */
import net from 'node:net';

export interface FreezableProxy {
  host: string;
  port: number;
  /** Connections accepted so far. */
  readonly connections: number;
  readonly frozen: boolean;
  freeze(): void;
  /** Freeze as soon as a client sends `text` (a query of the tool's, say), holding that query back too. */
  freezeOn(text: string): void;
  thaw(): void;
  /** Drop every connection and stop listening. */
  close(): Promise<void>;
}

export async function startProxy(target: { host: string; port: number }): Promise<FreezableProxy> {
  let frozen = false;
  let connections = 0;
  let trigger: string | undefined;
  const held: Array<() => void> = [];
  const sockets = new Set<net.Socket>();
  const whenThawed = (action: () => void) => (frozen ? held.push(action) : action());
  // Half-open allowed: a frozen server does not answer a client's FIN with its own.
  const server = net.createServer({ allowHalfOpen: true }, (client) => {
    connections++;
    const upstream = net.connect({ port: target.port, host: target.host, allowHalfOpen: true });
    for (const [from, to] of [
      [client, upstream],
      [upstream, client],
    ] as const) {
      sockets.add(from);
      from.on('data', (chunk: Buffer) => {
        if (from === client && trigger !== undefined && chunk.includes(trigger)) [frozen, trigger] = [true, undefined];
        whenThawed(() => to.write(chunk));
      });
      from.on('end', () => whenThawed(() => to.end()));
      from.on('error', () => whenThawed(() => to.destroy()));
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    host: '127.0.0.1',
    port: (server.address() as net.AddressInfo).port,
    get connections() {
      return connections;
    },
    get frozen() {
      return frozen;
    },
    freeze: () => void (frozen = true),
    freezeOn: (text) => void (trigger = text),
    thaw() {
      frozen = false;
      held.splice(0).forEach((action) => action());
    },
    async close() {
      sockets.forEach((socket) => socket.destroy());
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

export interface GatingProxy {
  host: string;
  port: number;
  /** Client messages held back so far and not yet released. */
  readonly held: number;
  /** Let the oldest held message (and what its connection sent after it) through. */
  release(): void;
  /** Let every held message through, and hold no more. */
  open(): void;
  close(): Promise<void>;
}

/**
 * A TCP proxy in front of a test server that holds back every client message holding `text` (one of
 * the tool's own queries, say), until the test releases it: a query that takes exactly as long as
 * the test wants. What a connection sends after a held message waits behind it, in order.
 */
export async function startGatingProxy(target: { host: string; port: number }, text: string): Promise<GatingProxy> {
  const gates: Array<() => void> = [];
  const sockets = new Set<net.Socket>();
  let holding = true;
  const server = net.createServer((client) => {
    const upstream = net.connect({ port: target.port, host: target.host });
    let queue: Buffer[] | undefined; // while a message of this connection is held
    const flush = () => {
      const pending = queue ?? [];
      queue = undefined;
      for (const chunk of pending) send(chunk);
    };
    const send = (chunk: Buffer) => {
      if (queue) return void queue.push(chunk);
      if (!holding || !chunk.includes(text)) return void upstream.write(chunk);
      queue = [];
      gates.push(() => {
        upstream.write(chunk);
        flush();
      });
    };
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on('error', () => [client, upstream].forEach((s) => s.destroy()));
      socket.on('close', () => [client, upstream].forEach((s) => s.destroy()));
    }
    client.on('data', send);
    upstream.on('data', (chunk: Buffer) => client.write(chunk));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    host: '127.0.0.1',
    port: (server.address() as net.AddressInfo).port,
    get held() {
      return gates.length;
    },
    release: () => gates.shift()?.(),
    open() {
      holding = false;
      gates.splice(0).forEach((release) => release());
    },
    async close() {
      sockets.forEach((socket) => socket.destroy());
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** What PgBouncer accepts in a startup packet by default; any other parameter is refused. */
const POOLER_PARAMETERS = new Set([
  'user',
  'database',
  'application_name',
  'client_encoding',
  'datestyle',
  'timezone',
  'standard_conforming_strings',
]);
const SSL_REQUEST = 80877103;
const GSSENC_REQUEST = 80877104;

/**
 * A front to a test server that, like PgBouncer in its default configuration, refuses a startup packet
 * carrying any other parameter (`unsupported startup parameter: options`), and answers a TLS or GSS
 * request with 'N', as a pooler without TLS does. Past the startup packet, it passes bytes through.
 */
export async function startStrictPooler(target: { host: string; port: number }) {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    sockets.add(client);
    let buffered = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      while (buffered.length >= 8 && [SSL_REQUEST, GSSENC_REQUEST].includes(buffered.readInt32BE(4))) {
        buffered = buffered.subarray(8);
        client.write('N');
      }
      if (buffered.length < 8 || buffered.length < buffered.readInt32BE(0)) return;
      client.off('data', onData);
      const fields = buffered.subarray(8, buffered.readInt32BE(0)).toString('utf8').split('\0');
      const refused = fields
        .filter((_, i) => i % 2 === 0)
        .find((name) => name && !POOLER_PARAMETERS.has(name.toLowerCase()));
      if (refused) return void client.end(fatalMessage(`unsupported startup parameter: ${refused}`));
      const upstream = net.connect({ port: target.port, host: target.host });
      sockets.add(upstream);
      upstream.write(buffered);
      client.pipe(upstream).on('error', () => client.destroy());
      upstream.pipe(client).on('error', () => upstream.destroy());
    };
    client.on('data', onData);
    client.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    host: '127.0.0.1',
    port: (server.address() as net.AddressInfo).port,
    async close() {
      sockets.forEach((socket) => socket.destroy());
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** A FATAL ErrorResponse of the PostgreSQL protocol. */
function fatalMessage(message: string): Buffer {
  const body = Buffer.from(`SFATAL\0VFATAL\0C08P01\0M${message}\0\0`, 'utf8');
  const header = Buffer.alloc(5);
  header.write('E', 0);
  header.writeInt32BE(body.length + 4, 1);
  return Buffer.concat([header, body]);
}
