"""Interleaved rollouts: chains that hold several images, each drawn INSIDE the chain (MM-Interleaved), and how
their rewards are credited to the text and to each image.

**Rollout.** A family with ``UnifiedModel.interleaved`` samples its chains with
``generate(..., draw=drawer)``: at each image slot the chain hands its condition to :class:`InterleavedDrawer`,
which owns the noise (initial latents and stochastic steps seeded by (seed, step, chain or group, slot), so a
slot's noise does not depend on its batch), samples the image (recording every stochastic step, keyed by
(chain, slot)) and returns the pixels that the chain then continues from. The training forward puts the same
images back in their slots (``Completions.images``), so the text after an image is scored with the image it saw.

**Credit** (:func:`interleaved_credit`). A reward gets every image of a chain (``images=`` a list per chain) and
returns, per chain, either one number (it scores the chain) or a list with one number per image (it scores each
image). Then, with weights ``w_r``::

    chain value   C_c,r   = the number, or the mean of the list (NaN entries left out)
    image value   I_c,s,r = the list's entry s, or the chain's number (a chain reward applies to every image)
    text advantage  A_c   = group-normalised  sum_r w_r C_c,r          over the G chains of the prompt
    image advantage A_c,s = group-normalised  sum_r w_r I_c,s,r        over the chains of the group that HAVE slot s

Worked example (one group of 3 chains, a chain reward ``fmt`` (weight 1) and an image reward ``clip`` (weight
2), "group" scaling, eps 0)::

    chain 0: fmt 1, clip [0.5, 0.1]    C = 1 + 2 * 0.3 = 1.6    I_0 = 1 + 1.0 = 2.0   I_1 = 1 + 0.2 = 1.2
    chain 1: fmt 0, clip [0.9]         C = 0 + 2 * 0.9 = 1.8    I_0 = 0 + 1.8 = 1.8
    chain 2: fmt 1, clip [0.3, 0.7]    C = 1 + 2 * 0.5 = 2.0    I_0 = 1 + 0.6 = 1.6   I_1 = 1 + 1.4 = 2.4

    text: mean 1.8, std 0.2            -> A = -1, 0, 1
    slot 0: (2.0, 1.8, 1.6), std 0.2   -> A_0 = 1, 0, -1
    slot 1: (1.2, 2.4), std 0.8485     -> A_1 = -0.7071, 0.7071 (chain 1 has no slot 1)

**Loss** (:func:`interleaved_loss`): the text policy loss with the chain's advantage on every sampled token
(those between and after images included) plus ``image_pg_coef`` times Flow-GRPO's clipped loss on each
image's recorded steps with that image's advantage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rgpo.image_policy import image_policy_loss
from rgpo.losses import ADVANTAGE_SCALES, policy_loss
from rgpo.models.base import Condition, ImageSamplingConfig, UnifiedModel
from rgpo.sde import SDETrajectory
from rgpo.seeding import mix_seed

INTERLEAVED_NOISE_TAG = 0x11EA  # mixed into the seeds of a slot's initial latents
INTERLEAVED_SDE_TAG = 0x11EB  # and of its stochastic steps


# ================================================================================================ credit
def _normalise(values: list[float], scale: str, eps: float, batch_std: float) -> list[float]:
    if not values:
        return []
    mean = sum(values) / len(values)
    centred = [v - mean for v in values]
    if scale == "none":
        return centred
    if scale == "group":
        std = math.sqrt(sum(c * c for c in centred) / (len(values) - 1)) if len(values) > 1 else 0.0
    else:
        std = batch_std
    return [c / (std + eps) for c in centred]


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def interleaved_credit(values: Sequence[Sequence[Any]], image_counts: Sequence[int], weights: Sequence[float],
                       group_size: int, scale: str = "group",
                       eps: float = 1e-4) -> tuple[list[float], list[list[float]], list[float], list[list[float]]]:
    """Text and image advantages of interleaved chains (module docstring).

    Args:
        values: ``values[c][r]``, reward r's return for chain c: a number, None (does not apply), or a list of
            one number (or None) per image of the chain.
        image_counts: images per chain.
        weights: one per reward.
        group_size: G; chains are ordered group by group.
    Returns:
        ``(text_advantages (n,), image_advantages [per chain, per slot], chain_totals, image_totals)``.
    Raises:
        ValueError: a list of the wrong length, naming the chain and the reward index.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale={scale!r} is not one of {ADVANTAGE_SCALES}")
    n = len(values)
    if n % group_size or len(image_counts) != n:
        raise ValueError(f"{n} chains ({len(image_counts)} image counts) do not make groups of {group_size}")
    chain_totals, image_totals = [], []
    for c, row in enumerate(values):
        if len(row) != len(weights):
            raise ValueError(f"chain {c}: {len(row)} reward values for {len(weights)} rewards")
        total, per_image = 0.0, [0.0] * image_counts[c]
        for r, (value, w) in enumerate(zip(row, weights)):
            if isinstance(value, (list, tuple)):
                if len(value) != image_counts[c]:
                    raise ValueError(f"reward {r} returned {len(value)} values for chain {c}, which holds "
                                     f"{image_counts[c]} images: return one number, or one per image")
                real = [float(v) for v in value if v is not None and not math.isnan(float(v))]
                if real:
                    total += w * sum(real) / len(real)
                for s, v in enumerate(value):
                    if v is not None and not math.isnan(float(v)):
                        per_image[s] += w * float(v)
            elif value is not None and not math.isnan(float(value)):
                total += w * float(value)
                per_image = [p + w * float(value) for p in per_image]
        chain_totals.append(total)
        image_totals.append(per_image)
    text = []
    batch_std = _std(chain_totals)
    for g in range(0, n, group_size):
        text += _normalise(chain_totals[g : g + group_size], scale, eps, batch_std)
    images: list[list[float]] = [[0.0] * k for k in image_counts]
    image_std = _std([v for row in image_totals for v in row])
    for g in range(0, n, group_size):
        chains = range(g, g + group_size)
        for s in range(max((image_counts[c] for c in chains), default=0)):
            holders = [c for c in chains if image_counts[c] > s]
            for c, a in zip(holders, _normalise([image_totals[c][s] for c in holders], scale, eps, image_std)):
                images[c][s] = a
    return text, images, chain_totals, image_totals


# ================================================================================================ rollout
@dataclass
class DrawnImage:
    """One image of an interleaved chain: its slot, its condition (one row), its recorded steps (one row, or
    None when nothing is recomputed) and the picture."""

    chain: int
    slot: int
    condition: Condition
    trajectory: SDETrajectory | None
    image: Any


@dataclass
class InterleavedRecord:
    """Every image the rollout drew, keyed by (chain, slot)."""

    drawn: dict[tuple[int, int], DrawnImage] = field(default_factory=dict)
    advantages: dict[tuple[int, int], float] = field(default_factory=dict)

    def per_chain(self, n: int) -> list[list]:
        return [[self.drawn[(c, s)].image for s in range(self.count(c))] for c in range(n)]

    def count(self, chain: int) -> int:
        return sum(1 for c, _ in self.drawn if c == chain)

    def keys(self, chains: Sequence[int]) -> list[tuple[int, int]]:
        return [(c, s) for c in chains for s in range(self.count(c))]


class InterleavedDrawer:
    """The ``draw`` callback an interleaved family's ``generate`` calls at each image slot (module docstring).

    ``keys[i]`` is chain i's noise key: its group with shared noise (the chains of a prompt compared on common
    noise, slot by slot), else its global index."""

    def __init__(self, model: UnifiedModel, cfg: ImageSamplingConfig, keys: Sequence[int], step: int, *,
                 record_steps: bool, negative_from: UnifiedModel | None = None):
        self.model, self.cfg, self.keys, self.step = model, cfg, list(keys), step
        self.record_steps = record_steps
        self.negative_from = negative_from or model
        self.record = InterleavedRecord()

    def noise(self, chain: int, slot: int) -> torch.Tensor:
        shape = self.model.latent_shape(self.cfg.height, self.cfg.width)
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, self.step, self.keys[chain], slot,
                                                     INTERLEAVED_NOISE_TAG))
        return torch.randn(shape, generator=gen)

    def generators(self, chains: Sequence[int], slots: Sequence[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(mix_seed(self.cfg.seed, self.step, self.keys[c], s,
                                                       INTERLEAVED_SDE_TAG)) for c, s in zip(chains, slots)]

    @torch.no_grad()
    def __call__(self, condition: Condition, chains: Sequence[int], slots: Sequence[int]) -> list:
        model, cfg = self.model, self.cfg
        guided = cfg.guidance_scale != 1.0
        negative = self.negative_from.negative_condition(condition.num_rows) if guided else None
        inputs = model.image_inputs(condition, negative, guidance_scale=cfg.guidance_scale, exact=True)
        noise = torch.stack([self.noise(c, s) for c, s in zip(chains, slots)]).to(
            next(model.parameters()).device, model.latent_dtype)
        out = model.sample_image_latents(inputs, noise, cfg, generator=self.generators(chains, slots))
        images = model.decode_latents(out.latents)
        for j, (c, s) in enumerate(zip(chains, slots)):
            self.record.drawn[(c, s)] = DrawnImage(c, s, condition.select([j]).detach(),
                                                   out.select([j]) if self.record_steps else None, images[j])
        return images


# ================================================================================================ the loss
def image_step_logps(model: UnifiedModel, drawn: DrawnImage, cfg: ImageSamplingConfig,
                     call: Callable[..., Any] | None = None) -> torch.Tensor:
    """(1, K) log-probs of an image's recorded steps under the current weights, replayed from its recorded
    condition on the exact path (``call``: the DeepSpeed engine, else the model)."""
    call = call or model
    guided = cfg.guidance_scale != 1.0
    negative = model.negative_condition(1) if guided else None
    inputs = call("image_inputs", drawn.condition, negative, guidance_scale=cfg.guidance_scale, exact=True)
    sampler = model.image_sampler(cfg)
    traj = drawn.trajectory
    logps = []
    for k in range(traj.x.shape[1]):
        x, t, t_next = traj.x[:, k].contiguous(), traj.timesteps[k], traj.next_timesteps[k]
        prediction = call("image_prediction", inputs, x, t)
        logps.append(sampler.log_prob(prediction, x, t, t_next, traj.x_next[:, k].contiguous(), traj.noise_level)[0])
    return torch.stack(logps, 1)


def interleaved_loss(logps: torch.Tensor, completion_mask: torch.Tensor, text_advantages: torch.Tensor,
                     image_logps: Sequence[torch.Tensor], old_image_logps: Sequence[torch.Tensor],
                     image_advantages: Sequence[float], *, image_pg_coef: float, clip_range: float = 0.2,
                     epsilon: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Text loss (chain advantage on every sampled token) + ``image_pg_coef`` x each image's clipped loss.

    Args:
        logps: (n, T) the chains' token log-probs (with grad); completion_mask: (n, T), 1 on sampled tokens.
        text_advantages: (n,).
        image_logps / old_image_logps: per image (chain-major), (1, K) recomputed (with grad) / recorded.
        image_advantages: per image.
    """
    text, metrics = policy_loss(logps, logps.detach(), None, text_advantages, completion_mask,
                                epsilon_low=epsilon, epsilon_high=epsilon, beta=0.0, aggregation="bnpo")
    total = text
    if image_logps:
        losses = [image_policy_loss(lp, old, torch.tensor([a], dtype=torch.float32, device=lp.device),
                                    clip_range)[0] for lp, old, a in zip(image_logps, old_image_logps,
                                                                          image_advantages)]
        image = torch.stack(losses).mean()
        total = total + image_pg_coef * image
        metrics = {**metrics, "loss/image_pg": image.detach()}
    return total, metrics


# ================================================================================================ the trainer's side
def drawer_for(image_policy, model: UnifiedModel, slots, step: int,
               negative_from: UnifiedModel | None) -> InterleavedDrawer:
    """The rollout's drawer: the run's sampling config for this step (its SDE window drawn as the N x M path
    draws it), noise keyed by group (shared noise) or chain, steps recorded when an image loss replays them."""
    if image_policy.feature_term or image_policy.gaussian_kl or image_policy.loss_cfg.image_condition_grad:
        raise ValueError("interleaved rollouts (model.options.max_images > 1) train the image side with the image "
                         "policy gradient only: set loss.image_kl_coef=0 (no feature_kl / velocity_mse / "
                         "gaussian_kl regulariser) and loss.image_condition_grad=false")
    cfg = image_policy.sampling_config(step)
    keys = [s.group for s in slots] if cfg.shared_noise else [s.global_index for s in slots]
    return InterleavedDrawer(model, cfg, keys, step, record_steps=image_policy.recompute,
                             negative_from=negative_from)


def score_interleaved(rewards: list, rows, texts: list[str], record: InterleavedRecord, cfg, device,
                      completion_ids=None, seconds=None) -> torch.Tensor:
    """(n, R) each chain's rewards (a reward that scores each image: the mean of its values), every reward called
    once per chain with ALL of its images; each image's
    advantage (:func:`interleaved_credit`, group-normalised per slot) is stored on the record. The chains of a
    group must sit on one rank (the usual layout)."""
    from rgpo.scoring import score_samples

    n = len(rows)
    per_image: dict[str, dict[int, list[float]]] = {}
    per_reward = score_samples(rewards, rows, texts, record.per_chain(n), cfg.rewards, device, completion_ids,
                               seconds, per_image)
    # A reward's value for a chain: its list of per-image values where it returned one, else its number.
    values = [[per_image[r.name][c] if c in per_image.get(r.name, {}) else (None if math.isnan(v) else v)
               for r, v in zip(rewards, row)] for c, row in enumerate(per_reward.tolist())]
    counts = [record.count(c) for c in range(n)]
    group = cfg.rollout.num_generations
    if n % group:
        raise ValueError(f"interleaved credit needs whole groups on each rank: {n} chains, groups of {group}")
    _, images, _, _ = interleaved_credit(values, counts, [r.weight for r in rewards], group,
                                         cfg.loss.advantage_scale, cfg.loss.advantage_eps)
    record.advantages = {(c, s): images[c][s] for c in range(n) for s in range(counts[c])}
    return per_reward


def interleaved_image_loss(record: InterleavedRecord, idx: Sequence[int], call, model: UnifiedModel,
                           cfg: ImageSamplingConfig, clip_range: float,
                           coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``coef`` x the mean over the images of chains ``idx`` of each image's clipped loss on its recorded steps
    with its own advantage; ``(0, {})`` when they hold no recorded image."""
    keys = [k for k in record.keys(idx) if record.drawn[k].trajectory is not None
            and record.drawn[k].trajectory.x.shape[1] > 0]
    device = next(model.parameters()).device
    if not keys:
        return torch.zeros((), device=device), {}
    losses, ratios = [], []
    for key in keys:
        drawn = record.drawn[key]
        logp = image_step_logps(model, drawn, cfg, call)
        advantage = torch.tensor([record.advantages.get(key, 0.0)], dtype=torch.float32, device=logp.device)
        loss, metrics = image_policy_loss(logp, drawn.trajectory.log_probs.to(logp.device), advantage, clip_range)
        losses.append(loss)
        ratios.append(metrics["ratio"])
    image = torch.stack(losses).mean()
    return coef * image, {"loss/image_pg": image.detach(), "image/ratio": torch.stack(ratios).mean()}
