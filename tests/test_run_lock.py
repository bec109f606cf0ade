"""The run directory's lock: a second run on one --save-dir is refused by name; a lock left by a run
that is gone (dead pid on this host, a requeued Slurm job, an unreadable file) is taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from megavac.train.run_lock import RunLock


def _write(path, **holder):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": None,
                                "since": "earlier", **holder}))


def test_held_by_a_live_run_is_refused_and_released_at_the_end(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    first = RunLock(tmp_path / "run")
    assert first.acquire() is None and first.path.is_file()
    with pytest.raises(ValueError, match=r"run is in use by another run .*pid %d.*use another --save-dir" % os.getpid()):
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert not first.path.exists()
    assert RunLock(tmp_path / "run").acquire() is None


def test_stale_locks_are_taken_over_with_a_message(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = RunLock(tmp_path)
    _write(lock.path, pid=gone.pid)
    assert f"pid {gone.pid}" in lock.acquire() and json.loads(lock.path.read_text())["pid"] == os.getpid()
    _write(lock.path, host="elsewhere", pid=1, slurm_job="77")
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued
    assert "requeued" in RunLock(tmp_path).acquire()
    lock.path.write_text("")
    assert "unreadable" in RunLock(tmp_path).acquire()


def test_a_lock_on_another_host_is_not_guessed_stale(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = RunLock(tmp_path)
    _write(lock.path, host="elsewhere", pid=1)
    with pytest.raises(ValueError, match=f"remove {lock.path}"):
        lock.acquire()


def test_second_training_run_on_one_save_dir_is_refused(small_synthetic, tmp_path):
    from conftest import REPO, launch_env
    from test_train import args

    save = tmp_path / "run"
    cmd = [str(c) for c in [sys.executable, "launch/train.py", *args(small_synthetic, save, "--max-steps", 100000)]]
    first = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        t0 = time.time()
        while not (save / "run.lock").is_file() and first.poll() is None and time.time() - t0 < 120:
            time.sleep(0.2)
        assert (save / "run.lock").is_file()
        second = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "is in use by another run" in second.stderr, second.stderr[-2000:]
        assert first.poll() is None  # the first run trains on
    finally:
        os.killpg(first.pid, 9)
        first.wait()
