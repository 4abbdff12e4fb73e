"""CLIP image-text consistency reward (MindOmni's RGPO reward), plus a tiny trainable CLIP for tests and demos.

Real use points ``pretrained`` at a local open_clip checkpoint of CLIP ViT-L/14-336 (what MindOmni uses)::

    rewards:
      functions:
        - name: clip_consistency
          kwargs: {model_name: ViT-L-14-336, pretrained: /path/to/open_clip_vit_l14_336.bin, text_column: gt_prompt}

Nothing here downloads: ``pretrained`` must be a local file, e.g. ``open_clip_pytorch_model.bin`` of the
``timm/vit_large_patch14_clip_336.openai`` release fetched beforehand. Those are OpenAI's weights, which need
QuickGELU; ``quick_gelu=None`` turns it on for ViT-L-14-336 (see :func:`default_quick_gelu`).

The tiny CLIP (:func:`build_tiny_clip`, :func:`train_tiny_clip`) is ~1.9M parameters on 32x32 images and
learns coloured shapes (:mod:`rgpo.rewards.shapes`) in seconds on a CPU. It is also registered with open_clip as
``rgpo-tiny-clip``, so a saved ``state_dict`` loads through the same path a real checkpoint does::

    torch.save(bundle.model.state_dict(), "tiny_clip.pt")
    ClipConsistencyReward(model_name="rgpo-tiny-clip", pretrained="tiny_clip.pt")
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

from .contract import chain_images
from .format import completion_text, extract_answer
from .registry import register_reward

if TYPE_CHECKING:  # open_clip is imported lazily: importing `rewards` should not cost a second
    import open_clip
    from PIL import Image

__all__ = [
    "ANSWER",
    "TINY_CLIP_NAME",
    "ClipBundle",
    "ClipConsistencyReward",
    "build_tiny_clip",
    "clear_clip_cache",
    "default_quick_gelu",
    "load_clip",
    "tiny_clip_config",
    "train_tiny_clip",
]

ANSWER = "answer"
"""``text_column`` value meaning: compare the image with the completion's ``<answer>`` text."""

TINY_CLIP_NAME = "rgpo-tiny-clip"
"""open_clip model name under which :func:`tiny_clip_config` is registered."""


class ClipBundle(NamedTuple):
    """A CLIP model with the image transform and tokenizer that belong to it."""

    model: open_clip.CLIP
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]


# ------------------------------------------------------------------------------------------------ loading
_MODEL_CACHE: dict[tuple[str, str | None, str, bool], ClipBundle] = {}
_CACHE_LOCK = threading.Lock()


def load_clip(model_name: str, pretrained: str | None, device: str, quick_gelu: bool | None = None) -> ClipBundle:
    """Build an open_clip model once per ``(model_name, pretrained, device, quick_gelu)``, frozen, in eval mode.

    Every later call with the same key returns the same objects, so several reward instances (or a reward
    built again after a config reload) share one copy of a ViT-L. ``quick_gelu=None``: see
    :func:`default_quick_gelu`.
    """
    if pretrained is not None and not os.path.exists(pretrained):
        raise FileNotFoundError(
            f"clip_consistency: pretrained weights {pretrained!r} not found; pass a local open_clip checkpoint "
            f"file (e.g. CLIP ViT-L/14-336 weights), nothing is downloaded"
        )
    import open_clip

    if model_name == TINY_CLIP_NAME:
        _register_tiny_clip_config()
    if model_name not in open_clip.list_models() and ":" not in model_name:
        raise ValueError(f"clip_consistency: unknown open_clip model {model_name!r}; see open_clip.list_models()")
    if quick_gelu is None:
        quick_gelu = default_quick_gelu(model_name)
    key = (model_name, os.path.abspath(pretrained) if pretrained else None, device, quick_gelu)
    with _CACHE_LOCK:
        if key not in _MODEL_CACHE:
            if pretrained is None:
                warnings.warn(
                    f"clip_consistency: {model_name} has random weights (no 'pretrained' file given); "
                    "its rewards are noise",
                    stacklevel=3,
                )
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu
            )
            _MODEL_CACHE[key] = ClipBundle(_freeze(model), preprocess, open_clip.get_tokenizer(model_name))
        return _MODEL_CACHE[key]


def default_quick_gelu(model_name: str) -> bool:
    """Whether every released open_clip weight for ``model_name`` uses QuickGELU (True for ViT-L-14-336).

    open_clip only knows the activation from a pretrained *tag*; given a file path it builds the plain-GELU
    variant, and OpenAI's CLIP weights in a GELU model give quietly worse embeddings. ViT-L-14-336 has only
    OpenAI's weights, so a checkpoint for it is OpenAI's and needs QuickGELU. Architectures with mixed
    releases (ViT-L-14) give False: pass ``quick_gelu`` explicitly for those.
    """
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    return bool(tags) and all(open_clip.get_pretrained_cfg(model_name, t).get("quick_gelu", False) for t in tags)


def clear_clip_cache() -> None:
    """Drop every cached CLIP model (frees its memory once no reward holds it)."""
    with _CACHE_LOCK:
        _MODEL_CACHE.clear()


def _freeze(model: torch.nn.Module) -> Any:
    model.eval()
    model.requires_grad_(False)
    return model


def _resolve_device(device: str | torch.device | None) -> str:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        # Pin the index now: the reward may run in a worker thread, where a bare "cuda" means GPU 0.
        resolved = torch.device("cuda", torch.cuda.current_device())
    return str(resolved)


# ------------------------------------------------------------------------------------------------ the reward
@register_reward("clip_consistency")
class ClipConsistencyReward:
    """Cosine similarity between each generated image and its text under CLIP, clamped below at ``clamp_min``;
    a chain that drew several images gets the mean over them.

    Args:
        model_name: open_clip architecture; MindOmni uses ``"ViT-L-14-336"``.
        pretrained: path to a LOCAL open_clip checkpoint of that architecture (e.g. the CLIP ViT-L/14-336
            weights); passed to ``open_clip.create_model_and_transforms(model_name, pretrained=path)``. None
            builds random weights (a warning says the rewards are then noise).
        model, preprocess, tokenizer: an already built CLIP to use instead of loading one (tests, the toy
            demo). ``preprocess`` defaults to the model's own eval transform and ``tokenizer`` to open_clip's
            BPE tokenizer at the model's context length. The model is frozen and put in eval mode.
        text_column: data column holding the text the image should depict (MindOmni: ``"gt_prompt"``), or
            ``"answer"`` for the completion's ``<answer>`` text (the whole completion if it has none).
        device: None picks the current CUDA device when there is one, else the CPU; a bare ``"cuda"`` is
            pinned to the current device's index when the reward is built.
        batch_size: images per CLIP forward.
        clamp_min: lower bound of the reward (MindOmni clamps the cosine at 0); None: no clamp.
        quick_gelu: build the model with QuickGELU (OpenAI's CLIP weights need it). None: True when every
            released weight of ``model_name`` uses it, as for ViT-L-14-336 (see :func:`default_quick_gelu`).

    Called with keywords like every reward: ``images`` holds one list of images per chain (a single image or
    None in its place is taken as ``[image]`` or ``[]``). The model is loaded once per (model_name, pretrained,
    device) and shared by all instances. A chain without an image, or whose text column value is None, gets
    None (the reward does not apply to it).
    """

    name = "clip_consistency"

    def __init__(
        self,
        model_name: str = "ViT-L-14-336",
        pretrained: str | None = None,
        model: open_clip.CLIP | None = None,
        preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        text_column: str = "gt_prompt",
        device: str | torch.device | None = None,
        batch_size: int = 32,
        clamp_min: float | None = 0.0,
        quick_gelu: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"clip_consistency: batch_size must be >= 1, got {batch_size}")
        if model is None:
            if preprocess is not None or tokenizer is not None:
                raise ValueError("clip_consistency: preprocess and tokenizer are only used with an injected model=")
            self.device = _resolve_device(device)
            self.model, self.preprocess, self.tokenizer = load_clip(model_name, pretrained, self.device, quick_gelu)
        else:
            if device is not None:
                model.to(_resolve_device(device))
            self.device = str(next(model.parameters()).device)
            self.model = _freeze(model)
            self.preprocess = preprocess or _default_preprocess(model)
            self.tokenizer = tokenizer or _default_tokenizer(model)
        self.text_column = text_column
        self.batch_size = batch_size
        self.clamp_min = clamp_min
        self.required_columns: tuple[str, ...] = () if text_column == ANSWER else (text_column,)

    def __call__(
        self, prompts: list[Any], completions: list[str], images: Sequence[Any] | None = None, **kwargs: Any
    ) -> list[float | None]:
        chains = chain_images(images, len(completions))
        if len(chains) != len(completions):
            raise ValueError(f"clip_consistency: {len(completions)} completions but images for {len(chains)} chains")
        texts = self._texts(completions, kwargs)
        # Every (chain, image) pair, scored in batches of batch_size whatever the number of images per chain.
        pairs = [(i, image) for i, (chain, text) in enumerate(zip(chains, texts)) if text is not None for image in chain]
        per_chain: list[list[float]] = [[] for _ in completions]
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            cosines = self.similarity([image for _, image in chunk], [texts[i] for i, _ in chunk])
            if self.clamp_min is not None:  # per image, as MindOmni clamps each image's cosine
                cosines = cosines.clamp(min=self.clamp_min)
            for (i, _), value in zip(chunk, cosines.tolist()):
                per_chain[i].append(value)
        return [sum(values) / len(values) if values else None for values in per_chain]

    @torch.inference_mode()
    def similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """(len(images),) cosine similarity of each image with the text at the same position, on the CPU."""
        pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(self.device)
        tokens = self.tokenizer(list(texts)).to(self.device)
        image_emb = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (image_emb * text_emb).sum(dim=-1).cpu()

    def _texts(self, completions: list[str], columns: dict[str, Any]) -> list[str | None]:
        if self.text_column == ANSWER:
            return [a if (a := extract_answer(t)) is not None else t for t in map(completion_text, completions)]
        if self.text_column not in columns:
            raise KeyError(f"clip_consistency needs column {self.text_column!r}; columns given: {sorted(columns)}")
        texts = columns[self.text_column]
        for i, text in enumerate(texts):
            if text is not None and not isinstance(text, str):
                raise TypeError(f"clip_consistency: column {self.text_column!r} sample {i} is {type(text).__name__}, expected str")
        return list(texts)

    def __repr__(self) -> str:
        return f"ClipConsistencyReward(text_column={self.text_column!r}, device={self.device!r}, clamp_min={self.clamp_min})"


def _default_preprocess(model: open_clip.CLIP) -> Callable[[Image.Image], torch.Tensor]:
    import open_clip

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return open_clip.image_transform(model.visual.image_size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"))


def _default_tokenizer(model: open_clip.CLIP) -> Callable[[list[str]], torch.Tensor]:
    import open_clip

    return open_clip.SimpleTokenizer(context_length=model.context_length)


# ------------------------------------------------------------------------------------------------ tiny CLIP
def tiny_clip_config(image_size: int = 32, embed_dim: int = 64, context_length: int = 16) -> dict[str, Any]:
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) for a ~1.9M-parameter CLIP.

    The image tower is open_clip's ModifiedResNet (CLIP's RN50 design) at 1/8 of RN50's width with one block
    per stage: convolutions learn shapes in a hundred CPU steps, where a ViT this small still mixes circles
    and squares up. ``image_size`` must be a multiple of 32. Over half the parameters are the token embedding
    of the full 49408-token BPE vocabulary, which lets the stock tokenizer be used unchanged.
    """
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32 (the ResNet downsamples 32x), got {image_size}")
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                     "mlp_ratio": 2.0},
    }


def _register_tiny_clip_config() -> None:
    """Make :data:`TINY_CLIP_NAME` known to open_clip (it only reads model configs from JSON files)."""
    import open_clip

    if TINY_CLIP_NAME in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory() as tmp:  # read at once by add_model_config; the file can go after
        path = Path(tmp) / f"{TINY_CLIP_NAME}.json"
        path.write_text(json.dumps(tiny_clip_config()))
        open_clip.add_model_config(path)


def build_tiny_clip(config: dict[str, Any] | None = None, seed: int = 0, device: str = "cpu") -> ClipBundle:
    """A freshly initialised tiny CLIP (:func:`tiny_clip_config` unless ``config`` is given), seeded.

    The tokenizer is open_clip's BPE tokenizer, whose vocabulary ships inside the wheel (works offline).
    The caller's global RNG state is left untouched.
    """
    import open_clip

    config = config or tiny_clip_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**config).to(device)
    return ClipBundle(model, _default_preprocess(model), _default_tokenizer(model))


def train_tiny_clip(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    steps: int = 100,
    seed: int = 0,
    *,
    bundle: ClipBundle | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> ClipBundle:
    """Train a CLIP contrastively (InfoNCE, AdamW) on image-caption pairs; returns it frozen, in eval mode.

    Captions may repeat (many images of "a red circle"): pairs with equal captions are all positives, with
    the target probability spread evenly over them, instead of pushing identical captions apart.

    Args:
        images, captions: the training pairs.
        steps: optimizer steps, each on ``batch_size`` pairs drawn at random.
        seed: seeds the initialisation (when ``bundle`` is None) and the batch draws.
        bundle: a model to keep training; None builds :func:`build_tiny_clip` with ``seed``.
        batch_size, lr: AdamW's batch and peak learning rate (warmup, then cosine decay).

    The defaults learn :func:`rgpo.rewards.shapes.synthetic_shapes` (20 images per caption) in about 7 s on one CPU
    thread. On a small machine shared with other jobs, ``torch.set_num_threads(1)`` can be far faster than
    two threads, whose OpenMP barriers stall whenever one of them is descheduled.
    """
    if len(images) != len(captions) or not images:
        raise ValueError(f"need as many captions as images, at least one; got {len(images)} and {len(captions)}")
    bundle = bundle or build_tiny_clip(seed=seed)
    model = bundle.model
    device = next(model.parameters()).device
    pixels = torch.stack([bundle.preprocess(image.convert("RGB")) for image in images]).to(device)
    unique = list(dict.fromkeys(captions))
    tokens = bundle.tokenizer(unique).to(device)
    index = {c: k for k, c in enumerate(unique)}
    ids = torch.tensor([index[c] for c in captions], device=device)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)  # a short warmup, then cosine decay to end on a settled model
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    for _ in range(steps):
        batch = torch.randperm(len(images), generator=generator)[:batch_size].to(device)
        # Encode each distinct caption of the batch once; the gradient is the same as encoding every copy.
        batch_ids, inverse = ids[batch].unique(return_inverse=True)
        image_emb = model.encode_image(pixels[batch], normalize=True)
        text_emb = model.encode_text(tokens[batch_ids], normalize=True)[inverse]
        logits = model.logit_scale.exp() * image_emb @ text_emb.T
        same = (inverse[:, None] == inverse[None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)  # symmetric, so it serves both directions
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return ClipBundle(_freeze(model), bundle.preprocess, bundle.tokenizer)
