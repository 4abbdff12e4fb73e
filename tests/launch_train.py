"""Worker for the distributed tests: ``deepspeed --num_gpus 2 tests/launch_train.py RESULT.json key=value ...``.

Trains with the given overrides on top of configs/tiny.yaml and writes, from rank 0, which trainable and frozen
parameters changed (full tensors gathered under ZeRO-3) and every step's metrics.
"""

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: E402,F401  (offline settings)

from rgpo.config import load_config  # noqa: E402
from rgpo.trainer import RGPOTrainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def snapshot(trainer):
    params = dict(trainer.model.named_parameters())
    ctx = nullcontext()
    if trainer.zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None)
    with ctx:
        return {n: p.detach().float().clone() for n, p in params.items()}


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    result_path, overrides = args[0], args[1:]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    trainer = RGPOTrainer(cfg)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    before = snapshot(trainer)
    trainer.train()
    after = snapshot(trainer)
    trainer.close()
    if trainer.rank == 0:
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        Path(result_path).write_text(json.dumps({
            "world": trainer.world,
            "zero3": trainer.zero3,
            "trainable": sorted(trainable),
            "changed": sorted(changed),
            "num_params": len(before),
            "history": trainer.history,
        }))


if __name__ == "__main__":
    main()
