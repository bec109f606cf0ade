"""megavac.pergrad.ds_adapter: fails loudly when the DeepSpeed internals it relies on move.

Two layers: static checks that every private attribute/method/source pattern the adapter uses still
exists in the installed DeepSpeed (cheap, no engine), and launched runs (1 and 2 CPU ranks) in which the
slice the adapter reads, zeroes and writes is compared with DeepSpeed's public accessors
(``safe_get_full_grad`` / ``safe_get_local_grad``), a plain-PyTorch reference gradient, and the
parameter change of an SGD step.
"""
from __future__ import annotations

import importlib
import inspect
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, free_port, run

HELPER = REPO / "tests" / "helpers" / "pergrad_adapter_check.py"


def test_deepspeed_version_is_the_pinned_one():
    import deepspeed

    from megavac.pergrad import ds_adapter

    assert deepspeed.__version__ == ds_adapter.DEEPSPEED_VERSION, (
        "DeepSpeed changed: re-run this file's launched checks, then move DEEPSPEED_VERSION")
    ds_adapter.check_version()


def test_other_version_is_refused_by_name(monkeypatch):
    import deepspeed

    from megavac.pergrad import ds_adapter

    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    with pytest.raises(ds_adapter.DeepSpeedInternalsError, match=r"0\.19\.8.*0\.20\.0"):
        ds_adapter.check_version()


def test_private_internals_the_adapter_uses_still_exist():
    from deepspeed.runtime import engine as ds_engine
    from deepspeed.runtime.zero import parameter_offload, stage3, stage_1_and_2
    # (importlib: ``deepspeed.utils.tensor_fragment`` as an attribute is the dataclass, not the module)
    tensor_fragment = importlib.import_module("deepspeed.utils.tensor_fragment")

    z12 = stage_1_and_2.DeepSpeedZeroOptimizer
    for name in ("_use_compact_grad_partition_buffer", "independent_gradient_partition_epilogue",
                 "get_flat_partition", "loss_scale"):
        assert hasattr(z12, name), f"stage_1_and_2.DeepSpeedZeroOptimizer.{name} moved"
    init12 = inspect.getsource(z12.__init__)
    for attr in ("self.averaged_gradients", "self.partition_size", "self.bit16_groups", "self.dp_process_group",
                 "self.gradient_accumulation_dtype"):
        assert attr in init12, f"DeepSpeedZeroOptimizer.__init__ no longer sets {attr}"
    assert "flat_partition" in inspect.signature(stage_1_and_2.GradPartitionBufferGroup.__init__).parameters
    assert "_zero_padding" in inspect.getsource(z12.get_flat_partition)

    z3 = stage3.DeepSpeedZeroOptimizer_Stage3
    for name in ("_get_param_partition_rank", "independent_gradient_partition_epilogue", "loss_scale"):
        assert hasattr(z3, name), f"stage3.DeepSpeedZeroOptimizer_Stage3.{name} moved"
    src3 = inspect.getsource(stage3)
    assert "self.grad_partitions_flat_buffer" in src3 and "self.averaged_gradients" in src3
    assert "partition_numel()" in src3
    offload = inspect.getsource(parameter_offload)
    assert "applied_pre_backward_ref_cnt" in offload and "ds_grads_remaining" in offload, (
        "ZeRO-3's backward hook counters moved: retained-graph backwards need re-checking")

    eng = ds_engine.DeepSpeedEngine
    assert "_is_gradient_accumulation_boundary" in inspect.getsource(eng.is_gradient_accumulation_boundary)
    for name in ("set_gradient_accumulation_boundary", "zero_optimization_stage", "zero_cpu_offload",
                 "gradient_accumulation_steps", "fp16_enabled"):
        assert hasattr(eng, name), f"DeepSpeedEngine.{name} moved"
    assert {"start", "numel"} <= set(tensor_fragment.fragment_address.__dataclass_fields__)
    assert {"lp_fragment_address", "hp_fragment_address"} <= set(tensor_fragment.tensor_fragment.__dataclass_fields__)

    # per_language_refusals restates from the config dict what the engine decides; grad_partition reads
    # that dict back as engine.config, and the tied weights through the PipelineModule's own attributes.
    assert "self.config = config" in inspect.getsource(eng.__init__)
    sanity = inspect.getsource(eng._do_optimizer_sanity_check)
    assert "model_dtype == torch.bfloat16 and grad_accum_dtype == torch.float32" in sanity and "== 1" in sanity, (
        "DeepSpeed's BF16_Optimizer selection changed: re-check per_language_refusals")
    from deepspeed.runtime.pipe.module import PipelineModule

    pipe_init = inspect.getsource(PipelineModule)
    assert "self.tied_modules" in pipe_init and "self.tied_weight_attrs" in pipe_init


def _fake_engine(stage: int, optimizer) -> SimpleNamespace:
    module = torch.nn.Linear(2, 2)
    return SimpleNamespace(module=module, optimizer=optimizer, device="cpu",
                           zero_optimization_stage=lambda: stage)


def test_missing_internal_is_named():
    from megavac.pergrad.ds_adapter import DeepSpeedInternalsError, _Zero3Partition, _Zero12Partition

    opt = SimpleNamespace(bit16_groups=[], partition_size=[])  # no averaged_gradients
    with pytest.raises(DeepSpeedInternalsError, match="averaged_gradients"):
        _Zero12Partition(_fake_engine(2, opt))
    with pytest.raises(DeepSpeedInternalsError, match="grad_partitions_flat_buffer"):
        _Zero3Partition(_fake_engine(3, SimpleNamespace()))


def _ds(stage, precision="fp32", accum=None, **zero):
    ds = {"zero_optimization": {"stage": stage, **zero}}
    if precision != "fp32":
        ds[precision] = {"enabled": True}
    if accum:
        ds["data_types"] = {"grad_accum_dtype": accum}
    return ds


@pytest.mark.parametrize("ds,pipeline,expected", [
    (_ds(1), False, []),
    (_ds(2, "bf16", "fp32"), False, []),
    (_ds(3, "bf16", "fp32"), False, []),  # ZeRO-3's default overlap_comm is no pipeline concern
    (_ds(1, "bf16"), True, []),
    (_ds(1, overlap_comm=True), False, []),  # ZeRO-1 reduces only at the boundary backward it is read after
    (_ds(0), False, ["ZeRO stage 1, 2 or 3, got ZeRO stage 0 (zero_optimization.stage=0)"]),
    (_ds(0), True, ["ZeRO stage 1, got ZeRO stage 0"]),
    (_ds(2, offload_optimizer={"device": "cpu"}), False, ["offload_optimizer.device='cpu'"]),
    (_ds(2, cpu_offload=True), False, ["offload_optimizer.device='cpu'"]),  # DeepSpeed's deprecated spelling
    (_ds(1, "bf16", "float"), False, ["bf16 + ZeRO stage 1 + grad_accum_dtype fp32: DeepSpeed then uses "
                                      "BF16_Optimizer"]),
    (_ds(1, "bf16", "fp32"), True, ["BF16_Optimizer"]),
    (_ds(1, overlap_comm=True), True, ["zero_optimization.overlap_comm false (true given)"]),
    # With CPU offload DeepSpeed keeps its ZeRO optimizer (no BF16_Optimizer), with NVMe offload it does not.
    (_ds(1, "bf16", "fp32", offload_optimizer={"device": "cpu"}), False, ["device='cpu'"]),
    (_ds(1, "bf16", "fp32", offload_optimizer={"device": "nvme", "nvme_path": "/tmp"}), False,
     ["device='nvme'", "BF16_Optimizer"]),
])
def test_per_language_refusals_from_the_config_dict(ds, pipeline, expected):
    """One sentence per refused setting, in a fixed order; nothing for the configurations served."""
    from megavac.pergrad.ds_adapter import per_language_refusals

    got = per_language_refusals(ds, pipeline)
    assert len(got) == len(expected) and all(e in g for e, g in zip(expected, got)), got


def test_grad_partition_refuses_with_the_same_reasons():
    """The engine's own config dict (engine.config) goes through per_language_refusals before any internal
    is touched."""
    from megavac.pergrad.ds_adapter import grad_partition, per_language_refusals

    for ds in (_ds(0), _ds(1, "bf16", "fp32"), _ds(2, offload_optimizer={"device": "cpu"})):
        engine = _fake_engine(int(ds["zero_optimization"]["stage"]), SimpleNamespace())
        engine.config = ds
        with pytest.raises(ValueError) as e:
            grad_partition(engine)
        assert str(e.value) == "; ".join(per_language_refusals(ds, pipeline=False))


def test_grad_accum_dtype_spellings():
    from megavac.pergrad.ds_adapter import grad_accum_dtype

    assert grad_accum_dtype(_ds(2, "bf16")) == "bf16"
    assert grad_accum_dtype(_ds(2, "bf16", "torch.float32")) == "fp32"
    assert grad_accum_dtype(_ds(2, "fp16", "half")) == "fp16"
    with pytest.raises(ValueError, match="data_types.grad_accum_dtype 'int8' is not one of fp32, fp16, bf16"):
        grad_accum_dtype(_ds(2, accum="int8"))


def test_detach_tied_weight_broadcast_keeps_storage_and_ds_marks():
    from megavac.pergrad.ds_adapter import detach_tied_weight_broadcast

    tied = torch.nn.Module()
    tied.embed = torch.nn.Embedding(5, 3)
    old = tied.embed.weight
    old.ds_pipe_replicated = True
    pipe = SimpleNamespace(tied_modules=torch.nn.ModuleDict({"embed": tied}),
                           tied_weight_attrs={"embed": ["embed.weight"]})
    detach_tied_weight_broadcast(pipe)
    new = tied.embed.weight
    assert new is not old and isinstance(new, torch.nn.Parameter) and new.is_leaf and new.requires_grad
    assert new.data_ptr() == old.data_ptr() and new.ds_pipe_replicated is True


def _check(results):
    by = {r["config"]: r for r in results}
    for name, r in by.items():
        if name in ("z1_bf16_acc32", "z0_fp32"):
            continue
        assert r["coverage_ok"], r
        for k in (0, 1):
            # Element for element what DeepSpeed itself reports: the map and the storage are right.
            assert r[f"read{k}_vs_deepspeed_maxabs"] == 0.0, r
            assert r[f"read{k}_norm"] > 0, r
            assert r[f"zeroed{k}_maxabs"] == 0.0, r
            if "fp32" in name:  # language k's gradient alone, after the other's was read and zeroed
                assert r[f"read{k}_vs_reference_rel"] < 1e-6, r
        assert r["write_read_maxabs"] == 0.0 and r["write_deepspeed_maxabs"] == 0.0, r
        if "fp32" in name:
            assert r["step_rel_err"] < 1e-6, r
        else:  # bf16 parameters: the applied step is the written gradient up to bf16 rounding
            assert r["step_rel_err"] < 2e-2, r
    assert by["z2_bf16_acc32"]["storage"] == "torch.float32"  # the compact fp32 flat_partition
    assert by["z1_bf16_acc32"]["optimizer"] == "BF16_Optimizer"
    assert "BF16_Optimizer" in by["z1_bf16_acc32"]["refused"]
    assert "stage=0" in by["z0_fp32"]["refused"]


def test_adapter_single_rank(tmp_path):
    out = tmp_path / "adapter.json"
    run([sys.executable, HELPER, "--out", out, "--port", free_port()], timeout=300)
    _check(json.loads(out.read_text()))


def test_adapter_two_ranks(tmp_path):
    out = tmp_path / "adapter.json"
    run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", free_port(),
         HELPER, "--out", out], timeout=400)
    results = json.loads(out.read_text())
    _check(results)
    # Two ranks really split the gradient: each holds about half of the elements.
    from helpers.pergrad_common import make_model  # tests/ is on pytest.ini's pythonpath

    total = make_model().num_parameters()
    numel = {r["config"]: r["numel"] for r in results if "numel" in r}
    assert all(total / 2 <= n < total / 2 + 64 for n in numel.values()), (numel, total)
