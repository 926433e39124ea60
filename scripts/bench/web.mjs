// Our CPU path beside onnxruntime-web's wasm backend in the same headless Chromium, on the same UNet
// (scripts/bench/export_unet_onnx.py exports the one `bench unet --narrow N` builds), at 1 and at all cores'
// threads: run by scripts/bench-web, which prepares DIR (the ONNX file, onnxruntime-web under node_modules).
//
//   node scripts/bench/web.mjs DIR SIZE NARROW RUNS
//
// Ours: the diagnostics page's "Benchmark SD 1.5 on the CPU path" (a model worker; ?threads=1 for one thread),
// RUNS clicks after a first one. onnxruntime-web: an InferenceSession on the 'wasm' provider with
// env.wasm.numThreads, a warm-up run, then RUNS timed runs, in turns with ours. Prints a markdown table and
// writes DIR/web.json.
// OURS_ONLY=1 times ours alone (two builds compared in a few minutes).
import { writeFile } from 'node:fs/promises';
import { cpus } from 'node:os';
import { join, resolve } from 'node:path';
import { launchBrowser, startServer } from '../../tests/e2e/harness.mjs';

const [dir, size, narrow, runs] = [resolve(process.argv[2]), Number(process.argv[3]), Number(process.argv[4]),
  Number(process.argv[5] || 3)];
const server = await startServer(['--mount', `/bench-web/=${dir}`]);
const browser = await launchBrowser();
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

// Both are opened and warmed up first, then timed in turns (ours, theirs, ours, ...), so that a machine whose
// speed wanders between runs shifts both alike.
async function openOurs(threads) {
  const page = await browser.newPage();
  await page.addInitScript(() => { delete Object.getPrototypeOf(navigator).gpu; });
  await page.goto(`${server.url}diagnostics.html?bench-size=${size}&bench-narrow=${narrow}&threads=${threads}`);
  await page.locator('#summary[data-state="no-webgpu"]').waitFor({ timeout: 60_000 });
  let status = '';
  const run = async () => {
    await page.locator('#bench-cpu:not([disabled])').click({ timeout: 600_000 });
    await page.locator('#bench-status[data-state="done"], #bench-status[data-state="error"]').waitFor({ timeout: 600_000 });
    status = await page.locator('#bench-status').textContent();
    if (!/ms per step/.test(status)) throw new Error(status);
    await page.evaluate(() => { document.getElementById('bench-status').dataset.state = 'running'; });
    return Number(await page.locator('tr.bench-row .bench-ms').last().textContent());
  };
  await run();
  const device = await page.locator('tr.bench-row .bench-device').last().textContent();
  return { run, device, status: () => status, close: () => page.close() };
}

async function openOrt(threads) {
  const page = await browser.newPage();
  await page.goto(`${server.url}bench-web/blank.html`);
  const info = await page.evaluate(async ({ threads, size }) => {
    const ort = await import('/bench-web/node_modules/onnxruntime-web/dist/ort.wasm.min.mjs');
    ort.env.wasm.numThreads = threads;
    ort.env.wasm.wasmPaths = '/bench-web/node_modules/onnxruntime-web/dist/';
    const session = await ort.InferenceSession.create('/bench-web/unet.onnx', { executionProviders: ['wasm'] });
    const lat = size / 8;
    const rand = (n) => Float32Array.from({ length: n }, () => Math.random() * 2 - 1);
    const feeds = {
      sample: new ort.Tensor('float32', rand(2 * 4 * lat * lat), [2, 4, lat, lat]),
      timestep: new ort.Tensor('float32', Float32Array.from([500, 500]), [2]),
      context: new ort.Tensor('float32', rand(2 * 77 * 768), [2, 77, 768]),
    };
    window.benchRun = async () => {
      const t = performance.now();
      await session.run(feeds);
      return performance.now() - t;
    };
    await window.benchRun();
    return { isolated: self.crossOriginIsolated, version: ort.env.versions?.web || '?' };
  }, { threads, size });
  return { run: () => page.evaluate(() => window.benchRun()), ...info, close: () => page.close() };
}

const cores = cpus().length;
const rows = [];
for (const threads of [1, cores]) {
  const o = await openOurs(threads);
  const x = process.env.OURS_ONLY ? null : await openOrt(threads);
  const [oms, xms] = [[], []];
  for (let i = 0; i < runs; i++) {
    oms.push(await o.run());
    if (x) xms.push(await x.run());
  }
  console.log(`ours, ${threads} thread(s): ${o.status()}`);
  rows.push({ impl: 'latent-gen CPU path', threads, ms: oms, note: o.device });
  if (x) rows.push({ impl: `onnxruntime-web ${x.version} (wasm)`, threads, ms: xms, note: x.isolated ? 'cross-origin isolated' : 'NOT isolated' });
  await o.close();
  await x?.close();
}
await browser.close();
await server.stop();
const chromium = (await import('node:child_process')).execFileSync(process.env.CHROMIUM || '/usr/bin/chromium', ['--version']).toString().trim();
const out = { date: new Date().toISOString(), machine: `${cpus()[0].model}, ${cores} cores`, browser: chromium, size, narrow, rows };
await writeFile(join(dir, 'web.json'), JSON.stringify(out, null, 2));
console.log(`\n${out.machine}; ${chromium}; SD 1.5 UNet (widths / ${narrow}) CFG step at ${size}x${size}, f32\n`);
console.log('| implementation | threads | ms per step (median) | runs |');
console.log('|---|---|---|---|');
for (const r of rows) console.log(`| ${r.impl} | ${r.threads} | ${median(r.ms).toFixed(0)} | ${r.ms.map((m) => m.toFixed(0)).join(', ')} |`);
