"""The RGPO math: pure functions of tensors, no state, no config objects, no logging.

Everything the trainer optimises is computed here, so each function is small enough to check by hand
(see ``tests/test_losses.py``). Shapes: ``B`` sequences, ``T`` completion tokens, ``G`` group size.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

AGGREGATIONS = ("grpo", "bnpo", "dapo", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages ``(r_i - mean_group) / (std + eps)``.

    Args:
        rewards: (N,) ordered group by group (``N`` a multiple of ``group_size``).
        group_size: G, the number of chains sampled per prompt.
        scale: "group" divides by the group's unbiased std (MindOmni, original GRPO); "batch" by the unbiased
            std of the whole batch (more robust when many groups are near-constant); "none" only centres
            (Dr. GRPO).
        eps: added to the std so a constant group gives 0, never NaN.

    Returns:
        (N,) advantages, float32.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale={scale!r} is not one of {ADVANTAGE_SCALES}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be (N,) with N a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    rewards = rewards.float()
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        # A group of one has no spread: treat its std as 0 (advantage 0) instead of NaN.
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        std = std.expand_as(grouped).reshape(-1)
    else:
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return centred / (std + eps)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    With ``d = ref_logp - logp``: k1 = ``-d``, k2 = ``d**2 / 2``, k3 = ``exp(d) - d - 1`` (unbiased and >= 0;
    Schulman's estimator, used by GRPO and MindOmni).

    Args:
        logp, ref_logp: (B, T) log-probs of the sampled tokens under policy and reference.
    Returns:
        (B, T) per-token estimate.
    """
    diff = ref_logp - logp
    if estimator == "k1":
        return -diff
    if estimator == "k2":
        return 0.5 * diff.pow(2)
    if estimator == "k3":
        return torch.exp(diff) - diff - 1.0
    raise ValueError(f"kl estimator {estimator!r} is not one of {KL_ESTIMATORS}")


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "grpo",
    *,
    max_length: int | None = None,
    token_normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    - "grpo": mean over each sequence's tokens, then over sequences (MindOmni, original GRPO). Long and short
      chains weigh the same, so a token of a long chain counts less.
    - "bnpo": mean over every unmasked token of this batch. Averaging the losses of several micro-batches
      equals the whole-batch value only when they hold equal token counts.
    - "dapo": sum over tokens / ``token_normalizer`` (default: this batch's token count, as "bnpo"). With the
      whole batch's token count (all ranks) divided by the number of micro-batch losses that get averaged
      (ranks x accumulation steps), the average is the global token mean (DAPO, TRL), whatever the layout.
    - "dr_grpo": sum over tokens / (B * ``max_length``) (Dr. GRPO: no length bias). Pass the generation limit
      (``rollout.max_new_tokens``), a constant; the default T, this batch's padded length, varies with the
      longest chain of each micro-batch and rank.
    """
    mask = mask.to(per_token.dtype)
    if aggregation == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if aggregation == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if aggregation == "dapo":
        normalizer = mask.sum().clamp(min=1.0) if token_normalizer is None else token_normalizer
        return (per_token * mask).sum() / normalizer
    if aggregation == "dr_grpo":
        length = per_token.shape[1] if max_length is None else max_length
        if length < per_token.shape[1]:
            raise ValueError(f"max_length {length} is shorter than the completions' {per_token.shape[1]} tokens")
        return (per_token * mask).sum() / (per_token.shape[0] * length)
    raise ValueError(f"aggregation {aggregation!r} is not one of {AGGREGATIONS}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.01,
    kl_estimator: str = "k3",
    aggregation: str = "grpo",
    max_length: int | None = None,
    token_normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss with a per-token KL penalty (GRPO / RGPO text loss).

    Per token: ``-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A) + beta*KL`` with ``r = exp(logp - old_logp)``.

    Args:
        logp: (B, T) policy log-probs of the sampled tokens (with grad).
        old_logp: (B, T) log-probs under the policy that sampled them (no grad). With one update per batch pass
            ``logp.detach()``: the ratio is then exactly 1 and the gradient is the plain policy gradient.
        ref_logp: (B, T) reference log-probs, or None when ``beta == 0``.
        advantages: (B,) one advantage per sequence.
        mask: (B, T) 1 for completion tokens up to and including EOS.
        max_length, token_normalizer: the "dr_grpo" and "dapo" divisors (:func:`aggregate`).

    Returns:
        ``(loss, metrics)``; metrics (detached scalars): ``kl`` (masked mean), ``ratio`` (masked mean),
        ``clip_ratio/low`` (fraction of tokens with A < 0 and r < 1 - eps_low, whose gradient the clip stops),
        ``clip_ratio/high`` (A > 0 and r > 1 + eps_high), ``clip_ratio/region`` (either), ``pg_loss``.
    """
    if ref_logp is None and beta != 0.0:
        raise ValueError("ref_logp is None but beta != 0: the KL term needs reference log-probs")
    advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    pg_per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    per_token = pg_per_token
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        if beta != 0.0:
            per_token = per_token + beta * kl
    divisors = {"max_length": max_length, "token_normalizer": token_normalizer}
    loss = aggregate(per_token, mask, aggregation, **divisors)

    with torch.no_grad():
        low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
        high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
        metrics = {
            "pg_loss": aggregate(pg_per_token.detach(), mask, aggregation, **divisors),
            "ratio": masked_mean(ratio, mask),
            "clip_ratio/low": masked_mean(low.float(), mask),
            "clip_ratio/high": masked_mean(high.float(), mask),
            "clip_ratio/region": masked_mean((low | high).float(), mask),
            "kl": masked_mean(kl, mask) if kl is not None else logp.new_zeros(()),
        }
    return loss, metrics


def feature_kl(policy_features: torch.Tensor, ref_features: torch.Tensor, tau: float = 3.0) -> torch.Tensor:
    """MindOmni's layer-wise decoder-feature distillation, D_IKL.

    Each token's feature vector is standardised over channels (``(h - mean) / (std + 1e-7)``), turned into a
    distribution over channels by a softmax at temperature ``tau``, and ``KL(ref || policy)`` is summed over
    tokens and channels, then averaged over layers.

    Args:
        policy_features, ref_features: (B, layers, tokens, channels).
        tau: softmax temperature.
    Returns:
        (B,) per-sample KL. Exactly 0 where the inputs are equal.
    """
    if policy_features.shape != ref_features.shape:
        raise ValueError(f"feature shapes differ: {tuple(policy_features.shape)} vs {tuple(ref_features.shape)}")
    # One layer at a time, recomputed in the backward: the float32 intermediates of all 33 layers at once (about
    # seven copies of the features) would be the largest allocation of a 7B step (~11 GiB at 4 x 1024 tokens).
    recompute = torch.is_grad_enabled() and (policy_features.requires_grad or ref_features.requires_grad)
    # (unbind, not indexing: its backward stacks the layers' gradients once instead of a full-size zero tensor each)
    per_layer = [
        checkpoint(_layer_feature_kl, pol, ref, tau, use_reentrant=False) if recompute
        else _layer_feature_kl(pol, ref, tau)
        for pol, ref in zip(policy_features.unbind(1), ref_features.unbind(1))
    ]
    return torch.stack(per_layer, 1).mean(1)


def _layer_feature_kl(policy: torch.Tensor, ref: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, tokens, channels) features of one layer -> (B,) KL(ref || policy) summed over tokens."""
    log_p = torch.log_softmax(_standardise(policy.float()) / tau, dim=-1)
    log_q = torch.log_softmax(_standardise(ref.float()) / tau, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).sum(-1)


def _standardise(h: torch.Tensor) -> torch.Tensor:
    # Unbiased std, as torch.std defaults to (and as MindOmni computes it).
    return (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-7)


def velocity_mse(policy_velocity: torch.Tensor, ref_velocity: torch.Tensor) -> torch.Tensor:
    """Velocity-matching regulariser (DiffusionNFT / UniGRPO): mean squared difference per sample.

    Args:
        policy_velocity, ref_velocity: (B, ...) decoder velocity predictions at the same inputs.
    Returns:
        (B,) mean over all non-batch dimensions.
    """
    if policy_velocity.shape != ref_velocity.shape:
        raise ValueError(f"velocity shapes differ: {tuple(policy_velocity.shape)} vs {tuple(ref_velocity.shape)}")
    return (policy_velocity.float() - ref_velocity.float()).pow(2).flatten(1).mean(-1)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_size: int = 4) -> torch.Tensor:
    """``log_softmax(logits).gather(-1, index)`` without holding a full log-softmax for the whole batch.

    Args:
        logits: (B, T, V); index: (B, T). Computed ``chunk_size`` rows at a time, in float32.
    Returns:
        (B, T) float32.
    """
    out = []
    for rows_logits, rows_index in zip(logits.split(chunk_size), index.split(chunk_size)):
        rows_logits = rows_logits.float()
        picked = rows_logits.gather(-1, rows_index.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(rows_logits, dim=-1))
    return torch.cat(out)
