"""Which language family each training language belongs to: the routing of ``--family-experts``.

A language (a translation direction, ``en-de``) takes the family of its pair's non-English code (``de``);
both directions of a pair share it. Where the family comes from, first source that knows it wins:

1. ``--family-map FILE``: a TSV of ``language<TAB>family`` lines, ``language`` being a language name
   (``en-de``, which wins) or a pair code (``de``, for both directions). Blank lines, ``#`` comments and a
   header line ``language<TAB>family`` are skipped; further columns are ignored; languages the run does not
   train are allowed (one map can serve several runs).
2. ``megavac.analysis.families.resolve_families`` on the pair codes: the corpus's own ``langs.tsv``
   ``family`` column (the synthetic corpus writes its generator's families there), the synthetic
   generator's codes ``q<family><member>``, and Glottolog's top-level family of real codes (URIEL+).

The model keeps the result as ``ModelConfig.families`` (family index per language index, training order)
and ``family_names`` (in order of first appearance), saved in every checkpoint's ``megavac.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

MAP_HINT = ("give every trained language's family with --family-map FILE (TSV lines 'language<TAB>family', "
            "language = a language name like en-de or a pair code like de)")


def read_family_map(path) -> dict[str, str]:
    """``language or pair code -> family`` from a ``--family-map`` TSV file (ValueError naming file and line)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--family-map {str(p)!r} does not exist or is not a file")
    out: dict[str, str] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) < 2 or not cols[0] or not cols[1]:
            raise ValueError(f"--family-map {p}:{n}: expected 'language<TAB>family', got {line!r}")
        if not out and cols[0].lower() in ("language", "lang", "code") and cols[1].lower() == "family":
            continue  # header
        if cols[0] in out and out[cols[0]] != cols[1]:
            raise ValueError(f"--family-map {p}:{n}: {cols[0]!r} is given family {cols[1]!r} here and "
                             f"{out[cols[0]]!r} earlier")
        out[cols[0]] = cols[1]
    return out


def _corpus_families(codes: list[str], corpus_dir) -> dict[str, str]:
    """``code -> family`` of pair codes from the corpus and the maintained sources (module docstring, 2)."""
    if not codes:
        return {}
    try:
        from megavac.analysis.families import resolve_families
    except ImportError:  # the analysis package is not there: only the map can tell
        raise ValueError(f"no family known for {', '.join(map(repr, codes))} (megavac.analysis.families is not "
                         f"available); {MAP_HINT}") from None
    try:
        found = resolve_families(codes, corpus_dir=corpus_dir)
    except ValueError as e:
        raise ValueError(f"--family-experts: {e}. For training, {MAP_HINT}") from None
    return {c: found[c].family for c in codes}


def language_families(tasks: Sequence[dict], corpus_dir=None, family_map=None) -> list[str]:
    """The family name of each language of ``tasks`` (``meta.json`` task dicts with ``name`` and ``pair``),
    in their order."""
    mapping = read_family_map(family_map) if family_map else {}
    out = [mapping.get(t["name"], mapping.get(t["pair"])) for t in tasks]
    rest = sorted({t["pair"] for t, f in zip(tasks, out) if f is None})
    found = _corpus_families(rest, corpus_dir)
    return [f if f is not None else found[t["pair"]] for t, f in zip(tasks, out)]


def family_indices(names: Sequence[str]) -> tuple[list[int], list[str]]:
    """(family index of each language, family names in order of first appearance)."""
    order: dict[str, int] = {}
    idx = [order.setdefault(n, len(order)) for n in names]
    return idx, list(order)


__all__ = ["MAP_HINT", "family_indices", "language_families", "read_family_map"]
