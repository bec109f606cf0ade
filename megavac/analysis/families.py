"""Language families (and a genetic distance) for the languages of a prepared data dir.

Where a language's family comes from, first source that knows it wins:

1. ``--families FILE``: a TSV of ``code<TAB>family`` lines (a header line ``code<TAB>family`` and ``#``
   comments are allowed; further columns are ignored). It overrides and extends everything below.
2. The corpus's own ``langs.tsv`` (the folder ``meta.json["corpus"]`` names) when it has a ``family``
   column: the synthetic corpus writes its generator's families there (``data_pipeline.synthetic``).
3. Synthetic codes ``q<family letter><member>`` (ISO 639-3's private-use range): the generator's
   ``FAMILIES``, so a synthetic run is analysable even when its corpus folder is gone.
4. Real codes: Glottolog's classification as shipped by the URIEL+ package (``urielplus`` on PyPI).

Why URIEL+. It must work offline: nothing but PyPI is reachable where this runs, so data fetched at run
time (from GitHub, Zenodo, glottolog.org) is not an option. Evaluated:

* ``lang2vec`` 1.1.2 (URIEL, 2019, unmaintained) ships ``family_features.npz`` in its wheel, but does not
  import on current setuptools (it needs ``pkg_resources``, which setuptools no longer ships), and its
  family features are an unordered set of tree nodes (no "top-level family" without guessing).
* ``pyglottolog`` is the Glottolog curation API; it reads a clone of the Glottolog data repository,
  which its wheel does not contain (not reachable here).
* ``urielplus`` (URIEL+, maintained, 2026) ships in its wheel the Glottolog lineage of 26,881 languoids
  (``database/urielplus_csvs/lang_fam_geo.csv``: glottocode, name, lineage root → leaf) and its ISO 639-3
  → glottocode map (``uriel_glottocode_map.csv``). Those two files are read here directly (with the csv
  module, through ``importlib.resources``), rather than through the ``URIELPlus`` class, whose constructor
  copies its feature databases into its own install folder and loads ~10 MB of typological and
  geographic features this does not need. URIEL+ builds its phylogeny vectors from the same table
  (``_calculate_phylogeny_vectors``): one feature per lineage prefix.

Mapping a data code to ISO 639-3: the corpus's ``langs.tsv`` column ``iso639_3`` when present (the
shared NTREX-128 and Tatoeba corpora have one: ``aze_Latn`` → ``aze``, ``zho_CN`` → ``zho``), else the
code before any ``_``/``-`` suffix; two-letter (ISO 639-1, OPUS-100) codes go through ``pycountry``.
URIEL+ has no glottocode for ISO 639-3 macrolanguages (``ara``, ``zho``, ``fas``, ``msa``, ``swa``, ...);
those are read as their most widely used member (``MACROLANGUAGE_MEMBER``: ``ara`` → ``arb`` Standard
Arabic, ``zho`` → ``cmn`` Mandarin, ...), which has the same top-level family.

Top-level family = the lineage's root (Glottolog's: "Indo-European", "Atlantic-Congo", "Artificial
Language", ...); an isolate (empty lineage: Basque) is a family of its own, named after the language.

Genetic distance (real languages only, both from Glottolog): the angular distance URIEL+ uses between
phylogeny vectors (``distance_metric = "angular"``: 2·arccos(cos θ)/π) where a language's vector marks
its lineage nodes, path-qualified, PLUS its own glottocode as the leaf. With binary vectors cos θ =
shared / √(len_a · len_b), and path-qualified nodes are shared exactly along the common prefix. The
leaf makes two different languages of the same subgroup (and isolates, which URIEL+ gives an all-zero
vector) not identical; codes of one language (``fra``, ``fra_CA``) have distance 0, languages of different
top-level families distance 1.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

# ISO 639-3 macrolanguage (or collective code) -> the individual language read in its place (URIEL+ maps no
# glottocode to macrolanguage codes). Each member has the macrolanguage's top-level family.
MACROLANGUAGE_MEMBER = {
    "ara": "arb", "aze": "azj", "bal": "bgp", "ber": "tzm", "bik": "bcl", "est": "ekk", "fas": "pes", "gba": "gbp",
    "grn": "gug", "hmn": "mww", "iku": "ike", "jrb": "ajt", "kau": "knc", "kok": "gom", "kon": "kng", "kpe": "xpe",
    "lah": "pnb", "luy": "bxk", "man": "mnk", "mlg": "plt", "msa": "zsm", "mwr": "mve", "oji": "ojg", "ori": "ory",
    "orm": "gaz", "que": "quy", "raj": "mup", "srd": "src", "swa": "swh", "syr": "syc", "yid": "ydd", "zho": "cmn",
}
# ISO 639-1 codes that pycountry no longer lists (withdrawn) but OPUS-style corpora still use.
_EXTRA_639_1 = {"sh": "hbs", "mo": "ron", "in": "ind", "iw": "heb", "ji": "yid", "jw": "jav"}

_SYNTHETIC = re.compile(r"^q[a-t][a-h]$")

FAMILIES_HINT = ("supply the family with --families FILE, a TSV of 'code<TAB>family' lines (e.g. '{code}<TAB>"
                 "Artificial Language'; it overrides and extends the built-in families)")


@dataclass(frozen=True)
class LangFamily:
    """What is known about one data code."""

    code: str
    """The data's language code (a prepared dir's pair code: ``de``, ``deu``, ``aze_Latn``, ``qaa``)."""
    family: str
    """Top-level family."""
    source: str
    """Where it came from: ``families file``, ``corpus langs.tsv``, ``synthetic generator``, ``Glottolog (URIEL+)``."""
    lineage: tuple[str, ...] | None = None
    """Glottolog lineage root → leaf followed by the language's glottocode; None when not from Glottolog."""
    iso639_3: str | None = None
    """The ISO 639-3 code looked up (after the macrolanguage mapping), when from Glottolog."""
    name: str | None = None
    """Glottolog's name of the language, when from Glottolog."""


# ---------------------------------------------------------------------------------------------- sources


def read_families_file(path) -> dict[str, str]:
    """``code -> family`` from a TSV file (``code<TAB>family``; header and ``#`` lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--families file {str(p)!r} does not exist")
    out = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) < 2 or not cols[0] or not cols[1]:
            raise ValueError(f"{p}:{n}: expected 'code<TAB>family', got {line!r}")
        if n == 1 and cols[0].lower() == "code" and cols[1].lower() == "family":
            continue
        out[cols[0]] = cols[1]
    return out


def read_corpus_langs(corpus_dir) -> dict[str, dict]:
    """Rows of ``<corpus_dir>/langs.tsv`` by code ({} when there is none)."""
    if not corpus_dir:
        return {}
    p = Path(corpus_dir) / "langs.tsv"
    if not p.is_file():
        return {}
    with open(p, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {r["code"]: r for r in rows if r.get("code")}


def synthetic_family(code: str) -> str | None:
    """The generator's family of a synthetic code (``qaa`` → ``Aurelic``), else None."""
    if not _SYNTHETIC.match(code):
        return None
    from data_pipeline.synthetic import FAMILIES

    for fam in FAMILIES:
        if fam.letter == code[1] and "abcdefgh".index(code[2]) < fam.members:
            return fam.name
    return None


def _package_csv(name: str) -> Path:
    from importlib.resources import files

    try:
        root = files("urielplus")
    except ImportError:
        raise ValueError("the families of real language codes come from the 'urielplus' package, which is not "
                         "installed: pip install -r requirements.txt (or pass --families FILE)") from None
    path = Path(str(root / "database" / "urielplus_csvs" / name))
    if not path.is_file():
        raise ValueError(f"the installed urielplus has no {path}: this reads the data files of urielplus 1.3.2 "
                         "(pip install urielplus==1.3.2), or pass --families FILE")
    return path


@lru_cache(maxsize=1)
def _glottolog() -> tuple[dict[str, str], dict[str, tuple[str, tuple[str, ...]]]]:
    """(ISO 639-3 -> glottocode, glottocode -> (name, lineage root → leaf)) from URIEL+'s data."""
    iso = {}
    with open(_package_csv("uriel_glottocode_map.csv"), encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            if r["glottocode"].strip():
                iso[r["iso_code"].strip()] = r["glottocode"].strip()
    langs: dict[str, tuple[str, tuple[str, ...]]] = {}
    with open(_package_csv("lang_fam_geo.csv"), encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            parts = tuple(p.strip() for p in (r.get("lineage") or "").split(",") if p.strip() and p.strip() != "<NA>")
            g = r["language_id"].strip()
            if g not in langs or len(parts) > len(langs[g][1]):  # URIEL+'s rule: the deepest lineage
                langs[g] = (r["language_name"].strip(), parts)
    return iso, langs


def to_iso639_3(code: str, corpus_row: Mapping | None = None) -> str | None:
    """The ISO 639-3 code of a data code, or None when it cannot be told."""
    if corpus_row and (corpus_row.get("iso639_3") or "").strip():
        return corpus_row["iso639_3"].strip().lower()
    base = re.split(r"[-_]", code, maxsplit=1)[0].lower()
    if len(base) == 3:
        return base
    if len(base) == 2:
        if base in _EXTRA_639_1:
            return _EXTRA_639_1[base]
        try:
            import pycountry
        except ImportError:
            raise ValueError("two-letter language codes are mapped to ISO 639-3 with the 'pycountry' package, "
                             "which is not installed: pip install -r requirements.txt (or pass --families FILE)") from None
        lang = pycountry.languages.get(alpha_2=base)
        return lang.alpha_3 if lang is not None else None
    return None


def glottolog_family(code: str, corpus_row: Mapping | None = None) -> LangFamily | None:
    """Family and lineage of a real language code from Glottolog (URIEL+), or None when unknown."""
    iso3 = to_iso639_3(code, corpus_row)
    if iso3 is None:
        return None
    iso_map, langs = _glottolog()
    looked_up = iso3 if iso3 in iso_map else MACROLANGUAGE_MEMBER.get(iso3, iso3)
    glottocode = iso_map.get(looked_up)
    if glottocode is None or glottocode not in langs:
        return None
    name, lineage = langs[glottocode]
    family = lineage[0] if lineage else name  # an isolate is its own family
    return LangFamily(code, family, "Glottolog (URIEL+)", lineage + (glottocode,), looked_up, name)


# ---------------------------------------------------------------------------------------------- resolution


def resolve_families(codes: Iterable[str], corpus_dir=None, families_file=None,
                     extra: Mapping[str, str] | None = None) -> dict[str, LangFamily]:
    """``code -> LangFamily`` for every code (see the module docstring for the order of sources).

    ``extra`` is an in-memory ``code -> family`` mapping with the precedence of ``--families``.
    Raises ValueError naming every code no source knows, and how to supply its family.
    """
    override = dict(read_families_file(families_file)) if families_file else {}
    override.update(extra or {})
    rows = read_corpus_langs(corpus_dir)
    out, unknown = {}, []
    for code in codes:
        row = rows.get(code)
        if code in override:
            out[code] = LangFamily(code, override[code], "families file")
        elif row and (row.get("family") or "").strip():
            out[code] = LangFamily(code, row["family"].strip(), "corpus langs.tsv")
        elif (fam := synthetic_family(code)) is not None:
            out[code] = LangFamily(code, fam, "synthetic generator")
        elif (found := glottolog_family(code, row)) is not None:
            out[code] = found
        else:
            unknown.append(code)
    if unknown:
        where = "Glottolog as shipped by URIEL+" + (f" nor {Path(corpus_dir) / 'langs.tsv'}" if rows else "")
        raise ValueError(f"unknown language code{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                         f"no family in {where}; " + FAMILIES_HINT.format(code=unknown[0]))
    return out


def genetic_distance(a: LangFamily, b: LangFamily) -> float | None:
    """URIEL+'s angular distance between Glottolog lineage vectors (module docstring); None unless both
    languages come from Glottolog."""
    if a.lineage is None or b.lineage is None:
        return None
    shared = 0
    for x, y in zip(a.lineage, b.lineage):
        if x != y:
            break
        shared += 1
    cos = shared / math.sqrt(len(a.lineage) * len(b.lineage))
    return 2.0 * math.acos(min(1.0, cos)) / math.pi


__all__ = ["LangFamily", "MACROLANGUAGE_MEMBER", "genetic_distance", "glottolog_family", "read_corpus_langs",
           "read_families_file", "resolve_families", "synthetic_family", "to_iso639_3"]
