// Shared by the serve tests (serve_e2e.mjs, load.mjs): starts `shardlm serve` on 127.0.0.1 with --port 0 (the
// server picks a free port and prints it) and resolves once it prints "listening on".
import { spawn } from 'node:child_process';

// Returns { proc, base, exited, stderr }: the process, its base URL, a promise of { code, signal } when it
// exits, and (a getter of) everything it wrote to stderr so far. Rejects when it exits before listening.
export async function startServer(bin, args) {
  const proc = spawn(bin, ['serve', '--host', '127.0.0.1', '--port', '0', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '', stderr = '';
  proc.stderr.on('data', (d) => { stderr += d; });
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  const port = await new Promise((resolve, reject) => {
    proc.stdout.on('data', (d) => {
      stdout += d;
      const m = stdout.match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
      if (m) resolve(Number(m[1]));
    });
    exited.then(({ code }) => reject(new Error(`the server exited (${code}) before listening:\n${stderr}`)));
  });
  return { proc, base: `http://127.0.0.1:${port}`, exited, get stderr() { return stderr; } };
}
