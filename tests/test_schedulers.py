"""rgpo.schedulers: every family's diffusers scheduler in rgpo's conventions, with per-step Gaussian log-probs.

Flow: t = 1 - sigma (0 noise, 1 data), v = -prediction; the Euler steps must be diffusers' own. DDPM / DDIM: the
steps must be diffusers' ``scheduler.step`` with the same noise, and the log-probs a hand-checkable Gaussian.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from rgpo import sde
from rgpo.schedulers import (
    ddim_step_with_logprob,
    ddpm_step_with_logprob,
    flow_model_timesteps,
    flow_time_grid,
    replay_step,
    sample_ddim,
    sample_ddpm,
    velocity_from_flow_prediction,
)

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def linear_model(seed: int, channels: int = 3):
    """A fixed random "model": channel mixing plus a term in the timestep it is fed, so a wrong time shows."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, channels, generator=gen) / channels
    bias = torch.randn(1, channels, 1, 1, generator=gen)

    def model(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return torch.einsum("dc,nchw->ndhw", weight, x) + bias * (1 + torch.as_tensor(timestep).float() / 1000)

    return model


# -- flow matching -------------------------------------------------------------------------------------------------


def omnigen_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1)


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_omnigen_grid_is_rgpo_euler_grid(steps):
    grid = flow_time_grid(omnigen_scheduler(), steps, sigmas=np.linspace(1, 0, steps + 1)[:steps])
    expected = 1 - torch.from_numpy(np.linspace(1, 0, steps + 1).astype(np.float32))
    assert grid.dtype == torch.float32 and torch.equal(grid, expected)


def test_omnigen_scheduler_without_sigmas_is_refused():
    # num_train_timesteps=1 makes diffusers' default schedule all ones: sigmas [0, 0, 0, 0, 1] after inversion
    with pytest.raises(ValueError, match="explicit sigmas"):
        flow_time_grid(omnigen_scheduler(), 4)


def test_flow_grids_by_hand():
    # Nexus-Gen, 2 steps: sigmas [1, 0.003/1.002] shifted by 3: 3s / (1 + 2s) = 0.009/1.008 = 1/112 -> t = 111/112
    grid = flow_time_grid(FlowMatchEulerDiscreteScheduler(shift=3.0), 2, sigmas=np.linspace(1, 0.003 / 1.002, 2))
    torch.testing.assert_close(grid, torch.tensor([0.0, 111 / 112, 1.0]), atol=1e-7, rtol=0)
    # BLIP3-o, 4 steps, sigmas [1, .75, .5, .25]: shift 1 keeps them; shift 3 gives [1, .9, .75, .5]
    sigmas = np.linspace(1, 1 / 4, 4)
    grid = flow_time_grid(FlowMatchEulerDiscreteScheduler(shift=1.0), 4, sigmas=sigmas)
    torch.testing.assert_close(grid, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]), atol=1e-7, rtol=0)
    grid = flow_time_grid(FlowMatchEulerDiscreteScheduler(shift=3.0), 4, sigmas=sigmas)
    torch.testing.assert_close(grid, torch.tensor([0.0, 0.1, 0.25, 0.5, 1.0]), atol=1e-7, rtol=0)
    # the model is fed sigma * 1000 at each of the 4 steps
    timesteps = flow_model_timesteps(FlowMatchEulerDiscreteScheduler(shift=3.0), 4, sigmas=sigmas)
    torch.testing.assert_close(timesteps, torch.tensor([1000.0, 900.0, 750.0, 500.0]))


def test_flow_time_grid_leaves_the_scheduler_alone():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(7)
    before = scheduler.sigmas.clone()
    flow_time_grid(scheduler, 3, sigmas=[1.0, 0.6, 0.2])
    assert torch.equal(scheduler.sigmas, before) and scheduler.num_inference_steps == 7


FLOW_SETUPS = {
    "mindomni": (omnigen_scheduler, lambda n: np.linspace(1, 0, n + 1)[:n]),
    "nexus_gen": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), lambda n: np.linspace(1, 0.003 / 1.002, n)),
    "nexus_gen_default_sigmas": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), lambda n: None),
    "blip3o": (lambda: FlowMatchEulerDiscreteScheduler(shift=2.0), lambda n: np.linspace(1, 1 / n, n)),
}


@pytest.mark.parametrize("family", list(FLOW_SETUPS))
def test_euler_over_the_grid_is_diffusers_step(family):
    make, sigmas_for = FLOW_SETUPS[family]
    steps = 6
    model = linear_model(0)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))

    scheduler = make()
    scheduler.set_timesteps(steps, sigmas=sigmas_for(steps))
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample

    grid = flow_time_grid(make(), steps, sigmas=sigmas_for(steps))
    model_timesteps = flow_model_timesteps(make(), steps, sigmas=sigmas_for(steps))
    inverted = family == "mindomni"  # OmniGen's output is already rgpo's velocity

    def velocity(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the step index by exact lookup: the model must see the scheduler's timestep, not 1000 * (1 - t)
        step = int((grid == t).nonzero()[0, 0])
        out = model(latents, model_timesteps[step])
        return out.float() if inverted else velocity_from_flow_prediction(out)

    ours = sde.sample_flow(velocity, noise, grid).latents
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_velocity_from_flow_prediction_is_data_minus_noise():
    gen = torch.Generator().manual_seed(2)
    data, noise = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    prediction = (noise - data).bfloat16()  # what FLUX / Lumina / SD3 are trained to output
    v = velocity_from_flow_prediction(prediction)
    assert v.dtype == torch.float32 and torch.equal(v, (data - noise).bfloat16().float())


def test_flow_grpo_sde_step_on_the_scheduler_is_rgpo_sde_step_on_the_grid():
    """Flow-GRPO's ``sde_step_with_logprob`` run on a diffusers scheduler's sigmas (their sign convention) and
    rgpo's ``sde_step`` on ``flow_time_grid`` with v = -prediction give the same Gaussian and log-prob."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5, sigmas=np.linspace(1, 0.003 / 1.002, 5))
    grid = flow_time_grid(FlowMatchEulerDiscreteScheduler(shift=3.0), 5, sigmas=np.linspace(1, 0.003 / 1.002, 5))
    gen = torch.Generator().manual_seed(3)
    x, pred = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    z = torch.randn(2, 3, 4, 4, generator=gen)
    a = 0.7
    for i in (0, 2, 4):
        sigma, sigma_prev, sigma_max = scheduler.sigmas[i], scheduler.sigmas[i + 1], scheduler.sigmas[1]
        dt = sigma_prev - sigma
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * a
        their_mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + pred * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        their_sample = their_mean + std_dev_t * torch.sqrt(-dt) * z
        their_log_prob = (
            -((their_sample - their_mean) ** 2) / (2 * (std_dev_t * torch.sqrt(-dt)) ** 2)
            - torch.log(std_dev_t * torch.sqrt(-dt))
            - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
        ).mean(dim=(1, 2, 3))
        step = sde.sde_step(x, velocity_from_flow_prediction(pred), grid[i], grid[i + 1], a, noise=z)
        torch.testing.assert_close(step.mean, their_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step.sample, their_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step.log_prob, their_log_prob, atol=1e-4, rtol=1e-5)


# -- DDPM / DDIM: by hand ------------------------------------------------------------------------------------------

# Two training timesteps with betas [0.36, 0.4375]: alphas [0.64, 0.5625], abar [0.64, 0.36]. The step t = 1 -> 0:
#   abar_t = 0.36 (sqrt 0.6), abar_s = 0.64 (sqrt 0.8), alpha = 0.5625 (sqrt 0.75), beta = 0.4375
#   x = 1, eps = 0.5: x0_hat = (1 - 0.8 * 0.5) / 0.6 = 1
#   DDPM mean = 0.8 * 0.4375 / 0.64 * x0 + 0.75 * 0.36 / 0.64 * x = 0.546875 + 0.421875 = 0.96875
#   posterior variance = 0.36 / 0.64 * 0.4375 = 0.24609375, std = 0.49607837
TINY_BETAS = [0.36, 0.4375]
STD_SMALL = math.sqrt(0.24609375)


def tiny(cls, **kwargs):
    defaults = dict(num_train_timesteps=2, trained_betas=TINY_BETAS, clip_sample=False)
    scheduler = cls(**{**defaults, **kwargs})
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [1, 0]
    return scheduler


def test_ddpm_step_by_hand():
    x, eps, z = torch.ones(1, 2), torch.full((1, 2), 0.5), torch.tensor([[1.0, -2.0]])
    step = ddpm_step_with_logprob(tiny(DDPMScheduler), eps, 1, x, noise=z)
    torch.testing.assert_close(step.mean, torch.full((1, 2), 0.96875))
    assert step.std.item() == pytest.approx(STD_SMALL, abs=1e-7)
    torch.testing.assert_close(step.sample, torch.tensor([[0.96875 + STD_SMALL, 0.96875 - 2 * STD_SMALL]]))
    # log-prob: mean over the 2 elements of -z^2/2 - log std - log(2 pi)/2 = -(1 + 4)/4 - log(std) - 0.9189385
    expected = -(1 + 4) / 4 - math.log(STD_SMALL) - HALF_LOG_2PI
    assert step.log_prob.shape == (1,) and step.log_prob.item() == pytest.approx(expected, abs=1e-6)
    # fixed_large: std = sqrt(beta) = sqrt(0.4375), same mean
    large = ddpm_step_with_logprob(tiny(DDPMScheduler, variance_type="fixed_large"), eps, 1, x, noise=z)
    assert large.std.item() == pytest.approx(math.sqrt(0.4375), abs=1e-7)
    torch.testing.assert_close(large.mean, step.mean)
    # t = 0 -> -1 (abar_s = 1): no noise, no density
    last = ddpm_step_with_logprob(tiny(DDPMScheduler), eps, 0, x, noise=z)
    assert last.std.item() == 0 and torch.equal(last.sample, last.mean) and torch.equal(last.log_prob, torch.zeros(1))


def test_ddim_step_by_hand():
    x, eps, z = torch.ones(1, 2), torch.full((1, 2), 0.5), torch.tensor([[1.0, -2.0]])
    scheduler = tiny(DDIMScheduler, set_alpha_to_one=False)
    # eta = 1: std^2 = 0.24609375 (DDPM's), mean = 0.8 x0 + sqrt(1 - 0.64 - 0.24609375) eps = 0.8 + 0.3375 * 0.5
    step = ddim_step_with_logprob(scheduler, eps, 1, x, eta=1.0, noise=z)
    assert step.std.item() == pytest.approx(STD_SMALL, abs=1e-7)
    torch.testing.assert_close(step.mean, torch.full((1, 2), 0.96875))
    # eta = 0.5: std^2 = 0.0615234375, mean = 0.8 + sqrt(0.2984765625) * 0.5 = 1.0731653
    step = ddim_step_with_logprob(scheduler, eps, 1, x, eta=0.5, noise=z)
    assert step.std.item() == pytest.approx(0.5 * STD_SMALL, abs=1e-7)
    torch.testing.assert_close(step.mean, torch.full((1, 2), 0.8 + 0.5 * math.sqrt(0.2984765625)))
    expected = -(1 + 4) / 4 - math.log(0.5 * STD_SMALL) - HALF_LOG_2PI
    assert step.log_prob.item() == pytest.approx(expected, abs=1e-6)
    # eta = 0: the deterministic DDIM step, log-prob zeros
    step = ddim_step_with_logprob(scheduler, eps, 1, x, eta=0.0)
    torch.testing.assert_close(step.sample, torch.full((1, 2), 0.8 + 0.6 * 0.5))
    assert torch.equal(step.log_prob, torch.zeros(1))


def test_log_prob_is_torch_normal_with_per_row_timesteps():
    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(4)
    x, eps = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    t, prev = torch.tensor([90, 50, 10]), torch.tensor([80, 40, 0])
    step = ddpm_step_with_logprob(scheduler, eps, t, x, prev_timestep=prev, generator=torch.Generator().manual_seed(5))
    assert step.std.shape == (3, 1, 1, 1)
    expected = Normal(step.mean, step.std.expand_as(step.mean)).log_prob(step.sample).flatten(1).mean(1)
    torch.testing.assert_close(step.log_prob, expected, atol=1e-5, rtol=1e-6)
    # each row is the shared-timestep step of that row
    for row in range(3):
        alone = ddpm_step_with_logprob(scheduler, eps[row:row + 1], int(t[row]), x[row:row + 1],
                                       prev_timestep=int(prev[row]), prev_sample=step.sample[row:row + 1])
        torch.testing.assert_close(alone.mean, step.mean[row:row + 1])
        torch.testing.assert_close(alone.log_prob, step.log_prob[row:row + 1])


# -- DDPM / DDIM: equal to diffusers -------------------------------------------------------------------------------

DDPM_CONFIGS = {
    "epsilon": dict(),
    "clip_sample": dict(clip_sample=True, clip_sample_range=0.5),
    "thresholding": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=5.0),  # s = the quantile
    "v_prediction": dict(prediction_type="v_prediction"),
    "sample": dict(prediction_type="sample"),
    "fixed_small_log": dict(variance_type="fixed_small_log"),
    "fixed_large": dict(variance_type="fixed_large"),
}


def random_step_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, 4, generator=gen) * 2, torch.randn(2, 3, 4, 4, generator=gen)


@pytest.mark.parametrize("name", list(DDPM_CONFIGS))
def test_ddpm_step_is_diffusers_step(name):
    scheduler = DDPMScheduler(num_train_timesteps=100, **{"clip_sample": False, **DDPM_CONFIGS[name]})
    scheduler.set_timesteps(5)
    x, out = random_step_inputs(6)
    for t in scheduler.timesteps[[0, 2, 4]]:
        expected = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
        step = ddpm_step_with_logprob(scheduler, out, t, x, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(step.sample, expected, atol=1e-6, rtol=1e-6)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        if t > 0:
            torch.testing.assert_close(step.sample, step.mean + step.std * z)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range", "fixed_large_log"])
def test_unsupported_ddpm_variance_is_refused(variance_type):
    scheduler = DDPMScheduler(num_train_timesteps=100, variance_type=variance_type)
    scheduler.set_timesteps(5)
    x, out = random_step_inputs(8)
    with pytest.raises(ValueError, match="variance_type .* is not supported.*fixed_small"):
        ddpm_step_with_logprob(scheduler, out, scheduler.timesteps[0], x)


def test_wrong_scheduler_and_timestep_are_refused():
    x, out = random_step_inputs(8)
    ddim = tiny(DDIMScheduler)
    with pytest.raises(TypeError, match="needs a DDPMScheduler"):
        ddpm_step_with_logprob(ddim, out, 1, x)
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        ddpm_step_with_logprob(tiny(DDPMScheduler), out, torch.tensor(7), x)
    with pytest.raises(ValueError, match="integer timesteps"):
        ddim_step_with_logprob(ddim, out, 0.5, x)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        ddim_step_with_logprob(ddim, out, 1, x, eta=1.5)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("config", [dict(), dict(prediction_type="v_prediction", set_alpha_to_one=False),
                                    dict(clip_sample=True, clip_sample_range=0.5, timestep_spacing="trailing")])
def test_ddim_step_is_diffusers_step(eta, config):
    scheduler = DDIMScheduler(num_train_timesteps=100, **{"clip_sample": False, **config})
    scheduler.set_timesteps(5)
    x, out = random_step_inputs(9)
    for t in scheduler.timesteps[[0, 2, 4]]:
        expected = scheduler.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(10)).prev_sample
        step = ddim_step_with_logprob(scheduler, out, t, x, eta=eta, generator=torch.Generator().manual_seed(10))
        torch.testing.assert_close(step.sample, expected, atol=1e-6, rtol=1e-6)
        if eta == 0:
            assert torch.equal(step.log_prob, torch.zeros(2))


def test_ddpm_and_ddim_eta_one_are_the_same_gaussian():
    """DDIM with eta = 1 is DDPM's posterior over the same skip (unclipped x0): same mean, same std."""
    ddpm = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    ddim = DDIMScheduler(num_train_timesteps=100, clip_sample=False, set_alpha_to_one=True)
    ddpm.set_timesteps(5)
    ddim.set_timesteps(5)
    x, out = random_step_inputs(11)
    for t in (80, 40, 20):
        a = ddpm_step_with_logprob(ddpm, out, t, x, prev_timestep=t - 20, noise=torch.zeros_like(x))
        b = ddim_step_with_logprob(ddim, out, t, x, eta=1.0, prev_timestep=t - 20, noise=torch.zeros_like(x))
        torch.testing.assert_close(a.mean, b.mean, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(a.std, b.std)


# -- whole samplers and replay -------------------------------------------------------------------------------------


def diffusers_loop(scheduler, model, noise, generator, **step_kwargs):
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, generator=generator, **step_kwargs).prev_sample
    return x


def test_sample_ddpm_is_diffusers_loop_and_replays_with_ratio_one():
    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1)
    model = linear_model(12)
    # MM-Interleaved: one generator feeds the initial latents and every step's noise
    gen = torch.Generator().manual_seed(13)
    noise = torch.randn(2, 3, 4, 4, generator=gen)
    trajectory = sample_ddpm(model, noise, scheduler, 5, generator=gen)
    assert scheduler.num_inference_steps is None  # the caller's scheduler was not set

    reference = DDPMScheduler.from_config(scheduler.config)
    reference.set_timesteps(5)
    gen = torch.Generator().manual_seed(13)
    expected = diffusers_loop(reference, model, torch.randn(2, 3, 4, 4, generator=gen), gen)
    torch.testing.assert_close(trajectory.latents, expected, atol=1e-5, rtol=1e-5)

    # leading spacing, offset 1: timesteps [81, 61, 41, 21, 1] -> [61, 41, 21, 1, -1]. The last step lands on
    # abar = 1, where the posterior variance (1 - abar_s) / (1 - abar_t) beta is 0 (diffusers adds 1e-10 z):
    # deterministic, so not recorded
    assert trajectory.timesteps.tolist() == [81, 61, 41, 21]
    assert trajectory.next_timesteps.tolist() == [61, 41, 21, 1]
    assert trajectory.log_probs.shape == (2, 4) and trajectory.noise_level == 1.0
    for k in range(4):
        t = trajectory.timesteps[k].long()
        out = model(trajectory.x[:, k], t)
        step = replay_step(scheduler, out, trajectory, k)
        assert torch.equal(step.log_prob, trajectory.log_probs[:, k])  # on-policy ratio exactly 1
        # a different model output moves the log-prob
        assert not torch.equal(replay_step(scheduler, out + 0.1, trajectory, k).log_prob, trajectory.log_probs[:, k])


def test_sample_ddpm_skips_the_noiseless_last_step_and_follows_record():
    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False)  # leading, offset 0: ends at t = 0
    model = linear_model(14)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(15))
    full = sample_ddpm(model, noise, scheduler, 4, generator=torch.Generator().manual_seed(16))
    assert full.step_indices.tolist() == [0, 1, 2]
    window = sample_ddpm(model, noise, scheduler, 4, generator=torch.Generator().manual_seed(16),
                         record=[False, True, True, False])
    assert window.step_indices.tolist() == [1, 2]
    # recording does not change what is drawn
    assert torch.equal(window.latents, full.latents)
    assert torch.equal(window.log_probs, full.log_probs[:, 1:3])


def test_sample_ddpm_per_row_generators_are_diffusers_per_row_generators():
    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    model = linear_model(17)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(18))
    gens = [torch.Generator().manual_seed(s) for s in (19, 20)]
    trajectory = sample_ddpm(model, noise, scheduler, 4, generator=gens)
    reference = DDPMScheduler.from_config(scheduler.config)
    reference.set_timesteps(4)
    expected = diffusers_loop(reference, model, noise, [torch.Generator().manual_seed(s) for s in (19, 20)])
    torch.testing.assert_close(trajectory.latents, expected, atol=1e-5, rtol=1e-5)
    # row 1 alone with its own generator draws the same image
    alone = sample_ddpm(model, noise[1:], scheduler, 4, generator=[torch.Generator().manual_seed(20)])
    torch.testing.assert_close(alone.latents, trajectory.latents[1:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_ddim_is_diffusers_loop_and_replays_with_ratio_one(eta):
    scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False, set_alpha_to_one=False)
    model = linear_model(21)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(22))
    trajectory = sample_ddim(model, noise, scheduler, 4, eta=eta, generator=torch.Generator().manual_seed(23))
    reference = DDIMScheduler.from_config(scheduler.config)
    reference.set_timesteps(4)
    expected = diffusers_loop(reference, model, noise, torch.Generator().manual_seed(23), eta=eta)
    torch.testing.assert_close(trajectory.latents, expected, atol=1e-5, rtol=1e-5)
    assert trajectory.noise_level == eta
    # timesteps [75, 50, 25, 0]; the last step goes to final_alpha_cumprod = abar_0 (set_alpha_to_one=False), so
    # its variance (1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s) is 0 and it is not recorded
    assert trajectory.step_indices.tolist() == ([0, 1, 2] if eta > 0 else [])
    for k in range(trajectory.log_probs.shape[1]):
        out = model(trajectory.x[:, k], trajectory.timesteps[k].long())
        assert torch.equal(replay_step(scheduler, out, trajectory, k).log_prob, trajectory.log_probs[:, k])


def test_log_prob_gradient_reaches_the_model_output():
    """d log_prob / d eps for an epsilon DDPM step by hand: log_prob = mean_i [-(y_i - m_i)^2 / (2 std^2)] + c with
    m = c0 (x - sqrt(1 - abar_t) eps) / sqrt(abar_t) + c1 x, so d/d eps_i = -(y_i - m_i) / std^2 * c0 *
    sqrt(1 - abar_t) / sqrt(abar_t) / D. In the tiny schedule c0 = 0.546875, sqrt(1 - abar) / sqrt(abar) = 0.8 / 0.6."""
    x, y = torch.ones(1, 2), torch.tensor([[1.5, 0.5]])
    eps = torch.full((1, 2), 0.5, requires_grad=True)
    step = ddpm_step_with_logprob(tiny(DDPMScheduler), eps, 1, x, prev_sample=y)
    step.log_prob.sum().backward()
    expected = -(y - 0.96875) / 0.24609375 * 0.546875 * (0.8 / 0.6) / 2
    torch.testing.assert_close(eps.grad, expected)
