"""Beyond RGPO: N chains x M images per prompt and an image-side policy gradient (Flow-GRPO on the decoder).

Modes (see the README section "Image-side policy gradient"):

- **text-only RGPO** (MindOmni; ``images_per_chain=1``, ``noise_level=0``, ``image_pg_coef=0``): this module is
  not used at all; one Euler image per chain, the chain's reward trains the VLM.
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

What the image loss trains: the decoder LoRA (``trainable.decoder_lora_r``) and/or the connector
(``trainable.train_connector``). The condition (the VLM's states) is DETACHED by default, as Flow-GRPO trains
only the decoder; ``loss.image_condition_grad=true`` lets the image loss reach the VLM LoRA too (through a
straight-through copy of the condition, whose value is the recorded one, so the on-policy ratio stays 1).

Exact ratio 1 on the first on-policy step: the sampler and the update evaluate the guided velocity with the
same method (``UnifiedModel.guided_velocity``), on the same cache-free decoder path (``decoder_kv_cache`` is
switched off while sampling: the cached path differs by ~1e-5), and on the same batches: images are sampled in
chunks of ``optim.micro_batch_size`` chains x M images, exactly the rows (and condition padding) of the update's
micro-batches, from the recorded condition. Any other set of chains still works (its rows are selected from
the recorded trajectory) but, padded differently, its ratio is only ~1.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from rgpo.losses import policy_loss
from rgpo.models.mindomni import guided_batch
from rgpo.sde import SDETrajectory, gaussian_step_kl, random_window_start, sde_log_prob, sde_mean_std

SDE_NOISE_TAG = 0x5DE  # mixed into the seeds of the per-image SDE-noise generators
WINDOW_TAG = 0x3D0  # mixed into the seed of the per-step SDE window start


def image_policy_active(cfg) -> bool:
    """True when the rollout needs this module: several images per chain or SDE sampling. Otherwise the trainer
    runs exactly as before (one Euler image per chain)."""
    img = cfg.rollout.image
    return img.enabled and (img.images_per_chain > 1 or img.noise_level > 0)


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
    condition: torch.Tensor  # (n, L, H) the sampling policy's condition states (no grad)
    condition_mask: torch.Tensor  # (n, L)
    sde: SDETrajectory | None  # every image's SDE steps, chain-major; None without an image loss (or Euler)
    per_image_rewards: torch.Tensor | None = None  # (n * M, R)
    advantages: torch.Tensor | None = None  # (n * M,) within-chain advantages
    metrics: dict[str, float] = field(default_factory=dict)

    def image_rows(self, chains: list[int]) -> list[int]:
        return image_rows(chains, self.images_per_chain)

    def trajectory(self, chains: list[int]) -> SDETrajectory | None:
        """The recorded SDE steps of these chains' images (chain-major), or None when none were recorded."""
        return None if self.sde is None else self.sde.select(self.image_rows(chains))


# ================================================================================================ the trainer side
class ImagePolicy:
    """The trainer's image side for N x M rollouts and the image policy gradient. The trainer calls
    :meth:`draw` in its rollout, :meth:`score` instead of its one-image scoring, and :meth:`loss` in every
    micro-batch; everything else stays the trainer's."""

    def __init__(self, trainer):
        self.trainer = trainer
        cfg = trainer.cfg
        img, lc = cfg.rollout.image, cfg.loss
        self.M = img.images_per_chain
        self.noise_level = img.noise_level
        self.sampling = dataclasses.replace(
            trainer.image_cfg, noise_level=img.noise_level, sde_window=img.sde_window,
            sde_window_start=None, sde_window_range=tuple(img.sde_window_range) if img.sde_window_range else None)
        self.gaussian_kl = lc.image_regularizer == "gaussian_kl" and lc.image_kl_coef > 0
        self.pg = lc.image_pg_coef > 0
        # Trajectories (and the exact, cache-free sampling path) are needed only when something recomputes them.
        self.recompute = self.noise_level > 0 and (self.pg or self.gaussian_kl)

    @property
    def needs_condition(self) -> bool:
        """Whether the update's text forward must return the condition (the image loss reaches the VLM)."""
        return self.recompute and self.trainer.cfg.loss.image_condition_grad

    # ------------------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def draw(self, condition: torch.Tensor, condition_mask: torch.Tensor, slots) -> tuple[list, ImageRollout]:
        """M images per chain, sampled in chunks of ``optim.micro_batch_size`` chains (the update's micro-batches).
        Returns each chain's first image (for the rollout table) and the record of all of them."""
        t = self.trainer
        model = t.model
        n = condition.shape[0]
        mb = t.cfg.optim.micro_batch_size
        gi, groups = [s.global_index for s in slots], [s.group for s in slots]
        noise = self.initial_noise(gi, groups)
        gens = self.sde_generators(gi, groups) if self.noise_level > 0 else None
        icfg = self.sampling_config()
        trajectories, images = [], []
        with self._cache_off(model):
            for start in range(0, n, mb):
                rows = list(range(start, min(n, start + mb)))
                embeds, mask, neg, neg_mask = self.connected(model, condition, condition_mask, rows)
                images_of_rows = image_rows(rows, self.M)
                out = model.sample_latents(embeds, mask, neg, neg_mask, noise[images_of_rows], icfg,
                                           generator=[gens[j] for j in images_of_rows] if gens else None)
                traj = out if isinstance(out, SDETrajectory) else None
                images += model.decode_latents(traj.latents if traj is not None else out)
                if self.recompute:  # kept only for an image loss that replays the steps
                    trajectories.append(traj)
        sde = SDETrajectory.cat(trajectories) if self.recompute else None
        record = ImageRollout(self.M, images, condition, condition_mask, sde)
        return [images[i * self.M] for i in range(n)], record

    def sampling_config(self):
        """This step's sampling config: the SDE window start drawn from (seed, step), the same on every rank."""
        icfg = self.sampling
        if self.noise_level > 0 and icfg.sde_window is not None:
            from rgpo.trainer import _mix

            gen = torch.Generator().manual_seed(_mix(icfg.seed, self.trainer.step, WINDOW_TAG))
            start = random_window_start(icfg.steps, icfg.sde_window, gen, icfg.sde_window_range)
            icfg = dataclasses.replace(icfg, sde_window_start=start)
        return icfg

    def initial_noise(self, global_indices: list[int], groups: list[int]) -> torch.Tensor:
        """(n * M, C, h, w), chain-major. Image 0 of each chain gets the trainer's one-image noise (so M = 1 is
        today's rollout); image m > 0 a seed of its own: shared by the whole group when ``shared_noise`` (and,
        like MindOmni's, the same every step), else per chain and step."""
        per_image = [self.trainer._initial_noise(global_indices, groups, m) for m in range(self.M)]
        return torch.stack(per_image, 1).flatten(0, 1)

    def sde_generators(self, global_indices: list[int], groups: list[int]) -> list[torch.Generator]:
        """One CPU generator per image (its SDE noise does not depend on the batch it is drawn in), seeded by
        (seed, step, m) and the group when ``shared_noise`` (image m of every chain of a group gets the same
        noise: chains are compared on common noise), else the chain."""
        from rgpo.trainer import _mix

        icfg, step = self.trainer.image_cfg, self.trainer.step
        keys = groups if icfg.shared_noise else global_indices
        return [torch.Generator().manual_seed(_mix(icfg.seed, step, key, m, SDE_NOISE_TAG))
                for key in keys for m in range(self.M)]

    @contextmanager
    def _cache_off(self, model):
        """The exact sampling path: no condition KV cache while trajectories are recorded for recomputation."""
        if not self.recompute or not hasattr(model, "decoder_kv_cache"):
            yield
            return
        before = model.decoder_kv_cache
        model.decoder_kv_cache = False
        try:
            yield
        finally:
            model.decoder_kv_cache = before

    def connected(self, call, condition, condition_mask, rows: list[int], straight_through=None):
        """Connector inputs of the chains ``rows`` x M images, exactly as sampled: the rows' condition trimmed to
        their own padding, each repeated M times, through the connector; plus the connected negative prompt when
        guided. ``call`` is the model (rollout) or the DeepSpeed engine (update, for ZeRO-3). ``straight_through``
        (the update's condition with grad, same shape) adds its gradient path without changing the value."""
        from rgpo.trainer import trim_left_padding

        index = torch.tensor(rows, device=condition.device)
        cond, mask = trim_left_padding(condition[index], condition_mask[index])
        if straight_through is not None:
            if straight_through.shape != cond.shape:
                raise ValueError(f"the update's condition {tuple(straight_through.shape)} does not match the "
                                 f"recorded one {tuple(cond.shape)} of the same chains")
            cond = cond + (straight_through - straight_through.detach())
        cond, mask = cond.repeat_interleave(self.M, 0), mask.repeat_interleave(self.M, 0)
        embeds = _call(call, "connect", cond, mask)
        neg = neg_mask = None
        if self.sampling.guidance_scale != 1.0:
            neg_states, neg_mask = self.trainer.negative_source.negative_condition(cond.shape[0])
            neg = _call(call, "connect", neg_states, neg_mask)
        return embeds, mask, neg, neg_mask

    # ------------------------------------------------------------------------------------------- rewards
    def score(self, rollout) -> torch.Tensor:
        """Score every image; return each chain's (n, R) rewards (mean over its M images) for the text
        advantages, and store the within-chain image advantages on the record (rewards gathered across ranks
        first, as the text side does)."""
        from rgpo.trainer import global_advantages, score_samples

        t, img, M = self.trainer, rollout.image_rollout, self.M
        rows = [row for row in rollout.rows for _ in range(M)]
        texts = [text for text in rollout.completions.texts for _ in range(M)]
        per_image = score_samples(t.rewards, rows, texts, img.images, t.cfg.rewards, t.device)
        weights = [r.weight for r in t.rewards]
        image_indices = image_rows(rollout.global_indices, M)
        lc = t.cfg.loss
        advantages, _, totals = global_advantages(per_image, weights, image_indices, M, lc.advantage_scale,
                                                  lc.advantage_eps)
        img.per_image_rewards, img.advantages = per_image, advantages
        img.metrics = within_chain_metrics(totals, M)
        return chain_rewards(per_image, M)

    # ------------------------------------------------------------------------------------------- the loss
    def loss(self, rollout, idx: list[int], out=None, policy_call=None) -> tuple[torch.Tensor, dict[str, Any]]:
        """``image_pg_coef * L_img + image_kl_coef * KL_gauss`` (module docstring) for the chains ``idx`` and
        their metrics; ``(0, {})`` when nothing on the image side is recomputed. ``out`` is the update's text
        forward (its condition is used only with ``loss.image_condition_grad``); ``policy_call`` defaults to the
        DeepSpeed engine."""
        t = self.trainer
        lc = t.cfg.loss
        img = rollout.image_rollout
        zero = torch.zeros((), device=t.device)
        if img is None or not self.recompute:
            return zero, {}
        traj = img.trajectory(idx)
        if traj is None or traj.x.shape[1] == 0:
            return zero, {}
        call = policy_call if policy_call is not None else t.engine
        straight = out.condition if lc.image_condition_grad and out is not None else None
        # The recorded condition carries no graph: by default (detached) only the connector, when it trains, and
        # the decoder LoRA get gradients from the image loss.
        embeds, mask, neg, neg_mask = self.connected(call, img.condition, img.condition_mask, idx, straight)
        policy_in = guided_batch(embeds, mask, neg, neg_mask)
        ref_in = self._reference_inputs(rollout, idx) if self.gaussian_kl else None
        g = self.sampling.guidance_scale if neg is not None else 1.0
        a = traj.noise_level
        logps, kls = [], []
        for k in range(traj.x.shape[1]):
            x, x_next = traj.x[:, k].contiguous(), traj.x_next[:, k].contiguous()
            t_k, t_next = traj.timesteps[k], traj.next_timesteps[k]
            v = _call(call, "guided_velocity", *policy_in, x, t_k, g)
            logp, mean, std = sde_log_prob(x, v, t_k, t_next, x_next, a)
            logps.append(logp)
            if ref_in is not None:
                with torch.no_grad(), t.reference_context() as ref_model:
                    v_ref = _call(ref_model, "guided_velocity", *ref_in, x, t_k, g)
                mean_ref, _ = sde_mean_std(x, v_ref, t_k, t_next, a)
                kls.append(gaussian_step_kl(mean, mean_ref, std))
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

    def _reference_inputs(self, rollout, idx: list[int]):
        """The reference's guided inputs of the chains ``idx``: the reference VLM's condition through the
        connector with every adapter disabled."""
        t = self.trainer
        if rollout.ref_condition is None:
            raise ValueError("loss.image_regularizer=gaussian_kl needs the reference condition from the rollout")
        with torch.no_grad(), t.reference_context() as ref_model:
            embeds, mask, neg, neg_mask = self.connected(ref_model, rollout.ref_condition,
                                                         rollout.ref_condition_mask, idx)
        return guided_batch(embeds, mask, neg, neg_mask)


def _call(call, method: str, *args, **kwargs):
    """``engine("method", ...)`` / ``model("method", ...)`` (module calls, so ZeRO-3 fetches parameters); a
    plain model's method directly otherwise."""
    if isinstance(call, torch.nn.Module):
        return call(method, *args, **kwargs)
    return getattr(call, method)(*args, **kwargs)
