// LoRAs and textual-inversion embeddings in the page: imported from disk into the cache, listed in the models
// panel (and again after a reload), activated by A1111's <lora:NAME:WEIGHT> tag (the picker writes it) or the
// element's lora attribute, and equal to diffusers' images with them (tests/fixtures/refs/lora, made by
// scripts/make-lora-fixtures) on the fixture model.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { recordErrors, root, serverAndBrowser } from './harness.mjs';
import { describe } from '../../scripts/update-catalog.mjs';

const env = serverAndBrowser();

/** A uint8 tensor of a safetensors file. */
async function tensorU8(path, name) {
  const bytes = await readFile(path);
  const n = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8'));
  const [a, b] = header[name].data_offsets;
  return bytes.subarray(8 + n + a, 8 + n + b);
}

function psnr(rgba, rgb) {
  let se = 0;
  for (let i = 0; i < rgb.length; i++) se += (rgba[Math.floor(i / 3) * 4 + (i % 3)] - rgb[i]) ** 2;
  const mse = se / rgb.length;
  return mse === 0 ? Infinity : 10 * Math.log10(255 ** 2 / mse);
}

async function openApp(context) {
  const page = await context.newPage();
  const errors = recordErrors(page);
  await page.goto(`${env.server.url}index.html`);
  await page.locator('#status[data-state="idle"], #status[data-state="error"]').waitFor({ timeout: 120_000 });
  assert.equal(await page.locator('#status').getAttribute('data-state'), 'idle', errors.join('\n'));
  return { page, errors };
}

const fixture = (...p) => join(root, 'tests/fixtures', ...p);

test('LoRAs and embeddings imported from disk are listed, apply by prompt tag, picker and element, and equal diffusers', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  const { page, errors } = await openApp(context);
  await page.click('#models-panel summary');
  // A file that is neither is refused with the reason, and not kept.
  await page.locator('#import-adapter').setInputFiles(fixture('models/sd1-tiny/vae/diffusion_pytorch_model.safetensors'));
  await page.locator('#status[data-state="error"]').waitFor({ timeout: 60_000 });
  assert.match(await page.locator('#status').textContent(), /not a textual-inversion embedding/);
  assert.equal(await page.locator('#adapters tr').count(), 0);
  const before = await page.locator('#status').textContent();
  await page.locator('#import-adapter').setInputFiles([fixture('lora/sd1-kohya.safetensors'),
    ...['tiny-style.safetensors', 'tiny-thing.pt', 'tiny-cat.safetensors'].map((f) => fixture('embeddings', f))]);
  await page.waitForFunction((old) => {
    const text = document.getElementById('status').textContent;
    return text !== old && /^(Imported|Error)/.test(text);
  }, before, { timeout: 60_000 });
  assert.match(await page.locator('#status').textContent(), /Imported the LoRA "sd1-kohya", the embedding "tiny-style"/, errors.join('\n'));
  const rows = async () => page.locator('#adapters tr').evaluateAll((trs) => trs.map((tr) => `${tr.dataset.kind} ${tr.dataset.name}`));
  const listed = ['lora sd1-kohya', 'embedding tiny-style', 'embedding tiny-thing', 'embedding <tiny-cat>'];
  assert.deepEqual((await rows()).sort(), [...listed].sort());
  assert.match(await page.locator('#adapters tr[data-name="tiny-thing"]').textContent(), /3 vectors/);

  // The picker writes the tag.
  const lora = await readFile(join(root, 'tests/fixtures/refs/lora/cases.json'), 'utf8').then(JSON.parse);
  const kohya = lora.cases.find((c) => c.name === 'sd1-kohya');
  await page.fill('#prompt', kohya.prompt);
  await page.selectOption('#lora-pick', 'sd1-kohya');
  await page.fill('#lora-weight', '0.8');
  await page.click('#lora-add');
  assert.equal(await page.locator('#prompt').inputValue(), `${kohya.prompt} <lora:sd1-kohya:0.8>`);

  // Generating on the fixture model through the page's client: the tagged prompt, then the embeddings' case.
  const model = { id: 'fixture-sd1-tiny', base: '/fixtures/sd1-tiny/', weights: 'f32',
    files: await describe(join(root, 'tests/fixtures/models/sd1-tiny')) };
  const embCase = lora.cases.find((c) => c.name === 'sd1-embeddings');
  const baseCase = lora.cases.find((c) => c.name === 'sd1-base');
  const request = (c, prompt) => ({ prompt, negative_prompt: c.negative, seed: c.seed, steps: c.steps, guidance: c.guidance,
    width: c.width, height: c.height, scheduler: 'ddim' });
  const out = await page.evaluate(async ({ m, reqs }) => {
    const { client } = await import('./client.js');
    const images = [];
    for (const r of reqs) images.push(Array.from((await client().generate(m, r, () => {})).rgba));
    const tokens = await client().tokens(reqs[1].prompt);
    return { images, tokens };
  }, { m: model, reqs: [
    request(kohya, await page.locator('#prompt').inputValue()),
    request(embCase, embCase.prompt),
    request(baseCase, baseCase.prompt),
  ] }).catch((e) => { throw new Error(`${e.message}\n${errors.join('\n')}`); });
  const refs = (c) => tensorU8(join(root, 'tests/fixtures/refs/lora', c.file), 'image');
  const dbLora = psnr(out.images[0], await refs(kohya));
  const dbEmb = psnr(out.images[1], await refs(embCase));
  const dbBase = psnr(out.images[2], await refs(baseCase));
  console.log(`in the browser: LoRA ${dbLora.toFixed(1)} dB, embeddings ${dbEmb.toFixed(1)} dB, base ${dbBase.toFixed(1)} dB against diffusers`);
  assert.ok(dbLora >= 40, `<lora:sd1-kohya:0.8>: PSNR ${dbLora.toFixed(1)} dB`);
  assert.ok(dbEmb >= 40, `embeddings: PSNR ${dbEmb.toFixed(1)} dB`);
  assert.ok(dbBase >= 40, `the LoRA is un-merged when the tag goes: PSNR ${dbBase.toFixed(1)} dB`);
  // The meter counts every vector of a multi-vector embedding.
  const want = embCase.prompt_ids.filter((i) => i < 49406 || i >= 49408).length;
  assert.equal(out.tokens.tokens, want);

  // They are still there after a reload; deleting the LoRA removes it, and its tag then says so.
  await page.reload();
  await page.locator('#status[data-state="idle"]').waitFor({ timeout: 120_000 });
  await page.click('#models-panel summary');
  await page.locator('#adapters tr').first().waitFor();
  assert.deepEqual((await rows()).sort(), [...listed].sort());
  await page.locator('#adapters tr[data-name="sd1-kohya"] button').click();
  await page.locator('#adapters tr[data-name="sd1-kohya"]').waitFor({ state: 'detached' });
  assert.equal(await page.locator('#lora-picker').isHidden(), true);
  const message = await page.evaluate(async () => {
    // The element's lora attribute names LoRAs as the tags do.
    await import('./latent-gen.js');
    const el = document.createElement('latent-gen');
    el.setAttribute('prompt', 'a red circle');
    el.setAttribute('steps', '1');
    el.setAttribute('lora', 'sd1-kohya:0.5');
    document.body.append(el);
    return el.generate().then(() => 'generated', (e) => e.message);
  });
  assert.match(message, /no LoRA named "sd1-kohya" is imported/);
  await context.close();
});

test('on WebGPU a LoRA merges on the device into weights kept as q8_0 (f16 where rows are not whole blocks)', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  const page = await context.newPage();
  const errors = recordErrors(page);
  await page.goto(`${env.server.url}index.html?gpu`);
  await page.locator('#status[data-state="idle"], #status[data-state="error"]').waitFor({ timeout: 120_000 });
  assert.equal(await page.locator('#device').getAttribute('data-cpu'), 'false', 'WebGPU (SwiftShader) is in use');
  await page.click('#models-panel summary');
  await page.locator('#import-adapter').setInputFiles(fixture('lora/sd1-kohya.safetensors'));
  await page.locator('#adapters tr[data-name="sd1-kohya"]').waitFor({ timeout: 60_000 });
  const cases = JSON.parse(await readFile(join(root, 'tests/fixtures/refs/lora/cases.json'), 'utf8')).cases;
  const kohya = cases.find((c) => c.name === 'sd1-kohya');
  const model = { id: 'fixture-sd1-tiny-q8', base: '/fixtures/sd1-tiny/', weights: 'q8_0',
    files: await describe(join(root, 'tests/fixtures/models/sd1-tiny')) };
  const req = { prompt: `${kohya.prompt} <lora:sd1-kohya:0.8>`, negative_prompt: kohya.negative, seed: kohya.seed,
    steps: kohya.steps, guidance: kohya.guidance, width: kohya.width, height: kohya.height, scheduler: 'ddim' };
  const rgba = await page.evaluate(async ({ m, r }) => {
    const { client } = await import('./client.js');
    return Array.from((await client().generate(m, r, () => {})).rgba);
  }, { m: model, r: req }).catch((e) => { throw new Error(`${e.message}\n${errors.join('\n')}`); });
  const withLora = psnr(rgba, await tensorU8(join(root, 'tests/fixtures/refs/lora', kohya.file), 'image'));
  const base = psnr(rgba, await tensorU8(join(root, 'tests/fixtures/refs/lora/sd1-base.safetensors'), 'image'));
  console.log(`WebGPU, q8_0 weights: ${withLora.toFixed(1)} dB against diffusers' LoRA image, ${base.toFixed(1)} dB against its image without`);
  assert.ok(withLora >= 40, `PSNR ${withLora.toFixed(1)} dB against diffusers' fused LoRA`);
  assert.ok(base < 25, `the LoRA was not applied (${base.toFixed(1)} dB from the image without it)`);
  await context.close();
});

// The renderer's palette (scripts/train-tiny/dataset.py).
const PALETTE = { red: [220, 30, 35], green: [30, 165, 60], blue: [35, 70, 215], yellow: [245, 215, 35],
  orange: [245, 135, 20], purple: [135, 45, 175], white: [245, 245, 245], black: [20, 20, 20] };
const nearest = (rgb) => Object.entries(PALETTE).sort(([, a], [, b]) =>
  a.reduce((s, v, i) => s + (v - rgb[i]) ** 2, 0) - b.reduce((s, v, i) => s + (v - rgb[i]) ** 2, 0))[0][0];

/** The canvas judged as scripts/train-tiny/concepts.py judges the eval's images: the background (the median of
 * the outermost 2 pixels) and the object (the largest 8-connected set of pixels more than 60 from it; its colour
 * the median of the half of them farthest from the background) as palette colours, the count of all differing
 * pixels, and whether the object is a ring: it encloses a hole (background that no 4-connected path around the
 * object joins to the edge) of at least 12 pixels and a tenth of the filled outline. */
function judgeScene({ width: w, height: h, rgba }) {
  const px = (i) => [rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]];
  const median = (v) => [...v].sort((a, b) => a - b)[v.length >> 1];
  const all = [...Array(w * h).keys()];
  const border = all.filter((i) => { const x = i % w; const y = Math.floor(i / w); return x < 2 || y < 2 || x >= w - 2 || y >= h - 2; });
  const bg = [0, 1, 2].map((c) => median(border.map((i) => px(i)[c])));
  const dist = all.map((i) => Math.hypot(...px(i).map((v, c) => v - bg[c])));
  const diff = dist.map((d) => d > 60);
  // Flood fill from the seeds over the pixels `inside` accepts, to the 8 or 4 neighbours.
  const fill = (seeds, inside, eight) => {
    const seen = new Uint8Array(w * h);
    const todo = seeds.filter((i) => inside(i));
    todo.forEach((i) => { seen[i] = 1; });
    const steps = eight ? [[-1, -1], [0, -1], [1, -1], [-1, 0], [1, 0], [-1, 1], [0, 1], [1, 1]] : [[0, -1], [-1, 0], [1, 0], [0, 1]];
    while (todo.length) {
      const i = todo.pop();
      for (const [dx, dy] of steps) {
        const x = (i % w) + dx; const y = Math.floor(i / w) + dy; const j = y * w + x;
        if (x >= 0 && y >= 0 && x < w && y < h && !seen[j] && inside(j)) { seen[j] = 1; todo.push(j); }
      }
    }
    return seen;
  };
  let obj = new Uint8Array(w * h);
  let size = 0;
  const claimed = new Uint8Array(w * h);
  for (const i of all) {
    if (!diff[i] || claimed[i]) continue;
    const comp = fill([i], (j) => diff[j], true);
    const n = comp.reduce((s, v) => s + v, 0);
    comp.forEach((v, j) => { if (v) claimed[j] = 1; });
    if (n > size) [obj, size] = [comp, n];
  }
  const pixels = diff.filter(Boolean).length;
  if (size < 12) return { bg: nearest(bg), object: null, pixels, hole: 0, ring: false };
  const outside = fill(border, (j) => !obj[j], false);
  const hole = all.filter((i) => !obj[i] && !outside[i]).length;
  const mine = all.filter((i) => obj[i]);
  const cut = median(mine.map((i) => dist[i]));
  const core = mine.filter((i) => dist[i] >= cut);
  const object = nearest([0, 1, 2].map((c) => median(core.map((i) => px(i)[c]))));
  return { bg: nearest(bg), object, pixels, hole, ring: hole >= 12 && hole >= 0.1 * (hole + size) };
}

const scene = async (page) => judgeScene(await page.evaluate(() => {
  const c = document.getElementById('canvas');
  return { width: c.width, height: c.height, rgba: Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data) };
}));

test('tiny-shapes draws rings with its LoRA and a tiny-sun with its embedding, both imported in the page', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  const { page, errors } = await openApp(context);
  await page.click('#models-panel summary');
  const adapters = join(root, 'www/models/tiny-shapes-adapters');
  await page.locator('#import-adapter').setInputFiles([join(adapters, 'ring.safetensors'), join(adapters, 'tiny-sun.safetensors')]);
  await page.locator('#adapters tr[data-name="tiny-sun"]').waitFor({ timeout: 60_000 });
  await page.locator('#adapters tr[data-name="ring"]').waitFor();
  const draw = async (prompt, seed) => {
    await page.selectOption('#model', 'tiny-shapes');
    await page.fill('#prompt', prompt);
    await page.selectOption('#seed-mode', 'fixed');
    await page.fill('#seed', String(seed));
    await page.fill('#steps', '20');
    await page.fill('#guidance', '5');
    const before = await page.locator('#params').textContent();
    await page.click('#generate');
    await page.waitForFunction((old) => {
      const s = document.getElementById('status');
      return s.dataset.state === 'error' || (s.dataset.state === 'done' && document.getElementById('params').textContent !== old);
    }, before, { timeout: 300_000 });
    assert.equal(await page.locator('#status').getAttribute('data-state'), 'done',
      `${await page.locator('#status').textContent()}\n${errors.join('\n')}`);
    return scene(page);
  };
  const RING = 'a large red ring on a blue background, center';
  const plain = await draw(RING, 5);
  assert.equal(plain.ring, false, `without the LoRA the model draws no ring: ${JSON.stringify(plain)}`);
  // The picker adds the tag; the LoRA teaches the shape.
  await page.fill('#prompt', RING);
  await page.selectOption('#lora-pick', 'ring');
  await page.fill('#lora-weight', '1');
  await page.click('#lora-add');
  const prompt = await page.locator('#prompt').inputValue();
  assert.equal(prompt, `${RING} <lora:ring:1>`);
  const ring = await draw(prompt, 5);
  assert.deepEqual([ring.bg, ring.object, ring.ring], ['blue', 'red', true], JSON.stringify(ring));
  assert.match(await page.locator('#params').textContent(), /<lora:ring:1>/, 'the PNG parameters keep the tag');
  // A held-out caption (ring_heldout.json's first, in a wording never trained on) with its seed.
  const other = await draw('on the right side, a large blue ring on a black background <lora:ring:1>', 1515);
  assert.deepEqual([other.bg, other.object, other.ring], ['black', 'blue', true], JSON.stringify(other));
  // The embedding's trigger word draws a large yellow circle.
  const sun = await draw('tiny-sun on a green background, bottom right', 3);
  assert.deepEqual([sun.bg, sun.object, sun.ring], ['green', 'yellow', false], JSON.stringify(sun));
  assert.ok(sun.pixels > 280, `a large object: ${sun.pixels} pixels`);
  await context.close();
});
