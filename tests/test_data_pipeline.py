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
    CorpusError, CorpusWarning, DuplicateLanguageError, EmptySplitError, FilterLimits, InvalidLanguageCodeError,
    InvalidUtf8Error, LineCountMismatchError, LongLineError, MissingFileError, NulByteError, UnknownLanguageError,
    classify, discover, read_range, scan_file,
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


# --------------------------------------------------------------------------- user reports: dev/test length,
# empty splits, BOM and NUL, symlink loops, worker-independent output


def _rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(s + "\n" for s in lines), encoding="utf-8")


def test_long_dev_line_is_refused_naming_file_line_and_length(tmp_path, capsys):
    """A 100,000-character dev line used to pass prepare and stop training at its first validation."""
    corpus = small_corpus(tmp_path / "c")
    dev = corpus / "xa-en" / "dev.xa"
    lines = read_lines(dev)
    lines[2] = "word " * 20000
    _rewrite(dev, lines)
    with pytest.raises(CorpusError) as e:
        prepare(quick_cfg(corpus, tmp_path / "out"))
    msg = str(e.value)
    assert isinstance(e.value, LongLineError) and "\n" not in msg
    assert re.match(rf"{re.escape(str(dev))}: line 3 has \d+ tokens, more than the 1022 allowed for dev/test lines "
                    r"\(--max-eval-tokens\)", msg), msg
    assert "never filtered or truncated" in msg and "in both dev.xa and dev.en" in msg
    assert not (tmp_path / "out").exists()
    # The CLI: one line, exit code 2.
    assert main(["--corpus", str(corpus), "--out", str(tmp_path / "out"), "--vocab-size", "300", "--workers", "1",
                 "--quiet"]) == 2
    assert re.search(r"error: .*dev\.xa: line 3 has \d+ tokens", capsys.readouterr().err)
    # Several lines, on either side and in the test split: the first is named, the rest counted.
    test_en = corpus / "xb-en" / "test.en"
    t = read_lines(test_en)
    t[0] = "word " * 300
    _rewrite(test_en, t)
    with pytest.raises(LongLineError, match=r"dev\.xa: line 3 has \d+ tokens, more than the 200 .*1 more such "
                                            r"line\(s\): xb test line 1 \(\d+ tokens\)"):
        prepare(quick_cfg(corpus, tmp_path / "out", max_eval_tokens=200))


def test_dev_lines_longer_than_the_train_filter_are_kept_whole_with_a_warning(tmp_path):
    """Only train is filtered: a dev/test line past --max-len (but within --max-eval-tokens) is kept as it
    is, neither truncated nor dropped, and named in a warning recorded in meta.json."""
    corpus = small_corpus(tmp_path / "c")
    dev = corpus / "xa-en" / "dev.xa"
    lines = read_lines(dev)
    lines[2] = "x" * 300
    _rewrite(dev, lines)
    test_en = corpus / "xb-en" / "test.en"
    t = read_lines(test_en)
    t[4] = "y" * 250
    _rewrite(test_en, t)
    out = tmp_path / "out"
    with pytest.warns(CorpusWarning, match=rf"2 dev/test line\(s\) longer than the train filter's --max-len 200 chars, "
                                           rf"kept whole .*: {re.escape(str(dev))} line 3 \(300 chars\), "
                                           rf"{re.escape(str(test_en))} line 5 \(250 chars\)$"):
        meta = prepare(quick_cfg(corpus, out, len_unit="chars", max_len=200))
    assert any("2 dev/test line(s) longer than" in w for w in meta["warnings"])
    assert meta["pairs"]["xa"]["dev"] == 10 and load_raw(out, "xa", "dev", "xa")[2] == lines[2]
    assert load_raw(out, "xb", "test", "en")[4] == t[4]
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    assert open_split(out, "xa", "dev", "xa")[2].tolist() == sp.encode(lines[2])  # not truncated


def test_empty_train_split_is_refused_naming_pair_and_file(tmp_path):
    corpus = small_corpus(tmp_path / "c")
    for side in ("xb", "en"):
        (corpus / "xb-en" / f"train.{side}").write_bytes(b"")
    with pytest.raises(EmptySplitError, match=r"xb-en/train\.xb and .*xb-en/train\.en are empty: the train split of "
                                              r"pair xb has no lines"):
        prepare(quick_cfg(corpus, tmp_path / "out"))
    # Emptied by the filters is the same: named with the counts per reason.
    corpus = small_corpus(tmp_path / "c2")
    with pytest.raises(EmptySplitError, match=r"xa-en/train\.xa: all 120 train lines of pair xa were removed by the "
                                              r"filters \(too_long 120\)"):
        prepare(quick_cfg(corpus, tmp_path / "out", len_unit="chars", max_len=3))


def test_empty_train_split_in_a_prepared_dir_is_refused_by_the_reader(tmp_path):
    from data_pipeline.binarize import write_empty
    from data_pipeline.indexed import split_prefix
    from megavac.data import MultilingualDataset

    corpus = small_corpus(tmp_path / "c")
    out = tmp_path / "out"
    meta = prepare(quick_cfg(corpus, out))
    for lang in ("xb", "en"):  # a directory edited (or written before prepare refused empty train splits)
        write_empty(split_prefix(out, "xb", "train", lang), meta["dtype"])
    with pytest.raises(PreparedDataError, match=r"bin/xb\.train\.xb\.idx: the train split of pair xb is empty"):
        open_split(out, "xb", "train", "xb")
    with pytest.raises(PreparedDataError, match="pair xb is empty"):
        MultilingualDataset(str(out), "train")
    assert MultilingualDataset(str(out), "train", "en-xa").names == ["en-xa"]
    assert len(open_split(out, "xa", "dev", "xa")) == 10


def test_empty_dev_split_warns_by_name(tmp_path):
    corpus = small_corpus(tmp_path / "c")
    for side in ("xa", "en"):
        (corpus / "xa-en" / f"dev.{side}").write_bytes(b"")
    with pytest.warns(CorpusWarning, match=r"xa-en/dev\.xa and .*dev\.en are empty: pair xa has no dev data, so "
                                           r"en-xa, xa-en get no validation loss and are left out of its average"):
        meta = prepare(quick_cfg(corpus, tmp_path / "out", direction="both"))
    assert any("pair xa has no dev data" in w for w in meta["warnings"])
    assert meta["pairs"]["xa"]["dev"] == 0 and len(open_split(tmp_path / "out", "xa", "dev", "en")) == 0


def test_bom_is_stripped_from_raw_references_like_the_tokens(tmp_path):
    corpus = small_corpus(tmp_path / "c", codes=("xa",))
    d = corpus / "xa-en"
    originals = {}
    for name in ("dev.xa", "dev.en", "test.en", "train.en"):
        lines = read_lines(d / name)
        originals[name] = lines
        if name == "dev.en":  # a second file concatenated with its own BOM: line 6 starts with one
            lines = lines[:5] + ["\ufeff" + lines[5]] + lines[6:]
        (d / name).write_bytes(b"\xef\xbb\xbf" + "".join(s + "\n" for s in lines).encode("utf-8"))
    out = tmp_path / "out"
    meta = prepare(quick_cfg(corpus, out, len_unit="chars"))
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    for split, lang in (("dev", "xa"), ("dev", "en"), ("test", "en")):
        raw = load_raw(out, "xa", split, lang)
        assert raw == originals[f"{split}.{lang}"], (split, lang)
        assert not (out / "raw" / f"xa.{split}.{lang}").read_bytes().startswith(b"\xef\xbb\xbf")
        toks = open_split(out, "xa", split, lang)
        assert [t.tolist() for t in toks] == sp.encode(raw)  # tokens and references: the same text
    assert meta["pairs"]["xa"]["train"] == 120  # no line made too long or unequal by a BOM
    assert scan_file(d / "dev.en", 3).lines == 10
    (tmp_path / "bom_only").write_bytes(b"\xef\xbb\xbf")
    assert scan_file(tmp_path / "bom_only", 3).lines == 0


def test_nul_byte_is_refused_naming_file_and_line(tmp_path):
    corpus = small_corpus(tmp_path / "c")
    path = corpus / "xb-en" / "dev.en"
    lines = path.read_bytes().split(b"\n")
    offset = sum(len(x) + 1 for x in lines[:3]) + 2
    lines[3] = lines[3][:2] + b"\x00" + lines[3][2:]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(NulByteError, match=rf"xb-en/dev\.en: NUL byte on line 4 at byte offset {offset} \(byte 2 of "
                                           r"the line\).*UTF-16"):
        prepare(quick_cfg(corpus, tmp_path / "out", workers=2))
    assert not (tmp_path / "out").exists()


def test_symlink_loops_in_the_corpus_tree_are_skipped_with_a_warning(tmp_path):
    corpus = small_corpus(tmp_path / "c")
    os.symlink("xc-en", corpus / "xc-en")  # loops on itself
    os.symlink("nowhere", corpus / "xd-en")  # dangles
    os.symlink(".", corpus / "xe-en")  # back to the corpus root
    (corpus / "notes").mkdir()  # the warning other skipped directories get
    with pytest.warns(CorpusWarning) as record:
        c = discover(corpus)
    assert [p.code for p in c.pairs] == ["xa", "xb"]
    messages = [str(w.message) for w in record]
    assert any(re.match(rf"ignoring {re.escape(str(corpus))}/notes: not an English-centric", m) for m in messages)
    assert any(re.match(rf"ignoring {re.escape(str(corpus))}/xc-en: a symbolic link loop \(xc-en -> xc-en", m)
               for m in messages), messages
    assert any(re.match(r"ignoring .*/xd-en: a dangling symbolic link \(to nowhere", m) for m in messages), messages
    assert any(re.match(r"ignoring .*/xe-en: a symbolic link to .*, which contains it \(a loop\)", m)
               for m in messages), messages
    # A looping file where a split should be is named as such, not as "missing".
    (corpus / "xa-en" / "test.xa").unlink()
    os.symlink("test.xa", corpus / "xa-en" / "test.xa")
    with pytest.raises(MissingFileError, match=r"xa-en/test\.xa is a symbolic link loop"):
        discover(corpus)


def test_worker_count_does_not_change_the_output(tmp_path):
    """PrepareConfig.fingerprint leaves out --workers: the SentencePiece model and the binarized data must not
    depend on it. (SentencePiece trained with num_threads=workers gave a different model per worker count.)"""
    corpus = small_corpus(tmp_path / "c", n_train=200)
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        prepare(quick_cfg(corpus, out, workers=workers, chunk_lines=70))
        outs[workers] = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
                         if p.is_file() and p.name != "meta.json"}
    assert (tmp_path / "out1" / "spm.model").read_bytes() == (tmp_path / "out2" / "spm.model").read_bytes()
    assert outs[1] == outs[2]
    meta = [load_meta(tmp_path / f"out{w}") for w in (1, 2)]
    for m in meta:
        m.pop("prepare_seconds")
    assert meta[0] == meta[1] and meta[0]["spm"]["num_threads"] == 16
