"""Format rewards: did the model reason in ``<think>...</think>`` and then answer in ``<answer>...</answer>``?"""

from __future__ import annotations

import re
from typing import Any

from .registry import register_reward

__all__ = ["completion_text", "extract_answer", "format_reward", "format_strict_reward"]

# MindOmni's format check, kept exactly: any text may come before, between and after the two blocks.
_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"


@register_reward("format")
def format_reward(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    """1.0 where the completion contains a ``<think>`` block followed by an ``<answer>`` block, else 0.0.

    Called with keywords like every reward (``format_reward(prompts=..., completions=..., images=..., ...)``);
    other inputs are ignored.
    """
    return [1.0 if _FORMAT.search(completion_text(c)) else 0.0 for c in completions]


@register_reward("format_strict")
def format_strict_reward(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    """1.0 where the whole completion (stripped) is a ``<think>`` block then an ``<answer>`` block, else 0.0.

    Unlike :func:`format_reward`, text before the ``<think>`` or after the ``</answer>`` scores 0.
    """
    return [1.0 if _FORMAT.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]


def completion_text(completion: Any) -> str:
    """The text of a completion given as text or as TRL's message list (the last message's content)."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def extract_answer(text: str) -> str | None:
    """The stripped text inside the first ``<answer>...</answer>``.

    If ``<answer>`` is opened but never closed (a chain cut by the token limit), the text after it;
    None when there is no ``<answer>`` tag at all.
    """
    start = text.find(_ANSWER_OPEN)
    if start < 0:
        return None
    start += len(_ANSWER_OPEN)
    end = text.find(_ANSWER_CLOSE, start)
    return (text[start:] if end < 0 else text[start:end]).strip()
