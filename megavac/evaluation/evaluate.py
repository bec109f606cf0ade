"""Translate a prepared data dir's dev/test sets and score them with sacrebleu, per direction.

Reads ``<data_dir>/meta.json``, ``<data_dir>/spm.model`` and the raw dev/test text through
:mod:`data_pipeline.indexed`, the one reader of a prepared data dir. Scores are corpus-level BLEU
and chrF against the raw references (detokenised output, as sacrebleu expects), averaged per resource group (low /
medium / high by training pairs, as in the CATS paper's OPUS-100 setup) and per direction.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

from data_pipeline.indexed import load_meta, load_raw, raw_path, select_langs, spm_path
from megavac.evaluation.generate import SearchConfig, translate
from megavac.tokens import source_ids

log = logging.getLogger(__name__)

GROUPS = ("low", "medium", "high")

# Base language codes (before any -/_ script or region suffix) written in Chinese characters.
CHINESE = {"zh", "zho", "chi", "cmn", "yue", "wuu", "lzh", "gan", "hak", "hsn", "nan", "cjy"}
# Languages whose proper BLEU tokenizer needs an optional MeCab package.
MECAB = {"ja": "ja-mecab", "jpn": "ja-mecab", "ko": "ko-mecab", "kor": "ko-mecab"}
FALLBACK_TOKENIZER = "char"  # flores200/spm would need a download, and we run offline


# ---------------------------------------------------------------- data dir
# Read through data_pipeline.indexed only: the format check, the layout and the "\n"-only line
# splitting that keeps references aligned live there, shared with training.


def load_data_meta(data_dir) -> dict:
    """``meta.json`` of a prepared data dir (format and keys checked), which must also hold spm.model."""
    meta = load_meta(data_dir)
    spm_path(data_dir)
    return meta


def split_files(data_dir, task: dict, split: str) -> tuple[Path, Path, str]:
    """(source file, reference file, split actually used); a missing test set falls back to dev."""

    def paths(s):
        return raw_path(data_dir, task["pair"], s, task["src"]), raw_path(data_dir, task["pair"], s, task["tgt"])

    src, ref = paths(split)
    # data_pipeline writes no test files, or empty ones, for pairs that lack a test set.
    if split == "test" and not (_nonempty(src) and _nonempty(ref)):
        log.warning("no test set for %s (%s); scoring the dev set instead", task["name"], src)
        split = "dev"
        src, ref = paths(split)
    for p in (src, ref):
        if not p.is_file():
            raise ValueError(f"missing raw {split} file {str(p)!r} for task {task['name']}")
    return src, ref, split


def _nonempty(p: Path) -> bool:
    return p.is_file() and p.stat().st_size > 0


def task_lines(data_dir, task: dict, split: str) -> tuple[list[str], list[str], str]:
    """(source lines, reference lines, split used) of one task, checked to align line for line."""
    src_path, ref_path, split = split_files(data_dir, task, split)
    src_lines = load_raw(data_dir, task["pair"], split, task["src"])
    refs = load_raw(data_dir, task["pair"], split, task["tgt"])
    if len(src_lines) != len(refs):
        raise ValueError(f"{str(src_path)!r} has {len(src_lines)} lines but {str(ref_path)!r} has {len(refs)}")
    return src_lines, refs, split


# ---------------------------------------------------------------- metrics


def base_code(lang: str) -> str:
    """'zho_Hans' -> 'zho', 'zh-TW' -> 'zh'."""
    return re.split(r"[-_]", lang.lower(), maxsplit=1)[0]


@functools.lru_cache(maxsize=None)
def tokenizer_available(name: str) -> bool:
    """sacrebleu's own check: building the tokenizer fails when its optional package is absent."""
    try:
        BLEU(tokenize=name)
        return True
    except (RuntimeError, ImportError, AssertionError):
        return False


def unspaced(refs: list[str]) -> bool:
    """True for text written without spaces between words (Thai, Khmer, Burmese, Japanese, ...):
    under 13a a whole sentence would be one "word" and BLEU meaningless."""
    chars = sum(len(r) for r in refs)
    return chars > 0 and sum(r.count(" ") for r in refs) * 20 < chars


def bleu_tokenizer(lang: str, refs: list[str] | None = None) -> str:
    """sacrebleu BLEU tokenizer for a target language: zh, ja-/ko-mecab, else 13a; ``char`` (with a
    warning) for other languages whose references are written without spaces."""
    code = base_code(lang)
    if code in CHINESE:
        return "zh"
    if code in MECAB:
        name = MECAB[code]
        if tokenizer_available(name):
            return name
        _warn_fallback(lang, name)
        return FALLBACK_TOKENIZER
    if refs is not None and unspaced(refs):
        _warn_unspaced(lang)
        return "char"
    return "13a"


@functools.lru_cache(maxsize=None)
def _warn_unspaced(lang: str):
    log.warning("references of %r have almost no spaces: scoring BLEU with the 'char' tokenizer", lang)


@functools.lru_cache(maxsize=None)
def _warn_fallback(lang: str, wanted: str):
    # Cached so a language is reported once, however many directions target it.
    log.warning(
        "BLEU for target %r should use the %r tokenizer, whose optional package is not installed; "
        "using %r instead (scores are not comparable with published %s numbers)",
        lang, wanted, FALLBACK_TOKENIZER, wanted,
    )


def score_corpus(hyps: list[str], refs: list[str], tokenizer: str) -> dict:
    """Corpus BLEU and chrF with their sacrebleu signatures."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    bleu, chrf = BLEU(tokenize=tokenizer), CHRF()
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    return {
        "bleu": round(b.score, 2),
        "chrf": round(c.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


# ---------------------------------------------------------------- groups


@dataclass
class Thresholds:
    low: int = 100_000
    """Fewer training pairs than this: low-resource."""
    high: int = 1_000_000
    """At least this many: high-resource; in between: medium."""

    def __post_init__(self):
        if not 0 <= self.low <= self.high:
            raise ValueError(f"resource thresholds need 0 <= low <= high, got low={self.low} high={self.high}")


def resource_group(n_train: int, th: Thresholds) -> str:
    if n_train < th.low:
        return "low"
    return "high" if n_train >= th.high else "medium"


def direction(task: dict) -> str:
    """'en-xx' when translating into the pair's language, 'xx-en' when out of it."""
    if task["tgt"] == task["pair"]:
        return f"{task['src']}-xx"
    if task["src"] == task["pair"]:
        return f"xx-{task['tgt']}"
    return "other"


def average(rows: list[dict]) -> dict:
    if not rows:
        return {"bleu": None, "chrf": None, "n_tasks": 0}
    return {
        "bleu": round(float(np.mean([r["bleu"] for r in rows])), 2),
        "chrf": round(float(np.mean([r["chrf"] for r in rows])), 2),
        "n_tasks": len(rows),
    }


def group_averages(rows: list[dict]) -> dict:
    """Mean BLEU/chrF per resource group and over all rows."""
    out = {g: average([r for r in rows if r["group"] == g]) for g in GROUPS}
    out["all"] = average(rows)
    return out


# ---------------------------------------------------------------- translation


def encode_sources(sp, lines: list[str], task: dict, eos_id: int, max_positions: int) -> list[np.ndarray]:
    """Encoder inputs ``<2xx> tokens </s>``, truncated to ``max_positions`` with a warning."""
    keep = max_positions - 2  # room for the tag and EOS
    out, cut = [], 0
    for ids in sp.encode(lines, out_type=int):
        if len(ids) > keep:
            ids, cut = ids[:keep], cut + 1
        out.append(source_ids(task["tag_id"], ids, eos_id))
    if cut:
        log.warning("%s: truncated %d source sentence(s) to max_positions=%d", task["name"], cut, max_positions)
    return out


@dataclass
class EvalOptions:
    split: str = "test"
    max_tokens: int = 4000
    device: str = "cpu"
    thresholds: Thresholds = field(default_factory=Thresholds)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self):
        if self.split not in ("test", "dev"):
            raise ValueError(f"split must be 'test' or 'dev', got {self.split!r}")


def model_langs(model_meta: dict, data_dir, langs=None) -> list[str] | str | None:
    """The languages to evaluate: ``langs`` when given, else those the model was trained on
    (``model_meta["langs"]``, training order) that ``data_dir`` has, else None (all of the data dir's)."""
    if langs:
        return langs
    trained = model_meta.get("langs")
    if not trained:
        return None
    have = {t["name"] for t in load_data_meta(data_dir)["tasks"]}
    names = [n for n in trained if n in have]
    if not names:
        what = model_meta.get("source", "the model")
        raise ValueError(f"data dir {str(data_dir)!r} has none of the languages {what} was trained on ({trained}); "
                         "pass the data dir it was trained on")
    return names


def language_index(model, trained: list[str] | None, what: str = "the model") -> dict[str, int] | None:
    """``{name: language index}`` for a model with family experts, which routes each row by its language's
    index in the training order ``trained``; None for other models (they take no language)."""
    cfg = getattr(model, "cfg", None)
    if not getattr(cfg, "experts", ()):
        return None
    if not trained:
        raise ValueError(f"{what} has family experts ({cfg.expert_modules}), which route by the training language "
                         "order, but its metadata lists no trained languages (data_fingerprint.langs)")
    if len(trained) != len(cfg.families):
        raise ValueError(f"{what} routes {len(cfg.families)} languages by family but lists {len(trained)} trained "
                         f"languages ({trained})")
    return {n: k for k, n in enumerate(trained)}


def evaluate(model, data_dir, out_dir, langs=None, opts: EvalOptions | None = None, progress=None,
             fingerprint: dict | None = None, what: str = "the model", trained_langs: list[str] | None = None) -> dict:
    """Translate and score every selected language; writes ``<out_dir>/hyp.<task>.<split>.txt``.

    ``progress`` is an optional ``rich.progress.Progress`` (already started). ``fingerprint`` is the
    model's data fingerprint (``megavac.json``'s or the export's ``data_fingerprint``): a data dir prepared
    otherwise (another SentencePiece model, other tag ids) is refused, naming ``what``, before anything is
    decoded. Returns the result dict that ``write_json`` stores (without checkpoint fields, which the
    caller adds). ``trained_langs``: the model's training languages in order (default: the fingerprint's),
    whose positions a model with family experts routes each task's sentences by.
    """
    import sentencepiece as spm

    from megavac.fingerprint import check_data_fingerprint

    opts = opts or EvalOptions()
    meta = load_data_meta(data_dir)
    tasks = select_langs(meta, langs, data_dir)
    check_data_fingerprint(fingerprint, data_dir, what=what, names=[t["name"] for t in tasks])
    if meta["pad_id"] != model.cfg.pad_id:
        raise ValueError(f"data dir {str(data_dir)!r} has pad_id={meta['pad_id']} but the model has {model.cfg.pad_id}")
    if meta["vocab_size"] != model.cfg.vocab_size:
        raise ValueError(
            f"data dir {str(data_dir)!r} has vocab_size={meta['vocab_size']} but the model has {model.cfg.vocab_size}"
        )
    # Special ids come from the data dir that built the vocabulary, not from defaults.
    search = replace(opts.search, bos_id=meta["bos_id"], eos_id=meta["eos_id"], pad_id=meta["pad_id"])
    sp_file = spm_path(data_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    if sp.get_piece_size() != meta["vocab_size"]:
        raise ValueError(f"{str(sp_file)!r} has {sp.get_piece_size()} pieces, "
                         f"meta.json says vocab_size={meta['vocab_size']}")
    lang_index = language_index(model, trained_langs or (fingerprint or {}).get("langs"), what)
    untrained = [t["name"] for t in tasks if lang_index is not None and t["name"] not in lang_index]
    if untrained:
        raise ValueError(f"{what} was not trained on {untrained} (its languages: {list(lang_index)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(opts.device)

    rows, skipped, signatures = {}, [], {"bleu": {}, "chrf": None}
    for task in tasks:
        src_lines, refs, split = task_lines(data_dir, task, opts.split)
        if not src_lines:
            log.warning("%s: %s is empty; skipping the task", task["name"],
                        raw_path(data_dir, task["pair"], split, task["src"]))
            skipped.append(task["name"])
            continue
        sources = encode_sources(sp, src_lines, task, meta["eos_id"], model.cfg.max_positions)
        start = time.perf_counter()
        advance = _progress_callback(progress, task["name"], len(sources))
        ids = translate(model, sources, search, opts.max_tokens, opts.device, advance,
                        lang=None if lang_index is None else lang_index[task["name"]])
        hyps = [sp.decode(h) for h in ids]
        seconds = time.perf_counter() - start

        hyp_file = out_dir / f"hyp.{task['name']}.{split}.txt"
        hyp_file.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        tok = bleu_tokenizer(task["tgt"], refs)
        scores = score_corpus(hyps, refs, tok)
        signatures["bleu"][tok] = scores.pop("bleu_signature")
        signatures["chrf"] = scores.pop("chrf_signature")
        n_train = int(meta["pairs"].get(task["pair"], {}).get("train_raw", 0))
        rows[task["name"]] = {
            **scores,
            "n": len(hyps),
            "group": resource_group(n_train, opts.thresholds),
            "tokenizer": tok,
            "train_pairs": n_train,
            "direction": direction(task),
            "split": split,
            "hyp_file": str(hyp_file),
            "sent_per_s": round(len(hyps) / max(seconds, 1e-9), 2),
        }

    directions = sorted({r["direction"] for r in rows.values()})
    return {
        "data_dir": str(Path(data_dir).resolve()),
        "split": opts.split,
        "search": asdict(search) | {"max_tokens": opts.max_tokens},
        "thresholds": asdict(opts.thresholds),
        "langs": rows,
        "groups": group_averages(list(rows.values())),
        "groups_by_direction": {
            d: group_averages([r for r in rows.values() if r["direction"] == d]) for d in directions
        },
        "signatures": signatures,
        "skipped": skipped,
    }


def _progress_callback(progress, name: str, total: int):
    if progress is None:
        return None
    tid = progress.add_task(name, total=total)
    return lambda n: progress.advance(tid, n)


def make_progress(console):
    """A rich progress display (sentences done, sentences/s) for ``evaluate``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class SpeedColumn(ProgressColumn):
        # rich's own task.speed needs several updates; one batch may hold a whole small test set.
        def render(self, task):
            elapsed = task.finished_time if task.finished else task.elapsed
            return Text(f"{task.completed / elapsed:.1f} sent/s" if elapsed else "- sent/s")

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), SpeedColumn(), TimeElapsedColumn(),
        console=console,
    )


# ---------------------------------------------------------------- reporting


def render_table(results: dict, console) -> None:
    """Per-language scores, then group averages, as rich tables; then the metric signatures."""
    from rich.table import Table

    t = Table(title=f"{results.get('tag', '')} {results['split']}".strip())
    for col in ("language", "group", "train pairs", "n", "tok", "BLEU", "chrF"):
        t.add_column(col, justify="left" if col in ("language", "group", "tok") else "right")
    for name, r in results["langs"].items():
        t.add_row(name, r["group"], f"{r['train_pairs']:,}", str(r["n"]), r["tokenizer"], f"{r['bleu']:.2f}",
                  f"{r['chrf']:.2f}")
    console.print(t)

    g = Table(title="averages")
    for col in ("direction", "group", "languages", "BLEU", "chrF"):
        g.add_column(col, justify="left" if col in ("direction", "group") else "right")
    sections = [("all", results["groups"])] + list(results["groups_by_direction"].items())
    for d, groups in sections:
        for name, a in groups.items():
            if a["n_tasks"]:
                g.add_row(d, name, str(a["n_tasks"]), f"{a['bleu']:.2f}", f"{a['chrf']:.2f}")
    console.print(g)
    for tok, sig in sorted(results["signatures"]["bleu"].items()):
        console.print(f"BLEU signature ({tok}): {sig}", highlight=False, soft_wrap=True)
    if results["signatures"]["chrf"]:
        console.print(f"chrF signature: {results['signatures']['chrf']}", highlight=False, soft_wrap=True)


def write_json(results: dict, path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
