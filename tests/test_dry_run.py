"""The dry-run planner (megavac/train/dry_run.py, ``launch/train.py --dry-run``): paths, parallelism, model size,
memory per GPU against DeepSpeed's estimators, refusals. No distributed init, no DeepSpeed engine."""
from __future__ import annotations

import importlib.util
import io
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, launch_env
from megavac.train import dry_run
from megavac.config import DataConfig, MethodConfig, TrainConfig, model_config
from megavac.model import Transformer

DS = REPO / "ds_configs"


def load_train_script():
    """launch/train.py (a script, not part of the package) imported by path, afresh."""
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan(tmp_path, data=None, train=None, method=None, ds="zero2.json", **kw):
    data = data or DataConfig(synthetic_dir=str(tmp_path / "synthetic"))
    train = train or TrainConfig(save_dir=str(tmp_path / "run"))
    return dry_run.make_plan(data, train, method or MethodConfig(), str(DS / ds), **kw)


def test_default_config_without_data_reports_the_synthetic_corpus(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    p = _plan(tmp_path)
    assert p.ok, p.problems
    text = " ".join(v for _, _, v in p.rows)
    assert "would be generated" in text
    assert not (tmp_path / "synthetic").exists()  # nothing generated
    assert not (tmp_path / "run").exists()  # nothing written
    assert p.numbers["world"] == 1 and p.numbers["dp"] == 1 and p.numbers["langs"] == 28
    out = io.StringIO()
    dry_run.render(p, out)
    assert out.getvalue().rstrip().endswith("plan OK")


def test_world_size_from_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert dry_run.default_world_size() == 16
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dry_run.default_world_size() == 4
    assert dry_run.default_world_size({}) == 1


def test_prepared_corpus(small_synthetic, tmp_path):
    data = DataConfig(data_dir=str(small_synthetic), max_tokens=1000)
    train = TrainConfig(save_dir=str(tmp_path / "run"), grad_accum=3)
    p = _plan(tmp_path, data=data, train=train, world_size=4)
    assert p.ok, p.problems
    assert p.numbers["langs"] == 6
    assert p.numbers["tokens_per_update"] == 1000 * 4 * 3
    assert p.numbers["train_batch_size"] == 4 * 3  # DeepSpeed's nominal batch: micro 1 × ga × DP
    # The parameter count of the meta-device model is the real model's.
    import json

    meta = json.loads((small_synthetic / "meta.json").read_text())
    real = Transformer(model_config(train, meta["vocab_size"], meta["pad_id"]))
    assert p.numbers["params"] == real.num_parameters()
    # Task subset and unknown tasks.
    names = [t["name"] for t in meta["tasks"]]
    assert _plan(tmp_path, data=DataConfig(data_dir=str(small_synthetic), langs=",".join(names[:2])),
                 train=train).numbers["langs"] == 2
    bad = _plan(tmp_path, data=DataConfig(data_dir=str(small_synthetic), langs="en-zz"), train=train)
    assert any("en-zz" in x for x in bad.problems)


def test_missing_paths_are_problems(tmp_path):
    p = _plan(tmp_path, data=DataConfig(data_dir=str(tmp_path / "nope")),
              train=TrainConfig(save_dir=str(tmp_path / "run"), resume=True), ds="zero2.json")
    assert any(str(tmp_path / "nope") in x for x in p.problems)
    assert any("--resume" in x and "latest" in x for x in p.problems)
    with pytest.raises(ValueError, match="nope"):
        p.raise_if_problems()
    p = _plan(tmp_path, ds="missing.json")
    assert any("missing.json" in x for x in p.problems)


@pytest.mark.parametrize("dp", [1, 8, 64])
@pytest.mark.parametrize("params,largest", [(241_897_472, 65_536_000), (1_438_208, 512_000)])
def test_model_states_match_deepspeed_estimators(params, largest, dp):
    """Stated tolerance: ZeRO-2 equal (to DeepSpeed's int rounding, 1 byte); ZeRO-3 larger by exactly the
    16-bit parameter partition 2P/N that DeepSpeed's ZeRO-3 formula omits (≤ 1/10 of the partitioned part)."""
    for precision in ("bf16", "fp16"):
        z2 = sum(dry_run.model_state_bytes(params, largest, 2, precision, precision, dp).values())
        assert abs(z2 - dry_run.deepspeed_estimate(params, largest, 2, dp)) <= 1
        z3 = sum(dry_run.model_state_bytes(params, largest, 3, precision, precision, dp).values())
        ds3 = dry_run.deepspeed_estimate(params, largest, 3, dp)
        assert abs(z3 - ds3 - 2 * params / dp) <= 1
        assert (z3 - ds3) / (18 * params / dp) <= 0.12


def test_memory_through_the_plan_equals_deepspeed(tmp_path):
    for ds, stage in (("zero2_fp16.json", 2), ("zero3_fp16.json", 3)):
        p = _plan(tmp_path, train=TrainConfig(save_dir=str(tmp_path / "run"), model="big"), ds=ds, world_size=8)
        assert p.ok, p.problems
        n = p.numbers
        assert n["zero_stage"] == stage and n["precision"] == "fp16"
        slack = 0 if stage == 2 else 2 * n["params"] / 8
        assert abs(n["model_states_bytes"] - n["deepspeed_model_states_bytes"] - slack) <= 1
        # The DeepSpeed column is printed beside ours.
        out = io.StringIO()
        dry_run.render(p, out)
        assert "DeepSpeed estimator" in out.getvalue()
    # Hand count, ZeRO-2 bf16 with fp32 accumulation: 2P + (4 + 4 + 8)P/N.
    p = _plan(tmp_path, ds="zero2_bf16.json", world_size=4)
    P = p.numbers["params"]
    assert p.numbers["grad_accum_dtype"] == "fp32"
    assert p.numbers["model_states_bytes"] == pytest.approx(2 * P + 16 * P / 4)


def test_per_language_slices(tmp_path):
    p = _plan(tmp_path, method=MethodConfig(method="gradvac"), ds="zero2.json", world_size=4)
    assert p.ok, p.problems
    K, P = p.numbers["langs"], p.numbers["params"]
    assert p.numbers["pergrad_bytes"] == pytest.approx(K * P / 4 * 4)
    # One backward: the languages' gradients of one parameter (the tied embedding) exist until reduced.
    from megavac.pergrad.one_backward import BUDGET

    # The gradients, a running sum (tied embedding), the all-to-all's send and receive buffers.
    assert 0 < p.numbers["pergrad_transient_bytes"] <= 4 * BUDGET * 4
    ref = _plan(tmp_path, method=MethodConfig(method="gradvac", collector="k_backward"), ds="zero2.json", world_size=4)
    assert "pergrad_transient_bytes" not in ref.numbers and ref.numbers["pergrad_bytes"] == p.numbers["pergrad_bytes"]
    assert ref.numbers["total_bytes"] == pytest.approx(p.numbers["total_bytes"] - p.numbers["pergrad_transient_bytes"])
    assert "pergrad_bytes" not in _plan(tmp_path, world_size=4).numbers
    cats = _plan(tmp_path, method=MethodConfig(method="cats", langs_per_batch=3), ds="zero2.json", world_size=4)
    assert cats.numbers["pergrad_bytes"] == pytest.approx(3 * P / 4 * 4)  # only the languages present
    # Without --langs-per-batch CATS draws its own default (megavac.methods owns it: 8 of the 28 languages).
    cats = _plan(tmp_path, method=MethodConfig(method="cats"), ds="zero2.json", world_size=4)
    assert MethodConfig(method="cats").resolve().langs_per_batch == 8
    assert cats.numbers["pergrad_bytes"] == pytest.approx(8 * P / 4 * 4)


@pytest.mark.parametrize("world,stages,match", [
    (8, 3, r"world size 8 .*--pipeline-stages 3"),
    (0, 1, r"--world-size must be >= 1, got 0"),
    (4, 0, r"--pipeline-stages must be >= 1, got 0"),
])
def test_bad_parallelism_raises_naming_values(world, stages, match):
    with pytest.raises(ValueError, match=match):
        dry_run.check_parallelism(world, stages)


def test_bad_combination_in_the_plan(tmp_path):
    p = _plan(tmp_path, ds="zero3.json", world_size=8,
              train=TrainConfig(save_dir=str(tmp_path / "run"), pipeline_stages=2))
    assert not p.ok
    with pytest.raises(ValueError, match=r"--pipeline-stages 2 with ZeRO stage 3"):
        p.raise_if_problems()
    assert dry_run.check_parallelism(8, 2) == 4


def test_zero2_under_a_pipeline_is_reported_once(tmp_path):
    p = _plan(tmp_path, ds="pipeline.json", world_size=4, train=TrainConfig(save_dir=str(tmp_path / "run"), zero_stage=2))
    assert [x for x in p.problems if "ZeRO stage 2" in x] == [p.problems[0]] and len(p.problems) == 1, p.problems


def test_pipeline_stages_up_to_the_pipeline_modules_layer_count(tmp_path):
    """The limit is megavac.model.pipeline's layer specs (base: 6 + 6 layers, embedding, output, two final norms =
    16), not the 12 Transformer layers: what training accepts, the dry run accepts."""
    from megavac.model.pipeline import layer_specs

    train = dict(save_dir=str(tmp_path / "run"), model="base")
    specs = len(layer_specs(model_config(TrainConfig(**train), 64000, 0)))
    assert specs == 16
    for stages in (13, specs):  # enc + dec + 1, and the spec count itself
        p = _plan(tmp_path, ds="pipeline.json", world_size=2 * stages,
                  train=TrainConfig(pipeline_stages=stages, **train))
        assert p.ok, (stages, p.problems)
        assert p.numbers["stages"] == stages and p.numbers["dp"] == 2
    p = _plan(tmp_path, ds="pipeline.json", world_size=17, train=TrainConfig(pipeline_stages=17, **train))
    assert p.problems == ["--pipeline-stages 17 exceeds the model's 16 pipeline layers (6 encoder + 6 decoder "
                          "layers, the embedding, the output projection and the two final norms)"]


def test_overlap_comm_under_a_pipeline_is_refused_for_per_language_methods(tmp_path):
    import json

    cfg = json.loads((DS / "pipeline.json").read_text())
    cfg["zero_optimization"]["overlap_comm"] = True
    path = tmp_path / "pipeline_overlap.json"
    path.write_text(json.dumps(cfg))
    p = _plan(tmp_path, ds=str(path), world_size=4, method=MethodConfig(method="gradvac"))
    assert p.problems == ["--method gradvac: per-language gradients under pipeline parallelism need "
                          "zero_optimization.overlap_comm false (true given): with it ZeRO-1 reduces inside the "
                          "backward, before each language is read"]
    assert _plan(tmp_path, ds=str(path), world_size=4).ok  # monolithic: DeepSpeed's own training step
    # Without a pipeline ZeRO-1 reduces only at the boundary backward the adapter reads after: accepted.
    p = _plan(tmp_path, ds=str(path), world_size=4, method=MethodConfig(method="gradvac"),
              train=TrainConfig(save_dir=str(tmp_path / "run"), pipeline_stages=1))
    assert p.ok, p.problems


def test_pipeline_plan_from_the_pipeline_config(tmp_path):
    """ds_configs/pipeline.json carries the stages; a row holds this rank's 1/dp share of its stage."""
    p = _plan(tmp_path, ds="pipeline.json", world_size=8, method=MethodConfig(method="cats", langs_per_batch=3))
    assert p.ok, p.problems
    assert p.numbers["stages"] == 2 and p.numbers["dp"] == 4 and p.numbers["train_batch_size"] == 4 * 4  # grad accum 4 × DP 4
    P = p.numbers["params"]
    assert P / 2 / 4 < p.numbers["pergrad_bytes"] / (3 * 4) < P / 4  # about half the model per stage, / dp 4
    p4 = _plan(tmp_path, ds="pipeline.json", world_size=8,
               train=TrainConfig(save_dir=str(tmp_path / "run"), pipeline_stages=4))
    assert p4.numbers["stages"] == 4 and p4.numbers["dp"] == 2


@pytest.mark.parametrize("ds,extra,match", [
    ("zero2.json", {"zero_stage": 0}, r"ZeRO stage 0"),
    ("zero1_bf16.json", {}, None),  # no grad_accum_dtype: ZeRO-1 partition, accepted
])
def test_method_refusals_from_configs(tmp_path, ds, extra, match):
    p = _plan(tmp_path, train=TrainConfig(save_dir=str(tmp_path / "run"), **extra),
              method=MethodConfig(method="cats"), ds=ds, world_size=2)
    if match is None:
        assert p.ok, p.problems
    else:
        assert any(__import__("re").search(match, x) for x in p.problems), p.problems


def _ds(stage, bf16=False, accum=None, offload=None):
    ds = {"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}
    if accum:
        ds["data_types"] = {"grad_accum_dtype": accum}
    if offload:
        ds["zero_optimization"]["offload_optimizer"] = {"device": offload}
    return ds


def test_method_refusals():
    m = MethodConfig(method="gradvac")
    with pytest.raises(ValueError, match="--method gradvac: .*bf16 \\+ ZeRO stage 1 \\+ grad_accum_dtype fp32"):
        dry_run.check_method(m, _ds(1, bf16=True, accum="fp32"), pipeline=False)
    with pytest.raises(ValueError, match="offload_optimizer.device='cpu'"):
        dry_run.check_method(m, _ds(2, bf16=True, accum="fp32", offload="cpu"), pipeline=False)
    with pytest.raises(ValueError, match="'sgd'"):
        dry_run.check_method(MethodConfig(method="sgd"), _ds(2), pipeline=False)
    with pytest.raises(ValueError, match="--granularity 'layers'"):
        dry_run.check_method(MethodConfig(method="gradvac", granularity="layers"), _ds(2), pipeline=False)
    dry_run.check_method(MethodConfig(), _ds(0, bf16=True, accum="fp32", offload="cpu"), pipeline=False)  # monolithic
    dry_run.check_method(m, _ds(2, bf16=True, accum="fp32"), pipeline=False)
    # None: the method's own default granularity.
    dry_run.check_method(MethodConfig(method="gradvac", granularity=None), _ds(2), pipeline=False)


def test_no_engine_in_process(tmp_path, monkeypatch):
    """The dry-run path of launch/train.py never initialises distributed or a DeepSpeed engine."""
    import deepspeed

    from megavac import distributed

    def boom(*a, **k):
        raise AssertionError("a dry run must not start distributed or DeepSpeed")

    monkeypatch.setattr(deepspeed, "initialize", boom)
    monkeypatch.setattr(distributed, "init", boom)
    train_script = load_train_script()
    rc = train_script.main(["--dry-run", "--synthetic-dir", str(tmp_path / "s"), "--save-dir", str(tmp_path / "r"),
                            "--world-size", "2"])
    assert rc == 0
    assert not torch.distributed.is_initialized()


def test_train_py_dry_run_subprocess(tmp_path):
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--dry-run", "--ds_config", str(DS / "zero2_bf16.json"),
           "--synthetic-dir", str(tmp_path / "s"), "--save-dir", str(tmp_path / "r"), "--model", "big",
           "--grad-accum", "4", "--world-size", "8", "--method", "gradvac"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert time.time() - t0 < 60
    assert p.stdout.rstrip().endswith("plan OK")
    assert "tokens per update" in p.stdout and "DeepSpeed estimator" in p.stdout
    assert "DeepSpeed info" not in p.stdout + p.stderr and "Initializing TorchBackend" not in p.stdout + p.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()

    bad = subprocess.run(cmd[:-2] + ["--pipeline-stages", "3"], cwd=REPO, env=launch_env(), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert "world size 8 is not divisible by --pipeline-stages 3" in bad.stdout


def test_dry_run_options_need_dry_run(capsys):
    train_script = load_train_script()
    with pytest.raises(SystemExit) as e:
        train_script.main(["--world-size", "4"])
    assert e.value.code == 2
    assert "dry-run option" in capsys.readouterr().err


def _prepared_with_long_dev_line(tmp_path):
    """Two pairs; line 3 of xb's English dev side has 100,000 characters, let through prepare on purpose."""
    import random

    from data_pipeline.prepare import PrepareConfig, prepare
    from data_pipeline.synthetic import build_languages, generate_pairs

    for i, code in enumerate(("xa", "xb")):
        pairs = list(generate_pairs(build_languages(0)[i * 5], 140, random.Random(i), set()))
        d = tmp_path / "corpus" / f"{code}-en"
        d.mkdir(parents=True)
        for split, rows in (("train", pairs[:120]), ("dev", pairs[120:])):
            en, xx = [e for e, _ in rows], [x for _, x in rows]
            if code == "xb" and split == "dev":
                en[2] = "word " * 20000
            (d / f"{split}.{code}").write_text("".join(s + "\n" for s in xx), encoding="utf-8")
            (d / f"{split}.en").write_text("".join(s + "\n" for s in en), encoding="utf-8")
    out = tmp_path / "prepared"
    prepare(PrepareConfig(corpus=tmp_path / "corpus", out=out, vocab_size=300, workers=1, quiet=True,
                          direction="both", max_eval_tokens=10**6))
    return out


@pytest.mark.filterwarnings("ignore::data_pipeline.corpus.CorpusWarning")  # no test split: expected here
def test_dev_example_longer_than_max_positions_is_a_problem(tmp_path):
    """A dev line past max_positions used to pass the dry run ("plan OK") and stop training at its first
    validation; the plan names the language, the line and what to do."""
    import json

    data_dir = _prepared_with_long_dev_line(tmp_path)
    train = TrainConfig(save_dir=str(tmp_path / "run"), model="tiny")
    p = _plan(tmp_path, data=DataConfig(data_dir=str(data_dir)), train=train)
    assert len(p.problems) == 1, p.problems
    assert re.match(r"en-xb dev line 3 has \d+ tokens \(with tag/BOS/EOS\) > the model's max_positions=1024: "
                    r"validation would stop at its first run; remove or shorten line 3 of pair xb's dev files \(its "
                    r"en side as prepared: .*raw/xb\.dev\.en\)", p.problems[0]), p.problems[0]
    assert p.numbers["longest_dev_example"] > 1024
    out = io.StringIO()
    dry_run.render(p, out)
    assert "plan OK" not in out.getvalue() and "1 problem(s)" in out.getvalue()
    # The CLI says so with exit code 2.
    assert dry_run.main(DataConfig(data_dir=str(data_dir)), train, MethodConfig(), str(DS / "zero2.json"),
                        file=io.StringIO()) == 2
    # The languages without that line plan fine and report their longest dev example.
    ok = _plan(tmp_path, data=DataConfig(data_dir=str(data_dir), langs="en-xa,xa-en"), train=train)
    assert ok.ok, ok.problems
    assert 0 < ok.numbers["longest_dev_example"] <= 1024
    assert any(item == "longest dev example" for _, item, _ in ok.rows)
    # A language without training data (a directory from before prepare refused that) is a problem too.
    meta = json.loads((data_dir / "meta.json").read_text())
    meta["pairs"]["xa"]["train"] = 0
    (data_dir / "meta.json").write_text(json.dumps(meta))
    bad = _plan(tmp_path, data=DataConfig(data_dir=str(data_dir), langs="en-xa"), train=train)
    assert any("no training data for en-xa (empty train split)" in x for x in bad.problems), bad.problems
    # Languages none of which has dev data: the validator refuses them at start, so the plan does too.
    from data_pipeline.binarize import write_empty
    from data_pipeline.indexed import split_prefix

    for lang in ("xa", "en"):
        write_empty(split_prefix(data_dir, "xa", "dev", lang), meta["dtype"])
    bad = _plan(tmp_path, data=DataConfig(data_dir=str(data_dir), langs="en-xa,xa-en"), train=train)
    assert any(x.startswith("no dev data for any language (en-xa, xa-en)") for x in bad.problems), bad.problems
