"""The ``remote`` reward: scores computed by a reward server (:mod:`rgpo.rewards.server`) over HTTP.

A run lists it like any other reward, pointing at a server started with ``rgpo reward-server``::

    rewards:
      functions:
        - {name: format, weight: 1.0}
        - name: remote
          kwargs: {url: "http://127.0.0.1:8000", names: [clip_consistency], timeout_s: 60, batch_size: 64}

The value of a sample is the served reward's raw value; with several ``names``, their sum weighted by the
client's ``weights`` (1 each by default) over those that apply to it (None when none does). Weights belong to
the run config: those in the server's YAML are only reported by ``/health``. Heavy models then live in one
process (or on another machine) and the trainer's ranks share them.

Wire format (protocol 1), JSON both ways::

    GET  /health -> {"status": "ok", "protocol": 1, "rewards": [{"name": ..., "weight": ...}, ...],
                     "max_request_bytes": N}
    POST /score  {"prompts": [...], "completions": [...], "completion_ids": [[int, ...], ...] | null,
                  "images": [[<base64 PNG>, ...], ...], "columns": {column: [...]}, "names": [...] | null}
              -> {"scores": {name: [float | null, ...]}}

Errors come back as ``{"error": message}`` with status 400 (a malformed request), 413 (a request over the
server's size limit) or 500 (a served reward failed). Images travel as PNG, which is lossless: the server
scores exactly the pixels the trainer drew.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from typing import Any

from .contract import chain_images
from .registry import RewardError, register_reward

__all__ = ["PROTOCOL", "RemoteReward", "decode_image", "encode_image"]

PROTOCOL = 1
"""Version of the wire format; a server answering another one is refused by the client."""

_RETRY_STATUS = (502, 503, 504)  # a proxy or a server starting up: worth another try; 4xx / 500 are not


def sample_keys(prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
    """One short key per sample (CRC-32 of its prompt and completion), echoed by the server with its scores."""
    return [f"{zlib.crc32(json.dumps([p, c], default=str).encode()):08x}" for p, c in zip(prompts, completions)]


def encode_image(image: Any) -> str:
    """A PIL image as base64 PNG text (lossless, so the server sees the same pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # level 1: ~5x faster than the default, same pixels
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str) -> Any:
    """The PIL image that :func:`encode_image` encoded (pixels loaded, file closed)."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    image.load()
    return image


@register_reward("remote")
class RemoteReward:
    """Scores from a reward server, in batches, with retries; errors name the reward and the URL.

    Args:
        url: the server, ``http://host:port``.
        names: served rewards to use (default: all of them, in the server's order).
        weights: one per name, for the value of a sample: ``sum_r weights[r] * value_r`` over the names that
            apply to it (None where none does); default 1 each (one name: its raw value).
        timeout_s: seconds one request may take, retries and waits between them included; a server that does
            not answer in time gives a :class:`RewardError` naming the reward and the URL.
        retries: further attempts after a failed connection, a timeout or a 502/503/504, waiting
            ``backoff_s``, then twice as long each time (within ``timeout_s``). A request the server refuses
            (400, 413) or a reward failing on the server (500) is not retried: it would fail again.
        backoff_s: the first wait between attempts.
        batch_size: samples per request.

    Building one asks the server's ``/health`` for its rewards, so a wrong URL or name fails when the run
    starts, not at the first step.
    """

    def __init__(
        self,
        url: str,
        names: Sequence[str] | str | None = None,
        weights: Sequence[float] | None = None,
        timeout_s: float = 60.0,
        retries: int = 2,
        backoff_s: float = 0.25,
        batch_size: int = 64,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote: url must start with http:// or https://, got {url!r}")
        if not timeout_s > 0 or retries < 0 or backoff_s < 0 or batch_size < 1:
            raise ValueError(f"remote: need timeout_s > 0, retries >= 0, backoff_s >= 0, batch_size >= 1; got "
                             f"timeout_s={timeout_s}, retries={retries}, backoff_s={backoff_s}, batch_size={batch_size}")
        self.url = url.rstrip("/").removesuffix("/score").removesuffix("/health")
        self.timeout_s, self.retries, self.backoff_s, self.batch_size = float(timeout_s), retries, backoff_s, batch_size
        names = [names] if isinstance(names, str) else names
        self.log_name = "remote" if names is None else "remote:" + "+".join(names)
        health = self.health()
        served = [r["name"] for r in health["rewards"]]
        unknown = [n for n in names or () if n not in served]
        if unknown:
            raise ValueError(f"remote: {self.url} serves no reward {unknown}; it serves {served}")
        self.names: list[str] = list(served) if names is None else list(names)
        if weights is not None and len(weights) != len(self.names):
            raise ValueError(f"remote: {len(weights)} weights for the {len(self.names)} rewards {self.names}")
        self.weights = [1.0] * len(self.names) if weights is None else [float(w) for w in weights]
        self.max_request_bytes: int | None = health.get("max_request_bytes")

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        images: Sequence[Any] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        **columns: Any,
    ) -> list[float | None]:
        per_reward = self.scores(prompts, completions, images, completion_ids, **columns)
        totals: list[float | None] = []
        for i in range(len(completions)):
            terms = [w * per_reward[name][i] for name, w in zip(self.names, self.weights) if per_reward[name][i] is not None]
            totals.append(sum(terms) if terms else None)
        return totals

    def scores(
        self,
        prompts: list[Any],
        completions: list[Any],
        images: Sequence[Any] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        **columns: Any,
    ) -> dict[str, list[float | None]]:
        """Each served reward's raw value per sample (None where it does not apply), one request per batch."""
        n = len(completions)
        chains = chain_images(images, n)
        out: dict[str, list[float | None]] = {name: [] for name in self.names}
        for start in range(0, n, self.batch_size):
            part = slice(start, min(n, start + self.batch_size))
            body = self._body(prompts[part], completions[part], chains[part],
                              None if completion_ids is None else completion_ids[part],
                              {k: list(v)[part] for k, v in columns.items()}, start)
            answer = self._request("/score", body)
            self._check_keys(answer, sample_keys(prompts[part], completions[part]), start)
            for name, values in self._check_scores(answer, part.stop - part.start).items():
                out[name].extend(values)
        return out

    def health(self) -> dict[str, Any]:
        """The server's ``/health`` answer, checked (protocol, reward list)."""
        answer = self._request("/health", None)
        rewards = answer.get("rewards")
        if answer.get("protocol") != PROTOCOL or not isinstance(rewards, list) or not all(
            isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("weight"), (int, float))
            for r in rewards
        ):
            raise self._error("/health", f"not a reward server of protocol {PROTOCOL}: {json.dumps(answer)[:200]}")
        return answer

    # ---------------------------------------------------------------------------------------------- internals
    def _error(self, path: str, message: str) -> RewardError:
        return RewardError(f"reward {self.log_name!r} ({self.url}{path}): {message}")

    def _body(self, prompts: list[Any], completions: list[Any], chains: list[list[Any]],
              completion_ids: Sequence[Sequence[int]] | None, columns: dict[str, list[Any]], offset: int) -> bytes:
        encoded = []
        for i, chain in enumerate(chains):
            try:
                encoded.append([encode_image(image) for image in chain])
            except Exception as e:
                raise self._error("/score", f"cannot send the image(s) of sample {offset + i} as PNG "
                                            f"({type(e).__name__}: {e}); images must be PIL images") from e
        for key, values in columns.items():
            try:
                json.dumps(values, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise self._error("/score", f"column {key!r} cannot be sent as JSON ({e})") from e
        body = json.dumps({
            "prompts": list(prompts),
            "completions": list(completions),
            "completion_ids": None if completion_ids is None else [[int(t) for t in ids] for ids in completion_ids],
            "images": encoded,
            "columns": columns,
            "names": self.names,
            "keys": sample_keys(prompts, completions),
        }, allow_nan=False).encode()
        if self.max_request_bytes is not None and len(body) > self.max_request_bytes:
            raise self._error("/score", f"a batch of {len(chains)} samples is {len(body)} bytes, over the server's "
                                        f"limit of {self.max_request_bytes}; lower batch_size")
        return body

    def _check_keys(self, answer: dict[str, Any], sent: list[str], offset: int) -> None:
        """A server that echoes the request's per-sample ``keys`` (rgpo's does) must echo them in order: scores of
        another batch, or of this batch reordered (a proxy mixing requests, a server sorting by image size),
        would otherwise be paired with the wrong chains."""
        keys = answer.get("keys")
        if keys is None:
            return
        if keys != sent:
            wrong = next((i for i, (a, b) in enumerate(zip(keys, sent)) if a != b), min(len(keys), len(sent)))
            raise self._error("/score", f"the answer is for other samples: its key {wrong} is "
                                        f"{keys[wrong] if wrong < len(keys) else None!r}, the request's (sample "
                                        f"{offset + wrong}) {sent[wrong] if wrong < len(sent) else None!r} "
                                        f"({len(keys)} keys for {len(sent)} samples)")

    def _check_scores(self, answer: dict[str, Any], n: int) -> dict[str, list[float | None]]:
        """The answer's scores, or an error: a wrong length or a non-number is never read as 0."""
        scores = answer.get("scores")
        if not isinstance(scores, dict):
            raise self._error("/score", f"malformed response: no 'scores' object in {json.dumps(answer)[:200]}")
        out = {}
        for name in self.names:
            values = scores.get(name)
            if not isinstance(values, list):
                raise self._error("/score", f"malformed response: no list of scores for {name!r}")
            if len(values) != n:
                raise self._error("/score", f"malformed response: {len(values)} scores for {name!r}, expected {n}")
            for i, v in enumerate(values):
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                    raise self._error("/score", f"malformed response: score {i} of {name!r} is {v!r:.60}, "
                                                f"not a number or null")
            out[name] = [None if v is None else float(v) for v in values]
        return out

    def _request(self, path: str, body: bytes | None) -> dict[str, Any]:
        """GET (``body`` None) or POST ``path``; retried with exponential backoff within ``timeout_s``."""
        url = self.url + path
        start = time.monotonic()
        deadline = start + self.timeout_s
        attempts, last = 0, "no attempt made"
        while time.monotonic() < deadline:
            attempts += 1
            request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST",
                                             headers={"Content-Type": "application/json"} if body else {})
            try:
                with urllib.request.urlopen(request, timeout=max(0.01, deadline - time.monotonic())) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:  # the server answered, with an error
                message = _error_text(e)
                if e.code == 413:
                    raise self._error(path, f"the server refused a request of {len(body or b'')} bytes as too "
                                            f"large: {message}; lower batch_size") from None
                if e.code not in _RETRY_STATUS:
                    raise self._error(path, f"the server answered HTTP {e.code}: {message}") from None
                last = f"HTTP {e.code}: {message}"
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut off
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempts > self.retries:
                raise self._error(path, f"no answer after {attempts} attempt(s) in {time.monotonic() - start:.1f} s "
                                        f"(retries={self.retries}): {last}; is the reward server running?")
            time.sleep(max(0.0, min(self.backoff_s * 2 ** (attempts - 1), deadline - time.monotonic())))
        else:
            raise self._error(path, f"no answer within timeout_s={self.timeout_s} ({attempts} attempt(s)): {last}; "
                                    f"is the reward server running?")
        try:
            answer = json.loads(raw)
        except ValueError:
            raise self._error(path, f"malformed response (not JSON): {raw[:200]!r}") from None
        if not isinstance(answer, dict):
            raise self._error(path, f"malformed response (not a JSON object): {raw[:200]!r}")
        return answer

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, names={self.names})"


def _error_text(error: urllib.error.HTTPError) -> str:
    """The ``error`` message of a server's JSON error answer, else the start of its body."""
    try:
        raw = error.read()
    except Exception:
        return str(error.reason)
    try:
        return str(json.loads(raw)["error"])
    except Exception:
        return raw[:200].decode("utf-8", "replace") or str(error.reason)
