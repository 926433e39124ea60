"""Stage 3: export the trained networks in Stable Diffusion's diffusers layout, fit the preview factors,
and write the model card.

    python export.py --ckpt-dir /work/train-tiny-ckpt --out ../../www/models/tiny-shapes
    python export.py --ckpt-dir ... --out ... --card-only   # rewrite README.md (e.g. after eval)

Layout (as StableDiffusionPipeline.save_pretrained writes it, weights in float16 safetensors):
    model_index.json
    scheduler/scheduler_config.json             DDIMScheduler, scaled_linear 0.00085..0.012, v_prediction
    text_encoder/config.json, model.safetensors  CLIPTextModel (keys "text_model.*", as SD 1.x ships them)
    tokenizer/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    unet/config.json, diffusion_pytorch_model.safetensors
    vae/config.json, diffusion_pytorch_model.safetensors
    preview.json                                 latent -> RGB preview factors (4x3 + bias)
    samples.png                                  a few generations (diffusers, this folder's weights)
    README.md                                    model card
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import numpy as np
import torch

import common
import dataset
import models
import tokenizer as tok_mod

HERE = os.path.dirname(os.path.abspath(__file__))


def export_weights(args) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    ck, out = args.ckpt_dir, args.out
    vae = AutoencoderKL.from_pretrained(os.path.join(ck, "vae_final"))
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ck, "unet_final"))
    te = CLIPTextModel.from_pretrained(os.path.join(ck, "text_encoder_final"))
    sched = DDIMScheduler(**models.SCHEDULER_CONFIG)
    if os.path.exists(out):
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)

    # model_index.json exactly as the pipeline writes it.
    built = os.path.join(ck, "tokenizer")  # tokenizer.py's output: copy it (no open_clip needed then)
    if os.path.exists(os.path.join(built, "merges.txt")):
        shutil.copytree(built, os.path.join(out, "tokenizer"))
    else:
        tok_mod.write_tokenizer(os.path.join(out, "tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp)
        shutil.copy(os.path.join(tmp, "model_index.json"), os.path.join(out, "model_index.json"))

    sched.save_pretrained(os.path.join(out, "scheduler"))
    unet.to(torch.float16).save_pretrained(os.path.join(out, "unet"))
    vae.to(torch.float16).save_pretrained(os.path.join(out, "vae"))
    # Text encoder: transformers' config, weights under SD 1.x's key names ("text_model.*").
    ted = os.path.join(out, "text_encoder")
    te.to(torch.float16).save_pretrained(ted)
    sd = {"text_model." + k: v.detach().to(torch.float16).contiguous() for k, v in te.state_dict().items()}
    for f in os.listdir(ted):
        if f.endswith(".safetensors") or f.endswith(".bin") or f.endswith(".index.json"):
            os.remove(os.path.join(ted, f))
    save_file(sd, os.path.join(ted, "model.safetensors"), metadata={"format": "pt"})
    for d in ("unet", "vae"):
        assert os.path.exists(os.path.join(out, d, "diffusion_pytorch_model.safetensors")), d
    for root, _, files in os.walk(out):
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    print(f"exported to {out}")


@torch.no_grad()
def fit_preview(args) -> dict:
    """Least squares: UNet-space latent (VAE latent mean * scaling_factor) -> RGB in [-1, 1] of the
    image average-pooled to the latent's resolution, over 4096 random scenes."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.path.join(args.out, "vae"), torch_dtype=torch.float32).eval()
    s = vae.config.scaling_factor
    rng = np.random.default_rng(4321)
    zs, ys = [], []
    for _ in range(64):
        attrs = [dataset.sample_attrs(rng) for _ in range(64)]
        x = torch.from_numpy(dataset.render_batch(attrs, rng))
        z = vae.encode(x).latent_dist.mean * s
        y = torch.nn.functional.avg_pool2d(x, 4)
        zs.append(z.permute(0, 2, 3, 1).reshape(-1, 4))
        ys.append(y.permute(0, 2, 3, 1).reshape(-1, 3))
    z, y = torch.cat(zs).double().numpy(), torch.cat(ys).double().numpy()
    A = np.concatenate([z, np.ones((len(z), 1))], 1)
    W, *_ = np.linalg.lstsq(A, y, rcond=None)
    err = np.abs(A @ W - y)
    res = {
        "latent_rgb_factors": [[round(float(v), 5) for v in row] for row in W[:4]],
        "latent_rgb_bias": [round(float(v), 5) for v in W[4]],
        "space": "unet latent (vae latent * scaling_factor)",
        "output": "rgb in [-1, 1]; display as x * 0.5 + 0.5 clamped",
        "fit": {"pairs": int(len(z)), "mean_abs_error": round(float(err.mean()), 4),
                "mean_abs_error_0_255": round(float(err.mean() * 127.5), 2)},
    }
    with open(os.path.join(args.out, "preview.json"), "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    print(f"preview factors: mean abs error {err.mean():.4f} ([-1,1] units) = {err.mean() * 127.5:.1f}/255")
    return res


@torch.no_grad()
def verify_and_samples(args) -> None:
    """Load the folder with StableDiffusionPipeline and generate a sample sheet."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    import judge

    pipe = StableDiffusionPipeline.from_pretrained(args.out, safety_checker=None, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(31337)
    attrs = [dataset.sample_attrs(rng) for _ in range(16)]
    caps = [dataset.caption(a, rng, drop=False) for a in attrs]
    gens = [torch.Generator().manual_seed(i) for i in range(len(caps))]
    imgs = pipe(caps, num_inference_steps=20, guidance_scale=5.0, generator=gens, output_type="np").images
    imgs = (imgs * 255).round().astype(np.uint8)
    assert imgs.shape[1:] == (64, 64, 3), imgs.shape
    res = [judge.judge(im, a) for im, a in zip(imgs, attrs)]
    rows = [np.concatenate(list(imgs[r * 8:(r + 1) * 8]), 1) for r in range(2)]
    Image.fromarray(np.concatenate(rows, 0)).resize((8 * 128, 2 * 128), Image.NEAREST).save(
        os.path.join(args.out, "samples.png"), optimize=True)
    with open(os.path.join(args.ckpt_dir, "samples.json"), "w") as f:
        json.dump([{"caption": c, **r} for c, r in zip(caps, res)], f, indent=1)
    for i, (c, r) in enumerate(zip(caps, res)):
        print(f"sample {i:2d} {'ok ' if r['ok'] else 'BAD'} {c}")
    print(f"diffusers load + generate OK ({sum(r['ok'] for r in res)}/{len(res)} judged right)")


def folder_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 1e6


def eval_line(ev: dict | None) -> str:
    if not ev or "by_wording" not in ev:
        return "(not yet run)"
    err = ev.get("errors")
    why = ""
    if err:
        why = (f"; the {round(ev['n'] * (1 - ev['accuracy']))} wrong images: wrong background {err['background']}, "
               f"no object in the named region (a small shape drawn elsewhere or not at all) {err['no_object']}, "
               f"wrong object colour there {err['object_colour']}")
    target = "reached" if ev["accuracy"] >= 0.9 else "not reached yet"
    return (f"**accuracy {ev['accuracy']:.2f}** on {ev['n']} held-out captions (background colour {ev['bg']:.2f}, "
            f"object colour {ev['object']:.2f}; not scored: position {ev['position']:.2f}, size {ev['size']:.2f}). "
            f"By wording: {ev['by_wording']['seen']:.2f} on captions written in training templates, "
            f"{ev['by_wording']['unseen']:.2f} on the held-out templates (every third caption). The issue's "
            f"target is 0.90: {target}{why}")


def cli_line(runs: list | None) -> str:
    """eval_cli.json: [{"path": "GPU (wgpu on lavapipe)", "accuracy": 0.83, "n": 120, "note": "..."}, ...]"""
    if not runs:
        return "not yet run on this version of the model"
    return "; ".join(f"{r['path']}: accuracy {r['accuracy']:.2f} over {r['n']} captions"
                     + (f" ({r['note']})" if r.get("note") else "") for r in runs)


def _stage(h: dict, n: int, first: bool) -> str:
    a = h["args"]
    where = h.get("device", "cpu")
    where = "on the development machine's CPU (2 threads)" if where == "cpu" else f"on one {where}"
    start = ("from scratch" if first else
             "starting from stage 1's EMA weights with a fresh optimizer and EMA")
    return (f"   {n}. {h.get('steps_done', a['steps'])} steps, batch {a['batch']}, {start}, {where} in "
            f"{h['minutes']:.1f} min: AdamW lr {a['lr']:g} (betas 0.9/0.99, weight decay 0.01, "
            f"{a.get('warmup', 200)} warmup steps, cosine to 10%), EMA {a['ema']}; latent cache of "
            f"{a['cache_size']} scenes; `train_unet.py --steps {h.get('steps_done', a['steps'])} --batch {a['batch']} "
            f"--lr {a['lr']:g} --ema {a['ema']} --warmup {a.get('warmup', 200)} --te-layers {a.get('te_layers', 3)} "
            f"--te-intermediate {a.get('te_intermediate', 256)}{' --init-from STAGE1' if not first else ''}`")


def stages_text(hist: dict) -> str:
    if hist.get("init"):
        return "\n".join([_stage(hist["init"], 1, True), _stage(hist, 2, False)])
    return _stage(hist, 1, True)


def times_text(vae_stats: dict, hist: dict) -> str:
    parts = [f"VAE {vae_stats['minutes']:.0f} min on the development machine (2-core x86 VM, no GPU)"]
    for i, h in enumerate([hist["init"], hist] if hist.get("init") else [hist]):
        dev = h.get("device", "cpu")
        parts.append(f"text encoder + UNet stage {i + 1} {h['minutes']:.1f} min on "
                     f"{'that CPU' if dev == 'cpu' else 'one ' + dev}")
    return "; ".join(parts) + "; plus a few minutes for the latent caches and the export"


def write_card(args) -> None:
    ck, out = args.ckpt_dir, args.out
    load = lambda p: json.load(open(p)) if os.path.exists(p) else None  # noqa: E731
    vae_stats = load(os.path.join(ck, "vae_stats.json"))
    with open(os.path.join(ck, "vae.log")) as f:  # the last logged training losses (means over 50 steps)
        vl = [ln for ln in f if " mse " in ln and " step " in ln][-1].split()
    vae_stats["final_mse"], vae_stats["final_l1"] = float(vl[vl.index("mse") + 1]), float(vl[vl.index("l1") + 1])
    hist = load(os.path.join(ck, "unet_history.json"))
    ev = load(os.path.join(ck, "eval_diffusers.json"))
    preview = load(os.path.join(out, "preview.json"))
    cfg = {d: load(os.path.join(out, d, "config.json")) for d in ("unet", "vae", "text_encoder")}
    from safetensors import safe_open

    def count(path):
        with safe_open(path, "pt") as f:
            return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())

    n_unet = count(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    n_vae = count(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))
    n_te = count(os.path.join(out, "text_encoder", "model.safetensors"))
    losses = [h for h in hist["history"] if "loss" in h]
    last = losses[-20:]
    final_loss = sum(h["loss"] for h in last) / len(last)
    final_mse = sum(h["mse"] for h in last) / len(last)
    evals = [h for h in hist["history"] if "eval" in h]
    a = hist["args"]
    text = CARD.format(
        n_unet=n_unet / 1e6, n_vae=n_vae / 1e6, n_te=n_te / 1e6, n_te_emb=49408 * cfg["text_encoder"]["hidden_size"] / 1e6,
        size_mb=folder_mb(out), unet_ch=cfg["unet"]["block_out_channels"], vae_ch=cfg["vae"]["block_out_channels"],
        te_hidden=cfg["text_encoder"]["hidden_size"], te_layers=cfg["text_encoder"]["num_hidden_layers"],
        te_heads=cfg["text_encoder"]["num_attention_heads"], unet_heads=cfg["unet"]["attention_head_dim"],
        scaling=cfg["vae"]["scaling_factor"], vae_groups=cfg["vae"]["norm_num_groups"],
        unet_groups=cfg["unet"]["norm_num_groups"],
        vae_steps=vae_stats["steps"], vae_batch=vae_stats["batch"], vae_lr=vae_stats["lr"], vae_kl=vae_stats["kl_weight"],
        vae_min=vae_stats["minutes"], vae_err=vae_stats["recon_mean_abs_err_0_255"],
        vae_final_mse=vae_stats.get("final_mse", float("nan")), vae_final_l1=vae_stats.get("final_l1", float("nan")),
        min_snr=a["min_snr"], p_empty=a["p_empty"], n_templates=len(dataset.TRAIN_TEMPLATES),
        stages=stages_text(hist), n_stages="two stages" if hist.get("init") else "one stage", final_loss=final_loss, final_mse=final_mse, times=times_text(vae_stats, hist),
        evals="\n".join(f"| {h['step']} | {h['eval']['accuracy']:.2f} | {h['eval']['bg']:.2f} | "
                        f"{h['eval']['object']:.2f} | {h['eval']['position']:.2f} |" for h in evals),
        eval_line=eval_line(ev),
        cli_line=cli_line(load(os.path.join(ck, "eval_cli.json"))),
        preview_err=preview["fit"]["mean_abs_error"] if preview else float("nan"),
        preview_err255=preview["fit"]["mean_abs_error_0_255"] if preview else float("nan"),
    )
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)
    print(f"wrote {os.path.join(out, 'README.md')}; folder {folder_mb(out):.2f} MB")


CARD = """\
# tiny-shapes: a toy Stable Diffusion trained from scratch

A Stable Diffusion 1.x pipeline at toy size - the same three networks (AutoencoderKL, CLIPTextModel,
UNet2DConditionModel), the same diffusers folder layout, configs and safetensors, the real CLIP BPE
tokenizer - trained from scratch on procedurally rendered 64x64 pictures of one coloured shape on a plain
background. It is this project's offline default: `scripts/serve`, the CLI and the tests use it where real
Stable Diffusion weights cannot be downloaded. It draws prompts like **"a large red circle on a blue
background, top left"**, 64x64 pixels, in a few hundred milliseconds even on a CPU.

![samples](samples.png)

*Samples from diffusers on this folder (DDIM, 20 steps, guidance 5, seeds 0-15), shown at 2x.*

## What it knows

- **Colours** (object and background): red, green, blue, yellow, orange, purple, white, black
- **Shapes**: circle, square, triangle, diamond
- **Sizes**: small, large (little, big)
- **Positions**: top left, top, top right, left, center, right, bottom left, bottom, bottom right
  (also "upper left", "in the top left corner", "at the top", "on the left side", "in the middle", ...)
- Word order varies: "blue background, a red circle in the top left", "top left: a large red circle on blue",
  "a blue background with a big red circle at the upper left", "in the top left of a blue background, a red
  circle", ...

Anything outside this vocabulary gives a plain or arbitrary scene: only the tokens that occur in the
captions were ever trained (the other rows of the 49408-token embedding table keep their random initial
values, shrunk by weight decay).

## Files

| path | contents |
|---|---|
| `model_index.json` | StableDiffusionPipeline, as `save_pretrained` writes it (no safety checker, no feature extractor) |
| `scheduler/scheduler_config.json` | DDIMScheduler: 1000 steps, scaled_linear betas 0.00085..0.012, `prediction_type` v_prediction (as SD 2.x), `timestep_spacing` "trailing", `steps_offset` 1 |
| `text_encoder/` | CLIPTextModel, hidden {te_hidden}, {te_layers} layers, {te_heads} heads, quick_gelu, 77 positions; {n_te:.2f}M parameters ({n_te_emb:.2f}M of them the token embedding table); keys `text_model.*` as SD 1.x ships them |
| `tokenizer/` | CLIP's real BPE vocabulary (49408 tokens): `vocab.json` + `merges.txt` built from the merges file in open_clip's PyPI package (`bpe_simple_vocab_16e6.txt.gz`); ids checked equal to open_clip's tokenizer |
| `unet/` | UNet2DConditionModel, SD 1.x structure at toy widths: block_out_channels {unet_ch}, CrossAttnDownBlock2D x2 + DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D + CrossAttnUpBlock2D x2, layers_per_block 1, {unet_heads} attention heads (`attention_head_dim`, SD 1.x's meaning), cross_attention_dim {te_hidden}, norm_num_groups {unet_groups}, sample_size 16; {n_unet:.2f}M parameters |
| `vae/` | AutoencoderKL, block_out_channels {vae_ch} (downsampling factor 4: 64x64x3 <-> 16x16x4), layers_per_block 1, norm_num_groups {vae_groups}, mid-block attention; scaling_factor {scaling}; {n_vae:.2f}M parameters |
| `preview.json` | live-preview factors: UNet-space latent (VAE latent x scaling_factor) -> RGB in [-1, 1], 4x3 matrix + bias, least squares over 65536 latent/4x-average-pooled-image pairs; mean abs error {preview_err:.4f} (= {preview_err255:.1f}/255) |
| `samples.png` | the picture above |

All weights are float16 safetensors; {size_mb:.1f} MB in all. Generate at 64x64 (the UNet's sample_size 16 x the
VAE's factor 4).

## Evaluation

`scripts/train-tiny/eval_diffusers.py` generates the 120 held-out captions of `scripts/train-tiny/heldout.json`
(attribute combinations excluded from training; every third caption in a wording never seen in training) with
diffusers on this folder (DDIM, 20 steps, guidance 5, each item's own seed) and judges each image from pixel
statistics against the renderer's palette (`judge.py`: background colour = nearest palette colour of the border
pixels' median; object colour = nearest palette colour of the median of the pixels in the object's expected
region that differ from the background): {eval_line}.

Through our own CLI (`scripts/eval-tiny`: the same captions, seeds, sampler and judge; `latent-gen generate
--batch`): {cli_line}.

Accuracy of the training-time check during the last stage (24 training-distribution captions, EMA weights, same
sampler):

| step | accuracy | background | object | position |
|---|---|---|---|---|
{evals}

## Training data

Rendered on the fly by `scripts/train-tiny/dataset.py`: 64x64 RGB, a plain background of one palette colour and
one shape of another (anti-aliased, 4x supersampled), each colour jittered by up to +-8 per channel; small
shapes have a radius of 6-9 px, large 13-17 px; the centre sits at the named third of the image with +-3 px of
jitter. A caption is written fresh for each training sample from {n_templates} templates covering all six
orders of object, background and position (none of them a held-out template), with synonyms for sizes and
positions; 15% of captions leave out the size word, 8% the position, and 10% are empty (for classifier-free
guidance). No external data of any kind.

## Recipe

1. Tokenizer: `tokenizer.py` (offline, from open_clip's merges file).
2. VAE (`train_vae.py`): {vae_steps} steps, batch {vae_batch} of fresh scenes, AdamW lr {vae_lr} (100 warmup
   steps, cosine to 10%), loss MSE + L1 + {vae_kl} x KL (images in [-1, 1]); final training losses MSE
   {vae_final_mse:.4f}, L1 {vae_final_l1:.4f}; mean abs reconstruction error {vae_err:.2f}/255 over 4096 new
   scenes. scaling_factor = 1 / std of the latent means of 4096 scenes = {scaling}.
3. Latent caches (one per stage, sizes below): rendered scenes, the held-out attribute combinations excluded, VAE latent means.
4. Text encoder + UNet, jointly (`train_unet.py`), in {n_stages}:
{stages}

   Every stage: gradient clipping 1.0; DDPM with 1000 timesteps, scaled_linear betas 0.00085..0.012,
   **v prediction** (SD 2.x's objective), v MSE weighted min(1, (gamma + 1) / (snr + 1)) with gamma {min_snr:g}
   (the low-noise end capped, x0 errors at high noise kept at full weight), offset noise 0.1; {p_empty:.0%} empty
   captions; the EMA weights of both networks are exported.

   Why not epsilon prediction, as SD 1.x: three epsilon runs (plain min-SNR; plus an x0-space weight at high
   noise; plus offset noise) drew clean scenes whose background colour ignored the caption (background
   accuracy at chance, 0.13, after 3000 steps). At 16x16 latents the spatial mean of the signal shows through
   the noise already at t = 999 (0.068 x a mean of about 1 against a noise-mean std of 1/16), and an epsilon
   loss gives a wrong x0 there almost no weight, so the model read the colour off the initial noise; with
   guidance 12 the caption still moved x0's mean by a few hundredths. The v target is x0 itself at high
   noise; the first v run had background accuracy 0.79 after 500 steps.
5. Export (`export.py`): float16 safetensors in the diffusers layout, preview factors, samples, this card.

Final losses: VAE reconstruction see step 2; diffusion loss (weighted) {final_loss:.4f}, unweighted v MSE
{final_mse:.4f} (means over the last 1000 steps of the last stage).

Time: {times}.

## Reproduce

```sh
python -m venv /tmp/venv && /tmp/venv/bin/pip install torch diffusers transformers safetensors open_clip_torch numpy pillow
cd scripts/train-tiny
TRAIN_DEVICE=cuda /tmp/venv/bin/python run_all.py --ckpt-dir /tmp/train-tiny-ckpt   # all stages; writes www/models/tiny-shapes
```

Stage 1 wants a GPU (`TRAIN_DEVICE=cuda`; on two CPU cores it would take hours); without `TRAIN_DEVICE` everything
runs on the CPU. Every stage resumes after an interruption and is skipped once done. Results differ in the last
bits from run to run (GPU kernels, data-loader workers) but not in kind.

## License

MIT OR Apache-2.0, the project's license. Trained only on procedurally generated data; the tokenizer files
derive from OpenAI's CLIP BPE merges (MIT), as shipped by open_clip.
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt-dir", default="/work/train-tiny-ckpt")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "www", "models", "tiny-shapes"))
    ap.add_argument("--card-only", action="store_true")
    args = ap.parse_args()
    common.setup_threads()
    args.out = os.path.normpath(args.out)
    if not args.card_only:
        export_weights(args)
        fit_preview(args)
        verify_and_samples(args)
    write_card(args)


if __name__ == "__main__":
    main()
