"""Gradient similarity between languages from a run's Gram logs: heatmaps, per-layer curves, dendrogram.

    python -m megavac.analysis similarity runs/x                       # first, middle and last Gram log
    python -m megavac.analysis similarity runs/x --steps 1000 5000 --order cluster --out figs/
    python -m megavac.analysis similarity runs/x --families fam.tsv     # codes Glottolog does not know

The run must have been trained with ``--gram-log-interval N`` (any method; ``--granularity all_layer`` for
the per-layer figures): every N-th update saves ``RUN_DIR/grams/gram_<step>.npz`` (docs/design.md §2.6), the
per-group K×K Gram G_ij = g_i·g_j of the languages' gradients. Everything here comes from those Grams (GradVac, Wang et al. 2021, §2; CATS, Li & Gong
2021):

* cosine similarity cos_ij = G_ij / √(G_ii G_jj), for languages present in the step (G_ii > 0; others NaN);
* CATS's gradient magnitude similarity γ_ij = 2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²), ‖g_i‖ = √G_ii;
* the whole model's Gram is the sum of the group Grams (the Gram of a concatenation is the sum of the parts'),
  and with ``all_matrix`` logs the per-tensor Grams are summed into layers (``megavac.model.groups``) for the
  per-layer figures.

Languages are described from the run's data dir (``RUN_DIR/config.json`` → ``meta.json``; ``--data-dir``
overrides): each language (translation direction) has its pair's code, family (``megavac.analysis.families``:
``--families FILE``, the corpus's ``langs.tsv``, the synthetic generator, Glottolog via URIEL+) and training
size (``train_raw`` pairs, as evaluation groups them). Resource classes: ``--resource-groups tertiles``
(default; the third of languages with the fewest training pairs is low, the third with the most high, by
rank) or ``thresholds`` (evaluation's: low < ``--low-threshold`` 100k ≤ medium < ``--high-threshold`` 1M ≤ high).

Output (``--out``, default ``RUN_DIR/analysis/similarity``):

* ``heatmaps_step<N>.png``: cosine heatmaps at each chosen step (``--steps``; default the first, middle and
  last log), one panel per group (layers) plus the whole model, languages in ``--order family`` (families by
  name, then training size, largest first) or ``cluster`` (the dendrogram's leaf order); a coloured strip marks
  each language's family.
* ``layers_over_steps.png``: mean pairwise cosine of every group over training, one panel per set of pairs
  (all, within family, across families, high-high, low-low, high-low resource); encoder groups in blues, decoder
  groups in reds, the whole model black. ``layers_profile.png``: the same means against depth (embed, encoder
  layers, decoder layers) at the chosen steps.
* ``dendrogram.png``: average-linkage clustering on 1 − cos of the whole model's cosine averaged over all
  logged steps (pairs never present together count as cos 0), leaves coloured by family.
* ``magnitude_similarity.png``: γ of the whole model at the chosen steps, same order.
* ``similarity.json``: the data behind every figure (matrices in the figure's order, NaN as null) and the
  summary: ``family_spearman``, Spearman's ρ between pairwise whole-model cosine and the same-family indicator,
  averaged over the logged steps (how well gradient similarity follows language families: > 0 when it does, ≈ 0
  when unrelated; against a 0/1 indicator ρ cannot reach 1: a perfect separation gives about √(3p(1 − p)), p the
  share of within-family pairs, reported as ``family_spearman_max``); ``genetic_distance_spearman``, ρ between cosine and Glottolog genetic distance where every
  language has one (< 0 when similarity follows proximity); ``family_ari``, adjusted Rand index between the
  families and the dendrogram cut into as many clusters (1 = the clustering recovers the families).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megavac.analysis import plots
from megavac.analysis.families import LangFamily, genetic_distance, resolve_families

SUBSETS = ("all", "within family", "across family", "high-high", "low-low", "high-low")
NO_LOGS_HINT = ("train with --gram-log-interval N to write one every N steps (any --method, monolithic too; "
                "--granularity all_layer for per-layer figures)")


# ------------------------------------------------------------------------------------------------ CLI


def _steps(text: str) -> list[int]:
    try:
        return [int(s) for s in re.split(r"[,\s]+", text.strip()) if s]
    except ValueError:
        raise ValueError(f"--steps takes step numbers, got {text!r}") from None


def add_args(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's --save-dir (with grams/gram_*.npz)")
    p.add_argument("--steps", nargs="+", default=None, metavar="STEP",
                   help="steps of the heatmaps (space- or comma-separated; default: first, middle and last log)")
    p.add_argument("--order", choices=("family", "cluster"), default="family",
                   help="language order of the heatmaps: by family, or by hierarchical clustering (default family)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/analysis/similarity)")
    p.add_argument("--data-dir", default=None, help="the run's prepared data dir (default: from RUN_DIR/config.json)")
    p.add_argument("--families", default=None, metavar="FILE",
                   help="TSV 'code<TAB>family' overriding/extending the built-in families")
    p.add_argument("--resource-groups", choices=("tertiles", "thresholds"), default="tertiles",
                   help="low/medium/high resource by rank (tertiles, default) or by --low/--high-threshold")
    p.add_argument("--low-threshold", type=int, default=100_000, help="thresholds: low resource below this many pairs")
    p.add_argument("--high-threshold", type=int, default=1_000_000, help="thresholds: high resource from this many")


def run(args) -> int:
    steps = [s for text in args.steps for s in _steps(text)] if args.steps else None
    result = analyse(args.run_dir, steps=steps, order=args.order, data_dir=args.data_dir, families_file=args.families,
                     resource_mode=args.resource_groups, low=args.low_threshold, high=args.high_threshold)
    out = Path(args.out) if args.out else Path(args.run_dir) / "analysis" / "similarity"
    written = write_outputs(result, out)
    s = result["summary"]
    print(f"{len(result['steps'])} Gram logs ({result['method']}, {result['granularity']}, "
          f"{len(result['langs'])} languages, {len(result['groups'])} groups) of {args.run_dir}")
    print(f"family_spearman {_fmt(s['family_spearman'])} (cosine vs same family, mean over {s['spearman_steps']} steps; "
          f"a perfect separation would give {_fmt(s['family_spearman_max'])})"
          f" | genetic_distance_spearman {_fmt(s['genetic_distance_spearman'])} | family_ari {_fmt(s['family_ari'])}")
    groups = ", ".join(f"{g} {_fmt(r)}" for g, r in s["family_spearman_of_mean_cos_per_group"].items())
    print(f"on cosines averaged over the steps: family_spearman {_fmt(s['family_spearman_of_mean_cos'])} | per group: {groups}")
    for what, path in written.items():
        print(f"{what}: {path}")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


# ------------------------------------------------------------------------------------------------ Grams


@dataclass
class GramLog:
    """One ``grams/gram_<step>.npz`` (written by ``megavac.pergrad.gram_step.PerLanguageStep._log_gram``)."""

    step: int
    gram: np.ndarray
    """float64 [G, K, K]."""
    groups: list[str]
    langs: list[str]
    granularity: str
    method: str
    present: np.ndarray
    losses: np.ndarray
    weights: np.ndarray


def gram_paths(run_dir) -> list[Path]:
    """The run's Gram logs ordered by step; ValueError (with how to get them) when there are none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run dir {str(run_dir)!r} does not exist")
    paths = [p for p in (run_dir / "grams").glob("gram_*.npz") if re.fullmatch(r"gram_\d+\.npz", p.name)]
    if not paths:
        raise ValueError(f"{run_dir} has no Gram logs (grams/gram_<step>.npz); {NO_LOGS_HINT}")
    return sorted(paths, key=lambda p: int(p.stem.split("_")[1]))


def read_gram_log(path) -> GramLog:
    try:
        with np.load(path, allow_pickle=False) as d:
            g = GramLog(step=int(d["step"]), gram=np.asarray(d["gram"], dtype=np.float64),
                        groups=[str(x) for x in d["groups"]], langs=[str(x) for x in d["langs"]],
                        granularity=str(d["granularity"]), method=str(d["method"]),
                        present=np.asarray(d["present"], dtype=bool), losses=np.asarray(d["losses"]),
                        weights=np.asarray(d["weights"]))
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path} is not a Gram log ({type(e).__name__}: {e})".replace("\n", " ")) from None
    G, K = len(g.groups), len(g.langs)
    if g.gram.shape != (G, K, K):
        raise ValueError(f"{path}: gram has shape {g.gram.shape}, expected {(G, K, K)} for {G} groups, {K} languages")
    return g


def present(gram: np.ndarray) -> np.ndarray:
    """bool [..., K]: G_kk finite and > 0 (the language has a gradient in this group/step; design §2.4)."""
    d = np.diagonal(gram, axis1=-2, axis2=-1)
    return np.isfinite(d) & (d > 0)


def cosine(gram: np.ndarray) -> np.ndarray:
    """cos_ij = G_ij / √(G_ii G_jj) over the last two axes; NaN where i or j is absent (or non-finite)."""
    gram = np.asarray(gram, dtype=np.float64)
    ok = present(gram)
    d = np.where(ok, np.diagonal(gram, axis1=-2, axis2=-1), np.nan)
    n = np.sqrt(d)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = gram / (n[..., :, None] * n[..., None, :])
    cos = np.where(ok[..., :, None] & ok[..., None, :] & np.isfinite(cos), cos, np.nan)
    return cos


def magnitude_similarity(gram: np.ndarray) -> np.ndarray:
    """CATS's γ_ij = 2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²) with ‖g_i‖² = G_ii; NaN where i or j is absent."""
    gram = np.asarray(gram, dtype=np.float64)
    ok = present(gram)
    sq = np.where(ok, np.diagonal(gram, axis1=-2, axis2=-1), np.nan)
    n = np.sqrt(sq)
    return 2 * n[..., :, None] * n[..., None, :] / (sq[..., :, None] + sq[..., None, :])


def layer_view(groups: list[str], granularity: str) -> tuple[list[str], np.ndarray]:
    """(group names of the per-layer figures, index [G] of each logged group among them): ``all_matrix``
    groups (parameter names) are summed into their ``all_layer`` layers; other granularities stay."""
    if granularity != "all_matrix":
        return list(groups), np.arange(len(groups))
    from megavac.model.groups import group_label

    names, index = [], []
    for g in groups:
        lab = group_label(g, "all_layer")
        if lab not in names:
            names.append(lab)
        index.append(names.index(lab))
    return names, np.asarray(index)


def aggregate(gram: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n,) + gram.shape[1:], dtype=np.float64)
    np.add.at(out, index, gram)
    return out


def group_side(name: str) -> str:
    """encoder / decoder / model (the whole model) / other (embedding and the like)."""
    head = name.split(".", 1)[0]
    if head in ("encoder", "enc_norm"):
        return "encoder"
    if head in ("decoder", "dec_norm"):
        return "decoder"
    return "model" if name == "model" else "other"


def _depth_key(name: str) -> tuple:
    """Order along the network: embed, encoder layers, encoder norm, decoder layers, decoder norm, the rest."""
    m = re.match(r"^(encoder|decoder)\.(\d+|norm)$", name)
    if m:
        side = 1 if m.group(1) == "encoder" else 2
        return side, (10 ** 6 if m.group(2) == "norm" else int(m.group(2)))
    if name in ("encoder", "decoder"):
        return (1 if name == "encoder" else 2), 0
    return (0 if name == "embed" else 3), 0


# ------------------------------------------------------------------------------------------------ languages


def resource_classes(sizes: list[int], mode: str = "tertiles", low: int = 100_000, high: int = 1_000_000) -> list[str]:
    """low / medium / high per language: by rank (tertiles: the ⌊K/3⌋ (at least 1) smallest are low, as many
    largest high; ties by order) or by evaluation's thresholds."""
    if mode == "thresholds":
        return ["low" if n < low else ("high" if n >= high else "medium") for n in sizes]
    if mode != "tertiles":
        raise ValueError(f"resource groups must be tertiles or thresholds, got {mode!r}")
    k = len(sizes)
    third = max(1, k // 3) if k >= 2 else 0
    rank = np.argsort(np.asarray(sizes), kind="stable")
    out = ["medium"] * k
    for r, i in enumerate(rank):
        if r < third:
            out[i] = "low"
        elif r >= k - third:
            out[i] = "high"
    return out


def pair_subsets(families: list[str], resources: list[str]) -> dict[str, np.ndarray]:
    """bool [K, K] masks of the unordered pairs i < j in each of ``SUBSETS``."""
    k = len(families)
    upper = np.triu(np.ones((k, k), dtype=bool), 1)
    fam = np.asarray(families, dtype=object)
    res = np.asarray(resources, dtype=object)
    same = fam[:, None] == fam[None, :]
    hi, lo = res == "high", res == "low"
    return {
        "all": upper,
        "within family": upper & same,
        "across family": upper & ~same,
        "high-high": upper & hi[:, None] & hi[None, :],
        "low-low": upper & lo[:, None] & lo[None, :],
        "high-low": upper & ((hi[:, None] & lo[None, :]) | (lo[:, None] & hi[None, :])),
    }


def mean_over(mat: np.ndarray, mask: np.ndarray) -> float | None:
    v = mat[mask]
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's ρ of the finite pairs, None when undefined (fewer than 3, or a constant side)."""
    from scipy.stats import spearmanr

    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    rho = spearmanr(x, y).statistic
    return float(rho) if np.isfinite(rho) else None


def adjusted_rand(a: list, b: list) -> float:
    """Adjusted Rand index of two partitions (Hubert & Arabie 1985); 1 = identical partitions."""
    _, ai = np.unique(np.asarray(a, dtype=str), return_inverse=True)
    _, bi = np.unique(np.asarray(b, dtype=str), return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    comb = lambda n: n * (n - 1) / 2  # noqa: E731
    index = comb(table).sum()
    sa, sb, total = comb(table.sum(1)).sum(), comb(table.sum(0)).sum(), comb(len(a))
    expected = sa * sb / total if total else 0.0
    top = (sa + sb) / 2
    return 1.0 if top == expected else float((index - expected) / (top - expected))


def cluster(cos: np.ndarray):
    """Average-linkage clustering on 1 − cos of a [K, K] cosine matrix (symmetrised; NaN counts as cos 0):
    (scipy linkage matrix, leaf order)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    c = np.where(np.isfinite(cos), cos, 0.0)
    c = (c + c.T) / 2
    d = np.clip(1.0 - c, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    z = linkage(squareform(d, checks=False), method="average")
    return z, [int(i) for i in leaves_list(z)]


def cut_clusters(z, n: int) -> list[int]:
    from scipy.cluster.hierarchy import fcluster

    return [int(x) for x in fcluster(z, t=n, criterion="maxclust")]


# ------------------------------------------------------------------------------------------------ the run


def run_data_dir(run_dir, override=None) -> Path:
    """The prepared data dir of a run: ``override``, else config.json's, else a checkpoint's megavac.json's."""
    if override:
        p = Path(override)
        if not (p / "meta.json").is_file():
            raise ValueError(f"--data-dir {str(p)!r} has no meta.json (not a prepared data dir)")
        return p
    run_dir = Path(run_dir)
    named = []
    cfg = run_dir / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text()).get("data", {})
        named.append(Path(data["data_dir"]) if data.get("data_dir") else Path(data.get("synthetic_dir", "")) / "prepared")
    for m in sorted(run_dir.glob("checkpoints/*/megavac.json")):
        try:
            d = json.loads(m.read_text()).get("data_dir")
        except ValueError:
            continue
        if d:
            named.append(Path(d))
    for p in named:
        for cand in ([p] if p.is_absolute() else [p, run_dir / p]):
            if (cand / "meta.json").is_file():
                return cand
    if not named:
        raise ValueError(f"{run_dir} has no config.json naming its data dir; pass --data-dir")
    raise ValueError(f"the data dir of {run_dir} ({named[0]}) has no meta.json here; pass --data-dir")


def describe_langs(names: list[str], data_dir, families_file=None, resource_mode="tertiles", low=100_000,
                   high=1_000_000) -> list[dict]:
    """Per language (task name): pair code, family, training pairs, resource class."""
    from data_pipeline.indexed import load_meta

    meta = load_meta(data_dir)
    tasks = {t["name"]: t for t in meta["tasks"]}
    missing = [n for n in names if n not in tasks]
    if missing:
        raise ValueError(f"the Gram logs name languages {missing} that {Path(data_dir) / 'meta.json'} does not have; "
                         "pass the data dir the run was trained on with --data-dir")
    pairs = [tasks[n]["pair"] for n in names]
    fams = resolve_families(dict.fromkeys(pairs), meta.get("corpus"), families_file)
    sizes = [int(meta["pairs"].get(p, {}).get("train_raw", meta["pairs"].get(p, {}).get("train", 0))) for p in pairs]
    res = resource_classes(sizes, resource_mode, low, high)
    return [{"name": n, "pair": p, "family": fams[p].family, "family_source": fams[p].source, "train_pairs": s,
             "resource": r, "_fam": fams[p]} for n, p, s, r in zip(names, pairs, sizes, res)]


def family_order(langs: list[dict]) -> list[int]:
    return sorted(range(len(langs)), key=lambda i: (langs[i]["family"], -langs[i]["train_pairs"], langs[i]["name"]))


def _choose_steps(steps_all: list[int], wanted: list[int] | None, grams_dir: Path) -> list[int]:
    if wanted:
        missing = [s for s in wanted if s not in steps_all]
        if missing:
            shown = steps_all if len(steps_all) <= 8 else steps_all[:3] + ["..."] + steps_all[-3:]
            raise ValueError(f"no Gram log for step{'s' if len(missing) > 1 else ''} {missing} in {grams_dir} "
                             f"(logged: {', '.join(map(str, shown))})")
        return list(dict.fromkeys(wanted))
    n = len(steps_all)
    return list(dict.fromkeys([steps_all[0], steps_all[(n - 1) // 2], steps_all[-1]]))


def _matrix(m: np.ndarray, order: list[int]) -> list[list]:
    sub = m[np.ix_(order, order)]
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in sub]


def analyse(run_dir, steps: list[int] | None = None, order: str = "family", data_dir=None, families_file=None,
            resource_mode: str = "tertiles", low: int = 100_000, high: int = 1_000_000) -> dict:
    """Everything the figures show, as a JSON-able dict (no plotting). Reads the logs one at a time."""
    if order not in ("family", "cluster"):
        raise ValueError(f"--order must be family or cluster, got {order!r}")
    run_dir = Path(run_dir)
    paths = gram_paths(run_dir)
    first = read_gram_log(paths[0])
    names, K = first.langs, len(first.langs)
    if K < 2:
        raise ValueError(f"{paths[0]} has {K} language: gradient similarity needs at least two")
    langs = describe_langs(names, run_data_dir(run_dir, data_dir), families_file, resource_mode, low, high)
    families = [lang["family"] for lang in langs]
    subsets = pair_subsets(families, [lang["resource"] for lang in langs])
    fam_objs: list[LangFamily] = [lang.pop("_fam") for lang in langs]
    dist = np.full((K, K), np.nan)
    for i in range(K):
        for j in range(K):
            d = genetic_distance(fam_objs[i], fam_objs[j])
            dist[i, j] = np.nan if d is None else d
    have_dist = bool(np.isfinite(dist).all())
    same = (np.asarray(families, dtype=object)[:, None] == np.asarray(families, dtype=object)[None, :]).astype(float)
    upper = subsets["all"]

    view, index = layer_view(first.groups, first.granularity)
    curve_groups = view + ([] if "model" in view else ["model"])
    steps_all = [int(p.stem.split("_")[1]) for p in paths]
    heat_steps = _choose_steps(steps_all, steps, run_dir / "grams")

    curves = {s: {g: [] for g in curve_groups} for s in SUBSETS}
    rho_fam, rho_max, rho_dist, nonfinite = [], [], [], []
    group_acc: dict[str, list] = {}
    cos_sum, cos_n = np.zeros((K, K)), np.zeros((K, K))
    kept: dict[int, dict] = {}
    for path in paths:
        log = first if path == paths[0] else read_gram_log(path)
        if log.langs != names or log.groups != first.groups:
            raise ValueError(f"{path} has languages {log.langs} / groups {len(log.groups)}, but {paths[0]} has "
                             f"{names} / {len(first.groups)}: Gram logs of different runs in one grams/ folder")
        if not np.isfinite(log.gram).all():
            nonfinite.append(log.step)
        lay = aggregate(log.gram, index, len(view))
        whole = log.gram.sum(0)
        cos_lay = cosine(lay)
        cos_whole = cosine(whole)
        per_group = {g: cos_lay[i] for i, g in enumerate(view)}
        per_group.setdefault("model", cos_whole)
        for s, mask in subsets.items():
            for g in curve_groups:
                curves[s][g].append(mean_over(per_group[g], mask))
        x = cos_whole[upper]
        r = spearman(x, same[upper])
        if r is not None:
            rho_fam.append(r)
            # what a perfect separation (every within-family pair above every across-family one) would give
            ok = np.isfinite(x)
            y = same[upper][ok]
            best = spearman(y + 1e-3 * np.argsort(np.argsort(x[ok])) / max(1, y.size), y)
            if best is not None:
                rho_max.append(best)
        if have_dist:
            r = spearman(x, dist[upper])
            if r is not None:
                rho_dist.append(r)
        ok = np.isfinite(cos_whole)
        cos_sum[ok] += cos_whole[ok]
        cos_n[ok] += 1
        for g, m in per_group.items():  # per-group means over steps: one step's Gram is noisy
            acc = group_acc.setdefault(g, [np.zeros((K, K)), np.zeros((K, K))])
            ok = np.isfinite(m)
            acc[0][ok] += m[ok]
            acc[1][ok] += 1
        if log.step in heat_steps:
            kept[log.step] = {"groups": per_group, "gamma": magnitude_similarity(whole),
                              "present": present(whole).tolist()}

    with np.errstate(invalid="ignore"):
        cos_mean = np.where(cos_n > 0, cos_sum / np.maximum(cos_n, 1), np.nan)
        group_mean = {g: np.where(n > 0, t / np.maximum(n, 1), np.nan) for g, (t, n) in group_acc.items()}
    # The same rank correlation on cosines averaged over the logged steps, whole model and per group: the
    # per-step number above is diluted by each step's sampling noise, the mean is not.
    of_mean = {g: spearman(m[upper], same[upper]) for g, m in group_mean.items()}
    seen = [i for i in range(K) if cos_n[i, i] > 0]
    fam_clusters = sorted(set(families[i] for i in seen))
    dendro = {"langs": [names[i] for i in seen], "absent": [names[i] for i in range(K) if i not in seen],
              "linkage": None, "leaves": [], "clusters": None}
    ari = None
    if len(seen) >= 2:
        z, leaves = cluster(cos_mean[np.ix_(seen, seen)])
        dendro["linkage"] = z.tolist()
        dendro["leaves"] = [names[seen[i]] for i in leaves]
        if len(fam_clusters) >= 2:
            cut = cut_clusters(z, len(fam_clusters))
            dendro["clusters"] = dict(zip(dendro["langs"], cut))
            ari = adjusted_rand([families[i] for i in seen], cut)
    name_index = {n: i for i, n in enumerate(names)}
    if order == "cluster":
        ordered = [name_index[n] for n in dendro["leaves"]] + [name_index[n] for n in dendro["absent"]]
    else:
        ordered = family_order(langs)

    heatmaps = {}
    for s in heat_steps:
        k = kept[s]
        heatmaps[str(s)] = {"cos": {g: _matrix(m, ordered) for g, m in k["groups"].items()},
                            "gamma": _matrix(k["gamma"], ordered),
                            "present": [k["present"][i] for i in ordered]}
    summary = {
        "family_spearman": float(np.mean(rho_fam)) if rho_fam else None,
        "family_spearman_max": float(np.mean(rho_max)) if rho_max else None,
        "genetic_distance_spearman": float(np.mean(rho_dist)) if rho_dist else None,
        "family_ari": ari,
        "family_spearman_of_mean_cos": of_mean.get("model"),
        "family_spearman_of_mean_cos_per_group": {g: r for g, r in of_mean.items() if g != "model"},
        "spearman_steps": len(rho_fam),
        "mean_cos_within_family": mean_over(cos_mean, subsets["within family"]),
        "mean_cos_across_family": mean_over(cos_mean, subsets["across family"]),
        "families": len(set(families)),
        "genetic_distance": "Glottolog (URIEL+) lineage, angular" if have_dist else None,
    }
    return {
        "run_dir": str(run_dir), "method": first.method, "granularity": first.granularity,
        "groups": first.groups, "layer_groups": view, "resource_groups": resource_mode,
        "langs": langs, "steps": steps_all, "heatmap_steps": heat_steps, "nonfinite_steps": nonfinite,
        "order": order, "ordered_langs": [names[i] for i in ordered],
        "summary": summary,
        "spearman_per_step": {"family": rho_fam, "genetic_distance": rho_dist},
        "heatmaps": heatmaps,
        "curves": {"steps": steps_all, "groups": curve_groups, "mean_cos": curves},
        "dendrogram": dendro,
        "mean_cos_over_steps": {"order": [names[i] for i in ordered], "cos": _matrix(cos_mean, ordered)},
        "genetic_distance": {"order": [names[i] for i in ordered], "distance": _matrix(dist, ordered)} if have_dist else None,
    }


# ------------------------------------------------------------------------------------------------ figures


def _nan(m) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)


def write_outputs(result: dict, out) -> dict[str, str]:
    """Write the PNGs and similarity.json into ``out``; returns {what: path}."""
    plt = plots.pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    langs = {lang["name"]: lang for lang in result["langs"]}
    colors = plots.family_colors([lang["family"] for lang in result["langs"]])
    order = result["ordered_langs"]
    lang_colors = [colors[langs[n]["family"]] for n in order]
    k = len(order)
    show = k <= 40
    written = {}

    # Heatmaps: one figure per step, one panel per group (whole model first).
    for s, h in result["heatmaps"].items():
        groups = ["model"] + sorted((g for g in h["cos"] if g != "model"), key=_depth_key)
        n = len(groups)
        ncol = min(n, 4)
        nrow = math.ceil(n / ncol)
        size = 3.2 if not show else max(3.2, k * 0.16)
        fig, axes = plt.subplots(nrow, ncol, figsize=(size * ncol + 1.5, size * nrow + 0.5), squeeze=False,
                                 gridspec_kw={"hspace": 0.5 if show else 0.25, "wspace": 0.3 if show else 0.15})
        im = None
        for ax, g in zip(axes.flat, groups):
            title = "whole model (sum of groups)" if g == "model" and len(groups) > 1 else g
            im = plots.heatmap(ax, _nan(h["cos"][g]), order, lang_colors, vmin=-1, vmax=1, cmap="RdBu_r",
                               title=title, show_labels=show and (g == "model" or n <= 4))
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.colorbar(im, ax=axes, shrink=0.6, label="gradient cosine similarity")
        plots.family_legend(fig, colors, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.suptitle(f"{result['method']} step {s}: cos(g_i, g_j) per group ({result['granularity']}), "
                     f"order: {result['order']}", fontsize=10)
        written[f"heatmaps step {s}"] = plots.save(fig, out / f"heatmaps_step{s}.png")
        if not show:  # too many languages to label the grid: the whole model alone, labelled
            size = 0.13 * k + 2
            fig, ax = plt.subplots(figsize=(size + 1.5, size))
            im = plots.heatmap(ax, _nan(h["cos"]["model"]), order, lang_colors, vmin=-1, vmax=1, cmap="RdBu_r",
                               title=f"{result['method']} step {s}: whole-model gradient cosine, order: {result['order']}",
                               show_labels=True)
            fig.colorbar(im, ax=ax, shrink=0.5, label="gradient cosine similarity")
            plots.family_legend(fig, colors, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            written[f"whole-model heatmap step {s}"] = plots.save(fig, out / f"heatmap_model_step{s}.png")

    # Mean cosine per group over training, per set of pairs.
    curves, steps = result["curves"]["mean_cos"], result["curves"]["steps"]
    groups = result["curves"]["groups"]
    enc = [g for g in groups if group_side(g) == "encoder"]
    dec = [g for g in groups if group_side(g) == "decoder"]
    blues, reds = plt.get_cmap("Blues"), plt.get_cmap("Reds")

    def style(g):
        side = group_side(g)
        if side == "encoder":
            return {"color": blues(0.35 + 0.6 * enc.index(g) / max(1, len(enc) - 1)), "ls": "-", "lw": 1.2}
        if side == "decoder":
            return {"color": reds(0.35 + 0.6 * dec.index(g) / max(1, len(dec) - 1)), "ls": "--", "lw": 1.2}
        if side == "model":
            return {"color": "black", "ls": "-", "lw": 2.2}
        return {"color": "0.5", "ls": ":", "lw": 1.2}

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharex=True, sharey=True)
    marker = "o" if len(steps) <= 20 else None
    for ax, subset in zip(axes.flat, SUBSETS):
        any_line = False
        for g in sorted(groups, key=_depth_key):
            ys = [np.nan if v is None else v for v in curves[subset][g]]
            if np.isfinite(ys).any():
                ax.plot(steps, ys, label=g, marker=marker, ms=3, **style(g))
                any_line = True
        ax.axhline(0, color="0.7", lw=0.8)
        ax.set_title(subset + ("" if any_line else " (no such pairs)"), fontsize=10)
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in axes[1]:
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:, 0]:
        ax.set_ylabel("mean pairwise cosine")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, title="group")
    fig.suptitle(f"{result['method']}: gradient similarity per layer over training "
                 f"(resource groups: {result['resource_groups']})", fontsize=11)
    written["layers over steps"] = plots.save(fig, out / "layers_over_steps.png")

    # Mean cosine against depth at the heatmap steps.
    depth = sorted([g for g in groups if g != "model"], key=_depth_key) or groups
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(depth) + 3), 4.5))
    cmap = plt.get_cmap("viridis")
    hs = result["heatmap_steps"]
    for si, s in enumerate(hs):
        idx = steps.index(s)
        c = cmap(si / max(1, len(hs) - 1))
        for subset, ls in (("within family", "-"), ("across family", "--")):
            ys = [np.nan if curves[subset][g][idx] is None else curves[subset][g][idx] for g in depth]
            ax.plot(range(len(depth)), ys, ls=ls, marker="o", ms=3, color=c, label=f"step {s}, {subset}")
    ax.set_xticks(range(len(depth)), depth, rotation=60, fontsize=7)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_ylabel("mean pairwise cosine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(f"{result['method']}: gradient similarity along the network", fontsize=10)
    written["layers profile"] = plots.save(fig, out / "layers_profile.png")

    # Dendrogram of the whole model's mean cosine.
    d = result["dendrogram"]
    if d["linkage"] is not None:
        from scipy.cluster.hierarchy import dendrogram

        tall = len(d["langs"]) > 40  # many languages: leaves down the side, one per line
        size = (9, 0.16 * len(d["langs"]) + 2) if tall else (max(6, 0.28 * len(d["langs"]) + 2), 5)
        fig, ax = plt.subplots(figsize=size)
        dendrogram(np.asarray(d["linkage"]), labels=d["langs"], ax=ax, orientation="left" if tall else "top",
                   leaf_rotation=0 if tall else 90, leaf_font_size=7 if tall else 8, color_threshold=0,
                   above_threshold_color="0.3")
        for tick in (ax.get_yticklabels() if tall else ax.get_xticklabels()):
            tick.set_color(colors[langs[tick.get_text()]["family"]])
        (ax.set_xlabel if tall else ax.set_ylabel)("1 − mean cosine (average linkage)")
        ari = result["summary"]["family_ari"]
        ax.set_title(f"{result['method']}: languages clustered by whole-model gradient similarity\n"
                     f"(cosine averaged over {len(steps)} logs; adjusted Rand index vs families {_fmt(ari)})", fontsize=10)
        plots.family_legend(fig, colors, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        written["dendrogram"] = plots.save(fig, out / "dendrogram.png")

    # CATS magnitude similarity at the heatmap steps.
    n = len(result["heatmaps"])
    size = 3.5 if not show else max(3.5, k * 0.16)
    fig, axes = plt.subplots(1, n, figsize=(size * n + 1.5, size + 0.5), squeeze=False)
    im = None
    for ax, (s, h) in zip(axes.flat, result["heatmaps"].items()):
        im = plots.heatmap(ax, _nan(h["gamma"]), order, lang_colors, vmin=0, vmax=1, cmap="viridis",
                           title=f"step {s}", show_labels=show)
    fig.colorbar(im, ax=axes, shrink=0.7, label="γ = 2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²)")
    plots.family_legend(fig, colors, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{result['method']}: gradient magnitude similarity (whole model)", fontsize=10)
    written["magnitude similarity"] = plots.save(fig, out / "magnitude_similarity.png")

    js = out / "similarity.json"
    js.write_text(json.dumps(result | {"figures": {w: Path(p).name for w, p in written.items()}}, indent=1,
                             allow_nan=False) + "\n", encoding="utf-8")
    written["data"] = str(js)
    return written
