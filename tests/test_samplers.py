"""rgpo.samplers: the samplers a family hands the trainer, behind one protocol.

Each sampler's loop must be its reference sampler's (``rgpo.sde.sample_flow``, ``rgpo.schedulers.sample_ddpm`` /
``sample_ddim``, diffusers' own ``scheduler.step`` loop with the same generator), every recorded step must replay
to exactly its recorded log-prob through ``sampler.log_prob`` (ratio 1), and ``transition`` must be the step's
Gaussian. The image policy uses a sampler only through ``num_steps``, ``window``, ``sample``, ``log_prob`` and
``transition``, which ``test_protocol_rollout_replays_with_ratio_one`` drives as the trainer does.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from rgpo import sde
from rgpo.samplers import DDIMSampler, DDPMSampler, FlowSampler
from rgpo.schedulers import (
    ddim_step_with_logprob,
    ddpm_step_with_logprob,
    replay_step,
    sample_ddim,
    sample_ddpm,
)

SHAPE = (2, 3, 4, 4)


def linear_model(seed: int, channels: int = 3, scale: float = 1000.0):
    """A fixed random "model": channel mixing plus a term in the time it is fed, so a wrong time shows. Takes
    the time as a long or float tensor (the image policy hands back the trajectory's float32 timesteps)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, channels, generator=gen) / channels
    bias = torch.randn(1, channels, 1, 1, generator=gen)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.einsum("dc,nchw->ndhw", weight, x) + bias * (1 + torch.as_tensor(t).float() / scale)

    return model


def diffusers_loop(scheduler, model, noise, generator, **step_kwargs):
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, generator=generator, **step_kwargs).prev_sample
    return x


def set_copy(scheduler, steps):
    local = type(scheduler).from_config(scheduler.config)
    local.set_timesteps(steps)
    return local


def assert_same_trajectory(a: sde.SDETrajectory, b: sde.SDETrajectory):
    for name in ("latents", "x", "x_next", "log_probs", "timesteps", "next_timesteps", "step_indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.noise_level == b.noise_level


def small_ddpm(**kwargs) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=100, clip_sample=False, **kwargs)


def sd21_ddpm() -> DDPMScheduler:
    """SD-2.1's scheduler config (MM-Interleaved samples it ancestrally with DDPMScheduler, 30 steps)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, steps_offset=1, prediction_type="epsilon")


# -- DDPM ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, steps", [("small", 5), ("sd21", 30)])
def test_ddpm_sampler_is_sample_ddpm_and_diffusers_loop(config, steps):
    scheduler = small_ddpm(steps_offset=1) if config == "small" else sd21_ddpm()
    model = linear_model(1)
    sampler = DDPMSampler(scheduler, steps)
    assert sampler.num_steps == steps and sampler.kind == "ddpm"
    assert scheduler.num_inference_steps is None  # the caller's scheduler was not set
    seen = []

    def predict(x, t):
        seen.append(t)
        return model(x, t)

    # MM-Interleaved: one generator feeds the initial latents and every step's noise
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(SHAPE, generator=gen)
    trajectory = sampler.sample(predict, noise, noise_level=1.0, generator=gen)

    # predict gets the scheduler's integer timesteps as 0-dim long tensors
    reference = set_copy(scheduler, steps)
    assert all(t.dim() == 0 and t.dtype == torch.long for t in seen)
    assert [int(t) for t in seen] == reference.timesteps.tolist()

    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(SHAPE, generator=gen)
    assert_same_trajectory(trajectory, sample_ddpm(model, noise, scheduler, steps, generator=gen))
    gen = torch.Generator().manual_seed(2)
    expected = diffusers_loop(reference, model, torch.randn(SHAPE, generator=gen), gen)
    torch.testing.assert_close(trajectory.latents, expected, atol=1e-5, rtol=1e-5)
    # the last step lands on abar = 1: std 0, not recorded
    assert trajectory.step_indices.tolist() == list(range(steps - 1))
    assert trajectory.noise_level == 1.0


def test_ddpm_log_prob_replays_exactly_and_transition_is_the_step():
    scheduler = small_ddpm()  # offset 0: timesteps [80, 60, 40, 20, 0]
    model = linear_model(3)
    sampler = DDPMSampler(scheduler, 5)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    trajectory = sampler.sample(model, noise, noise_level=0.7, generator=torch.Generator().manual_seed(5))
    assert trajectory.timesteps.dtype == torch.float32
    assert trajectory.timesteps.tolist() == [80, 60, 40, 20] and trajectory.next_timesteps.tolist() == [60, 40, 20, 0]

    # the steps as drawn, by hand with the same generator
    local, gen, x, steps = set_copy(scheduler, 5), torch.Generator().manual_seed(5), noise.clone(), []
    for t in local.timesteps:
        steps.append(ddpm_step_with_logprob(local, model(x, t), t, x, generator=gen))
        x = steps[-1].sample
    assert torch.equal(trajectory.latents, x)

    for k in range(trajectory.x.shape[1]):
        x, x_next = trajectory.x[:, k], trajectory.x_next[:, k]
        t, t_next = trajectory.timesteps[k], trajectory.next_timesteps[k]  # float32, as the policy passes them
        prediction = model(x, t)
        log_prob, mean, std = sampler.log_prob(prediction, x, t, t_next, x_next, trajectory.noise_level)
        assert torch.equal(log_prob, trajectory.log_probs[:, k])  # on-policy ratio exactly 1
        assert torch.equal(log_prob, replay_step(scheduler, prediction, trajectory, k).log_prob)
        t_mean, t_std = sampler.transition(prediction, x, t, t_next, trajectory.noise_level)
        for got in ((mean, std), (t_mean, t_std)):
            assert torch.equal(got[0], steps[k].mean) and torch.equal(got[1], steps[k].std)
        assert float(std) > 0
        # a different prediction moves the log-prob
        moved, _, _ = sampler.log_prob(prediction + 0.1, x, t, t_next, x_next, trajectory.noise_level)
        assert not torch.equal(moved, log_prob)


def test_ddpm_refuses_noise_level_zero():
    sampler = DDPMSampler(small_ddpm(), 4)
    x = torch.zeros(SHAPE)
    model = linear_model(6)
    with pytest.raises(ValueError, match="always stochastic"):
        sampler.sample(model, x)  # the protocol's default noise_level is 0
    with pytest.raises(ValueError, match="always stochastic"):
        sampler.sample(model, x, noise_level=0.0, stochastic=[True] * 4)
    with pytest.raises(ValueError, match="always stochastic"):
        sampler.transition(x, x, torch.tensor(75), torch.tensor(50), 0.0)
    with pytest.raises(ValueError, match="always stochastic"):
        sampler.log_prob(x, x, torch.tensor(75), torch.tensor(50), x, 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        sampler.sample(model, x, noise_level=-1.0)


def test_wrong_schedulers_are_refused():
    with pytest.raises(TypeError, match="DDPMScheduler"):
        DDPMSampler(DDIMScheduler(num_train_timesteps=100), 4)
    with pytest.raises(TypeError, match="DDIMScheduler"):
        DDIMSampler(small_ddpm(), 4)
    with pytest.raises(ValueError, match="variance_type"):
        DDPMSampler(small_ddpm(variance_type="learned"), 4)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(DDIMScheduler(num_train_timesteps=100), 4, eta=0.0)


def test_ancestral_window_is_drawn_among_the_noisy_steps():
    sampler = DDPMSampler(small_ddpm(), 5)  # the last step (t = 0) has std 0
    assert sampler.noisy == [True, True, True, True, False]
    assert sampler.window(None, None, None, None) == [True] * 5
    assert sampler.window(2, 1, None, None) == sde.stochastic_steps(5, 2, 1)
    starts = set()
    for seed in range(40):
        window = sampler.window(2, None, None, torch.Generator().manual_seed(seed))
        assert sum(window) == 2 and not window[4]
        starts.add(window.index(True))
        # per-row generators: drawn from the first, as FlowSampler does
        gens = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 100)]
        assert sampler.window(2, None, None, gens) == window
    assert starts == {0, 1, 2}
    # a range reaching the noiseless step is cut to the noisy ones
    for seed in range(20):
        window = sampler.window(2, None, (2, 5), torch.Generator().manual_seed(seed))
        assert window == sde.stochastic_steps(5, 2, 2)
    with pytest.raises(ValueError, match="std is 0"):
        sampler.window(2, 3, None, None)  # an explicit window over the noiseless step
    with pytest.raises(ValueError, match="does not fit"):
        sampler.window(2, None, (3, 5), torch.Generator())


def test_ddpm_window_takes_the_posterior_mean_outside_and_draws_noise_inside_only():
    scheduler = small_ddpm(steps_offset=1)  # timesteps [81, 61, 41, 21, 1]
    model = linear_model(7)
    sampler = DDPMSampler(scheduler, 5)
    gen = torch.Generator().manual_seed(8)
    window = sampler.window(2, None, None, gen)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    trajectory = sampler.sample(model, noise, noise_level=1.0, stochastic=window, generator=gen)
    indices = [i for i, w in enumerate(window) if w]
    assert trajectory.step_indices.tolist() == indices and trajectory.log_probs.shape == (2, 2)

    # by hand: the same generator (window start drawn first), noise only inside the window, the mean outside
    local, gen, x = set_copy(scheduler, 5), torch.Generator().manual_seed(8), noise.clone()
    assert sde.random_window_start(5, 2, gen, (0, 4)) == indices[0]
    for i, t in enumerate(local.timesteps):
        step = ddpm_step_with_logprob(local, model(x, t), t, x, generator=gen if window[i] else None,
                                      prev_sample=None if window[i] else x)
        x = step.sample if window[i] else step.mean
    assert torch.equal(trajectory.latents, x)
    for k, i in enumerate(indices):
        t, t_next = trajectory.timesteps[k], trajectory.next_timesteps[k]
        assert t == local.timesteps[i]
        log_prob, _, _ = sampler.log_prob(model(trajectory.x[:, k], t), trajectory.x[:, k], t, t_next,
                                          trajectory.x_next[:, k], 1.0)
        assert torch.equal(log_prob, trajectory.log_probs[:, k])


def test_ddpm_per_row_generators_are_diffusers_per_row_generators():
    scheduler = small_ddpm()
    model = linear_model(10)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    trajectory = DDPMSampler(scheduler, 4).sample(model, noise, noise_level=1.0,
                                                  generator=[torch.Generator().manual_seed(s) for s in (12, 13)])
    expected = diffusers_loop(set_copy(scheduler, 4), model, noise,
                              [torch.Generator().manual_seed(s) for s in (12, 13)])
    torch.testing.assert_close(trajectory.latents, expected, atol=1e-5, rtol=1e-5)


# -- DDIM ----------------------------------------------------------------------------------------------------------


def small_ddim() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=100, clip_sample=False, set_alpha_to_one=False)


def test_ddim_noise_level_zero_is_deterministic_ddim():
    scheduler = small_ddim()
    model = linear_model(14)
    sampler = DDIMSampler(scheduler, 4, eta=1.0)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(15))
    trajectory = sampler.sample(model, noise)
    assert trajectory.x.shape[1] == 0 and trajectory.log_probs.shape == (2, 0) and trajectory.noise_level == 0.0
    assert_same_trajectory(trajectory, sample_ddim(model, noise, scheduler, 4, eta=0.0))
    expected = diffusers_loop(set_copy(scheduler, 4), model, noise, None, eta=0.0)
    torch.testing.assert_close(trajectory.latents, expected, atol=1e-5, rtol=1e-5)
    # its Gaussian has std 0: log-prob zeros
    x, t, t_next = noise, torch.tensor(75), torch.tensor(50)
    log_prob, mean, std = sampler.log_prob(model(x, t), x, t, t_next, x, 0.0)
    assert float(std) == 0 and torch.equal(log_prob, torch.zeros(2))


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_sampler_is_sample_ddim_and_diffusers_loop_and_replays(eta):
    scheduler = small_ddim()
    model = linear_model(16)
    sampler = DDIMSampler(scheduler, 4, eta=eta)
    assert sampler.kind == "ddim" and sampler.noisy == [True, True, True, False]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(17))
    trajectory = sampler.sample(model, noise, noise_level=0.7, generator=torch.Generator().manual_seed(18))
    reference = sample_ddim(model, noise, scheduler, 4, eta=eta, generator=torch.Generator().manual_seed(18))
    for name in ("latents", "x", "x_next", "log_probs", "timesteps", "next_timesteps", "step_indices"):
        assert torch.equal(getattr(trajectory, name), getattr(reference, name)), name
    assert trajectory.noise_level == 0.7  # what the caller passed, handed back to log_prob at replay
    expected = diffusers_loop(set_copy(scheduler, 4), model, noise, torch.Generator().manual_seed(18), eta=eta)
    torch.testing.assert_close(trajectory.latents, expected, atol=1e-5, rtol=1e-5)

    local = set_copy(scheduler, 4)
    for k in range(trajectory.x.shape[1]):
        x, x_next = trajectory.x[:, k], trajectory.x_next[:, k]
        t, t_next = trajectory.timesteps[k], trajectory.next_timesteps[k]
        prediction = model(x, t)
        log_prob, mean, std = sampler.log_prob(prediction, x, t, t_next, x_next, trajectory.noise_level)
        assert torch.equal(log_prob, trajectory.log_probs[:, k])
        step = ddim_step_with_logprob(local, prediction, t, x, eta=eta, prev_timestep=t_next, prev_sample=x_next)
        t_mean, t_std = sampler.transition(prediction, x, t, t_next, trajectory.noise_level)
        for got in ((mean, std), (t_mean, t_std)):
            assert torch.equal(got[0], step.mean) and torch.equal(got[1], step.std)


def test_ddim_window_takes_the_deterministic_step_outside():
    scheduler = small_ddim()
    model = linear_model(19)
    sampler = DDIMSampler(scheduler, 4, eta=1.0)
    window = sampler.window(1, 1, None, None)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(20))
    trajectory = sampler.sample(model, noise, noise_level=1.0, stochastic=window,
                                generator=torch.Generator().manual_seed(21))
    assert trajectory.step_indices.tolist() == [1]
    local, gen, x = set_copy(scheduler, 4), torch.Generator().manual_seed(21), noise.clone()
    for i, t in enumerate(local.timesteps):
        x = ddim_step_with_logprob(local, model(x, t), t, x, eta=1.0 if window[i] else 0.0, generator=gen).sample
    assert torch.equal(trajectory.latents, x)


# -- flow ----------------------------------------------------------------------------------------------------------


def test_flow_sampler_noise_level_zero_is_euler():
    grid = torch.linspace(0, 1, 6)
    model = linear_model(22, scale=1.0)
    sampler = FlowSampler(grid)
    assert sampler.num_steps == 5 and sampler.kind == "flow"
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(23))
    trajectory = sampler.sample(model, noise)
    assert trajectory.x.shape[1] == 0 and trajectory.noise_level == 0.0
    assert_same_trajectory(trajectory, sde.sample_flow(model, noise, grid))
    x = noise.clone()
    for i in range(5):
        x = x + (grid[i + 1] - grid[i]) * model(x, grid[i])
    assert torch.equal(trajectory.latents, x)


def test_flow_sampler_replays_exactly_and_transition_is_the_sde_step():
    grid = torch.linspace(0, 1, 6)
    model = linear_model(24, scale=1.0)
    sampler = FlowSampler(grid)
    gen = torch.Generator().manual_seed(25)
    window = sampler.window(3, None, None, gen)
    assert window == sde.stochastic_steps(5, 3, sde.random_window_start(5, 3, torch.Generator().manual_seed(25)))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(26))
    trajectory = sampler.sample(model, noise, noise_level=0.7, stochastic=window, generator=gen)
    gen = torch.Generator().manual_seed(25)
    sampler.window(3, None, None, gen)
    assert_same_trajectory(trajectory, sde.sample_flow(model, noise, grid, noise_level=0.7, stochastic=window,
                                                       generator=gen))
    assert trajectory.step_indices.tolist() == [i for i, w in enumerate(window) if w]
    for k in range(3):
        x, x_next = trajectory.x[:, k], trajectory.x_next[:, k]
        t, t_next = trajectory.timesteps[k], trajectory.next_timesteps[k]
        v = model(x, t)
        log_prob, mean, std = sampler.log_prob(v, x, t, t_next, x_next, 0.7)
        assert torch.equal(log_prob, trajectory.log_probs[:, k])
        s_mean, s_std = sde.sde_mean_std(x, v, t, t_next, 0.7)
        t_mean, t_std = sampler.transition(v, x, t, t_next, 0.7)
        for got in ((mean, std), (t_mean, t_std)):
            assert torch.equal(got[0], s_mean) and torch.equal(got[1], s_std)
    assert sampler.window(None, None, None, None) == [True] * 5


# -- the protocol, as the trainer drives it --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flow", "ddpm", "ddim"])
def test_protocol_rollout_replays_with_ratio_one(family):
    """What ``UnifiedModel.sample_image_latents`` and ``ImagePolicy.loss`` do, knowing nothing of the family: one
    generator draws the window and the step noise, per-row replays of every recorded step give ratio 1."""
    if family == "flow":
        sampler, model = FlowSampler(torch.linspace(0, 1, 7)), linear_model(27, scale=1.0)
    elif family == "ddpm":
        sampler, model = DDPMSampler(sd21_ddpm(), 6), linear_model(27)
    else:
        sampler, model = DDIMSampler(small_ddim(), 6, eta=1.0), linear_model(27)
    gen = torch.Generator().manual_seed(28)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(29))
    stochastic = sampler.window(2, None, (1, sampler.num_steps), gen)
    trajectory = sampler.sample(model, noise, noise_level=0.7, stochastic=stochastic, generator=gen)
    assert trajectory.x.shape[1] == 2 and trajectory.step_indices.tolist() == [i for i, w in enumerate(stochastic)
                                                                               if w]
    a = trajectory.noise_level
    for k in range(trajectory.x.shape[1]):
        x, x_next = trajectory.x[:, k].contiguous(), trajectory.x_next[:, k].contiguous()
        t_k, t_next = trajectory.timesteps[k], trajectory.next_timesteps[k]
        prediction = model(x, t_k)
        logp, mean, std = sampler.log_prob(prediction, x, t_k, t_next, x_next, a)
        assert torch.equal(torch.exp(logp - trajectory.log_probs[:, k]), torch.ones(2))
        mean_ref, std_ref = sampler.transition(prediction + 0.05, x, t_k, t_next, a)
        assert torch.equal(std_ref, std)
        kl = sde.gaussian_step_kl(mean, mean_ref, std)
        assert bool((kl > 0).all()) and torch.equal(sde.gaussian_step_kl(mean, mean, std), torch.zeros(2))
