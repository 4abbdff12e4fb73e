"""Rewards run in another Python: a resident worker process fed batches over a pipe.

For a reward whose dependencies clash with rgpo's (it needs another transformers, or a package pinned to an old
numpy), give the interpreter of an environment that has them::

    rewards:
      functions:
        - {name: my_rewards:judge, python: /opt/judge-venv/bin/python, kwargs: {model: /weights/judge}}

The worker (:mod:`rgpo.rewards.worker`, standard library only) starts when the run builds its rewards, loads the
reward once in that interpreter (``module:function``, ``module.function`` or ``path/file.py:function``, resolved
from the run's working directory, with rgpo's usual rules: a class is built once with ``kwargs``), and stays up
for the whole run, scoring one batch per call. Each rank starts its own worker. Images cross as PNG bytes.

If the worker dies (killed, out of memory, a crash in native code), it is started again once and the batch is
sent again; if it dies a second time, the step fails with a :class:`~rgpo.rewards.RewardError` naming the reward,
the interpreter and the exit code, with the last lines the worker wrote to stderr. An exception raised by the
reward is not a death: it fails the step at once, with the worker's traceback. Everything the worker prints goes
to the trainer's stderr, each line prefixed with ``[reward <name>]``.

Calls to one worker are serialised; several isolated rewards overlap under ``rewards.parallel`` (the trainer's
threads wait on their pipes). POSIX only (the pipe is read with ``select``).
"""

from __future__ import annotations

import collections
import json
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .contract import chain_images
from .registry import REGISTRY, RewardError
from .worker import ProtocolEOF, read_message, write_message

__all__ = ["IsolatedReward"]

WORKER = Path(__file__).resolve().with_name("worker.py")
_STDERR_LINES = 20  # the tail of the worker's stderr quoted when it dies


class _WorkerDied(Exception):
    """The worker's pipe closed or broke: the process is gone (or going)."""


class IsolatedReward:
    """A reward run by ``python`` in a resident worker process (see the module docstring).

    Args:
        spec: the reward, as the run names it: ``package.module:function``, ``package.module.function`` or
            ``path/to/file.py:function`` (relative to the working directory). rgpo's registered names are not
            available there (the worker does not import rgpo); one of rgpo's own rewards can run isolated by its
            dotted path when rgpo is installed in that environment (``rgpo.rewards.clip:ClipConsistencyReward``).
        python: the interpreter, e.g. ``/opt/judge-venv/bin/python`` (Python >= 3.10).
        kwargs: arguments for the reward's class or factory, as in any reward spec; they must be JSON.
        restarts: how many times a dead worker is started again over the run before the step fails.
        start_timeout_s: seconds the worker may take to start and load the reward (model weights included).

    Building one starts the worker and waits until the reward is loaded, so a wrong path, a missing package or a
    reward that fails to build stops the run before its first step, with the worker's traceback.

    Attributes:
        name: the reward's name, as the worker resolved it (the function's name, or the one it gives itself).
        versions: ``{distribution: version}`` of the installed packages that loading the reward imported in the
            worker, i.e. what it really runs against.
        python_version, pid: the worker's Python version and process id.
        restarts_used: how many times the worker was started again.
    """

    def __init__(self, spec: str, python: str | os.PathLike[str], kwargs: dict[str, Any] | None = None, *,
                 restarts: int = 1, start_timeout_s: float = 600.0) -> None:
        self.spec, self.kwargs = spec, dict(kwargs or {})
        self.log_name = spec  # until the worker names the reward
        if spec in REGISTRY:
            raise RewardError(
                f"reward {spec!r} is one of rgpo's registered rewards; a reward with 'python:' runs a "
                f"module:function, module.function or file.py:function in that interpreter. To run one of "
                f"rgpo's own rewards there, install rgpo in that environment and name it by path "
                f"(e.g. rgpo.rewards.clip:ClipConsistencyReward)")
        self.python = str(python)
        if not (os.path.isfile(self.python) and os.access(self.python, os.X_OK)):
            raise RewardError(f"reward {spec!r}: its 'python' setting {self.python!r} is not an executable file")
        try:
            json.dumps(self.kwargs, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward {spec!r}: kwargs must be JSON (strings, numbers, lists, mappings) to reach "
                              f"the worker in {self.python}: {e}") from e
        if restarts < 0 or not start_timeout_s > 0:
            raise RewardError(f"reward {spec!r}: need restarts >= 0 and start_timeout_s > 0, got {restarts}, "
                              f"{start_timeout_s}")
        self.restarts, self.start_timeout_s = restarts, float(start_timeout_s)
        self.restarts_used = 0
        self._lock = threading.Lock()
        self._next_id = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._start()
        self._finalizer = weakref.finalize(self, _stop, self._process)

    # ------------------------------------------------------------------------------------------------ calling
    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: Sequence[Sequence[int]] | None = None,
                 images: Sequence[Any] | None = None, **columns: Any) -> list[Any]:
        if completion_ids is None and self.needs_completion_ids:
            raise RewardError(f"reward {self.name!r} needs completion_ids, but the caller passed none")
        header, blobs = self._request(prompts, completions, completion_ids, images, columns)
        with self._lock:
            while True:
                try:
                    answer = self._exchange(header, blobs)
                    break
                except _WorkerDied as died:
                    if self.restarts_used >= self.restarts:
                        raise RewardError(
                            f"reward {self.name!r}: its worker ({self.python}) died ({died}) after "
                            f"{self.restarts_used} restart(s), the most allowed; the step stops here. "
                            f"{self._stderr_tail()}") from None
                    self.restarts_used += 1
                    print(f"[reward {self.name}] worker died ({died}); starting it again and resending the batch "
                          f"(restart {self.restarts_used} of {self.restarts})", file=sys.stderr, flush=True)
                    self._stderr.clear()  # the tail quoted on the next death is the new worker's
                    self._start()
                    self._finalizer.detach()
                    self._finalizer = weakref.finalize(self, _stop, self._process)
        if answer.get("op") == "error":
            raise RewardError(f"reward {self.name!r} raised {answer.get('message')} (in its worker, {self.python})"
                              f"\nworker traceback:\n{answer.get('traceback', '')}")
        values = answer.get("values")
        if answer.get("op") != "scores" or not isinstance(values, list):
            raise RewardError(f"reward {self.name!r}: malformed answer from its worker: {json.dumps(answer)[:200]}")
        return values

    def _request(self, prompts: list[Any], completions: list[Any], completion_ids: Sequence[Sequence[int]] | None,
                 images: Sequence[Any] | None, columns: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
        """The score message for one batch: JSON fields, and the images as PNG blobs."""
        blobs: list[bytes] = []
        refs: list[list[int]] = []
        for i, chain in enumerate(chain_images(images, len(completions))):
            refs.append([])
            for image in chain:
                try:
                    blobs.append(_png(image))
                except Exception as e:
                    raise RewardError(f"reward {self.name!r}: cannot send the image(s) of sample {i} to its worker "
                                      f"as PNG ({type(e).__name__}: {e}); images must be PIL images") from e
                refs[-1].append(len(blobs) - 1)
        for key, values in columns.items():
            try:
                json.dumps(list(values), allow_nan=False)
            except (TypeError, ValueError) as e:
                raise RewardError(f"reward {self.name!r}: column {key!r} cannot be sent to its worker as JSON ({e})") from e
        header = {
            "op": "score",
            "prompts": list(prompts),
            "completions": list(completions),
            "completion_ids": None if completion_ids is None else [[int(t) for t in ids] for ids in completion_ids],
            "images": refs,
            "columns": {k: list(v) for k, v in columns.items()},
        }
        return header, blobs

    def _exchange(self, header: dict[str, Any], blobs: list[bytes]) -> dict[str, Any]:
        """Send one request, return the worker's answer to it; :class:`_WorkerDied` when the pipe breaks."""
        self._next_id += 1
        header = {**header, "id": self._next_id}
        process = self._process
        try:
            write_message(process.stdin, header, blobs)
            answer, _ = read_message(_reader(process))
        except (BrokenPipeError, ConnectionResetError, ProtocolEOF, ValueError) as e:
            raise _WorkerDied(self._death(process, e)) from None
        if answer.get("id") != self._next_id:
            raise RewardError(f"reward {self.name!r}: its worker answered request {answer.get('id')}, expected "
                              f"{self._next_id}")
        return answer

    # ------------------------------------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        """Start a worker and load the reward in it; RewardError (with the worker's traceback) if that fails."""
        process = subprocess.Popen([self.python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=os.getcwd())
        self._process = process
        threading.Thread(target=self._forward_stderr, args=(process,), name=f"reward-{self.spec}-stderr",
                         daemon=True).start()
        deadline = time.monotonic() + self.start_timeout_s
        try:
            write_message(process.stdin, {"op": "load", "spec": self.spec, "kwargs": self.kwargs})
            ready, _ = read_message(_reader(process, deadline))
        except TimeoutError:
            _stop(process)
            raise RewardError(f"reward {self.spec!r}: its worker ({self.python}) did not load the reward within "
                              f"start_timeout_s={self.start_timeout_s}. {self._stderr_tail()}") from None
        except (BrokenPipeError, ConnectionResetError, ProtocolEOF, ValueError) as e:
            raise RewardError(f"reward {self.spec!r}: its worker ({self.python}) could not start "
                              f"({self._death(process, e)}). {self._stderr_tail()}") from None
        if ready.get("op") != "ready":
            _stop(process)
            raise RewardError(f"reward {self.spec!r}: loading it in {self.python} raised {ready.get('message')}"
                              f"\nworker traceback:\n{ready.get('traceback', '')}")
        self.name = self.log_name = str(ready["name"])
        self.required_columns = tuple(ready.get("required_columns") or ())
        self.conversational = bool(ready.get("conversational"))
        self.needs_completion_ids = bool(ready.get("needs_completion_ids"))
        self.versions: dict[str, str] = dict(ready.get("versions") or {})
        self.python_version, self.pid = str(ready.get("python")), int(ready["pid"])

    def _forward_stderr(self, process: subprocess.Popen[bytes]) -> None:
        """Copy the worker's stderr to ours, line by line with the reward's name, keeping the last lines."""
        for raw in iter(process.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._stderr.append(line)
            print(f"[reward {self.log_name}] {line}", file=sys.stderr, flush=True)

    def _death(self, process: subprocess.Popen[bytes], error: BaseException) -> str:
        try:
            code = process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # the pipe broke but the process lingers: make sure it is gone
            _stop(process)
            code = process.returncode
        return f"exit code {code}" if code is not None else f"{type(error).__name__}: {error}"

    def _stderr_tail(self) -> str:
        time.sleep(0.05)  # let the stderr thread copy the dying worker's last lines
        lines = list(self._stderr)
        return "Its last stderr lines:\n" + "\n".join(lines) if lines else "It wrote nothing to stderr."

    def close(self) -> None:
        """Stop the worker (closing its stdin ends it; it is killed if it does not exit within 5 s)."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"IsolatedReward({self.spec!r}, python={self.python!r})"


def _reader(process: subprocess.Popen[bytes], deadline: float | None = None) -> Any:
    """``read(n)`` on the worker's stdout: exactly n bytes, :class:`ProtocolEOF` when it closes, TimeoutError
    past the ``time.monotonic()`` deadline (None: wait as long as it takes)."""
    fd = process.stdout.fileno()

    def read(n: int) -> bytes:
        chunks, left = [], n
        while left:
            if deadline is not None:
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                raise ProtocolEOF(f"pipe closed with {left} of {n} bytes still to read")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    return read


def _png(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless; level 1 is several times faster than the default
    return buffer.getvalue()


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        process.stdin.close()  # the worker exits at the end of its input
        process.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        process.kill()
        process.wait()
