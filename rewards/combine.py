"""Running several rewards on a batch and summing them with weights, with errors that name the culprit."""

from __future__ import annotations

import concurrent.futures
import math
import numbers
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from .registry import RewardError, required_columns, reward_name

__all__ = ["check_columns", "combine"]


def check_columns(reward: Any, available_columns: Iterable[str]) -> None:
    """Fail before training when ``reward`` declares a ``required_columns`` entry the data lacks.

    Raises:
        RewardError: naming the reward, every missing column and the columns that are available.
    """
    available = sorted(available_columns)
    missing = [c for c in required_columns(reward) if c not in available]
    if missing:
        raise RewardError(
            f"reward {reward_name(reward)!r} needs column(s) {missing} that the data does not have; "
            f"available columns: {available}"
        )


def combine(
    rewards: Sequence[Callable[..., Any]],
    weights: Sequence[float] | None,
    prompts: list[str],
    completions: list[str],
    images: list[Any],
    columns: Mapping[str, list[Any]],
    timeout: float | None = None,
    parallel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every reward on the batch and return ``(total, per_reward)``.

    Args:
        rewards: reward callables (e.g. from :func:`rewards.get_reward`).
        weights: one weight per reward; None uses each reward's ``.weight`` (1.0 when it has none).
        prompts, completions, images: the N samples.
        columns: the other data columns, each a list of N values, passed to the rewards as keywords.
        timeout: seconds each reward may take for the batch; None: no limit.
        parallel: run the rewards at the same time, each in its own thread (for rewards that wait on something
            else: a remote judge, a subprocess, another GPU). Errors are still reported in the rewards' order.

    Returns:
        total: (N,) float32, ``sum_r weight_r * reward_r`` over the rewards that apply to the sample. A
            reward returning None does not apply and adds nothing; a sample no reward applies to gets 0.0
            rather than NaN, so one such sample cannot poison the group's advantages. Its row of
            ``per_reward`` is all NaN, which is how a caller can spot (and log) it.
        per_reward: (N, R) float32, each reward's raw (unweighted) value, NaN where it returned None.

    Raises:
        RewardError: naming the reward when it raises (chained), times out, returns a list of the wrong
            length, or returns NaN, inf or a non-number (naming the sample index too).
    """
    n = len(prompts)
    _check_batch(n, completions, images, columns)
    if weights is None:
        weights = [float(getattr(r, "weight", 1.0)) for r in rewards]
    if len(weights) != len(rewards):
        raise RewardError(f"got {len(weights)} weights for {len(rewards)} rewards")
    for reward, w in zip(rewards, weights):
        if not math.isfinite(w):
            raise RewardError(f"reward {reward_name(reward)!r} has weight {w}; weights must be finite")
    for reward in rewards:
        check_columns(reward, columns)
    per_reward = torch.full((n, len(rewards)), float("nan"), dtype=torch.float32)
    if parallel and len(rewards) > 1:
        # All start now, so each one's time limit counts from now (not from when the one before it finished).
        deadline = None if timeout is None else time.monotonic() + timeout
        started = [_start(reward, reward_name(reward), *_inputs(prompts, completions, images, columns))
                   for reward in rewards]
        outcomes = [lambda f=future, r=reward: _wait(f, reward_name(r), timeout, n, deadline)
                    for future, reward in zip(started, rewards)]
    else:
        outcomes = [lambda r=reward: _call(r, reward_name(r), timeout, prompts, completions, images, columns)
                    for reward in rewards]
    for j, (reward, outcome) in enumerate(zip(rewards, outcomes)):
        name = reward_name(reward)
        per_reward[:, j] = torch.tensor(_validate(_named_errors(outcome, name), name, n), dtype=torch.float32)
    weighted = per_reward * torch.tensor([float(w) for w in weights], dtype=torch.float32)
    return torch.nansum(weighted, dim=1), per_reward


def _check_batch(n: int, completions: list[str], images: list[Any], columns: Mapping[str, list[Any]]) -> None:
    lengths = {"completions": len(completions), "images": len(images)}
    lengths.update({f"column {k!r}": len(v) for k, v in columns.items()})
    wrong = [f"{k} has {v}" for k, v in lengths.items() if v != n]
    if wrong:
        raise RewardError(f"batch has {n} prompts but {', '.join(wrong)}; every list needs one entry per sample")


def _inputs(
    prompts: list[str], completions: list[str], images: list[Any], columns: Mapping[str, list[Any]]
) -> tuple[tuple[list[Any], ...], dict[str, list[Any]]]:
    # Copies: a reward that edits its inputs in place must not change what another reward sees.
    return (list(prompts), list(completions), list(images)), {k: list(v) for k, v in columns.items()}


def _call(
    reward: Callable[..., Any],
    name: str,
    timeout: float | None,
    prompts: list[str],
    completions: list[str],
    images: list[Any],
    columns: Mapping[str, list[Any]],
) -> Any:
    args, kwargs = _inputs(prompts, completions, images, columns)
    if timeout is None:
        return reward(*args, **kwargs)
    deadline = time.monotonic() + timeout
    return _wait(_start(reward, name, args, kwargs), name, timeout, len(prompts), deadline)


def _named_errors(outcome: Callable[[], Any], name: str) -> Any:
    """``outcome()``, with any exception but a RewardError turned into one that names the reward."""
    try:
        return outcome()
    except RewardError:
        raise
    except Exception as e:
        raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e


def _start(
    reward: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> concurrent.futures.Future[Any]:
    """Run the reward in a daemon thread; its result (or exception) arrives in the returned future.

    A Python thread cannot be killed: a reward that hangs past its timeout keeps running in the background. The
    thread is a daemon so that it cannot keep the process alive once training has failed with the error (a
    thread pool's workers would: the interpreter joins them at exit).
    """
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    # The CUDA current device is per thread; a reward using plain "cuda" must see this rank's GPU.
    cuda_device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)
            future.set_result(reward(*args, **kwargs))
        except BaseException as e:  # handed to the waiting thread, which re-raises it
            future.set_exception(e)

    threading.Thread(target=run, name=f"reward-{name}", daemon=True).start()
    return future


def _wait(
    future: concurrent.futures.Future[Any], name: str, timeout: float | None, n: int, deadline: float | None
) -> Any:
    """The reward's values, or a RewardError once the ``time.monotonic()`` ``deadline`` (its start + ``timeout``)
    has passed; None: no limit."""
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        return future.result(timeout=remaining)
    except concurrent.futures.TimeoutError as e:
        if future.done():  # the reward itself raised a TimeoutError: report that, not ours
            raise
        raise RewardError(f"reward {name!r} took longer than the timeout of {timeout} s for {n} samples") from e


def _validate(values: Any, name: str, n: int) -> list[float]:
    """The reward's values as floats (NaN for None), or a RewardError saying what is wrong and where."""
    if isinstance(values, torch.Tensor) and values.dim() == 1:  # accepted for convenience; NaN/inf still fail
        values = values.tolist()
    if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward {name!r} returned {type(values).__name__}; expected a list of {n} floats or None")
    if len(values) != n:
        raise RewardError(f"reward {name!r} returned {len(values)} values; expected {n} (one per sample)")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(float("nan"))
            continue
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"reward {name!r} returned {type(v).__name__} {v!r:.60} for sample {i}; expected a float or None"
            )
        v = float(v)
        if not math.isfinite(v):
            raise RewardError(
                f"reward {name!r} returned {v} for sample {i}; return None for a sample the reward does not apply to"
            )
        out.append(v)
    return out
