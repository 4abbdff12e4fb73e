"""Atomic, complete-or-absent checkpoints and the newest-complete lookup that resume relies on.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N`` only once every
rank has finished and ``trainer_state.json`` (the completion marker) is in it. A crash, SIGKILL or full disk
mid-write leaves at most a ``.tmp-*`` (or ``.old-*``) folder, which resume ignores and the next save removes; the previous
checkpoints are untouched. Ranks' files live on a filesystem every rank sees (as DeepSpeed assumes). The files and
folders are fsynced before the rename and the parent folder after it, so a power cut cannot publish a folder
whose files are not on disk yet.

DeepSpeed's own loader unpickles its engine files with ``weights_only=False``, which runs whatever a pickle names;
:func:`use_weights_only_loading` swaps in a checkpoint engine that reads them with ``weights_only=True`` and a
short allow-list of DeepSpeed's own classes, so a crafted checkpoint file is refused instead of executed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any


class RunFinished(Exception):
    """The run to resume already did its ``optim.max_steps``: nothing to do (raise max_steps to go on)."""


class ResumeError(ValueError):
    """The checkpoint to resume cannot continue this run as configured (another base model, other parameters)."""


STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def temporary_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f".tmp-step-{step:07d}"


def final_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step-{step:07d}"


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def _step_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` entry of the checkpoint folder, complete or not, as (N, path), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((int(match.group(1)), child) for child in root.iterdir() if (match := STEP_DIR.match(child.name)))


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [path for _, path in _step_folders(output_dir) if path.is_dir() and is_complete(path)]


def set_aside_newer(output_dir: str | Path, step: int) -> Path | None:
    """Move every checkpoint (complete or not) of a step after ``step`` into ``checkpoints/superseded-<time>/``,
    out of resume's and pruning's sight but kept. Returns that folder, or None when there was nothing to move."""
    root = checkpoint_root(output_dir)
    newer = [path for n, path in _step_folders(output_dir) if n > step]
    if not newer:
        return None
    target = root / time.strftime("superseded-%Y%m%d-%H%M%S")
    while target.exists():
        target = target.with_name(target.name + "_")
    target.mkdir()
    for path in newer:
        os.replace(path, target / path.name)
    _fsync(root, directory=True)
    return target


def newest_complete(output_dir: str | Path) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush ``path`` to disk. Directories: skipped where the OS cannot open or fsync them (e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not (directory and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES)):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then each folder (children before parents, ``root`` last)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath), directory=True)


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write the marker last, through a temporary file, so it exists only when whole."""
    tmp = path / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path / STATE_FILE)


def read_state(path: Path) -> dict[str, Any]:
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete rgpo checkpoint: {STATE_FILE} is missing")
    try:
        return json.loads((path / STATE_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / STATE_FILE} is corrupt ({e}); delete {path} to resume from the previous "
                         f"checkpoint") from e


def publish(tmp: Path, step: int, output_dir: str | Path, keep_last: int) -> Path:
    """Rename a finished temporary checkpoint into place and prune old ones (rank 0 only)."""
    final = final_dir(output_dir, step)
    fsync_tree(tmp)  # the contents are on disk before the name says "complete"
    if final.exists():
        # A re-run of the same step after a resume: move the old one aside first (one atomic rename), so no
        # moment exists where a half-deleted folder carries a completion marker.
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync(final.parent, directory=True)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        _fsync(final.parent, directory=True)  # the rename itself is durable
    for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(output_dir: str | Path) -> None:
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for child in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
            shutil.rmtree(child, ignore_errors=True)


# ============================================================================ DeepSpeed engine files, weights only
class UnsafeCheckpointError(pickle.UnpicklingError):
    """An engine checkpoint file holds a Python object rgpo does not load (it may run code when unpickled)."""


@functools.cache
def engine_safe_globals() -> tuple[type, ...]:
    """The non-tensor classes DeepSpeed pickles into its engine files, and nothing else.

    Found by saving engines under ZeRO 0-3 (the tiny rgpo model in float32; a two-layer model in bfloat16 and
    with CPU offload) and listing each file's globals with ``torch.serialization.get_unsafe_globals_in_checkpoint``;
    ``*model_states.pt`` needs none.
    - ``ZeroStageEnum``: the ZeRO stage stored in every ``*optim_states.pt``;
    - ``LossScaler``: the (static) loss scaler stored with the ZeRO optimizer state (float32/bfloat16);
    - ``DynamicLossScaler``: what DeepSpeed's ``CreateLossScaler`` stores there instead under fp16
      (``model.dtype=float16``, CUDA only: not saved here, round-tripped by hand); numbers, booleans, a dtype;
    - ``fragment_address``: a (numel, start) dataclass in ZeRO-1/2's ``param_slice_mappings``.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address)


def load_engine_file(path: str | os.PathLike, map_location=None) -> Any:
    """``torch.load(weights_only=True)`` with :func:`engine_safe_globals` allowed; a refused file is named."""
    import torch

    allowed = list(engine_safe_globals())
    if hasattr(torch.serialization, "safe_globals"):
        allow = torch.serialization.safe_globals(allowed)
    else:  # torch 2.4: no context manager; the same short list, process-wide
        torch.serialization.add_safe_globals(allowed)
        allow = contextlib.nullcontext()
    try:
        with allow:
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"the Python global {found.group(1)}" if found else "an object"
        names = ", ".join(c.__name__ for c in allowed)
        raise UnsafeCheckpointError(
            f"{path}: refused to load DeepSpeed engine checkpoint file: it holds {what}, which rgpo does not "
            f"allow (engine files load with torch.load(weights_only=True), tensors and DeepSpeed's {names} "
            f"only). It was not written by rgpo or was altered; resume only from checkpoints you trust") from e


@functools.cache
def _weights_only_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True`` (saving is unchanged)."""

        def load(self, path: str, map_location=None):
            return load_engine_file(path, map_location=map_location)

    return WeightsOnlyCheckpointEngine


def use_weights_only_loading(engine) -> None:
    """Make every checkpoint file ``engine.load_checkpoint`` reads go through :func:`load_engine_file`.

    Call right after ``deepspeed.initialize``. DeepSpeed picks ``engine.checkpoint_engine`` from its config
    (``TorchCheckpointEngine`` unless the JSON enables a ``checkpoint.writer`` or ``datastates``; ``None`` for
    an engine without optimizer under ZeRO-3); other engines are refused, as their loaders are not weights-only.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if current is not None and type(current) is not TorchCheckpointEngine:
        raise ValueError(f"DeepSpeed config: checkpoint engine {type(current).__name__} is not supported; rgpo "
                         f"loads engine checkpoints only with torch.load(weights_only=True) (remove "
                         f"'checkpoint.writer' / 'datastates' from the DeepSpeed JSON)")
    engine.checkpoint_engine = _weights_only_engine_class()(engine._config)


# Config keys that hold paths: a checkpoint records them absolute, so it works from any folder and any machine
# that has the same files (``--model-path`` replaces the base model where that machine's differs).
def _path_slots(config: dict[str, Any]) -> list[tuple[dict, str]]:
    slots = [(config.get("model") or {}, "path"), (config.get("data") or {}, "train_file"),
             (config.get("data") or {}, "eval_file"), (config.get("deepspeed") or {}, "config")]
    for spec in (config.get("rewards") or {}).get("functions") or []:
        if isinstance(spec, dict) and isinstance(spec.get("kwargs"), dict):
            slots.append((spec["kwargs"], "pretrained"))
    return slots


def absolute_paths(config: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """A copy of a resolved config dict whose relative paths that exist under ``base`` are made absolute
    (``tiny``, ``random:...`` and paths that do not exist there are left as they are)."""
    config = json.loads(json.dumps(config))
    for block, key in _path_slots(config):
        value = block.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and (Path(base) / value).exists():
            block[key] = str((Path(base) / value).resolve())
    for spec in (config.get("rewards") or {}).get("functions") or []:
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str) and ".py:" in name:  # a reward's own file: path/to/file.py:function
            file, function = name.rsplit(":", 1)
            if not Path(file).is_absolute() and (Path(base) / file).is_file():
                spec["name"] = f"{(Path(base) / file).resolve()}:{function}"
    return config


def config_with_portable_paths(config: dict[str, Any], checkpoint: str | Path) -> dict[str, Any]:
    """The config a checkpoint recorded, its relative paths (written before checkpoints made them absolute)
    resolved against the folder training ran in, which the state records as ``cwd``."""
    state_cwd = read_state(Path(checkpoint)).get("cwd")
    return absolute_paths(config, state_cwd) if state_cwd else config
