// Times src/lib.rs's GEMM in Node (V8, as in Chromium) on the shapes the browser CPU benchmark's UNet (SD 1.5 at
// a fifth of its widths, 256x256) multiplies: its 3x3 convs as im2col GEMMs (cout x pixels x 9 cin), attention's
// projections and scores. Prints GFLOP/s per shape.
import { readFileSync } from 'node:fs';

const wasm = new URL('target/wasm32-unknown-unknown/release/wasm_gemm_bench.wasm', import.meta.url);
const { instance } = await WebAssembly.instantiate(readFileSync(wasm), {});
const shapes = [[64, 1024, 576], [64, 2048, 576], [128, 256, 1152], [256, 64, 2304], [256, 16, 2304],
  [1024, 64, 64], [1024, 1024, 64], [1024, 77, 64], [512, 512, 512], [1024, 1024, 1024]];
console.log('| m x n x k | GFLOP/s |\n|---|---|');
for (const [m, n, k] of shapes) {
  instance.exports.run(m, n, k, 1);
  const reps = Math.max(3, Math.round(2e9 / (2 * m * n * k)));
  const t = performance.now();
  instance.exports.run(m, n, k, reps);
  const s = (performance.now() - t) / 1000 / reps;
  console.log(`| ${m} x ${n} x ${k} | ${((2 * m * n * k) / s / 1e9).toFixed(1)} |`);
}
