"""Checkpoint consolidation from real DeepSpeed checkpoints, scoring helpers, and the CLI end to end.

DeepSpeed writers run in subprocesses (tests/helpers/write_ds_checkpoint.py) because DeepSpeed
may leave a process group behind; loading happens here, in one process without distributed init.
"""
import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megavac.evaluation.consolidate import load_model_from_checkpoint, resolve_checkpoint
from megavac.distributed import free_port
from megavac.evaluation.evaluate import Thresholds, bleu_tokenizer, resource_group, select_langs, split_files

ROOT = Path(__file__).resolve().parents[1]

WRITER = ROOT / "tests" / "helpers" / "write_ds_checkpoint.py"
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")



def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS}


def run(cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=clean_env(), timeout=300, **kw)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def write_checkpoint(out: Path, stage: int, ranks: int = 1, *extra) -> Path:
    if ranks == 1:
        run([sys.executable, WRITER, "--out", out, "--stage", stage, "--port", free_port(), *extra])
    else:
        run(["deepspeed", "--num_gpus", ranks, "--master_port", free_port(), WRITER,
             "--out", out, "--stage", stage, *extra])
    return out


def assert_matches_reference(root: Path, **load_kw):
    model, meta = load_model_from_checkpoint(root, **load_kw)
    ref = torch.load(root / "reference.pt")
    params = dict(model.named_parameters())
    assert params.keys() == ref.keys()
    for name, want in ref.items():
        assert params[name].dtype == torch.float32
        assert torch.equal(params[name], want), name
    assert meta["step"] == 1 and meta["tag"] == "step_1"
    return model, meta


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_single_rank_zero_checkpoint_roundtrip(tmp_path, stage):
    assert_matches_reference(write_checkpoint(tmp_path / "ckpt", stage))


def test_two_rank_zero2_checkpoint_loads_in_one_process(tmp_path):
    root = write_checkpoint(tmp_path / "ckpt", 2, 2)
    shards = sorted(p.name for p in (root / "step_1").glob("*optim_states.pt"))
    assert len(shards) == 2, shards
    assert_matches_reference(root)


def test_checkpoint_path_resolution_and_errors(tmp_path):
    root = tmp_path / "ckpts"
    (root / "step_5").mkdir(parents=True)
    (root / "step_5" / "megavac.json").write_text(json.dumps({"model": {}, "step": 5}))
    (root / "step_9").mkdir()
    (root / "latest").write_text("step_9")
    (root / "best").write_text("step_5\n")
    assert resolve_checkpoint(root) == (root, "step_9")
    assert resolve_checkpoint(root, "best") == (root, "step_5")
    assert resolve_checkpoint(root, "step_9") == (root, "step_9")
    assert resolve_checkpoint(root / "step_5") == (root, "step_5")

    with pytest.raises(ValueError, match="nope"):
        load_model_from_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="step_7"):
        load_model_from_checkpoint(root, "step_7")
    with pytest.raises(ValueError, match=r"step_9.*megavac\.json"):
        load_model_from_checkpoint(root)  # latest -> step_9, which has no megavac.json
    (root / "best").unlink()
    with pytest.raises(ValueError, match="'best'"):
        load_model_from_checkpoint(root, "best")


# ---------------------------------------------------------------- scoring helpers


@pytest.mark.parametrize("lang", ["zh", "zho_Hans", "zh-TW", "cmn", "yue"])
def test_chinese_targets_use_zh_tokenizer(lang):
    assert bleu_tokenizer(lang) == "zh"


def test_japanese_korean_tokenizer_or_char_fallback(caplog):
    from megavac.evaluation.evaluate import tokenizer_available

    with caplog.at_level(logging.WARNING):
        for lang, name in (("ja", "ja-mecab"), ("kor", "ko-mecab")):
            if tokenizer_available(name):
                assert bleu_tokenizer(lang) == name
            else:
                assert bleu_tokenizer(lang) == "char"
                assert any(lang in r.message and "char" in r.message for r in caplog.records)
    assert bleu_tokenizer("de") == bleu_tokenizer("fr") == "13a"
    assert bleu_tokenizer("qga", ["ネソバンハゲボズロンミゼオコン。"] * 3) == "char"  # unknown code, unspaced script
    assert bleu_tokenizer("qaa", ["Mi katolbe neruno fu kuli."]) == "13a"


def test_resource_groups():
    th = Thresholds()
    assert [resource_group(n, th) for n in (0, 99_999, 100_000, 999_999, 1_000_000)] == [
        "low", "low", "medium", "medium", "high"]
    assert resource_group(50, Thresholds(low=10, high=100)) == "medium"
    with pytest.raises(ValueError, match="low=5"):
        Thresholds(low=5, high=1)


def test_select_tasks():
    meta = {"tasks": [{"name": "en-de"}, {"name": "de-en"}]}
    assert [t["name"] for t in select_langs(meta, "de-en")] == ["de-en"]
    assert len(select_langs(meta, None)) == 2
    with pytest.raises(ValueError, match="en-xx"):
        select_langs(meta, "en-de,en-xx")
    # Evaluation and training share data_pipeline's selection: the same order, the same errors.
    from data_pipeline import indexed

    assert select_langs is indexed.select_langs


def test_split_files_fall_back_to_dev(tmp_path, caplog):
    task = {"name": "en-de", "pair": "de", "src": "en", "tgt": "de"}
    (tmp_path / "raw").mkdir()
    for split in ("dev", "test"):
        for lang in ("en", "de"):
            (tmp_path / "raw" / f"de.{split}.{lang}").write_text("x\n" if split == "dev" else "")
    with caplog.at_level(logging.WARNING):
        src, ref, split = split_files(tmp_path, task, "test")  # empty test files: no test set
    assert (src.name, ref.name, split) == ("de.dev.en", "de.dev.de", "dev")
    assert "no test set for en-de" in caplog.text
    (tmp_path / "raw" / "de.dev.de").unlink()
    with pytest.raises(ValueError, match=r"de\.dev\.de"):
        split_files(tmp_path, task, "dev")


# ---------------------------------------------------------------- end to end

WORDS = {
    "en": "the cat dog house tree runs sees big small red green water".split(),
    "de": "die katze hund haus baum läuft sieht groß klein rot grün wasser".split(),
    "zh": list("猫狗房子树跑看大小红绿水"),
    "ja": list("ねこいぬいえきはしるみるおおきいちさ"),
}
PAIRS = {"de": 200_000, "zh": 5_000, "ja": 2_000_000}  # medium, low, high with default thresholds


def sentences(lang, n, rng):
    sep = "" if lang in ("zh", "ja") else " "
    return [sep.join(rng.choice(WORDS[lang]) for _ in range(rng.randint(2, 6))) for _ in range(n)]


def make_data_dir(d: Path) -> dict:
    """A tiny prepared data dir in data_pipeline's layout: spm.model, meta.json, raw/ text."""
    import sentencepiece as spm

    rng = random.Random(0)
    (d / "raw").mkdir(parents=True)
    corpus = [s for lang in WORDS for s in sentences(lang, 60, rng)]
    tags = [f"<2{lang}>" for lang in WORDS]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(d / "spm"), vocab_size=120, hard_vocab_limit=False,
        character_coverage=1.0, user_defined_symbols=tags, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(d / "spm.model"))
    tasks = []
    for pair in PAIRS:
        for src, tgt in (("en", pair), (pair, "en")) if pair == "de" else (("en", pair),):
            tag = f"<2{tgt}>"
            tasks.append({"name": f"{src}-{tgt}", "pair": pair, "src": src, "tgt": tgt, "tag": tag,
                          "tag_id": sp.piece_to_id(tag)})
        # ja has no test set: evaluation must fall back to dev.
        for split in ("dev",) if pair == "ja" else ("dev", "test"):
            for lang in ("en", pair):
                (d / "raw" / f"{pair}.{split}.{lang}").write_text("\n".join(sentences(lang, 6, rng)) + "\n")
    meta = {
        "format_version": 1,
        "vocab_size": sp.get_piece_size(), "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
        "langs": list(WORDS),
        "pairs": {p: {"train": n, "train_raw": n, "dev": 6, "test": 6, "filtered": 0} for p, n in PAIRS.items()},
        "tasks": tasks,
    }
    (d / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def test_evaluate_cli_end_to_end(tmp_path):
    data = tmp_path / "data"
    meta = make_data_dir(data)
    # Written by 2 ranks under ZeRO-3 (parameters partitioned across ranks), loaded in one process.
    root = write_checkpoint(tmp_path / "ckpt", 3, 2, "--vocab-size", meta["vocab_size"], "--data-dir", data)
    assert len(list((root / "step_1").glob("*optim_states.pt"))) == 2
    (root / "best").write_text("step_1")
    assert_matches_reference(root, tag="best")
    out = tmp_path / "eval" / "results.json"
    res = run([sys.executable, ROOT / "launch" / "evaluate.py", "--checkpoint", root, "--tag", "best",
               "--beam", 2, "--max-tokens", 50, "--out", out, "--device", "cpu"])

    r = json.loads(out.read_text())
    assert (r["tag"], r["step"], r["checkpoint"]) == ("step_1", 1, str((root / "step_1").resolve()))
    assert set(r["langs"]) == {"en-de", "de-en", "en-zh", "en-ja"}
    for name, t in r["langs"].items():
        assert {"bleu", "chrf", "n", "group", "tokenizer"} <= set(t)
        assert t["n"] == 6 and 0 <= t["bleu"] <= 100 and 0 <= t["chrf"] <= 100
        hyp = tmp_path / "eval" / f"hyp.{name}.{t['split']}.txt"
        assert len(hyp.read_text(encoding="utf-8").splitlines()) == 6
    assert [r["langs"][n]["group"] for n in ("en-de", "de-en", "en-zh", "en-ja")] == ["medium", "medium", "low", "high"]
    assert r["langs"]["en-ja"]["split"] == "dev" and r["langs"]["en-de"]["split"] == "test"
    assert r["langs"]["en-zh"]["tokenizer"] == "zh" and r["langs"]["de-en"]["tokenizer"] == "13a"
    ja_tok = r["langs"]["en-ja"]["tokenizer"]
    assert ja_tok in ("ja-mecab", "char")
    assert {g: r["groups"][g]["n_tasks"] for g in ("low", "medium", "high", "all")} == {
        "low": 1, "medium": 2, "high": 1, "all": 4}
    assert set(r["groups_by_direction"]) == {"en-xx", "xx-en"}
    assert set(r["signatures"]["bleu"]) == {"13a", "zh", ja_tok} and r["skipped"] == []
    assert "tok:zh" in r["signatures"]["bleu"]["zh"] and "nc:6" in r["signatures"]["chrf"]

    assert "BLEU signature (13a): nrefs:1" in res.stdout and "chrF signature" in res.stdout
    assert "no test set for en-ja" in res.stderr
    if ja_tok == "char":
        assert "WARNING" in res.stderr and "'ja'" in res.stderr and "'char'" in res.stderr


def tiny_model(meta: dict):
    from megavac.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=meta["vocab_size"], d_model=16, n_heads=2, enc_layers=1, dec_layers=1, d_ff=32,
                      max_positions=64, pad_id=meta["pad_id"])
    return Transformer(cfg).eval()


def quick_opts():
    from megavac.evaluation.generate import SearchConfig
    from megavac.evaluation.evaluate import EvalOptions

    return EvalOptions(split="test", max_tokens=200, device="cpu",
                       search=SearchConfig(beam=1, max_len_a=0, max_len_b=3))


def test_reference_lines_keep_cr_and_unicode_line_separators(tmp_path):
    """Raw text splits on "\\n" only: a line holding \\r, U+0085, U+2028, ... is one sentence, as in prepare."""
    from megavac.evaluation.evaluate import evaluate, task_lines

    data = tmp_path / "data"
    meta = make_data_dir(data)
    odd = ["the cat\rruns", "the dog\x85sees", "big\u2028tree", "red\u2029water", "small\x0bhouse\x0cgreen",
           "the\x1cend"]
    (data / "raw" / "de.test.de").write_bytes("".join(s + "\n" for s in odd).encode("utf-8"))
    (data / "raw" / "de.test.en").write_bytes("".join(s + "\n" for s in reversed(odd)).encode("utf-8"))
    task = next(t for t in meta["tasks"] if t["name"] == "en-de")
    src, refs, split = task_lines(data, task, "test")
    assert (refs, src, split) == (odd, odd[::-1], "test")

    r = evaluate(tiny_model(meta), data, tmp_path / "eval", "en-de", quick_opts())
    assert r["langs"]["en-de"]["n"] == 6 and r["langs"]["en-de"]["split"] == "test"


def test_evaluate_refuses_unknown_tasks_and_foreign_data_dirs(tmp_path):
    from megavac.evaluation.evaluate import evaluate

    data = tmp_path / "data"
    meta = make_data_dir(data)
    model = tiny_model(meta)
    with pytest.raises(ValueError, match=r"unknown language\(s\) \['en-xx'\].*en-de"):
        evaluate(model, data, tmp_path / "eval", "en-de,en-xx", quick_opts())
    # Order of --langs is kept, as in training.
    r = evaluate(model, data, tmp_path / "eval", " en-zh,en-de ", quick_opts())
    assert list(r["langs"]) == ["en-zh", "en-de"]

    meta_file = data / "meta.json"
    meta_file.write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(ValueError, match=r"meta\.json: format_version 2 is not supported"):
        evaluate(model, data, tmp_path / "eval", None, quick_opts())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "format_version"}))
    with pytest.raises(ValueError, match=re.escape(str(meta_file)) + ": format_version None"):
        evaluate(model, data, tmp_path / "eval", None, quick_opts())
    meta_file.write_text(json.dumps(meta))
    (data / "spm.model").unlink()
    with pytest.raises(ValueError, match=r"missing .*spm\.model"):
        evaluate(model, data, tmp_path / "eval", None, quick_opts())


def test_evaluation_defaults_to_the_trained_languages(tmp_path):
    from megavac.evaluation.evaluate import model_langs

    data = tmp_path / "data"
    make_data_dir(data)
    assert model_langs({"langs": ["en-zh", "en-de"]}, data) == ["en-zh", "en-de"]  # training order
    assert model_langs({"langs": ["en-zh", "en-qq"]}, data) == ["en-zh"]
    assert model_langs({"langs": ["en-zh"]}, data, "de-en") == "de-en"  # --langs wins
    assert model_langs({}, data) is None  # a checkpoint without "langs": all of the data dir's
    with pytest.raises(ValueError, match=r"has none of the languages ckpt/step_3 was trained on \(\['en-qq'\]\)"):
        model_langs({"langs": ["en-qq"], "source": "ckpt/step_3"}, data)
