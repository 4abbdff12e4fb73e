"""Smoke test of the benchmarks (``python -m benchmarks``): it runs, names the machine and writes every phase with
positive numbers, and every optimisation's on/off row. No speed target is asserted: timings depend on the machine
and its load."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_quick_smoke(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--steps", "2", "--warmup", "1",
         "--skip-trl", "--skip-scaling", "--ablation-rounds", "1", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").read_text().startswith("# rgpo benchmark")

    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["torch"] and machine["device"] in ("cpu", "cuda")

    main = report["main"]
    assert main["steps_measured"] == 2 and main["steps_warmup"] == 1 and main["memory_steps"] == 2
    assert main["phase_peak_mib"]["rollout"] >= 0
    for phase in ("rollout", "rollout/text", "rollout/forward", "rollout/reference", "rollout/images", "rewards",
                  "update"):
        assert main["phase_s"][phase] > 0, phase
    assert main["step_s"] > 0 and main["peak_mib"] > 0
    assert main["chains_per_step"] == 8 and main["images_per_step"] == 8
    assert main["tokens_per_step"] == 8 * 24  # EOS banned: every chain is max_new_tokens long
    for key in ("chains_per_s", "images_per_s", "tokens_per_s_step", "tokens_per_s_generation"):
        assert main["throughput"][key] > 0, key

    bare = main["bare"]["median"]
    for key in ("generate_s", "forward_nograd_s", "images_s", "update_s", "total_s"):
        assert bare[key] > 0, key
    assert "overhead_pct" in report["overhead"]

    # every optimisation measured on and off, the naive path checked to compute the same result
    rows = report["ablations"]["rows"]
    names = " | ".join(r["optimisation"] for r in rows)
    for key in ("prefilled once per group", "decoding steps", "one forward", "keys/values cached", "guidance",
                "policy and reference decoder runs batched", "sampled timestep", "train + eval switch",
                "overlap_comm and contiguous_gradients", "ZeRO-3"):
        assert key in names, key
    for r in rows:
        assert r["on_s"] > 0 and r["off_s"] > 0 and r["same_result"], r
    assert "## Optimisations, each on vs off" in (out / "bench.md").read_text()


@pytest.mark.slow
def test_bench_mindomni_7b_preset_wiring(tmp_path):
    """--mindomni-7b is the GPU run (the released recipe at its real sizes, random weights). Its wiring is checked
    here with the model shrunk back to the tiny shape by later --set values (which win over the preset): bf16,
    one group of 4 chains, images, the full step only."""
    out = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    shrink = ["model.path=random:tiny", "rollout.max_new_tokens=6", "rollout.image.height=32",
              "rollout.image.width=32", "rollout.image.steps=2", "rewards.functions=[format]",
              "model.gradient_checkpointing=false"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--mindomni-7b", "--steps", "1", "--warmup", "0",
         "--skip-bare", "--threads", "1", *[a for kv in shrink for a in ("--set", kv)], "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    main = report["main"]
    assert main["config"]["dtype"] == "bfloat16" and main["config"]["G"] == 4 and main["chains_per_step"] == 4
    assert main["config"]["decoder_steps"] == 2 and main["images_per_step"] == 4
    assert main["config"]["lora"] == [64, 128, 0.05]
    assert "comparison" not in report and "ablations" not in report and "scaling" not in report


@pytest.mark.slow
def test_floor_benchmark_wiring_on_the_tiny_shape(tmp_path):
    """``python -m benchmarks floor`` (the same command prints the same tables on a CUDA device): peaks probed,
    every counted phase with a positive work, floor and time, the compiled-decode comparison with the same tokens
    (here the static cache uncompiled, to keep the test short), and the image-lever cost table."""
    out = tmp_path / "floor"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "floor", "--shapes", "tiny", "--steps", "1", "--warmup", "0",
         "--decode-rounds", "1", "--decode-backend", "none", "--lever-steps", "1", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "floor.json").read_text())
    (shape,) = report["shapes"]
    assert shape["shape"] == "tiny" and shape["peaks"]["gemm_flops_per_s"] > 0
    assert shape["peaks"]["read_bytes_per_s"] > 0
    for phase in ("prefill", "decode", "rollout/policy_forward", "rollout/reference", "rollout/images", "update"):
        assert shape["phase_s"][phase] > 0, phase
        assert shape["work"][phase]["flops"] > 0 and shape["work"][phase]["bytes"] > 0, phase
    assert shape["config"]["chains"] == 4 and shape["config"]["tokens"] == 24
    decode = shape["decode_compare"]
    assert decode["available"] and decode["same_tokens"] and decode["eager_s"] > 0 and decode["compiled_s"] > 0
    levers = report["levers"]["levers"]
    assert set(levers) == {"base", "steps4", "cfg3", "pg_full", "pg_w2", "pg_w2_cache"}
    assert all(lever["step_s"] > 0 and lever["phase_s"]["rollout/images"] > 0 for lever in levers.values())
    assert levers["pg_full"]["images"] == 2 * levers["pg_full"]["chains"]
    markdown = (out / "floor.md").read_text()
    assert "| phase | work | bound | floor | time | time / floor |" in markdown
    assert "| decode (eager loop) |" in markdown and "## Image-cost levers" in markdown
