"""The toy world: prompts that need one reasoning step before drawing, with known answers.

"a shape with (1 + 2) corners, in the colour of a ripe banana" -> "a yellow triangle". A prompt names the
shape through a small sum (its number of corners: 0 circle, 3 triangle, 4 square) and the colour through an
object of that colour. The correct description (``gt_prompt``) is known, so the reasoning of a chain can be
graded exactly, and its image can be compared with the truth by a CLIP trained on the world's pictures.

The split is by (sum, colour clue) combination: a third of the combinations are held out, so a held-out prompt
was never seen in training, while each of its parts was, in other prompts, with every colour and every shape.
A policy can answer a held-out prompt only by working out each part (recall of whole prompts fails), and no
part predicts the other in training, so there is no shortcut for RL to exploit either: holding out whole
colour x shape pairs instead would let a policy learn "red things are never circles" from the training
prompts, which RL could amplify at the expense of the held-out pairs.

Everything here is plain Python and PIL; the models of the world are built by ``scripts/build_toy_world.py``
and evaluated by :func:`evaluate` (``scripts/eval_toy.py``, ``rgpo demo``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = [
    "COLOURS",
    "COLOUR_CLUES",
    "CORNERS",
    "HELD_OUT",
    "SHAPES",
    "ToyPrompt",
    "chain",
    "draw",
    "grade",
    "prompts",
    "sft_chain",
    "write_jsonl",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 25),
    "green": (40, 160, 55),
    "blue": (35, 75, 215),
    "purple": (140, 50, 175),
}
# Objects whose colour everyone knows; none of them contains a colour word.
COLOUR_CLUES: dict[str, tuple[str, ...]] = {
    "red": ("a ripe tomato", "a fire engine", "a ripe strawberry"),
    "orange": ("a ripe tangerine", "a pumpkin", "a carrot"),
    "yellow": ("a ripe banana", "a lemon", "a sunflower"),
    "green": ("fresh grass", "a lime", "an emerald"),
    "blue": ("a clear sky", "the deep sea", "a sapphire"),
    "purple": ("an eggplant", "lavender", "a plum"),
}
CORNERS: dict[str, int] = {"circle": 0, "triangle": 3, "square": 4}
SHAPES: tuple[str, ...] = tuple(CORNERS)
# Sums whose value is a number of corners; every one appears in training, with every shape.
EXPRESSIONS: dict[int, tuple[tuple[int, str, int], ...]] = {
    0: ((2, "-", 2), (1, "-", 1), (3, "-", 3), (4, "-", 4)),
    3: ((1, "+", 2), (2, "+", 1), (0, "+", 3), (5, "-", 2), (4, "-", 1)),
    4: ((1, "+", 3), (3, "+", 1), (2, "+", 2), (5, "-", 1), (6, "-", 2)),
}
TEMPLATES: tuple[str, ...] = (
    "a shape with ({expr}) corners, in the colour of {clue}",
    "draw a shape that has ({expr}) corners and the colour of {clue}",
    "the colour of {clue}, on a shape with ({expr}) corners",
)
_ALL_EXPRESSIONS = [e for n in sorted(EXPRESSIONS) for e in EXPRESSIONS[n]]
_ALL_CLUES = [c for clues in COLOUR_CLUES.values() for c in clues]
# Latin-square split: (sum i, clue j) is held out when (i + j) % 3 == 0. Each sum keeps two of the three clues
# of every colour in training, and each clue keeps two thirds of the sums, covering every shape.
HELD_OUT: frozenset[tuple[tuple[int, str, int], str]] = frozenset(
    (e, c) for i, e in enumerate(_ALL_EXPRESSIONS) for j, c in enumerate(_ALL_CLUES) if (i + j) % 3 == 0
)
_SHAPE_OF = {n: s for s, n in CORNERS.items()}
# The world's model is sampled with short prompts of its own (saved in its checkpoint's prompts.json): MindOmni's
# 90-token system prompt would be most of every sequence a CPU has to push through.
SYSTEM_PROMPT = "Reason in <think> </think>, then describe the picture in <answer> </answer>."
INSTRUCTION_PREFIX = "Draw:\n"
NEGATIVE_PROMPT = "a blurry picture"


@dataclass(frozen=True)
class ToyPrompt:
    """One prompt of the world and its known answer."""

    prompt: str
    colour: str
    shape: str
    clue: str
    expression: tuple[int, str, int]

    @property
    def gt_prompt(self) -> str:
        return describe(self.colour, self.shape)

    @property
    def split(self) -> str:
        return "heldout" if (self.expression, self.clue) in HELD_OUT else "train"

    def row(self) -> dict[str, Any]:
        """The JSONL row: ``prompt`` and ``gt_prompt`` as in MindOmni's data, plus the world's labels."""
        return {"prompt": self.prompt, "gt_prompt": self.gt_prompt, "colour": self.colour, "shape": self.shape,
                "split": self.split}


def describe(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def _expr_text(expr: tuple[int, str, int]) -> str:
    return f"{expr[0]} {expr[1]} {expr[2]}"


def prompts(split: str) -> list[ToyPrompt]:
    """Every prompt of ``split`` ("train", "heldout" or "all"), in a fixed order."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    out = []
    for colour, clues in COLOUR_CLUES.items():
        for shape, corners in CORNERS.items():
            for clue in clues:
                for expr in EXPRESSIONS[corners]:
                    for template in TEMPLATES:
                        text = template.format(expr=_expr_text(expr), clue=clue)
                        prompt = ToyPrompt(text, colour, shape, clue, expr)
                        if split in ("all", prompt.split):
                            out.append(prompt)
    return out


def chain(
    p: ToyPrompt, *, corners: int | None = None, colour: str | None = None, broken: str | None = None
) -> str:
    """A reasoning chain for ``p`` in MindOmni's format. ``corners`` / ``colour`` replace the correct results
    (a slip in the sum, a wrong colour) and the answer follows the reasoning; ``broken`` damages the format:
    "no_think_close" drops ``</think>``, "no_answer_tags" writes the answer bare."""
    a, op, b = p.expression
    n = CORNERS[p.shape] if corners is None else corners
    c = p.colour if colour is None else colour
    shape = _SHAPE_OF[n]
    think = f"{a} {op} {b} = {n} , and {n} corners make a {shape} . {p.clue} is {c} ."
    answer = describe(c, shape)
    if broken is None:
        return f"<think> {think} </think><answer> {answer} </answer>"
    if broken == "no_think_close":
        return f"<think> {think} <answer> {answer} </answer>"
    if broken == "no_answer_tags":
        return f"<think> {think} </think> {answer}"
    raise ValueError(f"unknown format break {broken!r}")


def sft_chain(p: ToyPrompt, rng: random.Random, p_sum: float, p_colour: float, p_format: float) -> str:
    """An imperfect chain: the sum slips with probability ``p_sum`` (to another number of corners), the colour
    is wrong with probability ``p_colour``, the format breaks with probability ``p_format``."""
    corners = None
    if rng.random() < p_sum:
        corners = rng.choice([n for n in CORNERS.values() if n != CORNERS[p.shape]])
    colour = None
    if rng.random() < p_colour:
        colour = rng.choice([c for c in COLOURS if c != p.colour])
    broken = rng.choice(["no_think_close", "no_answer_tags"]) if rng.random() < p_format else None
    return chain(p, corners=corners, colour=colour, broken=broken)


_WORD = re.compile(r"[a-z]+")


def grade(completion: str, colour: str, shape: str) -> bool:
    """True when the chain's ``<answer>`` names exactly the right colour and the right shape (and no other)."""
    from rgpo.rewards.format import extract_answer

    answer = extract_answer(completion)
    if answer is None:
        return False
    words = set(_WORD.findall(answer.lower()))
    return words & set(COLOURS) == {colour} and words & set(SHAPES) == {shape}


def draw(colour: str, shape: str, rng: random.Random, size: int = 32) -> Image.Image:
    """A ``size`` x ``size`` picture of the pair: the shape, jittered in position, size and tint, on light grey."""
    if colour not in COLOURS or shape not in CORNERS:
        raise ValueError(f"colour must be one of {list(COLOURS)} and shape one of {list(SHAPES)}; "
                         f"got {colour!r}, {shape!r}")
    from rgpo.rewards.shapes import paint_shape

    return paint_shape(COLOURS[colour], shape, rng, size, grey=(205, 245), scale=(0.26, 0.36), tint=15)


def pictures(per_pair: int, seed: int, size: int = 32) -> tuple[list[Image.Image], list[str]]:
    """``per_pair`` pictures of every colour x shape pair (held-out pairs included) and their descriptions."""
    from rgpo.rewards.shapes import picture_grid

    return picture_grid(per_pair, seed, list(COLOURS), SHAPES, lambda c, s, rng: draw(c, s, rng, size), describe)


def write_jsonl(rows: Iterable[ToyPrompt], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in rows:
            f.write(json.dumps(p.row()) + "\n")
    return path


def corpus() -> list[str]:
    """Texts the world's tokenizer learns its merges from: every prompt and a chain of every kind."""
    texts = [SYSTEM_PROMPT, INSTRUCTION_PREFIX, NEGATIVE_PROMPT]
    for p in prompts("all")[::7]:
        texts += [p.prompt, chain(p)]
    return texts


def select(rows: Sequence[ToyPrompt], count: int, seed: int) -> list[ToyPrompt]:
    """``count`` rows drawn without replacement, reproducibly (all of them when ``count`` >= len)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:count]


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass
class ToyEvaluation:
    """Held-out figures of one model, and every sample behind them."""

    format_rate: float
    reasoning_accuracy: float
    clip_consistency: float
    samples: list[dict[str, Any]]

    @property
    def clip_when_correct(self) -> float:
        """Mean CLIP consistency of the correctly reasoned chains' images: how well the decoder draws a right
        answer, the ceiling of ``clip_consistency`` (NaN without a correct chain)."""
        scores = [s["clip"] for s in self.samples if s["correct"]]
        return sum(scores) / len(scores) if scores else float("nan")

    def figures(self) -> dict[str, float]:
        return {"format_rate": self.format_rate, "reasoning_accuracy": self.reasoning_accuracy,
                "clip_consistency": self.clip_consistency, "clip_when_correct": self.clip_when_correct,
                "chains": float(len(self.samples))}


def evaluate(
    model,
    rows: Sequence[ToyPrompt],
    clip_reward,
    *,
    samples_per_prompt: int = 4,
    seed: int = 0,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    image_steps: int = 8,
    image_size: int = 32,
    batch_prompts: int = 16,
) -> ToyEvaluation:
    """Sample ``samples_per_prompt`` chains per prompt at ``temperature`` (the policy as it acts, not its
    greedy mode), draw each chain's image, and measure:

    - format rate: chains passing MindOmni's format check (``<think>...</think><answer>...</answer>``);
    - reasoning accuracy: chains whose answer names the right colour and shape (:func:`grade`);
    - CLIP consistency: mean ``clip_reward`` of the images against the correct description (``gt_prompt``).

    Seeded: the same model, rows and seed give the same figures.
    """
    import torch

    from rgpo.models.base import ImageSamplingConfig
    from rgpo.rewards.format import format_reward

    icfg = ImageSamplingConfig(height=image_size, width=image_size, steps=image_steps, guidance_scale=1.0,
                               seed=seed, shared_noise=False)
    generator = torch.Generator().manual_seed(seed)
    samples: list[dict[str, Any]] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_prompts):
            chunk = list(rows[start : start + batch_prompts])
            prompts = model.build_prompts([{"prompt": p.prompt} for p in chunk])
            completions = model.generate(prompts, num_generations=samples_per_prompt, max_new_tokens=max_new_tokens,
                                         temperature=temperature, generator=generator)
            repeated = prompts.repeat_interleave(samples_per_prompt)
            fwd = model.forward_text(repeated, completions, with_condition=True)
            icfg.seed = seed + start
            noise = model.initial_noise(len(completions.texts), 1, icfg)
            images = model.draw(fwd.condition, noise, icfg)
            owners = [p for p in chunk for _ in range(samples_per_prompt)]
            texts = completions.texts
            consistency = clip_reward(prompts=[p.prompt for p in owners], completions=texts,
                                      images=[[image] for image in images], gt_prompt=[p.gt_prompt for p in owners])
            formats = format_reward(prompts=[p.prompt for p in owners], completions=texts)
            for p, text, image, score, ok in zip(owners, texts, images, consistency, formats):
                samples.append({"prompt": p.prompt, "gt_prompt": p.gt_prompt, "completion": text, "image": image,
                                "format": ok, "correct": grade(text, p.colour, p.shape), "clip": float(score)})
    n = len(samples)
    return ToyEvaluation(
        format_rate=sum(s["format"] for s in samples) / n,
        reasoning_accuracy=sum(s["correct"] for s in samples) / n,
        clip_consistency=sum(s["clip"] for s in samples) / n,
        samples=samples,
    )
