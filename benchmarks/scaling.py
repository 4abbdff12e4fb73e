"""Scaling of the step with G, decoder steps, image size and completion length: one process per varied quantity,
a trainer per value (the baseline included), their steps taken round-robin so the values are compared under the
same machine load."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any

from .harness import (
    MEMORY_STEPS,
    build_rgpo,
    fmt_ms,
    fmt_s,
    measure_step,
    memory,
    phase_timer_class,
    rgpo_config,
    spawn,
    summarise,
)

KIND = "sweep"


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """One scaling axis: a trainer per point (the baseline included), built side by side in this process, then
    their measured steps taken round-robin (point 1, point 2, ..., point 1, ...), so that a change of machine load
    hits every point alike and the ratios between points are meaningful."""
    timer_cls = phase_timer_class()
    results = []
    with tempfile.TemporaryDirectory(prefix="rgpo-bench-") as tmp:
        trainers = []
        for j, point in enumerate(spec["points"]):
            point_spec = {**spec, "overrides": point["overrides"]}
            trainers.append(build_rgpo(point_spec, rgpo_config(point_spec, str(Path(tmp) / f"run{j}")), timer_cls))
        gc.collect()
        base_rss = memory().current()
        steps: list[list[dict[str, Any]]] = [[] for _ in trainers]
        for trainer, record in zip(trainers, steps):
            for _ in range(spec["warmup"]):
                record.append(measure_step(trainer, timer_cls, True, base_rss))
        for _ in range(spec["steps"]):
            for trainer, record in zip(trainers, steps):
                record.append(measure_step(trainer, timer_cls, False, base_rss))
        for _ in range(spec.get("memory_steps", MEMORY_STEPS)):
            for trainer, record in zip(trainers, steps):
                record.append(measure_step(trainer, timer_cls, False, base_rss, phase_memory=True))
        for point, trainer, record in zip(spec["points"], trainers, steps):
            result = summarise(record)
            result.update({"label": point["label"], "kind": "rgpo", "overrides": point["overrides"]})
            results.append(result)
            trainer.close()
    return {"label": spec["label"], "kind": KIND, "points": results}


def _ints(text: str | None, default: list[int]) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text else default


def plan(ctx) -> None:
    """The four axes, each in its own worker, their points (the baseline included) measured round-robin."""
    args, base, overrides = ctx.args, ctx.base, ctx.overrides
    G0 = base.rollout.num_generations
    prompts = base.rollout.batch_size // G0
    img = base.rollout.image
    length = base.rollout.max_new_tokens
    axes = [
        ("G", [g for g in _ints(args.g_values, [2, 4, 8]) if g != G0],
         lambda g: [f"rollout.num_generations={g}", f"rollout.batch_size={g * prompts}",
                    f"optim.micro_batch_size={min(base.optim.micro_batch_size, g * prompts)}"]),
        ("decoder steps", [s for s in _ints(args.decoder_steps, [max(1, img.steps // 2), img.steps * 2])
                           if s != img.steps], lambda s: [f"rollout.image.steps={s}"]),
        ("image size", [s for s in _ints(args.image_sizes, [img.height // 2, img.height * 2]) if s != img.height],
         lambda s: [f"rollout.image.height={s}", f"rollout.image.width={s}"]),
        ("completion length", [n for n in _ints(args.lengths, [max(1, length // 2), length * 2]) if n != length],
         lambda n: [f"rollout.max_new_tokens={n}"]),
    ]
    baseline_values = {"G": G0, "decoder steps": img.steps, "image size": img.height, "completion length": length}
    rows = []
    for axis, values, make in axes:
        if not values:
            continue
        v0 = baseline_values[axis]
        points = sorted([*values, v0])
        sweep = {"kind": KIND, "label": f"scaling {axis}", "warmup": args.scaling_warmup, "steps": ctx.scaling_steps,
                 "points": [{"label": f"{axis}={v}", "overrides": [*overrides, *(make(v) if v != v0 else [])]}
                            for v in points]}
        res = spawn([sweep], ctx.common, ctx.threads, ctx.tmp, f"scaling_{axis.replace(' ', '_')}")["results"][0]
        for v, r in zip(points, res["points"]):
            rows.append({**r, "axis": axis, "value": f"{v} (baseline)" if v == v0 else v})
    ctx.report["scaling"] = rows


def report_lines(report: dict[str, Any]) -> list[str]:
    scaling = report.get("scaling") or []
    if not scaling:
        return []
    lines = ["", "## Scaling of the step", "",
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
    return lines
