"""Stage 1: train the AutoencoderKL on freshly rendered scenes, then measure the latent scale.

    python train_vae.py --ckpt-dir /work/train-tiny-ckpt [--steps 1500] [--batch 16]

Resumable: rerunning continues from CKPT_DIR/vae.pt. When done, writes CKPT_DIR/vae_final/ (diffusers
save_pretrained, scaling_factor = 1 / std of the latent means over 4096 scenes).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import common
import dataset
import models


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt-dir", default="/work/train-tiny-ckpt")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ckpt-every-s", type=float, default=240)
    args = ap.parse_args()
    common.setup_threads()
    os.makedirs(args.ckpt_dir, exist_ok=True)
    log = common.Log(os.path.join(args.ckpt_dir, "vae.log"))
    ckpt_path = os.path.join(args.ckpt_dir, "vae.pt")

    torch.manual_seed(args.seed)
    dev = common.device()
    vae = models.make_vae().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, elapsed = 0, 0.0
    rng = np.random.default_rng(args.seed)
    st = common.load_ckpt(ckpt_path)
    if st is not None:
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed = st["step"], st["elapsed"]
        rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
        log(f"resumed at step {step} ({elapsed / 60:.1f} min so far)")
    else:
        log(f"VAE {models.n_params(vae) / 1e6:.3f}M params, config {json.dumps(models.VAE_CONFIG)}")

    t0, last_ckpt = time.time(), time.time()
    acc = {"rec": 0.0, "l1": 0.0, "kl": 0.0, "n": 0}
    vae.train()

    def checkpoint() -> None:
        common.save_ckpt(ckpt_path, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                                     "elapsed": elapsed + time.time() - t0, "rng": rng.bit_generator.state,
                                     "torch_rng": torch.get_rng_state()})

    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, args.steps, args.lr, warmup=100)
        attrs = [dataset.sample_attrs(rng) for _ in range(args.batch)]
        x = torch.from_numpy(dataset.render_batch(attrs, rng)).to(dev)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        mse = F.mse_loss(y, x)
        l1 = F.l1_loss(y, x)
        kl = post.kl().mean()  # summed over the latent's elements, averaged over the batch
        loss = mse + l1 + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        acc["rec"] += mse.item(); acc["l1"] += l1.item(); acc["kl"] += kl.item(); acc["n"] += 1
        if step % 50 == 0 or step == args.steps:
            n = acc["n"]
            log(f"step {step}/{args.steps} mse {acc['rec'] / n:.5f} l1 {acc['l1'] / n:.4f} "
                f"kl {acc['kl'] / n:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(elapsed + time.time() - t0) / 60:.1f} min")
            acc = {"rec": 0.0, "l1": 0.0, "kl": 0.0, "n": 0}
        if time.time() - last_ckpt > args.ckpt_every_s:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    finalize(vae, args, log, elapsed + time.time() - t0)


@torch.no_grad()
def finalize(vae, args, log, elapsed: float) -> None:
    vae.eval()
    dev = next(vae.parameters()).device
    rng = np.random.default_rng(12345)
    zs, errs = [], []
    for _ in range(64):
        attrs = [dataset.sample_attrs(rng) for _ in range(64)]
        x = torch.from_numpy(dataset.render_batch(attrs, rng)).to(dev)
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample.clamp(-1, 1)
        zs.append(z)
        errs.append(((y - x).abs() * 127.5).mean().item())
    z = torch.cat(zs).cpu()
    std = z.std().item()
    scaling = 1.0 / std
    per_channel = [round(v, 4) for v in z.std(dim=(0, 2, 3)).tolist()]
    means = [round(v, 4) for v in z.mean(dim=(0, 2, 3)).tolist()]
    vae.register_to_config(scaling_factor=float(f"{scaling:.5f}"))
    out = os.path.join(args.ckpt_dir, "vae_final")
    vae.cpu().save_pretrained(out)
    stats = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "kl_weight": args.kl,
             "minutes": round(elapsed / 60, 1), "recon_mean_abs_err_0_255": round(float(np.mean(errs)), 3),
             "latent_std": round(std, 4), "latent_channel_std": per_channel, "latent_channel_mean": means,
             "scaling_factor": float(f"{scaling:.5f}")}
    with open(os.path.join(args.ckpt_dir, "vae_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    log(f"VAE done: {json.dumps(stats)}")


if __name__ == "__main__":
    main()
