"""The import layers are checked by a tool (import-linter's contracts in pyproject.toml), not by eye: the
contracts hold for the code as it is, and a planted upward import breaks them."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the copy's rgpo package is the one analysed, not the installed one.
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT)], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "rgpo", tmp_path / "rgpo", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    # the reward package installs as rgpo.rewards (pyproject's package-dir): the copy lays it out so
    shutil.copytree(REPO / "rewards", tmp_path / "rgpo" / "rewards", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_import_contracts_hold(tmp_path):
    proc = lint(copy_of_the_package(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    root = copy_of_the_package(tmp_path)
    base = root / "rgpo" / "models" / "base.py"
    base.write_text(base.read_text() + "\nimport rgpo.trainer  # noqa: E402,F401\n")
    proc = lint(root)
    assert proc.returncode != 0
    assert "rgpo.models.base -> rgpo.trainer" in proc.stdout


def test_naming_a_family_outside_its_package_breaks_the_contract(tmp_path):
    root = copy_of_the_package(tmp_path)
    trainer = root / "rgpo" / "trainer.py"
    trainer.write_text(trainer.read_text() + "\nfrom rgpo.models.mindomni import MindOmni  # noqa: E402,F401\n")
    proc = lint(root)
    assert proc.returncode != 0
    assert "rgpo.trainer is not allowed to import rgpo.models.mindomni" in proc.stdout
