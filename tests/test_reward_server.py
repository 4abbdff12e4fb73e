"""The reward server (rewards/server.py) and the ``remote`` reward (rewards/remote.py): the same scores as in
process, a health endpoint, bounded requests, retries, and errors that name the reward and the URL instead of a
silent 0."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from rgpo import rewards
from rgpo.rewards import RemoteReward, RewardError, build_tiny_clip, combine, get_reward, get_rewards
from rgpo.rewards.server import background_server, build_app, load_rewards, main
from rgpo.rewards.shapes import synthetic_shapes

REPO = Path(rewards.__file__).parent.parent
SERVER_START_S = 90  # the subprocess imports torch and open_clip: seconds on a loaded 2-core machine


# ---------------------------------------------------------------------------------------------- helpers
def _start_server(config: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``python -m rgpo.rewards.server`` on a free port of 127.0.0.1; returns the process and the URL it printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rgpo.rewards.server", "--config", str(config), "--port", "0", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(SERVER_START_S)
    if not line or "http://" not in line[0]:
        proc.kill()
        raise AssertionError(f"the reward server did not start: {line!r}\n{proc.stderr.read()}")
    return proc, line[0].split()[-1]


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        stream.close()


def _write(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    """A tiny CLIP's weights in a local file, as a real checkpoint is given (random but seeded: scores only need
    to be the same in both processes, not meaningful)."""
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(build_tiny_clip(seed=0).model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def served_config(tmp_path_factory, clip_weights):
    return _write(tmp_path_factory.mktemp("server") / "rewards.yaml", {"functions": [
        {"name": "format", "weight": 1.0},
        {"name": "clip_consistency", "weight": 2.0,
         "kwargs": {"model_name": "rgpo-tiny-clip", "pretrained": str(clip_weights), "device": "cpu", "clamp_min": None}},
    ]})


@pytest.fixture(scope="module")
def served(served_config):
    proc, url = _start_server(served_config)
    yield url
    _stop(proc)


def _batch():
    """Five chains with 2, 0, 1, 1 and 1 images; one without a caption (CLIP does not apply to it)."""
    images, captions = synthetic_shapes(per_caption=1, seed=7, size=32)
    completions = ["<think>r</think><answer>a red circle</answer>", "no tags", "<think>x</think><answer>y</answer>",
                   "<think>only think</think>", "<think>a</think> <answer>b</answer>"]
    chains = [[images[0], images[4]], [], [images[1]], [images[2]], [images[3]]]
    gt = [captions[0], captions[1], captions[1], None, captions[3]]
    return {"prompts": [f"p{i}" for i in range(5)], "completions": completions, "images": chains,
            "columns": {"gt_prompt": gt}}


class _Fake:
    """A stand-in server whose /score answer the test sets (to check the client reads nothing into a bad one)."""

    def __init__(self, answer, status=200):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        self.answer, self.status, self.calls = answer, status, 0

        async def health(request):
            return JSONResponse({"status": "ok", "protocol": 1, "rewards": [{"name": "judge", "weight": 1.0}],
                                 "max_request_bytes": 10**6})

        async def score(request):
            self.calls += 1
            answer, status = self.answer, self.status
            if callable(answer):
                answer, status = answer(self.calls)
            if isinstance(answer, bytes):
                return Response(answer, status_code=status)
            return JSONResponse(answer, status_code=status)

        self.app = Starlette(routes=[Route("/health", health), Route("/score", score, methods=["POST"])])


# ---------------------------------------------------------------------------------------------- same scores
def test_served_scores_equal_in_process(served, served_config):
    batch = _batch()
    local = load_rewards(served_config)  # the server's own YAML, loaded here
    total, per = combine(local, None, batch["prompts"], batch["completions"], batch["images"], batch["columns"])
    assert per[1, 1].isnan() and per[3, 1].isnan() and not per[[0, 2, 4], 1].isnan().any()

    import json
    import urllib.request

    from rgpo.rewards.remote import sample_keys

    remote = RemoteReward(served, weights=[1.0, 2.0], batch_size=2)  # 5 samples: three requests
    request = json.loads(remote._body(batch["prompts"][:2], batch["completions"][:2], [[], []], None, {}, 0))
    echoed = json.loads(urllib.request.urlopen(urllib.request.Request(
        served + "/score", data=json.dumps({**request, "names": ["format"]}).encode(),
        headers={"Content-Type": "application/json"})).read())
    assert echoed["keys"] == sample_keys(batch["prompts"][:2], batch["completions"][:2])  # what the client checks
    assert remote.names == ["format", "clip_consistency"]
    values = remote.scores(batch["prompts"], batch["completions"], batch["images"], **batch["columns"])
    for j, name in enumerate(remote.names):
        for i, v in enumerate(values[name]):
            expected = float(per[i, j])
            assert (v is None) == (expected != expected), (name, i)
            assert v is None or abs(v - expected) < 1e-6, (name, i, v, expected)
    # The remote reward's value: the served rewards' weighted sum, as combine's total with the same weights.
    totals = remote(prompts=batch["prompts"], completions=batch["completions"], images=batch["images"],
                    completion_ids=None, **batch["columns"])
    assert max(abs(a - b) for a, b in zip(totals, total.tolist())) < 1e-6

    # Listed in a run like any other reward, next to an in-process one, through combine.
    run = get_rewards(["format", {"name": "remote", "kwargs": {"url": served, "names": ["clip_consistency"]}}])
    assert [r.name for r in run] == ["format", "remote:clip_consistency"]
    run_total, run_per = combine(run, None, batch["prompts"], batch["completions"], batch["images"], batch["columns"])
    torch.testing.assert_close(run_per, per, equal_nan=True, atol=1e-6, rtol=0)


def test_health_endpoint(served):
    with urllib.request.urlopen(served + "/health", timeout=10) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["protocol"] == 1
    assert health["rewards"] == [{"name": "format", "weight": 1.0}, {"name": "clip_consistency", "weight": 2.0}]
    assert health["max_request_bytes"] == 64 * 2**20


def test_unknown_served_name_and_unreachable_url_fail_when_the_run_starts(served):
    with pytest.raises(RewardError, match=r"serves no reward \['clip'\]; it serves \['format', 'clip_consistency'\]"):
        get_reward("remote", url=served, names=["clip"])
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(RewardError, match=rf"reward 'remote' \(http://127.0.0.1:{port}/health\): no answer"):
        get_reward("remote", url=f"http://127.0.0.1:{port}", timeout_s=2.0, retries=1, backoff_s=0.05)
    assert time.monotonic() - start < 2.0


# ---------------------------------------------------------------------------------------------- request size
def test_oversize_request_refused():
    app = build_app(get_rewards(["format"]), max_request_bytes=20_000)
    with background_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        # Refused from its declared size alone, before any body is read.
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000000000\r\n\r\n")
            response = http.client.HTTPResponse(conn)
            response.begin()
            assert response.status == 413 and "limit of 20000 bytes" in json.loads(response.read())["error"]
        # The client knows the limit from /health and says what to change, without sending.
        remote = RemoteReward(url, batch_size=64)
        assert remote.max_request_bytes == 20_000
        big = {"prompts": ["p"] * 64, "completions": ["x" * 500] * 64}
        with pytest.raises(RewardError, match=r"is \d+ bytes, over the server's limit of 20000; lower batch_size"):
            remote(**big)
        # A client that does not know the limit is refused by the server, and told why.
        remote.max_request_bytes = None
        with pytest.raises(RewardError, match=r"refused a request of \d+ bytes as too large.*lower batch_size"):
            remote(**big)
        assert remote(prompts=["p"] * 3, completions=["<think>a</think><answer>b</answer>"] * 3) == [1.0] * 3


# ---------------------------------------------------------------------------------------------- errors
def test_malformed_requests_get_400_saying_what_is_wrong():
    app = build_app(get_rewards(["format"]))
    with background_server(app) as url:
        def post(body):
            request = urllib.request.Request(url + "/score", data=json.dumps(body).encode(), method="POST")
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=10)
            return info.value.code, json.loads(info.value.read())["error"]

        assert post({"prompts": ["p", "q"], "completions": ["a"]}) == (
            400, "request has 2 prompts but completions has 1; every list needs one entry per sample")
        code, error = post({"prompts": ["p"], "completions": ["a"], "images": [["not png"]]})
        assert code == 400 and error.startswith("images of sample 0 are not base64 PNG")
        assert post({"prompts": ["p"], "completions": ["a"], "names": ["clip"]}) == (
            400, "no served reward named ['clip']; served: ['format']")


@pytest.mark.parametrize(("answer", "pattern"), [
    ({"scores": {"judge": [0.5]}}, r"malformed response: 1 scores for 'judge', expected 2"),
    ({"scores": {"judge": [0.5, "0.7"]}}, r"malformed response: score 1 of 'judge' is '0.7', not a number"),
    ({"scores": {"judge": [0.5, True]}}, r"malformed response: score 1 of 'judge' is True"),
    ({"scores": {"other": [0.5, 0.5]}}, r"malformed response: no list of scores for 'judge'"),
    ({"result": [0.5, 0.5]}, r"malformed response: no 'scores' object"),
    (b"<html>oops</html>", r"malformed response \(not JSON\)"),
])
def test_malformed_response_is_an_error_not_a_zero(answer, pattern):
    fake = _Fake(answer)
    with background_server(fake.app) as url:
        reward = get_reward("remote", url=url)
        assert reward.name == "remote"
        with pytest.raises(RewardError, match=rf"reward 'remote' \({url}/score\): {pattern}"):
            combine([reward], None, ["p", "q"], ["a", "b"], None, {})
    assert fake.calls == 1  # a malformed answer is not retried


def test_scores_for_other_samples_or_another_order_are_an_error():
    """The server echoes each sample's key with its scores (rgpo's server does: see test_served_scores_...); an
    answer whose keys are not the request's, in order, would pair scores with the wrong chains."""
    from rgpo.rewards.remote import sample_keys

    keys = sample_keys(["p", "q"], ["a", "b"])
    assert len(set(keys)) == 2
    swapped = _Fake({"scores": {"judge": [0.9, 0.1]}, "keys": keys[::-1]})
    with background_server(swapped.app) as url, pytest.raises(
            RewardError, match=rf"reward 'remote' \({url}/score\): the answer is for other samples: its key 0 is "
                               rf"'{keys[1]}', the request's \(sample 0\) '{keys[0]}'"):
        combine([get_reward("remote", url=url)], None, ["p", "q"], ["a", "b"], None, {})
    in_order = _Fake({"scores": {"judge": [0.9, 0.1]}, "keys": keys})
    with background_server(in_order.app) as url:
        total, _ = combine([get_reward("remote", url=url)], None, ["p", "q"], ["a", "b"], None, {})
    assert total.tolist() == pytest.approx([0.9, 0.1])


def test_a_served_reward_that_fails_is_reported_not_retried(tmp_path):
    (tmp_path / "judge.py").write_text("def judge(completions, **kwargs):\n    raise ValueError('model said maybe')\n")
    app = build_app(load_rewards({"functions": [{"name": f"{tmp_path}/judge.py:judge"}]}))
    with background_server(app) as url:
        remote = RemoteReward(url, retries=3)
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"reward 'remote' .*/score\): the server answered HTTP 500: reward "
                                              r"'judge' raised ValueError: model said maybe"):
            remote(prompts=["p"], completions=["a"])
        assert time.monotonic() - start < 1.0


def test_retries_with_exponential_backoff():
    def flaky(call):  # unavailable twice, then an answer
        return ({"error": "warming up"}, 503) if call < 3 else ({"scores": {"judge": [0.25]}}, 200)

    fake = _Fake(flaky)
    with background_server(fake.app) as url:
        remote = RemoteReward(url, retries=2, backoff_s=0.2, timeout_s=10)
        start = time.monotonic()
        assert remote(prompts=["p"], completions=["a"]) == [0.25]
        assert fake.calls == 3 and time.monotonic() - start >= 0.2 + 0.4  # waited 0.2 s, then 0.4 s
        fake.calls = 0
        with pytest.raises(RewardError, match=r"no answer after 2 attempt\(s\).*HTTP 503: warming up"):
            RemoteReward(url, retries=1, backoff_s=0.01)(prompts=["p"], completions=["a"])


def test_a_server_that_never_answers_times_out_within_timeout_s():
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        remote = object.__new__(RemoteReward)  # skip the /health check: the server never answers it either
        remote.__dict__.update(url=f"http://127.0.0.1:{port}", timeout_s=1.0, retries=5, backoff_s=0.1, batch_size=8,
                               log_name="remote:judge", names=["judge"], weights=[1.0], max_request_bytes=None)
        start = time.monotonic()
        with pytest.raises(RewardError, match=rf"reward 'remote:judge' \(http://127.0.0.1:{port}/score\): no answer"):
            remote(prompts=["p"], completions=["a"])
        assert 0.9 < time.monotonic() - start < 2.0


def test_killed_server_gives_an_error_naming_reward_and_url(tmp_path):
    proc, url = _start_server(_write(tmp_path / "rewards.yaml", {"functions": [{"name": "format"}]}))
    try:
        reward = get_reward("remote", url=url, names=["format"], timeout_s=3.0, retries=2, backoff_s=0.1)
        done = ["<think>a</think><answer>b</answer>"]
        assert combine([reward], None, ["p"], done, None, {})[0].tolist() == [1.0]
    finally:
        _stop(proc)  # SIGKILL: a crash, not a clean shutdown
    start = time.monotonic()
    with pytest.raises(RewardError) as info:
        combine([reward], None, ["p"], done, None, {}, timeout=30)
    assert time.monotonic() - start < 3.0
    message = str(info.value)
    assert "reward 'remote:format'" in message and f"{url}/score" in message and "3 attempt(s)" in message


# ---------------------------------------------------------------------------------------------- config and CLI
def test_server_config_errors_are_clear(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml"), "--port", "0"]) == 2
    assert "cannot be read" in capsys.readouterr().err
    bad = _write(tmp_path / "bad.yaml", {"functions": [{"name": "format", "wieght": 2.0}]})
    assert main(["--config", str(bad), "--port", "0"]) == 2
    assert "functions[0] has unknown key(s) ['wieght']" in capsys.readouterr().err
    empty = _write(tmp_path / "empty.yaml", {"rewards": {"timeout_s": 5}})
    assert main(["--config", str(empty)]) == 2
    assert "needs a non-empty 'functions:' list" in capsys.readouterr().err


def test_a_run_config_serves_its_rewards_section_with_unique_names(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "r.py").write_text(f"def score(completions, **kwargs):\n    return [{folder!r} == 'b'] * len(completions)\n")
    run_config = {"model": {"path": "tiny"}, "rewards": {"functions": [
        {"name": f"{tmp_path}/a/r.py:score"}, {"name": f"{tmp_path}/b/r.py:score", "weight": 0.5}]}}
    loaded = load_rewards(run_config)
    assert [r.name for r in loaded] == ["a.r:score", "b.r:score"]
    with background_server(build_app(loaded)) as url:
        remote = RemoteReward(url)
        assert remote.names == ["a.r:score", "b.r:score"] and remote.weights == [1.0, 1.0]  # served weights: not used
        assert remote.scores(["p"], ["x"]) == {"a.r:score": [0.0], "b.r:score": [1.0]}
        assert remote(prompts=["p"], completions=["x"], images=[[Image.new("RGB", (2, 2))]]) == [1.0]
        weighted = get_reward("remote", url=url, names=["b.r:score"], weights=[0.5])
        assert weighted.name == "remote:b.r:score" and weighted(prompts=["p"], completions=["x"]) == [0.5]
