// Real-size models in the browser (run by `scripts/test --large`, not by the default suite: it writes 2 GB of
// random weights and runs an SD 1.5 UNet on SwiftShader). For each case, in a fresh browser context: the model
// is served by the test server as a catalog model, downloaded into IndexedDB with progress, loaded at q4_0 into
// WebGPU and generates one 64x64 step. Records bytes stored, peak wasm memory, GPU bytes, load time (printed
// and written to target/large-models/report.json) and asserts wasm memory stays under 256 MiB.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { existsSync, statSync, readdirSync, writeFileSync } from 'node:fs';
import { join, resolve, relative } from 'node:path';
import { after, before } from 'node:test';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { launchPersistent, recordErrors, root, startServer } from './harness.mjs';

const run = promisify(execFile);
const dir = resolve(root, 'target/large-models');
const bin = resolve(root, 'target/debug/latent-gen');
const WASM_LIMIT = 256 * 2 ** 20;

/** Every file under `d`, relative, with its size. */
function listFiles(d) {
  const out = [];
  const walk = (p) => {
    for (const e of readdirSync(p, { withFileTypes: true })) {
      const full = join(p, e.name);
      if (e.isDirectory()) walk(full);
      else out.push({ path: relative(d, full), size: statSync(full).size });
    }
  };
  walk(d);
  return out.sort((a, b) => a.path.localeCompare(b.path));
}

/** Writes the random SD 1.5 folder and its q4_0 GGUF unless they exist. */
async function ensureModels() {
  if (!existsSync(bin)) await run('cargo', ['build', '--bin', 'latent-gen'], { cwd: root });
  const opts = { cwd: root, maxBuffer: 1 << 24 };
  if (!existsSync(join(dir, 'sd15/unet/diffusion_pytorch_model.safetensors'))) {
    await run(bin, ['bench', 'write-model', '--arch', 'sd15', '--out', join(dir, 'sd15')], opts);
  }
  if (!existsSync(join(dir, 'gguf/sd15-q4_0.gguf'))) {
    await run(bin, ['convert', '--model', join(dir, 'sd15'), '--weights', 'q4_0', '--quantize-convs',
      '--out', join(dir, 'gguf/sd15-q4_0.gguf')], opts);
  }
}

const env = {};
before(async () => {
  await ensureModels();
  env.server = await startServer(['--mount', `/large/=${dir}`]);
});
after(async () => {
  await env.server?.stop();
});

const report = [];
after(() => {
  writeFileSync(join(dir, 'report.json'), JSON.stringify(report, null, 2));
});

const cases = [
  { id: 'large-sd15-gguf', what: 'SD 1.5 q4_0 GGUF (latent-gen convert --quantize-convs)', folder: 'gguf' },
  { id: 'large-sd15-f16', what: 'SD 1.5 f16 diffusers folder, quantized to q4_0 while loading', folder: 'sd15' },
  { id: 'large-sd15-keep-q4_0', what: 'SD 1.5 f16 diffusers folder, kept as q4_0 (converted once in the cache)', folder: 'sd15', keep: 'q4_0' },
];

for (const c of cases) {
  test(`real size in the browser: ${c.what}`, { timeout: 3_600_000 }, async () => {
    const files = listFiles(join(dir, c.folder));
    const model = { id: c.id, name: c.what, base: `/large/${c.folder}/`, weights: 'q4_0', files, keep: c.keep,
      defaults: { steps: 1, guidance: 1, width: 64, height: 64 } };
    // A profile on disk, as a user's: an incognito context keeps OPFS in memory under a small quota.
    const profile = mkdtempSync(join(tmpdir(), 'latent-gen-profile-'));
    const context = await launchPersistent(profile);
    const page = await context.newPage();
    const errors = recordErrors(page);
    // ?gpu: WebGPU on SwiftShader, a software adapter the page would otherwise leave for the CPU path.
    await page.goto(`${env.server.url}index.html?gpu`);
    const t0 = Date.now();
    const result = await page.evaluate(async (m) => {
      const { client } = await import('./client.js');
      const { listFiles: cached } = await import('./cache.js');
      const cl = client();
      const progress = { download: 0, load: 0 };
      let convertStart = null;
      let convertSeconds = null;
      const onProgress = (ev) => {
        progress[ev.phase] = (progress[ev.phase] || 0) + 1;
        if (ev.phase === 'convert') convertStart ??= performance.now();
        if (ev.phase === 'load' && convertStart != null) convertSeconds = (performance.now() - convertStart) / 1000;
      };
      const t = performance.now();
      const info = await cl.load(m, onProgress);
      const loadWall = (performance.now() - t) / 1000;
      const img = await cl.generate(m, { prompt: 'a photograph of an astronaut riding a horse', seed: 1, steps: 1,
        guidance: 1, width: 64, height: 64 }, () => {}, onProgress);
      const stored = ((await cached()).get(m.id) || []).reduce((s, f) => s + f.size, 0);
      let sum = 0;
      for (let i = 0; i < img.rgba.length; i += 4) sum += img.rgba[i] + img.rgba[i + 1] + img.rgba[i + 2];
      return { info: { ...info, model: undefined }, loadWall, stored, progress, convertSeconds, image: { width: img.width, mean: sum / (img.rgba.length * 0.75) } };
    }, model).catch((e) => { throw new Error(`${e.message}\n${errors.join('\n')}`); });
    const r = {
      case: c.what,
      downloadedBytes: files.reduce((s, f) => s + f.size, 0),
      storedBytes: result.stored,
      convertSeconds: result.convertSeconds,
      wasmMemoryBytes: result.info.wasmBytes,
      gpuBytes: result.info.gpuBytes,
      gpuPeakBytes: result.info.gpuPeakBytes,
      loadSeconds: result.info.loadSeconds,
      downloadAndLoadSeconds: result.loadWall,
      totalSeconds: (Date.now() - t0) / 1000,
      progressEvents: result.progress,
      image: result.image,
    };
    report.push(r);
    console.log(JSON.stringify(r));
    assert.equal(result.image.width, 64);
    assert.ok(result.progress.download > 0, 'download progress was reported');
    if (c.keep) {
      assert.ok(result.progress.convert > 0, 'conversion progress was reported');
      assert.equal(result.info.stored, c.keep);
      assert.ok(r.storedBytes <= 0.8e9, `stored ${r.storedBytes} bytes as ${c.keep}`);
    } else {
      assert.equal(r.storedBytes, r.downloadedBytes, 'every byte is in the cache');
    }
    assert.ok(r.wasmMemoryBytes <= WASM_LIMIT, `wasm memory ${r.wasmMemoryBytes} > ${WASM_LIMIT}`);
    assert.ok(r.gpuBytes > 400e6, `the weights are on the GPU (${r.gpuBytes} bytes)`);
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  });
}
