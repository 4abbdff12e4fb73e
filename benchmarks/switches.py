"""Everything the benchmarks do to a model beyond the :class:`rgpo.models.UnifiedModel` interface, in one place.

- **Equal work** (:func:`ban_eos`): the family's end-of-sequence ids join its banned ids (``eos_token_ids`` and
  ``banned_token_ids``, plain attributes of the language side), so every chain is ``max_new_tokens`` long.
- **LoRA targets without lm_head** (:func:`lora_without_lm_head`): TRL refuses a LoRA on lm_head, so for the
  side-by-side run the model the benchmark builds reports its language-model LoRA targets without it. This is an
  override on that one model instance (rgpo's config has no key for the language model's LoRA targets).
- **The text model for TRL** (:func:`save_text_model`): the language model part saved with the family's
  processor, so TRL loads the very same weights by path.
- **The family's own helpers** (:func:`family_module`): the bench-only naive paths of :mod:`benchmarks.naive`
  reimplement a family's optimised paths and need its private helpers; they are reached through the model's own
  module, so no family is named here.

No rgpo module or class is modified: only the attributes of model instances the benchmarks built.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any


def ban_eos(model, spec: dict[str, Any]) -> None:
    """Equal work: end-of-sequence tokens banned, so every chain is ``max_new_tokens`` long (unless the case's
    ``ban_eos`` is off: ``--keep-eos``)."""
    if spec.get("ban_eos", True):
        model.banned_token_ids = sorted(set(model.banned_token_ids) | set(model.eos_token_ids))


def suppressed_token_ids(model) -> list[int]:
    """What TRL is told to suppress: the family's end-of-sequence and banned ids (as rgpo bans them)."""
    return sorted(set(model.eos_token_ids) | set(model.banned_token_ids))


def lora_targets_without_lm_head(model) -> list[str]:
    """The language model's LoRA targets without lm_head (TRL reads lm_head.weight directly)."""
    return [t for t in model.lora_targets("language_model") if t != "lm_head"]


def lora_without_lm_head(model):
    """``model``, its language-model LoRA targets reported without lm_head (see the module docstring)."""
    targets = lora_targets_without_lm_head(model)
    family_targets = model.lora_targets

    def lora_targets(name: str) -> list[str]:
        return list(targets) if name == "language_model" else family_targets(name)

    model.lora_targets = lora_targets
    return model


def family_module(model) -> ModuleType:
    """The module that defines the model's family class (its private helpers: samplers, packing, grids)."""
    return importlib.import_module(type(model).__module__)


def save_text_model(cfg, path: Path) -> None:
    """The very language model the rgpo trainer builds (same builder, same seed, float32) with its processor,
    saved so TRL loads it by path; plus what the TRL worker needs to match rgpo (LoRA targets, suppressed ids,
    the chat's system prompt and instruction prefix, rgpo's prompt ids)."""
    from rgpo.building import build_model
    from rgpo.data import load_prompts

    model = build_model(cfg)
    model.part("language_model").save_pretrained(path)
    model.processor.save_pretrained(path)
    batch = model.build_prompts([r.as_model_row() for r in load_prompts(cfg.data.train_file)])
    meta = {
        "lora_targets": lora_targets_without_lm_head(model),
        "suppressed_token_ids": suppressed_token_ids(model),
        "system_prompt": model.system_prompt,
        "instruction_prefix": model.instruction_prefix,
        "rgpo_prompt_ids": [ids[m.bool()].tolist() for ids, m in zip(batch.input_ids, batch.attention_mask)],
    }
    (path / "bench_meta.json").write_text(json.dumps(meta))
