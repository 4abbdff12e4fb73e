"""The resident process of an isolated reward, and the pipe protocol it speaks with the trainer.

A reward whose dependencies clash with rgpo's (it needs another transformers, an old numpy) runs in its own
Python, started by :class:`rgpo.rewards.isolated.IsolatedReward` as ``<python> .../rgpo/rewards/worker.py``. The
worker resolves the reward spec with the same rules as a run (:func:`rgpo.rewards.get_reward`: ``module:function``,
``module.function``, ``path/file.py:function``, classes built once with their kwargs, factories), then scores one
batch per request until its stdin closes.

This file, ``registry.py`` and ``contract.py`` import only the standard library, so the worker runs in an
interpreter that has none of rgpo's dependencies (Python >= 3.10; Pillow only when the batches carry images).
They are loaded from this folder under a private package name, so nothing else of rgpo (torch) is imported.

Protocol over the worker's stdin / stdout: a message is one frame of JSON, then as many frames of raw bytes as
its ``"blobs"`` says; a frame is an 8-byte big-endian length, then that many bytes. Images travel as PNG blobs
(lossless: the reward scores the pixels the trainer drew), referenced from the JSON by their blob index::

    trainer -> worker   {"op": "load", "spec": "pkg.mod:fn", "kwargs": {...}}
    worker  -> trainer  {"op": "ready", "name", "required_columns", "conversational", "needs_completion_ids",
                         "python", "executable", "pid", "versions": {distribution: version}}
    trainer -> worker   {"op": "score", "id": k, "prompts", "completions", "completion_ids", "columns",
                         "images": [[blob index, ...] per sample], "blobs": m}  + m PNG frames
    worker  -> trainer  {"op": "scores", "id": k, "values": [float | null, ...]}
    worker  -> trainer  {"op": "error", "id": k | null, "message": ..., "traceback": ...}   (load or score failed)

``versions`` lists the installed distributions that loading the reward imported, with their versions: what the
reward really runs against. Whatever the reward prints goes to the worker's stderr, never into the protocol.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import struct
import sys
import traceback
import types
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["read_frame", "read_message", "write_message"]

_LENGTH = struct.Struct(">Q")
_PACKAGE = "_rgpo_isolated_rewards"


class ProtocolEOF(EOFError):
    """The other end closed the pipe (between messages or in the middle of one)."""


def write_message(stream: BinaryIO, header: dict[str, Any], blobs: list[bytes] = ()) -> None:
    """Send ``header`` (JSON) and its ``blobs`` as frames, then flush."""
    payload = json.dumps({**header, "blobs": len(blobs)}).encode()
    parts = [_LENGTH.pack(len(payload)), payload]
    for blob in blobs:
        parts += [_LENGTH.pack(len(blob)), blob]
    stream.write(b"".join(parts))
    stream.flush()


def read_frame(read: Any) -> bytes:
    """One frame, through ``read(n)`` (which returns exactly n bytes or raises :class:`ProtocolEOF`)."""
    (length,) = _LENGTH.unpack(read(_LENGTH.size))
    return read(length)


def read_message(read: Any) -> tuple[dict[str, Any], list[bytes]]:
    """(header, blobs) of the next message, through ``read(n)`` as :func:`read_frame`'s."""
    header = json.loads(read_frame(read))
    if not isinstance(header, dict):
        raise ValueError(f"protocol message is not a JSON object: {header!r:.200}")
    return header, [read_frame(read) for _ in range(int(header.get("blobs", 0)))]


def exact_reader(stream: BinaryIO) -> Any:
    """``read(n)`` on a blocking binary stream: exactly n bytes, or :class:`ProtocolEOF`."""

    def read(n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = stream.read(left)
            if not chunk:
                raise ProtocolEOF(f"pipe closed with {left} of {n} bytes still to read")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    return read


# ------------------------------------------------------------------------------------------------ the worker
def _load_registry() -> types.ModuleType:
    """``registry.py`` of this folder as a submodule of a private package, without running the folder's
    ``__init__`` (which imports torch for the CLIP reward)."""
    if _PACKAGE not in sys.modules:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(Path(__file__).resolve().parent)]
        sys.modules[_PACKAGE] = package
    return importlib.import_module(f"{_PACKAGE}.registry")


def _distributions_of(modules: set[str]) -> dict[str, str]:
    """{distribution: version} for the installed distributions that provide the top-level ``modules``."""
    from importlib import metadata

    owners = metadata.packages_distributions()
    names = sorted({dist for module in modules for dist in owners.get(module, ())})
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _decode_png(blob: bytes) -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeError(f"the batch has images, but Pillow is not installed in {sys.executable}; "
                           f"pip install pillow there") from None
    image = Image.open(io.BytesIO(blob))
    image.load()
    return image


def _plain(values: Any) -> Any:
    """The reward's values as JSON numbers where they are numbers (a tensor or numpy array becomes a list, a
    numpy float a float); anything else is passed on as its repr, for the trainer to report."""
    if hasattr(values, "tolist") and not isinstance(values, list):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        return repr(values)
    out = []
    for v in values:
        if v is None or isinstance(v, (int, float)):  # bool included: in-process it counts as 0.0 / 1.0 too
            out.append(v)
        elif hasattr(v, "__float__") and not isinstance(v, (bool, str, bytes)):
            out.append(float(v))
        else:
            out.append(repr(v))
    return out


class _Worker:
    def __init__(self, spec: str, kwargs: dict[str, Any]) -> None:
        registry = _load_registry()
        self.contract = sys.modules[f"{_PACKAGE}.contract"]
        before = {name.split(".")[0] for name in sys.modules}
        self.reward = registry.get_reward(spec, **kwargs)
        loaded = {name.split(".")[0] for name in sys.modules} - before - {_PACKAGE}
        self.ready = {
            "op": "ready",
            "name": self.reward.name,
            "required_columns": list(self.reward.required_columns),
            "conversational": self.reward.conversational,
            "needs_completion_ids": self.contract.reads(registry.unwrap(self.reward), "completion_ids"),
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "pid": os.getpid(),
            "versions": _distributions_of(loaded),
        }
        self.unwrap = registry.unwrap

    def score(self, header: dict[str, Any], blobs: list[bytes]) -> list[Any]:
        images = [[_decode_png(blobs[k]) for k in chain] for chain in header["images"]]
        kwargs = {"prompts": header["prompts"], "completions": header["completions"],
                  "completion_ids": header["completion_ids"], "images": images, **header["columns"]}
        refused = self.contract.refused_keywords(self.unwrap(self.reward), list(kwargs))
        if refused:
            raise TypeError(f"it cannot be called with {refused}: rewards are called with keywords prompts=, "
                            f"completions=, completion_ids=, images= and every data column; add **kwargs")
        return _plain(self.reward(**kwargs))


def main() -> int:
    # The protocol keeps private copies of stdin / stdout; fd 0 becomes /dev/null and fd 1 the stderr, so a
    # reward that reads stdin or prints cannot break the framing.
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    read = exact_reader(proto_in)
    worker = None
    while True:
        try:
            header, blobs = read_message(read)
        except ProtocolEOF:
            return 0  # the trainer closed the pipe: its run is over
        op = header.get("op")
        try:
            # This interpreter is the reward environment's, not the one rgpo was installed for.
            if sys.version_info < (3, 10):  # noqa: UP036
                raise RuntimeError(f"{sys.executable} is Python {sys.version.split()[0]}; isolated rewards need >= 3.10")
            if op == "load" and worker is None:
                worker = _Worker(header["spec"], header.get("kwargs") or {})
                write_message(proto_out, worker.ready)
            elif op == "score" and worker is not None:
                values = worker.score(header, blobs)
                write_message(proto_out, {"op": "scores", "id": header.get("id"), "values": values})
            else:
                raise ValueError(f"unexpected protocol message {op!r} (reward loaded: {worker is not None})")
        except Exception as e:
            write_message(proto_out, {"op": "error", "id": header.get("id"), "message": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc()})


if __name__ == "__main__":
    # Run as a script, this folder is sys.path[0]: take it off, or its clip.py, format.py, ... would shadow
    # the packages of the same name a reward imports (OpenAI's clip).
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.exit(main())
