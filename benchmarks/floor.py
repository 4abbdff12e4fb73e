"""How far each phase of an rgpo step is from its floor on this machine: ``python -m benchmarks floor``.

For each model shape (``--shapes``, default the tiny model and the ~135 M-parameter ``random:mid``), one worker
process:

1. measures the machine's peaks: a GEMM probe (FLOP/s of a square matmul in the run's dtype) and a memory-bandwidth
   probe (bytes/s of a reduction over a buffer far larger than the caches), best of several runs;
2. times ``train_step()`` phase by phase through the trainer's ``timer_factory`` hook (warm-up steps, then the
   median of ``--steps``), and the prompts' prefill alone (``generate`` of one token) right after each step: decode
   is the rollout's text phase minus that prefill;
3. counts each phase's work from the model's shapes (:mod:`benchmarks.costmodel`) and reports ``time / floor``,
   the floor being ``max(FLOPs / GEMM peak, bytes / bandwidth peak)``;
4. compares the compiled static-cache decode (``rollout.compiled_decode``, :mod:`rgpo.models.static_decode`) with
   the eager loop on the same prompts, alternating, compile time apart.

Then (``--skip-levers`` to leave out) the image-cost levers on the toy world's model: each lever's step time and
image phases, measured round-robin in one process. ``--toy-world`` also trains the toy world once per lever
(``rgpo demo``, ``--toy-steps`` steps) and reads its held-out figures; that takes minutes per lever.

Writes ``floor.md`` and ``floor.json`` under ``--out``. On a CUDA device the same command prints the same tables
(the probes run in bf16 / the run's dtype on the GPU; the decode step is captured as a CUDA graph).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import costmodel
from .harness import (
    REPO,
    TINY_CONFIG,
    alternate,
    build_rgpo,
    fmt_ms,
    log,
    machine_info,
    measure_step,
    median,
    memory,
    phase_timer_class,
    rgpo_config,
    spawn,
    sync,
)

KIND = "floor"
LEVERS_KIND = "floor_levers"
TOY_CONFIG = REPO / "configs" / "toy_world.yaml"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# The per-shape run: one group of G=4 chains of 24 tokens (EOS banned: every chain full length), 64x64 images,
# 4 Euler steps with guidance 3, LoRA r 8, format rewards (no model: their floor is not counted).
SHAPE_OVERRIDES = [
    "rollout.num_generations=4", "rollout.batch_size=4", "optim.micro_batch_size=4", "rollout.max_new_tokens=24",
    "model.dtype=float32",
]

# The image-cost levers: (name, what it changes, overrides). The image-PG rows compare with "image PG, every step
# stochastic"; the others with the toy world's own RGPO run (8 Euler steps, CFG-free).
IMAGE_PG = ["rollout.image.images_per_chain=2", "rollout.image.noise_level=0.7", "loss.image_pg_coef=1.0",
            "trainable.generator_lora_r=8"]
LEVERS: list[tuple[str, str, list[str]]] = [
    ("base", "toy world as configured: 8 Euler steps, guidance 1 (CFG-free), text RL", []),
    ("steps4", "rollout 4 decoder steps, evaluation 8 (`rollout.image.steps=4 eval_steps=8`)",
     ["rollout.image.steps=4", "rollout.image.eval_steps=8"]),
    ("cfg3", "rollouts WITH guidance 3 (the CFG-free base is the lever; evaluation stays unguided)",
     ["rollout.image.guidance_scale=3.0"]),
    ("pg_full", "image PG (M=2, SDE a=0.7, generator LoRA r 8), every step stochastic", IMAGE_PG),
    ("pg_w2", "image PG with `sde_window=2`", [*IMAGE_PG, "rollout.image.sde_window=2"]),
    ("pg_w2_cache", "image PG, `sde_window=2`, condition KV cache kept (`pg_condition_cache=true`)",
     [*IMAGE_PG, "rollout.image.sde_window=2", "rollout.image.pg_condition_cache=true"]),
]
LEVER_COST_OVERRIDES = ["rollout.batch_size=16", "optim.micro_batch_size=16", "logging.mode=disabled"]


# ================================================================================================ probes
def probe_peaks(device: str, dtype_name: str, repeats: int = 5) -> dict[str, float]:
    """The machine's own peaks: GEMM FLOP/s (square matmul, ``2 n^3`` FLOPs) in ``dtype_name`` and read bandwidth
    (a sum over a buffer of 256 MiB on a CPU, 2 GiB on a GPU: far past the caches), each the best of ``repeats``."""
    import torch

    dtype = getattr(torch, dtype_name)
    cuda = device.startswith("cuda")
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync_fn = torch.cuda.synchronize if cuda else (lambda: None)

    def best(fn) -> float:
        fn()
        sync_fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync_fn()
            times.append(time.perf_counter() - t)
        return min(times)

    gemm_s = best(lambda: torch.mm(a, b))
    a = b = None  # freed before the bandwidth buffer
    numel = (2 << 30 if cuda else 256 << 20) // 4
    buf = torch.ones(numel, device=device, dtype=torch.float32)
    read_s = best(lambda: buf.sum())
    return {"gemm_flops_per_s": 2 * n**3 / gemm_s, "gemm_n": n, "read_bytes_per_s": numel * 4 / read_s,
            "read_mib": numel * 4 / 2**20}


# ================================================================================================ the model's shapes
def model_shapes(model) -> tuple[costmodel.TransformerShape, costmodel.ImageShape]:
    """The language model and image side of a MindOmni as :mod:`benchmarks.costmodel` shapes."""
    if model.family != "mindomni":
        raise ValueError(f"the floor benchmark counts MindOmni's shapes; family {model.family!r} is not counted")
    hf = model.hf_vlm()
    tc = hf.model.language_model.config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    lm = costmodel.TransformerShape(tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads,
                                    tc.num_key_value_heads, head_dim, tc.intermediate_size, hf.lm_head.out_features)
    dc = model.decoder.config
    dec = costmodel.TransformerShape(dc.hidden_size, dc.num_layers, dc.num_attention_heads, dc.num_key_value_heads,
                                     dc.hidden_size // dc.num_attention_heads, dc.intermediate_size)
    cc = model.connector.config
    con = costmodel.TransformerShape(cc.hidden_size, len(model.connector.layers), cc.num_attention_heads,
                                     cc.num_key_value_heads, cc.hidden_size // cc.num_attention_heads,
                                     cc.intermediate_size)
    patch = (model.decoder.patch_embedding.output_image_proj.weight.numel() + model.decoder.proj_out.weight.numel())
    img = costmodel.ImageShape(dec, con, model.connector.proj.weight.numel(), patch,
                               vae_weights=sum(p.numel() for p in model.vae.decoder.parameters()))
    return lm, img


def vae_decode_flops(model, height: int, width: int) -> float:
    """FLOPs of one VAE decode at ``height`` x ``width``, counted by torch's FLOP counter (convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    c, h, w = model.latent_shape(height, width)
    z = torch.zeros(1, c, h, w, device=model.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.vae.decode(z)
    return float(counter.get_total_flops())


def phase_work(model, cfg, prompt_len: int, cond_len: int) -> dict[str, costmodel.Work]:
    """Each counted phase's work for one step of ``cfg`` (every chain ``max_new_tokens`` long)."""
    from rgpo.models.mindomni.omnigen import num_image_tokens

    lm, img = model_shapes(model)
    r, icfg = cfg.rollout, cfg.rollout.image
    nbytes = DTYPE_BYTES[cfg.model.dtype]
    chains, prompts, T = r.batch_size, r.batch_size // r.num_generations, r.max_new_tokens
    work = {
        "prefill": costmodel.prefill_work(lm, prompts, prompt_len, nbytes),
        "decode": costmodel.decode_work(lm, chains, prompt_len, T, nbytes),
        "rollout/policy_forward": costmodel.text_forward_work(lm, chains, prompt_len, T, nbytes),
        "rollout/reference": costmodel.text_forward_work(lm, chains, prompt_len, T, nbytes),
    }
    if not icfg.enabled:
        return work
    _, h, w = model.latent_shape(icfg.height, icfg.width)
    tokens = num_image_tokens(model.decoder, h, w)
    img = costmodel.ImageShape(img.decoder, img.connector, img.proj_in, img.patch_weights,
                               vae_decode_flops(model, icfg.height, icfg.width), img.vae_weights)
    images = chains * icfg.images_per_chain
    work["rollout/images"] = costmodel.sampling_work(img, images, cond_len, tokens, icfg.steps,
                                                     icfg.guidance_scale != 1.0, model.decoder_kv_cache, nbytes)
    reg = None
    if cfg.loss.image_regularizer in ("feature_kl", "velocity_mse") and cfg.loss.image_kl_coef > 0:
        reg = costmodel.regularizer_work(img, chains, cfg.loss.image_kl_timesteps, cond_len, tokens,
                                         generator_trained=False, checkpointing=cfg.model.gradient_checkpointing,
                                         dtype_bytes=nbytes)
    work["update"] = costmodel.update_work(lm, chains, prompt_len, T, nbytes, full=cfg.trainable.mode == "full",
                                           checkpointing=cfg.model.gradient_checkpointing,
                                           micro_batches=-(-chains // cfg.optim.micro_batch_size), regularizer=reg)
    return work


# ================================================================================================ the worker
def _generate(model, prompts, cfg, seed: int = 0, max_new_tokens: int | None = None):
    import torch

    r = cfg.rollout
    return model.generate(prompts, num_generations=r.num_generations,
                          max_new_tokens=max_new_tokens or r.max_new_tokens, temperature=r.temperature,
                          top_p=r.top_p, top_k=r.top_k, generator=torch.Generator().manual_seed(seed))


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """One shape: peaks, the timed steps with their prefill, the work model, compiled vs eager decode."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    timer_cls = phase_timer_class()
    with tempfile.TemporaryDirectory(prefix="rgpo-floor-") as tmp:
        cfg = rgpo_config(spec, str(Path(tmp) / "run"))
        peaks = probe_peaks(device, cfg.model.dtype)
        log(f"{spec['label']}: peaks {peaks['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s, "
            f"{peaks['read_bytes_per_s'] / 1e9:.1f} GB/s")
        trainer = build_rgpo(spec, cfg, timer_cls)
        model = trainer.model
        G = cfg.rollout.num_generations
        steps, prefill_s, sampling_s = [], [], []
        base_rss = memory().current()
        for i in range(spec["warmup"] + spec["steps"]):
            steps.append(measure_step(trainer, timer_cls, i < spec["warmup"], base_rss))
            # The step's chain sampling again as bare model calls on its prompts (the step's rollout/text also
            # builds the prompts): the prefill alone (one token), then the whole sampling.
            rollout = trainer._last_rollout
            prompts = rollout.prompts.select(list(range(0, len(rollout.rows), G)))
            trainer.set_training(False)
            for tokens, into in ((1, prefill_s), (None, sampling_s)):
                sync()
                t = time.perf_counter()
                _generate(model, prompts, cfg, max_new_tokens=tokens)
                sync()
                if i >= spec["warmup"]:
                    into.append(time.perf_counter() - t)
        measured = [s for s in steps if not s["warmup"]]
        phase_s = {k: median([s["phases_s"].get(k, 0.0) for s in measured]) for k in measured[0]["phases_s"]}
        phase_s["rollout/policy_forward"] = median(
            [s["phases_s"]["rollout/forward"] - s["phases_s"].get("rollout/reference", 0.0) for s in measured])
        phase_s["prefill"] = median(prefill_s)
        phase_s["sampling"] = median(sampling_s)
        phase_s["decode"] = median([b - a for a, b in zip(prefill_s, sampling_s)])
        rollout = trainer._last_rollout
        prompt_len = rollout.prompts.input_ids.shape[1]
        cond_len = rollout.image_rollout.condition.states.shape[1] if rollout.image_rollout is not None else 0
        if cfg.rollout.image.enabled and cfg.rollout.image.guidance_scale != 1.0:
            cond_len = max(cond_len, model.negative_condition(1).states.shape[1])
        work = phase_work(model, cfg, prompt_len, cond_len)
        backend = spec.get("decode_backend", "inductor")
        compiled = compare_decode(model, prompts, cfg, spec.get("decode_rounds", 5),
                                  None if backend == "none" else backend)
        return {
            "label": spec["label"], "shape": spec["shape"], "device": device, "dtype": cfg.model.dtype,
            "params_m": {name: sum(p.numel() for p in model.part(name).parameters()) / 1e6
                         for name in ("language_model", "generator")},
            "config": {"chains": cfg.rollout.batch_size, "G": G, "tokens": cfg.rollout.max_new_tokens,
                       "prompt_len": prompt_len, "cond_len": cond_len, "image": cfg.rollout.image.height,
                       "decoder_steps": cfg.rollout.image.steps, "guidance": cfg.rollout.image.guidance_scale},
            "peaks": peaks, "phase_s": phase_s, "step_s": median([s["step_s"] for s in measured]),
            "steps_measured": len(measured), "work": {k: w.as_dict() for k, w in work.items()},
            "decode_compare": compiled, "machine": machine_info(device),
        }


def compare_decode(model, prompts, cfg, rounds: int, backend: Any = "inductor") -> dict[str, Any]:
    """The rollout's chain sampling, eager loop vs compiled static-cache step, alternating on the same prompts and
    seed (same tokens checked), after a first compiled call that compiles (its time reported apart)."""
    import torch

    model.set_compiled_decode(True, backend=backend)
    t = time.perf_counter()
    first = _generate(model, prompts, cfg)
    compile_call_s = time.perf_counter() - t
    decoder = getattr(model, "_compiled_decoder", None)
    stats = decoder.stats if decoder is not None else None
    if decoder is None or decoder.failed or stats.compiles == 0:
        model.set_compiled_decode(False)
        return {"available": False, "reason": decoder.failed if decoder is not None else "see the log"}
    compile_s = stats.compile_s
    before = (stats.step_s, stats.steps)

    def eager():
        model.set_compiled_decode(False)
        return _generate(model, prompts, cfg)

    def compiled():
        model.set_compiled_decode(True, backend=backend)
        return _generate(model, prompts, cfg)

    timed = alternate({"eager": eager, "compiled": compiled}, rounds, sync)
    model.set_compiled_decode(False)
    same = torch.equal(timed["eager"]["result"].completion_ids, timed["compiled"]["result"].completion_ids) and \
        torch.equal(first.completion_ids, timed["eager"]["result"].completion_ids)
    steps = stats.steps - before[1]
    return {"available": True, "compile_s": compile_s, "first_call_s": compile_call_s,
            "eager_s": timed["eager"]["s"], "compiled_s": timed["compiled"]["s"],
            "compiled_step_s": (stats.step_s - before[0]) / max(steps, 1), "same_tokens": bool(same),
            "rounds": rounds, "backend": str(backend)}


def run_levers(spec: dict[str, Any]) -> dict[str, Any]:
    """Each image lever's step on the toy world's model, round-robin (one step of each in turn), medians."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    timer_cls = phase_timer_class()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rgpo-levers-") as tmp:
        trainers = {}
        for name, _, overrides in LEVERS:
            lever_spec = {**spec, "overrides": [*spec["overrides"], *overrides]}
            trainers[name] = build_rgpo(lever_spec, rgpo_config(lever_spec, str(Path(tmp) / name)), timer_cls)
        base_rss = memory().current()
        steps: dict[str, list] = {name: [] for name in trainers}
        for i in range(spec["warmup"] + spec["steps"]):
            for name, trainer in trainers.items():
                steps[name].append(measure_step(trainer, timer_cls, i < spec["warmup"], base_rss))
        for name, trainer in trainers.items():
            measured = [s for s in steps[name] if not s["warmup"]]
            results[name] = {
                "step_s": median([s["step_s"] for s in measured]),
                "phase_s": {k: median([s["phases_s"].get(k, 0.0) for s in measured])
                            for k in ("rollout/images", "rollout/text", "update", "rewards")},
                "images": measured[0]["images"], "chains": measured[0]["chains"],
            }
            trainer.close()
    return {"label": spec["label"], "levers": results, "steps_measured": spec["steps"], "device": device,
            "machine": machine_info(device)}


# ================================================================================================ toy world
def toy_world_effect(out: Path, steps: int, eval_prompts: int) -> dict[str, Any]:
    """``rgpo demo`` once per lever (``steps`` training steps, ``eval_prompts`` held-out prompts x 4 chains); the
    held-out figures after training and the run's median step time from its metrics."""
    results = {}
    for name, _, overrides in LEVERS:
        run_dir = out / "toy" / name
        common = [f"optim.max_steps={steps}", f"checkpoint.every={steps}", "logging.mode=disabled",
                  "logging.table_every=0", f"logging.output_dir={run_dir}"]
        log(f"toy world, lever {name}: rgpo demo ({steps} steps) ...")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "rgpo", "demo", "--eval-prompts", str(eval_prompts),
                               "--samples", "4", *common, *overrides], cwd=str(REPO), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"rgpo demo for lever {name} failed:\n{proc.stderr[-3000:]}")
        results[name] = read_toy_run(run_dir)
        results[name]["wall_s"] = time.perf_counter() - t
    return results


def read_toy_run(run_dir: Path) -> dict[str, Any]:
    """A finished demo run's held-out figures (``eval.json``) and median step / image-phase seconds
    (``metrics.jsonl``)."""
    report = json.loads((run_dir / "eval.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]

    def med(key: str) -> float:
        values = [m[key] for m in lines if key in m]
        return median(values) if values else float("nan")

    return {"before": report["before"], "after": report["after"], "steps": len(lines),
            "eval_prompts": report["eval_prompts"], "step_s": med("timing/step") if any(
                "timing/step" in m for m in lines) else sum(med(f"timing/{k}") for k in
                                                            ("rollout", "rewards", "advantages", "update")),
            "images_s": med("timing/rollout/images")}


# ================================================================================================ report
def fmt_work(w: dict[str, float]) -> str:
    return f"{w['flops'] / 1e9:.3g} GFLOP, {w['bytes'] / 1e6:.3g} MB"


PHASE_ROWS = [("prefill", "prefill (prompts once per group)"), ("decode", "decode (eager loop)"),
              ("rollout/policy_forward", "rollout policy forward"), ("rollout/reference", "reference forward"),
              ("rollout/images", "image sampling (+ VAE)"), ("update", "update (fwd + bwd + image KL)"),
              ("rewards", "rewards (format: string checks)")]


def shape_lines(r: dict[str, Any]) -> list[str]:
    peaks, cfgd = r["peaks"], r["config"]
    gemm, bw = peaks["gemm_flops_per_s"], peaks["read_bytes_per_s"]
    lines = ["", f"### `{r['shape']}` ({r['params_m']['language_model']:.1f} M language model, "
             f"{r['params_m']['generator']:.1f} M generator; {r['dtype']} on {r['device']})", "",
             f"Peaks measured in the same process: GEMM {gemm / 1e9:.1f} GFLOP/s ({peaks['gemm_n']}^2 matmul), read "
             f"bandwidth {bw / 1e9:.1f} GB/s (sum over {peaks['read_mib']:.0f} MiB). Step: {cfgd['chains']} chains "
             f"(G={cfgd['G']}) x {cfgd['tokens']} tokens after a {cfgd['prompt_len']}-token prompt, "
             f"{cfgd['image']}px images, {cfgd['decoder_steps']} decoder steps, guidance {cfgd['guidance']}; "
             f"median of {r['steps_measured']} steps: {fmt_ms(r['step_s'])}.", "",
             "| phase | work | bound | floor | time | time / floor |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for key, label in PHASE_ROWS:
        t = r["phase_s"].get(key)
        if t is None:
            continue
        w = r["work"].get(key)
        if w is None:
            lines.append(f"| {label} | not counted | - | - | {fmt_ms(t)} | - |")
            continue
        work = costmodel.Work(w["flops"], w["bytes"])
        floor = work.floor_s(gemm, bw)
        lines.append(f"| {label} | {fmt_work(w)} | {work.bound(gemm, bw)} | {fmt_ms(floor)} | {fmt_ms(t)} | "
                     f"**{t / floor:.1f}** |")
    c = r["decode_compare"]
    if c.get("available"):
        decode_w = r["work"]["decode"]
        floor = costmodel.Work(decode_w["flops"], decode_w["bytes"]).floor_s(gemm, bw)
        per_step = floor / max(cfgd["tokens"] - 1, 1)
        lines += ["", f"Chain sampling, eager loop vs compiled static-cache step (`rollout.compiled_decode`, backend "
                  f"{c['backend']}), {c['rounds']} alternating rounds, same tokens: **{c['same_tokens']}**. Compile "
                  f"time (first call, apart): {c['compile_s']:.1f} s.", "",
                  "| chain sampling (prefill + decode) | eager | compiled | compiled / eager | compiled step / its floor |",
                  "| --- | ---: | ---: | ---: | ---: |",
                  f"| {cfgd['chains']} chains x {cfgd['tokens']} tokens | {fmt_ms(c['eager_s'])} | "
                  f"{fmt_ms(c['compiled_s'])} | **{c['compiled_s'] / c['eager_s']:.2f}** | "
                  f"{c['compiled_step_s'] / per_step:.1f} |"]
    else:
        lines += ["", f"Compiled decode unavailable here: {c.get('reason')}."]
    return lines


def lever_lines(levers: dict[str, Any] | None, toy: dict[str, Any] | None, toy_note: str) -> list[str]:
    if not levers and not toy:
        return []
    lines = ["", "## Image-cost levers", ""]
    if levers:
        lines += [f"Cost: the toy world's model, {levers['levers']['base']['chains']} chains a step, median of "
                  f"{levers['steps_measured']} steps per lever, levers round-robin in one process."]
    if toy:
        lines += [f"Effect: {toy_note}"]
    lines += ["", "| lever | step | image sampling | update | held-out format | accuracy | CLIP |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, what, _ in LEVERS:
        cost = (levers or {}).get("levers", {}).get(name)
        eff = (toy or {}).get(name)
        row = [what]
        row += [fmt_ms(cost["step_s"]), fmt_ms(cost["phase_s"]["rollout/images"]), fmt_ms(cost["phase_s"]["update"])] \
            if cost else ["-", "-", "-"]
        row += [f"{eff['after'][k]:.3f}" for k in ("format_rate", "reasoning_accuracy", "clip_consistency")] \
            if eff else (["not run"] * 3 if toy else ["-", "-", "-"])
        lines.append("| " + " | ".join(row) + " |")
    if toy:
        first = next(iter(toy.values()))
        b = first["before"]
        lines.append(f"| starting policy (no training) | - | - | - | {b['format_rate']:.3f} | "
                     f"{b['reasoning_accuracy']:.3f} | {b['clip_consistency']:.3f} |")
    return lines


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# rgpo floor benchmark", "", f"Command: `{report['command']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable); device **{m['device']}**"
             + (f" ({m['gpu']})" if m.get("gpu") else "") + f"; torch {m['torch']} ({m['torch_threads']} threads); "
             f"load average at start {', '.join(f'{x:.1f}' for x in report['load_start'])}, at end "
             f"{', '.join(f'{x:.1f}' for x in report['load_end'])}.", "",
             "## Each phase against its floor", "",
             "floor = max(FLOPs / GEMM peak, bytes read / bandwidth peak), work counted from the model's shapes "
             "(`benchmarks/costmodel.py`). Prefill and decode are the step's chain sampling repeated as bare "
             "`generate` calls on the step's prompts right after it: the prefill alone (one token), and the whole "
             "sampling minus it."]
    for r in report["shapes"]:
        lines += shape_lines(r)
    lines += lever_lines(report.get("levers"), report.get("toy_world"), report.get("toy_note", ""))
    lines.append("")
    return "\n".join(lines)


# ================================================================================================ the command
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="tiny,mid", help="MindOmni shapes (random weights), comma-separated "
                    "(default tiny,mid; on a GPU also mindomni-7b)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="rgpo config override for the shape runs (repeatable)")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per shape (median; default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps (default 1)")
    ap.add_argument("--decode-rounds", type=int, default=5, help="alternating eager/compiled rounds (default 5)")
    ap.add_argument("--decode-backend", default="inductor",
                    help="torch.compile backend of the compiled decode (none: the static cache uncompiled)")
    ap.add_argument("--merge", default=None, metavar="FLOOR_JSON",
                    help="re-render a finished run's floor.json with the toy-world figures of --toy-results")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on a CPU)")
    ap.add_argument("--skip-levers", action="store_true", help="no image-lever cost table")
    ap.add_argument("--lever-steps", type=int, default=3, help="measured steps per lever (default 3)")
    ap.add_argument("--toy-world", action="store_true",
                    help="also train the toy world once per lever (rgpo demo; minutes per lever)")
    ap.add_argument("--toy-steps", type=int, default=20, help="training steps per toy-world run (default 20)")
    ap.add_argument("--toy-eval-prompts", type=int, default=32, help="held-out prompts per toy evaluation")
    ap.add_argument("--toy-results", default=None,
                    help="a folder of finished toy-world runs (<lever>/eval.json, <lever>/metrics.jsonl) to read "
                         "instead of training")
    ap.add_argument("--out", default="bench_floor", help="output folder for floor.md and floor.json")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    import torch

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads if args.threads is not None else (None if torch.cuda.is_available() else 1)
    report: dict[str, Any] = {"command": "python -m benchmarks floor " + " ".join(argv),
                              "load_start": list(os.getloadavg()), "shapes": []}
    if args.merge:  # the measured tables as they were; only the toy-world figures are read anew
        report = json.loads(Path(args.merge).read_text())
        args.shapes, args.skip_levers = "", True
    with tempfile.TemporaryDirectory(prefix="rgpo-floor-") as tmp:
        cases = []
        for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
            path = "tiny" if shape == "tiny" else f"random:{shape}"
            cases.append({"kind": KIND, "label": f"floor {shape}", "shape": shape, "steps": args.steps,
                          "warmup": args.warmup, "decode_rounds": args.decode_rounds,
                          "decode_backend": args.decode_backend,
                          "overrides": [*SHAPE_OVERRIDES, f"model.path={path}", *args.overrides]})
        for case in cases:  # one process per shape: clean memory, no allocator state carried over
            result = spawn([case], {"config": str(TINY_CONFIG), "ban_eos": True}, threads, Path(tmp),
                           case["label"].replace(" ", "_"))
            report["shapes"].append(result["results"][0])
            report["machine"] = result["machine"]
        if not args.skip_levers:
            lever_case = {"kind": LEVERS_KIND, "label": "image levers", "steps": args.lever_steps, "warmup": 1,
                          "overrides": LEVER_COST_OVERRIDES}
            result = spawn([lever_case], {"config": str(TOY_CONFIG), "ban_eos": False}, threads, Path(tmp), "levers")
            report["levers"] = result["results"][0]
    if args.toy_results:
        root = Path(args.toy_results)
        # finished runs only (a run still training has no eval.json yet)
        report["toy_world"] = {name: read_toy_run(root / name) for name, _, _ in LEVERS
                               if (root / name / "eval.json").is_file()}
    elif args.toy_world:
        report["toy_world"] = toy_world_effect(out, args.toy_steps, args.toy_eval_prompts)
    if report.get("toy_world"):
        any_run = next(iter(report["toy_world"].values()))
        report["toy_note"] = (f"`rgpo demo` once per lever, {any_run['steps']} training steps (the README's toy "
                              f"run takes 40), held-out figures after training on {any_run['eval_prompts']} "
                              "prompts x 4 chains; one run each, so differences of a few points are within "
                              "run-to-run spread.")
    if not args.merge:
        report["load_end"] = list(os.getloadavg())
    if "machine" not in report:
        report["machine"] = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    markdown = render(report)
    (out / "floor.md").write_text(markdown)
    (out / "floor.json").write_text(json.dumps(report, indent=1, default=str))
    print(markdown)
    log(f"wrote {out / 'floor.md'} and {out / 'floor.json'}")
    return 0
