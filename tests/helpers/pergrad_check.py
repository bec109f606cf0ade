"""Exactness check of the sharded per-language step against a plain-PyTorch literal reference.

Launch with ``deepspeed --num_gpus N tests/helpers/pergrad_check.py --out OUT.json ...`` (N CPU ranks),
or run directly for one in-process rank. For every method in --methods it trains a fresh DeepSpeed
engine for --steps steps through ``PerLanguageStep.run`` and, beside it, a plain copy of the model:

* the reference computes each language's FULL gradient with one backward per (rank's batch,
  micro-batch, language) on the copy, as DeepSpeed defines the reduced one (mean over ranks, ÷ ga);
* applies the method LITERALLY on the explicit vectors of each group (tests/reference_methods.py),
  replaying the random visiting order the production method drew (``last_order``);
* and takes the same optimizer step (SGD: the parameter displacement is then exactly lr × Σ updates).

With ``--pipeline-stages S`` the engine is megavac's pipeline form of the same model (S stages ×
N/S data-parallel ranks, ZeRO-0/1) and the reference uses the N/S data-parallel ranks' batches.

Rank 0 writes, per method, the relative error of the parameter displacement after all steps, and of
the method's state. --mono additionally compares monolithic weights through the Gram path with the
plain path (``engine.backward(loss); engine.step()``) under Adam, after the same steps.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# tests/helpers/ (this script's folder) is on sys.path when run as a script; tests/ is on PYTHONPATH
# (conftest.launch_env, as pytest.ini's pythonpath): by hand, PYTHONPATH=tests deepspeed ...
import reference_methods as ref_methods
from pergrad_common import (PAD, SMOOTHING, clone_model, ds_config, init_dist, langs_for, make_batch, make_model,
                            reference_grads)

from megavac.loss import per_language_losses
from megavac.methods import build_method
from megavac.model.groups import build_groups
from megavac.pergrad import PerLanguageStep

# method -> (granularity, options): the granularities are spread over the methods so that every one
# of them meets the sharded path once.
PLAN = {
    "pcgrad": ("all_layer", {}),
    "gradvac": ("all_matrix", {"beta": 0.5, "langs": "all"}),  # a large β so the EMA targets matter within 3 steps
    "gradvac_lrl": ("enc_dec", {"beta": 0.5, "langs": "lrl", "sizes": [10, 1000, 20, 5000],
                                "size_threshold": 100}),
    "mgda": ("enc_dec", {}),
    "cats": ("whole_model", {"alpha_lr": 0.5, "warm_interval": 2}),
    "gradnorm": ("all_layer", {"lr": 0.5}),
}
LR = 0.05


def batches_for(step, world, ga, K, pattern):
    return [[make_batch(r, step, m, langs_for(r, step, m, K, pattern, world)) for m in range(ga)] for r in range(world)]


def seed_of(step: int):
    """The torch seed before the forward of (rank, micro-batch) in ``step``: dropout masks the reference
    can reproduce."""
    return lambda rank, micro: 1000 * step + 10 * rank + micro


def full_params(engine, stage):
    import deepspeed

    if hasattr(engine.module, "plain_state_dict"):  # pipeline: every stage's parameters, plain names
        import torch.distributed as dist

        mine = {n: p.detach().double().clone() for n, p in engine.module.plain_state_dict().items()}
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        out = {}
        for part in parts:
            for n, t in part.items():
                if n in out:  # the tied embedding, on the first and last stage: copies must agree
                    assert torch.equal(out[n], t), n
                out[n] = t
        return out
    params = list(engine.module.named_parameters())
    if engine.bfloat16_enabled():  # the fp32 master weights: bf16 copies would be mostly rounding
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).double().clone() for n, p in params}
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().double().clone() for n, p in params}
    return {n: p.detach().double().clone() for n, p in params}


def pipelined(model, stages, K):
    """``model`` itself, or its pipeline form with the same weights (``stages`` > 1)."""
    if stages == 1:
        return model
    from megavac.model.pipeline import PipelineLoss, make_pipeline_module

    pipe = make_pipeline_module(model.cfg, stages, PipelineLoss(K, PAD, SMOOTHING))
    pipe.load_plain_state_dict(model.state_dict())
    return pipe


def make_engine(model, stage, world, ga, optimizer, precision="fp32"):
    """``world``: the data-parallel degree."""
    import deepspeed

    # Adam's eps 1e-6 rather than 1e-8: Adam's first steps are ~lr·sign(g), so with a tiny eps an
    # element whose gradient is ~1e-9 (rounding level) would turn fp32 summation-order noise into
    # lr-sized parameter differences, which says nothing about the gradients compared.
    cfg = ds_config(stage, world, ga=ga, optimizer="Adam" if optimizer == "adam" else "client", adam_eps=1e-6,
                    precision=precision, grad_accum_fp32=precision != "fp32")
    if optimizer == "sgd":
        cfg["zero_allow_untested_optimizer"] = True
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    else:
        cfg["optimizer"]["params"]["lr"] = 1e-2
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def rel(a: dict, b: dict, base: dict | None = None) -> float:
    """‖a − b‖ / ‖b − base‖ over all parameters (base None: / ‖b‖)."""
    num = sum(float((a[n] - b[n]).pow(2).sum()) for n in b) ** 0.5
    den = sum(float((b[n] - (base[n] if base else 0)).pow(2).sum()) for n in b) ** 0.5
    return num / max(den, 1e-300)


class Reference:
    """The literal algorithm of one method on explicit per-group gradient vectors."""

    def __init__(self, name, K, granularity, opts, names):
        self.name, self.K = name, K
        self.kind = name.split("_")[0]
        self.group_names, of_param = build_groups(names, granularity)
        self.members = [[n for n, g in zip(names, of_param.tolist()) if g == gi] for gi in range(len(self.group_names))]
        G = len(self.group_names)
        if self.kind == "gradvac":
            self.ema = [[[0.0] * K for _ in range(K)] for _ in range(G)]
            self.beta = opts.get("beta", 1e-2)
            if opts.get("langs", "all") == "all":
                self.subset = [True] * K
            else:
                self.subset = [s < opts["size_threshold"] for s in opts["sizes"]]
        if self.kind == "cats":
            self.cats = ref_methods.CATSRef(K, alpha_lr=opts["alpha_lr"], warm_interval=opts["warm_interval"])
        if self.kind == "gradnorm":
            self.gn = ref_methods.GradNormRef(K, lr=opts["lr"])

    def updates(self, grads, present, step, order, losses):
        """{name: update tensor} for one step."""
        groups = [torch.cat([grads[n].reshape(self.K, -1) for n in mem], 1) for mem in self.members]
        if self.kind == "pcgrad":
            out = ref_methods.pcgrad(groups, present, order)
        elif self.kind == "gradvac":
            out = ref_methods.gradvac(groups, present, order, self.ema, self.beta, self.subset)
        elif self.kind == "mgda":
            out = ref_methods.mgda(groups, present)
        elif self.kind == "cats":
            out = self.cats.step(groups, present, step)
        elif self.kind == "gradnorm":
            out = self.gn.step(groups, present, losses.tolist())
        else:  # monolithic
            out = [g.sum(0) for g in groups]
        upd = {}
        for mem, vec in zip(self.members, out):
            off = 0
            for n in mem:
                numel = grads[n][0].numel()
                upd[n] = vec[off:off + numel].view(grads[n].shape[1:])
                off += numel
        return upd

    def state_error(self, method) -> float:
        if self.kind == "gradvac":
            ema = torch.tensor(self.ema, dtype=torch.float64)
            return float((method.ema.cpu() - ema).abs().max())
        if self.kind == "cats":
            return float((method.alpha - torch.tensor(self.cats.alpha, dtype=torch.float64)).abs().max())
        if self.kind == "gradnorm":
            return float((method.w - torch.tensor(self.gn.w, dtype=torch.float64)).abs().max())
        return 0.0


def check_method(name, args, rank, world):
    K, ga = args.K, args.ga
    granularity, opts = PLAN[name]
    model = make_model(0, args.dropout)
    if args.precision == "bf16":  # DeepSpeed starts from the bf16-rounded weights: so does the reference
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    ref_model = clone_model(model)
    names = [n for n, _ in model.named_parameters()]
    theta0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    dp = world // args.pipeline_stages
    engine = make_engine(pipelined(model, args.pipeline_stages, K), args.stage, dp, ga, "sgd", args.precision)
    rank = dp_rank(engine)
    method = build_method(name.split("_")[0], K, **opts)
    step_fn = PerLanguageStep(engine, method, K, pad_id=PAD, label_smoothing=SMOOTHING, granularity=granularity,
                              collector=args.collector,
                              seed=1234)
    ref = Reference(name, K, granularity, opts, names)
    gram_steps = skipped = 0
    seeds = []
    if args.dropout:  # each micro-batch's one forward draws its masks from a known seed
        assert args.pipeline_stages == 1, "--dropout: plain engines only"
        def reseed(*_):  # returns None: a pre-hook's return value would replace the forward's inputs
            torch.manual_seed(seeds.pop(0))

        engine.module.register_forward_pre_hook(reseed)
    for step in range(args.steps):
        batches = batches_for(step, dp, ga, K, args.pattern)
        seeds[:] = [seed_of(step)(rank, m) for m in range(ga)]
        stats = step_fn.run(batches[rank], step)
        assert not args.dropout or not seeds, "a micro-batch was not forwarded exactly once"
        gram_steps += stats.gram_step
        skipped += stats.skipped
        grads, losses = reference_grads(ref_model, batches, K, ga, seed_of(step) if args.dropout else None)
        present = [any(k in b.segments for bs in batches for b in bs) for k in range(K)]
        order = method.last_order.tolist() if getattr(method, "last_order", None) is not None else None
        upd = ref.updates(grads, present, step, order, losses)
        with torch.no_grad():
            for n, p in ref_model.named_parameters():
                p -= LR * upd[n].to(p.dtype)
    got = full_params(engine, args.stage)
    want = {n: p.detach().double() for n, p in ref_model.named_parameters()}
    return {"method": name, "optimizer": type(engine.optimizer).__name__, "stage": step_fn.partition.stage,
            "world": world, "pipeline_stages": args.pipeline_stages, "collector": type(step_fn.collector).__name__, "granularity": granularity, "groups": step_fn.num_groups,
            "displacement_rel_err": rel(got, want, theta0), "param_rel_err": rel(got, want),
            "state_err": ref.state_error(method), "gram_steps": gram_steps, "skipped": skipped}


def check_mono(args, rank, world, optimizer="adam"):
    """Monolithic weights through the Gram path vs the plain path, both under Adam."""
    K, ga = args.K, args.ga
    results = {}
    dp = world // args.pipeline_stages
    for path in ("gram", "plain"):
        model = pipelined(make_model(0), args.pipeline_stages, K)
        engine = make_engine(model, args.stage, dp, ga, optimizer, args.precision)
        rank = dp_rank(engine)
        step_fn = PerLanguageStep(engine, build_method("monolithic", K), K, pad_id=PAD, label_smoothing=SMOOTHING,
                                  granularity="all_layer")
        for step in range(args.steps):
            batches = batches_for(step, dp, ga, K, args.pattern)[rank]
            if path == "gram":
                step_fn.gram_step(batches, step)
            elif args.pipeline_stages > 1:  # the trainer's plain pipeline step
                step_fn.plain(batches, torch.ones(K))
            else:  # the trainer's plain loop, verbatim
                for b in batches:
                    logits = engine(b.src, b.tgt_in)
                    loss_k, _, _ = per_language_losses(logits, b.tgt_out, b.lang, K, PAD, SMOOTHING)
                    engine.backward(loss_k.sum())
                    engine.step()
        results[path] = full_params(engine, args.stage)
        results[path + "_steps"] = engine.global_steps
        results[path + "_micro"] = engine.micro_steps
    theta0 = {n: p.detach().double() for n, p in make_model(0).named_parameters()}
    return {"method": "monolithic-vs-plain", "param_rel_err": rel(results["gram"], results["plain"]),
            "displacement_rel_err": rel(results["gram"], results["plain"], theta0),
            "global_steps": [results["gram_steps"], results["plain_steps"]],
            "micro_steps": [results["gram_micro"], results["plain_micro"]]}


def check_pipeline_loss(args, world):
    """The pipelined model's per-language losses on each data-parallel rank's batches equal the plain
    model's with the same weights (evaluation and the first training step's forward)."""
    import torch.distributed as dist

    from megavac.model.pipeline import PipelineRunner

    K, dp = args.K, world // args.pipeline_stages
    plain = make_model(0)
    engine = make_engine(pipelined(make_model(0), args.pipeline_stages, K), args.stage, dp, args.ga, "adam")
    rank = dp_rank(engine)
    batches = batches_for(0, dp, args.ga, K, args.pattern)[rank]
    runner = PipelineRunner(engine)
    got_eval = runner.eval_tally(batches).sums.cpu()
    got_train = runner.train_batch(batches).sums.cpu()
    want = torch.zeros(3, K, dtype=torch.float64)
    with torch.no_grad():
        for b in batches:
            loss_k, nll_k, ntok_k = per_language_losses(plain(b.src, b.tgt_in), b.tgt_out, b.lang, K, PAD, SMOOTHING)
            want += torch.stack([(loss_k * b.ntokens).double(), nll_k.double(), ntok_k.double()])
    want_train = want
    last = engine.is_last_stage()
    err = torch.tensor([float((got_eval - want).abs().max() / want.abs().max()) if last else 0.0,
                        float((got_train - want_train).abs().max() / want_train.abs().max()) if last else 0.0,
                        float(last)], dtype=torch.float64)
    dist.all_reduce(err)
    return {"method": "pipeline-loss", "eval_rel_err": float(err[0]), "train_rel_err": float(err[1]),
            "last_stage_ranks": int(err[2]), "world": world, "pipeline_stages": args.pipeline_stages}


def dp_rank(engine) -> int:
    grid = getattr(engine, "grid", None)
    if grid is not None:
        return int(grid.data_parallel_id)
    import torch.distributed as dist

    return dist.get_rank()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--methods", default=",".join(PLAN))
    ap.add_argument("--mono", action="store_true")
    ap.add_argument("--mono-optimizer", default="adam", choices=["adam", "sgd"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ga", type=int, default=1)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--pattern", default="mixed", choices=["all", "mixed", "affine"])
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--pipeline-stages", type=int, default=1)
    ap.add_argument("--collector", default="k_backward", choices=["k_backward", "one_backward"])
    ap.add_argument("--budget", type=int, default=0, help="one_backward.BUDGET (elements); 0 keeps it")
    ap.add_argument("--port", default="29517")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    rank, world = init_dist(args.port)
    if args.budget:
        from megavac.pergrad import one_backward

        one_backward.BUDGET = args.budget
    out = []
    for name in [m for m in args.methods.split(",") if m]:
        out.append(check_method(name, args, rank, world))
    if args.mono:
        out.append(check_mono(args, rank, world, args.mono_optimizer))
    if args.pipeline_stages > 1:
        out.append(check_pipeline_loss(args, world))
    if rank == 0:
        Path(args.out).write_text(json.dumps(out, indent=1))
        for r in out:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
