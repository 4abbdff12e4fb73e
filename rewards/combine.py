"""Running several rewards on a batch and summing them with weights, with errors that name the culprit.

Each reward is called as TRL's ``GRPOTrainer`` calls it: keywords only (see :mod:`rgpo.rewards.contract`).
"""

from __future__ import annotations

import concurrent.futures
import math
import numbers
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from .contract import INPUTS, as_messages, chain_images, reads, refused_keywords, takes_messages
from .registry import RewardError, required_columns, reward_name, unwrap

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
    images: Sequence[Any] | None,
    columns: Mapping[str, list[Any]],
    timeout: float | None = None,
    parallel: bool = False,
    *,
    completion_ids: Sequence[Sequence[int]] | None = None,
    seconds: dict[str, float] | None = None,
    per_image: dict[str, dict[int, list[float]]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every reward on the batch and return ``(total, per_reward)``.

    Each reward is called with keywords only: ``prompts=``, ``completions=``, ``completion_ids=``,
    ``images=`` (one list of images per chain) and every column.

    Args:
        rewards: reward callables (e.g. from :func:`rgpo.rewards.get_rewards`).
        weights: one weight per reward; None uses each reward's ``.weight`` (1.0 when it has none).
        prompts, completions: the N samples. A reward that takes TRL's conversational form (see
            :func:`rgpo.rewards.contract.takes_messages`) gets text ones as one-message lists.
        images: per sample, the list of images its chain drew (0, 1 or several). A single image or None in
            place of a list is taken as ``[image]`` or ``[]`` (callers that draw one image per chain); None
            for the whole batch: no images.
        columns: the other data columns, each a list of N values, passed to the rewards as keywords.
        completion_ids: per sample, the completion's token ids, or None when the caller has none (a reward
            that needs them then fails before it is called, naming itself).
        timeout: seconds each reward may take for the batch; None: no limit.
        parallel: run the rewards at the same time, each in its own thread (for rewards that wait on something
            else: a remote judge, a subprocess, another GPU). Errors are still reported in the rewards' order.
        seconds: when given, each reward's wall-clock seconds on this batch are added to ``seconds[name]``
            (the trainer logs them as ``timing/reward/<name>``). Under ``parallel`` each reward is timed from the
            common start to its own end, so overlapping rewards each report their own duration.
        per_image: when given (chains that draw several images inside them: interleaved families), a reward may
            return, for a sample, a list with one value (or None) per image of its chain instead of one number;
            ``per_image[name][i]`` then holds those values (NaN for None) and ``per_reward`` the mean of the
            values that apply. Without it, a list is an error.

    Returns:
        total: (N,) float32, ``sum_r weight_r * reward_r`` over the rewards that apply to the sample. A
            reward returning None does not apply and adds nothing; a sample no reward applies to gets 0.0
            rather than NaN, so one such sample cannot poison the group's advantages. Its row of
            ``per_reward`` is all NaN, which is how a caller can spot (and log) it.
        per_reward: (N, R) float32, each reward's raw (unweighted) value, NaN where it returned None.

    Raises:
        RewardError: naming the reward when it raises (chained), times out, returns a list of the wrong
            length, or returns NaN, inf or a non-number (naming the sample index too); before any reward
            runs, when one cannot take the call (no ``**kwargs``), needs a missing column or
            ``completion_ids``, or the lists' lengths disagree.
    """
    n = len(prompts)
    chains = None if images is None else chain_images(images, n)
    _check_batch(n, completions, chains, columns, completion_ids)
    if weights is None:
        weights = [float(getattr(r, "weight", 1.0)) for r in rewards]
    if len(weights) != len(rewards):
        raise RewardError(f"got {len(weights)} weights for {len(rewards)} rewards")
    for reward, w in zip(rewards, weights):
        if not math.isfinite(w):
            raise RewardError(f"reward {reward_name(reward)!r} has weight {w}; weights must be finite")
    for reward in rewards:
        check_columns(reward, columns)
        _check_call(reward, columns, completion_ids)
    batch = Batch(list(prompts), list(completions), None if completion_ids is None else list(completion_ids),
                  chains if chains is not None else chain_images(None, n), dict(columns))
    per_reward = torch.full((n, len(rewards)), float("nan"), dtype=torch.float32)
    if seconds is not None:
        rewards = [_Timed(reward, seconds) for reward in rewards]
    if parallel and len(rewards) > 1:
        # All start now, so each one's time limit counts from now (not from when the one before it finished).
        deadline = None if timeout is None else time.monotonic() + timeout
        started = [_start(reward, reward_name(reward), batch.inputs(reward)) for reward in rewards]
        outcomes = [lambda f=future, r=reward: _wait(f, reward_name(r), timeout, n, deadline)
                    for future, reward in zip(started, rewards)]
    else:
        outcomes = [lambda r=reward: _call(r, reward_name(r), timeout, batch) for reward in rewards]
    for j, (reward, outcome) in enumerate(zip(rewards, outcomes)):
        name = reward_name(reward)
        counts = None if per_image is None else [len(chain) for chain in batch.images]
        values, lists = _validate(_named_errors(outcome, name), name, n, counts)
        per_reward[:, j] = torch.tensor(values, dtype=torch.float32)
        if per_image is not None and lists:
            per_image[name] = lists
    weighted = per_reward * torch.tensor([float(w) for w in weights], dtype=torch.float32)
    return torch.nansum(weighted, dim=1), per_reward


def _check_batch(n: int, completions: list[str], images: list[list[Any]] | None,
                 columns: Mapping[str, list[Any]], completion_ids: Sequence[Any] | None) -> None:
    clash = sorted(set(columns) & set(INPUTS))
    if clash:
        raise RewardError(f"data column(s) {clash} take the name of a reward input {list(INPUTS)}; rename them")
    lengths = {"completions": len(completions)}
    if images is not None:
        lengths["images"] = len(images)
    if completion_ids is not None:
        lengths["completion_ids"] = len(completion_ids)
    lengths.update({f"column {k!r}": len(v) for k, v in columns.items()})
    wrong = [f"{k} has {v}" for k, v in lengths.items() if v != n]
    if wrong:
        raise RewardError(f"batch has {n} prompts but {', '.join(wrong)}; every list needs one entry per sample")


def _check_call(reward: Any, columns: Mapping[str, Any], completion_ids: Sequence[Any] | None) -> None:
    """Fail before calling a reward that cannot take the call (no ``**kwargs``) or needs what is missing."""
    name, fn = reward_name(reward), unwrap(reward)
    refused = refused_keywords(fn, [*INPUTS, *columns])
    if refused:
        raise RewardError(
            f"reward {name!r} cannot be called with {refused}: rewards are called with keywords prompts=, "
            f"completions=, completion_ids=, images= and every data column, as TRL's GRPOTrainer calls them; "
            f"add **kwargs to its signature"
        )
    if completion_ids is None and reads(fn, "completion_ids"):
        raise RewardError(f"reward {name!r} needs completion_ids, but the caller passed none (completion_ids=None)")


class _Timed:
    """A reward that adds its wall-clock seconds per call to ``seconds[name]`` (also when it raises), timed where
    it runs: in its own thread under ``parallel``. It keeps the reward's name and conversational form."""

    def __init__(self, reward: Any, seconds: dict[str, float]) -> None:
        self.reward, self.seconds = reward, seconds
        self.name = reward_name(reward)
        conversational = getattr(reward, "conversational", None)
        self.conversational = conversational if isinstance(conversational, bool) else takes_messages(reward)

    def __call__(self, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.reward(**kwargs)
        finally:
            self.seconds[self.name] = self.seconds.get(self.name, 0.0) + time.perf_counter() - start


class Batch:
    """The inputs of one combine call, handed to each reward as fresh copies."""

    def __init__(self, prompts: list[Any], completions: list[Any], completion_ids: list[Any] | None,
                 images: list[list[Any]], columns: dict[str, list[Any]]) -> None:
        self.prompts, self.completions, self.completion_ids = prompts, completions, completion_ids
        self.images, self.columns = images, columns

    def inputs(self, reward: Any) -> dict[str, Any]:
        """The keywords for ``reward``: copies, so that a reward editing its inputs in place cannot change
        what another reward sees; text as message lists for a reward that takes TRL's conversational form."""
        conversational = getattr(reward, "conversational", None)
        if not isinstance(conversational, bool):
            conversational = takes_messages(reward)
        prompts, completions = list(self.prompts), list(self.completions)
        if conversational:
            prompts, completions = as_messages(prompts, "user"), as_messages(completions, "assistant")
        return {
            "prompts": prompts,
            "completions": completions,
            "completion_ids": None if self.completion_ids is None else [list(ids) for ids in self.completion_ids],
            "images": [list(chain) for chain in self.images],
            **{k: list(v) for k, v in self.columns.items()},
        }


def _call(reward: Callable[..., Any], name: str, timeout: float | None, batch: Batch) -> Any:
    kwargs = batch.inputs(reward)
    if timeout is None:
        return reward(**kwargs)
    deadline = time.monotonic() + timeout
    return _wait(_start(reward, name, kwargs), name, timeout, len(batch.prompts), deadline)


def _named_errors(outcome: Callable[[], Any], name: str) -> Any:
    """``outcome()``, with any exception but a RewardError turned into one that names the reward."""
    try:
        return outcome()
    except RewardError:
        raise
    except Exception as e:
        raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e


def _start(reward: Callable[..., Any], name: str, kwargs: dict[str, Any]) -> concurrent.futures.Future[Any]:
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
            future.set_result(reward(**kwargs))
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


def _validate(values: Any, name: str, n: int,
              image_counts: Sequence[int] | None = None) -> tuple[list[float], dict[int, list[float]]]:
    """The reward's values as floats (NaN for None), or a RewardError saying what is wrong and where. With
    ``image_counts`` (images per sample), a sample's value may be a list of one value per image: returned too,
    by sample index, its mean (of the values that apply) standing for the sample."""
    if isinstance(values, torch.Tensor) and values.dim() == 1:  # accepted for convenience; NaN/inf still fail
        values = values.tolist()
    if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward {name!r} returned {type(values).__name__}; expected a list of {n} floats or None")
    if len(values) != n:
        raise RewardError(f"reward {name!r} returned {len(values)} values; expected {n} (one per sample)")
    out, lists = [], {}
    for i, v in enumerate(values):
        if isinstance(v, (list, tuple)) and image_counts is not None:
            if len(v) != image_counts[i]:
                raise RewardError(f"reward {name!r} returned {len(v)} values for sample {i}, whose chain drew "
                                  f"{image_counts[i]} image(s); return one per image, or one number for the chain")
            lists[i] = [_number(e, name, i, f" (image {k})") for k, e in enumerate(v)]
            real = [e for e in lists[i] if not math.isnan(e)]
            out.append(sum(real) / len(real) if real else float("nan"))
            continue
        out.append(_number(v, name, i))
    return out, lists


def _number(v: Any, name: str, i: int, where: str = "") -> float:
    """One returned value as a float (NaN for None), or the RewardError naming the reward and the sample."""
    if v is None:
        return float("nan")
    if not isinstance(v, numbers.Real):
        hint = ("; a list per sample (one value per image) is read only for chains that draw several images"
                if isinstance(v, (list, tuple)) else "")
        raise RewardError(
            f"reward {name!r} returned {type(v).__name__} {v!r:.60} for sample {i}{where}; expected a float or None"
            f"{hint}"
        )
    v = float(v)
    if not math.isfinite(v):
        raise RewardError(
            f"reward {name!r} returned {v} for sample {i}{where}; return None for a sample the reward does not "
            f"apply to"
        )
    return v
