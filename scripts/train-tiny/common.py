"""Shared training helpers: checkpoints that survive being killed, logging, learning-rate schedule."""

from __future__ import annotations

import math
import os
import time

import torch


def setup_threads() -> None:
    # The development machine has two cores shared with other work: train on one.
    torch.set_num_threads(int(os.environ.get("TRAIN_THREADS", "1")))


def device() -> torch.device:
    """TRAIN_DEVICE=cuda trains on a GPU when one is at hand; the default is the CPU."""
    return torch.device(os.environ.get("TRAIN_DEVICE", "cpu"))


def save_ckpt(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save leaves the previous checkpoint intact


def load_ckpt(path: str):
    if os.path.exists(path):
        return torch.load(path, map_location="cpu", weights_only=False)
    return None


def lr_at(step: int, total: int, base: float, warmup: int, final_frac: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


class Log:
    def __init__(self, path: str):
        self.f = open(path, "a")

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()
