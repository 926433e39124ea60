#!/usr/bin/env python3
"""Compose scripts/bench-gpu's results into one markdown table: latent-gen (bench pipeline / bench kernels
JSON, one file per configuration) beside PyTorch (torch_baseline.py's JSON), with issue 11's targets.

    python3 scripts/bench/table.py DIR > DIR/bench.md

DIR holds info.txt (`latent-gen info`), kernels.json, kernels-<variant>.json,
pipeline-<arch>-<act>-<weights>[-nocoop|-splitk].json and torch.json; missing files leave their cells empty
("-"). On a GPU with cooperative matrices the f16 rows use them; the -nocoop files (`--no-coop`) are the same
configurations on the portable kernels, the -splitk ones with `--split-k N`.
"""

import glob
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ms(v):
    return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def main():
    d = sys.argv[1]
    info = open(os.path.join(d, "info.txt")).read().strip() if os.path.exists(os.path.join(d, "info.txt")) else ""
    torch = load(os.path.join(d, "torch.json")) or {"results": []}
    ours = {}
    for p in glob.glob(os.path.join(d, "pipeline-*.json")):
        r = load(p)
        if r:
            name = os.path.basename(p)
            portable = r["act"] == "f16" and not r.get("coop", False) and "nocoop" in name
            variant = " portable" if portable else (" split-K" if "splitk" in name else "")
            ours[(r["arch"], r["act"], r["weights"] + variant)] = r
    kernels = load(os.path.join(d, "kernels.json")) or []

    def pt(workload, dtype):
        for r in torch["results"]:
            if r["workload"] == workload and r["dtype"] == dtype:
                return r["ms"]
        return None

    configs = [("f32", "f32"), ("f16", "f16"), ("f16", "q4_0")]
    # The same f16 configuration with --no-coop (every GEMM on the portable kernels), and configurations
    # with --split-k, where they were run.
    configs += sorted({(a, w) for (_, a, w) in ours if w.endswith((" portable", " split-K"))})
    header = ["workload"] + [f"latent-gen {a} act, {w} weights" for a, w in configs] + [
        "PyTorch fp32", "PyTorch fp16", "target"]
    rows = []

    def row(name, arch, field, torch_name, target="", combine=None):
        cells = [name]
        for a, w in configs:
            r = ours.get((arch, a, w))
            v = None
            if r is not None:
                v = combine(r) if combine else r.get(field)
            cells.append(ms(v))
        cells += [ms(pt(torch_name, "fp32")), ms(pt(torch_name, "fp16")), target]
        rows.append(cells)

    row("SD 1.5 UNet CFG step (batch 2), ms", "Sd15", "unet_cfg_step_ms", "sd15 unet cfg step (batch 2)",
        "<= 72 (PyTorch fp32), then <= 48")
    row("SD 1.5 UNet step (batch 1), ms", "Sd15", "unet_step_b1_ms", "sd15 unet step (batch 1)")
    row("SD 1.5 CLIP (batch 2), ms", "Sd15", "clip_ms", "sd15 clip batch 2")
    size = torch.get("size") or next((r["width"] for r in ours.values()), 512)
    row(f"VAE decode {size}x{size}, ms", "Sd15", "vae_decode_ms", "vae decode")
    row(f"TAESD decode {size}x{size}, ms", "Sd15", "taesd_decode_ms", "taesd decode")
    row("SD 1.5 20 steps (CLIP + 20 CFG steps + VAE), ms", "Sd15", None,
        "sd15 20 steps (clip + 20 cfg steps + vae)", "<= 1500",
        combine=lambda r: r["clip_ms"] + 20 * r["unet_cfg_step_ms"] + r["vae_decode_ms"])
    row("SD-Turbo text to pixels (CLIP + 1 step + VAE), ms", "SdTurbo", None,
        "sd-turbo text to pixels (clip + 1 step + vae)", "<= 100",
        combine=lambda r: r["clip_ms"] / 2 + r["unet_step_b1_ms"] + r["vae_decode_ms"])
    row("SD-Turbo UNet step (batch 1), ms", "SdTurbo", "unet_step_b1_ms", "sd-turbo unet step (batch 1)")

    out = []
    out.append(f"GPU: {torch.get('device', '?')}, driver {torch.get('driver', '?')}; measured {torch.get('date', '?')} "
               f"by `scripts/bench-gpu` (PyTorch {torch.get('torch', '?')}, diffusers {torch.get('diffusers', '?')}, "
               f"TF32 off; random weights, {torch.get('size', 512)}x{torch.get('size', 512)}, 77 tokens).")
    out.append("")
    if info:
        out.append("```")
        out.append(info)
        out.append("```")
        out.append("")
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for r in rows:
        out.append("| " + " | ".join(r) + " |")
    out.append("")
    # Memory and cost per configuration.
    out.append("| configuration | peak GPU memory (pool) | UNet step dispatches | UNet step bytes (x minimum) | "
               "UNet step GFLOP | UNet step GPU time (timestamps) |")
    out.append("|---|---|---|---|---|---|")
    for (arch, a, w), r in sorted(ours.items()):
        c = r.get("unet_step_cost", {})
        over = (c.get("bytes_read", 0) + c.get("bytes_written", 0)) / max(c.get("bytes_min", 1), 1)
        gpu = c.get("gpu_ms")
        out.append(f"| {arch} {a} act, {w} weights | {r['peak_gpu_bytes'] / 2**20:.0f} MiB | "
                   f"{r.get('unet_step_dispatches', '-')} | {r.get('unet_step_bytes', 0) / 1e6:.0f} MB ({over:.2f}x) | "
                   f"{r.get('unet_step_gflop', 0):.0f} | {ms(gpu)} ms |")
    out.append("")
    # Where a step's time goes (the first configuration with timestamps).
    for (arch, a, w), r in sorted(ours.items()):
        by_op = r.get("unet_step_cost", {}).get("by_op", {})
        if by_op and any(v.get("gpu_ms") for v in by_op.values()):
            out.append(f"UNet CFG step by op family ({arch}, {a} activations, {w} weights):")
            out.append("")
            out.append("| op | dispatches | GPU ms | GFLOP | TFLOP/s | MB moved |")
            out.append("|---|---|---|---|---|---|")
            for op, v in sorted(by_op.items(), key=lambda kv: -(kv[1].get("gpu_ms") or 0)):
                g = v.get("gpu_ms") or 0
                tf = v["flops"] / (g * 1e9) if g and v["flops"] else None
                out.append(f"| {op} | {v['dispatches']} | {ms(g)} | {v['flops'] / 1e9:.1f} | "
                           f"{'-' if tf is None else f'{tf:.1f}'} | {(v['bytes_read'] + v['bytes_written']) / 1e6:.0f} |")
            out.append("")
    def kernel_rows(records):
        out.append("| kernel | shape | act | weights | tile | ms | rate |")
        out.append("|---|---|---|---|---|---|---|")
        for k in records:
            g = k.get("gflops")
            rate = (f"{g / 1e3:.2f} TFLOP/s" if g >= 1000 else f"{g:.1f} GFLOP/s") if g else f"{k.get('gbps', 0):.1f} GB/s"
            out.append(f"| {k['kernel']} | {k['shape']} | {k['dtype']} | {k['weights']} | {k.get('tile', '')} | "
                       f"{ms(k['ms'])} | {rate} |")

    if kernels:
        kernel_rows(kernels)
        pm = [r for r in torch["results"] if r["workload"].startswith("matmul")]
        for r in pm:
            out.append(f"| PyTorch matmul | {r['workload']} | {r['dtype']} | | | {ms(r['ms'])} | "
                       f"{r.get('tflops', '-')} TFLOP/s |")
        out.append("")
        out.append("Tile: `*` marks the tile the op takes for the shape by default; the others are timed beside it "
                   "so that the choice of tile by shape can be read off this table.")
        out.append("")
    # The kernel variants (kernels-<variant>.json: `latent-gen --attention-queries 2`, `--no-prefetch`,
    # `--double-buffer`, `--split-k N`), to compare with the same rows above.
    for p in sorted(glob.glob(os.path.join(d, "kernels-*.json"))):
        records = load(p) or []
        if records:
            name = os.path.basename(p)[len("kernels-"):-len(".json")]
            out.append(f"Kernel variant `{name}` (the same cases as above, that kernel's rows only):")
            out.append("")
            kernel_rows(records)
            out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
