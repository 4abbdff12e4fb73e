"""rgpo vs TRL: a text-only rgpo step (``rollout.image.enabled=false``, format reward only) against
``trl.GRPOTrainer`` on the SAME tiny language model (same weights, saved to a temporary folder so TRL loads it by
path), same prompts and chat template, G, prompts per step, micro-batch, completion length, beta, loss aggregation
(``grpo``), LoRA (r / alpha / dropout / target modules), ``num_iterations=1``, temperature 1. Alternating separate
processes (clean memory figures), then one process where every TRL step is followed by an rgpo step (the step-time
ratio that a change of machine load cannot skew).

Equal work: end-of-sequence tokens are banned in both trainers (rgpo: :func:`benchmarks.switches.ban_eos`; TRL:
``generation_kwargs={"suppress_tokens": ...}``, which also bans the placeholders rgpo bans), so every chain is
exactly ``max_new_tokens`` / ``max_completion_length`` long.

TRL is timed by wrapping methods of the TRL trainer instance this module builds (TRL has no timer hook); rgpo is
timed through ``trainer.timer_factory``.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from .harness import (
    MEMORY_STEPS,
    build_rgpo,
    fmt_n,
    fmt_s,
    log,
    measure_step,
    median,
    memory,
    mib,
    phase_timer_class,
    pool,
    rgpo_config,
    spawn,
    summarise,
)
from .switches import save_text_model

KIND = "trl"


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same tiny language model, prompts and settings as the text-only rgpo case (and,
    with ``interleave``, that rgpo case stepping right after each TRL step in the same process)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rgpo import rewards as reward_lib
    from rgpo.data import load_prompts

    mem = memory()
    cfg = rgpo_config(spec, str(Path(tempfile.gettempdir()) / "rgpo-bench-unused"))
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
            {"prompt": [{"role": "system", "content": meta["system_prompt"]},
                        {"role": "user", "content": meta["instruction_prefix"] + r.prompt}]} for r in rows])
        trl_ids = [processor.tokenizer(processor.apply_chat_template(row["prompt"], tokenize=False,
                                                                     add_generation_prompt=True),
                                       add_special_tokens=False)["input_ids"] for row in dataset]
        same_prompt = trl_ids == meta["rgpo_prompt_ids"]

        fmt = reward_lib.get_reward(cfg.rewards.functions[0]) if cfg.rewards.functions else None

        def format_reward(prompts, completions, **kwargs):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return fmt(prompts=prompts, completions=texts) if fmt else [0.0] * len(texts)

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
            rgpo_timer = phase_timer_class()
            rgpo_trainer = build_rgpo(rgpo_spec, rgpo_config(rgpo_spec, str(Path(tmp) / "rgpo")), rgpo_timer)

        class StepClock(TrainerCallback):
            def __init__(self):
                self.t_begin = self.t_end = None
                self.start_mem = 0
                self.extra_s = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                t = time.perf_counter()
                gc.collect()
                self.gc_s = time.perf_counter() - t  # excluded from the end-to-end cycle time
                mem.reset()
                self.start_mem = mem.current()
                phases.clear()
                self.t_begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if on_cuda:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                peak = mem.peak()
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
                    rgpo_steps.append(measure_step(rgpo_trainer, rgpo_timer, records[-1]["warmup"], base_rss))
                    self.extra_s = time.perf_counter() - now

        gc.collect()
        base_rss = mem.current()
        t0 = time.perf_counter()
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[format_reward], args=args, train_dataset=dataset,
                              processing_class=processor, peft_config=lora, callbacks=[StepClock()])
        build_s = time.perf_counter() - t0
        built_rss = mem.current()
        trainable_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        # TRL's phases, timed on this TRL trainer instance (TRL offers no timer hook).
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
                rgpo_steps.append(measure_step(rgpo_trainer, rgpo_timer, False, base_rss, phase_memory=True))
            interleaved = summarise(rgpo_steps)
            pairs = [r["step_s"] / t["step_s"] for r, t in zip(rgpo_steps, records) if not t["warmup"]]
            interleaved["pair_ratio_median"] = median(pairs)
            rgpo_trainer.close()
        return {
            "interleaved_rgpo": interleaved,
            "label": spec["label"],
            "kind": KIND,
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


def plan(ctx) -> None:
    """rgpo text-only vs TRL, alternating fresh processes, then (unless ``--no-interleave``) one process with
    their steps interleaved. The tiny model only."""
    from rgpo.config import load_config

    args = ctx.args
    if ctx.base.model.path not in (None, "", "tiny"):
        log("the TRL comparison runs on the tiny model only (model.path=tiny): skipped")
        return
    text_over = [*ctx.overrides, "rollout.image.enabled=false", "rewards.functions=[format]"]
    text_case = {"kind": "rgpo", "label": "rgpo text-only", "overrides": text_over, "warmup": args.warmup,
                 "steps": args.steps, "lora_without_lm_head": True, "bare": not args.skip_bare}
    model_dir = ctx.tmp / "tiny-language-model"
    save_text_model(load_config(args.config, [*text_over, "model.dtype=float32"]), model_dir)
    trl_case = {"kind": KIND, "label": "TRL GRPOTrainer", "overrides": text_over, "warmup": args.warmup,
                "steps": args.steps, "model_dir": str(model_dir)}
    # Alternate the two (rgpo, TRL, rgpo, TRL, ...) so a change in machine load hits both alike.
    rs, ts = [], []
    for i in range(max(1, args.repeats)):
        rs.append(spawn([text_case], ctx.common, ctx.threads, ctx.tmp, f"rgpo_text{i}")["results"][0])
        ts.append(spawn([trl_case], ctx.common, ctx.threads, ctx.tmp, f"trl{i}")["results"][0])
    ctx.report["comparison"] = {"rgpo": pool(rs), "trl": pool(ts), "rounds": len(rs)}
    if not args.no_interleave:
        steps_i = args.steps * max(1, args.repeats)
        inter = {**trl_case, "label": "TRL GRPOTrainer + rgpo text-only, interleaved", "steps": steps_i,
                 "interleave": {**text_case, "bare": False, "steps": steps_i}}
        res_i = spawn([inter], ctx.common, ctx.threads, ctx.tmp, "interleaved")["results"][0]
        ctx.report["comparison"]["interleaved"] = {"rgpo": res_i["interleaved_rgpo"], "trl": res_i}


def report_lines(report: dict[str, Any]) -> list[str]:
    cmp_ = report.get("comparison")
    if not cmp_:
        return []
    r, t = cmp_["rgpo"], cmp_["trl"]
    c = r["config"]
    lines = ["", "## rgpo vs TRL GRPOTrainer (text only, same tiny language model)", "",
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
    rows = [
        (f"step (median), separate processes ({cmp_.get('rounds', 1)} alternating rounds)", r["step_s"], t["step_s"]),
        ("  text generation", r["phase_s"].get("rollout/text", 0.0), t["phase_s"].get("rollout/text", 0.0)),
        ("  no-grad forwards (rgpo: policy + reference; TRL: reference)", r["phase_s"].get("rollout/forward", 0.0),
         t["phase_s"].get("rollout/forward", 0.0)),
        ("  rewards", r["phase_s"].get("rewards", 0.0), t["phase_s"].get("rewards", 0.0)),
        ("  update (TRL: step - rollout)", r["phase_s"].get("update", 0.0), t["phase_s"].get("update", 0.0)),
    ]
    for name, a, b in rows:
        lines.append(f"| {name} | {fmt_s(a)} | {fmt_s(b)} | {fmt_n(a / b if b else float('nan'), 2)} |")
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
    return lines
