"""Per-language BLEU/chrF of evaluated runs side by side, deltas against a baseline, gains vs training size.

    python -m megavac.analysis compare base.json gradvac.json cats.json              # baseline: the first
    python -m megavac.analysis compare a.json b.json --names T=5 GradVac --baseline T=5 --out cmp/
    python -m megavac.analysis compare a.json b.json --resource-groups tertiles      # synthetic-scale data

Each EVAL_JSON is what ``launch/evaluate.py --out`` writes (``megavac.evaluation.evaluate``: per language
BLEU, chrF, training pairs and resource group). All must be evaluated on the same split and the same
languages (translation directions); otherwise the command stops, naming the file and the languages or split
that differ. Names default to the files' stems (``--names`` sets them, one per file); ``--baseline`` is a name
or a 0-based index (default the first file).

Printed: a table with every language's BLEU and chrF per run and the deltas against the baseline, then the
averages per resource group (``--resource-groups recorded``, the default: the groups evaluation recorded, low <
100k ≤ medium < 1M ≤ high training pairs in the baseline's file; ``thresholds`` with ``--low-threshold`` /
``--high-threshold``; ``tertiles``: by rank, a third each) with the mean delta and how many languages improved.
Written (``--out``, default ``<first EVAL_JSON's folder>/compare``): ``compare.json`` and ``compare.csv`` (the
table) and ``delta_vs_size.png``: BLEU and chrF delta against training-set size (log x), one colour per run,
with each run's mean delta per resource group as a segment over that group's size range — the papers' view
of gains on low- versus high-resource languages.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from megavac.analysis import plots
from megavac.analysis.similarity import resource_classes

GROUPS = ("low", "medium", "high")


def _names(values) -> list[str]:
    return [n for v in values for n in v.split(",") if n]


def add_args(p) -> None:
    p.add_argument("eval_json", nargs="+", metavar="EVAL_JSON", help="results JSON of launch/evaluate.py --out")
    p.add_argument("--baseline", default=None, help="the baseline run: a name or a 0-based index (default the first)")
    p.add_argument("--names", nargs="+", default=None, help="one name per EVAL_JSON (default the file stems)")
    p.add_argument("--out", default=None, help="output folder (default <first EVAL_JSON's folder>/compare)")
    p.add_argument("--resource-groups", choices=("recorded", "thresholds", "tertiles"), default="recorded",
                   help="recorded (evaluation's groups, default), thresholds (--low/--high-threshold) or tertiles")
    p.add_argument("--low-threshold", type=int, default=100_000, help="thresholds: low resource below this many pairs")
    p.add_argument("--high-threshold", type=int, default=1_000_000, help="thresholds: high resource from this many")


def run(args) -> int:
    names = _names(args.names) if args.names else None
    result = compare(args.eval_json, names=names, baseline=args.baseline, resource_mode=args.resource_groups,
                     low=args.low_threshold, high=args.high_threshold)
    print_tables(result)
    out = Path(args.out) if args.out else Path(args.eval_json[0]).parent / "compare"
    for what, path in write_outputs(result, out).items():
        print(f"{what}: {path}")
    return 0


# ------------------------------------------------------------------------------------------------ reading


def load_eval(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p} does not exist")
    try:
        r = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(r, dict) or not isinstance(r.get("langs"), dict) or "split" not in r:
        raise ValueError(f"{p} is not a results JSON of launch/evaluate.py --out (no 'langs'/'split')")
    if not r["langs"]:
        raise ValueError(f"{p} has no evaluated languages")
    for name, row in r["langs"].items():
        missing = [k for k in ("bleu", "chrf", "train_pairs") if k not in row]
        if missing:
            raise ValueError(f"{p}: language {name} lacks {missing}")
    return r


def _run_names(paths: list[Path]) -> list[str]:
    names = [p.stem for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.stem}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def _list(xs, most=6) -> str:
    xs = list(xs)
    return ", ".join(xs[:most]) + (f" and {len(xs) - most} more" if len(xs) > most else "")


def check_same(evals: list[dict], paths: list[Path]) -> None:
    """One split and one language set for all (ValueError naming what differs)."""
    ref, ref_path = evals[0], paths[0]
    for r, p in zip(evals[1:], paths[1:]):
        if r["split"] != ref["split"]:
            raise ValueError(f"different splits: {ref_path} is on {ref['split']!r}, {p} on {r['split']!r}; "
                             "evaluate every run with the same --split")
        a, b = set(ref["langs"]), set(r["langs"])
        if a != b:
            parts = []
            if a - b:
                parts.append(f"{p} lacks {_list(sorted(a - b))}")
            if b - a:
                parts.append(f"{p} has {_list(sorted(b - a))} that {ref_path} lacks")
            raise ValueError(f"different language sets: {'; '.join(parts)}; evaluate every run on the same --langs")
        split_rows = sorted(n for n in a if r["langs"][n].get("split", r["split"]) != ref["langs"][n].get("split", ref["split"]))
        if split_rows:
            raise ValueError(f"different splits for {_list(split_rows)} in {ref_path} and {p} (one fell back to dev)")


# ------------------------------------------------------------------------------------------------ the table


def _delta(a, b):
    return None if a is None or b is None else round(a - b, 4)


def compare(paths, names: list[str] | None = None, baseline=None, resource_mode: str = "recorded",
            low: int = 100_000, high: int = 1_000_000) -> dict:
    """The side-by-side table, deltas and group averages as a JSON-able dict."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ValueError("compare needs at least two EVAL_JSONs (the baseline and a run to compare with it)")
    evals = [load_eval(p) for p in paths]
    if names is None:
        names = _run_names(paths)
    elif len(names) != len(paths):
        raise ValueError(f"--names gives {len(names)} names for {len(paths)} EVAL_JSONs")
    elif len(set(names)) < len(names):
        raise ValueError(f"--names has duplicates: {names}")
    if baseline is None:
        b = 0
    elif str(baseline) in names:
        b = names.index(str(baseline))
    elif str(baseline).isdigit() and int(baseline) < len(names):
        b = int(baseline)
    else:
        raise ValueError(f"--baseline {baseline!r} is neither a run name ({', '.join(names)}) nor an index 0..{len(names) - 1}")
    check_same(evals, paths)

    base = evals[b]
    langs = sorted(base["langs"], key=lambda n: (-int(base["langs"][n]["train_pairs"]), n))
    sizes = [int(base["langs"][n]["train_pairs"]) for n in langs]
    if resource_mode == "recorded":
        groups = [base["langs"][n].get("group") or "unknown" for n in langs]
    else:
        groups = resource_classes(sizes, resource_mode, low, high)
    differ = sorted(n for n in langs for r in evals if int(r["langs"][n]["train_pairs"]) != int(base["langs"][n]["train_pairs"]))

    rows = []
    for n, size, g in zip(langs, sizes, groups):
        bl = base["langs"][n]
        scores = {}
        for name, r in zip(names, evals):
            x = r["langs"][n]
            scores[name] = {"bleu": x["bleu"], "chrf": x["chrf"], "d_bleu": _delta(x["bleu"], bl["bleu"]),
                            "d_chrf": _delta(x["chrf"], bl["chrf"])}
        rows.append({"language": n, "group": g, "train_pairs": size, "scores": scores})

    averages = {}
    for g in [*GROUPS, *sorted(set(groups) - set(GROUPS)), "all"]:
        sel = [r for r in rows if g == "all" or r["group"] == g]
        if not sel:
            continue
        averages[g] = {"n": len(sel)}
        for name in names:
            vals = {k: [r["scores"][name][k] for r in sel] for k in ("bleu", "chrf", "d_bleu", "d_chrf")}
            averages[g][name] = {k: (round(float(np.mean(v)), 4) if all(x is not None for x in v) else None)
                                 for k, v in vals.items()}
            for metric in ("bleu", "chrf"):
                averages[g][name][f"improved_{metric}"] = sum(1 for v in vals[f"d_{metric}"] if v is not None and v > 0)
    return {
        "baseline": names[b],
        "runs": [{"name": name, "file": str(p), "tag": r.get("tag"), "step": r.get("step"),
                  "checkpoint": r.get("checkpoint")} for name, p, r in zip(names, paths, evals)],
        "split": base["split"],
        "resource_groups": resource_mode if resource_mode != "recorded" else {"recorded": base.get("thresholds")},
        "train_pairs_differ": sorted(set(differ)),
        "langs": rows,
        "groups": averages,
    }


def _f(x, signed=False) -> str:
    if x is None:
        return "-"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _cell(score, delta, baseline: bool) -> str:
    if baseline:
        return _f(score)
    style = "green" if delta is not None and delta > 0 else ("red" if delta is not None and delta < 0 else "")
    d = _f(delta, True)
    return f"{_f(score)} [{style}]{d}[/]" if style else f"{_f(score)} {d}"


def print_tables(result: dict, console=None) -> None:
    """Per metric one table: every language's score per run with its delta against the baseline, then the
    resource groups' averages (mean score, mean of the per-language deltas, languages improved)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    names, base = [r["name"] for r in result["runs"]], result["baseline"]
    for metric, label in (("bleu", "BLEU"), ("chrf", "chrF")):
        t = Table(title=f"{label} on {result['split']}, delta against {base}")
        t.add_column("language")
        t.add_column("group")
        t.add_column("train pairs", justify="right")
        for name in names:
            t.add_column(name + (" (baseline)" if name == base else ""), justify="right")
        for r in result["langs"]:
            sc = r["scores"]
            t.add_row(r["language"], r["group"], f"{r['train_pairs']:,}",
                      *[_cell(sc[n][metric], sc[n][f"d_{metric}"], n == base) for n in names])
        t.add_section()
        for group, a in result["groups"].items():
            cells = []
            for n in names:
                x = a[n]
                cell = _cell(x[metric], x[f"d_{metric}"], n == base)
                if n != base:
                    cell += f" {x[f'improved_{metric}']}/{a['n']}↑"
                cells.append(cell)
            t.add_row(f"mean {group}", "", f"{a['n']} lang{'s' if a['n'] != 1 else ''}", *cells)
        console.print(t)
    console.print("mean = average over the group's languages; its delta is the mean of the per-language deltas; "
                  "k/n↑ = languages improved", highlight=False)
    if result["train_pairs_differ"]:
        console.print(f"note: training pairs differ between the files for {_list(result['train_pairs_differ'])} "
                      f"(the baseline's are shown)", highlight=False)


# ------------------------------------------------------------------------------------------------ output


def write_outputs(result: dict, out) -> dict[str, str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    names, base = [r["name"] for r in result["runs"]], result["baseline"]

    js = out / "compare.json"
    js.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    written["table (JSON)"] = str(js)
    cs = out / "compare.csv"
    with open(cs, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        head = ["language", "group", "train_pairs"]
        for name in names:
            head += [f"{name}_bleu", f"{name}_chrf"] + ([] if name == base else [f"{name}_d_bleu", f"{name}_d_chrf"])
        w.writerow(head)
        for r in result["langs"]:
            row = [r["language"], r["group"], r["train_pairs"]]
            for name in names:
                s = r["scores"][name]
                row += [s["bleu"], s["chrf"]] + ([] if name == base else [s["d_bleu"], s["d_chrf"]])
            w.writerow(row)
    written["table (CSV)"] = str(cs)

    plt = plots.pyplot()
    others = [n for n in names if n != base]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    cmap = plt.get_cmap("tab10")
    rows = result["langs"]
    x = np.array([max(r["train_pairs"], 1) for r in rows], dtype=float)
    for ax, metric, label in ((axes[0], "d_bleu", "BLEU"), (axes[1], "d_chrf", "chrF")):
        for ri, name in enumerate(others):
            c = cmap(ri % 10)
            y = np.array([np.nan if r["scores"][name][metric] is None else r["scores"][name][metric] for r in rows])
            ax.scatter(x, y, color=c, s=22, alpha=0.85, label=name, zorder=3)
            for g in dict.fromkeys(r["group"] for r in rows):
                sel = np.array([r["group"] == g for r in rows])
                if np.isfinite(y[sel]).any():
                    ax.hlines(np.nanmean(y[sel]), x[sel].min() / 1.15, x[sel].max() * 1.15, color=c, lw=2, alpha=0.6)
            if len(rows) <= 30 and ri == 0:
                for xi, yi, r in zip(x, y, rows):
                    if math.isfinite(yi):
                        ax.annotate(r["language"], (xi, yi), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training pairs (log)")
        ax.set_ylabel(f"{label} − {base}")
        ax.set_title(f"{label} delta against {base} ({result['split']}); segments: mean per resource group", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    written["delta vs size"] = plots.save(fig, out / "delta_vs_size.png")
    return written
