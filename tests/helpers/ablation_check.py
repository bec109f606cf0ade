"""The one-backward collector on a model with family experts (and one without LayerNorm gains/biases),
against per-language gradients from plain autograd on an explicit copy of the model.

Run as one process (one rank; it provides the rendezvous variables the launcher would):
``python tests/helpers/ablation_check.py --out OUT.json --port P``. For each ZeRO stage of --stages and
each model of the plan it builds a DeepSpeed engine, collects one step's per-language gradient slices
with ``OneBackwardCollector`` (ga 2, every language in every micro-batch), maps the slices back to the
parameters (``GradPartition.segments``) and writes, per case: the largest relative error against the
reference, and for the expert parameters the largest absolute value of a language's gradient on the
copies of OTHER families (collector and reference; both must be exactly 0) and the smallest norm on its
own family's copy (must be > 0).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
from pergrad_common import MODEL, PAD, SMOOTHING, ds_config, init_dist, make_batch

from megavac.loss import per_language_losses
from megavac.model import ModelConfig, Transformer

K, GA = 4, 2
FAMILIES = [0, 1, 0, 1]  # languages 0, 2 in family "A"; 1, 3 in "B"
PLAN = {
    "experts": dict(expert_modules="ffn,attn,output", families=FAMILIES, family_names=["A", "B"]),
    "no_layernorm_affine": dict(layernorm_affine=False),
}
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def make(extra: dict) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**MODEL, **extra}))


def reference(model, batches) -> dict[str, torch.Tensor]:
    """{name: fp64 [K, numel]}: each language's gradient, mean of ∇(loss share_k) over the micro-batches
    (÷ ga, as DeepSpeed scales), by one plain backward per (micro-batch, language)."""
    out = {n: torch.zeros(K, p.numel(), dtype=torch.float64) for n, p in model.named_parameters()}
    for b in batches:
        for k in range(K):
            model.zero_grad(set_to_none=True)
            loss_k, _, _ = per_language_losses(model(b.src, b.tgt_in, b.lang), b.tgt_out, b.lang, K, PAD, SMOOTHING)
            loss_k[k].backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    out[n][k] += p.grad.double().flatten() / GA
    return out


def check(name: str, extra: dict, stage: int) -> dict:
    import deepspeed

    from megavac.pergrad.one_backward import OneBackwardCollector

    model, ref_model = make(extra), make(extra)
    names = [n for n, _ in model.named_parameters()]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(stage, 1, ga=GA))
    batches = [make_batch(0, 0, m, list(range(K))) for m in range(GA)]
    collector = OneBackwardCollector(engine, K, PAD, SMOOTHING)
    grads = collector.collect(batches)
    assert grads.langs.tolist() == list(range(K)), grads.langs
    got = {n: torch.zeros(K, int(getattr(p, "ds_numel", p.numel())), dtype=torch.float64)
           for n, p in engine.module.named_parameters()}
    for s in collector.partition.segments:
        got[names[s.param]][:, s.offset:s.offset + s.numel] = grads.slices[:, s.start:s.start + s.numel].double()
    want = reference(ref_model, batches)
    num = max(float((got[n] - want[n]).abs().max()) for n in names)
    den = max(float(want[n].abs().max()) for n in names)
    res = {"case": name, "stage": stage, "rel_err": num / den, "params": names,
           "collector": type(collector).__name__}
    if extra.get("expert_modules"):
        other, other_ref, own = 0.0, 0.0, float("inf")
        for n in names:
            m = _EXPERT.search(n)
            if not m:
                continue
            f = int(m.group(1))
            for k in range(K):
                if FAMILIES[k] == f:
                    own = min(own, float(got[n][k].norm()))
                else:
                    other = max(other, float(got[n][k].abs().max()))
                    other_ref = max(other_ref, float(want[n][k].abs().max()))
        zero3 = [m._zero3() for m in engine.module.modules() if hasattr(m, "_zero3")]
        res.update(other_family_max=other, other_family_max_reference=other_ref, own_family_min_norm=own,
                   zero3_detected=all(zero3) and bool(zero3))
        # No-grad forward (validation) runs every family's copy under ZeRO-3, its own rows' copies otherwise:
        # the logits agree either way.
        with torch.no_grad():
            b = batches[0]
            engine.eval()
            a = engine(b.src, b.tgt_in, b.lang)
            engine.train()
            with torch.enable_grad():
                c = engine(b.src, b.tgt_in, b.lang)
        res["nograd_vs_grad_logits"] = float((a - c).detach().abs().max())
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--port", default="29531")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    init_dist(args.port)
    out = [check(name, extra, int(stage)) for stage in args.stages.split(",") for name, extra in PLAN.items()]
    Path(args.out).write_text(json.dumps(out, indent=1))
    for r in out:
        print(json.dumps({k: v for k, v in r.items() if k != "params"}), flush=True)


if __name__ == "__main__":
    main()
    sys.stdout.flush()  # then skip the teardown that can abort on gloo's threads (as launch/train.py does)
    os._exit(0)
