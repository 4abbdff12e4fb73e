"""The newcomer's path: checkpoints that work from any folder, a resume that says what changed, a run that knows
it is finished, output folders that never collide, errors in one clean line, and TRL's metric names."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rgpo.config import load_config, with_output_dir

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def rgpo(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rgpo", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=900)


# ------------------------------------------------------------------------------------ output folders
def test_default_output_folder_is_named_by_the_run_and_never_shared():
    base = ["data.train_file=x.jsonl"]
    first = with_output_dir(load_config(TINY, [*base, "logging.output_dir=null"]))
    same_run_longer = with_output_dir(load_config(TINY, [*base, "logging.output_dir=null", "optim.max_steps=9"]))
    other = with_output_dir(load_config(TINY, [*base, "logging.output_dir=null", "optim.lr=5e-4"]))
    named = with_output_dir(load_config(TINY, [*base, "logging.output_dir=mine"]))
    assert first.logging.output_dir.startswith("outputs/run-")
    assert same_run_longer.logging.output_dir == first.logging.output_dir  # relaunching it resumes it
    assert other.logging.output_dir != first.logging.output_dir  # another experiment never resumes into it
    assert named.logging.output_dir == "mine"


# ------------------------------------------------------------------------------------ clean errors
def test_a_bad_data_path_is_one_clean_line_before_any_model(tmp_path):
    proc = rgpo("train", "--config", str(TINY), "data.train_file=missing.jsonl", f"logging.output_dir={tmp_path}",
                cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "DeepSpeed" not in proc.stdout + proc.stderr
    assert "missing.jsonl" in proc.stderr.strip().splitlines()[-1]
    assert proc.stderr.strip().splitlines()[-1].startswith("rgpo: error:")


def test_a_misplaced_key_is_suggested(tmp_path):
    proc = rgpo("config", "show", "--config", str(TINY), "lr=1e-3", cwd=tmp_path)
    assert proc.returncode == 2 and "did you mean 'optim.lr'" in proc.stderr and "Traceback" not in proc.stderr


def test_config_show_takes_several_files_then_overrides(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("optim:\n  lr: 7.0e-4\n")
    proc = rgpo("config", "show", "--config", str(TINY), str(extra), "optim.max_steps=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.0007" in proc.stdout and "max_steps: 3" in proc.stdout


# ------------------------------------------------------------------------------------ a run, then elsewhere
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One step of the tiny config, trained in its own folder with relative paths (data and a reward file)."""
    work = tmp_path_factory.mktemp("train_here")
    shutil.copy(REPO / "tests" / "signal_reward.py", work / "my_reward.py")
    (work / "prompts.jsonl").write_text("".join(f'{{"prompt": "draw thing {i}"}}\n' for i in range(4)))
    proc = rgpo("train", "--config", str(TINY), "data.train_file=prompts.jsonl", "logging.output_dir=run",
                "rewards.functions=[format, {name: 'my_reward.py:letter_fraction'}]", "optim.max_steps=1",
                "checkpoint.every=1", "logging.mode=offline", "logging.progress_bar=false", cwd=work)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return work, proc


def test_a_copied_checkpoint_samples_and_exports_from_another_folder(finished_run, tmp_path):
    work, _ = finished_run
    copy = tmp_path / "copied"
    shutil.copytree(work / "run" / "checkpoints" / "step-0000001", copy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    prompts = elsewhere / "ask.jsonl"
    prompts.write_text('{"prompt": "a red square"}\n')
    sample = rgpo("sample", "--checkpoint", str(copy), "--prompts", str(prompts), "--out", "samples", cwd=elsewhere)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert (elsewhere / "samples" / "0000.png").is_file() and (elsewhere / "samples" / "0000.txt").is_file()
    export = rgpo("export", "--checkpoint", str(copy), "--out", "exported", cwd=elsewhere)
    assert export.returncode == 0, export.stderr[-3000:]
    from rgpo.models import detect_family

    assert detect_family(str(elsewhere / "exported")) == "mindomni"


def test_a_finished_run_says_so_and_exits(finished_run):
    work, first = finished_run
    assert "[rgpo] model: mindomni" in first.stdout  # the start-up summary
    again = rgpo("train", "--config", str(TINY), "data.train_file=prompts.jsonl", "logging.output_dir=run",
                 "rewards.functions=[format, {name: 'my_reward.py:letter_fraction'}]", "optim.max_steps=1",
                 "logging.mode=disabled", cwd=work)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "is finished" in again.stdout and "step 1 of optim.max_steps=1" in again.stdout
    assert "DeepSpeed" not in again.stdout + again.stderr  # decided before anything heavy started


def test_trl_metric_names_are_in_the_metrics_file(finished_run):
    work, _ = finished_run
    row = json.loads((work / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("reward", "reward_std", "kl", "learning_rate", "grad_norm", "completions/mean_length",
                "completions/min_length", "completions/max_length", "completions/clipped_ratio",
                "rewards/format/mean", "frac_reward_zero_std"):
        assert key in row, key
    assert row["reward"] == row["reward/total"] and row["learning_rate"] == row["lr"]


def test_resume_reports_changes_applies_the_new_lr_and_refuses_another_base_model(finished_run, tmp_path):
    work, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(work / "run", run)
    common = ["--config", str(TINY), f"data.train_file={work / 'prompts.jsonl'}", f"logging.output_dir={run}",
              f"rewards.functions=[format, {{name: '{work / 'my_reward.py'}:letter_fraction'}}]",
              "logging.mode=offline", "logging.progress_bar=false", "checkpoint.every=0"]
    other_model = rgpo("train", *common, "optim.max_steps=2", "model.path=random:tiny", cwd=tmp_path)
    assert other_model.returncode == 2 and "model.path: 'tiny' there, 'random:tiny' now" in other_model.stderr
    assert "Traceback" not in other_model.stderr
    resumed = rgpo("train", *common, "optim.max_steps=2", "optim.lr=5e-4", "optim.schedule=constant", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "config change(s)" in resumed.stdout and "optim.lr: 0.001 -> 0.0005" in resumed.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["lr"] == pytest.approx(5e-4)
    # wandb: one folder per session of the run (wandb never appends to a closed transaction log; it names the
    # next folder <...>-<id>-1), all inside the run's output folder, all of one run id, each with its own media:
    # `wandb sync run/wandb/offline-run-*` uploads them in order of start time into that one run.
    logs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and len({p.name for p in logs}) == 1, logs
    assert not list(run.glob("wandb-data")) and not list(tmp_path.glob("wandb"))


# ------------------------------------------------------------------------------------ one rule for paths
def test_a_yaml_files_inputs_resolve_beside_it_and_outputs_in_the_working_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "prompts.jsonl").write_text('{"prompt": "a"}\n')
    (project / "my_reward.py").write_text("def score(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    (project / "run.yaml").write_text("data: {train_file: prompts.jsonl}\nlogging: {output_dir: out}\n"
                                      "rewards: {functions: [format, {name: 'my_reward.py:score'}]}\n")
    monkeypatch.chdir(tmp_path)  # launched from another folder
    cfg = load_config(project / "run.yaml")
    assert cfg.data.train_file == str(project / "prompts.jsonl")
    assert cfg.rewards.functions[1].name == f"{project / 'my_reward.py'}:score"
    assert cfg.rewards.functions[0].name == "format"
    assert cfg.logging.output_dir == "out"  # outputs: the working folder


def test_conversational_rows_and_a_saved_dataset_folder(tmp_path):
    from datasets import Dataset

    from rgpo.data import load_prompts
    from rgpo.models.mindomni import MindOmni

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "draw a red apple"}]
    # a dataset column holds one type: conversational rows with conversational rows, plain with plain
    Dataset.from_list([{"prompt": chat, "gt_prompt": "a red apple"}]).save_to_disk(str(tmp_path / "ds"))
    rows = load_prompts(tmp_path / "ds")
    assert [r.prompt for r in rows] == ["draw a red apple"] and rows[0].columns == {"gt_prompt": "a red apple"}
    assert rows[0].messages == chat and load_prompts([{"prompt": "a cat"}])[0].messages is None
    model = MindOmni.build_tiny()
    text = model.processor.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
         {"role": "user", "content": [{"type": "text", "text": "draw a red apple"}]}],
        tokenize=False, add_generation_prompt=True)
    batch = model.build_prompts([rows[0].as_model_row()])
    expected = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert batch.input_ids[0][batch.attention_mask[0].bool()].tolist() == expected
    assert load_prompts([{"prompt": "given directly"}])[0].prompt == "given directly"


def test_tensorboard_tracker_writes_scalars_tables_and_images(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rgpo.tracking import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path / "tb", config={"optim": {"lr": 1e-3}})
    logger.log({"reward": 0.25, "note": "not a number"}, step=1)
    logger.log({"reward": 0.75}, step=2)
    logger.log_table("rollouts", ["step", "prompt", "image", "format"],
                     [[2, "a | b", Image.new("RGB", (8, 8), (255, 0, 0)), 1.0]], step=2)
    logger.finish()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward")] == [(1, 0.25), (2, 0.75)]
    assert "rollouts/images" in events.Tags()["images"]
    assert any(tag.startswith("rollouts") for tag in events.Tags()["tensors"])  # the table as text
