import json

import pytest

from megavac.config import DataConfig, TrainConfig, build_parser, from_args, load_ds_config, merge_ds_config


def parse(*argv):
    a = build_parser().parse_args(list(argv))
    return from_args(DataConfig, a), from_args(TrainConfig, a), a.ds_config


def test_cli_overrides_the_json_in_one_place():
    _, train, path = parse("--lr", "3e-4", "--grad-accum", "4", "--clip-norm", "0.5", "--zero-stage", "3",
                           "--precision", "bf16")
    ds = merge_ds_config(load_ds_config(path), train, world_size=2)
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["optimizer"]["params"]["betas"] == [0.9, 0.98]
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 8
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_json_values_kept_without_flags():
    _, train, path = parse()
    raw = load_ds_config(path)
    ds = merge_ds_config(raw, train, world_size=1)
    assert ds["optimizer"] == raw["optimizer"] and ds["gradient_clipping"] == raw["gradient_clipping"]


def test_every_shipped_config_sets_clipping_and_loads():
    import glob

    files = glob.glob("ds_configs/*.json")
    assert len(files) >= 9
    for f in files:
        ds = load_ds_config(f)
        assert "gradient_clipping" in ds, f
        if ds.get("fp16", {}).get("enabled"):
            assert ds["fp16"]["loss_scale"] == 0, f"{f}: fp16 must use dynamic loss scaling"


def test_bad_configs_name_the_value(tmp_path):
    _, train, _ = parse()
    with pytest.raises(ValueError, match="does not exist"):
        load_ds_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,,}')
    with pytest.raises(ValueError, match="line 1 column"):
        load_ds_config(str(bad))
    with pytest.raises(ValueError, match="gradient_clipping"):
        merge_ds_config({"optimizer": {"params": {"lr": 1}}}, train, 1)
    with pytest.raises(ValueError, match="scheduler"):
        merge_ds_config({"gradient_clipping": 1, "optimizer": {"params": {"lr": 1}}, "scheduler": {}}, train, 1)
    _, train, _ = parse("--precision", "fp8")
    with pytest.raises(ValueError, match="fp8"):
        merge_ds_config({"gradient_clipping": 1, "optimizer": {"params": {"lr": 1}}}, train, 1)


def test_help_shows_field_docs(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "Sampling temperature T" in out and "--warmup-steps" in out and "--no-resume" in out
    json.dumps(vars(build_parser().parse_args([])))


def _method(argv):
    from megavac.config import build_parser, method_config_from_args

    return method_config_from_args(build_parser().parse_args(argv))


def test_each_method_gets_its_papers_defaults_and_owns_its_options():
    assert _method([]).granularity == "whole_model"  # monolithic: no Gram anyway
    assert (_method(["--method", "pcgrad"]).granularity, _method(["--method", "mgda"]).granularity) == \
        ("whole_model", "whole_model")
    gv = _method(["--method", "gradvac"])
    assert gv.granularity == "all_layer" and gv.options["langs"] == "lrl" and gv.options["beta"] == 1e-2
    cats = _method(["--method", "cats"])
    assert cats.granularity == "whole_model" and cats.langs_per_batch == 8
    assert _method(["--method", "pcgrad", "--granularity", "all_layer"]).granularity == "all_layer"
    # Every option of every method is a flag --<method>-<option>.
    from megavac.methods import METHODS, method_options

    for name in METHODS:
        for opt, default in method_options(name).items():
            flag = f"--{name}-{opt.replace('_', '-')}"
            value = "none" if default is None else str(default)
            if name == "gradvac" and opt == "fixed_target":
                value = "0.5"
            got = _method(["--method", name, flag, value]).options[opt]
            assert got == (None if value == "none" else type(default or 0.5)(value)), (flag, got)
    m = _method(["--method", "gradnorm", "--gradnorm-alpha", "0.5", "--gradnorm-lr", "0.1"])
    assert m.options == {"alpha": 0.5, "lr": 0.1}


@pytest.mark.parametrize("argv,match", [
    (["--method", "gradvac", "--cats-alpha-lr", "1.0"], "--cats-alpha-lr is an option of --method cats"),
    (["--method", "gradvac", "--gradvac-fixed-target", "1"], "fixed_target.*1.0"),
    (["--method", "gradvac", "--gradvac-fixed-target", "-1"], "fixed_target.*-1.0"),
    (["--method", "mgda", "--mgda-variant", "newton"], "'newton'"),
    (["--method", "pcgrad", "--granularity", "per_head"], "'per_head'"),
    (["--method", "sgd"], "'sgd'"),
])
def test_method_flags_are_checked_by_name(argv, match):
    with pytest.raises(ValueError, match=match):
        _method(argv)


@pytest.mark.parametrize("flag,value", [("--save-interval", "0"), ("--log-interval", "0"), ("--valid-interval", "0"),
                                        ("--lang-log-interval", "-1"), ("--max-steps", "0"), ("--keep-last", "-1")])
def test_intervals_and_counts_are_refused_at_start(flag, value, capsys):
    """An interval of 0 used to pass and fail with ZeroDivisionError after the first update."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("train_entry", Path(__file__).parents[1] / "launch" / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    assert entry.main([flag, value, "--dry-run"]) == 2
    assert f"{flag} must be an integer" in capsys.readouterr().err
    _, train, _ = parse()
    train.check()  # the defaults pass
