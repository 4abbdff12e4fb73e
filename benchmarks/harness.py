"""The pieces every benchmark shares: the machine, peak-memory probes, the timing + memory phase timer the trainer
takes through its ``timer_factory`` hook, one measured ``train_step()``, summaries and pooling of measured steps,
the worker subprocesses, alternating on/off timing, and the report (markdown + JSON).

Nothing here patches rgpo: the trainer's step timer is set through ``RGPOTrainer.timer_factory``, and the model is
reached through the :class:`rgpo.models.UnifiedModel` interface (the few documented model switches a benchmark
flips live in :mod:`benchmarks.switches`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _var, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("WANDB_MODE", "disabled"), ("WANDB_SILENT", "true"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_var, _value)

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
TOP_PHASES = ("rollout", "rewards", "advantages", "update")
MEMORY_STEPS = 2  # extra steps after the timed ones that record each phase's peak memory (their time is not used)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ================================================================================================ memory
class PeakMemory:
    """Peak memory since the last :meth:`reset`, in bytes: CUDA allocator or CPU resident set."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM + /proc/self/clear_refs"
        self._sampler: threading.Thread | None = None
        self._sampled = 0
        if not self.cuda:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._hwm()
            except OSError:
                self.method = "psutil RSS sampled every 5 ms"
                self._start_sampler()

    # -- CPU helpers
    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"{key} not in /proc/self/status")

    def _hwm(self) -> int:
        return self._status_kb("VmHWM")

    def _start_sampler(self) -> None:
        def loop():
            while True:
                self._sampled = max(self._sampled, self.current())
                time.sleep(0.005)

        self._sampler = threading.Thread(target=loop, daemon=True)
        self._sampler.start()

    def current(self) -> int:
        """Memory in use now (CUDA: allocated; CPU: resident set)."""
        if self.cuda:
            import torch

            return torch.cuda.memory_allocated()
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            return self._status_kb("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self._sampler is None:
            Path("/proc/self/clear_refs").write_text("5")
        else:
            self._sampled = self.current()

    def peak(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._sampler is None:
            return self._hwm()
        return max(self._sampled, self.current())


_MEM: PeakMemory | None = None


def memory() -> PeakMemory:
    """The worker's memory probe (set up once per worker process by :func:`init_memory`)."""
    if _MEM is None:
        raise RuntimeError("benchmarks.harness.init_memory() was not called in this process")
    return _MEM


def init_memory(device: str) -> PeakMemory:
    global _MEM
    _MEM = PeakMemory(device)
    return _MEM


def mib(n: float) -> float:
    return n / 2**20


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def sync() -> None:
    """Wait for queued CUDA work (CUDA started first); nothing on a CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.init()
        torch.cuda.synchronize()


def device_sync() -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


# ================================================================================================ machine
def machine_info(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": device,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for pkg in ("transformers", "trl", "peft", "deepspeed", "diffusers", "accelerate"):
        with contextlib.suppress(Exception):
            info[pkg] = __import__(pkg).__version__
    return info


# ================================================================================================ the step timer
def phase_timer_class():
    """A subclass of rgpo's :class:`~rgpo.tracking.PhaseTimer` that also records each phase's peak memory (nested
    phases handled), for ``trainer.timer_factory``. The class remembers the last timer it made
    (``current``): the step's."""
    from rgpo.tracking import PhaseTimer

    class BenchTimer(PhaseTimer):
        current: BenchTimer | None = None
        # Per-phase peaks need a peak reset at every phase boundary, and on a CPU each reset (clear_refs) makes
        # the allocations after it slower (about 1.5 ms over a 100 ms text-only step), so only the extra memory
        # steps track phases; the timed steps read one peak for the whole step, as the TRL side does.
        track_phase_memory = False

        def __init__(self, sync=None):
            super().__init__(sync)
            self.peaks: dict[str, int] = defaultdict(int)
            self.stack: list[str] = []
            BenchTimer.current = self

        def _fold(self) -> None:
            peak = memory().peak()
            for phase in self.stack:
                self.peaks[phase] = max(self.peaks[phase], peak)

        @contextlib.contextmanager
        def __call__(self, phase: str):
            track = BenchTimer.track_phase_memory
            if track:
                self._fold()
                memory().reset()
            self.stack.append(phase)
            try:
                with PhaseTimer.__call__(self, phase):
                    yield
            finally:
                if track:
                    self._fold()
                    memory().reset()
                self.stack.pop()

    return BenchTimer


# ================================================================================================ rgpo trainers
def rgpo_config(spec: dict[str, Any], run_dir: str):
    """The case's rgpo config: its overrides, with logging, checkpoints, evaluation and the no-signal guards off."""
    from rgpo.config import load_config

    overrides = [
        *spec["overrides"],
        f"logging.output_dir={run_dir}",
        "logging.mode=disabled",
        "logging.table_every=0",
        "logging.progress_bar=false",
        "checkpoint.every=0",
        "checkpoint.resume=null",
        "optim.max_steps=1000000",
        "eval.every=0",
        # The guards run and are timed (timing/guards), but a random tiny model has no learning signal by design:
        # the two "trains on nothing" streaks would stop the measurement, so they are off here.
        "guards.zero_grad_steps=0",
        "guards.zero_spread_steps=0",
    ]
    return load_config(spec["config"], overrides)


def build_rgpo(spec: dict[str, Any], cfg, timer_cls=None):
    """The RGPOTrainer of a case: EOS banned (equal work), its step timed by ``timer_cls`` (the trainer's
    ``timer_factory`` hook; the reference forward is the trainer's own ``rollout/reference`` phase)."""
    from rgpo.building import build_model
    from rgpo.trainer import RGPOTrainer

    from .switches import ban_eos, lora_without_lm_head

    model = lora_without_lm_head(build_model(cfg)) if spec.get("lora_without_lm_head") else None
    trainer = RGPOTrainer(cfg, model=model)
    ban_eos(trainer.model, spec)
    if timer_cls is not None:
        trainer.timer_factory = timer_cls
    return trainer


def measure_step(trainer, timer_cls, warmup: bool, base_rss: int, phase_memory: bool = False) -> dict[str, Any]:
    """One timed ``train_step()`` with its phases, memory and work done. ``phase_memory``: a memory step, which
    also records each phase's peak (and whose time is not used)."""
    import torch

    mem = memory()
    timer_cls.track_phase_memory = phase_memory
    gc.collect()
    mem.reset()
    start_mem = mem.current()
    t = time.perf_counter()
    metrics = trainer.train_step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t
    peak = mem.peak()
    reserved = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None
    timer = timer_cls.current
    peak = max([peak, *timer.peaks.values()])
    rollout = trainer._last_rollout
    return {
        "warmup": warmup,
        "memory_step": phase_memory,
        "step_s": step_s,
        "phases_s": dict(timer.seconds),
        "phase_peak_mib": {k: mib(v - start_mem) for k, v in timer.peaks.items()},
        "peak_mib": mib(peak),
        "peak_reserved_mib": mib(reserved) if reserved is not None else None,  # CUDA: allocated + cached blocks
        "transient_mib": mib(peak - start_mem),
        "footprint_mib": mib(peak - base_rss),
        "tokens": int(rollout.completions.completion_mask.sum()),
        "chains": len(rollout.rows),
        "images": sum(len(ims) for ims in rollout.images),
        "completion_len": float(metrics.get("completion/mean_length", float("nan"))),
        "reported_chains_per_s": float(metrics.get("throughput/chains_per_s", float("nan"))),
    }


def _derived_phases(phase_s: dict[str, float], steps: list[dict[str, Any]]) -> None:
    """``rollout/policy_forward`` (the rollout forward minus the reference's) and ``other`` (the step outside the
    top-level phases), in place."""
    if "rollout/forward" in phase_s and "rollout/reference" in phase_s:
        phase_s["rollout/policy_forward"] = median(
            [s["phases_s"].get("rollout/forward", 0.0) - s["phases_s"].get("rollout/reference", 0.0) for s in steps])
    phase_s["other"] = median([s["step_s"] - sum(s["phases_s"].get(k, 0.0) for k in TOP_PHASES) for s in steps])


def summarise(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Times from the measured steps; per-phase peaks from the memory steps; overall peaks from both."""
    memory_steps = [s for s in steps if s.get("memory_step")]
    steps = [s for s in steps if not s.get("memory_step")]
    measured = [s for s in steps if not s["warmup"]] or steps
    phases = sorted({k for s in measured for k in s["phases_s"]})
    phase_s = {k: median([s["phases_s"].get(k, 0.0) for s in measured]) for k in phases}
    _derived_phases(phase_s, measured)
    step_s = median([s["step_s"] for s in measured])
    chains = measured[0]["chains"]
    images = measured[0]["images"]
    tokens = median([s["tokens"] for s in measured])
    text_s = phase_s.get("rollout/text", float("nan"))
    image_s = phase_s.get("rollout/images", float("nan"))
    both = measured + memory_steps
    return {
        "steps_measured": len(measured),
        "steps_warmup": len(steps) - len(measured),
        "memory_steps": len(memory_steps),
        "step_s": step_s,
        "step_s_min": min(s["step_s"] for s in measured),
        "step_s_max": max(s["step_s"] for s in measured),
        "phase_s": phase_s,
        "phase_peak_mib": ({k: max(s["phase_peak_mib"].get(k, 0.0) for s in memory_steps) for k in phases}
                           if memory_steps else {}),
        "peak_mib": max(s["peak_mib"] for s in both),
        "peak_reserved_mib": max((s["peak_reserved_mib"] or 0.0) for s in both) or None,
        "transient_mib": max(s["transient_mib"] for s in both),
        "footprint_mib": max(s["footprint_mib"] for s in both),
        "tokens_per_step": tokens,
        "chains_per_step": chains,
        "images_per_step": images,
        "throughput": {
            "chains_per_s": chains / step_s,
            "images_per_s": images / step_s if images else 0.0,
            "tokens_per_s_step": tokens / step_s,
            "tokens_per_s_generation": tokens / text_s if text_s == text_s and text_s > 0 else float("nan"),
            "images_per_s_sampling": images / image_s if images and image_s > 0 else 0.0,
        },
        "completion_len": median([s["completion_len"] for s in measured]),
        "reported_chains_per_s": median([s["reported_chains_per_s"] for s in measured]),
        "steps": steps,
    }


def pool(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one configuration as one: medians over all their measured steps, maxima of memory."""
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    steps = [s for r in results for s in r["steps"] if not s["warmup"]]
    out["steps"] = [s for r in results for s in r["steps"]]
    out["steps_measured"] = len(steps)
    out["step_s"] = median([s["step_s"] for s in steps])
    out["step_s_min"] = min(s["step_s"] for s in steps)
    out["step_s_max"] = max(s["step_s"] for s in steps)
    names = sorted({k for s in steps for k in s["phases_s"]})
    phase_s = {k: median([s["phases_s"].get(k, 0.0) for s in steps]) for k in names}
    if out["kind"] == "trl":
        phase_s["update"] = median([s["step_s"] - s["phases_s"].get("rollout", 0.0) for s in steps])
        cycles = [s["cycle_s"] for s in steps if s["cycle_s"] == s["cycle_s"]]
        out["cycle_s"] = median(cycles) if cycles else float("nan")
    else:
        _derived_phases(phase_s, steps)
    out["phase_s"] = phase_s
    for key in ("peak_mib", "transient_mib", "footprint_mib", "model_state_mib"):
        out[key] = max(r[key] for r in results)
    out["build_s"] = median([r["build_s"] for r in results])
    chains, tokens = out["chains_per_step"], out["tokens_per_step"]
    text_s = phase_s.get("rollout/text", float("nan"))
    out["throughput"] = {**out["throughput"], "chains_per_s": chains / out["step_s"],
                         "tokens_per_s_step": tokens / out["step_s"],
                         "tokens_per_s_generation": tokens / text_s if text_s > 0 else float("nan")}
    if all(r.get("bare") for r in results):
        iters = [x for r in results for x in r["bare"]["iterations"]]
        measured = [x for x in iters if not x["warmup"]] or iters
        out["bare"] = {"median": {k: median([x[k] for x in measured]) for k in measured[0] if k.endswith("_s")},
                       "iterations": iters}
    out["rounds"] = len(results)
    return out


# ================================================================================================ on vs off
def alternate(variants: dict[str, Callable[[], Any]], rounds: int, sync_fn) -> dict[str, dict[str, Any]]:
    """Run each variant ``rounds`` times (after one warm-up round), alternating between them so that a change of
    machine load hits every variant alike; median time and the largest peak-memory rise."""
    mem = memory()
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, float] = dict.fromkeys(variants, 0.0)
    results: dict[str, Any] = {}
    for r in range(rounds + 1):
        for name, fn in variants.items():
            gc.collect()
            sync_fn()
            mem.reset()
            start = mem.current()
            t = time.perf_counter()
            results[name] = fn()
            sync_fn()
            dt = time.perf_counter() - t
            if r:
                times[name].append(dt)
                peaks[name] = max(peaks[name], mib(mem.peak() - start))
    return {k: {"s": median(times[k]), "peak_rise_mib": peaks[k], "result": results[k]} for k in variants}


# ================================================================================================ workers
def spawn(cases: list[dict[str, Any]], common: dict[str, Any], threads: int | None, tmp: Path, name: str):
    """Run ``cases`` one after the other in a fresh worker process (``python -m benchmarks --_worker``): memory
    figures start from a clean process and one run's allocator state does not leak into the next."""
    spec_file, out_file = tmp / f"{name}.spec.json", tmp / f"{name}.out.json"
    spec_file.write_text(json.dumps({"cases": cases, "common": common, "threads": threads}))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--_worker", str(spec_file), str(out_file)],
                          cwd=str(REPO))
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker {name!r} failed (exit {proc.returncode})")
    return json.loads(out_file.read_text())


def worker_main(spec_file: str, out_file: str, runners: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """A worker process: each case of the spec by its ``kind``'s runner, the results and the machine written to
    ``out_file``."""
    import torch

    spec = json.loads(Path(spec_file).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # the float32 parts (CLIP, VAE) on tensor cores, as a GPU user would run them
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    mem = init_memory(device)
    results = []
    for case in spec["cases"]:
        case = {**spec["common"], **case}
        log(f"{case['label']} ...")
        t = time.perf_counter()
        result = runners[case["kind"]](case)
        result["wall_s"] = time.perf_counter() - t
        result["memory_method"] = mem.method
        results.append(result)
        if "step_s" in result:
            log(f"{case['label']}: step {result['step_s']:.3f} s (median of {result['steps_measured']}), "
                f"{result['wall_s']:.0f} s in all")
    Path(out_file).write_text(json.dumps({"machine": machine_info(device), "results": results}, indent=1))


# ================================================================================================ report
def fmt_s(x: float) -> str:
    if x != x:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def fmt_ms(x: float) -> str:
    """Milliseconds with a decimal below 10 ms (the optimisation rows are short)."""
    if x != x:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 0.01 else fmt_s(x)


def fmt_n(x: float, digits: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def render(report: dict[str, Any], sections: list[Callable[[dict[str, Any]], list[str]]]) -> str:
    """The markdown report: the command and the machine, then each benchmark's section (each may also add its
    headline figures to ``report``)."""
    m = report["machine"]
    lines = ["# rgpo benchmark", ""]
    lines.append(f"Command: `{report['command']}`  ")
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
                 f"{m.get('memory_total_gib', '?')} GiB; device **{m['device']}**"
                 + (f" ({m['gpu']})" if m.get("gpu") else "")
                 + f"; torch {m['torch']} ({m['torch_threads']} threads), transformers {m.get('transformers')}, "
                 f"trl {m.get('trl')}, peft {m.get('peft')}, deepspeed {m.get('deepspeed')}; load average at start "
                 f"{', '.join(f'{x:.1f}' for x in m.get('load_average_at_start') or [])}, at end "
                 f"{', '.join(f'{x:.1f}' for x in report.get('load_average_at_end') or [])}.  ")
    lines.append(f"Memory: {report['memory_method']}. Times are medians over the measured steps after warm-up.")
    for section in sections:
        lines += section(report)
    lines.append("")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path, sections) -> str:
    """``bench.md`` and ``bench.json`` under ``out``; returns the markdown."""
    markdown = render(report, sections)
    (out / "bench.md").write_text(markdown)
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    return markdown
