"""A reward server: any rewards the registry can load, scored over HTTP for the ``remote`` reward.

Heavy reward models (a CLIP ViT-L, a VLM judge) load once, in one process that the trainer's ranks (or
several runs) share, possibly on another GPU or machine. Launch::

    rgpo reward-server --config rewards.yaml --port 8000     # or: python -m rgpo.rewards.server ...

``rewards.yaml`` lists the rewards as a run config's ``rewards.functions`` does (a run config itself works
too: its ``rewards:`` section is read)::

    functions:
      - {name: clip_consistency, weight: 1.0, kwargs: {pretrained: /weights/clip_vit_l14_336.bin}}
      - {name: format}

and a run uses them with ``{name: remote, kwargs: {url: "http://127.0.0.1:8000", names: [clip_consistency]}}``
(:class:`rgpo.rewards.remote.RemoteReward`, which documents the wire format). Weights are the run's business: the
YAML's are accepted (a run config's section can be served as it is) and reported by ``/health``, not applied. The server answers ``GET /health``
and ``POST /score`` (a batch: prompts, completions, completion ids, PNG images per chain, data columns), runs
the rewards through :func:`rgpo.rewards.combine` (the checks and error messages of an in-process run), one batch at
a time, and refuses a request over ``--max-request-mb`` with HTTP 413. It binds 127.0.0.1 unless told
otherwise: it has no authentication, so expose it on a trusted network only.

The HTTP stack is Starlette (the application) on uvicorn (the server).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import socket
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .combine import combine
from .registry import Reward, RewardError, get_rewards
from .remote import PROTOCOL, decode_image

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "background_server", "build_app", "load_rewards", "main"]

DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
"""The largest request body accepted by default: 64 MiB (a batch of 64 chains x 4 PNGs of 512 px fits)."""

_SPEC_KEYS = ("name", "weight", "kwargs", "python")


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------------ rewards
def load_rewards(config: str | Path | Mapping[str, Any]) -> list[Reward]:
    """The rewards a YAML file (or an already loaded mapping) lists under ``functions:`` (or
    ``rewards: {functions: ...}``, as in a run config), each built once, with unique names."""
    import yaml

    where = str(config)
    if isinstance(config, Mapping):
        data: Any = config
    else:
        try:
            data = yaml.safe_load(Path(config).read_text())
        except OSError as e:
            raise RewardError(f"reward server config {where!r} cannot be read: {e}") from e
        except yaml.YAMLError as e:
            raise RewardError(f"reward server config {where!r} is not valid YAML: {e}") from e
    if isinstance(data, Mapping) and "functions" not in data and isinstance(data.get("rewards"), Mapping):
        data = data["rewards"]
    functions = data.get("functions") if isinstance(data, Mapping) else None
    if not isinstance(functions, list) or not functions:
        raise RewardError(f"reward server config {where!r} needs a non-empty 'functions:' list of "
                          f"{{name, weight, kwargs}} entries (as a run config's rewards.functions)")
    for i, entry in enumerate(functions):
        unknown = sorted(set(entry) - set(_SPEC_KEYS)) if isinstance(entry, Mapping) else []
        if unknown or not isinstance(entry, (str, Mapping)):
            raise RewardError(f"reward server config {where!r}: functions[{i}] has unknown key(s) {unknown} "
                              f"or is not a mapping; valid keys: {list(_SPEC_KEYS)}")
    return get_rewards(functions)


# ------------------------------------------------------------------------------------------------ the app
def build_app(
    rewards: Sequence[Reward], *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, timeout_s: float | None = None
) -> Any:
    """A Starlette application serving ``rewards`` (names must be unique: use :func:`load_rewards` or
    :func:`rgpo.rewards.get_rewards`). ``timeout_s``: seconds each reward may take for one batch."""
    import anyio.to_thread
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    by_name = {r.name: r for r in rewards}
    if len(by_name) != len(rewards):
        raise RewardError(f"served rewards need unique names, got {[r.name for r in rewards]}; "
                          f"resolve them with rewards.get_rewards")
    lock = threading.Lock()  # one batch at a time: reward models are not assumed thread-safe

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({
            "status": "ok",
            "protocol": PROTOCOL,
            "rewards": [{"name": r.name, "weight": r.weight} for r in rewards],
            "max_request_bytes": max_request_bytes,
        })

    async def score(request: Request) -> JSONResponse:
        try:
            job = _parse(await _read_body(request, max_request_bytes), by_name)
        except _BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)

        def run() -> dict[str, list[float | None]]:
            with lock:
                return _score(job, timeout_s)

        try:
            scores = await anyio.to_thread.run_sync(run)
        except RewardError as e:
            return JSONResponse({"error": str(e)}, status_code=500)
        # The request's per-sample keys, echoed: the client checks that these scores are for its samples, in order.
        return JSONResponse({"scores": scores, **({"keys": job["keys"]} if job["keys"] is not None else {})})

    return Starlette(routes=[Route("/health", health, methods=["GET"]), Route("/score", score, methods=["POST"])])


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes: by its declared
    Content-Length before reading anything, else while it streams in."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BadRequest(f"request body of {declared} bytes is over the server's limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BadRequest(f"request body is over the server's limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes, by_name: Mapping[str, Reward]) -> dict[str, Any]:
    """The request's fields, checked, with images decoded; a :class:`_BadRequest` saying what is wrong."""
    import json

    try:
        data = json.loads(body)
    except ValueError as e:
        raise _BadRequest(f"request body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise _BadRequest("request body must be a JSON object")
    prompts, completions = data.get("prompts"), data.get("completions")
    if not isinstance(prompts, list) or not isinstance(completions, list):
        raise _BadRequest("request needs 'prompts' and 'completions' lists")
    names = data.get("names") or list(by_name)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _BadRequest("'names' must be null or a list of served reward names")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise _BadRequest(f"no served reward named {unknown}; served: {list(by_name)}")
    columns = data.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(v, list) for v in columns.values()):
        raise _BadRequest("'columns' must map each column name to a list")
    images = data.get("images")
    decoded = None
    if images is not None:
        if not isinstance(images, list) or not all(isinstance(chain, list) for chain in images):
            raise _BadRequest("'images' must be a list (one per sample) of lists of base64 PNG strings")
        decoded = []
        for i, chain in enumerate(images):
            try:
                decoded.append([decode_image(item) for item in chain])
            except Exception as e:
                raise _BadRequest(f"images of sample {i} are not base64 PNG ({type(e).__name__}: {e})") from None
    ids = data.get("completion_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(x, list) for x in ids)):
        raise _BadRequest("'completion_ids' must be null or a list of lists of token ids")
    n = len(prompts)
    lengths = {"completions": len(completions), **({} if images is None else {"images": len(images)}),
               **({} if ids is None else {"completion_ids": len(ids)}),
               **{f"column {k!r}": len(v) for k, v in columns.items()}}
    wrong = [f"{k} has {v}" for k, v in lengths.items() if v != n]
    if wrong:
        raise _BadRequest(f"request has {n} prompts but {', '.join(wrong)}; every list needs one entry per sample")
    keys = data.get("keys")
    if keys is not None and not (isinstance(keys, list) and len(keys) == n):
        raise _BadRequest(f"'keys' must be null or a list of one key per sample ({n})")
    return {"rewards": [by_name[n] for n in names], "prompts": prompts, "completions": completions,
            "images": decoded, "columns": columns, "completion_ids": ids, "keys": keys}


def _score(job: dict[str, Any], timeout_s: float | None) -> dict[str, list[float | None]]:
    try:
        _, per_reward = combine(job["rewards"], None, job["prompts"], job["completions"], job["images"],
                                job["columns"], timeout=timeout_s, completion_ids=job["completion_ids"])
    except RewardError:
        raise
    except Exception as e:  # a malformed batch that combine's checks let through
        raise RewardError(f"scoring raised {type(e).__name__}: {e}") from e
    return {r.name: [None if math.isnan(v) else v for v in per_reward[:, j].tolist()]
            for j, r in enumerate(job["rewards"])}


# ------------------------------------------------------------------------------------------------ serving
def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), so the address is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RewardError(f"reward server cannot listen on {host}:{port}: {e}") from e
    sock.listen(128)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server(app: Any, log_level: str) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=30))


@contextlib.contextmanager
def background_server(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` from a thread of this process while the block runs; yields its URL (tests, notebooks)."""
    sock = _listen(host, port)
    server = _server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="reward-server", daemon=True)
    thread.start()
    try:
        yield _url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``rgpo reward-server --config rewards.yaml --port N --host 127.0.0.1``: load the rewards, print
    ``serving [...] on http://host:port`` once they are loaded, and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="rgpo reward-server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML with a 'functions:' list of {name, weight, kwargs}")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one; the URL is printed)")
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
                        help="largest request body in MiB; larger ones get HTTP 413 (default 64)")
    parser.add_argument("--timeout-s", type=float, default=None, help="seconds each reward may take per batch")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    try:
        rewards = load_rewards(args.config)
        sock = _listen(args.host, args.port)
    except RewardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = build_app(rewards, max_request_bytes=int(args.max_request_mb * 2**20), timeout_s=args.timeout_s)
    print(f"serving {[r.name for r in rewards]} on {_url(sock)}", flush=True)
    try:
        _server(app, args.log_level).run(sockets=[sock])
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
