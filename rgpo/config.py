"""The run configuration: one typed dataclass tree, loaded from YAML files plus ``key.sub=value`` overrides.

Defaults reproduce MindOmni's released RGPO stage (LoRA r64/alpha128 on the language model, G=4, 8 prompts x 4
chains per step, temperature 1, 512x512 images with 50 steps and guidance 3 from one shared seed, format +
CLIP-consistency rewards, beta 0.01, image-KL coefficient 0.01, lr 1e-5 linear decay, clip 1.0, ZeRO-2).

Every field carries its docstring right below it; ``tests/test_config.py`` checks that none is missing.
Unknown keys, wrong types and impossible combinations raise :class:`ConfigError` naming the key, the value,
what is valid and why (and the YAML ``file:line`` when the value came from a file).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot run: the message names the key, the value and what is valid."""


# ------------------------------------------------------------------------------------------------ the tree
@dataclass
class ModelConfig:
    family: str | None = None
    """Unified-model family (``rgpo.models.MODEL_FAMILIES``); None: detected from the layout of the folder
    ``path`` names. Models built in memory (``tiny``) need it."""
    path: str | None = None
    """Checkpoint folder in the family's released layout (see the README's "Model families"). ``tiny`` builds a
    tiny random model in memory (tests, smoke runs); ``random:<shape>`` random weights in a named shape
    (e.g. the released model's sizes, for benchmarks)."""
    options: dict = field(default_factory=dict)
    """The family's typed options (prompts, caches, batch sizes of its parts): ``rgpo config keys`` lists each
    family's with its docs. Unknown keys are errors."""
    dtype: str = "bfloat16"
    """Weights and compute dtype of the trained and generating parts: bfloat16, float16 or float32. Parts a
    family keeps in float32 (a VAE) stay float32."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the checkpoint folder to run. Off: only library classes are used."""


@dataclass
class TrainableConfig:
    mode: str = "lora"
    """How the language model trains: ``lora`` (peft adapter; the reference is the adapter disabled, as
    MindOmni's RGPO) or ``full`` (every weight outside the vision tower; the reference is a frozen copy)."""
    lora_r: int = 64
    """LoRA rank (MindOmni: 64)."""
    lora_alpha: int = 128
    """LoRA scaling numerator (MindOmni: 128)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input (MindOmni: 0.05). Set 0 for bit-exact reproducibility checks."""
    full_parts: list[str] = field(default_factory=list)
    """Other parts of the model trained in full, by the family's part names (e.g. ``[connector]``; see the
    README's "Model families"). Gradients flow through frozen parts either way. In LoRA mode the reference runs
    frozen copies of these parts as built."""
    generator_lora_r: int = 0
    """Rank of a LoRA on the image generator (the part the image sampler integrates); 0: generator frozen."""
    generator_lora_alpha: int | None = None
    """LoRA scaling numerator of the generator LoRA; None: 2 * generator_lora_r."""
    generator_lora_targets: list[str] | None = None
    """Module-name suffixes in the generator that get the LoRA; None: the family's default (its attention
    projections)."""


@dataclass
class DataConfig:
    train_file: str = ""
    """JSONL prompt file, or a local Hugging Face ``datasets`` folder (``Dataset.save_to_disk``): ``prompt`` (a
    string, or TRL's conversational list of ``{role, content}`` messages; or MindOmni's
    ``conversations[0].value``), optional ``images`` (paths relative to the file), optional ``gt_prompt``; every
    other column is passed to the rewards."""
    eval_file: str | None = None
    """Held-out JSONL prompt file for periodic evaluation (same format)."""
    shuffle: bool = True
    """Reshuffle the prompts every epoch (seeded by ``seed``)."""
    seed: int = 0
    """Seed for data order and text sampling."""


@dataclass
class ImageConfig:
    enabled: bool = True
    """Draw an image per chain. False gives plain VLM GRPO on text (no decoder, no image KL)."""
    height: int = 512
    """Image height in pixels; a multiple of what the family needs (MindOmni: 16, its VAE factor x patch)."""
    width: int = 512
    """Image width in pixels; likewise."""
    steps: int = 50
    """Denoising steps of the family's sampler."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale against the family's negative; 1 disables guidance."""
    seed: int = 42
    """Seed of the initial noise. MindOmni uses 42 for every rollout of every step."""
    shared_noise: bool = True
    """One initial noise per group (MindOmni): reward differences inside a group come only from the text.
    With ``images_per_chain`` M > 1, image m of every chain of a group shares its initial noise (and its SDE
    noise): the chains of a group are compared on the same M noises."""
    images_per_chain: int = 1
    """M, images drawn per reasoning chain (N chains x M images per prompt). A chain's reward (text advantage)
    is the mean over its M images; with M >= 2 each image also gets an advantage within its chain's M images
    (image policy gradient, ``loss.image_pg_coef``). 1: one image per chain (MindOmni)."""
    noise_level: float = 0.0
    """Flow-GRPO's SDE noise level ``a`` (they use 0.7): > 0 draws the rollout images with the SDE sampler and
    records each stochastic step's log-prob (needed by the image policy gradient and gaussian_kl); 0: the
    deterministic Euler sampler (MindOmni). Evaluation images always use the Euler sampler."""
    sde_window: int | None = None
    """Number of consecutive stochastic (SDE) steps per rollout (Flow-GRPO-Fast); the other steps are Euler
    steps. The window start is drawn per optimizer step (the same on every rank). None: every step."""
    sde_window_range: tuple[int, int] | None = None
    """Half-open range of step indices the SDE window must lie in (Flow-GRPO-Fast's sde_window_range, e.g.
    [0, 25] for the noisier half of 50 steps); None: all steps."""
    eval_steps: int | None = None
    """Denoising steps of evaluation images (the trainer's evaluation, ``rgpo demo``'s held-out figures); None:
    ``steps``. Rollouts with fewer steps than evaluation draw their training images cheaper."""
    eval_guidance_scale: float | None = None
    """Guidance scale of the trainer's evaluation images; None: ``guidance_scale``. With ``guidance_scale: 1``
    (CFG-free rollouts: one decoder batch per step instead of two) evaluation can still be guided."""
    pg_condition_cache: bool = False
    """Keep the condition KV cache when drawing images whose SDE steps an image loss replays (image PG,
    gaussian_kl): the condition tokens run once per image, not at every step. The cached path differs from
    the update's replay by ~1e-5, so the first on-policy ratio is ~1 instead of exactly 1. False: sample on the
    exact (cache-free) path."""


@dataclass
class RolloutConfig:
    num_generations: int = 4
    """G, the reasoning chains sampled per prompt."""
    batch_size: int = 32
    """Chains per optimizer step, all ranks together (MindOmni: 8 prompts x 4). A multiple of
    ``num_generations`` and of the number of ranks."""
    max_new_tokens: int = 2048
    """Maximum reasoning-chain length in tokens."""
    temperature: float = 1.0
    """Sampling temperature of the chains."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1 disables."""
    top_k: int = 0
    """Top-k sampling; 0 disables."""
    compiled_decode: bool = False
    """Decode the chains with a compiled one-token step on a static KV cache (``torch.compile``; CUDA graphs on
    CUDA): the same tokens as the eager loop, compiled once per shape at the first steps. Falls back to the eager
    loop, saying why once, where compilation is unavailable (ZeRO-3, no C++ compiler on a CPU) or for a family
    without a compiled step. False (default): the eager loop; see the README's benchmark section for when it pays."""
    image: ImageConfig = field(default_factory=ImageConfig)
    """How each chain's image is drawn."""


@dataclass
class RewardSpec:
    name: str = "format"
    """A registered reward (``format``, ``format_strict``, ``clip_consistency``, ``pickscore``, ``hpsv2``,
    ``aesthetic``, ``ocr``, ``vlm_judge``, ``remote``), a dotted path ``package.module:function``, or a file path
    ``path/to/file.py:function``."""
    weight: float = 1.0
    """Weight of this reward in the total (MindOmni: an unweighted sum)."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments for a reward class (e.g. ``pretrained`` for clip_consistency)."""
    python: str | None = None
    """Run the reward in this Python interpreter (``/path/to/venv/bin/python``), in a resident worker process fed
    batches over a pipe: for a reward whose dependencies clash with rgpo's. ``name`` is then a
    ``module:function``, ``module.function`` or ``file.py:function`` that interpreter can load; the worker is
    restarted once if it dies (see :mod:`rgpo.rewards.isolated`). None: in the trainer's process."""


def _default_rewards() -> list[RewardSpec]:
    return [RewardSpec("format", 1.0), RewardSpec("clip_consistency", 1.0)]


@dataclass
class RewardsConfig:
    functions: list[RewardSpec] = field(default_factory=_default_rewards)
    """The reward functions, summed with their weights."""
    timeout_s: float | None = 600.0
    """Seconds a reward may take for one batch before the step fails with an error naming it; None: no limit."""
    parallel: bool = False
    """Run the reward functions at the same time, each in its own thread: worth it when rewards wait on
    something else (a remote judge, a subprocess). The rewards must then not share unguarded state."""


@dataclass
class LossConfig:
    beta: float = 0.01
    """Coefficient of the text KL (against the reference) per token (MindOmni: 0.01)."""
    kl_estimator: str = "k3"
    """Per-token KL estimator: k1, k2 or k3 (MindOmni, GRPO: k3)."""
    epsilon_low: float = 0.2
    """Lower clip range of the ratio: clip(r, 1 - epsilon_low, ...)."""
    epsilon_high: float = 0.2
    """Upper clip range of the ratio (DAPO's clip-higher uses ~0.28)."""
    aggregation: str = "grpo"
    """Loss aggregation: grpo (per-sequence mean, then mean; MindOmni), bnpo (each micro-batch's token mean),
    dapo (the global token mean over every rank and micro-batch, as TRL's), dr_grpo (token sum over chains x
    ``rollout.max_new_tokens``). dapo and dr_grpo do not depend on how chains are spread over ranks and
    micro-batches; grpo does not when micro-batches hold equal numbers of chains (enforced)."""
    advantage_scale: str = "group"
    """Advantage normalisation: group (unbiased group std; MindOmni), batch, none."""
    advantage_eps: float = 1e-4
    """Added to the std of the advantage normalisation (MindOmni: 1e-4)."""
    image_kl_coef: float = 0.01
    """Coefficient of the image regulariser (MindOmni's diff_beta). The released script passes 0.06 but the
    value never reaches the trainer, so 0.01, the trainer's default, is what produced the published model;
    rgpo defaults to what ran."""
    image_regularizer: str = "feature_kl"
    """Image-side regulariser, weighted by image_kl_coef: feature_kl (MindOmni's layer-wise decoder-feature KL),
    velocity_mse, gaussian_kl (closed-form KL between the policy's and the reference's SDE step Gaussians on the
    recorded stochastic steps: the exact KL, or Flow-GRPO's scaling with image_kl_convention=flow_grpo; needs
    rollout.image.noise_level > 0), or none. A family refuses one it cannot compute."""
    image_kl_convention: str = "exact"
    """How gaussian_kl measures one SDE step's divergence from the reference. exact: the true KL between the
    policy's and the reference's step Gaussians, |mean - mean_ref|^2 / (2 std^2) with std = a sqrt((1 - t) dt / t~),
    mean over latent elements. flow_grpo: Flow-GRPO's kl_loss, which divides by their std_dev_t = a sqrt((1 - t) /
    t~), the std WITHOUT the step's sqrt(dt): it is exact x dt per step (1/S of it on a uniform S-step grid). A
    Flow-GRPO beta (0.04 or 0.01 in their configs) reproduces their regularisation only with flow_grpo; under exact
    the same number regularises 1/dt times harder."""
    image_pg_coef: float = 0.0
    """Coefficient of the image policy-gradient loss (PPO-clipped ratio of the recorded SDE steps' log-probs,
    advantages within each chain's M images); 0: off (MindOmni's RGPO). Needs rollout.image.noise_level > 0,
    rollout.image.images_per_chain >= 2 and a trainable image side (trainable.generator_lora_r or
    trainable.full_parts)."""
    image_clip_range: float = 1.0e-4
    """Clip range of the image ratio: clip(r, 1 - image_clip_range, 1 + image_clip_range). Flow-GRPO uses 1e-4
    with its mean-over-latent-elements log-probs, which rgpo's SDE log-probs reproduce."""
    image_condition_grad: bool = False
    """Let the image policy-gradient loss (and gaussian_kl) reach the VLM through the condition states. False
    (Flow-GRPO, default): the condition is detached, the image loss trains only the generator LoRA / full parts and
    the VLM learns from the text loss alone."""
    image_kl_tau: float = 3.0
    """Softmax temperature of feature_kl (MindOmni: 3)."""
    image_kl_timesteps: int = 1
    """Timesteps drawn per sample for the image regulariser (MindOmni: 1, uniform on a 51-point grid)."""
    num_iterations: int = 1
    """Updates per rollout batch. 1 (MindOmni) keeps the ratio at exactly 1; more reuse the rollouts with the
    clipped ratio against the sampling policy's log-probs."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate (MindOmni: 1e-5)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    schedule: str = "linear"
    """Learning-rate schedule after warm-up: linear (decay to 0 at max_steps; MindOmni), cosine, constant."""
    warmup_steps: int = 0
    """Linear warm-up steps (MindOmni: 0)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip (MindOmni: 1.0); 0 disables."""
    max_steps: int = 600
    """Optimizer steps of the run (MindOmni: ~600)."""
    micro_batch_size: int = 4
    """Chains per forward/backward on one rank; the rank's share of ``rollout.batch_size`` is accumulated over
    micro-batches into one optimizer step."""


@dataclass
class DeepSpeedConfig:
    config: str = "configs/zero2.json"
    """DeepSpeed JSON (``auto`` values are filled from this config); a path relative to the working directory
    or to the run's YAML file."""
    zero_stage: int | None = None
    """Override of the JSON's ZeRO stage (0-3)."""
    backend: str | None = None
    """torch.distributed backend; None: nccl on CUDA, gloo on CPU."""
    zero3_gather_for_rollout: bool = True
    """ZeRO-3: gather the whole model on every GPU once for the rollout (fast generation, as TRL's
    ``ds3_gather_for_generation``; the full weights must fit beside the KV cache). false: keep them partitioned
    and let ZeRO-3 fetch each layer as it runs, for models that do not fit on one GPU (slower)."""


@dataclass
class LoggingConfig:
    output_dir: str | None = None
    """Where checkpoints, samples, plots and the wandb run folder go. None: ``outputs/run-<8 hex>``, named by the
    run's config (everything but the logging, checkpoint and eval sections and ``optim.max_steps``), so the same
    run relaunched resumes itself and two different runs never resume into each other."""
    report_to: str = "wandb"
    """The tracker: wandb, tensorboard (event files in ``<output_dir>/tensorboard``: scalars, the rollout table as
    text, images) or none. ``metrics.jsonl`` is written either way."""
    project: str = "rgpo"
    """wandb project."""
    run_name: str | None = None
    """wandb run name (default: the output folder's name)."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""
    mode: str | None = None
    """wandb mode: online, offline or disabled; None: the WANDB_MODE environment variable, else online."""
    log_every: int = 1
    """Log scalars every N steps."""
    table_every: int = 10
    """Log a table of prompts, reasoning chains, images, rewards and advantages every N steps; 0: never."""
    progress_bar: bool = True
    """Show a console progress bar on rank 0."""
    console_samples: int = 2
    """Chains printed on the console (prompt, reasoning, rewards) every ``table_every`` steps on rank 0; 0: none."""


@dataclass
class CheckpointConfig:
    every: int = 50
    """Save a checkpoint every N steps (and at the end); 0: only at the end."""
    keep_last: int = 3
    """How many complete checkpoints to keep."""
    resume: str | None = "auto"
    """auto: resume from the newest complete checkpoint in output_dir if there is one; a path: from it;
    None: start fresh."""


@dataclass
class EvalConfig:
    every: int = 50
    """Evaluate on ``data.eval_file`` every N steps; 0: never."""
    num_prompts: int = 5
    """Held-out prompts per evaluation (MindOmni logs 5 validation images)."""
    before_training: bool = False
    """Also evaluate once before the first step (step 0): the baseline a benchmark or the understanding probe is
    read against."""
    benchmark: str | None = None
    """``wise``: score WISE (``rgpo.evaluation.wise``) on a fixed subset of ``benchmark_data`` every ``every``
    steps, logging ``eval/wise/<category>``; None: no benchmark."""
    benchmark_data: str = ""
    """WISE's prompt files: its ``data_verified/`` folder (or ``merge.json``, or one category file)."""
    benchmark_prompts: int = 24
    """Size of the fixed WISE subset (spread over the six categories; drawn from ``seed``); 0: all 1000."""
    wise_protocol: str = "legacy"
    """WISE's rubric: ``legacy`` (the paper's: consistency, realism, aesthetics, WiScore = (0.7 C + 0.2 R + 0.1 A)
    / 2) or ``verified`` (WISE_Verified's binary score)."""
    judge: str = ""
    """Folder of the local judge (a Qwen2.5-VL-style vision-language model with its processor)."""
    judge_device: str | None = None
    """Where the judge runs (``cpu``, ``cuda:1``): off the policy's GPU memory when set; None: the rank's device."""
    judge_dtype: str = "bfloat16"
    """Judge weights dtype: bfloat16, float16 or float32."""
    judge_batch_size: int = 4
    """Images per judge call."""
    judge_max_new_tokens: int | None = None
    """Judge answer budget; None: WISE's (2000 legacy, 500 verified)."""
    understanding: str = ""
    """JSONL of multiple-choice questions with images (``rgpo.evaluation.understanding``): the policy's accuracy
    is logged as ``eval/understanding/accuracy``; empty: no probe."""
    understanding_questions: int = 0
    """Questions of ``understanding`` asked per evaluation (the first N); 0: all."""


@dataclass
class GuardsConfig:
    enabled: bool = True
    """Run the every-step invariants (``rgpo.guards``): errors stop the run, warnings log ``guard/<name>``."""
    ratio_tolerance: float = 0.02
    """Error: on a step's first (on-policy) pass, a chain's mean |log ratio| between update and rollout above
    this (text tokens when the rollout recorded log-probs; rms over image SDE steps)."""
    reference_tolerance: float = 1e-3
    """Error: the reference's log-probs on a fixed probe chain moving by more than this since the first step."""
    reference_probe_every: int = 10
    """Recompute the reference probe every N steps (one extra no-grad forward of one chain: about 1.5 % of a tiny
    CPU step, far less on real models; 1 catches a drift within the step); 0: never."""
    parameter_sample: int = 8
    """Trainable and frozen tensors (each) sampled to check an applied optimizer step moved the first, not the
    second; 0: no check."""
    reward_none_steps: int = 1
    """Error: a reward returning None for every chain of the step this many steps in a row; 0: never."""
    zero_spread_steps: int = 20
    """Error: every group without reward spread (all advantages 0) this many steps in a row; 0: never."""
    zero_grad_steps: int = 5
    """Error: the gradient norm exactly 0 this many steps in a row; 0: never."""
    symptom_steps: int = 10
    """Warnings for a reward constant over every chain, truncation and empty chains fire once they hold this
    many steps in a row (a short run, or a random model, shows them without being broken); 0: never."""
    truncated_share: float = 0.5
    """Warning: the share of chains that hit ``rollout.max_new_tokens`` above this (``symptom_steps`` in a row)."""
    no_answer_share: float = 0.5
    """Warning: the share of empty chains (no text before the image) above this (``symptom_steps`` in a row)."""
    min_entropy: float = 0.01
    """Warning: the mean token entropy (nats) below this: the policy collapsed."""
    max_kl: float = 1.0
    """Warning: the text KL to the reference above this: the policy runs away."""


@dataclass
class RGPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The unified model."""
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    """What trains."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt data."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of chains and images."""
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    """Reward functions."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The RGPO objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """wandb and console."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic evaluation."""
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    """Every-step invariants (``rgpo.guards``)."""
    seed: int = 0
    """Global seed (model init of new parts, image-KL noise and timesteps)."""
    max_nonfinite_steps: int = 3
    """Stop the run after this many optimizer steps in a row with a NaN/inf loss or gradient (each is skipped)."""

    def validate(self, world_size: int = 1, needs_data_file: bool = True) -> RGPOConfig:
        """Cross-field checks; raises ConfigError explaining why a combination cannot run, with the file:line (or
        command-line override) each key it names came from. ``needs_data_file``: False when the prompts are handed
        to the trainer directly."""
        try:
            self._validate(world_size, needs_data_file)
        except ConfigError as e:
            raise ConfigError(_with_origins(str(e), getattr(self, "_origins", {}))) from None
        return self

    def _validate(self, world_size: int, needs_data_file: bool) -> None:
        _check_choices(self)
        r, o = self.rollout, self.optim
        _require(r.num_generations >= 2, "rollout.num_generations", r.num_generations,
                 ">= 2: group advantages compare chains of the same prompt; one chain has nothing to compare with")
        _require(r.batch_size % r.num_generations == 0, "rollout.batch_size", r.batch_size,
                 f"a multiple of rollout.num_generations={r.num_generations}: every prompt gets a whole group")
        _require(r.batch_size % world_size == 0, "rollout.batch_size", r.batch_size,
                 f"a multiple of the number of ranks ({world_size}): each rank samples the same number of chains")
        per_rank = r.batch_size // world_size
        _require(o.micro_batch_size >= 1 and per_rank % o.micro_batch_size == 0, "optim.micro_batch_size",
                 o.micro_batch_size, f"a divisor of the chains per rank ({r.batch_size} / {world_size} ranks = {per_rank})")
        if r.image.enabled:
            for key in ("height", "width"):
                value = getattr(r.image, key)
                _require(value > 0, f"rollout.image.{key}", value, "> 0 (the family checks its own multiple)")
            _require(r.image.steps >= 1, "rollout.image.steps", r.image.steps, ">= 1")
            _require(r.image.eval_steps is None or r.image.eval_steps >= 1, "rollout.image.eval_steps",
                     r.image.eval_steps, ">= 1 (or null: rollout.image.steps)")
        _require(self.loss.image_kl_timesteps >= 1, "loss.image_kl_timesteps", self.loss.image_kl_timesteps, ">= 1")
        _validate_image_policy(self)
        _require(r.temperature > 0, "rollout.temperature", r.temperature, "> 0 (sampling needs a temperature)")
        _require(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "in (0, 1]")
        _require(o.max_steps >= 1, "optim.max_steps", o.max_steps, ">= 1")
        _require(self.loss.num_iterations >= 1, "loss.num_iterations", self.loss.num_iterations, ">= 1")
        _require(self.trainable.mode != "lora" or self.trainable.lora_r >= 1, "trainable.lora_r",
                 self.trainable.lora_r, ">= 1 when trainable.mode is lora")
        _require(self.loss.beta >= 0 and self.loss.image_kl_coef >= 0, "loss.beta / loss.image_kl_coef",
                 (self.loss.beta, self.loss.image_kl_coef), ">= 0: a negative KL coefficient rewards drifting away")
        _require(bool(self.rewards.functions), "rewards.functions", [], "at least one reward function")
        names = [spec.name for spec in self.rewards.functions]
        _require(len(set(names)) == len(names), "rewards.functions", names, "each reward listed once")
        _require(bool(self.data.train_file) or not needs_data_file, "data.train_file", self.data.train_file,
                 "a JSONL prompt file or a saved datasets folder")
        _validate_eval(self)


_CHOICES = {
    "model.dtype": ("bfloat16", "float16", "float32"),
    "trainable.mode": ("lora", "full"),
    "loss.kl_estimator": ("k1", "k2", "k3"),
    "loss.aggregation": ("grpo", "bnpo", "dapo", "dr_grpo"),
    "loss.advantage_scale": ("group", "batch", "none"),
    "loss.image_regularizer": ("feature_kl", "velocity_mse", "gaussian_kl", "none"),
    "loss.image_kl_convention": ("exact", "flow_grpo"),
    "optim.schedule": ("linear", "cosine", "constant"),
    "logging.mode": (None, "online", "offline", "disabled"),
    "logging.report_to": ("wandb", "tensorboard", "none"),
    "eval.benchmark": (None, "wise"),
    "eval.wise_protocol": ("legacy", "verified"),
    "eval.judge_dtype": ("bfloat16", "float16", "float32"),
}


def _with_origins(message: str, origins: dict[str, str]) -> str:
    """``message`` with where each config key it names was set (``(at run.yaml:12)``, ``(from the command-line
    override ...)``); keys left at their defaults have no origin."""
    import re

    named = [key for key in re.findall(r"\b([a-z_]+(?:\.[a-z_]+)+)\b", message) if key in origins]
    found = [f"{key}{origins[key]}" for key in dict.fromkeys(named) if origins[key].strip() not in message]
    return message + ("; set " + ", ".join(found) if found else "")


def _check_choices(cfg: RGPOConfig) -> None:
    for key, valid in _CHOICES.items():
        value = get_key(cfg, key)
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {[v for v in valid if v is not None]}")


def _validate_eval(cfg: RGPOConfig) -> None:
    """A benchmark needs its prompts, a judge and images to judge; it only runs when evaluations do."""
    e = cfg.eval
    if e.benchmark is None and not e.understanding:
        return
    _require(e.every > 0 or e.before_training, "eval.every", e.every,
             "> 0 (or eval.before_training=true) when eval.benchmark or eval.understanding is set: they run at "
             "the evaluations")
    if e.benchmark == "wise":
        _require(bool(e.benchmark_data), "eval.benchmark_data", e.benchmark_data,
                 "WISE's prompt folder (data_verified/) or file when eval.benchmark=wise")
        _require(bool(e.judge), "eval.judge", e.judge, "a local judge model folder when eval.benchmark=wise")
        _require(cfg.rollout.image.enabled, "rollout.image.enabled", cfg.rollout.image.enabled,
                 "true when eval.benchmark=wise: WISE judges the images the chains draw")
        _require(e.benchmark_prompts >= 0, "eval.benchmark_prompts", e.benchmark_prompts, ">= 0 (0: all)")
        _require(e.judge_batch_size >= 1, "eval.judge_batch_size", e.judge_batch_size, ">= 1")


def _validate_image_policy(cfg: RGPOConfig) -> None:
    """N chains x M images, SDE sampling, the image policy gradient and gaussian_kl (see README, "Image-side
    policy gradient")."""
    img, lc, t = cfg.rollout.image, cfg.loss, cfg.trainable
    _require(img.images_per_chain >= 1, "rollout.image.images_per_chain", img.images_per_chain, ">= 1")
    _require(img.noise_level >= 0, "rollout.image.noise_level", img.noise_level, ">= 0 (0: deterministic Euler)")
    _require(lc.image_pg_coef >= 0, "loss.image_pg_coef", lc.image_pg_coef, ">= 0 (0: image policy gradient off)")
    _require(lc.image_clip_range > 0, "loss.image_clip_range", lc.image_clip_range, "> 0")
    _require(t.generator_lora_r >= 0, "trainable.generator_lora_r", t.generator_lora_r,
             ">= 0 (0: generator frozen)")
    if t.generator_lora_r > 0 and t.generator_lora_targets is not None:
        _require(bool(t.generator_lora_targets), "trainable.generator_lora_targets", t.generator_lora_targets,
                 "at least one generator module name (or null: the family's default)")
    if not img.enabled:
        _require(img.images_per_chain == 1, "rollout.image.images_per_chain", img.images_per_chain,
                 "1 when rollout.image.enabled is false (no images are drawn)")
        _require(lc.image_pg_coef == 0, "loss.image_pg_coef", lc.image_pg_coef,
                 "0 when rollout.image.enabled is false (no images are drawn)")
    if img.enabled and img.sde_window is not None:
        _require(1 <= img.sde_window <= img.steps, "rollout.image.sde_window", img.sde_window,
                 f"in 1..rollout.image.steps={img.steps} (or None: every step stochastic)")
    if img.enabled and img.sde_window_range is not None:
        lo, hi = img.sde_window_range
        window = img.sde_window or 1
        _require(lo >= 0 and hi <= img.steps and hi - lo >= window, "rollout.image.sde_window_range",
                 img.sde_window_range, f"a range [lo, hi) of step indices inside [0, {img.steps}] holding the "
                 f"rollout.image.sde_window={img.sde_window} steps")
    if lc.image_pg_coef > 0:
        _require(img.noise_level > 0, "rollout.image.noise_level", img.noise_level,
                 f"> 0 when loss.image_pg_coef={lc.image_pg_coef}: the image policy gradient needs stochastic (SDE) "
                 "steps with log-probs; Flow-GRPO uses 0.7")
        _require(img.images_per_chain >= 2, "rollout.image.images_per_chain", img.images_per_chain,
                 f">= 2 when loss.image_pg_coef={lc.image_pg_coef}: image advantages are normalised within each "
                 "chain's M images, and one image has nothing to compare with")
        _require_image_gradient_path(cfg, f"loss.image_pg_coef={lc.image_pg_coef}")
    if lc.image_regularizer == "gaussian_kl" and lc.image_kl_coef > 0 and img.enabled:
        _require(img.noise_level > 0, "rollout.image.noise_level", img.noise_level,
                 "> 0 when loss.image_regularizer=gaussian_kl: its KL is taken on the recorded SDE steps")
        _require_image_gradient_path(cfg, f"loss.image_regularizer=gaussian_kl with loss.image_kl_coef="
                                          f"{lc.image_kl_coef}")


def _require_image_gradient_path(cfg: RGPOConfig, loss: str) -> None:
    """The SDE-step image losses see the recorded (detached) condition: without a trainable generator LoRA or
    part, or the condition's gradient let through to the language model, they would be logged but train
    nothing."""
    t, lc = cfg.trainable, cfg.loss
    _require(t.generator_lora_r > 0 or bool(t.full_parts) or lc.image_condition_grad,
             "trainable.generator_lora_r / trainable.full_parts / loss.image_condition_grad",
             (t.generator_lora_r, t.full_parts, lc.image_condition_grad),
             f"a gradient path for {loss}: set trainable.generator_lora_r > 0 (LoRA on the image generator), "
             "trainable.full_parts (e.g. [connector]) and/or loss.image_condition_grad=true (into the language "
             "model)")


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} cannot run: it must be {valid}")


# ------------------------------------------------------------------------------------------------ loading
def get_key(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (read from the source)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value
    return docs


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check ``value`` against the type ``hint`` (building nested dataclasses); ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}{where}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return _build(hint, value, key, where_map=None, fallback_where=where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r}{where}: expected {_type_name(hint)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}{where}: expected a list of {_type_name(typing.get_args(hint)[0])}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r}{where}: expected a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}{where}: expected a mapping")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 3e-6 (no dot) as a string: accept what float() reads, reject the rest below.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{key}={value!r}{where}: expected {_type_name(hint)}, got {type(value).__name__}")


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


# Keys that were renamed when the trainable section came to name a family's parts.
_RENAMED = {
    "trainable.train_connector": "trainable.full_parts (a list of part names, e.g. [connector])",
    "trainable.decoder_lora_r": "trainable.generator_lora_r",
    "trainable.decoder_lora_alpha": "trainable.generator_lora_alpha",
    "trainable.decoder_lora_targets": "trainable.generator_lora_targets",
}


def build_section(cls: type, values: dict, prefix: str) -> Any:
    """A config dataclass ``cls`` from plain ``values`` (e.g. a family's ``model.options``), with the same checks
    and messages as the whole tree, keys named under ``prefix``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}={values!r}: expected a mapping of {cls.__name__} fields")
    return _build(cls, values, prefix, where_map=None)


def _build(cls: type, values: dict, prefix: str, where_map: dict | None, fallback_where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        where = (where_map or {}).get(full, fallback_where)
        if full in _RENAMED:
            raise ConfigError(f"{full}{where} was renamed: use {_RENAMED[full]}")
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            elsewhere = [k for k, *_ in config_keys() if k.rsplit(".", 1)[-1] == str(key)] if not prefix else []
            if elsewhere:
                hint = f" (did you mean {' or '.join(repr(k) for k in elsewhere)}?)"
            raise ConfigError(f"unknown key {full!r}{where}{hint}; valid keys here: {names}")
        hint_t = hints[key]
        if dataclasses.is_dataclass(hint_t) and isinstance(value, dict):
            kwargs[key] = _build(hint_t, value, full, where_map, where)
        elif typing.get_origin(hint_t) is list and typing.get_args(hint_t) and dataclasses.is_dataclass(typing.get_args(hint_t)[0]):
            item_cls = typing.get_args(hint_t)[0]
            if not isinstance(value, list):
                raise ConfigError(f"{full}={value!r}{where}: expected a list of {item_cls.__name__} mappings")
            kwargs[key] = [_build(item_cls, _as_mapping(v, f"{full}[{i}]", where), f"{full}[{i}]", where_map, where)
                           for i, v in enumerate(value)]
        else:
            kwargs[key] = _coerce(value, hint_t, full, where)
    return cls(**kwargs)


def _as_mapping(value: Any, key: str, where: str) -> dict:
    # A bare string in a reward list is shorthand for {name: ..., weight: 1.0}.
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r}{where}: expected a mapping")
    return value


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_lines(path: Path) -> tuple[dict, dict[str, str]]:
    """Parse a YAML mapping and remember ``file:line`` of every key path (for error messages)."""
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections, got {type(data).__name__}")
    where: dict[str, str] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else k.value
                where[key] = f" (at {path}:{k.start_mark.line + 1})"
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, f"{prefix}[{i}]")

    walk(node, "")
    return data, where


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. optim.lr=2e-5)")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def _nest(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def load_config(paths: str | Path | list | None = None, overrides: list[str] | None = None,
                values: dict | None = None) -> RGPOConfig:
    """Load YAML files (later ones override earlier ones), then ``key.sub=value`` overrides.

    ``values`` (e.g. a checkpoint's resolved config) is the starting point, under the files and overrides.

    A YAML file may name others to start from with a top-level ``base: [other.yaml, ...]`` (relative paths are
    resolved against the file). Relative ``deepspeed.config`` and ``data.*_file`` paths are resolved against the
    YAML file when they exist there."""
    merged: dict = dict(values or {})
    where: dict[str, str] = {}
    for path in [paths] if isinstance(paths, (str, Path)) else (paths or []):
        data, lines = _load_with_bases(Path(path))
        merged = _merge(merged, data)
        where.update(lines)
    for text in overrides or []:
        parts, value = parse_override(text)
        merged = _merge(merged, _nest(parts, value))
        where[".".join(parts)] = f" (from the command-line override {text!r})"
    cfg = _build(RGPOConfig, merged, "", where)
    cfg._origins = where  # for validate()'s messages: not a field, so not saved, compared or hashed
    return cfg


def shipped_configs() -> Path:
    """The folder of the configs rgpo ships (``configs/`` in a checkout, ``rgpo/configs`` once installed)."""
    import importlib.resources

    return Path(str(importlib.resources.files("rgpo.configs")))


def find_config_file(path: str | Path) -> Path:
    """``path`` when it is a file; else a shipped config of that name (``tiny``, ``tiny.yaml``, ``configs/tiny.yaml``
    all name ``configs/tiny.yaml``), so a non-editable install runs ``rgpo train --config tiny`` from any folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_absolute() and path.parent in (Path("."), Path("configs")):
        for name in (path.name, f"{path.name}.yaml"):
            if (shipped_configs() / name).is_file():
                return shipped_configs() / name
    shipped = sorted(p.stem for p in shipped_configs().glob("*.yaml"))
    raise ConfigError(f"config file {path} does not exist (nor is it a shipped config; shipped: {', '.join(shipped)})")


# ``pkg://<package>/<path>``: a file inside an installed Python package (the toy world's weights inside rgpo), so
# a shipped config names its assets wherever rgpo is installed.
PACKAGE_SCHEME = "pkg://"


def package_path(value: str) -> str:
    """``pkg://rgpo/assets/x`` -> the absolute path of ``assets/x`` inside the installed ``rgpo`` package."""
    import importlib.resources

    package, _, rel = value[len(PACKAGE_SCHEME):].partition("/")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{value!r}: no installed package {package!r}") from e
    return str(Path(str(root)) / rel)


def _load_with_bases(path: Path) -> tuple[dict, dict[str, str]]:
    path = find_config_file(path)
    data, where = _yaml_lines(path)
    bases = data.pop("base", None) or []
    merged: dict = {}
    lines: dict[str, str] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_data, base_lines = _load_with_bases(path.parent / base)
        merged = _merge(merged, base_data)
        lines.update(base_lines)
    _resolve_relative_paths(data, path.parent)
    merged = _merge(merged, data)
    lines.update(where)
    return merged, lines


# Path-valued keys: a relative value that exists next to the YAML file (and not in the working directory) is
# taken from there, so `rgpo train --config configs/x.yaml` works from any directory.
# The same holds for a reward's ``pretrained`` weights file.
_PATH_KEYS = (("deepspeed", "config"), ("data", "train_file"), ("data", "eval_file"), ("model", "path"),
              ("eval", "benchmark_data"), ("eval", "judge"), ("eval", "understanding"))


def _resolve_relative_paths(data: dict, folder: Path) -> None:
    """One rule for every input path a YAML file names (data, DeepSpeed JSON, model folder, a reward's file and
    weights): relative to the working directory when it exists there, else to the YAML file's folder;
    ``pkg://<package>/<path>`` inside an installed package. Output folders are always relative to the working
    directory."""
    blocks = [(data.get(section), key) for section, key in _PATH_KEYS]
    functions = (data.get("rewards") or {}).get("functions") if isinstance(data.get("rewards"), dict) else None
    for i, spec in enumerate(functions if isinstance(functions, list) else []):
        if isinstance(spec, str):  # the shorthand: a bare reward spec
            spec = functions[i] = {"name": spec}
        if isinstance(spec, dict):
            blocks.append((spec.get("kwargs"), "pretrained"))
            name = spec.get("name")
            if isinstance(name, str) and ".py:" in name:  # a reward's own file: path/to/file.py:function
                file, function = name.rsplit(":", 1)
                if not Path(file).is_absolute() and not Path(file).exists() and (folder / file).exists():
                    spec["name"] = f"{folder / file}:{function}"
    for block, key in blocks:
        if isinstance(block, dict) and isinstance(block.get(key), str) and block[key].startswith(PACKAGE_SCHEME):
            block[key] = package_path(block[key])
        elif isinstance(block, dict) and isinstance(block.get(key), str) and block[key]:
            value = Path(block[key])
            if not value.is_absolute() and not value.exists() and (folder / value).exists():
                block[key] = str(folder / value)


def with_output_dir(cfg: RGPOConfig) -> RGPOConfig:
    """``cfg`` with ``logging.output_dir`` filled in when it is None (see its docstring)."""
    import hashlib
    import json

    if cfg.logging.output_dir:
        return cfg
    data = to_dict(cfg)
    for section in ("logging", "checkpoint", "eval"):
        data.pop(section)
    data["optim"].pop("max_steps")
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:8]
    named = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, output_dir=f"outputs/run-{digest}"))
    named._origins = getattr(cfg, "_origins", {})
    return named


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (for wandb and checkpoints); tuples become lists."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: RGPOConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def all_config_classes() -> list[type]:
    """Every dataclass of the tree (for documentation and the docstring check)."""
    seen, todo = [], [RGPOConfig]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for hint in typing.get_type_hints(cls).values():
            for candidate in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(candidate):
                    todo.append(candidate)
    return seen


def config_keys(families: dict[str, type] | None = None) -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type, default, docstring)`` of every config key, then of each family's ``model.options``
    (``families``: name -> model class with an ``options_class``)."""
    rows: list[tuple[str, str, Any, str]] = []

    def walk(cls: type, prefix: str) -> None:
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(default) or (isinstance(default, list) and default
                                                      and dataclasses.is_dataclass(default[0])):
                default = to_dict(default) if not isinstance(default, list) else [to_dict(d) for d in default]
            rows.append((key, _type_name(hints[f.name]), default, " ".join(docs.get(f.name, "").split())))

    walk(RGPOConfig, "")
    for name, model_cls in sorted((families or {}).items()):
        options = getattr(model_cls, "options_class", None)
        if options is not None:
            start = len(rows)
            walk(options, "model.options.")
            rows[start:] = [(key, type_name, default, f"[family {name}] {doc}")
                            for key, type_name, default, doc in rows[start:]]
    return rows
