"""Worker for tests/test_reliability.py: ``python tests/fault_worker.py key=value ...`` runs exactly
``rgpo train --config configs/tiny.yaml key=value ...``, with one fault injected when ``RGPO_FAULT`` says so:

    kill_in_step:N         SIGKILL itself in the middle of step N's update (after its first micro-batch backward)
    kill_in_checkpoint:N   SIGKILL itself while writing step N's checkpoint: engine state, RNG and
                           trainable.safetensors written, the completion marker half written, nothing published
    wait_signal_in_step:N:FILE
                           in the middle of step N's update, create FILE and wait (up to 120 s) until the parent's
                           SIGTERM / SIGINT has reached the trainer's handler, then carry on

Steps are counted from 1. Every injected fault prints a ``[fault] ...`` line first.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: E402,F401  (offline settings, thread count)

REPO = Path(__file__).resolve().parents[1]


def _install(fault: str) -> None:
    from rgpo import checkpointing as ckpt
    from rgpo.trainer import RGPOTrainer

    kind, _, rest = fault.partition(":")
    if kind in ("kill_in_step", "wait_signal_in_step"):
        step_text, _, flag = rest.partition(":")
        target = int(step_text)
        original = RGPOTrainer.micro_batch_loss
        calls = {"n": 0}

        def micro_batch_loss(self, rollout, advantages, idx, *args):
            if self.step + 1 == target:  # self.step counts finished steps
                calls["n"] += 1
                if kind == "kill_in_step" and calls["n"] == 2:
                    print(f"[fault] SIGKILL during step {target} (one micro-batch already backpropagated)", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
                if kind == "wait_signal_in_step" and calls["n"] == 1:
                    print(f"[fault] waiting for a signal during step {target}", flush=True)
                    Path(flag).write_text(str(os.getpid()))
                    deadline = time.monotonic() + 120
                    while not self._stop_requested and time.monotonic() < deadline:
                        time.sleep(0.02)
            return original(self, rollout, advantages, idx, *args)

        RGPOTrainer.micro_batch_loss = micro_batch_loss
    elif kind == "kill_in_checkpoint":
        target = int(rest)
        original_write = ckpt.write_state

        def write_state(path, state):
            if state["step"] == target:
                # Die half-way through the marker: its temporary file is on disk, the rename never happens.
                (path / (ckpt.STATE_FILE + ".tmp")).write_text('{"step": ')
                print(f"[fault] SIGKILL while writing the checkpoint of step {target} ({path})", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return original_write(path, state)

        ckpt.write_state = write_state
    elif kind:
        raise SystemExit(f"unknown RGPO_FAULT {fault!r}")


def main() -> int:
    from rgpo.cli import main as rgpo_main

    _install(os.environ.get("RGPO_FAULT", ""))
    return rgpo_main(["train", "--config", str(REPO / "configs" / "tiny.yaml"), *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
