"""What the image rewards share: local weight paths checked early, models loaded once per process, the text
each image is compared with, and (chain, image) pairs scored in batches then averaged per chain.

Nothing here downloads: every model reward takes paths to weights fetched beforehand, and a missing or wrong
path is a :class:`~rgpo.rewards.RewardError` naming the reward and its config key before the run starts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .contract import chain_images
from .format import completion_text, extract_answer
from .registry import RewardError

__all__ = ["ANSWER", "cached", "check_batch_size", "frozen", "local_path", "per_chain_mean", "resolve_device",
           "texts_for", "torch_dtype"]

ANSWER = "answer"
"""``text_column`` value meaning: the completion's ``<answer>`` text (the whole completion if it has none)."""

_CACHE: dict[tuple[Any, ...], Any] = {}
_CACHE_LOCK = threading.Lock()


def local_path(reward: str, key: str, value: str | os.PathLike[str] | None, what: str, *, folder: bool) -> Path:
    """``value`` as an existing local file (or ``folder``), else a RewardError naming the reward, its config key
    (``kwargs.<key>``) and what the path should hold."""
    kind = "folder" if folder else "file"
    if value is None or value == "":
        raise RewardError(f"reward {reward!r} needs kwargs.{key}: a local {kind} with {what} (weights are never "
                          f"downloaded; fetch them beforehand)")
    path = Path(value).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        found = "a folder" if path.is_dir() else "a file" if path.exists() else "nothing"
        raise RewardError(f"reward {reward!r}: kwargs.{key} = {str(value)!r} should be a local {kind} with {what}, "
                          f"but {found} is there (cwd {os.getcwd()})")
    return path.resolve()


def cached(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """``build()`` once per ``key`` in this process (several rewards, or a reward built twice, share a model)."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def clear_cache() -> None:
    """Forget every model loaded by :func:`cached` (its memory is freed once no reward holds it)."""
    with _CACHE_LOCK:
        _CACHE.clear()


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(reward: str, name: str) -> torch.dtype:
    """The torch dtype for a reward's ``dtype`` setting, or a RewardError listing the valid ones."""
    if name not in _DTYPES:
        raise RewardError(f"reward {reward!r}: kwargs.dtype must be one of {list(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def check_batch_size(reward: str, batch_size: int) -> None:
    if batch_size < 1:
        raise RewardError(f"reward {reward!r}: kwargs.batch_size must be >= 1, got {batch_size}")


def frozen(model: torch.nn.Module) -> Any:
    """``model`` in eval mode with gradients off (a reward model is never trained)."""
    model.eval()
    model.requires_grad_(False)
    return model


def resolve_device(device: str | torch.device | None) -> str:
    """None: the current CUDA device when there is one, else the CPU. A bare ``"cuda"`` is pinned to the current
    index now: the reward may run in a worker thread, where it would mean GPU 0."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return str(resolved)


def texts_for(reward: str, text_column: str, completions: Sequence[Any], columns: dict[str, Any]) -> list[Any]:
    """The text each sample's images are compared with: the ``text_column`` data column, or the completion's
    answer for ``"answer"``; None entries mean the reward does not apply to that sample."""
    if text_column == ANSWER:
        return [a if (a := extract_answer(t)) is not None else t for t in map(completion_text, completions)]
    if text_column not in columns:
        raise RewardError(f"reward {reward!r} needs column {text_column!r} (kwargs.text_column); the batch has "
                          f"{sorted(columns)}")
    texts = list(columns[text_column])
    for i, text in enumerate(texts):
        if text is not None and not isinstance(text, str):
            raise RewardError(f"reward {reward!r}: column {text_column!r} of sample {i} is {type(text).__name__} "
                              f"{text!r:.60}, expected text")
    return texts


def per_chain_mean(images: Sequence[Any] | None, texts: Sequence[Any], batch_size: int,
                   score: Callable[[list[Any], list[Any]], Sequence[float]]) -> list[float | None]:
    """Each chain's mean of ``score(images, texts)`` over its images, computed on every (image, its chain's text)
    pair in batches of ``batch_size`` whatever the number of images per chain; None for a chain with no image or
    a None text."""
    chains = chain_images(images, len(texts))
    pairs = [(i, image) for i, (chain, text) in enumerate(zip(chains, texts)) if text is not None for image in chain]
    values: list[list[float]] = [[] for _ in texts]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        scores = score([image for _, image in chunk], [texts[i] for i, _ in chunk])
        for (i, _), value in zip(chunk, scores):
            values[i].append(float(value))
    return [sum(v) / len(v) if v else None for v in values]
