"""SLURM: srun rendezvous from the SLURM environment, preemption (signal → checkpoint → exit → requeue →
exact resume) on a real single-node Slurm started by the test, and the evaluation job array.

The Slurm tests need Debian's slurm-wlm (``.ci/run`` installs it) and root; they skip with the reason
when a piece is missing or does not start. The other tests need no Slurm.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, launch_env, train_losses

from megavac import distributed

COMMON = ["--model", "tiny", "--max-tokens", "1024", "--lr", "2e-3", "--warmup-steps", "4", "--log-interval", "1",
          "--lang-log-interval", "4", "--valid-interval", "1000", "--valid-max-tokens", "2048"]


def train_args(data, save_dir, *extra):
    return ["--data-dir", str(data), "--save-dir", str(save_dir), *COMMON, *map(str, extra)]


def clean_env(**extra) -> dict:
    """launch_env without any SLURM_* variables (the tests may themselves run inside a SLURM job)."""
    env = {k: v for k, v in launch_env(**extra).items() if not k.startswith("SLURM_")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# ---------------------------------------------------------------------------------------------------------
# SLURM environment → rank / world / master

SRUN_TASK = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
             "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[007-008]"}


@pytest.mark.parametrize("nodelist,hosts", [
    ("localhost", ["localhost"]),
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("node[01-02,07],gpu5", ["node01", "node02", "node07", "gpu5"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("a1,b2", ["a1", "b2"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("gpu-a100-[003,010-011]", ["gpu-a100-003", "gpu-a100-010", "gpu-a100-011"]),
])
def test_nodelist_forms_expand_like_scontrol(nodelist, hosts, monkeypatch):
    assert distributed.expand_nodelist(nodelist) == hosts
    monkeypatch.setattr(distributed.shutil, "which", lambda name: None)  # no scontrol: the parser
    assert distributed.first_host(nodelist) == hosts[0]


def test_srun_task_environment_becomes_rank_world_and_master(monkeypatch):
    monkeypatch.setattr(distributed.shutil, "which", lambda name: None)
    assert distributed.launched_by_slurm(SRUN_TASK)
    assert distributed.slurm_env(SRUN_TASK) == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                                 "MASTER_ADDR": "gpu007", "MASTER_PORT": str(10000 + 123456 % 20000)}
    # The step's node list (rank 0 runs on its first node) wins; MASTER_ADDR/PORT from the environment win.
    step = {**SRUN_TASK, "SLURM_STEP_NODELIST": "gpu[008-009]", "MASTER_PORT": "29511", "MASTER_ADDR": "10.0.0.1"}
    assert distributed.slurm_env(step)["MASTER_PORT"] == "29511" and distributed.slurm_env(step)["MASTER_ADDR"] == "10.0.0.1"
    assert distributed.slurm_env({**step, "MASTER_ADDR": ""})["MASTER_ADDR"] == "gpu008"
    # Not an srun task: a launcher already set RANK; the batch script itself (no SLURM_STEP_ID); variables missing.
    assert not distributed.launched_by_slurm({**SRUN_TASK, "RANK": "0"})
    assert not distributed.launched_by_slurm({k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"})
    assert not distributed.launched_by_slurm({k: v for k, v in SRUN_TASK.items() if k != "SLURM_LOCALID"})
    # mpirun inside an allocation (an MPI world that is not the step's tasks) stays MPI; srun --mpi=pmi2 agrees.
    assert not distributed.launched_by_slurm({**SRUN_TASK, "OMPI_COMM_WORLD_SIZE": "4"})
    assert distributed.launched_by_slurm({**SRUN_TASK, "PMI_SIZE": "16"})


def test_mpi_and_launcher_detection_are_unchanged(monkeypatch):
    for k in [*distributed.SLURM_ENV, "SLURM_STEP_ID", "RANK", *distributed.MPI_ENV]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert distributed.launched_by_mpi() and not distributed.launched_by_slurm()
    monkeypatch.setenv("RANK", "0")  # deepspeed/torchrun launcher
    assert not distributed.launched_by_mpi() and not distributed.launched_by_slurm()


# ---------------------------------------------------------------------------------------------------------
# Signal → checkpoint → exit → exact resume, without Slurm


def run_until(cmd, pattern: str, sig, env, timeout=300) -> tuple[int, str]:
    """Start cmd, send ``sig`` once a stdout line matches ``pattern``; return (exit code, all output)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if re.search(pattern, line):
                proc.send_signal(sig)
                break
        out.append(proc.communicate()[0])
    finally:
        watchdog.cancel()
    return proc.returncode, "".join(out)


def test_sigusr1_checkpoints_at_the_step_it_stopped_and_resume_is_exact(small_synthetic, tmp_path):
    sig_dir, full = tmp_path / "signalled", tmp_path / "full"
    train = [sys.executable, "launch/train.py", "--ds_config", "ds_configs/zero2.json"]
    rc, out = run_until([*train, *train_args(small_synthetic, sig_dir, "--max-steps", 500, "--save-interval", 1000)],
                        r"^step\s+3/", signal.SIGUSR1, clean_env())
    assert rc == 0, out[-3000:]
    assert "received SIGUSR1" in out and "not requeueing" in out, out[-3000:]
    stopped = int(re.search(r"stopped by SIGUSR1 at step (\d+)", out).group(1))
    assert 3 <= stopped < 500
    ckpt = sig_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{stopped}"
    assert json.loads((ckpt / f"step_{stopped}" / "megavac.json").read_text())["step"] == stopped
    assert sorted(train_losses(sig_dir)) == list(range(1, stopped + 1))

    end = stopped + 3
    subprocess.run([*train, *train_args(small_synthetic, full, "--max-steps", end, "--save-interval", 1000)],
                   cwd=REPO, env=clean_env(), check=True, capture_output=True, timeout=300)
    p = subprocess.run([*train, *train_args(small_synthetic, sig_dir, "--max-steps", end, "--save-interval", 1000,
                                            "--resume")], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and f"resumed from step {stopped}" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    a, b = train_losses(full), train_losses(sig_dir)
    assert sorted(a) == sorted(b) == list(range(1, end + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a[step], b[step])


def test_requeue_decision(monkeypatch, capsys):
    from megavac.train.preemption import Preemption

    pre = Preemption.__new__(Preemption)  # no handlers installed, no process group
    pre.rank, pre.received, pre.stop_reason = 0, None, ""
    for k in ("SLURM_JOB_ID", "MEGAVAC_REQUEUE"):
        monkeypatch.delenv(k, raising=False)
    pre.stop_signal = signal.SIGUSR1
    assert not pre.wants_requeue()  # not under SLURM
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert pre.wants_requeue()
    pre.stop_signal = signal.SIGTERM
    assert not pre.wants_requeue()
    monkeypatch.setenv("MEGAVAC_REQUEUE", "1")
    assert pre.wants_requeue()
    monkeypatch.setenv("MEGAVAC_REQUEUE", "0")
    pre.stop_signal = signal.SIGUSR1
    assert not pre.wants_requeue()
    monkeypatch.setenv("MEGAVAC_REQUEUE", "1")
    monkeypatch.setattr("megavac.train.preemption.shutil.which", lambda name: None)
    pre.finish(7)
    assert "cannot requeue SLURM job 42: scontrol is not on PATH" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# A real single-node Slurm (slurmctld + slurmd on localhost)

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
PLUGIN_DIRS = ["/usr/lib/*/slurm-wlm", "/usr/lib/slurm-wlm", "/usr/lib/slurm", "/usr/lib64/slurm",
               "/usr/local/lib/slurm"]


def _plugin(name: str) -> bool:
    return any(glob.glob(f"{d}/{name}.so") for d in PLUGIN_DIRS)


def _tail(path: Path, n=15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else f"({path} not written)"


def _start_munge(tmp: Path) -> str:
    """A private munged (key + socket in tmp); returns the socket path. Skips when it cannot start."""
    if not shutil.which("munged"):
        pytest.skip("Slurm: auth/none plugin absent and munged not installed (apt-get install munge)")
    key, sock = tmp / "munge.key", tmp / "munge.sock"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    p = subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={sock}", f"--pid-file={tmp}/munged.pid",
                        f"--log-file={tmp}/munged.log", f"--seed-file={tmp}/munged.seed"], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"Slurm: munged failed to start ({p.returncode}): {p.stderr.strip()} {_tail(tmp / 'munged.log', 5)}")
    return str(sock)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Start slurmctld + slurmd on localhost; yields the environment for sbatch/scontrol."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm not installed: {', '.join(missing)} not on PATH (apt-get install slurm-wlm munge; "
                    f".ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("Slurm: the single-node test cluster runs slurmctld/slurmd and the jobs as root; not root here")
    tmp = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool"):
        (tmp / d).mkdir()
    if _plugin("auth_none") and _plugin("cred_none"):
        auth = "AuthType=auth/none\nCredType=cred/none"
        munge = None
    else:
        munge = _start_munge(tmp)
        auth = f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={munge}"
    ctld_port, d_port = free_port(), free_port()
    conf = tmp / "slurm.conf"
    conf.write_text(f"""ClusterName=megavactest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
{auth}
SlurmUser=root
SlurmdUser=root
NodeName=localhost CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
""")
    env = {**clean_env(), "SLURM_CONF": str(conf)}
    procs = []

    def start(name, *args):
        log = open(tmp / f"{name}.out", "w")
        procs.append(subprocess.Popen([name, "-D", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        return procs[-1]

    def sh(*cmd, timeout=30):
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)

    def stop():
        sh("scancel", "--user=root")
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        if munge and (tmp / "munged.pid").is_file():
            try:
                os.kill(int((tmp / "munged.pid").read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass

    try:
        ctld = start("slurmctld", "-i")
        t0 = time.time()
        while "UP" not in sh("scontrol", "ping").stdout:
            if ctld.poll() is not None or time.time() - t0 > 30:
                pytest.skip(f"Slurm: slurmctld did not start (exit {ctld.poll()}):\n{_tail(tmp / 'slurmctld.log')}"
                            f"\n{_tail(tmp / 'slurmctld.out')}")
            time.sleep(0.5)
        slurmd = start("slurmd", "-N", "localhost")
        t0 = time.time()
        while sh("sinfo", "-h", "-n", "localhost", "-o", "%t").stdout.strip() != "idle":
            if slurmd.poll() is not None or time.time() - t0 > 30:
                pytest.skip(f"Slurm: slurmd did not register (exit {slurmd.poll()}, node state "
                            f"{sh('sinfo', '-h', '-o', '%t %E').stdout.strip()!r}):\n{_tail(tmp / 'slurmd.log')}"
                            f"\n{_tail(tmp / 'slurmd.out')}")
            time.sleep(0.5)
        yield env
    finally:
        stop()


def job_info(env, job: str) -> dict:
    p = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True)
    return dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)


def wait_job(env, job: str, timeout=600, on_pending_requeue=None) -> dict:
    """Wait until the job has ended; call ``on_pending_requeue`` once it is pending after a requeue."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        info = job_info(env, job)
        state = info.get("JobState", "?")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            return info
        if state == "PENDING" and int(info.get("Restarts", 0)) > 0 and on_pending_requeue:
            on_pending_requeue()
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not end in {timeout}s: {job_info(env, job)}")


def sbatch(env, script, *args, **opts) -> str:
    cmd = ["sbatch", "--parsable", *[f"--{k.replace('_', '-')}={v}" for k, v in opts.items()], script, *map(str, args)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"{cmd}: {p.stderr}"
    return p.stdout.strip().split(";")[0]


def test_sbatch_usr1_checkpoints_requeues_and_resumes_exactly(slurm, small_synthetic, tmp_path):
    env = {**slurm, "PYTHON": sys.executable, "DS_CONFIG": "ds_configs/zero2.json", "OMP_NUM_THREADS": "1"}
    # 2 CPU tasks on the one node, no GPUs; everything else from the template.
    res = dict(nodes=1, ntasks_per_node=2, gpus_per_node=0, cpus_per_task=1, partition="debug", time=30)
    steps, interval = 30, 4

    full = tmp_path / "full"
    job = sbatch(env, "launch/slurm/train.sbatch", *train_args(small_synthetic, full, "--max-steps", steps,
                                                               "--save-interval", interval),
                 job_name="full", output=tmp_path / "full-%j.out", **res)
    info = wait_job(env, job)
    log = (tmp_path / f"full-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "world 2" in log and "no checkpoint" in log  # --resume on a first run is a no-op

    pre = tmp_path / "preempted"
    job = sbatch(env, "launch/slurm/train.sbatch", *train_args(small_synthetic, pre, "--max-steps", steps,
                                                               "--save-interval", interval),
                 job_name="preempted", output=tmp_path / "pre-%j.out", **res)
    latest, t0 = pre / "checkpoints" / "latest", time.time()
    while not (latest.is_file() and latest.read_text().strip() == f"step_{interval}"):
        assert job_info(env, job).get("JobState") in ("PENDING", "RUNNING"), job_info(env, job)
        assert time.time() - t0 < 300, "no first checkpoint after 300 s"
        time.sleep(0.05)
    # What `#SBATCH --signal=B:USR1@lead` does when the time limit nears.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    # A requeued job is held for ~2 minutes (BeginTime) so that the node finishes cleaning up the killed run;
    # release it as soon as the node is idle again (released earlier, its launch can fail: exit 1, run time 0).
    def release():
        state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True).stdout
        if state.strip() == "idle":
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, capture_output=True)
    info = wait_job(env, job, on_pending_requeue=release)
    log = (tmp_path / f"pre-{job}.out").read_text()  # --open-mode=append: both runs
    keys = ("JobState", "Reason", "ExitCode", "DerivedExitCode", "Restarts", "Requeue", "RunTime", "StartTime", "EndTime")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (
        " ".join(f"{k}={info.get(k)}" for k in keys), log[-4000:])
    stopped = int(re.search(r"stopped by SIGUSR1 at step (\d+): requeued SLURM job", log).group(1))
    assert interval <= stopped < steps, log[-4000:]
    assert "batch script got SIGUSR1" in log and f"resumed from step {stopped}" in log and "(restart 1)" in log

    a, b = train_losses(full), train_losses(pre)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a[step], b[step])

    # The evaluation job array over checkpoints of this run, one JSON each.
    ckpts = tmp_path / "ckpts.txt"
    ckpts.write_text(f"# checkpoints\n{pre / 'checkpoints'} latest\n\n{pre / 'checkpoints' / f'step_{steps}'}\n")
    out = tmp_path / "eval"
    job = sbatch(env, "launch/slurm/evaluate.sbatch", ckpts, out, "--split", "dev", "--beam", "2", "--max-tokens",
                 2000, "--max-len-b", 5, "--device", "cpu", array="0-1", output=tmp_path / "eval-%A_%a.out",
                 gpus_per_node=0, cpus_per_task=1, partition="debug", time=20)
    for i in (0, 1):
        info = wait_job(env, f"{job}_{i}")
        assert info["JobState"] == "COMPLETED", _tail(tmp_path / f"eval-{job}_{i}.out", 40)
    results = sorted(out.glob("*.json"))
    assert len(results) == 2, list(out.iterdir())
    for r in results:
        res = json.loads(r.read_text())
        assert res["step"] == steps and len(res["langs"]) == 6
