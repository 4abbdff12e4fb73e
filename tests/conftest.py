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
_wandb_home = tempfile.mkdtemp(prefix="rgpo-wandb-")
# (WANDB_DATA_DIR is left unset: rgpo then stages table media inside each run's output folder.)
for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
    os.environ.setdefault(var, _wandb_home)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_unconfigure(config):
    # The folder outlives every wandb run of the session (subprocess launches included), so it goes last.
    shutil.rmtree(_wandb_home, ignore_errors=True)
