"""Process-group setup for every way megavac is launched.

- deepspeed / torchrun launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- ``mpirun -np N`` sets OMPI_*/PMI_* variables: DeepSpeed's mpi4py discovery fills in the rest;
- ``srun`` (one task per GPU) sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID: they become RANK/WORLD_SIZE/
  LOCAL_RANK, MASTER_ADDR is the first host of the step's node list and MASTER_PORT (unless set) is
  derived from the job id, so every task computes the same rendezvous without talking to the others;
- a plain ``python launch/train.py`` is a world of one on a free local port.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess

import torch
import torch.distributed as dist

MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
SLURM_ENV = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_slurm(env=None) -> bool:
    """A task of an ``srun`` job step. The batch script itself also has SLURM_PROCID/NTASKS/LOCALID but no
    SLURM_STEP_ID: a plain ``python launch/train.py`` there is a world of one. Under ``mpirun`` inside an
    allocation (different MPI world size), MPI discovery wins; ``srun --mpi=pmi2`` agrees with SLURM."""
    env = os.environ if env is None else env
    if "RANK" in env or not all(k in env for k in SLURM_ENV) or "SLURM_STEP_ID" not in env:
        return False
    mpi_size = env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE"))
    return mpi_size is None or mpi_size == env["SLURM_NTASKS"]


def launched_by_mpi() -> bool:
    return "RANK" not in os.environ and not launched_by_slurm() and any(k in os.environ for k in MPI_ENV)


def _split_top(s: str) -> list[str]:
    """Split at commas outside brackets: 'a[1-2,4],b' -> ['a[1-2,4]', 'b']."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur] if cur else parts


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host lists without scontrol: ``node[01-04,07],gpu5``, ``rack[1-2]-n[01-02]``."""
    hosts = []
    for item in _split_top(nodelist.strip()):
        if "[" not in item:
            hosts.append(item)
            continue
        head, rest = item.split("[", 1)
        ranges, tail = rest.split("]", 1)
        tails = expand_nodelist(tail) if tail else [""]
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts += [f"{head}{i:0{len(lo)}d}{t}" for t in tails]
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames`` when it works, else our parser."""
    if shutil.which("scontrol"):
        try:
            p = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30)
            if p.returncode == 0 and p.stdout.split():
                return p.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_nodelist(nodelist)[0]


def slurm_env(env) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for an srun task."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("launched by srun but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
    job = int(env.get("SLURM_JOB_ID", 0))
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env["SLURM_LOCALID"],
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
            # 10000..29999: below Linux's ephemeral range; concurrent jobs sharing a node differ.
            "MASTER_PORT": env.get("MASTER_PORT") or str(10000 + job % 20000)}


def init(timeout_minutes: int = 30) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size, local_rank)."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if launched_by_slurm():
        os.environ.update(slurm_env(os.environ))
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


def shutdown() -> None:
    """Leave the process group cleanly: every rank waits for the others, then the group is destroyed.
    Without it the gloo group's threads are torn down by the interpreter's exit, which can abort the
    process ("terminate called without an active exception") after a run that finished correctly."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
        release_shared_memory()


def release_shared_memory() -> None:
    """Remove this rank's DeepSpeed CPU-communication buffers in /dev/shm (no collective: also on error
    paths, where the other ranks may not reach a barrier)."""
    from megavac.pergrad.ds_adapter import release_shm_buffers

    release_shm_buffers(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
                        int(os.environ.get("LOCAL_RANK", 0)))


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
