"""Scoring a batch of chains with the run's rewards (TRL's keyword contract; images as a list per chain)."""

from __future__ import annotations

import torch

import rewards as reward_lib
from rgpo.config import RewardsConfig
from rgpo.data import PromptRow


def score_samples(rewards: list, rows: list[PromptRow], texts: list[str], images: list[list], cfg: RewardsConfig,
                  device: torch.device) -> torch.Tensor:
    """(n, R) every reward's raw value per sample (NaN where one does not apply), on ``device``. ``images`` holds
    one list of PIL images per sample (empty when none was drawn); the rows' data columns are passed to the
    rewards as keywords."""
    columns: dict[str, list] = {}
    for key in set().union(*(row.columns for row in rows)):
        columns[key] = [row.columns.get(key) for row in rows]
    _, per_reward = reward_lib.combine(rewards, [r.weight for r in rewards], [row.prompt for row in rows], texts,
                                       images, columns, timeout=cfg.timeout_s, parallel=cfg.parallel)
    return per_reward.to(device, torch.float32)
