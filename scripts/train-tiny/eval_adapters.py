"""Jobs and judging for scripts/eval-tiny-adapters (numpy + pillow only, like judge.py).

    python eval_adapters.py jobs KIND DIR     # JSON lines for `latent-gen generate --batch`: DIR/000.png, ...
    python eval_adapters.py judge KIND DIR    # one line per image, "accuracy X.XX" last

KIND is "ring" (ring_heldout.json: right when the background and object colours are and the object is a ring),
"sun" (sun_heldout.json: right when the background is and a large yellow circle is drawn) or "base"
(heldout.json, the model's own concepts, judged as judge.py does: the colours).
"""

from __future__ import annotations

import json
import os
import sys

import concepts
import dataset
import judge

HERE = os.path.dirname(os.path.abspath(__file__))


def items(kind: str) -> list[dict]:
    return dataset.load_heldout(os.path.join(HERE, "heldout.json")) if kind == "base" else concepts.load_heldout(kind)


def verdict(kind: str, path: str, item: dict) -> dict:
    if kind == "ring":
        return concepts.judge_shape(path, item)
    if kind == "sun":
        return concepts.judge_sun(path, item)
    return judge.judge(path, item)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("jobs", "judge") or argv[1] not in ("ring", "sun", "base"):
        print(__doc__)
        return 2
    what, kind, out = argv
    its = items(kind)
    if what == "jobs":
        for i, it in enumerate(its):
            print(json.dumps({"prompt": it["caption"], "seed": it["seed"], "out": os.path.join(out, f"{i:03d}.png")}))
        return 0
    results = [verdict(kind, os.path.join(out, f"{i:03d}.png"), it) for i, it in enumerate(its)]
    for i, (it, r) in enumerate(zip(its, results)):
        extra = f" shape {r['shape']}" if "shape" in r else ""
        print(f"{i:03d} {'OK ' if r['ok'] else 'BAD'} bg {r['bg']:>6} (want {it['bg']:>6})  object {str(r['object']):>6} "
              f"(want {it['color']:>6}){extra} | {it['caption']}")
    acc = sum(r["ok"] for r in results) / len(results)
    print(f"accuracy {acc:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
