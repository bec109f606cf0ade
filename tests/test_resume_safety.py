"""A run never continues silently on wrong state: other data, changed settings on --resume, divergence.

Each case is one a user hit: before, each gave exit 0 and a wrong or meaningless run."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from conftest import run, train_losses

COMMON = ["--model", "tiny", "--max-tokens", "1024", "--warmup-steps", "4", "--log-interval", "1",
          "--lang-log-interval", "4", "--valid-interval", "1000", "--valid-max-tokens", "2048",
          "--ds_config", "ds_configs/zero2.json"]


def train(data, save, *extra, check=True):
    return run([sys.executable, "launch/train.py", "--data-dir", data, "--save-dir", save, "--lr", "2e-3",
                *COMMON, *extra], check=check)


@pytest.fixture(scope="module")
def trained(small_synthetic, tmp_path_factory) -> Path:
    """A 2-step run with a checkpoint at step 2, copied by each test that resumes it."""
    save = tmp_path_factory.mktemp("trained") / "run"
    train(small_synthetic, save, "--max-steps", "2", "--save-interval", "2")
    return save


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def other_spm(small_synthetic, tmp_path_factory) -> Path:
    """The same corpus prepared again with the same vocabulary size but another SentencePiece model."""
    from data_pipeline.prepare import PrepareConfig, prepare

    meta = json.loads((small_synthetic / "meta.json").read_text())
    out = tmp_path_factory.mktemp("other") / "prepared"
    prepare(PrepareConfig(corpus=Path(meta["corpus"]), out=out, vocab_size=meta["vocab_size"], workers=1,
                          quiet=True, spm_sentences=1500, seed=1))
    assert (out / "spm.model").read_bytes() != (small_synthetic / "spm.model").read_bytes()
    return out


def test_checkpoint_carries_the_data_fingerprint_and_settings(trained, small_synthetic):
    meta = json.loads((trained / "checkpoints" / "step_2" / "megavac.json").read_text())
    from megavac.fingerprint import file_sha256

    assert meta["data_fingerprint"]["spm_sha256"] == file_sha256(small_synthetic / "spm.model")
    assert meta["data_fingerprint"]["langs"] == meta["langs"]
    assert meta["settings"]["lr"] == 2e-3 and meta["settings"]["model"]["d_model"] > 0


def test_resume_on_data_with_another_sentencepiece_model_is_refused(trained, other_spm, tmp_path):
    save = copy_run(trained, tmp_path / "run")
    p = train(other_spm, save, "--max-steps", "4", "--resume", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "SentencePiece model" in p.stderr and str(other_spm) in p.stderr
    assert json.loads((save / "checkpoints" / "step_2" / "megavac.json").read_text())["data_dir"] != str(other_spm)


def test_resume_with_other_languages_is_refused_by_name(trained, small_synthetic, tmp_path):
    save = copy_run(trained, tmp_path / "run")
    names = json.loads((trained / "checkpoints" / "step_2" / "megavac.json").read_text())["langs"]
    p = train(small_synthetic, save, "--max-steps", "4", "--resume", "--langs", ",".join(names[:3]), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "dropped" in p.stderr and names[3] in p.stderr and "--langs" in p.stderr


@pytest.mark.parametrize("flag, value, named", [("--model", "mini", "--model"), ("--seed", "7", "--seed"),
                                               ("--temperature", "1", "--temperature"),
                                               ("--precision", "bf16", "--precision")])
def test_resume_with_a_setting_that_cannot_change_is_refused_by_name(trained, small_synthetic, tmp_path, flag,
                                                                     value, named):
    save = copy_run(trained, tmp_path / "run")
    p = train(small_synthetic, save, "--max-steps", "4", "--resume", flag, value, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert named in p.stderr and "cannot change on resume" in p.stderr
    assert not (save / "run.lock").exists()  # a refused start frees the run directory for the corrected one


def test_resume_with_another_lr_applies_it_and_says_so(trained, small_synthetic, tmp_path):
    same, changed = copy_run(trained, tmp_path / "same"), copy_run(trained, tmp_path / "changed")
    train(small_synthetic, same, "--max-steps", "3", "--resume")
    p = train(small_synthetic, changed, "--max-steps", "3", "--resume", "--lr", "1e-3", "--log-interval", "5")
    assert "lr changed from 0.002 to 0.001; applied from step 3" in p.stdout
    assert "log_interval changed from 1 to 5" in p.stdout

    def lr_at(save, step):
        recs = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
        return [r["lr"] for r in recs if r["kind"] == "train" and r["step"] == step][-1]
    assert math.isclose(lr_at(changed, 3), lr_at(same, 3) / 2, rel_tol=1e-9)


def test_resume_past_max_steps_says_there_is_nothing_to_train(trained, small_synthetic, tmp_path):
    save = copy_run(trained, tmp_path / "run")
    p = train(small_synthetic, save, "--max-steps", "2", "--resume")
    assert "nothing to train" in p.stdout


def test_exploding_loss_stops_naming_the_step_without_a_checkpoint(small_synthetic, tmp_path):
    """bf16 with lr 1e3: the loss explodes (3e7 in the report). The run must stop, name the step and keep
    the last good checkpoint as `latest`."""
    save = tmp_path / "run"
    train(small_synthetic, save, "--max-steps", "2", "--save-interval", "2", "--precision", "bf16")
    p = train(small_synthetic, save, "--max-steps", "40", "--save-interval", "1", "--precision", "bf16", "--resume",
              "--lr", "1e3", "--warmup-steps", "1", check=False)
    assert p.returncode == 3 and "Traceback" not in p.stderr, p.stdout[-2000:] + p.stderr[-3000:]
    assert "diverged" in p.stderr and "at step" in p.stderr
    step = int(p.stderr.split("at step ")[1].split()[0].rstrip(";:,"))
    latest = (save / "checkpoints" / "latest").read_text().strip()
    assert int(latest[5:]) < step, (latest, step)


def test_skipped_updates_stop_the_run(small_synthetic, tmp_path):
    """fp32 with lr 1e3: DeepSpeed skips every update as an overflow and the loss freezes; after
    --max-skipped-steps of them the run stops, naming the steps, before it writes another checkpoint."""
    save = tmp_path / "run"
    p = train(small_synthetic, save, "--max-steps", "60", "--save-interval", "50", "--lr", "1e3",
              "--warmup-steps", "1", "--max-skipped-steps", "5", "--max-loss", "1e9", check=False)
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-3000:]
    assert "skipped the last 5 updates" in p.stderr, p.stderr[-2000:]
    assert not (save / "checkpoints" / "latest").exists()


def test_max_loss_and_skipped_steps_flags_are_checked_at_start(small_synthetic, tmp_path):
    p = train(small_synthetic, tmp_path / "a", "--max-loss", "-1", check=False)
    assert p.returncode == 2 and "--max-loss" in p.stderr
    p = train(small_synthetic, tmp_path / "b", "--max-skipped-steps", "0", check=False)
    assert p.returncode == 2 and "--max-skipped-steps" in p.stderr


def test_divergence_guard_names_what_and_when():
    from megavac.train.divergence import DivergenceError, DivergenceGuard

    g = DivergenceGuard(max_loss=DivergenceGuard.default_max_loss(1000), max_skipped_steps=3)
    g.check_loss(5, 6.0)  # below 3 ln(1000) = 20.7
    for bad, what in ((float("nan"), "the validation loss"), (float("inf"), "training loss"), (25.0, "training loss")):
        with pytest.raises(DivergenceError, match=f"{what}.*step 7"):
            g.check_loss(7, bad, what)
    g.after_step(1, 0)
    g.after_step(2, 1)
    g.after_step(3, 2)
    g.after_step(4, 2)  # an applied update resets the count
    g.after_step(5, 3)
    g.after_step(6, 4)
    with pytest.raises(DivergenceError, match=r"skipped the last 3 updates \(steps 5\.\.7\)"):
        g.after_step(7, 5)


def test_resume_comparison_refuses_every_fixed_change_and_returns_applied_ones():
    from megavac.train.resume_check import APPLIED, FIXED, compare

    saved = {k: 1 for k in (*FIXED, *APPLIED)}
    assert compare(saved, dict(saved), "x") == {}
    assert compare(None, dict(saved), "x") == {}
    assert compare(saved, {**saved, "lr": 2, "max_steps": 9}, "x") == {"lr": (1, 2), "max_steps": (1, 9)}
    with pytest.raises(ValueError) as e:
        compare(saved, {**saved, "seed": 2, "granularity": 3, "lr": 5}, "ckpt/megavac.json")
    assert "--seed (1 → 2)" in str(e.value) and "--granularity (1 → 3)" in str(e.value)
    assert "ckpt/megavac.json" in str(e.value) and "--lr" not in str(e.value)
