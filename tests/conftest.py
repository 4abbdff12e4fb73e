"""Test-wide settings: no hub, no network, wandb offline into a temporary folder, deterministic threads."""

import os
import shutil
import tempfile

# Set before any library import: a stray hub lookup then fails in ~3 s instead of retrying for ~50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# (WANDB_DATA_DIR is left unset: rgpo then stages table media inside each wandb run folder.) Worker processes
# that import this file inherit the session's folder, so only the pytest process makes (and removes) one.
_wandb_vars = ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")
_wandb_home = None if all(v in os.environ for v in _wandb_vars) else tempfile.mkdtemp(prefix="rgpo-wandb-")
if _wandb_home is not None:
    for var in _wandb_vars:
        os.environ.setdefault(var, _wandb_home)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_unconfigure(config):
    # The folder outlives every wandb run of the session (subprocess launches included), so it goes last.
    if _wandb_home is not None:
        shutil.rmtree(_wandb_home, ignore_errors=True)
