"""Flow-GRPO's SDE sampler (rgpo.sde) and the SDE mode of MindOmni.sample_latents.

Time convention: t = 0 noise -> 1 data, x_t = t x1 + (1 - t) eps, v = x1 - eps, Euler x + dt v.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_models import random_condition
from torch.distributions import Normal, kl_divergence

from rgpo import sde
from rgpo.models import ImageSamplingConfig
from rgpo.models.mindomni import cat_left_padded, euler_grid
from rgpo.models.mindomni.omnigen import build_condition_cache, decoder_forward_cached, num_image_tokens
from rgpo.models.mindomni.tiny import build_tiny_mindomni

CFG = ImageSamplingConfig(height=64, width=64, steps=4, guidance_scale=3.0, seed=7)


def sde_cfg(**kwargs) -> ImageSamplingConfig:
    base = dict(height=64, width=64, steps=4, guidance_scale=3.0, seed=7, noise_level=0.7)
    return ImageSamplingConfig(**{**base, **kwargs})


def gaussian_velocity(m: float, s: float):
    """The exact velocity of the flow to data x1 ~ N(m, s^2) (per element): x_t ~ N(t m, var_t) with
    var_t = t^2 s^2 + (1 - t)^2 and v(x, t) = E[x1 - eps | x_t = x] = m + (t s^2 - (1 - t)) / var_t * (x - t m)."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        var_t = t * t * s * s + (1 - t) ** 2
        return m + (t * s * s - (1 - t)) / var_t * (x - t * m)

    return velocity


# -- one step ----------------------------------------------------------------------------------------------------


def test_hand_computed_step():
    # x = 1, v = 2, t = 0.25 -> 0.5, a = 0.5, z = 1:
    #   dt = 0.25, x - t v = 0.5, a^2 / (2 t) = 0.5
    #   mean = 1 + 0.25 * (2 - 0.5 * 0.5) = 1.4375
    #   std  = 0.5 * sqrt(0.75 * 0.25 / 0.25) = 0.5 * sqrt(0.75) = 0.4330127
    #   sample = 1.4375 + 0.4330127 = 1.8705127
    #   log_prob = -z^2 / 2 - log(std) - log(2 pi) / 2 = -0.5 + 0.8369882 - 0.9189385 = -0.5819503
    x, v, z = torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.tensor([[1.0]])
    step = sde.sde_step(x, v, 0.25, 0.5, 0.5, noise=z)
    assert step.mean.item() == pytest.approx(1.4375, abs=1e-7)
    assert step.std.item() == pytest.approx(0.4330127, abs=1e-7)
    assert step.sample.item() == pytest.approx(1.8705127, abs=1e-6)
    assert step.log_prob.shape == (1,)
    assert step.log_prob.item() == pytest.approx(-0.5819503, abs=1e-6)

    # The first step (t = 0): t~ = t_next = 0.25 (Flow-GRPO's clamp). x = 1, v = -1, a = 0.5:
    #   mean = 1 + 0.25 * (-1 - 0.25 / 0.5 * (1 - 0)) = 0.625,  std = 0.5 * sqrt(1 * 0.25 / 0.25) = 0.5
    mean, std = sde.sde_mean_std(x, -x, 0.0, 0.25, 0.5)
    assert mean.item() == pytest.approx(0.625, abs=1e-7) and std.item() == pytest.approx(0.5, abs=1e-7)


def test_matches_flow_grpo_in_their_time_convention():
    """Flow-GRPO's sde_step_with_logprob, written in their variables (s = 1 - t noise -> data, v' = -v,
    dt' = -dt, s == 1 clamped to the grid's second point), gives the same mean and std."""
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    grid = euler_grid(10)
    a = 0.7
    for i in (0, 3, 9):
        t, t_next = grid[i], grid[i + 1]
        sigma, sigma_prev, sigma_max = 1 - t, 1 - t_next, 1 - grid[1]
        dt = sigma_prev - sigma
        std_dev_t = a * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma)))
        their_v = -v
        their_mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + their_v * (
            1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)
        ) * dt
        mean, std = sde.sde_mean_std(x, v, t, t_next, a)
        torch.testing.assert_close(mean, their_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(std, std_dev_t * torch.sqrt(-dt), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("per_row_times", [False, True])
def test_log_prob_equals_torch_normal(per_row_times):
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    if per_row_times:
        t, t_next = torch.tensor([0.0, 0.3, 0.9]), torch.tensor([0.1, 0.4, 0.95])
    else:
        t, t_next = torch.tensor(0.3), torch.tensor(0.4)
    step = sde.sde_step(x, v, t, t_next, 0.7, generator=torch.Generator().manual_seed(2))
    expected = Normal(step.mean, step.std.expand_as(step.mean)).log_prob(step.sample).flatten(1).mean(1)
    assert step.log_prob.shape == (3,) and step.log_prob.dtype == torch.float32
    torch.testing.assert_close(step.log_prob, expected, atol=1e-5, rtol=1e-6)
    # the sample really is mean + std * z with z drawn from the generator
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(step.sample, step.mean + step.std * z)


def test_noise_level_zero_is_exactly_euler():
    gen = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    grid = euler_grid(7)
    for i in range(7):
        step = sde.sde_step(x, v, grid[i], grid[i + 1], 0.0)
        euler = x + (grid[i + 1] - grid[i]) * v
        assert torch.equal(step.sample, euler) and torch.equal(step.mean, euler)
        assert torch.equal(sde.euler_step(x, v, grid[i], grid[i + 1]), euler)
        assert torch.equal(step.log_prob, torch.zeros(2)) and float(step.std) == 0.0


def test_recomputed_log_prob_gives_ratio_exactly_one_and_carries_grad():
    gen = torch.Generator().manual_seed(4)
    x, v = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t, t_next = torch.tensor([0.0, 0.2, 0.5, 0.8]), torch.tensor([0.1, 0.3, 0.6, 0.9])
    step = sde.sde_step(x, v, t, t_next, 0.7, generator=torch.Generator().manual_seed(5))
    new_v = v.clone().requires_grad_(True)
    log_prob, mean, std = sde.sde_log_prob(x, new_v, t, t_next, step.sample, 0.7)
    assert torch.equal(log_prob.detach(), step.log_prob)
    assert torch.equal(torch.exp(log_prob.detach() - step.log_prob), torch.ones(4))
    assert torch.equal(mean.detach(), step.mean) and torch.equal(std, step.std)
    log_prob.sum().backward()
    assert new_v.grad is not None and new_v.grad.abs().sum() > 0
    # another velocity gives another log-prob
    other, _, _ = sde.sde_log_prob(x, v + 0.1, t, t_next, step.sample, 0.7)
    assert not torch.allclose(other, step.log_prob)


def test_log_probs_are_fp32_for_bf16_inputs():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 8, 8, generator=gen).bfloat16()
    v = torch.randn(2, 4, 8, 8, generator=gen).bfloat16()
    step = sde.sde_step(x, v, 0.2, 0.3, 0.7, generator=torch.Generator().manual_seed(7))
    assert step.log_prob.dtype == step.sample.dtype == step.mean.dtype == torch.float32
    log_prob, _, _ = sde.sde_log_prob(x, v, 0.2, 0.3, step.sample, 0.7)
    assert log_prob.dtype == torch.float32 and torch.equal(log_prob, step.log_prob)


def test_gaussian_step_kl():
    gen = torch.Generator().manual_seed(8)
    mean_p, mean_r = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    std = torch.tensor([0.1, 0.5, 2.0]).view(3, 1, 1, 1)
    assert torch.equal(sde.gaussian_step_kl(mean_p, mean_p, std), torch.zeros(3))
    expected = kl_divergence(Normal(mean_p, std.expand_as(mean_p)), Normal(mean_r, std.expand_as(mean_r)))
    kl = sde.gaussian_step_kl(mean_p, mean_r, std)
    assert kl.shape == (3,) and kl.dtype == torch.float32
    torch.testing.assert_close(kl, expected.flatten(1).mean(1))
    # hand check: one element, means 1 and 0, std 0.5: 1 / (2 * 0.25) = 2
    assert sde.gaussian_step_kl(torch.ones(1, 1), torch.zeros(1, 1), torch.tensor(0.5)).item() == 2.0


# -- the sampler ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.0])
def test_sde_keeps_the_flow_marginals(noise_level):
    """Data x1 ~ N(m, s^2) elementwise, the exact velocity field: every x_t of the ODE is N(t m, var_t), and the
    SDE must keep exactly these marginals for every noise level. 2^16 independent elements per run, compared
    with the exact marginal at t = 0.5 and t = 1 (the Euler ODE's own marginal is also checked, as the scale of
    the discretisation error). Tolerance: 5 standard errors plus the discretisation bias of 50 steps (<= 0.017
    in variance here; computed by the exact moment recursion of the linear step). A wrong drift correction is
    outside it (each checked by hand against this test): no correction -> final var 0.37 / 0.98 / 1.75 for
    a = 0.3 / 0.7 / 1, half of it -> 0.30 / 0.44 / 0.49, the sign flipped -> var 0.59 / ~8 / ~130,
    Flow-GRPO's formula left in their convention (x + (1 - t) v) -> final mean 1.28 / 0.44 / -0.35 for 1.5, the
    drift kept but the noise of another schedule -> var 0.20 / 0.30 / 0.49."""
    m, s, steps, n = 1.5, 0.5, 50, 1 << 16
    grid = euler_grid(steps).double()
    noise = torch.randn(64, n // 64, generator=torch.Generator().manual_seed(9)).double()
    velocity = gaussian_velocity(m, s)
    traj = sde.sample_flow(
        velocity, noise.float(), grid.float(), noise_level=noise_level, generator=torch.Generator().manual_seed(10)
    )
    ode = sde.sample_flow(velocity, noise.float(), grid.float())
    assert traj.x.shape == (64, steps, n // 64) and ode.x.shape[1] == 0
    mid = steps // 2  # traj.x[:, mid] are the latents at t = grid[mid] = 0.5
    checks = [(traj.latents, 1.0), (traj.x[:, mid], float(grid[mid])), (ode.latents, 1.0)]
    for samples, t in checks:
        target_mean, target_var = t * m, t * t * s * s + (1 - t) ** 2
        samples = samples.double()
        mean_tol = 5 * math.sqrt(target_var / n) + 1e-3
        var_tol = 5 * target_var * math.sqrt(2 / n) + 0.02
        assert abs(samples.mean().item() - target_mean) < mean_tol, (t, samples.mean().item(), target_mean)
        assert abs(samples.var().item() - target_var) < var_tol, (t, samples.var().item(), target_var)
    # the SDE really is noisy (different draws), while it keeps the marginal
    assert (traj.latents - ode.latents).abs().mean() > 0.05


def test_window_only_k_steps_stochastic_rest_exact_euler():
    steps, window, start = 8, 3, 2
    assert sde.stochastic_steps(steps, window, start) == [False, False, True, True, True, False, False, False]
    assert sde.stochastic_steps(steps) == [True] * steps
    with pytest.raises(ValueError, match="start"):
        sde.stochastic_steps(steps, window, 6)
    grid = euler_grid(steps)
    velocity = gaussian_velocity(0.3, 0.8)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    traj = sde.sample_flow(
        velocity, noise, grid, noise_level=0.7, stochastic=sde.stochastic_steps(steps, window, start),
        generator=torch.Generator().manual_seed(12),
    )
    assert traj.step_indices.tolist() == [2, 3, 4]
    assert torch.equal(traj.timesteps, grid[2:5]) and torch.equal(traj.next_timesteps, grid[3:6])
    assert traj.x.shape == traj.x_next.shape == (3, 3, 4, 8, 8) and traj.log_probs.shape == (3, 3)
    x = noise.clone()
    for i in range(start):  # before the window: exactly Euler
        x = x + (grid[i + 1] - grid[i]) * velocity(x, grid[i])
    assert torch.equal(traj.x[:, 0], x)
    for k in range(window - 1):  # inside: consecutive stochastic steps chain up
        assert torch.equal(traj.x[:, k + 1], traj.x_next[:, k])
    euler_in_window = traj.x[:, 0] + (grid[3] - grid[2]) * velocity(traj.x[:, 0], grid[2])
    assert not torch.allclose(traj.x_next[:, 0], euler_in_window)
    x = traj.x_next[:, -1]
    for i in range(start + window, steps):  # after the window: exactly Euler again
        x = x + (grid[i + 1] - grid[i]) * velocity(x, grid[i])
    assert torch.equal(traj.latents, x)
    # the recorded log-probs are those of the recorded transitions
    for k in range(window):
        t, t_next = traj.timesteps[k], traj.next_timesteps[k]
        log_prob, _, _ = sde.sde_log_prob(traj.x[:, k], velocity(traj.x[:, k], t), t, t_next, traj.x_next[:, k], 0.7)
        assert torch.equal(log_prob, traj.log_probs[:, k])


def test_trajectories_of_batches_stack_into_the_whole_batchs():
    """Rows sampled in two chunks with per-row generators, stacked, equal the rows sampled at once; ``select``
    takes them back out; trajectories over different steps refuse to stack."""
    grid, velocity = euler_grid(6), gaussian_velocity(0.3, 0.8)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    stochastic = sde.stochastic_steps(6, 2, 1)

    def run(rows, window=stochastic):
        gens = [torch.Generator().manual_seed(30 + r) for r in rows]
        return sde.sample_flow(velocity, noise[rows], grid, noise_level=0.7, stochastic=window, generator=gens)

    whole, stacked = run([0, 1, 2, 3]), sde.SDETrajectory.cat([run([0, 1]), run([2, 3])])
    for name in ("latents", "x", "x_next", "log_probs", "timesteps", "step_indices"):
        torch.testing.assert_close(getattr(stacked, name), getattr(whole, name), rtol=0, atol=0)
    torch.testing.assert_close(stacked.select([3, 1]).x, whole.x[[3, 1]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="different SDE steps"):
        sde.SDETrajectory.cat([run([0]), run([1], sde.stochastic_steps(6, 2, 3))])


def test_random_window_start_stays_in_range():
    gen = torch.Generator().manual_seed(13)
    starts = {sde.random_window_start(10, 2, gen, (1, 6)) for _ in range(200)}
    assert starts == {1, 2, 3, 4}
    assert {sde.random_window_start(4, 4, gen) for _ in range(10)} == {0}
    with pytest.raises(ValueError):
        sde.random_window_start(10, 3, gen, (0, 2))


def test_per_row_generators_make_a_rows_noise_independent_of_the_batch():
    shape = (3, 4, 8, 8)
    gens = [torch.Generator().manual_seed(20 + i) for i in range(3)]
    full = sde.draw_noise(shape, gens, "cpu")
    alone = sde.draw_noise((1, *shape[1:]), [torch.Generator().manual_seed(21)], "cpu")
    assert torch.equal(full[1:2], alone)
    with pytest.raises(ValueError, match="generators"):
        sde.draw_noise(shape, gens[:2], "cpu")


# -- on the model --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return build_tiny_mindomni(seed=0).eval()


def embeds_and_negative(model, lengths=(6, 9)):
    states, mask = random_condition(model, list(lengths))
    neg, neg_mask = model.negative_states(len(lengths))
    return model.connect(states.to(model.dtype), mask), mask, model.connect(neg, neg_mask), neg_mask


@torch.no_grad()
def previous_euler_sampler(model, cond_embeds, cond_mask, neg_embeds, neg_mask, noise, cfg):
    """The Euler sampler as it was before the SDE mode (a verbatim copy of its loop): the bit-exact reference."""
    n = noise.shape[0]
    guided = neg_embeds is not None and cfg.guidance_scale != 1.0
    embeds, mask = cond_embeds, cond_mask
    if guided:
        if neg_embeds.shape[0] == 1 and n > 1:
            neg_embeds, neg_mask = neg_embeds.expand(n, -1, -1), neg_mask.expand(n, -1)
        embeds, mask = cat_left_padded([cond_embeds, neg_embeds], [cond_mask, neg_mask])
    grid = euler_grid(cfg.steps).to(noise.device)
    x = noise.float()
    h, w = noise.shape[-2:]
    cache = build_condition_cache(model.decoder, embeds, mask, num_image_tokens(model.decoder, h, w))
    for i in range(cfg.steps):
        x_in = torch.cat([x, x]) if guided else x
        t = grid[i].expand(x_in.shape[0])
        v = decoder_forward_cached(model.decoder, cache, x_in, t).float()
        if guided:
            v_cond, v_neg = v.chunk(2)
            v = v_neg + cfg.guidance_scale * (v_cond - v_neg)
        x = x + (grid[i + 1] - grid[i]) * v
    return x


def test_model_noise_level_zero_reproduces_the_euler_image_exactly(model):
    embeds, mask, neg_embeds, neg_mask = embeds_and_negative(model)
    noise = model.initial_noise(2, 1, CFG, "cpu")
    reference = previous_euler_sampler(model, embeds, mask, neg_embeds, neg_mask, noise, CFG)
    for cfg in (CFG, sde_cfg(noise_level=0.0), sde_cfg(noise_level=0.0, sde_window=2, sde_window_start=1)):
        latents = model.sample_latents(embeds, mask, neg_embeds, neg_mask, noise, cfg)
        assert isinstance(latents, torch.Tensor) and torch.equal(latents, reference)
    images = model.decode_latents(model.sample_latents(embeds, mask, neg_embeds, neg_mask, noise, sde_cfg(noise_level=0)))
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(images, model.decode_latents(reference)))


def test_model_sde_trajectory_is_seeded_and_its_log_probs_recompute_exactly(model):
    """Unguided and without the condition cache, the velocity of ``decode_step`` is computed exactly as the
    sampler's, so the recomputed log-probs equal the recorded ones bit for bit (ratio exactly 1)."""
    embeds, mask, _, _ = embeds_and_negative(model)
    noise = model.initial_noise(2, 1, CFG, "cpu")
    cfg = sde_cfg(guidance_scale=1.0)
    model.decoder_kv_cache = False
    try:
        traj = model.sample_latents(embeds, mask, None, None, noise, cfg, generator=torch.Generator().manual_seed(3))
    finally:
        model.decoder_kv_cache = True
    assert isinstance(traj, sde.SDETrajectory)
    assert traj.step_indices.tolist() == [0, 1, 2, 3] and traj.log_probs.shape == (2, 4)
    assert traj.x.shape == traj.x_next.shape == (2, 4, 4, 8, 8) and traj.noise_level == 0.7
    assert torch.equal(traj.x[:, 0], noise) and torch.equal(traj.latents, traj.x_next[:, -1])
    assert torch.isfinite(traj.log_probs).all()
    for k in range(4):
        t = traj.timesteps[k]
        v = model.decode_step(embeds, mask, traj.x[:, k].contiguous(), t.expand(2)).prediction
        log_prob, _, _ = sde.sde_log_prob(traj.x[:, k], v, t, traj.next_timesteps[k], traj.x_next[:, k], 0.7)
        assert torch.equal(log_prob, traj.log_probs[:, k])
    # seeded: the same generator seed gives the same trajectory, another seed another one
    again = model.sample_latents(embeds, mask, None, None, noise, cfg, generator=torch.Generator().manual_seed(3))
    other = model.sample_latents(embeds, mask, None, None, noise, cfg, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(again.latents, traj.latents, atol=1e-5, rtol=1e-5)  # cached vs uncached path
    assert not torch.allclose(other.latents, traj.latents, atol=1e-3)
    default_a = model.sample_latents(embeds, mask, None, None, noise, cfg)
    default_b = model.sample_latents(embeds, mask, None, None, noise, cfg)
    assert torch.equal(default_a.latents, default_b.latents) and torch.equal(default_a.log_probs, default_b.log_probs)


def test_model_sde_uses_the_guided_velocity(model):
    embeds, mask, neg_embeds, neg_mask = embeds_and_negative(model)
    noise = model.initial_noise(2, 1, CFG, "cpu")
    traj = model.sample_latents(embeds, mask, neg_embeds, neg_mask, noise, sde_cfg(),
                                generator=torch.Generator().manual_seed(5))
    for k in range(4):
        x, t = traj.x[:, k].contiguous(), traj.timesteps[k].expand(2)
        v_cond = model.decode_step(embeds, mask, x, t).prediction
        v_neg = model.decode_step(neg_embeds, neg_mask, x, t).prediction
        guided = v_neg + CFG.guidance_scale * (v_cond - v_neg)
        _, mean, std = sde.sde_log_prob(x, guided, traj.timesteps[k], traj.next_timesteps[k], traj.x_next[:, k], 0.7)
        # x_next - mean is std * z with z ~ N(0, 1): recovered z is standard normal only for the guided mean
        z = (traj.x_next[:, k] - mean) / std
        assert abs(z.mean().item()) < 0.3 and abs(z.std().item() - 1) < 0.2
        _, mean_unguided, _ = sde.sde_log_prob(x, v_cond, traj.timesteps[k], traj.next_timesteps[k], x, 0.7)
        assert not torch.allclose(mean_unguided, mean, atol=1e-3)


def test_model_window_and_per_row_generators(model):
    embeds, mask, neg_embeds, neg_mask = embeds_and_negative(model)
    noise = model.initial_noise(2, 1, CFG, "cpu")
    cfg = sde_cfg(sde_window=2, sde_window_start=1)
    gens = [torch.Generator().manual_seed(30), torch.Generator().manual_seed(31)]
    traj = model.sample_latents(embeds, mask, neg_embeds, neg_mask, noise, cfg, generator=gens)
    assert traj.step_indices.tolist() == [1, 2] and traj.log_probs.shape == (2, 2)
    assert torch.equal(traj.timesteps, euler_grid(4)[1:3])
    euler = model.sample_latents(embeds, mask, neg_embeds, neg_mask, noise, CFG)
    assert not torch.allclose(traj.latents, euler, atol=1e-3)
    # row 1 alone with its own generator draws the same noise: the same trajectory as in the batch
    alone = model.sample_latents(embeds[1:], mask[1:], neg_embeds[1:], neg_mask[1:], noise[1:], cfg,
                                 generator=[torch.Generator().manual_seed(31)])
    torch.testing.assert_close(alone.x_next, traj.x_next[1:], atol=1e-5, rtol=1e-5)
    # a drawn start stays inside the range
    drawn = model.sample_latents(embeds, mask, neg_embeds, neg_mask, noise,
                                 sde_cfg(sde_window=2, sde_window_range=(1, 4)), generator=torch.Generator())
    assert drawn.step_indices.tolist() in ([1, 2], [2, 3])
    sub = traj.select([1])
    assert torch.equal(sub.x, traj.x[1:]) and torch.equal(sub.log_probs, traj.log_probs[1:])


def test_model_log_probs_are_fp32_in_bfloat16():
    model = build_tiny_mindomni(dtype=torch.bfloat16).eval()
    embeds, mask, neg_embeds, neg_mask = embeds_and_negative(model)
    assert embeds.dtype == torch.bfloat16
    traj = model.sample_latents(embeds, mask, neg_embeds, neg_mask, model.initial_noise(2, 1, CFG, "cpu"), sde_cfg(),
                                generator=torch.Generator().manual_seed(6))
    assert traj.log_probs.dtype == traj.x.dtype == traj.latents.dtype == torch.float32
    assert torch.isfinite(traj.log_probs).all()
    v = model.decode_step(embeds, mask, traj.x[:, 2].contiguous(), traj.timesteps[2].expand(2)).prediction
    assert v.dtype == torch.bfloat16
    log_prob, _, _ = sde.sde_log_prob(traj.x[:, 2], v, traj.timesteps[2], traj.next_timesteps[2], traj.x_next[:, 2], 0.7)
    assert log_prob.dtype == torch.float32


def test_gaussian_step_kl_conventions_by_hand():
    # x = 1, v = 2 vs v_ref = 0, t = 0.25 -> 0.5 (dt = 0.25), a = 0.5:
    #   the means differ by dt * (1 + a^2 t / (2 t~)) * (v - v_ref) = 0.25 * (1 + 0.125) * 2 = 0.5625
    #   std^2 = a^2 (1 - t) dt / t~ = 0.25 * 0.75 = 0.1875;  Flow-GRPO's std_dev_t^2 = std^2 / dt = 0.75
    #   exact     = 0.5625^2 / (2 * 0.1875) = 0.84375
    #   flow_grpo = 0.5625^2 / (2 * 0.75)   = 0.2109375 = exact * dt
    x, v, v_ref = torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.tensor([[0.0]])
    mean, std = sde.sde_mean_std(x, v, 0.25, 0.5, 0.5)
    mean_ref, _ = sde.sde_mean_std(x, v_ref, 0.25, 0.5, 0.5)
    assert (mean - mean_ref).item() == pytest.approx(0.5625, abs=1e-7)
    assert (std**2).item() == pytest.approx(0.1875, abs=1e-7)
    exact = sde.gaussian_step_kl(mean, mean_ref, std)
    flow_grpo = sde.gaussian_step_kl(mean, mean_ref, std, convention="flow_grpo", dt=0.25)
    assert exact.shape == flow_grpo.shape == (1,)
    assert exact.item() == pytest.approx(0.84375, abs=1e-6)
    assert flow_grpo.item() == pytest.approx(0.2109375, abs=1e-6)


def test_flow_grpo_kl_convention_is_their_kl_loss():
    """Flow-GRPO's ``scripts/train_sd3.py``, transcribed in their variables: the policy's and the reference's
    ``prev_sample_mean`` from ``sde_step_with_logprob`` and
    ``kl_loss = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t ** 2)`` with their
    ``std_dev_t = a sqrt(sigma / (1 - sigma))`` (no sqrt(dt)); per row before their batch mean."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, 4, 4, generator=gen)
    v, v_ref = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    grid = 1 - torch.from_numpy(np.linspace(1, 0, 11).astype(np.float32))
    a = 0.7
    for i in (0, 4, 9):
        t, t_next = grid[i], grid[i + 1]
        sigma, sigma_prev, sigma_max = 1 - t, 1 - t_next, 1 - grid[1]
        dt = sigma_prev - sigma
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * a

        def their_mean(their_v, sigma=sigma, dt=dt, std_dev_t=std_dev_t):
            return x * (1 + std_dev_t**2 / (2 * sigma) * dt) + their_v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt

        their_kl = ((their_mean(-v) - their_mean(-v_ref)) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)

        mean, std = sde.sde_mean_std(x, v, t, t_next, a)
        mean_ref, _ = sde.sde_mean_std(x, v_ref, t, t_next, a)
        ours = sde.gaussian_step_kl(mean, mean_ref, std, convention="flow_grpo", dt=t_next - t)
        torch.testing.assert_close(ours, their_kl.flatten(), atol=1e-6, rtol=1e-4)
        exact = sde.gaussian_step_kl(mean, mean_ref, std)
        torch.testing.assert_close(ours, exact * (t_next - t), atol=1e-7, rtol=1e-5)
    # per-row times and dt
    t, t_next = torch.tensor([0.0, 0.3, 0.9]), torch.tensor([0.1, 0.5, 0.95])
    mean, std = sde.sde_mean_std(x, v, t, t_next, a)
    mean_ref, _ = sde.sde_mean_std(x, v_ref, t, t_next, a)
    ours = sde.gaussian_step_kl(mean, mean_ref, std, convention="flow_grpo", dt=t_next - t)
    torch.testing.assert_close(ours, sde.gaussian_step_kl(mean, mean_ref, std) * (t_next - t))


def test_gaussian_step_kl_convention_errors():
    mean, std = torch.zeros(2, 3), torch.tensor(0.5)
    with pytest.raises(ValueError, match="needs dt"):
        sde.gaussian_step_kl(mean, mean + 1, std, convention="flow_grpo")
    with pytest.raises(ValueError, match="valid: 'exact', 'flow_grpo'"):
        sde.gaussian_step_kl(mean, mean + 1, std, convention="flowgrpo")
