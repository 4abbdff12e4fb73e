"""Fault injection: every bad input gets a clear error before expensive work, and a crash loses nothing.

Bad inputs (data, rewards, config, checkpoints) must fail with a message naming the culprit (file:line, reward,
column, sample, key); crashes (SIGKILL mid-step, mid-checkpoint, a full disk, SIGTERM/SIGINT, NaN gradients)
must leave the newest complete checkpoint intact, and a restarted run must end with exactly the weights of an
uninterrupted one. The kill tests run ``tests/fault_worker.py`` (= ``rgpo train --config configs/tiny.yaml``)
in a subprocess. At the end of the module one line sums up what was tried:

    reliability: N bad inputs tried, N clear errors, N kills survived, N checkpoints lost, N silent NaN steps,
    N fault classes caught of N
"""

from __future__ import annotations

import ast
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rgpo import checkpointing as ckpt
from rgpo.config import ConfigError, load_config
from rgpo.data import DataError
from rgpo.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SAMPLE = REPO / "configs" / "prompts" / "sample.jsonl"
WORKER = REPO / "tests" / "fault_worker.py"
SIGNAL_REWARD = f"{REPO / 'tests' / 'signal_reward.py'}:letter_fraction"
SIGNAL = f"rewards.functions=[format, {{name: '{SIGNAL_REWARD}', weight: 1.0}}]"
# The tiny config made smaller still: a step takes ~2-3 s on a 2-core CPU.
FAST = ("logging.mode=disabled", "logging.progress_bar=false", "rollout.max_new_tokens=8", "rollout.image.steps=2",
        "rollout.image.height=32", "rollout.image.width=32")
MODE = "RGPO_RELIABILITY_REWARD_MODE"
RESUMED = re.compile(r"\[rgpo\] resumed from (\S+) at step (\d+)")

STATS = {"bad_inputs": 0, "clear_errors": 0, "kills": 0, "lost": 0, "silent_nan": 0}


@pytest.fixture(scope="module", autouse=True)
def reliability_summary(request):
    """Print the one-line summary once the module's last test is done (outside pytest's output capture)."""
    yield
    # The guards' fault classes are injected by tests/test_guards.py (collected before this module): counted when
    # it ran in the same session (the README's test command runs both).
    guards = sys.modules.get("test_guards")
    classes = (f"{len(guards.CAUGHT)} fault classes caught of {guards.CLASSES}" if guards is not None
               else "guard fault classes not run (add tests/test_guards.py)")
    line = (f"reliability: {STATS['bad_inputs']} bad inputs tried, {STATS['clear_errors']} clear errors, "
            f"{STATS['kills']} kills survived, {STATS['lost']} checkpoints lost, "
            f"{STATS['silent_nan']} silent NaN steps, {classes}")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print(line)
        return
    with capman.global_and_fixture_disabled():
        print("\n" + line, flush=True)


@contextmanager
def bad_input(exc_type, *fragments: str):
    """Expect ``exc_type`` whose message contains every fragment; count the input and, if clear, the error."""
    STATS["bad_inputs"] += 1
    with pytest.raises(exc_type) as info:
        yield info
    text = str(info.value)
    missing = [f for f in fragments if f not in text]
    assert not missing, f"the error {text!r} does not name {missing}"
    STATS["clear_errors"] += 1


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def cfg_for(out: Path, *overrides: str):
    return load_config(TINY, [f"logging.output_dir={out}", SIGNAL, *FAST, *overrides])


@pytest.fixture
def no_model_build(monkeypatch):
    """Bad input must be reported before the (expensive) model is built: building it fails the test."""
    from rgpo.trainer import RGPOTrainer

    def refuse(self, cfg, ds_config):
        raise AssertionError("the model was built before the bad input was reported")

    monkeypatch.setattr(RGPOTrainer, "_build_under_zero", refuse)


def trainable_snapshot(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def assert_same_weights(actual: dict, expected: dict, what: str) -> None:
    assert sorted(actual) == sorted(expected), what
    different = [n for n in expected if not torch.equal(actual[n], expected[n])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


# ============================================================================================ 1. bad input: data
def test_malformed_jsonl_line_names_file_and_line(tmp_path, no_model_build):
    from rgpo.trainer import RGPOTrainer

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a cat"}, {"prompt": "a dog"}, '{"prompt": "a cow"'])
    with bad_input(DataError, f"{data}:3", "not valid JSON"):
        RGPOTrainer(cfg_for(tmp_path / "run", f"data.train_file={data}"))


USER_REWARDS = '''
import os
import time


def controlled(prompts, completions, images, **columns):
    """The fraction of letters, or a fault chosen by the environment variable {mode}."""
    mode = os.environ.get("{mode}", "ok")
    if mode == "raise":
        return [1 / 0 for _ in completions]
    if mode == "hang":
        time.sleep(5)
    values = [sum(c.isascii() and c.isalpha() for c in text) / max(1, len(text)) for text in completions]
    if mode == "short":
        return values[:-1]
    if mode == "nan":
        values[3] = float("nan")
    if mode == "inf":
        values[5] = float("inf")
    return values


def needs_difficulty(prompts, completions, images, difficulty, **columns):
    return [float(d) for d in difficulty]


needs_difficulty.required_columns = ("difficulty",)
'''.replace("{mode}", MODE)


@pytest.fixture(scope="module")
def user_rewards(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "user_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_missing_column_a_reward_needs_names_reward_column_and_row(tmp_path, user_rewards, no_model_build):
    from rgpo.trainer import RGPOTrainer

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "difficulty": 1}, {"prompt": "b", "difficulty": 2},
                                              {"prompt": "c", "gt_prompt": "no difficulty here"}])
    spec = f"rewards.functions=[format, {{name: '{user_rewards}:needs_difficulty'}}]"
    with bad_input(DataError, "needs_difficulty", "'difficulty'", f"{data}:3"):
        RGPOTrainer(load_config(TINY, [f"logging.output_dir={tmp_path / 'run'}", f"data.train_file={data}", spec,
                                       *FAST]))


@pytest.mark.parametrize("kind", ["missing", "not_an_image"])
def test_bad_image_path_names_file_line_and_image(tmp_path, kind, no_model_build):
    from rgpo.trainer import RGPOTrainer

    (tmp_path / "fake.png").write_text("this is not a PNG")
    name = "missing.png" if kind == "missing" else "fake.png"
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "edit this", "images": [name]}])
    why = "does not exist" if kind == "missing" else "is not a readable image"
    with bad_input(DataError, f"{data}:2", name, why):
        RGPOTrainer(cfg_for(tmp_path / "run", f"data.train_file={data}"))


def test_dataset_too_small_for_the_batch(tmp_path, no_model_build):
    from rgpo.trainer import RGPOTrainer

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "only one"}])
    # batch 8 chains / G 4 = 2 prompts a step
    with bad_input(DataError, "holds 1 prompts", "needs 2", "rollout.batch_size"):
        RGPOTrainer(cfg_for(tmp_path / "run", f"data.train_file={data}"))


def test_dataset_too_small_names_the_file(tmp_path, no_model_build):
    from rgpo.trainer import RGPOTrainer

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "only one"}])
    with bad_input(DataError, str(data)):
        RGPOTrainer(cfg_for(tmp_path / "run", f"data.train_file={data}"))


# ============================================================================================ 1. bad input: config
def test_config_unknown_key(tmp_path):
    with bad_input(ConfigError, "optim.lrr", "'lr'"):
        load_config(TINY, ["optim.lrr=1e-4"]).validate()
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  num_generations: 4\n  batch_sise: 8\n")
    with bad_input(ConfigError, "rollout.batch_sise", f"{path}:3", "'batch_size'"):
        load_config(path).validate()


def test_config_wrong_type(tmp_path):
    with bad_input(ConfigError, "optim.max_steps", "'many'", "expected int", "optim.max_steps=many"):
        load_config(TINY, ["optim.max_steps=many"]).validate()
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1.0e-5\n  micro_batch_size: [4]\n")
    with bad_input(ConfigError, "optim.micro_batch_size", f"{path}:3", "expected int"):
        load_config(path).validate()


def test_config_impossible_combination(tmp_path, no_model_build):
    from rgpo.trainer import RGPOTrainer

    with bad_input(ConfigError, "rollout.batch_size=6", "num_generations=4"):
        load_config(TINY, ["rollout.batch_size=6"]).validate()
    with bad_input(ConfigError, "optim.micro_batch_size=3", "divisor"):
        RGPOTrainer(cfg_for(tmp_path / "run", "optim.micro_batch_size=3"))


# ============================================================================================ a live tiny trainer
@pytest.fixture(scope="module")
def live(tmp_path_factory, user_rewards):
    """One tiny trainer whose second reward is the user's file reward ``controlled`` (faults set by $MODE)."""
    from rgpo.trainer import RGPOTrainer

    out = tmp_path_factory.mktemp("live") / "run"
    spec = f"rewards.functions=[format, {{name: '{user_rewards}:controlled', weight: 1.0}}]"
    cfg = load_config(TINY, [f"logging.output_dir={out}", spec, *FAST, "checkpoint.every=1", "checkpoint.keep_last=5",
                             "optim.max_steps=1000"])
    trainer = RGPOTrainer(cfg)
    yield trainer
    trainer.close()


def train_more(trainer, steps: int) -> None:
    trainer.cfg.optim.max_steps = trainer.step + steps
    trainer.train()


# ============================================================================================ 1. bad rewards in a real step
@pytest.mark.parametrize("mode, fragments, cause", [
    ("short", ["'controlled'", "returned 7 values", "expected 8"], None),
    ("nan", ["'controlled'", "nan", "sample 3"], None),
    ("inf", ["'controlled'", "inf", "sample 5"], None),
    ("raise", ["'controlled'", "ZeroDivisionError", "division by zero"], ZeroDivisionError),
])
def test_bad_reward_value_in_a_real_step(live, monkeypatch, mode, fragments, cause):
    from rgpo.rewards import RewardError

    monkeypatch.setenv(MODE, mode)
    step = live.step
    with bad_input(RewardError, *fragments) as info:
        live.train_step()
    assert live.step == step  # the step did not count
    if cause is not None:
        assert isinstance(info.value.__cause__, cause), "the reward's own exception must be chained"


def test_hanging_reward_times_out_and_keeps_earlier_checkpoints(live, monkeypatch):
    from rgpo.rewards import RewardError

    monkeypatch.setenv(MODE, "ok")
    train_more(live, 1)  # a complete checkpoint of this run
    out = live.out
    before = ckpt.complete_checkpoints(out)
    assert before and before[-1].name == f"step-{live.step:07d}"
    weights = {p.name: load_file(p / "trainable.safetensors") for p in before}

    monkeypatch.setenv(MODE, "hang")  # sleeps 5 s
    monkeypatch.setattr(live.cfg.rewards, "timeout_s", 1.0)
    start = time.monotonic()
    with bad_input(RewardError, "'controlled'", "timeout of 1.0 s"):
        train_more(live, 1)
    assert time.monotonic() - start < 30
    after = ckpt.complete_checkpoints(out)
    assert after == before, "a failed step must not add, remove or publish checkpoints"
    for p in after:
        ckpt.read_state(p)
        assert_same_weights(load_file(p / "trainable.safetensors"), weights[p.name], p.name)
    assert not list((out / "checkpoints").glob(".tmp-*"))


# ============================================================================================ 1. bad checkpoints
@pytest.fixture(scope="module")
def two_checkpoints(live, tmp_path_factory):
    """A pristine run folder holding two consecutive complete checkpoints of the live run (oldest first)."""
    os.environ[MODE] = "ok"
    try:
        train_more(live, 2)
    finally:
        os.environ.pop(MODE, None)
    done = ckpt.complete_checkpoints(live.out)[-2:]
    pristine = tmp_path_factory.mktemp("pristine") / "run"
    for path in done:
        shutil.copytree(path, pristine / "checkpoints" / path.name)
    return pristine, [ckpt.read_state(p)["step"] for p in done]


def _copy_run(pristine: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(pristine, out)
    return out


def test_incomplete_checkpoint_is_ignored_by_auto_resume(two_checkpoints, tmp_path, capsys):
    from rgpo.trainer import RGPOTrainer

    pristine, (older, newer) = two_checkpoints
    out = _copy_run(pristine, tmp_path)
    (ckpt.final_dir(out, newer) / ckpt.STATE_FILE).unlink()  # as if the marker never got written
    trainer = RGPOTrainer(cfg_for(out))
    assert trainer.step == older
    match = RESUMED.search(capsys.readouterr().out)
    assert match and Path(match.group(1)) == ckpt.final_dir(out, older) and int(match.group(2)) == older


def test_explicit_resume_from_incomplete_checkpoint_is_a_clear_error(two_checkpoints, tmp_path):
    from rgpo.trainer import RGPOTrainer

    pristine, (_, newer) = two_checkpoints
    out = _copy_run(pristine, tmp_path)
    bad = ckpt.final_dir(out, newer)
    (bad / ckpt.STATE_FILE).unlink()
    with bad_input(FileNotFoundError, str(bad), ckpt.STATE_FILE, "not a complete"):
        RGPOTrainer(cfg_for(tmp_path / "other", f"checkpoint.resume={bad}"))


def test_checkpoint_of_another_model_family_names_both(two_checkpoints, tmp_path):
    from rgpo.trainer import RGPOTrainer

    pristine, (_, newer) = two_checkpoints
    out = _copy_run(pristine, tmp_path)
    marker = ckpt.final_dir(out, newer) / ckpt.STATE_FILE
    state = json.loads(marker.read_text())
    state["family"] = "bagel"
    marker.write_text(json.dumps(state))
    with bad_input(ValueError, "'bagel'", "'mindomni'", str(ckpt.final_dir(out, newer))):
        RGPOTrainer(cfg_for(out))


@pytest.mark.parametrize("damage", [
    "no_engine",
    "corrupt_marker",
])
def test_damaged_checkpoint_names_the_checkpoint(two_checkpoints, tmp_path, damage):
    from rgpo.trainer import RGPOTrainer

    pristine, (_, newer) = two_checkpoints
    out = _copy_run(pristine, tmp_path)
    path = ckpt.final_dir(out, newer)
    if damage == "no_engine":
        shutil.rmtree(path / "engine")
        expected, fragments = FileNotFoundError, (str(path), "engine")
    else:
        (path / ckpt.STATE_FILE).write_text('{"step": ')  # e.g. a power cut after the rename
        expected, fragments = ValueError, (str(path / ckpt.STATE_FILE),)
    with bad_input(expected, *fragments):
        RGPOTrainer(cfg_for(out))


@pytest.mark.parametrize("fault", ["incomplete", "family", "trainable", "data_order", "zero_stage", "world_size"])
def test_bad_checkpoint_is_reported_before_the_model_is_built(two_checkpoints, tmp_path, no_model_build, fault):
    """Checkpoints this run cannot continue are refused, named, before the model is loaded: incomplete, of another
    family, of other trainable parameters (DeepSpeed would fail with a layout error), of another prompt order (the
    saved position would walk other prompts), of another ZeRO stage or, under ZeRO, another number of ranks."""
    from rgpo.data import DataError
    from rgpo.trainer import RGPOTrainer

    pristine, (_, newer) = two_checkpoints
    out = _copy_run(pristine, tmp_path)
    path = ckpt.final_dir(out, newer)
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    if fault == "incomplete":
        (path / ckpt.STATE_FILE).unlink()
        expected, fragments = FileNotFoundError, (str(path), ckpt.STATE_FILE)
    elif fault == "family":
        (path / ckpt.STATE_FILE).write_text(json.dumps({**state, "family": "bagel"}))
        expected, fragments = ValueError, ("'bagel'", "'mindomni'")
    elif fault == "trainable":
        state["config"]["trainable"]["lora_r"] = 32
        state["config"]["trainable"]["lora_dropout"] = 0.3  # no parameter changes with it: not reported
        (path / ckpt.STATE_FILE).write_text(json.dumps(state))
        expected, fragments = ValueError, (str(path), "trainable.lora_r: 32 there, 8 now")
    elif fault == "data_order":
        state["sampler"]["seed"] = 99
        (path / ckpt.STATE_FILE).write_text(json.dumps(state))
        expected, fragments = DataError, (str(path), "data.seed: 99 there, 0 now")
    elif fault == "zero_stage":
        (path / ckpt.STATE_FILE).write_text(json.dumps({**state, "zero_stage": 3}))
        expected, fragments = ValueError, (str(path), "ZeRO stage 3", "uses stage 2", "zero2.json")
    else:
        (path / ckpt.STATE_FILE).write_text(json.dumps({**state, "world_size": 8}))
        expected, fragments = ValueError, (str(path), "written by 8 ranks", "this run has 1", "Resume on 8 ranks")
    with bad_input(expected, *fragments):
        RGPOTrainer(cfg_for(tmp_path / "other", f"checkpoint.resume={path}"))


def test_checkpoints_after_the_start_are_set_aside_not_resumed_or_pruned_first(two_checkpoints, tmp_path):
    """Resuming from the older of two checkpoints starts another timeline: the newer one is moved, whole, into a
    superseded-* folder, so the next auto-resume cannot pick it and pruning cannot delete this run's own
    checkpoints in its favour. The state of the older one comes back whole (the non-finite streak too)."""
    from rgpo.trainer import RGPOTrainer

    pristine, (older, newer) = two_checkpoints
    out = _copy_run(pristine, tmp_path)
    marker = ckpt.final_dir(out, older) / ckpt.STATE_FILE
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "nonfinite_in_a_row": 2}))
    trainer = RGPOTrainer(cfg_for(out, f"checkpoint.resume={ckpt.final_dir(out, older)}"))
    assert trainer.step == older and trainer.nonfinite_in_a_row == 2
    assert ckpt.newest_complete(out) == ckpt.final_dir(out, older)
    (aside,) = (out / "checkpoints").glob("superseded-*")
    assert ckpt.read_state(aside / f"step-{newer:07d}")["step"] == newer  # kept whole
    tmp = ckpt.temporary_dir(out, older + 1)  # this timeline's next checkpoint, published with keep_last=1
    tmp.mkdir()
    ckpt.write_state(tmp, {"step": older + 1})
    published = ckpt.publish(tmp, older + 1, out, keep_last=1)
    assert ckpt.complete_checkpoints(out) == [published]  # before, the older timeline's newer step won


class _RunsShell:
    """A pickle payload: unpickling it runs ``touch <marker>`` through ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Foreign:
    """An arbitrary class: unpickling it (``__setstate__``) leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __setstate__(self, state):
        Path(state["marker"]).touch()
        self.__dict__.update(state)


@pytest.mark.parametrize("payload, target, names", [
    ("os.system", "optim_states", "system"),
    ("class", "model_states", "_Foreign"),
])
def test_engine_file_with_a_disallowed_global_is_refused_not_run(two_checkpoints, tmp_path, payload, target, names):
    """DeepSpeed's own loader is ``torch.load(weights_only=False)``: rgpo's reads the engine files with
    ``weights_only=True``, so a planted object is refused by name and its code never runs."""
    from rgpo.trainer import RGPOTrainer

    pristine, (_, newer) = two_checkpoints
    out = _copy_run(pristine, tmp_path)
    marker = tmp_path / "payload-ran"
    planted = _RunsShell(marker) if payload == "os.system" else _Foreign(marker)
    pickle.loads(pickle.dumps(planted))  # the payload is live: a plain unpickle runs it
    assert marker.exists()
    marker.unlink()
    (victim,) = (ckpt.final_dir(out, newer) / "engine").glob(f"*{target}.pt")
    torch.save({"optimizer_state_dict": planted, "module": {}}, victim)
    with bad_input(ckpt.UnsafeCheckpointError, str(victim), names, "weights_only=True"):
        RGPOTrainer(cfg_for(out))
    assert not marker.exists(), "the planted code ran while the checkpoint was read"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fsynced descriptors through Linux's /proc")
def test_publish_fsyncs_files_and_folders_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    out = tmp_path / "run"
    tmp = ckpt.temporary_dir(out, 3)
    (tmp / "engine").mkdir(parents=True)
    (tmp / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (tmp / "trainable.safetensors").write_bytes(b"x")
    ckpt.write_state(tmp, {"step": 3})
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: events.append(("rename", str(b))) or real_replace(a, b))
    final = ckpt.publish(tmp, 3, out, keep_last=2)
    rename = events.index(("rename", str(final)))
    before = {path for kind, path in events[:rename] if kind == "fsync"}
    expected = {os.path.realpath(p) for p in [tmp, *tmp.rglob("*")]}
    assert expected <= before, f"not fsynced before the rename: {sorted(expected - before)}"
    after = ("fsync", os.path.realpath(final.parent))
    assert after in events[rename:], "the parent folder was not fsynced after the rename"


# ============================================================================================ 2. a full disk
@pytest.mark.parametrize("target", ["safetensors", "torch.save"])
def test_full_disk_while_saving_keeps_the_previous_checkpoint(live, monkeypatch, target):
    import safetensors.torch

    monkeypatch.setenv(MODE, "ok")
    train_more(live, 1)
    out, good_step = live.out, live.step
    good = ckpt.newest_complete(out)
    assert good == ckpt.final_dir(out, good_step)
    good_weights = load_file(good / "trainable.safetensors")
    good_state = ckpt.read_state(good)
    before = ckpt.complete_checkpoints(out)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        if target == "safetensors":
            m.setattr(safetensors.torch, "save_file", full_disk)
        else:
            m.setattr(torch, "save", full_disk)
        with pytest.raises(OSError) as info:
            train_more(live, 1)
    assert info.value.errno == errno.ENOSPC and "No space left" in str(info.value)
    after = ckpt.complete_checkpoints(out)
    lost = [p for p in before if p not in after]
    STATS["lost"] += len(lost)
    assert not lost
    assert not ckpt.final_dir(out, live.step).exists(), "a half-written checkpoint was published"
    assert ckpt.newest_complete(out) == good
    assert ckpt.read_state(good) == good_state
    assert_same_weights(load_file(good / "trainable.safetensors"), good_weights, good.name)
    # With space again, the next save succeeds and clears the half-written temporary folder.
    live.save_checkpoint()
    assert ckpt.newest_complete(out) == ckpt.final_dir(out, live.step)
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_kill_while_publish_replaces_a_step_leaves_no_complete_looking_half(tmp_path, monkeypatch):
    def fake_checkpoint(path: Path, step: int) -> None:
        (path / "engine").mkdir(parents=True)
        (path / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"x")
        (path / "trainable.safetensors").write_bytes(b"x")
        ckpt.write_state(path, {"step": step})

    out = tmp_path / "run"
    fake_checkpoint(ckpt.final_dir(out, 2), 2)
    fake_checkpoint(ckpt.final_dir(out, 4), 4)  # written before a resume from step 2 (checkpoint.resume=...)
    fake_checkpoint(ckpt.temporary_dir(out, 4), 4)  # the re-run of step 4, about to be published

    class Killed(BaseException):
        pass

    real_rmtree = shutil.rmtree

    def rmtree_killed_midway(path, *args, **kwargs):
        real_rmtree(Path(path) / "engine")  # the first entries are gone, then SIGKILL
        raise Killed

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree_killed_midway)
    with pytest.raises(Killed):
        ckpt.publish(ckpt.temporary_dir(out, 4), 4, out, keep_last=3)
    monkeypatch.undo()
    half = [p.name for p in ckpt.complete_checkpoints(out) if not (p / "engine").is_dir()]
    assert not half, f"complete-looking checkpoints with files missing: {half}"


# ============================================================================================ 2. NaN gradients
def test_nan_gradients_are_skipped_counted_and_stop_the_run(live, monkeypatch, capsys):
    from rgpo.trainer import NonFiniteError

    monkeypatch.setenv(MODE, "ok")
    monkeypatch.setattr(live.cfg, "max_nonfinite_steps", 2)
    poisoned = {"on": False}
    original = live.micro_batch_loss

    def loss_with_nan(rollout, advantages, idx, *args):
        loss, metrics = original(rollout, advantages, idx, *args)
        return (loss * float("nan") if poisoned["on"] else loss), metrics

    monkeypatch.setattr(live, "micro_batch_loss", loss_with_nan)

    def step(nan: bool):
        poisoned["on"] = nan
        before, skipped = trainable_snapshot(live), live.skipped_steps
        error = None
        try:
            metrics = live.train_step()
        except NonFiniteError as e:
            metrics, error = None, e
        after = trainable_snapshot(live)
        unchanged = all(torch.equal(before[n], after[n]) for n in before)
        finite = all(torch.isfinite(t).all() for t in after.values())
        if nan and not (unchanged and finite and live.skipped_steps == skipped + 1):
            STATS["silent_nan"] += 1
        return metrics, error, unchanged, finite

    metrics, error, unchanged, finite = step(nan=True)
    assert error is None and unchanged and finite and metrics["skipped_steps"] == live.skipped_steps >= 1
    assert "non-finite loss or gradient, update skipped (1 in a row" in capsys.readouterr().out
    _, error, unchanged, finite = step(nan=False)  # a good step resets the count and moves finite weights
    assert error is None and not unchanged and finite and live.nonfinite_in_a_row == 0
    _, error, unchanged, _ = step(nan=True)
    assert error is None and unchanged and live.nonfinite_in_a_row == 1
    STATS["bad_inputs"] += 1
    _, error, unchanged, finite = step(nan=True)
    assert unchanged and finite
    assert isinstance(error, NonFiniteError), "the second NaN step in a row must stop the run"
    text = str(error)
    assert "2 steps in a row" in text and "max_nonfinite_steps=2" in text and "checkpoint is intact" in text
    STATS["clear_errors"] += 1


# ============================================================================================ 2. kills, in a subprocess
KILL_STEPS, EVERY = 4, 2


def run_worker(out: Path, port: int, *, fault: str = "", timeout: int = 400, popen: bool = False, log=None):
    """``rgpo train --config configs/tiny.yaml`` with the fault runs' overrides, in a fresh process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(port), "RGPO_FAULT": fault}
    env.pop(MODE, None)
    cmd = [sys.executable, str(WORKER), f"logging.output_dir={out}", SIGNAL, *FAST, f"optim.max_steps={KILL_STEPS}",
           f"checkpoint.every={EVERY}", "checkpoint.keep_last=3"]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _tail(proc) -> str:
    return (proc.stdout or "")[-4000:] + (proc.stderr or "")[-4000:]


def final_weights(out: Path, step: int = KILL_STEPS) -> dict[str, torch.Tensor]:
    return load_file(ckpt.final_dir(out, step) / "trainable.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = run_worker(out, free_port())
    assert proc.returncode == 0, _tail(proc)
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-0000002", "step-0000004"]
    return final_weights(out)


def _restart_and_compare(out: Path, port: int, completed_before_kill: int, expected_complete: list[str],
                         uninterrupted: dict) -> None:
    found = [p.name for p in ckpt.complete_checkpoints(out)]
    lost = [name for name in expected_complete if name not in found]
    STATS["lost"] += len(lost)
    assert not lost, f"checkpoints lost to the kill: {lost}"
    assert found == expected_complete, f"a checkpoint was published that should not have been: {found}"
    proc = run_worker(out, port)
    assert proc.returncode == 0, _tail(proc)
    match = RESUMED.search(proc.stdout)
    assert match, "the restarted run did not report a resume:\n" + _tail(proc)
    resumed = int(match.group(2))
    newest = ckpt.STEP_DIR.match(expected_complete[-1]).group(1) if expected_complete else 0
    assert resumed == int(newest), "the restart must resume from the newest complete checkpoint"
    assert Path(match.group(1)).name == expected_complete[-1]
    assert completed_before_kill - resumed <= EVERY, "lost more work than one checkpoint interval"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert_same_weights(final_weights(out), uninterrupted, "killed + resumed vs uninterrupted")
    STATS["kills"] += 1


@pytest.mark.slow
def test_sigkill_mid_step_then_restart_equals_uninterrupted(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = run_worker(out, free_port(), fault="kill_in_step:3")
    assert proc.returncode == -signal.SIGKILL, _tail(proc)
    assert "[fault] SIGKILL during step 3" in proc.stdout
    _restart_and_compare(out, free_port(), completed_before_kill=2, expected_complete=["step-0000002"],
                         uninterrupted=uninterrupted)


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_then_restart_equals_uninterrupted(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = run_worker(out, free_port(), fault=f"kill_in_checkpoint:{KILL_STEPS}")
    assert proc.returncode == -signal.SIGKILL, _tail(proc)
    assert f"[fault] SIGKILL while writing the checkpoint of step {KILL_STEPS}" in proc.stdout
    half = ckpt.temporary_dir(out, KILL_STEPS)
    assert (half / "trainable.safetensors").is_file() and not (half / ckpt.STATE_FILE).exists()
    assert not ckpt.final_dir(out, KILL_STEPS).exists(), "a half-written checkpoint was published"
    _restart_and_compare(out, free_port(), completed_before_kill=KILL_STEPS, expected_complete=["step-0000002"],
                         uninterrupted=uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_saves_at_the_end_of_the_step_and_exits_zero(tmp_path, sig):
    out, flag, log_path = tmp_path / "run", tmp_path / "in_step", tmp_path / "log.txt"
    port = free_port()
    with log_path.open("w") as log:
        proc = run_worker(out, port, fault=f"wait_signal_in_step:1:{flag}", popen=True, log=log)
        try:
            deadline = time.monotonic() + 300
            while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert flag.exists(), "the worker never reached step 1:\n" + log_path.read_text()[-4000:]
            proc.send_signal(sig)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert rc == 0, text[-4000:]
    assert f"[rgpo] signal {int(sig)}: finishing the step, saving a checkpoint" in text
    assert "[rgpo] stop signal received: checkpoint saved at step 1, exiting" in text
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-0000001"]  # stopped after step 1 of 4
    assert ckpt.read_state(ckpt.final_dir(out, 1))["step"] == 1
    STATS["kills"] += 1


# ============================================================================================ 3. safety
def _python_files():
    return sorted((REPO / "rgpo").rglob("*.py")) + sorted((REPO / "rewards").rglob("*.py"))


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_every_torch_load_is_weights_only():
    unsafe = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            is_torch_load = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                             and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                             and node.func.value.id == "torch")
            if is_torch_load and not any(k.arg == "weights_only" and _is_true(k.value) for k in node.keywords):
                unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}")
        # A textual grep too, for calls the AST walk above would not recognise (aliases, getattr...).
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if "torch.load(" in line and "weights_only=True" not in line and not line.lstrip().startswith("#"):
                where = f"{path.relative_to(REPO)}:{number}"
                if where not in unsafe:
                    unsafe.append(where)
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_no_trust_remote_code_by_default():
    from rgpo.config import RGPOConfig

    assert RGPOConfig().model.trust_remote_code is False
    assert load_config(TINY).model.trust_remote_code is False
    found = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                found += [f"{path.relative_to(REPO)}:{node.lineno} (call)" for k in node.keywords
                          if k.arg == "trust_remote_code" and _is_true(k.value)]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = args.posonlyargs + args.args
                pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                found += [f"{path.relative_to(REPO)}:{node.lineno} (default of {node.name})" for a, d in pairs
                          if a.arg == "trust_remote_code" and _is_true(d)]
    assert not found, f"trust_remote_code=True by default: {found}"
