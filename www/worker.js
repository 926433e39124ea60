// The model worker: owns the wasm instance and the WebGPU device (or the CPU fallback), downloads and caches
// weights, loads models and generates. The page's thread only draws and handles input.
//
// Messages in:  { id, type: 'init', cpu, gpu, threads, variant } | { id, type: 'load', model } | { id, type: 'generate', request }
//               { id, type: 'load-preview', model } (a TAESD catalog entry, for request.preview 'taesd')
//               { id, type: 'import', model, files: [{ path, file }] } | { id, type: 'unload', model }
//               { id, type: 'tokens', prompt, literal } (the loaded model's token count; null before a load)
//               { id, type: 'import-adapters', files: [File] } (LoRAs / embeddings into the cache and the engine)
//               { id, type: 'adapters' } | { id, type: 'delete-adapter', path }
//               { type: 'cancel', target: id }
//               { id, type: 'grid-requests', base, x, y } (a sweep's cells' requests)
//               { id, type: 'grid-png', cells, x, y, parameters } | { id, type: 'walk-images', frames, parameters, frameMs }
//               { type: 'lose-device' } (destroys the GPU device, as a driver reset would: for tests)
//               { id, type: 'bench-cpu', arch, size, narrow } (the diagnostics page's CPU benchmark, on this
//               worker's CPU path: with its threads)
// Messages out: { id, type: 'progress' | 'step' | 'result' | 'error', ... }
import { ADAPTERS, CONVERTED, ChunkWriter, convertedPath, deleteFile, fileBlob, getFile, listFiles, withModelLock } from './cache.js';

let engine = null;
let previewLoaded = null; // the id of the preview decoder in the engine
let loaded = null; // { key, id, info } of the model in the engine (key: id and the weight type kept)
let abort = null; // the AbortController of the current download
const post = (msg, transfer) => self.postMessage(msg, transfer || []);

// The wasm module: pkg/ (one thread), or pkg/threads/ (wasm threads: rayon on Web Workers sharing the module's
// memory) once the engine is on the CPU path and the page is cross-origin isolated. Everything the worker makes
// (engine, converters, hashes) comes from `lib`: objects of one module cannot go to the other.
let lib = null;
let wasm = null; // the module's exports (its memory)
let threadsNote; // undefined until the threaded build was tried; then null (it runs) or why the CPU path has one thread

let engineKey = null;
// How the page asked for the engine, to make a new one after a loss.
let initArgs = { cpu: false, gpu: false, threads: null, variant: null };

/** `cpu`: the CPU path only; `gpu`: WebGPU even on a software adapter (which is slower than the CPU path);
 * `threads`: the CPU path's threads (null: one per core, at most 8; 1: the single-threaded build); `variant`:
 * `{ adapter, name }`, the kernel variant kept on the diagnostics page for that adapter, or null. */
async function initEngine(cpu, gpu, threads, variant) {
  initArgs = { cpu, gpu, threads, variant };
  const create = () => lib.Engine.create(cpu, gpu, variant?.adapter, variant?.name);
  if (!lib) {
    lib = await import('./pkg/latent_gen.js');
    wasm = await lib.default();
  }
  const key = `${cpu}:${gpu}:${variant?.adapter}:${variant?.name}`;
  if (!engine || engineKey !== key) {
    engine = await create();
    if (engine.isCpu() && threadsNote === undefined) {
      const t = await threadedLib(threads ?? Math.min(navigator.hardwareConcurrency || 1, 8), threads != null);
      threadsNote = t.note ?? null;
      if (t.lib) {
        engine.free();
        ({ lib, wasm } = t);
        engine = await create();
      }
    }
    engineKey = key;
    adapters = new Map();
    await syncAdapters();
  }
  const isCpu = engine.isCpu();
  return { adapter: engine.adapter(), isCpu, reason: engine.fallbackReason(), variant: engine.kernelVariant(),
    threads: isCpu ? lib.cpuThreads() : 0, threadsNote: isCpu ? threadsNote : null };
}

/** The threaded build with a pool of `n` threads, or why the CPU path stays on one thread. */
async function threadedLib(n, asked) {
  if (!(n >= 2)) return { note: asked ? `${n} thread(s) asked for` : 'the browser reports one core' };
  if (!self.crossOriginIsolated) {
    return { note: 'the page is not cross-origin isolated (it needs the headers Cross-Origin-Opener-Policy: ' +
      'same-origin and Cross-Origin-Embedder-Policy: require-corp), so wasm threads are off' };
  }
  const url = new URL('./pkg/threads/latent_gen.js', import.meta.url).href;
  try {
    const t = await import(url);
    const w = await t.default();
    const init = t.threadInit();
    await Promise.all(Array.from({ length: n }, () => startThread(url, init)));
    t.buildThreadPool(n);
    return { lib: t, wasm: w };
  } catch (e) {
    console.warn('the threaded build did not start:', e);
    for (const worker of threadWorkers.splice(0)) worker.terminate();
    return { note: `the threaded build did not start (${e?.message || e})` };
  }
}

const threadWorkers = []; // the pool's workers (kept referenced: a browser may collect unreferenced ones)

/** Starts a worker of the pool (www/thread.js) on the threaded module `url`; resolves once it runs the module
 * and waits for its rayon thread. Where this worker runs for a page of another origin (started from a blob by
 * client.js), so does the thread's: workers start only from the page's origin. */
async function startThread(url, init) {
  const script = new URL('./thread.js', import.meta.url);
  const worker = script.origin === self.location.origin
    ? new Worker(script, { type: 'module' })
    : new Worker(URL.createObjectURL(new Blob([`import ${JSON.stringify(script.href)};`], { type: 'text/javascript' })),
      { type: 'module' });
  threadWorkers.push(worker);
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('a thread did not start within 60 s')), 60_000);
    worker.onmessage = ({ data }) => {
      clearTimeout(timer);
      if (data.ready) resolve();
      else reject(new Error(data.error));
    };
    worker.onerror = (e) => {
      clearTimeout(timer);
      e.preventDefault?.();
      reject(new Error(`a thread's worker did not start${e.message ? ` (${e.message})` : ''}`));
    };
    worker.postMessage({ url, init });
  });
}

let adapters = new Map(); // path -> {path, size, kind, name, ...} of the LoRAs and embeddings the engine holds

/** Registers with the engine every LoRA and embedding in the cache it does not hold yet (one that no longer
 * reads is reported in its entry's `error`, not thrown: the others still load). */
async function syncAdapters() {
  const recs = ((await listFiles()).get(ADAPTERS) || []).filter((r) => r.complete);
  for (const rec of recs) {
    if (adapters.has(rec.path)) continue;
    try {
      adapters.set(rec.path, { path: rec.path, size: rec.size, ...engine.addAdapter(rec.path, await fileBlob(rec)) });
    } catch (e) {
      adapters.set(rec.path, { path: rec.path, size: rec.size, kind: 'unreadable', name: rec.path, error: e?.message || String(e) });
    }
  }
  return [...adapters.values()];
}

/** Stores LoRA / embedding files in the cache and registers them; a file the engine refuses (not a LoRA
 * or an embedding, another architecture's) is deleted again and its reason thrown. */
async function importAdapters(id, files) {
  await ensureEngine();
  return withModelLock(ADAPTERS, 'exclusive', () => storeAdapters(id, files));
}

async function storeAdapters(id, files) {
  const out = [];
  for (const file of files) {
    const path = file.name;
    const writer = await ChunkWriter.open(ADAPTERS, path, { size: file.size, sha256: null, source: 'import' });
    try {
      const reader = file.stream().getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        await writer.append(value);
        post({ id, type: 'progress', phase: 'import', file: path, received: writer.received, total: file.size });
      }
      await writer.finish(new lib.Sha256(), `${ADAPTERS}/${path}`);
    } finally {
      writer.close();
    }
    const old = adapters.get(path);
    if (old) engine.removeAdapter(old.name);
    adapters.delete(path);
    try {
      const info = { path, size: file.size, ...engine.addAdapter(path, await fileBlob(await getFile(ADAPTERS, path))) };
      adapters.set(path, info);
      out.push(info);
    } catch (e) {
      await deleteFile(ADAPTERS, path).catch(() => {});
      throw new Error(`${path}: ${e?.message || e}`);
    }
  }
  return out;
}

/** Removes a LoRA / embedding from the engine and the cache. */
async function deleteAdapter(path) {
  await ensureEngine();
  const info = adapters.get(path);
  if (info) engine.removeAdapter(info.name);
  adapters.delete(path);
  await withModelLock(ADAPTERS, 'exclusive', () => deleteFile(ADAPTERS, path));
  return null;
}

/** The origins model files may come from over plain http: the page's and this library's own (which differ when a
 * site embeds the element from another origin; the worker then runs with the page's origin). */
const OWN_ORIGINS = new Set([self.location.origin, new URL(import.meta.url).origin]);

/** A model file's URL: https, or this site's or this library's own (a catalog entry cannot send weights over
 * plain http from anywhere else). */
function fileUrl(model, f) {
  const url = new URL(f.url || model.base + f.path, model.catalogUrl || self.location.href);
  if (url.protocol !== 'https:' && !OWN_ORIGINS.has(url.origin)) {
    throw new Error(`${model.id}/${f.path}: ${url.href} is neither https nor this site's; model files must be one of the two`);
  }
  return url.href;
}

/**
 * Downloads one file into the cache, resuming after whatever an earlier attempt stored. Progress goes to
 * `onBytes(received)`.
 */
async function download(model, f, signal, onBytes) {
  const label = `${model.id}/${f.path}`;
  const writer = await ChunkWriter.open(model.id, f.path, { size: f.size, sha256: f.sha256 });
  try {
    await fetchInto(writer, model, f, label, signal, onBytes);
    await writer.finish(new lib.Sha256(), label);
  } finally {
    writer.close();
  }
}

/** Fetches `f` into `writer` from where it stopped, resuming a few times over dropped connections. */
async function fetchInto(writer, model, f, label, signal, onBytes) {
  const url = fileUrl(model, f);
  for (let attempt = 0; ; attempt++) {
    const start = writer.received;
    const headers = start > 0 ? { Range: `bytes=${start}-` } : {};
    let res;
    try {
      res = await fetch(url, { headers, signal, cache: 'no-store' });
    } catch (e) {
      if (signal.aborted) throw cancelled();
      throw new Error(`${label}: cannot reach ${url} (${e.message}); check the connection and try again, the download will resume`);
    }
    if (res.status === 416 && start > 0 && start === f.size) break;
    if (!res.ok) throw new Error(`${label}: the server answered ${res.status} ${res.statusText} for ${url}`);
    if (start > 0 && res.status !== 206) await writer.restart();
    const reader = res.body.getReader();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        await writer.append(value);
        onBytes(writer.received);
      }
      break;
    } catch (e) {
      await writer.flush(); // what arrived is a prefix of the file: kept (incomplete) for a resume
      if (signal.aborted) throw cancelled();
      // A dropped connection: resume from what was stored, a few times, then give up (keeping the prefix).
      if (attempt >= 4) throw new Error(`${label}: the download kept failing (${e.message}); try again later, it will resume`);
    }
  }
}

const cancelled = () => Object.assign(new Error('cancelled'), { name: 'AbortError' });

/** The weight type `model` is kept in ('q4_0', 'q8_0', 'f16' or 'original'): the page's choice, else the
 * catalog's first. */
const keepAs = (model) => model.keep || model.store?.[0] || 'original';


/** The complete converted file of `model` (the one asked for first, else any), or undefined. */
async function converted(model, keep) {
  const recs = (await listFiles()).get(model.id) || [];
  const done = recs.filter((r) => r.complete && CONVERTED.test(r.path));
  return done.find((r) => r.path === convertedPath(keep)) || done[0];
}

/** The engine, made anew (as the page first asked for it) when a lost device dropped the last one. */
async function ensureEngine() {
  if (!engine) await initEngine(initArgs.cpu, initArgs.gpu, initArgs.threads, initArgs.variant);
}

/** After the GPU device was lost: the engine, its model, preview decoder and adapters go; the next load
 * makes a new engine (a new device) and loads the model again from the cache. */
function dropEngine() {
  try {
    engine?.free();
  } catch (e) {
    console.warn('freeing the lost engine:', e);
  }
  engine = null;
  loaded = null;
  previewLoaded = null;
  adapters = new Map();
}

/**
 * Makes sure every file of `model` is in the cache (downloading what is missing, converting it once), then
 * loads it. Between tabs: filling the cache holds the model's exclusive lock and loading a shared one, so a
 * second tab asking for a model that one is downloading waits for it (phase 'wait') and then loads what it
 * stored. A cached file the browser evicted is dropped and downloaded again, once.
 */
async function load(id, model) {
  await ensureEngine();
  const keep = keepAs(model);
  const key = `${model.id}:${keep}`;
  if (loaded?.key === key) return loaded.info;
  abort = new AbortController();
  const { signal } = abort;
  const lock = lockOptions(id, model.id, signal);
  let evicted = false;
  try {
    for (let attempt = 0; ; attempt++) {
      if (!(await cachedFiles(model, keep))) {
        await withModelLock(model.id, 'exclusive', () => fill(id, model, keep, signal, evicted), lock);
      }
      try {
        const info = await withModelLock(model.id, 'shared', async () => {
          const files = await cachedFiles(model, keep);
          return files && loadFiles(id, model, key, files);
        }, lock);
        if (info) return info;
        // Another tab deleted or converted the files between the two locks: fill the cache again.
        if (attempt >= 2) throw new Error(`${model.id}: another tab keeps changing this model's files; try again`);
      } catch (e) {
        if (e?.name !== 'EvictedError' || evicted || model.local) throw e;
        evicted = true;
        await withModelLock(model.id, 'exclusive', () => dropMissing(model.id), lock);
      }
    }
  } finally {
    abort = null;
  }
}

/** withModelLock's options for task `id`: cancelled by `signal`, and a 'wait' progress event for `name` when
 * another tab holds the lock. */
const lockOptions = (id, name, signal) =>
  ({ signal, onWait: () => post({ id, type: 'progress', phase: 'wait', file: name, received: 0, total: 0 }) });

/** What the cache holds of `model` for weights kept as `keep`: `{ stored }` (a converted file: the one asked
 * for, else another, whose originals are gone), `{ originals: true }`, or null when something is missing. */
async function cachedFiles(model, keep) {
  const stored = await converted(model, keep);
  const all = await haveAll(model);
  if (stored && !(keep === 'original' && all)) return { stored };
  if (keep === 'original' && all) return { originals: true };
  return null;
}

/** Downloads what `model` lacks and converts it (holding its exclusive lock: another tab may have done it while
 * this one waited, so that is checked first). */
async function fill(id, model, keep, signal, evicted) {
  if (await cachedFiles(model, keep)) return;
  await fetchAll(id, model, signal, evicted);
  if (keep !== 'original') await convertInCache(id, model, keep, signal);
}

/** Drops the records of `model`'s files whose data is gone from the cache (evicted), so they download again. */
async function dropMissing(modelId) {
  for (const rec of (await listFiles()).get(modelId) || []) {
    if (!rec.complete) continue;
    try {
      await fileBlob(rec);
    } catch (e) {
      if (e?.name !== 'EvictedError') throw e;
      await deleteFile(modelId, rec.path);
    }
  }
}

/** Loads the cached `files` of `model` into the engine (holding the model's shared lock). */
async function loadFiles(id, model, key, { stored }) {
  const total = model.files.reduce((s, f) => s + (f.size || 0), 0);
  post({ id, type: 'progress', phase: 'load', received: total, total });
  const map = new Map();
  if (stored) {
    map.set(stored.path, await fileBlob(stored));
  } else {
    for (const f of model.files) map.set(f.path, await fileBlob(await getFile(model.id, f.path)));
  }
  loaded = null;
  const loadStart = performance.now();
  const weights = stored ? stored.path.match(CONVERTED)[1] : (model.weights || 'f32');
  const info = engine.loadModel(map, model.id, weights);
  // What loading cost: a wasm memory never shrinks, so its size now is its peak so far.
  const gpu = engine.gpuMemory();
  Object.assign(info, { loadSeconds: (performance.now() - loadStart) / 1000, wasmBytes: wasm.memory.buffer.byteLength,
    gpuBytes: gpu.live, gpuPeakBytes: gpu.peak, stored: stored ? weights : 'original',
    storedBytes: stored ? stored.size : undefined });
  loaded = { key, id: model.id, info };
  return info;
}

/** Whether every file of `model` is complete in the cache. */
async function haveAll(model) {
  for (const f of model.files) if (!(await getFile(model.id, f.path))?.complete) return false;
  return true;
}

/** Downloads whatever files of `model` the cache lacks, with progress (`evicted`: the cache lost them). */
async function fetchAll(id, model, signal, evicted = false) {
  const files = model.files;
  const total = files.reduce((s, f) => s + (f.size || 0), 0);
  const have = new Map();
  for (const f of files) {
    const rec = await getFile(model.id, f.path);
    have.set(f.path, rec?.complete ? rec.size : (rec?.received || 0));
  }
  const t0 = performance.now();
  const startBytes = [...have.values()].reduce((a, b) => a + b, 0);
  let lastPost = 0;
  const report = (file, force) => {
    const now = performance.now();
    if (!force && now - lastPost < 100) return;
    lastPost = now;
    const received = [...have.values()].reduce((a, b) => a + b, 0);
    const rate = (received - startBytes) / Math.max(1e-3, (now - t0) / 1000);
    post({ id, type: 'progress', phase: 'download', file, received, total, bytesPerSec: rate, evicted });
  };
  for (const f of files) {
    const rec = await getFile(model.id, f.path);
    if (rec?.complete) continue;
    if (model.local) throw new Error(`${model.id}/${f.path} is missing from the cache: import the folder again`);
    await download(model, f, signal, (n) => { have.set(f.path, n); report(f.path); });
    report(f.path, true);
  }
}

/** Resolves after one turn of the event loop, so a 'cancel' message gets through. */
const turn = () => new Promise((resolve) => setTimeout(resolve, 0));

/**
 * Converts the cached files of `model` once into one GGUF with `type` weights (engine's Converter, a few
 * tensors at a time, written straight into the cache), then deletes the originals; returns the new record.
 * A failed or cancelled conversion deletes its partial file and keeps the originals.
 */
async function convertInCache(id, model, type, signal) {
  const map = new Map();
  for (const f of model.files) map.set(f.path, await fileBlob(await getFile(model.id, f.path)));
  const conv = new lib.Converter(map, type);
  const path = convertedPath(type);
  await deleteFile(model.id, path);
  const writer = await ChunkWriter.open(model.id, path, { size: conv.bytes(), sha256: null, source: 'convert' });
  const t0 = performance.now();
  try {
    let more = true;
    while (more) {
      more = conv.step(32 << 20, (bytes) => writer.writeSync(bytes));
      await writer.flush();
      const elapsed = (performance.now() - t0) / 1000;
      post({ id, type: 'progress', phase: 'convert', file: path, weights: type, tensors: conv.tensors(), done: conv.done(),
        received: writer.received, total: conv.bytes(), bytesPerSec: writer.received / Math.max(1e-3, elapsed) });
      await turn();
      if (signal.aborted) throw cancelled();
    }
    await writer.finish(new lib.Sha256(), `${model.id}/${path}`);
  } catch (e) {
    writer.close();
    await deleteFile(model.id, path).catch(() => {});
    throw e;
  } finally {
    conv.free();
  }
  for (const f of model.files) await deleteFile(model.id, f.path);
  return getFile(model.id, path);
}

/** Downloads (once) and loads the TAESD preview decoder `decoder` (a catalog entry of kind preview-decoder). */
async function loadPreview(id, decoder) {
  await ensureEngine();
  if (previewLoaded === decoder.id) return null;
  abort = new AbortController();
  const lock = lockOptions(id, decoder.id, abort.signal);
  try {
    if (!(await haveAll(decoder))) await withModelLock(decoder.id, 'exclusive', () => fetchAll(id, decoder, abort.signal), lock);
    await withModelLock(decoder.id, 'shared', async () => {
      const map = new Map();
      for (const f of decoder.files) map.set(f.path, await fileBlob(await getFile(decoder.id, f.path)));
      engine.loadPreviewDecoder(map);
    }, lock);
  } finally {
    abort = null;
  }
  previewLoaded = decoder.id;
  return null;
}

/** Stores local files (a diffusers folder picked or dropped on the page) as a model in the cache. */
async function importFiles(id, modelId, files) {
  await withModelLock(modelId, 'exclusive', () => storeFiles(id, modelId, files));
  if (loaded?.id === modelId) loaded = null;
}

async function storeFiles(id, modelId, files) {
  const total = files.reduce((s, f) => s + f.file.size, 0);
  let done = 0;
  for (const { path, file } of files) {
    const writer = await ChunkWriter.open(modelId, path, { size: file.size, sha256: null, source: 'import' });
    try {
      const reader = file.stream().getReader();
      for (;;) {
        const { done: end, value } = await reader.read();
        if (end) break;
        await writer.append(value);
        post({ id, type: 'progress', phase: 'import', file: path, received: done + writer.received, total });
      }
      await writer.finish(new lib.Sha256(), `${modelId}/${path}`);
    } finally {
      writer.close();
    }
    done += file.size;
  }
}

async function generate(id, request) {
  if (!loaded) throw new Error('no model is loaded');
  const t0 = performance.now();
  const image = await engine.generate(request, (ev) => {
    const p = ev.preview;
    const elapsed = (performance.now() - t0) / 1000;
    post({ id, type: 'step', index: ev.index, steps: ev.steps, timestep: ev.timestep,
      stepsPerSec: (ev.index + 1) / elapsed, preview: { width: p.width, height: p.height, rgba: p.rgba } },
    [p.rgba.buffer]);
  });
  // What the engine holds afterwards, so that long sessions can be checked for growth.
  const gpu = engine.gpuMemory();
  const memory = { wasmBytes: wasm.memory.buffer.byteLength, gpuBuffers: gpu.buffers, gpuBindGroups: gpu.bindGroups,
    gpuPeakBytes: gpu.peak };
  return { width: image.width, height: image.height, rgba: image.rgba, png: image.png,
    parameters: image.parameters, warnings: image.warnings, seconds: (performance.now() - t0) / 1000, memory };
}

// One task at a time, in arrival order. 'cancel' (with the target task's id) acts at once: it stops the
// running task's download or generation, or drops a queued task before it starts.
let queue = Promise.resolve();
let current = null;
const dropped = new Set();
self.onmessage = (ev) => {
  const msg = ev.data;
  if (msg.type === 'lose-device') {
    engine?.loseDevice();
    return;
  }
  if (msg.type === 'cancel') {
    if (msg.target === current) {
      abort?.abort();
      engine?.cancel();
    } else {
      dropped.add(msg.target);
    }
    return;
  }
  queue = queue.then(async () => {
    current = msg.id;
    try {
      if (dropped.delete(msg.id)) throw cancelled();
      let result;
      if (msg.type === 'init') result = await initEngine(!!msg.cpu, !!msg.gpu, msg.threads ?? null, msg.variant ?? null);
      else if (msg.type === 'load') {
        result = await load(msg.id, msg.model);
      } else if (msg.type === 'generate') result = await generate(msg.id, msg.request);
      else if (msg.type === 'load-preview') result = await loadPreview(msg.id, msg.model);
      else if (msg.type === 'import') result = await importFiles(msg.id, msg.model, msg.files);
      else if (msg.type === 'unload') { if (loaded?.id === msg.model) loaded = null; result = null; }
      else if (msg.type === 'tokens') result = loaded ? { ...engine.countTokens(msg.prompt, !!msg.literal), model: loaded.id } : null;
      else if (msg.type === 'import-adapters') result = await importAdapters(msg.id, msg.files);
      else if (msg.type === 'adapters') result = await ensureEngine().then(syncAdapters);
      else if (msg.type === 'delete-adapter') result = await deleteAdapter(msg.path);
      else if (msg.type === 'grid-requests') result = lib.gridRequests(msg.base, msg.x, msg.y || undefined);
      else if (msg.type === 'grid-png') result = lib.gridPng(msg.cells, msg.x, msg.y || undefined, msg.parameters);
      else if (msg.type === 'walk-images') {
        result = { png: lib.stripPng(msg.frames, msg.parameters), gif: lib.animationGif(msg.frames, msg.frameMs || 250) };
      }
      else if (msg.type === 'bench-cpu') {
        await ensureEngine();
        result = await lib.Diagnostics.benchmarkCpu(msg.arch, msg.size, msg.narrow,
          (m) => post({ id: msg.id, type: 'progress', message: m }));
      }
      else throw new Error(`unknown message ${msg.type}`);
      const transfer = result?.rgba ? [result.rgba.buffer, result.png.buffer] : [];
      post({ id: msg.id, type: 'result', result }, transfer);
    } catch (e) {
      abort = null;
      // A lost device fails whatever ran on it; the browser reports the loss itself a moment later.
      const message = e?.message || String(e);
      if (engine && /GPU|device/.test(message)) {
        for (let i = 0; i < 40 && !engine.deviceLost(); i++) await new Promise((r) => setTimeout(r, 25));
      }
      const lost = engine?.deviceLost();
      if (lost) {
        dropEngine();
        post({ id: msg.id, type: 'error', name: 'DeviceLostError',
          message: `The GPU device was lost (${lost}). The next generation starts a new one and loads the model again.` });
      } else {
        post({ id: msg.id, type: 'error', name: e?.name || 'Error', message });
      }
    } finally {
      current = null;
    }
  });
};
post({ type: 'ready' });
