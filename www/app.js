// The generator page: form, progress, per-step preview, PNG download, history, models panel.
import { client as getClient, decodeImage, formatBytes, paint, threadsFromUrl } from './client.js';
import { ADAPTERS, CONVERTED, deleteModel, listFiles } from './cache.js';

const $ = (id) => document.getElementById(id);
const hasWebGpu = 'gpu' in navigator;
const params = new URLSearchParams(location.search);
const client = getClient({ cpu: params.has('cpu'), gpu: params.has('gpu'), threads: threadsFromUrl() });

let catalog = []; // the models one generates with
let decoders = []; // the catalog's preview decoders (TAESD)
let models = []; // catalog + imported models
let lastSeed = null;
let running = false;
let isCpu = false;
let abort = null;
let initImage = null; // {width, height, rgba, url}: the img2img start image, or null

/** Sets (or with null clears) the init image, from a Blob or from pixels already decoded. */
async function setInitImage(source) {
  if (initImage?.url) URL.revokeObjectURL(initImage.url);
  initImage = null;
  if (source) {
    try {
      const pixels = source instanceof Blob ? await decodeImage(source) : source;
      const canvas = new OffscreenCanvas(pixels.width, pixels.height);
      canvas.getContext('2d').putImageData(new ImageData(new Uint8ClampedArray(pixels.rgba), pixels.width, pixels.height), 0, 0);
      const url = URL.createObjectURL(await canvas.convertToBlob({ type: 'image/png' }));
      initImage = { width: pixels.width, height: pixels.height, rgba: new Uint8ClampedArray(pixels.rgba), url };
    } catch (e) {
      fail(new Error(`that image could not be read (${e?.message || e})`));
    }
  }
  const preview = $('init-preview');
  preview.hidden = !initImage;
  preview.src = initImage?.url || '';
  preview.dataset.size = initImage ? `${initImage.width}x${initImage.height}` : '';
  $('init-clear').hidden = !initImage;
}

function setStatus(state, text) {
  const el = $('status');
  el.dataset.state = state;
  el.textContent = text;
}

function fail(e) {
  const cancelled = e?.message === 'cancelled';
  setStatus(cancelled ? 'cancelled' : 'error', cancelled ? 'Cancelled.' : `Error: ${e?.message || e}`);
  if (!cancelled) console.error(e);
}

function seconds(s) {
  if (!isFinite(s)) return '…';
  return s < 90 ? `${Math.ceil(s)} s` : `${Math.round(s / 60)} min`;
}

function onProgress(ev) {
  const p = $('progress');
  if (ev.phase === 'download') {
    const left = ev.total - ev.received;
    const again = ev.evicted ? 'The browser evicted the cached files; downloading again: ' : '';
    setStatus('downloading', `${again}Downloading ${ev.file}: ${formatBytes(ev.received)} of ${formatBytes(ev.total)}, ` +
      `${formatBytes(ev.bytesPerSec)}/s, ${seconds(left / ev.bytesPerSec)} left`);
  } else if (ev.phase === 'convert') {
    const left = ev.total - ev.received;
    setStatus('converting', `Converting to ${ev.weights} for storage (once): tensor ${ev.done} of ${ev.tensors}, ` +
      `${formatBytes(ev.received)} of ${formatBytes(ev.total)}, ${seconds(left / ev.bytesPerSec)} left`);
  } else if (ev.phase === 'wait') {
    setStatus('waiting', `Waiting for another tab that is downloading or changing ${ev.file}…`);
  } else if (ev.phase === 'import') {
    setStatus('importing', `Importing ${ev.file}: ${formatBytes(ev.received)} of ${formatBytes(ev.total)}`);
  } else {
    setStatus('loading', 'Loading the model onto the device…');
  }
  p.max = ev.total || 1;
  p.value = ev.received || 0;
}

function modelById(id) {
  return models.find((m) => m.id === id);
}

const KEEP_LABELS = { original: 'as downloaded', q4_0: 'q4_0 (smallest)', q8_0: 'q8_0', f16: 'f16' };

/** Replaces `select`'s options with `[value, label]` pairs; one choice leaves it disabled. */
function setChoices(select, options) {
  select.replaceChildren();
  for (const [value, label] of options) {
    const opt = document.createElement('option');
    opt.value = value;
    opt.textContent = label;
    select.append(opt);
  }
  select.disabled = options.length < 2;
}

/** The "keep weights as" choices of model `m` (the catalog's `store`, first is the default). */
function renderKeep(m) {
  const options = m?.store?.length ? m.store : ['original'];
  setChoices($('keep'), options.map((v) => [v, KEEP_LABELS[v] || v]));
}

/** The preview choices of model `m`: TAESD (the default) where it names a preview decoder, else the latent
 * projection only (the tiny model's VAE is not SD's, so TAESD does not fit it). */
function renderPreview(m) {
  const latent = ['latent', 'latent projection'];
  setChoices($('preview'), m?.previewDecoder ? [['taesd', 'TAESD (full size)'], latent] : [latent]);
}

function applyDefaults(m) {
  renderKeep(m);
  renderPreview(m);
  const d = m?.defaults || {};
  if (d.steps) $('steps').value = d.steps;
  if (d.guidance != null) $('guidance').value = d.guidance;
  $('scheduler').value = d.scheduler || '';
  if (d.width) $('width').value = d.width;
  if (d.height) $('height').value = d.height;
}

async function refreshModels() {
  const cached = await listFiles().catch(() => new Map());
  const local = [];
  for (const [id, files] of cached) {
    if (id === ADAPTERS || catalog.some((m) => m.id === id) || decoders.some((m) => m.id === id)) continue;
    const size = files.reduce((s, f) => s + f.size, 0);
    // Big models (a real SD checkpoint) are held in f16 on the GPU; GGUF files keep their quantized blocks.
    const big = size > 256 * 2 ** 20 || files.some((f) => f.path.endsWith('.gguf'));
    local.push({ id, name: `${id} (imported)`, local: true, files: files.map((f) => ({ path: f.path, size: f.size })),
      weights: big ? 'f16' : 'f32', cpu: size <= 256 * 2 ** 20, defaults: { steps: 20, guidance: 7.5 } });
  }
  models = [...catalog, ...local];
  const select = $('model');
  const previous = select.value;
  select.replaceChildren();
  for (const m of models) {
    const opt = document.createElement('option');
    opt.value = m.id;
    const gpuOnly = isCpu && !m.cpu;
    opt.textContent = m.name + (gpuOnly ? ' (needs WebGPU)' : '');
    opt.disabled = gpuOnly;
    select.append(opt);
  }
  if (modelById(previous)) select.value = previous;
  renderCached(cached);
  renderStorage();
}

function renderCached(cached) {
  const body = $('cached');
  body.replaceChildren();
  // Preview decoders are listed once downloaded, to be deleted like the rest.
  for (const m of [...models, ...decoders.filter((d) => cached.has(d.id))]) {
    const recs = cached.get(m.id) || [];
    const known = m.files.every((f) => f.size != null);
    const total = known ? m.files.reduce((s, f) => s + f.size, 0) : m.approxBytes;
    const stored = recs.reduce((s, r) => s + (r.received || 0), 0);
    const conv = recs.find((r) => r.complete && CONVERTED.test(r.path));
    const complete = !!conv || m.files.every((f) => recs.some((r) => r.path === f.path && r.complete));
    const kept = conv && !m.local ? `yes, as ${conv.path.match(CONVERTED)[1]}` : 'yes';
    const tr = document.createElement('tr');
    tr.dataset.model = m.id;
    tr.dataset.complete = String(complete);
    const cells = [m.name, complete ? `${kept} (${formatBytes(stored)})` : (stored ? `partly (${formatBytes(stored)})` : 'no'),
      `${known ? '' : 'about '}${formatBytes(total)}`];
    for (const text of cells) {
      const td = document.createElement('td');
      td.textContent = text;
      tr.append(td);
    }
    const td = document.createElement('td');
    if (recs.length) {
      const del = document.createElement('button');
      del.type = 'button';
      del.textContent = 'Delete';
      del.onclick = async () => {
        del.disabled = true;
        await client.unload(m.id).catch(() => {});
        await deleteModel(m.id, { onWait: () => setStatus('waiting', `Waiting for another tab using ${m.id}…`) }).catch(fail);
        await refreshModels();
      };
      td.append(del);
    }
    tr.append(td);
    body.append(tr);
  }
}

/** What an imported LoRA or embedding is, in words. */
function describeAdapter(a) {
  if (a.kind === 'lora') return `LoRA (${a.format}, ${a.layers} layers): <lora:${a.name}:1>`;
  if (a.kind === 'embedding') return `embedding, ${a.vectors} vector${a.vectors === 1 ? '' : 's'}: trigger word "${a.name}"`;
  return `unreadable: ${a.error}`;
}

/** The models panel's LoRAs and embeddings, and the LoRA picker under the prompt. */
async function refreshAdapters() {
  const list = await client.adapters().catch(() => []);
  const body = $('adapters');
  body.replaceChildren();
  for (const a of list) {
    const tr = document.createElement('tr');
    tr.dataset.name = a.name;
    tr.dataset.kind = a.kind;
    for (const text of [a.name, describeAdapter(a), formatBytes(a.size)]) {
      const td = document.createElement('td');
      td.textContent = text; // text, never HTML
      tr.append(td);
    }
    const td = document.createElement('td');
    const del = document.createElement('button');
    del.type = 'button';
    del.textContent = 'Delete';
    del.onclick = async () => {
      del.disabled = true;
      await client.deleteAdapter(a.path).catch(fail);
      await refreshAdapters();
      updateTokenMeter();
    };
    td.append(del);
    tr.append(td);
    body.append(tr);
  }
  const loras = list.filter((a) => a.kind === 'lora');
  setChoices($('lora-pick'), loras.map((a) => [a.name, a.name]));
  $('lora-pick').disabled = !loras.length;
  $('lora-picker').hidden = !loras.length;
}

/** Imports LoRA / embedding files from disk into the cache. */
async function importAdapters(files) {
  if (!files.length) return;
  try {
    const infos = await client.importAdapters(files, onProgress);
    setStatus('idle', `Imported ${infos.map((a) => `${a.kind === 'lora' ? 'the LoRA' : 'the embedding'} "${a.name}"`).join(', ')}.`);
  } catch (e) {
    fail(e);
  }
  await refreshAdapters();
  updateTokenMeter();
}

/** The picker's LoRA as A1111's tag at the end of the prompt. */
function addLoraTag() {
  const name = $('lora-pick').value;
  if (!name) return;
  const weight = Number($('lora-weight').value);
  const prompt = $('prompt');
  prompt.value = `${prompt.value.trimEnd()} <lora:${name}:${Number.isFinite(weight) ? weight : 1}>`;
  updateTokenMeter();
}

async function renderStorage() {
  if (!navigator.storage?.estimate) return;
  const { usage, quota } = await navigator.storage.estimate();
  const persisted = await navigator.storage.persisted?.();
  $('storage').textContent = `This site uses ${formatBytes(usage)} of the ${formatBytes(quota)} the browser allows it` +
    (persisted ? '; the cache is kept when space runs low.' : '; the browser may evict the cache when space runs low.');
  $('persist').hidden = !!persisted;
}

/**
 * The token meter under the prompt: "N / 75 tokens" for the loaded model (weights syntax not counted), and
 * the words the text encoder will not see, marked. Shown once a model is loaded (the first generation).
 */
let meterTimer = null;
function updateTokenMeter() {
  clearTimeout(meterTimer);
  meterTimer = setTimeout(async () => {
    const meter = $('token-meter');
    const count = await client.tokens($('prompt').value).catch(() => null);
    meter.replaceChildren();
    if (!count) return;
    meter.dataset.tokens = String(count.tokens);
    meter.dataset.over = String(count.tokens > count.limit);
    if ($('long-prompt').checked && count.tokens > count.limit) {
      const chunks = Math.ceil(count.tokens / count.limit);
      meter.dataset.chunks = String(chunks);
      meter.append(`${count.tokens} tokens, in ${chunks} chunks of ${count.limit}: all seen by the model`);
      return;
    }
    delete meter.dataset.chunks;
    meter.append(`${count.tokens} / ${count.limit} tokens`);
    if (count.cutOff) {
      const cut = document.createElement('mark');
      cut.className = 'cut-off';
      cut.textContent = count.cutOff; // text, never HTML
      meter.append(': past the limit, not seen by the model: ', cut);
    }
  }, 150);
}

/** The variation fields: {subseed, subseed_strength} when a strength above 0 is set. */
function variation() {
  const strength = Number($('subseed-strength').value) || 0;
  if (strength <= 0) return {};
  const sub = $('subseed').value;
  return { subseed: sub === '' ? 0 : Number(sub) >>> 0, subseed_strength: strength };
}

function readForm() {
  const mode = $('seed-mode').value;
  let seed = Number($('seed').value) >>> 0;
  if (mode === 'random') seed = crypto.getRandomValues(new Uint32Array(1))[0];
  else if (mode === 'reuse' && lastSeed != null) seed = lastSeed;
  $('seed').value = seed;
  return {
    model: $('model').value,
    request: {
      prompt: $('prompt').value,
      negative_prompt: $('negative').value,
      seed,
      steps: Number($('steps').value),
      guidance: Number($('guidance').value),
      width: Number($('width').value),
      height: Number($('height').value),
      scheduler: $('scheduler').value || undefined,
      preview: $('preview').value || undefined,
      long_prompt: $('long-prompt').checked ? 'chunks' : undefined,
      ...variation(),
      ...(initImage ? {
        strength: Number($('strength').value),
        init_images: [{ width: initImage.width, height: initImage.height, rgba: initImage.rgba, weight: 1 }],
      } : {}),
    },
  };
}

function restore(entry) {
  const r = entry.request;
  $('model').value = entry.model;
  renderKeep(modelById(entry.model));
  renderPreview(modelById(entry.model));
  $('preview').value = entry.request.preview || 'latent';
  $('prompt').value = r.prompt;
  $('negative').value = r.negative_prompt;
  $('long-prompt').checked = r.long_prompt === 'chunks';
  $('seed').value = r.seed;
  $('seed-mode').value = 'fixed';
  $('steps').value = r.steps;
  $('guidance').value = r.guidance;
  $('width').value = r.width;
  $('height').value = r.height;
  $('scheduler').value = r.scheduler || '';
  $('subseed').value = r.subseed ?? '';
  $('subseed-strength').value = r.subseed_strength || 0;
  if (r.init_images) $('strength').value = r.strength;
  setInitImage(r.init_images ? r.init_images[0] : null);
  showResult(entry);
}

function showResult(entry) {
  paint($('canvas'), entry.image);
  const link = $('download');
  link.href = entry.url;
  link.download = `latent-gen-${entry.request.seed}.png`;
  link.hidden = false;
  $('params').textContent = entry.image.parameters.replaceAll('\n', ' · ');
}

async function generate(ev) {
  ev.preventDefault();
  if (running) return;
  const { model, request } = readForm();
  await run(model, [request]);
}

/** How far from the original a "Variations" image moves (A1111's variation strength). */
const VARIATION_STRENGTH = 0.3;

/** Four variations of a history image: its settings with random variation seeds at VARIATION_STRENGTH. */
async function variations(entry) {
  if (running) return;
  const subseeds = [...crypto.getRandomValues(new Uint32Array(4))];
  await run(entry.model, subseeds.map((subseed) => ({ ...entry.request, subseed, subseed_strength: VARIATION_STRENGTH })));
}

/** The catalog entry of `model` as the form keeps it, or null (with the error shown). */
function modelToRun(model) {
  const found = modelById(model);
  if (!found) fail(new Error('choose a model'));
  return found ? { ...found, keep: $('keep').value || undefined } : null;
}

/** Runs `work(signal)` as the page's one task: Generate disabled, Cancel enabled, errors shown. */
async function busy(work) {
  running = true;
  $('generate').disabled = true;
  $('cancel').disabled = false;
  // The state changes before the first await, so that nobody reads the previous run's "done" as this one's.
  $('canvas').dataset.step = '-1';
  setStatus('starting', 'Starting…');
  abort = new AbortController();
  // Ask once that the cache survive storage pressure (Chromium decides without a prompt).
  if (navigator.storage?.persist && !(await navigator.storage.persisted())) navigator.storage.persist().then(renderStorage);
  try {
    await work(abort.signal);
  } catch (e) {
    fail(e);
  } finally {
    refreshModels();
    running = false;
    $('generate').disabled = false;
    $('cancel').disabled = true;
  }
}

/** One image with `m`, its steps drawn on the canvas; `of` prefixes the status ("Image 2/4: "). */
async function generateOne(m, request, of, signal) {
  const canvas = $('canvas');
  canvas.dataset.step = '-1';
  setStatus('starting', `${of}Starting…`);
  return client.generate(m, request, (st) => {
    paint(canvas, st.preview);
    canvas.dataset.step = String(st.index);
    $('progress').max = st.steps;
    $('progress').value = st.index + 1;
    setStatus('generating', `${of}Step ${st.index + 1}/${st.steps}, ${st.stepsPerSec.toFixed(2)} steps/s`);
  }, onProgress, signal);
}

/** Generates `requests` in turn with `model`, each into the canvas and the history; one cancel stops them all. */
async function run(model, requests) {
  const m = modelToRun(model);
  if (!m) return;
  await busy(async (signal) => {
    const canvas = $('canvas');
    for (const [n, request] of requests.entries()) {
      const of = requests.length > 1 ? `Image ${n + 1}/${requests.length}: ` : '';
      const image = await generateOne(m, request, of, signal);
      lastSeed = request.seed;
      const url = URL.createObjectURL(new Blob([image.png], { type: 'image/png' }));
      const entry = { model, request, image, url };
      showResult(entry);
      canvas.dataset.step = 'done';
      canvas.dataset.memory = JSON.stringify(image.memory); // what the worker holds: read by the long-session test
      addToHistory(entry);
      updateTokenMeter();
      const warnings = image.warnings?.length ? ` Warning: ${image.warnings.join('; ')}` : '';
      setStatus('done', `${of}Done in ${image.seconds.toFixed(1)} s (seed ${request.seed}).${warnings}`);
    }
  });
}

/** Shows a walk's or a sweep's image in the explore panel, with download links (`gif`: the animation). */
function showExplored(png, name, gif) {
  $('explore-panel').open = true;
  const show = (img, link, bytes, type, file) => {
    if (img.src) URL.revokeObjectURL(img.src);
    img.hidden = link.hidden = !bytes;
    if (!bytes) return img.removeAttribute('src');
    img.src = link.href = URL.createObjectURL(new Blob([bytes], { type }));
    link.download = file;
  };
  show($('explore-image'), $('explore-png'), png, 'image/png', `${name}.png`);
  show($('explore-gif-image'), $('explore-gif'), gif, 'image/gif', `${name}.gif`);
}

let walkFrom = null; // the history entry an interpolation starts from, once picked

/** "Interpolate" under a history image: the first press picks the start, the second the end and walks. */
function pickWalkEnd(entry, button) {
  if (running) return;
  if (!walkFrom || walkFrom === entry) {
    walkFrom = walkFrom === entry ? null : entry;
    for (const b of document.querySelectorAll('#history .interpolate')) b.textContent = walkFrom ? 'Interpolate to here' : 'Interpolate';
    if (walkFrom) button.textContent = 'Start (press again to drop)';
    setStatus('idle', walkFrom ? 'Now press "Interpolate to here" under the other end.' : 'Ready.');
    return;
  }
  const from = walkFrom;
  walkFrom = null;
  for (const b of document.querySelectorAll('#history .interpolate')) b.textContent = 'Interpolate';
  walk(from, entry);
}

/**
 * A walk through latent space from history image `a` to `b` (the CLI's `interpolate`): frames with the
 * initial noise slerped from a's seed to b's and the prompts' embeddings lerped; a's other settings. Ends in a
 * strip PNG and a looping GIF in the explore panel.
 */
async function walk(a, b) {
  const frames = Number($('walk-frames').value);
  if (a.model !== b.model) return fail(new Error('the two images come from different models: interpolate between images of one model'));
  if (a.image.width !== b.image.width || a.image.height !== b.image.height) {
    return fail(new Error(`the two images differ in size (${a.image.width}x${a.image.height} and ${b.image.width}x${b.image.height})`));
  }
  if (a.request.init_images || b.request.init_images) return fail(new Error('a walk starts from noise: pick images made without an init image'));
  if (!Number.isInteger(frames) || frames < 2 || frames > 64) return fail(new Error('frames: a whole number from 2 to 64'));
  const m = modelToRun(a.model);
  if (!m) return;
  await busy(async (signal) => {
    const to = { seed: b.request.seed, prompt: b.request.prompt, negative_prompt: b.request.negative_prompt };
    const base = { ...a.request, width: a.image.width, height: a.image.height };
    const images = [];
    for (let f = 0; f < frames; f++) {
      const t = f / (frames - 1);
      images.push(await generateOne(m, { ...base, interpolate: { ...to, t } }, `Frame ${f + 1}/${frames}: `, signal));
    }
    const parameters = `${images[0].parameters.split('\nInterpolation')[0]}\nInterpolation: ${frames} frames to seed ` +
      `${to.seed}, prompt: ${to.prompt}, negative prompt: ${to.negative_prompt}`;
    const out = await client.walkImages(images.map(({ width, height, rgba }) => ({ width, height, rgba })), parameters);
    showExplored(out.png, `latent-gen-walk-${base.seed}-${to.seed}`, out.gif);
    $('canvas').dataset.step = 'done';
    setStatus('done', `Done: ${frames} frames from seed ${base.seed} to ${to.seed}.`);
  });
}

/** The sweep panel: the form's settings over one or two axes, into a labelled grid (the CLI's `grid`). */
async function sweep() {
  if (running) return;
  const { model, request } = readForm();
  const axis = (key, values) => (key && values.trim() ? `${key}=${values}` : undefined);
  const x = axis($('sweep-x-key').value, $('sweep-x').value);
  const y = axis($('sweep-y-key').value, $('sweep-y').value);
  if (!x) return fail(new Error('the sweep needs values across (X)'));
  const m = modelToRun(model);
  if (!m) return;
  await busy(async (signal) => {
    const cells = await client.gridRequests(request, x, y);
    const images = [];
    for (const [n, cell] of cells.entries()) images.push(await generateOne(m, cell, `Cell ${n + 1}/${cells.length}: `, signal));
    const png = await client.gridPng(images.map(({ width, height, rgba }) => ({ width, height, rgba })), x, y, images[0].parameters);
    showExplored(png, `latent-gen-grid-${request.seed}`);
    $('canvas').dataset.step = 'done';
    setStatus('done', `Done: ${cells.length} cells.`);
  });
}

function addToHistory(entry) {
  const img = document.createElement('img');
  img.src = entry.url;
  img.alt = entry.request.prompt;
  img.title = entry.image.parameters;
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'thumb';
  button.append(img);
  button.onclick = () => restore(entry);
  const use = document.createElement('button');
  use.type = 'button';
  use.className = 'use-init';
  use.textContent = 'Use as init';
  use.title = 'Start the next image from this one (img2img)';
  use.onclick = () => setInitImage({ width: entry.image.width, height: entry.image.height, rgba: entry.image.rgba });
  const vary = document.createElement('button');
  vary.type = 'button';
  vary.className = 'variations';
  vary.textContent = 'Variations';
  vary.title = `Four images near this one (variation seeds at strength ${VARIATION_STRENGTH})`;
  vary.onclick = () => variations(entry);
  const between = document.createElement('button');
  between.type = 'button';
  between.className = 'interpolate';
  between.textContent = walkFrom ? 'Interpolate to here' : 'Interpolate';
  between.title = 'A walk through latent space between two images: press it under one, then under the other';
  between.onclick = () => pickWalkEnd(entry, between);
  const item = document.createElement('figure');
  item.className = 'history-item';
  item.append(button, use, vary, between);
  $('history').prepend(item);
}

async function collectDropped(items) {
  const out = [];
  const walk = async (entry, prefix) => {
    if (entry.isFile) {
      const file = await new Promise((res, rej) => entry.file(res, rej));
      out.push({ path: prefix + entry.name, file });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
        if (!batch.length) break;
        for (const e of batch) await walk(e, `${prefix}${entry.name}/`);
      }
    }
  };
  for (const item of items) {
    const entry = item.webkitGetAsEntry?.();
    if (entry) await walk(entry, '');
  }
  return out;
}

/** A single-file checkpoint (original SD names in .safetensors, or a stable-diffusion.cpp .gguf). */
const isCheckpointFile = (path) => !path.includes('/') && /\.(safetensors|gguf)$/i.test(path);

/** Strips a common top folder (the model is named after it); a single checkpoint is named after its file. */
function asModelFiles(files) {
  if (files.length === 1 && isCheckpointFile(files[0].path)) {
    const name = files[0].path.replace(/\.(safetensors|gguf)$/i, '');
    return { id: `local-${name.replace(/[^\w.-]+/g, '-')}`, files };
  }
  const tops = new Set(files.map((f) => f.path.split('/')[0]));
  let name = 'local-model';
  if (tops.size === 1 && files.every((f) => f.path.includes('/'))) {
    name = [...tops][0];
    files = files.map((f) => ({ ...f, path: f.path.slice(name.length + 1) }));
  }
  files = files.filter((f) => !f.path.split('/').some((part) => part.startsWith('.')));
  return { id: `local-${name.replace(/[^\w.-]+/g, '-')}`, files };
}

async function importLocal(list) {
  const { id, files } = asModelFiles(list);
  const single = files.length === 1 && isCheckpointFile(files[0].path);
  if (!single && !files.some((f) => f.path.startsWith('unet/'))) {
    return fail(new Error('import a diffusers model folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or one checkpoint file (.safetensors with the original Stable Diffusion names, or a .gguf)'));
  }
  try {
    await client.ready;
    await client.importFiles(id, files, onProgress);
    setStatus('idle', `Imported ${files.length} files as "${id}".`);
    await client.unload(id);
    await refreshModels();
    $('model').value = id;
  } catch (e) {
    fail(e);
    await refreshModels();
  }
}

async function main() {
  $('form').addEventListener('submit', generate);
  $('cancel').onclick = () => abort?.abort();
  $('model').onchange = () => applyDefaults(modelById($('model').value));
  $('persist').onclick = async () => { await navigator.storage?.persist?.(); renderStorage(); };
  $('import').onchange = (e) => importLocal([...e.target.files].map((file) => ({ path: file.webkitRelativePath || file.name, file })));
  $('import-file').onchange = (e) => importLocal([...e.target.files].map((file) => ({ path: file.name, file })));
  $('prompt').addEventListener('input', updateTokenMeter);
  $('long-prompt').addEventListener('change', updateTokenMeter);
  $('import-adapter').onchange = (e) => importAdapters([...e.target.files]);
  $('lora-add').onclick = addLoraTag;
  $('sweep').onclick = sweep;
  $('init-file').onchange = (e) => e.target.files[0] && setInitImage(e.target.files[0]);
  $('init-clear').onclick = () => setInitImage(null);
  const initBox = $('init');
  initBox.addEventListener('dragover', (e) => { e.preventDefault(); initBox.classList.add('over'); });
  initBox.addEventListener('dragleave', () => initBox.classList.remove('over'));
  initBox.addEventListener('drop', (e) => {
    e.preventDefault();
    initBox.classList.remove('over');
    const file = [...e.dataTransfer.files].find((f) => f.type.startsWith('image/'));
    if (file) setInitImage(file);
  });
  document.addEventListener('paste', (e) => {
    const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith('image/'));
    if (file) setInitImage(file);
  });
  const drop = $('drop');
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', async (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    importLocal(await collectDropped([...e.dataTransfer.items]));
  });
  try {
    catalog = await client.generators();
    decoders = await client.previewDecoders();
    const device = await client.ready;
    isCpu = device.isCpu;
    const a = device.adapter;
    const software = device.reason === 'software-adapter';
    $('device').textContent = isCpu && software
      ? 'WebGPU here is a software renderer (no GPU driver in use): images are computed on the CPU instead, ' +
        'which is many times faster than it. Add ?gpu to the address to use WebGPU anyway.'
      : isCpu && params.has('cpu')
      ? 'Computing on the CPU, as the address asks (?cpu).'
      : isCpu
      ? (hasWebGpu ? 'WebGPU gave no usable adapter' : 'This browser has no WebGPU') +
        ': images are computed on the CPU instead, which is slow and only practical for the bundled tiny model. ' +
        'Chrome or Edge 113+, or Firefox and Safari with WebGPU enabled, run every model on the GPU.'
      : `Running on WebGPU${a.name ? ` (${a.name})` : ''}; shader-f16 ${a.shader_f16 ? 'available' : 'not available (f32 throughout)'}` +
        (device.variant ? `; kernel variant ${device.variant}, as kept on the diagnostics page.` : '.');
    if (isCpu) {
      $('device').textContent += device.threads > 1
        ? ` The CPU path runs on ${device.threads} threads.`
        : ` The CPU path runs on one thread${device.threadsNote ? ` (${device.threadsNote})` : ''}.`;
    }
    $('device').dataset.cpu = String(isCpu);
    $('device').dataset.threads = String(device.threads);
    $('device').dataset.reason = device.reason || '';
    $('device').dataset.variant = device.variant || '';
    await refreshModels();
    await refreshAdapters();
    applyDefaults(modelById($('model').value));
    $('generate').disabled = false;
    setStatus('idle', 'Ready.');
  } catch (e) {
    fail(e);
  }
}

main();
