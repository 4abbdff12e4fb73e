"""The OCR reward: how closely the text read in the image matches a target text (text rendering).

Text is read with RapidOCR: PP-OCR detection and recognition as ONNX models that ship inside its wheel, so
nothing downloads. Either package works: ``rapidocr`` (3.x, maintained, PP-OCRv6 models; ``pip install
'rgpo[ocr]'``) or the older ``rapidocr-onnxruntime`` (1.4, PP-OCRv4 models, Python < 3.13); the first one found
is used unless ``backend`` names one. The reward of an image is

    1 - min(1, levenshtein(read, target) / len(target))

on both texts lower-cased with all whitespace removed (OCR often drops or adds spaces), ``read`` being every
text box RapidOCR finds, joined in its reading order: 1.0 when the target is read exactly, 0.0 when nothing like
it is. This is the normalised edit distance of Flow-GRPO's OCR reward. A chain with several images gets their
mean; a sample whose target is None or empty gets None (the reward does not apply)::

    rewards:
      functions:
        - {name: ocr, kwargs: {text_column: text}}
        - {name: ocr, kwargs: {text_column: text, max_side: 1024}}   # no upscaling of small images

The engine is built once per process (per backend and settings); images are read one at a time (RapidOCR
batches the text boxes within an image).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from .pairs import ANSWER, cached, per_chain_mean, texts_for
from .registry import RewardError, register_reward

__all__ = ["OCRReward", "levenshtein", "text_similarity"]

_SPACE = re.compile(r"\s+")


def levenshtein(a: str, b: str) -> int:
    """The edit distance between ``a`` and ``b``: insertions, deletions and substitutions, each costing 1."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def text_similarity(read: str, target: str) -> float | None:
    """``1 - min(1, levenshtein / len(target))`` on lower-cased texts without whitespace; None for an empty
    target."""
    read, target = _SPACE.sub("", read).lower(), _SPACE.sub("", target).lower()
    if not target:
        return None
    return 1.0 - min(1.0, levenshtein(read, target) / len(target))


_BACKENDS = ("rapidocr", "rapidocr_onnxruntime")


@register_reward("ocr")
class OCRReward:
    """Similarity between the text RapidOCR reads in each image and the sample's target text (module docstring).

    Args:
        text_column: data column holding the text the image should show, or ``"answer"`` for the completion's
            ``<answer>`` text.
        max_side: None: RapidOCR's own resizing (its detector scales the shorter side of an image to 736 px,
            up or down); a number: images are only scaled down, to at most this many pixels on the longer side
            (faster on small images, which it otherwise upscales).
        backend: ``"auto"`` (``rapidocr`` if installed, else ``rapidocr_onnxruntime``), or either name.
        options: further RapidOCR settings, passed as they are: ``RapidOCR(params=options)`` for ``rapidocr``
            (keys like ``"Global.text_score"``), ``RapidOCR(**options)`` for ``rapidocr_onnxruntime`` (keys like
            ``text_score``).
        min_confidence: text boxes RapidOCR is less sure of than this are ignored (RapidOCR itself drops those
            under its text score threshold, 0.5).
    """

    name = "ocr"

    def __init__(self, text_column: str = "text", max_side: int | None = None, backend: str = "auto",
                 options: dict[str, Any] | None = None, min_confidence: float = 0.0) -> None:
        self.backend = _backend(backend)
        self.options = dict(options or {})
        if max_side is not None and max_side < 32:
            raise RewardError(f"reward 'ocr': kwargs.max_side must be None or at least 32 pixels, got {max_side}")
        key = ("rapidocr", self.backend, max_side, json.dumps(self.options, sort_keys=True, default=str))
        try:
            self.engine = cached(key, lambda: _build(self.backend, max_side, self.options))
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"reward 'ocr': building {self.backend}'s RapidOCR with {self.options} raised "
                              f"{type(e).__name__}: {e} (kwargs.options)") from e
        self.text_column, self.min_confidence = text_column, float(min_confidence)
        self.required_columns: tuple[str, ...] = () if text_column == ANSWER else (text_column,)

    def __call__(self, completions: list[Any], images: Sequence[Any] | None = None, **columns: Any) -> list[Any]:
        targets = [None if t is None or not _SPACE.sub("", t) else t
                   for t in texts_for(self.name, self.text_column, completions, columns)]
        return per_chain_mean(images, targets, 1, lambda ims, ts: [text_similarity(self.read(ims[0]), ts[0])])

    def read(self, image: Any) -> str:
        """Every text box found in ``image``, joined with spaces in RapidOCR's order ("" when it finds none)."""
        rgb = image.convert("RGB")  # a PIL image: RapidOCR turns it to BGR itself
        if self.backend == "rapidocr":
            out = self.engine(rgb)
            boxes = zip(out.txts or (), out.scores or ())
        else:
            found, _ = self.engine(rgb)
            boxes = ((text, confidence) for _, text, confidence in found or ())
        return " ".join(text for text, confidence in boxes if float(confidence) >= self.min_confidence)


def _backend(name: str) -> str:
    import importlib.util

    if name not in ("auto", *_BACKENDS):
        raise RewardError(f"reward 'ocr': kwargs.backend must be 'auto' or one of {list(_BACKENDS)}, got {name!r}")
    for candidate in _BACKENDS if name == "auto" else (name,):
        if importlib.util.find_spec(candidate) is not None:
            return candidate
    wanted = "rapidocr (or rapidocr-onnxruntime)" if name == "auto" else name.replace("_", "-")
    raise RewardError(f"reward 'ocr' needs {wanted}, which is not installed: pip install 'rgpo[ocr]'")


def _build(backend: str, max_side: int | None, options: dict[str, Any]) -> Any:
    if backend == "rapidocr":
        from rapidocr import RapidOCR

        limit = {} if max_side is None else {"Det.limit_type": "max", "Det.limit_side_len": max_side}
        return RapidOCR(params={"Global.log_level": "warning", **limit, **options})
    from rapidocr_onnxruntime import RapidOCR

    limit = {} if max_side is None else {"det_limit_type": "max", "det_limit_side_len": max_side}
    return RapidOCR(**{**limit, **options})
