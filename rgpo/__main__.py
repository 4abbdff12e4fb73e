"""``python -m rgpo ...``: the ``rgpo`` command, runnable under ``deepspeed`` and ``torchrun`` launchers
(``deepspeed --num_gpus 8 --module rgpo train --config ...``) without an installed console script."""

import sys

from rgpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
