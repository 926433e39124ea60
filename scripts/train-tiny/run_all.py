"""Train tiny-shapes end to end: tokenizer, VAE, latent cache + text encoder/UNet, export, evaluation, card.

    python run_all.py [--ckpt-dir /work/train-tiny-ckpt] [--out ../../www/models/tiny-shapes]

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
    ap.add_argument("--unet-steps", default="7000")
    args = ap.parse_args()
    ck = args.ckpt_dir
    os.makedirs(ck, exist_ok=True)
    if not os.path.exists(os.path.join(ck, "tokenizer", "merges.txt")):
        run("tokenizer.py", os.path.join(ck, "tokenizer"))
    if not os.path.exists(os.path.join(ck, "vae_final")):
        run("train_vae.py", "--ckpt-dir", ck, "--steps", args.vae_steps)
    if not os.path.exists(os.path.join(ck, "unet_final")):
        run("train_unet.py", "--ckpt-dir", ck, "--steps", args.unet_steps)
    run("export.py", "--ckpt-dir", ck, "--out", args.out)
    run("eval_diffusers.py", "--model", args.out, "--result", os.path.join(ck, "eval_diffusers.json"))
    run("export.py", "--ckpt-dir", ck, "--out", args.out, "--card-only")


if __name__ == "__main__":
    main()
