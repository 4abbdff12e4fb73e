"""Unified-model families by name: a plain dict, so a new family is one import and one entry.

The family of a checkpoint folder is detected from its layout (:meth:`UnifiedModel.matches_layout`);
``model.family`` forces one. Models built in memory (``model.path: tiny`` or ``random:<shape>``) name theirs.
"""

from __future__ import annotations

import os
from typing import Any

from .base import UnifiedModel
from .blip3o import Blip3o
from .mindomni import MindOmni
from .mm_interleaved import MMInterleaved
from .nexus_gen import NexusGen

MODEL_FAMILIES: dict[str, type[UnifiedModel]] = {MindOmni.family: MindOmni, NexusGen.family: NexusGen,
                                                 Blip3o.family: Blip3o, MMInterleaved.family: MMInterleaved}


def get_model_class(family: str) -> type[UnifiedModel]:
    """The :class:`UnifiedModel` subclass registered as ``family``."""
    try:
        return MODEL_FAMILIES[family]
    except KeyError:
        known = ", ".join(sorted(MODEL_FAMILIES))
        raise ValueError(f"unknown model family {family!r}; known families: {known}") from None


def describe_layouts() -> str:
    """Each family and what its checkpoint folder holds (for error messages)."""
    return "; ".join(f"{name}: {', '.join(cls.layout)}" for name, cls in sorted(MODEL_FAMILIES.items()))


def detect_family(path: str) -> str:
    """The family whose released layout the folder ``path`` holds.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: no family's layout (or several) matches; the message lists each family's files.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    found = [name for name, cls in MODEL_FAMILIES.items() if cls.matches_layout(path)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"{path!r} is in no known model family's layout; set model.family to force one. Known "
                         f"families and what their folders hold: {describe_layouts()}")
    raise ValueError(f"{path!r} matches the layouts of several families {sorted(found)}: set model.family")


def resolve_family(family: str | None, path: str | None) -> type[UnifiedModel]:
    """``model.family`` when given, else the family detected from ``model.path`` (a folder), else the family a
    ``random:<shape>`` names; ``tiny`` needs ``model.family``."""
    if family:
        return get_model_class(family)
    if path and not in_memory(path):
        return get_model_class(detect_family(path))
    if path and str(path).startswith("random:"):
        shape = str(path).split(":", 1)[1]
        owners = [cls for cls in MODEL_FAMILIES.values() if shape in cls.random_shapes and shape != "tiny"]
        if len(owners) == 1:
            return owners[0]
    raise ValueError(f"model.path={path!r} is built in memory: set model.family to one of {sorted(MODEL_FAMILIES)}")


def in_memory(path: str | None) -> bool:
    """Whether ``model.path`` names a model built in memory (``tiny``, ``random:<shape>``) rather than a folder."""
    return path in (None, "", "tiny") or str(path).startswith("random:")


def load_model(family: str | None, path: str, **kwargs: Any) -> UnifiedModel:
    """``resolve_family(family, path).from_pretrained(path, **kwargs)`` (e.g. ``dtype=torch.bfloat16``)."""
    return resolve_family(family, path).from_pretrained(path, **kwargs)
