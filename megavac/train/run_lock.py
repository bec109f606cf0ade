"""Exclusive use of a run directory: two runs writing one --save-dir would interleave metrics.jsonl and
checkpoints.

Rank 0 creates ``<save_dir>/run.lock`` (exclusive create) holding the host, pid and Slurm job of the run
and removes it when training ends. A lock left by a run that is gone is taken over, with a message: on
the same host, a pid that no longer exists; under Slurm, the same job id (a requeued job). A lock held
by a live run, or by one on another host that cannot be checked, refuses the new run by name.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "run.lock"


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, save_dir: str | Path):
        self.path = Path(save_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a message when a stale lock was taken over. ValueError when another
        live run holds it (naming the directory, the holder and what to do)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _me()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._read()
            why = self._stale(holder, me)
            if why is None:
                raise ValueError(
                    f"{self.path.parent} is in use by another run (host {holder.get('host')}, pid {holder.get('pid')}, "
                    f"Slurm job {holder.get('slurm_job')}, since {holder.get('since')}; lock {self.path}): use "
                    f"another --save-dir, or remove {self.path} if that run is gone") from None
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(me))
            tmp.replace(self.path)
            self.held = True
            return f"took over the lock of a run that is gone ({why}): {self.path}"
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        self.held = True
        return None

    def release(self) -> None:
        if self.held and self._read().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}  # unreadable (a crash while writing it): nothing to honour

    @staticmethod
    def _stale(holder: dict, me: dict) -> str | None:
        """Why the holder's run is gone, or None while it may be alive."""
        if not holder:
            return "the lock file is empty or unreadable"
        if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
            return f"Slurm job {me['slurm_job']} was requeued"
        if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
            return f"pid {holder.get('pid')} on {me['host']} no longer exists"
        return None
