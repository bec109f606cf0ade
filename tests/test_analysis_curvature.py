"""Per-language curvature (megavac/analysis/curvature.py): power iteration against the dense Hessian, the
command on two checkpoints of a real 2-step run, and its one-line errors. No mocks: real models, real data
prepared by data_pipeline, a real run of launch/train.py."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run, write_two_pair_corpus
from megavac.analysis import curvature
from megavac.analysis.curvature import (fixed_examples, language_batches, plot, power_iteration, top_eigenvalue,
                                        _sdpa_math)
from megavac.data import Batch, MultilingualDataset
from megavac.loss import token_losses
from megavac.model import ModelConfig, Transformer

PREFIX = "python -m megavac.analysis curvature: error: "


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models on 2 shared cores: a second intra-op thread only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(*argv) -> int:
    """The command as ``python -m megavac.analysis curvature ...`` runs it, in this process."""
    argv = [str(a) for a in argv]
    try:
        from megavac.analysis.__main__ import main
        return main(["curvature", *argv])
    except ModuleNotFoundError as e:  # the other analysis commands are not there yet: the same dispatch, alone
        if not (e.name or "").startswith("megavac.analysis."):
            raise
    ap = argparse.ArgumentParser(prog="python -m megavac.analysis curvature")
    curvature.add_args(ap)
    try:
        return curvature.run(ap.parse_args(argv)) or 0
    except ValueError as e:
        print(f"{PREFIX}{e}", file=sys.stderr)
        return 2


def one_error_line(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith(PREFIX)]
    assert len(lines) == 1, lines
    return lines[0][len(PREFIX):]


def dense_top(f, flat: torch.Tensor) -> float:
    """The eigenvalue of largest magnitude of the dense Hessian of ``f`` at ``flat``."""
    H = torch.autograd.functional.hessian(f, flat).double()
    assert torch.allclose(H, H.T, atol=1e-5)
    ev = torch.linalg.eigvalsh((H + H.T) / 2)
    return ev[ev.abs().argmax()].item()


def functional_loss(model, names, params, batches, smoothing, total):
    """The mean per-token label-smoothed loss as a function of the flat vector of ``names``' parameters
    (written here from megavac.loss.token_losses, independently of the module's own loss)."""
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def f(flat):
        swap = dict(zip(names, [t.view(s) for t, s in zip(flat.split(sizes), shapes)]))
        loss = 0.0
        with _sdpa_math():
            for b in batches:
                logits = torch.func.functional_call(model, swap, (b.src, b.tgt_in))
                loss = loss + token_losses(logits, b.tgt_out, model.cfg.pad_id, smoothing)[0].sum()
        return loss / total

    return f, torch.cat([p.detach().reshape(-1) for p in params])


# ---------------------------------------------------------------- the estimate


def test_power_iteration_equals_the_dense_hessian_top_eigenvalue_all_parameters():
    """A 496-parameter Transformer (every parameter, the tied embedding included): power iteration on HVPs
    gives the dense Hessian's eigenvalue of largest magnitude. Here it is negative, and power iteration
    finds it with its sign."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=12, d_model=4, n_heads=2, enc_layers=1, dec_layers=1, d_ff=8, dropout=0.1,
                      max_positions=16)
    model = Transformer(cfg).train()  # top_eigenvalue must switch dropout off itself
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(3, 12, (6, 7), generator=g), torch.randint(3, 12, (6, 7), generator=g)
    src[0, 5:] = 0
    tgt[1, 4:] = 0
    tgt_in, tgt_out = tgt[:, :-1].clone(), tgt[:, 1:].clone()
    batch = Batch(src, tgt_in, tgt_out, torch.zeros(6, dtype=torch.long), {0: (0, 6)}, int((tgt_out != 0).sum()))
    names, params = zip(*model.named_parameters())
    assert sum(p.numel() for p in params) == 496

    est = top_eigenvalue(model, [batch], 0.1, iters=2000, tol=1e-9, seed=0)
    assert model.training  # left as it was
    model.eval()
    want = dense_top(*functional_loss(model, names, params, [batch], 0.1, batch.ntokens))
    assert est["converged"] and want < 0
    assert est["eigenvalue"] == pytest.approx(want, rel=1e-3)
    # The default stopping rule (--tol 1e-3) lands within a few 1e-3 of it too.
    quick = top_eigenvalue(model, [batch], 0.1, iters=500, tol=1e-3, seed=0)
    assert quick["converged"] and quick["eigenvalue"] == pytest.approx(want, rel=1e-2)


@pytest.mark.skipif("expert_modules" not in ModelConfig.__dataclass_fields__, reason="no family experts in this tree")
def test_family_experts_route_by_the_training_index_and_match_dense():
    """With family FFN experts a language's rows go through its family's copy (lang_index, training order):
    the other copy has zero curvature, and power iteration still equals the dense Hessian's top eigenvalue."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=12, d_model=4, n_heads=2, enc_layers=1, dec_layers=1, d_ff=8, max_positions=16,
                      expert_modules="ffn", families=[0, 1], family_names=["a", "b"])
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(2)
    src, tgt = torch.randint(3, 12, (5, 6), generator=g), torch.randint(3, 12, (5, 6), generator=g)
    lang = torch.ones(5, dtype=torch.long)  # language 1 of the training order: family b
    batch = Batch(src, tgt[:, :-1].clone(), tgt[:, 1:].clone(), lang, {1: (0, 5)}, 25)
    with pytest.raises(ValueError, match="family experts"):
        top_eigenvalue(model, [batch], 0.1, iters=2)
    names, params = zip(*model.named_parameters())
    est = top_eigenvalue(model, [batch], 0.1, iters=2000, tol=1e-9, seed=0, lang_index=1)
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]

    def f(flat):
        swap = dict(zip(names, [t.view(s) for t, s in zip(flat.split(sizes), shapes)]))
        with _sdpa_math():
            logits = torch.func.functional_call(model, swap, (batch.src, batch.tgt_in, lang))
        return token_losses(logits, batch.tgt_out, 0, 0.1)[0].sum() / batch.ntokens

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    H = torch.autograd.functional.hessian(f, flat)
    other = torch.cat([torch.full((p.numel(),), ".experts.0." in n) for n, p in zip(names, params)])
    assert other.sum() > 0 and H[other].abs().max() == 0 and H[:, other].abs().max() == 0
    assert est["converged"] and est["eigenvalue"] == pytest.approx(dense_top(f, flat), rel=1e-3)


def test_power_iteration_on_a_trained_checkpoint_matches_dense_on_a_parameter_subset(trained, small_synthetic):
    """The real path (load_model, the fixed batch, one forward or several): restricted to the decoder's last
    norm and output bias (192 parameters) so the dense Hessian fits; the batch in one part and in four gives
    the same eigenvalue."""
    from megavac.evaluation.consolidate import load_model

    model, _ = load_model(trained / "checkpoints", "step_2")
    ds = MultilingualDataset(str(small_synthetic), "dev", "en-qcb")
    idx, tokens = fixed_examples(ds, 0, 300, seed=0)
    one = language_batches(ds, 0, idx, 100_000, model.cfg.max_positions)
    four = language_batches(ds, 0, idx, 80, model.cfg.max_positions)
    assert len(one) == 1 and len(four) >= 4
    assert sum(b.ntokens for b in one) == sum(b.ntokens for b in four) == tokens
    named = dict(model.named_parameters())
    names = ["dec_norm.weight", "dec_norm.bias", "decoder.1.ffn.fn.fc2.bias"]
    params = [named[n] for n in names]
    a = top_eigenvalue(model, one, 0.1, iters=1000, tol=1e-8, seed=0, params=params)
    b = top_eigenvalue(model, four, 0.1, iters=1000, tol=1e-8, seed=0, params=params)
    want = dense_top(*functional_loss(model, names, params, one, 0.1, tokens))
    assert a["converged"] and b["converged"]
    assert a["eigenvalue"] == pytest.approx(want, rel=1e-3)
    assert b["eigenvalue"] == pytest.approx(a["eigenvalue"], rel=1e-4)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_power_iteration_reports_sign_and_non_convergence():
    """On explicit symmetric operators: the dominant eigenvalue keeps its sign; two of equal magnitude and
    opposite sign never settle, which is reported as not converged after --iters."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    for eig, ok in (([-7.0, 3.0, 2.0, 1.0, 0.5, -0.1], True), ([4.0, -4.0, 1.0, 0.5, 0.2, 0.1], False)):
        A = torch.tensor(Q @ np.diag(eig) @ Q.T)
        like = [torch.zeros(2, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]

        def hvp(v):
            out = A @ torch.cat(v)
            return [out[:2], out[2:]]

        est = power_iteration(hvp, like, iters=200, tol=1e-6, seed=3)
        assert est["converged"] is ok
        if ok:
            assert est["eigenvalue"] == pytest.approx(-7.0, rel=1e-5) and est["iters"] < 200
        else:
            assert est["iters"] == 200


def test_fixed_batch_is_seeded_by_name_and_independent_of_the_language_selection(small_synthetic):
    all_langs = MultilingualDataset(str(small_synthetic), "dev")
    alone = MultilingualDataset(str(small_synthetic), "dev", "en-qba")
    k = all_langs.names.index("en-qba")
    idx, tokens = fixed_examples(all_langs, k, 200, seed=0)
    idx2, tokens2 = fixed_examples(alone, 0, 200, seed=0)
    assert idx.tolist() == idx2.tolist() and tokens == tokens2
    assert tokens >= 200 and tokens - all_langs.tgt_len[k][idx[-1]] < 200  # the first prefix reaching 200
    assert fixed_examples(all_langs, k, 200, seed=1)[0].tolist() != idx.tolist()
    everything, total = fixed_examples(all_langs, k, 10**9, seed=0)
    assert sorted(everything.tolist()) == list(range(all_langs.sizes[k])) and total == all_langs.tgt_len[k].sum()


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def trained(small_synthetic, tmp_path_factory) -> Path:
    """A real 2-step run of launch/train.py (tiny model, 1 rank, ZeRO-2): checkpoints step_1 and step_2."""
    save = tmp_path_factory.mktemp("curvature") / "run"
    run([sys.executable, "launch/train.py", "--data-dir", small_synthetic, "--save-dir", save,
         "--ds_config", "ds_configs/zero2.json", "--model", "tiny", "--max-tokens", "1024", "--lr", "2e-3",
         "--warmup-steps", "4", "--log-interval", "1", "--valid-interval", "1000", "--valid-max-tokens", "2048",
         "--save-interval", "1", "--max-steps", "2"])
    assert (save / "checkpoints" / "step_1").is_dir() and (save / "checkpoints" / "step_2").is_dir()
    return save


def test_two_checkpoints_give_json_and_one_curve_per_language(trained, small_synthetic, tmp_path, capsys):
    ck = trained / "checkpoints"
    out = tmp_path / "out"
    # Given out of order: the curve is ordered by step.
    rc = cli(ck / "step_2", ck / "step_1", "--tokens", 120, "--iters", 3, "--out", out, "--no-progress")
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "curvature.json").read_text())
    names = ["en-qaa", "en-qab", "en-qba", "en-qbb", "en-qca", "en-qcb"]
    assert [e["step"] for e in res["checkpoints"]] == [1, 2] and res["split"] == "train"
    assert list(res["langs"]) == names
    assert [res["langs"][n]["train_size"] for n in names] == [3000, 1499, 600, 300, 120, 60]
    for e in res["checkpoints"]:
        assert e["label_smoothing"] == 0.1 and e["label_smoothing_from"] == "checkpoint settings"
        assert list(e["langs"]) == names
        for n, r in e["langs"].items():
            assert 1 <= r["iters"] <= 3 and isinstance(r["converged"], bool) and math_finite(r["eigenvalue"])
            assert r["tokens"] == res["langs"][n]["tokens"] >= 120
    first, second = (e["langs"]["en-qaa"]["eigenvalue"] for e in res["checkpoints"])
    assert first != second  # two different models
    assert (out / "curvature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One series per language, ordered by training size, in the figure the command drew.
    assert plot(res, tmp_path / "again.png") == [f"{n} ({s:,} train)" for n, s in
                                                 zip(names, [3000, 1499, 600, 300, 120, 60])]
    stdout = capsys.readouterr().out
    assert "step 1" in stdout and "step 2" in stdout and str(out / "curvature.json") in stdout

    # The root with --tag all is the same two checkpoints and the same fixed batches: the same numbers.
    out2 = tmp_path / "all"
    assert cli(ck, "--tag", "all", "--tokens", 120, "--iters", 3, "--out", out2, "--no-progress") == 0
    res2 = json.loads((out2 / "curvature.json").read_text())
    for a, b in zip(res["checkpoints"], res2["checkpoints"]):
        assert {n: r["eigenvalue"] for n, r in a["langs"].items()} == \
               pytest.approx({n: r["eigenvalue"] for n, r in b["langs"].items()}, rel=1e-5)
    assert {n: r["lines"] for n, r in res["langs"].items()} == {n: r["lines"] for n, r in res2["langs"].items()}


def test_single_checkpoint_bar_chart_and_smoothing_override(trained, tmp_path, capsys):
    out = tmp_path / "one"
    rc = cli(trained / "checkpoints", "--tag", "best", "--langs", "en-qcb,en-qaa", "--tokens", 80, "--iters", 2,
             "--label-smoothing", 0, "--out", out, "--no-progress")
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "curvature.json").read_text())
    assert len(res["checkpoints"]) == 1 and list(res["langs"]) == ["en-qcb", "en-qaa"]
    assert res["label_smoothing"] == 0.0 and res["checkpoints"][0]["label_smoothing_from"] == "--label-smoothing"
    assert plot(res, tmp_path / "bars.png") == ["en-qaa (3,000 train)", "en-qcb (60 train)"]


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    """Another prepared corpus (its own SentencePiece model): pairs xa (empty dev) and xb, both directions."""
    from data_pipeline.prepare import PrepareConfig, prepare
    root = tmp_path_factory.mktemp("other")
    write_two_pair_corpus(root)
    with pytest.warns(UserWarning):
        prepare(PrepareConfig(corpus=root / "corpus", out=root / "prepared", vocab_size=300, workers=1, quiet=True,
                              direction="both"))
    return root / "prepared"


@pytest.mark.filterwarnings("ignore::data_pipeline.corpus.CorpusWarning")
def test_errors_are_one_line_and_name_the_cause(trained, small_synthetic, other_data, tmp_path, capsys):
    ck = trained / "checkpoints"
    out = tmp_path / "never"
    common = ["--tokens", 50, "--iters", 1, "--out", out, "--no-progress"]

    assert cli(ck / "step_2", "--data-dir", other_data, *common) == 2
    err = one_error_line(capsys)
    assert f"checkpoint {(ck / 'step_2').resolve()}" in err and "SentencePiece model" in err

    assert cli(ck / "step_2", "--langs", "en-qaa,en-zz", *common) == 2
    err = one_error_line(capsys)
    assert "unknown language(s) ['en-zz']" in err and "en-qcb" in err

    assert cli(ck / "step_2", ck / "step_7", *common) == 2
    assert "step_7" in one_error_line(capsys)
    assert cli(tmp_path / "nowhere", *common) == 2
    err = one_error_line(capsys)
    assert "nowhere" in err and "does not exist" in err

    assert cli(ck / "step_1", ck / "step_1", *common) == 2
    assert "given twice" in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.filterwarnings("ignore::data_pipeline.corpus.CorpusWarning")
def test_empty_split_is_refused_by_language(other_data, tmp_path, capsys):
    """A checkpoint of the other corpus, written as DeepSpeed writes one without ZeRO (the loader's stage-0 path):
    its en-xa has no dev lines."""
    from megavac.fingerprint import data_fingerprint

    ds = MultilingualDataset(str(other_data), "train")
    cfg = ModelConfig(vocab_size=ds.meta["vocab_size"], d_model=8, n_heads=2, enc_layers=1, dec_layers=1, d_ff=16)
    tag = tmp_path / "ckpt" / "step_5"
    tag.mkdir(parents=True)
    torch.save({"module": Transformer(cfg).state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tag / "megavac.json").write_text(json.dumps({
        "model": cfg.to_dict(), "data_dir": str(other_data), "step": 5, "langs": ds.names,
        "data_fingerprint": data_fingerprint(other_data, ds.names)}))
    common = ["--tokens", 40, "--iters", 2, "--no-progress"]
    assert cli(tag, "--split", "dev", "--out", tmp_path / "a", *common) == 2
    err = one_error_line(capsys)
    assert err.startswith("language en-xa has no dev examples") and "--split train" in err
    # Without it, or on the train split, the same checkpoint is measured; no settings: smoothing 0.1 by default.
    assert cli(tag, "--split", "dev", "--langs", "en-xb,xb-en", "--out", tmp_path / "b", *common) == 0
    res = json.loads((tmp_path / "b" / "curvature.json").read_text())
    assert res["checkpoints"][0]["label_smoothing"] == 0.1
    assert res["checkpoints"][0]["label_smoothing_from"].startswith("default")
    assert cli(tag, "--out", tmp_path / "c", *common) == 0  # the train split, the default


def math_finite(x) -> bool:
    return x is not None and np.isfinite(x)
