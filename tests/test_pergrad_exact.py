"""Exactness of the sharded per-language step (megavac.pergrad) against a literal plain-PyTorch reference.

Launched runs (tests/helpers/pergrad_check.py) on 1 and 2 CPU ranks, ZeRO-1/2/3 in fp32: the
parameters after 3 SGD steps equal those of a reference that computes every language's FULL gradient
with separate backwards on a plain copy of the model, applies the method literally to the explicit
vectors (tests/reference_methods.py) with the random order the production method drew, and takes the
same step. The error is measured on the parameter DISPLACEMENT (θ_T − θ_0), which is the sum of the
updates, so 1e-5 there is far stricter than 1e-5 on θ. Monolithic weights through the Gram path must
give the plain path's parameters (Adam). Unit tests cover the group maps, the Gram/combine arithmetic
and the skip path (fp16 overflow) with a fake engine.
"""
from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, free_port, run
from megavac.pergrad.ds_adapter import Segment
from megavac.loss import LossTally
from megavac.methods import build_method
from megavac.model import ModelConfig, Transformer
from megavac.model.groups import build_groups
from megavac.pergrad import GradCollector, LanguageGrads, PerLanguageStep

HELPER = REPO / "tests" / "helpers" / "pergrad_check.py"
FP32_TOL = 1e-5
METHODS = ("pcgrad", "gradvac", "gradvac_lrl", "mgda", "cats", "gradnorm")


# ----------------------------------------------------------------------------------- group maps
def _model(pre_ln=True):
    return Transformer(ModelConfig(vocab_size=20, d_model=8, n_heads=2, enc_layers=2, dec_layers=3, d_ff=16,
                                   pre_ln=pre_ln))


def _names(pre_ln=True):
    return [n for n, _ in _model(pre_ln).named_parameters()]


def test_groups_per_granularity():
    names = _names()
    labels, of = build_groups(names, "whole_model")
    assert labels == ["model"] and (of == 0).all()
    labels, of = build_groups(names, "enc_dec")
    assert labels == ["embed", "encoder", "decoder"]
    by = dict(zip(names, (labels[i] for i in of.tolist())))
    assert by["embed.weight"] == "embed"  # tied: source/target embedding and output projection
    assert by["enc_norm.weight"] == "encoder" and by["dec_norm.bias"] == "decoder"
    assert by["encoder.1.ffn.fn.fc2.weight"] == "encoder" and by["decoder.2.cross_attn.fn.kv.bias"] == "decoder"
    labels, of = build_groups(names, "all_layer")
    assert labels == ["embed", "encoder.0", "encoder.1", "decoder.0", "decoder.1", "decoder.2",
                      "encoder.norm", "decoder.norm"]
    by = dict(zip(names, (labels[i] for i in of.tolist())))
    assert by["decoder.1.self_attn.norm.weight"] == "decoder.1" and by["enc_norm.bias"] == "encoder.norm"
    labels, of = build_groups(names, "all_matrix")
    assert labels == names and of.tolist() == list(range(len(names)))
    # Post-LN: the final norms are Identity (no parameters), so they form no group.
    assert "encoder.norm" not in build_groups(_names(pre_ln=False), "all_layer")[0]


def test_unknown_granularity_is_named():
    with pytest.raises(ValueError, match="'layer'"):
        build_groups(["embed.weight"], "layer")


# --------------------------------------------------------------- arithmetic with a fake engine
class FakePartition:
    """Stands in for ds_adapter.GradPartition: a local vector with padding and a segment map."""

    def __init__(self, names, sizes, pad_every=3):
        self.param_names = self.all_param_names = names
        self.segments, off = [], 0
        for i, n in enumerate(sizes):
            self.segments.append(Segment(off, n, i, 0))
            off += n + (2 if i % pad_every == 0 else 0)  # alignment padding after some parameters
        self.numel = off
        self.device = torch.device("cpu")
        self.written = None
        self.scale = 1.0
        self.boundary = None

    def dp_group(self):
        return None

    def gram_group(self):
        return None

    @property
    def gram_segments(self):
        return self.segments

    def step(self):
        self.force_boundary()
        self.engine_step()

    def loss_scale(self):
        return self.scale

    def write(self, flat):
        self.written = flat.clone()

    def force_boundary(self):
        self.boundary = True

    def release_boundary(self):
        self.boundary = None


class FakeCollector(GradCollector):
    def __init__(self, part, slices, present):
        self.partition, self.slices, self.present = part, slices, present
        K = slices.shape[0]
        self.loss_sums = torch.arange(1, K + 1, dtype=torch.float64) * 10.0
        self.tokens = torch.arange(1, K + 1, dtype=torch.float64) * 4.0

    def collect(self, batches):
        K = self.slices.shape[0]
        tally = LossTally(K)
        tally.sums[LossTally.LOSS] = self.loss_sums
        tally.sums[LossTally.TOKENS] = self.tokens
        return LanguageGrads(self.slices.clone(), torch.arange(K), self.present.clone(), tally)


def _fake_step(method, granularity="all_layer", K=3, seed=0, nonfinite=False, scale=1.0):
    names = _names()
    sizes = [p.numel() for p in _model().parameters()]
    part = FakePartition(names, sizes)
    part.scale = scale
    g = torch.Generator().manual_seed(seed)
    slices = torch.randn(K, part.numel, generator=g)
    pad = torch.ones(part.numel, dtype=torch.bool)
    for s in part.segments:
        pad[s.start:s.start + s.numel] = False
    slices[:, pad] = 0.0
    if nonfinite:
        slices[1, 5] = math.inf
    collector = FakeCollector(part, slices, torch.ones(K, dtype=torch.bool))
    engine = SimpleNamespace(gradient_accumulation_steps=lambda: 1, steps=0)

    def step():
        engine.steps += 1
        assert part.boundary is True  # step() must see an accumulation boundary

    engine.step = step
    part.engine_step = step
    pls = PerLanguageStep(engine, method, K, pad_id=0, label_smoothing=0.1, granularity=granularity,
                          collector=collector)
    return pls, part, slices, engine


def test_grams_and_combine_match_explicit_vectors():
    for granularity in ("whole_model", "enc_dec", "all_layer", "all_matrix"):
        pls, part, slices, engine = _fake_step(build_method("pcgrad", 3), granularity)
        gram = pls.group_grams(slices)
        w = torch.rand(pls.num_groups, 3, dtype=torch.float64) * 2 - 0.5
        out = pls.combine(slices, w)
        want_out = torch.zeros(part.numel, dtype=torch.float64)
        for gi in range(pls.num_groups):
            elems = torch.cat([torch.arange(s.start, s.start + s.numel) for s in part.segments
                               if int(pls.group_of_param[s.param]) == gi])
            x = slices[:, elems].double()
            # fp32 products of GRAM_CHUNK columns summed in fp64: fp32 accuracy, far inside the 1e-5 target.
            want = x @ x.T
            torch.testing.assert_close(gram[gi], want, rtol=2e-6, atol=2e-6 * float(want.abs().max()))
            want_out[elems] = w[gi] @ x
        torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-6)
        # Coarse Grams are sums of fine ones.
        fine = pls.collector.param_grams(slices)
        torch.testing.assert_close(gram.sum(0), fine.sum(0), rtol=1e-12, atol=1e-12)


class Recorder:
    """A method that records the Gram it was given and returns fixed weights."""

    name, num_langs, skipped = "recorder", 3, 0

    def __init__(self):
        self.seen = None

    def needs_gram(self, step):
        return True

    def weights(self, gram, ctx):
        self.seen = gram.clone()
        return torch.full(gram.shape[:2], 0.5, dtype=torch.float64)


def test_fp16_loss_scale_is_taken_out_of_the_gram_but_not_the_update():
    rec = Recorder()
    pls, part, slices, engine = _fake_step(rec, "whole_model", scale=8.0)
    pls.gram_step([None], step=0)
    x = slices.double()
    want = x @ x.T / 64.0  # fp32 products summed in fp64 (GRAM_CHUNK): fp32 accuracy
    torch.testing.assert_close(rec.seen[0], want, rtol=2e-6, atol=2e-6 * float(want.abs().max()))
    torch.testing.assert_close(part.written, 0.5 * slices.sum(0), rtol=1e-6, atol=1e-6)  # still × scale
    assert engine.steps == 1 and part.boundary is None


def test_method_sees_mean_token_losses_not_shares():
    # GradNorm's L_i(t)/L_i(0) needs each language's mean token loss: Σ token losses ÷ its tokens.
    rec = Recorder()
    seen = {}
    rec.weights = lambda gram, ctx: seen.setdefault("losses", ctx.losses.clone()) is not None and \
        torch.ones(gram.shape[:2], dtype=torch.float64)
    pls, part, slices, engine = _fake_step(rec, "whole_model")
    stats = pls.gram_step([None], step=0)
    want = torch.full((3,), 2.5, dtype=torch.float64)  # (10 k) / (4 k)
    torch.testing.assert_close(seen["losses"], want, rtol=0, atol=0)
    torch.testing.assert_close(stats.losses, want, rtol=0, atol=0)


def test_nonfinite_slice_skips_the_method_and_leaves_the_overflow_to_deepspeed():
    method = build_method("gradvac", 3, beta=0.5, langs="all")
    pls, part, slices, engine = _fake_step(method, "all_layer", nonfinite=True)
    stats = pls.gram_step([None], step=0)
    assert stats.skipped and method.skipped == 1
    assert method.ema is None  # no state touched
    assert not torch.isfinite(part.written).all()  # DeepSpeed's overflow check sees it and skips the step
    assert engine.steps == 1 and part.boundary is None
    # A finite step afterwards runs the method normally.
    pls2, part2, _, _ = _fake_step(method, "all_layer")
    assert not pls2.gram_step([None], step=1).skipped and method.ema is not None


def test_state_dict_round_trip_replays_the_random_order():
    a, _, _, _ = _fake_step(build_method("pcgrad", 3), seed=1)
    a.generator.manual_seed(7)
    a.gram_step([None], 0)
    state = a.state_dict()
    a.gram_step([None], 1)
    order_a = a.method.last_order.clone()
    b, _, _, _ = _fake_step(build_method("pcgrad", 3), seed=1)
    b.load_state_dict(state)
    b.gram_step([None], 1)
    assert torch.equal(order_a, b.method.last_order)
    with pytest.raises(ValueError, match="generator"):
        b.load_state_dict({"method": state["method"]})


# ------------------------------------------------------------------------------ launched runs
def _launch(tmp_path, world, stage, ga, *extra):
    out = tmp_path / f"w{world}_z{stage}_{len(extra)}.json"
    args = [HELPER, "--out", out, "--stage", stage, "--ga", ga, "--mono", *extra]
    if world == 1:
        run([sys.executable, *args, "--port", free_port()], timeout=300)
    else:
        run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", world, "--master_port", free_port(),
             *args], timeout=400)
    return {r["method"]: r for r in json.loads(out.read_text())}


def _assert_exact(res, world, stage, tol=FP32_TOL, pipeline_stages=1, collector="KBackwardCollector"):
    assert set(METHODS) <= set(res), sorted(res)
    for m in METHODS:
        r = res[m]
        assert r["world"] == world and r["stage"] == stage, r
        assert r["pipeline_stages"] == pipeline_stages, r
        want = "PipelineCollector" if pipeline_stages > 1 and collector == "KBackwardCollector" else collector
        assert r["collector"] == want, r
        assert r["displacement_rel_err"] < tol, r
        assert r["state_err"] < 100 * tol, r  # EMA targets, CATS α, GradNorm weights
        assert r["skipped"] == 0, r
    assert res["cats"]["gram_steps"] == 1  # meta step at step 1; steps 0 and 2 take the α-weighted plain path
    assert res["gradvac"]["groups"] > 50 and res["pcgrad"]["groups"] == 7 and res["cats"]["groups"] == 1
    mono = res["monolithic-vs-plain"]
    assert mono["param_rel_err"] < tol, mono
    assert mono["global_steps"][0] == mono["global_steps"][1]
    assert mono["micro_steps"][0] == mono["micro_steps"][1]  # the Gram path keeps DeepSpeed's micro-steps in phase


@pytest.mark.parametrize("stage,ga", [(1, 2), (2, 1), (3, 1)])
def test_exact_single_rank(tmp_path, stage, ga):
    _assert_exact(_launch(tmp_path, 1, stage, ga), 1, stage)


@pytest.mark.parametrize("stage,ga", [(1, 1), (2, 2), (3, 2)])
def test_exact_two_ranks(tmp_path, stage, ga):
    _assert_exact(_launch(tmp_path, 2, stage, ga), 2, stage)


@pytest.mark.parametrize("world,stage,ga,budget", [(1, 1, 2, 0), (1, 3, 1, 0), (2, 1, 1, 0), (2, 2, 2, 0), (2, 3, 2, 0),
                                                  (2, 2, 2, 3000)])
def test_one_backward_collector_is_exact(tmp_path, world, stage, ga, budget):
    """The one-backward collector (per-language weight gradients split out of ONE backward, reduced into
    this rank's ZeRO fragments as the backward proceeds) against the same literal reference. A budget
    of 3000 elements makes every matrix take the chunked path (a few languages at a time, the tied
    embedding reduced once per use)."""
    res = _launch(tmp_path, world, stage, ga, "--collector", "one_backward", "--budget", budget)
    _assert_exact(res, world, stage, collector="OneBackwardCollector")


@pytest.mark.parametrize("world,stage,ga", [(1, 2, 2), (2, 1, 2), (2, 2, 1), (2, 3, 2)])
def test_one_backward_exact_with_language_affine_batches_and_dropout(tmp_path, world, stage, ga):
    """Language-affine dealing (one language per micro-batch: each language on one rank and in one
    micro-batch of the step, others absent, a two-language leftover batch on odd steps), dropout 0.1 and
    label smoothing on. The all-to-all then sends each rank's held languages only; the reference
    reproduces the dropout masks from the seed each micro-batch's forward starts from."""
    res = _launch(tmp_path, world, stage, ga, "--collector", "one_backward", "--pattern", "affine",
                  "--dropout", 0.1)
    _assert_exact(res, world, stage, collector="OneBackwardCollector")


@pytest.mark.parametrize("collector", ["k_backward", "one_backward"])
@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_close_to_the_fp32_reference(tmp_path, stage, collector):
    """bf16 (ZeRO-2 and ZeRO-3 with fp32 gradient accumulation): the same path, to bf16 accuracy."""
    out = tmp_path / "bf16.json"
    run([sys.executable, HELPER, "--out", out, "--stage", stage, "--methods", "pcgrad,gradvac", "--precision", "bf16",
         "--collector", collector, "--port", free_port()], timeout=300)
    for r in json.loads(out.read_text()):
        assert r["displacement_rel_err"] < 5e-2, r


@pytest.mark.parametrize("world,ga", [(2, 2), (4, 1)])
def test_exact_under_pipeline_parallelism(tmp_path, world, ga):
    """2 pipeline stages × 1 and × 2 data-parallel ranks (ZeRO-1): each stage captures its own slice of
    every language's gradient, the Grams are summed over the data-parallel AND pipeline ranks with the
    tied embedding counted once, and every method equals the literal reference on the whole model."""
    res = _launch(tmp_path, world, 1, ga, "--pipeline-stages", 2)
    _assert_exact(res, world, 1, pipeline_stages=2)
    # One backward inside the stages (plain micro-batches, weight gradients split by language).
    res1 = _launch(tmp_path, world, 1, ga, "--pipeline-stages", 2, "--collector", "one_backward")
    _assert_exact(res1, world, 1, pipeline_stages=2, collector="PipelineOneBackwardCollector")
    # The pipelined model's loss equals the plain model's on the same batches and weights.
    loss = res["pipeline-loss"]
    assert loss["last_stage_ranks"] == world // 2, loss
    assert loss["eval_rel_err"] < 1e-6 and loss["train_rel_err"] < 1e-6, loss
