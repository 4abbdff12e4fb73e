"""The rgpo step, phase by phase (reason then draw): rollout text, rollout forward (policy + reference), the
reference forward on its own (the trainer's ``rollout/reference`` phase), rollout images, rewards, advantages,
update; with the bare pieces of :mod:`benchmarks.bare_pieces` after each step when asked."""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from . import bare_pieces
from .harness import (
    MEMORY_STEPS,
    build_rgpo,
    fmt_n,
    fmt_s,
    measure_step,
    memory,
    mib,
    phase_timer_class,
    rgpo_config,
    spawn,
    summarise,
    sync,
)

KIND = "rgpo"


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Build an RGPOTrainer and time ``warmup + steps`` calls of ``train_step()`` (then the memory steps)."""
    timer_cls = phase_timer_class()
    mem = memory()
    with tempfile.TemporaryDirectory(prefix="rgpo-bench-") as tmp:
        cfg = rgpo_config(spec, str(Path(tmp) / "run"))
        # The bare pieces run right after each trainer step (same process, same machine load), on their own
        # plain copy of the model, built before the "process before the trainer" memory baseline.
        bare = bare_pieces.BarePieces(spec, cfg) if spec.get("bare") else None
        gc.collect()
        base_rss = mem.current()
        sync()  # CUDA started before the clock (the bare pieces may have started it already)
        t0 = time.perf_counter()
        trainer = build_rgpo(spec, cfg, timer_cls)
        sync()  # random initialisation runs queued kernels
        build_s = time.perf_counter() - t0
        built_rss = mem.current()
        trainable_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        steps = []
        for i in range(spec["warmup"] + spec["steps"]):
            steps.append(measure_step(trainer, timer_cls, i < spec["warmup"], base_rss))
            if bare is not None:
                mem.reset()  # as before the trainer step: one peak reset before each
                bare.iteration(i, trainer._last_rollout.rows)
        for _ in range(spec.get("memory_steps", MEMORY_STEPS)):
            steps.append(measure_step(trainer, timer_cls, False, base_rss, phase_memory=True))
        result = summarise(steps)
        result.update({
            "label": spec["label"],
            "kind": KIND,
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


def plan(ctx) -> None:
    """The full step (+ bare pieces on a plain copy of the model), in its own worker."""
    args = ctx.args
    case = {"kind": KIND, "label": "rgpo full step", "overrides": ctx.overrides, "warmup": args.warmup,
            "steps": args.steps, "bare": not args.skip_bare}
    res = spawn([case], ctx.common, ctx.threads, ctx.tmp, "main")
    ctx.report["machine"] = res["machine"]
    ctx.report["memory_method"] = res["results"][0]["memory_method"]
    ctx.report["main"] = res["results"][0]


PHASE_ORDER = ["rollout", "rollout/text", "rollout/forward", "rollout/policy_forward", "rollout/reference",
               "rollout/images", "rewards", "advantages", "update", "update/reference", "other"]


def report_lines(report: dict[str, Any]) -> list[str]:
    main = report.get("main")
    if not main:
        return []
    c = main["config"]
    lines = ["", f"## rgpo step, phase by phase ({main['label']})", "",
             f"G={c['G']}, {c['prompts_per_step']} prompts/step ({c['batch_chains']} chains), micro-batch "
             f"{c['micro_batch']}, {c['max_new_tokens']} tokens/chain (EOS banned), images "
             f"{c['image_size']} x {c['decoder_steps']} steps (guidance {c['guidance']}), beta {c['beta']}, "
             f"LoRA r/alpha/dropout {c['lora']}, {c['dtype']}; {main['steps_measured']} steps measured after "
             f"{main['steps_warmup']} warm-up. Per-phase peak memory comes from {main.get('memory_steps', 0)} "
             "further steps that reset the peak at every phase boundary (their time is not used: on a CPU "
             "each reset slows the allocations after it); the timed steps read one peak per step.", "",
             "| phase | median time | share of step | peak memory rise in phase (MiB) |",
             "| --- | ---: | ---: | ---: |"]
    for k in PHASE_ORDER:
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
    lines += bare_pieces.report_lines(report)
    return lines
