// The generator page, the weight cache and the <latent-gen> element in Chromium (WebGPU on SwiftShader),
// with the bundled tiny-shapes model served by scripts/server.mjs (which can cut or corrupt a download).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { readFile, mkdtemp } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { recordErrors, root, serverAndBrowser } from './harness.mjs';
import { describe } from '../../scripts/update-catalog.mjs';

const run = promisify(execFile);
const MODEL = 'tiny-shapes';
const WEIGHTS = `/models/${MODEL}/unet/diffusion_pytorch_model.safetensors`;
// 8 steps: the tiny model draws the scene from 6 on (SwiftShader's WebGPU takes ~2 s a step).
const REQUEST = { prompt: 'a large red square on a green background in the center', seed: 7, steps: 8, guidance: 5 };

const env = serverAndBrowser();

/** Opens the generator in `context` and waits until it is ready. */
async function openApp(context, query = '') {
  const page = await context.newPage();
  const errors = recordErrors(page);
  await page.goto(`${env.server.url}index.html${query}`);
  await page.locator('#status[data-state="idle"], #status[data-state="error"]').waitFor({ timeout: 120_000 });
  assert.equal(await page.locator('#status').getAttribute('data-state'), 'idle',
    `${await page.locator('#status').textContent()}\n${errors.join('\n')}`);
  return { page, errors };
}

/** Fills the form with `req`, records the canvas after every step, generates; resolves to the final status. */
async function generate(page, req = REQUEST) {
  await page.selectOption('#model', MODEL);
  if (req.keep) await page.selectOption('#keep', req.keep);
  await page.fill('#prompt', req.prompt);
  await page.fill('#negative', req.negative || '');
  await page.selectOption('#seed-mode', 'fixed');
  await page.fill('#seed', String(req.seed));
  await page.fill('#steps', String(req.steps));
  await page.fill('#guidance', String(req.guidance));
  await page.evaluate(() => {
    const canvas = document.getElementById('canvas');
    window.previews = [];
    new MutationObserver(() => {
      if (!/^\d+$/.test(canvas.dataset.step)) return;
      const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
      window.previews.push({ step: Number(canvas.dataset.step), width: canvas.width, pixels: Array.from(px) });
    }).observe(canvas, { attributes: true, attributeFilter: ['data-step'] });
  });
  await page.click('#generate');
  const status = page.locator('#status');
  await status.and(page.locator('[data-state="done"], [data-state="error"], [data-state="cancelled"]')).waitFor({ timeout: 600_000 });
  return { state: await status.getAttribute('data-state'), text: await status.textContent() };
}

/** RGBA of the canvas. */
const canvasPixels = (page) => page.evaluate(() => {
  const c = document.getElementById('canvas');
  return { width: c.width, height: c.height, rgba: Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data) };
});

/** Decodes PNG bytes (base64) in the page: RGBA without colour management. */
const decodePng = (page, base64) => page.evaluate(async (b64) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const bmp = await createImageBitmap(new Blob([bytes], { type: 'image/png' }), { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  const c = new OffscreenCanvas(bmp.width, bmp.height);
  const ctx = c.getContext('2d');
  ctx.drawImage(bmp, 0, 0);
  return { width: bmp.width, height: bmp.height, rgba: Array.from(ctx.getImageData(0, 0, bmp.width, bmp.height).data) };
}, base64);

/** The bytes behind link `id` (a blob URL), base64. */
const linkBytes = (page, id) => page.evaluate(async (linkId) => {
  const bytes = new Uint8Array(await (await fetch(document.getElementById(linkId).href)).arrayBuffer());
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}, id);

/** The PNG behind the page's download link, base64. */
const downloadedPng = (page) => linkBytes(page, 'download');

/** Background (mean of a 6-pixel border band) and object (mean of the pixels far from it, and their count). */
function scene(img) {
  const px = (i) => [img.rgba[4 * i], img.rgba[4 * i + 1], img.rgba[4 * i + 2]];
  const n = img.width * img.height;
  const border = [...Array(n).keys()].filter((i) => {
    const x = i % img.width;
    const y = Math.floor(i / img.width);
    return x < 6 || y < 6 || x >= img.width - 6 || y >= img.height - 6;
  });
  const mean = (idx) => [0, 1, 2].map((c) => idx.reduce((s, i) => s + px(i)[c], 0) / idx.length);
  const bg = mean(border);
  const far = [...Array(n).keys()].filter((i) => Math.hypot(...px(i).map((v, c) => v - bg[c])) > 100);
  return { bg, obj: far.length ? mean(far) : [0, 0, 0], count: far.length };
}

const weightRequests = async () => (await env.server.requests()).filter(([, path]) => path.startsWith(`/models/${MODEL}/`));

test('the catalog lists the bundled model files with their sizes and sha256', async () => {
  const catalog = JSON.parse(await readFile(join(root, 'www/models.json'), 'utf8'));
  const tiny = catalog.models.find((m) => m.id === MODEL);
  assert.deepEqual(tiny.files, await describe(join(root, 'www', tiny.base)), 'stale: run node scripts/update-catalog.mjs');
  // Every "store" choice is one the worker converts to, and every previewDecoder names a preview decoder.
  for (const m of catalog.models) {
    for (const keep of m.store || []) assert.ok(['original', 'q4_0', 'q8_0', 'f16'].includes(keep), `${m.id}: store ${keep}`);
    if (m.previewDecoder) {
      assert.ok(catalog.previewDecoders.some((d) => d.id === m.previewDecoder), `${m.id}: no preview decoder ${m.previewDecoder}`);
    }
  }
});

test('generating previews every step, draws the prompt, equals the CLI, and reloads from the cache', { timeout: 900_000 }, async () => {
  const context = await env.browser.newContext();
  await env.server.faults({ reset: true });
  // WebGPU (SwiftShader) although it is a software adapter: the GPU path against the CLI's (lavapipe).
  const { page, errors } = await openApp(context, '?gpu');
  assert.equal(await page.locator('#device').getAttribute('data-cpu'), 'false');
  const result = await generate(page);
  assert.equal(result.state, 'done', `${result.text}\n${errors.join('\n')}`);

  // One preview per step, each different from the one before.
  const previews = await page.evaluate(() => window.previews);
  assert.deepEqual(previews.map((p) => p.step), [...Array(REQUEST.steps).keys()], 'a preview after every step');
  for (let i = 1; i < previews.length; i++) {
    assert.notDeepEqual(previews[i].pixels, previews[i - 1].pixels, `preview ${i} equals preview ${i - 1}`);
  }

  // The final image: what the prompt asks for (a green background, a red object) ...
  const image = await canvasPixels(page);
  assert.deepEqual([image.width, image.height], [64, 64]);
  const { bg, obj, count } = scene(image);
  assert.ok(bg[1] > bg[0] + 60 && bg[1] > bg[2] + 60, `the background should be green: ${bg}`);
  assert.ok(count >= 100, `only ${count} object pixels`);
  assert.ok(obj[0] > obj[1] + 60 && obj[0] > obj[2] + 60, `the object should be red: ${obj}`);

  // ... the downloadable PNG carries the parameters and the same pixels ...
  const png = await downloadedPng(page);
  const fromPng = await decodePng(page, png);
  assert.deepEqual(fromPng.rgba, image.rgba, 'the PNG has the canvas pixels');
  assert.match(await page.locator('#params').textContent(), /Steps: 8, Sampler: ddim, CFG scale: 5, Seed: 7, Size: 64x64, Model: tiny-shapes/);
  assert.ok(Buffer.from(png, 'base64').includes('parameters\0a large red square on a green background in the center'), 'PNG text chunk');

  // ... and equals the CLI's image for the same request within 8-bit rounding.
  const bin = resolve(root, 'target/debug/latent-gen');
  if (!existsSync(bin)) await run('cargo', ['build', '--bin', 'latent-gen'], { cwd: root });
  const out = join(await mkdtemp(join(tmpdir(), 'latent-gen-')), 'cli.png');
  await run(bin, ['generate', '--prompt', REQUEST.prompt, '--seed', String(REQUEST.seed), '--steps', String(REQUEST.steps),
    '--guidance', String(REQUEST.guidance), '--out', out], { cwd: root });
  const cli = await decodePng(page, (await readFile(out)).toString('base64'));
  let worst = 0;
  for (let i = 0; i < cli.rgba.length; i++) worst = Math.max(worst, Math.abs(cli.rgba[i] - image.rgba[i]));
  assert.ok(worst <= 1, `the browser's image differs from the CLI's by up to ${worst} levels`);

  // The weights were fetched once, whole; after a reload they come from IndexedDB: no weight request at all.
  const fetched = await weightRequests();
  assert.ok(fetched.some(([, path]) => path === WEIGHTS), 'the first visit downloads the weights');
  await env.server.faults({ reset: true });
  await page.reload();
  await page.locator('#status[data-state="idle"]').waitFor({ timeout: 120_000 });
  assert.equal(await page.locator(`#cached tr[data-model="${MODEL}"]`).getAttribute('data-complete'), 'true');
  // (2 steps: what is checked here is where the weights come from, and SwiftShader is slow.)
  const again = await generate(page, { ...REQUEST, steps: 2 });
  assert.equal(again.state, 'done', again.text);
  assert.deepEqual(await weightRequests(), [], 'no model file is requested after a reload');
  await context.close();
});

test('a download cut off mid-file resumes with a Range request and verifies', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  await env.server.faults({ reset: true });
  await env.server.faults({ cut: { path: WEIGHTS, after: 1_000_000 } });
  const { page, errors } = await openApp(context);
  const result = await generate(page, { ...REQUEST, steps: 2 });
  assert.equal(result.state, 'done', `${result.text}\n${errors.join('\n')}`);
  const gets = (await weightRequests()).filter(([, path]) => path === WEIGHTS);
  assert.equal(gets.length, 2, `one cut request and one resumed: ${JSON.stringify(gets)}`);
  assert.equal(gets[0][2], null);
  const start = Number(/^bytes=(\d+)-$/.exec(gets[1][2])?.[1]);
  assert.ok(start > 0 && start <= 1_000_000, `resumed from byte ${gets[1][2]}`);
  assert.equal(await page.locator(`#cached tr[data-model="${MODEL}"]`).getAttribute('data-complete'), 'true');
  await context.close();
});

test('a corrupted download fails verification clearly and nothing is marked cached', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  await env.server.faults({ reset: true });
  await env.server.faults({ corrupt: { path: WEIGHTS } });
  const { page } = await openApp(context);
  const result = await generate(page, { ...REQUEST, steps: 2 });
  assert.equal(result.state, 'error');
  assert.match(result.text, /diffusion_pytorch_model\.safetensors failed verification: its sha256 is [0-9a-f]{64}, expected [0-9a-f]{64}/);
  const stored = await page.evaluate(async (model) => {
    const { listFiles } = await import('./cache.js');
    return ((await listFiles()).get(model) || []).map((f) => [f.path, f.complete]);
  }, MODEL);
  assert.ok(!stored.some(([path]) => path === 'unet/diffusion_pytorch_model.safetensors'), 'the corrupt file is gone');
  assert.equal(await page.locator(`#cached tr[data-model="${MODEL}"]`).getAttribute('data-complete'), 'false');
  // With the fault gone the same page recovers.
  await env.server.faults({ reset: true });
  const retry = await generate(page, { ...REQUEST, steps: 2 });
  assert.equal(retry.state, 'done', retry.text);
  await context.close();
});

test('two <latent-gen> elements on the embed page both generate', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  const page = await context.newPage();
  const errors = recordErrors(page);
  await page.goto(`${env.server.url}embed.html`);
  const results = await page.evaluate(async () => {
    await customElements.whenDefined('latent-gen');
    const els = [...document.querySelectorAll('latent-gen')];
    els.forEach((el) => el.setAttribute('steps', '4'));
    const steps = els.map(() => 0);
    els.forEach((el, i) => el.addEventListener('step', () => { steps[i]++; }));
    const blobs = await Promise.all(els.map((el) => el.generate()));
    return Promise.all(blobs.map(async (b, i) => ({
      type: b.type, size: b.size, steps: steps[i], state: els[i].dataset.state,
      pixels: Array.from(els[i].shadowRoot.querySelector('canvas').getContext('2d').getImageData(0, 0, 64, 64).data),
    })));
  }).catch((e) => assert.fail(`${e.message}\n${errors.join('\n')}`));
  assert.equal(results.length, 2);
  for (const r of results) {
    assert.equal(r.type, 'image/png');
    assert.equal(r.state, 'done');
    assert.equal(r.steps, 4);
  }
  assert.notDeepEqual(results[0].pixels, results[1].pixels, 'different prompts and seeds, different images');
  // Prompt text is rendered as text only.
  await page.evaluate(() => {
    const el = document.querySelector('latent-gen');
    el.setAttribute('model', '<img src=x onerror="window.pwned=1">');
    return el.generate().catch(() => {});
  });
  assert.equal(await page.evaluate(() => window.pwned), undefined);
  assert.match(await page.locator('latent-gen >> nth=0').getAttribute('data-state'), /error/);
  await context.close();
});

test('without WebGPU the page says so and the CPU fallback generates with the tiny model', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  await context.addInitScript(() => {
    delete Object.getPrototypeOf(navigator).gpu;
    if (self.WorkerNavigator) delete WorkerNavigator.prototype.gpu;
  });
  const { page, errors } = await openApp(context);
  assert.equal(await page.locator('#device').getAttribute('data-cpu'), 'true');
  assert.match(await page.locator('#device').textContent(), /no WebGPU.*CPU/);
  const result = await generate(page, { ...REQUEST, steps: 4 });
  assert.equal(result.state, 'done', `${result.text}\n${errors.join('\n')}`);
  await context.close();
});

test('the CPU path runs on wasm threads (the page is cross-origin isolated) and draws what one thread draws', { timeout: 600_000 }, async () => {
  const images = {};
  for (const query of ['?cpu', '?cpu&threads=1']) {
    const context = await env.browser.newContext();
    const { page, errors } = await openApp(context, query);
    const cores = await page.evaluate(() => navigator.hardwareConcurrency);
    assert.equal(await page.evaluate(() => self.crossOriginIsolated), true, 'the server sends COOP and COEP');
    const threads = Number(await page.locator('#device').getAttribute('data-threads'));
    const text = await page.locator('#device').textContent();
    if (query.includes('threads=1')) {
      assert.equal(threads, 1, text);
      assert.match(text, /one thread \(1 thread\(s\) asked for\)/);
    } else {
      assert.ok(cores >= 2, `this test needs two cores; the browser reports ${cores}`);
      assert.equal(threads, Math.min(cores, 8), text);
      assert.match(text, new RegExp(`runs on ${threads} threads`));
    }
    const result = await generate(page);
    assert.equal(result.state, 'done', `${result.text}\n${errors.join('\n')}`);
    images[query] = await canvasPixels(page);
    await context.close();
  }
  const [many, one] = Object.values(images);
  const scn = scene(many);
  assert.ok(scn.bg[1] > scn.bg[0] + 60 && scn.count >= 100, `the threaded CPU path draws the scene: ${scn.bg} ${scn.count}`);
  assert.deepEqual(many, one, 'the same image on one thread and on several');
});

test('a model folder imported from disk generates without any network request for weights', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  await env.server.faults({ reset: true });
  const { page, errors } = await openApp(context);
  await page.locator('#import').setInputFiles(join(root, 'www/models', MODEL));
  await page.locator('#status', { hasText: /^(Imported|Error)/ }).waitFor({ timeout: 120_000 });
  assert.match(await page.locator('#status').textContent(), /Imported \d+ files as "local-tiny-shapes"/, errors.join('\n'));
  assert.equal(await page.locator('#model').inputValue(), 'local-tiny-shapes');
  assert.equal(await page.locator('#cached tr[data-model="local-tiny-shapes"]').getAttribute('data-complete'), 'true');
  await page.fill('#steps', '2');
  await page.click('#generate');
  await page.locator('#status[data-state="done"], #status[data-state="error"]').waitFor({ timeout: 300_000 });
  assert.equal(await page.locator('#status').getAttribute('data-state'), 'done', await page.locator('#status').textContent());
  assert.deepEqual(await weightRequests(), [], 'nothing was downloaded');
  // Deleting it from the models panel removes it from the cache and the list.
  await page.click('#models-panel summary');
  await page.locator('#cached tr[data-model="local-tiny-shapes"] button').click();
  await page.locator('#cached tr[data-model="local-tiny-shapes"]').waitFor({ state: 'detached' });
  await context.close();
});

test('checkpoint files (a GGUF and a single .safetensors made by latent-gen convert) imported from disk draw the prompt', { timeout: 600_000 }, async () => {
  const bin = resolve(root, 'target/debug/latent-gen');
  if (!existsSync(bin)) await run('cargo', ['build', '--bin', 'latent-gen'], { cwd: root });
  const gguf = join(await mkdtemp(join(tmpdir(), 'latent-gen-')), 'shapes-q8.gguf');
  await run(bin, ['convert', '--model', join(root, 'www/models', MODEL), '--weights', 'q8_0', '--out', gguf]);
  const context = await env.browser.newContext();
  await env.server.faults({ reset: true });
  const { page, errors } = await openApp(context);
  await page.locator('#import-file').setInputFiles(gguf);
  await page.locator('#status', { hasText: /^(Imported|Error)/ }).waitFor({ timeout: 120_000 });
  assert.match(await page.locator('#status').textContent(), /Imported 1 files as "local-shapes-q8"/, errors.join('\n'));
  assert.equal(await page.locator('#model').inputValue(), 'local-shapes-q8');
  await page.fill('#prompt', REQUEST.prompt);
  await page.selectOption('#seed-mode', 'fixed');
  await page.fill('#seed', String(REQUEST.seed));
  await page.fill('#steps', '10');
  await page.fill('#guidance', String(REQUEST.guidance));
  await page.click('#generate');
  await page.locator('#status[data-state="done"], #status[data-state="error"]').waitFor({ timeout: 300_000 });
  assert.equal(await page.locator('#status').getAttribute('data-state'), 'done', `${await page.locator('#status').textContent()}\n${errors.join('\n')}`);
  const { bg, obj, count } = scene(await canvasPixels(page));
  assert.ok(bg[1] > bg[0] + 60 && bg[1] > bg[2] + 60, `green background: ${bg}`);
  assert.ok(count >= 100 && obj[0] > obj[1] + 60, `red object: ${obj} (${count} pixels)`);
  assert.deepEqual(await weightRequests(), [], 'nothing was downloaded');

  // A single-file .safetensors checkpoint (original SD names, configs in its metadata) imports and runs too.
  const single = join(await mkdtemp(join(tmpdir(), 'latent-gen-')), 'shapes-single.safetensors');
  await run(bin, ['convert', '--model', join(root, 'www/models', MODEL), '--weights', 'f16', '--out', single]);
  await page.locator('#import-file').setInputFiles(single);
  await page.locator('#status', { hasText: /^(Imported 1 files as "local-shapes-single"|Error)/ }).waitFor({ timeout: 120_000 });
  assert.match(await page.locator('#status').textContent(), /Imported 1 files as "local-shapes-single"/, errors.join('\n'));
  await page.fill('#steps', '2');
  await page.click('#generate');
  await page.locator('#status[data-state="done"], #status[data-state="error"]').waitFor({ timeout: 300_000 });
  assert.equal(await page.locator('#status').getAttribute('data-state'), 'done', `${await page.locator('#status').textContent()}\n${errors.join('\n')}`);
  assert.match(await page.locator('#params').textContent(), /Model: local-shapes-single/);
  await context.close();
});

test('a model kept as q4_0 is converted once in the cache, drops its originals, draws the prompt and reloads without a download', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  await env.server.faults({ reset: true });
  // ?gpu: the q4_0 GGUF goes from the cache to WebGPU (SwiftShader), the path users with a GPU take.
  const { page, errors } = await openApp(context, '?gpu');
  assert.equal(await page.locator('#device').getAttribute('data-cpu'), 'false');
  const phases = [];
  page.on('console', (m) => { if (m.text().startsWith('phase:')) phases.push(m.text()); });
  await page.evaluate(() => new MutationObserver(() => {
    const s = document.getElementById('status');
    if (s.dataset.state === 'converting') console.log(`phase:${s.textContent}`);
  }).observe(document.getElementById('status'), { attributes: true, childList: true, subtree: true }));
  const result = await generate(page, { ...REQUEST, steps: 10, keep: 'q4_0' });
  assert.equal(result.state, 'done', `${result.text}\n${errors.join('\n')}`);
  assert.ok(phases.some((p) => /Converting to q4_0 for storage \(once\): tensor \d+ of \d+/.test(p)), `conversion progress: ${phases}`);
  const { bg, obj, count } = scene(await canvasPixels(page));
  assert.ok(bg[1] > bg[0] + 60 && bg[1] > bg[2] + 60, `green background: ${bg}`);
  assert.ok(count >= 100 && obj[0] > obj[1] + 60, `red object: ${obj} (${count} pixels)`);

  // The cache holds the one GGUF, much smaller than the f32 download; the models panel says so.
  const files = await page.evaluate(async (id) => {
    const { listFiles } = await import('./cache.js');
    return ((await listFiles()).get(id) || []).map((r) => ({ path: r.path, size: r.size, complete: r.complete }));
  }, MODEL);
  assert.deepEqual(files.map((f) => [f.path, f.complete]), [['model.q4_0.gguf', true]]);
  const catalog = JSON.parse(await readFile(join(root, 'www/models.json'), 'utf8'));
  const original = catalog.models.find((m) => m.id === MODEL).files.reduce((s, f) => s + f.size, 0);
  assert.ok(files[0].size < 0.7 * original, `stored ${files[0].size} bytes of ${original}`);
  await page.click('#models-panel summary');
  assert.match(await page.locator(`#cached tr[data-model="${MODEL}"] td:nth-child(2)`).textContent(), /^yes, as q4_0 \(\d/);

  // After a reload: no download, no second conversion.
  await env.server.faults({ reset: true });
  await page.reload();
  await page.locator('#status[data-state="idle"]').waitFor({ timeout: 120_000 });
  phases.length = 0;
  const again = await generate(page, { ...REQUEST, steps: 2, keep: 'q4_0' });
  assert.equal(again.state, 'done', again.text);
  assert.deepEqual(await weightRequests(), [], 'no model file is requested after a reload');
  assert.deepEqual(phases, [], 'converted once');
  await context.close();
});

test('an SD-family model previews every step through TAESD at full size, or by latent projection', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  await env.server.faults({ reset: true });
  const { page, errors } = await openApp(context, '?gpu');
  const fixture = async (id) => ({ id: `fixture-${id}`, base: `/fixtures/${id}/`,
    files: await describe(join(root, 'tests/fixtures/models', id)) });
  const decoder = { ...(await fixture('taesd-tiny')), kind: 'preview-decoder' };
  const model = { ...(await fixture('sd1-tiny')), weights: 'f32', previewDecoder: decoder };
  const shots = await page.evaluate(async (m) => {
    const { client } = await import('./client.js');
    // The catalog's SD models name TAESD, which the client finds among the preview decoders.
    const sd15 = (await client().models()).find((x) => x.id === 'sd15');
    const decoders = await client().previewDecoders();
    if (!decoders.some((d) => d.id === sd15.previewDecoder && d.files.length === 2)) throw new Error('sd15 has no TAESD');
    const out = {};
    for (const preview of ['latent', 'taesd']) {
      out[preview] = [];
      await client().generate(m, { prompt: 'a red square', seed: 3, steps: 3, guidance: 5, width: 64, height: 64, preview },
        (st) => out[preview].push({ width: st.preview.width, height: st.preview.height, rgba: Array.from(st.preview.rgba) }));
    }
    return out;
  }, model).catch((e) => { throw new Error(`${e.message}\n${errors.join('\n')}`); });
  assert.deepEqual(shots.latent.map((p) => [p.width, p.height]), [[8, 8], [8, 8], [8, 8]], 'latent projection: latent size');
  assert.deepEqual(shots.taesd.map((p) => [p.width, p.height]), [[64, 64], [64, 64], [64, 64]], 'TAESD: image size');
  for (let i = 1; i < 3; i++) assert.notDeepEqual(shots.taesd[i].rgba, shots.taesd[i - 1].rgba, `TAESD preview ${i} repeats`);
  const spread = (px) => Math.max(...px.filter((_, i) => i % 4 < 3)) - Math.min(...px.filter((_, i) => i % 4 < 3));
  assert.ok(spread(shots.taesd[2].rgba) > 10, 'the TAESD preview is not flat');
  await context.close();
});

test('on a software WebGPU adapter (SwiftShader) the page computes on the CPU by default and says why', { timeout: 300_000 }, async () => {
  const context = await env.browser.newContext();
  const { page } = await openApp(context);
  assert.equal(await page.locator('#device').getAttribute('data-cpu'), 'true');
  assert.equal(await page.locator('#device').getAttribute('data-reason'), 'software-adapter');
  assert.match(await page.locator('#device').textContent(), /software renderer.*CPU.*\?gpu/);
  await context.close();
});

test('img2img: "Use as init" on a result keeps its background at a low strength, and the element takes init-image', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  const { page, errors } = await openApp(context);
  let result = await generate(page, { ...REQUEST, steps: 10 });
  assert.equal(result.state, 'done', `${result.text}\n${errors.join('\n')}`);
  await page.click('#history .use-init >> nth=0');
  await page.locator('#init-preview:not([hidden])').waitFor();
  assert.equal(await page.locator('#init-preview').getAttribute('data-size'), '64x64');
  // Guidance 1: the toy model's background colours are categories that CFG flips at any strength.
  const target = { prompt: 'a large blue circle on a yellow background', seed: 1, steps: 10, guidance: 1 };
  await page.fill('#strength', '0.3');
  result = await generate(page, target);
  assert.equal(result.state, 'done', `${result.text}\n${errors.join('\n')}`);
  const low = scene(await canvasPixels(page));
  assert.ok(low.bg[1] > low.bg[0] + 60 && low.bg[1] > low.bg[2] + 60, `strength 0.3 keeps the green background: ${low.bg}`);
  assert.match(await page.locator('#params').textContent(), /Denoising strength: 0\.3/);
  await page.fill('#strength', '1');
  result = await generate(page, target);
  const full = scene(await canvasPixels(page));
  assert.ok(full.bg[0] > full.bg[2] + 60 && full.bg[1] > full.bg[2] + 60, `strength 1 paints yellow: ${full.bg}`);
  // Without the init image it is text-to-image again.
  await page.click('#init-clear');
  result = await generate(page, target);
  assert.doesNotMatch(await page.locator('#params').textContent(), /Denoising strength/);

  // The element: init-image (a URL) and strength attributes.
  const embed = await context.newPage();
  const embedErrors = recordErrors(embed);
  await embed.goto(`${env.server.url}embed.html`);
  const out = await embed.evaluate(async () => {
    await customElements.whenDefined('latent-gen');
    const el = document.getElementById('first');
    el.setAttribute('prompt', 'a large red square on a green background in the center');
    el.setAttribute('seed', '7');
    el.setAttribute('steps', '10');
    el.setAttribute('guidance', '5');
    const red = await el.generate();
    el.setAttribute('init-image', URL.createObjectURL(red));
    el.setAttribute('strength', '0.3');
    el.setAttribute('prompt', 'a large blue circle on a yellow background');
    el.setAttribute('seed', '1');
    el.setAttribute('guidance', '1');
    let parameters = '';
    el.addEventListener('done', (e) => { parameters = e.detail.parameters; });
    await el.generate();
    const rgba = Array.from(el.shadowRoot.querySelector('canvas').getContext('2d').getImageData(0, 0, 64, 64).data);
    el.setAttribute('init-image', 'missing.png');
    const error = await el.generate().then(() => '', (e) => e.message);
    return { parameters, rgba, error };
  }).catch((e) => assert.fail(`${e.message}\n${embedErrors.join('\n')}`));
  assert.match(out.parameters, /Denoising strength: 0\.3/);
  const bg = scene({ width: 64, height: 64, rgba: out.rgba }).bg;
  assert.ok(bg[1] > bg[0] + 60 && bg[1] > bg[2] + 60, `the element keeps the green background: ${bg}`);
  assert.match(out.error, /init-image missing\.png could not be fetched \(HTTP 404\)/);
  await context.close();
});

test('16 generations in one page keep wasm memory, the JS heap, GPU buffers and bind groups flat', { timeout: 900_000 }, async () => {
  const context = await env.browser.newContext();
  const { page, errors } = await openApp(context, '?gpu');
  const cdp = await context.newCDPSession(page);
  await cdp.send('Performance.enable');
  const heap = async () => {
    await cdp.send('HeapProfiler.collectGarbage');
    const { metrics } = await cdp.send('Performance.getMetrics');
    return metrics.find((m) => m.name === 'JSHeapUsedSize').value;
  };
  const samples = [];
  // 16: growth past the fifth image shows in 11 more (each ~4 s on SwiftShader).
  for (let i = 0; i < 16; i++) {
    const result = await generate(page, { ...REQUEST, seed: i, steps: 1, guidance: 1 });
    assert.equal(result.state, 'done', `generation ${i}: ${result.text}\n${errors.join('\n')}`);
    samples.push({ ...JSON.parse(await page.locator('#canvas').getAttribute('data-memory')), heap: await heap() });
  }
  const [first, warm, last] = [samples[0], samples[4], samples.at(-1)];
  console.log(JSON.stringify({ first, warm, last }));
  assert.ok(first.gpuBuffers > 0 && first.gpuBindGroups > 0, 'the WebGPU path ran');
  assert.equal(last.gpuBuffers, first.gpuBuffers, 'later generations reuse the first one\'s GPU buffers');
  // The pool lends the smallest idle buffer that fits (up to twice a request), so the second image may pair
  // buffers differently from the first, which started with an empty pool; within a few images it settles.
  assert.equal(last.gpuBindGroups, warm.gpuBindGroups, 'bind groups stop growing after the first images');
  assert.equal(last.wasmBytes, warm.wasmBytes, 'wasm memory stops growing');
  assert.ok(last.heap < warm.heap + 16 * 2 ** 20, `the page's JS heap grew from ${warm.heap} to ${last.heap} bytes`);
  await context.close();
});

test('the element interpolates between two seeds and prompts: the ends equal plain generations', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  const page = await context.newPage();
  const errors = recordErrors(page);
  await page.goto(`${env.server.url}embed.html`);
  const out = await page.evaluate(async () => {
    await customElements.whenDefined('latent-gen');
    const el = document.getElementById('first');
    const pixels = async (blob) => {
      const bmp = await createImageBitmap(blob, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
      const c = new OffscreenCanvas(bmp.width, bmp.height);
      const g = c.getContext('2d');
      g.drawImage(bmp, 0, 0);
      return Array.from(g.getImageData(0, 0, bmp.width, bmp.height).data);
    };
    const set = (attrs) => Object.entries(attrs).forEach(([k, v]) => el.setAttribute(k, v));
    const a = { prompt: 'a large red square on a green background in the center', seed: '7', steps: '6', guidance: '5' };
    const b = { prompt: 'a large yellow circle on a blue background', seed: '3' };
    set(a);
    const plainA = await pixels(await el.generate());
    let frameEvents = 0;
    el.addEventListener('frame', () => { frameEvents++; });
    const blobs = await el.interpolate({ toSeed: 3, toPrompt: b.prompt, frames: 3 });
    const frames = await Promise.all(blobs.map(pixels));
    const parameters = await (async () => { let p = ''; el.addEventListener('frame', (e) => { p = e.detail.parameters; }, { once: true }); await el.interpolate({ toSeed: 3, frames: 2 }); return p; })();
    set(b);
    const plainB = await pixels(await el.generate());
    const same = (x, y) => x.length === y.length && x.every((v, i) => v === y[i]);
    return { n: blobs.length, frameEvents, startSame: same(frames[0], plainA), endSame: same(frames[2], plainB),
      middleDiffers: !same(frames[1], plainA) && !same(frames[1], plainB), parameters };
  }).catch((e) => assert.fail(`${e.message}\n${errors.join('\n')}`));
  assert.equal(out.n, 3);
  assert.equal(out.frameEvents, 3 + 2);
  assert.ok(out.startSame, 'the first frame is the plain generation of the start');
  assert.ok(out.endSame, 'the last frame is the plain generation of the far end');
  assert.ok(out.middleDiffers, 'the middle frame is neither end');
  assert.match(out.parameters, /Interpolation: t=0 to seed 3/);
  await context.close();
});

test('the token meter counts the prompt for the loaded model and marks the words past 75 tokens', { timeout: 300_000 }, async () => {
  const context = await env.browser.newContext();
  const { page, errors } = await openApp(context);
  const result = await generate(page, { ...REQUEST, steps: 2 });
  assert.equal(result.state, 'done', `${result.text}\n${errors.join('\n')}`);
  const meter = page.locator('#token-meter');
  await meter.and(page.locator('[data-tokens]')).waitFor();
  // "a large red square on a green background in the center": 11 tokens; brackets and weights are not.
  await page.fill('#prompt', 'a large (red:1.3) square on a green background in the center');
  await page.locator('#token-meter[data-tokens="11"]').waitFor();
  assert.match(await meter.textContent(), /^11 \/ 75 tokens$/);
  await page.fill('#prompt', `a red square, ${'very '.repeat(80)}<b>shiny</b> end`);
  await page.locator('#token-meter[data-over="true"]').waitFor();
  assert.match(await meter.textContent(), /past the limit/);
  assert.match(await page.locator('#token-meter .cut-off').textContent(), /<b>shiny<\/b> end$/, 'cut-off words shown as text');
  assert.equal(await page.locator('#token-meter b').count(), 0, 'never as HTML');
  // In 75-token chunks nothing is cut off, and the request generates with them.
  await page.check('#long-prompt');
  await page.locator('#token-meter[data-chunks="2"]').waitFor();
  assert.match(await meter.textContent(), /in 2 chunks of 75: all seen by the model/);
  await page.click('#generate');
  const status = page.locator('#status');
  await status.and(page.locator('[data-state="done"], [data-state="error"]')).waitFor({ timeout: 120_000 });
  assert.equal(await status.getAttribute('data-state'), 'done', `${await status.textContent()}\n${errors.join('\n')}`);
  await context.close();
});

test('under a strict Content-Security-Policy the page and the element generate with no violation', { timeout: 300_000 }, async () => {
  const csp = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self' blob: data:; " +
    "connect-src 'self' blob:; worker-src 'self'; object-src 'none'; base-uri 'none'";
  await env.server.faults({ csp });
  try {
    const context = await env.browser.newContext();
    await context.addInitScript(() => {
      window.violations = [];
      document.addEventListener('securitypolicyviolation', (e) => window.violations.push(`${e.violatedDirective}: ${e.blockedURI}`));
    });
    const { page, errors } = await openApp(context);
    // The CPU path's thread workers are the page's own script (worker-src 'self' refuses blob: workers).
    const cores = await page.evaluate(() => navigator.hardwareConcurrency);
    assert.equal(await page.locator('#device').getAttribute('data-threads'), String(Math.min(cores, 8)),
      await page.locator('#device').textContent());
    const result = await generate(page, { ...REQUEST, steps: 2 });
    assert.equal(result.state, 'done', `${result.text}\n${errors.join('\n')}`);
    assert.deepEqual(await page.evaluate(() => window.violations), []);
    const embed = await context.newPage();
    await embed.goto(`${env.server.url}embed.html`);
    const out = await embed.evaluate(async () => {
      await customElements.whenDefined('latent-gen');
      const el = document.getElementById('first');
      el.setAttribute('steps', '2');
      const blob = await el.generate();
      const styled = getComputedStyle(el.shadowRoot.querySelector('.box')).display;
      return { type: blob.type, styled, violations: window.violations };
    });
    assert.equal(out.type, 'image/png');
    assert.equal(out.styled, 'grid', "the element's own styles apply");
    assert.deepEqual(out.violations, []);
    await context.close();
  } finally {
    await env.server.faults({ reset: true });
  }
});

test('a catalog entry whose files are plain http on another origin is refused before any download', { timeout: 120_000 }, async () => {
  const context = await env.browser.newContext();
  const page = await context.newPage();
  const other = env.server.url.replace('127.0.0.1', 'localhost');
  await page.route('**/models.json', async (route) => {
    const json = await (await route.fetch()).json();
    const tiny = json.models.find((m) => m.id === MODEL);
    json.models.push({ ...tiny, id: 'tiny-http', bundled: false, base: `${other}models/tiny-shapes/` });
    await route.fulfill({ json });
  });
  await env.server.faults({ reset: true });
  await page.goto(`${env.server.url}embed.html`);
  const message = await page.evaluate(async () => {
    await customElements.whenDefined('latent-gen');
    const el = document.getElementById('first');
    el.setAttribute('model', 'tiny-http');
    return el.generate().then(() => 'generated', (e) => e.message);
  });
  assert.match(message, /is neither https nor this site's/);
  assert.equal((await weightRequests()).length, 0, 'nothing was downloaded');
  await context.close();
});

test('"Variations" under a result adds four nearby images with their variation seeds', { timeout: 300_000 }, async () => {
  const context = await env.browser.newContext();
  // The page draws the variation seeds at random: a fixed sequence makes the test repeatable (a variation can
  // flip this toy model's background colour, a category, for some seeds).
  await context.addInitScript(() => {
    let x = 2463534242;
    const draw = crypto.getRandomValues.bind(crypto);
    crypto.getRandomValues = (a) => {
      if (!(a instanceof Uint32Array)) return draw(a);
      for (let i = 0; i < a.length; i++) {
        x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
        a[i] = x >>> 0;
      }
      return a;
    };
  });
  const { page, errors } = await openApp(context);
  let result = await generate(page, { ...REQUEST, steps: 4 });
  assert.equal(result.state, 'done', `${result.text}\n${errors.join('\n')}`);
  const original = await canvasPixels(page);
  await page.click('#history .variations >> nth=0');
  await page.locator('#status[data-state="done"]', { hasText: 'Image 4/4' }).waitFor({ timeout: 240_000 });
  assert.equal(await page.locator('#history .history-item').count(), 5);
  const titles = await page.locator('#history img').evaluateAll((imgs) => imgs.map((i) => i.title));
  const variations = titles.slice(0, 4);
  assert.ok(variations.every((t) => /Seed: 7, .*Variation seed: \d+, Variation seed strength: 0\.3/.test(t)), variations.join('\n'));
  assert.equal(new Set(variations.map((t) => /Variation seed: (\d+)/.exec(t)[1])).size, 4, 'four different variation seeds');
  const last = await canvasPixels(page);
  assert.notDeepEqual(last.rgba, original.rgba, 'a variation differs from the original');
  const a = scene(original);
  const b = scene(last);
  assert.ok(Math.hypot(...a.bg.map((v, c) => v - b.bg[c])) < 60, `a variation stays near the original: ${a.bg} vs ${b.bg}`);
  await context.close();
});

test('a GPU device lost in the middle of a generation is reported, and the next generation works on a new device', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  const { page, errors } = await openApp(context, '?gpu');
  let result = await generate(page, { ...REQUEST, steps: 2, guidance: 1 });
  assert.equal(result.state, 'done', `${result.text}\n${errors.join('\n')}`);
  const before = await canvasPixels(page);
  // At the first step of the next generation the worker destroys its device, as a driver reset would.
  await page.evaluate(async () => {
    const { client } = await import('./client.js');
    const canvas = document.getElementById('canvas');
    const watch = new MutationObserver(() => {
      if (!/^\d+$/.test(canvas.dataset.step)) return;
      watch.disconnect();
      client().worker.postMessage({ type: 'lose-device' });
    });
    watch.observe(canvas, { attributes: true, attributeFilter: ['data-step'] });
  });
  result = await generate(page, { ...REQUEST, steps: 20 });
  assert.equal(result.state, 'error', result.text);
  assert.match(result.text, /GPU device was lost.*next generation starts a new one/);
  // The next generation makes a new device, loads the model again from the cache and draws as before.
  result = await generate(page, { ...REQUEST, steps: 2, guidance: 1 });
  assert.equal(result.state, 'done', `${result.text}\n${errors.join('\n')}`);
  assert.deepEqual((await canvasPixels(page)).rgba, before.rgba, 'the same request draws the same image on the new device');
  await context.close();
});

/** Records every status text of `page` in `window.statuses` (messages that show for a moment only). */
const recordStatuses = (page) => page.evaluate(() => {
  const el = document.getElementById('status');
  window.statuses = [];
  new MutationObserver(() => window.statuses.push(el.textContent))
    .observe(el, { childList: true, characterData: true, subtree: true });
});

/** How many requests each model file got, by path. */
const requestCounts = async () => {
  const counts = {};
  for (const [, path] of await weightRequests()) counts[path] = (counts[path] || 0) + 1;
  return counts;
};

test('two tabs loading one model: the second waits, takes over the download the first cancels, and both generate', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  await env.server.faults({ reset: true });
  await env.server.faults({ slow: { path: WEIGHTS, bytesPerSec: 1_000_000 } });
  const a = await openApp(context);
  const b = await openApp(context);
  for (const tab of [a, b]) await recordStatuses(tab.page);
  const req = { ...REQUEST, steps: 2 };
  const first = generate(a.page, req);
  await a.page.locator('#status', { hasText: 'Downloading unet/diffusion_pytorch_model.safetensors' }).waitFor({ timeout: 120_000 });
  const second = generate(b.page, req);
  await b.page.locator('#status[data-state="waiting"]').waitFor({ timeout: 60_000 });
  await a.page.click('#cancel');
  assert.equal((await first).state, 'cancelled');
  // The cancelled file keeps what arrived, marked incomplete (the second tab may be resuming it by now).
  const unet = await a.page.evaluate(async (model) => {
    const { getFile } = await import('./cache.js');
    return getFile(model, 'unet/diffusion_pytorch_model.safetensors');
  }, MODEL);
  assert.ok(unet.received > 0 && (!unet.complete || unet.received === unet.size), JSON.stringify(unet));
  const done = await second;
  assert.equal(done.state, 'done', `${done.text}\n${b.errors.join('\n')}`);
  assert.ok((await b.page.evaluate(() => window.statuses)).some((s) => /Waiting for another tab/.test(s)));
  // Every file was fetched once; the one cut by the cancel was resumed by the second tab from where it stopped.
  const gets = (await weightRequests()).filter(([, path]) => path === WEIGHTS);
  assert.equal(gets.length, 2, JSON.stringify(gets));
  assert.equal(gets[0][2], null);
  assert.ok(Number(/^bytes=(\d+)-$/.exec(gets[1][2])?.[1]) > 0, `resumed with ${gets[1][2]}`);
  for (const [path, n] of Object.entries(await requestCounts())) assert.equal(n, path === WEIGHTS ? 2 : 1, path);
  // The first tab now loads what the second stored, without a request, and draws the same image.
  await env.server.faults({ reset: true });
  const again = await generate(a.page, req);
  assert.equal(again.state, 'done', `${again.text}\n${a.errors.join('\n')}`);
  assert.deepEqual(await weightRequests(), []);
  assert.deepEqual(await canvasPixels(a.page), await canvasPixels(b.page));
  await context.close();
});

test('cached files the browser evicted are downloaded again with a message, and the model generates', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  await env.server.faults({ reset: true });
  const { page } = await openApp(context);
  const req = { ...REQUEST, steps: 2 };
  assert.equal((await generate(page, req)).state, 'done');
  // The data goes and the records stay, saying complete: the worst case for the cache.
  await page.evaluate(async () => (await navigator.storage.getDirectory()).removeEntry('latent-gen', { recursive: true }));
  await env.server.faults({ reset: true });
  const tab = await openApp(context);
  await recordStatuses(tab.page);
  const result = await generate(tab.page, req);
  assert.equal(result.state, 'done', `${result.text}\n${tab.errors.join('\n')}`);
  assert.ok((await tab.page.evaluate(() => window.statuses)).some((s) => /evicted the cached files; downloading again/.test(s)));
  const counts = await requestCounts();
  assert.ok(Object.keys(counts).length >= 10 && Object.values(counts).every((n) => n === 1), JSON.stringify(counts));
  assert.deepEqual(await canvasPixels(tab.page), await canvasPixels(page));
  await context.close();
});

test('a generation cancelled mid-way leaves the cache and the history as they were, and the next one works', { timeout: 300_000 }, async () => {
  const context = await env.browser.newContext();
  await env.server.faults({ reset: true });
  const { page, errors } = await openApp(context);
  const req = { ...REQUEST, steps: 2 };
  assert.equal((await generate(page, req)).state, 'done');
  const cache = () => page.evaluate(async (model) => {
    const { listFiles } = await import('./cache.js');
    return ((await listFiles()).get(model) || []).map((r) => [r.path, r.received, r.complete]).sort();
  }, MODEL);
  const before = await cache();
  const history = await page.locator('#history img').count();
  // Cancel as soon as the first step is drawn.
  await page.evaluate(() => new MutationObserver((_, obs) => {
    if (document.getElementById('canvas').dataset.step === '0') {
      obs.disconnect();
      document.getElementById('cancel').click();
    }
  }).observe(document.getElementById('canvas'), { attributes: true, attributeFilter: ['data-step'] }));
  const cancelled = await generate(page, { ...req, steps: 20 });
  assert.equal(cancelled.state, 'cancelled', cancelled.text);
  assert.equal(await page.locator('#history img').count(), history);
  assert.deepEqual(await cache(), before);
  const again = await generate(page, req);
  assert.equal(again.state, 'done', `${again.text}\n${errors.join('\n')}`);
  assert.equal(await page.locator('#history img').count(), history + 1);
  await context.close();
});

test('a page of another origin embeds the element from this one: the worker starts from a blob, weights come by CORS into the site\'s own cache', { timeout: 300_000 }, async () => {
  const context = await env.browser.newContext();
  await env.server.faults({ reset: true });
  const lib = env.server.url; // http://127.0.0.1:PORT/
  const site = lib.replace('127.0.0.1', 'localhost'); // another origin, still a secure context
  const page = await context.newPage();
  const errors = recordErrors(page);
  await page.goto(`${site}embedder/index.html?lib=${encodeURIComponent(lib)}`);
  const result = await page.evaluate(async (prompt) => {
    await customElements.whenDefined('latent-gen');
    const el = document.querySelector('latent-gen');
    el.setAttribute('prompt', prompt);
    const blob = await el.generate();
    return { type: blob.type, state: el.dataset.state };
  }, REQUEST.prompt).catch((e) => assert.fail(`${e.message}\n${errors.join('\n')}`));
  assert.deepEqual(result, { type: 'image/png', state: 'done' });
  // The weights were asked for by the embedding site (CORS requests from its origin)...
  const gets = await weightRequests();
  assert.ok(gets.length >= 10 && gets.every((r) => r[3] === site.slice(0, -1)), JSON.stringify(gets));
  // ...and are kept in its storage, not the library origin's.
  const files = async ([origin, model]) => {
    const { listFiles } = await import(`${origin}cache.js`);
    return ((await listFiles()).get(model) || []).filter((r) => r.complete).length;
  };
  assert.ok(await page.evaluate(files, [lib, MODEL]) >= 10);
  const own = await context.newPage();
  await own.goto(`${lib}embed.html`);
  assert.equal(await own.evaluate(files, ['./', MODEL]), 0);
  await context.close();
});

/** The w x h block of `img` at (x, y), RGBA. */
const crop = (img, x, y, w, h) => {
  const out = [];
  for (let row = y; row < y + h; row++) out.push(...img.rgba.slice((row * img.width + x) * 4, (row * img.width + x + w) * 4));
  return out;
};

test('the page interpolates between two history images (ends equal them) and sweeps into a labelled grid of single generations', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  await env.server.faults({ reset: true });
  const { page, errors } = await openApp(context);
  const req = { ...REQUEST, steps: 4 };
  assert.equal((await generate(page, req)).state, 'done');
  const imgA = await canvasPixels(page);
  assert.equal((await generate(page, { ...req, seed: 8, prompt: 'a small blue circle on a yellow background' })).state, 'done');
  const imgB = await canvasPixels(page);

  // Interpolate: under the first image (now second in the history), then under the other.
  await page.click('#explore-panel summary');
  await page.fill('#walk-frames', '3');
  await page.locator('#history .history-item').nth(1).locator('.interpolate').click();
  const end = page.locator('#history .history-item').nth(0).locator('.interpolate');
  assert.equal(await end.textContent(), 'Interpolate to here');
  await end.click();
  const status = page.locator('#status');
  await status.and(page.locator('[data-state="done"], [data-state="error"]')).waitFor({ timeout: 300_000 });
  assert.equal(await status.getAttribute('data-state'), 'done', `${await status.textContent()}\n${errors.join('\n')}`);
  const strip = await decodePng(page, await linkBytes(page, 'explore-png'));
  assert.deepEqual([strip.width, strip.height], [3 * 64, 64]);
  assert.deepEqual(crop(strip, 0, 0, 64, 64), imgA.rgba, 'the first frame is the first image');
  assert.deepEqual(crop(strip, 128, 0, 64, 64), imgB.rgba, 'the last frame is the other');
  const middle = crop(strip, 64, 0, 64, 64);
  assert.notDeepEqual(middle, imgA.rgba);
  assert.notDeepEqual(middle, imgB.rgba);
  assert.equal(atob(await linkBytes(page, 'explore-gif')).slice(0, 6), 'GIF89a');

  // Sweep guidance 3 and 5 over the first image's settings: the second cell is that image.
  await page.fill('#prompt', req.prompt);
  await page.fill('#seed', String(req.seed));
  await page.fill('#steps', String(req.steps));
  await page.selectOption('#sweep-x-key', 'guidance');
  await page.fill('#sweep-x', '3, 5');
  await page.selectOption('#sweep-y-key', '');
  await page.click('#sweep');
  await status.and(page.locator('[data-state="done"], [data-state="error"]')).waitFor({ timeout: 300_000 });
  assert.equal(await status.getAttribute('data-state'), 'done', `${await status.textContent()}\n${errors.join('\n')}`);
  const grid = await decodePng(page, await linkBytes(page, 'explore-png'));
  assert.deepEqual([grid.width, grid.height], [128, 64 + 12], 'two cells under a 12-pixel label band');
  assert.deepEqual(crop(grid, 64, 12, 64, 64), imgA.rgba, 'the guidance 5 cell is the single generation');
  assert.notDeepEqual(crop(grid, 0, 12, 64, 64), imgA.rgba);
  assert.ok(crop(grid, 0, 0, 128, 12).some((v, i) => i % 4 === 0 && v === 0), 'labels drawn');
  // A bad value is refused before any work, naming it.
  await page.fill('#sweep-x', '3, lots');
  await page.click('#sweep');
  await status.and(page.locator('[data-state="error"]')).waitFor({ timeout: 60_000 });
  assert.match(await status.textContent(), /grid axis guidance: "lots"/);
  await context.close();
});

test('the element\'s subseed and subseed-strength make variations: 0 is the seed\'s image, 1 the subseed\'s', { timeout: 300_000 }, async () => {
  const context = await env.browser.newContext();
  const page = await context.newPage();
  const errors = recordErrors(page);
  await page.goto(`${env.server.url}embed.html`);
  const images = await page.evaluate(async () => {
    await customElements.whenDefined('latent-gen');
    const el = document.querySelector('latent-gen');
    const pixels = () => Array.from(el.shadowRoot.querySelector('canvas').getContext('2d').getImageData(0, 0, 64, 64).data);
    const run = async (attrs) => {
      for (const name of ['seed', 'subseed', 'subseed-strength']) el.removeAttribute(name);
      for (const [k, v] of Object.entries({ steps: '4', ...attrs })) el.setAttribute(k, v);
      await el.generate();
      return pixels();
    };
    return {
      seed: await run({ seed: '1' }),
      other: await run({ seed: '2' }),
      none: await run({ seed: '1', subseed: '2', 'subseed-strength': '0' }),
      all: await run({ seed: '1', subseed: '2', 'subseed-strength': '1' }),
      some: await run({ seed: '1', subseed: '2', 'subseed-strength': '0.3' }),
    };
  }).catch((e) => assert.fail(`${e.message}\n${errors.join('\n')}`));
  assert.deepEqual(images.none, images.seed);
  assert.deepEqual(images.all, images.other);
  assert.notDeepEqual(images.some, images.seed);
  assert.notDeepEqual(images.some, images.other);
  await context.close();
});
