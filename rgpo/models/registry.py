"""Unified-model families by name: a plain dict, so a new family is one import and one entry."""

from __future__ import annotations

from typing import Any

from .base import UnifiedModel
from .mindomni import MindOmni

MODEL_FAMILIES: dict[str, type[UnifiedModel]] = {MindOmni.family: MindOmni}


def get_model_class(family: str) -> type[UnifiedModel]:
    """The :class:`UnifiedModel` subclass registered as ``family``."""
    try:
        return MODEL_FAMILIES[family]
    except KeyError:
        known = ", ".join(sorted(MODEL_FAMILIES))
        raise ValueError(f"unknown model family {family!r}; known families: {known}") from None


def load_model(family: str, path: str, **kwargs: Any) -> UnifiedModel:
    """``get_model_class(family).from_pretrained(path, **kwargs)`` (e.g. ``dtype=torch.bfloat16``)."""
    return get_model_class(family).from_pretrained(path, **kwargs)
