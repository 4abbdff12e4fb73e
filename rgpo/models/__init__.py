"""Unified reason-then-draw models behind one pipeline-level interface (:class:`UnifiedModel`), and their
registry. Each family lives in its own package (``rgpo.models.<family>``); nothing outside it imports it but
the registry."""

from .base import (
    Completions,
    Condition,
    ForwardOutput,
    GeneratorOutput,
    ImageSamplingConfig,
    Part,
    PromptBatch,
    UnifiedModel,
)
from .registry import MODEL_FAMILIES, detect_family, get_model_class, in_memory, load_model, resolve_family

__all__ = [
    "MODEL_FAMILIES",
    "Completions",
    "Condition",
    "ForwardOutput",
    "GeneratorOutput",
    "ImageSamplingConfig",
    "Part",
    "PromptBatch",
    "UnifiedModel",
    "detect_family",
    "get_model_class",
    "in_memory",
    "load_model",
    "resolve_family",
]
