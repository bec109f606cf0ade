"""Preemption: SIGTERM / SIGUSR1 → checkpoint at the next step boundary → exit (→ SLURM requeue).

The signal handler only sets a flag. After each optimizer step the trainer calls ``should_stop()``:
one tiny all-reduce makes every rank agree (a signal may reach the ranks at different steps, or only
some of them), so all ranks save the same step and leave the loop together. Then ``finish()`` asks
SLURM to requeue the job when the job runs under SLURM and

- the signal was SIGUSR1 (``#SBATCH --signal=B:USR1@<lead>``: the time limit is near), or
- ``MEGAVAC_REQUEUE=1`` asks for it whatever the signal (e.g. SIGTERM from a preempting partition).

``MEGAVAC_REQUEUE=0`` never requeues. The requeued job runs the same batch script, whose ``--resume``
picks up the ``latest`` checkpoint.

The death of the ``deepspeed`` launcher counts as a SIGTERM on the ranks that see it. DeepSpeed 0.19.8
does not pass it on: on one node ``deepspeed`` (``deepspeed.launcher.runner``) sets no SIGTERM handler
(it has one only for multi-node pdsh runs), so ``kill <its pid>`` ends it at once; its child
``python -m deepspeed.launcher.launch``, the ranks' parent, is reparented and keeps polling the ranks,
which would train on as orphans. (SIGTERM/SIGINT to ``launch`` itself does reach the ranks: it terminates
their process trees, SIGKILL after 30 s.) So each rank records at start the launchers above it whose
death it can see (``LauncherWatch``): its parent when that is ``deepspeed.launcher.launch``, and the
parent's parent when that is the ``deepspeed`` runner, and ``should_stop()`` checks them after every step.
A rank started by anything else (mpirun, srun, torchrun, a shell) watches nothing. After the ranks exit 0,
``launch`` exits too.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import threading

import torch

from megavac import distributed

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _argv(pid: int) -> list[str]:
    """The command line of ``pid`` ([] when it is gone, unreadable or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])  # after "(comm)": state, ppid
    except (OSError, IndexError, ValueError):
        return None


def _program(argv: list[str]) -> str:
    """What a Python command line runs: ``-m <module>``'s module, or the script's path ('' if neither, or
    not a Python interpreter's command line)."""
    if not argv or not os.path.basename(argv[0]).startswith(("python", "pypy")):
        return ""
    args = iter(argv[1:])
    for a in args:
        if a == "-m":
            return next(args, "")
        if a.startswith("-m"):
            return a[2:]
        if a == "-c":
            return ""
        if a in ("-X", "-W", "--check-hash-based-pycs"):  # options that take a value
            next(args, None)
        elif not a.startswith("-"):
            return a
    return ""


def is_deepspeed_launch(argv: list[str]) -> bool:
    """``python -m deepspeed.launcher.launch ...`` (how the runner and its pdsh command start it)."""
    prog = _program(argv)
    return prog == "deepspeed.launcher.launch" or prog.endswith("deepspeed/launcher/launch.py")


def is_deepspeed_runner(argv: list[str]) -> bool:
    """``python -m deepspeed.launcher.runner`` or the console scripts ``deepspeed``/``ds``/``deepspeed.pt``
    (``python <bin>/deepspeed ...``: a script's interpreter is argv[0])."""
    prog = _program(argv)
    return prog == "deepspeed.launcher.runner" or prog.endswith("deepspeed/launcher/runner.py") or \
        os.path.basename(prog) in ("deepspeed", "ds", "deepspeed.pt")


def _short(argv: list[str], n: int = 80) -> str:
    cmd = " ".join([os.path.basename(argv[0]), *argv[1:]]) if argv else "?"
    return cmd if len(cmd) <= n else cmd[:n - 3] + "..."


class LauncherWatch:
    """The launcher processes above this rank whose death it can see, recorded once at start.

    - The parent, when it is ``deepspeed.launcher.launch``: it died when ``os.getppid()`` changes (the
      rank was reparented). One syscall per check.
    - The parent's parent, when it is the ``deepspeed`` runner (one node, or ``--no_ssh``; under pdsh it is
      a remote shell, not watched): it died when a pidfd on it polls readable (exit, including a zombie
      not yet reaped, and immune to pid reuse); ``os.kill(pid, 0)`` where pidfds are missing (Linux < 5.3),
      which sees a zombie as alive.

    Why polling and not ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the death signal concerns the parent only,
    and on ``kill <deepspeed>`` the parent (``launch``) survives, only the runner above it dies; it would
    also be a second way into the handler for what is a step-boundary check anyway. The check costs a
    few microseconds (``getppid`` and a zero-timeout ``poll``), no /proc reads after start.

    Not seen: a launcher that dies between the rank's start and the construction of ``Preemption`` (the
    trainer builds it after the DeepSpeed engine): the ancestry recorded then no longer contains it.
    """

    def __init__(self):
        self.parent: tuple[int, str] | None = None  # (pid, short command)
        self.runner: tuple[int, str] | None = None
        self._poll = self._pidfd = None
        ppid = os.getppid()
        argv = _argv(ppid)
        if not is_deepspeed_launch(argv):
            return  # mpirun, srun, torchrun, a shell, ...: nothing to watch
        self.parent = (ppid, _short(argv))
        gppid = _ppid(ppid)
        gargv = _argv(gppid) if gppid else []
        if gppid and is_deepspeed_runner(gargv):
            self.runner = (gppid, _short(gargv))
            try:
                self._pidfd = os.pidfd_open(gppid)
                self._poll = select.poll()
                self._poll.register(self._pidfd, select.POLLIN)
            except (AttributeError, OSError):  # no pidfd_open (Python, kernel, seccomp): os.kill below
                self._poll = self._pidfd = None

    def __bool__(self):
        return self.parent is not None

    def exited(self) -> tuple[int, str] | None:
        """(pid, command) of a watched launcher that has exited, else None."""
        if self.parent is None:
            return None
        if os.getppid() != self.parent[0]:
            return self.parent
        if self.runner is not None:
            if self._poll is not None:
                if self._poll.poll(0):
                    return self.runner
            else:
                try:
                    os.kill(self.runner[0], 0)
                except ProcessLookupError:
                    return self.runner
                except PermissionError:
                    pass
        return None


class Preemption:
    def __init__(self, rank: int, device: torch.device | str = "cpu"):
        self.rank, self.device = rank, device
        self.received: int | None = None  # the first signal this rank received
        self.stop_signal: int | None = None  # the signal all ranks agreed to stop on
        self.launchers = LauncherWatch()  # the deepspeed launcher(s) above this rank, if any
        self.launcher_exited: tuple[int, str] | None = None  # (pid, command) of a launcher this rank saw exit
        self.stop_reason = ""  # what made the ranks stop, for finish()
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for s in SIGNALS:
                signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if self.received is None:
            self.received = signum
            if self.rank == 0:
                print(f"received {signal.Signals(signum).name}: checkpointing after this step, then exiting",
                      flush=True)

    def _check_launchers(self):
        if self.launcher_exited is None and self.launchers:
            self.launcher_exited = self.launchers.exited()

    def should_stop(self, step: int | None = None) -> bool:
        """True on every rank when any rank received a signal or saw its launcher exit (one all-reduce of 3
        numbers). ``step``, the step just taken, only goes into the message."""
        self._check_launchers()
        flags = torch.tensor([self.received is not None, self.received == signal.SIGUSR1,
                              self.launcher_exited is not None], dtype=torch.float32)
        flags = distributed.all_reduce_sum(flags.to(self.device)).cpu()
        if flags[0] + flags[2] > 0 and self.stop_signal is None:
            # A launcher dead is a SIGTERM (requeue included, see wants_requeue).
            self.stop_signal = signal.SIGUSR1 if flags[1] > 0 else (self.received or signal.SIGTERM)
            self._check_launchers()  # it may have died after this rank looked, before another one did
            if flags[0] > 0:  # a signal on some rank
                self.stop_reason = signal.Signals(self.stop_signal).name
            elif self.launcher_exited is not None:
                self.stop_reason = f"the exit of launcher process {self.launcher_exited[0]}"
            else:
                self.stop_reason = "the exit of a launcher process on another node"
            # One line per node whose launcher died: rank 0, else the node's local rank 0.
            if self.launcher_exited is not None and (self.rank == 0 or os.environ.get("LOCAL_RANK") == "0"):
                pid, cmd = self.launcher_exited
                at = f"at step {step}" if step is not None else "at this step"
                try:  # stdout may have died with the launcher (a pipe): the checkpoint matters more
                    print(f"launcher process {pid} ({cmd}) exited: checkpointing {at} and stopping", flush=True)
                except OSError:
                    pass
        return self.stop_signal is not None

    def wants_requeue(self) -> bool:
        choice = os.environ.get("MEGAVAC_REQUEUE", "")
        if self.stop_signal is None or not os.environ.get("SLURM_JOB_ID") or choice == "0":
            return False
        return self.stop_signal == signal.SIGUSR1 or choice == "1"

    def finish(self, step: int, done: bool = False):
        """After the checkpoint of ``step`` is on disk (all ranks): rank 0 requeues the SLURM job if wanted
        (not when training is ``done``: the signal came with the last step)."""
        name = self.stop_reason or signal.Signals(self.stop_signal).name
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
