"""Image samplers a family hands the trainer: the denoising loop, with per-step Gaussian log-probs when stochastic.

A family's generator predicts something at latents ``x`` and a time; the sampler owns what that prediction
means, how one step moves ``x``, and the Gaussian of a stochastic step (its ``transition``), so the image policy
can replay any recorded step under new weights without knowing the family:

    log_prob, mean, std = sampler.log_prob(prediction, x, t, t_next, x_next, noise_level)

:class:`FlowSampler` is rectified flow in rgpo's time (t = 0 noise, t = 1 data, velocity = data - noise): its
stochastic step is Flow-GRPO's SDE (:mod:`rgpo.sde`); a family whose scheduler counts sigma = 1 as noise
(FLUX, Lumina, SD3) gives ``1 - sigma`` as the grid and ``-prediction`` as the velocity. The degenerate case
``noise_level = 0`` is the deterministic Euler sampler, bit for bit.

:class:`DDPMSampler` and :class:`DDIMSampler` are the epsilon- (or sample-, v-) prediction families' samplers
(MM-Interleaved's SD-2.1 UNet: ``DDPMScheduler``, ancestral; DDPO-style ``DDIMScheduler`` with ``eta``) over the
steps of :mod:`rgpo.schedulers`, behind the same protocol (:class:`ImageSampler`). Their "time" is the scheduler's
integer timestep: ``predict(x, t)`` gets it as a 0-dim long tensor while sampling, and a trajectory records it
as float32 (:class:`rgpo.sde.SDETrajectory`'s convention, integers held exactly), which is what the image policy
hands back to ``predict`` and ``log_prob`` at replay (a family's prediction takes ``t.long()``). What
``noise_level`` means there:

* DDPM: any ``noise_level > 0`` is "stochastic": the step's std is the scheduler's posterior std, its value is not
  a scale. ``noise_level == 0`` is REFUSED (ValueError): DDPM's steps are always stochastic, it has no
  deterministic sampler to fall back to (use :class:`DDIMSampler` for one).
* DDIM: ``noise_level > 0`` runs the sampler's ``eta`` (fixed at construction), ``noise_level == 0`` is the
  deterministic DDIM step (``eta = 0``; nothing recorded, like the flow sampler's Euler).

Steps outside the SDE window (``stochastic[i]`` False) draw no noise and are not recorded: DDPM takes the
posterior MEAN of its step (the Gaussian's mean without its noise), DDIM the deterministic ``eta = 0`` step (the
step ``noise_level = 0`` would take, as the flow sampler takes Euler). A step whose std is 0 (the last step onto
``abar = 1`` or ``t = 0``) has no density and is never recorded, so the window is drawn among the noisy steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from rgpo.schedulers import ddim_step_with_logprob, ddpm_step_with_logprob
from rgpo.sde import (
    Generators,
    SDEStep,
    SDETrajectory,
    random_window_start,
    sample_flow,
    sde_log_prob,
    sde_mean_std,
    stochastic_steps,
)

__all__ = ["ImageSampler", "FlowSampler", "DDPMSampler", "DDIMSampler"]

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ImageSampler(Protocol):
    """What the trainer asks of a family's sampler (:class:`FlowSampler`, :class:`DDPMSampler`,
    :class:`DDIMSampler`)."""

    kind: str

    @property
    def num_steps(self) -> int: ...

    def window(self, size: int | None, start: int | None, window_range: tuple[int, int] | None,
               generator: Generators) -> list[bool]: ...

    def sample(self, predict: Predict, noise: torch.Tensor, *, noise_level: float = 0.0,
               stochastic: Sequence[bool] | None = None, generator: Generators = None) -> SDETrajectory: ...

    def transition(self, prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                   noise_level: float) -> tuple[torch.Tensor, torch.Tensor]: ...

    def log_prob(self, prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                 x_next: torch.Tensor, noise_level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def _first_generator(generator: Generators) -> torch.Generator | None:
    """The generator a window start is drawn from: the one generator, or the first of per-row ones."""
    return generator if isinstance(generator, torch.Generator) or generator is None else generator[0]


class FlowSampler:
    """Euler / Flow-GRPO SDE over a time grid ``t_0 = 0 .. t_S = 1`` (float32, rgpo's convention)."""

    kind = "flow"

    def __init__(self, grid: torch.Tensor):
        if grid.dim() != 1 or grid.shape[0] < 2:
            raise ValueError(f"a flow grid needs at least 2 times, got shape {tuple(grid.shape)}")
        self.grid = grid.float()

    @property
    def num_steps(self) -> int:
        return self.grid.shape[0] - 1

    def window(self, size: int | None, start: int | None, window_range: tuple[int, int] | None,
               generator: Generators) -> list[bool]:
        """Which steps are stochastic: every one without a window; else ``size`` consecutive ones from ``start``
        (drawn from ``generator`` inside ``window_range`` when None)."""
        if size is None:
            return [True] * self.num_steps
        if start is None:
            start = random_window_start(self.num_steps, size, _first_generator(generator), window_range)
        return stochastic_steps(self.num_steps, size, start)

    def sample(self, predict: Predict, noise: torch.Tensor, *, noise_level: float = 0.0, stochastic: Sequence[bool] | None = None,
               generator: Generators = None) -> SDETrajectory:
        """Integrate ``predict(x, t)`` (the velocity, float32) from ``noise`` over the grid."""
        return sample_flow(predict, noise, self.grid.to(noise.device), noise_level=noise_level,
                           stochastic=stochastic, generator=generator)

    @staticmethod
    def transition(prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                   noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian (mean, std) of the stochastic step from ``t`` to ``t_next`` at velocity ``prediction``."""
        return sde_mean_std(x, prediction, t, t_next, noise_level)

    @staticmethod
    def log_prob(prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                 x_next: torch.Tensor, noise_level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log_prob (N,), mean, std)`` of a recorded step ``x -> x_next``: the sampler's own code path, so the
        prediction it sampled with gives exactly the recorded log-prob (on-policy ratio 1)."""
        return sde_log_prob(x, prediction, t, t_next, x_next, noise_level)


class _AncestralSampler:
    """The DDPM / DDIM loop over a diffusers scheduler's integer timesteps (module docstring); subclasses give
    the step (:meth:`_step`), its deterministic stand-in outside the window (:meth:`_plain`) and what
    ``noise_level`` means (:meth:`_check_noise_level`)."""

    kind = "ancestral"
    scheduler_type: type = DDPMScheduler
    _stochastic_level = 1.0  # a noise_level that means "stochastic" to every subclass

    def __init__(self, scheduler, num_inference_steps: int):
        if not isinstance(scheduler, self.scheduler_type):
            raise TypeError(f"{type(self).__name__} needs a {self.scheduler_type.__name__}, got "
                            f"{type(scheduler).__name__}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        # a copy: the caller's scheduler (and its step counter) is untouched; the copy is only read from now on
        local = copy.deepcopy(scheduler)
        local.set_timesteps(num_inference_steps)
        self.scheduler = local
        self.timesteps = local.timesteps.detach().to("cpu", torch.long)
        self.previous = self._previous_timesteps()
        # which steps have a density when stochastic (std > 0): the window is drawn among them
        probe = torch.zeros(1, 1)
        self.noisy = [bool((self._step(probe, probe, t, s, self._stochastic_level, prev_sample=probe).std > 0).all())
                      for t, s in zip(self.timesteps, self.previous)]

    def _previous_timesteps(self) -> torch.Tensor:
        raise NotImplementedError

    def _check_noise_level(self, noise_level: float) -> None:
        if noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")

    def _step(self, prediction, x, t, t_next, noise_level: float, **kwargs) -> SDEStep:
        raise NotImplementedError

    def _plain(self, prediction, x, t, t_next) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def window(self, size: int | None, start: int | None, window_range: tuple[int, int] | None,
               generator: Generators) -> list[bool]:
        """As :meth:`FlowSampler.window`, among the steps that have a density: every step without a window (the
        noiseless ones are then not recorded); a drawn start stays inside ``window_range`` (default: every step)
        cut to the noisy steps, so a window always records ``size`` steps; an explicit ``start`` whose window
        holds a noiseless step is refused."""
        if size is None:
            return [True] * self.num_steps
        noisy_end = self.noisy.index(False) if False in self.noisy else self.num_steps
        if start is None:
            lo, hi = window_range if window_range is not None else (0, self.num_steps)
            if not (lo >= 0 and hi <= self.num_steps):
                raise ValueError(f"sde window range {(lo, hi)} is not inside the {self.num_steps} steps")
            if min(hi, noisy_end) - lo < size:
                raise ValueError(f"sde window {size} does not fit in the range {(lo, hi)} cut to the "
                                 f"{noisy_end} steps with noise (steps {noisy_end}.. have std 0: no log-prob)")
            start = random_window_start(self.num_steps, size, _first_generator(generator), (lo, min(hi, noisy_end)))
        window = stochastic_steps(self.num_steps, size, start)
        silent = [i for i, (w, n) in enumerate(zip(window, self.noisy)) if w and not n]
        if silent:
            raise ValueError(f"sde window of {size} steps from {start} holds step(s) {silent}, whose std is 0 (no "
                             f"log-prob to record); windows must lie in steps 0..{noisy_end - 1}")
        return window

    def sample(self, predict: Predict, noise: torch.Tensor, *, noise_level: float = 0.0,
               stochastic: Sequence[bool] | None = None, generator: Generators = None) -> SDETrajectory:
        """Denoise ``noise`` over the scheduler's timesteps in float32: the stochastic step where
        ``noise_level > 0 and stochastic[i]`` (default: every step), the deterministic stand-in elsewhere (module
        docstring). ``predict(x, t)`` gets the float32 latents and the 0-dim long timestep and returns the
        (guided) model output. Step noise comes from ``generator`` (:func:`rgpo.sde.draw_noise`, one or one per
        row), drawn at stochastic steps exactly as ``scheduler.step`` draws it: with every step stochastic, the
        same initial noise and generator give diffusers' own loop. Records the stochastic steps with std > 0."""
        self._check_noise_level(noise_level)
        steps = self.num_steps
        if stochastic is None:
            stochastic = [noise_level > 0] * steps
        if len(stochastic) != steps:
            raise ValueError(f"stochastic has {len(stochastic)} entries for {steps} steps")
        timesteps, previous = self.timesteps.to(noise.device), self.previous.to(noise.device)
        x = noise.float()
        xs, nexts, log_probs, indices = [], [], [], []
        for i in range(steps):
            t, t_next = timesteps[i], previous[i]
            prediction = predict(x, t).float()
            if noise_level > 0 and stochastic[i]:
                step = self._step(prediction, x, t, t_next, noise_level, generator=generator)
                if bool((step.std > 0).all()):
                    xs.append(x)
                    nexts.append(step.sample)
                    log_probs.append(step.log_prob)
                    indices.append(i)
                x = step.sample
            else:
                x = self._plain(prediction, x, t, t_next)
        return SDETrajectory.from_steps(x, xs, nexts, log_probs, indices, timesteps, previous, noise_level)

    def transition(self, prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                   noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian (mean, std) of the step from timestep ``t`` to ``t_next`` (integers, as long or float
        tensors, 0-dim or (N,)) at model output ``prediction``: the stochastic step's, for ``noise_level``."""
        self._check_noise_level(noise_level)
        step = self._step(prediction, x, t, t_next, noise_level, prev_sample=x)
        return step.mean, step.std

    def log_prob(self, prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                 x_next: torch.Tensor, noise_level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log_prob (N,), mean, std)`` of a recorded step ``x -> x_next``: the code path :meth:`sample` drew
        it with, so the model output it sampled with gives exactly the recorded log-prob (ratio 1)."""
        self._check_noise_level(noise_level)
        step = self._step(prediction, x, t, t_next, noise_level, prev_sample=x_next)
        return step.log_prob, step.mean, step.std


class DDPMSampler(_AncestralSampler):
    """Ancestral DDPM sampling (:func:`rgpo.schedulers.ddpm_step_with_logprob`) over a ``DDPMScheduler`` set to
    ``num_inference_steps`` (MM-Interleaved: SD-2.1's scheduler, 30 steps). Every step is stochastic:
    ``noise_level`` must be > 0 (its value is not used: the std is the scheduler's posterior std) and 0 is
    refused; steps outside the SDE window take the posterior mean."""

    kind = "ddpm"
    scheduler_type = DDPMScheduler

    def _previous_timesteps(self) -> torch.Tensor:
        # diffusers' DDPMScheduler.previous_timestep: the next entry of the set timesteps, -1 after the last
        return torch.tensor([int(self.scheduler.previous_timestep(int(t))) for t in self.timesteps],
                            dtype=torch.long)

    def _check_noise_level(self, noise_level: float) -> None:
        super()._check_noise_level(noise_level)
        if noise_level == 0:
            raise ValueError("DDPMSampler got noise_level=0, but DDPM's steps are always stochastic: there is no "
                             "deterministic DDPM sampler. Use noise_level > 0 (any value: the step's std is the "
                             "scheduler's posterior std), or a DDIMSampler, whose noise_level=0 is deterministic "
                             "DDIM (eta=0)")

    def _step(self, prediction, x, t, t_next, noise_level: float, **kwargs) -> SDEStep:
        return ddpm_step_with_logprob(self.scheduler, prediction, t, x, prev_timestep=t_next, **kwargs)

    def _plain(self, prediction, x, t, t_next) -> torch.Tensor:
        # the posterior mean: the step's Gaussian without its noise (prev_sample only skips the draw)
        return ddpm_step_with_logprob(self.scheduler, prediction, t, x, prev_timestep=t_next, prev_sample=x).mean


class DDIMSampler(_AncestralSampler):
    """DDIM sampling (:func:`rgpo.schedulers.ddim_step_with_logprob`, DDPO's sampler) over a ``DDIMScheduler``
    set to ``num_inference_steps``. ``noise_level > 0`` takes the stochastic step with this sampler's ``eta`` in
    (0, 1] (``eta = 1``: DDPM's posterior variance; the value of ``noise_level`` is not used);
    ``noise_level == 0`` is the deterministic DDIM sampler (``eta = 0``), which is also what steps outside the SDE
    window take."""

    kind = "ddim"
    scheduler_type = DDIMScheduler

    def __init__(self, scheduler: DDIMScheduler, num_inference_steps: int, *, eta: float = 1.0):
        if not 0 < eta <= 1:
            raise ValueError(f"DDIMSampler's eta must be in (0, 1] (noise_level=0 already gives the "
                             f"deterministic eta=0 sampler), got {eta}")
        self.eta = float(eta)
        super().__init__(scheduler, num_inference_steps)

    def _previous_timesteps(self) -> torch.Tensor:
        # diffusers' DDIMScheduler.step: t - num_train_timesteps // num_inference_steps
        return self.timesteps - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps

    def _step(self, prediction, x, t, t_next, noise_level: float, **kwargs) -> SDEStep:
        eta = self.eta if noise_level > 0 else 0.0
        return ddim_step_with_logprob(self.scheduler, prediction, t, x, eta=eta, prev_timestep=t_next, **kwargs)

    def _plain(self, prediction, x, t, t_next) -> torch.Tensor:
        return self._step(prediction, x, t, t_next, 0.0).sample
