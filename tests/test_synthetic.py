"""Tests of the synthetic multilingual corpus generator."""
from __future__ import annotations

import csv
import itertools
import random
import unicodedata
from collections import defaultdict
from pathlib import Path

import pytest

from data_pipeline.corpus import discover
from data_pipeline.synthetic import (
    ADJECTIVES, NOUNS, VERBS, assign_sizes, build_languages, english, generate_corpus, main, sample_clause,
)

SMALL = dict(min_size=5, max_size=5000, dev_size=20, test_size=20)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "a"
    generate_corpus(out, seed=0, **SMALL)
    return out


def read_tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(corpus, tmp_path):
    again = tmp_path / "b"
    generate_corpus(again, seed=0, workers=2, **SMALL)  # worker count must not matter either
    assert all_files(again) == all_files(corpus)
    other = tmp_path / "c"
    generate_corpus(other, seed=1, langs=["qaa", "qhd"], **SMALL)
    assert (other / "qhd-en" / "train.qhd").read_bytes() != (corpus / "qhd-en" / "train.qhd").read_bytes()


def test_languages_families_typology_and_sizes(corpus):
    rows = read_tsv(corpus / "langs.tsv")
    assert list(rows[0]) == ["code", "family", "script", "word_order", "morphology", "train", "dev", "test"]
    assert len(rows) >= 24
    assert len({r["code"] for r in rows}) == len(rows)
    assert all(len(r["code"]) == 3 and "qaa" <= r["code"] <= "qtz" for r in rows)  # ISO 639-3 private use
    assert len({r["family"] for r in rows}) >= 6
    assert len({r["script"] for r in rows}) >= 6
    assert len({r["word_order"] for r in rows}) >= 5
    assert {"isolating", "suffixing", "prefixing"} <= {r["morphology"] for r in rows}
    by_family = defaultdict(set)
    for r in rows:
        by_family[r["family"]].add((r["script"], r["word_order"], r["morphology"]))
    assert all(len(v) == 1 for v in by_family.values())  # members share typology and script
    sizes = [int(r["train"]) for r in rows]
    assert max(sizes) / min(sizes) >= 1000
    for r in rows:  # the files hold what langs.tsv says
        d = corpus / f"{r['code']}-en"
        for split in ("train", "dev", "test"):
            n = len(lines(d / f"{split}.en"))
            assert n == len(lines(d / f"{split}.{r['code']}")) == int(r[split])
    # every family has both high- and low-resource members
    fam_sizes = defaultdict(list)
    for r in rows:
        fam_sizes[r["family"]].append(int(r["train"]))
    assert all(max(v) / min(v) >= 10 for v in fam_sizes.values())


def test_default_sizes_span_three_orders_of_magnitude():
    sizes = assign_sizes(build_languages(0), 50, 50_000)
    assert min(sizes.values()) == 50 and max(sizes.values()) == 50_000 and len(sizes) >= 24


def _script_of(ch: str) -> str:
    return unicodedata.name(ch, "?").split()[0]


def test_each_family_writes_in_its_own_script(corpus):
    rows = read_tsv(corpus / "langs.tsv")
    for r in rows:
        text = "".join(lines(corpus / f"{r['code']}-en" / f"dev.{r['code']}"))
        letters = [ch for ch in text if unicodedata.category(ch)[0] in "LM"]
        share = sum(_script_of(ch) == r["script"].upper() for ch in letters) / len(letters)
        assert share > 0.98, (r["code"], r["script"], share)
        if r["script"] != "latin":
            assert not any("a" <= ch <= "z" for ch in text), r["code"]


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_family_members_share_roots():
    langs = build_languages(0)
    lemmas = list(NOUNS) + list(VERBS) + ADJECTIVES

    def distance(a, b) -> float:
        return sum(_edit_distance(a.forms[w], b.forms[w]) / max(len(a.forms[w]), len(b.forms[w]))
                   for w in lemmas) / len(lemmas)

    within, across = [], []
    for a, b in itertools.combinations(langs, 2):
        (within if a.family is b.family else across).append(distance(a, b))
        if a.family is b.family:
            assert a.forms != b.forms, (a.code, b.code)  # related, not identical
    assert max(within) < 0.5 < 0.7 < min(across)


def test_translation_is_a_function_of_english(corpus):
    for code in ("qad", "qfd", "qgc", "qhd"):
        d = corpus / f"{code}-en"
        en, xx = lines(d / "train.en"), lines(d / f"train.{code}")
        seen: dict[str, str] = {}
        for e, x in zip(en, xx):
            assert seen.setdefault(e, x) == x
        assert all(4 <= len(e.split()) <= 15 for e in en)
        held_out = set(lines(d / "dev.en")) | set(lines(d / "test.en"))
        assert not held_out & set(en)


def test_grammar_has_small_vocabulary_and_regular_english():
    rng = random.Random(0)
    words = set()
    for _ in range(3000):
        words.update(english(sample_clause(rng)).lower().rstrip(".").split())
    assert 100 <= len(NOUNS) + len(VERBS) + len(ADJECTIVES) <= 300
    assert len(words) < 600
    assert english(sample_clause(random.Random(5))) == english(sample_clause(random.Random(5)))


def test_cli_and_prepare_accept_it(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--seed", "0", "--min-size", "5", "--max-size", "50",
                 "--dev-size", "3", "--test-size", "3", "--pairs", "qaa,qgb"]) == 0
    assert "wrote 2 languages" in capsys.readouterr().out
    c = discover(out)
    assert c.layout == "plain" and [p.code for p in c.pairs] == ["qaa", "qgb"]
    assert set(c.pairs[0].splits) == {"train", "dev", "test"}
    assert main(["--out", str(tmp_path / "x"), "--pairs", "zzz"]) == 2
