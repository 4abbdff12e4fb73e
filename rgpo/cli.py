"""``rgpo`` command line: ``rgpo train``, ``sample``, ``export``, ``config``, ``demo``, ``eval-toy``, ``eval``.

    rgpo train --config configs/tiny.yaml optim.max_steps=20
    deepspeed --num_gpus 8 --module rgpo train --config configs/mindomni_rgpo.yaml model.path=/ckpt/MindOmni
    rgpo config show --config configs/tiny.yaml optim.lr=2e-5     # the resolved config
    rgpo config keys                                               # every key with its documentation
    rgpo sample --checkpoint outputs/run-1a2b3c4d/checkpoints/step-0000050 --prompts prompts.jsonl --out samples/
    rgpo export --checkpoint outputs/run-1a2b3c4d/checkpoints/step-0000600 --out rgpo-trained/
    rgpo demo                                   # RGPO on the embedded toy world, evaluated before and after
    rgpo eval-toy --checkpoint outputs/toy_world/checkpoints/step-0000040
    rgpo eval wise --checkpoint outputs/run-1a2b3c4d/checkpoints/step-0000600 --data WISE/data_verified \
        --judge /models/Qwen2.5-VL-72B-Instruct --out wise/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from rgpo.checkpointing import RunFinished
    from rgpo.config import load_config
    from rgpo.trainer import RGPOTrainer

    cfg = load_config(args.config, args.overrides)
    try:
        trainer = RGPOTrainer(cfg)
    except RunFinished as done:
        print(f"rgpo: {done}", flush=True)
        return 0
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
    from tqdm.auto import tqdm

    from rgpo.building import load_trained
    from rgpo.data import load_prompts
    from rgpo.evaluation.sampling import sample_chains
    from rgpo.models import ImageSamplingConfig
    from rgpo.scoring import completion_id_lists, score_samples
    from rgpo.tracking import contact_sheet, side_by_side

    model, cfg = load_trained(args.checkpoint, model_path=args.model_path)
    rows = load_prompts(args.prompts)[: args.limit or None]
    image = cfg.rollout.image
    icfg = ImageSamplingConfig(height=args.height or image.height, width=args.width or image.width,
                               steps=args.steps or image.steps, guidance_scale=image.guidance_scale, seed=args.seed,
                               shared_noise=False)
    temperature = cfg.rollout.temperature if args.temperature is None else args.temperature
    max_new_tokens = args.max_new_tokens or cfg.rollout.max_new_tokens
    rewards = []
    if not args.no_score:
        from rgpo import rewards as reward_lib

        rewards = reward_lib.get_rewards(cfg.rewards.functions)
        available = set().union(*(row.columns for row in rows)) if rows else set()
        lacking = {r.name: [c for c in reward_lib.registry.required_columns(r) if c not in available] for r in rewards}
        for name, columns in lacking.items():
            if columns:
                print(f"rgpo: reward {name!r} is not scored: the prompts lack its column(s) {columns}", file=sys.stderr)
        rewards = [r for r in rewards if not lacking[r.name]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    texts: list[str] = []
    images: list[list] = []
    scores: list[list[float]] = []
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), args.batch_size), desc="sample", unit="batch"):
            batch = rows[start : start + args.batch_size]
            # each prompt's noise from its own index: the same image whatever the batch size
            completions, drawn = sample_chains(model, [r.as_model_row() for r in batch], max_new_tokens=max_new_tokens,
                                               temperature=temperature, generator=generator,
                                               image=icfg if image.enabled else None,
                                               noise_seeds=[args.seed + start + i for i in range(len(batch))])
            if rewards:
                per_reward = score_samples(rewards, batch, completions.texts, drawn, cfg.rewards,
                                           torch.device("cpu"), completion_id_lists(completions))
                scores += per_reward.tolist()
            texts += completions.texts
            images += drawn
    names = [r.name for r in rewards]
    with open(out / "samples.jsonl", "w") as f:
        for i, (row, text, chain_images) in enumerate(zip(rows, texts, images)):
            files = []
            for j, im in enumerate(chain_images):
                files.append(f"{i:04d}.png" if len(chain_images) == 1 else f"{i:04d}-{j}.png")
                im.save(out / files[-1])
            (out / f"{i:04d}.txt").write_text(f"{row.prompt}\n\n{text}\n")
            record = {"prompt": row.prompt, "completion": text, "images": files}
            if scores:
                record["rewards"] = dict(zip(names, scores[i]))
            f.write(json.dumps(record) + "\n")
    sheets = [(side_by_side(ims), f"{r.prompt} | {t}") for r, t, ims in zip(rows, texts, images) if ims]
    if sheets:
        contact_sheet([s[0] for s in sheets], [s[1] for s in sheets]).save(out / "contact_sheet.png")
    summary = ""
    if scores:
        means = torch.tensor(scores).nanmean(0).tolist()
        summary = "; mean " + ", ".join(f"{n}={m:.4f}" for n, m in zip(names, means))
    print(f"wrote {sum(len(ims) for ims in images)} images and the reasoning of {len(rows)} prompts to {out} "
          f"(samples.jsonl, contact_sheet.png){summary}")
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


def _eval_model(args: argparse.Namespace):
    """The model an evaluation runs and its config: a training checkpoint's, loaded as ``rgpo sample`` loads it,
    or the one ``--model-path`` names (a released-layout folder, ``tiny``, ``random:<shape>``) under ``--config``
    and the overrides."""
    import torch

    from rgpo.building import build_model, load_trained
    from rgpo.config import ConfigError, load_config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.checkpoint:
        return load_trained(args.checkpoint, device=device, model_path=args.model_path)
    if not args.model_path:
        raise ConfigError("give --checkpoint (a training checkpoint) or --model-path (a released-layout folder, "
                          "tiny or random:<shape>)")
    family = [f"model.family={args.family}"] if args.family else []
    cfg = load_config(args.config or None, [f"model.path={args.model_path}", *family, *args.overrides])
    return build_model(cfg, device=device).to(device).eval(), cfg


def _eval_wise(args: argparse.Namespace) -> int:
    import torch

    from rgpo.config import ConfigError
    from rgpo.evaluation.judge import VLMJudge, check_judge_folder, get_protocol
    from rgpo.evaluation.sampling import sample_chains
    from rgpo.evaluation.wise import evaluate_wise, load_wise_prompts, select_subset, summary
    from rgpo.models import ImageSamplingConfig

    # --data's list also took the key=value overrides that follow it
    args.overrides = [d for d in args.data if "=" in d] + list(args.overrides)
    args.data = [d for d in args.data if "=" not in d]
    # Everything cheap is checked before the model and the judge load.
    protocol = get_protocol(args.protocol)
    prompts = select_subset(load_wise_prompts(args.data), args.subset, args.seed)
    check_judge_folder(args.judge)
    model, cfg = _eval_model(args)
    image = cfg.rollout.image
    if not image.enabled:
        raise ConfigError("rollout.image.enabled=false: WISE judges the image each chain draws")
    icfg = ImageSamplingConfig(height=args.height or image.height, width=args.width or image.width,
                               steps=args.steps or image.steps, guidance_scale=image.guidance_scale, seed=args.seed,
                               shared_noise=False)
    temperature = cfg.rollout.temperature if args.temperature is None else args.temperature
    max_new_tokens = args.max_new_tokens or cfg.rollout.max_new_tokens
    judge = VLMJudge(args.judge, device=args.judge_device or next(model.parameters()).device,
                     dtype=args.judge_dtype, batch_size=args.judge_batch_size, max_new_tokens=args.judge_max_new_tokens)

    def generate(batch):
        # The image of a prompt comes from its id's noise, whatever the batch: a resumed run draws the same.
        gen = torch.Generator().manual_seed(args.seed + batch[0].prompt_id)
        completions, images = sample_chains(model, [{"prompt": p.prompt} for p in batch], max_new_tokens=max_new_tokens,
                                            temperature=temperature, generator=gen, image=icfg,
                                            noise_seeds=[args.seed + p.prompt_id for p in batch])
        return completions.texts, [ims[0] for ims in images]

    # What every record of one evaluation must share (the subset may grow: records are per prompt).
    settings = {"model": str(args.checkpoint or args.model_path), "judge": str(Path(args.judge).resolve()),
                "seed": args.seed, "temperature": temperature, "max_new_tokens": max_new_tokens,
                "image": [icfg.height, icfg.width, icfg.steps, icfg.guidance_scale]}
    result = evaluate_wise(prompts, out=args.out, protocol=protocol, generate=generate, judge=judge.answer,
                           batch_size=args.batch_size, settings=settings, log=lambda m: print(f"rgpo: {m}", flush=True))
    print(summary(result))
    print(f"wrote {Path(args.out) / 'wise.json'}, wise_prompts.jsonl, images/ and contact_sheets/")
    return 0


def _eval_understanding(args: argparse.Namespace) -> int:
    import torch

    from rgpo.evaluation.sampling import sample_chains
    from rgpo.evaluation.understanding import load_questions, score_answers

    questions = load_questions(args.questions)[: args.limit or None]
    model, cfg = _eval_model(args)
    max_new_tokens = args.max_new_tokens or cfg.rollout.max_new_tokens
    texts: list[str] = []
    for start in range(0, len(questions), args.batch_size):
        batch = questions[start : start + args.batch_size]
        completions, _ = sample_chains(model, [q.model_row() for q in batch], max_new_tokens=max_new_tokens,
                                       temperature=0.0, generator=torch.Generator().manual_seed(0), image=None)
        texts += completions.texts
    scored = score_answers(questions, texts)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in scored["records"]))
    print(json.dumps({k: v for k, v in scored.items() if k != "records"}))
    return 0


def _reward_server(args: argparse.Namespace) -> int:
    from rgpo.rewards.server import main as serve

    return serve(args.server_args)


def _config(args: argparse.Namespace) -> int:
    import yaml

    from rgpo.config import config_keys, load_config, to_dict, with_output_dir

    if args.action == "show":
        cfg = with_output_dir(load_config(args.config, args.overrides))
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    families = None
    if args.family:
        from rgpo.models import get_model_class

        families = {args.family: get_model_class(args.family)}
    else:
        from rgpo.models import MODEL_FAMILIES as families  # noqa: N811
    for key, type_name, default, doc in config_keys(families):
        print(f"{key}: {type_name} = {default!r}\n    {doc}\n")
    return 0


WISE_HELP = """Generate a reasoning chain and an image for every WISE prompt, ask a local judge WISE's rubric
question about each image, and report WISE's per-category and overall scores (rgpo.evaluation.wise).

  rgpo eval wise --checkpoint outputs/run-1/checkpoints/step-0000600 --data WISE/data_verified \\
      --judge /models/Qwen2.5-VL-72B-Instruct --out wise-step600/
  rgpo eval wise --model-path /ckpt/MindOmni --config configs/mindomni_rgpo.yaml --data WISE/data_verified \\
      --judge /models/Qwen2.5-VL-7B-Instruct --out wise-base/ --subset 120     # the starting model, a subset
"""

TRAIN_EPILOG = """config keys (rgpo config keys lists each with its documentation; rgpo config show prints a resolved
config): model.{family,path,options,dtype}, trainable.{mode,lora_r,full_parts,generator_lora_r},
data.{train_file,eval_file}, rollout.{num_generations,batch_size,max_new_tokens,image.*}, rewards.functions,
loss.{beta,image_kl_coef,image_regularizer,...}, optim.{lr,max_steps,micro_batch_size}, deepspeed.config,
logging.output_dir, checkpoint.{every,resume}, eval.every"""


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="extend", nargs="+", default=[], metavar="YAML",
                        help="YAML file(s); later ones override earlier (--config a.yaml b.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=2e-5")


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own_version = version("rgpo")
    except PackageNotFoundError:  # run from a source tree that was never installed
        own_version = "unknown (not installed)"
    parser = argparse.ArgumentParser(prog="rgpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"rgpo {own_version}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a configuration, data or "
                        "reward error (they print one clean message by default)")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run RGPO (also under deepspeed / torchrun: python -m rgpo train ...)",
                           epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_arguments(train)
    train.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # appended by deepspeed
    train.set_defaults(func=_train)

    server = sub.add_parser("reward-server", add_help=False,
                            help="serve rewards over HTTP for runs to list as `remote` (rgpo reward-server --help)")
    server.add_argument("server_args", nargs=argparse.REMAINDER)
    server.set_defaults(func=_reward_server)

    config = sub.add_parser("config", help="show the resolved config, or list every key with its documentation")
    config.add_argument("action", choices=["show", "keys"])
    config.add_argument("--family", default=None, help="keys: only this family's model.options")
    _add_config_arguments(config)
    config.set_defaults(func=_config)

    sample = sub.add_parser("sample", help="reasoning chains and images from a checkpoint, with a contact sheet")
    sample.add_argument("--checkpoint", required=True)
    sample.add_argument("--prompts", required=True, help="JSONL prompt file")
    sample.add_argument("--out", required=True)
    sample.add_argument("--limit", type=int, default=0)
    sample.add_argument("--seed", type=int, default=42)
    sample.add_argument("--temperature", type=float, default=None, help="default: the run's rollout.temperature")
    sample.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    sample.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's")
    sample.add_argument("--height", type=int, default=None, help="default: the run's image height")
    sample.add_argument("--width", type=int, default=None, help="default: the run's image width")
    sample.add_argument("--steps", type=int, default=None, help="denoising steps; default: the run's")
    sample.add_argument("--no-score", action="store_true", help="do not score the samples with the run's rewards")
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

    evaluation = sub.add_parser("eval", help="benchmarks: WISE with a local judge; the understanding probe")
    benchmarks = evaluation.add_subparsers(dest="benchmark", required=True)
    wise = benchmarks.add_parser("wise", help="WISE (world-knowledge text-to-image): generate, judge, score; "
                                 "resumable", description=WISE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    understanding = benchmarks.add_parser("understanding", help="accuracy on multiple-choice questions with images")
    for command in (wise, understanding):
        command.add_argument("--checkpoint", default=None, help="a training checkpoint (as rgpo sample takes)")
        command.add_argument("--model-path", default=None, help="a released-layout model folder, tiny or "
                             "random:<shape>; with --checkpoint: the base model folder, when moved")
        command.add_argument("--family", default=None, help="the model family (needed for tiny)")
        command.add_argument("--config", action="extend", nargs="+", default=[], metavar="YAML",
                             help="run config(s) for --model-path (dtype, image size, sampling)")
        command.add_argument("--device", default=None, help="default: cuda when available, else cpu")
        command.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
        command.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's rollout's")
        command.add_argument("overrides", nargs="*", help="key.sub=value config overrides (with --model-path)")
    wise.add_argument("--data", required=True, nargs="+", help="WISE's data_verified/ folder or merge.json, or "
                      "prompt files (the paper's: WISE_legacy/data/{cultural_common_sense,spatio-temporal_reasoning,"
                      "natural_science}.json)")
    wise.add_argument("--judge", required=True, help="local judge folder (Qwen2.5-VL-style model + processor)")
    wise.add_argument("--out", required=True, help="output folder; rerun with the same one to resume")
    wise.add_argument("--protocol", choices=["legacy", "verified"], default="legacy",
                      help="legacy: the paper's consistency/realism/aesthetics WiScore; verified: WISE_Verified's "
                      "binary score")
    wise.add_argument("--subset", type=int, default=0, help="a fixed subset of N prompts spread over the "
                      "categories; 0: all")
    wise.add_argument("--seed", type=int, default=42, help="noise of prompt i: seed + prompt_id; subset draw")
    wise.add_argument("--temperature", type=float, default=None, help="default: the config's rollout temperature")
    wise.add_argument("--height", type=int, default=None, help="default: the config's image height")
    wise.add_argument("--width", type=int, default=None, help="default: the config's image width")
    wise.add_argument("--steps", type=int, default=None, help="denoising steps; default: the config's")
    wise.add_argument("--judge-device", default=None, help="default: the model's device")
    wise.add_argument("--judge-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    wise.add_argument("--judge-batch-size", type=int, default=4)
    wise.add_argument("--judge-max-new-tokens", type=int, default=None,
                      help="default: WISE's (2000 legacy, 500 verified)")
    wise.set_defaults(func=_eval_wise)
    understanding.add_argument("--questions", required=True, help="JSONL of multiple-choice questions with images")
    understanding.add_argument("--limit", type=int, default=0, help="the first N questions; 0: all")
    understanding.add_argument("--out", default=None, help="write each question's record to this JSONL")
    understanding.set_defaults(func=_eval_understanding)
    return parser


def without_launcher_arguments(argv: list[str]) -> list[str]:
    """``argv`` without the ``--local_rank=N`` (or ``--local_rank N``) that the ``deepspeed`` launcher puts right
    after the module name (before rgpo's subcommand); the rank is read from the ``LOCAL_RANK`` variable the
    launcher also sets."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = without_launcher_arguments(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    from rgpo.console import quiet_known_noise

    quiet_known_noise()
    if hasattr(args, "config") and isinstance(args.config, list):
        # --config a.yaml b.yaml key=value: the greedy file list also took the overrides that follow it
        args.overrides = [c for c in args.config if "=" in c] + list(args.overrides)
        args.config = [c for c in args.config if "=" not in c]
    from rgpo.checkpointing import ResumeError
    from rgpo.config import ConfigError
    from rgpo.data import DataError
    from rgpo.evaluation.judge import JudgeError
    from rgpo.rewards.registry import RewardError

    user_errors = (ConfigError, DataError, RewardError, ResumeError, FileNotFoundError, JudgeError)
    try:
        return args.func(args)
    except user_errors as e:
        if args.debug:
            raise
        # A mistake in the input: one clean line naming what and where (the traceback would only bury it).
        print(f"rgpo: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
