// Static server for the app: www/ at /, pkg/ (the wasm build) at /pkg/. Serves .wasm as application/wasm,
// answers HTTP Range requests (resumable downloads) and never caches, so a rebuilt pkg/ is picked up. Every
// response makes the page cross-origin isolated (COOP + COEP), which the CPU path's wasm threads need
// (SharedArrayBuffer), and may be embedded by other origins (CORP, CORS).
// Usage: node scripts/server.mjs [--port N] [--host H] [--faults]   (PORT and HOST in the environment work too)
//
// --faults (tests only) adds a control endpoint: POST /__faults with JSON
//   { "cut": { "path": "/models/x/unet/weights.safetensors", "after": 1000000 } }  the next response for that
//        path sends `after` bytes of its body, then the connection is destroyed (a dropped download);
//   { "corrupt": { "path": "..." } }  every response for that path has its bytes inverted;
//   { "slow": { "path": "...", "bytesPerSec": N } }  every response for that path is sent at about N bytes/s;
//   { "csp": "script-src 'self' ..." }  every response carries that Content-Security-Policy header;
//   { "reset": true }  clears the faults and the request log;
// and GET /__requests lists the [method, path, range] of every request since the last reset.
import { createServer } from 'node:http';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { extname, join, normalize, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(fileURLToPath(import.meta.url), '..', '..');
const mounts = [['/pkg/', join(root, 'pkg')], ['/', join(root, 'www')]];
// --mount /prefix/=DIR serves another folder (the large-model tests' generated models), before the rest.
for (let i = 0; i < process.argv.length; i++) {
  if (process.argv[i] !== '--mount') continue;
  const [prefix, dir] = process.argv[i + 1].split('=');
  mounts.unshift([prefix, resolve(dir)]);
}

const types = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.wasm': 'application/wasm',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.txt': 'text/plain; charset=utf-8',
  '.md': 'text/markdown; charset=utf-8',
  '.safetensors': 'application/octet-stream',
  '.gguf': 'application/octet-stream',
};

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : (process.env[name.toUpperCase()] || fallback);
}

/** Maps a URL path to a file under one of the mounts, refusing anything that escapes it. */
function resolvePath(urlPath) {
  let path;
  try {
    path = decodeURIComponent(urlPath);
  } catch {
    return null;
  }
  for (const [prefix, dir] of mounts) {
    if (!path.startsWith(prefix)) continue;
    const file = normalize(join(dir, path.slice(prefix.length)));
    if (file !== dir && !file.startsWith(dir + sep)) return null;
    return file;
  }
  return null;
}

const faultsEnabled = process.argv.includes('--faults');
let faults = { cut: new Map(), corrupt: new Set(), slow: new Map(), csp: null };
let requests = [];

async function control(req, res, url) {
  if (url.pathname === '/__requests') return send(res, 200, JSON.stringify(requests), 'application/json');
  let body = '';
  for await (const chunk of req) body += chunk;
  const f = JSON.parse(body || '{}');
  if (f.reset) {
    faults = { cut: new Map(), corrupt: new Set(), slow: new Map(), csp: null };
    requests = [];
  }
  if (f.csp) faults.csp = f.csp;
  if (f.cut) faults.cut.set(f.cut.path, f.cut.after);
  if (f.corrupt) faults.corrupt.add(f.corrupt.path);
  if (f.slow) faults.slow.set(f.slow.path, f.slow.bytesPerSec);
  return send(res, 200, 'ok');
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://localhost');
  if (faultsEnabled && url.pathname.startsWith('/__')) return control(req, res, url);
  if (faultsEnabled) requests.push([req.method, url.pathname, req.headers.range || null, req.headers.origin || null]);
  if (req.method === 'OPTIONS') {
    res.writeHead(204, { 'Access-Control-Allow-Origin': '*', 'Access-Control-Allow-Methods': 'GET, HEAD',
      'Access-Control-Allow-Headers': 'Range', 'Access-Control-Max-Age': '600' });
    return res.end();
  }
  let file = resolvePath(url.pathname);
  if (!file) return send(res, 403, 'forbidden');
  let info = await stat(file).catch(() => null);
  if (info?.isDirectory()) {
    file = join(file, 'index.html');
    info = await stat(file).catch(() => null);
  }
  if (!info?.isFile()) return send(res, 404, `not found: ${url.pathname}`);
  const headers = {
    'Content-Type': types[extname(file)] || 'application/octet-stream',
    'Cache-Control': 'no-store',
    'Accept-Ranges': 'bytes',
    'Cross-Origin-Opener-Policy': 'same-origin',
    'Cross-Origin-Embedder-Policy': 'require-corp',
    'Cross-Origin-Resource-Policy': 'cross-origin',
    // Sites may embed the element from here (script, worker module, wasm, catalog and weights by CORS).
    'Access-Control-Allow-Origin': '*',
  };
  if (faults.csp) headers['Content-Security-Policy'] = faults.csp;
  const range = /^bytes=(\d*)-(\d*)$/.exec(req.headers.range || '');
  let start = 0;
  let end = info.size - 1;
  let status = 200;
  if (range) {
    if (range[1] === '') {
      start = Math.max(0, info.size - Number(range[2]));
    } else {
      start = Number(range[1]);
      if (range[2] !== '') end = Math.min(end, Number(range[2]));
    }
    if (start > end || start >= info.size) {
      res.writeHead(416, { ...headers, 'Content-Range': `bytes */${info.size}` });
      return res.end();
    }
    status = 206;
    headers['Content-Range'] = `bytes ${start}-${end}/${info.size}`;
  }
  headers['Content-Length'] = end - start + 1;
  res.writeHead(status, headers);
  if (req.method === 'HEAD') return res.end();
  const stream = createReadStream(file, { start, end });
  if (!faultsEnabled) return stream.pipe(res);
  const cutAfter = faults.cut.get(url.pathname);
  faults.cut.delete(url.pathname);
  const corrupt = faults.corrupt.has(url.pathname);
  const rate = faults.slow.get(url.pathname);
  let sent = 0;
  for await (let chunk of stream) {
    if (corrupt) chunk = Buffer.from(chunk.map((b) => 255 - b));
    if (cutAfter != null && sent + chunk.length >= cutAfter) {
      res.write(chunk.subarray(0, cutAfter - sent));
      await new Promise((r) => setTimeout(r, 200));
      return res.destroy();
    }
    sent += chunk.length;
    if (!res.write(chunk)) await new Promise((r) => res.once('drain', r));
    if (rate) await new Promise((r) => setTimeout(r, (1000 * chunk.length) / rate));
    if (res.destroyed) return; // the client went away (a cancelled download)
  }
  res.end();
}

function send(res, status, text, type = 'text/plain; charset=utf-8') {
  res.writeHead(status, { 'Content-Type': type });
  res.end(text);
}

const port = Number(arg('port', 8080));
const host = arg('host', '127.0.0.1');
const server = createServer((req, res) => {
  handle(req, res).catch((e) => {
    console.error(e);
    if (!res.headersSent) send(res, 500, String(e));
    else res.destroy();
  });
});
server.on('error', (e) => {
  console.error(e.code === 'EADDRINUSE' ? `port ${port} is in use: pass --port N` : e.message);
  process.exit(1);
});
server.listen(port, host, () => {
  console.log(`latent-gen is being served at http://${host}:${server.address().port}/`);
});
