"""Generate the held-out captions with diffusers on the exported model and judge them.

    python eval_diffusers.py [--model ../../www/models/tiny-shapes] [--out /tmp/eval-diffusers]
                             [--steps 20] [--guidance 5] [--result result.json]

Each item of heldout.json is generated with its own seed (torch.Generator().manual_seed(item["seed"])),
the model's own scheduler (scheduler/scheduler_config.json), 20 steps and guidance 5 at 64x64; the images go
to OUT/000.png, 001.png, ... (the layout `judge.py --heldout ... --images OUT` reads, so our CLI's images can
be judged the same way) and OUT/grid.png. The last line printed is "accuracy X.XX".
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

import common
import dataset
import judge

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "..", "..", "www", "models", "tiny-shapes"))
    ap.add_argument("--heldout", default=os.path.join(HERE, "heldout.json"))
    ap.add_argument("--out", default="/tmp/eval-diffusers")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--result", default=None, help="also write the summary as JSON here")
    args = ap.parse_args()
    common.setup_threads()
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(os.path.normpath(args.model), safety_checker=None,
                                                   torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(common.device())
    items = dataset.load_heldout(args.heldout)
    os.makedirs(args.out, exist_ok=True)
    imgs = []
    for i in range(0, len(items), args.batch):
        chunk = items[i:i + args.batch]
        gens = [torch.Generator().manual_seed(it["seed"]) for it in chunk]
        out = pipe([it["caption"] for it in chunk], num_inference_steps=args.steps,
                   guidance_scale=args.guidance, generator=gens, output_type="np").images
        imgs += list((out * 255).round().astype(np.uint8))
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(os.path.join(args.out, f"{i:03d}.png"))
    cols = 12
    rows = [np.concatenate(imgs[r:r + cols], 1) for r in range(0, len(imgs) - cols + 1, cols)]
    Image.fromarray(np.concatenate(rows, 0)).save(os.path.join(args.out, "grid.png"))
    results = [judge.judge(im, it) for im, it in zip(imgs, items)]
    s = judge.summarize(results)
    if args.result:
        with open(args.result, "w") as f:
            json.dump({**s, "by_wording": judge.by_wording(results), "errors": judge.errors(results, items), "steps": args.steps, "guidance": args.guidance,
                       "scheduler": pipe.scheduler.__class__.__name__}, f, indent=1)
    judge.report(items, results)  # last line: "accuracy X.XX"


if __name__ == "__main__":
    main()
