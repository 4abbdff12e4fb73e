"""Scoring a batch of chains with the run's rewards (TRL's keyword contract; images as a list per chain)."""

from __future__ import annotations

import torch

from rgpo import rewards as reward_lib
from rgpo.config import RewardsConfig
from rgpo.data import PromptRow


def score_samples(rewards: list, rows: list[PromptRow], texts: list[str], images: list[list], cfg: RewardsConfig,
                  device: torch.device, completion_ids: list[list[int]] | None = None,
                  seconds: dict[str, float] | None = None,
                  per_image: dict[str, dict[int, list[float]]] | None = None) -> torch.Tensor:
    """(n, R) every reward's raw value per sample (NaN where one does not apply), on ``device``. ``images`` holds
    one list of PIL images per sample (empty when none was drawn); ``completion_ids`` the chains' token ids; the
    rows' data columns are passed to the rewards as keywords (TRL's contract). ``seconds``: each reward's
    wall-clock time is added to ``seconds[name]``; ``per_image`` receives the rewards' per-image values, where a
    reward returns a list per chain (see :func:`rgpo.rewards.combine`)."""
    columns: dict[str, list] = {}
    for key in set().union(*(row.columns for row in rows)):
        columns[key] = [row.columns.get(key) for row in rows]
    _, per_reward = reward_lib.combine(rewards, [r.weight for r in rewards], [row.prompt for row in rows], texts,
                                       images, columns, timeout=cfg.timeout_s, parallel=cfg.parallel,
                                       completion_ids=completion_ids, seconds=seconds, per_image=per_image)
    return per_reward.to(device, torch.float32)


def completion_id_lists(completions) -> list[list[int]]:
    """Each chain's sampled token ids (through its EOS, no padding), as TRL hands ``completion_ids`` to rewards."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(completions.completion_ids, completions.completion_mask)]
