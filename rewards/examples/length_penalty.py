"""A user-written reward: shape the length of the reasoning chain.

Reasoning that is too short skips the thinking the image depends on; reasoning that rambles costs tokens and
drifts. This reward is 1.0 while the ``<think>`` block has between ``min_words`` and ``max_words`` words,
rises linearly from 0 below that, and falls linearly to 0 at ``2 * max_words`` above it. A completion with no
``<think>...</think>`` block gets None: the format reward already punishes that, and scoring it here too
would count the same mistake twice.

Reference it from a run config by file path (relative to the working directory), with its keyword arguments::

    rewards:
      functions:
        - {name: format, weight: 1.0}
        - {name: "rewards/examples/length_penalty.py:length_reward", weight: 0.1, kwargs: {max_words: 200}}

or, since ``rewards`` is an installed package, by dotted path: ``rewards.examples.length_penalty:length_reward``
(or ``rewards.examples.length_penalty.length_reward``, as TRL's CLI writes it).

Like every reward it is called with keywords (``prompts=``, ``completions=``, ``completion_ids=``, ``images=``
and each data column), and takes ``**kwargs`` for the ones it does not read: the shape of TRL's reward
functions, so it runs unchanged in TRL's ``GRPOTrainer`` too.
"""

from __future__ import annotations

import re
from typing import Any

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def length_reward(completions: list[str], min_words: int = 20, max_words: int = 300, **kwargs: Any) -> list[float | None]:
    """Per completion: 1.0 inside ``[min_words, max_words]`` words of reasoning, less outside, None without ``<think>``."""
    if not 0 < min_words <= max_words:
        raise ValueError(f"need 0 < min_words <= max_words, got min_words={min_words}, max_words={max_words}")
    scores: list[float | None] = []
    for completion in completions:
        match = _THINK.search(completion)
        if match is None:
            scores.append(None)
            continue
        words = len(match.group(1).split())
        if words < min_words:
            scores.append(words / min_words)
        elif words <= max_words:
            scores.append(1.0)
        else:
            scores.append(max(0.0, 1.0 - (words - max_words) / max_words))
    return scores
