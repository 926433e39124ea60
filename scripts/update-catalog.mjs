// Rewrites the bundled models' file lists (path, size, sha256) in www/models.json from the files on disk, so
// the catalog verifies exactly what is shipped. The e2e tests fail when it is stale.
// Usage: node scripts/update-catalog.mjs
import { createHash } from 'node:crypto';
import { readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const www = resolve(fileURLToPath(import.meta.url), '..', '..', 'www');

/** The files a pipeline needs under `dir`, relative, sorted (README.md and samples are not loaded). */
export async function modelFiles(dir) {
  const out = [];
  const walk = async (d) => {
    for (const e of await readdir(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else if (!/^(README\.md|samples?.*\.png)$/.test(e.name)) out.push(relative(dir, p));
    }
  };
  await walk(dir);
  return out.sort();
}

export async function describe(dir) {
  const files = [];
  for (const path of await modelFiles(dir)) {
    const bytes = await readFile(join(dir, path));
    files.push({ path, size: (await stat(join(dir, path))).size, sha256: createHash('sha256').update(bytes).digest('hex') });
  }
  return files;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const path = join(www, 'models.json');
  const catalog = JSON.parse(await readFile(path, 'utf8'));
  for (const m of catalog.models.filter((m) => m.bundled)) {
    m.files = await describe(join(www, m.base));
    console.log(`${m.id}: ${m.files.length} files, ${m.files.reduce((s, f) => s + f.size, 0)} bytes`);
  }
  await writeFile(path, `${JSON.stringify(catalog, null, 2)}\n`);
}
