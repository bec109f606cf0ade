"""Real training runs: deepspeed launcher with 2 CPU ranks, kill + exact resume, evaluation of the
sharded checkpoint, mpirun discovery, every ZeRO stage, bad input."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, deepspeed_cmd, free_port, launch_env, run, train_losses

COMMON = ["--model", "tiny", "--max-tokens", "1024", "--lr", "2e-3", "--warmup-steps", "4", "--log-interval", "1",
          "--lang-log-interval", "4", "--valid-interval", "1000", "--valid-max-tokens", "2048"]


def args(data, save_dir, *extra, ds="ds_configs/zero2.json"):
    return ["--ds_config", ds, "--data-dir", data, "--save-dir", save_dir, *COMMON, *extra]


def wait_for_checkpoint(proc, root: Path, tag: str, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (root / "latest").is_file() and (root / "latest").read_text().strip() == tag:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before writing {tag}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {tag} checkpoint after {timeout}s")


def kill_after_checkpoint(cmd, root: Path, tag: str) -> None:
    """Run ``cmd`` and SIGKILL the launcher and every rank right after checkpoint ``tag`` is complete."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        wait_for_checkpoint(proc, root, tag)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_zero2_two_ranks_killed_after_checkpoint_resumes_exactly(small_synthetic, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(deepspeed_cmd(2, *args(small_synthetic, full, "--max-steps", 14, "--save-interval", 7)))

    # Same run, SIGKILLed (launcher and both ranks) right after its step-7 checkpoint is complete.
    kill_after_checkpoint(deepspeed_cmd(2, *args(small_synthetic, killed, "--max-steps", 1000, "--save-interval", 7)),
                          killed / "checkpoints", "step_7")
    before = train_losses(killed)
    out = run(deepspeed_cmd(2, *args(small_synthetic, killed, "--max-steps", 14, "--save-interval", 7, "--resume")))
    assert "resumed from step 7" in out.stdout

    a, b = train_losses(full), train_losses(killed)
    assert sorted(a) == list(range(1, 15)) and sorted(b) == list(range(1, 15))
    for step in range(1, 15):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a[step], b[step], before.get(step))
    assert a[14] < a[1]  # it learns

    # The sharded checkpoint it wrote evaluates in one process.
    res = tmp_path / "eval.json"
    ev = run([sys.executable, "launch/evaluate.py", "--checkpoint", killed / "checkpoints", "--tag", "latest",
              "--beam", "2", "--max-tokens", "2000", "--out", res])
    results = json.loads(res.read_text())
    assert results["step"] == 14 and len(results["langs"]) == 6
    assert all(0 <= t["bleu"] <= 100 and t["n"] == 30 for t in results["langs"].values())
    assert "BLEU" in ev.stdout or "bleu" in ev.stdout.lower()
    ckpt = killed / "checkpoints"
    assert (ckpt / "best").read_text().strip().startswith("step_")
    assert {p.name for p in ckpt.glob("step_*")} <= {"step_7", "step_14"}


@pytest.mark.parametrize("ds", ["ds_configs/zero1.json", "ds_configs/zero3.json", "ds_configs/zero2_bf16.json",
                                "ds_configs/zero3_bf16.json"])
def test_each_zero_stage_trains_saves_and_reloads(small_synthetic, tmp_path, ds):
    save = tmp_path / "run"
    run([sys.executable, "launch/train.py", *args(small_synthetic, save, "--max-steps", 3, "--save-interval", 2, ds=ds)])
    out = run([sys.executable, "launch/train.py", *args(small_synthetic, save, "--max-steps", 5, "--save-interval", 2,
                                                        "--resume", ds=ds)])
    assert "resumed from step 3" in out.stdout and "step      5/5" in out.stdout
    meta = json.loads((save / "checkpoints" / "step_5" / "megavac.json").read_text())
    assert meta["zero_stage"] == json.loads(Path(REPO / ds).read_text())["zero_optimization"]["stage"]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (pip install mpich)")
def test_mpirun_two_ranks_discovers_the_world_through_mpi4py(small_synthetic, tmp_path):
    save = tmp_path / "mpi"
    cmd = ["mpirun", "-np", "2", sys.executable, "launch/train.py",
           *map(str, args(small_synthetic, save, "--max-steps", 2, "--save-interval", 2))]
    env = launch_env(MASTER_PORT=str(free_port()))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "world 2" in p.stdout
    assert {f.name for f in (save / "checkpoints" / "step_2").glob("megavac_rank*.pt")} == {
        "megavac_rank0.pt", "megavac_rank1.pt"}


def test_user_errors_are_one_clear_line(small_synthetic, tmp_path):
    p = run([sys.executable, "launch/train.py", "--data-dir", tmp_path / "nowhere", "--save-dir", tmp_path / "x"],
            check=False)
    assert p.returncode == 2 and "nowhere/meta.json not found" in p.stderr and "Traceback" not in p.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}))
    p = run([sys.executable, "launch/train.py", "--ds_config", bad, "--data-dir", small_synthetic,
             "--save-dir", tmp_path / "y"], check=False)
    assert p.returncode == 2 and "gradient_clipping" in p.stderr
    p = run([sys.executable, "launch/train.py", *args(small_synthetic, tmp_path / "z", "--langs", "en-xyz")], check=False)
    assert p.returncode == 2 and "en-xyz" in p.stderr


def test_real_corpora_through_the_whole_pipeline(tmp_path):
    """Tatoeba + NTREX pairs: prepare (both directions), train on 2 ranks, evaluate per direction."""
    from conftest import shared_data

    root = shared_data()
    if root is None:
        pytest.skip("../shared/data (real corpora) not present; set MEGAVAC_SHARED_DATA to run this test")
    from data_pipeline.prepare import PrepareConfig, prepare

    prepared = tmp_path / "tato"
    meta = prepare(PrepareConfig(corpus=root / "tatoeba_challenge", out=prepared, pairs=["tzl", "kat", "deu"],
                                 direction="both", vocab_size=1000, workers=2, quiet=True))
    assert {t["name"] for t in meta["tasks"]} == {"en-deu", "deu-en", "en-kat", "kat-en", "en-tzl", "tzl-en"}
    save = tmp_path / "run"
    run(deepspeed_cmd(2, *args(prepared, save, "--max-steps", 6, "--save-interval", 6, "--temperature", "inf")))
    res = tmp_path / "eval.json"
    run([sys.executable, "launch/evaluate.py", "--checkpoint", save / "checkpoints", "--split", "dev",
         "--langs", "en-tzl,tzl-en", "--beam", "2", "--max-len-b", "5", "--out", res])
    out = json.loads(res.read_text())
    assert set(out["langs"]) == {"en-tzl", "tzl-en"} and out["langs"]["en-tzl"]["n"] == meta["pairs"]["tzl"]["dev"]
    assert out["langs"]["en-tzl"]["group"] == "low"


def test_gradvac_two_ranks_resumes_exactly_with_its_ema_state(small_synthetic, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ["--method", "gradvac", "--gradvac-langs", "lrl", "--gradvac-size-threshold", "1000", "--granularity",
             "all_layer", "--gram-log-interval", "3", "--save-interval", "3"]
    cmd = deepspeed_cmd(2, *args(small_synthetic, full, "--max-steps", 6, *extra))
    run(cmd)
    # DeepSpeed's CPU all-reduce buffers of this job (named by its port) are gone from /dev/shm.
    port = cmd[cmd.index("--master_port") + 1]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    run(deepspeed_cmd(2, *args(small_synthetic, part, "--max-steps", 3, *extra)))
    out = run(deepspeed_cmd(2, *args(small_synthetic, part, "--max-steps", 6, "--resume", *extra)))
    assert "resumed from step 3" in out.stdout and "method gradvac" in out.stdout
    a, b = train_losses(full), train_losses(part)
    assert all(b[s] == pytest.approx(a[s], rel=1e-6) for s in range(1, 7))
    import numpy as np

    gram = np.load(part / "grams" / "gram_00000003.npz")
    assert gram["gram"].shape[-1] == 6 and gram["gram"].shape[0] > 2  # [groups, K, K]


def test_language_affine_gradvac_killed_and_resumed_gives_identical_losses(small_synthetic, tmp_path):
    """--lang-affine (micro-batches of one language) with GradVac on the one-backward collector, 2 ranks:
    SIGKILL after the step-3 checkpoint, resume, the same losses as an uninterrupted run; resuming it
    without --lang-affine is refused by name (the data order would change)."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = ["--method", "gradvac", "--granularity", "all_layer", "--lang-affine", "--save-interval", 3]
    run(deepspeed_cmd(2, *args(small_synthetic, full, "--max-steps", 6, *extra)))
    kill_after_checkpoint(deepspeed_cmd(2, *args(small_synthetic, killed, "--max-steps", 1000, *extra)),
                          killed / "checkpoints", "step_3")
    out = run(deepspeed_cmd(2, *args(small_synthetic, killed, "--max-steps", 6, "--resume", *extra)))
    assert "resumed from step 3" in out.stdout
    a, b = train_losses(full), train_losses(killed)
    assert sorted(a) == list(range(1, 7)) and sorted(b) == list(range(1, 7))
    assert all(b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-7) for s in range(1, 7)), (a, b)
    changed = [x for x in extra if x != "--lang-affine"]
    bad = subprocess.run(deepspeed_cmd(2, *args(small_synthetic, killed, "--max-steps", 9, "--resume", *changed)),
                         cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--lang-affine (True → False)" in bad.stdout + bad.stderr


@pytest.mark.parametrize("method,ds", [("cats", "ds_configs/zero3.json"), ("pcgrad", "ds_configs/zero2_bf16.json"),
                                       ("mgda", "ds_configs/zero1.json"), ("gradnorm", "ds_configs/zero2.json")])
def test_every_method_trains_under_a_zero_stage(small_synthetic, tmp_path, method, ds):
    extra = ["--method", method, "--cats-warm-interval", "2", "--langs-per-batch", "3"] if method == "cats" else \
        ["--method", method]
    out = run([sys.executable, "launch/train.py", *args(small_synthetic, tmp_path / "r", "--max-steps", 4,
                                                        "--save-interval", 4, *extra, ds=ds)])
    assert f"method {method}" in out.stdout and "step      4/4" in out.stdout
