"""Beyond RGPO: N chains x M images per prompt and an image-side policy gradient (Flow-GRPO on the decoder).

Modes (see the README section "Image-side policy gradient"):

- **RGPO** (as released; ``images_per_chain=1``, ``noise_level=0``, ``image_pg_coef=0``): the degenerate case
  of the same path: one deterministic image per chain, the chain's reward trains the language model, and the
  image regulariser (feature KL / velocity MSE) keeps the condition near the reference's.
- **N x M**: ``rollout.image.images_per_chain = M``; each chain draws M images (different initial noises, plus
  SDE noise when ``noise_level > 0``). Every image is scored; a chain's reward is the MEAN over its M images (a
  text-only reward such as ``format`` is the same on each, so it stays per chain), and the text advantages are
  group-normalised over the N chains of a prompt as before. Each image also gets an advantage normalised within
  its chain's M images (``rgpo.losses.group_advantages`` with group size M), which only the image loss uses.
- **text + image** (``loss.image_pg_coef > 0``, ``noise_level > 0``, ``M >= 2``): the images are drawn with
  Flow-GRPO's SDE sampler (``rgpo.sde``), which records every stochastic step's Gaussian log-prob (mean over
  latent elements). The update recomputes those log-probs under the current policy and adds, per micro-batch::

      r_ik     = exp(logp_ik - logp_old_ik)                         image i, stochastic step k
      L_img    = mean_ik max(-A_i r_ik, -A_i clip(r_ik, 1 - eps_img, 1 + eps_img))
      KL_gauss = mean_ik ||mean_pol_ik - mean_ref_ik||^2 / (2 std_k^2)  (mean over latent elements; gaussian_kl)
      loss     = text loss + image_pg_coef * L_img + image_kl_coef * image regulariser

  in the same backward, so both losses make one optimizer step. The reference of ``gaussian_kl`` is the model
  with every adapter disabled (VLM LoRA and decoder LoRA) fed the reference VLM's condition.

What the image loss trains: the generator LoRA (``trainable.generator_lora_r``) and/or parts trained in full
(``trainable.full_parts``, e.g. a connector). The condition is DETACHED by default, as Flow-GRPO trains
only the generator; ``loss.image_condition_grad=true`` lets the image loss reach the language model too (through
a straight-through copy of the condition, whose value is the recorded one, so the on-policy ratio stays 1).

Exact ratio 1 on the first on-policy step: the sampler and the update evaluate the guided prediction with the
same method (``UnifiedModel.image_prediction``), on the same exact path (``image_inputs(..., exact=True)``: no
approximate cache), and on the same batches: images are sampled in chunks of ``optim.micro_batch_size`` chains x
M images, exactly the rows (and condition padding) of the update's micro-batches, from the recorded condition.
Any other set of chains still works (its rows are selected from the recorded trajectory) but, padded
differently, its ratio is only ~1.

The model is only ever reached through the family interface (:class:`rgpo.models.UnifiedModel`): conditions
are opaque, the sampler is the family's (:mod:`rgpo.samplers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from rgpo.advantages import global_advantages
from rgpo.losses import feature_kl, policy_loss, velocity_mse
from rgpo.models.base import Condition, ImageSamplingConfig, UnifiedModel
from rgpo.scoring import score_samples
from rgpo.sde import SDETrajectory, gaussian_step_kl, random_window_start
from rgpo.seeding import mix_seed

SDE_NOISE_TAG = 0x5DE  # mixed into the seeds of the per-image SDE-noise generators
WINDOW_TAG = 0x3D0  # mixed into the seed of the per-step SDE window start

ReferenceContext = Callable[[], AbstractContextManager[UnifiedModel]]


# ================================================================================================ pure functions
def chain_rewards(per_image: torch.Tensor, images_per_chain: int) -> torch.Tensor:
    """(n * M, R) per-image rewards, chain-major -> (n, R): each chain's mean over its M images (NaN-aware: a
    reward that does not apply to an image is left out; NaN only where it applies to none)."""
    n_images, num_rewards = per_image.shape
    if n_images % images_per_chain:
        raise ValueError(f"{n_images} image rewards is not a multiple of images_per_chain={images_per_chain}")
    return per_image.view(-1, images_per_chain, num_rewards).nanmean(1)


def image_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-GRPO's clipped image loss ``mean_ik max(-A_i r_ik, -A_i clip(r_ik, 1 - eps, 1 + eps))``.

    Args:
        logp: (B, K) recomputed log-probs of the recorded SDE steps (with grad); old_logp: (B, K) recorded ones.
        advantages: (B,) one per image (within-chain normalised).
        clip_range: eps.
    Returns:
        ``(loss, metrics)``: ``ratio`` (mean), ``clip_frac`` (fraction of steps with |r - 1| > eps, as Flow-GRPO
        counts it), ``approx_kl`` (``mean (logp - old)^2 / 2``), ``pg_loss``; metrics are detached.
    """
    if logp.shape != old_logp.shape or logp.dim() != 2 or advantages.shape != logp.shape[:1]:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and advantages "
                         f"{tuple(advantages.shape)} must be (B, K), (B, K) and (B,)")
    logp, old_logp = logp.float(), old_logp.float()
    # The text loss with every step a token: an all-ones mask under "bnpo" is the plain mean over (B, K).
    loss, text_metrics = policy_loss(logp, old_logp, None, advantages.float(), torch.ones_like(logp),
                                     epsilon_low=clip_range, epsilon_high=clip_range, beta=0.0, aggregation="bnpo")
    with torch.no_grad():
        log_ratio = logp - old_logp
        metrics = {
            "pg_loss": text_metrics["pg_loss"],
            "ratio": text_metrics["ratio"],
            "clip_frac": ((log_ratio.exp() - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * log_ratio.pow(2).mean(),
        }
    return loss, metrics


def image_rows(chains: list[int], images_per_chain: int) -> list[int]:
    """The image rows of ``chains`` in a chain-major N x M layout: chain c's images are c*M .. c*M + M - 1."""
    return [c * images_per_chain + j for c in chains for j in range(images_per_chain)]


def within_chain_metrics(totals: torch.Tensor, images_per_chain: int) -> dict[str, float]:
    """Logged spread of the image rewards inside chains: ``totals`` (N * M,) weighted per-image totals."""
    within = totals.view(-1, images_per_chain).float()
    std = within.std(1) if images_per_chain > 1 else torch.zeros_like(within[:, 0])
    return {
        "reward/image_mean": within.mean().item(),
        "reward/image_std": std.mean().item(),  # mean over chains of the within-chain std
        "reward/image_range": (within.max(1).values - within.min(1).values).mean().item(),
        "reward/image_frac_zero_std": (std < 1e-6).float().mean().item(),  # chains without an image signal
    }


# ================================================================================================ rollout record
@dataclass
class ImageRollout:
    """What the rollout recorded about this rank's n chains x M images."""

    images_per_chain: int
    images: list  # n * M PIL images, chain-major: chain i's images are i * M .. i * M + M - 1
    condition: Condition  # the sampling policy's conditions, one row per chain (no grad)
    sde: SDETrajectory | None  # every image's stochastic steps, chain-major; None without an image loss
    per_image_rewards: torch.Tensor | None = None  # (n * M, R)
    advantages: torch.Tensor | None = None  # (n * M,) within-chain advantages
    metrics: dict[str, float] = field(default_factory=dict)

    def image_rows(self, chains: list[int]) -> list[int]:
        return image_rows(chains, self.images_per_chain)

    def trajectory(self, chains: list[int]) -> SDETrajectory | None:
        """The recorded stochastic steps of these chains' images (chain-major), or None when none were recorded."""
        return None if self.sde is None else self.sde.select(self.image_rows(chains))

    def per_chain(self) -> list[list]:
        """Each chain's M images."""
        M = self.images_per_chain
        return [self.images[i * M : (i + 1) * M] for i in range(len(self.images) // M)]


# ================================================================================================ the trainer side
class ImagePolicy:
    """The trainer's image side: drawing N x M images (the deterministic one-image RGPO rollout is its degenerate
    case), scoring them, the image regulariser, and the image policy gradient. It holds only the run's image
    settings; the model, the DeepSpeed engine and the reference are passed to each call."""

    def __init__(self, cfg, device: torch.device):
        img, lc = cfg.rollout.image, cfg.loss
        self.loss_cfg, self.rewards_cfg = lc, cfg.rewards
        self.device = device
        self.micro_batch_size = cfg.optim.micro_batch_size
        self.group_size = cfg.rollout.num_generations
        self.seed = cfg.seed
        self.M = img.images_per_chain
        self.noise_level = img.noise_level
        self.base = ImageSamplingConfig(height=img.height, width=img.width, steps=img.steps,
                                        guidance_scale=img.guidance_scale, seed=img.seed,
                                        shared_noise=img.shared_noise)
        self.sampling = dataclasses.replace(
            self.base, noise_level=img.noise_level, sde_window=img.sde_window, sde_window_start=None,
            sde_window_range=tuple(img.sde_window_range) if img.sde_window_range else None)
        # Evaluation may take more steps (and guidance) than the rollouts it judges.
        self.evaluation = dataclasses.replace(
            self.base, steps=img.eval_steps if img.eval_steps is not None else img.steps,
            guidance_scale=img.eval_guidance_scale if img.eval_guidance_scale is not None else img.guidance_scale)
        self.gaussian_kl = lc.image_regularizer == "gaussian_kl" and lc.image_kl_coef > 0
        self.feature_term = lc.image_regularizer in ("feature_kl", "velocity_mse") and lc.image_kl_coef > 0
        self.pg = lc.image_pg_coef > 0
        # Trajectories (and the exact, cache-free sampling path) are needed only when something recomputes them.
        self.recompute = self.noise_level > 0 and (self.pg or self.gaussian_kl)
        # The recorded steps are sampled on the replay's exact path unless the condition KV cache is kept.
        self.exact_sampling = self.recompute and not img.pg_condition_cache
        # Images scored one by one with within-chain statistics (N x M or stochastic images); else the chain's one
        # deterministic image is scored as the chain.
        self.per_image = self.M > 1 or self.noise_level > 0

    @property
    def needs_condition(self) -> bool:
        """Whether the update's text forward must return the condition (an image term reaches the language
        model through it)."""
        return self.feature_term or (self.recompute and self.loss_cfg.image_condition_grad)

    @property
    def needs_reference_condition(self) -> bool:
        return self.feature_term or self.gaussian_kl

    # ------------------------------------------------------------------------------------------- rollout
    def initial_noise(self, model: UnifiedModel, global_indices: list[int], groups: list[int], step: int,
                      image: int = 0) -> torch.Tensor:
        """(n, ...) initial latents of each chain's image number ``image`` (> 0: extra images of an N x M rollout,
        each with seeds of its own). Shared noise: the same seed for every rollout of a group (RGPO's release uses
        one seed for every rollout of every step), so in-group reward differences come only from the text; else one
        per chain and step, from its global index (a group spread over ranks still draws the same)."""
        icfg = self.base
        shape = model.latent_shape(icfg.height, icfg.width)
        extra = (image,) if image else ()
        if icfg.shared_noise:
            seed = mix_seed(icfg.seed, image) if image else icfg.seed
            base = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            noise = base.expand(len(global_indices), *shape).clone()
        else:
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
                mix_seed(icfg.seed, step, i, *extra))) for i in global_indices])
        return noise.to(self.device, dtype=model.latent_dtype)

    @torch.no_grad()
    def draw_deterministic(self, model: UnifiedModel, condition: Condition, global_indices: list[int],
                           groups: list[int], step: int, negative_from: UnifiedModel,
                           evaluation: bool = False) -> list[list]:
        """One deterministic image per chain (RGPO's rollout; with ``evaluation``, the evaluation's steps and
        guidance), as a list per chain."""
        noise = self.initial_noise(model, global_indices, groups, step)
        icfg = self.evaluation if evaluation else self.base
        return [[image] for image in model.draw(condition, noise, icfg, negative_from=negative_from)]

    @torch.no_grad()
    def draw(self, model: UnifiedModel, condition: Condition, slots, step: int,
             negative_from: UnifiedModel) -> tuple[list[list], ImageRollout]:
        """M images per chain. With trajectories to replay they are sampled in chunks of ``optim.micro_batch_size``
        chains (the update's micro-batches), otherwise in one batch. Returns each chain's images and the record."""
        gi, groups = [s.global_index for s in slots], [s.group for s in slots]
        if not self.per_image:
            images = self.draw_deterministic(model, condition, gi, groups, step, negative_from)
            return images, ImageRollout(1, [i for chain in images for i in chain], condition, None)
        n = condition.num_rows
        chunk = self.micro_batch_size if self.recompute else n
        noise = torch.stack([self.initial_noise(model, gi, groups, step, m) for m in range(self.M)], 1).flatten(0, 1)
        gens = self.sde_generators(gi, groups, step) if self.noise_level > 0 else None
        icfg = self.sampling_config(step)
        guided = icfg.guidance_scale != 1.0
        trajectories, images = [], []
        for start in range(0, n, chunk):
            rows = list(range(start, min(n, start + chunk)))
            cond = condition.select(rows).repeat_interleave(self.M)
            negative = negative_from.negative_condition(cond.num_rows) if guided else None
            inputs = model.image_inputs(cond, negative, guidance_scale=icfg.guidance_scale, exact=self.exact_sampling)
            images_of_rows = image_rows(rows, self.M)
            out = model.sample_image_latents(inputs, noise[images_of_rows], icfg,
                                             generator=[gens[j] for j in images_of_rows] if gens else None)
            images += model.decode_latents(out.latents)
            if self.recompute:  # kept only for an image loss that replays the steps
                trajectories.append(out)
        record = ImageRollout(self.M, images, condition, SDETrajectory.cat(trajectories) if self.recompute else None)
        return record.per_chain(), record

    def sampling_config(self, step: int) -> ImageSamplingConfig:
        """This step's sampling config: the SDE window start drawn from (seed, step), the same on every rank."""
        icfg = self.sampling
        if self.noise_level > 0 and icfg.sde_window is not None:
            gen = torch.Generator().manual_seed(mix_seed(icfg.seed, step, WINDOW_TAG))
            start = random_window_start(icfg.steps, icfg.sde_window, gen, icfg.sde_window_range)
            icfg = dataclasses.replace(icfg, sde_window_start=start)
        return icfg

    def sde_generators(self, global_indices: list[int], groups: list[int], step: int) -> list[torch.Generator]:
        """One CPU generator per image (its SDE noise does not depend on the batch it is drawn in), seeded by
        (seed, step, m) and the group when ``shared_noise`` (image m of every chain of a group gets the same
        noise: chains are compared on common noise), else the chain."""
        icfg = self.base
        keys = groups if icfg.shared_noise else global_indices
        return [torch.Generator().manual_seed(mix_seed(icfg.seed, step, key, m, SDE_NOISE_TAG))
                for key in keys for m in range(self.M)]

    # ------------------------------------------------------------------------------------------- rewards
    def score(self, rewards: list, rows, texts: list[str], record: ImageRollout, global_indices: list[int],
              completion_ids: list[list[int]] | None = None, seconds: dict[str, float] | None = None) -> torch.Tensor:
        """Each chain's (n, R) rewards. One deterministic image per chain: the chain with its image. N x M: every
        image scored on its own, a chain's reward the mean over its M images (for the text advantages), and the
        within-chain image advantages stored on the record (rewards gathered across ranks first, as the text
        side does). ``global_indices``: the chains' indices in the step's global batch. ``seconds``: each reward's
        wall-clock seconds are added to ``seconds[name]``."""
        if not self.per_image:
            return score_samples(rewards, rows, texts, record.per_chain(), self.rewards_cfg, self.device,
                                 completion_ids, seconds)
        M = self.M
        image_rows_data = [row for row in rows for _ in range(M)]
        image_texts = [text for text in texts for _ in range(M)]
        image_ids = None if completion_ids is None else [ids for ids in completion_ids for _ in range(M)]
        per_image = score_samples(rewards, image_rows_data, image_texts, [[im] for im in record.images],
                                  self.rewards_cfg, self.device, image_ids, seconds)
        weights = [r.weight for r in rewards]
        lc = self.loss_cfg
        advantages, _, totals = global_advantages(per_image, weights, image_rows(global_indices, M), M,
                                                  lc.advantage_scale, lc.advantage_eps)
        record.per_image_rewards, record.advantages = per_image, advantages
        record.metrics = within_chain_metrics(totals, M)
        return chain_rewards(per_image, M)

    # ------------------------------------------------------------------------------------------- the regulariser
    def regularizer(self, policy_call, reference: ReferenceContext, model: UnifiedModel, condition: Condition,
                    ref_condition: Condition, seed: int) -> torch.Tensor:
        """The feature KL (RGPO's D_IKL) or the velocity MSE: the generator run, unguided, on the policy's
        condition (with grad, which flows back into the language model) and on the reference's (no grad), from
        fresh pure noise at times the family draws (RGPO's release: a 51-point grid); ``loss.image_kl_timesteps``
        draws per chain. ``policy_call`` is the DeepSpeed engine (ZeRO-3 fetches parameters through it)."""
        lc = self.loss_cfg
        K = lc.image_kl_timesteps
        gen = torch.Generator().manual_seed(seed)
        n = condition.num_rows
        shape = model.latent_shape(self.base.height, self.base.width)
        noise = torch.randn((n * K, *shape), generator=gen).to(self.device, model.latent_dtype)
        t = model.regularizer_times(n * K, gen).to(self.device)
        want_features = lc.image_regularizer == "feature_kl"

        def run(call, cond: Condition):
            inputs = call("image_inputs", cond.repeat_interleave(K), None, guidance_scale=1.0)
            return call("generator_output", inputs, noise, t, return_features=want_features)

        policy_out = run(policy_call, condition)
        with torch.no_grad(), reference() as ref_model:
            ref_out = run(ref_model, ref_condition)
        if want_features:
            per_sample = feature_kl(policy_out.features, ref_out.features, tau=lc.image_kl_tau)
        else:
            per_sample = velocity_mse(policy_out.prediction, ref_out.prediction)
        return per_sample.mean()

    # ------------------------------------------------------------------------------------------- the loss
    def loss(self, rollout, idx: list[int], out, policy_call, reference: ReferenceContext, model: UnifiedModel,
             negative_from: UnifiedModel) -> tuple[torch.Tensor, dict[str, Any]]:
        """``image_pg_coef * L_img + image_kl_coef * KL_gauss`` (module docstring) for the chains ``idx`` and
        their metrics; ``(0, {})`` when nothing on the image side is recomputed. ``out`` is the update's text
        forward (its condition is used only with ``loss.image_condition_grad``); ``policy_call`` the DeepSpeed
        engine."""
        lc = self.loss_cfg
        img = rollout.image_rollout
        zero = torch.zeros((), device=self.device)
        if img is None or not self.recompute:
            return zero, {}
        traj = img.trajectory(idx)
        if traj is None or traj.x.shape[1] == 0:
            return zero, {}
        # The recorded condition carries no graph: by default (detached) only the parts trained in full and the
        # generator LoRA get gradients from the image loss.
        straight = out.condition if lc.image_condition_grad and out is not None else None
        policy_inputs = self._inputs(policy_call, img.condition, idx, negative_from, straight)
        ref_inputs = None
        if self.gaussian_kl:
            if rollout.ref_condition is None:
                raise ValueError("loss.image_regularizer=gaussian_kl needs the reference condition from the rollout")
            with torch.no_grad(), reference() as ref_model:
                ref_inputs = self._inputs(ref_model, rollout.ref_condition, idx, negative_from)
        sampler = model.image_sampler(self.sampling)
        if self.gaussian_kl and lc.image_kl_convention == "flow_grpo" and sampler.kind != "flow":
            raise ValueError(f"loss.image_kl_convention=flow_grpo is Flow-GRPO's scaling of a flow SDE step; family "
                             f"{model.family!r} samples with {sampler.kind!r} steps: use image_kl_convention=exact")
        a = traj.noise_level
        logps, kls = [], []
        for k in range(traj.x.shape[1]):
            x, x_next = traj.x[:, k].contiguous(), traj.x_next[:, k].contiguous()
            t_k, t_next = traj.timesteps[k], traj.next_timesteps[k]
            prediction = policy_call("image_prediction", policy_inputs, x, t_k)
            logp, mean, std = sampler.log_prob(prediction, x, t_k, t_next, x_next, a)
            logps.append(logp)
            if ref_inputs is not None:
                with torch.no_grad(), reference() as ref_model:
                    ref_prediction = ref_model("image_prediction", ref_inputs, x, t_k)
                mean_ref, _ = sampler.transition(ref_prediction, x, t_k, t_next, a)
                kls.append(gaussian_step_kl(mean, mean_ref, std, convention=lc.image_kl_convention,
                                            dt=t_next - t_k))
        logp = torch.stack(logps, 1)
        total = zero
        metrics: dict[str, Any] = {}
        if self.pg:
            advantages = img.advantages[torch.tensor(img.image_rows(idx), device=img.advantages.device)]
            pg, pg_metrics = image_policy_loss(logp, traj.log_probs, advantages, lc.image_clip_range)
            total = total + lc.image_pg_coef * pg
            metrics.update({"loss/image_pg": pg_metrics["pg_loss"], "image/ratio": pg_metrics["ratio"],
                            "image/clip_frac": pg_metrics["clip_frac"], "image/approx_kl": pg_metrics["approx_kl"]})
        if kls:
            kl = torch.stack(kls, 1).mean()
            total = total + lc.image_kl_coef * kl
            metrics["kl/image"] = kl.detach()
        return total, metrics

    def _inputs(self, call, condition: Condition, idx: list[int], negative_from: UnifiedModel,
                straight_through: Condition | None = None):
        """The generator's inputs of the chains ``idx`` x M images, exactly as sampled: the rows' recorded
        condition (trimmed to their own padding; with ``straight_through``'s gradient path when given), each
        repeated M times, the negative batched in when guided."""
        cond = condition.select(idx)
        if straight_through is not None:
            cond = cond.with_gradient_of(straight_through)
        cond = cond.repeat_interleave(self.M)
        guided = self.sampling.guidance_scale != 1.0
        negative = negative_from.negative_condition(cond.num_rows) if guided else None
        return call("image_inputs", cond, negative, guidance_scale=self.sampling.guidance_scale, exact=True)
