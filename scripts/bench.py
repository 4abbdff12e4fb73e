#!/usr/bin/env python
"""Benchmark harness for rgpo, side by side with TRL's ``GRPOTrainer``.

One command measures, per phase and for the whole step, the time (median over the measured steps, after
warm-up steps), the throughput (chains/s, images/s, generated tokens/s) and the peak memory, then writes a
markdown report and a JSON file under ``--out``:

1. **rgpo, full step** (reason then draw): rollout text, rollout forward (policy + reference), the reference
   pass on its own, rollout images, rewards, advantages, update (and the reference decoder run inside the
   update's image KL).
2. **Scaling** of the step with G, decoder steps, image size and completion length.
3. **rgpo vs TRL**: a text-only rgpo step (``rollout.image.enabled=false``, format reward only) against
   ``trl.GRPOTrainer`` on the SAME tiny Qwen2.5-VL (same weights, saved to a temporary folder so TRL loads it
   by path), same prompts and chat template, G, prompts per step, micro-batch, completion length, beta, loss
   aggregation (``grpo``), LoRA (r / alpha / dropout / target modules), ``num_iterations=1``, temperature 1.
4. **Trainer overhead**: the rgpo step minus the same work done by bare model calls (``generate``, the no-grad
   policy/reference forwards, ``sample_latents`` + ``decode_latents``, and forward/backward/AdamW of the update)
   on a plain (non-DeepSpeed) copy of the same model.

Every measured configuration runs in its own subprocess, one after the other (never in parallel), so memory
numbers start from a clean process and one run's allocator state does not leak into the next one.

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
            self._fold()
            MEM.reset()
            self.stack.append(phase)
            try:
                with PhaseTimer.__call__(self, phase):
                    yield
            finally:
                self._fold()
                self.stack.pop()
                MEM.reset()

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


def _ban_eos(model) -> None:
    model.banned_token_ids = sorted(set(model.banned_token_ids) | set(model.eos_token_ids))


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


def run_rgpo(spec: dict[str, Any]) -> dict[str, Any]:
    """Build an RGPOTrainer and time ``warmup + steps`` calls of ``train_step()``."""
    import torch

    timer_cls = _install_phase_timer()
    from rgpo.trainer import RGPOTrainer

    with tempfile.TemporaryDirectory(prefix="rgpo-bench-") as tmp:
        cfg = _rgpo_config(spec, str(Path(tmp) / "run"))
        gc.collect()
        base_rss = MEM.current()
        t0 = time.perf_counter()
        model = None
        if spec.get("lora_without_lm_head"):
            # TRL refuses a LoRA on lm_head (it reads lm_head.weight directly), so for the side-by-side run
            # rgpo's LoRA gets the same targets as TRL's: every language-model Linear except lm_head.
            from rgpo.trainer import build_model

            model = build_model(cfg)
            targets = [t for t in model.language_model_lora_targets() if t != "lm_head"]
            model.language_model_lora_targets = lambda: targets
        trainer = RGPOTrainer(cfg, model=model)
        build_s = time.perf_counter() - t0
        if spec.get("ban_eos", True):
            _ban_eos(trainer.model)
        _charge_reference(trainer, timer_cls)
        built_rss = MEM.current()
        trainable_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        steps = []
        for i in range(spec["warmup"] + spec["steps"]):
            gc.collect()
            MEM.reset()
            start_mem = MEM.current()
            t = time.perf_counter()
            metrics = trainer.train_step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_s = time.perf_counter() - t
            peak = MEM.peak()
            timer = timer_cls.current
            peak = max([peak, *timer.peaks.values()])
            rollout = trainer._last_rollout
            tokens = int(rollout.completions.completion_mask.sum())
            steps.append({
                "warmup": i < spec["warmup"],
                "step_s": step_s,
                "phases_s": dict(timer.seconds),
                "phase_peak_mib": {k: mib(v - start_mem) for k, v in timer.peaks.items()},
                "peak_mib": mib(peak),
                "transient_mib": mib(peak - start_mem),
                "footprint_mib": mib(peak - base_rss),
                "tokens": tokens,
                "chains": len(rollout.rows),
                "images": sum(im is not None for im in rollout.images),
                "completion_len": float(metrics.get("completion/mean_length", float("nan"))),
                "reported_chains_per_s": float(metrics.get("throughput/chains_per_s", float("nan"))),
            })
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
        if spec.get("bare"):
            result["bare"] = run_bare(spec, cfg)
    return result


def _summarise(steps: list[dict[str, Any]]) -> dict[str, Any]:
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
        "step_s": step_s,
        "step_s_min": min(s["step_s"] for s in measured),
        "step_s_max": max(s["step_s"] for s in measured),
        "phase_s": phase_s,
        "phase_peak_mib": {k: max(s["phase_peak_mib"].get(k, 0.0) for s in measured) for k in phases},
        "peak_mib": max(s["peak_mib"] for s in measured),
        "transient_mib": max(s["transient_mib"] for s in measured),
        "footprint_mib": max(s["footprint_mib"] for s in measured),
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
def run_bare(spec: dict[str, Any], cfg) -> dict[str, Any]:
    """The same work as one rgpo step, as bare model calls on a plain (non-DeepSpeed) copy of the model."""
    import torch

    from rgpo.data import load_prompts
    from rgpo.losses import feature_kl, policy_loss, velocity_mse
    from rgpo.models.base import ImageSamplingConfig
    from rgpo.trainer import IMAGE_KL_GRID, apply_trainable, build_model, trim_left_padding

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = apply_trainable(build_model(cfg), cfg).to(device)
    if spec.get("ban_eos", True):
        _ban_eos(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.adam_betas),
                            weight_decay=cfg.optim.weight_decay, eps=cfg.optim.adam_eps)
    rows = load_prompts(cfg.data.train_file)
    G = cfg.rollout.num_generations
    P = cfg.rollout.batch_size // G
    mb = cfg.optim.micro_batch_size
    lc = cfg.loss
    images_on = cfg.rollout.image.enabled
    image_term = images_on and lc.image_regularizer != "none" and lc.image_kl_coef > 0
    icfg = ImageSamplingConfig(**{k: getattr(cfg.rollout.image, k) for k in (
        "height", "width", "steps", "guidance_scale", "seed", "shared_noise")})
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def clock(record: dict[str, float], key: str):
        sync()
        t = time.perf_counter()
        yield
        sync()
        record[key] = time.perf_counter() - t

    def image_kl(out, ref_cond, ref_mask, gen_seed: int):
        """The trainer's image regulariser: connector + one decoder evaluation, policy (grad) vs reference."""
        K = lc.image_kl_timesteps
        g = torch.Generator().manual_seed(gen_seed)
        rows_ = out.condition.shape[0] * K
        shape = (model.decoder.config.in_channels, icfg.height // 8, icfg.width // 8)
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

    iters = []
    for it in range(spec["warmup"] + spec["steps"]):
        chosen = [rows[(it * P + j) % len(rows)].as_model_row() for j in range(P)]
        gen = torch.Generator().manual_seed(1000 + it)
        rec: dict[str, float] = {"images_s": 0.0}
        model.eval()
        with clock(rec, "generate_s"), torch.no_grad():
            prompts = model.build_prompts(chosen).to(device)
            comps = model.generate(prompts, num_generations=G, max_new_tokens=cfg.rollout.max_new_tokens,
                                   temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                   top_k=cfg.rollout.top_k, generator=gen).to(device)
            prompts = prompts.repeat_interleave(G)
        n = comps.completion_ids.shape[0]
        with clock(rec, "forward_nograd_s"), torch.no_grad():
            pol = model.forward_text(prompts, comps, with_condition=images_on)
            ref = None
            if lc.beta > 0 or image_term:
                with model.adapter_disabled():
                    ref = model.forward_text(prompts, comps, with_condition=image_term)
        if images_on:
            with clock(rec, "images_s"), torch.no_grad():
                cond = model.connect(pol.condition, pol.condition_mask)
                neg = neg_mask = None
                if icfg.guidance_scale != 1.0:
                    neg_states, neg_mask = model.negative_condition(n)
                    neg = model.connect(neg_states, neg_mask)
                noise = model.initial_noise(n, G, icfg).to(model.dtype)
                latents = model.sample_latents(cond, pol.condition_mask, neg, neg_mask, noise, icfg)
                model.decode_latents(latents)
        advantages = torch.randn(n, device=device)
        with clock(rec, "update_s"):
            model.train()
            for start in range(0, n, mb):
                idx = list(range(start, min(n, start + mb)))
                index = torch.tensor(idx, device=device)
                p, c = prompts.select(idx), comps.select(idx)
                out = model.forward_text(p, c, with_condition=image_term)
                loss, _ = policy_loss(out.logps, out.logps.detach(), ref.logps[index] if ref is not None else None,
                                      advantages[index], c.completion_mask, epsilon_low=lc.epsilon_low,
                                      epsilon_high=lc.epsilon_high, beta=lc.beta, kl_estimator=lc.kl_estimator,
                                      aggregation=lc.aggregation)
                if image_term:
                    ref_cond, ref_mask = trim_left_padding(ref.condition[index], ref.condition_mask[index])
                    loss = loss + lc.image_kl_coef * image_kl(out, ref_cond, ref_mask, it * 7919 + start)
                (loss * len(idx) / n).backward()
            if cfg.optim.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        rec["total_s"] = rec["generate_s"] + rec["forward_nograd_s"] + rec["images_s"] + rec["update_s"]
        iters.append({"warmup": it < spec["warmup"], **rec})
    measured = [x for x in iters if not x["warmup"]] or iters
    keys = ("generate_s", "forward_nograd_s", "images_s", "update_s", "total_s")
    return {"median": {k: median([x[k] for x in measured]) for k in keys}, "iterations": iters}


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

        class StepClock(TrainerCallback):
            def __init__(self):
                self.t_begin = self.t_end = None
                self.start_mem = 0

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
                    "cycle_s": now - self.t_end - self.gc_s if self.t_end is not None else float("nan"),
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
        return {
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
    from rgpo.models.tiny import build_tiny_mindomni

    tiny = build_tiny_mindomni(seed=cfg.seed, dtype=torch.float32)
    tiny.vlm.save_pretrained(path)
    tiny.processor.save_pretrained(path)
    vocab = tiny.tokenizer.get_vocab()
    batch = tiny.build_prompts([r.as_model_row() for r in load_prompts(cfg.data.train_file)])
    meta = {
        "lora_targets": [t for t in tiny.language_model_lora_targets() if t != "lm_head"],  # TRL: none on lm_head
        "suppressed_token_ids": sorted({vocab[t] for t in (*EOS_TOKENS, *BANNED_TOKENS) if t in vocab}),
        "rgpo_prompt_ids": [ids[m.bool()].tolist() for ids, m in zip(batch.input_ids, batch.attention_mask)],
    }
    (path / "bench_meta.json").write_text(json.dumps(meta))


# ================================================================================================ worker entry
def worker_main(spec_file: str, out_file: str) -> None:
    global MEM
    import torch

    spec = json.loads(Path(spec_file).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    MEM = PeakMemory(device)
    results = []
    for case in spec["cases"]:
        case = {**spec["common"], **case}
        print(f"[bench] {case['label']} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        result = run_trl(case) if case["kind"] == "trl" else run_rgpo(case)
        result["wall_s"] = time.perf_counter() - t
        result["memory_method"] = MEM.method
        results.append(result)
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
    out["rounds"] = len(results)
    return out


# ================================================================================================ report
def fmt_s(x: float) -> str:
    if x != x:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def fmt_n(x: float, digits: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


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
                  f"{main['steps_warmup']} warm-up.", "",
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
        bare = main.get("bare")
        if bare:
            b = bare["median"]
            overhead = main["step_s"] - b["total_s"]
            report["overhead"] = {"step_s": main["step_s"], "bare_s": b["total_s"], "overhead_s": overhead,
                                  "overhead_pct": 100 * overhead / main["step_s"]}
            lines += ["", "## Trainer overhead (rgpo step vs the same work as bare model calls)", "",
                      "| piece | bare | in the trainer |", "| --- | ---: | ---: |",
                      f"| generate (`build_prompts` + `model.generate`) | {fmt_s(b['generate_s'])} | "
                      f"{fmt_s(main['phase_s'].get('rollout/text', float('nan')))} |",
                      f"| no-grad forwards (policy + reference `forward_text`) | {fmt_s(b['forward_nograd_s'])} | "
                      f"{fmt_s(main['phase_s'].get('rollout/forward', float('nan')))} |",
                      f"| images (`connect` + `sample_latents` + `decode_latents`) | {fmt_s(b['images_s'])} | "
                      f"{fmt_s(main['phase_s'].get('rollout/images', float('nan')))} |",
                      f"| update (forward_text + image KL + backward + AdamW) | {fmt_s(b['update_s'])} | "
                      f"{fmt_s(main['phase_s'].get('update', float('nan')))} |",
                      f"| **total** | **{fmt_s(b['total_s'])}** | **{fmt_s(main['step_s'])}** |", "",
                      f"Trainer overhead: {fmt_s(overhead)} = **{100 * overhead / main['step_s']:.1f} %** of the "
                      "step (bare pieces run on a plain, non-DeepSpeed copy of the same model with torch AdamW)."]
    scaling = report.get("scaling") or []
    if scaling:
        lines += ["", "## Scaling of the step", "",
                  "| varied | value | chains | step | rollout/text | rollout/images | update | chains/s | "
                  "tokens/s | peak rise (MiB) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in scaling:
            p = r["phase_s"]
            lines.append(f"| {r['axis']} | {r['value']} | {r['chains_per_step']} | {fmt_s(r['step_s'])} | "
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
        rows_ = [
            ("step (median)", r["step_s"], t["step_s"], True),
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
    ap.add_argument("--steps", type=int, default=5, help="measured steps per configuration (median; default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps, not measured (default 2)")
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
                         "warmup": args.warmup, "steps": args.steps, "lora_without_lm_head": True}
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

        # 3. scaling sweeps (one process; the baseline is the main run)
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
            cases, meta = [], []
            for axis, values, make in axes:
                for v in values:
                    cases.append({"kind": "rgpo", "label": f"scaling {axis}={v}", "overrides": [*overrides, *make(v)],
                                  "warmup": args.scaling_warmup, "steps": scaling_steps})
                    meta.append((axis, v))
            res = spawn(cases, common, threads, tmp, "scaling")["results"] if cases else []
            m = report["main"]
            baseline_values = {"G": G0, "decoder steps": img.steps, "image size": img.height,
                               "completion length": base.rollout.max_new_tokens}
            rows = [{**r, "axis": axis, "value": v} for r, (axis, v) in zip(res, meta)]
            for axis, v0 in baseline_values.items():
                rows.append({**{k: m[k] for k in ("step_s", "phase_s", "throughput", "chains_per_step",
                                                   "transient_mib")}, "axis": axis, "value": f"{v0} (main)",
                             "sort": v0})
            order = {a: i for i, a in enumerate(baseline_values)}
            rows.sort(key=lambda r: (order[r["axis"]], r.get("sort", r["value"])))
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
