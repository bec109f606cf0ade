"""The deepspeed launcher killed with SIGTERM: its ranks checkpoint at an agreed step and exit, no orphans.

DeepSpeed 0.19.8 on one node: ``deepspeed.launcher.runner`` installs no SIGTERM handler there (only for
multi-node pdsh runs), so a SIGTERM kills it at once; its child ``deepspeed.launcher.launch`` never hears
of it and keeps waiting for the ranks, which would train on to --max-steps (megavac.train.preemption).
"""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil

from conftest import REPO, deepspeed_cmd, free_port, launch_env
from megavac.train.preemption import LauncherWatch, is_deepspeed_launch, is_deepspeed_runner

COMMON = ["--model", "tiny", "--max-tokens", "1024", "--lr", "2e-3", "--warmup-steps", "4", "--log-interval", "1",
          "--lang-log-interval", "1000", "--valid-interval", "1000", "--valid-max-tokens", "2048"]
STEP_LINE = re.compile(r"^step +(\d+)/", re.M)


def args(data, save_dir, *extra, ds="ds_configs/zero2.json"):
    return ["--ds_config", ds, "--data-dir", data, "--save-dir", save_dir, *COMMON, *extra]


def running(p: psutil.Process) -> bool:
    """Still running: neither gone nor a zombie (whose parent has not reaped it yet)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_to_the_deepspeed_launcher_checkpoints_and_stops_every_rank(small_synthetic, tmp_path):
    save = tmp_path / "run"
    ckpt = save / "checkpoints"
    cmd = deepspeed_cmd(2, *args(small_synthetic, save, "--max-steps", 100000, "--save-interval", 4))
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)  # EOF: every writer is gone
    reader.start()

    def steps() -> list[int]:
        return [int(s) for s in STEP_LINE.findall("".join(out))]

    try:
        # A few steps and one periodic checkpoint first.
        deadline = time.time() + 120
        while not ((ckpt / "latest").is_file() and max(steps(), default=0) >= 6):
            assert proc.poll() is None, f"training exited ({proc.returncode}) early:\n{''.join(out)[-3000:]}"
            assert time.time() < deadline, f"no step 6 after 120 s:\n{''.join(out)[-3000:]}"
            time.sleep(0.05)
        launch = psutil.Process(proc.pid).children()  # python -m deepspeed.launcher.launch
        assert len(launch) == 1 and "deepspeed.launcher.launch" in launch[0].cmdline(), launch
        ranks = launch[0].children()  # python -u launch/train.py --local_rank=<r> ...
        assert len(ranks) == 2 and all("--local_rank=" in " ".join(r.cmdline()) for r in ranks), ranks
        before = max(steps())

        proc.send_signal(signal.SIGTERM)  # the top-level launcher only, as `kill <pid of deepspeed>` does
        assert proc.wait(timeout=10) == -signal.SIGTERM  # no handler on one node: it dies at once

        deadline = time.time() + 60
        while any(running(p) for p in ranks + launch) and time.time() < deadline:
            time.sleep(0.1)
        left = [(p.pid, p.cmdline()[:4]) for p in ranks + launch if running(p)]
        assert not left, f"orphans still running 60 s after the launcher died: {left}\n{''.join(out)[-3000:]}"
        reader.join(timeout=10)
        text = "".join(out)

        tag = (ckpt / "latest").read_text().strip()
        step = int(tag.removeprefix("step_"))
        assert step >= before and step > 4, (tag, before)  # a step taken after the signal, not the periodic one
        assert {f.name for f in (ckpt / tag).glob("megavac_rank*.pt")} == {"megavac_rank0.pt", "megavac_rank1.pt"}
        assert max(steps()) == step  # they stopped at the checkpointed step
        lines = [ln for ln in text.splitlines() if f"launcher process {proc.pid} (" in ln]
        assert len(lines) == 1 and "exited: checkpointing" in lines[0], text[-3000:]
        assert f"at step {step} after saving its checkpoint" in text, text[-3000:]
        assert all(f"Process {r.pid} exits successfully." in text for r in ranks), text[-3000:]  # exit 0, by launch
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group (the orphans, without the fix)
        except ProcessLookupError:
            pass
        proc.wait()


def test_only_the_deepspeed_launchers_are_recognised():
    py = "/venv/bin/python3.11"
    assert is_deepspeed_launch([py, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "--master_port=1"])
    assert is_deepspeed_runner([py, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "launch/train.py"])
    assert is_deepspeed_runner([py, "/venv/bin/deepspeed", "--num_gpus", "2", "launch/train.py"])  # console script
    assert is_deepspeed_runner([py, "/venv/bin/ds", "launch/train.py"])
    others = [["mpirun", "-np", "2", py, "launch/train.py"], ["/usr/bin/hydra_pmi_proxy", "--control-port", "h:1"],
              ["/usr/bin/orted", "-mca", "ess", "env"], ["slurmstepd: [42.0]"], ["srun", py, "launch/train.py"],
              [py, "-m", "torch.distributed.run", "launch/train.py"], ["/usr/bin/torchrun", "launch/train.py"],
              ["-bash"], ["bash", "-c", "python -m deepspeed.launcher.launch"], [py, "launch/train.py"],
              ["pdsh", "-w", "h1,h2", "python", "-u", "-m", "deepspeed.launcher.launch"], [],
              ["pkill", "-f", "deepspeed"], [py, "-c", "import deepspeed", "-m", "deepspeed.launcher.launch"]]
    for argv in others:
        assert not is_deepspeed_launch(argv) and not is_deepspeed_runner(argv), argv
    assert not LauncherWatch()  # this test process: started by a shell or a CI runner, not by deepspeed


CHILD = """
import sys, time
from megavac.train.preemption import Preemption
p = Preemption(rank=0)
print("watching", p.launchers.parent, p.launchers.runner, flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    if p.should_stop():
        print("stopping:", p.stop_reason, flush=True)
        sys.exit(0)
    time.sleep(0.05)
print("ran on", flush=True)
"""


def test_a_rank_whose_shell_parent_exits_trains_on(tmp_path):
    """plain `python launch/train.py` (or mpirun's, srun's ranks): a parent that is no launcher is not watched,
    even when it exits."""
    child, log = tmp_path / "child.py", tmp_path / "child.log"
    child.write_text(CHILD)
    sh = subprocess.run(["sh", "-c", f'"{sys.executable}" "{child}" 3 > "{log}" 2>&1 &'], env=launch_env(), timeout=30)
    assert sh.returncode == 0  # the shell is gone at once; the child is reparented
    deadline = time.time() + 60
    while "ran on" not in (text := log.read_text() if log.exists() else "") and "stopping" not in text:
        assert time.time() < deadline, text
        time.sleep(0.1)
    assert "watching None None" in text and "ran on" in text and "stopping" not in text, text


def test_a_rank_whose_deepspeed_launch_parent_is_killed_stops(tmp_path):
    """`deepspeed.launcher.launch` SIGKILLed (no chance to terminate its ranks): the rank sees its parent
    change and stops as on SIGTERM."""
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    world = base64.urlsafe_b64encode(json.dumps({"localhost": [0]}).encode()).decode()
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "--no_local_rank", str(child), "60"]
    launch = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(launch.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 60
        while not any(ln.startswith("watching") for ln in out):
            assert launch.poll() is None and time.time() < deadline, "".join(out)
            time.sleep(0.05)
        assert f"watching ({launch.pid}, " in "".join(out) and "None" in "".join(out)  # no runner above it
        rank = psutil.Process(launch.pid).children()[0]
        launch.kill()
        launch.wait()
        deadline = time.time() + 30
        while running(rank) and time.time() < deadline:
            time.sleep(0.05)
        reader.join(timeout=10)
        text = "".join(out)
        assert not running(rank), text
        assert f"launcher process {launch.pid} (python" in text and "deepspeed.launcher.launch" in text, text
        assert f"stopping: the exit of launcher process {launch.pid}" in text, text
    finally:
        try:
            os.killpg(launch.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launch.wait()
