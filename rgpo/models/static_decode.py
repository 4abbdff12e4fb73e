"""A compiled decode step on a static KV cache, for the chain-sampling loops of the families.

The eager loop (each family's ``generate``) grows a dynamic KV cache by one column per token and runs the language
model's Python forward module by module: at the released sizes a token reads every weight once (memory-bound), and
launching a few kernels per layer per token from Python adds overhead the hardware does not need. Here the cache is
preallocated (transformers' ``StaticCache``) and the one-token step, with fixed shapes, goes through
``torch.compile`` (``mode="reduce-overhead"`` on CUDA, which captures the step as a CUDA graph):

    prefill (eager, once per prompt, as today) -> keys/values repeated G times into the static cache
    for each token: sample (eager, ``rgpo.models.lm.sample_tokens``: the same generator draws as the eager loop)
                    -> compiled step(token, positions, key mask) -> float32 logits (rows, V)

Only the model's step is compiled; sampling, EOS bookkeeping and the RNG stay in the family's loop, so the tokens
are those of the eager loop (tested under greedy and seeded sampling). The static cache is ``bucket``-rounded in
length and kept between calls, so prompts of slightly different lengths reuse one compiled graph.

When compilation is unavailable (no dynamo on this Python, no C++ compiler for inductor on a CPU, ZeRO-3's
partitioned parameters, an attention implementation that cannot take the boolean key mask) or fails, the family
runs its eager loop; the reason is logged once per process. Compile time (the first call at each new shape) is
kept apart from step time in :attr:`CompiledDecoder.stats`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("rgpo.decode")
_LOGGED: set[str] = set()

# (token (rows, 1), positions, key mask (rows, 1, 1, L) bool, cache) -> float32 logits (rows, V)
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]


def log_once(message: str) -> None:
    """Log ``message`` once per process (a fallback reason would otherwise repeat at every rollout)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.warning(message)


def compile_unavailable(device: torch.device, backend) -> str | None:
    """Why ``torch.compile`` with ``backend`` cannot run here, or None (also for ``backend`` None: no compiling)."""
    if backend is None:
        return None
    try:
        import torch._dynamo
    except ImportError as err:  # pragma: no cover - every supported torch has dynamo
        return f"torch._dynamo cannot be imported ({err})"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) is not supported on this Python"
    if backend == "inductor" and device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")
                                                               or shutil.which("clang++")):
        return "inductor needs a C++ compiler on a CPU and none is on PATH"
    return None


@dataclass
class DecodeStats:
    """Seconds spent in the compiled decoder: ``compile_s`` the first call at each new shape (tracing, code
    generation, CUDA-graph capture and that one step), ``step_s`` every later step, ``steps`` their count."""

    compile_s: float = 0.0
    step_s: float = 0.0
    steps: int = 0
    compiles: int = 0
    shapes: list[tuple[int, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, float]:
        return {"compile_s": self.compile_s, "step_s": self.step_s, "steps": float(self.steps),
                "compiles": float(self.compiles)}


class CompiledDecoder:
    """The compiled one-token step of one language model, and its static caches (one per (rows, length) bucket).

    ``step_fn(token, positions, mask, cache)`` is the family's forward of one token per row against ``cache``
    with the boolean key mask ``mask`` (True: attend), returning float32 logits; ``config`` the language model's
    config (the cache's layer layout). ``mode``: torch.compile's mode (None: ``reduce-overhead`` on CUDA, the
    default mode elsewhere); ``backend``: torch.compile's (``eager`` / ``aot_eager`` trace without generating
    code) or None (no compilation: the static-cache path alone, for tests and debugging)."""

    def __init__(self, step_fn: StepFn, config, *, mode: str | None = None, backend: Any = "inductor",
                 bucket: int = 64):
        self.step_fn, self.config = step_fn, config
        self.mode, self.backend, self.bucket = mode, backend, bucket
        self.settings = {"backend": backend, "mode": mode}
        self.failed: str | None = None  # set once compilation failed: the family decodes eagerly from then on
        self.stats = DecodeStats()
        self._compiled: Callable | None = None
        self._caches: dict[tuple[int, int, torch.dtype, torch.device], object] = {}
        self._seen: set[tuple[int, int]] = set()

    def __deepcopy__(self, memo):
        # A compiled graph and its caches belong to the model they were built for: a copy of the model (the
        # frozen reference of full fine-tuning) builds its own at its first compiled generate.
        return None

    def unavailable(self, device: torch.device) -> str | None:
        """Why this decoder cannot run on ``device`` (logged once by the caller), or None."""
        return self.failed or compile_unavailable(device, self.backend)

    def _function(self, device: torch.device) -> Callable:
        if self.backend is None:  # the static cache alone, uncompiled
            return self.step_fn
        if self._compiled is None:
            mode = self.mode if self.mode is not None else ("reduce-overhead" if device.type == "cuda" else None)
            self._compiled = torch.compile(self.step_fn, backend=self.backend, mode=mode, dynamic=False,
                                           fullgraph=False)
        return self._compiled

    def start(self, prefill_cache, prompt_mask: torch.Tensor, repeats: int, max_new_tokens: int) -> DecodeSession:
        """A decoding session for the prompts whose prefill filled ``prefill_cache`` (a transformers cache of the
        P prompt positions, one row per prompt) and whose padding mask is ``prompt_mask`` (prompts, P): every row
        repeated ``repeats`` times (the G chains share the prefill), room for ``max_new_tokens``."""
        from transformers import StaticCache

        prompts, length = prompt_mask.shape
        rows = prompts * repeats
        total = -(-(length + max_new_tokens) // self.bucket) * self.bucket
        first = prefill_cache.layers[0].keys
        key = (rows, total, first.dtype, first.device)
        cache = self._caches.get(key)
        if cache is None:
            cache = StaticCache(config=self.config, max_cache_len=total)
            self._caches[key] = cache
        for static, layer in zip(cache.layers, prefill_cache.layers):
            keys = layer.keys.repeat_interleave(repeats, 0)
            values = layer.values.repeat_interleave(repeats, 0)
            if not static.is_initialized:
                static.lazy_initialization(keys, values)
            # In place: the compiled step (and a captured CUDA graph) holds these very tensors.
            static.keys[:, :, :length].copy_(keys)
            static.values[:, :, :length].copy_(values)
            static.cumulative_length.fill_(length)
        mask = torch.zeros(rows, 1, 1, total, dtype=torch.bool, device=prompt_mask.device)
        mask[:, 0, 0, :length] = prompt_mask.bool().repeat_interleave(repeats, 0)
        return DecodeSession(self, cache, mask, length, (rows, total))


class DecodeSession:
    """One ``generate`` call's decoding on the static cache: :meth:`step` per token after the prefill."""

    def __init__(self, decoder: CompiledDecoder, cache, mask: torch.Tensor, length: int, shape: tuple[int, int]):
        self.decoder, self.cache, self.mask, self.shape = decoder, cache, mask, shape
        self.position = length  # the cache column the next token is written to

    def step(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (rows, V) float32 after ``token`` (rows,) at rope ``positions`` (as the eager loop passes them)."""
        decoder = self.decoder
        self.mask[:, 0, 0, self.position] = True
        self.position += 1
        # After a compiler failure this call finishes on the same cache uncompiled.
        fn = decoder.step_fn if decoder.failed else decoder._function(self.mask.device)
        fresh = self.shape not in decoder._seen and not decoder.failed
        start = time.perf_counter()
        if fresh:
            lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
            try:
                logits = fn(token[:, None], positions, self.mask, self.cache)
            except Exception as err:  # noqa: BLE001 - any compiler failure means: decode eagerly
                # dynamo wraps the compiler's own error: its first two lines name the backend, then the error
                lines = [line.strip() for line in str(err).splitlines() if line.strip()][:2]
                decoder.failed = f"torch.compile failed ({type(err).__name__}: {' '.join(lines)[:300]})"
                log_once(f"compiled decode off, eager loop instead: {decoder.failed}")
                # A graph that ran before the failing one may have advanced the cache: rewind, then run the step
                # uncompiled (the next generate decodes with the eager loop).
                for layer, length in zip(self.cache.layers, lengths):
                    layer.cumulative_length.copy_(length)
                logits = decoder.step_fn(token[:, None], positions, self.mask, self.cache)
            decoder._seen.add(self.shape)
        else:
            logits = fn(token[:, None], positions, self.mask, self.cache)
        if self.mask.is_cuda:  # the step's time, not its launch
            torch.cuda.synchronize(self.mask.device)
        elapsed = time.perf_counter() - start
        stats = decoder.stats
        if decoder.failed:  # uncompiled steps are not the compiled step's time
            pass
        elif fresh:
            stats.compile_s += elapsed
            stats.compiles += 1
            stats.shapes.append(self.shape)
        else:
            stats.step_s += elapsed
            stats.steps += 1
        # A CUDA graph's output lives in memory the next replay overwrites: the loop keeps it past that.
        return logits.clone()
