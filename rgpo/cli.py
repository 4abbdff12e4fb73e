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


def _sample(args: argparse.Namespace) -> int:
    import torch

    from rgpo.building import load_trained
    from rgpo.data import load_prompts
    from rgpo.models import ImageSamplingConfig
    from rgpo.tracking import contact_sheet, side_by_side

    model, cfg = load_trained(args.checkpoint, model_path=args.model_path)
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
        images: list[list] = [[] for _ in rows]
        if cfg.rollout.image.enabled:
            fwd = model.forward_text(prompts, completions, with_condition=True)
            drawn = model.draw(fwd.condition, model.initial_noise(len(rows), 1, icfg), icfg)
            images = [[image] for image in drawn]
    for i, (row, text, chain_images) in enumerate(zip(rows, completions.texts, images)):
        for j, image in enumerate(chain_images):
            image.save(out / (f"{i:04d}.png" if len(chain_images) == 1 else f"{i:04d}-{j}.png"))
        (out / f"{i:04d}.txt").write_text(f"{row.prompt}\n\n{text}\n")
    sheets = [(side_by_side(ims), f"{r.prompt} | {t}") for r, t, ims in zip(rows, completions.texts, images) if ims]
    if sheets:
        contact_sheet([s[0] for s in sheets], [s[1] for s in sheets]).save(out / "contact_sheet.png")
    print(f"wrote {sum(len(ims) for ims in images)} images, the reasoning of {len(rows)} prompts and "
          f"contact_sheet.png to {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from rgpo.building import load_trained

    model, _ = load_trained(args.checkpoint, model_path=args.model_path)
    model.save_pretrained(args.out)
    print(f"wrote the trained model in the {model.family} release layout to {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rgpo.demo import run_demo

    run_demo(args.config, args.overrides, eval_prompts=args.eval_prompts, samples_per_prompt=args.samples)
    return 0


def _eval_toy(args: argparse.Namespace) -> int:
    import json

    from rgpo.building import build_model, load_trained
    from rgpo.config import load_config
    from rgpo.demo import default_config, evaluate_model

    if args.checkpoint:
        model, cfg = load_trained(args.checkpoint, model_path=args.model_path)
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
    sample.add_argument("--model-path", default=None,
                        help="the base model folder, when not where the checkpoint's run found it")
    sample.set_defaults(func=_sample)

    export = sub.add_parser("export", help="write a checkpoint's model (LoRA merged) in its family's release layout")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--model-path", default=None,
                        help="the base model folder, when not where the checkpoint's run found it")
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
    toy_eval.add_argument("--model-path", default=None,
                          help="the base model folder, when not where the checkpoint's run found it")
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
