"""Prompt data: JSONL files, their validation, and the deterministic, resumable order in which RGPO visits them.

A row is ``{"prompt": str, "images": [paths relative to the file]?, "gt_prompt": str?, ...any column}``;
MindOmni's own rows (``{"conversations": [{"value": instruction}, ...], "gt_prompt": ...}``) are read as is.
Every column other than ``prompt`` and ``images`` reaches the reward functions.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """A prompt file that cannot be used: the message names the file, the line and the field."""


@dataclass
class PromptRow:
    """One prompt: its instruction, optional input-image paths and every other column."""

    prompt: str
    image_paths: list[str]
    columns: dict[str, Any]
    source: str  # "file:line", for error messages
    messages: list[dict[str, Any]] | None = None  # a conversational row (TRL's format): the whole chat

    def load_images(self) -> list[Image.Image]:
        images = []
        for path in self.image_paths:
            try:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"{self.source}: image {path} cannot be read: {e}") from e
        return images

    def as_model_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"prompt": self.prompt}
        if self.messages is not None:
            row["messages"] = self.messages
        if self.image_paths:
            row["images"] = self.load_images()
        return row


def _messages(prompt: Any, source: str) -> list[dict[str, Any]] | None:
    """A conversational prompt (TRL's ``[{"role": ..., "content": ...}, ...]``), checked; None for plain text."""
    if not isinstance(prompt, list):
        return None
    roles = ("system", "user", "assistant")
    for i, message in enumerate(prompt):
        if not (isinstance(message, dict) and message.get("role") in roles and isinstance(message.get("content"), str)):
            raise DataError(f"{source}: prompt message {i} must be {{'role': one of {list(roles)}, 'content': a "
                            f"string}}, got {message!r}")
    if not any(m["role"] == "user" for m in prompt):
        raise DataError(f"{source}: a conversational prompt needs a 'user' message, got roles "
                        f"{[m['role'] for m in prompt]}")
    return prompt


def _instruction(record: dict, source: str) -> str:
    if "prompt" in record:
        prompt = record["prompt"]
        messages = _messages(prompt, source)
        if messages is not None:  # the instruction the rewards and logs see: the last user turn
            prompt = [m["content"] for m in messages if m["role"] == "user"][-1]
    elif "conversations" in record:
        conv = record["conversations"]
        if not (isinstance(conv, list) and conv and isinstance(conv[0], dict) and "value" in conv[0]):
            raise DataError(f"{source}: 'conversations' must be a list whose first item has a 'value' (MindOmni format)")
        prompt = conv[0]["value"]
    else:
        raise DataError(f"{source}: no 'prompt' field (nor MindOmni's 'conversations'); fields present: {sorted(record)}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{source}: 'prompt' must be a non-empty string, got {prompt!r}")
    return prompt


def _image_paths(record: dict, base: Path, source: str) -> list[str]:
    images = record.get("images", record.get("image_path"))
    if images is None:
        return []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{source}: 'images' must be a list of paths, got {images!r}")
    paths = []
    for rel in images:
        path = (base / rel) if not Path(rel).is_absolute() else Path(rel)
        if not path.is_file():
            raise DataError(f"{source}: image {rel!r} does not exist (looked for {path})")
        try:
            with Image.open(path) as img:
                img.verify()  # reads the header only: cheap enough to check every image before training
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{source}: image {rel!r} is not a readable image ({e})") from e
        paths.append(str(path))
    return paths


def prompt_row(record: Any, base: Path, source: str) -> PromptRow:
    """One validated row from a record (a JSONL line or a ``datasets`` row); ``source`` names it in errors."""
    if not isinstance(record, dict):
        raise DataError(f"{source}: each row must be a JSON object, got {type(record).__name__}")
    prompt = _instruction(record, source)
    messages = _messages(record.get("prompt"), source)
    images = _image_paths(record, base, source)
    columns = {k: v for k, v in record.items() if k not in ("prompt", "images", "image_path", "conversations")}
    return PromptRow(prompt, images, columns, source, messages)


def load_prompts(path: Any) -> list[PromptRow]:
    """Prompts from a JSONL file, a local Hugging Face ``datasets`` folder (``Dataset.save_to_disk``), or a loaded
    ``datasets.Dataset`` / list of dicts. Blank JSONL lines are skipped; any malformed row is an error that names
    ``file:line`` (or the dataset and row index)."""
    if not isinstance(path, (str, Path)):
        return _rows_of(path, Path.cwd(), f"the given {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise DataError(f"prompt folder {path} is not a saved Hugging Face dataset (no dataset_info.json); give a "
                            f"JSONL file or a folder written by Dataset.save_to_disk")
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            if "train" not in dataset:
                raise DataError(f"prompt folder {path} holds splits {sorted(dataset)}, none named 'train'")
            dataset = dataset["train"]
        return _rows_of(dataset, path, str(path))
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist")
    rows = [prompt_row(record, path.parent, source) for source, record in jsonl_records(path)]
    if not rows:
        raise DataError(f"prompt file {path} holds no prompts")
    return rows


def jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """Each non-blank line of a JSONL file as ``("file:line", object)``; a line that is not a JSON object is a
    DataError naming its file and line."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise DataError(f"{source}: each line must be a JSON object, got {type(record).__name__}")
            yield source, record


def _rows_of(records: Any, base: Path, name: str) -> list[PromptRow]:
    rows = [prompt_row(dict(record) if not isinstance(record, dict) else record, base, f"{name} row {i}")
            for i, record in enumerate(records)]
    if not rows:
        raise DataError(f"{name} holds no prompts")
    return rows


def check_columns(rows: list[PromptRow], column: str, needed_by: str) -> None:
    """Fail before training when a reward needs a column that some row lacks."""
    for row in rows:
        if column not in row.columns:
            raise DataError(f"{row.source}: reward {needed_by!r} needs column {column!r}; this row has {sorted(row.columns)}")


@dataclass
class GroupSlot:
    """One chain to sample on this rank: which prompt, and its index in the step's global batch."""

    prompt_index: int  # index into the dataset
    group: int  # index of the group (prompt) within the step
    global_index: int  # index of the chain within the step's global batch


class PromptSampler:
    """Which prompts each step uses, and which of their chains each rank samples.

    Every rank walks the same seeded order (a new permutation each epoch when ``shuffle``), ``prompts_per_step``
    prompts per step. The step's global batch lists each prompt ``group_size`` times in a row (p0 x G, p1 x G,
    ...), and rank ``r`` takes the ``r``-th contiguous slice, so a group may span ranks when the per-rank count
    is not a multiple of G; rewards are gathered across ranks before advantages for that reason.
    The state (epoch, position) is two integers, saved with every checkpoint.
    """

    def __init__(self, num_prompts: int, prompts_per_step: int, group_size: int, *, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, source: str = "the prompt file"):
        if num_prompts < prompts_per_step:
            raise DataError(
                f"{source} holds {num_prompts} prompts but one step needs {prompts_per_step} "
                f"(rollout.batch_size / rollout.num_generations); add prompts or lower rollout.batch_size")
        self.num_prompts, self.prompts_per_step, self.group_size = num_prompts, prompts_per_step, group_size
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.num_prompts))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_step(self) -> list[GroupSlot]:
        """This rank's chains for the next step (advances the state)."""
        if self.position + self.prompts_per_step > self.num_prompts:
            # Drop the epoch's tail so every step sees distinct prompts.
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order(self.epoch)
        prompts = order[self.position : self.position + self.prompts_per_step]
        self.position += self.prompts_per_step
        total = self.prompts_per_step * self.group_size
        per_rank = total // self.world_size
        start = self.rank * per_rank
        return [GroupSlot(prompts[i // self.group_size], i // self.group_size, i) for i in range(start, start + per_rank)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_prompts": self.num_prompts, "prompts_per_step": self.prompts_per_step}

    def check_state(self, state: dict[str, int], where: str) -> None:
        """Refuse a saved position that belongs to another prompt order: the same (epoch, position) would walk
        different prompts. Keys a state lacks (older checkpoints) are not checked."""
        keys = {"num_prompts": "the number of prompts in data.train_file", "seed": "data.seed",
                "shuffle": "data.shuffle", "prompts_per_step": "rollout.batch_size / rollout.num_generations"}
        wrong = [f"{meaning}: {state[k]!r} there, {getattr(self, k)!r} now" for k, meaning in keys.items()
                 if k in state and state[k] != getattr(self, k)]
        if wrong:
            raise DataError(f"{where}: its data position belongs to another prompt order ({'; '.join(wrong)}). "
                            f"Resume with the same data settings, or start a new run (checkpoint.resume=null and a "
                            f"new logging.output_dir)")

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
