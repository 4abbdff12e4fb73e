#!/usr/bin/env python
"""Benchmark harness for rgpo, side by side with TRL's ``GRPOTrainer``.

One command measures, per phase and for the whole step, the time (median over the measured steps, after
warm-up steps), the throughput (chains/s, images/s, generated tokens/s) and the peak memory, then writes a
markdown report and a JSON file under ``--out``:

1. **rgpo, full step** (reason then draw): rollout text, rollout forward (policy + reference), the reference
   pass on its own, rollout images, rewards, advantages, update (and the reference decoder run inside the
   update's image KL).
2. **Scaling** of the step with G, decoder steps, image size and completion length: one process per varied
   quantity, a trainer per value (the baseline included), their steps taken round-robin so the values are compared
   under the same machine load.
3. **rgpo vs TRL**: a text-only rgpo step (``rollout.image.enabled=false``, format reward only) against
   ``trl.GRPOTrainer`` on the SAME tiny Qwen2.5-VL (same weights, saved to a temporary folder so TRL loads it
   by path), same prompts and chat template, G, prompts per step, micro-batch, completion length, beta, loss
   aggregation (``grpo``), LoRA (r / alpha / dropout / target modules), ``num_iterations=1``, temperature 1.
   Alternating separate processes (clean memory figures), then one process where every TRL step is followed by
   an rgpo step (the step-time ratio that a change of machine load cannot skew).
4. **Trainer overhead**: the rgpo step minus the same work done by bare model calls (``generate``, the no-grad
   policy/reference forwards, ``sample_latents`` + ``decode_latents``, and forward/backward/AdamW of the update)
   on a plain (non-DeepSpeed) copy of the same model, one bare iteration right after each trainer step, on that
   step's prompts; for the full step and for the text-only step.
5. **Optimisations, each on vs off**: prompt prefill shared by the G chains, the trimmed decoding loop, log-probs
   and condition from one chunked forward, the decoder's condition KV cache, batched guidance, batched policy /
   reference image-KL runs, K sampled image-KL timesteps vs all, the flattened train/eval switch, ZeRO-3 gather
   once per rollout phase; alternating
   on/off in one process, each naive path checked to compute the same result.

Every measured configuration runs in a subprocess of its own (several side by side only where said above), one
after the other (never in parallel), so memory numbers start from a clean process and one run's allocator state
does not leak into the next one.

Equal work: end-of-sequence tokens are BANNED in both trainers (rgpo: added to the model's
``banned_token_ids``; TRL: ``generation_kwargs={"suppress_tokens": ...}``, which also bans the vision
placeholders rgpo bans), so every chain is exactly ``max_new_tokens`` / ``max_completion_length`` long and both
generate the same number of tokens.

Memory: CUDA: ``torch.cuda.max_memory_allocated`` (reset before each step / phase). CPU: the process's
resident-set high-water mark (``VmHWM`` of ``/proc/self/status``), reset before each step / phase by writing 5
to ``/proc/self/clear_refs``; where that is not possible, a 5 ms psutil sampler thread. Reported as the peak
during the step (absolute) and as the rise over the resident size at the step's start ("transient").

Usage::

    python scripts/bench.py --quick                          # tiny MindOmni on CPU, a few minutes
    python scripts/bench.py --quick --steps 2 --skip-trl --skip-scaling --skip-bare   # smoke test
    python scripts/bench.py --config configs/mindomni_rgpo.yaml --set model.path=/path/MindOmni --steps 5

On a shared machine, timings are only comparable within one run; the report records the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

for _var, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("WANDB_MODE", "disabled"), ("WANDB_SILENT", "true"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_var, _value)

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
TOP_PHASES = ("rollout", "rewards", "advantages", "update")
# --mindomni-7b: configs/mindomni_rgpo.yaml (bf16, LoRA r64/alpha128/dropout 0.05, gradient checkpointing, ZeRO-2,
# 512x512, 50 steps, guidance 3) on one GPU with random weights of the released sizes.
# Estimated from the sizes (no GPU run yet): the 7B step allocates ~40 GiB at its peak and the bare pieces add a
# second model with its LoRA state (~25 GiB), too close to an 80 GB card's limit once the caching allocator's
# slack and the CUDA context are counted.
BARE_7B_MIN_GIB = 100
MINDOMNI_7B_OVERRIDES = [
    "model.path=random:mindomni-7b",
    f"data.train_file={REPO / 'configs' / 'prompts' / 'sample.jsonl'}",
    "data.eval_file=null",
    "rollout.num_generations=4",
    "rollout.batch_size=4",
    "optim.micro_batch_size=4",
    "rollout.max_new_tokens=512",
    "rewards.functions=[format, {name: clip_consistency, kwargs: {model_name: ViT-L-14-336, text_column: gt_prompt}}]",
]
MEMORY_STEPS = 2  # extra steps after the timed ones that record each phase's peak memory (their time is not used)


# ================================================================================================ memory
class PeakMemory:
    """Peak memory since the last :meth:`reset`, in bytes: CUDA allocator or CPU resident set."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM + /proc/self/clear_refs"
        self._sampler: threading.Thread | None = None
        self._sampled = 0
        if not self.cuda:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._hwm()
            except OSError:
                self.method = "psutil RSS sampled every 5 ms"
                self._start_sampler()

    # -- CPU helpers
    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"{key} not in /proc/self/status")

    def _hwm(self) -> int:
        return self._status_kb("VmHWM")

    def _start_sampler(self) -> None:
        def loop():
            while True:
                self._sampled = max(self._sampled, self.current())
                time.sleep(0.005)

        self._sampler = threading.Thread(target=loop, daemon=True)
        self._sampler.start()

    def current(self) -> int:
        """Memory in use now (CUDA: allocated; CPU: resident set)."""
        if self.cuda:
            import torch

            return torch.cuda.memory_allocated()
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            return self._status_kb("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self._sampler is None:
            Path("/proc/self/clear_refs").write_text("5")
        else:
            self._sampled = self.current()

    def peak(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._sampler is None:
            return self._hwm()
        return max(self._sampled, self.current())


MEM: PeakMemory | None = None


def mib(n: float) -> float:
    return n / 2**20


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ================================================================================================ machine
def machine_info(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": device,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for pkg in ("transformers", "trl", "peft", "deepspeed", "diffusers", "accelerate"):
        with contextlib.suppress(Exception):
            info[pkg] = __import__(pkg).__version__
    return info


# ================================================================================================ rgpo worker
def _install_phase_timer():
    """Wrap rgpo's PhaseTimer so each phase also records its peak memory (nested phases handled), and remember
    the step's timer so the reference pass can be charged to its own phase."""
    import rgpo.trainer as trainer_mod
    from rgpo.tracking import PhaseTimer

    class BenchTimer(PhaseTimer):
        current: BenchTimer | None = None
        # Per-phase peaks need a peak reset at every phase boundary, and on a CPU each reset (clear_refs) makes
        # the allocations after it slower (about 1.5 ms over a 100 ms text-only step), so only the extra memory
        # steps track phases; the timed steps read one peak for the whole step, as the TRL side does.
        track_phase_memory = False

        def __init__(self, sync=None):
            super().__init__(sync)
            self.peaks: dict[str, int] = defaultdict(int)
            self.stack: list[str] = []
            BenchTimer.current = self

        def _fold(self) -> None:
            peak = MEM.peak()
            for phase in self.stack:
                self.peaks[phase] = max(self.peaks[phase], peak)

        @contextlib.contextmanager
        def __call__(self, phase: str):
            track = BenchTimer.track_phase_memory
            if track:
                self._fold()
                MEM.reset()
            self.stack.append(phase)
            try:
                with PhaseTimer.__call__(self, phase):
                    yield
            finally:
                if track:
                    self._fold()
                    MEM.reset()
                self.stack.pop()

    trainer_mod.PhaseTimer = BenchTimer
    return BenchTimer


def _charge_reference(trainer, timer_cls) -> None:
    """Time every use of the reference model as ``<outer phase>/reference`` (rollout: the reference forward;
    update: the reference decoder run of the image KL)."""
    original = trainer.reference_context

    @contextlib.contextmanager
    def reference_context():
        timer = timer_cls.current
        name = f"{timer.stack[0]}/reference" if timer is not None and timer.stack else "reference"
        with timer(name) if timer is not None else contextlib.nullcontext(), original() as ref_model:
            yield ref_model

    trainer.reference_context = reference_context


def _ban_eos(model, spec: dict[str, Any]) -> None:
    """Equal work: end-of-sequence tokens banned, so every chain is ``max_new_tokens`` long (unless the case's
    ``ban_eos`` is off: ``--keep-eos``)."""
    if spec.get("ban_eos", True):
        model.banned_token_ids = sorted(set(model.banned_token_ids) | set(model.eos_token_ids))


def _lora_targets_without_lm_head(model) -> list[str]:
    """TRL refuses a LoRA on lm_head (it reads lm_head.weight directly), so for the side-by-side run rgpo's LoRA
    gets the same targets as TRL's: every language-model Linear except lm_head."""
    return [t for t in model.language_model_lora_targets() if t != "lm_head"]


def _without_lm_head_lora(model, spec: dict[str, Any]):
    """``model`` with :func:`_lora_targets_without_lm_head` as its LoRA targets when the case asks for it."""
    if spec.get("lora_without_lm_head"):
        targets = _lora_targets_without_lm_head(model)
        model.language_model_lora_targets = lambda: targets
    return model


def _rgpo_config(spec: dict[str, Any], run_dir: str):
    from rgpo.config import load_config

    overrides = [
        *spec["overrides"],
        f"logging.output_dir={run_dir}",
        "logging.mode=disabled",
        "logging.table_every=0",
        "logging.progress_bar=false",
        "checkpoint.every=0",
        "checkpoint.resume=null",
        "optim.max_steps=1000000",
        "eval.every=0",
    ]
    return load_config(spec["config"], overrides)


def _measure_step(trainer, timer_cls, warmup: bool, base_rss: int, phase_memory: bool = False) -> dict[str, Any]:
    """One timed ``train_step()`` with its phases, memory and work done. ``phase_memory``: a memory step, which
    also records each phase's peak (and whose time is not used)."""
    import torch

    timer_cls.track_phase_memory = phase_memory
    gc.collect()
    MEM.reset()
    start_mem = MEM.current()
    t = time.perf_counter()
    metrics = trainer.train_step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t
    peak = MEM.peak()
    reserved = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None
    timer = timer_cls.current
    peak = max([peak, *timer.peaks.values()])
    rollout = trainer._last_rollout
    return {
        "warmup": warmup,
        "memory_step": phase_memory,
        "step_s": step_s,
        "phases_s": dict(timer.seconds),
        "phase_peak_mib": {k: mib(v - start_mem) for k, v in timer.peaks.items()},
        "peak_mib": mib(peak),
        "peak_reserved_mib": mib(reserved) if reserved is not None else None,  # CUDA: allocated + cached blocks
        "transient_mib": mib(peak - start_mem),
        "footprint_mib": mib(peak - base_rss),
        "tokens": int(rollout.completions.completion_mask.sum()),
        "chains": len(rollout.rows),
        "images": sum(im is not None for im in rollout.images),
        "completion_len": float(metrics.get("completion/mean_length", float("nan"))),
        "reported_chains_per_s": float(metrics.get("throughput/chains_per_s", float("nan"))),
    }


def run_sweep(spec: dict[str, Any]) -> dict[str, Any]:
    """One scaling axis: a trainer per point (the baseline included), built side by side in this process, then
    their measured steps taken round-robin (point 1, point 2, ..., point 1, ...), so that a change of machine load
    hits every point alike and the ratios between points are meaningful."""
    timer_cls = _install_phase_timer()

    results = []
    with tempfile.TemporaryDirectory(prefix="rgpo-bench-") as tmp:
        trainers = []
        for j, point in enumerate(spec["points"]):
            point_spec = {**spec, "overrides": point["overrides"]}
            trainers.append(_build_rgpo(point_spec, _rgpo_config(point_spec, str(Path(tmp) / f"run{j}")), timer_cls))
        gc.collect()
        base_rss = MEM.current()
        steps: list[list[dict[str, Any]]] = [[] for _ in trainers]
        for trainer, record in zip(trainers, steps):
            for _ in range(spec["warmup"]):
                record.append(_measure_step(trainer, timer_cls, True, base_rss))
        for _ in range(spec["steps"]):
            for trainer, record in zip(trainers, steps):
                record.append(_measure_step(trainer, timer_cls, False, base_rss))
        for _ in range(spec.get("memory_steps", MEMORY_STEPS)):
            for trainer, record in zip(trainers, steps):
                record.append(_measure_step(trainer, timer_cls, False, base_rss, phase_memory=True))
        for point, trainer, record in zip(spec["points"], trainers, steps):
            result = _summarise(record)
            result.update({"label": point["label"], "kind": "rgpo", "overrides": point["overrides"]})
            results.append(result)
            trainer.close()
    return {"label": spec["label"], "kind": "sweep", "points": results}


def _build_rgpo(spec: dict[str, Any], cfg, timer_cls):
    """The RGPOTrainer of a case: EOS banned (equal work), reference uses timed as their own phase."""
    from rgpo.building import build_model
    from rgpo.trainer import RGPOTrainer

    model = _without_lm_head_lora(build_model(cfg), spec) if spec.get("lora_without_lm_head") else None
    trainer = RGPOTrainer(cfg, model=model)
    _ban_eos(trainer.model, spec)
    _charge_reference(trainer, timer_cls)
    return trainer


def run_rgpo(spec: dict[str, Any]) -> dict[str, Any]:
    """Build an RGPOTrainer and time ``warmup + steps`` calls of ``train_step()``."""

    timer_cls = _install_phase_timer()

    with tempfile.TemporaryDirectory(prefix="rgpo-bench-") as tmp:
        cfg = _rgpo_config(spec, str(Path(tmp) / "run"))
        # The bare pieces run right after each trainer step (same process, same machine load), on their own
        # plain copy of the model, built before the "process before the trainer" memory baseline.
        bare = BarePieces(spec, cfg) if spec.get("bare") else None
        gc.collect()
        base_rss = MEM.current()
        _sync()  # CUDA started before the clock (the bare pieces may have started it already)
        t0 = time.perf_counter()
        trainer = _build_rgpo(spec, cfg, timer_cls)
        _sync()  # random initialisation runs queued kernels
        build_s = time.perf_counter() - t0
        built_rss = MEM.current()
        trainable_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        steps = []
        for i in range(spec["warmup"] + spec["steps"]):
            steps.append(_measure_step(trainer, timer_cls, i < spec["warmup"], base_rss))
            if bare is not None:
                MEM.reset()  # as before the trainer step: one peak reset before each
                bare.iteration(i, trainer._last_rollout.rows)
        for _ in range(spec.get("memory_steps", MEMORY_STEPS)):
            steps.append(_measure_step(trainer, timer_cls, False, base_rss, phase_memory=True))
        result = _summarise(steps)
        result.update({
            "label": spec["label"],
            "kind": "rgpo",
            "overrides": spec["overrides"],
            "build_s": build_s,
            "model_state_mib": mib(built_rss - base_rss),
            "trainable_params": trainable_params,
            "config": {
                "G": cfg.rollout.num_generations,
                "batch_chains": cfg.rollout.batch_size,
                "prompts_per_step": cfg.rollout.batch_size // cfg.rollout.num_generations,
                "micro_batch": cfg.optim.micro_batch_size,
                "max_new_tokens": cfg.rollout.max_new_tokens,
                "images": cfg.rollout.image.enabled,
                "image_size": f"{cfg.rollout.image.height}x{cfg.rollout.image.width}",
                "decoder_steps": cfg.rollout.image.steps,
                "guidance": cfg.rollout.image.guidance_scale,
                "beta": cfg.loss.beta,
                "lora": [cfg.trainable.lora_r, cfg.trainable.lora_alpha, cfg.trainable.lora_dropout],
                "dtype": cfg.model.dtype,
            },
        })
        trainer.close()
        del trainer
        gc.collect()
        if bare is not None:
            result["bare"] = bare.summary()
    return result


def _summarise(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Times from the measured steps; per-phase peaks from the memory steps; overall peaks from both."""
    memory = [s for s in steps if s.get("memory_step")]
    steps = [s for s in steps if not s.get("memory_step")]
    measured = [s for s in steps if not s["warmup"]] or steps
    phases = sorted({k for s in measured for k in s["phases_s"]})
    phase_s = {k: median([s["phases_s"].get(k, 0.0) for s in measured]) for k in phases}
    if "rollout/forward" in phase_s and "rollout/reference" in phase_s:
        phase_s["rollout/policy_forward"] = median(
            [s["phases_s"].get("rollout/forward", 0.0) - s["phases_s"].get("rollout/reference", 0.0)
             for s in measured])
    step_s = median([s["step_s"] for s in measured])
    phase_s["other"] = median(
        [s["step_s"] - sum(s["phases_s"].get(k, 0.0) for k in TOP_PHASES) for s in measured])
    chains = measured[0]["chains"]
    images = measured[0]["images"]
    tokens = median([s["tokens"] for s in measured])
    text_s = phase_s.get("rollout/text", float("nan"))
    image_s = phase_s.get("rollout/images", float("nan"))
    return {
        "steps_measured": len(measured),
        "steps_warmup": len(steps) - len(measured),
        "memory_steps": len(memory),
        "step_s": step_s,
        "step_s_min": min(s["step_s"] for s in measured),
        "step_s_max": max(s["step_s"] for s in measured),
        "phase_s": phase_s,
        "phase_peak_mib": {k: max(s["phase_peak_mib"].get(k, 0.0) for s in memory) for k in phases} if memory else {},
        "peak_mib": max(s["peak_mib"] for s in measured + memory),
        "peak_reserved_mib": max((s["peak_reserved_mib"] or 0.0) for s in measured + memory) or None,
        "transient_mib": max(s["transient_mib"] for s in measured + memory),
        "footprint_mib": max(s["footprint_mib"] for s in measured + memory),
        "tokens_per_step": tokens,
        "chains_per_step": chains,
        "images_per_step": images,
        "throughput": {
            "chains_per_s": chains / step_s,
            "images_per_s": images / step_s if images else 0.0,
            "tokens_per_s_step": tokens / step_s,
            "tokens_per_s_generation": tokens / text_s if text_s == text_s and text_s > 0 else float("nan"),
            "images_per_s_sampling": images / image_s if images and image_s > 0 else 0.0,
        },
        "completion_len": median([s["completion_len"] for s in measured]),
        "reported_chains_per_s": median([s["reported_chains_per_s"] for s in measured]),
        "steps": steps,
    }


# ================================================================================================ bare pieces
class BarePieces:
    """The same work as one rgpo step, as bare model calls on a plain (non-DeepSpeed) copy of the model:
    ``generate``, the no-grad policy/reference ``forward_text``, ``sample_latents`` + ``decode_latents``, and
    forward/backward/AdamW of the update. :meth:`iteration` runs one such step (called right after each trainer
    step, so both see the same machine load)."""

    def __init__(self, spec: dict[str, Any], cfg):
        import torch

        from rgpo.data import load_prompts
        from rgpo.models.base import ImageSamplingConfig
        from rgpo.building import apply_trainable, build_model

        self.spec, self.cfg = spec, cfg
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        model = _without_lm_head_lora(build_model(cfg, device=self.device), spec)
        self.model = model = apply_trainable(model, cfg).to(self.device)
        _ban_eos(model, spec)
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:  # peft leaves new adapters float32; DeepSpeed casts the trainer's to the run's dtype
            p.data = p.data.to(model.dtype)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.optim.lr, betas=tuple(cfg.optim.adam_betas),
                                     weight_decay=cfg.optim.weight_decay, eps=cfg.optim.adam_eps)
        self.rows = load_prompts(cfg.data.train_file)
        self.icfg = ImageSamplingConfig(**{k: getattr(cfg.rollout.image, k) for k in (
            "height", "width", "steps", "guidance_scale", "seed", "shared_noise")})
        self.iters: list[dict[str, Any]] = []

    def _clock(self, record: dict[str, float], key: str):
        import torch

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        @contextlib.contextmanager
        def clock():
            sync()
            t = time.perf_counter()
            yield
            sync()
            record[key] = time.perf_counter() - t

        return clock()

    def image_kl(self, out, ref_cond, ref_mask, gen_seed: int):
        """The trainer's image regulariser: connector + one decoder evaluation, policy (grad) vs reference."""
        import torch

        from rgpo.losses import feature_kl, velocity_mse
        from rgpo.trainer import IMAGE_KL_GRID

        model, lc, icfg, device = self.model, self.cfg.loss, self.icfg, self.device
        K = lc.image_kl_timesteps
        g = torch.Generator().manual_seed(gen_seed)
        rows_ = out.condition.shape[0] * K
        shape = model.latent_shape(icfg.height, icfg.width)
        noise = torch.randn((rows_, *shape), generator=g).to(device, model.dtype)
        t = torch.randint(0, IMAGE_KL_GRID, (rows_,), generator=g).float().div(IMAGE_KL_GRID - 1).to(device)
        want = lc.image_regularizer == "feature_kl"
        c, m = out.condition.repeat_interleave(K, 0), out.condition_mask.repeat_interleave(K, 0)
        pol_out = model.decode_step(model.connect(c, m), m, noise, t, return_features=want)
        with torch.no_grad(), model.adapter_disabled():
            rc, rm = ref_cond.repeat_interleave(K, 0), ref_mask.repeat_interleave(K, 0)
            ref_out = model.decode_step(model.connect(rc, rm), rm, noise, t, return_features=want)
        if want:
            return feature_kl(pol_out.features, ref_out.features, tau=lc.image_kl_tau).mean()
        return velocity_mse(pol_out.velocity, ref_out.velocity).mean()

    def iteration(self, it: int, rows=None) -> None:
        """One bare step on ``rows`` (the trainer step's chains, G per prompt, grouped), else on the data's
        prompts in order. Prompt lengths differ, so the same prompts as the trainer's step make it the same work."""
        import torch

        from rgpo.losses import policy_loss
        from rgpo.trainer import trim_left_padding

        model, cfg, device, icfg = self.model, self.cfg, self.device, self.icfg
        G = cfg.rollout.num_generations
        P = cfg.rollout.batch_size // G
        mb = cfg.optim.micro_batch_size
        lc = cfg.loss
        images_on = cfg.rollout.image.enabled
        image_term = images_on and lc.image_regularizer != "none" and lc.image_kl_coef > 0
        # Only what the trainer computes: the policy's no-grad forward serves the images' condition or, for
        # num_iterations > 1, the old log-probs; the reference's, beta > 0 or the image KL.
        need_policy = images_on or lc.num_iterations > 1
        need_ref = lc.beta > 0 or image_term
        if rows is not None:
            chosen = [row.as_model_row() for row in rows[::G]]
        else:
            chosen = [self.rows[(it * P + j) % len(self.rows)].as_model_row() for j in range(P)]
        gen = torch.Generator().manual_seed(1000 + it)
        rec: dict[str, float] = {"images_s": 0.0}
        with self._clock(rec, "generate_s"), torch.no_grad():
            model.eval()  # the mode switches count, as in the trainer: eval here, train() in the update
            prompts = model.build_prompts(chosen).to(device)
            comps = model.generate(prompts, num_generations=G, max_new_tokens=cfg.rollout.max_new_tokens,
                                   temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                   top_k=cfg.rollout.top_k, generator=gen).to(device)
            prompts = prompts.repeat_interleave(G)
        n = comps.completion_ids.shape[0]
        with self._clock(rec, "forward_nograd_s"), torch.no_grad():
            pol = model.forward_text(prompts, comps, with_condition=images_on) if need_policy else None
            ref = None
            if need_ref:
                with model.adapter_disabled():
                    ref = model.forward_text(prompts, comps, with_condition=image_term)
        if images_on:
            with self._clock(rec, "images_s"), torch.no_grad():
                cond = model.connect(pol.condition, pol.condition_mask)
                neg = neg_mask = None
                if icfg.guidance_scale != 1.0:
                    neg_states, neg_mask = model.negative_condition(n)
                    neg = model.connect(neg_states, neg_mask)
                noise = model.initial_noise(n, G, icfg).to(model.dtype)
                latents = model.sample_latents(cond, pol.condition_mask, neg, neg_mask, noise, icfg)
                model.decode_latents(latents)
        advantages = torch.randn(n, device=device)
        with self._clock(rec, "update_s"):
            model.train()
            for _ in range(lc.num_iterations):
                for start in range(0, n, mb):
                    idx = list(range(start, min(n, start + mb)))
                    index = torch.tensor(idx, device=device)
                    p, c = prompts.select(idx), comps.select(idx)
                    out = model.forward_text(p, c, with_condition=image_term)
                    old = out.logps.detach() if lc.num_iterations == 1 else pol.logps[index]
                    loss, _ = policy_loss(out.logps, old, ref.logps[index] if lc.beta > 0 else None,
                                          advantages[index], c.completion_mask, epsilon_low=lc.epsilon_low,
                                          epsilon_high=lc.epsilon_high, beta=lc.beta, kl_estimator=lc.kl_estimator,
                                          aggregation=lc.aggregation)
                    if image_term:
                        ref_cond, ref_mask = trim_left_padding(ref.condition[index], ref.condition_mask[index])
                        loss = loss + lc.image_kl_coef * self.image_kl(out, ref_cond, ref_mask, it * 7919 + start)
                    (loss * len(idx) / n).backward()
                if cfg.optim.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        rec["total_s"] = rec["generate_s"] + rec["forward_nograd_s"] + rec["images_s"] + rec["update_s"]
        self.iters.append({"warmup": it < self.spec["warmup"], **rec})

    def summary(self) -> dict[str, Any]:
        measured = [x for x in self.iters if not x["warmup"]] or self.iters
        keys = ("generate_s", "forward_nograd_s", "images_s", "update_s", "total_s")
        return {"median": {k: median([x[k] for x in measured]) for k in keys}, "iterations": self.iters}


# ================================================================================================ TRL worker
def _trl_spec_from_rgpo(spec: dict[str, Any]):
    return _rgpo_config(spec, str(Path(tempfile.gettempdir()) / "rgpo-bench-unused"))


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same tiny Qwen2.5-VL, prompts and settings as the text-only rgpo case."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import rewards as reward_lib
    from rgpo.data import load_prompts
    from rgpo.models.mindomni import INSTRUCTION_PREFIX, SYSTEM_PROMPT

    cfg = _trl_spec_from_rgpo(spec)
    G, batch, mb = cfg.rollout.num_generations, cfg.rollout.batch_size, cfg.optim.micro_batch_size
    on_cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="rgpo-bench-trl-") as tmp:
        model_dir = Path(spec["model_dir"])
        meta = json.loads((model_dir / "bench_meta.json").read_text())
        targets, suppressed = meta["lora_targets"], meta["suppressed_token_ids"]
        processor = AutoProcessor.from_pretrained(model_dir, padding_side="left")
        rows = load_prompts(cfg.data.train_file)
        # Conversational prompts with rgpo's system prompt and instruction prefix (rgpo sends the prefix and the
        # instruction as two text parts of one user turn, which the chat template concatenates: same string).
        dataset = Dataset.from_list([
            {"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": INSTRUCTION_PREFIX + r.prompt}]} for r in rows])
        trl_ids = [processor.tokenizer(processor.apply_chat_template(row["prompt"], tokenize=False,
                                                                     add_generation_prompt=True),
                                       add_special_tokens=False)["input_ids"] for row in dataset]
        same_prompt = trl_ids == meta["rgpo_prompt_ids"]

        fmt = reward_lib.get_reward(cfg.rewards.functions[0]) if cfg.rewards.functions else None

        def format_reward(prompts, completions, **kwargs):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return fmt(prompts, texts, [None] * len(texts)) if fmt else [0.0] * len(texts)

        steps_total = spec["warmup"] + spec["steps"]
        args = GRPOConfig(
            output_dir=str(Path(tmp) / "out"),
            per_device_train_batch_size=mb,  # completions per micro-batch
            gradient_accumulation_steps=batch // mb,  # so one optimizer step sees `batch` completions
            num_generations=G,
            max_completion_length=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k,
            generation_kwargs={"suppress_tokens": suppressed},
            beta=cfg.loss.beta,
            loss_type=cfg.loss.aggregation,
            epsilon=cfg.loss.epsilon_low,
            epsilon_high=cfg.loss.epsilon_high,
            num_iterations=cfg.loss.num_iterations,
            scale_rewards="group",
            learning_rate=cfg.optim.lr,
            lr_scheduler_type="linear",
            weight_decay=cfg.optim.weight_decay,
            adam_beta1=cfg.optim.adam_betas[0],
            adam_beta2=cfg.optim.adam_betas[1],
            max_grad_norm=cfg.optim.max_grad_norm,
            optim="adamw_torch",
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            bf16=False,
            model_init_kwargs={"dtype": "float32"},
            max_steps=steps_total,
            use_cpu=not on_cuda,
            use_vllm=False,
            report_to="none",
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            seed=cfg.seed,
            dataloader_num_workers=0,
        )
        lora = LoraConfig(r=cfg.trainable.lora_r, lora_alpha=cfg.trainable.lora_alpha,
                          lora_dropout=cfg.trainable.lora_dropout, target_modules=targets, bias="none")

        phases: dict[str, float] = defaultdict(float)
        depth = {"rollout": 0}

        def wrap(fn, name):
            def inner(*a, **k):
                t = time.perf_counter()
                if name == "rollout":
                    depth["rollout"] += 1
                try:
                    return fn(*a, **k)
                finally:
                    if name == "rollout":
                        depth["rollout"] -= 1
                    key = name
                    if name == "forward":
                        key = "rollout/forward" if depth["rollout"] else "update/forward"
                    if on_cuda:
                        torch.cuda.synchronize()
                    phases[key] += time.perf_counter() - t
            return inner

        records: list[dict[str, Any]] = []
        lengths: list[float] = []
        holder: dict[str, Any] = {}

        # Interleaved mode: the text-only rgpo trainer lives in this process too and takes one step right after
        # each TRL step (TRL's step timing and end-to-end cycle exclude it), so both see the same machine load.
        rgpo_spec = spec.get("interleave")
        if rgpo_spec:
            rgpo_spec = {"config": spec["config"], "ban_eos": spec.get("ban_eos", True), **rgpo_spec}
        rgpo_steps: list[dict[str, Any]] = []
        rgpo_trainer = rgpo_timer = None
        if rgpo_spec:
            rgpo_timer = _install_phase_timer()
            rgpo_trainer = _build_rgpo(rgpo_spec, _rgpo_config(rgpo_spec, str(Path(tmp) / "rgpo")), rgpo_timer)

        class StepClock(TrainerCallback):
            def __init__(self):
                self.t_begin = self.t_end = None
                self.start_mem = 0
                self.extra_s = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                t = time.perf_counter()
                gc.collect()
                self.gc_s = time.perf_counter() - t  # excluded from the end-to-end cycle time
                MEM.reset()
                self.start_mem = MEM.current()
                phases.clear()
                self.t_begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if on_cuda:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                peak = MEM.peak()
                records.append({
                    "warmup": len(records) < spec["warmup"],
                    "step_s": now - self.t_begin,
                    "cycle_s": (now - self.t_end - self.gc_s - self.extra_s if self.t_end is not None
                                else float("nan")),
                    "gc_s": self.gc_s,
                    "phases_s": dict(phases),
                    "peak_mib": mib(peak),
                    "transient_mib": mib(peak - self.start_mem),
                    "footprint_mib": mib(peak - base_rss),
                })
                length = holder["trainer"]._metrics["train"].get("completions/mean_length")
                if length:
                    lengths.append(float(length[-1]))
                self.t_end = now
                self.extra_s = 0.0
                if rgpo_trainer is not None:
                    rgpo_steps.append(_measure_step(rgpo_trainer, rgpo_timer, records[-1]["warmup"], base_rss))
                    self.extra_s = time.perf_counter() - now

        gc.collect()
        base_rss = MEM.current()
        t0 = time.perf_counter()
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[format_reward], args=args, train_dataset=dataset,
                              processing_class=processor, peft_config=lora, callbacks=[StepClock()])
        build_s = time.perf_counter() - t0
        built_rss = MEM.current()
        trainable_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer._generate = wrap(trainer._generate, "rollout/text")
        trainer._calculate_rewards = wrap(trainer._calculate_rewards, "rewards")
        trainer._generate_and_score_completions = wrap(trainer._generate_and_score_completions, "rollout")
        trainer._get_per_token_logps_and_entropies = wrap(trainer._get_per_token_logps_and_entropies, "forward")
        holder["trainer"] = trainer
        trainer.train()
        measured = [r for r in records if not r["warmup"]] or records
        step_s = median([r["step_s"] for r in measured])
        cycle = [r["cycle_s"] for r in measured if r["cycle_s"] == r["cycle_s"]]
        names = sorted({k for r in measured for k in r["phases_s"]})
        phase_s = {k: median([r["phases_s"].get(k, 0.0) for r in measured]) for k in names}
        phase_s["update"] = median([r["step_s"] - r["phases_s"].get("rollout", 0.0) for r in measured])
        tokens = batch * cfg.rollout.max_new_tokens
        text_s = phase_s.get("rollout/text", float("nan"))
        interleaved = None
        if rgpo_trainer is not None:
            for _ in range(spec.get("memory_steps", MEMORY_STEPS)):
                rgpo_steps.append(_measure_step(rgpo_trainer, rgpo_timer, False, base_rss, phase_memory=True))
            interleaved = _summarise(rgpo_steps)
            pairs = [r["step_s"] / t["step_s"] for r, t in zip(rgpo_steps, records) if not t["warmup"]]
            interleaved["pair_ratio_median"] = median(pairs)
            rgpo_trainer.close()
        return {
            "interleaved_rgpo": interleaved,
            "label": spec["label"],
            "kind": "trl",
            "build_s": build_s,
            "model_state_mib": mib(built_rss - base_rss),
            "trainable_params": trainable_params,
            "same_prompt_tokens_as_rgpo": bool(same_prompt),
            "suppressed_token_ids": suppressed,
            "lora_targets": targets,
            "steps_measured": len(measured),
            "steps_warmup": len(records) - len(measured),
            "step_s": step_s,
            "step_s_min": min(r["step_s"] for r in measured),
            "step_s_max": max(r["step_s"] for r in measured),
            "cycle_s": median(cycle) if cycle else float("nan"),
            "phase_s": phase_s,
            "peak_mib": max(r["peak_mib"] for r in measured),
            "transient_mib": max(r["transient_mib"] for r in measured),
            "footprint_mib": max(r["footprint_mib"] for r in measured),
            "tokens_per_step": tokens,
            "chains_per_step": batch,
            "completion_len": median(lengths[-len(measured):]) if lengths else float("nan"),
            "gc_s_excluded": median([r.get("gc_s", 0.0) for r in measured]),
            "throughput": {"chains_per_s": batch / step_s, "tokens_per_s_step": tokens / step_s,
                           "tokens_per_s_generation": tokens / text_s if text_s > 0 else float("nan")},
            "steps": records,
        }


def save_tiny_vlm(cfg, path: Path) -> None:
    """The very VLM the rgpo trainer builds (same builder, same seed) with its processor, saved so TRL loads it by
    path; plus what the TRL worker needs to match rgpo (LoRA targets, suppressed ids, rgpo's prompt ids)."""
    import torch

    from rgpo.data import load_prompts
    from rgpo.models.mindomni import BANNED_TOKENS, EOS_TOKENS
    from rgpo.models.mindomni.tiny import build_tiny_mindomni

    tiny = build_tiny_mindomni(seed=cfg.seed, dtype=torch.float32)
    tiny.vlm.save_pretrained(path)
    tiny.processor.save_pretrained(path)
    vocab = tiny.tokenizer.get_vocab()
    batch = tiny.build_prompts([r.as_model_row() for r in load_prompts(cfg.data.train_file)])
    meta = {
        "lora_targets": _lora_targets_without_lm_head(tiny),
        "suppressed_token_ids": sorted({vocab[t] for t in (*EOS_TOKENS, *BANNED_TOKENS) if t in vocab}),
        "rgpo_prompt_ids": [ids[m.bool()].tolist() for ids, m in zip(batch.input_ids, batch.attention_mask)],
    }
    (path / "bench_meta.json").write_text(json.dumps(meta))


# ================================================================================================ optimisations
def _naive_generate(model, prompts, *, num_generations: int, max_new_tokens: int, generator):
    """rgpo's decoding loop before it was trimmed (bench-only): every step through the whole VLM forward, which
    rebuilds the attention mask from the 2-D padding mask, under ``no_grad`` instead of inference mode. Same
    prefill, cache sharing and sampling as ``MindOmni.generate`` (temperature 1, no top-k / top-p)."""
    import torch

    from rgpo.models.mindomni.modeling import _sample

    hf = model.hf_vlm()
    rows = prompts.input_ids.shape[0] * num_generations
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    sample_gen = torch.Generator(device=model.device).manual_seed(seed)
    eos = torch.tensor(model.eos_token_ids)
    with torch.no_grad():
        positions = model._position_ids(prompts.input_ids, prompts.attention_mask, prompts.vision)
        out = hf(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, position_ids=positions,
                 use_cache=True, logits_to_keep=1, **prompts.vision)
        cache = out.past_key_values
        cache.batch_repeat_interleave(num_generations)
        logits = out.logits[:, -1].float().repeat_interleave(num_generations, 0)
        next_pos = positions.amax(dim=(0, 2)).repeat_interleave(num_generations) + 1
        mask = prompts.attention_mask.repeat_interleave(num_generations, 0)
        done = torch.zeros(rows, dtype=torch.bool)
        tokens = []
        for step in range(max_new_tokens):
            logits[:, model.banned_token_ids] = float("-inf")
            token = _sample(logits, 1.0, 1.0, 0, sample_gen)
            token = torch.where(done, torch.full_like(token, model.pad_token_id), token)
            tokens.append(token)
            done |= torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = hf(input_ids=token[:, None], attention_mask=mask,
                     position_ids=(next_pos + step).view(1, rows, 1).expand(3, -1, -1), past_key_values=cache,
                     use_cache=True, logits_to_keep=1)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
    return model._completions(torch.stack(tokens, dim=1))


def _naive_forward_text(model, prompts, completions, with_condition: bool):
    """Bench-only naive training forward: the full VLM forward's logits for EVERY position, a full-vocabulary
    log-softmax, then a second backbone forward for the condition (the pre-norm states), over MindOmni's own
    condition sequence: each prompt, its answer prefix and the closing newline, left-padded anew."""
    import torch

    from rgpo.models.mindomni import pack_left

    hf = model.hf_vlm()
    p_len = prompts.input_ids.shape[1]
    comp_ids = completions.completion_ids
    ids = torch.cat([prompts.input_ids, comp_ids], dim=1)
    mask = torch.cat([prompts.attention_mask, completions.completion_mask.to(prompts.attention_mask.dtype)], dim=1)
    logits = hf(input_ids=ids, attention_mask=mask, position_ids=model._position_ids(ids, mask, prompts.vision),
                use_cache=False, **prompts.vision).logits
    logps = logits[:, p_len - 1 : -1].float().log_softmax(-1).gather(-1, comp_ids[..., None])[..., 0]
    if not with_condition:
        return logps, None, None
    rows = [prompts.input_ids[i][prompts.attention_mask[i].bool()].tolist()
            + comp_ids[i, : int(completions.condition_lengths[i])].tolist() + model.condition_suffix_ids
            for i in range(comp_ids.shape[0])]
    width = max(len(r) for r in rows)
    cond_ids = torch.tensor([[model.pad_token_id] * (width - len(r)) + r for r in rows], device=ids.device)
    cond_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=ids.device)
    states = model._backbone(cond_ids, cond_mask, prompts.vision)
    condition, cond_mask = pack_left(states, cond_mask.bool())
    return logps, condition, cond_mask


def _naive_guided_sampling(model, embeds, mask, neg, neg_mask, noise, icfg, cached: bool):
    """Bench-only: guided Euler sampling with the condition and the negative prompt as TWO decoder forwards per
    step (``cached``: each against its own condition KV cache; else the full uncached forward)."""
    import torch

    from rgpo.models.mindomni import euler_grid
    from rgpo.models.mindomni.omnigen import build_condition_cache, num_image_tokens
    from rgpo.sde import sample_flow

    with torch.no_grad():
        caches = (None, None)
        if cached:
            n_img = num_image_tokens(model.decoder, *noise.shape[-2:])
            caches = tuple(build_condition_cache(model.decoder, e, m_, n_img) for e, m_ in ((embeds, mask),
                                                                                            (neg, neg_mask)))

        def velocity(x, t):
            v_cond = model.guided_velocity(embeds, mask, x, t, cache=caches[0])
            v_neg = model.guided_velocity(neg, neg_mask, x, t, cache=caches[1])
            return v_neg + icfg.guidance_scale * (v_cond - v_neg)

        return sample_flow(velocity, noise, euler_grid(icfg.steps).to(noise.device)).latents


def _alternate(variants: dict[str, Any], rounds: int, sync) -> dict[str, dict[str, Any]]:
    """Run each variant ``rounds`` times (after one warm-up round), alternating between them so that a change of
    machine load hits every variant alike; median time and the largest peak-memory rise."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, float] = {k: 0.0 for k in variants}
    results: dict[str, Any] = {}
    for r in range(rounds + 1):
        for name, fn in variants.items():
            gc.collect()
            sync()
            MEM.reset()
            start = MEM.current()
            t = time.perf_counter()
            results[name] = fn()
            sync()
            dt = time.perf_counter() - t
            if r:
                times[name].append(dt)
                peaks[name] = max(peaks[name], mib(MEM.peak() - start))
    return {k: {"s": median(times[k]), "peak_rise_mib": peaks[k], "result": results[k]} for k in variants}


def run_ablations(spec: dict[str, Any]) -> dict[str, Any]:
    """Each optimisation the issue lists, measured on against off in one process, alternating; every naive
    variant is checked to compute the same result as rgpo's."""
    import torch

    from rgpo.data import load_prompts
    from rgpo.losses import feature_kl
    from rgpo.models.base import ImageSamplingConfig
    from rgpo.trainer import IMAGE_KL_GRID, apply_trainable, build_model

    rounds = spec.get("rounds", 7)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    device = torch.device("cuda" if cuda else "cpu")
    rows_out: list[dict[str, Any]] = []

    def row(name, on_label, off_label, measured, check, in_rgpo="yes", note=""):
        on, off = measured["on"], measured["off"]
        rows_out.append({"optimisation": name, "on": on_label, "off": off_label, "on_s": on["s"], "off_s": off["s"],
                         "on_over_off": on["s"] / off["s"] if off["s"] else float("nan"),
                         "on_peak_rise_mib": on["peak_rise_mib"], "off_peak_rise_mib": off["peak_rise_mib"],
                         "same_result": check, "in_rgpo": in_rgpo, "note": note})
        print(f"[bench]   {name}: {on['s'] * 1e3:.1f} ms vs {off['s'] * 1e3:.1f} ms", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="rgpo-bench-") as tmp:
        cfg = _rgpo_config(spec, str(Path(tmp) / "run"))
        model = apply_trainable(build_model(cfg), cfg).to(device).eval()
        _ban_eos(model, spec)
        G, T = cfg.rollout.num_generations, cfg.rollout.max_new_tokens
        P = cfg.rollout.batch_size // G
        rows = load_prompts(cfg.data.train_file)
        prompts = model.build_prompts([rows[j % len(rows)].as_model_row() for j in range(P)]).to(device)
        icfg = ImageSamplingConfig(**{k: getattr(cfg.rollout.image, k) for k in (
            "height", "width", "steps", "guidance_scale", "seed", "shared_noise")})

        def gen(seed=0):
            return torch.Generator().manual_seed(seed)

        # 1. prompt prefill: once per group, its KV cache repeated for the G chains, vs G prefills
        with torch.no_grad():  # the same first-token distribution from either prefill
            hf = model.hf_vlm()
            pos = model._position_ids(prompts.input_ids, prompts.attention_mask, {})
            shared = hf(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, position_ids=pos,
                        logits_to_keep=1).logits[:, -1].repeat_interleave(G, 0)
            rep = prompts.repeat_interleave(G)
            each = hf(input_ids=rep.input_ids, attention_mask=rep.attention_mask,
                      position_ids=model._position_ids(rep.input_ids, rep.attention_mask, {}),
                      logits_to_keep=1).logits[:, -1]
        torch.testing.assert_close(shared, each, atol=1e-5, rtol=1e-5)
        for tokens, label in ((T, f"whole generate ({P} prompts x G={G}, {T} tokens)"),
                              (1, "prefill + first token only")):
            m = _alternate({
                "on": lambda t=tokens: model.generate(prompts, num_generations=G, max_new_tokens=t, generator=gen()),
                "off": lambda t=tokens: model.generate(prompts.repeat_interleave(G), num_generations=1,
                                                       max_new_tokens=t, generator=gen()),
            }, rounds, sync)
            same = torch.equal(m["on"]["result"].completion_ids, m["off"]["result"].completion_ids)
            row(f"prompt prefilled once per group, KV cache shared by the G chains: {label}",
                "1 prefill per prompt", "G prefills per prompt", m,
                f"first-token logits allclose; sampled ids {'identical' if same else 'differ (float noise)'}")

        # 2. the decoding loop: the text model + lm_head with rgpo's own padding mask under inference mode, vs
        #    every step through the whole VLM forward (mask rebuilt by transformers) under no_grad
        m = _alternate({
            "on": lambda: model.generate(prompts, num_generations=G, max_new_tokens=T, generator=gen()),
            "off": lambda: _naive_generate(model, prompts, num_generations=G, max_new_tokens=T, generator=gen()),
        }, rounds, sync)
        assert torch.equal(m["on"]["result"].completion_ids, m["off"]["result"].completion_ids)
        row("decoding steps: text model + lm_head, own padding mask, inference mode", "rgpo's loop",
            "full VLM forward per token, no_grad", m, "identical token ids")

        # 3. log-probs + condition from ONE forward, norm + lm_head in chunks (no full-vocabulary log-softmax)
        comps = m["on"]["result"]  # section 2's chains (same prompts, same seed)
        reps = prompts.repeat_interleave(G)
        mb = min(cfg.optim.micro_batch_size, comps.completion_ids.shape[0])
        p_mb, c_mb = reps.select(list(range(mb))), comps.select(list(range(mb)))

        def fwd_on(grad: bool):
            with torch.set_grad_enabled(grad):
                out = model.forward_text(p_mb if grad else reps, c_mb if grad else comps, with_condition=True)
                if grad:
                    (out.logps.sum() + out.condition.sum()).backward()
            return out.logps.detach(), out.condition.detach()

        def fwd_off(grad: bool):
            with torch.set_grad_enabled(grad):
                logps, cond, _ = _naive_forward_text(model, p_mb if grad else reps, c_mb if grad else comps, True)
                if grad:
                    (logps.sum() + cond.sum()).backward()
            return logps.detach(), cond.detach()

        for grad, label in ((False, f"rollout, no grad ({comps.completion_ids.shape[0]} chains)"),
                            (True, f"update micro-batch, forward + backward ({mb} chains)")):
            model.train(grad)
            m = _alternate({"on": lambda g=grad: fwd_on(g), "off": lambda g=grad: fwd_off(g)}, rounds, sync)
            model.zero_grad(set_to_none=True)
            (lo, co), (ln, cn) = m["on"]["result"], m["off"]["result"]
            mask = (c_mb if grad else comps).completion_mask.bool()
            torch.testing.assert_close(lo[mask], ln[mask], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(co, cn, atol=1e-5, rtol=1e-5)
            row(f"log-probs and condition from one forward, chunked lm_head: {label}", "1 forward",
                "2 forwards + full-vocab log-softmax", m, "log-probs and condition allclose")
        model.eval()

        # 4. image sampling: condition KV cache across denoising steps; guidance as ONE batched forward
        with torch.no_grad():
            out = model.forward_text(reps, comps, with_condition=True)
            embeds = model.connect(out.condition, out.condition_mask)
            neg_states, neg_mask = model.negative_condition(embeds.shape[0])
            neg = model.connect(neg_states, neg_mask)
            noise = model.initial_noise(embeds.shape[0], G, icfg).to(model.dtype)
        cmask = out.condition_mask

        def sample(cache: bool):
            model.decoder_kv_cache = cache
            try:
                return model.sample_latents(embeds, cmask, neg, neg_mask, noise, icfg)
            finally:
                model.decoder_kv_cache = True

        m = _alternate({"on": lambda: sample(True), "off": lambda: sample(False)}, rounds, sync)
        torch.testing.assert_close(m["on"]["result"], m["off"]["result"], atol=1e-4, rtol=1e-4)
        row(f"decoder condition keys/values cached across the {icfg.steps} denoising steps", "cached",
            "condition recomputed every step", m, "latents allclose")
        m = _alternate({
            "on": lambda: sample(True),
            "off": lambda: _naive_guided_sampling(model, embeds, cmask, neg, neg_mask, noise, icfg, cached=True),
        }, rounds, sync)
        torch.testing.assert_close(m["on"]["result"], m["off"]["result"], atol=1e-4, rtol=1e-4)
        row(f"guidance (scale {icfg.guidance_scale}): condition + negative as ONE batched decoder forward",
            "1 forward of 2N rows", "2 forwards of N rows", m, "latents allclose")
        m = _alternate({
            "on": lambda: sample(True),
            "off": lambda: _naive_guided_sampling(model, embeds, cmask, neg, neg_mask, noise, icfg, cached=False),
        }, rounds, sync)
        torch.testing.assert_close(m["on"]["result"], m["off"]["result"], atol=1e-4, rtol=1e-4)
        row("image sampling, both of the above", "cached + batched", "uncached, 2 forwards per step", m,
            "latents allclose")

        # 5. image KL: policy and reference decoder runs batched vs separate; K sampled timesteps vs all
        lc = cfg.loss
        n = mb
        with torch.no_grad(), model.adapter_disabled():
            ref = model.forward_text(p_mb, c_mb, with_condition=True)
        pol_cond = out.condition[:n].detach()
        shape = model.latent_shape(icfg.height, icfg.width)
        g = gen(7)
        kl_noise = torch.randn((n, *shape), generator=g).to(device, model.dtype)
        t_idx = torch.randint(0, IMAGE_KL_GRID, (n,), generator=g)
        grid = torch.arange(IMAGE_KL_GRID).float().div(IMAGE_KL_GRID - 1).to(device)

        def kl(c, cm, rc, rm, t, noise_, batched: bool):
            c = c.clone().requires_grad_(True)
            if batched:
                from rgpo.models.mindomni import cat_left_padded

                both, both_mask = cat_left_padded([c, rc], [cm, rm])
                feats = model.decode_step(model.connect(both, both_mask), both_mask, torch.cat([noise_, noise_]),
                                          torch.cat([t, t]), return_features=True).features
                pf, rf = feats.chunk(2)
                rf = rf.detach()
            else:
                pf = model.decode_step(model.connect(c, cm), cm, noise_, t, return_features=True).features
                with torch.no_grad():
                    rf = model.decode_step(model.connect(rc, rm), rm, noise_, t, return_features=True).features
            per = feature_kl(pf, rf, tau=lc.image_kl_tau)
            per.mean().backward()
            return per.detach(), c.grad

        args = (pol_cond, cmask[:n], ref.condition, ref.condition_mask)
        m = _alternate({"on": lambda: kl(*args, grid[t_idx], kl_noise, True),
                        "off": lambda: kl(*args, grid[t_idx], kl_noise, False)}, rounds, sync)
        torch.testing.assert_close(m["on"]["result"][0], m["off"]["result"][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m["on"]["result"][1], m["off"]["result"][1], atol=1e-4, rtol=1e-4)
        row(f"image KL: policy and reference decoder runs batched (forward + backward, {n} chains)",
            "1 batched forward", "2 forwards (policy with grad, reference without)", m,
            "KL and its gradient allclose", in_rgpo="no (the trainer runs them separately)",
            note="batching also runs the backward over the reference rows")
        reps_all = IMAGE_KL_GRID
        all_args = tuple(a.repeat_interleave(reps_all, 0) for a in args)
        m = _alternate({
            "on": lambda: kl(*args, grid[t_idx], kl_noise, False),
            "off": lambda: kl(*all_args, grid.repeat(n), kl_noise.repeat_interleave(reps_all, 0), False),
        }, max(2, rounds // 3), sync)
        every = m["off"]["result"][0].view(n, reps_all)
        torch.testing.assert_close(m["on"]["result"][0], every[torch.arange(n), t_idx], atol=1e-4, rtol=1e-4)
        # The "on" side times one sampled timestep per chain (loss.image_kl_timesteps=1, the default).
        row(f"image KL on K=1 sampled timestep per chain (loss.image_kl_timesteps) vs all {reps_all} "
            f"(forward + backward, {n} chains)", "K=1", f"all {reps_all}", m,
            "the sampled timestep's KL equals that entry of the full sweep")

        # 6. the train/eval switch of every step: the flattened TrainModeSwitch vs Module.train's tree walk
        from rgpo.modes import TrainModeSwitch

        switch = TrainModeSwitch(model)

        def flip(fast: bool):
            for mode in (True, False):
                switch(mode) if fast else model.train(mode)

        def flags(fast: bool, mode: bool):
            model.train(not mode)
            switch(mode) if fast else model.train(mode)
            return {name: mod.training for name, mod in model.named_modules()}

        m = _alternate({"on": lambda: flip(True), "off": lambda: flip(False)}, max(rounds, 20), sync)
        assert all(flags(True, mode) == flags(False, mode) for mode in (True, False))
        model.eval()
        row(f"train + eval switch ({switch.num_modules} modules): flattened once vs `Module.train` walk",
            "TrainModeSwitch", "model.train() / model.eval()", m, "every module's training flag identical")

        # 7. ZeRO-2 on a CPU: gradient overlap and contiguous buffers off (rgpo's "auto") vs on
        if not cuda:
            _zero2_flags_ablation(spec, Path(tmp), rounds, sync, row)

        # 8. ZeRO-3: parameters gathered once for the rollout phase vs fetched by every forward (per token).
        #    Last: a ZeRO-3 trainer leaves transformers' global DeepSpeed config set in this process.
        if spec.get("zero3", True):
            _zero3_ablation(spec, Path(tmp), rounds, sync, row)
    return {"label": spec["label"], "kind": "ablations", "rows": rows_out, "rounds": rounds}


def _zero2_flags_ablation(spec, tmp: Path, rounds, sync, row) -> None:
    """The text-only update under ZeRO-2 with ``overlap_comm`` / ``contiguous_gradients`` as rgpo fills their
    ``auto`` on a CPU (off) vs on: two trainers built from the same seed, each updated alternately on the same
    rollout and advantages, so they must end with the same weights."""
    import torch

    from rgpo.tracking import PhaseTimer
    from rgpo.building import trainable_parameters
    from rgpo.trainer import RGPOTrainer

    raw = json.loads((REPO / "configs" / "zero2.json").read_text())
    raw["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)
    path = tmp / "zero2_overlap_contiguous.json"
    path.write_text(json.dumps(raw))
    text = [*spec["overrides"], "rollout.image.enabled=false", "rewards.functions=[format]"]
    trainers = {}
    for name, extra in (("on", []), ("off", [f"deepspeed.config={path}"])):
        torch.manual_seed(0)
        trainers[name] = RGPOTrainer(_rgpo_config({**spec, "overrides": [*text, *extra]}, str(tmp / f"zero2_{name}")))
        _ban_eos(trainers[name].model, spec)
    first = trainers["on"]
    rollout = first.rollout(first.sampler.next_step(), PhaseTimer())
    advantages = torch.linspace(-1, 1, len(rollout.rows))
    m = _alternate({k: (lambda t=t: t.update(rollout, advantages)) for k, t in trainers.items()}, rounds, sync)
    weights = {k: trainable_parameters(t.model) for k, t in trainers.items()}
    for key, value in weights["on"].items():
        torch.testing.assert_close(value, weights["off"][key], atol=1e-6, rtol=1e-5)
    mb = trainers["on"].cfg.optim.micro_batch_size
    row(f"ZeRO-2 update on a CPU ({len(rollout.rows)} chains in micro-batches of {mb}): overlap_comm and "
        "contiguous_gradients off", "off (rgpo's auto on a CPU)", "on (DeepSpeed's usual GPU setting)", m,
        "identical trainable weights after the same updates")
    for t in trainers.values():
        t.close()


def _zero3_ablation(spec, tmp: Path, rounds, sync, row) -> None:
    """rgpo's ``gathered()`` (one gather for the whole rollout phase) vs ZeRO-3's per-module fetch at every
    forward, on a ZeRO-3 trainer whose every parameter is partitioned (persistence threshold 0)."""
    import deepspeed
    import torch

    from rgpo.trainer import RGPOTrainer

    raw = json.loads((REPO / "configs" / "zero3.json").read_text())
    raw.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = 0
    path = tmp / "zero3_all_partitioned.json"
    path.write_text(json.dumps(raw))
    z_spec = {**spec, "overrides": [*spec["overrides"], f"deepspeed.config={path}", "rollout.image.enabled=false"]}
    zcfg = _rgpo_config(z_spec, str(tmp / "zero3"))
    trainer = RGPOTrainer(zcfg)
    _ban_eos(trainer.model, spec)
    model = trainer.model
    G, T = zcfg.rollout.num_generations, zcfg.rollout.max_new_tokens
    P = zcfg.rollout.batch_size // G
    rows = trainer.train_rows
    prompts = model.build_prompts([rows[j % len(rows)].as_model_row() for j in range(P)])

    def rollout(how: str):
        trainer.engine.eval()
        ctx = {"rgpo": trainer.gathered,  # one gather, ZeRO-3's module hooks off meanwhile
               "gather, hooks on": lambda: deepspeed.zero.GatheredParameters(list(model.parameters())),
               "per forward": contextlib.nullcontext}[how]
        with torch.no_grad(), ctx():
            comps = model.generate(prompts, num_generations=G, max_new_tokens=T,
                                   generator=torch.Generator().manual_seed(0))
            with model.adapter_disabled():
                logps = model.forward_text(prompts.repeat_interleave(G), comps, with_condition=False).logps
        return comps.completion_ids, logps

    for off, off_label in (("per forward", "ZeRO-3 fetch/release at every module call of every forward (per token)"),
                           ("gather, hooks on", "one gather, ZeRO-3 module hooks left on")):
        m = _alternate({"on": lambda: rollout("rgpo"), "off": lambda o=off: rollout(o)}, rounds, sync)
        assert torch.equal(m["on"]["result"][0], m["off"]["result"][0])
        torch.testing.assert_close(m["on"]["result"][1], m["off"]["result"][1], atol=1e-5, rtol=1e-5)
        row(f"ZeRO-3 rollout phase (generate {T} tokens + reference forward, every parameter partitioned, 1 rank)",
            "one gather per phase, module hooks off", off_label, m, "identical ids, log-probs allclose")
    trainer.close()


# ================================================================================================ worker entry
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.init()
        torch.cuda.synchronize()


def worker_main(spec_file: str, out_file: str) -> None:
    global MEM
    import torch

    spec = json.loads(Path(spec_file).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # the float32 parts (CLIP, VAE) on tensor cores, as a GPU user would run them
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    MEM = PeakMemory(device)
    results = []
    for case in spec["cases"]:
        case = {**spec["common"], **case}
        print(f"[bench] {case['label']} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        runner = {"trl": run_trl, "ablations": run_ablations, "sweep": run_sweep}.get(case["kind"], run_rgpo)
        result = runner(case)
        result["wall_s"] = time.perf_counter() - t
        result["memory_method"] = MEM.method
        results.append(result)
        if "step_s" in result:
            print(f"[bench] {case['label']}: step {result['step_s']:.3f} s (median of {result['steps_measured']}), "
                  f"{result['wall_s']:.0f} s in all", file=sys.stderr, flush=True)
    Path(out_file).write_text(json.dumps({"machine": machine_info(device), "results": results}, indent=1))


def spawn(cases: list[dict[str, Any]], common: dict[str, Any], threads: int | None, tmp: Path, name: str):
    spec_file, out_file = tmp / f"{name}.spec.json", tmp / f"{name}.out.json"
    spec_file.write_text(json.dumps({"cases": cases, "common": common, "threads": threads}))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_file), str(out_file)],
                          cwd=str(REPO))
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker {name!r} failed (exit {proc.returncode})")
    return json.loads(out_file.read_text())


def pool(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one configuration as one: medians over all their measured steps, maxima of memory."""
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    steps = [s for r in results for s in r["steps"] if not s["warmup"]]
    out["steps"] = [s for r in results for s in r["steps"]]
    out["steps_measured"] = len(steps)
    out["step_s"] = median([s["step_s"] for s in steps])
    out["step_s_min"] = min(s["step_s"] for s in steps)
    out["step_s_max"] = max(s["step_s"] for s in steps)
    names = sorted({k for s in steps for k in s["phases_s"]})
    phase_s = {k: median([s["phases_s"].get(k, 0.0) for s in steps]) for k in names}
    if out["kind"] == "trl":
        phase_s["update"] = median([s["step_s"] - s["phases_s"].get("rollout", 0.0) for s in steps])
        cycles = [s["cycle_s"] for s in steps if s["cycle_s"] == s["cycle_s"]]
        out["cycle_s"] = median(cycles) if cycles else float("nan")
    else:
        if "rollout/forward" in phase_s and "rollout/reference" in phase_s:
            phase_s["rollout/policy_forward"] = median(
                [s["phases_s"].get("rollout/forward", 0.0) - s["phases_s"].get("rollout/reference", 0.0)
                 for s in steps])
        phase_s["other"] = median([s["step_s"] - sum(s["phases_s"].get(k, 0.0) for k in TOP_PHASES)
                                   for s in steps])
    out["phase_s"] = phase_s
    for key in ("peak_mib", "transient_mib", "footprint_mib", "model_state_mib"):
        out[key] = max(r[key] for r in results)
    out["build_s"] = median([r["build_s"] for r in results])
    chains, tokens = out["chains_per_step"], out["tokens_per_step"]
    text_s = phase_s.get("rollout/text", float("nan"))
    out["throughput"] = {**out["throughput"], "chains_per_s": chains / out["step_s"],
                         "tokens_per_s_step": tokens / out["step_s"],
                         "tokens_per_s_generation": tokens / text_s if text_s > 0 else float("nan")}
    if all(r.get("bare") for r in results):
        iters = [x for r in results for x in r["bare"]["iterations"]]
        measured = [x for x in iters if not x["warmup"]] or iters
        out["bare"] = {"median": {k: median([x[k] for x in measured]) for k in measured[0] if k.endswith("_s")},
                       "iterations": iters}
    out["rounds"] = len(results)
    return out


# ================================================================================================ report
def fmt_s(x: float) -> str:
    if x != x:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def fmt_ms(x: float) -> str:
    """Milliseconds with a decimal below 10 ms (the optimisation rows are short)."""
    if x != x:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 0.01 else fmt_s(x)


def fmt_n(x: float, digits: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def _overhead_lines(report: dict[str, Any]) -> list[str]:
    """The trainer-overhead table: each measured step (full step; text-only, when compared with TRL) against the
    same work as bare model calls, each bare iteration run right after a trainer step in the same process."""
    cases = []
    if report.get("main", {}).get("bare"):
        cases.append(("full step", "overhead", report["main"]))
    text = (report.get("comparison") or {}).get("rgpo")
    if text and text.get("bare"):
        cases.append(("text-only step", "overhead_text", text))
    if not cases:
        return []
    pieces = [("generate (`model.eval()` + `build_prompts` + `model.generate`)", "generate_s", "rollout/text"),
              ("no-grad forwards (policy when needed + reference `forward_text`)", "forward_nograd_s", "rollout/forward"),
              ("images (`connect` + `sample_latents` + `decode_latents`)", "images_s", "rollout/images"),
              ("update (`model.train()` + forward_text + image KL + backward + AdamW)", "update_s", "update")]
    head = "| piece | " + " | ".join(f"{name}: bare | {name}: in the trainer" for name, _, _ in cases) + " |"
    lines = ["", "## Trainer overhead (rgpo step vs the same work as bare model calls)", "", head,
             "| --- |" + " ---: | ---: |" * len(cases)]
    for label, bare_key, phase in pieces:
        cells = []
        for _, _, res in cases:
            b = res["bare"]["median"]
            in_trainer = res["phase_s"].get(phase, 0.0 if b[bare_key] == 0 else float("nan"))
            cells.append(f"{fmt_s(b[bare_key])} | {fmt_s(in_trainer)}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(
        f"**{fmt_s(res['bare']['median']['total_s'])}** | **{fmt_s(res['step_s'])}**" for _, _, res in cases) + " |")
    lines.append("")
    notes = []
    for name, key, res in cases:
        overhead = res["step_s"] - res["bare"]["median"]["total_s"]
        # Each trainer step with the bare iteration that ran right after it: the median of the per-pair shares
        # is less sensitive to a load change between steps than the difference of the two medians.
        pairs = [(s_["step_s"] - b_["total_s"]) / s_["step_s"] for s_, b_ in
                 zip([x for x in res["steps"] if not x["warmup"]],
                     [x for x in res["bare"]["iterations"]
                                                                     if not x["warmup"]])]
        fastest = min(x["step_s"] for x in res["steps"] if not x["warmup"])
        fastest_bare = min(x["total_s"] for x in res["bare"]["iterations"] if not x["warmup"])
        report[key] = {"step_s": res["step_s"], "bare_s": res["bare"]["median"]["total_s"], "overhead_s": overhead,
                       "overhead_pct": 100 * overhead / res["step_s"],
                       "paired_overhead_pct_median": 100 * median(pairs),
                       "fastest_overhead_pct": 100 * (fastest - fastest_bare) / fastest}
        notes.append(f"{name}: {fmt_s(overhead)} = **{100 * overhead / res['step_s']:.1f} %** of the step (median "
                     f"of the per-step shares {100 * median(pairs):.1f} %; fastest step vs fastest bare iteration "
                     f"{report[key]['fastest_overhead_pct']:.1f} %)")
    lines.append("Trainer overhead (step minus the bare pieces): " + "; ".join(notes) + ". The bare pieces run on a "
                 "plain, non-DeepSpeed copy of the same model with torch AdamW, one bare iteration right after each "
                 "trainer step on that step's prompts, in the same process (so both see the same machine load); "
                 "medians over the measured steps.")
    return lines


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# rgpo benchmark", ""]
    lines.append(f"Command: `{report['command']}`  ")
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
                 f"{m.get('memory_total_gib', '?')} GiB; device **{m['device']}**"
                 + (f" ({m['gpu']})" if m.get("gpu") else "")
                 + f"; torch {m['torch']} ({m['torch_threads']} threads), transformers {m.get('transformers')}, "
                 f"trl {m.get('trl')}, peft {m.get('peft')}, deepspeed {m.get('deepspeed')}; load average at start "
                 f"{', '.join(f'{x:.1f}' for x in m.get('load_average_at_start') or [])}, at end "
                 f"{', '.join(f'{x:.1f}' for x in report.get('load_average_at_end') or [])}.  ")
    lines.append(f"Memory: {report['memory_method']}. Times are medians over the measured steps after warm-up.")
    main = report.get("main")
    if main:
        c = main["config"]
        lines += ["", f"## rgpo step, phase by phase ({main['label']})", "",
                  f"G={c['G']}, {c['prompts_per_step']} prompts/step ({c['batch_chains']} chains), micro-batch "
                  f"{c['micro_batch']}, {c['max_new_tokens']} tokens/chain (EOS banned), images "
                  f"{c['image_size']} x {c['decoder_steps']} steps (guidance {c['guidance']}), beta {c['beta']}, "
                  f"LoRA r/alpha/dropout {c['lora']}, {c['dtype']}; {main['steps_measured']} steps measured after "
                  f"{main['steps_warmup']} warm-up. Per-phase peak memory comes from {main.get('memory_steps', 0)} "
                  "further steps that reset the peak at every phase boundary (their time is not used: on a CPU "
                  "each reset slows the allocations after it); the timed steps read one peak per step.", "",
                  "| phase | median time | share of step | peak memory rise in phase (MiB) |",
                  "| --- | ---: | ---: | ---: |"]
        order = ["rollout", "rollout/text", "rollout/forward", "rollout/policy_forward", "rollout/reference",
                 "rollout/images", "rewards", "advantages", "update", "update/reference", "other"]
        for k in order:
            if k in main["phase_s"]:
                v = main["phase_s"][k]
                peak = main["phase_peak_mib"].get(k)
                peak = None if peak is None else max(0.0, peak)
                lines.append(f"| {k} | {fmt_s(v)} | {100 * v / main['step_s']:.1f} % | {fmt_n(peak)} |")
        t = main["throughput"]
        lines.append(f"| **whole step** | **{fmt_s(main['step_s'])}** (min {fmt_s(main['step_s_min'])}, max "
                     f"{fmt_s(main['step_s_max'])}) | 100 % | {fmt_n(main['transient_mib'])} |")
        lines += ["", f"Throughput: {t['chains_per_s']:.2f} chains/s, {t['images_per_s']:.2f} images/s, "
                  f"{t['tokens_per_s_step']:.0f} tokens/s over the step ({t['tokens_per_s_generation']:.0f} tokens/s "
                  f"in generation; {t['images_per_s_sampling']:.2f} images/s in image sampling). Peak memory "
                  f"during a step: {main['peak_mib']:.0f} MiB ({main['transient_mib']:.0f} MiB above the step's "
                  f"start, {main['footprint_mib']:.0f} MiB above the process before the trainer was built). "
                  f"(`throughput/chains_per_s` as rgpo logs it: {main['reported_chains_per_s']:.2f}.)"]
        lines += _overhead_lines(report)
    scaling = report.get("scaling") or []
    if scaling:
        lines += ["", "## Scaling of the step", "",
                  "One process per varied quantity: a trainer per value (the baseline included), their steps taken "
                  "round-robin, so the values of one quantity are compared under the same machine load.", "",
                  "| varied | value | chains | step | step / chain | rollout/text | rollout/images | update | "
                  "chains/s | tokens/s | peak rise (MiB) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in scaling:
            p = r["phase_s"]
            lines.append(f"| {r['axis']} | {r['value']} | {r['chains_per_step']} | {fmt_s(r['step_s'])} | "
                         f"{fmt_ms(r['step_s'] / r['chains_per_step'])} | "
                         f"{fmt_s(p.get('rollout/text', float('nan')))} | "
                         f"{fmt_s(p.get('rollout/images', float('nan')))} | {fmt_s(p.get('update', float('nan')))} | "
                         f"{r['throughput']['chains_per_s']:.2f} | {r['throughput']['tokens_per_s_step']:.0f} | "
                         f"{r['transient_mib']:.0f} |")
    cmp_ = report.get("comparison")
    if cmp_:
        r, t = cmp_["rgpo"], cmp_["trl"]
        c = r["config"]
        lines += ["", "## rgpo vs TRL GRPOTrainer (text only, same tiny Qwen2.5-VL)", "",
                  f"G={c['G']}, {c['prompts_per_step']} prompts/step ({c['batch_chains']} completions), micro-batch "
                  f"{c['micro_batch']} (TRL: per_device_train_batch_size={c['micro_batch']}, "
                  f"gradient_accumulation_steps={c['batch_chains'] // c['micro_batch']}), {c['max_new_tokens']} "
                  f"tokens/completion in both (EOS suppressed), beta {c['beta']}, loss grpo, LoRA "
                  f"r/alpha/dropout {c['lora']} on the same modules, num_iterations 1, temperature 1, format reward. "
                  f"Prompt token ids identical in both: {t['same_prompt_tokens_as_rgpo']}. Mean completion length: "
                  f"rgpo {fmt_n(r['completion_len'])}, TRL {fmt_n(t['completion_len'])}. {cmp_.get('rounds', 1)} "
                  f"alternating rounds, {r['steps_measured']} + {t['steps_measured']} steps measured in all; "
                  "ratios < 1: rgpo faster / smaller.", "",
                  "| | rgpo | TRL | rgpo / TRL |", "| --- | ---: | ---: | ---: |"]
        inter = cmp_.get("interleaved")
        if inter:
            ri, ti = inter["rgpo"], inter["trl"]
            lines.append(f"| **step (median), rgpo and TRL steps interleaved in one process** ({ri['steps_measured']} "
                         f"+ {ti['steps_measured']} steps) | **{fmt_s(ri['step_s'])}** | **{fmt_s(ti['step_s'])}** | "
                         f"**{fmt_n(ri['step_s'] / ti['step_s'], 2)}** |")
            lines.append(f"|   same run: median of the per-pair ratios (each rgpo step / the TRL step just before) | "
                         f"| | {fmt_n(ri['pair_ratio_median'], 2)} |")
            lines.append(f"|   same run: text generation | {fmt_s(ri['phase_s'].get('rollout/text', 0.0))} | "
                         f"{fmt_s(ti['phase_s'].get('rollout/text', 0.0))} | "
                         f"{fmt_n(ri['phase_s'].get('rollout/text', 0.0) / ti['phase_s'].get('rollout/text', 1.0), 2)} |")
            lines.append(f"|   same run: update (TRL: step - rollout) | {fmt_s(ri['phase_s'].get('update', 0.0))} | "
                         f"{fmt_s(ti['phase_s'].get('update', 0.0))} | "
                         f"{fmt_n(ri['phase_s'].get('update', 0.0) / ti['phase_s'].get('update', 1.0), 2)} |")
            cmp_["step_time_ratio_interleaved"] = ri["step_s"] / ti["step_s"]
            cmp_["pair_ratio_median_interleaved"] = ri["pair_ratio_median"]
        rows_ = [
            (f"step (median), separate processes ({cmp_.get('rounds', 1)} alternating rounds)", r["step_s"],
             t["step_s"], True),
            ("  text generation", r["phase_s"].get("rollout/text", 0.0), t["phase_s"].get("rollout/text", 0.0), True),
            ("  no-grad forwards (rgpo: policy + reference; TRL: reference)", r["phase_s"].get("rollout/forward", 0.0),
             t["phase_s"].get("rollout/forward", 0.0), True),
            ("  rewards", r["phase_s"].get("rewards", 0.0), t["phase_s"].get("rewards", 0.0), True),
            ("  update (TRL: step - rollout)", r["phase_s"].get("update", 0.0), t["phase_s"].get("update", 0.0), True),
        ]
        for name, a, b, is_time in rows_:
            ratio = a / b if b else float("nan")
            lines.append(f"| {name} | {fmt_s(a) if is_time else a} | {fmt_s(b) if is_time else b} | {fmt_n(ratio, 2)} |")
        lines.append(f"| fastest step (min) | {fmt_s(r['step_s_min'])} | {fmt_s(t['step_s_min'])} | "
                     f"{fmt_n(r['step_s_min'] / t['step_s_min'], 2)} |")
        lines.append(f"| TRL step incl. data loading + logging (end to end) | | {fmt_s(t['cycle_s'])} | "
                     f"{fmt_n(r['step_s'] / t['cycle_s'], 2)} |")
        for name, key in (("peak memory rise during a step (MiB)", "transient_mib"),
                          ("peak memory above the process before the trainer (MiB)", "footprint_mib"),
                          ("peak memory of the process (MiB)", "peak_mib"),
                          ("memory added by building the trainer (MiB)", "model_state_mib")):
            a, b = r[key], t[key]
            lines.append(f"| {name} | {a:.0f} | {b:.0f} | {fmt_n(a / b if b else float('nan'), 2)} |")
        lines.append(f"| chains/s | {r['throughput']['chains_per_s']:.2f} | {t['throughput']['chains_per_s']:.2f} | "
                     f"{fmt_n(r['throughput']['chains_per_s'] / t['throughput']['chains_per_s'], 2)} |")
        lines.append(f"| trainable (LoRA) parameters | {r['trainable_params']} | {t['trainable_params']} | "
                     f"{fmt_n(r['trainable_params'] / t['trainable_params'], 2)} |")
        lines.append(f"| trainer build | {fmt_s(r['build_s'])} | {fmt_s(t['build_s'])} | "
                     f"{fmt_n(r['build_s'] / t['build_s'], 2)} |")
        cmp_["step_time_ratio"] = r["step_s"] / t["step_s"]
        cmp_["min_step_time_ratio"] = r["step_s_min"] / t["step_s_min"]
        cmp_["process_peak_memory_ratio"] = r["peak_mib"] / t["peak_mib"]
        cmp_["peak_memory_ratio"] = r["transient_mib"] / t["transient_mib"] if t["transient_mib"] else None
        cmp_["footprint_ratio"] = r["footprint_mib"] / t["footprint_mib"] if t["footprint_mib"] else None
    abl = report.get("ablations")
    if abl:
        lines += ["", "## Optimisations, each on vs off", "",
                  f"Each row times rgpo's path (on) against the path without that optimisation (off: a flag, or a "
                  f"bench-only naive reimplementation checked to compute the same result), alternating on/off in one "
                  f"process, median of {abl['rounds']} rounds after a warm-up round (the all-timesteps image KL: "
                  f"fewer). Same tiny model and settings as the full step.", "",
                  "| optimisation | on | off | time on | time off | on / off | peak rise on / off (MiB) | "
                  "same result | in the trainer |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
        for r in abl["rows"]:
            note = f" ({r['note']})" if r.get("note") else ""
            lines.append(f"| {r['optimisation']} | {r['on']} | {r['off']} | {fmt_ms(r['on_s'])} | "
                         f"{fmt_ms(r['off_s'])} | {fmt_n(r['on_over_off'], 2)} | {r['on_peak_rise_mib']:.1f} / "
                         f"{r['off_peak_rise_mib']:.1f} | {r['same_result']} | {r['in_rgpo']}{note} |")
    lines.append("")
    return "\n".join(lines)


# ================================================================================================ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(TINY_CONFIG), help="rgpo YAML config (default: configs/tiny.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="rgpo config override (repeatable)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny MindOmni on CPU in float32 (model.path=tiny), small sweeps: a few minutes on 2 cores")
    ap.add_argument("--mindomni-7b", action="store_true",
                    help="the GPU figures: a MindOmni-shaped model with random weights (Qwen2.5-VL-7B + OmniGen-v1 "
                         "sizes, model.path=random:mindomni-7b), bf16, LoRA r64, one group of G=4, 512 tokens per "
                         "chain, 512x512 images, 50 decoder steps, guidance 3, format + CLIP ViT-L/14-336 (random) "
                         "rewards: the full step and its bare pieces only (the bare pieces hold a second copy of "
                         f"the model: skipped below {BARE_7B_MIN_GIB} GiB of GPU memory)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per configuration (median; default 5; --mindomni-7b: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps, not measured (default 2; "
                    "--mindomni-7b: 1)")
    ap.add_argument("--scaling-steps", type=int, default=None,
                    help="measured steps per scaling point (default: 3 with --quick, else --steps)")
    ap.add_argument("--scaling-warmup", type=int, default=1, help="warm-up steps per scaling point (default 1)")
    ap.add_argument("--G", dest="g_values", default="2,4,8", help="group sizes to sweep")
    ap.add_argument("--decoder-steps", default=None, help="decoder steps to sweep (default: x0.5, x2 of the config)")
    ap.add_argument("--image-sizes", default=None, help="image sizes to sweep (default: x0.5, x2 of the config)")
    ap.add_argument("--lengths", default=None, help="completion lengths to sweep (default: x0.5, x2 of the config)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="alternating rounds of rgpo text-only / TRL runs, pooled (default 2)")
    ap.add_argument("--skip-trl", action="store_true", help="no TRL comparison (and no text-only rgpo run)")
    ap.add_argument("--skip-scaling", action="store_true", help="no scaling sweeps")
    ap.add_argument("--skip-bare", action="store_true", help="no bare-pieces / trainer-overhead measurement")
    ap.add_argument("--no-interleave", action="store_true",
                    help="no extra process with rgpo and TRL steps interleaved (the load-robust step-time ratio)")
    ap.add_argument("--skip-ablations", action="store_true", help="no optimisation on/off measurements")
    ap.add_argument("--skip-zero3", action="store_true", help="no ZeRO-3 gather-once vs per-forward measurement")
    ap.add_argument("--ablation-rounds", type=int, default=7,
                    help="alternating on/off rounds per optimisation (median; default 7)")
    ap.add_argument("--keep-eos", action="store_true",
                    help="let chains stop at EOS (default: EOS banned so every chain has max_new_tokens tokens)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every worker (default: 1 with --quick on CPU, else torch's default)")
    ap.add_argument("--out", default="bench_results", help="output folder for bench.md and bench.json")
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _ints(text: str | None, default: list[int]) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text else default


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        worker_main(*args._worker)
        return 0
    import torch

    from rgpo.config import load_config

    overrides = list(args.overrides)
    big = args.mindomni_7b
    args.steps = args.steps if args.steps is not None else (3 if big else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if big else 2)
    if big:
        if args.quick:
            raise SystemExit("--mindomni-7b and --quick are two different runs; pick one")
        args.config = str(REPO / "configs" / "mindomni_rgpo.yaml")
        overrides = [*MINDOMNI_7B_OVERRIDES, *overrides]  # later --set values win
        args.skip_trl = args.skip_scaling = args.skip_ablations = True
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0
        if not args.skip_bare and gpu_gib < BARE_7B_MIN_GIB:
            print(f"[bench] {gpu_gib:.0f} GiB of GPU memory: the bare pieces' second model copy needs about "
                  f"{BARE_7B_MIN_GIB} GiB beside the trainer's (estimated), so they are skipped",
                  file=sys.stderr)
            args.skip_bare = True
    if args.quick:
        args.config = str(TINY_CONFIG) if args.config == str(TINY_CONFIG) else args.config
        overrides = ["model.path=tiny", "model.dtype=float32", *overrides]
    threads = args.threads
    if threads is None and args.quick and not torch.cuda.is_available():
        threads = 1
    base = load_config(args.config, overrides)
    scaling_steps = args.scaling_steps if args.scaling_steps is not None else (3 if args.quick else args.steps)
    common = {"config": args.config, "ban_eos": not args.keep_eos}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {"command": command.strip()}
    t_all = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="rgpo-bench-") as tmp_:
        tmp = Path(tmp_)
        # 1. the full step (+ bare pieces on a plain copy of the model)
        main_case = {"kind": "rgpo", "label": "rgpo full step", "overrides": overrides, "warmup": args.warmup,
                     "steps": args.steps, "bare": not args.skip_bare}
        res = spawn([main_case], common, threads, tmp, "main")
        report["machine"] = res["machine"]
        report["memory_method"] = res["results"][0]["memory_method"]
        report["main"] = res["results"][0]

        # 2. rgpo text-only vs TRL, each in its own fresh process
        if not args.skip_trl and base.model.path not in (None, "", "tiny"):
            print("[bench] the TRL comparison runs on the tiny model only (model.path=tiny): skipped",
                  file=sys.stderr)
        elif not args.skip_trl:
            text_over = [*overrides, "rollout.image.enabled=false", "rewards.functions=[format]"]
            text_case = {"kind": "rgpo", "label": "rgpo text-only", "overrides": text_over,
                         "warmup": args.warmup, "steps": args.steps, "lora_without_lm_head": True,
                         "bare": not args.skip_bare}
            model_dir = tmp / "tiny-qwen2.5-vl"
            save_tiny_vlm(load_config(args.config, text_over), model_dir)
            trl_case = {"kind": "trl", "label": "TRL GRPOTrainer", "overrides": text_over,
                        "warmup": args.warmup, "steps": args.steps, "model_dir": str(model_dir)}
            # Alternate the two (rgpo, TRL, rgpo, TRL, ...) so a change in machine load hits both alike.
            rs, ts = [], []
            for i in range(max(1, args.repeats)):
                rs.append(spawn([text_case], common, threads, tmp, f"rgpo_text{i}")["results"][0])
                ts.append(spawn([trl_case], common, threads, tmp, f"trl{i}")["results"][0])
            report["comparison"] = {"rgpo": pool(rs), "trl": pool(ts), "rounds": len(rs)}
            if not args.no_interleave:
                steps_i = args.steps * max(1, args.repeats)
                inter = {**trl_case, "label": "TRL GRPOTrainer + rgpo text-only, interleaved", "steps": steps_i,
                         "interleave": {**text_case, "bare": False, "steps": steps_i}}
                res_i = spawn([inter], common, threads, tmp, "interleaved")["results"][0]
                report["comparison"]["interleaved"] = {"rgpo": res_i["interleaved_rgpo"], "trl": res_i}

        # 3. each optimisation on vs off (one process, alternating)
        if not args.skip_ablations:
            abl = {"kind": "ablations", "label": "optimisations on vs off", "overrides": overrides,
                   "rounds": args.ablation_rounds, "zero3": not args.skip_zero3}
            report["ablations"] = spawn([abl], common, threads, tmp, "ablations")["results"][0]

        # 4. scaling sweeps: one process per axis, its points (the baseline included) measured round-robin
        if not args.skip_scaling:
            G0 = base.rollout.num_generations
            prompts = base.rollout.batch_size // G0
            img = base.rollout.image
            axes = [
                ("G", [g for g in _ints(args.g_values, [2, 4, 8]) if g != G0],
                 lambda g: [f"rollout.num_generations={g}", f"rollout.batch_size={g * prompts}",
                            f"optim.micro_batch_size={min(base.optim.micro_batch_size, g * prompts)}"]),
                ("decoder steps", [s for s in _ints(args.decoder_steps, [max(1, img.steps // 2), img.steps * 2])
                                   if s != img.steps], lambda s: [f"rollout.image.steps={s}"]),
                ("image size", [s for s in _ints(args.image_sizes, [img.height // 2, img.height * 2])
                                if s != img.height], lambda s: [f"rollout.image.height={s}", f"rollout.image.width={s}"]),
                ("completion length", [n for n in _ints(args.lengths, [max(1, base.rollout.max_new_tokens // 2),
                                                                       base.rollout.max_new_tokens * 2])
                                       if n != base.rollout.max_new_tokens],
                 lambda n: [f"rollout.max_new_tokens={n}"]),
            ]
            baseline_values = {"G": G0, "decoder steps": img.steps, "image size": img.height,
                               "completion length": base.rollout.max_new_tokens}
            rows = []
            for axis, values, make in axes:
                if not values:
                    continue
                v0 = baseline_values[axis]
                points = sorted([*values, v0])
                sweep = {"kind": "sweep", "label": f"scaling {axis}", "warmup": args.scaling_warmup,
                         "steps": scaling_steps,
                         "points": [{"label": f"{axis}={v}", "overrides": [*overrides, *(make(v) if v != v0 else [])]}
                                    for v in points]}
                res = spawn([sweep], common, threads, tmp, f"scaling_{axis.replace(' ', '_')}")["results"][0]
                for v, r in zip(points, res["points"]):
                    rows.append({**r, "axis": axis, "value": f"{v} (baseline)" if v == v0 else v})
            report["scaling"] = rows

    report["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["total_wall_s"] = time.perf_counter() - t_all
    markdown = render(report)
    (out / "bench.md").write_text(markdown)
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    print(markdown)
    print(f"[bench] wrote {out / 'bench.md'} and {out / 'bench.json'} in {report['total_wall_s']:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
