"""Process-group set-up and the few collectives the trainer needs (all no-ops on a single process)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed from whatever launched us (``deepspeed``, ``torchrun``, or
    a plain ``python``: then a one-process group). Returns ``(rank, local_rank, world_size)``."""
    import deepspeed

    if not dist.is_initialized():
        _ranks_from_mpi()
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        own_port = "MASTER_PORT" not in os.environ
        if own_port:  # a lone process: any free port, so it never collides with a job
            os.environ["MASTER_PORT"] = str(free_port())
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        deepspeed.init_distributed(dist_backend=backend)
        if own_port:
            # The rendezvous is done and this process now holds the port: a child process (a launcher, a run
            # started from a notebook or a test) must not inherit it and try to listen on it again.
            del os.environ["MASTER_PORT"]
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


def launched_ranks() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` as the launcher set them, read before any process group exists, so that
    every check that needs no model (config, data, rewards, checkpoint) runs before DeepSpeed starts; a plain
    ``python`` is rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    _ranks_from_mpi()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# (rank, world size, local rank) as MPI launchers name them: Open MPI, then MPICH / Intel MPI (Hydra).
MPI_VARIABLES = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


def _ranks_from_mpi() -> None:
    """An MPI launch (``mpirun``, ``deepspeed --launcher openmpi|mpich|impi``) names the ranks in its own
    variables; without ``RANK`` / ``WORLD_SIZE`` every process would start alone as rank 0 of 1. Copy them over,
    and require the rendezvous address, which MPI does not give."""
    if "RANK" in os.environ:
        return
    for rank, size, local in MPI_VARIABLES:
        if rank in os.environ and size in os.environ:
            if int(os.environ[size]) > 1 and "MASTER_ADDR" not in os.environ:
                raise RuntimeError(f"launched by MPI as rank {os.environ[rank]} of {os.environ[size]} ({rank}), but "
                                   f"MASTER_ADDR is not set: export MASTER_ADDR (the first node's address) and "
                                   f"MASTER_PORT to every rank, e.g. mpirun -x MASTER_ADDR -x MASTER_PORT")
            os.environ["RANK"], os.environ["WORLD_SIZE"] = os.environ[rank], os.environ[size]
            os.environ.setdefault("LOCAL_RANK", os.environ.get(local, "0"))
            os.environ.setdefault("MASTER_PORT", "29500")  # the same on every rank (torch's default)
            return


def free_port() -> int:
    """A local TCP port nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors of every rank along dim 0, in rank order."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj: Any) -> list[Any]:
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of scalars over ranks (one all-reduce)."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on at least one (one all-reduce)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def failed_ranks(failed: bool, device: torch.device) -> list[int]:
    """The ranks on which ``failed`` is True, known on every rank (one all-reduce of a (world,) vector)."""
    if world_size() == 1:
        return [0] if failed else []
    t = torch.zeros(world_size(), device=device)
    t[rank()] = 1.0 if failed else 0.0
    dist.all_reduce(t)
    return [i for i, v in enumerate(t.tolist()) if v > 0]
