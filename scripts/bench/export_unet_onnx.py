#!/usr/bin/env python3
"""Exports the UNet `latent-gen bench unet --narrow N` times (SD 1.5's or SD-Turbo's, every width divided by
N, random weights: timing does not depend on them) to ONNX, with CFG batch 2 at SIZE x SIZE pixels, for
onnxruntime-web in the same browser as ours (scripts/bench-web). Development tool (torch, diffusers, onnx).

    python3 scripts/bench/export_unet_onnx.py --arch sd15 --narrow 5 --size 256 --out unet.onnx
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_baseline import unet  # noqa: E402  (the same architectures as crate/src/bench.rs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15", choices=["sd15", "sd-turbo"])
    ap.add_argument("--narrow", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    channels = [c // args.narrow for c in (320, 640, 1280, 1280)]
    model = unet(args.arch, channels).eval()
    lat = args.size // 8
    d = 768 if args.arch == "sd15" else 1024
    sample, t, context = torch.randn(2, 4, lat, lat), torch.tensor([500.0, 500.0]), torch.randn(2, 77, d)
    with torch.inference_mode():
        torch.onnx.export(model, (sample, t, context), args.out, input_names=["sample", "timestep", "context"],
                          output_names=["out"], opset_version=17, dynamo=False)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
