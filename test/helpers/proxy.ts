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
