"""Building the model a run config names: the family, its weights, its options, what trains; and a trained
checkpoint's model for sampling and export. Everything here speaks the family interface only.

Trainable parts are named by the family (``UnifiedModel.parts``): the language model trains by LoRA (the
reference is the adapter disabled) or in full (the reference is a frozen copy); ``trainable.full_parts`` trains
more parts in full beside it; ``trainable.generator_lora_r`` injects a LoRA into the image generator.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rgpo.config import ConfigError, RGPOConfig, build_section, load_config
from rgpo.models import UnifiedModel, in_memory, resolve_family

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def model_family(cfg: RGPOConfig) -> type[UnifiedModel]:
    """The family class of ``cfg.model`` (forced by ``model.family``, else detected from the folder)."""
    try:
        return resolve_family(cfg.model.family, cfg.model.path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"model.path={cfg.model.path!r}: {e}") from None


def family_options(cfg: RGPOConfig, family: type[UnifiedModel]):
    """``model.options`` checked against the family's typed options (unknown keys and wrong types name the key)."""
    if family.options_class is None:
        if cfg.model.options:
            raise ConfigError(f"model.options={cfg.model.options!r}: family {family.family!r} takes no options")
        return None
    return build_section(family.options_class, cfg.model.options, "model.options")


def check_family_config(cfg: RGPOConfig, family: type[UnifiedModel]) -> None:
    """What only the family can say about a config, checked before any model is built: the parts named in the
    trainable section, the image regulariser, the options."""
    t, lc = cfg.trainable, cfg.loss
    for name in t.full_parts:
        if name not in family.parts:
            raise ConfigError(f"trainable.full_parts names {name!r}, which family {family.family!r} does not have; "
                              f"its parts: {sorted(family.parts)}")
    if "language_model" in t.full_parts:
        raise ConfigError("trainable.full_parts cannot hold language_model: trainable.mode=full trains it in full")
    if (cfg.rollout.image.enabled and lc.image_kl_coef > 0
            and lc.image_regularizer not in family.supported_regularizers):
        raise ConfigError(f"loss.image_regularizer={lc.image_regularizer!r} is not supported by family "
                          f"{family.family!r}; it supports {list(family.supported_regularizers)}")
    image = cfg.rollout.image
    if image.enabled:
        for key in ("height", "width"):
            valid = family.check_image_size(getattr(image, key), getattr(image, key))
            if valid is not None:
                raise ConfigError(f"rollout.image.{key}={getattr(image, key)!r} cannot be drawn by family "
                                  f"{family.family!r}: it must be {valid}")
    family_options(cfg, family)


def build_model(cfg: RGPOConfig, device: torch.device | str | None = None) -> UnifiedModel:
    """The model ``cfg.model`` names: a checkpoint folder in its family's layout, ``tiny`` (a tiny random model
    built in memory) or ``random:<shape>`` (random weights in a named shape, built directly on ``device``)."""
    family = model_family(cfg)
    options = family_options(cfg, family)
    dtype = DTYPES[cfg.model.dtype]
    path = cfg.model.path
    if path in (None, "", "tiny"):
        return family.build_tiny(seed=cfg.seed, dtype=dtype, options=options)
    if in_memory(path):
        try:
            return family.build_random(path.split(":", 1)[1], seed=cfg.seed, dtype=dtype, device=device,
                                       options=options)
        except ValueError as e:
            raise ValueError(f"model.path={path!r}: {e}") from None
    return family.from_pretrained(path, dtype=dtype, options=options,
                                  trust_remote_code=cfg.model.trust_remote_code)


def apply_trainable(model: UnifiedModel, cfg: RGPOConfig) -> UnifiedModel:
    """Freeze everything, then unfreeze what ``cfg.trainable`` names: the language model by LoRA (peft) or in
    full (its vision tower stays frozen), the ``full_parts``, and a LoRA injected into the generator."""
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    t = cfg.trainable
    model.requires_grad_(False)
    language_model = model.part("language_model")
    if t.mode == "lora":
        lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                          target_modules=model.lora_targets("language_model"), bias="none")
        model.set_part("language_model", get_peft_model(language_model, lora))
    else:
        for name, param in language_model.named_parameters():
            if "visual" not in name:
                param.requires_grad_(True)
    for name in t.full_parts:
        model.part(name).requires_grad_(True)
    if t.generator_lora_r > 0:
        alpha = t.generator_lora_alpha if t.generator_lora_alpha is not None else 2 * t.generator_lora_r
        targets = t.generator_lora_targets or model.lora_targets("generator")
        lora = LoraConfig(r=t.generator_lora_r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
        model.set_part("generator", inject_adapter_in_model(lora, model.part("generator")))
    if cfg.model.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    return model


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def float32_weights(model: UnifiedModel) -> dict[str, torch.Tensor]:
    """CPU copies of the frozen float32 weights of ``model.float32_modules()`` (by full parameter name)."""
    keep = {}
    for prefix in model.float32_modules():
        for name, param in model.get_submodule(prefix).named_parameters():
            if param.dtype == torch.float32 and not param.requires_grad:
                keep[f"{prefix}.{name}"] = param.detach().to("cpu", copy=True)
    return keep


def restore_float32_weights(model: UnifiedModel, saved: dict[str, torch.Tensor]) -> None:
    """Put back the exact float32 values DeepSpeed's mixed-precision cast rounded (frozen weights only: the
    optimizer never sees them)."""
    params = dict(model.named_parameters())
    for name, value in saved.items():
        param = params[name]
        if param.dtype != torch.float32:
            param.data = value.to(param.device)


def load_trained(checkpoint: str | Path, device: str = "cpu", model_path: str | None = None):
    """The model of a training checkpoint with its trained weights applied and every LoRA merged, and the run's
    config. ``model_path`` replaces the base model folder the checkpoint records (a checkpoint copied to
    another machine)."""
    from safetensors.torch import load_file

    from rgpo import checkpointing as ckpt

    path = Path(checkpoint)
    state = ckpt.read_state(path)
    overrides = ["model.gradient_checkpointing=false"]
    values = ckpt.config_with_portable_paths(state["config"], path)
    if model_path is not None:
        values = {**values, "model": {**values.get("model", {}), "path": str(model_path)}}
    cfg = load_config(None, overrides, values=values)
    model = apply_trainable(build_model(cfg), cfg)
    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(weights) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"{path}/trainable.safetensors holds weights this model lacks, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(weights, strict=False)
    model.merge_adapters()
    return model.to(device).eval(), cfg

