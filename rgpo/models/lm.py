"""Pieces every family's language model shares: drawing a token from logits, the log-prob and entropy of given
targets, and casting a module's floating tensors. Kept here so that no family imports another's."""

from __future__ import annotations

import torch
from torch import nn


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                  generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from float32 logits (B, V): temperature, then top-k, then top-p (nucleus); temperature 0
    is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) = logit[target] - logsumexp(logits) (n,), and the entropy of the whole distribution (n,),
    detached (a diagnostic), from float32 logits (n, V) and targets (n,)."""
    lse = logits.logsumexp(-1)
    with torch.no_grad():
        entropy = lse - (logits.softmax(-1) * logits).sum(-1)
    return logits.gather(-1, targets[:, None])[:, 0] - lse, entropy


def cast_floating(module: nn.Module, dtype: torch.dtype, buffers: bool = False) -> None:
    """Cast floating parameters (and buffers when asked) in place. Language models keep their buffers (rotary
    inverse frequencies) in float32, as transformers' own loading does."""
    tensors = list(module.parameters()) + (list(module.buffers()) if buffers else [])
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)
