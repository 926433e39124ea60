"""Stage 2: train the CLIP text encoder (from scratch) jointly with the UNet on frozen-VAE latents.

    python train_unet.py --ckpt-dir /work/train-tiny-ckpt [--steps 7000] [--batch 32]

Needs CKPT_DIR/vae_final (train_vae.py) and CKPT_DIR/tokenizer (tokenizer.py). First renders
--cache-size scenes (excluding the held-out attribute combinations of heldout.json) and caches their
VAE latent means in CKPT_DIR/latents.pt; each training step then draws cached scenes and writes a
fresh caption for each (random wording; 10% empty for classifier-free guidance).

DDPM training: 1000 timesteps, scaled_linear betas 0.00085..0.012, v prediction (as SD 2.x; see
loss_weight for why not epsilon), v MSE capped at low noise, offset noise 0.1. AdamW, warmup + cosine, EMA of both networks (the EMA weights are exported).
Resumable: rerunning continues from CKPT_DIR/unet.pt. Every --eval-every steps it samples 24
training-distribution captions (DDIM 20 steps, guidance 5) with the EMA weights and logs the judge's
accuracy. When done, writes CKPT_DIR/unet_final/ and CKPT_DIR/text_encoder_final/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import common
import dataset
import judge
import models

HERE = os.path.dirname(os.path.abspath(__file__))


def _render_chunk(job: tuple[int, list[dict]]) -> np.ndarray:
    seed, attrs = job
    return dataset.render_batch(attrs, np.random.default_rng(seed))


def build_cache(args, log) -> dict:
    path = args.cache or os.path.join(args.ckpt_dir, "latents.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    from multiprocessing import Pool

    from diffusers import AutoencoderKL

    dev = common.device()
    exclude = dataset.heldout_exclude(os.path.join(HERE, "heldout.json"))
    rng = np.random.default_rng(args.seed + 100)
    attrs = [dataset.sample_attrs(rng, exclude) for _ in range(args.cache_size)]
    t0 = time.time()
    zs = []
    # Chunks of 256 scenes, each rendered with its own seed: the same cache whatever the process count.
    jobs = [(args.seed + 1000 + i, attrs[i:i + 256]) for i in range(0, len(attrs), 256)]
    # The pool forks before the VAE touches the GPU.
    with Pool(max(1, min(len(jobs), (os.cpu_count() or 2) - 1, args.render_procs))) as pool, torch.no_grad():
        vae = AutoencoderKL.from_pretrained(os.path.join(args.ckpt_dir, "vae_final")).eval().to(dev)
        for imgs in pool.imap(_render_chunk, jobs):
            for i in range(0, len(imgs), 64):
                x = torch.from_numpy(imgs[i:i + 64]).to(dev)
                zs.append(vae.encode(x).latent_dist.mean.cpu())
    cache = {"latents": torch.cat(zs), "attrs": attrs, "scaling_factor": vae.config.scaling_factor}
    torch.save(cache, path)
    log(f"cached {len(attrs)} scene latents in {time.time() - t0:.0f}s "
        f"(latent std x scaling {(cache['latents'].std() * cache['scaling_factor']).item():.3f})")
    return cache


class Tokens:
    def __init__(self, tokenizer_dir: str):
        from transformers import CLIPTokenizer

        self.tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
        self.cache: dict[str, list[int]] = {}

    def __call__(self, captions: list[str], device=None) -> torch.Tensor:
        new = list({c for c in captions if c not in self.cache})
        if new:
            ids = self.tok(new, padding="max_length", max_length=77, truncation=True).input_ids
            self.cache.update(zip(new, ids))
        return torch.tensor([self.cache[c] for c in captions], dtype=torch.long, device=device)


class Batches(torch.utils.data.IterableDataset):
    """Endless training batches: cached-scene indices and token ids of freshly written captions. Run in
    DataLoader workers (--workers) so caption writing and tokenizing overlap the GPU's work."""

    def __init__(self, attrs: list[dict], tokenizer_dir: str, batch: int, p_empty: float, seed: int):
        self.attrs, self.tokenizer_dir, self.batch, self.p_empty, self.seed = attrs, tokenizer_dir, batch, p_empty, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        tokens = Tokens(self.tokenizer_dir)
        while True:
            idx = rng.integers(len(self.attrs), size=self.batch)
            caps = [dataset.training_caption(self.attrs[i], rng, self.p_empty) for i in idx]
            yield torch.from_numpy(idx), tokens(caps)


@torch.no_grad()
def sample(unet, te, vae, tokens, captions, seed, scaling, steps=20, guidance=5.0):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**models.SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    n = len(captions)
    dev = next(unet.parameters()).device
    cond = te(tokens(captions, dev)).last_hidden_state
    uncond = te(tokens([""] * n, dev)).last_hidden_state
    ctx = torch.cat([uncond, cond])
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, 4, 16, 16, generator=g) * sched.init_noise_sigma).to(dev)
    for t in sched.timesteps:
        eps = unet(torch.cat([z, z]), t, ctx).sample
        eu, ec = eps.chunk(2)
        z = sched.step(eu + guidance * (ec - eu), t, z).prev_sample
    x = vae.decode(z / scaling).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def loss_weight(snr: torch.Tensor, min_snr: float) -> torch.Tensor:
    """Per-sample weight of the v-prediction MSE.

    History (kept because it decided the recipe): epsilon prediction failed three times here. The model
    drew clean scenes but took the background colour from the initial noise (background accuracy at chance
    after 3000 steps, with min-SNR, with an x0-space weight at high noise, with offset noise). At 16x16 the
    latent's spatial mean shows through the noise already at t = 999 (signal 0.068 x mean against noise
    mean std 1/16), and an epsilon loss gives a wrong x0 there almost no weight, so the model learned to
    read the colour from the noise's mean and the caption shifted x0 by a few hundredths. The v target
    (sqrt(a) eps - sqrt(1 - a) x0) is x0 itself at high noise, so the caption has to decide it.

    Plain v MSE weights x0 errors by 1 + snr; min-SNR-gamma for v (min(snr, gamma) / (snr + 1)) would
    take that weight away again at high noise, so only the low-noise end is capped here: weight
    min(1, (gamma + 1) / (snr + 1))."""
    if min_snr <= 0:
        return torch.ones_like(snr)
    return torch.clamp((min_snr + 1) / (snr + 1), max=1.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt-dir", default="/work/train-tiny-ckpt")
    ap.add_argument("--steps", type=int, default=7000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--p-empty", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--offset-noise", type=float, default=0.1,
                    help="std of a per-sample, per-channel constant added to the training noise")
    ap.add_argument("--cache-size", type=int, default=24000)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--ckpt-every-s", type=float, default=240)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--time-budget", type=float, default=0,
                    help="seconds: after 300 steps, set --steps to what fits in this time (GPU runs)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers writing and tokenizing captions")
    ap.add_argument("--cache", default=None, help="latent cache file (default CKPT_DIR/latents.pt)")
    ap.add_argument("--cache-only", action="store_true", help="build the latent cache and stop")
    ap.add_argument("--render-procs", type=int, default=16)
    ap.add_argument("--init-from", default=None,
                    help="a finished CKPT_DIR: start from its unet_final/ and text_encoder_final/ (fresh optimizer)")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--te-layers", type=int, default=models.TEXT_CONFIG["num_hidden_layers"])
    ap.add_argument("--te-intermediate", type=int, default=models.TEXT_CONFIG["intermediate_size"])
    args = ap.parse_args()
    common.setup_threads()
    log = common.Log(os.path.join(args.ckpt_dir, "unet.log"))
    from diffusers import AutoencoderKL, DDPMScheduler

    cache = build_cache(args, log)
    if args.cache_only:
        return
    latents, attrs, scaling = cache["latents"], cache["attrs"], cache["scaling_factor"]
    args.cache_size = len(attrs)  # what the cache file holds, whatever --cache-size says
    tokens = Tokens(os.path.join(args.ckpt_dir, "tokenizer"))
    dev = common.device()
    vae = AutoencoderKL.from_pretrained(os.path.join(args.ckpt_dir, "vae_final")).eval().to(dev)
    noise_sched = DDPMScheduler(**{k: v for k, v in models.SCHEDULER_CONFIG.items()
                                   if k not in ("steps_offset", "set_alpha_to_one", "timestep_spacing")})
    acp = noise_sched.alphas_cumprod
    snr = (acp / (1 - acp)).to(dev)
    w_mean = loss_weight(snr, args.min_snr).mean()  # keeps the loss scale near plain MSE

    torch.manual_seed(args.seed)
    unet = models.make_unet().to(dev)
    te = models.make_text_encoder(num_hidden_layers=args.te_layers, intermediate_size=args.te_intermediate).to(dev)
    init_history = None
    if args.init_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(os.path.join(args.init_from, "unet_final")).state_dict())
        te.load_state_dict(CLIPTextModel.from_pretrained(os.path.join(args.init_from, "text_encoder_final")).state_dict())
        with open(os.path.join(args.init_from, "unet_history.json")) as f:
            init_history = json.load(f)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    for p in list(ema_unet.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    step, elapsed = 0, 0.0
    ckpt_path = os.path.join(args.ckpt_dir, "unet.pt")
    history: list[dict] = []
    st = common.load_ckpt(ckpt_path)
    if st is not None:
        unet.load_state_dict(st["unet"]); te.load_state_dict(st["te"])
        ema_unet.load_state_dict(st["ema_unet"]); ema_te.load_state_dict(st["ema_te"])
        opt.load_state_dict(st["opt"])
        step, elapsed, history = st["step"], st["elapsed"], st["history"]
        args.steps = st.get("total_steps", args.steps)
        torch.set_rng_state(st["torch_rng"])
        log(f"resumed at step {step} ({elapsed / 60:.1f} min so far)")
    else:
        log(f"UNet {models.n_params(unet) / 1e6:.3f}M params, text encoder {models.n_params(te) / 1e6:.3f}M "
            f"({models.n_params(getattr(te, 'text_model', te).encoder) / 1e6:.3f}M without embeddings); args {vars(args)}")

    def checkpoint() -> None:
        common.save_ckpt(ckpt_path, {
            "unet": unet.state_dict(), "te": te.state_dict(), "ema_unet": ema_unet.state_dict(),
            "ema_te": ema_te.state_dict(), "opt": opt.state_dict(), "step": step, "history": history,
            "elapsed": elapsed + time.time() - t0, "total_steps": args.steps,
            "torch_rng": torch.get_rng_state()})

    def evaluate() -> float:
        erng = np.random.default_rng(777)
        ev = [dataset.sample_attrs(erng) for _ in range(24)]
        caps = [dataset.caption(a, erng, drop=False) for a in ev]
        imgs = sample(ema_unet, ema_te, vae, tokens, caps, 0, scaling)
        res = [judge.judge(im, a) for im, a in zip(imgs, ev)]
        s = judge.summarize(res)
        from PIL import Image

        grid = np.concatenate([np.concatenate(list(imgs[r * 8:(r + 1) * 8]), 1) for r in range(3)], 0)
        Image.fromarray(grid).save(os.path.join(args.ckpt_dir, f"samples_{step:05d}.png"))
        return s

    t0, last_ckpt = time.time(), time.time()
    torch.backends.cudnn.benchmark = True
    acc_loss, acc_mse, n_acc = 0.0, 0.0, 0
    unet.train(); te.train()
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    # Each (re)start draws a new stream of batches: seeded by the step it starts at.
    batches = iter(torch.utils.data.DataLoader(
        Batches(attrs, os.path.join(args.ckpt_dir, "tokenizer"), args.batch, args.p_empty, args.seed * 100003 + step),
        batch_size=None, num_workers=args.workers, prefetch_factor=8 if args.workers else None,
        persistent_workers=args.workers > 0))
    latents_dev = (latents * scaling).to(dev)
    budget_from = None
    while step < args.steps:
        if args.time_budget and step == 50:
            budget_from = (step, time.time())
        if args.time_budget and budget_from and step == budget_from[0] + 250:
            rate = 250 / (time.time() - budget_from[1])
            args.steps = max(step + 1, step + int(rate * (args.time_budget - (elapsed + time.time() - t0))))
            log(f"{rate:.1f} steps/s: --time-budget {args.time_budget:.0f}s -> {args.steps} steps")
        lr = common.lr_at(step, args.steps, args.lr, warmup=args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx, ids = next(batches)
        z0 = latents_dev[idx.to(dev)]
        ids = ids.to(dev)
        noise = torch.randn(z0.shape, device=dev)
        if args.offset_noise > 0:
            noise = noise + args.offset_noise * torch.randn(z0.shape[0], z0.shape[1], 1, 1, device=dev)
        t = torch.randint(0, 1000, (args.batch,), device=dev)
        zt = noise_sched.add_noise(z0, noise, t)
        h = te(ids).last_hidden_state
        pred = unet(zt, t, h).sample
        per = ((pred - noise_sched.get_velocity(z0, noise, t)) ** 2).mean(dim=(1, 2, 3))
        w = loss_weight(snr[t], args.min_snr) / w_mean
        loss = (w * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        acc_loss += loss.detach(); acc_mse += per.detach().mean(); n_acc += 1  # no GPU sync per step
        if step % 50 == 0 or step == args.steps:
            acc_loss, acc_mse = acc_loss.item(), acc_mse.item()
            el = elapsed + time.time() - t0
            history.append({"step": step, "loss": acc_loss / n_acc, "mse": acc_mse / n_acc, "minutes": el / 60})
            log(f"step {step}/{args.steps} loss {acc_loss / n_acc:.4f} (unweighted mse {acc_mse / n_acc:.4f}) "
                f"lr {lr:.2e} {el / 60:.1f} min")
            acc_loss, acc_mse, n_acc = 0.0, 0.0, 0
        if step % args.eval_every == 0 or step == args.steps:
            s = evaluate()
            history.append({"step": step, "eval": s})
            log(f"eval at {step}: {json.dumps(s)}")
            unet.train(); te.train()
        if time.time() - last_ckpt > args.ckpt_every_s:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    ema_unet.cpu().save_pretrained(os.path.join(args.ckpt_dir, "unet_final"))
    ema_te.cpu().save_pretrained(os.path.join(args.ckpt_dir, "text_encoder_final"))
    with open(os.path.join(args.ckpt_dir, "unet_history.json"), "w") as f:
        json.dump({"args": vars(args), "history": history, "steps_done": step, "init": init_history,
                   "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                   "minutes": (elapsed + time.time() - t0) / 60}, f, indent=0)
    log("UNet done")


if __name__ == "__main__":
    main()
