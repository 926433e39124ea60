// The diagnostics page in headless Chromium: every kernel self-check passes on WebGPU (SwiftShader), and a
// browser without WebGPU gets a plain explanation.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { recordErrors, serverAndBrowser } from './harness.mjs';

const env = serverAndBrowser();

test('every kernel passes its self-check in the browser', { timeout: 600_000 }, async () => {
  const page = await env.browser.newPage();
  const errors = recordErrors(page);
  await page.goto(`${env.server.url}diagnostics.html`);
  const summary = page.locator('#summary');
  await summary.and(page.locator('[data-state="done"], [data-state="error"], [data-state="no-webgpu"], [data-state="no-device"]'))
    .waitFor({ timeout: 540_000 });
  const state = await summary.getAttribute('data-state');
  const text = await summary.textContent();
  const failures = await page.locator('tr.row-fail').allTextContents();
  assert.equal(state, 'done', `diagnostics ended in state ${state}: ${text}\n${errors.join('\n')}`);
  assert.deepEqual(failures, [], `failed cases:\n${failures.join('\n')}`);
  const passed = Number(await summary.getAttribute('data-passed'));
  assert.ok(passed >= 50, `only ${passed} cases passed: ${text}`);
  // The adapter table shows what the browser reports, shader-f16 included.
  assert.match(await page.locator('#adapter').textContent(), /shader-f16/);
  await page.close();
});

test('without WebGPU the page says so plainly', { timeout: 60_000 }, async () => {
  const page = await env.browser.newPage();
  await page.addInitScript(() => { delete Object.getPrototypeOf(navigator).gpu; });
  await page.goto(`${env.server.url}diagnostics.html`);
  await page.locator('#summary[data-state="no-webgpu"]').waitFor({ timeout: 30_000 });
  assert.match(await page.locator('#adapter').textContent(), /no WebGPU adapter/);
  await page.close();
});
