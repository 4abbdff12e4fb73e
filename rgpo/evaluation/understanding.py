"""The understanding retention probe: does the policy still answer questions about images after RL on drawing?

Multiple-choice questions with images from a JSONL file the user gives, one per line::

    {"image": "imgs/0001.jpg", "question": "What colour is the bus?", "choices": ["red", "blue", "green"],
     "answer": "B"}

(``image`` or ``images``: paths relative to the file's folder; ``answer``: the letter of the right choice,
choices lettered A, B, C, ... in order.) Each question is asked as LLaVA and MMBench ask it -- the question, the
lettered choices, then "Answer with the option's letter from the given choices directly." -- in a plain chat with
the system turn "You are a helpful assistant." (not the family's reason-then-draw prompt), decoded greedily.

The answer is read from the ``<answer>`` block when the chain has one, else the whole text (a ``<think>`` block
removed): a leading letter (``B``, ``(B)``, ``B.``), else "answer is B", else the one choice whose text appears.
Accuracy counts an unreadable answer as wrong, and the number of unreadable answers is reported beside it.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from rgpo.data import DataError, jsonl_records

SYSTEM = "You are a helpful assistant."
INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: str  # a letter
    image_paths: tuple[str, ...]
    source: str  # "file:line"

    @property
    def letters(self) -> str:
        return string.ascii_uppercase[: len(self.choices)]

    def text(self) -> str:
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(self.letters, self.choices))
        return f"{self.question}\n{options}\n{INSTRUCTION}"

    def model_row(self) -> dict[str, Any]:
        """The row :meth:`UnifiedModel.build_prompts` takes: the question as a plain chat, with its images."""
        images = []
        for path in self.image_paths:
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"{self.source}: image {path} cannot be read: {e}") from None
        text = self.text()
        return {"prompt": text, "images": images,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]}


def load_questions(path: str | Path) -> list[Question]:
    """The questions of a JSONL file, each checked (the error names file:line and the field)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"understanding questions {str(file)!r}: no such file (a JSONL of multiple-choice "
                        "questions with images)")
    questions = []
    for where, record in jsonl_records(file):
        question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: 'question' must be a non-empty string, got {question!r}")
        if not (isinstance(choices, list) and 2 <= len(choices) <= 26 and all(isinstance(c, str) for c in choices)):
            raise DataError(f"{where}: 'choices' must be a list of 2 to 26 strings, got {choices!r}")
        letters = string.ascii_uppercase[: len(choices)]
        if not (isinstance(answer, str) and len(answer) == 1 and answer in letters):
            raise DataError(f"{where}: 'answer' must be the letter of a choice ({', '.join(letters)}), got {answer!r}")
        paths = record.get("images", [record["image"]] if "image" in record else [])
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise DataError(f"{where}: 'image' (a path) or 'images' (a list of paths) is required, got {paths!r}")
        resolved = []
        for p in paths:
            full = Path(p) if Path(p).is_absolute() else file.parent / p
            if not full.is_file():
                raise DataError(f"{where}: image {p!r} not found (paths are relative to {file.parent})")
            resolved.append(str(full))
        questions.append(Question(question, tuple(choices), answer, tuple(resolved), where))
    if not questions:
        raise DataError(f"{file}: holds no question")
    return questions


def parse_choice(text: str, question: Question) -> str | None:
    """The letter the answer picks, or None when it cannot be read (see the module docstring)."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    block = re.search(r"<answer>(.*?)(?:</answer>|$)", text, flags=re.DOTALL)
    text = (block.group(1) if block else text).strip()
    letters = question.letters
    lead = re.match(r"\(([A-Z])\)|([A-Z])(?:[.:)]|$)", text)  # "B", "B.", "(B) red"; not "A photo of"
    if lead and (lead.group(1) or lead.group(2)) in letters:
        return lead.group(1) or lead.group(2)
    said = re.search(r"\b(?:answer|option)\s*(?:is|:)?\s*\(?([A-Z])\)?(?:\W|$)", text, flags=re.IGNORECASE)
    if said and said.group(1) in letters:
        return said.group(1)
    named = [letter for letter, choice in zip(letters, question.choices) if choice.lower() in text.lower()]
    return named[0] if len(named) == 1 else None


def score_answers(questions: list[Question], texts: list[str]) -> dict[str, Any]:
    """Accuracy (an unreadable answer counts as wrong), the unreadable count, and each question's record."""
    records = []
    for q, text in zip(questions, texts, strict=True):
        picked = parse_choice(text, q)
        records.append({"source": q.source, "question": q.question, "answer": q.answer, "picked": picked,
                        "correct": picked == q.answer, "text": text})
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / len(records), "correct": correct, "questions": len(records),
            "unparseable": sum(r["picked"] is None for r in records), "records": records}
