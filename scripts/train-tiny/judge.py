"""Judge a generated tiny-shapes image against its caption's attributes from pixel statistics.

numpy + pillow only (no torch), importable and usable from the command line.

Rules (the renderer's palette is dataset.PALETTE):
- background colour = the palette colour nearest (RGB distance) to the per-channel median of the
  border pixels (the outermost 2-pixel ring);
- object colour = the palette colour nearest to the per-channel median of the pixels inside the
  object's expected region (the third of the image its position names, widened: left = x in
  [0, 36), center = [14, 50), right = [28, 64), same for top/middle/bottom) that differ from the
  measured background by more than 60 (RGB distance); fewer than 12 such pixels = no object.
- correct = background colour right and object colour right (the accuracy the issue asks for).
Also reported, not part of "correct": position (centroid of all differing pixels within the
expected region) and size (differing-pixel count above/below 280 at 64x64).

    python judge.py IMAGE '{"color": "red", "bg": "blue", "position": "top left", ...}'
    python judge.py --heldout heldout.json --images DIR   # DIR/000.png, 001.png, ... per item
    python judge.py --selftest                             # the renderer's own images must score 1.00
The batch forms print one line per image and "accuracy X.XX" as the last line.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dataset  # noqa: E402

SIZE = dataset.SIZE
NAMES = list(dataset.PALETTE)
COLORS = np.array([dataset.PALETTE[n] for n in NAMES], np.float32)
RANGES = [(0, 36), (14, 50), (28, 64)]
DIFF_THRESHOLD = 60.0
MIN_PIXELS = 12
SIZE_THRESHOLD = 280


def nearest(rgb) -> str:
    d = ((COLORS - np.asarray(rgb, np.float32)[None]) ** 2).sum(1)
    return NAMES[int(d.argmin())]


def to_array(img) -> np.ndarray:
    if isinstance(img, (str, os.PathLike)):
        img = Image.open(img)
    if isinstance(img, Image.Image):
        img = img.convert("RGB")
        if img.size != (SIZE, SIZE):
            img = img.resize((SIZE, SIZE), Image.BOX)
        return np.asarray(img, np.float32)
    a = np.asarray(img)
    if a.shape[:2] != (SIZE, SIZE):
        return to_array(Image.fromarray(a.astype(np.uint8)))
    return a.astype(np.float32)


def judge(img, attrs: dict) -> dict:
    a = to_array(img)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3),
                             a[2:-2, :2].reshape(-1, 3), a[2:-2, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    bg = nearest(bg_rgb)
    diff = np.sqrt(((a - bg_rgb[None, None]) ** 2).sum(-1)) > DIFF_THRESHOLD
    hx, vy = dataset.POSITIONS[attrs["position"]] if attrs.get("position") else (None, None)
    region = np.zeros_like(diff)
    if hx is None:
        region[:] = True
    else:
        (x0, x1), (y0, y1) = RANGES[hx], RANGES[vy]
        region[y0:y1, x0:x1] = True
    sel = diff & region
    n = int(sel.sum())
    obj = nearest(np.median(a[sel], axis=0)) if n >= MIN_PIXELS else None
    res = {"bg": bg, "object": obj, "object_pixels": n,
           "bg_ok": bg == attrs["bg"], "object_ok": obj == attrs["color"]}
    res["ok"] = res["bg_ok"] and res["object_ok"]
    if n >= MIN_PIXELS and hx is not None:
        ys, xs = np.nonzero(diff)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        res["position_ok"] = bool(x0 <= cx < x1 and y0 <= cy < y1)
    else:
        res["position_ok"] = False
    if attrs.get("size"):
        res["size_ok"] = (int(diff.sum()) > SIZE_THRESHOLD) == (attrs["size"] == "large")
    return res


def summarize(results: list[dict]) -> dict:
    n = len(results)
    f = lambda k: sum(bool(r.get(k)) for r in results) / max(1, n)  # noqa: E731
    return {"n": n, "accuracy": f("ok"), "bg": f("bg_ok"), "object": f("object_ok"),
            "position": f("position_ok"), "size": f("size_ok")}


def by_wording(results: list[dict]) -> dict:
    """Accuracy on the items written in held-out templates (every third, see dataset.make_heldout) and on
    the rest."""
    unseen = [r["ok"] for i, r in enumerate(results) if i % 3 == 0]
    seen = [r["ok"] for i, r in enumerate(results) if i % 3 != 0]
    return {"unseen": sum(unseen) / max(1, len(unseen)), "seen": sum(seen) / max(1, len(seen))}


def errors(results: list[dict], items: list[dict]) -> dict:
    """How the wrong images are wrong: background, no object found in the named region, object colour."""
    out = {"background": 0, "no_object": 0, "object_colour": 0}
    for r, it in zip(results, items):
        if r["ok"]:
            continue
        if r["bg"] != it["bg"]:
            out["background"] += 1
        elif r["object"] is None:
            out["no_object"] += 1
        else:
            out["object_colour"] += 1
    return out


def report(items: list[dict], results: list[dict], out=sys.stdout) -> float:
    for i, (it, r) in enumerate(zip(items, results)):
        print(f"{i:03d} {'OK ' if r['ok'] else 'BAD'} bg {r['bg']:>6} (want {it['bg']:>6})  object "
              f"{str(r['object']):>6} (want {it['color']:>6}, {r['object_pixels']:4d} px)  "
              f"pos {'ok' if r['position_ok'] else 'no'}  size {'ok' if r.get('size_ok') else 'no'}  "
              f"| {it.get('caption', '')}", file=out)
    s = summarize(results)
    print(f"background {s['bg']:.2f}, object colour {s['object']:.2f}, position {s['position']:.2f}, "
          f"size {s['size']:.2f} over {s['n']} images", file=out)
    w = by_wording(results)
    print(f"held-out wordings (every third item) {w['unseen']:.2f}, training wordings {w['seen']:.2f}", file=out)
    print(f"accuracy {s['accuracy']:.2f}", file=out)
    return s["accuracy"]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--selftest"]:
        items = dataset.make_heldout()
        rng = np.random.default_rng(0)
        results = [judge(dataset.render(it, rng), it) for it in items]
        acc = report(items, results)
        return 0 if acc == 1.0 else 1
    if len(argv) == 4 and argv[0] == "--heldout" and argv[2] == "--images":
        items = dataset.load_heldout(argv[1])
        results = []
        for i, it in enumerate(items):
            p = os.path.join(argv[3], f"{i:03d}.png")
            if not os.path.exists(p):
                print(f"missing {p}", file=sys.stderr)
                results.append({"ok": False, "bg": "-", "object": None, "object_pixels": 0,
                                "position_ok": False})
                continue
            results.append(judge(p, it))
        report(items, results)
        return 0
    if len(argv) == 2:
        print(json.dumps(judge(argv[0], json.loads(argv[1]))))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
