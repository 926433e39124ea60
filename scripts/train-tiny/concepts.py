"""Two concepts tiny-shapes was never trained on, for its LoRA and its textual-inversion embedding
(train_adapters.py, eval_adapters.py):

- the **ring**, a new shape and a new word (the base model's "ring" token was never trained and no training
  scene had a hole), taught by a LoRA: "a large red ring on a blue background, top left". Rings are large
  (radius 13-17 px) and thick (the hole half the radius): the model's VAE (4x downsampling, trained on filled
  shapes) keeps such a ring's hole and colour (its round trip of the held-out rings judges 0.94-1.00, and
  0.88-0.96 with a hole of 0.6 the radius) but blurs a small ring into an off-colour dot. (The first choice,
  the colour pink, failed for the same reason: the VAE decodes a pink scene's latent to yellow or orange, so no
  UNet LoRA can make pink; a LoRA for the VAE decoder would be needed.)
- the **tiny-sun**, a large yellow circle, taught by a two-vector textual-inversion embedding whose trigger
  word is "tiny-sun": "tiny-sun on a blue background, top left".

The base dataset (dataset.py) is untouched, so the bundled model's recipe and held-out list stay
reproducible.

    python concepts.py heldout   # (re)writes ring_heldout.json and sun_heldout.json
    python concepts.py grid out.png
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

import dataset
import judge

HERE = os.path.dirname(os.path.abspath(__file__))
TRIGGER = "tiny-sun"
SUN = {"shape": "circle", "color": "yellow", "size": "large"}
RING_INNER = 0.5
HOLE_PIXELS = 12
HOLE_SHARE = 0.1


def sample_ring(rng: np.random.Generator) -> dict:
    """A scene with a large ring of any colour on any other background, anywhere."""
    return {**dataset.sample_attrs(rng), "shape": "ring", "size": "large"}


def sample_sun(rng: np.random.Generator) -> dict:
    """A tiny-sun scene: a large yellow circle on any other background, anywhere."""
    a = dataset.sample_attrs(rng)
    while a["bg"] == "yellow":
        a = dataset.sample_attrs(rng)
    return {**a, **SUN}


def mask(a: dict, geom: dict) -> np.ndarray:
    """The shape's coverage: dataset.shape_mask, and the ring (a disc with a hole of RING_INNER its radius)."""
    if a["shape"] != "ring":
        return dataset.shape_mask(a["shape"], geom["cx"], geom["cy"], geom["r"])
    outer = dataset.shape_mask("circle", geom["cx"], geom["cy"], geom["r"])
    return outer - dataset.shape_mask("circle", geom["cx"], geom["cy"], geom["r"] * RING_INNER)


def render(a: dict, rng: np.random.Generator) -> np.ndarray:
    """dataset.render with rings."""
    geom = dataset.sample_geometry(a, rng)
    jitter = lambda: rng.integers(-dataset.COLOR_JITTER, dataset.COLOR_JITTER + 1, 3)  # noqa: E731
    bg = np.array(dataset.PALETTE[a["bg"]], np.float32) + jitter()
    fg = np.array(dataset.PALETTE[a["color"]], np.float32) + jitter()
    m = mask(a, geom)[..., None]
    return np.clip(np.round(bg * (1 - m) + fg * m), 0, 255).astype(np.uint8)


def render_batch(attrs: list[dict], rng: np.random.Generator) -> np.ndarray:
    imgs = np.stack([render(a, rng) for a in attrs]).astype(np.float32)
    return (imgs / 127.5 - 1.0).transpose(0, 3, 1, 2)


def sun_caption(a: dict, rng: np.random.Generator, templates: list[str] | None = None, trigger: str = TRIGGER) -> str:
    """A caption whose object is the trigger word ("tiny-sun on a blue background, top left")."""
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    t = pick(templates or dataset.TRAIN_TEMPLATES)
    return t.format(obj=trigger, bg=a["bg"], a_bg=dataset._article(a["bg"]) + " " + a["bg"],
                    pos=pick(dataset.POS_BARE[a["position"]]), prep=pick(dataset.POS_PREP[a["position"]]))


def _object(img):
    """The image as floats and the mask of the pixels that differ from the border's median colour (the
    outermost 2 pixels, as judge.judge measures the background)."""
    a = judge.to_array(img)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[2:-2, :2].reshape(-1, 3),
                             a[2:-2, -2:].reshape(-1, 3)])
    return a, np.sqrt(((a - np.median(border, axis=0)[None, None]) ** 2).sum(-1)) > judge.DIFF_THRESHOLD


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected set of True pixels."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        todo, comp = [(y0, x0)], []
        while todo:
            y, x = todo.pop()
            comp.append((y, x))
            for yy in range(max(0, y - 1), min(h, y + 2)):
                for xx in range(max(0, x - 1), min(w, x + 2)):
                    if mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        todo.append((yy, xx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def _holes(obj: np.ndarray) -> np.ndarray:
    """The pixels outside obj that no 4-connected path of pixels outside obj joins to the image's edge."""
    free = np.pad(~obj, 1, constant_values=True)
    outside = np.zeros_like(free)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= free
        if (grown == outside).all():
            return (free & ~outside)[1:-1, 1:-1]
        outside = grown


def shape_of(img) -> str | None:
    """The shape of the object (the largest 8-connected set of pixels that differ from the background): a
    ring when it encloses a hole, background that no path outside the object joins to the edge, of at least
    HOLE_PIXELS and HOLE_SHARE of the filled outline (a rendered ring's is 0.25; a dot left in the middle of
    the hole still counts as hole); otherwise by how much of its bounding box it fills (square ~1, circle
    ~0.79, diamond and triangle ~0.5; a triangle's mass sits low); None without an object."""
    _, diff = _object(img)
    obj = _largest_component(diff)
    ys, xs = np.nonzero(obj)
    if len(xs) < judge.MIN_PIXELS:
        return None
    hole = int(_holes(obj).sum())
    if hole >= HOLE_PIXELS and hole >= HOLE_SHARE * (hole + len(xs)):
        return "ring"
    (x0, x1), (y0, y1) = (xs.min(), xs.max()), (ys.min(), ys.max())
    fill = len(xs) / ((x1 - x0 + 1) * (y1 - y0 + 1))
    if fill > 0.88:
        return "square"
    if fill > 0.66:
        return "circle"
    low = (ys.mean() - y0) / max(1, y1 - y0)
    return "triangle" if low > 0.56 else "diamond"


def core_colour(img, attrs: dict) -> str | None:
    """judge.judge's object colour, from the half of the object's pixels that differ most from the
    background: a ring's stroke is a few pixels wide, so its anti-aliased edges (background and object mixed)
    are a third of it and would pull a filled shape's median toward the background."""
    a, _ = _object(img)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[2:-2, :2].reshape(-1, 3),
                             a[2:-2, -2:].reshape(-1, 3)])
    dist = np.sqrt(((a - np.median(border, axis=0)[None, None]) ** 2).sum(-1))
    (x0, x1), (y0, y1) = (judge.RANGES[i] for i in dataset.POSITIONS[attrs["position"]])
    region = np.zeros(dist.shape, bool)
    region[y0:y1, x0:x1] = True
    sel = (dist > judge.DIFF_THRESHOLD) & region
    if sel.sum() < judge.MIN_PIXELS:
        return None
    core = sel & (dist >= np.median(dist[sel]))
    return judge.nearest(np.median(a[core], axis=0))


def judge_shape(img, attrs: dict) -> dict:
    """judge.judge's background colour, the object's colour (core_colour) and its shape: right when all
    three are."""
    r = judge.judge(img, attrs)
    r["object"] = core_colour(img, attrs)
    r["shape"] = shape_of(img)
    r["ok"] = bool(r["bg_ok"] and r["object"] == attrs["color"] and r["shape"] == attrs["shape"])
    return r


def judge_sun(img, attrs: dict) -> dict:
    """A tiny-sun is right when the background is, and the object is yellow and large (judge.py's colour and
    size rules; like judge.py, the outline is not scored: on a white or orange background a yellow disc's edge
    is too faint for the fill-ratio rule of shape_of, which is reported only)."""
    r = judge.judge(img, {**attrs, **SUN})
    r["shape"] = shape_of(img)
    r["ok"] = bool(r["ok"] and r.get("size_ok"))
    return r


def make_heldout(kind: str, n: int, seed: int) -> list[dict]:
    """n distinct scenes of the concept with captions (every third in a held-out wording); training leaves
    these attribute combinations out."""
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        a = sample_ring(rng) if kind == "ring" else sample_sun(rng)
        if dataset.attr_key(a) in seen:
            continue
        seen.add(dataset.attr_key(a))
        templates = dataset.HELDOUT_TEMPLATES if len(out) % 3 == 0 else dataset.TRAIN_TEMPLATES[:9]
        a["caption"] = (dataset.caption(a, rng, templates=templates, drop=False) if kind == "ring"
                        else sun_caption(a, rng, templates))
        a["seed"] = int(seed % 10000 + len(out))
        out.append(a)
    return out


HELDOUT = {"ring": ("ring_heldout.json", 48, 51515), "sun": ("sun_heldout.json", 48, 62626)}


def heldout_path(kind: str) -> str:
    return os.path.join(HERE, HELDOUT[kind][0])


def load_heldout(kind: str) -> list[dict]:
    return dataset.load_heldout(heldout_path(kind))


if __name__ == "__main__":
    if sys.argv[1:] == ["heldout"]:
        for kind, (name, n, seed) in HELDOUT.items():
            items = make_heldout(kind, n, seed)
            with open(heldout_path(kind), "w") as f:
                json.dump({"seed": seed, "note": f"held-out {kind} scenes: these attribute combinations are "
                           "excluded from adapter training; every third caption uses a held-out wording",
                           "items": items}, f, indent=1)
                f.write("\n")
            print(f"wrote {len(items)} items to {name}")
    elif len(sys.argv) == 3 and sys.argv[1] == "grid":
        from PIL import Image

        rng = np.random.default_rng(0)
        attrs = [sample_ring(rng) for _ in range(16)] + [sample_sun(rng) for _ in range(16)]
        imgs = [render(a, rng) for a in attrs]
        for a in attrs[:16]:
            print(dataset.caption(a, rng))
        for a in attrs[16:]:
            print(sun_caption(a, rng))
        grid = np.concatenate([np.concatenate(imgs[r * 8:(r + 1) * 8], 1) for r in range(4)], 0)
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(sys.argv[2])
        # Self-check: the judges score the renderer's own images 1.0, and the base model's shapes are told apart.
        ring = [judge_shape(render(it, rng), it)["ok"] for it in load_heldout("ring")]
        sun = [judge_sun(render(it, rng), it)["ok"] for it in load_heldout("sun")]
        base = [shape_of(dataset.render(it, rng)) == it["shape"] for it in dataset.make_heldout()]
        print(f"judge self-check: ring {np.mean(ring):.2f}, tiny-sun {np.mean(sun):.2f}, base shapes {np.mean(base):.2f}")
    else:
        print(__doc__)
        sys.exit(2)
