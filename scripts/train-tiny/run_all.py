"""Train tiny-shapes end to end: tokenizer, VAE, latent caches + text encoder/UNet (two stages), export,
evaluation, card. The defaults are the recipe of the bundled model (its card lists the same numbers).

    TRAIN_DEVICE=cuda python run_all.py [--ckpt-dir /work/train-tiny-ckpt] [--out ../../www/models/tiny-shapes]

Every stage is resumable (rerun the same command after an interruption) and skipped when its output
exists. Checkpoints and caches stay in CKPT_DIR, outside the repository.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=HERE, check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt-dir", default="/work/train-tiny-ckpt")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "www", "models", "tiny-shapes"))
    ap.add_argument("--vae-steps", default="2000")
    ap.add_argument("--stage1-steps", default="1209", help="batch 768 from scratch (on a GPU)")
    ap.add_argument("--stage2-steps", default="1738", help="batch 64 fine-tuning (the CPU is enough)")
    ap.add_argument("--workers", default="12", help="caption-writing DataLoader workers in stage 1")
    args = ap.parse_args()
    ck = args.ckpt_dir
    os.makedirs(ck, exist_ok=True)
    if not os.path.exists(os.path.join(ck, "tokenizer", "merges.txt")):
        run("tokenizer.py", os.path.join(ck, "tokenizer"))
    if not os.path.exists(os.path.join(ck, "vae_final")):
        run("train_vae.py", "--ckpt-dir", ck, "--steps", args.vae_steps)
    te = ["--te-layers", "4", "--te-intermediate", "512"]
    s1, s2 = os.path.join(ck, "stage1"), os.path.join(ck, "stage2")
    for d in (s1, s2):  # each stage's folder sees the shared VAE, tokenizer and VAE logs
        os.makedirs(d, exist_ok=True)
        for name in ("vae_final", "tokenizer", "vae.log", "vae_stats.json"):
            if not os.path.lexists(os.path.join(d, name)):
                os.symlink(os.path.join(os.path.abspath(ck), name), os.path.join(d, name))
    if not os.path.exists(os.path.join(s1, "unet_final")):
        run("train_unet.py", "--ckpt-dir", s1, "--cache", os.path.join(ck, "latents-40000.pt"), "--cache-size", "40000",
            "--steps", args.stage1_steps, "--batch", "768", "--lr", "2e-3", "--workers", args.workers,
            "--eval-every", "1000", *te)
    if not os.path.exists(os.path.join(s2, "unet_final")):
        run("train_unet.py", "--ckpt-dir", s2, "--cache", os.path.join(ck, "latents-24000.pt"), "--cache-size", "24000",
            "--init-from", s1, "--steps", args.stage2_steps, "--batch", "64", "--lr", "4e-4", "--warmup", "50",
            "--ema", "0.998", "--eval-every", "500", *te)
    run("export.py", "--ckpt-dir", s2, "--out", args.out)
    run("eval_diffusers.py", "--model", args.out, "--result", os.path.join(s2, "eval_diffusers.json"))
    run("export.py", "--ckpt-dir", s2, "--out", args.out, "--card-only")


if __name__ == "__main__":
    main()
