"""``python -m benchmarks``: parse the flags, run each benchmark's workers, write ``bench.md`` / ``bench.json``.
``--_worker SPEC OUT`` is the worker subprocess each measured configuration runs in."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ablations, floor, harness, rgpo_step, scaling, trl_compare
from .harness import REPO, TINY_CONFIG, log

# Workers: the runner of each case kind.
RUNNERS = {m.KIND: m.run for m in (rgpo_step, trl_compare, scaling, ablations, floor)}
RUNNERS[floor.LEVERS_KIND] = floor.run_levers
# The report's sections, in order (the overhead table comes with the rgpo step's).
SECTIONS = [rgpo_step.report_lines, scaling.report_lines, trl_compare.report_lines, ablations.report_lines]

# --mindomni-7b: configs/mindomni_rgpo.yaml (bf16, LoRA r64/alpha128/dropout 0.05, gradient checkpointing, ZeRO-2,
# 512x512, 50 steps, guidance 3) on one GPU with random weights of the released sizes.
# Estimated from the sizes: the 7B step allocates ~40 GiB at its peak and the bare pieces add a second model with
# its LoRA state (~25 GiB), too close to an 80 GB card's limit once the caching allocator's slack and the CUDA
# context are counted.
BARE_7B_MIN_GIB = 100
PRESET_7B_CONFIG = REPO / "configs" / "mindomni_rgpo.yaml"
PRESET_7B_OVERRIDES = [
    "model.path=random:mindomni-7b",
    f"data.train_file={REPO / 'configs' / 'prompts' / 'sample.jsonl'}",
    "data.eval_file=null",
    "rollout.num_generations=4",
    "rollout.batch_size=4",
    "optim.micro_batch_size=4",
    "rollout.max_new_tokens=512",
    "rewards.functions=[format, {name: clip_consistency, kwargs: {model_name: ViT-L-14-336, text_column: gt_prompt}}]",
]


@dataclass
class Context:
    """What every benchmark's ``plan`` gets: the flags, the config overrides, the base config, the workers'
    common spec and threads, the temporary folder, and the report it adds to."""

    args: argparse.Namespace
    overrides: list[str]
    base: Any
    common: dict[str, Any]
    threads: int | None
    tmp: Path
    scaling_steps: int
    report: dict[str, Any]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description="Benchmarks for rgpo, side by side with "
                                 "TRL's GRPOTrainer (see benchmarks/__init__.py).")
    ap.add_argument("--config", default=str(TINY_CONFIG), help="rgpo YAML config (default: configs/tiny.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="rgpo config override (repeatable)")
    ap.add_argument("--quick", action="store_true",
                    help="the tiny model on CPU in float32 (model.path=tiny), small sweeps: a few minutes on 2 cores")
    ap.add_argument("--mindomni-7b", action="store_true",
                    help="the GPU figures: configs/mindomni_rgpo.yaml with random weights of the released sizes "
                         "(model.path=random:mindomni-7b), bf16, LoRA r64, one group of G=4, 512 tokens per "
                         "chain, 512x512 images, 50 decoder steps, guidance 3, format + CLIP ViT-L/14-336 (random) "
                         "rewards: the full step and its bare pieces only (the bare pieces hold a second copy of "
                         f"the model: skipped below {BARE_7B_MIN_GIB} GiB of GPU memory)")
    ap.add_argument("--steps", type=int, default=None,
                    help="measured steps per configuration (median; default 5; --mindomni-7b: 3)")
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["floor"]:  # python -m benchmarks floor: each phase against its floor (benchmarks/floor.py)
        return floor.main(argv[1:])
    args = parse_args(argv)
    if args._worker:
        harness.worker_main(*args._worker, RUNNERS)
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
        args.config = str(PRESET_7B_CONFIG)
        overrides = [*PRESET_7B_OVERRIDES, *overrides]  # later --set values win
        args.skip_trl = args.skip_scaling = args.skip_ablations = True
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0
        if not args.skip_bare and gpu_gib < BARE_7B_MIN_GIB:
            log(f"{gpu_gib:.0f} GiB of GPU memory: the bare pieces' second model copy needs about "
                f"{BARE_7B_MIN_GIB} GiB beside the trainer's (estimated), so they are skipped")
            args.skip_bare = True
    if args.quick:
        overrides = ["model.path=tiny", "model.dtype=float32", *overrides]
    threads = args.threads
    if threads is None and args.quick and not torch.cuda.is_available():
        threads = 1
    base = load_config(args.config, overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks " + " ".join(argv)
    report: dict[str, Any] = {"command": command.strip()}
    t_all = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="rgpo-bench-") as tmp:
        ctx = Context(args=args, overrides=overrides, base=base,
                      common={"config": args.config, "ban_eos": not args.keep_eos}, threads=threads, tmp=Path(tmp),
                      scaling_steps=args.scaling_steps if args.scaling_steps is not None else (
                          3 if args.quick else args.steps),
                      report=report)
        rgpo_step.plan(ctx)  # 1. the full step (+ bare pieces on a plain copy of the model)
        if not args.skip_trl:  # 2. rgpo text-only vs TRL, each in its own fresh process
            trl_compare.plan(ctx)
        if not args.skip_ablations:  # 3. each optimisation on vs off (one process, alternating)
            ablations.plan(ctx)
        if not args.skip_scaling:  # 4. scaling sweeps: one process per axis, its points measured round-robin
            scaling.plan(ctx)

    report["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["total_wall_s"] = time.perf_counter() - t_all
    markdown = harness.write_report(report, out, SECTIONS)
    print(markdown)
    log(f"wrote {out / 'bench.md'} and {out / 'bench.json'} in {report['total_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
