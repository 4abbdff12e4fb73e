"""Reward functions for RGPO.

A reward is called as TRL's ``GRPOTrainer`` calls one: with keywords only, ``prompts=``, ``completions=``,
``completion_ids=`` (token ids per chain, or None), ``images=`` (one list of images per chain) and every other
data column as a list aligned with the samples (e.g. ``gt_prompt=[...]``); it returns one value per sample,
None where it does not apply, and takes ``**kwargs`` for what it does not read (see :mod:`rgpo.rewards.contract`).
TRL's own reward functions (``trl.rewards.think_format_reward``, ...) therefore plug in unchanged.

>>> r = get_reward("format")
>>> r(prompts=["p"], completions=["<think>x</think><answer>y</answer>"], completion_ids=None, images=[[]])
[1.0]

A run resolves its rewards with :func:`get_rewards` (unique names) and scores a batch with :func:`combine`.
Rewards can be served over HTTP (:mod:`rgpo.rewards.server`) and used from a run as the ``remote`` reward, or
run in another Python (``python:`` in the spec; :mod:`rgpo.rewards.isolated`).

Registered image rewards, each from local weights and loaded once per process: ``clip_consistency``,
``pickscore``, ``hpsv2``, ``aesthetic`` (:mod:`rgpo.rewards.preference`), ``ocr`` (:mod:`rgpo.rewards.ocr`) and
``vlm_judge`` (:mod:`rgpo.rewards.judge`).
"""

from .clip import ClipConsistencyReward, build_tiny_clip, tiny_clip_config, train_tiny_clip
from .combine import check_columns, combine
from .contract import INPUTS, chain_images
from .format import extract_answer, format_reward, format_strict_reward
from .isolated import IsolatedReward
from .judge import VLMJudgeReward
from .ocr import OCRReward
from .preference import AestheticReward, HPSv2Reward, PickScoreReward
from .registry import (
    REGISTRY,
    Reward,
    RewardError,
    get_reward,
    get_rewards,
    register_reward,
    unique_names,
)
from .remote import RemoteReward

__all__ = [
    "INPUTS",
    "REGISTRY",
    "AestheticReward",
    "ClipConsistencyReward",
    "HPSv2Reward",
    "IsolatedReward",
    "OCRReward",
    "PickScoreReward",
    "RemoteReward",
    "Reward",
    "RewardError",
    "VLMJudgeReward",
    "build_tiny_clip",
    "chain_images",
    "check_columns",
    "combine",
    "extract_answer",
    "format_reward",
    "format_strict_reward",
    "get_reward",
    "get_rewards",
    "register_reward",
    "tiny_clip_config",
    "train_tiny_clip",
    "unique_names",
]
