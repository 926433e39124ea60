// The diagnostics page: adapter facts straight from navigator.gpu, the device latent-gen creates (through the
// wasm module), and the kernel self-check with pass/fail and the error found for every case.
import init, { Diagnostics } from './pkg/latent_gen.js';
import { Client, VARIANT_KEY, storedVariant, threadsFromUrl } from './client.js';

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props);
  for (const c of children) e.append(c);
  return e;
}

function factTable(rows) {
  const table = el('table');
  for (const [k, v] of rows) table.append(el('tr', {}, el('th', { textContent: k }), el('td', { textContent: String(v) })));
  return table;
}

async function browserAdapterFacts() {
  if (!('gpu' in navigator)) return null;
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
  if (!adapter) return null;
  const info = adapter.info || {};
  const l = adapter.limits;
  return [
    ['vendor / architecture', `${info.vendor || '?'} / ${info.architecture || '?'}`],
    ['device', info.device || info.description || '?'],
    ['shader-f16', adapter.features.has('shader-f16') ? 'yes' : 'no (every kernel runs in f32)'],
    ['subgroups', adapter.features.has('subgroups') ? 'yes' : 'no'],
    ['timestamp-query', adapter.features.has('timestamp-query') ? 'yes' : 'no'],
    ['maxBufferSize', l.maxBufferSize],
    ['maxStorageBufferBindingSize', l.maxStorageBufferBindingSize],
    ['maxComputeWorkgroupStorageSize', l.maxComputeWorkgroupStorageSize],
    ['maxComputeInvocationsPerWorkgroup', l.maxComputeInvocationsPerWorkgroup],
    ['all features', [...adapter.features].sort().join(', ')],
  ];
}

// The checks to run: every one, or those the URL names (?checks=matmul,attention: to rerun the ones that
// failed, or a quick look); a name that is not a check stops the run with the list of those that are.
function checksToRun(all) {
  const asked = new URLSearchParams(location.search).get('checks');
  if (!asked) return all;
  const names = asked.split(',').map((s) => s.trim()).filter(Boolean);
  const unknown = names.filter((n) => !all.includes(n));
  if (unknown.length > 0 || names.length === 0) {
    const what = unknown.length ? `asks for checks that do not exist (unknown: ${unknown.join(', ')})` : 'names no check';
    throw new Error(`?checks= ${what}; the checks are: ${all.join(', ')}`);
  }
  return names;
}

async function runChecks(diag) {
  const body = $('results').querySelector('tbody');
  body.replaceChildren();
  const summary = $('summary');
  summary.dataset.state = 'running';
  const all = Diagnostics.checkNames();
  const names = checksToRun(all);
  const some = names.length < all.length ? ` of ${names.join(', ')} (the URL's ?checks=)` : '';
  let passed = 0, failed = 0, skipped = 0;
  for (const name of names) {
    summary.textContent = `Running ${name}\u2026 (${passed} passed, ${failed} failed so far)`;
    let reports;
    try {
      reports = await diag.runCheck(name);
    } catch (e) {
      reports = [{ check: name, case: '(did not run)', passed: false, max_abs_err: NaN, tolerance: '', worst: String(e.message || e) }];
    }
    for (const r of reports) {
      const state = r.skipped ? 'skip' : r.passed ? 'pass' : 'fail';
      if (state === 'skip') skipped++; else if (state === 'pass') passed++; else failed++;
      body.append(el('tr', { className: `row-${state}` },
        el('td', { className: state, textContent: state }),
        el('td', { textContent: r.check }),
        el('td', { textContent: r.case }),
        el('td', { className: 'num', textContent: r.skipped ? '' : Number(r.max_abs_err).toExponential(2) }),
        el('td', { textContent: r.tolerance }),
        el('td', { textContent: r.skipped || r.worst })));
    }
  }
  summary.textContent = failed === 0
    ? `All ${passed} cases${some} passed` + (skipped ? ` (${skipped} skipped: see the table)` : '') + '.'
    : `${failed} of ${passed + failed} cases FAILED.`;
  summary.className = failed === 0 ? 'pass' : 'fail';
  summary.dataset.state = 'done';
  summary.dataset.passed = passed;
  summary.dataset.failed = failed;
}

// The benchmark's size and narrowing: 512 and 1 (the real model) unless the URL asks otherwise
// (?bench-size=64&bench-narrow=10: the end-to-end test on a software GPU).
function benchOptions() {
  const q = new URLSearchParams(location.search);
  const size = Number(q.get('bench-size') || 512);
  const narrow = Number(q.get('bench-narrow') || 1);
  return { size: size > 0 ? size : 512, narrow: narrow > 0 ? narrow : 1 };
}

// The CPU path's benchmark: SD 1.5 at a fifth of its widths (weights in wasm memory: 137 MB instead of 3.4 GB) at
// 256x256, unless the URL asks otherwise.
function cpuBenchOptions() {
  const q = new URLSearchParams(location.search);
  const size = Number(q.get('bench-size') || 256);
  const narrow = Number(q.get('bench-narrow') || 5);
  return { size: size > 0 ? size : 256, narrow: narrow > 0 ? narrow : 5 };
}

// The CPU path's benchmark runs in a model worker of its own, as generations do: with wasm threads where the
// page is cross-origin isolated (?threads=N sets their number, 1 the single-threaded build), and without
// freezing this page.
let cpuClient = null;
async function benchmarkCpu(arch, size, narrow, progress) {
  if (!cpuClient) cpuClient = new Client({ cpu: true, threads: threadsFromUrl() });
  const device = await cpuClient.ready;
  const r = await cpuClient.call({ type: 'bench-cpu', arch, size, narrow }, (ev) => ev.message && progress(ev.message));
  return { ...r, threadsNote: device.threadsNote };
}

// Runs one benchmark (diag: the WebGPU device's Diagnostics, or null for the CPU path) and adds its row.
async function runBenchmark(diag, arch, label, buttons) {
  const status = $('bench-status');
  const { size, narrow } = diag ? benchOptions() : cpuBenchOptions();
  buttons.forEach((b) => { b.disabled = true; });
  status.dataset.state = 'running';
  status.className = '';
  try {
    const progress = (m) => { status.textContent = `${label}: ${m}\u2026`; };
    const r = diag ? await diag.benchmark(arch, size, narrow, progress) : await benchmarkCpu(arch, size, narrow, progress);
    const cpu = !diag;
    const mib = (b) => `${(b / 2 ** 20).toFixed(0)} MiB`;
    $('bench-results').querySelector('tbody').append(el('tr', { className: 'bench-row' },
      el('td', { textContent: narrow > 1 ? `${label} (widths / ${narrow})` : label }),
      el('td', { textContent: `${size}x${size}` }),
      el('td', { className: 'num bench-ms', textContent: r.unet_cfg_step_ms.toFixed(1) }),
      el('td', { className: 'num bench-dispatches', textContent: cpu ? '-' : String(r.unet_step_dispatches) }),
      el('td', { textContent: r.weights }),
      el('td', { textContent: r.act }),
      el('td', { className: 'num', textContent: `${r.load_s.toFixed(1)} s` }),
      el('td', { className: 'num', textContent: cpu ? '-' : mib(r.peak_gpu_bytes) }),
      el('td', { className: 'bench-device', textContent: cpu
        ? `${r.adapter}, ${r.cpu_threads} thread${r.cpu_threads === 1 ? '' : 's'}${r.threadsNote ? ` (${r.threadsNote})` : ''}`
        : `${r.adapter} (${r.backend})` })));
    // The CPU path says where a step's time went (wall time by op family, one more step).
    const ops = (r.cpu_op_ms || []).map(([family, ms]) => `${family} ${ms.toFixed(0)} ms`).join(', ');
    status.textContent = `${label}: ${r.unet_cfg_step_ms.toFixed(1)} ms per step${ops ? ` (by op: ${ops})` : ''}.`;
    status.dataset.state = 'done';
  } catch (e) {
    status.textContent = `${label}: the benchmark failed: ${e.message || e}`;
    status.className = 'fail';
    status.dataset.state = 'error';
  }
  buttons.forEach((b) => { b.disabled = false; });
}

// Says which kernel variant generations in this browser use on `adapter` (the diagnostics page's choice, kept in
// localStorage for the generator page and the element on this site), with a button back to the defaults, and
// shows each compared variant's "Use" button except the current one's.
function showVariantChoice(adapter) {
  const stored = storedVariant();
  const current = stored && stored.adapter === adapter ? stored.name : null;
  const reset = el('button', { id: 'variant-reset', textContent: 'Back to the defaults', onclick: () => keepVariant(adapter, null) });
  $('variant-choice').replaceChildren(el('span', { textContent: current
    ? `Generations in this browser use ${current} on this GPU. `
    : 'Generations in this browser use the defaults.' }), ...(current ? [reset] : []));
  $('variant-choice').dataset.current = current || '';
  for (const b of document.querySelectorAll('#variant-results .variant-use')) {
    b.hidden = b.dataset.variant === (current || 'defaults');
  }
}

function keepVariant(adapter, name) {
  if (name && name !== 'defaults') localStorage.setItem(VARIANT_KEY, JSON.stringify({ adapter, name }));
  else localStorage.removeItem(VARIANT_KEY);
  showVariantChoice(adapter);
}

// Times the SD 1.5 benchmark with each kernel variant (?variants=a,b limits them, the defaults always first) and
// lists them against the defaults, the fastest marked.
async function compareVariants(diag, buttons) {
  const status = $('variant-status');
  const { size, narrow } = benchOptions();
  const asked = new URLSearchParams(location.search).get('variants');
  const names = Diagnostics.variantNames().filter((n, i) => i === 0 || !asked || asked.split(',').includes(n));
  const tbody = $('variant-results').querySelector('tbody');
  const adapter = diag.adapter().name;
  tbody.replaceChildren();
  buttons.forEach((b) => { b.disabled = true; });
  status.dataset.state = 'running';
  status.className = '';
  try {
    const rows = [];
    for (const name of names) {
      const progress = (m) => { status.textContent = `${name} (${rows.length + 1} of ${names.length}): ${m}\u2026`; };
      const r = await diag.benchmarkVariant('sd15', size, narrow, name, progress);
      const ratio = rows.length ? r.unet_cfg_step_ms / rows[0].ms : 1;
      const use = el('button', { className: 'variant-use', textContent: 'Use for generations',
        onclick: () => keepVariant(adapter, name) });
      use.dataset.variant = name;
      const row = el('tr', { className: 'variant-row' },
        el('td', { className: 'variant-name', textContent: name }),
        el('td', { className: 'num variant-ms', textContent: r.unet_cfg_step_ms.toFixed(1) }),
        el('td', { className: 'num', textContent: rows.length ? `${ratio.toFixed(2)}x` : '1.00x' }),
        el('td', { className: 'num variant-dispatches', textContent: String(r.unet_step_dispatches) }),
        el('td', {}, use));
      row.dataset.variant = name;
      tbody.append(row);
      rows.push({ name, ms: r.unet_cfg_step_ms, row });
      showVariantChoice(adapter);
    }
    const best = rows.reduce((a, b) => (b.ms < a.ms ? b : a));
    best.row.classList.add('fastest');
    status.dataset.fastest = best.name;
    const label = narrow > 1 ? `SD 1.5 (widths / ${narrow}) at ${size}x${size}` : `SD 1.5 at ${size}x${size}`;
    status.textContent = best === rows[0]
      ? `${label}: the defaults are the fastest on this GPU.`
      : `${label}: ${best.name} is the fastest on this GPU, ${((1 - best.ms / rows[0].ms) * 100).toFixed(0)}% under the defaults.`;
    status.dataset.state = 'done';
  } catch (e) {
    status.textContent = `The comparison failed: ${e.message || e}`;
    status.className = 'fail';
    status.dataset.state = 'error';
  }
  buttons.forEach((b) => { b.disabled = false; });
}

function enableCpuBenchmark(buttons) {
  $('bench-cpu').onclick = () => runBenchmark(null, 'sd15', 'SD 1.5 on the CPU path', buttons);
  buttons.forEach((b) => { b.disabled = false; });
}

async function main() {
  const facts = await browserAdapterFacts().catch((e) => { console.error(e); return null; });
  if (!facts) {
    $('adapter').replaceChildren(el('p', { className: 'error', textContent:
      'This browser offers no WebGPU adapter. latent-gen needs WebGPU: use a recent Chrome or Edge, or enable WebGPU in ' +
      'Firefox or Safari. On Linux, Chrome may need chrome://flags/#enable-unsafe-webgpu and Vulkan.' }));
    $('summary').textContent = 'No self-check without WebGPU.';
    $('summary').dataset.state = 'no-webgpu';
    await init();
    enableCpuBenchmark([$('bench-cpu')]);
    return;
  }
  $('adapter').replaceChildren(el('h3', { textContent: 'As the browser reports it' }), factTable(facts));
  await init();
  let diag;
  try {
    diag = await Diagnostics.create();
  } catch (e) {
    $('adapter').append(el('p', { className: 'error', textContent: `latent-gen could not create a device: ${e.message || e}` }));
    $('summary').dataset.state = 'no-device';
    return;
  }
  const a = diag.adapter();
  $('adapter').append(el('h3', { textContent: 'The device latent-gen created' }), factTable([
    ['adapter', `${a.name} (${a.backend}, ${a.device_type})`],
    ['shader-f16 enabled', a.shader_f16 ? 'yes' : 'no'],
    ['maxBufferSize', a.max_buffer_size],
    ['maxStorageBufferBindingSize', a.max_storage_buffer_binding_size],
    ['maxComputeWorkgroupStorageSize', a.max_compute_workgroup_storage_size],
  ]));
  const buttons = [$('bench-sd15'), $('bench-turbo'), $('bench-cpu'), $('bench-variants')];
  $('bench-sd15').onclick = () => runBenchmark(diag, 'sd15', 'SD 1.5', buttons);
  $('bench-turbo').onclick = () => runBenchmark(diag, 'sd-turbo', 'SD-Turbo', buttons);
  $('bench-variants').onclick = () => compareVariants(diag, buttons);
  showVariantChoice(a.name);
  enableCpuBenchmark(buttons);
  $('rerun').onclick = async () => {
    $('rerun').disabled = true;
    await runChecks(diag);
    $('rerun').disabled = false;
  };
  // Enabled once the first run is through: a ?checks= that names no check stops here, and running again
  // would only say so again.
  await runChecks(diag);
  $('rerun').disabled = false;
}

main().catch((e) => {
  console.error(e);
  $('summary').textContent = `The diagnostics page failed: ${e.message || e}`;
  $('summary').className = 'fail';
  $('summary').dataset.state = 'error';
});
