"""Optimisations, each on vs off: prompt prefill shared by the G chains, the trimmed decoding loop, log-probs and
condition from one chunked forward, the generator's condition cache, batched guidance, batched policy / reference
image-KL runs, K sampled image-KL timesteps vs all, the flattened train/eval switch, ZeRO-2's CPU flags, ZeRO-3
gather once per rollout phase; alternating on/off in one process, each naive path (:mod:`benchmarks.naive`)
checked to compute the same result."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from .harness import REPO, alternate, device_sync, fmt_ms, fmt_n, log, rgpo_config, spawn
from .naive import (
    cat_conditions,
    guided_sampling,
    naive_forward_text,
    naive_generate,
    naive_guided_sampling,
    prefill_logits,
    regularizer_grid,
)
from .switches import ban_eos

KIND = "ablations"


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Each optimisation measured on against off in one process, alternating; every naive variant is checked to
    compute the same result as rgpo's."""
    import torch

    from rgpo.building import apply_trainable, build_model
    from rgpo.data import load_prompts
    from rgpo.losses import feature_kl
    from rgpo.models import Condition, ImageSamplingConfig

    rounds = spec.get("rounds", 7)
    cuda = torch.cuda.is_available()
    sync = device_sync()
    device = torch.device("cuda" if cuda else "cpu")
    rows_out: list[dict[str, Any]] = []

    def row(name, on_label, off_label, measured, check, in_rgpo="yes", note=""):
        on, off = measured["on"], measured["off"]
        rows_out.append({"optimisation": name, "on": on_label, "off": off_label, "on_s": on["s"], "off_s": off["s"],
                         "on_over_off": on["s"] / off["s"] if off["s"] else float("nan"),
                         "on_peak_rise_mib": on["peak_rise_mib"], "off_peak_rise_mib": off["peak_rise_mib"],
                         "same_result": check, "in_rgpo": in_rgpo, "note": note})
        log(f"  {name}: {on['s'] * 1e3:.1f} ms vs {off['s'] * 1e3:.1f} ms")

    with tempfile.TemporaryDirectory(prefix="rgpo-bench-") as tmp:
        cfg = rgpo_config(spec, str(Path(tmp) / "run"))
        model = apply_trainable(build_model(cfg), cfg).to(device).eval()
        ban_eos(model, spec)
        G, T = cfg.rollout.num_generations, cfg.rollout.max_new_tokens
        P = cfg.rollout.batch_size // G
        rows = load_prompts(cfg.data.train_file)
        prompts = model.build_prompts([rows[j % len(rows)].as_model_row() for j in range(P)]).to(device)
        icfg = ImageSamplingConfig(**{k: getattr(cfg.rollout.image, k) for k in (
            "height", "width", "steps", "guidance_scale", "seed", "shared_noise")})

        def gen(seed=0):
            return torch.Generator().manual_seed(seed)

        # 1. prompt prefill: once per group, its KV cache repeated for the G chains, vs G prefills
        shared, each = prefill_logits(model, prompts, G)  # the same first-token distribution from either prefill
        torch.testing.assert_close(shared, each, atol=1e-5, rtol=1e-5)
        for tokens, label in ((T, f"whole generate ({P} prompts x G={G}, {T} tokens)"),
                              (1, "prefill + first token only")):
            m = alternate({
                "on": lambda t=tokens: model.generate(prompts, num_generations=G, max_new_tokens=t, generator=gen()),
                "off": lambda t=tokens: model.generate(prompts.repeat_interleave(G), num_generations=1,
                                                       max_new_tokens=t, generator=gen()),
            }, rounds, sync)
            same = torch.equal(m["on"]["result"].completion_ids, m["off"]["result"].completion_ids)
            row(f"prompt prefilled once per group, KV cache shared by the G chains: {label}",
                "1 prefill per prompt", "G prefills per prompt", m,
                f"first-token logits allclose; sampled ids {'identical' if same else 'differ (float noise)'}")

        # 2. the decoding loop: the text model + lm_head with rgpo's own padding mask under inference mode, vs
        #    every step through the whole HF forward (mask rebuilt by transformers) under no_grad
        m = alternate({
            "on": lambda: model.generate(prompts, num_generations=G, max_new_tokens=T, generator=gen()),
            "off": lambda: naive_generate(model, prompts, num_generations=G, max_new_tokens=T, generator=gen()),
        }, rounds, sync)
        assert torch.equal(m["on"]["result"].completion_ids, m["off"]["result"].completion_ids)
        row("decoding steps: text model + lm_head, own padding mask, inference mode", "rgpo's loop",
            "full HF forward per token, no_grad", m, "identical token ids")

        # 3. log-probs + condition from ONE forward, norm + lm_head in chunks (no full-vocabulary log-softmax)
        comps = m["on"]["result"]  # section 2's chains (same prompts, same seed)
        reps = prompts.repeat_interleave(G)
        mb = min(cfg.optim.micro_batch_size, comps.completion_ids.shape[0])
        p_mb, c_mb = reps.select(list(range(mb))), comps.select(list(range(mb)))

        def fwd_on(grad: bool):
            with torch.set_grad_enabled(grad):
                out = model.forward_text(p_mb if grad else reps, c_mb if grad else comps, with_condition=True)
                if grad:
                    (out.logps.sum() + out.condition.states.sum()).backward()
            return out.logps.detach(), out.condition.states.detach()

        def fwd_off(grad: bool):
            with torch.set_grad_enabled(grad):
                logps, cond, _ = naive_forward_text(model, p_mb if grad else reps, c_mb if grad else comps, True)
                if grad:
                    (logps.sum() + cond.sum()).backward()
            return logps.detach(), cond.detach()

        for grad, label in ((False, f"rollout, no grad ({comps.completion_ids.shape[0]} chains)"),
                            (True, f"update micro-batch, forward + backward ({mb} chains)")):
            model.train(grad)
            m = alternate({"on": lambda g=grad: fwd_on(g), "off": lambda g=grad: fwd_off(g)}, rounds, sync)
            model.zero_grad(set_to_none=True)
            (lo, co), (ln, cn) = m["on"]["result"], m["off"]["result"]
            mask = (c_mb if grad else comps).completion_mask.bool()
            torch.testing.assert_close(lo[mask], ln[mask], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(co, cn, atol=1e-5, rtol=1e-5)
            row(f"log-probs and condition from one forward, chunked lm_head: {label}", "1 forward",
                "2 forwards + full-vocab log-softmax", m, "log-probs and condition allclose")
        model.eval()

        # 4. image sampling: the condition cache across denoising steps; guidance as ONE batched run
        with torch.no_grad():
            out = model.forward_text(reps, comps, with_condition=True)
            condition = out.condition
            negative = model.negative_condition(condition.num_rows)
            noise = model.initial_noise(condition.num_rows, G, icfg).to(model.latent_dtype)

        m = alternate({"on": lambda: guided_sampling(model, condition, negative, noise, icfg, cached=True),
                       "off": lambda: guided_sampling(model, condition, negative, noise, icfg, cached=False)},
                      rounds, sync)
        torch.testing.assert_close(m["on"]["result"], m["off"]["result"], atol=1e-4, rtol=1e-4)
        row(f"decoder condition keys/values cached across the {icfg.steps} denoising steps", "cached",
            "condition recomputed every step", m, "latents allclose")
        m = alternate({
            "on": lambda: guided_sampling(model, condition, negative, noise, icfg, cached=True),
            "off": lambda: naive_guided_sampling(model, condition, negative, noise, icfg, cached=True),
        }, rounds, sync)
        torch.testing.assert_close(m["on"]["result"], m["off"]["result"], atol=1e-4, rtol=1e-4)
        row(f"guidance (scale {icfg.guidance_scale}): condition + negative as ONE batched decoder forward",
            "1 forward of 2N rows", "2 forwards of N rows", m, "latents allclose")
        m = alternate({
            "on": lambda: guided_sampling(model, condition, negative, noise, icfg, cached=True),
            "off": lambda: naive_guided_sampling(model, condition, negative, noise, icfg, cached=False),
        }, rounds, sync)
        torch.testing.assert_close(m["on"]["result"], m["off"]["result"], atol=1e-4, rtol=1e-4)
        row("image sampling, both of the above", "cached + batched", "uncached, 2 forwards per step", m,
            "latents allclose")

        # 5. image KL: policy and reference generator runs batched vs separate; K sampled timesteps vs all
        lc = cfg.loss
        n = mb
        with torch.no_grad(), model.adapter_disabled():
            ref = model.forward_text(p_mb, c_mb, with_condition=True).condition
        pol = Condition(condition.states[:n].detach(), condition.mask[:n])
        shape = model.latent_shape(icfg.height, icfg.width)
        g = gen(7)
        kl_noise = torch.randn((n, *shape), generator=g).to(device, model.latent_dtype)
        grid = regularizer_grid(model).to(device)
        t_idx = torch.randint(0, len(grid), (n,), generator=g)

        def features(cond, noise_, t):
            inputs = model.image_inputs(cond, None, guidance_scale=1.0)
            return model.generator_output(inputs, noise_, t, return_features=True).features

        def kl(c, rc, t, noise_, batched: bool):
            c = type(c)(c.states.clone().requires_grad_(True), c.mask)
            if batched:
                pf, rf = features(cat_conditions(c, rc), torch.cat([noise_, noise_]), torch.cat([t, t])).chunk(2)
                rf = rf.detach()
            else:
                pf = features(c, noise_, t)
                with torch.no_grad():
                    rf = features(rc, noise_, t)
            per = feature_kl(pf, rf, tau=lc.image_kl_tau)
            per.mean().backward()
            return per.detach(), c.states.grad

        m = alternate({"on": lambda: kl(pol, ref, grid[t_idx], kl_noise, True),
                       "off": lambda: kl(pol, ref, grid[t_idx], kl_noise, False)}, rounds, sync)
        torch.testing.assert_close(m["on"]["result"][0], m["off"]["result"][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m["on"]["result"][1], m["off"]["result"][1], atol=1e-4, rtol=1e-4)
        row(f"image KL: policy and reference decoder runs batched (forward + backward, {n} chains)",
            "1 batched forward", "2 forwards (policy with grad, reference without)", m,
            "KL and its gradient allclose", in_rgpo="no (the trainer runs them separately)",
            note="batching also runs the backward over the reference rows")
        reps_all = len(grid)
        m = alternate({
            "on": lambda: kl(pol, ref, grid[t_idx], kl_noise, False),
            "off": lambda: kl(pol.repeat_interleave(reps_all), ref.repeat_interleave(reps_all), grid.repeat(n),
                              kl_noise.repeat_interleave(reps_all, 0), False),
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

        m = alternate({"on": lambda: flip(True), "off": lambda: flip(False)}, max(rounds, 20), sync)
        assert all(flags(True, mode) == flags(False, mode) for mode in (True, False))
        model.eval()
        row(f"train + eval switch ({switch.num_modules} modules): flattened once vs `Module.train` walk",
            "TrainModeSwitch", "model.train() / model.eval()", m, "every module's training flag identical")

        # 7. ZeRO-2 on a CPU: gradient overlap and contiguous buffers off (rgpo's "auto") vs on
        if not cuda:
            _zero2_flags(spec, Path(tmp), rounds, sync, row)

        # 8. ZeRO-3: parameters gathered once for the rollout phase vs fetched by every forward (per token).
        #    Last: a ZeRO-3 trainer leaves transformers' global DeepSpeed config set in this process.
        if spec.get("zero3", True):
            _zero3_gather(spec, Path(tmp), rounds, sync, row)
    return {"label": spec["label"], "kind": KIND, "rows": rows_out, "rounds": rounds}


def _zero2_flags(spec, tmp: Path, rounds, sync, row) -> None:
    """The text-only update under ZeRO-2 with ``overlap_comm`` / ``contiguous_gradients`` as rgpo fills their
    ``auto`` on a CPU (off) vs on: two trainers built from the same seed, each updated alternately on the same
    rollout and advantages, so they must end with the same weights."""
    import torch

    from rgpo.building import trainable_parameters
    from rgpo.tracking import PhaseTimer
    from rgpo.trainer import RGPOTrainer

    raw = json.loads((REPO / "configs" / "zero2.json").read_text())
    raw["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)
    path = tmp / "zero2_overlap_contiguous.json"
    path.write_text(json.dumps(raw))
    text = [*spec["overrides"], "rollout.image.enabled=false", "rewards.functions=[format]"]
    trainers = {}
    for name, extra in (("on", []), ("off", [f"deepspeed.config={path}"])):
        torch.manual_seed(0)
        trainers[name] = RGPOTrainer(rgpo_config({**spec, "overrides": [*text, *extra]}, str(tmp / f"zero2_{name}")))
        ban_eos(trainers[name].model, spec)
    first = trainers["on"]
    rollout = first.rollout(first.sampler.next_step(), PhaseTimer())
    advantages = torch.linspace(-1, 1, len(rollout.rows))
    m = alternate({k: (lambda t=t: t.update(rollout, advantages)) for k, t in trainers.items()}, rounds, sync)
    weights = {k: trainable_parameters(t.model) for k, t in trainers.items()}
    for key, value in weights["on"].items():
        torch.testing.assert_close(value, weights["off"][key], atol=1e-6, rtol=1e-5)
    mb = trainers["on"].cfg.optim.micro_batch_size
    row(f"ZeRO-2 update on a CPU ({len(rollout.rows)} chains in micro-batches of {mb}): overlap_comm and "
        "contiguous_gradients off", "off (rgpo's auto on a CPU)", "on (DeepSpeed's usual GPU setting)", m,
        "identical trainable weights after the same updates")
    for t in trainers.values():
        t.close()


def _zero3_gather(spec, tmp: Path, rounds, sync, row) -> None:
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
    zcfg = rgpo_config(z_spec, str(tmp / "zero3"))
    trainer = RGPOTrainer(zcfg)
    ban_eos(trainer.model, spec)
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
        m = alternate({"on": lambda: rollout("rgpo"), "off": lambda o=off: rollout(o)}, rounds, sync)
        assert torch.equal(m["on"]["result"][0], m["off"]["result"][0])
        torch.testing.assert_close(m["on"]["result"][1], m["off"]["result"][1], atol=1e-5, rtol=1e-5)
        row(f"ZeRO-3 rollout phase (generate {T} tokens + reference forward, every parameter partitioned, 1 rank)",
            "one gather per phase, module hooks off", off_label, m, "identical ids, log-probs allclose")
    trainer.close()


def plan(ctx) -> None:
    """Every optimisation on vs off, in one worker, alternating."""
    args = ctx.args
    case = {"kind": KIND, "label": "optimisations on vs off", "overrides": ctx.overrides,
            "rounds": args.ablation_rounds, "zero3": not args.skip_zero3}
    ctx.report["ablations"] = spawn([case], ctx.common, ctx.threads, ctx.tmp, "ablations")["results"][0]


def report_lines(report: dict[str, Any]) -> list[str]:
    abl = report.get("ablations")
    if not abl:
        return []
    lines = ["", "## Optimisations, each on vs off", "",
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
    return lines
