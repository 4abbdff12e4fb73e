"""Unified reason-then-draw models behind one adapter interface (:class:`UnifiedModel`), and their registry."""

from .base import (
    Completions,
    DecoderOutput,
    ForwardOutput,
    ImageSamplingConfig,
    PromptBatch,
    UnifiedModel,
)
from .mindomni import MindOmni
from .registry import MODEL_FAMILIES, get_model_class, load_model

__all__ = [
    "MODEL_FAMILIES",
    "Completions",
    "DecoderOutput",
    "ForwardOutput",
    "ImageSamplingConfig",
    "MindOmni",
    "PromptBatch",
    "UnifiedModel",
    "get_model_class",
    "load_model",
]
