"""The CATS paper's ablations as model options: LayerNorm without gains/biases (--no-layernorm-affine) and
family-routed experts (--family-experts ffn,attn,output, --family-map).

Per-language gradients of a family expert are exactly zero for languages of other families (plain
autograd here; the one-backward collector on one rank against an explicit reference in
tests/helpers/ablation_check.py); real training runs (1 rank, 2 ranks ZeRO-2 and ZeRO-3 with GradVac),
resume, consolidation, launch/evaluate.py and translation; the pipeline refusal; the dry run's counts.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, deepspeed_cmd, free_port, launch_env, run, train_losses
from megavac.config import DataConfig, MethodConfig, TrainConfig, model_config
from megavac.loss import per_language_losses
from megavac.model import FamilyExperts, ModelConfig, Transformer
from megavac.model.routing import language_families, read_family_map

COMMON = ["--model", "tiny", "--max-tokens", "1024", "--lr", "2e-3", "--warmup-steps", "4", "--log-interval", "1",
          "--lang-log-interval", "4", "--valid-interval", "1000", "--valid-max-tokens", "2048"]
EXPERT = re.compile(r"\.experts\.(\d+)\.")


def args(data, save_dir, *extra, ds="ds_configs/zero2.json"):
    return ["--ds_config", ds, "--data-dir", data, "--save-dir", save_dir, *COMMON, *extra]


def small(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=40, d_model=16, n_heads=2, enc_layers=2, dec_layers=2, d_ff=32,
                                   dropout=0.0, **kw))


def batch(B=8, S=7, T=6, K=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(4, 40, (B, S), generator=g), torch.randint(4, 40, (B, T), generator=g)
    src[1, 4:] = 0
    tgt[2, 3:] = 0
    return src, tgt, torch.arange(B) % K


EXPERTS = dict(expert_modules="output,attn,ffn", families=[0, 1, 0, 2], family_names=["A", "B", "C"])


# ------------------------------------------------------------------------------------------ model
def test_family_expert_gets_exactly_zero_gradient_from_other_families():
    """Per-language gradients by plain autograd (one backward per language share): every copy of every
    routed module (ffn, attn self and cross, output) receives exactly 0.0 from languages of other families
    and a non-zero gradient from its own; the shared parameters from all."""
    model = small(**EXPERTS)
    fam = model.cfg.families
    src, tgt, lang = batch()
    names = [n for n, _ in model.named_parameters()]
    routed = [n for n in names if EXPERT.search(n)]
    assert {n.split(".experts.")[0] for n in routed} >= {"encoder.0.attn.fn", "encoder.1.ffn.fn", "output",
                                                         "decoder.0.self_attn.fn", "decoder.1.cross_attn.fn"}
    assert model.output.experts[0].weight.shape == model.embed.weight.shape
    for k in range(4):
        model.zero_grad(set_to_none=True)
        loss_k, _, _ = per_language_losses(model(src, tgt, lang), tgt, lang, 4, pad_id=0)
        loss_k[k].backward()
        grads = dict(model.named_parameters())
        for n in routed:
            g = grads[n].grad
            if int(EXPERT.search(n).group(1)) == fam[k]:
                assert g is not None and float(g.abs().sum()) > 0, (k, n)
            else:
                assert g is not None and torch.equal(g, torch.zeros_like(g)), (k, n)  # exactly zero
        assert float(grads["embed.weight"].grad.abs().sum()) > 0  # the shared input embedding: every language


def test_routing_is_by_family_and_inference_equals_training():
    model = small(**EXPERTS).eval()
    src, tgt, lang = batch()
    train_logits = model(src, tgt, lang)  # every copy on every row, masked
    with torch.no_grad():
        infer = model(src, tgt, lang)  # each family's rows through its copy only
        torch.testing.assert_close(infer, train_logits.detach(), rtol=1e-5, atol=1e-5)
        # Languages 0 and 2 share family A: swapping them changes nothing; family B's copy gives other logits.
        torch.testing.assert_close(model(src, tgt, torch.where(lang == 0, 2, lang)), infer, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(src, tgt, torch.where(lang == 0, 1, lang)), infer)
    with pytest.raises(ValueError, match="pass lang"):
        model(src, tgt)
    with pytest.raises(ValueError, match=r"shape \[8\]"):
        model(src, tgt, lang[:3])
    # A model without experts ignores lang.
    plain = small()
    torch.testing.assert_close(plain(src, tgt, lang), plain(src, tgt))


def test_generation_routes_each_sentence_by_its_language():
    """A mixed-language batch decodes as each language alone (beam search drops finished sentences, whose
    language indices must follow their rows)."""
    from megavac.evaluation.generate import SearchConfig, translate

    model = small(**EXPERTS).eval()
    src, _, lang = batch(B=8)
    sources = [[t for t in row.tolist() if t] for row in src]
    cfg = SearchConfig(beam=3, max_len_a=0.0, max_len_b=6, bos_id=2, eos_id=3, pad_id=0)
    mixed = translate(model, sources, cfg, max_tokens=1000, lang=lang.tolist())
    for k in range(4):
        rows = [i for i in range(8) if lang[i] == k]
        assert translate(model, [sources[i] for i in rows], cfg, lang=k) == [mixed[i] for i in rows]
    with pytest.raises(ValueError, match="pass lang"):
        translate(model, sources, cfg)


def test_config_validation_and_saved_dict():
    with pytest.raises(ValueError, match="unknown module.*'mlp'"):
        ModelConfig(expert_modules="ffn,mlp", families=[0], family_names=["A"])
    with pytest.raises(ValueError, match="needs families"):
        ModelConfig(expert_modules="ffn")
    with pytest.raises(ValueError, match=r"not indices of family_names"):
        ModelConfig(expert_modules="ffn", families=[0, 2], family_names=["A", "B"])
    cfg = ModelConfig(expert_modules=" output , ffn", families=[1, 0], family_names=["A", "B"])
    assert cfg.expert_modules == "ffn,output" and cfg.experts == ("ffn", "output") and cfg.num_families == 2
    assert ModelConfig(**cfg.to_dict()) == cfg  # megavac.json's model dict rebuilds the same model
    # A default model's dict has none of the new keys (megavac.json and --resume settings as before).
    assert set(ModelConfig().to_dict()) == {"vocab_size", "d_model", "n_heads", "enc_layers", "dec_layers", "d_ff",
                                            "dropout", "attn_dropout", "pre_ln", "max_positions", "pad_id"}
    assert ModelConfig(layernorm_affine=False).to_dict()["layernorm_affine"] is False


def test_layernorm_without_affine_has_no_layernorm_parameters():
    model = small(layernorm_affine=False)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 2 * 3 + 2 and all(m.weight is None and m.bias is None for m in norms)
    assert not [n for n, _ in model.named_parameters() if "norm" in n]
    with_affine = small()
    n_norm = sum(p.numel() for n, p in with_affine.named_parameters() if "norm" in n)
    assert model.num_parameters() == with_affine.num_parameters() - n_norm == with_affine.num_parameters() - 12 * 2 * 16
    # The parameter groups have no norm groups then (as post-LN's final norms).
    from megavac.model.groups import build_groups

    labels, _ = build_groups([n for n, _ in model.named_parameters()], "all_layer")
    assert "encoder.norm" not in labels and "decoder.norm" not in labels


def test_pipeline_layers_without_layernorm_affine_map_to_the_plain_model(tmp_path):
    """The pipeline form of a model without LayerNorm parameters: every layer spec builds, the stage
    parameters' names map onto the plain model's exactly (the final norms have none), and a pipelined
    checkpoint's layer files (DeepSpeed writes an empty one for a layer without parameters, or none)
    consolidate into the plain model. (Launched: 2 stages train with GradVac and evaluate, by hand.)"""
    from megavac.model.pipeline import layer_specs, plain_name, plain_state_dict_from_layer_files

    model = small(layernorm_affine=False)
    cfg = model.cfg
    pipe = {}
    for idx, spec in enumerate(layer_specs(cfg)):
        layer = spec.build()
        for n, p in layer.named_parameters():
            pipe[f"tied_modules.embed.{n}" if idx in (0, len(layer_specs(cfg)) - 1) else f"{idx}.{n}"] = p
        if idx < len(layer_specs(cfg)) - 1 and idx not in (cfg.enc_layers + 1, cfg.enc_layers + cfg.dec_layers + 2):
            torch.save({n: model.state_dict()[plain_name(cfg, f"{idx}.{n}" if idx else f"tied_modules.embed.{n}")]
                        for n, _ in layer.named_parameters()}, tmp_path / f"layer_{idx:02d}-model_states.pt")
    assert sorted({plain_name(cfg, n) for n in pipe}) == sorted(n for n, _ in model.named_parameters())
    torch.save({}, tmp_path / f"layer_{cfg.enc_layers + 1:02d}-model_states.pt")  # the encoder norm: empty file
    state = plain_state_dict_from_layer_files(tmp_path, cfg)  # and the decoder norm's file is absent
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[n], v) for n, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------ families
def test_families_from_the_corpus_and_from_a_map(small_synthetic, tmp_path):
    meta = json.loads((small_synthetic / "meta.json").read_text())
    tasks = meta["tasks"]
    fams = language_families(tasks, meta["corpus"])
    from data_pipeline.synthetic import FAMILIES

    by_letter = {f.letter: f.name for f in FAMILIES}
    assert fams == [by_letter[t["pair"][1]] for t in tasks]  # the generator's families
    cfg = model_config(TrainConfig(family_experts="ffn"), meta["vocab_size"], meta["pad_id"], tasks, meta["corpus"])
    assert cfg.family_names == list(dict.fromkeys(fams)) and len(cfg.families) == len(tasks) == 6
    # A map: a language name wins over its pair code; the rest comes from the corpus.
    m = tmp_path / "families.tsv"
    first, second = tasks[0], tasks[1]
    m.write_text(f"language\tfamily\n# comment\n{first['pair']}\tX\n{first['name']}\tY\n\n{second['pair']}\tX\n"
                 "en-unused\tZ\n")
    assert read_family_map(m)[first["name"]] == "Y"
    got = language_families(tasks, meta["corpus"], m)
    assert got[:2] == ["Y", "X"] and got[2:] == fams[2:]
    # Unknown codes: named, with the --family-map hint.
    with pytest.raises(ValueError, match=r"'foo1'.*--family-map FILE"):
        language_families([{"name": "en-foo1", "pair": "foo1"}])
    bad = tmp_path / "bad.tsv"
    bad.write_text("en-de\tA\nen-de\tB\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: 'en-de' is given family 'B' here and 'A' earlier"):
        read_family_map(bad)
    with pytest.raises(ValueError, match="--family-map is given without --family-experts"):
        TrainConfig(family_map=str(m)).check()
    with pytest.raises(ValueError, match="--family-experts: unknown module"):
        TrainConfig(family_experts="ffn,moe").check()


# --------------------------------------------------------------------------- one-backward collector
def test_one_backward_collector_is_exact_with_experts_and_without_layernorm_affine(tmp_path):
    """ZeRO-2 and ZeRO-3, one rank, 2 micro-batches: the collector's per-language slices equal plain
    autograd's per-language gradients, and an expert's slices of other families' languages are exactly 0."""
    out = tmp_path / "check.json"
    run([sys.executable, REPO / "tests" / "helpers" / "ablation_check.py", "--out", out, "--port", free_port()],
        timeout=300)
    res = json.loads(out.read_text())
    assert {(r["case"], r["stage"]) for r in res} == {(c, s) for c in ("experts", "no_layernorm_affine")
                                                      for s in (2, 3)}
    for r in res:
        assert r["collector"] == "OneBackwardCollector" and r["rel_err"] < 1e-6, r
        if r["case"] == "experts":
            assert r["other_family_max"] == 0.0 and r["other_family_max_reference"] == 0.0, r
            assert r["own_family_min_norm"] > 0, r
            assert r["zero3_detected"] == (r["stage"] == 3), r
            assert r["nograd_vs_grad_logits"] < 1e-5, r
        else:
            assert not [n for n in r["params"] if "norm" in n], r


# ----------------------------------------------------------------------------------- real training
def test_no_layernorm_affine_trains_resumes_and_consolidates(small_synthetic, tmp_path):
    from megavac.evaluation.consolidate import load_model_from_checkpoint

    save = tmp_path / "run"
    run([sys.executable, "launch/train.py", *args(small_synthetic, save, "--max-steps", 3, "--save-interval", 2,
                                                  "--no-layernorm-affine")])
    out = run([sys.executable, "launch/train.py", *args(small_synthetic, save, "--max-steps", 4, "--save-interval", 2,
                                                        "--resume", "--no-layernorm-affine")])
    assert "resumed from step 3" in out.stdout and "step      4/4" in out.stdout
    losses = train_losses(save)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    meta = json.loads((save / "checkpoints" / "step_4" / "megavac.json").read_text())
    assert meta["model"]["layernorm_affine"] is False
    model, _ = load_model_from_checkpoint(save / "checkpoints")  # evaluation's consolidation (zero_to_fp32)
    assert model.cfg.layernorm_affine is False and not [n for n, _ in model.named_parameters() if "norm" in n]
    # Resuming with LayerNorm gains is refused by name (other parameters).
    bad = run([sys.executable, "launch/train.py", *args(small_synthetic, save, "--max-steps", 5, "--resume")],
              check=False)
    assert bad.returncode == 2 and "layernorm_affine" in bad.stderr


def test_no_layernorm_affine_gradvac_two_ranks_zero2(small_synthetic, tmp_path):
    save = tmp_path / "run"
    out = run(deepspeed_cmd(2, *args(small_synthetic, save, "--max-steps", 3, "--save-interval", 3,
                                     "--no-layernorm-affine", "--method", "gradvac", "--granularity", "all_layer")))
    assert "method gradvac" in out.stdout and "step      3/3" in out.stdout
    assert all(v == v and v < 20 for v in train_losses(save).values())


def test_family_experts_gradvac_zero3_two_ranks_save_resume_evaluate(small_synthetic, tmp_path):
    save = tmp_path / "run"
    extra = ["--family-experts", "ffn,attn,output", "--method", "gradvac", "--save-interval", 2]
    out = run(deepspeed_cmd(2, *args(small_synthetic, save, "--max-steps", 2, *extra, ds="ds_configs/zero3.json")))
    assert "method gradvac" in out.stdout and "valid step 2" in out.stdout  # ZeRO-3 validation with experts
    out = run(deepspeed_cmd(2, *args(small_synthetic, save, "--max-steps", 3, "--resume", *extra,
                                     ds="ds_configs/zero3.json")))
    assert "resumed from step 2" in out.stdout and "step      3/3" in out.stdout
    meta = json.loads((save / "checkpoints" / "step_3" / "megavac.json").read_text())
    m = meta["model"]
    assert m["expert_modules"] == "ffn,attn,output" and len(m["families"]) == 6 and len(m["family_names"]) == 3
    # Evaluation consolidates the ZeRO-3 shards into the same expert model and routes each language.
    res = tmp_path / "eval.json"
    run([sys.executable, "launch/evaluate.py", "--checkpoint", save / "checkpoints", "--beam", "2",
         "--max-len-b", "4", "--max-len-a", "0.5", "--split", "dev", "--out", res])
    results = json.loads(res.read_text())
    assert results["step"] == 3 and len(results["langs"]) == 6
    assert all(r["n"] == 40 for r in results["langs"].values())
    # The consolidated model holds every family's copies; translation (export's Translator) routes too.
    from megavac.evaluation.consolidate import load_model_from_checkpoint
    from megavac.evaluation.export import load_translator
    from megavac.evaluation.generate import SearchConfig

    model, _ = load_model_from_checkpoint(save / "checkpoints")
    # tiny: 2 encoder layers (attn, ffn), 2 decoder layers (self_attn, cross_attn, ffn), the output projection
    assert sum(isinstance(x, FamilyExperts) for x in model.modules()) == 2 * 2 + 2 * 3 + 1
    tr = load_translator(save / "checkpoints", search=SearchConfig(beam=1, max_len_a=0.0, max_len_b=3))
    task = tr.task(meta["langs"][-1].split("-")[1])
    assert (tmp_path / f"hyp.{task['name']}.dev.txt").is_file()
    assert len(tr(["a b c", ""], task)) == 2


# ------------------------------------------------------------------------------------- refusals, plan
def test_pipeline_with_family_experts_is_refused_by_name(small_synthetic, tmp_path):
    from megavac.model.pipeline import PipelineLoss, check_stages, make_pipeline_module

    cfg = small(**EXPERTS).cfg
    check_stages(cfg, 1)
    with pytest.raises(ValueError, match=r"--family-experts ffn,attn,output is not supported with pipeline "
                                         r"parallelism \(--pipeline-stages 2\)"):
        make_pipeline_module(cfg, 2, PipelineLoss(4, 0, 0.1))  # what the trainer calls at start
    p = subprocess.run([sys.executable, "launch/train.py", "--dry-run", "--world-size", "2", "--ds_config",
                        "ds_configs/pipeline.json", "--data-dir", small_synthetic, "--save-dir", tmp_path / "x",
                        "--family-experts", "ffn"], cwd=REPO, env=launch_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "--family-experts ffn is not supported with pipeline parallelism" in p.stdout


def test_dry_run_counts_the_ablations(small_synthetic, tmp_path):
    from megavac.train import dry_run

    meta = json.loads((small_synthetic / "meta.json").read_text())
    data = DataConfig(data_dir=str(small_synthetic))
    ds = str(REPO / "ds_configs" / "zero2.json")

    def plan(**kw):
        p = dry_run.make_plan(data, TrainConfig(save_dir=str(tmp_path / "run"), model="tiny", **kw), MethodConfig(),
                              ds, world_size=2)
        assert p.ok, p.problems
        return p

    base, no_ln, exp = plan(), plan(layernorm_affine=False), plan(family_experts="ffn,output")
    ref = Transformer(model_config(TrainConfig(model="tiny"), meta["vocab_size"], meta["pad_id"]))
    norms = sum(p.numel() for n, p in ref.named_parameters() if "norm" in n)
    ffn = sum(p.numel() for n, p in ref.named_parameters() if ".ffn.fn." in n)
    F = 3  # the fixture's six languages come from three generator families
    assert base.numbers["params"] == ref.num_parameters() and base.numbers["layernorm_params"] == norms
    assert no_ln.numbers["params"] == ref.num_parameters() - norms and no_ln.numbers["layernorm_params"] == 0
    assert exp.numbers["families"] == F
    assert exp.numbers["params"] == ref.num_parameters() + (F - 1) * ffn + F * ref.embed.weight.numel()
    assert exp.numbers["expert_params"] == F * (ffn + ref.embed.weight.numel())
    assert exp.numbers["model_states_bytes"] > base.numbers["model_states_bytes"]
    assert exp.numbers["activation_bytes"] > base.numbers["activation_bytes"]
    text = " ".join(v for _, _, v in exp.rows)
    assert "multiplied by the number of families" in text and "ffn,output × 3 families" in text
    assert "0 LayerNorm parameters" in " ".join(v for _, _, v in no_ln.rows)
