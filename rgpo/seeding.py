"""Seeds and random state: deterministic seeds mixed from integers, and the RNG state a checkpoint keeps."""

from __future__ import annotations

import random
from typing import Any

import torch


def mix_seed(*numbers: int) -> int:
    """A deterministic 63-bit seed from several integers (step, rank, ...)."""
    value = 0x9E3779B97F4A7C15
    for n in numbers:
        value = (value ^ (int(n) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & 0x7FFFFFFFFFFFFFFF
    return value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """torch's (CPU and CUDA) and Python's global random state, as plain data ``torch.load(weights_only=True)``
    reads back."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
