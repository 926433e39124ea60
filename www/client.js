// The page side of the model worker. One worker per page: the generator page and every <latent-gen> element
// on a page share it (and so share one device and one loaded model); requests run one after another.
const here = import.meta.url;

let shared = null;

/** The page's client, created on first use. `cpu`: force the CPU fallback; `gpu`: use WebGPU even on a
 * software adapter (SwiftShader and the like run far slower than the CPU path, so by default they don't);
 * `threads`: the CPU path's threads (default: one per core, up to 8, where the page is cross-origin isolated;
 * 1 keeps it on one thread). */
export function client(options = {}) {
  if (!shared) shared = new Client(options);
  return shared;
}

/**
 * The model worker. A page that loads this library from another origin (a site embedding the element from a
 * CDN) cannot start a worker from that origin's URL, so it starts one from a same-origin blob that imports the
 * module by URL (with CORS): the worker then runs with the page's origin, and the weight cache is the
 * embedding site's.
 */
function startWorker(url) {
  if (url.origin === location.origin) return new Worker(url, { type: 'module' });
  const source = `import ${JSON.stringify(url.href)};`;
  return new Worker(URL.createObjectURL(new Blob([source], { type: 'text/javascript' })), { type: 'module' });
}

/** Where the diagnostics page keeps the kernel variant the user chose for generations (`{ adapter, name }`, JSON). */
export const VARIANT_KEY = 'latent-gen:kernel-variant';

/** The kernel variant stored by the diagnostics page, or null (none, or storage this page cannot read). */
export function storedVariant() {
  try {
    const v = JSON.parse(localStorage.getItem(VARIANT_KEY) || 'null');
    return v && typeof v.adapter === 'string' && typeof v.name === 'string' ? v : null;
  } catch {
    return null;
  }
}

/** The CPU path's threads the page's address asks for (?threads=N), or null (one per core). */
export function threadsFromUrl() {
  const q = new URLSearchParams(location.search);
  return q.has('threads') ? Number(q.get('threads')) : null;
}

export class Client {
  constructor({ cpu = false, gpu = false, threads = null } = {}) {
    this.worker = startWorker(new URL('./worker.js', here));
    this.nextId = 1;
    this.pending = new Map();
    this.catalog = null;
    this.worker.onmessage = (ev) => this.onMessage(ev.data);
    this.worker.onerror = (ev) => this.failAll(new Error(`the model worker failed to start: ${ev.message || 'see the console'}`));
    this.ready = this.call({ type: 'init', cpu: cpu || !('gpu' in navigator), gpu, threads, variant: storedVariant() });
    this.current = null;
  }

  onMessage(msg) {
    const p = this.pending.get(msg.id);
    if (!p) return;
    if (msg.type === 'result') {
      this.pending.delete(msg.id);
      p.resolve(msg.result);
    } else if (msg.type === 'error') {
      this.pending.delete(msg.id);
      // The worker dropped the lost device's engine and model: the next request loads the model again.
      if (msg.name === 'DeviceLostError') this.loadedId = this.loadedKey = this.loadedInfo = null;
      p.reject(Object.assign(new Error(msg.message), { name: msg.name }));
    } else {
      p.onEvent?.(msg);
    }
  }

  failAll(err) {
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  call(msg, onEvent, signal) {
    const id = this.nextId++;
    if (signal) {
      if (signal.aborted) return Promise.reject(Object.assign(new Error('cancelled'), { name: 'AbortError' }));
      signal.addEventListener('abort', () => this.worker.postMessage({ type: 'cancel', target: id }), { once: true });
    }
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, onEvent });
      this.worker.postMessage({ ...msg, id });
    });
  }

  /** The catalog (www/models.json), with each model's base URL resolved against it. */
  async models() {
    if (!this.catalog) {
      const url = new URL('./models.json', here);
      const res = await fetch(url, { cache: 'no-store' });
      if (!res.ok) throw new Error(`cannot read the model catalog ${url}: ${res.status}`);
      const json = await res.json();
      this.catalog = json.models.map((m) => ({ ...m, catalogUrl: url.href }));
      this.decoders = (json.previewDecoders || []).map((m) => ({ ...m, kind: 'preview-decoder', catalogUrl: url.href }));
    }
    return this.catalog;
  }

  /** The catalog's preview decoders (TAESD), which models name in their `previewDecoder`. */
  async previewDecoders() {
    await this.models();
    return this.decoders;
  }

  /** Loads a catalog model (by id) or a model object into the worker, downloading what the cache lacks. */
  async load(model, onProgress, signal) {
    const m = typeof model === 'string' ? (await this.models()).find((x) => x.id === model) : model;
    if (!m) throw new Error(`unknown model "${model}": see models.json for the ones available`);
    await this.ready;
    const key = `${m.id}:${m.keep || ''}`;
    if (this.loadedKey === key && this.loadedInfo) return this.loadedInfo;
    // The worker drops its model when a load starts; so does this side, whatever the outcome.
    this.loadedId = this.loadedKey = this.loadedInfo = null;
    const info = await this.call({ type: 'load', model: m }, onProgress, signal);
    this.loadedId = m.id;
    this.loadedKey = key;
    this.loadedInfo = { ...info, model: m };
    return this.loadedInfo;
  }

  /**
   * Generates; `onStep({index, steps, stepsPerSec, preview})` after every step. Aborting `signal` cancels
   * this request only (its download, its generation, or its place in the queue).
   */
  async generate(model, request, onStep, onProgress, signal) {
    const info = await this.load(model, onProgress, signal);
    if (request.preview === 'taesd') await this.loadPreview(model, onProgress, signal);
    const req = {
      ...request,
      width: request.width || info.defaultSize,
      height: request.height || info.defaultSize,
    };
    return this.call({ type: 'generate', request: req }, onStep, signal);
  }

  /** Downloads and loads the TAESD decoder of `model` (its `previewDecoder`: a catalog id or an entry). */
  async loadPreview(model, onProgress, signal) {
    const ref = model.previewDecoder;
    const decoder = typeof ref === 'string' ? (await this.previewDecoders()).find((m) => m.id === ref) : ref;
    if (!decoder) throw new Error(`model "${model.id}" has no TAESD preview decoder: use the latent projection`);
    return this.call({ type: 'load-preview', model: decoder }, onProgress, signal);
  }

  /** The models one can generate with. */
  async generators() {
    return (await this.models()).filter((m) => m.kind !== 'preview-decoder');
  }

  /** Imports local files [{path, file}] as model `id` into the cache. */
  importFiles(id, files, onProgress) {
    return this.call({ type: 'import', model: id, files }, onProgress);
  }

  /** The loaded model's token count of `prompt`: {tokens, limit, cutOff, model}, or null before a load. */
  tokens(prompt, literal = false) {
    return this.call({ type: 'tokens', prompt, literal });
  }

  /** Imports LoRA and textual-inversion files (File objects) into the cache; resolves to their entries
   * ({path, size, kind: 'lora' | 'embedding', name, ...}). A file that is neither is refused with the reason. */
  async importAdapters(files, onProgress) {
    await this.ready;
    return this.call({ type: 'import-adapters', files }, onProgress);
  }

  /** The imported LoRAs and embeddings: [{path, size, kind, name, layers | vectors, ...}]. */
  async adapters() {
    await this.ready;
    return this.call({ type: 'adapters' });
  }

  /** Deletes an imported LoRA or embedding (by its file name). */
  deleteAdapter(path) {
    return this.call({ type: 'delete-adapter', path });
  }

  /** A sweep's cells: `base` (a request) with axis `x` ("KEY=V1,V2,...": seed, guidance, steps, scheduler,
   * strength, subseed-strength, or prompt=SEARCH,REPLACE...) and optionally `y`, row by row, as the CLI's
   * `grid` makes them; a bad axis or value is refused before any work. */
  async gridRequests(base, x, y) {
    await this.ready;
    return this.call({ type: 'grid-requests', base, x, y });
  }

  /** The sweep's grid PNG (Uint8Array) from its cells' images ({width, height, rgba}), labelled with the axes. */
  gridPng(cells, x, y, parameters) {
    return this.call({ type: 'grid-png', cells, x, y, parameters });
  }

  /** An interpolation's frames ({width, height, rgba}) as a strip PNG and a looping GIF: {png, gif}. */
  walkImages(frames, parameters, frameMs = 250) {
    return this.call({ type: 'walk-images', frames, parameters, frameMs });
  }

  /** Forgets the loaded model (after its files were deleted). */
  unload(id) {
    if (this.loadedId === id) this.loadedId = this.loadedKey = this.loadedInfo = null;
    return this.call({ type: 'unload', model: id });
  }
}

/** Decodes an image Blob (any format the browser reads) into RGBA pixels at its own size. */
export async function decodeImage(blob) {
  const bitmap = await createImageBitmap(blob);
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const g = canvas.getContext('2d');
  g.drawImage(bitmap, 0, 0);
  bitmap.close();
  const data = g.getImageData(0, 0, canvas.width, canvas.height);
  return { width: data.width, height: data.height, rgba: data.data };
}

/** "12.3 MB" */
export function formatBytes(n) {
  if (n == null) return '?';
  const units = ['B', 'kB', 'MB', 'GB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

/** Paints an {width, height, rgba} image on a 2D canvas, resizing the canvas to it. */
export function paint(canvas, img) {
  canvas.width = img.width;
  canvas.height = img.height;
  const data = new ImageData(new Uint8ClampedArray(img.rgba.buffer, img.rgba.byteOffset, img.width * img.height * 4), img.width, img.height);
  canvas.getContext('2d').putImageData(data, 0, 0);
}
