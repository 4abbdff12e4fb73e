"""How rgpo installs: every package listed (a family added later cannot be left out of a wheel), the reward
functions under rgpo's namespace (a user's own ``rewards`` module never shadows them), ``python -m rgpo``."""

import os
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
        if folder.parts[0] not in ("rgpo", "rewards", "configs"):
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


def test_without_launcher_arguments_drops_the_rank_deepspeed_inserts():
    from rgpo.cli import without_launcher_arguments

    assert without_launcher_arguments(["--local_rank=1", "train", "--config", "tiny", "a=1"]) == [
        "train", "--config", "tiny", "a=1"]
    assert without_launcher_arguments(["--local_rank", "0", "config", "show"]) == ["config", "show"]


@pytest.mark.distributed
def test_the_documented_deepspeed_module_launch_trains(tmp_path):
    """``deepspeed --num_gpus N --module rgpo train ...`` (the README's launch line): the launcher puts
    ``--local_rank=N`` before rgpo's subcommand, which the command line must accept."""
    import json
    import os
    import shutil

    from rgpo.distributed import free_port

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "rgpo", "train", "--config", "tiny", "optim.max_steps=1", "checkpoint.every=0",
           f"logging.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1]


def test_a_wheel_ships_the_configs_and_the_toy_world_runs_from_them(tmp_path):
    """A non-editable install has the run configs (``--config tiny`` / ``toy_world`` by name) and the shipped
    configs find their assets inside the installed package (``pkg://rgpo/...``), from any working folder."""
    import zipfile

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("rgpo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("rgpo/configs/tiny.yaml", "rgpo/configs/toy_world.yaml", "rgpo/configs/zero2.json",
                    "rgpo/configs/zero3.json", "rgpo/configs/prompts/sample.jsonl",
                    "rgpo/assets/toyworld/model/mllm/config.json", "rgpo/assets/toyworld/train.jsonl"):
        assert shipped in names, shipped
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("from rgpo.config import load_config; from rgpo.deepspeed_config import build_deepspeed_config; "
            "import os; c = load_config('toy_world'); "
            "assert c.model.path.startswith(os.environ['SITE']) and os.path.isdir(c.model.path), c.model.path; "
            "assert os.path.isfile(c.data.train_file) and os.path.isfile(c.rewards.functions[-1].kwargs['pretrained']); "
            "d = build_deepspeed_config(load_config('tiny'), 1); print(d['zero_optimization']['stage'])")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PYTHONPATH": str(tmp_path / "site"), "SITE": str(tmp_path / "site"), "PATH": os.environ.get("PATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "2"
