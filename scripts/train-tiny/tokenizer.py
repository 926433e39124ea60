"""Build CLIP's real BPE tokenizer files (vocab.json + merges.txt, 49408 tokens) offline.

The source is the merges file that ships inside open_clip's PyPI package
(`open_clip/bpe_simple_vocab_16e6.txt.gz`, the file OpenAI's CLIP repository ships). The vocabulary is
built exactly as open_clip's / OpenAI's SimpleTokenizer builds it: the 256 byte symbols, the same
with "</w>", one token per merge (the first 49152-256-2 lines after the header), then the two
special tokens, which transformers names "<|startoftext|>" (49406) and "<|endoftext|>" (49407).
The folder has the layout of Stable Diffusion 1.x's `tokenizer/` (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json) and is verified: transformers' CLIPTokenizer loaded
from it must give the same ids as open_clip's tokenizer.

    python tokenizer.py OUT_DIR
"""

from __future__ import annotations

import gzip
import json
import os
import sys


def bytes_to_unicode() -> dict:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def open_clip_bpe_path() -> str:
    import open_clip.tokenizer as oct

    return oct.default_bpe()


def build_vocab_and_merges(bpe_path: str) -> tuple[dict, list[tuple[str, str]]]:
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    enc = {t: i for i, t in enumerate(vocab)}
    assert len(enc) == 49408, "duplicate tokens"
    return enc, merges


def write_tokenizer(out_dir: str, bpe_path: str | None = None) -> None:
    enc, merges = build_vocab_and_merges(bpe_path or open_clip_bpe_path())
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(enc, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    # Stable Diffusion 1.x's tokenizer settings: pad with <|endoftext|>, 77 positions, lower case.
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"add_prefix_space": False, **special, "do_lower_case": True, "errors": "replace",
              "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    for name, obj in (("special_tokens_map.json", special), ("tokenizer_config.json", config)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    verify(out_dir)


SAMPLES = [
    "a large red circle on a blue background, top left",
    "bottom right corner: a little purple triangle on an orange background!",
    "A photograph of an astronaut riding a horse, 4k, trending on artstation",
    "Hello   WORLD... it's 3.14 o'clock ünïcødé 東京 🙂",
    "",
]


def verify(out_dir: str) -> None:
    """transformers' CLIPTokenizer on the written files == open_clip's SimpleTokenizer."""
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    ref = oct.SimpleTokenizer()
    tok = CLIPTokenizer.from_pretrained(out_dir)
    assert len(tok) == 49408, len(tok)
    assert tok.model_max_length == 77
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407
    import dataset

    import numpy as np

    rng = np.random.default_rng(1)
    texts = SAMPLES + [dataset.caption(dataset.sample_attrs(rng), rng) for _ in range(300)]
    for t in texts:
        want = [ref.sot_token_id] + ref.encode(t) + [ref.eot_token_id]
        got = tok(t).input_ids
        assert got == want, (t, got, want)
    padded = tok(SAMPLES[0], padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
    print(f"tokenizer OK: {len(tok)} tokens, ids match open_clip on {len(texts)} texts; "
          f"{SAMPLES[0]!r} -> {tok(SAMPLES[0]).input_ids}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    write_tokenizer(sys.argv[1])
