#!/usr/bin/env python3
"""PyTorch + diffusers baseline for the workloads `latent-gen bench pipeline` and `bench kernels` time.

The same architectures as crate/src/bench.rs (SD 1.5: CLIP ViT-L/14 text tower, the 860M UNet; SD-Turbo: the
OpenCLIP ViT-H text tower, 23 layers, the SD 2.1 UNet), random weights (timing does not depend on the values),
512x512 (64x64 latents), 77 tokens; fp32 with TF32 off (CUDA cores) and fp16 (tensor cores). Each figure is
the mean of --repeat runs after warm-ups, CUDA synchronized around them. Writes JSON:

  {"device": ..., "driver": ..., "torch": ..., "diffusers": ..., "date": ..., "results": [
      {"workload": "sd15 unet cfg step", "dtype": "fp16", "ms": 23.9}, ...]}

Run by scripts/bench-gpu on the GPU machine (diffusers comes as a carried wheel there). --quick runs small
sizes on whatever device there is (a CPU check of the script itself).
"""

import argparse
import datetime
import json
import subprocess
import time

import torch


def clip_config(arch):
    from transformers import CLIPTextConfig

    if arch == "sd15":
        return CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, hidden_act="quick_gelu", max_position_embeddings=77)
    return CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                          num_attention_heads=16, hidden_act="gelu", max_position_embeddings=77)


def unet(arch, channels):
    from diffusers import UNet2DConditionModel

    common = dict(block_out_channels=channels, layers_per_block=2, sample_size=64,
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    if arch == "sd15":
        return UNet2DConditionModel(attention_head_dim=8, cross_attention_dim=768, **common)
    return UNet2DConditionModel(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                                use_linear_projection=True, **common)


def vae(channels):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=channels, layers_per_block=2, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         norm_num_groups=32)


def taesd():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny()


def timed(fn, device, repeat, warmup):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync()
    return (time.perf_counter() - start) * 1e3 / repeat


def driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true", help="128x128, narrow models, one run: checks the script")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--only", default="", help="comma-separated workload prefixes to keep")
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"fp32": torch.float32}
    if device.type == "cuda":
        dtypes["fp16"] = torch.float16
    quick = args.quick
    repeat, warmup = (1, 1) if quick else (args.repeat, 3)
    lat = 16 if quick else 64
    unet_ch = [32, 64, 128, 128] if quick else [320, 640, 1280, 1280]
    vae_ch = [32, 32, 64, 64] if quick else [128, 256, 512, 512]
    keep = [p for p in args.only.split(",") if p]
    results = []

    def record(workload, dtype, ms, **extra):
        results.append(dict(workload=workload, dtype=dtype, ms=round(ms, 4), **extra))
        print(f"{workload:<40} {dtype:<5} {ms:10.3f} ms", flush=True)

    def wanted(name):
        return not keep or any(name.startswith(p) for p in keep)

    gen = torch.Generator(device="cpu").manual_seed(0)
    for dname, dtype in dtypes.items():
        # Matrix products: the 4096^3 figure the targets name.
        if wanted("matmul"):
            n = 512 if quick else 4096
            a = torch.randn(n, n, generator=gen).to(device, dtype)
            b = torch.randn(n, n, generator=gen).to(device, dtype)
            ms = timed(lambda: a @ b, device, repeat, warmup)
            record(f"matmul {n}^3", dname, ms, tflops=round(2 * n**3 / ms / 1e9, 2))
        # The SD VAE's decoder (SD 1.x and 2.x share it) and TAESD.
        dec = vae(vae_ch).to(device, dtype).eval()
        z = torch.randn(1, 4, lat, lat, generator=gen).to(device, dtype)
        vae_ms = timed(lambda: dec.decode(z), device, repeat, warmup)
        record("vae decode", dname, vae_ms)
        tiny = taesd().to(device, dtype).eval()
        record("taesd decode", dname, timed(lambda: tiny.decode(z), device, repeat, warmup))
        del dec, tiny
        for arch in ("sd15", "sd-turbo"):
            if not any(wanted(f"{arch} {w}") for w in ("clip", "unet", "vae", "taesd", "text to pixels")):
                continue
            from transformers import CLIPTextModel

            clip = CLIPTextModel(clip_config(arch)).to(device, dtype).eval()
            net = unet(arch, unet_ch).to(device, dtype).eval()
            ctx_dim = 768 if arch == "sd15" else 1024
            ids = torch.randint(0, 49407, (2, 77), generator=gen).to(device)
            ctx2 = torch.randn(2, 77, ctx_dim, generator=gen).to(device, dtype)
            x2 = torch.randn(2, 4, lat, lat, generator=gen).to(device, dtype)
            t = torch.tensor(500.0, device=device)
            clip_ms = timed(lambda: clip(ids), device, repeat, warmup)
            record(f"{arch} clip batch 2", dname, clip_ms)
            step = timed(lambda: net(x2, t, encoder_hidden_states=ctx2), device, repeat, warmup)
            record(f"{arch} unet cfg step (batch 2)", dname, step)
            step1 = timed(lambda: net(x2[:1], t, encoder_hidden_states=ctx2[:1]), device, repeat, warmup)
            record(f"{arch} unet step (batch 1)", dname, step1)
            del clip, net
            if arch == "sd15":
                record("sd15 20 steps (clip + 20 cfg steps + vae)", dname, clip_ms + 20 * step + vae_ms)
            else:
                record("sd-turbo text to pixels (clip + 1 step + vae)", dname, clip_ms / 2 + step1 + vae_ms)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    out = dict(
        device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        driver=driver() if device.type == "cuda" else "",
        torch=torch.__version__,
        diffusers=__import__("diffusers").__version__,
        date=datetime.date.today().isoformat(),
        size=lat * 8,
        results=results,
    )
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
