// The diagnostics page in headless Chromium: its kernel self-check passes on WebGPU (SwiftShader), and a
// browser without WebGPU gets a plain explanation. Every check runs in this browser already (crate/tests/kernels.rs
// under wasm-pack test, ~1 minute on SwiftShader), so the page runs two of them here (?checks=), through the
// same code as all of them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { recordErrors, serverAndBrowser } from './harness.mjs';

const env = serverAndBrowser();

test('the kernel self-check passes in the browser, and the page benchmarks a UNet step', { timeout: 600_000 }, async () => {
  const context = await env.browser.newContext();
  const page = await context.newPage();
  const errors = recordErrors(page);
  // A narrowed SD 1.5 UNet at 64x64 for the benchmark below: the real one takes minutes on SwiftShader.
  await page.goto(`${env.server.url}diagnostics.html?bench-size=64&bench-narrow=10&checks=matmul_weights,softmax` +
    '&variants=split-k-512');
  const summary = page.locator('#summary');
  await summary.and(page.locator('[data-state="done"], [data-state="error"], [data-state="no-webgpu"], [data-state="no-device"]'))
    .waitFor({ timeout: 540_000 });
  const state = await summary.getAttribute('data-state');
  const text = await summary.textContent();
  const failures = await page.locator('tr.row-fail').allTextContents();
  assert.equal(state, 'done', `diagnostics ended in state ${state}: ${text}\n${errors.join('\n')}`);
  assert.deepEqual(failures, [], `failed cases:\n${failures.join('\n')}`);
  const passed = Number(await summary.getAttribute('data-passed'));
  const kernels = new Set(await page.locator('#results tbody tr td:nth-child(2)').allTextContents());
  assert.deepEqual([...kernels].sort(), ['matmul_weights', 'softmax'], 'only the checks the URL names run');
  assert.ok(passed >= 5, `only ${passed} cases passed: ${text}`);
  assert.match(text, /of matmul_weights, softmax/);
  // The adapter table shows what the browser reports, shader-f16 included.
  assert.match(await page.locator('#adapter').textContent(), /shader-f16/);
  // The benchmark button times a UNet step with random q4_0 weights made in the page.
  await page.locator('#bench-sd15').click();
  const bench = page.locator('#bench-status');
  await bench.and(page.locator('[data-state="done"], [data-state="error"]')).waitFor({ timeout: 300_000 });
  assert.equal(await bench.getAttribute('data-state'), 'done', `${await bench.textContent()}\n${errors.join('\n')}`);
  const ms = Number(await page.locator('tr.bench-row .bench-ms').first().textContent());
  const dispatches = Number(await page.locator('tr.bench-row .bench-dispatches').first().textContent());
  assert.ok(ms > 0, `ms per step: ${ms}`);
  assert.ok(dispatches > 0 && dispatches <= 298, `dispatches per step: ${dispatches}\n${errors.join('\n')}`);
  // The same step with kernel variants (the URL keeps split-K, which splits the narrowed UNet's GEMMs: a second
  // pass each), against the defaults, the fastest marked.
  await page.locator('#bench-variants').click();
  const variants = page.locator('#variant-status');
  await variants.and(page.locator('[data-state="done"], [data-state="error"]')).waitFor({ timeout: 300_000 });
  assert.equal(await variants.getAttribute('data-state'), 'done', `${await variants.textContent()}\n${errors.join('\n')}`);
  assert.deepEqual(await page.locator('tr.variant-row .variant-name').allTextContents(), ['defaults', 'split-k-512']);
  const vms = (await page.locator('tr.variant-row .variant-ms').allTextContents()).map(Number);
  assert.ok(vms.every((v) => v > 0), `ms per step: ${vms}`);
  const [plain, split] = (await page.locator('tr.variant-row .variant-dispatches').allTextContents()).map(Number);
  assert.equal(plain, dispatches, 'the defaults run the step as the benchmark did');
  assert.ok(split > plain, `split-K adds its second passes: ${split} vs ${plain} dispatches`);
  assert.equal(await page.locator('tr.variant-row.fastest').count(), 1);
  assert.match(await variants.textContent(), /fastest on this GPU/);
  // Any variant can be kept for generations in this browser: the generator page then runs it on this GPU, and
  // says so; "Back to the defaults" undoes it.
  assert.equal(await page.locator('#variant-choice').getAttribute('data-current'), '');
  await page.locator('#variant-results tr[data-variant="split-k-512"] .variant-use').click();
  assert.equal(await page.locator('#variant-choice').getAttribute('data-current'), 'split-k-512');
  assert.ok(await page.locator('#variant-results tr[data-variant="split-k-512"] .variant-use').isHidden());
  const app = await context.newPage();
  await app.goto(`${env.server.url}index.html?gpu`);
  await app.locator('#status[data-state="idle"], #status[data-state="error"]').waitFor({ timeout: 120_000 });
  assert.equal(await app.locator('#device').getAttribute('data-variant'), 'split-k-512');
  assert.match(await app.locator('#device').textContent(), /kernel variant split-k-512/);
  await app.close();
  await page.locator('#variant-reset').click();
  assert.equal(await page.locator('#variant-choice').getAttribute('data-current'), '');
  // A name that is no check is refused with the list of those that are, before anything runs.
  await page.goto(`${env.server.url}diagnostics.html?checks=softmax,nope`);
  await summary.and(page.locator('[data-state="error"]')).waitFor({ timeout: 120_000 });
  assert.match(await summary.textContent(), /unknown: nope.*the checks are: .*matmul/);
  assert.equal(await page.locator('#results tbody tr').count(), 0);
  assert.ok(await page.locator('#rerun').isDisabled(), '"Run again" stays off: it would only be refused again');
  await context.close();
});

test('without WebGPU the page says so plainly, and benchmarks the CPU path', { timeout: 120_000 }, async () => {
  const page = await env.browser.newPage();
  const errors = recordErrors(page);
  await page.addInitScript(() => { delete Object.getPrototypeOf(navigator).gpu; });
  await page.goto(`${env.server.url}diagnostics.html?bench-size=64&bench-narrow=10`);
  await page.locator('#summary[data-state="no-webgpu"]').waitFor({ timeout: 30_000 });
  assert.match(await page.locator('#adapter').textContent(), /no WebGPU adapter/);
  // The CPU path's benchmark needs no WebGPU.
  await page.locator('#bench-cpu:not([disabled])').click({ timeout: 30_000 });
  const bench = page.locator('#bench-status');
  await bench.and(page.locator('[data-state="done"], [data-state="error"]')).waitFor({ timeout: 90_000 });
  assert.equal(await bench.getAttribute('data-state'), 'done', `${await bench.textContent()}\n${errors.join('\n')}`);
  const row = await page.locator('tr.bench-row').first().textContent();
  // In a model worker, on wasm threads (the server makes the page cross-origin isolated).
  const cores = await page.evaluate(() => navigator.hardwareConcurrency);
  assert.match(row, new RegExp(`CPU \\(candle\\), ${Math.min(cores, 8)} threads?`));
  assert.ok(Number(await page.locator('tr.bench-row .bench-ms').first().textContent()) > 0, row);
  // And where the step's time went, by op family (the UNet's convs and attention at least).
  const status = await bench.textContent();
  assert.match(status, /\(by op: .*conv 3x3 \d+ ms/, status);
  assert.match(status, /attention \d+ ms/, status);
  await page.close();
});
