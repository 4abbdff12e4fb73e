"""Turn a DeepSpeed JSON with ``auto`` values into the concrete config for this run."""

from __future__ import annotations

import functools
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from rgpo.config import ConfigError, RGPOConfig, find_config_file, shipped_configs


def _fill(node: Any, values: dict[str, Any], path: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, values, f"{path}.{k}" if path else k) for k, v in node.items()}
    if node == "auto":
        if path not in values:
            raise ConfigError(f"DeepSpeed config key {path!r} is 'auto' but rgpo has no value for it; set it explicitly")
        return values[path]
    return node


# JSON keys whose value rgpo's own config decides (the key that sets it): an explicit JSON value must agree, or the
# run would use a value that its saved config.yaml and wandb do not show.
RUN_CONFIG_KEYS = {
    "train_micro_batch_size_per_gpu": "optim.micro_batch_size",
    "gradient_accumulation_steps": "rollout.batch_size / (ranks x optim.micro_batch_size)",
    "gradient_clipping": "optim.max_grad_norm",
    "bf16.enabled": "model.dtype",
    "fp16.enabled": "model.dtype",
    "optimizer.params.lr": "optim.lr",
    "optimizer.params.betas": "optim.adam_betas",
    "optimizer.params.eps": "optim.adam_eps",
    "optimizer.params.weight_decay": "optim.weight_decay",
}


def _check_explicit_values(raw: dict[str, Any], values: dict[str, Any], path: Path) -> None:
    for key, source in RUN_CONFIG_KEYS.items():
        node: Any = raw
        for part in key.split("."):
            node = node.get(part, "auto") if isinstance(node, dict) else "auto"
        if node != "auto" and node != values[key]:
            raise ConfigError(f"deepspeed.config={str(path)!r}: {key} is {node!r} but the run config gives "
                              f"{values[key]!r} ({source}); set it to \"auto\" or make the two agree")


def build_deepspeed_config(cfg: RGPOConfig, world_size: int, zero_hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed dict for ``cfg``: batch sizes, precision, optimizer and ZeRO settings filled in.

    One optimizer step accumulates every micro-batch of the rank's share of the rollout batch.
    """
    path = Path(cfg.deepspeed.config)
    if not path.is_file():
        try:  # configs/zero2.json (the default) and the other shipped JSON files, wherever rgpo is installed
            path = find_config_file(path)
        except ConfigError:
            shipped = ", ".join(sorted(p.name for p in shipped_configs().glob("*.json")))
            raise ConfigError(f"deepspeed.config={str(path)!r}: file not found (shipped: {shipped})") from None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config={str(path)!r}: not valid JSON: {e}") from e
    per_rank = cfg.rollout.batch_size // world_size
    hidden = zero_hidden_size or 1024  # buckets of hidden^2 elements (12.8 M at a 7B's 3584), as transformers
    values = {
        "train_micro_batch_size_per_gpu": cfg.optim.micro_batch_size,
        "gradient_accumulation_steps": per_rank // cfg.optim.micro_batch_size,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "bf16.enabled": cfg.model.dtype == "bfloat16",
        "fp16.enabled": cfg.model.dtype == "float16",
        "optimizer.params.lr": cfg.optim.lr,
        "optimizer.params.betas": list(cfg.optim.adam_betas),
        "optimizer.params.eps": cfg.optim.adam_eps,
        "optimizer.params.weight_decay": cfg.optim.weight_decay,
        # DeepSpeed's fused Adam needs CUDA and either a prebuilt op or nvcc to compile it at start-up; otherwise
        # (CPUs, GPU machines without the CUDA toolkit) torch's AdamW, which would not fail mid-launch.
        "optimizer.params.torch_adam": not fused_adam_available(),
        # Overlapping the gradient reduction with the backward, and copying gradients into one contiguous buffer,
        # pay off on GPUs (side streams; less fragmentation). DeepSpeed's CPU accelerator has no streams, so on a
        # CPU both only add copies and bookkeeping to every micro-batch's backward (about 3 ms of a 45 ms update
        # on the tiny model, measured by python -m benchmarks).
        "zero_optimization.overlap_comm": torch.cuda.is_available(),
        "zero_optimization.contiguous_gradients": torch.cuda.is_available(),
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
    }
    _check_explicit_values(raw, values, path)
    ds = _fill(raw, values)
    if cfg.deepspeed.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.zero_stage
    ds["train_batch_size"] = cfg.optim.micro_batch_size * values["gradient_accumulation_steps"] * world_size
    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator cannot run fp16; bf16 works.
        ds.pop("fp16", None)
    return ds


@functools.cache
def fused_adam_available() -> bool:
    """Whether DeepSpeed's FusedAdam loads here: CUDA, and the op prebuilt, or built now (nvcc + ninja; the build
    is cached for DeepSpeed's own load). A build that fails (a CUDA toolkit that does not match torch's, an
    unwritable cache) falls back to torch's AdamW with a warning instead of failing the launch."""
    if not torch.cuda.is_available():
        return False
    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get("fused_adam"):
            return True
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
    if not (nvcc.is_file() and shutil.which("ninja") is not None):
        return False
    try:
        from deepspeed.ops.op_builder import FusedAdamBuilder

        FusedAdamBuilder().load(verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure means: use torch's AdamW
        warnings.warn(f"DeepSpeed's FusedAdam could not be built ({type(err).__name__}: {err}); torch's AdamW "
                      "runs instead", stacklevel=2)
        return False
    return True


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
