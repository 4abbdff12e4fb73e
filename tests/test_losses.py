"""The RGPO math against numbers worked out by hand (the working is in the comments)."""

import math

import pytest
import torch

from rgpo.losses import (
    aggregate,
    feature_kl,
    group_advantages,
    kl_penalty,
    policy_loss,
    selective_log_softmax,
    velocity_mse,
)

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------- group_advantages
def test_group_advantages_group_scale_by_hand():
    # Group 1: [1,0,0,1], mean .5, unbiased std sqrt(1/3) = 0.57735 -> +-0.5 / (0.57735 + 1e-4) = +-0.865875.
    # Group 2: all equal -> exactly 0 (not NaN).
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    a = 0.8658754297607016
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))


def test_group_advantages_batch_and_none_scale_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # Batch: centred within groups, divided by the batch's unbiased std sqrt(5.5/7) = 0.886405.
    a = 0.5640124456324701
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale="batch"), torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    )
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale="none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0.0])
    )


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_never_nan(scale):
    for rewards in (torch.zeros(8), torch.ones(4), torch.tensor([3.0])):
        adv = group_advantages(rewards, group_size=rewards.numel() if rewards.numel() < 4 else 4, scale=scale)
        assert torch.isfinite(adv).all() and (adv == 0).all()


def test_group_advantages_rejects_bad_shapes_and_scale():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale='sum'"):
        group_advantages(torch.zeros(4), 4, scale="sum")


# ---------------------------------------------------------------------------------------------- kl_penalty
def test_kl_estimators_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = logp + torch.tensor([[LN2, 0.0]])  # d = ref - logp = [ln2, 0]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[-LN2, 0.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[LN2**2 / 2, 0.0]]))
    # k3 = e^d - d - 1 = 2 - ln2 - 1 = 0.306853
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([[0.3068528194400546, 0.0]]))
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


# ---------------------------------------------------------------------------------------------- policy_loss
def _two_sequences():
    """Seq 0: A=+1, ratios [1, 1.5, 0.5]. Seq 1: A=-1, ratios [0.5, 1.1, 1.0], its last token masked."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ratios = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.1, 1.0]])
    old = logp - ratios.log()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, old, adv, mask


# Per-token clipped terms, -min(r*A, clip(r, .8, 1.2)*A):
#   seq 0 (A=+1): r=1 -> -1;  r=1.5 clipped high -> -1.2;  r=.5 -> -min(.5, .8) = -.5
#   seq 1 (A=-1): r=.5 clipped low -> .8;  r=1.1 -> 1.1;  (masked)
@pytest.mark.parametrize(
    "aggregation, expected, divisors",
    [
        ("grpo", ((-1 - 1.2 - 0.5) / 3 + (0.8 + 1.1) / 2) / 2, {}),  # 0.025
        ("bnpo", (-2.7 + 1.9) / 5, {}),  # -0.16
        ("dapo", (-2.7 + 1.9) / 5, {}),  # without a normalizer: this batch's own count
        ("dr_grpo", (-2.7 + 1.9) / (2 * 3), {}),  # -0.13333: without a limit, the padded length
        ("dapo", -0.8 / 4, {"token_normalizer": 4.0}),  # -0.2: the global count / losses averaged, given
        ("dr_grpo", (-2.7 + 1.9) / (2 * 10), {"max_length": 10}),  # -0.04: the generation limit, given
    ],
)
def test_policy_loss_aggregations_by_hand(aggregation, expected, divisors):
    logp, old, adv, mask = _two_sequences()
    loss, metrics = policy_loss(logp, old, None, adv, mask, beta=0.0, aggregation=aggregation, **divisors)
    torch.testing.assert_close(loss, torch.tensor(expected))
    # One token of five clipped low (A<0, r<0.8), one clipped high (A>0, r>1.2).
    torch.testing.assert_close(metrics["clip_ratio/low"], torch.tensor(0.2))
    torch.testing.assert_close(metrics["clip_ratio/high"], torch.tensor(0.2))
    torch.testing.assert_close(metrics["clip_ratio/region"], torch.tensor(0.4))
    torch.testing.assert_close(metrics["ratio"], torch.tensor((1 + 1.5 + 0.5 + 0.5 + 1.1) / 5))


def test_policy_loss_kl_term_by_hand():
    logp, old, adv, mask = _two_sequences()
    ref = logp + torch.tensor([[0.0, LN2, 0.0], [0.0, 0.0, 0.0]])
    loss, metrics = policy_loss(logp, old, ref, adv, mask, beta=0.1, aggregation="grpo")
    # Seq 0 gains 0.1 * k3(ln2) / 3 = 0.0102284 -> ((-2.7 + 0.0306853) / 3 + 0.95) / 2 = 0.0301142
    torch.testing.assert_close(loss, torch.tensor(0.030114213657334188))
    torch.testing.assert_close(metrics["kl"], torch.tensor(0.3068528194400546 / 5))


def test_policy_loss_wider_high_clip():
    # With epsilon_high = 0.6, the ratio 1.5 of seq 0 is no longer clipped: its term becomes -1.5.
    logp, old, adv, mask = _two_sequences()
    loss, metrics = policy_loss(logp, old, None, adv, mask, beta=0.0, epsilon_high=0.6, aggregation="bnpo")
    torch.testing.assert_close(loss, torch.tensor((-1 - 1.5 - 0.5 + 1.9) / 5))
    assert metrics["clip_ratio/high"] == 0


def test_on_policy_ratio_is_one_and_gradient_is_plain_policy_gradient():
    # One update per batch: old = logp.detach(). Ratio exactly 1, loss = -mean_seq(A), and
    # d loss / d logp[i, t] = -A_i / (len_i * B) under "grpo".
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, metrics = policy_loss(logp, logp.detach(), logp.detach(), adv, mask, beta=0.04)
    assert metrics["ratio"].item() == 1.0 and metrics["kl"].item() == 0.0
    torch.testing.assert_close(loss, torch.tensor(-(2.0 - 1.0) / 2))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2 / 6, -2 / 6, -2 / 6], [1 / 2, 0.0, 0.0]]))


def test_masked_tokens_do_not_matter():
    logp, old, adv, mask = _two_sequences()
    loss_a, _ = policy_loss(logp, old, None, adv, mask, beta=0.0)
    logp_b = logp.clone()
    logp_b[1, 2] = -50.0  # a masked position: any value
    loss_b, _ = policy_loss(logp_b, old, None, adv, mask, beta=0.0)
    torch.testing.assert_close(loss_a, loss_b)


def test_beta_without_reference_is_an_error():
    logp, old, adv, mask = _two_sequences()
    with pytest.raises(ValueError, match="beta"):
        policy_loss(logp, old, None, adv, mask, beta=0.01)


@pytest.mark.parametrize("aggregation", ["bnpo", "grpo"])
def test_data_parallel_invariance(aggregation):
    """Two half-batches (two ranks) averaged equal the whole batch, where the mode promises it: "bnpo" when
    each half holds the same number of tokens, "grpo" when each half holds the same number of sequences."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 5, generator=g)
    old = logp + 0.1 * torch.randn(4, 5, generator=g)
    ref = logp + 0.1 * torch.randn(4, 5, generator=g)
    adv = torch.randn(4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])  # 7 + 7 tokens
    whole, _ = policy_loss(logp, old, ref, adv, mask, aggregation=aggregation)
    halves = [policy_loss(logp[s], old[s], ref[s], adv[s], mask[s], aggregation=aggregation)[0] for s in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(whole, (halves[0] + halves[1]) / 2)


def test_dapo_and_dr_grpo_do_not_depend_on_the_layout():
    """Eight chains of uneven lengths over 2 ranks x 2 micro-batches, each micro-batch trimmed to its own longest
    chain (as generation pads per rank): the average of the four micro-batch losses (what DeepSpeed's rank and
    accumulation averaging applies) is the whole batch's global token mean for "dapo" given the global count over
    the four losses, and the whole batch's Dr. GRPO value for "dr_grpo" given the generation limit; "bnpo" is not."""
    g = torch.Generator().manual_seed(1)
    lengths, limit = [1, 2, 6, 3, 8, 2, 2, 5], 8
    mask = (torch.arange(limit)[None] < torch.tensor(lengths)[:, None]).long()
    logp = -torch.rand(8, limit, generator=g)
    old = logp + 0.1 * torch.randn(8, limit, generator=g)
    adv = torch.randn(8, generator=g)
    per_token = -torch.min((logp - old).exp() * adv[:, None], (logp - old).exp().clamp(0.8, 1.2) * adv[:, None])
    global_mean = (per_token * mask).sum() / mask.sum()
    dr_grpo = (per_token * mask).sum() / (8 * limit)

    def micro_losses(aggregation, **divisors):
        losses = []
        for rows in ([0, 1], [2, 3], [4, 5], [6, 7]):
            t = max(lengths[r] for r in rows)
            losses.append(policy_loss(logp[rows, :t], old[rows, :t], None, adv[rows], mask[rows, :t], beta=0.0,
                                      aggregation=aggregation, **divisors)[0])
        return torch.stack(losses).mean()

    torch.testing.assert_close(micro_losses("dapo", token_normalizer=mask.sum() / 4), global_mean)
    torch.testing.assert_close(micro_losses("dr_grpo", max_length=limit), dr_grpo)
    assert not torch.allclose(micro_losses("bnpo"), global_mean)
    assert not torch.allclose(micro_losses("dr_grpo"), dr_grpo)  # the padded length varies per micro-batch
    with pytest.raises(ValueError, match="max_length"):
        aggregate(per_token, mask, "dr_grpo", max_length=4)


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="'sum'"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "sum")


# ---------------------------------------------------------------------------------------------- feature_kl
def test_feature_kl_by_hand():
    # Two channels: policy [0, 1], ref [1, 0]. Standardised: -+1/sqrt2 and +-1/sqrt2; logits /3 give
    # p = softmax([-x/2, x/2]), q = softmax([x/2, -x/2]) with x = 2/(3 sqrt2) = 0.4714. KL(q||p) = x tanh(x/2).
    pol = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    ref = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    torch.testing.assert_close(feature_kl(pol, ref), torch.tensor([0.1090982171156135]), rtol=1e-5, atol=1e-6)


def test_feature_kl_sums_tokens_and_averages_layers():
    base_p = torch.tensor([0.0, 1.0])
    base_q = torch.tensor([1.0, 0.0])
    one = 0.1090982171156135
    # Layer 0: two differing tokens (2 * one); layer 1: identical tokens (0). Mean over layers = one.
    pol = torch.stack([torch.stack([base_p, base_p]), torch.stack([base_p, base_p])]).unsqueeze(0)
    ref = torch.stack([torch.stack([base_q, base_q]), torch.stack([base_p, base_p])]).unsqueeze(0)
    torch.testing.assert_close(feature_kl(pol, ref), torch.tensor([one]), rtol=1e-5, atol=1e-6)


def test_feature_kl_layer_by_layer_equals_the_whole_tensor_formula_with_its_gradient():
    """Computed one layer at a time under recomputation, value and gradient equal the one-shot formula."""
    g = torch.Generator().manual_seed(5)
    pol = torch.randn(2, 4, 6, 16, generator=g, requires_grad=True)
    ref = torch.randn(2, 4, 6, 16, generator=g)

    def standardise(h):
        return (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-7)

    log_p = torch.log_softmax(standardise(pol) / 3.0, -1)
    log_q = torch.log_softmax(standardise(ref) / 3.0, -1)
    whole = (log_q.exp() * (log_q - log_p)).sum(-1).sum(-1).mean(-1)
    (whole_grad,) = torch.autograd.grad(whole.sum(), pol)
    ours = feature_kl(pol, ref)
    (ours_grad,) = torch.autograd.grad(ours.sum(), pol)
    torch.testing.assert_close(ours, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_grad, whole_grad, rtol=1e-6, atol=1e-8)


def test_feature_kl_zero_for_equal_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 4, 6, 16, generator=g)
    assert (feature_kl(h, h.clone()) == 0).all()
    other = h + 0.5 * torch.randn(3, 4, 6, 16, generator=g)
    assert (feature_kl(h, other) > 0).all()
    # Invariant to a per-token affine change of the features (the standardisation removes it).
    torch.testing.assert_close(feature_kl(3.0 * h + 2.0, h), torch.zeros(3), atol=1e-5, rtol=0)


def test_feature_kl_gradient_flows_to_policy_only():
    pol = torch.randn(1, 2, 3, 8, requires_grad=True)
    ref = torch.randn(1, 2, 3, 8, requires_grad=True)
    feature_kl(pol, ref.detach()).sum().backward()
    assert pol.grad is not None and pol.grad.abs().sum() > 0 and ref.grad is None


# ---------------------------------------------------------------------------------------------- velocity_mse
def test_velocity_mse_by_hand():
    pol = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    ref = torch.ones(2, 2)
    torch.testing.assert_close(velocity_mse(pol, ref), torch.tensor([0.5, 6.5]))


def test_selective_log_softmax_equals_plain_way():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, 11, generator=g)
    index = torch.randint(0, 11, (5, 7), generator=g)
    plain = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index, chunk_size=2), plain)
