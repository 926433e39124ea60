"""Trains tiny-shapes' two adapters on its frozen weights (concepts.py has the concepts). The shipped ones:

    # the ring LoRA, two stages; each command stops after 20 min and resumes when run again until done
    python train_adapters.py lora --rank 8 --text-encoder --steps 2400 --max-minutes 20 \
        --ckpt-dir /tmp/ring-1 --out /tmp/ring-1.safetensors
    python train_adapters.py lora --rank 8 --text-encoder --init-from /tmp/ring-1.safetensors --lr 5e-4 \
        --steps 1200 --max-minutes 20 --ckpt-dir /tmp/ring-2 \
        --out ../../www/models/tiny-shapes-adapters/ring.safetensors
    python train_adapters.py embedding --out ../../www/models/tiny-shapes-adapters/tiny-sun.safetensors

`lora`: a LoRA (PEFT, alpha = rank) on the UNet's attention and feed-forward layers (`--locon`: also its
projections and resnet convolutions; `--text-encoder`: also the text encoder's attention and MLP layers),
trained on ring scenes mixed 1:1 with the base model's own scenes (so the old concepts stay), saved in
diffusers' format (`save_lora_weights`, with its adapter metadata), f16.
`embedding`: a two-vector textual-inversion embedding for the trigger word "tiny-sun" (new token rows of the
text encoder's table, everything else frozen), saved in A1111's format (`emb_params`).

Same objective as the model's own training (train_unet.py: v prediction, the capped-SNR weight, offset noise
0.1), on VAE latents of freshly rendered scenes cached in CKPT_DIR (outside the repository); the held-out
scenes of ring_heldout.json / sun_heldout.json (and heldout.json) are never trained on. CPU by default
(TRAIN_DEVICE=cuda for a GPU), one thread (TRAIN_THREADS); checkpoints every 200 steps into CKPT_DIR and
resumes from there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch

import common
import concepts
import dataset
import models
from train_unet import loss_weight

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "..", "..", "www", "models", "tiny-shapes")
LORA_UNET = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
LOCON = ["proj_in", "proj_out", "conv1", "conv2"]
LORA_TE = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RUN_ARGS = ("out", "ckpt_dir", "max_minutes")  # options a resumed run may change


def load(model_dir: str, dev):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
    te = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder"), dtype=torch.float32).to(dev)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"), torch_dtype=torch.float32).to(dev)
    vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae"), torch_dtype=torch.float32).to(dev)
    for m in (te, unet, vae):
        m.requires_grad_(False)
    return tok, te, unet, vae


def latent_cache(path: str, scenes: list[tuple[str, dict]], vae, seed: int, log) -> torch.Tensor:
    """VAE latent means (times scaling_factor) of the scenes, rendered with concepts.render."""
    if os.path.exists(path):
        return torch.load(path)
    t0 = time.time()
    rng = np.random.default_rng(seed)
    zs = []
    with torch.no_grad():
        for i in range(0, len(scenes), 64):
            x = torch.from_numpy(concepts.render_batch([a for _, a in scenes[i:i + 64]], rng))
            zs.append(vae.encode(x.to(vae.device)).latent_dist.mean.cpu() * vae.config.scaling_factor)
    z = torch.cat(zs)
    torch.save(z, path)
    log(f"cached {len(scenes)} scene latents in {time.time() - t0:.0f}s")
    return z


def init_lora(path: str, unet, te) -> None:
    """Starts the LoRA layers from a file this script wrote (a previous stage)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    sd = load_file(path)
    for prefix, model in (("unet.", unet), ("text_encoder.", te)):
        part = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
        if model is None:
            continue
        res = set_peft_model_state_dict(model, part)
        if not part or res.unexpected_keys:
            raise SystemExit(f"{path} does not fit these LoRA layers ({prefix}: {len(part)} tensors, "
                             f"unexpected {res.unexpected_keys[:3]})")


def scenes_for(kind: str, n: int, seed: int, share: float = 0.5) -> list[tuple[str, dict]]:
    """(kind, attributes) of n training scenes: rings (a `share` of them) and the base model's own (lora), or
    tiny-suns (embedding); held-out combinations excluded."""
    rng = np.random.default_rng(seed)
    base_out = dataset.heldout_exclude(os.path.join(HERE, "heldout.json"))
    out = []
    if kind == "lora":
        ring_out = {dataset.attr_key(a) for a in concepts.load_heldout("ring")}
        while len(out) < n:
            rings = sum(k == "ring" for k, _ in out)
            if rings < share * (len(out) + 1):
                a = concepts.sample_ring(rng)
                if dataset.attr_key(a) not in ring_out:
                    out.append(("ring", a))
            else:
                out.append(("base", dataset.sample_attrs(rng, base_out)))
    else:
        sun_out = {dataset.attr_key(a) for a in concepts.load_heldout("sun")}
        while len(out) < n:
            a = concepts.sample_sun(rng)
            if dataset.attr_key(a) not in sun_out:
                out.append(("sun", a))
    return out


def train(args, kind: str) -> None:
    common.setup_threads()
    dev = common.device()
    os.makedirs(args.ckpt_dir, exist_ok=True)
    log = common.Log(os.path.join(args.ckpt_dir, f"{kind}.log"))
    tok, te, unet, vae = load(args.model, dev)
    scenes = scenes_for(kind, args.scenes, args.seed, args.ring_share)
    concept = f"ring{args.ring_share:g}-{concepts.RING_INNER:g}" if kind == "lora" else "sun"
    latents = latent_cache(os.path.join(args.ckpt_dir, f"{concept}-latents-{args.scenes}-{args.seed}.pt"), scenes, vae,
                           args.seed + 1, log).to(dev)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**{k: v for k, v in models.SCHEDULER_CONFIG.items()
                             if k not in ("steps_offset", "set_alpha_to_one", "timestep_spacing")})
    acp = sched.alphas_cumprod
    snr = (acp / (1 - acp)).to(dev)
    w_mean = loss_weight(snr, 5.0).mean()
    torch.manual_seed(args.seed)
    if kind == "lora":
        import peft

        targets = LORA_UNET + (LOCON if args.locon else [])
        unet_cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets, init_lora_weights="gaussian")
        te_cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=LORA_TE, init_lora_weights="gaussian")
        unet.add_adapter(unet_cfg)
        if args.text_encoder:
            peft.inject_adapter_in_model(te_cfg, te)
        if args.init_from:
            init_lora(args.init_from, unet, te if args.text_encoder else None)
        params = [p for m in (unet, te) for n, p in m.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        trigger_ids = None
    else:
        tokens = [concepts.TRIGGER] + [f"{concepts.TRIGGER}_{i}" for i in range(1, args.vectors)]
        tok.add_tokens(tokens)
        trigger_ids = tok.convert_tokens_to_ids(tokens)
        te.resize_token_embeddings(len(tok))
        table = te.get_input_embeddings().weight
        with torch.no_grad():
            # Small noise: the trained rows are colours, shapes, sizes and positions; none is a start to copy.
            table[trigger_ids] = torch.randn(len(trigger_ids), table.shape[1]) * 0.01
        table.requires_grad_(True)
        params = [table]
        frozen = table.detach().clone()
        keep = torch.ones(table.shape[0], dtype=torch.bool, device=dev)
        keep[trigger_ids] = False
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0 if kind == "embedding" else 0.01)
    rng = np.random.default_rng(args.seed + 2)
    history, start, elapsed, t0 = [], 0, 0.0, time.time()
    ckpt_path = os.path.join(args.ckpt_dir, f"{kind}.pt")
    st = common.load_ckpt(ckpt_path)
    if st is not None:
        if st["args"] != {k: v for k, v in vars(args).items() if k not in RUN_ARGS}:
            raise SystemExit(f"{ckpt_path} was trained with other options ({st['args']}): "
                             "delete it or pick another --ckpt-dir")
        with torch.no_grad():
            for p, v in zip(params, st["params"]):
                p.copy_(v)
        opt.load_state_dict(st["opt"])
        start, elapsed, history = st["step"], st["elapsed"], st["history"]
        rng.bit_generator.state = st["np_rng"]
        torch.set_rng_state(st["torch_rng"])
        log(f"resumed at step {start} ({elapsed / 60:.1f} min so far)")

    def checkpoint(step: int) -> None:
        common.save_ckpt(ckpt_path, {
            "args": {k: v for k, v in vars(args).items() if k not in RUN_ARGS},
            "params": [p.detach().cpu().clone() for p in params], "opt": opt.state_dict(), "step": step,
            "elapsed": elapsed + time.time() - t0, "history": history, "np_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state()})

    unet.train(); te.train()
    for step in range(start, args.steps):
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            checkpoint(step)
            log(f"stopped after {args.max_minutes:g} min at step {step}: run again to resume")
            return
        lr = common.lr_at(step, args.steps, args.lr, warmup=50)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(len(scenes), size=args.batch)
        caps = []
        for i in idx:
            what, a = scenes[i]
            if rng.random() < args.p_empty:
                caps.append("")
            elif what == "sun":
                caps.append(concepts.sun_caption(a, rng, trigger=" ".join(tokens)))
            else:
                caps.append(dataset.caption(a, rng))
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(dev)
        z0 = latents[torch.from_numpy(idx).to(dev)]
        noise = torch.randn(z0.shape, device=dev) + 0.1 * torch.randn(z0.shape[0], z0.shape[1], 1, 1, device=dev)
        t = torch.randint(0, 1000, (args.batch,), device=dev)
        pred = unet(sched.add_noise(z0, noise, t), t, te(ids).last_hidden_state).sample
        per = ((pred - sched.get_velocity(z0, noise, t)) ** 2).mean(dim=(1, 2, 3))
        loss = (loss_weight(snr[t], 5.0) / w_mean * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if trigger_ids is not None:
            with torch.no_grad():  # only the new rows learn
                table[keep] = frozen[keep]
        if (step + 1) % 50 == 0:
            minutes = (elapsed + time.time() - t0) / 60
            history.append({"step": step + 1, "loss": loss.item(), "minutes": minutes})
            log(f"{kind} step {step + 1}/{args.steps} loss {loss.item():.4f} lr {lr:.2e} {minutes:.1f} min")
        if (step + 1) % 200 == 0:
            checkpoint(step + 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if kind == "lora":
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        half = lambda sd: {k: v.detach().half().cpu() for k, v in sd.items()}  # noqa: E731
        with tempfile.TemporaryDirectory() as tmp:
            StableDiffusionPipeline.save_lora_weights(
                tmp, unet_lora_layers=half(get_peft_model_state_dict(unet)),
                text_encoder_lora_layers=half(get_peft_model_state_dict(te)) if args.text_encoder else None,
                unet_lora_adapter_metadata=unet_cfg.to_dict(),
                text_encoder_lora_adapter_metadata=te_cfg.to_dict() if args.text_encoder else None)
            shutil.copy(os.path.join(tmp, "pytorch_lora_weights.safetensors"), args.out)
    else:
        from safetensors.torch import save_file

        save_file({"emb_params": table[trigger_ids].detach().cpu().contiguous()}, args.out)
    minutes = (elapsed + time.time() - t0) / 60
    with open(os.path.join(args.ckpt_dir, f"{kind}_history.json"), "w") as f:
        json.dump({"args": vars(args), "history": history, "minutes": minutes}, f, indent=0)
    log(f"wrote {args.out} ({os.path.getsize(args.out)} bytes) after {minutes:.1f} min of training")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["lora", "embedding"])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt-dir", default="/tmp/train-tiny-adapters")
    ap.add_argument("--steps", type=int, default=None, help="default 2000 (lora), 800 (embedding)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="default 1e-3 (lora), 5e-3 (embedding)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--ring-share", type=float, default=0.5, help="lora: the share of ring scenes (the rest the model's own)")
    ap.add_argument("--locon", action="store_true", help="also the UNet's projections and resnet convolutions")
    ap.add_argument("--text-encoder", action="store_true", help="also LoRA layers in the text encoder")
    ap.add_argument("--init-from", help="lora: start from this LoRA file (a previous stage's, same layers)")
    ap.add_argument("--vectors", type=int, default=2)
    ap.add_argument("--scenes", type=int, default=8000)
    ap.add_argument("--p-empty", type=float, default=None, help="empty captions: default 0.1 (lora), 0 (embedding)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="checkpoint and stop after this long; run again (same options) to resume")
    args = ap.parse_args()
    if args.steps is None:
        args.steps = 2000 if args.kind == "lora" else 800
    if args.lr is None:
        args.lr = 1e-3 if args.kind == "lora" else 5e-3
    if args.p_empty is None:
        args.p_empty = 0.1 if args.kind == "lora" else 0.0
    train(args, args.kind)


if __name__ == "__main__":
    main()
