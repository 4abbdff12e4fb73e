"""How rgpo installs: every package listed (a family added later cannot be left out of a wheel), the reward
functions under rgpo's namespace (a user's own ``rewards`` module never shadows them), ``python -m rgpo``."""

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (3.10 runs the rest)

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {folder: package for package, folder in setuptools["package-dir"].items()}
    on_disk = set()
    for init in REPO.glob("**/__init__.py"):
        folder = init.parent.relative_to(REPO)
        if folder.parts[0] not in ("rgpo", "rewards"):
            continue
        top = mapped.get(folder.parts[0], folder.parts[0])
        on_disk.add(".".join([top, *folder.parts[1:]]))
    assert on_disk == set(setuptools["packages"])


def test_a_users_own_rewards_module_does_not_shadow_rgpos(tmp_path):
    """A ``rewards.py`` (or ``rewards/``) in the working folder, a common name, used to replace rgpo's reward
    package: rgpo then failed with "module 'rewards' has no attribute ...". They live in rgpo.rewards now."""
    (tmp_path / "rewards.py").write_text("raise SystemExit('the user module was imported')\n")
    code = ("from rgpo.scoring import score_samples; from rgpo.rewards import get_reward; "
            "print(get_reward('format')(prompts=['p'], completions=['<think>a</think><answer>b</answer>']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("[1.0]")


def test_python_dash_m_rgpo_is_the_command():
    proc = subprocess.run([sys.executable, "-m", "rgpo", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("rgpo ")
