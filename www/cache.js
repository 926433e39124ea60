// The weight cache: model files in IndexedDB, stored in chunks so that no multi-gigabyte file is ever one
// ArrayBuffer. Used by the worker (downloads, imports, loading) and by the page (listing, deleting).
//
// Stores:
//   files  key "<model>/<path>": { key, model, path, size, sha256, received, chunks, complete, source }
//          `received` and `chunks` only count chunks already written, so a download resumes at `received` with
//          a Range request after a reload or a dropped connection. `complete` is set only after the size (and the
//          sha256, where the catalog has one) was verified.
//   chunks key "<model>/<path>#<index>": Blob of at most CHUNK bytes (shorter where a dropped connection
//          or the end of the file flushed early)

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
const chunkKey = (key, i) => `${key}#${i}`;

/** The record of one file, or undefined. */
export async function getFile(model, path) {
  const db = await openDb();
  return request(db.transaction('files').objectStore('files').get(fileKey(model, path)));
}

/** Every file record, grouped by model: Map model -> records. */
export async function listFiles() {
  const db = await openDb();
  const all = await request(db.transaction('files').objectStore('files').getAll());
  const models = new Map();
  for (const rec of all) {
    if (!models.has(rec.model)) models.set(rec.model, []);
    models.get(rec.model).push(rec);
  }
  return models;
}

/** Deletes a file's record and chunks. */
export async function deleteFile(model, path) {
  const db = await openDb();
  const key = fileKey(model, path);
  const tx = db.transaction(['files', 'chunks'], 'readwrite');
  tx.objectStore('files').delete(key);
  tx.objectStore('chunks').delete(IDBKeyRange.bound(`${key}#`, `${key}#\uffff`));
  await txDone(tx, `deleting ${key}`);
}

/** Deletes every file of a model. */
export async function deleteModel(model) {
  const files = (await listFiles()).get(model) || [];
  for (const rec of files) await deleteFile(model, rec.path);
}

/**
 * Writes files chunk by chunk. `append(bytes)` buffers and stores each full chunk together with the new
 * `received` count (one transaction), so what is stored is always a prefix of the file that a resume can
 * continue from.
 */
export class ChunkWriter {
  constructor(record) {
    this.rec = record;
    this.buf = new Uint8Array(CHUNK);
    this.fill = 0;
  }

  static async open(model, path, meta) {
    const db = await openDb();
    let rec = await getFile(model, path);
    const fresh = !rec || rec.complete || rec.size !== meta.size || rec.sha256 !== meta.sha256;
    if (fresh) {
      if (rec) await deleteFile(model, path);
      rec = { key: fileKey(model, path), model, path, size: meta.size, sha256: meta.sha256 || null,
        received: 0, chunks: 0, complete: false, source: meta.source || 'download' };
      const tx = db.transaction('files', 'readwrite');
      tx.objectStore('files').put(rec);
      await txDone(tx, `starting ${rec.key}`);
    }
    return new ChunkWriter(rec);
  }

  get received() { return this.rec.received + this.fill; }

  /** Drops everything stored so far (the server ignored a Range request). */
  async restart() {
    const { model, path } = this.rec;
    await deleteFile(model, path);
    this.rec = { ...this.rec, received: 0, chunks: 0, complete: false };
    this.fill = 0;
    const db = await openDb();
    const tx = db.transaction('files', 'readwrite');
    tx.objectStore('files').put(this.rec);
    await txDone(tx, `restarting ${this.rec.key}`);
  }

  async append(bytes) {
    let off = 0;
    while (off < bytes.length) {
      const n = Math.min(CHUNK - this.fill, bytes.length - off);
      this.buf.set(bytes.subarray(off, off + n), this.fill);
      this.fill += n;
      off += n;
      if (this.fill === CHUNK) await this.flush();
    }
  }

  /** Stores the buffered bytes as the next chunk. */
  async flush() {
    if (this.fill === 0) return;
    const db = await openDb();
    const index = this.rec.chunks;
    const rec = { ...this.rec, received: this.rec.received + this.fill, chunks: index + 1 };
    const tx = db.transaction(['files', 'chunks'], 'readwrite');
    tx.objectStore('chunks').put(new Blob([this.buf.slice(0, this.fill)]), chunkKey(rec.key, index));
    tx.objectStore('files').put(rec);
    await txDone(tx, `saving ${rec.key}`);
    this.rec = rec;
    this.fill = 0;
  }

  /**
   * Checks the stored file against its expected size and sha256 (`hasher`: { update(bytes), hex() }) and marks
   * it complete. On a mismatch the file is deleted and the error says what was wrong.
   */
  async finish(hasher, label) {
    await this.flush();
    const { rec } = this;
    if (rec.size != null && rec.received !== rec.size) {
      throw new Error(`${label}: received ${rec.received} bytes, expected ${rec.size}; the download will resume`);
    }
    if (rec.sha256) {
      for await (const bytes of readChunks(rec)) hasher.update(bytes);
      const got = hasher.hex();
      if (got !== rec.sha256) {
        await deleteFile(rec.model, rec.path);
        throw new Error(`${label} failed verification: its sha256 is ${got}, expected ${rec.sha256}. ` +
          'The file was discarded and nothing was cached; the source may have changed or the data was corrupted.');
      }
    }
    const db = await openDb();
    const done = { ...rec, size: rec.received, complete: true };
    const tx = db.transaction('files', 'readwrite');
    tx.objectStore('files').put(done);
    await txDone(tx, `finishing ${rec.key}`);
    this.rec = done;
  }
}

/** Yields a stored file's chunks in order, as Uint8Arrays. */
export async function* readChunks(rec) {
  const db = await openDb();
  for (let i = 0; i < rec.chunks; i++) {
    const blob = await request(db.transaction('chunks').objectStore('chunks').get(chunkKey(rec.key, i)));
    if (!blob) throw new Error(`${rec.key}: chunk ${i} is missing from the cache; delete the model and download it again`);
    yield new Uint8Array(await blob.arrayBuffer());
  }
}

/**
 * A complete file as one Blob made of its stored chunks: nothing is read yet (the wasm side reads the
 * byte ranges it needs, one tensor at a time).
 */
export async function fileBlob(rec) {
  const db = await openDb();
  const store = db.transaction('chunks').objectStore('chunks');
  const parts = await Promise.all([...Array(rec.chunks).keys()].map((i) => request(store.get(chunkKey(rec.key, i)))));
  const missing = parts.findIndex((p) => !p);
  if (missing >= 0) throw new Error(`${rec.key}: chunk ${missing} is missing from the cache; delete the model and download it again`);
  const blob = new Blob(parts);
  if (blob.size !== rec.received) throw new Error(`${rec.key}: the cache holds ${blob.size} bytes, expected ${rec.received}`);
  return blob;
}
