"""Flow-GRPO's SDE sampler for the decoder's rectified flow, with per-step Gaussian log-probs: pure functions.

Time convention (OmniGen's, the one :func:`rgpo.models.mindomni.euler_grid` walks): ``t`` runs from 0 (noise) to
1 (data), ``x_t = t * x1 + (1 - t) * eps`` with ``eps ~ N(0, I)``, the decoder predicts the velocity
``v = x1 - eps`` and the deterministic sampler is the Euler step ``x_next = x + dt * v``, ``dt = t_next - t > 0``.

Given ``v(x, t) = E[x1 - eps | x_t = x]``, the two posterior means are linear in ``(x, v)``::

    eps_hat = x - t * v          x1_hat = x + (1 - t) * v          score(x, t) = -eps_hat / (1 - t)

For ANY diffusion coefficient ``sigma(t)`` the SDE (time running forward, 0 -> 1)::

    dx = [ v - sigma(t)^2 / (2 (1 - t)) * (x - t v) ] dt + sigma(t) dW              (1)

has the same marginals as the ODE ``dx = v dt`` (it adds ``sigma^2 / 2 * score`` to the drift, which the noise
undoes in the Fokker-Planck equation). Flow-GRPO (Liu et al., 2025) takes ``sigma(t) = a * sqrt((1 - t) / t)``
(their ``a * sqrt(s / (1 - s))`` with noise-to-data time ``s = 1 - t``); ``a`` is the ``noise_level``. Then
``sigma^2 / (2 (1 - t)) = a^2 / (2 t)`` and one Euler-Maruyama step from ``t`` to ``t_next`` is the Gaussian::

    t~       = t if t > 0 else t_next                    (Flow-GRPO's clamp: sigma(0) is infinite; at the first
                                                          step they use the grid's second point)
    mean     = x + dt * [ v - a^2 / (2 t~) * (x - t v) ]
    std      = a * sqrt((1 - t) / t~) * sqrt(dt)
    x_next   = mean + std * z,   z ~ N(0, I)

This is Flow-GRPO's ``sde_step_with_logprob`` term by term after ``s = 1 - t``, ``v_theirs = -v``,
``dt_theirs = -dt``: their ``x (1 + std_dev^2 / (2 s) dt') + v' (1 + std_dev^2 (1 - s) / (2 s)) dt'`` is the
``mean`` above. ``a = 0`` is exactly the Euler step (``mean = x + dt * v``, ``std = 0``).

Log-probs: ``log N(x_next; mean, std^2)`` per element, then the MEAN over all non-batch dimensions (as Flow-GRPO
does, so their ratio clip ranges carry over and the value does not grow with the image size; the true
log-density of the step is this mean times the number of latent elements ``D``). Everything here computes in
float32 whatever the input dtype. Where ``std == 0`` (``noise_level == 0``) a density does not exist: log-probs
are returned as zeros.

KL to a reference: both velocities' steps share ``std``, so the KL of one step is, per element::

    exact      KL(N(mean, std^2) || N(mean_ref, std^2)) = |mean - mean_ref|^2 / (2 std^2)
    flow_grpo  |mean - mean_ref|^2 / (2 std_dev_t^2),  std_dev_t = std / sqrt(dt) = a sqrt((1 - t) / t~)

reduced like the log-probs (:func:`gaussian_step_kl`). Flow-GRPO's ``kl_loss`` (``scripts/train_sd3.py``) divides
by the ``std_dev_t`` that ``sde_step_with_logprob`` returns, which lacks the step's ``sqrt(dt)``: their value is
the exact KL times ``dt`` (1/S of it per step on a uniform S-step grid). Their KL coefficients (``beta`` 0.04 or
0.01) therefore do NOT carry over to the exact KL: the same number regularises ``1 / dt`` times harder there.
Use ``convention="flow_grpo"`` to reuse their coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# -- one step ----------------------------------------------------------------------------------------------------


@dataclass
class SDEStep:
    """One transition: ``sample`` (the next latents), its ``log_prob`` (N,) and the Gaussian it came from
    (``mean`` like the latents, ``std`` broadcastable to them). All float32."""

    sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _column(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A time as float32 broadcastable to ``like`` (N, ...): a scalar stays 0-dim, (N,) becomes (N, 1, ...)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"a time must be a scalar or ({like.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.dim() - 1)))


def euler_step(x: torch.Tensor, v: torch.Tensor, t, t_next) -> torch.Tensor:
    """The deterministic Euler step ``x + (t_next - t) * v`` (float32)."""
    x = x.float()
    return x + (_column(t_next, x) - _column(t, x)) * v.float()


def sde_mean_std(
    x: torch.Tensor, v: torch.Tensor, t, t_next, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the SDE step from ``t`` to ``t_next`` (module docstring)::

        t~ = t if t > 0 else t_next;   mean = x + dt [v - a^2/(2 t~) (x - t v)];   std = a sqrt((1-t) dt / t~)

    Args:
        x: (N, ...) latents at ``t``; v: (N, ...) velocity there (the guided one when sampling with CFG).
        t, t_next: floats, 0-dim tensors or (N,) tensors, ``0 <= t < t_next <= 1``.
        noise_level: ``a >= 0``; 0 gives exactly ``euler_step`` and ``std = 0``.
    Returns:
        ``(mean (N, ...), std)`` float32; ``std`` is 0-dim for scalar times, (N, 1, ...) for per-row times.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    x, v = x.float(), v.float()
    t, t_next = _column(t, x), _column(t_next, x)
    dt = t_next - t
    if noise_level == 0:
        return x + dt * v, torch.zeros_like(dt)
    t_safe = torch.where(t > 0, t, t_next)
    mean = x + dt * (v - noise_level**2 / (2 * t_safe) * (x - t * v))
    std = noise_level * torch.sqrt((1 - t) * dt / t_safe)
    return mean, std


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``log N(sample; mean, std^2)`` per element, MEAN over the non-batch dimensions: (N,) float32.

    Zeros where ``std == 0`` (no density; happens only for ``noise_level == 0``)."""
    sample, mean, std = sample.float(), mean.float(), std.float()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    per_element = -((sample - mean) ** 2) / (2 * safe**2) - torch.log(safe) - _HALF_LOG_2PI
    per_element = torch.where(std > 0, per_element, torch.zeros_like(per_element))
    return _reduce(per_element)


def _reduce(per_element: torch.Tensor) -> torch.Tensor:
    return per_element.flatten(1).mean(-1)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t,
    t_next,
    noise_level: float,
    *,
    noise: torch.Tensor | None = None,
    generator: Generators = None,
) -> SDEStep:
    """Draw ``x_next = mean + std * z`` (see :func:`sde_mean_std`) and its log-prob under ``N(mean, std^2)``.

    ``z`` is ``noise`` when given, else drawn by :func:`draw_noise` from ``generator``. With ``noise_level == 0``
    the sample is exactly the Euler step and the log-prob is zeros. The log-prob is computed from
    ``(sample, mean, std)`` by :func:`gaussian_log_prob`, the code :func:`sde_log_prob` runs, so recomputing it
    with the same velocity reproduces it bit for bit.
    """
    mean, std = sde_mean_std(x, v, t, t_next, noise_level)
    if noise_level == 0:
        sample = mean
    else:
        z = draw_noise(mean.shape, generator, mean.device) if noise is None else noise.float()
        sample = mean + std * z
    return SDEStep(sample, gaussian_log_prob(sample, mean, std), mean, std)


def sde_log_prob(
    x: torch.Tensor, v: torch.Tensor, t, t_next, x_next: torch.Tensor, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob (N,) of a recorded transition ``x -> x_next`` under the velocity ``v`` (e.g. the current policy's,
    with grad): the trainer's ratio ``exp(sde_log_prob(new v) - recorded log_prob)``. Same code path as
    :func:`sde_step`, so the same ``v`` gives exactly the recorded value. Also returns ``(mean, std)`` (for
    :func:`gaussian_step_kl` against a reference velocity's mean)."""
    mean, std = sde_mean_std(x, v, t, t_next, noise_level)
    return gaussian_log_prob(x_next, mean, std), mean, std


def gaussian_step_kl(
    mean_policy: torch.Tensor,
    mean_ref: torch.Tensor,
    std: torch.Tensor,
    *,
    convention: str = "exact",
    dt: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """KL of one SDE step between the policy's and the reference's Gaussians, MEAN over the non-batch dimensions
    like the log-probs: (N,) float32, exactly 0 for equal means. Both steps share ``std`` (it depends on the times
    and noise level only), so it is the scaled squared distance of the two means (module docstring).

    Args:
        mean_policy, mean_ref: (N, ...) the two steps' means (:func:`sde_mean_std` / :func:`sde_log_prob`).
        std: the steps' std as returned with them (``sqrt(dt)`` included), broadcastable, > 0.
        convention: ``"exact"``: ``|mean_policy - mean_ref|^2 / (2 std^2)``, the true KL of the step.
            ``"flow_grpo"``: Flow-GRPO's ``kl_loss``, whose std lacks ``sqrt(dt)``: ``exact * dt``.
        dt: ``t_next - t`` (float, 0-dim or (N,)), required by ``"flow_grpo"`` only.
    """
    diff = mean_policy.float() - mean_ref.float()
    per_element = diff**2 / (2 * std.float() ** 2)
    if convention == "exact":
        return _reduce(per_element)
    if convention == "flow_grpo":
        if dt is None:
            raise ValueError("gaussian_step_kl(convention='flow_grpo') needs dt = t_next - t: Flow-GRPO's KL is the "
                             "exact one times dt")
        return _reduce(per_element * _column(dt, diff))
    raise ValueError(f"unknown KL convention {convention!r}; valid: 'exact', 'flow_grpo'")


def draw_noise(shape: Sequence[int], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """Standard normal (N, ...) float32 on ``device``, drawn on the generator's device (a CPU generator gives the
    same numbers on every device). ``generator`` may be one generator for the whole batch, a sequence of N
    generators (row i from generator i: a row's noise then does not depend on the rest of the batch), or None
    (torch's global RNG)."""
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else "cpu"
        z = torch.randn(shape, generator=generator, device=gen_device)
    else:
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for {shape[0]} rows")
        z = torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator])
    return z.to(device)


# -- which steps are stochastic ------------------------------------------------------------------------------------


def stochastic_steps(steps: int, window: int | None = None, start: int = 0) -> list[bool]:
    """Which of the ``steps`` denoising steps take the SDE: all when ``window`` is None, else exactly the ``window``
    consecutive steps ``start .. start + window - 1`` (Flow-GRPO-Fast); the others are plain Euler steps."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if window is None:
        return [True] * steps
    if not 1 <= window <= steps:
        raise ValueError(f"sde window must be in 1..{steps}, got {window}")
    if not 0 <= start <= steps - window:
        raise ValueError(f"sde window start must be in 0..{steps - window} for {window} of {steps} steps, got {start}")
    return [start <= i < start + window for i in range(steps)]


def random_window_start(
    steps: int,
    window: int,
    generator: torch.Generator | None = None,
    window_range: tuple[int, int] | None = None,
) -> int:
    """A window start drawn uniformly from ``lo .. hi - window`` where ``window_range = (lo, hi)`` is a half-open
    range of step indices the window must stay in (default ``(0, steps)``), as Flow-GRPO-Fast's
    ``sde_window_range``. Drawn from ``generator`` (a CPU one; None: torch's global RNG)."""
    lo, hi = window_range if window_range is not None else (0, steps)
    if not (lo >= 0 and hi <= steps and hi - lo >= window >= 1):
        raise ValueError(f"sde window {window} does not fit in the range {(lo, hi)} of {steps} steps")
    return lo + int(torch.randint(0, hi - window - lo + 1, (1,), generator=generator))


# -- the whole sampler ---------------------------------------------------------------------------------------------


@dataclass
class SDETrajectory:
    """What a sampler run records for the policy gradient, rows first (so ``select`` follows the batch).

    ``x[:, k]`` are the latents entering the k-th stochastic step (denoising step ``step_indices[k]``, from time
    ``timesteps[k]`` to ``next_timesteps[k]``), ``x_next[:, k]`` what it drew, ``log_probs[:, k]`` the draw's
    log-prob (mean over latent elements). ``latents`` are the final latents. Recompute step k's log-prob under new
    velocities with ``sde_log_prob(x[:, k], v, timesteps[k], next_timesteps[k], x_next[:, k], noise_level)``.
    """

    latents: torch.Tensor  # (N, C, h, w) float32
    x: torch.Tensor  # (N, K, C, h, w) float32
    x_next: torch.Tensor  # (N, K, C, h, w) float32
    log_probs: torch.Tensor  # (N, K) float32
    timesteps: torch.Tensor  # (K,) float32
    next_timesteps: torch.Tensor  # (K,) float32
    step_indices: torch.Tensor  # (K,) long
    noise_level: float

    def select(self, rows: list[int]) -> SDETrajectory:
        index = torch.tensor(rows, dtype=torch.long, device=self.latents.device)
        return SDETrajectory(self.latents[index], self.x[index], self.x_next[index], self.log_probs[index],
                             self.timesteps, self.next_timesteps, self.step_indices, self.noise_level)

    @staticmethod
    def from_steps(latents: torch.Tensor, xs: list[torch.Tensor], nexts: list[torch.Tensor],
                   log_probs: list[torch.Tensor], indices: list[int], times: torch.Tensor, next_times: torch.Tensor,
                   noise_level: float) -> SDETrajectory:
        """What a sampling loop recorded: the latents entering (``xs``) and drawn at (``nexts``) the steps
        ``indices``, their log-probs, and every step's start and end times (``times[i]``, ``next_times[i]``, in
        the sampler's own convention: flow time or scheduler timesteps)."""
        index = torch.tensor(indices, dtype=torch.long, device=times.device)
        empty = latents.new_zeros((latents.shape[0], 0, *latents.shape[1:]))
        return SDETrajectory(
            latents=latents,
            x=torch.stack(xs, 1) if xs else empty,
            x_next=torch.stack(nexts, 1) if nexts else empty,
            log_probs=torch.stack(log_probs, 1) if log_probs else latents.new_zeros((latents.shape[0], 0)),
            timesteps=times[index].float(),
            next_timesteps=next_times[index].float(),
            step_indices=index,
            noise_level=float(noise_level),
        )

    @staticmethod
    def cat(parts: Sequence[SDETrajectory]) -> SDETrajectory:
        """The rows of several runs over the same stochastic steps, stacked in order."""
        first = parts[0]
        for part in parts[1:]:
            if not (torch.equal(part.step_indices, first.step_indices) and part.noise_level == first.noise_level):
                raise ValueError(f"cannot stack trajectories over different SDE steps: "
                                 f"{first.step_indices.tolist()} (noise level {first.noise_level}) vs "
                                 f"{part.step_indices.tolist()} (noise level {part.noise_level})")
        return SDETrajectory(*(torch.cat([getattr(p, name) for p in parts]) for name in ("latents", "x", "x_next",
                                                                                           "log_probs")),
                             first.timesteps, first.next_timesteps, first.step_indices, first.noise_level)


def sample_flow(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    grid: torch.Tensor,
    *,
    noise_level: float = 0.0,
    stochastic: Sequence[bool] | None = None,
    generator: Generators = None,
) -> SDETrajectory:
    """Integrate from ``noise`` over ``grid`` (t_0 = 0 .. t_S = 1, float32) in float32: SDE steps where
    ``stochastic[i]`` (default: every step when ``noise_level > 0``), exact Euler steps ``x + dt * v`` elsewhere.

    ``velocity(x, t)`` gets the float32 latents (N, ...) and the 0-dim time ``grid[i]``. Step noise comes from
    ``generator`` (:func:`draw_noise`), drawn only at stochastic steps. With ``noise_level == 0`` every step is
    the deterministic Euler step (the trajectory then records nothing: K = 0).
    """
    steps = grid.shape[0] - 1
    if stochastic is None:
        stochastic = [noise_level > 0] * steps
    if len(stochastic) != steps:
        raise ValueError(f"stochastic has {len(stochastic)} entries for {steps} steps")
    x = noise.float()
    xs, nexts, log_probs, indices = [], [], [], []
    for i in range(steps):
        v = velocity(x, grid[i]).float()
        if noise_level > 0 and stochastic[i]:
            step = sde_step(x, v, grid[i], grid[i + 1], noise_level, generator=generator)
            xs.append(x)
            nexts.append(step.sample)
            log_probs.append(step.log_prob)
            indices.append(i)
            x = step.sample
        else:
            x = euler_step(x, v, grid[i], grid[i + 1])
    return SDETrajectory.from_steps(x, xs, nexts, log_probs, indices, grid[:-1], grid[1:], noise_level)
