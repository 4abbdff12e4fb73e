"""The RGPO trainer: rollout -> rewards -> advantages -> update, under DeepSpeed ZeRO-0/1/2/3.

Launch with ``deepspeed --num_gpus N -m rgpo train --config ...``, ``torchrun``, or ``rgpo train --config ...``
in one process. Each step:

1. rollout: G reasoning chains per prompt from the policy, the image(s) each chain draws (the family's sampler,
   shared initial noise per group as RGPO's release), and, under no-grad, the policy's and reference's log-probs and
   conditions from one forward each;
2. rewards: every reward function on the rank's chains, then gathered across ranks BEFORE normalising,
   because a group may span ranks;
3. advantages: group-relative (``rgpo.advantages``);
4. update: micro-batches of clipped policy-gradient loss + beta * text KL + the image terms
   (``rgpo.image_policy``), accumulated by DeepSpeed into one optimizer step.

The model is reached only through the family interface (``rgpo.models.UnifiedModel``): the trainer never names
a family or one of its parts.
"""

from __future__ import annotations

import copy
import json
import os
import signal
from collections.abc import Callable
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import torch

import rewards as reward_lib
from rgpo import checkpointing as ckpt
from rgpo import distributed as dist_utils
from rgpo.advantages import dapo_token_normalizer, global_advantages
from rgpo.building import (
    apply_trainable,
    build_model,
    check_family_config,
    float32_weights,
    model_family,
    restore_float32_weights,
    trainable_parameters,
)
from rgpo.config import RGPOConfig, save_config, to_dict
from rgpo.data import PromptRow, PromptSampler, check_columns, load_prompts
from rgpo.deepspeed_config import build_deepspeed_config, zero_stage
from rgpo.image_policy import ImagePolicy, ImageRollout
from rgpo.losses import masked_mean, policy_loss
from rgpo.models import Completions, Condition, PromptBatch, UnifiedModel, in_memory
from rgpo.modes import TrainModeSwitch
from rgpo.scoring import score_samples
from rgpo.seeding import mix_seed, rng_state, seed_everything, set_rng_state
from rgpo.tracking import MetricsHistory, NullLogger, PhaseTimer, WandbLogger, side_by_side


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a NaN/inf loss or gradient."""


@dataclass
class Rollout:
    """Everything the update needs about this rank's chains (all tensors on the device, no grad)."""

    rows: list[PromptRow]  # one per chain
    prompts: PromptBatch  # one row per chain
    completions: Completions
    old_logps: torch.Tensor | None  # (n, T) sampling policy's log-probs (only when num_iterations > 1 or images)
    ref_logps: torch.Tensor | None  # (n, T)
    ref_condition: Condition | None  # the reference's conditions (image regularisers)
    images: list[list]  # each chain's images (empty lists without images)
    global_indices: list[int]
    image_rollout: ImageRollout | None = None  # N x M images, SDE trajectories, image advantages


def lr_lambda(cfg: RGPOConfig):
    """Learning-rate multiplier per optimizer step: linear warm-up, then linear / cosine decay or constant."""
    import math

    total = cfg.optim.max_steps * cfg.loss.num_iterations
    warmup = cfg.optim.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.optim.schedule == "linear":
            return 1.0 - progress
        if cfg.optim.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


# ================================================================================================ the trainer
class RGPOTrainer:
    def __init__(self, cfg: RGPOConfig, model: UnifiedModel | None = None, reward_fns: list | None = None,
                 logger: NullLogger | None = None):
        import deepspeed

        self.rank, self.local_rank, self.world = dist_utils.init_distributed(cfg.deepspeed.backend)
        self.cfg = cfg.validate(self.world)
        self.device = torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        self.out = Path(cfg.logging.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        # What only the model's family can say about the config (its parts, regularisers, options), before any
        # model is built.
        family = model_family(cfg)
        check_family_config(cfg, family)

        # Data and rewards are checked before the model is loaded: bad input fails in seconds, not minutes.
        self.train_rows = load_prompts(cfg.data.train_file)
        self.eval_rows = load_prompts(cfg.data.eval_file) if cfg.data.eval_file else []
        self.rewards = reward_fns if reward_fns is not None else [
            reward_lib.get_reward(spec) for spec in cfg.rewards.functions]
        for reward in self.rewards:
            for column in reward_lib.registry.required_columns(reward):
                for rows in (self.train_rows, self.eval_rows):
                    check_columns(rows, column, reward.name)
        G = cfg.rollout.num_generations
        self.sampler = PromptSampler(len(self.train_rows), cfg.rollout.batch_size // G, G, seed=cfg.data.seed,
                                     shuffle=cfg.data.shuffle, rank=self.rank, world_size=self.world,
                                     source=f"data.train_file={cfg.data.train_file}")
        # An unusable checkpoint is reported now, before minutes of model loading.
        resume_from, resume_state = self._find_resume()

        ds_config = build_deepspeed_config(cfg, self.world, zero_hidden_size=family.language_hidden_size(cfg.model.path))
        self.zero_stage = zero_stage(ds_config)
        self.zero3 = self.zero_stage == 3
        if resume_state is not None:
            self._check_zero_layout(resume_from, resume_state)
        self._set_aside_other_timelines(int(resume_state["step"]) if resume_state is not None else 0)
        given = model is not None
        model = model if given else self._build_under_zero(cfg, ds_config)
        # Full fine-tuning's frozen copy is of the model being trained: a copy of a given one, else built alike.
        self.reference = (self._build_reference(cfg, ds_config, copy.deepcopy(model) if given else None)
                          if cfg.trainable.mode == "full" else None)
        model = apply_trainable(model, cfg)
        params = list(trainable_parameters(model).values())
        if not params:
            raise ValueError("nothing to train: every parameter is frozen (check the trainable section)")
        # ZeRO-3 partitions every parameter in the run's dtype: nothing to keep there (nor in float32 runs)
        float32 = float32_weights(model) if not self.zero3 and cfg.model.dtype != "float32" else {}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
        restore_float32_weights(model, float32)  # bf16/fp16 runs: DeepSpeed cast them with the rest
        ckpt.use_weights_only_loading(self.engine)  # resume reads engine files with weights_only=True
        self.model: UnifiedModel = self.engine.module
        if cfg.trainable.mode == "lora" and cfg.trainable.full_parts:
            # Parts trained in full beside the LoRA have no adapter to switch off: the reference keeps copies of them
            # as built (taken before any resume loads trained weights into them).
            self.model.keep_reference_copies(cfg.trainable.full_parts, self._whole_parameters)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        # The whole image side: drawing (one deterministic image per chain is its degenerate case), scoring,
        # the regulariser and the image policy gradient.
        self.image_policy = ImagePolicy(cfg, self.device) if cfg.rollout.image.enabled else None
        # The step's phase timer: a hook for benchmarks (a PhaseTimer subclass that also records memory, say).
        self.timer_factory: Callable[..., PhaseTimer] = PhaseTimer
        # train()/eval() without walking the module tree each time (the tree is final from here on)
        self.set_training = TrainModeSwitch(self.model)
        self._stop_requested = False
        run_id = self._load_resume(resume_from, resume_state) if resume_from is not None else None
        self.logger = logger or self._make_logger(run_id)
        if self.rank == 0:
            save_config(cfg, self.out / "config.yaml")

    # ------------------------------------------------------------------------------------------- set-up helpers
    def _build_under_zero(self, cfg: RGPOConfig, ds_config: dict) -> UnifiedModel:
        if zero_stage(ds_config) != 3:
            return build_model(cfg, device=self.device)
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_ds = HfDeepSpeedConfig(ds_config)  # kept alive: transformers checks it while building
        if in_memory(cfg.model.path):  # built in memory: every parameter born partitioned
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                return build_model(cfg)
        # A checkpoint folder: transformers loads the VLM straight into ZeRO-3 shards (it sees HfDeepSpeedConfig);
        # the family's other parts, loaded by rgpo, arrive whole on the host and deepspeed.initialize
        # partitions them. Inside zero.Init they would be partitioned empty before their weights are read.
        return build_model(cfg)

    def _whole_parameters(self, params: list[torch.nn.Parameter]):
        """A context in which ``params`` hold their full values on every rank (ZeRO-3 gathers them)."""
        if not self.zero3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def _build_reference(self, cfg: RGPOConfig, ds_config: dict, ref: UnifiedModel | None = None):
        """Full fine-tuning needs a frozen copy (``ref``, else built from ``model.path``): under ZeRO-3 its own
        sharded inference engine (as TRL's prepare_deepspeed), otherwise a plain replica on the device."""
        import deepspeed

        ref = ref if ref is not None else self._build_under_zero(cfg, ds_config)
        ref.requires_grad_(False).eval()
        if self.zero3:
            ref_cfg = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
            engine, *_ = deepspeed.initialize(model=ref, config=ref_cfg)
            ckpt.use_weights_only_loading(engine)
            return engine.module
        return ref.to(self.device)

    def _make_logger(self, run_id: str | None):
        lc = self.cfg.logging
        mode = lc.mode or os.environ.get("WANDB_MODE")
        if self.rank != 0:
            return NullLogger()
        inner = NullLogger() if mode == "disabled" else WandbLogger(
            project=lc.project, name=lc.run_name or self.out.name, tags=lc.tags, mode=mode,
            config=to_dict(self.cfg), output_dir=str(self.out), run_id=run_id)
        return MetricsHistory(inner, self.out / "metrics.jsonl")

    # ------------------------------------------------------------------------------------------- contexts
    @property
    def negative_source(self) -> UnifiedModel:
        """The model whose VLM encodes the guidance negative: always the reference's, so training never moves it
        (full fine-tuning's frozen copy; else the model, which encodes it with its adapter disabled)."""
        return self.reference if self.reference is not None else self.model

    @contextmanager
    def reference_context(self):
        """Run the model as the reference: every adapter disabled (LoRA runs), or the frozen copy (full)."""
        if self.reference is not None:
            yield self.reference
        else:
            with self.model.adapter_disabled():
                yield self.model

    @contextmanager
    def gathered(self):
        """ZeRO-3: gather the full parameters once for a whole rollout phase (not per token / per step), and
        take ZeRO-3's per-module fetch/release hooks off the model meanwhile (as TRL does for generation): with
        every parameter present they only cost time, at every module call of every decoding step."""
        if not self.zero3 or not self.cfg.deepspeed.zero3_gather_for_rollout:
            yield  # partitioned: ZeRO-3's hooks fetch each module's weights as it runs
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
            offload = _zero3_offload(self.engine)
            if offload is not None:
                _remove_zero3_hooks(offload)
            try:
                yield
            finally:
                if offload is not None:
                    _restore_zero3_hooks(offload)

    # ------------------------------------------------------------------------------------------- the step
    def train_step(self) -> dict[str, float]:
        timer = self.timer_factory(torch.cuda.synchronize if self.device.type == "cuda" else None)
        slots = self.sampler.next_step()
        with timer("rollout"):
            rollout = self.rollout(slots, timer)
        with timer("rewards"):
            per_reward = self.score(rollout)  # (n, R) on this rank, NaN where a reward does not apply
        with timer("advantages"):
            weights = [r.weight for r in self.rewards]
            local_adv, all_rewards, total = global_advantages(
                per_reward, weights, rollout.global_indices, self.cfg.rollout.num_generations,
                self.cfg.loss.advantage_scale, self.cfg.loss.advantage_eps)
        with timer("update"):
            update_metrics = self.update(rollout, local_adv)
        self.step += 1
        metrics = self._step_metrics(rollout, all_rewards, total, update_metrics)
        metrics.update(timer.metrics())
        step_time = sum(v for k, v in timer.seconds.items() if "/" not in k)  # nested phases are inside these
        metrics["throughput/chains_per_s"] = self.cfg.rollout.batch_size / max(step_time, 1e-9)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if self._should(self.cfg.logging.table_every):
            self._log_table(rollout, per_reward, local_adv)
        self._last_rollout = rollout
        return metrics

    @torch.no_grad()
    def rollout(self, slots, timer: PhaseTimer) -> Rollout:
        cfg, model = self.cfg, self.model
        self.set_training(False)
        rows = [self.train_rows[s.prompt_index] for s in slots]
        images_on = self.image_policy is not None
        with self.gathered():
            with timer("rollout/text"):
                prompts, completions = self._sample_chains(rows, [s.group for s in slots])
            with timer("rollout/forward"):
                # The policy's no-grad forward gives the images' condition and, for num_iterations > 1, the
                # sampling policy's log-probs; with neither needed (text only, one update) it is skipped.
                policy = None
                if images_on or cfg.loss.num_iterations > 1:
                    policy = model.forward_text(prompts, completions, with_condition=images_on)
                need_ref_condition = images_on and self.image_policy.needs_reference_condition
                ref = None
                if cfg.loss.beta > 0 or need_ref_condition:
                    with timer("rollout/reference"), self.reference_context() as ref_model:
                        ref = ref_model.forward_text(prompts, completions, with_condition=need_ref_condition)
            images, image_rollout = [[] for _ in rows], None
            if images_on:
                with timer("rollout/images"):
                    images, image_rollout = self.image_policy.draw(model, policy.condition, slots, self.step,
                                                                   self.negative_source)
        return Rollout(rows, prompts, completions, policy.logps if policy is not None else None,
                       ref.logps if ref is not None and cfg.loss.beta > 0 else None,
                       ref.condition if ref is not None else None, images, [s.global_index for s in slots],
                       image_rollout)

    def _sample_chains(self, rows: list[PromptRow], groups: list[int]) -> tuple[PromptBatch, Completions]:
        """Sample one chain per slot. When every group on this rank is whole (the usual layout), each prompt
        is encoded once and asked for its k chains at once, so the model can share the prompt's prefill."""
        cfg = self.cfg.rollout
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.data.seed, self.step, self.rank))
        counts = [groups.count(g) for g in dict.fromkeys(groups)]
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                      top_k=cfg.top_k, generator=gen)
        if len(set(counts)) == 1:
            firsts = [rows[groups.index(g)] for g in dict.fromkeys(groups)]
            prompts = self.model.build_prompts([r.as_model_row() for r in firsts]).to(self.device)
            completions = self.model.generate(prompts, num_generations=counts[0], **kwargs)
            prompts = prompts.repeat_interleave(counts[0])
        else:
            prompts = self.model.build_prompts([r.as_model_row() for r in rows]).to(self.device)
            completions = self.model.generate(prompts, num_generations=1, **kwargs)
        return prompts, completions.to(self.device)

    def score(self, rollout: Rollout) -> torch.Tensor:
        """(n, R) this rank's rewards per chain (with images: as the image policy scores them)."""
        if rollout.image_rollout is not None:
            return self.image_policy.score(self.rewards, rollout.rows, rollout.completions.texts,
                                           rollout.image_rollout, rollout.global_indices)
        return score_samples(self.rewards, rollout.rows, rollout.completions.texts, rollout.images,
                             self.cfg.rewards, self.device)

    def update(self, rollout: Rollout, advantages: torch.Tensor) -> dict[str, float]:
        """``num_iterations`` optimizer steps over the rank's chains, in micro-batches DeepSpeed accumulates.

        ``engine.step()`` follows every backward; DeepSpeed applies the update at the accumulation boundary, and
        its ZeRO optimizer skips it when the gradient norm is NaN/inf, which ``was_step_applied`` reports."""
        cfg = self.cfg
        self.set_training(True)
        n = len(rollout.rows)
        mb = cfg.optim.micro_batch_size
        sums: dict[str, float] = {}
        count = 0
        token_normalizer = self.dapo_token_normalizer(rollout) if cfg.loss.aggregation == "dapo" else None
        for _ in range(cfg.loss.num_iterations):
            for start in range(0, n, mb):
                idx = list(range(start, min(n, start + mb)))
                loss, metrics = self.micro_batch_loss(rollout, advantages, idx, token_normalizer)
                self.engine.backward(loss)
                self.engine.step()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
            if self.engine.was_step_applied():
                self.nonfinite_in_a_row = 0
            else:
                self._count_skipped_step()
        return {k: v / max(count, 1) for k, v in sums.items()}

    def dapo_token_normalizer(self, rollout: Rollout) -> torch.Tensor:
        micro_batches = -(-len(rollout.rows) // self.cfg.optim.micro_batch_size)
        return dapo_token_normalizer(rollout.completions.completion_mask.to(self.device), micro_batches)

    def micro_batch_loss(self, rollout: Rollout, advantages: torch.Tensor, idx: list[int],
                         token_normalizer: torch.Tensor | None = None):
        """Text policy loss + beta * text KL + the image terms (regulariser, image policy gradient), for chains
        ``idx``."""
        cfg, lc = self.cfg, self.cfg.loss
        prompts, completions = rollout.prompts.select(idx), rollout.completions.select(idx)
        index = torch.tensor(idx, device=self.device)
        images = self.image_policy
        out = self.engine("forward_text", prompts, completions,
                          with_condition=images is not None and images.needs_condition)
        ref_logps = rollout.ref_logps[index] if rollout.ref_logps is not None else None
        # One update per batch: old = current (detached), so the ratio is exactly 1 (RGPO, GRPO).
        old = out.logps.detach() if lc.num_iterations == 1 else rollout.old_logps[index]
        loss, metrics = policy_loss(
            out.logps, old, ref_logps, advantages[index], completions.completion_mask,
            epsilon_low=lc.epsilon_low, epsilon_high=lc.epsilon_high, beta=lc.beta,
            kl_estimator=lc.kl_estimator, aggregation=lc.aggregation, max_length=cfg.rollout.max_new_tokens,
            token_normalizer=token_normalizer)
        metrics = {f"loss/{k}" if k == "pg_loss" else k: v for k, v in metrics.items()}
        if out.entropy is not None:  # mean next-token entropy over the completions (TRL's `entropy`)
            metrics["entropy"] = masked_mean(out.entropy, completions.completion_mask)
        if images is not None and images.feature_term:  # RGPO's image KL (D_IKL) / the velocity MSE
            image_reg = images.regularizer(self.engine, self.reference_context, self.model, out.condition,
                                           rollout.ref_condition.select(idx),
                                           seed=mix_seed(cfg.seed, self.step, self.rank, idx[0]))
            loss = loss + lc.image_kl_coef * image_reg
            metrics["kl/image"] = image_reg.detach()
        if images is not None and images.recompute:  # image policy gradient and/or gaussian_kl
            image_loss, image_metrics = images.loss(rollout, idx, out, self.engine, self.reference_context,
                                                    self.model, self.negative_source)
            loss = loss + image_loss
            metrics.update(image_metrics)
        metrics["loss/total"] = loss.detach()
        return loss, metrics

    def _count_skipped_step(self) -> None:
        """DeepSpeed dropped this step (NaN/inf gradient norm): count it, and stop after too many in a row."""
        self.nonfinite_in_a_row += 1
        self.skipped_steps += 1
        print(f"[rgpo] step {self.step}: non-finite loss or gradient, update skipped "
              f"({self.nonfinite_in_a_row} in a row, {self.skipped_steps} in total)", flush=True)
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} steps in a row had a NaN/inf loss or gradient (max_nonfinite_steps="
                f"{self.cfg.max_nonfinite_steps}); the last complete checkpoint is intact. Lower optim.lr, check the "
                f"rewards, or use model.dtype=bfloat16 instead of float16.")

    # ------------------------------------------------------------------------------------------- metrics & logs
    def _step_metrics(self, rollout: Rollout, all_rewards, total, update_metrics) -> dict[str, float]:
        G = self.cfg.rollout.num_generations
        metrics: dict[str, float] = {"reward/total": total.mean().item()}
        for j, reward in enumerate(self.rewards):
            col = all_rewards[:, j]
            valid = col[~torch.isnan(col)]
            metrics[f"reward/{reward.name}/mean"] = valid.mean().item() if valid.numel() else float("nan")
            metrics[f"reward/{reward.name}/std"] = valid.std().item() if valid.numel() > 1 else 0.0
        grouped_std = total.view(-1, G).std(dim=1)
        metrics["reward/std"] = grouped_std.mean().item()
        metrics["reward/frac_zero_std"] = (grouped_std < 1e-6).float().mean().item()
        rename = {"kl": "kl/text", "ratio": "ratio/mean"}
        local = {rename.get(k, k): v for k, v in update_metrics.items()}
        lengths = rollout.completions.completion_mask.sum(1).float()
        local["completion/mean_length"] = lengths.mean().item()
        local["completion/max_length"] = lengths.max().item()
        metrics.update(dist_utils.mean_across_ranks(local, self.device))
        metrics["skipped_steps"] = float(self.skipped_steps)
        if rollout.image_rollout is not None:  # within-chain image rewards (already gathered over ranks)
            metrics.update(rollout.image_rollout.metrics)
        return metrics

    def _log_table(self, rollout: Rollout, per_reward: torch.Tensor, advantages: torch.Tensor) -> None:
        rows = []
        for i, row in enumerate(rollout.rows):
            rows.append([self.step, row.prompt, rollout.completions.texts[i], side_by_side(rollout.images[i]),
                         *[float(v) for v in per_reward[i].tolist()], float(advantages[i])])
        everything = [r for part in dist_utils.all_gather_objects(rows) for r in part]
        columns = ["step", "prompt", "reasoning", "image", *[r.name for r in self.rewards], "advantage"]
        self.logger.log_table("rollouts", columns, everything, step=self.step)

    def _should(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    # ------------------------------------------------------------------------------------------- loop
    def train(self) -> dict[str, float]:
        """Run until ``optim.max_steps``; checkpoint every ``checkpoint.every`` steps and on SIGTERM/SIGINT."""
        cfg = self.cfg
        bar = _progress(self.step, cfg.optim.max_steps) if self.rank == 0 and cfg.logging.progress_bar else None
        previous = _install_stop_handlers(self)
        metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        try:
            while self.step < cfg.optim.max_steps:
                metrics = self.train_step()
                self.history.append({"step": self.step, **metrics})
                if self._should(cfg.logging.log_every):
                    self.logger.log(metrics, step=self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"reward": f"{metrics['reward/total']:.3f}", "kl": f"{metrics.get('kl/text', 0):.4f}",
                                     "len": f"{metrics['completion/mean_length']:.0f}"})
                if self._should(cfg.eval.every) and self.eval_rows:
                    self.evaluate()
                # A signal may reach only some ranks (one node of several): any rank's request stops them all.
                stop = dist_utils.any_rank(self._stop_requested, self.device)
                if self._should(cfg.checkpoint.every) or self.step == cfg.optim.max_steps or stop:
                    self.save_checkpoint()
                if stop:
                    print(f"[rgpo] stop signal received: checkpoint saved at step {self.step}, exiting", flush=True)
                    break
        finally:
            _restore_stop_handlers(previous)
            if bar is not None:
                bar.close()
        return metrics

    # ------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, rows: list[PromptRow] | None = None) -> dict[str, float]:
        """Mean of each reward over held-out prompts (one chain each, spread over the ranks), images logged on
        rank 0."""
        rows = rows or self.eval_rows[: self.cfg.eval.num_prompts]
        mine = rows[self.rank :: self.world]
        # A rank left without a prompt (fewer prompts than ranks) still runs one, and drops it: every rank must
        # make the same collective calls (ZeRO-3's gathers, synced generation).
        work = mine or rows[:1]
        self.set_training(False)
        with self.gathered():
            prompts = self.model.build_prompts([r.as_model_row() for r in work]).to(self.device)
            gen = torch.Generator().manual_seed(mix_seed(self.cfg.data.seed, 10**6, self.rank))
            completions = self.model.generate(
                prompts, num_generations=1, max_new_tokens=self.cfg.rollout.max_new_tokens,
                temperature=self.cfg.rollout.temperature, top_p=self.cfg.rollout.top_p,
                top_k=self.cfg.rollout.top_k, generator=gen).to(self.device)
            images: list[list] = [[] for _ in work]
            if self.image_policy is not None:  # always the deterministic sampler, one image per chain
                policy = self.model.forward_text(prompts, completions, with_condition=True)
                indices = list(range(len(work)))
                images = self.image_policy.draw_deterministic(self.model, policy.condition, indices, indices,
                                                              self.step, self.negative_source)
        per_reward = score_samples(self.rewards, work, completions.texts, images, self.cfg.rewards, self.device)
        kept = per_reward.tolist() if mine else []
        shown = [(side_by_side(ims), f"{row.prompt} | {text}") for row, text, ims in zip(mine, completions.texts, images)
                 if ims]
        # Every prompt weighs the same, however many each rank held.
        everything = torch.tensor([r for part in dist_utils.all_gather_objects(kept) for r in part],
                                  dtype=torch.float32).view(-1, len(self.rewards))
        results = {f"eval/{r.name}": float(torch.nanmean(everything[:, j])) for j, r in enumerate(self.rewards)}
        self.logger.log(results, step=self.step)
        gathered = [x for part in dist_utils.all_gather_objects(shown) for x in part]
        if gathered:
            self.logger.log_images("eval/images", [g[0] for g in gathered], [g[1] for g in gathered], step=self.step)
        return results

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Engine (trainable weights, optimizer, scheduler), RNG, data position, step and wandb run id, written
        atomically: complete or absent."""
        cfg = self.cfg
        tmp = ckpt.temporary_dir(self.out, self.step)
        if self.rank == 0:
            ckpt.remove_stale_temporaries(self.out)
            tmp.mkdir(parents=True)
        dist_utils.barrier()
        self.engine.save_checkpoint(str(tmp), tag="engine", save_latest=False, exclude_frozen_parameters=True)
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        self._save_trainable(tmp)
        if self.local_rank == 0:  # each node flushes what its ranks wrote before rank 0 publishes the folder
            ckpt.fsync_tree(tmp)
        dist_utils.barrier()
        final = ckpt.final_dir(self.out, self.step)
        if self.rank == 0:
            state = {"step": self.step, "sampler": self.sampler.state_dict(), "wandb_run_id": self.logger.run_id,
                     "world_size": self.world, "family": self.model.family, "skipped_steps": self.skipped_steps,
                     "nonfinite_in_a_row": self.nonfinite_in_a_row, "zero_stage": self.zero_stage,
                     "trainable_mode": cfg.trainable.mode, "cwd": os.getcwd(),
                     "config": ckpt.absolute_paths(to_dict(cfg), os.getcwd())}
            ckpt.write_state(tmp, state)
            ckpt.publish(tmp, self.step, self.out, cfg.checkpoint.keep_last)
        dist_utils.barrier()
        return final

    def _save_trainable(self, path: Path) -> None:
        """The trained weights alone as safetensors (for ``rgpo sample`` / ``rgpo export`` without DeepSpeed)."""
        from safetensors.torch import save_file

        weights = {}
        for name, param in trainable_parameters(self.model).items():
            with self._whole_parameters([param]):  # ZeRO-3: one weight whole at a time (full fine-tuning: 7 B)
                if self.rank == 0:
                    weights[name] = param.detach().to("cpu").contiguous().clone()
        if self.rank == 0:
            save_file(weights, str(path / "trainable.safetensors"))

    def _find_resume(self) -> tuple[Path | None, dict | None]:
        """The checkpoint to resume from and its state, checked without the model: complete, readable, and of
        this model family."""
        resume = self.cfg.checkpoint.resume
        if not resume:
            return None, None
        path = ckpt.newest_complete(self.out) if resume == "auto" else Path(resume)
        if path is None:
            return None, None
        state = ckpt.read_state(path)
        if state.get("family") != self.cfg.model.family:
            raise ValueError(f"checkpoint {path} is of model family {state.get('family')!r}, not "
                             f"{self.cfg.model.family!r} (model.family)")
        if not any((path / "engine").glob("*model_states.pt")):
            raise FileNotFoundError(f"checkpoint {path} has no DeepSpeed engine state: {path / 'engine'} is missing "
                                    f"or empty")
        # What DeepSpeed would refuse with a layout error (or load into the wrong parameters), named by key.
        saved = state.get("config", {}).get("trainable", {})
        now = json.loads(json.dumps(to_dict(self.cfg)["trainable"]))
        # the dropout rate changes no parameter: free to change
        wrong = [f"trainable.{k}: {saved.get(k)!r} there, {now.get(k)!r} now"
                 for k in sorted(set(saved) | set(now)) if k != "lora_dropout" and saved.get(k) != now.get(k)]
        if saved and wrong:
            raise ValueError(f"checkpoint {path} trained other parameters ({'; '.join(wrong)}). Resume with the "
                             f"same trainable section, or start a new run (checkpoint.resume=null and a new "
                             f"logging.output_dir)")
        self.sampler.check_state(state["sampler"], f"checkpoint {path}")
        return path, state

    def _check_zero_layout(self, path: Path, state: dict) -> None:
        """DeepSpeed loads a ZeRO optimizer state only into the stage and number of ranks that wrote it: refuse
        any other before minutes of model loading, naming both."""
        saved = state.get("zero_stage")
        if saved is None:  # written before checkpoints recorded it
            return
        if saved != self.zero_stage:
            raise ValueError(f"checkpoint {path} was written under ZeRO stage {saved}, this run uses stage "
                             f"{self.zero_stage} (deepspeed.config={self.cfg.deepspeed.config}): DeepSpeed cannot "
                             f"load one stage's optimizer state into another. Resume with the same DeepSpeed config")
        if saved > 0 and state.get("world_size") != self.world:
            raise ValueError(f"checkpoint {path} was written by {state.get('world_size')} ranks under ZeRO stage "
                             f"{saved}, and this run has {self.world}: DeepSpeed loads ZeRO optimizer shards only "
                             f"into as many ranks as wrote them. Resume on {state.get('world_size')} ranks, or start "
                             f"a new run from its trainable.safetensors")

    def _set_aside_other_timelines(self, start_step: int) -> None:
        """Checkpoints newer than where this run starts (a run started over, or resumed from an older checkpoint)
        belong to another timeline: left in place, they would win the next auto-resume and outlive this run's
        own checkpoints in pruning. They are moved, whole, into a ``superseded-*`` folder beside them."""
        if self.rank == 0:
            moved_to = ckpt.set_aside_newer(self.out, start_step)
            if moved_to is not None:
                print(f"[rgpo] this run starts at step {start_step}; the checkpoints after it, from an earlier run, "
                      f"were moved to {moved_to}", flush=True)
        dist_utils.barrier()

    def _load_resume(self, path: Path, state: dict) -> str | None:
        """Engine (weights, optimizer, scheduler), step, data position and RNG; returns the wandb run id."""
        if state.get("world_size") != self.world:  # allowed without ZeRO (see _check_zero_layout)
            print(f"[rgpo] resuming {path} written by {state.get('world_size')} ranks on {self.world}", flush=True)
        loaded, _ = self.engine.load_checkpoint(str(path), tag="engine", load_module_strict=False)
        if loaded is None:
            raise FileNotFoundError(f"checkpoint {path}: DeepSpeed found no engine state for rank {self.rank} in "
                                    f"{path / 'engine'}")
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.sampler.load_state_dict(state["sampler"])
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        else:  # e.g. more ranks than wrote the checkpoint: the run goes on, but does not repeat the original
            print(f"[rgpo] rank {self.rank}: {rng_file} is missing; this rank continues from fresh random state, so "
                  f"the resumed run will not repeat the interrupted one exactly", flush=True)
        print(f"[rgpo] resumed from {path} at step {self.step}", flush=True)
        return state.get("wandb_run_id")

    def close(self) -> None:
        self.logger.finish()


# ================================================================================================ small helpers
def _zero3_offload(engine):
    """The ZeRO-3 parameter-offload object that owns the model's fetch/release hooks (None: no optimizer yet)."""
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return None
    offload = getattr(optimizer, "parameter_offload", optimizer)
    return offload if hasattr(offload, "forward_hooks") and hasattr(offload, "module") else None


def _remove_zero3_hooks(offload) -> None:
    for module in offload.module.modules():
        for param in module.parameters(recurse=False):
            if hasattr(param, "ds_active_sub_modules"):
                param.ds_active_sub_modules.clear()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def _restore_zero3_hooks(offload) -> None:
    coordinator = getattr(offload, "param_coordinator", None)
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()  # the module order recorded so far no longer holds
    offload._register_deepspeed_module(offload.module)


def _progress(start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="rgpo", dynamic_ncols=True)


def _install_stop_handlers(trainer: RGPOTrainer):
    """SIGTERM / SIGINT (cluster preemption, Ctrl-C) ask for a checkpoint at the end of the current step."""
    def handler(signum, frame):
        if trainer._stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        trainer._stop_requested = True
        print(f"[rgpo] signal {signum}: finishing the step, saving a checkpoint, then exiting", flush=True)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with suppress(ValueError):  # not the main thread: leave signals alone
            previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_stop_handlers(previous) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)

