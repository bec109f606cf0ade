"""Process-group setup for every way megavac is launched.

- deepspeed / torchrun launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- ``mpirun -np N`` sets OMPI_*/PMI_* variables: DeepSpeed's mpi4py discovery fills in the rest;
- a plain ``python launch/train.py`` is a world of one on a free local port.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_mpi() -> bool:
    return "RANK" not in os.environ and any(k in os.environ for k in MPI_ENV)


def init(timeout_minutes: int = 30) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size, local_rank)."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and not launched_by_mpi():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not dist.is_initialized():
        # Under mpirun, mpi4py discovery sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR from MPI and uses
        # this port (MASTER_PORT from the environment, e.g. `mpirun -x MASTER_PORT`, default 29500).
        deepspeed.init_distributed(auto_mpi_discovery=launched_by_mpi(), verbose=False,
                                   distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place); the CPU/gloo backend needs the tensor on the CPU."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
