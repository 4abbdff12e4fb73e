"""Trainer overhead: the rgpo step minus the same work done by bare model calls (``generate``, the no-grad
policy / reference ``forward_text``, ``draw``, and forward / backward / AdamW of the update) on a plain
(non-DeepSpeed) copy of the same model, one bare iteration right after each trainer step, on that step's prompts.
The bare pieces run inside the ``rgpo`` cases (:mod:`benchmarks.rgpo_step`); this module holds them and the
report's overhead table.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from .harness import fmt_s, median
from .switches import ban_eos, lora_without_lm_head


class BarePieces:
    """The same work as one rgpo step, as bare model calls through the model interface on a plain copy of the
    model. :meth:`iteration` runs one such step (called right after each trainer step, so both see the same
    machine load)."""

    def __init__(self, spec: dict[str, Any], cfg):
        import torch

        from rgpo.building import DTYPES, apply_trainable, build_model
        from rgpo.data import load_prompts
        from rgpo.models import ImageSamplingConfig

        self.spec, self.cfg = spec, cfg
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        model = build_model(cfg, device=self.device)
        if spec.get("lora_without_lm_head"):
            model = lora_without_lm_head(model)
        self.model = model = apply_trainable(model, cfg).to(self.device)
        ban_eos(model, spec)
        self.params = [p for p in model.parameters() if p.requires_grad]
        dtype = DTYPES[cfg.model.dtype]
        for p in self.params:  # peft leaves new adapters float32; DeepSpeed casts the trainer's to the run's dtype
            p.data = p.data.to(dtype)
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

    def image_kl(self, condition, ref_condition, gen_seed: int):
        """The trainer's image regulariser: one unguided generator evaluation, policy (grad) vs reference, at the
        family's regulariser times."""
        import torch

        from rgpo.losses import feature_kl, velocity_mse

        model, lc, icfg, device = self.model, self.cfg.loss, self.icfg, self.device
        K = lc.image_kl_timesteps
        g = torch.Generator().manual_seed(gen_seed)
        rows = condition.num_rows * K
        shape = model.latent_shape(icfg.height, icfg.width)
        noise = torch.randn((rows, *shape), generator=g).to(device, model.latent_dtype)
        t = model.regularizer_times(rows, g).to(device)
        want = lc.image_regularizer == "feature_kl"

        def run(cond):
            inputs = model.image_inputs(cond.repeat_interleave(K), None, guidance_scale=1.0)
            return model.generator_output(inputs, noise, t, return_features=want)

        pol_out = run(condition)
        with torch.no_grad(), model.adapter_disabled():
            ref_out = run(ref_condition)
        if want:
            return feature_kl(pol_out.features, ref_out.features, tau=lc.image_kl_tau).mean()
        return velocity_mse(pol_out.prediction, ref_out.prediction).mean()

    def iteration(self, it: int, rows=None) -> None:
        """One bare step on ``rows`` (the trainer step's chains, G per prompt, grouped), else on the data's
        prompts in order. Prompt lengths differ, so the same prompts as the trainer's step make it the same work."""
        import torch

        from rgpo.losses import policy_loss

        model, cfg, device, icfg = self.model, self.cfg, self.device, self.icfg
        G = cfg.rollout.num_generations
        P = cfg.rollout.batch_size // G
        mb = cfg.optim.micro_batch_size
        lc = cfg.loss
        images_on = cfg.rollout.image.enabled
        image_term = (images_on and lc.image_regularizer in ("feature_kl", "velocity_mse")
                      and lc.image_kl_coef > 0)
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
                noise = model.initial_noise(n, G, icfg).to(model.latent_dtype)
                model.draw(pol.condition, noise, icfg, negative_from=model)
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
                                          aggregation=lc.aggregation, max_length=cfg.rollout.max_new_tokens)
                    if image_term:
                        loss = loss + lc.image_kl_coef * self.image_kl(out.condition, ref.condition.select(idx),
                                                                       it * 7919 + start)
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


# ================================================================================================ report
def report_lines(report: dict[str, Any]) -> list[str]:
    """The trainer-overhead table: each measured step (full step; text-only, when compared with TRL) against the
    same work as bare model calls, each bare iteration run right after a trainer step in the same process."""
    cases = []
    if (report.get("main") or {}).get("bare"):
        cases.append(("full step", "overhead", report["main"]))
    text = (report.get("comparison") or {}).get("rgpo")
    if text and text.get("bare"):
        cases.append(("text-only step", "overhead_text", text))
    if not cases:
        return []
    pieces = [("generate (`model.eval()` + `build_prompts` + `model.generate`)", "generate_s", "rollout/text"),
              ("no-grad forwards (policy when needed + reference `forward_text`)", "forward_nograd_s", "rollout/forward"),
              ("images (`model.draw`: inputs + sampling + decode)", "images_s", "rollout/images"),
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
        steps = [x for x in res["steps"] if not x["warmup"]]
        bare = [x for x in res["bare"]["iterations"] if not x["warmup"]]
        pairs = [(s["step_s"] - b["total_s"]) / s["step_s"] for s, b in zip(steps, bare)]
        fastest = min(x["step_s"] for x in steps)
        fastest_bare = min(x["total_s"] for x in bare)
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
