"""Every family's sampler through its own diffusers scheduler, with per-step Gaussian log-probs: pure functions.

Two kinds of sampler cover the four families (see ``families.md``):

**Flow matching** (MindOmni/OmniGen, Nexus-Gen/FLUX, BLIP3-o/Lumina). A ``FlowMatchEulerDiscreteScheduler`` walks
noise levels ``sigma_0 > ... > sigma_S`` with ``x_sigma = (1 - sigma) x0 + sigma * eps`` and the Euler step
``x + (sigma_next - sigma) * pred``, where the model predicts ``pred = eps - x0`` (FLUX, Lumina, SD3). In rgpo's
convention (:mod:`rgpo.sde`: ``t = 0`` noise, ``t = 1`` data, ``x_t = t x1 + (1 - t) eps``) that is::

    t = 1 - sigma,        v = x1 - eps = -pred,        x + (t_next - t) v = x + (sigma_next - sigma) pred

so :func:`flow_time_grid` turns the scheduler's sigmas into a time grid and :func:`velocity_from_flow_prediction`
flips the sign; :func:`rgpo.sde.sample_flow` then runs the Euler ODE (exactly the scheduler's steps, to float32
rounding of ``1 - sigma``) or Flow-GRPO's SDE with log-probs over that grid. OmniGen's scheduler is built with
``invert_sigmas=True, num_train_timesteps=1``: its "sigmas" are already rgpo's ``t`` (``1 - sigma``, ending at 1)
and its model output is already ``v``, so the grid is the sigmas themselves and no sign flip applies. The calls::

    MindOmni   flow_time_grid(FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1), N,
                              sigmas=np.linspace(1, 0, N + 1)[:N])          # OmniGen's pipeline; v = output
    Nexus-Gen  flow_time_grid(FlowMatchEulerDiscreteScheduler(shift=3.0), N,
                              sigmas=np.linspace(1, 0.003 / 1.002, N))      # DiffSynth's FlowMatchScheduler
    BLIP3-o    flow_time_grid(its scheduler (config shift), N, sigmas=np.linspace(1, 1 / N, N))

The values to feed the model at step ``i`` (e.g. ``sigma * 1000``, which BLIP3-o casts to long) are
``flow_model_timesteps(...)[i]``: take them by step index, never as ``1 - t`` (``1 - (1 - sigma)`` can differ from
``sigma`` by an ulp, enough to flip a floor).

**Ancestral diffusion** (MM-Interleaved's SD-2.1 UNet: ``DDPMScheduler``; DDPO-style ``DDIMScheduler`` with eta).
With ``abar_t`` the cumulative alphas, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, and the model's ``x0_hat``
(from epsilon, sample or v prediction, then clipped or dynamically thresholded as the scheduler's config says),
one step from ``t`` to ``s < t`` is the Gaussian ``N(mean, std^2 I)``:

    DDPM:  mean = sqrt(abar_s) beta / (1 - abar_t) x0_hat + sqrt(alpha) (1 - abar_s) / (1 - abar_t) x_t
           std^2 = (1 - abar_s) / (1 - abar_t) beta    (fixed_small / fixed_small_log),  beta  (fixed_large)
           with alpha = abar_t / abar_s, beta = 1 - alpha; no noise at t = 0
    DDIM:  std = eta * sqrt((1 - abar_s) / (1 - abar_t) * beta)
           mean = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - std^2) eps_hat

``abar_s`` for ``s < 0`` is 1 (DDPM) or the scheduler's ``final_alpha_cumprod`` (DDIM). The functions draw
``sample = mean + std * z`` exactly as ``scheduler.step`` does (same formulas in float32, noise drawn under the
same conditions, so one generator gives diffusers' trajectory), and return :class:`rgpo.sde.SDEStep` with the
log-prob ``log N(sample; mean, std^2)`` reduced like :mod:`rgpo.sde` (per element, MEAN over non-batch dims), so
Flow-GRPO / DDPO clip ranges apply unchanged. Where ``std == 0`` (DDPM at ``t = 0``, DDIM with eta 0, a DDIM
last step onto ``abar_s = 1`` or ``abar_s = abar_t``) the step is deterministic and its log-prob is zeros. Where diffusers' ``fixed_small`` variance is
``<= 1e-20`` (a last step onto ``abar_s = 1``) diffusers adds ``1e-10 * z``; this module takes the step as
deterministic instead (a density that narrow is float32 noise, not a log-prob).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from rgpo.sde import Generators, SDEStep, SDETrajectory, draw_noise, gaussian_log_prob

__all__ = [
    "flow_time_grid",
    "flow_model_timesteps",
    "velocity_from_flow_prediction",
    "ddpm_step_with_logprob",
    "ddim_step_with_logprob",
    "sample_ddpm",
    "sample_ddim",
    "replay_step",
]

_SUPPORTED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")
_SUPPORTED_PREDICTIONS = ("epsilon", "sample", "v_prediction")
# diffusers clamps the fixed_small variance to this before its sqrt / log
_MIN_VARIANCE = 1e-20


# -- flow matching -------------------------------------------------------------------------------------------------


def _set_flow_scheduler(
    scheduler: FlowMatchEulerDiscreteScheduler,
    num_inference_steps: int | None,
    sigmas: Sequence[float] | np.ndarray | None,
    mu: float | None,
) -> FlowMatchEulerDiscreteScheduler:
    """A copy of ``scheduler`` after ``set_timesteps``: the caller's scheduler (and its step counter) is untouched;
    a deep copy keeps a shift set with ``set_shift``, which ``from_config`` would drop."""
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(f"flow_time_grid needs a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
    if scheduler.config.stochastic_sampling:
        raise ValueError("FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) re-noises x0 at each step, "
                         "which is not the Euler / Flow-GRPO SDE sampler rgpo.sde runs; build it with False")
    if sigmas is not None:
        sigmas = [float(s) for s in np.asarray(sigmas, dtype=np.float64).reshape(-1)]
    local = copy.deepcopy(scheduler)
    local.set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)
    return local


def flow_time_grid(
    scheduler: FlowMatchEulerDiscreteScheduler,
    num_inference_steps: int | None = None,
    *,
    sigmas: Sequence[float] | np.ndarray | None = None,
    mu: float | None = None,
) -> torch.Tensor:
    """The times ``t_0 < ... < t_S`` (S + 1 points, float32, CPU) a flow scheduler walks, in rgpo's convention
    ``t = 1 - sigma`` (0 noise, 1 data), for :func:`rgpo.sde.sample_flow` (module docstring has each family's call).

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` (not modified: a copy is set). With ``invert_sigmas``
            (OmniGen) its sigmas are already ``1 - sigma`` and are returned as they are.
        num_inference_steps: S; may be None when ``sigmas`` is given.
        sigmas: the S noise levels to pass to ``set_timesteps`` (before the scheduler's shift, which is applied
            to them, as diffusers does); None: diffusers' default schedule.
        mu: the resolution-dependent shift, for schedulers with ``use_dynamic_shifting``.
    Raises:
        ValueError: when the grid is not strictly increasing inside [0, 1], e.g. OmniGen's
            ``num_train_timesteps=1`` scheduler without explicit ``sigmas`` (every sigma is then 1).
    """
    local = _set_flow_scheduler(scheduler, num_inference_steps, sigmas, mu)
    walked = local.sigmas.detach().to("cpu", torch.float32)
    grid = walked if local.config.invert_sigmas else 1 - walked
    if not (bool((grid[1:] > grid[:-1]).all()) and grid[0] >= 0 and grid[-1] <= 1):
        raise ValueError(f"the scheduler's sigmas {walked.tolist()} do not give a strictly increasing time grid in "
                         f"[0, 1]; a scheduler with num_train_timesteps={local.config.num_train_timesteps} may need "
                         f"explicit sigmas (OmniGen's pipeline passes np.linspace(1, 0, N + 1)[:N])")
    return grid


def flow_model_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler,
    num_inference_steps: int | None = None,
    *,
    sigmas: Sequence[float] | np.ndarray | None = None,
    mu: float | None = None,
) -> torch.Tensor:
    """The S values the diffusers pipeline feeds its model at each step (``scheduler.timesteps``: ``sigma *
    num_train_timesteps``, or ``t`` for OmniGen), float32 on CPU, aligned with :func:`flow_time_grid`'s first S
    points. Same arguments; the scheduler is not modified."""
    local = _set_flow_scheduler(scheduler, num_inference_steps, sigmas, mu)
    return local.timesteps.detach().to("cpu", torch.float32)


def velocity_from_flow_prediction(prediction: torch.Tensor) -> torch.Tensor:
    """rgpo's velocity ``v = x1 - eps`` from a sigma-convention flow prediction ``pred = eps - x0`` (FLUX, Lumina,
    SD3: ``x_sigma = (1 - sigma) x0 + sigma eps``, sigma = 1 noise): ``v = -pred``, float32. Not for OmniGen,
    whose output is already ``v``."""
    return -prediction.float()


# -- DDPM / DDIM ---------------------------------------------------------------------------------------------------


def _timestep(timestep, like: torch.Tensor, name: str) -> torch.Tensor:
    """An integer timestep as a long tensor: 0-dim for one shared by the batch, (N,) for one per row. Float input
    (e.g. a trajectory's float32 timesteps) must hold integers."""
    t = torch.as_tensor(timestep, device=like.device)
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"{name} must hold integer timesteps, got {t.tolist()}")
        t = t.round()
    t = t.long()
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != like.shape[0]):
        raise ValueError(f"{name} must be a scalar or ({like.shape[0]},), got shape {tuple(t.shape)}")
    return t


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values if values.dim() == 0 else values.view(-1, *([1] * (like.dim() - 1)))


def _alphas_cumprod(scheduler, t: torch.Tensor, below_zero: torch.Tensor) -> torch.Tensor:
    """``abar_t`` as float32 for a long ``t`` of any shape; ``below_zero`` where ``t < 0``."""
    table = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float32)
    below_zero = below_zero.to(device=t.device, dtype=torch.float32)
    return torch.where(t >= 0, table[t.clamp(min=0)], below_zero)


def _check_prediction(scheduler) -> None:
    if scheduler.config.prediction_type not in _SUPPORTED_PREDICTIONS:
        raise ValueError(f"prediction_type {scheduler.config.prediction_type!r} of {type(scheduler).__name__} is "
                         f"not supported; supported: {', '.join(_SUPPORTED_PREDICTIONS)}")


def _predict_x0_eps(
    scheduler, model_output: torch.Tensor, sample: torch.Tensor, abar_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, eps_hat)`` from the model output by the scheduler's prediction type, BEFORE clipping (diffusers'
    DDIM keeps the unclipped ``eps_hat`` unless ``use_clipped_model_output``, which this module does not use)."""
    beta_t = 1 - abar_t
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - beta_t ** (0.5) * model_output) / abar_t ** (0.5), model_output
    if kind == "sample":
        return model_output, (sample - abar_t ** (0.5) * model_output) / beta_t ** (0.5)
    return (abar_t**0.5) * sample - (beta_t**0.5) * model_output, (abar_t**0.5) * model_output + (beta_t**0.5) * sample


def _clip_x0(scheduler, x0: torch.Tensor) -> torch.Tensor:
    """The scheduler's ``thresholding`` (Imagen's dynamic thresholding per sample) or ``clip_sample``, as diffusers
    applies them; identity when both are off."""
    config = scheduler.config
    if config.thresholding:
        rows = x0.reshape(x0.shape[0], -1)
        s = torch.quantile(rows.abs(), config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(s, min=1, max=config.sample_max_value).unsqueeze(1)
        return (torch.clamp(rows, -s, s) / s).reshape(x0.shape)
    if config.clip_sample:
        return x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0


def _finish(
    mean: torch.Tensor,
    std: torch.Tensor,
    draw: bool,
    prev_sample: torch.Tensor | None,
    generator: Generators,
    noise: torch.Tensor | None,
) -> SDEStep:
    """Sample (unless ``prev_sample`` is given: then score it) and take the log-prob by the code
    :func:`rgpo.sde.sde_step` uses, so a recorded transition rescored with the same model output gives the same
    value bit for bit."""
    if prev_sample is not None:
        sample = prev_sample.float()
    elif draw:
        z = draw_noise(mean.shape, generator, mean.device) if noise is None else noise.float()
        sample = mean + std * z
    else:
        sample = mean
    return SDEStep(sample, gaussian_log_prob(sample, mean, std), mean, std)


def _check_ddpm(scheduler) -> None:
    if not isinstance(scheduler, DDPMScheduler):
        raise TypeError(f"ddpm_step_with_logprob needs a DDPMScheduler, got {type(scheduler).__name__}")
    _check_prediction(scheduler)
    if scheduler.config.variance_type not in _SUPPORTED_VARIANCES:
        raise ValueError(f"variance_type {scheduler.config.variance_type!r} is not supported (a learned variance "
                         f"makes the step's std a model output; fixed_large_log is NaN in diffusers' own step); "
                         f"supported: {', '.join(_SUPPORTED_VARIANCES)}")


def _ddpm_previous(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """diffusers' ``DDPMScheduler.previous_timestep`` per element (the next entry of ``scheduler.timesteps``, -1
    after the last; ``t - 1`` before ``set_timesteps``)."""
    values = []
    set_steps = scheduler.custom_timesteps or scheduler.num_inference_steps
    for value in t.reshape(-1).tolist():
        if set_steps and not bool((scheduler.timesteps == value).any()):
            raise ValueError(f"timestep {value} is not one of the scheduler's timesteps "
                                 f"{scheduler.timesteps.tolist()}; pass prev_timestep or call set_timesteps")
        values.append(int(scheduler.previous_timestep(value)))
    return torch.tensor(values, dtype=torch.long, device=t.device).reshape(t.shape)


def ddpm_step_with_logprob(
    scheduler: DDPMScheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    *,
    prev_timestep=None,
    prev_sample: torch.Tensor | None = None,
    generator: Generators = None,
    noise: torch.Tensor | None = None,
) -> SDEStep:
    """One ancestral DDPM step ``t -> prev_timestep`` with its Gaussian log-prob (module docstring), float32.

    Args:
        scheduler: a ``DDPMScheduler`` with variance_type fixed_small, fixed_small_log or fixed_large and
            prediction_type epsilon, sample or v_prediction (others raise); ``clip_sample`` and ``thresholding``
            are applied to ``x0_hat`` as diffusers does.
        model_output: (N, C, ...) the (guided) model output at ``sample``; may carry grad.
        timestep: the integer timestep: int, 0-dim or (N,) tensor (float tensors must hold integers).
        sample: (N, C, ...) latents at ``timestep``.
        prev_timestep: the timestep stepped to (-1 past the end); None: the scheduler's next timestep after
            ``set_timesteps`` (``diffusers.DDPMScheduler.previous_timestep``).
        prev_sample: a recorded next sample to score instead of drawing one (the policy-gradient ratio).
        generator: the step noise's generator(s) (:func:`rgpo.sde.draw_noise`); noise is drawn when some row has
            ``t > 0``, as diffusers draws it, so the same generator reproduces ``scheduler.step``.
        noise: the standard normal ``z`` itself, instead of ``generator``.
    Returns:
        ``SDEStep(sample, log_prob (N,), mean, std)``; ``std`` is 0-dim for a shared timestep, (N, 1, ...) per row.
    """
    _check_ddpm(scheduler)
    model_output, sample = model_output.float(), sample.float()
    t = _timestep(timestep, sample, "timestep")
    prev = _ddpm_previous(scheduler, t) if prev_timestep is None else _timestep(prev_timestep, sample, "prev_timestep")
    abar_t = _column(_alphas_cumprod(scheduler, t, torch.tensor(1.0)), sample)
    abar_s = _column(_alphas_cumprod(scheduler, prev, torch.tensor(1.0)), sample)
    beta_prod_t, beta_prod_s = 1 - abar_t, 1 - abar_s
    alpha = abar_t / abar_s
    beta = 1 - alpha

    x0, _ = _predict_x0_eps(scheduler, model_output, sample, abar_t)
    x0 = _clip_x0(scheduler, x0)
    mean = (abar_s ** (0.5) * beta) / beta_prod_t * x0 + alpha ** (0.5) * beta_prod_s / beta_prod_t * sample

    small = (1 - abar_s) / (1 - abar_t) * beta
    kind = scheduler.config.variance_type
    if kind == "fixed_small":
        std, variance = torch.clamp(small, min=_MIN_VARIANCE) ** 0.5, small
    elif kind == "fixed_small_log":
        std, variance = torch.exp(0.5 * torch.log(torch.clamp(small, min=_MIN_VARIANCE))), small
    else:
        std, variance = beta**0.5, beta
    noisy = _column(t > 0, sample) & (variance > _MIN_VARIANCE)
    std = torch.where(noisy, std, torch.zeros_like(std))
    return _finish(mean, std, bool((t > 0).any()), prev_sample, generator, noise)


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    *,
    eta: float = 1.0,
    prev_timestep=None,
    prev_sample: torch.Tensor | None = None,
    generator: Generators = None,
    noise: torch.Tensor | None = None,
) -> SDEStep:
    """One DDIM step ``t -> prev_timestep`` with noise ``eta`` and its Gaussian log-prob (DDPO's
    ``ddim_step_with_logprob``; module docstring), float32. ``eta = 1`` has DDPM's posterior variance, 0 is the
    deterministic DDIM step (log-prob zeros).

    Args:
        scheduler: a ``DDIMScheduler`` (prediction_type epsilon, sample or v_prediction; ``clip_sample`` /
            ``thresholding`` applied as diffusers does; ``use_clipped_model_output`` is not offered).
        eta: in [0, 1] (beyond 1 the direction term's square root goes negative).
        prev_timestep: None: diffusers' ``t - num_train_timesteps // num_inference_steps`` (needs
            ``set_timesteps``); a recorded trajectory passes its own.
        Others as :func:`ddpm_step_with_logprob`; noise is drawn when ``eta > 0``, as diffusers draws it.
    """
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(f"ddim_step_with_logprob needs a DDIMScheduler, got {type(scheduler).__name__}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    _check_prediction(scheduler)
    model_output, sample = model_output.float(), sample.float()
    t = _timestep(timestep, sample, "timestep")
    if prev_timestep is None:
        if scheduler.num_inference_steps is None:
            raise ValueError("call scheduler.set_timesteps first, or pass prev_timestep")
        prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    else:
        prev = _timestep(prev_timestep, sample, "prev_timestep")
    abar_t = _column(_alphas_cumprod(scheduler, t, scheduler.final_alpha_cumprod), sample)
    abar_s = _column(_alphas_cumprod(scheduler, prev, scheduler.final_alpha_cumprod), sample)
    beta_prod_t = 1 - abar_t

    x0, eps = _predict_x0_eps(scheduler, model_output, sample, abar_t)
    x0 = _clip_x0(scheduler, x0)
    variance = ((1 - abar_s) / beta_prod_t) * (1 - abar_t / abar_s)
    std = eta * variance ** (0.5)
    mean = abar_s ** (0.5) * x0 + (1 - abar_s - std**2) ** (0.5) * eps
    return _finish(mean, std, eta > 0, prev_sample, generator, noise)


# -- whole samplers and replay -------------------------------------------------------------------------------------


def _record_mask(record: bool | Sequence[bool], steps: int) -> list[bool]:
    if isinstance(record, bool):
        return [record] * steps
    record = [bool(r) for r in record]
    if len(record) != steps:
        raise ValueError(f"record has {len(record)} entries for {steps} steps")
    return record


def _sample_loop(
    step_fn: Callable[..., SDEStep],
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    previous: torch.Tensor,
    record: list[bool],
    generator: Generators,
    noise_level: float,
) -> SDETrajectory:
    x = noise.float()
    xs, nexts, log_probs, indices = [], [], [], []
    for i, t in enumerate(timesteps):
        step = step_fn(model_fn(x, t).float(), t, x, prev_timestep=previous[i], generator=generator)
        # a zero-std step has no density: recording it would only cost a forward pass at replay
        if record[i] and bool((step.std > 0).all()):
            xs.append(x)
            nexts.append(step.sample)
            log_probs.append(step.log_prob)
            indices.append(i)
        x = step.sample
    return SDETrajectory.from_steps(x, xs, nexts, log_probs, indices, timesteps, previous, noise_level)


def sample_ddpm(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    scheduler: DDPMScheduler,
    num_inference_steps: int,
    *,
    generator: Generators = None,
    record: bool | Sequence[bool] = True,
) -> SDETrajectory:
    """Ancestral DDPM sampling from ``noise`` over ``num_inference_steps``, recording the steps' log-probs.

    ``model_fn(x, t)`` gets the float32 latents (N, ...) and the 0-dim long timestep and returns the (guided)
    model output. Step noise comes from ``generator`` exactly as ``scheduler.step`` draws it, so with the same
    initial noise and generator the latents are diffusers' (MM-Interleaved feeds the initial latents and every
    step's noise from one generator: draw ``noise`` from it first). ``scheduler`` is not modified (a copy is set).
    ``record`` (one bool or one per step) says which steps go into the trajectory; steps with ``std == 0`` (the
    last, at ``t = 0``) never do. The trajectory's ``timesteps`` / ``next_timesteps`` are the integer timesteps
    (as float32) and ``noise_level`` is 1.0; rescore step k with :func:`replay_step`.
    """
    _check_ddpm(scheduler)
    local = copy.deepcopy(scheduler)
    local.set_timesteps(num_inference_steps, device=noise.device)
    timesteps = local.timesteps.to(noise.device)
    previous = _ddpm_previous(local, timesteps)

    def step_fn(model_output, t, x, **kwargs):
        return ddpm_step_with_logprob(local, model_output, t, x, **kwargs)

    return _sample_loop(step_fn, model_fn, noise, timesteps, previous, _record_mask(record, len(timesteps)),
                        generator, 1.0)


def sample_ddim(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    scheduler: DDIMScheduler,
    num_inference_steps: int,
    *,
    eta: float = 1.0,
    generator: Generators = None,
    record: bool | Sequence[bool] = True,
) -> SDETrajectory:
    """DDIM sampling with noise ``eta`` (DDPO's sampler), as :func:`sample_ddpm`; the trajectory's
    ``noise_level`` is ``eta`` (what :func:`replay_step` rescores with). ``eta = 0`` records nothing."""
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(f"sample_ddim needs a DDIMScheduler, got {type(scheduler).__name__}")
    local = copy.deepcopy(scheduler)
    local.set_timesteps(num_inference_steps, device=noise.device)
    timesteps = local.timesteps.to(noise.device)
    previous = timesteps - local.config.num_train_timesteps // local.num_inference_steps

    def step_fn(model_output, t, x, **kwargs):
        return ddim_step_with_logprob(local, model_output, t, x, eta=eta, **kwargs)

    return _sample_loop(step_fn, model_fn, noise, timesteps, previous, _record_mask(record, len(timesteps)),
                        generator, eta)


def replay_step(
    scheduler: DDPMScheduler | DDIMScheduler, model_output: torch.Tensor, trajectory: SDETrajectory, k: int
) -> SDEStep:
    """Rescore the k-th recorded step of a :func:`sample_ddpm` / :func:`sample_ddim` trajectory under a new model
    output (e.g. the current policy's, with grad): its ``log_prob`` over ``recorded log_probs[:, k]`` is the
    policy-gradient ratio, exactly 1 for the sampling policy's own output. Needs only the scheduler's config
    (the trajectory carries the timesteps)."""
    x, x_next = trajectory.x[:, k], trajectory.x_next[:, k]
    t, prev = trajectory.timesteps[k], trajectory.next_timesteps[k]
    if isinstance(scheduler, DDIMScheduler):
        return ddim_step_with_logprob(scheduler, model_output, t, x, eta=trajectory.noise_level, prev_timestep=prev,
                                      prev_sample=x_next)
    if isinstance(scheduler, DDPMScheduler):
        return ddpm_step_with_logprob(scheduler, model_output, t, x, prev_timestep=prev, prev_sample=x_next)
    raise TypeError(f"replay_step needs a DDPMScheduler or DDIMScheduler, got {type(scheduler).__name__}")

