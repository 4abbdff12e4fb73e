"""``rgpo demo``: RGPO on the embedded toy world, measured before and after on held-out prompts.

1. evaluates the starting policy on held-out prompts (:func:`rgpo.toyworld.evaluate`);
2. trains with ``configs/toy_world.yaml`` (LoRA, format + clip_consistency rewards, image KL on, wandb offline);
3. evaluates the final checkpoint on the same prompts with the same seed;
4. writes ``reward_curve.png``, ``before_after.png`` (held-out prompts, reasoning under each image),
   ``eval.json``, and prints a short table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "configs/toy_world.yaml"


def default_config() -> str:
    """``configs/toy_world.yaml`` from the working directory, else the one rgpo ships."""
    from rgpo.config import find_config_file

    return str(find_config_file(DEFAULT_CONFIG))


def clip_reward_of(cfg):
    """The ``clip_consistency`` reward the config trains with (the evaluation's judge), built by the reward
    registry as the trainer builds it."""
    from rgpo.rewards import get_reward

    for spec in cfg.rewards.functions:
        if spec.name == "clip_consistency":
            return get_reward(spec)
    raise ValueError("the toy-world evaluation needs a clip_consistency reward in rewards.functions")


def evaluate_model(model, cfg, num_prompts: int, samples_per_prompt: int, seed: int):
    from rgpo import toyworld

    rows = toyworld.select(toyworld.prompts("heldout"), num_prompts, seed=seed)
    image = cfg.rollout.image
    return toyworld.evaluate(model, rows, clip_reward_of(cfg), samples_per_prompt=samples_per_prompt, seed=seed,
                             max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                             image_steps=image.eval_steps if image.eval_steps is not None else image.steps,
                             image_size=image.height)


def latest_checkpoint(output_dir: str | Path) -> Path:
    from rgpo import checkpointing as ckpt

    found = ckpt.newest_complete(output_dir)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt.checkpoint_root(output_dir)}")
    return found


def reward_curve(metrics_file: Path, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rgpo.tracking import read_metrics

    history = read_metrics(metrics_file)
    steps = list(history)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for key, label in (("reward/total", "total"), ("reward/format/mean", "format"),
                       ("reward/clip_consistency/mean", "clip consistency")):
        values = [history[s].get(key) for s in steps]
        if any(v is not None for v in values):
            ax.plot(steps, values, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of the step's chains")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def before_after_sheet(before, after, out: Path, count: int = 8) -> Path:
    """The first sample of the first ``count`` prompts, before (left) and after (right), reasoning beneath."""
    from rgpo.tracking import contact_sheet

    images, captions = [], []
    seen: list[str] = []
    for b, a in zip(before.samples, after.samples):
        if b["prompt"] in seen:
            continue
        seen.append(b["prompt"])
        for tag, s in (("BEFORE", b), ("AFTER", a)):
            images.append(s["image"].resize((96, 96)))
            mark = "right" if s["correct"] else "wrong"
            captions.append(f"{tag} ({mark}) {s['prompt']} -> {s['completion']}")
        if len(seen) == count:
            break
    contact_sheet(images, captions, columns=4, caption_lines=9, width=40).save(out)
    return out


def table(rows: dict[str, dict[str, float]]) -> str:
    keys = ("format_rate", "reasoning_accuracy", "clip_consistency")
    lines = ["| held-out | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, figures in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{figures[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def run_demo(config: str | None = None, overrides: list[str] | None = None, *, eval_prompts: int = 64,
             samples_per_prompt: int = 4, eval_seed: int = 0) -> dict[str, Any]:
    from rgpo.building import build_model, load_trained
    from rgpo.config import load_config
    from rgpo.trainer import RGPOTrainer

    start = time.perf_counter()
    config, overrides = config or default_config(), overrides or []
    cfg = load_config(config, overrides)
    out = Path(cfg.logging.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"toy world: evaluating the starting policy on {eval_prompts} held-out prompts x {samples_per_prompt}",
          flush=True)
    before = evaluate_model(build_model(cfg), cfg, eval_prompts, samples_per_prompt, eval_seed)
    print(f"  before: {before.figures()}", flush=True)

    trainer = RGPOTrainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()

    model, _ = load_trained(str(latest_checkpoint(out)))
    after = evaluate_model(model, cfg, eval_prompts, samples_per_prompt, eval_seed)
    seconds = time.perf_counter() - start

    figures = {"before": before.figures(), "after": after.figures()}
    report = {"config": config, "overrides": overrides, "eval_prompts": eval_prompts,
              "samples_per_prompt": samples_per_prompt, "eval_seed": eval_seed, "seconds": round(seconds, 1),
              **figures}
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    curve = reward_curve(out / "metrics.jsonl", out / "reward_curve.png",
                         f"RGPO on the toy world (lr {cfg.optim.lr:g}, seed {cfg.data.seed})")
    sheet = before_after_sheet(before, after, out / "before_after.png")
    print()
    print(table({"before": figures["before"], "after": figures["after"]}))
    print(f"\n{seconds / 60:.1f} min. Wrote {curve}, {sheet}, {out / 'eval.json'}; wandb run under {out / 'wandb'}"
          " (offline: `wandb sync` it to upload).")
    return report
