// Where a browser CPU-path UNet step spends its time: Chromium's sampling profiler (through CDP) around the
// diagnostics page's CPU benchmark (SD 1.5 with widths / NARROW, random weights, SIZE x SIZE, one thread, on
// the page's own thread so that the profiler sees it), self time by wasm function, the top TOP printed. The
// release pkg/ keeps its function names, so the rows name our kernels and gemm's.
//
//   node scripts/bench/profile-web.mjs [SIZE=256] [NARROW=5] [TOP=25]      (after scripts/serve or build_pkg)
//
// A development tool: CI does not run it. Figures are sampled (1 ms), so rows under ~1% are noise.
import { launchBrowser, startServer } from '../../tests/e2e/harness.mjs';

const [size, narrow, top] = [Number(process.argv[2] || 256), Number(process.argv[3] || 5), Number(process.argv[4] || 25)];
const server = await startServer();
const browser = await launchBrowser();
const page = await browser.newPage();
await page.goto(`${server.url}diagnostics.html`);
await page.evaluate(async () => {
  const lib = await import('/pkg/latent_gen.js');
  await lib.default();
  window.benchLib = lib;
});
const cdp = await page.context().newCDPSession(page);
await cdp.send('Profiler.enable');
await cdp.send('Profiler.setSamplingInterval', { interval: 1000 });
const bench = (s, n) => page.evaluate(([s, n]) => window.benchLib.Diagnostics.benchmarkCpu('sd15', s, n, () => {}), [s, n]);
await bench(size, narrow); // warm-up: compiles, grows the heap
await cdp.send('Profiler.start');
const r = await bench(size, narrow);
const { profile } = await cdp.send('Profiler.stop');
await browser.close();
await server.stop();

const byId = new Map(profile.nodes.map((n) => [n.id, n]));
const counts = new Map();
for (const id of profile.samples) {
  const f = byId.get(id).callFrame;
  const name = f.functionName || `(${f.url.split('/').pop() || 'program'})`;
  counts.set(name, (counts.get(name) || 0) + 1);
}
const total = profile.samples.length;
const idle = (counts.get('(idle)') || 0) + (counts.get('(program)') || 0) + (counts.get('(garbage collector)') || 0);
console.log(`${Math.round(r.unet_cfg_step_ms)} ms per step (3 runs; the profile covers them and the weights' making); ${total} samples (${idle} idle/program/gc)`);
for (const [name, c] of [...counts].sort((a, b) => b[1] - a[1]).slice(0, top)) {
  console.log(`${((100 * c) / total).toFixed(1).padStart(5)}%  ${name.length > 110 ? `${name.slice(0, 107)}...` : name}`);
}
