"""Tests of data_pipeline: layouts, validation errors, filtering, SentencePiece sampling,
binarization and the prepared-directory reader. Real corpora from the shared data
directory go through the whole pipeline when available."""
from __future__ import annotations

import json
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data_pipeline import IndexedTokens, PreparedDataError, load_meta, load_raw, open_split
from data_pipeline.binarize import binarize_corpus, scan_corpus, worker_pool
from data_pipeline.corpus import (
    CorpusWarning, DuplicateLanguageError, FilterLimits, InvalidLanguageCodeError, InvalidUtf8Error,
    LineCountMismatchError, MissingFileError, UnknownLanguageError, classify, discover, read_range, scan_file,
)
from data_pipeline.prepare import ConfigError, OutputExistsError, PrepareConfig, main, prepare
from data_pipeline.spm import temperature_counts, write_sample
from data_pipeline.synthetic import build_languages, generate_pairs

REPO = Path(__file__).resolve().parents[1]
# Missing test splits are expected here; tests that care use pytest.warns.
pytestmark = pytest.mark.filterwarnings("ignore::data_pipeline.corpus.CorpusWarning")


def shared_data() -> Path:
    path = Path(os.environ.get("MEGAVAC_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (path / "tatoeba_challenge").is_dir() or not (path / "ntrex128").is_dir():
        pytest.skip(f"real corpora not found at {path} (set MEGAVAC_SHARED_DATA to the directory holding "
                    "tatoeba_challenge/ and ntrex128/)")
    return path


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def normalised(sp, text: str) -> str:
    """What decode(encode(text)) gives back: SentencePiece's normalisation of the text."""
    return sp.normalize(text).replace("\u2581", " ").strip()


def write_pair(root: Path, code: str, splits: dict[str, tuple[list[str], list[str]]], dirname: str | None = None):
    d = root / (dirname or f"{code}-en")
    d.mkdir(parents=True, exist_ok=True)
    for split, (xx, en) in splits.items():
        (d / f"{split}.{code}").write_text("".join(s + "\n" for s in xx), encoding="utf-8")
        (d / f"{split}.en").write_text("".join(s + "\n" for s in en), encoding="utf-8")
    return d


def synthetic_lines(lang_index: int, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    lang = build_languages(0)[lang_index]
    pairs = list(generate_pairs(lang, n, random.Random(seed), set()))
    return [x for _, x in pairs], [e for e, _ in pairs]


def small_corpus(root: Path, codes=("xa", "xb"), n_train=120, n_dev=10, test=True) -> Path:
    for i, code in enumerate(codes):
        xx, en = synthetic_lines(i * 5, n_train + 2 * n_dev, seed=i)
        splits = {"train": (xx[:n_train], en[:n_train]), "dev": (xx[n_train:n_train + n_dev], en[n_train:n_train + n_dev])}
        if test:
            splits["test"] = (xx[n_train + n_dev:], en[n_train + n_dev:])
        write_pair(root, code, splits)
    return root


def quick_cfg(corpus: Path, out: Path, **kw) -> PrepareConfig:
    defaults = dict(vocab_size=300, spm_sentences=2000, workers=1, quiet=True)
    return PrepareConfig(corpus=corpus, out=out, **(defaults | kw))


# --------------------------------------------------------------------------- real corpora

TATOEBA_LANGS = ["tzl", "kat", "hin", "jpn"]  # 181 .. 13k pairs; Latin, Georgian, Devanagari, CJK
NTREX_LANGS = ["amh", "deu", "zho_CN"]  # multi-way aligned news; Ethiopic, Latin, Han


@pytest.fixture(scope="module")
def tatoeba(tmp_path_factory):
    root = shared_data() / "tatoeba_challenge"
    out = tmp_path_factory.mktemp("prep") / "tatoeba"
    with pytest.warns(CorpusWarning, match="no test split"):
        meta = prepare(PrepareConfig(corpus=root, out=out, pairs=TATOEBA_LANGS, vocab_size=2000,
                                     spm_sentences=20000, workers=2, chunk_lines=3000, quiet=True))
    return root, out, meta


@pytest.fixture(scope="module")
def ntrex(tmp_path_factory):
    root = shared_data() / "ntrex128"
    out = tmp_path_factory.mktemp("prep") / "ntrex"
    with pytest.warns(CorpusWarning):
        meta = prepare(PrepareConfig(corpus=root, out=out, pairs=NTREX_LANGS, vocab_size=3000, direction="both",
                                     spm_sentences=8000, workers=1, max_len=120, max_ratio=2.5, quiet=True))
    return root, out, meta


def test_real_meta_fields(tatoeba):
    root, out, meta = tatoeba
    assert meta == load_meta(out)
    assert meta["format_version"] == 1
    assert (meta["pad_id"], meta["unk_id"], meta["bos_id"], meta["eos_id"]) == (0, 1, 2, 3)
    assert meta["vocab_size"] == 2000 and meta["dtype"] == "uint16"
    assert meta["direction"] == "en-xx" and meta["layout"] == "plain" and meta["corpus"] == str(root)
    assert meta["filters"] == {"min_len": 1, "max_len": 250, "max_ratio": 3.0, "unit": "tokens"}
    assert meta["langs"] == sorted(TATOEBA_LANGS)
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert [t["name"] for t in meta["tasks"]] == [f"en-{c}" for c in sorted(TATOEBA_LANGS)]
    for t in meta["tasks"]:
        assert t["tag"] == f"<2{t['tgt']}>" and sp.id_to_piece(t["tag_id"]) == t["tag"]
    assert sp.id_to_piece(sp.piece_to_id("<2en>")) == "<2en>"  # <2en> exists even for en-xx
    assert not (out.parent / "tatoeba.tmp").exists()


def test_real_counts_and_filter_report(tatoeba):
    root, out, meta = tatoeba
    report = json.loads((out / "filter_report.json").read_text())
    for code in TATOEBA_LANGS:
        p = meta["pairs"][code]
        n_train = len(read_lines(root / f"{code}-en" / f"train.{code}"))
        assert p["train_raw"] == n_train
        assert p["train"] == n_train - sum(p["filtered"].values())
        assert p["dev"] == len(read_lines(root / f"{code}-en" / f"dev.{code}")) and p["test"] == 0
        assert report["langs"][code]["filtered"] == p["filtered"]
        for split, n in (("train", p["train"]), ("dev", p["dev"])):
            xx, en = open_split(out, code, split, code), open_split(out, code, split, "en")
            assert len(xx) == len(en) == n
        assert not (out / "bin" / f"{code}.test.en.bin").exists()
    assert sum(meta["pairs"][c]["filtered"]["ratio"] for c in TATOEBA_LANGS) > 0  # filters did fire


def test_real_train_matches_filtered_reencoding(tatoeba):
    """Kept train lines are exactly the ones the filter keeps, aligned on both sides."""
    root, out, meta = tatoeba
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    for code in ("tzl", "kat"):
        xx = read_lines(root / f"{code}-en" / f"train.{code}")
        en = read_lines(root / f"{code}-en" / "train.en")
        xi, ei = sp.encode(xx), sp.encode(en)
        reason = classify([len(a) for a in xi], [len(b) for b in ei],
                          [not a.strip() or not b.strip() for a, b in zip(xx, en)], FilterLimits())
        kept = np.flatnonzero(reason == 0)
        tx, te = open_split(out, code, "train", code), open_split(out, code, "train", "en")
        assert len(tx) == len(kept)
        for j, i in enumerate(kept):
            assert tx[j].tolist() == xi[i] and te[j].tolist() == ei[i]


def test_real_dev_round_trip_and_raw(tatoeba, ntrex):
    for root, out, meta in (tatoeba, ntrex):
        sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
        for code in meta["langs"]:
            for lang in (code, "en"):
                src = root / f"{code}-en" / f"dev.{lang}"
                assert (out / "raw" / f"{code}.dev.{lang}").read_bytes() == src.read_bytes()
                raw = load_raw(out, code, "dev", lang)
                toks = open_split(out, code, "dev", lang)
                assert len(raw) == len(toks)
                exact = 0
                for ids, line in zip(toks, raw):
                    if meta["unk_id"] not in ids:  # rare characters (coverage 0.9995) map to <unk>
                        assert sp.decode(ids.tolist()) == normalised(sp, line)
                        exact += 1
                assert exact >= len(raw) / 2, (code, lang, exact)
                all_ids = np.concatenate([toks[i] for i in range(len(toks))])
                assert (all_ids == meta["unk_id"]).mean() < 0.03, (code, lang)


def test_real_ntrex_both_directions(ntrex):
    root, out, meta = ntrex
    assert meta["direction"] == "both"
    names = [t["name"] for t in meta["tasks"]]
    assert names == [n for c in sorted(NTREX_LANGS) for n in (f"en-{c}", f"{c}-en")]
    assert all(t["tag"] == "<2en>" for t in meta["tasks"] if t["tgt"] == "en")
    for code in NTREX_LANGS:
        p = meta["pairs"][code]
        assert p["train_raw"] == 1784 and p["dev"] == 213
        assert p["filtered"]["too_long"] + p["filtered"]["ratio"] > 0 or code == "deu"
        assert open_split(out, code, "train", "en").sizes.max() <= 120


def test_prepare_is_idempotent_and_refuses_foreign_output(tatoeba):
    root, out, meta = tatoeba
    stamp = (out / "meta.json").stat().st_mtime_ns
    again = prepare(PrepareConfig(corpus=root, out=out, pairs=list(reversed(TATOEBA_LANGS)), vocab_size=2000,
                                  spm_sentences=20000, workers=1, chunk_lines=3000, quiet=True))
    assert again == meta and (out / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(OutputExistsError, match="different settings.*--overwrite"):
        prepare(PrepareConfig(corpus=root, out=out, pairs=TATOEBA_LANGS, vocab_size=1000, quiet=True))


# --------------------------------------------------------------------------- filtering


def test_filters_train_only_with_exact_counts(tmp_path):
    corpus = small_corpus(tmp_path / "c", codes=("xa",), n_train=100)
    d = corpus / "xa-en"
    xx, en = read_lines(d / "train.xa"), read_lines(d / "train.en")
    xx[3], en[10] = "", "   "                          # 2 empty
    xx[20], en[21] = "x" * 300, "y" * 301               # 2 too long (chars)
    xx[30] = "ab"                                       # too short (min 3 chars)
    xx[40], en[40] = "a" * 50, "b" * 5                  # ratio 10 > 3
    (d / "train.xa").write_text("".join(s + "\n" for s in xx), encoding="utf-8")
    (d / "train.en").write_text("".join(s + "\n" for s in en), encoding="utf-8")
    dev_xx = read_lines(d / "dev.xa")
    dev_xx[2] = ""                                      # dev keeps empty lines
    (d / "dev.xa").write_text("".join(s + "\n" for s in dev_xx), encoding="utf-8")

    out = tmp_path / "out"
    meta = prepare(quick_cfg(corpus, out, len_unit="chars", min_len=3, max_len=200, max_ratio=3.0))
    counts = meta["pairs"]["xa"]
    assert counts["filtered"] == {"empty": 2, "too_long": 2, "too_short": 1, "ratio": 1}
    assert counts["train_raw"] == 100 and counts["train"] == 94 and counts["dev"] == 10
    assert json.loads((out / "filter_report.json").read_text())["langs"]["xa"]["filtered"] == counts["filtered"]
    dev = open_split(out, "xa", "dev", "xa")
    assert len(dev) == 10 and dev.sizes[2] == 0
    assert load_raw(out, "xa", "dev", "xa")[2] == ""


def test_chunking_and_workers_do_not_change_output(tmp_path):
    corpus = small_corpus(tmp_path / "c", n_train=200)
    out = tmp_path / "out"
    prepare(quick_cfg(corpus, out, max_ratio=2.0))
    c = discover(corpus)
    results = []
    for chunk_lines, workers in ((7, 2), (100000, 1)):
        with worker_pool(workers) as pool:
            scans = scan_corpus(c, chunk_lines, pool)
            dest = tmp_path / f"bin{chunk_lines}"
            stats = binarize_corpus(scans, out / "spm.model", dest, "uint16", FilterLimits(max_ratio=2.0), pool)
        results.append({p.name: p.read_bytes() for p in sorted(dest.glob("*.*"))})
        assert stats["xa"]["train"].kept == load_meta(out)["pairs"]["xa"]["train"]
    assert results[0] == results[1] and len(results[0]) == 2 * 2 * 3 * 2


def test_scan_file_chunk_offsets(tmp_path):
    path = tmp_path / "f.txt"
    lines = [f"line {i} ünï" for i in range(10)]
    path.write_bytes(("\n".join(lines)).encode() + b"\r")  # no final newline; CR is dropped
    scan = scan_file(path, chunk_lines=3)
    assert scan.lines == 10 and scan.size == path.stat().st_size and len(scan.chunk_offsets) == 5
    got = [s for a, b in zip(scan.chunk_offsets, scan.chunk_offsets[1:]) for s in read_range(path, a, b)]
    assert got == lines
    assert scan_file(tmp_path / "f.txt", chunk_lines=100).chunk_offsets == [0, scan.size]
    (tmp_path / "empty").write_bytes(b"")
    assert scan_file(tmp_path / "empty", 5).lines == 0


# --------------------------------------------------------------------------- layouts


SPLITS_ALL = ("train", "dev", "test")


def test_opus100_layout(tmp_path):
    base = tmp_path / "opus" / "opus-100-corpus" / "v1.0" / "supervised"
    for i, (dirname, code, splits) in enumerate((("en-xa", "xa", SPLITS_ALL), ("ab-en", "ab", ("train",)))):
        d = base / dirname
        d.mkdir(parents=True)
        xx, en = synthetic_lines(i * 7, 150, seed=i)
        for split, (a, b) in zip(splits, ((0, 100), (100, 125), (125, 150))):
            (d / f"opus.{dirname}-{split}.{code}").write_text("".join(s + "\n" for s in xx[a:b]), encoding="utf-8")
            (d / f"opus.{dirname}-{split}.en").write_text("".join(s + "\n" for s in en[a:b]), encoding="utf-8")
    assert discover(base).layout == "opus100"  # root may also point at .../supervised
    out = tmp_path / "out"
    with pytest.warns(CorpusWarning, match="no dev split .* ab"):
        meta = prepare(quick_cfg(tmp_path / "opus", out, layout="auto", direction="xx-en"))
    assert meta["layout"] == "opus100" and meta["langs"] == ["ab", "xa"]
    assert meta["pairs"]["xa"]["dev"] == 25 and meta["pairs"]["xa"]["test"] == 25
    assert meta["pairs"]["ab"]["dev"] == 0 and meta["pairs"]["ab"]["test"] == 0
    assert len(open_split(out, "ab", "dev", "ab")) == 0  # absent dev: empty files, no special case
    assert not (out / "bin" / "ab.test.en.idx").exists() and len(open_split(out, "xa", "test", "en")) == 25
    assert [t["name"] for t in meta["tasks"]] == ["ab-en", "xa-en"]


def test_plain_layout_missing_test_warns_and_langs_subset(tmp_path):
    corpus = small_corpus(tmp_path / "c", codes=("xa", "xb", "xc"), test=False)
    with pytest.warns(CorpusWarning, match=r"no test split .* 1 of 1 pairs: xb"):
        c = discover(corpus, "plain", ["xb"])
    assert [p.code for p in c.pairs] == ["xb"] and set(c.pairs[0].splits) == {"train", "dev"}


# --------------------------------------------------------------------------- errors


def test_error_mismatched_line_counts(tmp_path):
    corpus = small_corpus(tmp_path / "c")
    en = corpus / "xb-en" / "train.en"
    en.write_text("".join(s + "\n" for s in read_lines(en)[:-1]), encoding="utf-8")
    with pytest.raises(LineCountMismatchError, match=r"xb-en/train\.xb has 120 lines but .*xb-en/train\.en has 119"):
        prepare(quick_cfg(corpus, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_error_invalid_utf8_names_file_line_and_offset(tmp_path):
    corpus = small_corpus(tmp_path / "c")
    path = corpus / "xa-en" / "dev.xa"
    lines = path.read_bytes().split(b"\n")
    offset = len(lines[0]) + len(lines[1]) + 2 + 4
    lines[2] = lines[2][:4] + b"\xff\xfe" + lines[2][4:]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(InvalidUtf8Error, match=rf"xa-en/dev\.xa: invalid UTF-8 on line 3 at byte offset {offset} "
                                               r"\(byte 4 of the line\)"):
        prepare(quick_cfg(corpus, tmp_path / "out", workers=2))


def test_error_unknown_language(tmp_path):
    corpus = small_corpus(tmp_path / "c")
    with pytest.raises(UnknownLanguageError, match=r"unknown language code\(s\) 'zz' in --pairs.*available: xa, xb"):
        prepare(quick_cfg(corpus, tmp_path / "out", pairs=["xa", "zz"]))


def test_error_duplicate_language(tmp_path):
    corpus = small_corpus(tmp_path / "c")
    with pytest.raises(DuplicateLanguageError, match="'xa' is listed twice"):
        prepare(quick_cfg(corpus, tmp_path / "out", pairs=["xa", "xa"]))
    xx, en = synthetic_lines(3, 20)
    write_pair(corpus, "xa", {"train": (xx, en), "dev": (xx, en)}, dirname="en-xa")
    with pytest.raises(DuplicateLanguageError, match=r"'xa' occurs twice: .*/en-xa and .*/xa-en"):
        prepare(quick_cfg(corpus, tmp_path / "out"))


def test_error_invalid_code(tmp_path):
    corpus = small_corpus(tmp_path / "c")
    xx, en = synthetic_lines(3, 20)
    write_pair(corpus, "pt.br", {"train": (xx, en), "dev": (xx, en)})
    with pytest.raises(InvalidLanguageCodeError, match=r"pt\.br-en: language code 'pt\.br'"):
        prepare(quick_cfg(corpus, tmp_path / "out"))


def test_error_missing_files(tmp_path):
    corpus = small_corpus(tmp_path / "c")
    (corpus / "xa-en" / "dev.xa").unlink()
    with pytest.raises(MissingFileError, match=r"missing file .*xa-en/dev\.xa \(its other side .*dev\.en exists\)"):
        prepare(quick_cfg(corpus, tmp_path / "out"))
    (corpus / "xa-en" / "dev.en").unlink()
    with pytest.raises(MissingFileError, match=r"xa-en/dev\.xa .*the dev split is required"):
        prepare(quick_cfg(corpus, tmp_path / "out"))


def test_error_bad_config_and_cli_exit_code(tmp_path, capsys):
    corpus = small_corpus(tmp_path / "c")
    with pytest.raises(ConfigError, match="--direction 'sideways'"):
        prepare(quick_cfg(corpus, tmp_path / "out", direction="sideways"))
    with pytest.raises(ConfigError, match="--min-len/--max-len"):
        prepare(quick_cfg(corpus, tmp_path / "out", min_len=10, max_len=5))
    assert main(["--corpus", str(corpus), "--out", str(tmp_path / "out"), "--pairs", "nope", "--quiet"]) == 2
    assert "error: unknown language code(s) 'nope'" in capsys.readouterr().err


def test_load_meta_missing_is_clear(tmp_path):
    with pytest.raises(PreparedDataError, match=r"meta\.json not found.*python -m data_pipeline\.prepare"):
        load_meta(tmp_path)
    with pytest.raises(PreparedDataError, match=r"missing .*xa\.train\.en\.idx"):
        open_split(tmp_path, "xa", "train", "en")


GOOD_META = {"format_version": 1, "vocab_size": 10, "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
             "pairs": {"xa": {"train": 5}, "xb": {"train": 7}},
             "tasks": [{"name": n, "pair": p, "src": s, "tgt": t, "tag_id": 4}
                       for n, p, s, t in (("en-xa", "xa", "en", "xa"), ("xa-en", "xa", "xa", "en"),
                                          ("en-xb", "xb", "en", "xb"))]}


@pytest.mark.parametrize("text,message", [
    (json.dumps({**GOOD_META, "format_version": 2}), "format_version 2 is not supported"),
    (json.dumps({k: v for k, v in GOOD_META.items() if k != "format_version"}), "format_version None"),
    ("[1, 2]", "format_version None"),
    ('{"format_version": 1,', "is not valid JSON"),
    (json.dumps({k: v for k, v in GOOD_META.items() if k != "eos_id"}), r"lacks keys \['eos_id'\]"),
    (json.dumps({**GOOD_META, "tasks": [{"name": "en-xa"}]}), "task .* lacks one of"),
])
def test_load_meta_refuses_other_formats_naming_the_file(tmp_path, text, message):
    (tmp_path / "meta.json").write_text(text, encoding="utf-8")
    with pytest.raises(PreparedDataError, match=re.escape(str(tmp_path / "meta.json")) + f".*{message}"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps(GOOD_META), encoding="utf-8")
    assert load_meta(tmp_path) == GOOD_META


def test_load_raw_splits_on_newline_only(tmp_path):
    # Every separator str.splitlines knows besides \n (and the \r text-mode open() translates) stays in its line.
    lines = ["a\rb", "c\r", "\x85d", "e\u2028f\u2029g", "h\x0bi\x0cj", "k\x1cl\x1dm\x1e", "", "last"]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "xa.dev.en").write_bytes(("\n".join(lines)).encode("utf-8"))  # last line unterminated
    assert load_raw(tmp_path, "xa", "dev", "en") == lines
    (tmp_path / "raw" / "xa.dev.en").write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    assert load_raw(tmp_path, "xa", "dev", "en") == lines
    (tmp_path / "raw" / "xa.dev.en").write_bytes(b"")
    assert load_raw(tmp_path, "xa", "dev", "en") == []
    (tmp_path / "raw" / "xa.dev.en").write_bytes(b"ok\n\xff\n")
    with pytest.raises(PreparedDataError, match=r"xa\.dev\.en: invalid UTF-8 at byte offset 3"):
        load_raw(tmp_path, "xa", "dev", "en")


def test_select_tasks_keeps_the_given_order_and_names_bad_tasks():
    from data_pipeline.indexed import select_langs

    def names(sel, **kw):
        return [t["name"] for t in select_langs(GOOD_META, sel, **kw)]

    assert names(None) == names("") == names([]) == names(" , ") == ["en-xa", "xa-en", "en-xb"]
    assert names("en-xb,en-xa") == names(["en-xb", "en-xa"]) == names(" en-xb , en-xa,") == ["en-xb", "en-xa"]
    with pytest.raises(ValueError, match=r"unknown language\(s\) \['en-zz', 'xb-en'\]; available: "
                                         r"\['en-xa', 'xa-en', 'en-xb'\]"):
        names("en-xa,en-zz,xb-en")
    with pytest.raises(ValueError, match=r"unknown language\(s\) \['en-zz'\]; /some/dir has"):
        names(["en-zz"], data_dir="/some/dir")
    with pytest.raises(ValueError, match=r"\['en-xa'\] selected more than once"):
        names("en-xa,en-xb,en-xa")


# --------------------------------------------------------------------------- SentencePiece sampling


def test_temperature_counts_formula():
    sizes = {"en": 11000, "big": 10000, "small": 1000, "tiny": 0}
    for temperature in (1.0, 5.0, 100.0):
        counts = temperature_counts(sizes, temperature, 5000)
        assert sum(counts.values()) == 5000 and counts["tiny"] == 0
        q = {k: (n / 22000) ** (1 / temperature) for k, n in sizes.items() if n}
        z = sum(q.values())
        for k in q:
            assert abs(counts[k] - 5000 * q[k] / z) < 1
    flat = temperature_counts(sizes, 1e6, 3000)  # T -> infinity: uniform over languages with data
    assert max(flat.values()) - min(v for v in flat.values() if v) <= 1


def test_realised_sample_counts_match_formula(tmp_path):
    """Streamed sample: per-language counts equal the formula, English pooled over pairs,
    upsampling (repeats) for small languages."""
    files = {}
    for lang, n in (("big", 3000), ("mid", 400), ("small", 30)):
        p = tmp_path / f"{lang}.txt"
        p.write_text("".join(f"{lang} {i}\n" for i in range(n)), encoding="utf-8")
        files[lang] = [(str(p), n)]
    en_files = []
    for lang, n in (("big", 3000), ("mid", 400), ("small", 30)):
        p = tmp_path / f"en-{lang}.txt"
        p.write_text("".join(f"en{lang} {i}\n" for i in range(n)), encoding="utf-8")
        en_files.append((str(p), n))
    files["en"] = en_files
    sizes = {lang: sum(n for _, n in fs) for lang, fs in files.items()}
    counts = temperature_counts(sizes, 5.0, 2000)
    assert counts["small"] > 30  # temperature upsampling beyond the language's size
    with worker_pool(2) as pool:
        report = write_sample(files, counts, tmp_path / "sample.txt", pool, seed=3)
    lines = read_lines(tmp_path / "sample.txt")
    assert len(lines) == 2000
    realised = {lang: sum(1 for s in lines if s.split()[0] == lang) for lang in ("big", "mid", "small")}
    realised["en"] = sum(1 for s in lines if s.startswith("en"))
    assert realised == counts == {k: v["written"] for k, v in report.items()}
    small = [s for s in lines if s.startswith("small ")]
    assert len(set(small)) == 30  # every line at least once before any line is repeated again
    en_big = sum(1 for s in lines if s.startswith("enbig"))
    assert 0.8 < en_big / (counts["en"] * 3000 / 3430) < 1.2  # English drawn uniformly from the pooled lines


# --------------------------------------------------------------------------- reader


def test_indexed_tokens_api(tmp_path):
    prefix = tmp_path / "x"
    seqs = [[5, 6, 7], [], [65000], [1, 2]]
    np.array([t for s in seqs for t in s], dtype="<u2").tofile(f"{prefix}.bin")
    np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype("<i8").tofile(f"{prefix}.idx")
    t = IndexedTokens(prefix)
    assert len(t) == 4 and t.sizes.tolist() == [3, 0, 1, 2] and t.num_tokens == 6
    assert [x.tolist() for x in t] == seqs and t[-1].tolist() == [1, 2] and t.dtype == np.uint16
    with pytest.raises(IndexError):
        t[4]
    clone = pickle.loads(pickle.dumps(t))
    assert len(pickle.dumps(t)) < 500 and clone[0].tolist() == [5, 6, 7]
    np.array([1, 2, 3], dtype="<u2").tofile(f"{prefix}.bin")
    with pytest.raises(PreparedDataError, match="truncated or corrupt"):
        IndexedTokens(prefix, dtype="uint16")


def test_output_dir_protection_and_overwrite(tmp_path):
    corpus = small_corpus(tmp_path / "c", codes=("xa",))
    out = tmp_path / "out"
    out.mkdir()
    (out / "junk.txt").write_text("not ours")
    with pytest.raises(OutputExistsError, match="no meta.json"):
        prepare(quick_cfg(corpus, out))
    meta = prepare(quick_cfg(corpus, out, overwrite=True))
    assert not (out / "junk.txt").exists() and load_meta(out) == meta
    # An edited corpus is not mistaken for the prepared one.
    train = corpus / "xa-en" / "train.en"
    train.write_text(train.read_text(encoding="utf-8").replace("The ", "A "), encoding="utf-8")
    with pytest.raises(OutputExistsError, match="input files"):
        prepare(quick_cfg(corpus, out))
