"""Checkpoints that follow a cluster's life: resume on another world size or without the pipeline.

Each case: train under layout A, resume under layout B through DeepSpeed's universal checkpoint, check
that the engine holds exactly the source's weights and Adam moments (``helpers/reshard_check.py``,
against an independent consolidation of the source), then train on and save under B."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, deepspeed_cmd, run, train_losses

COMMON = ["--model", "tiny", "--max-tokens", "1024", "--lr", "2e-3", "--warmup-steps", "4", "--log-interval", "1",
          "--lang-log-interval", "4", "--valid-interval", "1000", "--valid-max-tokens", "2048"]


def train_args(data, save, ds, *extra):
    return ["--ds_config", ds, "--data-dir", data, "--save-dir", save, *COMMON, *extra]


def launch(nproc: int, script, *args, check=True):
    if nproc == 1:
        return run([sys.executable, script, *args], check=check)
    cmd = deepspeed_cmd(nproc, *args)
    cmd[cmd.index(str(REPO / "launch" / "train.py"))] = str(script)
    return run(cmd, check=check)


def reshard_check(nproc: int, source: Path, data, save, ds, *extra) -> dict:
    p = launch(nproc, REPO / "tests" / "helpers" / "reshard_check.py", "--source", source,
               *train_args(data, save, ds, "--resume", *extra))
    line = [x for x in p.stdout.splitlines() if x.startswith("RESHARD ")]
    assert line, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(line[0][len("RESHARD "):])


def assert_exact(report: dict, step: int):
    assert report["step"] == step and report["missing"] == [] and report["nonzero_moments"] == report["params"]
    assert report["max_abs_diff"] == {"weight": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}, report


@pytest.mark.parametrize("ds", ["ds_configs/zero2.json", "ds_configs/zero3.json"])
def test_two_ranks_to_one_to_two(small_synthetic, tmp_path, ds):
    save = tmp_path / "run"
    train = REPO / "launch" / "train.py"
    launch(2, train, *train_args(small_synthetic, save, ds, "--max-steps", "4", "--save-interval", "4"))
    assert_exact(reshard_check(1, save / "checkpoints" / "step_4", small_synthetic, save, ds, "--max-steps", "6"), 4)
    p = launch(1, train, *train_args(small_synthetic, save, ds, "--max-steps", "6", "--save-interval", "2", "--resume"))
    assert "on another layout: world_size 2 → 1" in p.stdout and "none repeated" in p.stdout
    assert not (save / "checkpoints" / "universal").exists()  # removed once the run saved its own layout
    assert json.loads((save / "checkpoints" / "step_6" / "megavac.json").read_text())["world_size"] == 1
    assert_exact(reshard_check(2, save / "checkpoints" / "step_6", small_synthetic, save, ds, "--max-steps", "8"), 6)
    p = launch(2, train, *train_args(small_synthetic, save, ds, "--max-steps", "8", "--save-interval", "4", "--resume"))
    assert "world_size 1 → 2" in p.stdout
    losses = train_losses(save)
    assert sorted(losses) == list(range(1, 9)) and all(0 < v < 20 for v in losses.values())
    # The realised sampling ratios carried over: every sentence drawn so far is counted once.
    recs = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in recs if r["kind"] == "lang" and r["step"] == 8]


def test_two_pipeline_stages_to_none(small_synthetic, tmp_path):
    save = tmp_path / "run"
    train = REPO / "launch" / "train.py"
    launch(2, train, *train_args(small_synthetic, save, "ds_configs/pipeline.json", "--max-steps", "4",
                                 "--save-interval", "4"))
    report = reshard_check(1, save / "checkpoints" / "step_4", small_synthetic, save, "ds_configs/zero1.json",
                           "--max-steps", "6")
    assert_exact(report, 4)
    p = launch(1, train, *train_args(small_synthetic, save, "ds_configs/zero1.json", "--max-steps", "6",
                                     "--save-interval", "6", "--resume"))
    assert "pipeline_stages 2 → 1" in p.stdout
    assert sorted(train_losses(save)) == list(range(1, 7))


def test_into_a_pipeline_from_another_layout_is_refused_by_name(small_synthetic, tmp_path):
    save = tmp_path / "run"
    train = REPO / "launch" / "train.py"
    launch(1, train, *train_args(small_synthetic, save, "ds_configs/zero1.json", "--max-steps", "2",
                                 "--save-interval", "2"))
    p = launch(2, train, *train_args(small_synthetic, save, "ds_configs/pipeline.json", "--max-steps", "4",
                                     "--resume"), check=False)
    assert p.returncode != 0 and "pipeline_stages=1" in p.stdout + p.stderr
    assert "into a pipeline of the same layout only" in p.stdout + p.stderr
