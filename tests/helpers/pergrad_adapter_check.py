"""Check megavac.pergrad.ds_adapter against DeepSpeed's public gradient accessors, per ZeRO configuration.

Launch with ``deepspeed --num_gpus N tests/helpers/pergrad_adapter_check.py --out OUT.json`` or run
directly for one in-process rank. For each configuration, on a tiny model:

1. one forward, then a backward of language 0's share and (retained graph) of language 1's share, each
   at a forced boundary, ``zero_()`` after each; ``read()`` must equal, element for element,
   DeepSpeed's own view of the reduced gradient: ``safe_get_full_grad`` (ZeRO-1/2, sliced by the
   adapter's segment map) or ``safe_get_local_grad`` (ZeRO-3); fp32 configurations must also match the
   plain-PyTorch reference gradient of that language alone;
2. after ``zero_()`` a read gives all zeros;
3. ``write(v)`` then read: v (exactly when DeepSpeed stores fp32, bf16-rounded otherwise), and
   DeepSpeed's accessor sees v too;
4. ``engine.step()`` with SGD applies exactly −lr · v (fp32 parameters);
5. the configurations the adapter refuses raise ValueError naming the reason.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# tests/helpers/ (this script's folder) is on sys.path when run as a script.
from pergrad_common import (PAD, SMOOTHING, clone_model, ds_config, init_dist, make_batch, make_model,
                            reference_grads)

from megavac.pergrad.ds_adapter import grad_partition
from megavac.loss import per_language_losses

CONFIGS = {
    "z1_fp32": dict(stage=1),
    "z2_fp32": dict(stage=2),
    "z3_fp32": dict(stage=3),
    "z2_bf16_acc32": dict(stage=2, precision="bf16", grad_accum_fp32=True),
    "z2_bf16": dict(stage=2, precision="bf16"),
    "z1_bf16": dict(stage=1, precision="bf16"),
    "z3_bf16": dict(stage=3, precision="bf16"),
    "z3_bf16_acc32": dict(stage=3, precision="bf16", grad_accum_fp32=True),
    "z1_fp32_noncontig": dict(stage=1, zero_extra={"contiguous_gradients": False}),
    "z2_fp32_noncontig": dict(stage=2, zero_extra={"contiguous_gradients": False}),
    "z2_fp32_overlap": dict(stage=2, zero_extra={"overlap_comm": True}),
    "z3_fp32_persist": dict(stage=3, zero_extra={"stage3_param_persistence_threshold": 10_000}),
    "z2_fp32_2groups": dict(stage=2, groups=2),  # two optimizer param groups: two flat partitions per rank
    "z3_fp32_2groups": dict(stage=3, groups=2),
}
REFUSED = {
    "z1_bf16_acc32": dict(stage=1, precision="bf16", grad_accum_fp32=True),  # BF16_Optimizer
    "z0_fp32": dict(stage=0),
}
LR = 0.1
K = 3


def ds_view(engine, part, stage):
    """DeepSpeed's public view of this rank's slice, laid out as the adapter's local vector."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    out = torch.zeros(part.numel, dtype=torch.float64)
    params = list(engine.module.parameters())
    if stage == 3:
        local = {i: safe_get_local_grad(p) for i, p in enumerate(params)}
    else:  # a collective per parameter: every rank asks for every parameter, in the same order
        full = {i: safe_get_full_grad(p) for i, p in enumerate(params)}
    for s in part.segments:
        if stage == 3:
            src = local[s.param].reshape(-1)[:s.numel]
        else:
            src = full[s.param].reshape(-1)[s.offset:s.offset + s.numel]
        out[s.start:s.start + s.numel] = src.double()
    return out


def full_params(engine, stage):
    import deepspeed

    params = list(engine.module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().double().clone() for p in params]
    return [p.detach().double().clone() for p in params]


def check(name, cfg_kw, rank, world):
    import deepspeed

    cfg_kw = dict(cfg_kw)
    groups = cfg_kw.pop("groups", 1)
    model = make_model(0)
    ref_model = clone_model(model)
    cfg = ds_config(world=world, optimizer="client", **cfg_kw)
    cfg["zero_allow_untested_optimizer"] = True
    params = list(model.parameters())
    if groups == 2:  # matrices / vectors, as weight-decay setups split them
        params = [{"params": [p for p in params if p.dim() > 1]}, {"params": [p for p in params if p.dim() <= 1]}]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=LR), config=cfg)
    stage = cfg_kw["stage"]
    part = grad_partition(engine)
    res = {"config": name, "optimizer": type(engine.optimizer).__name__, "storage": str(part.storage_dtype),
           "numel": part.numel, "segments": len(part.segments)}
    # Every local element outside the segments must be padding, and segments must cover each
    # parameter's elements exactly once across ranks.
    covered = torch.zeros(len(part.param_names), dtype=torch.float64)
    for s in part.segments:
        covered[s.param] += s.numel
    if torch.distributed.is_initialized() and world > 1:
        torch.distributed.all_reduce(covered)
    sizes = torch.tensor([float(p.ds_numel if stage == 3 else p.numel()) for p in engine.module.parameters()])
    res["coverage_ok"] = bool((covered == sizes).all())

    batches = [[make_batch(r, 0, 0, list(range(K)))] for r in range(world)]
    b = batches[rank][0]
    logits = engine(b.src, b.tgt_in)
    loss_k, _, _ = per_language_losses(logits, b.tgt_out, b.lang, K, PAD, SMOOTHING)
    grads = reference_grads(ref_model, batches, K, 1)[0] if "precision" not in cfg_kw else None
    # Two languages through one forward: the second backward runs on the retained graph after the
    # slice was zeroed, and must yield language 1's gradient alone (nothing left over from language 0).
    snapshot = None
    for k in (0, 1):
        part.force_boundary()
        if k == 0:
            snapshot = part.snapshot_backward_hooks()
        else:
            part.rearm_backward_hooks(snapshot)
        engine.backward(loss_k[k], retain_graph=k == 0)
        got = part.read().double()
        res[f"read{k}_vs_deepspeed_maxabs"] = float((got - ds_view(engine, part, stage)).abs().max())
        res[f"read{k}_norm"] = float(got.norm())
        if grads is not None:
            want = torch.zeros(part.numel, dtype=torch.float64)
            for s in part.segments:
                full = grads[part.param_names[s.param]][k].reshape(-1)
                want[s.start:s.start + s.numel] = full[s.offset:s.offset + s.numel]
            res[f"read{k}_vs_reference_rel"] = float((got - want).norm() / want.norm())
        part.zero_()
        res[f"zeroed{k}_maxabs"] = float(part.read().abs().max())
    g = torch.Generator().manual_seed(rank)
    v = torch.randn(part.numel, generator=g)
    pad = part.segment_param_index() < 0
    v[pad] = 0.0  # padding stays zero
    part.write(v)
    expect = v.to(part.storage_dtype).double()
    res["write_read_maxabs"] = float((part.read().double() - expect).abs().max())
    res["write_deepspeed_maxabs"] = float((ds_view(engine, part, stage) - expect).abs().max())
    before = full_params(engine, stage)
    engine.step()
    part.release_boundary()
    after = full_params(engine, stage)
    # Gather the written vector per parameter to predict the SGD step −lr·v.
    delta_pred = [torch.zeros_like(p) for p in before]
    for s in part.segments:
        delta_pred[s.param].view(-1)[s.offset:s.offset + s.numel] = -LR * expect[s.start:s.start + s.numel]
    if torch.distributed.is_initialized() and world > 1:
        for d in delta_pred:
            torch.distributed.all_reduce(d)
    num = sum(float((a - b0 - d).pow(2).sum()) for a, b0, d in zip(after, before, delta_pred)) ** 0.5
    den = sum(float(d.pow(2).sum()) for d in delta_pred) ** 0.5
    res["step_rel_err"] = num / den
    return res


def refused(name, cfg_kw, world):
    import deepspeed

    model = make_model(0)
    cfg = ds_config(world=world, **cfg_kw)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    try:
        grad_partition(engine)
    except ValueError as e:
        return {"config": name, "refused": str(e), "optimizer": type(engine.optimizer).__name__}
    return {"config": name, "refused": None, "optimizer": type(engine.optimizer).__name__}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--refused", default=",".join(REFUSED))
    ap.add_argument("--port", default="29518")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    rank, world = init_dist(args.port)
    out = [check(n, CONFIGS[n], rank, world) for n in args.configs.split(",") if n]
    out += [refused(n, REFUSED[n], world) for n in args.refused.split(",") if n]
    if rank == 0:
        Path(args.out).write_text(json.dumps(out, indent=1))
        for r in out:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
