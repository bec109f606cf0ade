"""Pipeline parallelism end to end: the layer layout, launched training with ds_configs/pipeline.json on
2 stages × 1 and × 2 data-parallel CPU ranks, exact resume, per-language methods, and evaluation of
the pipelined checkpoint with launch/evaluate.py. Gradient exactness of every method under pipeline
parallelism is in tests/test_pergrad_exact.py."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from conftest import REPO, deepspeed_cmd, run, train_losses
from megavac.config import TrainConfig, merge_ds_config
from megavac.model import ModelConfig, Transformer
from megavac.model.pipeline import check_stages, layer_specs, num_layers, plain_name, plain_prefix

COMMON = ["--model", "tiny", "--max-tokens", "1024", "--lr", "2e-3", "--warmup-steps", "4", "--log-interval", "1",
          "--lang-log-interval", "4", "--valid-max-tokens", "2048", "--grad-accum", "2"]


def args(data, save_dir, *extra, ds="ds_configs/pipeline.json"):
    return ["--ds_config", ds, "--data-dir", data, "--save-dir", save_dir, *COMMON, *extra]


@pytest.mark.parametrize("pre_ln", [True, False])
def test_every_plain_parameter_has_exactly_one_pipeline_layer(pre_ln):
    cfg = ModelConfig(vocab_size=30, d_model=8, n_heads=2, enc_layers=2, dec_layers=3, d_ff=16, pre_ln=pre_ln)
    plain = [n for n, _ in Transformer(cfg).named_parameters()]
    # The pipeline's parameter names, written out from the layer layout (module docstring).
    pipe_names = ["tied_modules.embed.embed.weight"]
    for idx in range(1, num_layers(cfg) - 1):
        prefix = plain_prefix(cfg, idx)
        for n in plain:
            if prefix and n.startswith(prefix):
                rest = n[len(prefix):]
                pipe_names.append(f"{idx}.{'norm.' + rest if prefix in ('enc_norm.', 'dec_norm.') else rest}")
    assert sorted(plain_name(cfg, n) for n in pipe_names) == sorted(plain)
    assert plain_name(cfg, "3.norm.weight") == ("enc_norm.weight")
    assert plain_name(cfg, "1.attn.fn.q.weight") == "encoder.0.attn.fn.q.weight"
    assert plain_name(cfg, "6.cross_attn.fn.kv.bias") == "decoder.2.cross_attn.fn.kv.bias"
    with pytest.raises(ValueError, match="'embed.weight'"):
        plain_name(cfg, "embed.weight")


def test_stage_limit_is_the_layer_spec_count():
    """DeepSpeed cuts stages between layer specs: every spec may be a stage of its own, one more may not
    (the dry run asks check_stages too)."""
    cfg = ModelConfig(vocab_size=30, d_model=8, n_heads=2, enc_layers=2, dec_layers=3, d_ff=16)
    assert num_layers(cfg) == len(layer_specs(cfg)) == 2 + 3 + 4
    check_stages(cfg, 9)
    with pytest.raises(ValueError, match=r"--pipeline-stages 10 exceeds the model's 9 pipeline layers"):
        check_stages(cfg, 10)


def test_pipeline_config_is_checked_and_merged():
    ds = json.loads((REPO / "ds_configs" / "pipeline.json").read_text())
    merged = merge_ds_config(ds, TrainConfig(), world_size=4)
    assert merged["pipeline"]["stages"] == 2 and merged["train_batch_size"] == 2 * ds["gradient_accumulation_steps"]
    assert merge_ds_config(ds, TrainConfig(pipeline_stages=4), 8)["pipeline"]["stages"] == 4
    with pytest.raises(ValueError, match="world size 3 is not divisible by --pipeline-stages 2"):
        merge_ds_config(ds, TrainConfig(), world_size=3)
    with pytest.raises(ValueError, match="--pipeline-stages 2 with ZeRO stage 2"):
        merge_ds_config(ds, TrainConfig(zero_stage=2), world_size=2)
    with pytest.raises(ValueError, match="pipeline stages must be an integer >= 1, got 0"):
        merge_ds_config(ds, TrainConfig(pipeline_stages=0), world_size=2)


def _dev_nll(checkpoint, data):
    """Average dev NLL of the consolidated checkpoint, computed by the plain model in this process."""
    from megavac.evaluation.consolidate import load_model_from_checkpoint
    from megavac.data import MultilingualDataset
    from megavac.train.validation import Validator

    model, meta = load_model_from_checkpoint(checkpoint)
    dev = MultilingualDataset(str(data), "dev", meta["langs"])
    out = Validator(dev, 2048, model.cfg.max_positions, 0, 1, torch.device("cpu"), 0.1).run(model)
    return out["avg_nll"], meta


def test_two_stages_train_resume_exactly_and_evaluate(small_synthetic, tmp_path):
    full = tmp_path / "full"
    out = run(deepspeed_cmd(2, *args(small_synthetic, full, "--max-steps", 8, "--save-interval", 4,
                                     "--valid-interval", 4)))
    assert "2 pipeline stages × 1 data-parallel" in out.stdout
    a = train_losses(full)
    assert sorted(a) == list(range(1, 9)) and a[8] < a[1] - 0.5  # it learns

    # Resume from the step-4 checkpoint of a copy: steps 5..8 repeat exactly.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_8")
    (resumed / "checkpoints" / "latest").write_text("step_4")
    out = run(deepspeed_cmd(2, *args(small_synthetic, resumed, "--max-steps", 8, "--save-interval", 4,
                                     "--valid-interval", 4, "--resume")))
    assert "resumed from step 4" in out.stdout
    b = train_losses(resumed)
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-6), (step, a[step], b[step])
    # Resuming without the pipeline on the same 2 ranks (2 data-parallel ranks) goes through a universal
    # checkpoint (tests/test_reshard.py checks the weights and moments bit for bit).
    out = run(deepspeed_cmd(2, *args(small_synthetic, resumed, "--max-steps", 9, "--resume", ds="ds_configs/zero1.json")))
    assert "world_size 2 → 2, pipeline_stages 2 → 1" in out.stdout
    assert sorted(train_losses(resumed)) == list(range(1, 10))

    # The pipelined checkpoint (per-layer files) evaluates with launch/evaluate.py ...
    ckpt = full / "checkpoints"
    assert sorted(p.name for p in (ckpt / "step_8").glob("layer_*")) == [f"layer_{i:02d}-model_states.pt"
                                                                          for i in range(7)]
    res = tmp_path / "eval.json"
    run([sys.executable, "launch/evaluate.py", "--checkpoint", ckpt, "--tag", "latest", "--beam", "2",
         "--max-tokens", "2000", "--out", res])
    results = json.loads(res.read_text())
    assert results["step"] == 8 and len(results["langs"]) == 6
    assert all(0 <= t["bleu"] <= 100 and t["n"] == 30 for t in results["langs"].values())
    # ... and the consolidated model is the trained one: its dev NLL is what the pipelined validation saw.
    nll, meta = _dev_nll(ckpt, small_synthetic)
    assert meta["pipeline_stages"] == 2
    assert nll == pytest.approx(meta["val_loss"], rel=1e-5)


def test_two_stages_by_two_ranks_with_gradvac(small_synthetic, tmp_path):
    save = tmp_path / "run"
    out = run(deepspeed_cmd(4, *args(small_synthetic, save, "--max-steps", 6, "--save-interval", 6,
                                     "--valid-interval", 6, "--method", "gradvac", "--granularity", "all_layer",
                                     "--gram-log-interval", 3)), timeout=900)
    assert "2 pipeline stages × 2 data-parallel" in out.stdout
    a = train_losses(save)
    assert sorted(a) == list(range(1, 7)) and a[6] < a[1]
    grams = sorted((save / "grams").glob("gram_*.npz"))
    assert [g.name for g in grams] == ["gram_00000003.npz", "gram_00000006.npz"]
    import numpy as np

    g = np.load(grams[-1])
    # Groups of the WHOLE model although each rank holds one stage; Grams symmetric PSD per group.
    assert list(g["groups"]) == ["embed", "encoder.0", "encoder.1", "decoder.0", "decoder.1", "encoder.norm",
                                 "decoder.norm"]
    for G in g["gram"]:
        assert np.allclose(G, G.T) and np.linalg.eigvalsh(G).min() > -1e-6 * max(1.0, np.abs(G).max())
    nll, meta = _dev_nll(save / "checkpoints", small_synthetic)
    assert meta["method"] == "gradvac" and nll == pytest.approx(meta["val_loss"], rel=1e-5)
