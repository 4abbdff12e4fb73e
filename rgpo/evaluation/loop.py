"""Evaluation inside a training run, every ``eval.every`` steps: WISE on a fixed held-out subset
(``eval.benchmark: wise``) and the understanding retention probe (``eval.understanding``).

The trainer hands over a ``chains`` function (its own generation: the policy as it is, spread over the ranks,
gathered in order on every rank) and its logger; this module asks the questions, judges, and logs
``eval/wise/<category>``, ``eval/wise/overall``, ``eval/wise/unparseable``, ``eval/understanding/accuracy``,
``eval/understanding/unparseable``, the images with their scores and ``timing/eval_wise`` (of which
``timing/eval_wise_judge`` judging) / ``timing/eval_understanding``. The judge is loaded once, on the main rank only, on ``eval.judge_device``
(``cpu``, another GPU, or by default the rank's own device). Each evaluation also writes WISE's outputs to
``<output_dir>/eval/wise/step-<step>/`` (records, ``wise.json``, images, contact sheets).

Every evaluation uses the same prompts and the same initial noise per prompt, so the curve follows the policy, not
the draw.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from rgpo.data import DataError
from rgpo.evaluation.judge import JudgeError, VLMJudge, check_judge_folder, get_protocol
from rgpo.evaluation.understanding import load_questions, score_answers
from rgpo.evaluation.wise import (
    RECORDS,
    aggregate,
    caption,
    judged_record,
    load_wise_prompts,
    metrics,
    select_subset,
    write_outputs,
)


def _named(key: str, read: Callable[[Any], Any], value: Any) -> Any:
    """``read(value)``, its error prefixed with the config key that named the input."""
    try:
        return read(value)
    except (DataError, JudgeError) as e:
        raise type(e)(f"{key}: {e}") from None


# chains(rows, draw=..., greedy=...) -> one (text, images) per row, in order, on every rank
ChainsFn = Callable[..., list[tuple[str, list[Image.Image]]]]


class LoopEvaluation:
    """The benchmark and probe of ``cfg.eval``, their data read and checked at construction (before any model
    loads); the judge loads with :meth:`load_judge`."""

    def __init__(self, eval_cfg: Any, *, output_dir: str | Path, main: bool, seed: int = 0,
                 train_prompts: Sequence[str] = ()):
        """``train_prompts``: the run's training instructions; a WISE prompt among them is left out of the subset,
        so the benchmark stays held out."""
        self.cfg = eval_cfg
        self.main = main
        self.out = Path(output_dir) / "eval" / "wise"
        self.wise_prompts = []
        self.protocol = get_protocol(eval_cfg.wise_protocol)
        if eval_cfg.benchmark == "wise":
            seen = {" ".join(p.split()).lower() for p in train_prompts}
            every = _named("eval.benchmark_data", load_wise_prompts, eval_cfg.benchmark_data)
            held_out = [p for p in every if " ".join(p.prompt.split()).lower() not in seen]
            if len(held_out) < len(every) and main:
                print(f"[rgpo] eval.benchmark: {len(every) - len(held_out)} WISE prompt(s) are training prompts of "
                      "this run and are left out of the evaluated subset", flush=True)
            self.wise_prompts = select_subset(held_out, eval_cfg.benchmark_prompts, seed)
            _named("eval.judge", check_judge_folder, eval_cfg.judge)
        self.questions = _named("eval.understanding", load_questions, eval_cfg.understanding) \
            if eval_cfg.understanding else []
        if eval_cfg.understanding_questions > 0:
            self.questions = self.questions[: eval_cfg.understanding_questions]
        self.judge: VLMJudge | None = None

    @property
    def active(self) -> bool:
        return bool(self.wise_prompts or self.questions)

    def load_judge(self, default_device: Any) -> None:
        """The judge, once, on the main rank (the others only generate)."""
        if self.wise_prompts and self.main and self.judge is None:
            c = self.cfg
            self.judge = VLMJudge(c.judge, device=c.judge_device or default_device, dtype=c.judge_dtype,
                                  batch_size=c.judge_batch_size, max_new_tokens=c.judge_max_new_tokens)

    def run(self, chains: ChainsFn, step: int, logger: Any) -> dict[str, float]:
        results: dict[str, float] = {}
        if self.wise_prompts:
            results.update(self._wise(chains, step, logger))
        if self.questions:
            results.update(self._understanding(chains, step, logger))
        if results:
            logger.log(results, step=step)
        return results

    def _wise(self, chains: ChainsFn, step: int, logger: Any) -> dict[str, float]:
        start = time.perf_counter()
        drawn = chains([{"prompt": p.prompt} for p in self.wise_prompts], draw=True, greedy=False)
        if not self.main:
            return {}
        images = {p.prompt_id: ims[0] for p, (_, ims) in zip(self.wise_prompts, drawn)}
        if self.judge is None:
            raise RuntimeError("LoopEvaluation.load_judge() must run before the first WISE evaluation")
        judging = time.perf_counter()
        answers = self.judge.answer(self.protocol, [(p.prompt, p.explanation, images[p.prompt_id])
                                                    for p in self.wise_prompts])
        judged = time.perf_counter() - judging
        folder = self.out / f"step-{step:07d}"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        records = []
        for p, (text, _), answer in zip(self.wise_prompts, drawn, answers):
            records.append(judged_record(self.protocol, p, text, f"images/{p.prompt_id}.png", answer))
            images[p.prompt_id].save(folder / records[-1]["image"])
        (folder / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records))
        result = aggregate(records, self.protocol)
        write_outputs(folder, records, result, lambda r: images[r["prompt_id"]])
        logger.log_images("eval/wise/images", [images[r["prompt_id"]] for r in records],
                          [f"{r['category']} {caption(r)}" for r in records], step=step)
        logger.log_table("eval/wise/prompts", ["step", "category", "prompt", "chain", "image", "wiscore", "judge"],
                         [[step, r["category"], r["prompt"], r["chain"], images[r["prompt_id"]], r["wiscore"],
                           r["judge_answer"]] for r in records], step=step)
        return {**metrics(result), "timing/eval_wise": time.perf_counter() - start, "timing/eval_wise_judge": judged}

    def _understanding(self, chains: ChainsFn, step: int, logger: Any) -> dict[str, float]:
        start = time.perf_counter()
        answered = chains([q.model_row() for q in self.questions], draw=False, greedy=True)
        if not self.main:
            return {}
        scored = score_answers(self.questions, [text for text, _ in answered])
        return {"eval/understanding/accuracy": scored["accuracy"],
                "eval/understanding/unparseable": float(scored["unparseable"]),
                "timing/eval_understanding": time.perf_counter() - start}
