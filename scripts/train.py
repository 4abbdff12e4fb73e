"""Entry point for launchers: ``deepspeed --num_gpus N scripts/train.py --config ... [key=value ...]``,
``torchrun --nproc_per_node N scripts/train.py ...``, or plain ``python scripts/train.py ...``.

Multi-node: ``deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 scripts/train.py --config ...``
(every node sees the same output_dir, as DeepSpeed checkpoints assume).
"""

import sys

from rgpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
