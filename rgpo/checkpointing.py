"""Atomic, complete-or-absent checkpoints and the newest-complete lookup that resume relies on.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N`` only once every
rank has finished and ``trainer_state.json`` (the completion marker) is in it. A crash, SIGKILL or full disk
mid-write leaves at most a ``.tmp-*`` (or ``.old-*``) folder, which resume ignores and the next save removes; the previous
checkpoints are untouched. Ranks' files live on a filesystem every rank sees (as DeepSpeed assumes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

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


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def newest_complete(output_dir: str | Path) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


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
    if final.exists():
        # A re-run of the same step after a resume: move the old one aside first (one atomic rename), so no
        # moment exists where a half-deleted folder carries a completion marker.
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(output_dir: str | Path) -> None:
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for child in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
            shutil.rmtree(child, ignore_errors=True)
