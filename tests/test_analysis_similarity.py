"""python -m megavac.analysis similarity: the figures' data against the logged Grams of a real run, clustering and
the Spearman summary on Grams of known family structure, families of real codes (Glottolog via URIEL+), errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, launch_env
from megavac.analysis import similarity as sim
from megavac.analysis.__main__ import main
from megavac.analysis.families import genetic_distance, resolve_families, synthetic_family

PNG = b"\x89PNG\r\n\x1a\n"


def cli(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def write_gram_log(grams_dir: Path, step: int, gram: np.ndarray, groups: list[str], langs: list[str],
                   granularity="all_layer", method="gradvac", present=None):
    """A Gram log exactly as megavac.pergrad.gram_step.PerLanguageStep._log_gram writes it."""
    grams_dir.mkdir(parents=True, exist_ok=True)
    G, K = len(groups), len(langs)
    if present is None:
        present = np.diagonal(gram.sum(0)) > 0
    np.savez(grams_dir / f"gram_{step:08d}.npz", step=step, gram=gram, weights=np.ones((G, K)), present=present,
             losses=np.ones(K), groups=np.array(groups), langs=np.array(langs), granularity=granularity, method=method)


def fake_run(root: Path, codes: list[str], sizes: list[int], corpus_rows: list[dict] | None = None) -> Path:
    """A run dir (config.json) whose data dir has a meta.json describing en-<code> languages."""
    data = root / "data"
    data.mkdir(parents=True)
    corpus = root / "corpus"
    corpus.mkdir()
    if corpus_rows:
        cols = list(corpus_rows[0])
        (corpus / "langs.tsv").write_text("\t".join(cols) + "\n" + "".join(
            "\t".join(str(r[c]) for c in cols) + "\n" for r in corpus_rows))
    meta = {"format_version": 1, "vocab_size": 100, "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
            "corpus": str(corpus), "langs": codes,
            "pairs": {c: {"train": n, "train_raw": n} for c, n in zip(codes, sizes)},
            "tasks": [{"name": f"en-{c}", "pair": c, "src": "en", "tgt": c, "tag_id": 5 + i} for i, c in enumerate(codes)]}
    (data / "meta.json").write_text(json.dumps(meta))
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": {"data_dir": str(data), "synthetic_dir": "unused"}}))
    return run


def structured_grams(families: list[str], groups: int, rng, noise=0.3, dim=48) -> np.ndarray:
    """[G, K, K] Grams of vectors = family centroid + small noise (per group)."""
    cent = {f: rng.normal(size=(groups, dim)) for f in sorted(set(families))}
    v = np.stack([cent[f] + noise * rng.normal(size=(groups, dim)) for f in families], 1)
    return np.einsum("gkd,gjd->gkj", v, v)


# ------------------------------------------------------------------------------------------ a real run


@pytest.fixture(scope="module")
def real_run(small_synthetic, tmp_path_factory) -> Path:
    """3 steps of GradVac (all_layer) on the 6-language synthetic fixture, a Gram log every step."""
    save = tmp_path_factory.mktemp("simrun") / "run"
    cmd = [sys.executable, "launch/train.py", "--ds_config", "ds_configs/zero2.json", "--data-dir", small_synthetic,
           "--save-dir", save, "--model", "tiny", "--max-tokens", "1024", "--lr", "2e-3", "--warmup-steps", "4",
           "--log-interval", "1", "--valid-interval", "1000", "--valid-max-tokens", "2048", "--method", "gradvac",
           "--granularity", "all_layer", "--gram-log-interval", "1", "--max-steps", "3"]
    p = subprocess.run([str(c) for c in cmd], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert len(list((save / "grams").glob("gram_*.npz"))) == 3
    return save


def test_real_run_figures_show_the_logged_grams(real_run, tmp_path, capsys):
    out = tmp_path / "sim"
    rc, stdout, err = cli(["similarity", str(real_run), "--out", str(out)], capsys)
    assert rc == 0, err
    res = json.loads((out / "similarity.json").read_text())
    for name in ("heatmaps_step1.png", "heatmaps_step2.png", "heatmaps_step3.png", "layers_over_steps.png",
                 "layers_profile.png", "dendrogram.png", "magnitude_similarity.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert str(out / name) in stdout  # it says where everything went
    assert res["steps"] == [1, 2, 3] and res["heatmap_steps"] == [1, 2, 3]
    assert res["method"] == "gradvac" and res["granularity"] == "all_layer"
    # Families from the synthetic corpus's langs.tsv (its generator's), sizes from meta.json.
    fams = {lang["pair"]: lang["family"] for lang in res["langs"]}
    assert fams == {c: synthetic_family(c) for c in fams} and len(set(fams.values())) == 3
    assert {lang["family_source"] for lang in res["langs"]} == {"corpus langs.tsv"}
    assert sorted(lang["train_pairs"] for lang in res["langs"]) == [60, 120, 300, 600, 1500, 3000]

    order = res["ordered_langs"]
    for step in (1, 2, 3):
        with np.load(real_run / "grams" / f"gram_{step:08d}.npz") as d:
            gram, groups, langs = d["gram"], [str(g) for g in d["groups"]], [str(x) for x in d["langs"]]
        idx = [langs.index(n) for n in order]
        h = res["heatmaps"][str(step)]
        for gi, g in enumerate(groups + ["model"]):
            G = gram.sum(0) if g == "model" else gram[gi]
            shown = np.array([[np.nan if v is None else v for v in row] for row in h["cos"][g]])
            for a, i in enumerate(idx):
                for b, j in enumerate(idx):
                    if G[i, i] > 0 and G[j, j] > 0:
                        assert shown[a, b] == pytest.approx(G[i, j] / np.sqrt(G[i, i] * G[j, j]), rel=1e-12, abs=1e-12)
                    else:  # a language absent from the step has no direction
                        assert np.isnan(shown[a, b])
        # CATS magnitude similarity of the whole model, element by element from the formula.
        W = gram.sum(0)
        gamma = np.array([[np.nan if v is None else v for v in row] for row in h["gamma"]])
        for a, i in enumerate(idx):
            for b, j in enumerate(idx):
                if W[i, i] > 0 and W[j, j] > 0:
                    ni, nj = np.sqrt(W[i, i]), np.sqrt(W[j, j])
                    assert gamma[a, b] == pytest.approx(2 * ni * nj / (ni ** 2 + nj ** 2), rel=1e-12)
    # The curves are means of those cosines over the pairs of each set.
    c = res["curves"]["mean_cos"]
    assert set(c) == set(sim.SUBSETS) and set(c["all"]) == set(groups) | {"model"}
    with np.load(real_run / "grams" / "gram_00000003.npz") as d:
        cos3 = sim.cosine(d["gram"][0])
    upper = cos3[np.triu_indices(6, 1)]
    assert c["all"]["embed"][2] == pytest.approx(float(np.nanmean(upper)), rel=1e-12)
    s = res["summary"]
    assert s["family_spearman"] is not None and -1 <= s["family_spearman"] <= 1
    assert s["genetic_distance_spearman"] is None  # synthetic families have no Glottolog lineage


def test_cluster_order_and_steps(real_run, tmp_path, capsys):
    out = tmp_path / "c"
    rc, _, err = cli(["similarity", str(real_run), "--order", "cluster", "--steps", "3", "--out", str(out)], capsys)
    assert rc == 0, err
    res = json.loads((out / "similarity.json").read_text())
    assert res["heatmap_steps"] == [3] and list(res["heatmaps"]) == ["3"]
    assert res["ordered_langs"] == res["dendrogram"]["leaves"]
    rc, _, err = cli(["similarity", str(real_run), "--steps", "7", "--out", str(out)], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no Gram log for step [7]" in err and "logged: 1, 2, 3" in err


# ------------------------------------------------------------------------------------------ known structure


REAL = {  # code: (family, ISO 639-3 column of langs.tsv)
    "deu": "Indo-European", "nld": "Indo-European", "swe": "Indo-European", "fra": "Indo-European",
    "spa": "Indo-European", "rus": "Indo-European", "ara": "Afro-Asiatic", "heb": "Afro-Asiatic",
    "amh": "Afro-Asiatic", "fin": "Uralic", "hun": "Uralic", "est": "Uralic", "zho_CN": "Sino-Tibetan",
    "mya": "Sino-Tibetan", "tur": "Turkic", "kaz": "Turkic",
}


def test_families_of_real_codes_from_glottolog():
    fams = resolve_families(list(REAL))
    assert {c: f.family for c, f in fams.items()} == REAL
    assert fams["ara"].iso639_3 == "arb" and fams["zho_CN"].iso639_3 == "cmn"  # macrolanguages: a member
    assert {f.source for f in fams.values()} == {"Glottolog (URIEL+)"}
    two = resolve_families(["de", "nl", "ja", "eu", "sh"])  # ISO 639-1 (OPUS-100) codes
    assert [two[c].family for c in ("de", "nl", "ja", "eu", "sh")] == [
        "Indo-European", "Indo-European", "Japonic", "Basque", "Indo-European"]
    d = genetic_distance
    assert d(fams["deu"], fams["deu"]) == 0
    assert d(fams["deu"], fams["nld"]) < d(fams["deu"], fams["rus"]) < d(fams["deu"], fams["fin"]) == 1


def test_every_code_of_the_shared_corpora_has_a_family():
    from conftest import shared_data

    from megavac.analysis.families import read_corpus_langs

    root = shared_data()
    if root is None or not (root / "ntrex128" / "langs.tsv").is_file():
        pytest.skip("the shared NTREX-128 / Tatoeba corpora are not beside the project")
    ntrex = resolve_families(list(read_corpus_langs(root / "ntrex128")), root / "ntrex128")
    assert len(ntrex) == 124 and ntrex["aze_Latn"].family == "Turkic" and ntrex["zho_TW"].family == "Sino-Tibetan"
    assert genetic_distance(ntrex["fra"], ntrex["fra_CA"]) == 0  # one language, two codes
    codes = list(read_corpus_langs(root / "tatoeba_challenge"))
    with pytest.raises(ValueError, match="unknown language code 'toki'.*--families FILE"):
        resolve_families(codes, root / "tatoeba_challenge")  # Toki Pona: not in Glottolog
    tat = resolve_families(codes, root / "tatoeba_challenge", extra={"toki": "Artificial Language"})
    assert tat["ber"].family == "Afro-Asiatic" and tat["epo"].family == "Artificial Language"


def test_clustering_recovers_families_and_spearman(tmp_path, capsys):
    rng = np.random.default_rng(0)
    codes = list(REAL)
    families = list(REAL.values())
    sizes = [int(x) for x in np.geomspace(100, 2_000_000, len(codes))]
    rows = [{"code": c, "iso639_3": c.split("_")[0]} for c in codes]
    groups = ["embed", "encoder.0", "encoder.1", "decoder.0", "decoder.1"]
    run = fake_run(tmp_path / "s", codes, sizes, rows)
    for step in (10, 20, 30, 40):
        write_gram_log(run / "grams", step, structured_grams(families, len(groups), rng), groups, [f"en-{c}" for c in codes])
    rc, _, err = cli(["similarity", str(run), "--order", "cluster", "--resource-groups", "thresholds"], capsys)
    assert rc == 0, err
    res = json.loads((run / "analysis" / "similarity" / "similarity.json").read_text())
    s = res["summary"]
    assert s["family_ari"] == 1.0  # the dendrogram cut into 5 clusters is the families
    clusters = res["dendrogram"]["clusters"]
    by_cluster = {}
    for lang in res["langs"]:
        by_cluster.setdefault(clusters[lang["name"]], set()).add(lang["family"])
    assert all(len(f) == 1 for f in by_cluster.values()) and len(by_cluster) == 5
    # Every within-family pair is more similar than every across-family pair: ρ is the most a 0/1 indicator allows.
    assert s["family_spearman"] == pytest.approx(s["family_spearman_max"], rel=1e-9) and s["spearman_steps"] == 4
    p = 23 / 120  # within-family share of the 120 pairs (families of 6, 3, 3, 2, 2)
    assert s["family_spearman"] == pytest.approx(np.sqrt(3 * p * (1 - p)), abs=0.03)
    assert s["genetic_distance_spearman"] < -0.6  # similarity falls with Glottolog distance
    assert s["family_spearman_of_mean_cos"] == pytest.approx(s["family_spearman_max"], abs=0.01)
    assert all(r == pytest.approx(s["family_spearman_max"], abs=0.01)
               for r in s["family_spearman_of_mean_cos_per_group"].values())
    assert s["mean_cos_within_family"] > 0.8 > 0.2 > abs(s["mean_cos_across_family"])
    # Thresholds as in evaluation: < 100k low, >= 1M high.
    assert {lang["resource"] for lang in res["langs"] if lang["train_pairs"] < 100_000} == {"low"}
    assert {lang["resource"] for lang in res["langs"] if lang["train_pairs"] >= 1_000_000} == {"high"}
    # Leaves of one family are contiguous in the cluster order.
    fam_of = {lang["name"]: lang["family"] for lang in res["langs"]}
    seq = [fam_of[n] for n in res["ordered_langs"]]
    assert sum(a != b for a, b in zip(seq, seq[1:])) == 4

    # Random Grams: the Spearman number is about 0.
    run2 = fake_run(tmp_path / "r", codes, sizes, rows)
    for step in range(1, 31):
        v = rng.normal(size=(1, len(codes), 48))
        write_gram_log(run2 / "grams", step, np.einsum("gkd,gjd->gkj", v, v), ["model"], [f"en-{c}" for c in codes],
                       granularity="whole_model")
    res2 = sim.analyse(run2)
    assert abs(res2["summary"]["family_spearman"]) < 0.1
    assert abs(res2["summary"]["genetic_distance_spearman"]) < 0.1
    assert abs(res2["summary"]["family_spearman_of_mean_cos"]) < 0.2


def test_cluster_and_adjusted_rand_directly():
    rng = np.random.default_rng(1)
    fams = ["a"] * 4 + ["b"] * 3 + ["c"] * 5
    gram = structured_grams(fams, 1, rng, noise=0.2)[0]
    z, leaves = sim.cluster(sim.cosine(gram))
    assert sorted(leaves) == list(range(12))
    assert sim.adjusted_rand(fams, sim.cut_clusters(z, 3)) == 1.0
    assert sim.adjusted_rand([1, 1, 2, 2], ["x", "x", "y", "y"]) == 1.0
    assert sim.adjusted_rand([1, 1, 2, 2], [1, 2, 1, 2]) < 0


def test_cosine_magnitude_and_absent_languages():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(4, 10))
    v[2] = 0  # absent: no gradient
    gram = v @ v.T
    cos = sim.cosine(gram)
    n = np.linalg.norm(v, axis=1)
    for i in (0, 1, 3):
        for j in (0, 1, 3):
            assert cos[i, j] == pytest.approx(v[i] @ v[j] / (n[i] * n[j]))
    assert np.isnan(cos[2]).all() and np.isnan(cos[:, 2]).all()
    gamma = sim.magnitude_similarity(gram)
    assert gamma[0, 1] == pytest.approx(2 * n[0] * n[1] / (n[0] ** 2 + n[1] ** 2))
    assert gamma[0, 0] == pytest.approx(1.0) and np.isnan(gamma[2, 0])
    stacked = sim.cosine(np.stack([gram, 2 * gram]))  # batched over leading axes, scale-free
    assert np.allclose(stacked[0], stacked[1], equal_nan=True)


def test_all_matrix_logs_are_summed_into_layers():
    names = ["embed.weight", "encoder.0.attn.q.weight", "encoder.0.ff.w1.weight", "encoder.1.attn.q.weight",
             "enc_norm.weight", "decoder.0.attn.q.weight"]
    view, index = sim.layer_view(names, "all_matrix")
    assert view == ["embed", "encoder.0", "encoder.1", "encoder.norm", "decoder.0"]
    g = np.arange(len(names) * 4, dtype=float).reshape(len(names), 2, 2)
    agg = sim.aggregate(g, index, len(view))
    assert np.array_equal(agg[1], g[1] + g[2]) and np.array_equal(agg[0], g[0])
    assert sim.resource_classes([5, 1, 3, 9, 7, 2]) == ["medium", "low", "medium", "high", "high", "low"]


# ------------------------------------------------------------------------------------------ errors


def one_line_error(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_errors_are_one_line(tmp_path, capsys):
    run = fake_run(tmp_path / "e", ["deu", "toki", "fra"], [10, 20, 30])
    rc, _, err = cli(["similarity", str(run)], capsys)
    one_line_error(rc, err, "no Gram logs", "--gram-log-interval N")
    rc, _, err = cli(["similarity", str(tmp_path / "nope")], capsys)
    one_line_error(rc, err, "does not exist")

    gram = np.stack([np.eye(3) + 0.1])
    write_gram_log(run / "grams", 5, gram, ["model"], ["en-deu", "en-toki", "en-fra"], granularity="whole_model")
    rc, _, err = cli(["similarity", str(run)], capsys)
    one_line_error(rc, err, "unknown language code 'toki'", "--families FILE")

    fam = tmp_path / "fam.tsv"
    fam.write_text("code\tfamily\ntoki\tArtificial Language\n")
    rc, out, err = cli(["similarity", str(run), "--families", str(fam), "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "o" / "similarity.json").read_text())
    by = {lang["pair"]: lang for lang in res["langs"]}
    assert by["toki"]["family"] == "Artificial Language" and by["toki"]["family_source"] == "families file"
    assert by["deu"]["family"] == "Indo-European"
    assert res["summary"]["genetic_distance_spearman"] is None  # not every language has a lineage

    # Gram logs naming languages the data dir lacks; a data dir that is gone.
    write_gram_log(run / "grams", 6, gram, ["model"], ["en-deu", "en-xx", "en-fra"], granularity="whole_model")
    (run / "grams" / "gram_00000005.npz").unlink()
    rc, _, err = cli(["similarity", str(run), "--families", str(fam)], capsys)
    one_line_error(rc, err, "['en-xx']", "--data-dir")
    (run / "config.json").write_text(json.dumps({"data": {"data_dir": str(tmp_path / "gone")}}))
    rc, _, err = cli(["similarity", str(run)], capsys)
    one_line_error(rc, err, "pass --data-dir")


def test_synthetic_families_without_the_corpus(tmp_path):
    # The prepared dir's corpus may be gone: synthetic codes still have the generator's families.
    fams = resolve_families(["qaa", "qab", "qba"], corpus_dir=tmp_path / "gone")
    assert [fams[c].family for c in ("qaa", "qab", "qba")] == ["Aurelic", "Aurelic", "Borean"]
    assert {f.source for f in fams.values()} == {"synthetic generator"}
    with pytest.raises(ValueError, match="unknown language code 'qzz'"):
        resolve_families(["qzz"])
