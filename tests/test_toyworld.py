"""The toy world: its prompts, split, grading and pictures; the shipped models; a shortened RGPO run learns."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from rgpo import toyworld as world

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "rgpo" / "assets" / "toyworld"


def test_held_out_prompts_are_never_in_training_but_their_parts_are_with_every_answer():
    train, held = world.prompts("train"), world.prompts("heldout")
    assert {(p.expression, p.clue) for p in held} == set(world.HELD_OUT)
    assert not {(p.expression, p.clue) for p in train} & set(world.HELD_OUT)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert len(held) * 2 == len(train)  # a third held out
    # every sum and every clue is seen in training, and no part predicts the other there: each clue comes with
    # every shape and each sum with every colour (no "red things are never circles" shortcut)
    assert {(p.clue, p.shape) for p in train} == {(c, s) for cs in world.COLOUR_CLUES.values() for c in cs
                                                 for s in world.SHAPES}
    assert {(p.expression, p.colour) for p in train} == {(e, c) for es in world.EXPRESSIONS.values() for e in es
                                                        for c in world.COLOURS}
    assert {(p.colour, p.shape) for p in held} == {(c, s) for c in world.COLOURS for s in world.SHAPES}
    assert all(p.split == "heldout" for p in held) and all(p.split == "train" for p in train)


def test_sums_and_clues_determine_the_answer():
    p = next(q for q in world.prompts("all") if q.clue == "a ripe banana" and q.expression == (1, "+", 2))
    assert p.gt_prompt == "a yellow triangle"
    assert "(1 + 2) corners" in p.prompt and "a ripe banana" in p.prompt
    for q in world.prompts("all"):
        a, op, b = q.expression
        assert (a + b if op == "+" else a - b) == world.CORNERS[q.shape]
        assert q.clue in world.COLOUR_CLUES[q.colour]
        assert not any(c in q.clue for c in world.COLOURS)  # the clue never gives the colour away


def test_grade_accepts_exactly_the_right_pair():
    p = next(q for q in world.prompts("all") if (q.colour, q.shape) == ("blue", "triangle"))
    assert world.grade(world.chain(p), "blue", "triangle")
    assert not world.grade(world.chain(p, colour="red"), "blue", "triangle")
    assert not world.grade(world.chain(p, corners=4), "blue", "triangle")
    assert not world.grade("<think> x </think> a blue triangle", "blue", "triangle")  # no answer tag
    assert not world.grade("<answer> a blue or red triangle </answer>", "blue", "triangle")  # hedging
    assert world.grade("<answer> A Blue triangle </answer>", "blue", "triangle")


def test_imperfect_chains_follow_their_own_reasoning_at_the_set_rates():
    from rgpo.rewards.format import format_reward

    rng = random.Random(0)
    rows = world.prompts("train")
    picked = [rng.choice(rows) for _ in range(2000)]
    texts = [world.sft_chain(p, rng, p_sum=0.4, p_colour=0.4, p_format=0.15) for p in picked]
    correct = sum(world.grade(t, p.colour, p.shape) for p, t in zip(picked, texts)) / len(texts)
    formatted = sum(format_reward([], texts)) / len(texts)
    assert abs(correct - 0.6 * 0.6 * (1 - 0.15 / 2)) < 0.04  # "no_answer_tags" chains grade as wrong
    assert abs(formatted - 0.85) < 0.03
    slip = world.chain(picked[0], corners=0)
    assert "= 0 , and 0 corners make a circle" in slip and slip.endswith("circle </answer>")


def test_pictures_show_the_colour_and_are_reproducible():
    a, caps = world.pictures(per_pair=2, seed=3)
    b, _ = world.pictures(per_pair=2, seed=3)
    assert len(a) == 2 * 18 and caps[0] == "a red circle"
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    centre = a[caps.index("a yellow square")].resize((1, 1)).getpixel((0, 0))
    assert centre[0] > centre[2] + 40 and centre[1] > centre[2] + 40  # yellow: red and green over blue
    with pytest.raises(ValueError, match="colour must be one of"):
        world.draw("teal", "circle", random.Random(0))


def test_shipped_world_matches_the_builder_and_loads():
    """The artifacts ship (small) and load through the normal paths: model layout, CLIP weights, data files."""
    build = json.loads((ASSETS / "build.json").read_text())
    size = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"toy world artifacts are {size / 2**20:.1f} MiB"
    rows = [json.loads(line) for line in (ASSETS / "heldout.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p.prompt for p in world.prompts("heldout")]
    assert all(r["gt_prompt"] == f"a {r['colour']} {r['shape']}" for r in rows)
    assert build["clip"]["top1_accuracy"] > 0.9

    from rgpo.models.mindomni import MindOmni

    model = MindOmni.from_pretrained(str(ASSETS / "model"))
    assert model.system_prompt == world.SYSTEM_PROMPT  # the world's own prompts travel with the checkpoint
    assert model.latent_shape(32, 32) == (4, 8, 8)


def test_rollout_images_have_the_configured_size_with_the_worlds_factor_4_vae(tmp_path):
    """The world's VAE downsamples by 4 (not the real model's 8): rollout noise must follow the model's own
    latent shape, or the decoder would sample 16x16 pictures where 32x32 were asked for."""
    from rgpo.config import load_config
    from rgpo.tracking import PhaseTimer
    from rgpo.trainer import RGPOTrainer

    cfg = load_config(str(ROOT / "configs" / "toy_world.yaml"), [
        f"logging.output_dir={tmp_path}", "logging.mode=disabled", "logging.progress_bar=false",
        "rollout.batch_size=8", "rollout.num_generations=4", "optim.micro_batch_size=8"])
    trainer = RGPOTrainer(cfg)
    try:
        rollout = trainer.rollout(trainer.sampler.next_step(), PhaseTimer())
    finally:
        trainer.close()
    assert [[im.size for im in chain] for chain in rollout.images] == [[(32, 32)]] * 8


@pytest.mark.slow
def test_a_shortened_rgpo_run_on_the_toy_world_raises_the_reward(tmp_path):
    """The real thing, shortened: RGPO on the shipped toy world (LoRA, format + CLIP rewards, image KL on).
    The mean reward of the last steps beats that of the first ones, and so does the CLIP consistency alone:
    the policy moves toward chains whose pictures match the correct description."""
    from rgpo.config import load_config
    from rgpo.tracking import read_metrics
    from rgpo.trainer import RGPOTrainer

    steps = 24
    cfg = load_config(str(ROOT / "configs" / "toy_world.yaml"), [
        f"logging.output_dir={tmp_path}", "logging.mode=disabled", "logging.progress_bar=false",
        f"optim.max_steps={steps}", "checkpoint.every=0"])
    trainer = RGPOTrainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    history = read_metrics(tmp_path / "metrics.jsonl")
    assert sorted(history) == list(range(1, steps + 1))

    def mean(key, part):
        values = [history[s][key] for s in part]
        return sum(values) / len(values)

    first, last = range(1, 7), range(steps - 5, steps + 1)
    assert mean("reward/total", last) > mean("reward/total", first) + 0.05
    assert mean("reward/format/mean", last) > mean("reward/format/mean", first)


def test_clip_when_correct_averages_the_correct_chains_only():
    samples = [{"correct": True, "clip": 0.9}, {"correct": False, "clip": 0.1}, {"correct": True, "clip": 0.7}]
    ev = world.ToyEvaluation(format_rate=1.0, reasoning_accuracy=2 / 3, clip_consistency=1.7 / 3, samples=samples)
    assert ev.clip_when_correct == pytest.approx(0.8)
    assert ev.figures()["clip_when_correct"] == pytest.approx(0.8)
    assert math.isnan(world.ToyEvaluation(0.0, 0.0, 0.1, [{"correct": False, "clip": 0.1}]).clip_when_correct)
