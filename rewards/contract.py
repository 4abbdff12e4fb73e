"""The reward call contract (TRL's), and helpers that read a reward's signature.

Every reward is called with keywords only, as TRL's ``GRPOTrainer`` calls its reward functions::

    reward(prompts=[...], completions=[...], completion_ids=[[...], ...] | None, images=[[img, ...], ...],
           **columns)

``images`` holds one list of PIL images per chain (0, 1 or several), ``completion_ids`` one list of token ids
per chain (None when the caller has none), and ``columns`` every other data column as a list aligned with the
samples. A reward returns one float per sample, None where it does not apply, and takes ``**kwargs`` for the
inputs it does not read. A reward that declares ``completion_ids`` without a default (TRL's token-level
rewards) is taken to need them: :func:`rgpo.rewards.combine` refuses to call it with None.

A reward whose ``completions`` parameter is annotated as TRL's conversational form
(``list[list[dict[str, str]]]``, as ``trl.rewards.think_format_reward`` is), or that sets
``conversational = True``, gets text prompts and completions as single-message lists
(``[{"role": "assistant", "content": text}]``), which is what TRL gives it for a conversational dataset.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["INPUTS", "as_messages", "chain_images", "reads", "refused_keywords", "signature_of", "takes_messages"]

INPUTS: tuple[str, ...] = ("prompts", "completions", "completion_ids", "images")
"""The keywords every reward is called with besides the data columns (so no column may take these names)."""

_MESSAGES = re.compile(r"^\s*(list|List)\[\s*(list|List)\[\s*(dict|Dict)")


def chain_images(images: Sequence[Any] | None, n: int) -> list[list[Any]]:
    """``images`` as one list of images per chain: a chain's entry that is a single image becomes ``[image]``
    and None becomes ``[]`` (callers that draw one image per chain pass them flat); None: no images at all."""
    if images is None:
        return [[] for _ in range(n)]
    out = []
    for entry in images:
        if entry is None:
            out.append([])
        elif isinstance(entry, (list, tuple)):
            out.append([image for image in entry if image is not None])
        else:
            out.append([entry])
    return out


def signature_of(fn: Any) -> inspect.Signature | None:
    """The call signature of a reward (a function, ``functools.partial`` or object with ``__call__``; unwrap a
    :class:`rgpo.rewards.Reward` first); None when Python cannot tell (some builtins)."""
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def reads(fn: Any, name: str) -> bool:
    """Whether the reward names ``name`` as a parameter with no default (so it cannot run without it)."""
    sig = signature_of(fn)
    if sig is None or name not in sig.parameters:
        return False
    param = sig.parameters[name]
    return param.default is inspect.Parameter.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)


def takes_messages(fn: Any) -> bool:
    """Whether the reward wants TRL's conversational completions (lists of message dicts) rather than text:
    its own ``conversational`` attribute when it sets one, else its ``completions`` annotation."""
    while True:
        declared = getattr(fn, "conversational", None)
        if isinstance(declared, bool):
            return declared
        inner = getattr(fn, "fn", None) or (fn.func if isinstance(fn, functools.partial) else None)
        if inner is None:
            break
        fn = inner
    sig = signature_of(fn)
    if sig is None or "completions" not in sig.parameters:
        return False
    annotation = sig.parameters["completions"].annotation
    if annotation is inspect.Parameter.empty:
        return False
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return bool(_MESSAGES.match(text))


def as_messages(texts: Sequence[Any], role: str) -> list[Any]:
    """Each text as a one-message conversation ``[{"role": role, "content": text}]``; entries that are already
    message lists are kept."""
    return [[{"role": role, "content": t}] if isinstance(t, str) else t for t in texts]


def refused_keywords(fn: Callable[..., Any], keywords: Sequence[str]) -> list[str]:
    """The ``keywords`` the reward cannot be called with (it has no ``**kwargs`` and no parameter of that
    name); [] when it takes them all or its signature is unknown."""
    sig = signature_of(fn)
    if sig is None or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return []
    named = {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [k for k in keywords if k not in named]
