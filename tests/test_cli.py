"""The command line end to end in subprocesses: train (with evaluation), sample, export, and the exported model
reloading with the trained weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SIGNAL = f"rewards.functions=[format, {{name: '{REPO / 'tests' / 'signal_reward.py'}:letter_fraction', weight: 1.0}}]"


def rgpo(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "rgpo.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_sample_export_round_trip(tmp_path):
    out = tmp_path / "run"
    log = rgpo("train", "--config", str(REPO / "configs" / "tiny.yaml"), f"logging.output_dir={out}", SIGNAL,
               "logging.mode=offline", "optim.max_steps=2", "checkpoint.every=2", "eval.every=2",
               f"data.eval_file={REPO / 'configs' / 'prompts' / 'sample.jsonl'}", "eval.num_prompts=2", cwd=tmp_path)
    assert "final step: reward/total=" in log
    checkpoint = out / "checkpoints" / "step-0000002"
    assert (checkpoint / "trainer_state.json").is_file()

    samples = tmp_path / "samples"
    log = rgpo("sample", "--checkpoint", str(checkpoint), "--prompts", str(REPO / "configs" / "prompts" / "sample.jsonl"),
               "--out", str(samples), "--limit", "3", cwd=tmp_path)
    assert sorted(p.name for p in samples.glob("*.png")) == ["0000.png", "0001.png", "0002.png", "contact_sheet.png"]
    assert (samples / "0000.txt").read_text().startswith("The animal that is said to have (3 + 6) lives")

    exported = tmp_path / "exported"
    rgpo("export", "--checkpoint", str(checkpoint), "--out", str(exported), cwd=tmp_path)
    for part in ("mllm", "image_decoder", "vae", "connector.safetensors"):
        assert (exported / part).exists(), part

    # The exported model is the trained one: LoRA merged into the language model, everything else as built.
    from rgpo.building import load_trained
    from rgpo.models.mindomni import MindOmni
    from rgpo.models.mindomni.tiny import build_tiny_mindomni

    trained, _ = load_trained(str(checkpoint))
    reloaded = MindOmni.from_pretrained(str(exported))
    base = build_tiny_mindomni(seed=0)
    trained_sd, reloaded_sd, base_sd = trained.state_dict(), reloaded.state_dict(), base.state_dict()
    assert trained_sd.keys() == reloaded_sd.keys()
    for name in trained_sd:
        torch.testing.assert_close(reloaded_sd[name], trained_sd[name], rtol=0, atol=0, msg=name)
    moved = [n for n in base_sd if "language_model" in n and "proj" in n and not torch.equal(base_sd[n], reloaded_sd[n])]
    assert moved, "the merged LoRA should have changed the language model's projections"
    assert all(torch.equal(base_sd[n], reloaded_sd[n]) for n in base_sd if n.startswith(("decoder.", "connector.", "vae.")))
