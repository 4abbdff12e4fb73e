"""Run ``tests/launch_train.py`` on 2 CPU ranks (deepspeed or torchrun) and return the JSON it writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from rgpo.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def launch_two_ranks(tmp_path: Path, *overrides: str, launcher: str = "deepspeed") -> dict:
    """``overrides`` are config overrides (after the output folder and ``logging.mode=disabled``)."""
    result = tmp_path / "result.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    script = str(REPO / "tests" / "launch_train.py")
    args = [str(result), f"logging.output_dir={tmp_path / 'run'}", "logging.mode=disabled", *overrides]
    port = str(free_port())
    if launcher == "deepspeed":
        cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", port, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               script, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(result.read_text())
