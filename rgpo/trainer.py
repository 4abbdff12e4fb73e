"""The RGPO trainer: rollout -> rewards -> advantages -> update, under DeepSpeed ZeRO-0/1/2/3.

Launch with ``deepspeed --num_gpus N --module rgpo train --config ...``, ``torchrun``, or ``rgpo train --config ...``
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
import dataclasses
import json
import os
import signal
from collections.abc import Callable
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rgpo import checkpointing as ckpt
from rgpo import distributed as dist_utils
from rgpo import interleaved
from rgpo import rewards as reward_lib
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
from rgpo.checkpointing import ResumeError, RunFinished
from rgpo.config import RGPOConfig, save_config, to_dict, with_output_dir
from rgpo.console import startup_summary
from rgpo.data import PromptRow, PromptSampler, check_columns, load_prompts
from rgpo.deepspeed_config import build_deepspeed_config, zero_stage
from rgpo.evaluation.loop import LoopEvaluation
from rgpo.guards import StepGuards
from rgpo.image_policy import ImagePolicy, ImageRollout
from rgpo.losses import masked_mean, policy_loss
from rgpo.models import Completions, Condition, PromptBatch, UnifiedModel, in_memory
from rgpo.modes import TrainModeSwitch
from rgpo.scoring import completion_id_lists, score_samples
from rgpo.seeding import mix_seed, rng_state, seed_everything, set_rng_state
from rgpo.tracking import MetricsHistory, NullLogger, PhaseTimer, TensorBoardLogger, WandbLogger, side_by_side


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
    image_rollout: ImageRollout | interleaved.InterleavedRecord | None = None  # images, SDE steps, advantages


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
                 logger: NullLogger | None = None, train_dataset: Any = None, eval_dataset: Any = None):
        """``train_dataset`` / ``eval_dataset``: prompts given directly (a ``datasets.Dataset`` or a list of row
        dicts, as TRL's trainers take them) instead of ``data.train_file`` / ``data.eval_file``."""
        # Everything that needs no model (config, family, data, rewards, the checkpoint to resume) is checked
        # first, from the launcher's rank variables: bad input fails in seconds, before DeepSpeed starts.
        self.rank, self.local_rank, self.world = dist_utils.launched_ranks()
        cfg = with_output_dir(cfg)
        self.cfg = cfg.validate(self.world, needs_data_file=train_dataset is None)
        self.device = torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        self.out = Path(cfg.logging.output_dir)
        seed_everything(cfg.seed)
        # What only the model's family can say about the config (its parts, regularisers, options), before any
        # model is built.
        family = model_family(cfg)
        check_family_config(cfg, family)
        self.family = family.family

        # Data and rewards are checked before the model is loaded: bad input fails in seconds, not minutes.
        self.train_rows = load_prompts(train_dataset if train_dataset is not None else cfg.data.train_file)
        eval_source = eval_dataset if eval_dataset is not None else cfg.data.eval_file
        self.eval_rows = load_prompts(eval_source) if eval_source else []
        # eval.benchmark / eval.understanding (rgpo.evaluation): their files are read and checked now too.
        self.loop_eval = LoopEvaluation(cfg.eval, output_dir=self.out, main=self.rank == 0, seed=cfg.data.seed,
                                        train_prompts=[r.prompt for r in self.train_rows])
        # Unique names: two rewards whose functions share a name get distinct log keys and table columns.
        self.rewards = reward_lib.get_rewards(cfg.rewards.functions) if reward_fns is None else \
            reward_lib.unique_names([r if isinstance(r, reward_lib.Reward) else reward_lib.get_reward(r)
                                     for r in reward_fns])
        for reward in self.rewards:
            for column in reward_lib.registry.required_columns(reward):
                for rows in (self.train_rows, self.eval_rows):
                    check_columns(rows, column, reward.name)
        G = cfg.rollout.num_generations
        self.sampler = PromptSampler(len(self.train_rows), cfg.rollout.batch_size // G, G, seed=cfg.data.seed,
                                     shuffle=cfg.data.shuffle, rank=self.rank, world_size=self.world,
                                     source=f"data.train_file={cfg.data.train_file}")
        # An unusable checkpoint (or a finished run) is reported now, before minutes of model loading.
        self.resume_changes: dict[str, tuple[Any, Any]] = {}
        resume_from, resume_state = self._find_resume()

        import deepspeed

        self.out.mkdir(parents=True, exist_ok=True)
        ranks = dist_utils.init_distributed(cfg.deepspeed.backend)
        if ranks != (self.rank, self.local_rank, self.world):
            raise RuntimeError(f"the process group's ranks {ranks} differ from the launcher's variables "
                               f"{(self.rank, self.local_rank, self.world)}")

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
        self.model.set_compiled_decode(cfg.rollout.compiled_decode)
        if cfg.trainable.mode == "lora" and cfg.trainable.full_parts:
            # Parts trained in full beside the LoRA have no adapter to switch off: the reference keeps copies of them
            # as built (taken before any resume loads trained weights into them).
            self.model.keep_reference_copies(cfg.trainable.full_parts, self._whole_parameters)
        for reward in self.rewards:  # a judge with the policy's own VLM (vlm_judge, model_path: policy) gets the reference
            use_policy = getattr(reward_lib.registry.unwrap(reward), "use_policy", None)
            if callable(use_policy):
                use_policy(self.reference_context)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        # The whole image side: drawing (one deterministic image per chain is its degenerate case), scoring,
        # the regulariser and the image policy gradient.
        self.image_policy = ImagePolicy(cfg, self.device) if cfg.rollout.image.enabled else None
        self.guards = StepGuards(cfg.guards, rank=self.rank, group_size=cfg.rollout.num_generations, model=self.model,
                                 reward_names=[r.name for r in self.rewards], resume_state=resume_state,
                                 device=self.device)
        # The step's phase timer: a hook for benchmarks (a PhaseTimer subclass that also records memory, say).
        self.timer_factory: Callable[..., PhaseTimer] = PhaseTimer
        self.last_grad_norm: float | None = None
        self._timer = PhaseTimer()
        # train()/eval() without walking the module tree each time (the tree is final from here on)
        self.set_training = TrainModeSwitch(self.model)
        self._stop_requested = False
        run_id = self._load_resume(resume_from, resume_state) if resume_from is not None else None
        self.logger = logger or self._make_logger(run_id)
        if self.rank == 0:
            save_config(cfg, self.out / "config.yaml")
        self.loop_eval.load_judge(self.device)  # once, on rank 0, on eval.judge_device

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
        if lc.report_to == "tensorboard":
            inner = TensorBoardLogger(self.out / "tensorboard", config=to_dict(self.cfg))
        elif lc.report_to == "none" or mode == "disabled":
            inner = NullLogger()
        else:
            inner = WandbLogger(project=lc.project, name=lc.run_name or self.out.name, tags=lc.tags, mode=mode,
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
    def timed_reference(self):
        """:meth:`reference_context`, its time charged to the step's ``update/reference`` phase."""
        with self._timer("update/reference"), self.reference_context() as ref_model:
            yield ref_model

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
        self._timer = timer  # the update's reference runs are charged to update/reference
        slots = self.sampler.next_step()
        with timer("rollout"):
            rollout = self.rollout(slots, timer)
        reward_seconds: dict[str, float] = {}
        with timer("rewards"):
            per_reward = self.score(rollout, reward_seconds)  # (n, R) on this rank, NaN where one does not apply
        for name, seconds in reward_seconds.items():  # timing/reward/<name>: inside timing/rewards, not added to it
            timer.seconds[f"reward/{name}"] += seconds
        with timer("guards"):  # rgpo.guards: raises GuardError before a step that would train on nothing
            self.guards.after_rewards(self.step + 1, rollout, per_reward, [r.weight for r in self.rewards],
                                      self.reference_context, self.image_policy is not None)
        with timer("advantages"):
            weights = [r.weight for r in self.rewards]
            local_adv, all_rewards, total = global_advantages(
                per_reward, weights, rollout.global_indices, self.cfg.rollout.num_generations,
                self.cfg.loss.advantage_scale, self.cfg.loss.advantage_eps)
        scheduled_lr = self.scheduler.get_last_lr()[0]  # this step's learning rate, as the schedule sets it
        with timer("update"):
            update_metrics = self.update(rollout, local_adv)
        self.step += 1
        metrics = self._step_metrics(rollout, all_rewards, total, update_metrics)
        with timer("guards"):
            metrics.update(self.guards.after_update(self.step, metrics, self.last_grad_norm,
                                                    self.engine.was_step_applied(), scheduled_lr))
        metrics.update(timer.metrics())
        step_time = sum(v for k, v in timer.seconds.items() if "/" not in k)  # nested phases are inside these
        metrics["throughput/chains_per_s"] = self.cfg.rollout.batch_size / max(step_time, 1e-9)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics.update(trl_aliases(metrics))
        if self._should(self.cfg.logging.table_every):
            self._log_table(rollout, per_reward, local_adv)
            if self.rank == 0 and self.cfg.logging.console_samples:
                self._print_completions(rollout, per_reward, self.cfg.logging.console_samples)
        self._last_rollout = rollout
        return metrics

    @torch.no_grad()
    def rollout(self, slots, timer: PhaseTimer) -> Rollout:
        cfg, model = self.cfg, self.model
        self.set_training(False)
        rows = [self.train_rows[s.prompt_index] for s in slots]
        images_on = self.image_policy is not None
        # An interleaved model draws its images inside the chains (rgpo.interleaved): the drawer records them.
        drawer = interleaved.drawer_for(self.image_policy, model, slots, self.step, self.negative_source) \
            if images_on and model.draws_inside_chains() else None
        with self.gathered():
            with timer("rollout/text"):
                prompts, completions = self._sample_chains(rows, [s.group for s in slots], draw=drawer)
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
            if drawer is not None:
                images, image_rollout = drawer.record.per_chain(len(rows)), drawer.record
            elif images_on:
                with timer("rollout/images"), model.rollout_context():
                    images, image_rollout = self.image_policy.draw(model, policy.condition, slots, self.step,
                                                                   self.negative_source)
        return Rollout(rows, prompts, completions, policy.logps if policy is not None else None,
                       ref.logps if ref is not None and cfg.loss.beta > 0 else None,
                       ref.condition if ref is not None else None, images, [s.global_index for s in slots],
                       image_rollout)

    def _sample_chains(self, rows: list[PromptRow], groups: list[int],
                       draw=None) -> tuple[PromptBatch, Completions]:
        """Sample one chain per slot. When every group on this rank is whole (the usual layout), each prompt
        is encoded once and asked for its k chains at once, so the model can share the prompt's prefill.
        ``draw``: an interleaved model's image drawer (chains in the rows' order)."""
        cfg = self.cfg.rollout
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.data.seed, self.step, self.rank))
        counts = [groups.count(g) for g in dict.fromkeys(groups)]
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                      top_k=cfg.top_k, generator=gen, **({"draw": draw} if draw is not None else {}))
        if len(set(counts)) == 1:
            firsts = [rows[groups.index(g)] for g in dict.fromkeys(groups)]
            prompts = self.model.build_prompts([r.as_model_row() for r in firsts]).to(self.device)
            completions = self.model.generate(prompts, num_generations=counts[0], **kwargs)
            prompts = prompts.repeat_interleave(counts[0])
        else:
            prompts = self.model.build_prompts([r.as_model_row() for r in rows]).to(self.device)
            completions = self.model.generate(prompts, num_generations=1, **kwargs)
        return prompts, completions.to(self.device)

    def score(self, rollout: Rollout, seconds: dict[str, float] | None = None) -> torch.Tensor:
        """(n, R) this rank's rewards per chain (with images: as the image policy scores them); each reward's
        wall-clock seconds are added to ``seconds[name]``."""
        ids = completion_id_lists(rollout.completions)
        if isinstance(rollout.image_rollout, interleaved.InterleavedRecord):
            return interleaved.score_interleaved(self.rewards, rollout.rows, rollout.completions.texts,
                                                 rollout.image_rollout, self.cfg, self.device, ids, seconds)
        if rollout.image_rollout is not None:
            return self.image_policy.score(self.rewards, rollout.rows, rollout.completions.texts,
                                           rollout.image_rollout, rollout.global_indices, ids, seconds)
        return score_samples(self.rewards, rollout.rows, rollout.completions.texts, rollout.images,
                             self.cfg.rewards, self.device, ids, seconds)

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
        advantages = self.guards.watch_advantages(advantages)  # the loss must depend on them: checked below
        for _ in range(cfg.loss.num_iterations):
            for start in range(0, n, mb):
                idx = list(range(start, min(n, start + mb)))
                loss, metrics = self.micro_batch_loss(rollout, advantages, idx, token_normalizer)
                self.engine.backward(loss)
                self.engine.step()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
            norm = self.engine.get_global_grad_norm()  # before clipping, as TRL logs it
            self.last_grad_norm = float(norm) if norm is not None else None
            if self.engine.was_step_applied():
                self.nonfinite_in_a_row = 0
            else:
                self._count_skipped_step()
        self.guards.check_advantages_used(advantages)
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
            image_reg = images.regularizer(self.engine, self.timed_reference, self.model, out.condition,
                                           rollout.ref_condition.select(idx),
                                           seed=mix_seed(cfg.seed, self.step, self.rank, idx[0]))
            loss = loss + lc.image_kl_coef * image_reg
            metrics["kl/image"] = image_reg.detach()
        if images is not None and images.recompute and isinstance(rollout.image_rollout,
                                                                  interleaved.InterleavedRecord):
            image_loss, image_metrics = interleaved.interleaved_image_loss(
                rollout.image_rollout, idx, self.engine, self.model, images.sampling, lc.image_clip_range,
                lc.image_pg_coef)
            loss = loss + image_loss
            metrics.update(image_metrics)
        elif images is not None and images.recompute:  # image policy gradient and/or gaussian_kl
            image_loss, image_metrics = images.loss(rollout, idx, out, self.engine, self.timed_reference,
                                                    self.model, self.negative_source)
            loss = loss + image_loss
            metrics.update(image_metrics)
        self.guards.on_policy(idx, out.logps, rollout.old_logps, completions.completion_mask, advantages[index], metrics)
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
        metrics.update(dist_utils.mean_across_ranks(local, self.device))
        # Lengths over every rank's chains; a chain that used all max_new_tokens was cut (TRL: clipped_ratio).
        lengths = dist_utils.all_gather_cat(rollout.completions.completion_mask.sum(1).float().to(self.device))
        metrics["completion/mean_length"] = lengths.mean().item()
        metrics["completion/min_length"] = lengths.min().item()
        metrics["completion/max_length"] = lengths.max().item()
        metrics["completion/clipped_ratio"] = (lengths >= self.cfg.rollout.max_new_tokens).float().mean().item()
        if self.last_grad_norm is not None:
            metrics["grad_norm"] = self.last_grad_norm
        metrics["skipped_steps"] = float(self.skipped_steps)
        if isinstance(rollout.image_rollout, ImageRollout):  # within-chain image rewards (gathered over ranks)
            metrics.update(rollout.image_rollout.metrics)
        return metrics

    def _log_table(self, rollout: Rollout, per_reward: torch.Tensor, advantages: torch.Tensor) -> None:
        rows = []
        for i, row in enumerate(rollout.rows):
            rows.append([self.step, row.prompt, rollout.completions.texts[i], side_by_side(rollout.images[i]),
                         *[float(v) for v in per_reward[i].tolist()], float(advantages[i])])
        everything = [r for part in dist_utils.all_gather_objects(rows) for r in part]
        columns = ["step", "prompt", "reasoning", "image", *[r.name for r in self.rewards], "advantage"]
        self.guards.check_table(self.step, columns, everything, self.image_policy is not None)
        self.logger.log_table("rollouts", columns, everything, step=self.step)

    def summary(self) -> str:
        """What this run is about to do (printed once on rank 0)."""
        cfg = self.cfg
        params = list(self.model.parameters())
        img = cfg.rollout.image
        images = "off" if not img.enabled else (f"{img.images_per_chain} per chain, {img.height}x{img.width}, "
                                                 f"{img.steps} steps")
        tracker = "none" if isinstance(self.logger, NullLogger) and not isinstance(self.logger, MetricsHistory) \
            else (cfg.logging.mode or os.environ.get("WANDB_MODE") or "online")
        return startup_summary(
            family=self.family, model_path=cfg.model.path, train_prompts=len(self.train_rows),
            eval_prompts=len(self.eval_rows), ranks=self.world,
            trainable=sum(p.numel() for p in params if p.requires_grad),
            total=sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params),
            start_step=self.step, max_steps=cfg.optim.max_steps,
            prompts_per_step=cfg.rollout.batch_size // cfg.rollout.num_generations, group=cfg.rollout.num_generations,
            images=images, output_dir=str(self.out), tracker=f"wandb {tracker}" if tracker != "none" else "none")

    def _print_completions(self, rollout: Rollout, per_reward: torch.Tensor, count: int = 2) -> None:
        """A few of the step's chains on the console (rank 0), with their rewards."""
        names = [r.name for r in self.rewards]
        for i in range(min(count, len(rollout.rows))):
            scores = ", ".join(f"{n}={v:.3f}" for n, v in zip(names, per_reward[i].tolist()))
            text = " ".join(rollout.completions.texts[i].split())
            _console(f"[rgpo] step {self.step} | {rollout.rows[i].prompt[:60]!r} -> {text[:160]!r} | {scores}")

    def _should(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    # ------------------------------------------------------------------------------------------- loop
    def train(self) -> dict[str, float]:
        """Run until ``optim.max_steps``; checkpoint every ``checkpoint.every`` steps and on SIGTERM/SIGINT."""
        cfg = self.cfg
        if self.rank == 0:
            print(self.summary(), flush=True)
        bar = _progress(self.step, cfg.optim.max_steps) if self.rank == 0 and cfg.logging.progress_bar else None
        previous = _install_stop_handlers(self)
        metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        evaluating = bool(self.eval_rows) or self.loop_eval.active
        try:
            if cfg.eval.before_training and self.step == 0 and evaluating:
                self.evaluate()
            while self.step < cfg.optim.max_steps:
                metrics = self.train_step()
                self.history.append({"step": self.step, **metrics})
                if self._should(cfg.logging.log_every):
                    self.logger.log(metrics, step=self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(progress_fields(metrics))
                if self._should(cfg.eval.every) and evaluating:
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
        rank 0; then the benchmark and probe of ``eval`` (``rgpo.evaluation.loop``)."""
        benchmarks = self.loop_eval.run(self._eval_chains, self.step, self.logger) if self.loop_eval.active else {}
        rows = rows or self.eval_rows[: self.cfg.eval.num_prompts]
        if not rows:
            return benchmarks
        mine = rows[self.rank :: self.world]
        # A rank left without a prompt (fewer prompts than ranks) still runs one, and drops it: every rank must
        # make the same collective calls (ZeRO-3's gathers, synced generation).
        work = mine or rows[:1]
        completions, images = self._eval_generate([r.as_model_row() for r in work], list(range(len(work))))
        per_reward = score_samples(self.rewards, work, completions.texts, images, self.cfg.rewards, self.device,
                                   completion_id_lists(completions))
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
        return {**benchmarks, **results}

    def _eval_generate(self, model_rows: list[dict], indices: list[int], *, draw: bool = True, greedy: bool = False,
                       noise_step: int | None = None) -> tuple[Completions, list[list]]:
        """One chain per row from the policy as it is and, when ``draw``, its image from the deterministic sampler
        (the noise of ``indices`` at ``noise_step``, default the current step), on this rank."""
        self.set_training(False)
        with self.gathered():
            prompts = self.model.build_prompts(model_rows).to(self.device)
            gen = torch.Generator().manual_seed(mix_seed(self.cfg.data.seed, 10**6, self.rank))
            # an interleaved model draws its images inside the chains, deterministically (noise level 0)
            drawer = None
            if draw and self.image_policy is not None and self.model.draws_inside_chains():
                icfg = dataclasses.replace(self.image_policy.evaluation, noise_level=0.0)
                drawer = interleaved.InterleavedDrawer(self.model, icfg, indices,
                                                       self.step if noise_step is None else noise_step,
                                                       record_steps=False, negative_from=self.negative_source)
            completions = self.model.generate(
                prompts, num_generations=1, max_new_tokens=self.cfg.rollout.max_new_tokens,
                temperature=0.0 if greedy else self.cfg.rollout.temperature, top_p=self.cfg.rollout.top_p,
                top_k=self.cfg.rollout.top_k, generator=gen,
                **({"draw": drawer} if drawer is not None else {})).to(self.device)
            images: list[list] = [[] for _ in model_rows]
            if drawer is not None:
                images = drawer.record.per_chain(len(model_rows))
            elif draw and self.image_policy is not None:
                policy = self.model.forward_text(prompts, completions, with_condition=True)
                images = self.image_policy.draw_deterministic(self.model, policy.condition, indices, indices,
                                                              self.step if noise_step is None else noise_step,
                                                              self.negative_source, evaluation=True)
        return completions, images

    def _eval_chains(self, rows: list[dict], *, draw: bool, greedy: bool) -> list[tuple[str, list]]:
        """``_eval_generate`` over ``rows`` spread across the ranks in chunks of a rollout's chains per rank,
        gathered in order on every rank. The noise of each row is fixed (its index, step 0): every evaluation
        draws a prompt from the same noise."""
        mine = list(range(self.rank, len(rows), self.world))
        chunk = max(1, self.cfg.rollout.batch_size // self.world)
        kept = []
        # Every rank makes the same number of calls (ZeRO-3 gathers, synced generation): one left without rows
        # runs row 0 and drops it.
        for start in range(0, -(-len(rows) // self.world), chunk):
            part = mine[start : start + chunk]
            work = part or [0]
            completions, images = self._eval_generate([rows[i] for i in work], work, draw=draw, greedy=greedy,
                                                       noise_step=0)
            kept += list(zip(part, completions.texts, images))
        everything = sorted((x for part in dist_utils.all_gather_objects(kept) for x in part), key=lambda x: x[0])
        return [(text, images) for _, text, images in everything]

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
                     "tokenizer_fingerprint": self.guards.fingerprint,
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
        if state.get("family") != self.family:
            raise ValueError(f"checkpoint {path} is of model family {state.get('family')!r}, not "
                             f"{self.family!r} (model.family)")
        if int(state["step"]) >= self.cfg.optim.max_steps:
            raise RunFinished(f"the run in {self.out} is finished: its checkpoint {path.name} is at step "
                              f"{state['step']} of optim.max_steps={self.cfg.optim.max_steps}. Raise optim.max_steps "
                              f"to train on, or name a new logging.output_dir for a new run")
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
        self.resume_changes = self._resume_changes(path, state)
        return path, state

    # Keys whose change means another run: resuming would put one model's optimizer state into another.
    UNSAFE_ON_RESUME = {
        "model.path": "another base model",
        "model.family": "another model family",
        "model.dtype": "another dtype of the trained weights and optimizer state",
    }

    def _resume_changes(self, path: Path, state: dict) -> dict[str, tuple[Any, Any]]:
        """Every config key that differs from the checkpoint's, reported (never silently applied); the unsafe
        ones refused by key. The others are applied: this run uses the new values (``optim.lr`` included, see
        :meth:`_apply_resumed_lr`)."""
        saved = ckpt.config_with_portable_paths(state.get("config", {}), path)
        now = ckpt.absolute_paths(to_dict(self.cfg), os.getcwd())
        changes = {key: (old, new) for key, (old, new) in _flat_differences(saved, now).items()
                   if key != "checkpoint.resume" and not key.startswith("trainable.")}
        unsafe = [f"{key}: {old!r} there, {new!r} now ({self.UNSAFE_ON_RESUME[key]})"
                  for key, (old, new) in changes.items() if key in self.UNSAFE_ON_RESUME]
        if unsafe:
            raise ResumeError(f"checkpoint {path} cannot continue this run: {'; '.join(unsafe)}. Resume with the "
                              f"checkpoint's values, or start a new run in a new logging.output_dir")
        if changes and self.rank == 0:
            listed = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
            print(f"[rgpo] resuming {path} with {len(changes)} config change(s), applied from this step on:\n{listed}",
                  flush=True)
        return changes

    def _apply_resumed_lr(self) -> None:
        """DeepSpeed restores the scheduler's base learning rate from the checkpoint; a changed ``optim.lr`` is the
        one this run asked for, so the schedule continues from the same step at the new peak."""
        lr = self.cfg.optim.lr
        if all(base == lr for base in self.scheduler.base_lrs):
            return
        factor = lr_lambda(self.cfg)(self.scheduler.last_epoch)
        self.scheduler.base_lrs = [lr] * len(self.scheduler.base_lrs)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = lr
            group["lr"] = lr * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

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
        self._apply_resumed_lr()
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


# TRL's GRPOTrainer names for the same figures, logged beside rgpo's so dashboards and habits carry over.
TRL_NAMES = {
    "reward/total": "reward",
    "reward/std": "reward_std",
    "reward/frac_zero_std": "frac_reward_zero_std",
    "kl/text": "kl",
    "lr": "learning_rate",
    "completion/mean_length": "completions/mean_length",
    "completion/min_length": "completions/min_length",
    "completion/max_length": "completions/max_length",
    "completion/clipped_ratio": "completions/clipped_ratio",
}


def _console(line: str) -> None:
    """A line on the console that does not break the progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(line)


def progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's per-step figures."""
    fields = {"reward": f"{metrics['reward/total']:.3f}", "kl": f"{metrics.get('kl/text', 0):.4f}",
              "len": f"{metrics['completion/mean_length']:.0f}",
              "clipped": f"{metrics.get('completion/clipped_ratio', 0):.2f}"}
    if "grad_norm" in metrics:
        fields["grad"] = f"{metrics['grad_norm']:.3g}"
    if "kl/image" in metrics:
        fields["kl_img"] = f"{metrics['kl/image']:.4f}"
    return fields


def trl_aliases(metrics: dict[str, float]) -> dict[str, float]:
    """TRL's names of the step's metrics (``rewards/<name>/mean`` for rgpo's ``reward/<name>/mean``, ...)."""
    out = {trl: metrics[ours] for ours, trl in TRL_NAMES.items() if ours in metrics}
    for key, value in metrics.items():
        if key.startswith("reward/") and key.count("/") == 2:
            out["rewards/" + key.split("/", 1)[1]] = value
    return out


def _flat_differences(old: dict, new: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every leaf that differs between two config dicts."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        full = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict) and key != "kwargs" and key != "options":
            out.update(_flat_differences(a, b, full + "."))
        elif a != b:
            out[full] = (a, b)
    return out


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

