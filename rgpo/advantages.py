"""Group-relative advantages over every rank's chains, and the "dapo" loss normaliser: collective functions."""

from __future__ import annotations

import torch

from rgpo import distributed as dist_utils
from rgpo.losses import group_advantages


def global_advantages(per_reward: torch.Tensor, weights: list[float], global_indices: list[int], group_size: int,
                      scale: str = "group", eps: float = 1e-4):
    """Advantages of this rank's chains, normalised over whole groups even when a group spans ranks.

    Args:
        per_reward: (n, R) this rank's rewards, NaN where a reward does not apply.
        global_indices: each local chain's index in the step's global batch (groups are contiguous there).
    Returns:
        ``(local_advantages (n,), all_rewards (N, R), totals (N,))``: every rank's rewards are gathered
        before the group statistics, so the result does not depend on how chains are placed on ranks.
    """
    all_rewards = dist_utils.all_gather_cat(per_reward)
    order = dist_utils.all_gather_cat(torch.tensor(global_indices, device=per_reward.device))
    ordered = torch.empty_like(all_rewards)
    ordered[order] = all_rewards  # rank order -> global order (identical for the contiguous layout)
    weight = torch.tensor(weights, device=per_reward.device, dtype=per_reward.dtype)
    # A reward that does not apply (NaN) counts as 0 in the total; its own mean ignores it.
    totals = torch.nansum(ordered * weight, dim=1)
    advantages = group_advantages(totals, group_size, scale, eps)
    local = advantages[torch.tensor(global_indices, device=per_reward.device)]
    return local, ordered, totals


def dapo_token_normalizer(completion_mask: torch.Tensor, micro_batches: int) -> torch.Tensor:
    """The "dapo" divisor of a micro-batch's summed token loss: the completion tokens of the whole batch (every
    rank's ``completion_mask`` summed) over the micro-batch losses that DeepSpeed averages (ranks x the
    ``micro_batches`` of each rank), so the update is the global token mean however the chains are spread.
    Collective: every rank calls it."""
    tokens = dist_utils.all_gather_cat(completion_mask.sum().float()[None]).sum()
    return tokens.clamp(min=1.0) / (dist_utils.world_size() * micro_batches)
