"""``rgpo`` command line: ``rgpo train``, ``sample``, ``export``, ``demo``, ``eval-toy``.

    rgpo train --config configs/tiny.yaml optim.max_steps=20
    deepspeed --num_gpus 8 scripts/train.py --config configs/mindomni_rgpo.yaml model.path=/ckpt/MindOmni
    rgpo sample --checkpoint outputs/rgpo/checkpoints/step-0000050 --prompts prompts.jsonl --out samples/
    rgpo export --checkpoint outputs/rgpo/checkpoints/step-0000600 --out MindOmni-rgpo/
    rgpo demo                                   # RGPO on the embedded toy world, evaluated before and after
    rgpo eval-toy --checkpoint outputs/toy_world/checkpoints/step-0000040
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from rgpo.config import load_config
    from rgpo.trainer import RGPOTrainer

    cfg = load_config(args.config, args.overrides)
    trainer = RGPOTrainer(cfg)
    try:
        metrics = trainer.train()
    finally:
        trainer.close()
    if trainer.rank == 0 and metrics:
        keys = [k for k in ("reward/total", "kl/text", "kl/image", "completion/mean_length") if k in metrics]
        print("final step:", ", ".join(f"{k}={metrics[k]:.4f}" for k in keys), flush=True)
    return 0


def load_trained(checkpoint: str, device: str = "cpu"):
    """The model of a checkpoint with its trained weights applied (LoRA merged)."""
    from safetensors.torch import load_file

    from rgpo import checkpointing as ckpt
    from rgpo.config import load_config
    from rgpo.trainer import apply_trainable, build_model

    path = Path(checkpoint)
    state = ckpt.read_state(path)
    cfg = load_config(None, ["model.gradient_checkpointing=false"], values=state["config"])
    model = apply_trainable(build_model(cfg), cfg)
    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(weights) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"{path}/trainable.safetensors holds weights this model lacks, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(weights, strict=False)
    if cfg.trainable.mode == "lora":
        model.vlm = model.vlm.merge_and_unload()
    return model.to(device).eval(), cfg


def _sample(args: argparse.Namespace) -> int:
    import torch

    from rgpo.data import load_prompts
    from rgpo.models.base import ImageSamplingConfig
    from rgpo.tracking import contact_sheet
    from rgpo.trainer import draw_images

    model, cfg = load_trained(args.checkpoint)
    rows = load_prompts(args.prompts)[: args.limit or None]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    icfg = ImageSamplingConfig(height=cfg.rollout.image.height, width=cfg.rollout.image.width,
                               steps=cfg.rollout.image.steps, guidance_scale=cfg.rollout.image.guidance_scale,
                               seed=args.seed, shared_noise=False)
    with torch.no_grad():
        prompts = model.build_prompts([r.as_model_row() for r in rows])
        completions = model.generate(prompts, num_generations=1, max_new_tokens=cfg.rollout.max_new_tokens,
                                     temperature=args.temperature, generator=torch.Generator().manual_seed(args.seed))
        fwd = model.forward_text(prompts, completions, with_condition=True)
        images = draw_images(model, fwd.condition, fwd.condition_mask, model.initial_noise(len(rows), 1, icfg), icfg)
    for i, (row, text, image) in enumerate(zip(rows, completions.texts, images)):
        image.save(out / f"{i:04d}.png")
        (out / f"{i:04d}.txt").write_text(f"{row.prompt}\n\n{text}\n")
    contact_sheet(images, [f"{r.prompt} | {t}" for r, t in zip(rows, completions.texts)]).save(out / "contact_sheet.png")
    print(f"wrote {len(images)} images, their reasoning and contact_sheet.png to {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    model, _ = load_trained(args.checkpoint)
    model.save_pretrained(args.out)
    print(f"wrote the trained model in the MindOmni layout to {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rgpo.demo import run_demo

    run_demo(args.config, args.overrides, eval_prompts=args.eval_prompts, samples_per_prompt=args.samples)
    return 0


def _eval_toy(args: argparse.Namespace) -> int:
    import json

    from rgpo.config import load_config
    from rgpo.demo import default_config, evaluate_model
    from rgpo.trainer import build_model

    if args.checkpoint:
        model, cfg = load_trained(args.checkpoint)
    else:
        cfg = load_config(args.config or default_config(), args.overrides)
        model = build_model(cfg)
    result = evaluate_model(model, cfg, args.eval_prompts, args.samples, args.seed)
    print(json.dumps(result.figures()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rgpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run RGPO (single process; use scripts/train.py under deepspeed/torchrun)")
    train.add_argument("--config", action="append", default=[], help="YAML file(s), later ones override earlier")
    train.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # appended by deepspeed
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    train.set_defaults(func=_train)

    sample = sub.add_parser("sample", help="reasoning chains and images from a checkpoint, with a contact sheet")
    sample.add_argument("--checkpoint", required=True)
    sample.add_argument("--prompts", required=True, help="JSONL prompt file")
    sample.add_argument("--out", required=True)
    sample.add_argument("--limit", type=int, default=0)
    sample.add_argument("--seed", type=int, default=42)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.set_defaults(func=_sample)

    export = sub.add_parser("export", help="write a checkpoint's model in the MindOmni release layout")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--out", required=True)
    export.set_defaults(func=_export)

    demo = sub.add_parser("demo", help="RGPO on the embedded toy world (CPU, minutes), evaluated before and after")
    demo.add_argument("--config", default=None, help="default: configs/toy_world.yaml")
    demo.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts in each evaluation")
    demo.add_argument("--samples", type=int, default=4, help="chains sampled per held-out prompt")
    demo.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    demo.set_defaults(func=_demo)

    toy_eval = sub.add_parser("eval-toy", help="held-out format rate, reasoning accuracy and CLIP consistency "
                              "of a toy-world model (a checkpoint, or the config's starting model)")
    toy_eval.add_argument("--checkpoint", default=None, help="a training checkpoint; default: the starting model")
    toy_eval.add_argument("--config", default=None, help="default: configs/toy_world.yaml")
    toy_eval.add_argument("--eval-prompts", type=int, default=64)
    toy_eval.add_argument("--samples", type=int, default=4)
    toy_eval.add_argument("--seed", type=int, default=0)
    toy_eval.add_argument("overrides", nargs="*")
    toy_eval.set_defaults(func=_eval_toy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
