"""Held-out evaluation of a toy-world model: format rate, reasoning accuracy, CLIP consistency.

    python scripts/eval_toy.py                                   # the starting policy (configs/toy_world.yaml)
    python scripts/eval_toy.py --checkpoint outputs/toy_world/checkpoints/step-0000040

Same as ``rgpo eval-toy``; see :func:`rgpo.toyworld.evaluate` for what each figure means.
"""

import sys

from rgpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval-toy", *sys.argv[1:]]))
