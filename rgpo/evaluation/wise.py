"""The WISE benchmark (World Knowledge-Informed Semantic Evaluation, Niu et al. 2025, PKU-YuanGroup/WISE): 1000
prompts whose picture needs world knowledge first ("the round pastry shared at Mid-Autumn Festival" -> mooncakes),
judged by a vision-language model against each prompt's ``Explanation``.

    rgpo eval wise --checkpoint outputs/run-1/checkpoints/step-0000600 --data WISE/data_verified \
        --judge /models/Qwen2.5-VL-72B-Instruct --out wise-step600/

Scoring, followed exactly from the WISE repository:

* per image (``WISE_legacy/Calculate.py``, protocol ``legacy``): WiScore = (0.7 C + 0.2 R + 0.1 A) / 2 from the
  judge's consistency, realism and aesthetic scores (0-2 each), so in [0, 1]; with protocol ``verified``
  (``calculate_verified.py``) the judge's binary 0/1 score itself;
* per category: the mean WiScore of its prompts. The category is the prompt's ``Category`` field
  (``Cultural knowledge``, ``time``, ``Space``, ``Biology``, ``Physical Knowledge``, ``Chemistry``): in both WISE
  releases it agrees with the prompt-id ranges WISE's calculators use, and it stays right for a subset;
* overall: 0.4 cultural + 0.167 time + 0.133 space + 0.1 biology + 0.1 physics + 0.1 chemistry (legacy), or
  0.4 cultural + 0.12 for each other category (verified); computed only when every category has a judged
  prompt, as WISE's calculators do.

WISE's calculators skip a prompt whose answer could not be read; so do the means here, but every such prompt is
counted (``unparseable`` per category and in total, with its ids and raw answer kept) and the result says
``comparable: false`` unless all 1000 prompts were judged: the published numbers are over the whole set.

Outputs in ``--out``: ``images/<prompt_id>.png`` (WISE's own naming, so its scripts can also read the folder),
``wise_prompts.jsonl`` (one record per prompt: prompt, chain, image, scores, the judge's raw answer),
``wise.json`` (the aggregate) and ``contact_sheets/<category>.png``. Records are appended after each batch: a
killed evaluation rerun with the same ``--out`` continues with the prompts that have none.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from rgpo.data import DataError
from rgpo.evaluation.judge import Protocol

CATEGORIES = ("cultural", "time", "space", "biology", "physics", "chemistry")
# WISE's ``Category`` values (both releases) -> the six categories its tables report.
CATEGORY_OF = {"Cultural knowledge": "cultural", "time": "time", "Space": "space", "Biology": "biology",
               "Physical Knowledge": "physics", "Chemistry": "chemistry"}
FIELDS = ("prompt_id", "Prompt", "Explanation", "Category")
RECORDS = "wise_prompts.jsonl"
RUN_FILE = "wise_run.json"
SHEET_IMAGES = 48
SHEET_PIXELS = 256


@dataclass(frozen=True)
class WisePrompt:
    prompt_id: int
    prompt: str
    explanation: str
    category: str  # one of CATEGORIES
    subcategory: str
    source: str  # "file[index]", for error messages


def _prompt_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"WISE prompts {str(path)!r}: no such file or folder (WISE's data_verified/ folder, its "
                        "merge.json, or one of its category files)")
    if (path / "merge.json").is_file():  # WISE's merged copy of its three category files
        return [path / "merge.json"]
    files = sorted(p for p in path.glob("*.json"))
    if not files:
        raise DataError(f"WISE prompts {str(path)!r}: the folder holds no .json prompt file")
    return files


def load_wise_prompts(paths: str | Path | Sequence[str | Path]) -> list[WisePrompt]:
    """WISE's prompt files (a list of ``{prompt_id, Prompt, Explanation, Category, Subcategory}``), sorted by id.
    ``paths``: folders (each one's ``merge.json``, else every ``*.json`` in it) and files, e.g. the paper's three
    files ``WISE_legacy/data/{cultural_common_sense,spatio-temporal_reasoning,natural_science}.json``."""
    prompts: dict[int, WisePrompt] = {}
    listed = [paths] if isinstance(paths, (str, Path)) else list(paths)
    for file in [f for path in listed for f in _prompt_files(Path(path))]:
        try:
            entries = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(entries, list):
            raise DataError(f"{file}: a WISE prompt file is a JSON list of prompts, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            where = f"{file}[{i}]"
            if not isinstance(entry, dict) or any(k not in entry for k in FIELDS):
                keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise DataError(f"{where}: a WISE prompt needs the fields {list(FIELDS)}; got {keys}")
            pid = entry["prompt_id"]
            if not isinstance(pid, int) or isinstance(pid, bool):
                raise DataError(f"{where}: prompt_id must be an integer, got {pid!r}")
            if entry["Category"] not in CATEGORY_OF:
                raise DataError(f"{where}: Category {entry['Category']!r} is not one of WISE's "
                                f"{sorted(CATEGORY_OF)}")
            for key in ("Prompt", "Explanation"):
                if not isinstance(entry[key], str) or not entry[key].strip():
                    raise DataError(f"{where}: {key} must be a non-empty string, got {entry[key]!r}")
            if pid in prompts:
                raise DataError(f"{where}: prompt_id {pid} appears twice (first at {prompts[pid].source})")
            prompts[pid] = WisePrompt(pid, entry["Prompt"], entry["Explanation"], CATEGORY_OF[entry["Category"]],
                                      str(entry.get("Subcategory", "")), where)
    return [prompts[k] for k in sorted(prompts)]


def select_subset(prompts: Sequence[WisePrompt], size: int, seed: int = 0) -> list[WisePrompt]:
    """A fixed subset of ``size`` prompts spread over the categories: each category's prompts in an order drawn
    from ``seed``, then taken in turn (cultural, time, space, ...), so a small subset still holds every category.
    ``size`` 0 (or larger than the set): every prompt. Returned sorted by id."""
    if size <= 0 or size >= len(prompts):
        return list(prompts)
    rng = random.Random(seed)
    queues = []
    for category in CATEGORIES:
        members = [p for p in prompts if p.category == category]
        rng.shuffle(members)
        queues.append(members)
    chosen: list[WisePrompt] = []
    while len(chosen) < size:
        for queue in queues:
            if queue and len(chosen) < size:
                chosen.append(queue.pop(0))
    return sorted(chosen, key=lambda p: p.prompt_id)


def judged_record(protocol: Protocol, prompt: WisePrompt, chain: str, image_file: str | None,
                  answer: str) -> dict[str, Any]:
    """One prompt's line of ``wise_prompts.jsonl``: the judge's raw answer, the scores read from it (None when
    it cannot be read) and the WiScore."""
    scores = protocol.parse(answer)
    return {"prompt_id": prompt.prompt_id, "category": prompt.category, "subcategory": prompt.subcategory,
            "prompt": prompt.prompt, "explanation": prompt.explanation, "chain": chain, "image": image_file,
            "scores": scores, "wiscore": None if scores is None else protocol.wiscore(scores),
            "judge_answer": answer, "protocol": protocol.name}


def aggregate(records: Sequence[dict[str, Any]], protocol: Protocol, total_prompts: int = 1000) -> dict[str, Any]:
    """WISE's score of judged records: each category's mean WiScore over its readable answers, the weighted
    overall when every category has one, and every unreadable answer counted. ``total_prompts``: the size of the
    full benchmark (the result is ``comparable`` with published numbers only when all were judged)."""
    categories: dict[str, dict[str, Any]] = {}
    for category in CATEGORIES:
        mine = [r for r in records if r["category"] == category]
        scored = [r for r in mine if r["wiscore"] is not None]
        entry: dict[str, Any] = {"prompts": len(mine), "judged": len(scored), "unparseable": len(mine) - len(scored),
                                 "wiscore": sum(r["wiscore"] for r in scored) / len(scored) if scored else None}
        for key in sorted({k for r in scored for k in r["scores"]}):
            entry[key] = sum(r["scores"][key] for r in scored) / len(scored)
        categories[category] = entry
    missing = [c for c in CATEGORIES if categories[c]["wiscore"] is None]
    overall = None if missing else sum(protocol.category_weights[c] * categories[c]["wiscore"] for c in CATEGORIES)
    unparseable = sorted(r["prompt_id"] for r in records if r["wiscore"] is None)
    return {"protocol": protocol.name, "overall": overall, "categories": categories,
            "prompts": len(records), "judged": len(records) - len(unparseable),
            "unparseable": len(unparseable), "unparseable_ids": unparseable,
            "overall_missing_categories": missing,
            "comparable": len(records) == total_prompts and not unparseable}


def metrics(result: dict[str, Any], prefix: str = "eval/wise") -> dict[str, float]:
    """The scalars of :func:`aggregate`'s result for a run's logger: ``<prefix>/<category>``, ``/overall``,
    ``/unparseable``. A score without a judged prompt is NaN (a gap in the curve), never left out unseen."""
    nan = float("nan")
    out = {f"{prefix}/{c}": nan if v["wiscore"] is None else v["wiscore"] for c, v in result["categories"].items()}
    out[f"{prefix}/overall"] = nan if result["overall"] is None else result["overall"]
    out[f"{prefix}/unparseable"] = float(result["unparseable"])
    return out


def caption(record: dict[str, Any]) -> str:
    """A contact-sheet caption: id, scores (or that the answer was unreadable), the chain."""
    scores = record["scores"]
    judged = ("unparseable" if scores is None else
              " ".join(f"{k[0].upper()}={v:g}" for k, v in scores.items()) + f" W={record['wiscore']:.2f}")
    return f"#{record['prompt_id']} {judged} | {record['chain']}"


def write_outputs(out: Path, records: Sequence[dict[str, Any]], result: dict[str, Any],
                  image_of: Callable[[dict[str, Any]], Image.Image | None]) -> None:
    """``wise.json`` and one contact sheet per category (``contact_sheets/<category>.png``): its first
    ``SHEET_IMAGES`` prompts, at most ``SHEET_PIXELS`` a side (400 cultural prompts at 1024 px would be a sheet
    of gigapixels)."""
    from rgpo.tracking import contact_sheet

    (out / "wise.json").write_text(json.dumps(result, indent=2) + "\n")
    sheets = out / "contact_sheets"
    sheets.mkdir(exist_ok=True)
    for category in CATEGORIES:
        shown = [(image_of(r), caption(r)) for r in records if r["category"] == category][:SHEET_IMAGES]
        shown = [(im.copy(), cap) for im, cap in shown if im is not None]
        for im, _ in shown:
            im.thumbnail((SHEET_PIXELS, SHEET_PIXELS))
        if shown:
            contact_sheet([s[0] for s in shown], [s[1] for s in shown]).save(sheets / f"{category}.png")


# ------------------------------------------------------------------------------------------- the standalone run
def read_records(path: Path, prompts: Sequence[WisePrompt]) -> dict[int, dict[str, Any]]:
    """The records an earlier (perhaps killed) run left, by prompt id. A last line cut short by the kill is
    dropped (that prompt is redone); a record of a prompt whose text differs from ``prompts`` is an error: the
    folder belongs to another prompt set."""
    if not path.is_file():
        return {}
    by_id = {p.prompt_id: p for p in prompts}
    lines = path.read_text(encoding="utf-8").splitlines()
    done: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise DataError(f"{path}:{n}: not a JSON record; remove the line or use a new output folder") from None
        known = by_id.get(record.get("prompt_id"))
        if known is not None and known.prompt != record.get("prompt"):
            raise DataError(f"{path}:{n}: prompt_id {known.prompt_id} was evaluated with another prompt text "
                            f"({record.get('prompt')!r}); this folder holds another prompt set: use a new --out")
        done[record["prompt_id"]] = record
    return done


def check_run(out: Path, settings: dict[str, Any]) -> None:
    """Write the run's settings, or check that a resumed run uses the ones its records were made with (mixing two
    judges, protocols or models in one result would be meaningless)."""
    path = out / RUN_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            detail = "; ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in changed.items())
            raise DataError(f"{out} holds an evaluation made with other settings ({detail}): rerun with those, "
                            "or use a new --out")
        return
    path.write_text(json.dumps(settings, indent=2) + "\n")


def evaluate_wise(prompts: Sequence[WisePrompt], *, out: str | Path, protocol: Protocol,
                  generate: Callable[[list[WisePrompt]], tuple[list[str], list[Image.Image]]],
                  judge: Callable[[Protocol, list[tuple[str, str, Image.Image]]], list[str]],
                  batch_size: int, settings: dict[str, Any], log: Callable[[str], None] = print,
                  total_prompts: int = 1000) -> dict[str, Any]:
    """Generate, judge and score every prompt without a record in ``out``, a batch at a time, then aggregate all
    records. ``generate(batch)`` -> (chains, one image per prompt); ``judge(protocol, [(prompt, explanation,
    image)])`` -> raw answers. ``settings`` (model, judge, protocol, sampling) must match a resumed run's."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    check_run(out, {**settings, "protocol": protocol.name})
    records_path = out / RECORDS
    done = read_records(records_path, prompts)
    if records_path.is_file():  # rewrite without a line a kill cut short, so appends start on a fresh line
        records_path.write_text("".join(json.dumps(done[k]) + "\n" for k in done))
    todo = [p for p in prompts if p.prompt_id not in done]
    if done:
        log(f"resuming: {len(prompts) - len(todo)} of {len(prompts)} prompts already judged in {records_path}")
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        chains, images = generate(batch)
        files = []
        for prompt, image in zip(batch, images):
            files.append(f"images/{prompt.prompt_id}.png")
            image.save(out / files[-1])
        answers = judge(protocol, [(p.prompt, p.explanation, im) for p, im in zip(batch, images)])
        with open(records_path, "a", encoding="utf-8") as f:
            for prompt, chain, file, answer in zip(batch, chains, files, answers):
                record = judged_record(protocol, prompt, chain, file, answer)
                done[prompt.prompt_id] = record
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a batch is either on disk whole or redone
        log(f"judged {len(prompts) - len(todo) + start + len(batch)} / {len(prompts)} prompts")
    records = [done[p.prompt_id] for p in prompts if p.prompt_id in done]
    result = aggregate(records, protocol, total_prompts)

    def image_of(record: dict[str, Any]) -> Image.Image | None:
        path = out / record["image"] if record.get("image") else None
        if path is None or not path.is_file():
            return None
        with Image.open(path) as im:
            return im.convert("RGB")

    write_outputs(out, records, result, image_of)
    return result


def summary(result: dict[str, Any]) -> str:
    """A table of the result as WISE prints it (category, WiScore, judged prompts, unparseable)."""
    lines = [f"WISE ({result['protocol']} protocol): {result['judged']} of {result['prompts']} prompts judged, "
             f"{result['unparseable']} unparseable answer(s)"]
    for category, entry in result["categories"].items():
        score = "   -  " if entry["wiscore"] is None else f"{entry['wiscore']:.4f}"
        lines.append(f"  {category:<10} {score}  ({entry['judged']} judged, {entry['unparseable']} unparseable)")
    overall = "n/a (no judged prompt in " + ", ".join(result["overall_missing_categories"]) + ")" \
        if result["overall"] is None else f"{result['overall']:.4f}"
    lines.append(f"  overall    {overall}")
    if not result["comparable"]:
        lines.append("  (not comparable with published WISE numbers: those judge all 1000 prompts, every answer read)")
    return "\n".join(lines)
