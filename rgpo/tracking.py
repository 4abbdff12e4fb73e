"""wandb on rank 0, nothing anywhere else; a console progress bar; phase timers."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class PhaseTimer:
    """Wall-clock seconds per named phase of a step (``timing/<phase>`` in the logs)."""

    def __init__(self, sync=None):
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = sync  # e.g. torch.cuda.synchronize, so GPU work is charged to the right phase

    @contextmanager
    def __call__(self, phase: str):
        if self._sync:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.seconds[phase] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"timing/{k}": v for k, v in self.seconds.items()}


_DATA_DIR_SET_BY_RGPO = False


class NullLogger:
    """What non-zero ranks (and wandb-less runs) get: every call does nothing."""

    run_id: str | None = None
    run_dir: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        pass

    def log_images(self, key: str, images: list[Image.Image], captions: list[str], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """wandb, initialised once with the full resolved config; resumes the same run id after a restart."""

    def __init__(self, *, project: str, name: str | None, tags: list[str], mode: str | None, config: dict,
                 output_dir: str, run_id: str | None = None):
        import wandb

        self._wandb = wandb
        global _DATA_DIR_SET_BY_RGPO
        ours = "WANDB_DATA_DIR" not in os.environ or _DATA_DIR_SET_BY_RGPO
        mode = mode or os.environ.get("WANDB_MODE") or "online"
        self.run = wandb.init(project=project, name=name, tags=tags or None, mode=mode, config=config,
                              dir=output_dir, id=run_id, resume="allow" if run_id else None)
        self.run_id = self.run.id
        self.run_dir = getattr(self.run, "dir", None)
        if ours and self.run_dir:
            # wandb stages table media (images) under WANDB_DATA_DIR, by default outside the run folder (read at
            # each log): keep them inside this run's own folder (wandb/offline-run-*/), the folder `wandb sync`
            # uploads and a user copies.
            os.environ["WANDB_DATA_DIR"] = str(Path(self.run_dir).parent / "staging")
            _DATA_DIR_SET_BY_RGPO = True

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._wandb.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        wb = self._wandb
        data = [[wb.Image(to_uint8(v)) if isinstance(v, Image.Image) else v for v in row] for row in rows]
        self._wandb.log({key: wb.Table(columns=columns, data=data)}, step=step)

    def log_images(self, key: str, images: list[Image.Image], captions: list[str], step: int) -> None:
        wb = self._wandb
        self._wandb.log({key: [wb.Image(to_uint8(im), caption=c) for im, c in zip(images, captions)]}, step=step)

    def finish(self) -> None:
        self._wandb.finish()


class TensorBoardLogger(NullLogger):
    """TensorBoard event files (``logging.report_to: tensorboard``): scalars as scalars, the rollout table as a
    markdown text panel, images as images. Resumed runs append to the same folder (TensorBoard keeps the newest
    value of a step)."""

    def __init__(self, log_dir: str | Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.run_dir = str(log_dir)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, float(value), step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        lines = ["| " + " | ".join(c for c in columns if c != "image") + " |",
                 "|" + " --- |" * sum(c != "image" for c in columns)]
        for row in rows:
            cells = [str(v).replace("|", "\\|").replace("\n", " ") for c, v in zip(columns, row) if c != "image"]
            lines.append("| " + " | ".join(cells) + " |")
            for c, v in zip(columns, row):
                if c == "image" and isinstance(v, Image.Image):
                    self.writer.add_image(f"{key}/images", to_uint8(v), step, dataformats="HWC")
        self.writer.add_text(key, "\n".join(lines), step)

    def log_images(self, key: str, images: list[Image.Image], captions: list[str], step: int) -> None:
        for i, image in enumerate(images):
            self.writer.add_image(f"{key}/{i}", to_uint8(image), step, dataformats="HWC")

    def finish(self) -> None:
        self.writer.close()


class MetricsHistory(NullLogger):
    """Every scalar also appended to a JSONL file (one line per ``log`` call: ``{"step": ..., name: value}``),
    so curves can be drawn without wandb. After a resume the steps past the last checkpoint appear twice:
    :func:`read_metrics` keeps the last line of each step."""

    def __init__(self, inner: NullLogger, path: str | Path):
        self.inner = inner
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run_id, self.run_dir = inner.run_id, inner.run_dir

    def log(self, metrics: dict[str, Any], step: int) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if scalars:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
        self.inner.log(metrics, step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.inner.log_table(key, columns, rows, step)

    def log_images(self, key: str, images: list[Image.Image], captions: list[str], step: int) -> None:
        self.inner.log_images(key, images, captions, step)

    def finish(self) -> None:
        self.inner.finish()


def read_metrics(path: str | Path) -> dict[int, dict[str, float]]:
    """``{step: {name: value}}`` from a :class:`MetricsHistory` file, later lines of a step overriding earlier."""
    history: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                step = int(row.pop("step"))
                history.setdefault(step, {}).update(row)
    return dict(sorted(history.items()))


def to_uint8(image: Image.Image) -> np.ndarray:
    """wandb saves float arrays in [0, 1] as black images: always hand it uint8."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def contact_sheet(images: list[Image.Image], captions: list[str], columns: int = 4, caption_lines: int = 6,
                  width: int = 36) -> Image.Image:
    """A grid of images with wrapped text under each (reasoning chains, rewards)."""
    import textwrap

    from PIL import ImageDraw

    if not images:
        raise ValueError("contact_sheet needs at least one image")
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    line_h = 11
    text_h = caption_lines * line_h + 4
    cols = min(columns, len(images))
    rows = (len(images) + cols - 1) // cols
    tile_w = max(cell_w, width * 6)
    sheet = Image.new("RGB", (cols * tile_w, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * tile_w, (i // cols) * (cell_h + text_h)
        sheet.paste(im.convert("RGB"), (x + (tile_w - im.width) // 2, y))
        lines = textwrap.wrap(cap.replace("\n", " "), width=width)[:caption_lines]
        for j, line in enumerate(lines):
            draw.text((x + 2, y + cell_h + 2 + j * line_h), line, fill="black")
    return sheet


def side_by_side(images: list[Image.Image]) -> Image.Image | None:
    """A chain's images in one row, left to right, for one table cell (None when the chain has none)."""
    if not images:
        return None
    if len(images) == 1:
        return images[0]
    height = max(im.height for im in images)
    sheet = Image.new("RGB", (sum(im.width for im in images), height), "white")
    x = 0
    for im in images:
        sheet.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return sheet
