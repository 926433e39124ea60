// The weight cache: model files in the origin private file system (OPFS), one file per model file, with their
// records in IndexedDB. Used by the worker (downloads, imports, loading) and by the page (listing, deleting).
//
// Records (IndexedDB store "files", key "<model>/<path>"):
//   { key, model, path, size, sha256, received, complete, source, store: 'opfs' }
//   `received` counts only bytes already flushed to the file, so a download resumes at `received` with a Range
//   request after a reload or a dropped connection (the file is cut back to it first). `complete` is set only
//   after the size (and the sha256, where the catalog has one) was verified.
// Data: OPFS file latent-gen/<encodeURIComponent(key)>, written in place through a sync access handle (the
//   worker only), read back as the File OPFS hands out: disk-backed, so the wasm side reads the byte ranges it
//   needs without the browser holding the file in memory. (Earlier versions kept 8 MiB Blob chunks in an
//   IndexedDB store "chunks"; Chromium caps in-memory Blob data near 512 MiB and collects the chunk Blobs a
//   download creates too late, which left large downloads unreadable. Such records are ignored and removed.)

const DB_NAME = 'latent-gen';
const DB_VERSION = 1;
export const CHUNK = 8 << 20;

let dbPromise = null;

/** The database, opened once per global. */
export function openDb() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      const req = indexedDB.open(DB_NAME, DB_VERSION);
      req.onupgradeneeded = () => {
        const db = req.result;
        if (!db.objectStoreNames.contains('files')) {
          db.createObjectStore('files', { keyPath: 'key' }).createIndex('model', 'model');
        }
        if (!db.objectStoreNames.contains('chunks')) db.createObjectStore('chunks');
      };
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(storageError(req.error, 'opening the model cache'));
      req.onblocked = () => reject(new Error('the model cache is being upgraded in another tab: close other latent-gen tabs and reload'));
    });
    dbPromise.catch(() => { dbPromise = null; });
  }
  return dbPromise;
}

/** A clear message for IndexedDB failures, QuotaExceededError above all. */
export function storageError(err, what) {
  if (err?.name === 'QuotaExceededError') {
    const e = new Error(`The browser refused to store more data while ${what} (storage quota exceeded). Delete cached ` +
      'models in the models panel or free disk space, then try again. The partial file was not marked usable.');
    e.name = 'QuotaExceededError';
    return e;
  }
  return new Error(`the model cache failed while ${what}: ${err?.message || err}`);
}

function txDone(tx, what) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(storageError(tx.error, what));
    tx.onabort = () => reject(storageError(tx.error, what));
  });
}

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

export const fileKey = (model, path) => `${model}/${path}`;

/** The cache's "model" that holds imported LoRAs and textual-inversion embeddings (one file each, by its name);
 * no model id can take it (catalog ids are words, imported ones start with "local-"). */
export const ADAPTERS = '#adapters';

/** The one-file GGUF a model is kept in once converted to `type` (q4_0, q8_0 or f16), and its pattern. */
export const convertedPath = (type) => `model.${type}.gguf`;
export const CONVERTED = /^model\.(q4_0|q8_0|f16)\.gguf$/;

/** The OPFS folder holding the cached files. */
async function opfsDir() {
  if (!navigator.storage?.getDirectory) {
    throw new Error('this browser has no origin private file system (navigator.storage.getDirectory), which the model cache needs');
  }
  return (await navigator.storage.getDirectory()).getDirectoryHandle('latent-gen', { create: true });
}

const opfsName = (key) => encodeURIComponent(key);

/** A record written by this version (data in OPFS); older ones are not used. */
const current = (rec) => rec && rec.store === 'opfs';

/** The record of one file, or undefined. */
export async function getFile(model, path) {
  const db = await openDb();
  const rec = await request(db.transaction('files').objectStore('files').get(fileKey(model, path)));
  return current(rec) ? rec : undefined;
}

/** Every file record, grouped by model: Map model -> records. */
export async function listFiles() {
  const db = await openDb();
  const all = (await request(db.transaction('files').objectStore('files').getAll())).filter(current);
  const models = new Map();
  for (const rec of all) {
    if (!models.has(rec.model)) models.set(rec.model, []);
    models.get(rec.model).push(rec);
  }
  return models;
}

/** Deletes a file's record and data (and any chunks an earlier version stored). */
export async function deleteFile(model, path) {
  const db = await openDb();
  const key = fileKey(model, path);
  const tx = db.transaction(['files', 'chunks'], 'readwrite');
  tx.objectStore('files').delete(key);
  tx.objectStore('chunks').delete(IDBKeyRange.bound(`${key}#`, `${key}#\uffff`));
  await txDone(tx, `deleting ${key}`);
  try {
    await (await opfsDir()).removeEntry(opfsName(key));
  } catch (e) {
    if (e?.name !== 'NotFoundError') throw storageError(e, `deleting ${key}`);
  }
}

/** Deletes every file of a model (waiting for any tab that is downloading or loading it). */
export async function deleteModel(model, { signal, onWait } = {}) {
  await withModelLock(model, 'exclusive', async () => {
    const files = (await listFiles()).get(model) || [];
    for (const rec of files) await deleteFile(model, rec.path);
  }, { signal, onWait });
}

/**
 * Runs `work()` holding a model's cache lock (Web Locks, shared by every tab and worker of this origin):
 * 'exclusive' to write its files (download, import, conversion, deletion), 'shared' to read them (loading), so
 * two tabs never write one file at once and nobody deletes what another is reading. `onWait()` is called when
 * another holder makes it wait; aborting `signal` gives up waiting (an AbortError named 'cancelled').
 */
export async function withModelLock(model, mode, work, { signal, onWait } = {}) {
  if (!navigator.locks) return work(); // (every browser with WebGPU has Web Locks)
  const name = `latent-gen:model:${model}`;
  let ran = false;
  let result;
  await navigator.locks.request(name, { mode, ifAvailable: true }, async (lock) => {
    if (!lock) return;
    ran = true;
    result = await work();
  });
  if (ran) return result;
  onWait?.();
  try {
    return await navigator.locks.request(name, { mode, signal }, () => work());
  } catch (e) {
    if (signal?.aborted) throw Object.assign(new Error('cancelled'), { name: 'AbortError' });
    throw e;
  }
}

/**
 * Writes a file in place (worker only: OPFS sync access handles). `append(bytes)` writes at once and records
 * the new `received` count every CHUNK bytes, so what the record counts is always a prefix of the file that a
 * resume can continue from. `close()` releases the file (also done by `finish()`).
 */
export class ChunkWriter {
  constructor(record, handle) {
    this.rec = record;
    this.handle = handle;
    this.fill = 0; // bytes written past rec.received, not yet recorded
  }

  static async open(model, path, meta) {
    const db = await openDb();
    let rec = await getFile(model, path);
    const fresh = !rec || rec.complete || rec.size !== meta.size || rec.sha256 !== (meta.sha256 || null);
    if (fresh) {
      await deleteFile(model, path);
      rec = { key: fileKey(model, path), model, path, size: meta.size, sha256: meta.sha256 || null,
        received: 0, complete: false, source: meta.source || 'download', store: 'opfs' };
      const tx = db.transaction('files', 'readwrite');
      tx.objectStore('files').put(rec);
      await txDone(tx, `starting ${rec.key}`);
    }
    let handle;
    let lost = false;
    try {
      const fh = await (await opfsDir()).getFileHandle(opfsName(rec.key), { create: true });
      handle = await fh.createSyncAccessHandle();
      lost = handle.getSize() < rec.received; // the recorded prefix is gone (evicted): start over
      handle.truncate(lost ? 0 : rec.received); // drop what was written but never recorded
    } catch (e) {
      handle?.close();
      throw storageError(e, `opening ${rec.key} for writing`);
    }
    const writer = new ChunkWriter(rec, handle);
    if (lost) await writer.restart();
    return writer;
  }

  get received() { return this.rec.received + this.fill; }

  /** Drops everything stored so far (the server ignored a Range request). */
  async restart() {
    this.handle.truncate(0);
    this.rec = { ...this.rec, received: 0, complete: false };
    this.fill = 0;
    await this.record(`restarting ${this.rec.key}`);
  }

  /** Writes `bytes` at the end without recording them: call `flush()` after (the conversion's writes). */
  writeSync(bytes) {
    let written;
    try {
      written = this.handle.write(bytes, { at: this.received });
    } catch (e) {
      throw storageError(e, `saving ${this.rec.key}`);
    }
    // A short (or, in Chromium, a wrapped negative) count means the disk or the quota is full.
    if (written !== bytes.length) {
      throw storageError(Object.assign(new Error('no space left'), { name: 'QuotaExceededError' }), `saving ${this.rec.key}`);
    }
    this.fill += written;
  }

  async append(bytes) {
    this.writeSync(bytes);
    if (this.fill >= CHUNK) await this.flush();
  }

  /** Makes the written bytes durable and records them. */
  async flush() {
    if (this.fill === 0) return;
    try {
      this.handle.flush();
    } catch (e) {
      throw storageError(e, `saving ${this.rec.key}`);
    }
    this.rec = { ...this.rec, received: this.rec.received + this.fill };
    this.fill = 0;
    await this.record(`saving ${this.rec.key}`);
  }

  async record(what) {
    const db = await openDb();
    const tx = db.transaction('files', 'readwrite');
    tx.objectStore('files').put(this.rec);
    await txDone(tx, what);
  }

  close() {
    try { this.handle?.close(); } catch { /* already closed */ }
    this.handle = null;
  }

  /**
   * Checks the stored file against its expected size and sha256 (`hasher`: { update(bytes), hex() }) and marks
   * it complete. On a mismatch the file is deleted and the error says what was wrong.
   */
  async finish(hasher, label) {
    await this.flush();
    const { rec } = this;
    try {
      if (rec.size != null && rec.received !== rec.size) {
        throw new Error(`${label}: received ${rec.received} bytes, expected ${rec.size}; the download will resume`);
      }
      if (rec.sha256) {
        const buf = new Uint8Array(CHUNK);
        for (let at = 0; at < rec.received; at += CHUNK) {
          const n = this.handle.read(buf.subarray(0, Math.min(CHUNK, rec.received - at)), { at });
          hasher.update(buf.subarray(0, n));
        }
        const got = hasher.hex();
        if (got !== rec.sha256) {
          this.close();
          await deleteFile(rec.model, rec.path);
          throw new Error(`${label} failed verification: its sha256 is ${got}, expected ${rec.sha256}. ` +
            'The file was discarded and nothing was cached; the source may have changed or the data was corrupted.');
        }
      }
    } finally {
      this.close();
    }
    this.rec = { ...rec, size: rec.received, complete: true };
    await this.record(`finishing ${rec.key}`);
  }
}

/** Yields a stored file's bytes in CHUNK pieces, as Uint8Arrays. */
export async function* readChunks(rec) {
  const file = await fileBlob(rec);
  for (let at = 0; at < file.size; at += CHUNK) {
    yield new Uint8Array(await file.slice(at, at + CHUNK).arrayBuffer());
  }
}

/**
 * A complete file as the disk-backed File OPFS hands out: nothing is read yet (the wasm side reads the byte
 * ranges it needs, one block of a tensor at a time).
 */
export async function fileBlob(rec) {
  let file;
  try {
    file = await (await (await opfsDir()).getFileHandle(opfsName(rec.key))).getFile();
  } catch (e) {
    throw missing(`${rec.key} is missing from the cache (${e?.name || e})`);
  }
  if (file.size !== rec.received) throw missing(`${rec.key}: the cache holds ${file.size} bytes, expected ${rec.received}`);
  return file;
}

/** A cached file that is gone or cut short (the browser evicted storage, or it was cleared): 'EvictedError'. */
function missing(what) {
  return Object.assign(new Error(`${what}; the browser may have evicted the cache: download or import the model again`),
    { name: 'EvictedError' });
}
