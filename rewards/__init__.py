"""Reward functions for RGPO.

A reward is a callable ``fn(prompts, completions, images, **columns) -> list[float | None]`` returning one
value per sample, None where it does not apply. ``columns`` are the other fields of each sample's data row
as lists aligned with the samples (e.g. ``gt_prompt=[...]``); rewards ignore columns they do not use.

>>> r = get_reward("format")
>>> r(["p"], ["<think>x</think><answer>y</answer>"], [None])
[1.0]
"""

from .clip import ClipConsistencyReward, build_tiny_clip, tiny_clip_config, train_tiny_clip
from .combine import check_columns, combine
from .format import extract_answer, format_reward, format_strict_reward
from .registry import REGISTRY, Reward, RewardError, get_reward, register_reward

__all__ = [
    "REGISTRY",
    "ClipConsistencyReward",
    "Reward",
    "RewardError",
    "build_tiny_clip",
    "check_columns",
    "combine",
    "extract_answer",
    "format_reward",
    "format_strict_reward",
    "get_reward",
    "register_reward",
    "tiny_clip_config",
    "train_tiny_clip",
]
