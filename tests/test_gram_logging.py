"""Gram logging on any run: --gram-log-interval N computes the per-language Grams every N steps without
changing the update, monolithic training included (the GradVac paper analyses plain training)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import deepspeed_cmd, run, train_losses

COMMON = ["--model", "tiny", "--max-tokens", "1024", "--lr", "2e-3", "--warmup-steps", "4", "--log-interval", "1",
          "--lang-log-interval", "4", "--valid-interval", "1000", "--valid-max-tokens", "2048", "--max-steps", "4",
          "--save-interval", "4", "--dropout", "0"]


@pytest.mark.parametrize("nproc, ds", [(1, "ds_configs/zero1.json"), (2, "ds_configs/zero2.json")])
def test_monolithic_run_logs_grams_with_unchanged_losses(small_synthetic, tmp_path, nproc, ds):
    def train(save, *extra):
        args = ["--ds_config", ds, "--data-dir", small_synthetic, "--save-dir", save, *COMMON, *extra]
        run(deepspeed_cmd(2, *args) if nproc == 2 else [sys.executable, "launch/train.py", *args])
        return train_losses(save)

    plain = train(tmp_path / "plain")
    logged = train(tmp_path / "logged", "--gram-log-interval", "2", "--granularity", "all_layer")
    assert sorted(plain) == sorted(logged) == [1, 2, 3, 4]
    for s in plain:  # the same update: Σ_k g_k is the batch gradient up to float rounding
        assert logged[s] == pytest.approx(plain[s], rel=1e-5), (s, plain, logged)
    logs = sorted((tmp_path / "logged" / "grams").glob("gram_*.npz"))
    assert [p.name for p in logs] == ["gram_00000002.npz", "gram_00000004.npz"]
    z = np.load(logs[-1])
    assert str(z["method"]) == "monolithic" and str(z["granularity"]) == "all_layer"
    G, K = len(z["groups"]), len(z["langs"])
    assert z["gram"].shape == (G, K, K) and G > 4
    present = z["present"].astype(bool)
    diag = np.diagonal(z["gram"], axis1=1, axis2=2)
    assert (diag[:, present] > 0).all() and (diag[:, ~present] == 0).all()
    assert np.allclose(z["gram"], np.transpose(z["gram"], (0, 2, 1)))
    assert (z["weights"] == 1).all()
