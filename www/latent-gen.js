// <latent-gen>: a text-to-image generator any page embeds with one script tag:
//
//   <script type="module" src="https://your-host/latent-gen.js"></script>
//   <latent-gen prompt="a red square on a green background" seed="7"></latent-gen>
//
// Attributes: model, keep (how its weights are kept in the cache: one of the catalog entry's "store", e.g.
// q4_0; the first is the default), preview ("latent", or "taesd" for models with a previewDecoder), prompt,
// negative-prompt, long-prompt ("chunks": prompts past 75 tokens in 75-token chunks, as A1111), seed, subseed
// and subseed-strength (a variation), init-image (the URL of an image to start
// from: img2img; fetched with CORS from another origin) and strength, steps, guidance, width, height,
// scheduler, lora (LoRAs imported on this site, "NAME[:SCALE], ...", as the prompt's <lora:NAME:SCALE> tags do),
// and autostart (generate once connected). Methods: generate() (resolves to the PNG Blob),
// interpolate({toSeed, toPrompt, toNegativePrompt, frames}) (resolves to an array of PNG Blobs), cancel().
// Events: progress (download/load progress), step (detail.preview: {width, height, rgba}; detail.frame while
// interpolating), frame (detail.blob, detail.t: each interpolation frame), done (detail.blob,
// detail.parameters), error (detail.message). Parts for ::part(): preview, button, status.
// Every element on a page shares one worker and one loaded model (client.js).
import { client, decodeImage, paint } from './client.js';

/** Fetches an image URL and decodes it into RGBA pixels at its own size. */
async function imagePixels(url) {
  const response = await fetch(new URL(url, document.baseURI));
  if (!response.ok) throw new Error(`the init-image ${url} could not be fetched (HTTP ${response.status})`);
  const blob = await response.blob();
  return decodeImage(blob).catch(() => {
    throw new Error(`the init-image ${url} is not an image the browser can read`);
  });
}

// The shadow root's styles as a constructed stylesheet (not a <style> element), so that pages with a strict
// Content-Security-Policy (no 'unsafe-inline' styles) can embed the element.
const sheet = new CSSStyleSheet();
sheet.replaceSync(`
  :host { display: inline-block; font: 14px system-ui, sans-serif; }
  .box { display: grid; gap: 6px; width: var(--latent-gen-size, 256px); }
  canvas { width: 100%; aspect-ratio: 1; image-rendering: pixelated; background: #8882; border-radius: 4px; }
  .row { display: flex; gap: 6px; align-items: center; }
  .status { flex: 1; font-size: 12px; opacity: 0.8; overflow-wrap: anywhere; }
  button { font: inherit; }
`);

const template = document.createElement('template');
template.innerHTML = `
<div class="box">
  <canvas part="preview" width="64" height="64"></canvas>
  <div class="row">
    <button part="button" type="button">Generate</button>
    <span class="status" part="status" role="status"></span>
  </div>
</div>`;

export class LatentGen extends HTMLElement {
  constructor() {
    super();
    const root = this.attachShadow({ mode: 'open' });
    root.adoptedStyleSheets = [sheet];
    root.append(template.content.cloneNode(true));
    this.canvas = root.querySelector('canvas');
    this.button = root.querySelector('button');
    this.statusEl = root.querySelector('.status');
    this.running = null;
    this.button.addEventListener('click', () => (this.running ? this.cancel() : this.generate().catch(() => {})));
  }

  connectedCallback() {
    this.setStatus('idle', '');
    if (this.hasAttribute('autostart')) this.generate().catch(() => {});
  }

  setStatus(state, text) {
    this.dataset.state = state;
    this.statusEl.textContent = text; // text only, never HTML
  }

  num(name, fallback) {
    const v = this.getAttribute(name);
    if (v == null || v === '') return fallback;
    const n = Number(v);
    if (!Number.isFinite(n)) throw new Error(`the ${name} attribute must be a number, not "${v}"`);
    return n;
  }

  /** The `lora` attribute: "NAME[:SCALE], ..." as [{name, scale}] (scale 1 when absent). */
  loras() {
    const attr = this.getAttribute('lora');
    if (!attr) return undefined;
    return attr.split(',').map((s) => s.trim()).filter(Boolean).map((item) => {
      const m = /^(.+?)(?::([^:]+))?$/.exec(item);
      const scale = m[2] == null ? 1 : Number(m[2]);
      if (!Number.isFinite(scale)) throw new Error(`the lora attribute's scale for "${m[1]}" must be a number, not "${m[2]}"`);
      return { name: m[1].trim(), scale };
    });
  }

  /** The request the attributes describe, with the model's defaults filling the gaps. */
  async request() {
    const c = client();
    const models = await c.generators();
    const id = this.getAttribute('model') || models[0].id;
    const model = models.find((m) => m.id === id);
    if (!model) throw new Error(`unknown model "${id}"`);
    const keep = this.getAttribute('keep') || undefined;
    const choices = model.store?.length ? model.store : ['original'];
    if (keep && !choices.includes(keep)) {
      throw new Error(`the keep attribute of model "${id}" must be one of ${choices.join(', ')}, not "${keep}"`);
    }
    const d = model.defaults || {};
    const seedAttr = this.getAttribute('seed');
    const initUrl = this.getAttribute('init-image');
    const init = initUrl ? { strength: this.num('strength', 0.75), init_images: [{ ...(await imagePixels(initUrl)), weight: 1 }] } : {};
    return {
      model: { ...model, keep },
      request: {
        prompt: this.getAttribute('prompt') || '',
        negative_prompt: this.getAttribute('negative-prompt') || '',
        seed: seedAttr == null || seedAttr === '' ? crypto.getRandomValues(new Uint32Array(1))[0] : this.num('seed') >>> 0,
        steps: this.num('steps', d.steps || 20),
        guidance: this.num('guidance', d.guidance ?? 7.5),
        width: this.num('width', d.width || 0) || undefined,
        height: this.num('height', d.height || 0) || undefined,
        scheduler: this.getAttribute('scheduler') || d.scheduler || undefined,
        preview: this.getAttribute('preview') || undefined,
        subseed: this.hasAttribute('subseed') ? this.num('subseed') >>> 0 : undefined,
        subseed_strength: this.num('subseed-strength', 0),
        long_prompt: this.getAttribute('long-prompt') === 'chunks' ? 'chunks' : undefined,
        loras: this.loras(),
        ...init,
      },
    };
  }

  /** Generates with the current attributes; resolves to the PNG Blob (parameters embedded). */
  async generate() {
    return this.run(async (model, request, c) => {
      const image = await c.generate(model, request, (st) => this.onStep(st), (p) => this.onProgress(p), this.abort.signal);
      paint(this.canvas, image);
      const blob = new Blob([image.png], { type: 'image/png' });
      this.setStatus('done', `Seed ${request.seed}`);
      this.dispatchEvent(new CustomEvent('done', { detail: { blob, parameters: image.parameters, width: image.width, height: image.height, seed: request.seed } }));
      return blob;
    });
  }

  /**
   * A walk through latent space from the attributes' image toward another seed and/or prompt: `frames`
   * images (the ends included: the first equals generate()'s, the last the far end's), the initial noise
   * interpolated spherically and the prompts' embeddings linearly. Resolves to an array of PNG Blobs; `step`
   * and `progress` events carry `detail.frame`, and a `frame` event fires with each Blob.
   */
  async interpolate({ toSeed, toPrompt, toNegativePrompt, frames = 8 } = {}) {
    if (!Number.isInteger(frames) || frames < 2 || frames > 256) throw new Error(`frames must be a whole number from 2 to 256, not ${frames}`);
    return this.run(async (model, request, c) => {
      if (request.init_images) throw new Error('interpolate does not take an init-image');
      const to = {
        seed: toSeed == null ? request.seed : Number(toSeed) >>> 0,
        prompt: toPrompt ?? request.prompt,
        negative_prompt: toNegativePrompt ?? request.negative_prompt,
      };
      const blobs = [];
      for (let frame = 0; frame < frames; frame++) {
        const t = frame / (frames - 1);
        const image = await c.generate(model, { ...request, interpolate: { ...to, t } },
          (st) => this.onStep(st, frame), (p) => this.onProgress(p, frame), this.abort.signal);
        paint(this.canvas, image);
        const blob = new Blob([image.png], { type: 'image/png' });
        blobs.push(blob);
        this.setStatus('generating', `Frame ${frame + 1}/${frames}`);
        this.dispatchEvent(new CustomEvent('frame', { detail: { frame, frames, t, blob, parameters: image.parameters } }));
      }
      this.setStatus('done', `${frames} frames, seed ${request.seed} to ${to.seed}`);
      return blobs;
    });
  }

  onStep(st, frame) {
    paint(this.canvas, st.preview);
    this.setStatus('generating', `${frame == null ? '' : `Frame ${frame + 1}: `}Step ${st.index + 1}/${st.steps}`);
    this.dispatchEvent(new CustomEvent('step', { detail: { index: st.index, steps: st.steps, preview: st.preview, frame } }));
  }

  onProgress(p, frame) {
    if (p.phase === 'download') this.setStatus('downloading', `Downloading ${Math.round((100 * p.received) / (p.total || 1))}%`);
    else if (p.phase === 'wait') this.setStatus('waiting', 'Waiting for another tab');
    this.dispatchEvent(new CustomEvent('progress', { detail: { ...p, frame } }));
  }

  /** Runs `work(model, request, client)` as this element's one task, with status, cancel and error events. */
  async run(work) {
    if (this.running) return this.running;
    this.button.textContent = 'Cancel';
    this.abort = new AbortController();
    this.running = (async () => {
      try {
        const { model, request } = await this.request();
        this.setStatus('loading', 'Loading the model…');
        return await work(model, request, client());
      } catch (e) {
        const message = e?.message || String(e);
        this.setStatus(message === 'cancelled' ? 'cancelled' : 'error', message === 'cancelled' ? 'Cancelled' : message);
        this.dispatchEvent(new CustomEvent('error', { detail: { message } }));
        throw e;
      } finally {
        this.running = null;
        this.button.textContent = 'Generate';
      }
    })();
    return this.running;
  }

  /** Cancels this element's generation (the shared worker stops after its current step). */
  cancel() {
    this.abort?.abort();
  }
}

if (!customElements.get('latent-gen')) customElements.define('latent-gen', LatentGen);
