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
