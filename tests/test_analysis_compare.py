"""python -m megavac.analysis compare: per-language deltas, resource-group averages, outputs and errors on
hand-written results JSONs in launch/evaluate.py's format."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from megavac.analysis.__main__ import main
from megavac.analysis.compare import compare

# language: (train pairs, recorded group) as evaluate.py writes them (low < 100k <= medium < 1M <= high)
LANGS = {"en-de": (4_000_000, "high"), "en-fr": (1_500_000, "high"), "en-hi": (300_000, "medium"),
         "en-gu": (50_000, "low"), "en-yo": (8_000, "low")}


def results(path: Path, scores: dict, split="test", step=100, drop=(), extra=None) -> Path:
    """A results JSON with the fields launch/evaluate.py writes (the ones compare reads, and more)."""
    langs = {}
    for name, (n, group) in LANGS.items():
        if name in drop:
            continue
        bleu, chrf = scores[name]
        langs[name] = {"bleu": bleu, "chrf": chrf, "n": 500, "group": group, "tokenizer": "13a", "train_pairs": n,
                       "direction": "en-xx", "split": split, "hyp_file": f"hyp.{name}.{split}.txt", "sent_per_s": 10.0}
    langs.update(extra or {})
    r = {"checkpoint": str(path.parent / "checkpoints" / f"step_{step}"), "tag": f"step_{step}", "step": step,
         "kind": "checkpoint", "data_dir": "/data/x", "split": split, "search": {"beam": 5},
         "thresholds": {"low": 100_000, "high": 1_000_000}, "langs": langs, "groups": {}, "groups_by_direction": {},
         "signatures": {"bleu": {}, "chrf": None}, "skipped": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=2))
    return path


BASE = {"en-de": (30.0, 55.0), "en-fr": (35.0, 60.0), "en-hi": (15.0, 40.0), "en-gu": (5.0, 25.0), "en-yo": (2.0, 18.0)}
GV = {"en-de": (29.5, 54.0), "en-fr": (35.5, 60.2), "en-hi": (16.0, 41.0), "en-gu": (7.0, 28.0), "en-yo": (3.5, 20.0)}
CATS = {"en-de": (30.0, 55.5), "en-fr": (34.0, 59.0), "en-hi": (15.0, 40.0), "en-gu": (6.0, 26.0), "en-yo": (1.0, 17.0)}


@pytest.fixture
def three(tmp_path):
    return [results(tmp_path / "t5" / "eval.json", BASE), results(tmp_path / "gradvac" / "eval.json", GV),
            results(tmp_path / "cats" / "eval.json", CATS)]


def test_deltas_and_groups(three, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", *map(str, three), "--names", "T=5", "GradVac", "CATS", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    for name in ("en-de", "en-yo", "GradVac", "CATS", "+2.00", "-0.50", "low", "high"):
        assert name in stdout
    assert str(out / "delta_vs_size.png") in stdout and str(out / "compare.csv") in stdout
    res = json.loads((out / "compare.json").read_text())
    assert res["baseline"] == "T=5" and res["split"] == "test"
    rows = {r["language"]: r for r in res["langs"]}
    assert [r["language"] for r in res["langs"]] == list(LANGS)  # largest training set first
    for name in LANGS:
        for run, sc in (("GradVac", GV), ("CATS", CATS), ("T=5", BASE)):
            s = rows[name]["scores"][run]
            assert (s["bleu"], s["chrf"]) == sc[name]
            assert s["d_bleu"] == pytest.approx(sc[name][0] - BASE[name][0])
            assert s["d_chrf"] == pytest.approx(sc[name][1] - BASE[name][1])
        assert rows[name]["group"] == LANGS[name][1] and rows[name]["train_pairs"] == LANGS[name][0]
    g = res["groups"]
    assert {k: g[k]["n"] for k in g} == {"low": 2, "medium": 1, "high": 2, "all": 5}
    assert g["low"]["GradVac"]["d_bleu"] == pytest.approx(((7 - 5) + (3.5 - 2)) / 2)
    assert g["high"]["GradVac"]["d_bleu"] == pytest.approx(((29.5 - 30) + (35.5 - 35)) / 2)
    assert g["low"]["CATS"]["d_chrf"] == pytest.approx(((26 - 25) + (17 - 18)) / 2)
    assert g["all"]["T=5"]["bleu"] == pytest.approx(sum(b for b, _ in BASE.values()) / 5)
    assert g["low"]["GradVac"]["improved_bleu"] == 2 and g["high"]["GradVac"]["improved_bleu"] == 1
    assert g["all"]["CATS"]["improved_bleu"] == 1 and g["all"]["CATS"]["improved_chrf"] == 2
    assert g["all"]["T=5"]["d_bleu"] == 0

    with open(out / "compare.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["language"] for r in table] == list(LANGS)
    assert float(table[3]["GradVac_d_bleu"]) == pytest.approx(2.0) and "T=5_d_bleu" not in table[0]
    assert (out / "delta_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_by_name_or_index_and_regrouping(three):
    by_name = compare(three, baseline="gradvac/eval")  # default names: folder/stem when the stems repeat
    by_index = compare(three, baseline="1")
    assert by_name["baseline"] == by_index["baseline"] == "gradvac/eval"
    de = by_index["langs"][0]["scores"]
    assert de["t5/eval"]["d_bleu"] == pytest.approx(30.0 - 29.5) and de["gradvac/eval"]["d_bleu"] == 0
    # Tertiles by rank (synthetic-scale data, where every language is below evaluation's 100k): 1 low, 1 high.
    t = compare(three, resource_mode="tertiles")
    assert [r["group"] for r in t["langs"]] == ["high", "medium", "medium", "medium", "low"]
    th = compare(three, resource_mode="thresholds", low=10_000, high=2_000_000)
    assert [r["group"] for r in th["langs"]] == ["high", "medium", "medium", "medium", "low"]


def one_line(capsys, argv, *needles):
    rc = main(["compare", *map(str, argv)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_errors_are_one_line(three, tmp_path, capsys):
    fewer = results(tmp_path / "fewer" / "eval.json", GV, drop=("en-yo",))
    one_line(capsys, [three[0], fewer], "different language sets", f"{fewer} lacks en-yo", "--langs")
    more = results(tmp_path / "more" / "eval.json", GV, extra={"en-zu": dict(bleu=1, chrf=2, train_pairs=10, group="low")})
    one_line(capsys, [three[0], more], "different language sets", "has en-zu that")
    dev = results(tmp_path / "dev" / "eval.json", GV, split="dev")
    one_line(capsys, [three[0], dev], "different splits", "'test'", "'dev'", str(dev))
    one_line(capsys, [three[0]], "at least two")
    one_line(capsys, [*three, "--baseline", "nope"], "--baseline 'nope'", "t5/eval")
    one_line(capsys, [*three, "--names", "a", "b"], "2 names for 3")
    one_line(capsys, [three[0], tmp_path / "missing.json"], "missing.json does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    one_line(capsys, [three[0], bad], "not a results JSON")
