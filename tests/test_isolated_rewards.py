"""Rewards run in another Python (rgpo.rewards.isolated): same scores as in-process, one restart, clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib import metadata

import pytest
import torch
from PIL import Image

from rgpo.rewards import RewardError, combine, get_reward, get_rewards

REWARD_FILE = textwrap.dedent('''
    import time

    from packaging.version import Version


    def score(prompts, completions, images, tag, **kwargs):
        """The completion's major version, plus the first image's mean red / 255, plus len(tag)."""
        print("scoring", len(completions), "samples")  # must reach stderr, not the protocol
        out = []
        for completion, chain, t in zip(completions, images, tag):
            if t is None:
                out.append(None)
                continue
            red = sum(p[0] for p in chain[0].convert("RGB").getdata()) / (255 * chain[0].width * chain[0].height) if chain else 0.0
            out.append(float(Version(completion).major) + red + len(t))
        return out


    def major(completions, **kwargs):
        return [float(Version(c).major) for c in completions]


    def nap(completions, seconds=0.5, **kwargs):
        time.sleep(seconds)
        return [seconds] * len(completions)


    def broken(completions, **kwargs):
        raise ValueError("the judge answered 'maybe'")


    class Scaled:
        """A class reward: built once in the worker with its kwargs."""

        def __init__(self, factor):
            self.factor = factor

        def __call__(self, completions, **kwargs):
            return [self.factor * len(c) for c in completions]
''')


@pytest.fixture
def reward_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # specs are resolved from the working directory, in the worker too
    path = tmp_path / "iso_rewards.py"
    path.write_text(REWARD_FILE)
    return path


def _batch():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    return dict(prompts=["p0", "p1", "p2"], completions=["2.1", "3.0.1", "7"],
                images=[[red], [blue, red], []], columns={"tag": ["ab", "abc", None]})


def _scores(reward, batch):
    _, per = combine([reward], None, batch["prompts"], batch["completions"], batch["images"], batch["columns"])
    return per[:, 0]


def test_isolated_reward_scores_like_in_process_with_images_columns_and_none(reward_file, capsys):
    batch = _batch()
    local = get_reward("iso_rewards.py:score")
    isolated = get_reward({"name": "iso_rewards.py:score", "python": sys.executable, "weight": 2.0})
    try:
        assert (isolated.name, isolated.weight, isolated.source) == ("score", 2.0, "iso_rewards.py:score")
        assert isolated.required_columns == ("tag",)
        # By hand: 2 + 1 (red) + 2; 3 + 0 (blue first) + 3; None (tag None).
        expected = torch.tensor([5.0, 6.0, float("nan")])
        torch.testing.assert_close(_scores(local, batch), expected, equal_nan=True)
        torch.testing.assert_close(_scores(isolated, batch), expected, equal_nan=True)
        assert isolated.fn.versions == {"packaging": metadata.version("packaging")}
        assert isolated.fn.python_version == sys.version.split()[0]
        # What the reward prints reaches the trainer's stderr, named, and never the protocol.
        deadline = time.monotonic() + 5
        err = ""
        while "[reward score] scoring 3 samples" not in err and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capsys.readouterr().err
        assert "[reward score] scoring 3 samples" in err
    finally:
        isolated.fn.close()


def test_a_class_reward_is_built_once_in_the_worker_with_its_kwargs(reward_file):
    reward = get_reward({"name": "iso_rewards:Scaled", "python": sys.executable, "kwargs": {"factor": 0.5}})
    try:
        assert reward.name == "Scaled"
        assert reward(prompts=["p", "p"], completions=["abcd", "ab"], completion_ids=None, images=[[], []]) == [2.0, 1.0]
    finally:
        reward.fn.close()


def test_a_killed_worker_is_restarted_once_then_the_step_fails_naming_the_reward(reward_file):
    reward = get_reward({"name": "iso_rewards:major", "python": sys.executable})
    call = dict(prompts=["p"], completions=["4.2"], completion_ids=None, images=[[]])
    try:
        first = reward.fn.pid
        assert reward(**call) == [4.0]
        os.kill(first, signal.SIGKILL)
        assert reward(**call) == [4.0]  # the same batch, sent again to a new worker
        assert reward.fn.restarts_used == 1 and reward.fn.pid != first
        os.kill(reward.fn.pid, signal.SIGKILL)
        with pytest.raises(RewardError, match=r"reward 'major': its worker \(.*python.*\) died \(exit code -9\) "
                                              r"after 1 restart\(s\), the most allowed; the step stops here"):
            reward(**call)
    finally:
        reward.fn.close()


def test_errors_name_the_reward_and_what_is_wrong(reward_file, tmp_path):
    with pytest.raises(RewardError, match=r"reward 'iso_rewards:nothing_here'.*has no attribute 'nothing_here'"):
        get_reward({"name": "iso_rewards:nothing_here", "python": sys.executable})
    with pytest.raises(RewardError, match=r"reward 'iso_rewards:major': its 'python' setting '.*no_such/python' "
                                          r"is not an executable file"):
        get_reward({"name": "iso_rewards:major", "python": str(tmp_path / "no_such" / "python")})
    with pytest.raises(RewardError, match=r"reward 'format' is one of rgpo's registered rewards"):
        get_reward({"name": "format", "python": sys.executable})
    with pytest.raises(RewardError, match=r"kwargs must be JSON"):
        get_reward({"name": "iso_rewards:Scaled", "python": sys.executable, "kwargs": {"factor": object()}})
    broken = get_reward({"name": "iso_rewards:broken", "python": sys.executable})
    try:
        with pytest.raises(RewardError, match=r"(?s)reward 'broken' raised ValueError: the judge answered 'maybe' "
                                              r"\(in its worker.*\)\nworker traceback:\n.*iso_rewards.py") as caught:
            combine([broken], None, ["p"], ["1"], None, {})
        assert "raise ValueError" in str(caught.value)
        # A reward error is not a death: the worker is still the first one, and answers the next batch.
        assert broken.fn.restarts_used == 0 and broken.fn._process.poll() is None
    finally:
        broken.fn.close()


def test_isolated_rewards_overlap_under_parallel_and_report_their_time(reward_file):
    rewards = get_rewards([{"name": "iso_rewards:nap", "python": sys.executable, "kwargs": {"seconds": 0.5}},
                           {"name": "iso_rewards:nap", "python": sys.executable, "kwargs": {"seconds": 0.7}}])
    try:
        assert [r.name for r in rewards] == ["nap", "nap_2"]
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        _, per = combine(rewards, None, ["p"] * 2, ["1"] * 2, None, {}, parallel=True, seconds=seconds)
        wall = time.perf_counter() - start
        torch.testing.assert_close(per, torch.tensor([[0.5, 0.7]] * 2))
        assert wall < 1.1, wall  # one after the other would take 1.2 s
        assert 0.5 <= seconds["nap"] < 0.9 and 0.7 <= seconds["nap_2"] < 1.1, seconds
    finally:
        for r in rewards:
            r.fn.close()


def test_the_run_config_takes_a_python_per_reward(reward_file):
    from rgpo.config import RewardSpec

    reward = get_rewards([RewardSpec(name="iso_rewards:major", weight=0.5, python=sys.executable)])[0]
    try:
        assert (reward.name, reward.weight) == ("major", 0.5)
        assert reward(prompts=["p"], completions=["9.1"], completion_ids=None, images=[[]]) == [9.0]
    finally:
        reward.fn.close()


@pytest.mark.slow
def test_a_reward_in_another_venv_with_another_package_version_scores_the_same(reward_file, tmp_path):
    """A second venv (no torch, no rgpo, no Pillow) with another version of ``packaging``: the worker loads the
    reward there, reports that version, and scores exactly as the reward does in this process."""
    mine = metadata.version("packaging")
    other = "23.2" if mine != "23.2" else "23.1"
    venv = tmp_path / "other-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                          f"packaging=={other}"], capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        pytest.skip(f"installing packaging=={other} into a fresh venv needs PyPI: {pip.stderr[-300:]}")
    batch = {"prompts": ["a", "b", "c"], "completions": ["1.0", "12.3.4", "0.9rc1"], "images": None, "columns": {}}
    local = get_reward("iso_rewards:major")
    isolated = get_reward({"name": "iso_rewards:major", "python": str(python)})
    try:
        assert isolated.fn.versions == {"packaging": other}
        got, want = _scores(isolated, batch), _scores(local, batch)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(want, torch.tensor([1.0, 12.0, 0.0]))
    finally:
        isolated.fn.close()


def test_a_reward_server_config_may_run_a_reward_in_another_python(reward_file):
    from rgpo.rewards.server import load_rewards

    rewards = load_rewards({"functions": [{"name": "iso_rewards:major", "python": sys.executable, "weight": 2.0}]})
    try:
        assert [(r.name, r.weight) for r in rewards] == [("major", 2.0)]
        assert rewards[0](prompts=["p"], completions=["5.0"], completion_ids=None, images=[[]]) == [5.0]
    finally:
        rewards[0].fn.close()


def test_remote_isolated_and_in_process_waits_overlap_under_parallel(reward_file):
    """The three kinds of waiting reward at once: a served one (HTTP), an isolated one (pipe) and one in this
    process, 0.6 s each: together ~0.6 s, where one after the other takes 1.8 s; each reports its own time."""
    from rgpo.rewards import Reward
    from rgpo.rewards.server import background_server, build_app

    def nap(completions, **kwargs):
        time.sleep(0.6)
        return [0.6] * len(completions)

    with background_server(build_app([Reward("served_nap", nap)])) as url:
        rewards = get_rewards([{"name": "remote", "kwargs": {"url": url}},
                               {"name": "iso_rewards:nap", "python": sys.executable, "kwargs": {"seconds": 0.6}},
                               Reward("local_nap", nap)])
        try:
            assert [r.name for r in rewards] == ["remote", "nap", "local_nap"]
            seconds: dict[str, float] = {}
            start = time.perf_counter()
            _, per = combine(rewards, None, ["p"] * 2, ["1"] * 2, None, {}, parallel=True, seconds=seconds)
            wall = time.perf_counter() - start
        finally:
            rewards[1].fn.close()
    torch.testing.assert_close(per, torch.full((2, 3), 0.6))
    assert wall < 1.2, wall
    assert all(0.6 <= seconds[r.name] < 1.2 for r in rewards), seconds
