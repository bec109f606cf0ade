"""Preemption: SIGTERM / SIGUSR1 → checkpoint at the next step boundary → exit (→ SLURM requeue).

The signal handler only sets a flag. After each optimizer step the trainer calls ``should_stop()``:
one tiny all-reduce makes every rank agree (a signal may reach the ranks at different steps, or only
some of them), so all ranks save the same step and leave the loop together. Then ``finish()`` asks
SLURM to requeue the job when the job runs under SLURM and

- the signal was SIGUSR1 (``#SBATCH --signal=B:USR1@<lead>``: the time limit is near), or
- ``MEGAVAC_REQUEUE=1`` asks for it whatever the signal (e.g. SIGTERM from a preempting partition).

``MEGAVAC_REQUEUE=0`` never requeues. The requeued job runs the same batch script, whose ``--resume``
picks up the ``latest`` checkpoint.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading

import torch

from megavac import distributed

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self, rank: int, device: torch.device | str = "cpu"):
        self.rank, self.device = rank, device
        self.received: int | None = None  # the first signal this rank received
        self.stop_signal: int | None = None  # the signal all ranks agreed to stop on
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for s in SIGNALS:
                signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if self.received is None:
            self.received = signum
            if self.rank == 0:
                print(f"received {signal.Signals(signum).name}: checkpointing after this step, then exiting",
                      flush=True)

    def should_stop(self) -> bool:
        """True on every rank when any rank received a signal (one all-reduce of 2 numbers)."""
        flags = torch.tensor([self.received is not None, self.received == signal.SIGUSR1], dtype=torch.float32)
        flags = distributed.all_reduce_sum(flags.to(self.device)).cpu()
        if flags[0] > 0:
            self.stop_signal = signal.SIGUSR1 if flags[1] > 0 else (self.received or signal.SIGTERM)
        return self.stop_signal is not None

    def wants_requeue(self) -> bool:
        choice = os.environ.get("MEGAVAC_REQUEUE", "")
        if self.stop_signal is None or not os.environ.get("SLURM_JOB_ID") or choice == "0":
            return False
        return self.stop_signal == signal.SIGUSR1 or choice == "1"

    def finish(self, step: int, done: bool = False):
        """After the checkpoint of ``step`` is on disk (all ranks): rank 0 requeues the SLURM job if wanted
        (not when training is ``done``: the signal came with the last step)."""
        name = signal.Signals(self.stop_signal).name
        if self.rank != 0:
            return
        if done or not self.wants_requeue():
            print(f"stopped by {name} at step {step} after saving its checkpoint; not requeueing "
                  f"(SLURM_JOB_ID={os.environ.get('SLURM_JOB_ID')}, MEGAVAC_REQUEUE="
                  f"{os.environ.get('MEGAVAC_REQUEUE', '')!r})", flush=True)
            return
        job = os.environ["SLURM_JOB_ID"]
        if shutil.which("scontrol") is None:
            print(f"stopped by {name} at step {step}: cannot requeue SLURM job {job}: scontrol is not on PATH; "
                  f"resubmit the job (its --resume continues from step {step})", flush=True)
            return
        p = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if p.returncode == 0:
            print(f"stopped by {name} at step {step}: requeued SLURM job {job} (scontrol requeue {job})", flush=True)
        else:
            print(f"stopped by {name} at step {step}: `scontrol requeue {job}` failed ({p.returncode}): "
                  f"{(p.stderr or p.stdout).strip()}", flush=True)
