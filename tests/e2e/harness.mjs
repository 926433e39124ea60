// Shared by the end-to-end tests: starts scripts/server.mjs on a free port and launches Debian's Chromium
// (through playwright-core, never a downloaded browser) with WebGPU on SwiftShader.
import { spawn } from 'node:child_process';
import { after, before } from 'node:test';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { resolve } from 'node:path';
import { chromium } from 'playwright-core';

export const root = resolve(fileURLToPath(import.meta.url), '..', '..', '..');

/** Starts the app's server; resolves to { url, stop }. */
export async function startServer(extraArgs = []) {
  const proc = spawn(process.execPath, [resolve(root, 'scripts/server.mjs'), '--port', '0', '--faults', ...extraArgs], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  for await (const chunk of proc.stdout) {
    out += chunk;
    const m = /served at (http:\/\/\S+)/.exec(out);
    if (m) {
      const url = m[1];
      const faults = async (body) => {
        const res = await fetch(`${url}__faults`, { method: 'POST', body: JSON.stringify(body) });
        if (!res.ok) throw new Error(`faults: ${res.status}`);
      };
      const requests = async () => (await fetch(`${url}__requests`)).json();
      return { url, faults, requests, stop: async () => { proc.kill(); await once(proc, 'exit').catch(() => {}); } };
    }
  }
  throw new Error(`the server exited without printing its address: ${out}`);
}

const FLAGS = [
  '--no-sandbox',
  '--enable-unsafe-webgpu',
  '--enable-features=Vulkan',
  '--disable-quic',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--disable-dev-shm-usage',
];

/** Headless Chromium with WebGPU compute on SwiftShader. */
export async function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: FLAGS,
  });
}

/** Chromium with a profile on disk at `dir` (storage as a user's browser keeps it), WebGPU on SwiftShader. */
export async function launchPersistent(dir) {
  return chromium.launchPersistentContext(dir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: FLAGS,
  });
}

/** Registers this test file's before/after hooks: one server and one browser for all its tests, stopped at the
 * end. Resolves nothing itself: the returned object's `server` and `browser` are set once `before` has run. */
export function serverAndBrowser() {
  const env = { server: null, browser: null };
  before(async () => {
    // The fixture models (SD-family, TAESD) under /fixtures/, for tests that need SD's latent space.
    // A site that embeds the element from another origin under /embedder/ (tests/e2e/embedder).
    env.server = await startServer(['--mount', `/fixtures/=${resolve(root, 'tests/fixtures/models')}`,
      '--mount', `/embedder/=${resolve(root, 'tests/e2e/embedder')}`]);
    env.browser = await launchBrowser();
  });
  after(async () => {
    await env.browser?.close();
    await env.server?.stop();
  });
  return env;
}

/** Collects the page's console errors and uncaught exceptions, for failure messages. */
export function recordErrors(page) {
  const errors = [];
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(`console: ${m.text()}`); });
  return errors;
}
