"""Prepare a corpus for training: validate, filter, train SentencePiece, binarize.

    python -m data_pipeline.prepare --corpus DIR --out DIR [--layout auto|opus100|plain]
        [--direction en-xx|xx-en|both] [--pairs a,b] [--vocab-size N] [--spm-temperature T]
        [--spm-sentences N] [--spm-threads 16] [--max-len 250 --min-len 1 --max-ratio 3.0]
        [--max-eval-tokens 1022] [--workers N]

Everything is built in ``<out>.tmp`` and renamed to ``<out>`` at the end, with
``meta.json`` written last, so a directory without ``meta.json`` is never a finished
one. Re-running with the same settings on a finished directory is a no-op.
See :mod:`data_pipeline.indexed` for the output format.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from . import spm as spm_lib
from .binarize import SplitStats, SplitScan, binarize_corpus, default_workers, dtype_name, eval_lines, \
    scan_corpus, worker_pool, write_empty
from .corpus import (ENGLISH, FILTER_REASONS, LAYOUTS, LEN_UNITS, Corpus, CorpusError, CorpusWarning,
                     EmptySplitError, FilterLimits, discover, iter_lines)
from .indexed import FORMAT_VERSION, PreparedDataError, load_meta, raw_path, split_prefix

DIRECTIONS = ("en-xx", "xx-en", "both")
# The longest dev/test line a model with 1024 positions (every megavac preset) validates: the source
# also holds the <2xx> tag and EOS, the target BOS (or EOS).
MAX_EVAL_TOKENS = 1022


class ConfigError(ValueError):
    """An invalid preparation setting (the message names the option and value)."""


class OutputExistsError(ValueError):
    """The output directory exists and holds something other than this exact preparation."""


@dataclass
class PrepareConfig:
    """Settings of one ``prepare`` run (CLI flags in brackets)."""

    corpus: str | Path
    """Corpus root directory [--corpus]."""
    out: str | Path
    """Output directory; built as ``<out>.tmp`` and renamed [--out]."""
    layout: str = "auto"
    """``auto``, ``opus100`` or ``plain`` [--layout]."""
    direction: str = "en-xx"
    """Which translation directions (languages) meta.json lists: ``en-xx``, ``xx-en`` or ``both`` [--direction]."""
    pairs: list[str] | None = None
    """Only the pairs (with English) of these codes (all must exist); None = every pair [--pairs a,b]."""
    vocab_size: int = 64000
    """SentencePiece vocabulary size (64000 suits OPUS-100; a few thousand for tests) [--vocab-size]."""
    spm_temperature: float = 5.0
    """Sampling temperature T for the SentencePiece sample; 1 = proportional [--spm-temperature]."""
    spm_sentences: int = 2_000_000
    """Cap on SentencePiece training lines; 2M keeps unigram training within ~10 GB RAM [--spm-sentences]."""
    spm_threads: int = spm_lib.TRAIN_THREADS
    """SentencePiece trainer threads. Fixed, not --workers: the thread count changes the model [--spm-threads]."""
    max_len: int = 250
    """Train pairs with a side longer than this are dropped [--max-len]."""
    min_len: int = 1
    """Train pairs with a side shorter than this are dropped [--min-len]."""
    max_ratio: float = 3.0
    """Train pairs whose longer/shorter length ratio exceeds this are dropped; 0 disables [--max-ratio]."""
    len_unit: str = "tokens"
    """Unit of the length limits: SentencePiece ``tokens`` or ``chars`` [--len-unit]."""
    max_eval_tokens: int = MAX_EVAL_TOKENS
    """Dev/test lines longer than this many tokens are refused (they are never filtered or truncated; those
    longer than --max-len are only warned about); keep it within the model's max_positions - 2 [--max-eval-tokens]."""
    workers: int = field(default_factory=default_workers)
    """Worker processes for scanning, sampling, SentencePiece and encoding [--workers]."""
    chunk_lines: int = 50_000
    """Line pairs per binarization chunk; bounds per-worker memory [--chunk-lines]."""
    seed: int = 0
    """Seed for the SentencePiece sample and trainer [--seed]."""
    overwrite: bool = False
    """Replace an existing, different output directory [--overwrite]."""
    quiet: bool = False
    """No progress bars or summary table [--quiet]."""
    verbose: bool = False
    """Show SentencePiece's own training log [--verbose]."""

    def limits(self) -> FilterLimits:
        """The train filter limits."""
        return FilterLimits(min_len=self.min_len, max_len=self.max_len, max_ratio=self.max_ratio,
                            unit=self.len_unit)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad setting."""
        checks = [
            (self.layout in ("auto", *LAYOUTS), "--layout", self.layout, f"one of auto, {', '.join(LAYOUTS)}"),
            (self.direction in DIRECTIONS, "--direction", self.direction, f"one of {', '.join(DIRECTIONS)}"),
            (self.vocab_size > 0, "--vocab-size", self.vocab_size, "positive"),
            (self.spm_temperature > 0, "--spm-temperature", self.spm_temperature, "> 0"),
            (self.spm_sentences > 0, "--spm-sentences", self.spm_sentences, "positive"),
            (self.spm_threads >= 1, "--spm-threads", self.spm_threads, ">= 1"),
            (self.max_eval_tokens >= 1, "--max-eval-tokens", self.max_eval_tokens, ">= 1"),
            (self.workers >= 1, "--workers", self.workers, ">= 1"),
            (self.chunk_lines >= 1, "--chunk-lines", self.chunk_lines, ">= 1"),
            (self.len_unit in LEN_UNITS, "--len-unit", self.len_unit, f"one of {', '.join(LEN_UNITS)}"),
        ]
        if self.pairs is not None:
            checks.append((len(self.pairs) > 0, "--pairs", self.pairs, "at least one language code"))
        for ok, flag, value, expected in checks:
            if not ok:
                raise ConfigError(f"{flag} {value!r} is invalid: expected {expected}")
        try:
            self.limits().validate()
        except ValueError as e:
            raise ConfigError(f"filter limits (--min-len/--max-len/--max-ratio): {e}") from None

    def fingerprint(self) -> dict:
        """Settings that determine the output (worker count and display flags do not)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("out", "workers", "overwrite", "quiet", "verbose")}
        d["corpus"] = str(Path(self.corpus).expanduser().absolute())
        d["pairs"] = sorted(self.pairs) if self.pairs is not None else None
        return d


# --------------------------------------------------------------------------- UI


class _Ui:
    """Progress bars and messages on stderr (rich); silent when quiet."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.quiet = quiet
        # Logs and pipes get rich's 80-column default, too narrow for the summary table.
        self.err = Console(stderr=True, quiet=quiet, width=None if sys.stderr.isatty() else 120)
        self.out = Console(quiet=quiet, width=None if sys.stdout.isatty() else 120)

    def progress(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=self.err, disable=self.quiet,
                        transient=False)

    def say(self, msg: str) -> None:
        self.err.print(msg)


# --------------------------------------------------------------------------- pipeline


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole preparation; returns the meta dict written to ``<out>/meta.json``."""
    cfg.validate()
    ui = _Ui(cfg.quiet)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        corpus = discover(cfg.corpus, cfg.layout, cfg.pairs)
    for w in caught:  # re-issue outside the recorder so callers and the CLI still see them
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = [str(w.message) for w in caught]  # every warning is also recorded in meta.json
    n_symbols = 4 + len(corpus.pairs) + 1
    if cfg.vocab_size <= n_symbols:
        raise ConfigError(f"--vocab-size {cfg.vocab_size} is too small: {n_symbols} ids are taken by "
                          "special and <2xx> tag symbols alone")

    out = Path(cfg.out).expanduser().absolute()
    fingerprint = cfg.fingerprint() | {"corpus_files": _corpus_digest(corpus)}
    done = _up_to_date(out, fingerprint, cfg.overwrite)
    if done is not None:
        ui.say(f"{out} is already prepared with these settings; nothing to do")
        return done
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of an interrupted run
    (tmp / "bin").mkdir(parents=True)

    t0 = time.time()
    with worker_pool(cfg.workers) as pool, ui.progress() as bars:
        scans = _scan(corpus, cfg, pool, bars)
        notes += _check_split_sizes(corpus, scans, cfg.direction)
        vocab_size, sample_report = _train_spm(corpus, scans, cfg, tmp, pool, bars)
        dtype = dtype_name(vocab_size)
        stats = _binarize(scans, cfg, tmp, dtype, pool, bars)
    _check_train_kept(scans, stats)
    notes += _warn_long_eval_lines(scans, stats, cfg)
    _fill_missing_dev(corpus, tmp, dtype)
    _write_raw(corpus, tmp)

    report = _filter_report(cfg, stats)
    meta = _meta(cfg, corpus, stats, vocab_size, dtype, sample_report, tmp)
    meta["warnings"] = notes
    meta["prepare_config"] = fingerprint
    meta["prepare_seconds"] = round(time.time() - t0, 1)
    _write_json(tmp / "filter_report.json", report)
    _write_json(tmp / "meta.json", meta)  # last: its presence marks a finished directory
    _move_into_place(tmp, out)
    _print_summary(ui, meta)
    return meta


def _corpus_digest(corpus: Corpus) -> str:
    """Cheap identity of the input files (path, size, mtime), so edited corpora are re-prepared."""
    h = hashlib.sha256()
    for p in corpus.pairs:
        for sf in p.splits.values():
            for f in (sf.xx, sf.en):
                st = f.stat()
                h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _up_to_date(out: Path, fingerprint: dict, overwrite: bool) -> dict | None:
    """Existing meta if ``out`` holds exactly this preparation; raise if it holds something else."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return None
    if (out / "meta.json").is_file():
        try:
            meta = load_meta(out)
        except (PreparedDataError, ValueError):  # older format or corrupt JSON
            meta = {}
        if meta.get("prepare_config") == fingerprint:
            return meta
        what = "a preparation with different settings or input files"
    else:
        what = "files but no meta.json (not a finished preparation)"
    if overwrite:
        return None
    raise OutputExistsError(f"output directory {out} already contains {what}; pass --overwrite to replace it")


def _scan(corpus: Corpus, cfg: PrepareConfig, pool, bars) -> dict[str, dict[str, SplitScan]]:
    total = sum(f.stat().st_size for p in corpus.pairs for sf in p.splits.values() for f in (sf.xx, sf.en))
    task = bars.add_task("validating (bytes)", total=total)
    return scan_corpus(corpus, cfg.chunk_lines, pool, progress=lambda n: bars.advance(task, n))


def _check_split_sizes(corpus: Corpus, scans: dict[str, dict[str, SplitScan]], direction: str) -> list[str]:
    """Refuse an empty train split; warn (and return the warnings) about empty dev splits.

    Found here, right after the scan, rather than as a sampling error naming no language once
    training starts (train) or as a validation loss of 0 averaged in (dev).
    """
    notes = []
    for p in corpus.pairs:
        sc = scans[p.code]["train"]
        if sc.lines == 0:
            raise EmptySplitError(f"{sc.xx.path} and {sc.en.path} are empty: the train split of pair {p.code} has "
                                  "no lines, and every pair needs training data; fill them or leave the pair out "
                                  "with --pairs")
        dev = scans[p.code].get("dev")
        if dev is not None and dev.lines == 0:  # absent dev files are warned about by discover()
            msg = (f"{dev.xx.path} and {dev.en.path} are empty: pair {p.code} has no dev data, so "
                   f"{', '.join(_lang_names(p.code, direction))} get no validation loss and are left out of its "
                   "average")
            warnings.warn(msg, CorpusWarning)
            notes.append(msg)
    return notes


def _lang_names(code: str, direction: str) -> list[str]:
    """The languages (directions) a pair gives, as meta.json's tasks name them."""
    return [n for d, n in (("en-xx", f"{ENGLISH}-{code}"), ("xx-en", f"{code}-{ENGLISH}"))
            if direction in (d, "both")]


def _check_train_kept(scans: dict[str, dict[str, SplitScan]], stats: dict[str, dict[str, SplitStats]]) -> None:
    """A train split the filters emptied is as unusable as an empty one."""
    for code, splits in sorted(stats.items()):
        st = splits["train"]
        if st.kept == 0:
            why = ", ".join(f"{r} {n}" for r, n in st.filtered.items() if n)
            raise EmptySplitError(
                f"{scans[code]['train'].xx.path}: all {st.lines} train lines of pair {code} were removed by the "
                f"filters ({why}), so its languages would have no training data; loosen --max-len/--min-len/"
                "--max-ratio or leave the pair out with --pairs")


def _warn_long_eval_lines(scans, stats, cfg: PrepareConfig) -> list[str]:
    """One warning (returned too) for dev/test lines longer than --max-len: kept whole, unlike train pairs.

    Not refused: real dev sets have such lines (an NTREX sentence of 190 tokens against --max-len 120,
    a Tatoeba one of 275 with a 1000-piece vocabulary), and a model validates them up to its
    max_positions; what it cannot hold, --max-eval-tokens refuses during binarization.
    """
    total, shown = eval_lines(stats, "long")
    if not total:
        return []
    lines = ", ".join(f"{getattr(scans[c][s], side).path} line {ln} ({n} {cfg.len_unit})"
                      for c, s, ln, side, n in shown)
    msg = (f"{total} dev/test line(s) longer than the train filter's --max-len {cfg.max_len} {cfg.len_unit}, kept "
           f"whole (only train is filtered; the training dry run checks them against the model's max_positions): "
           f"{lines}{' ...' if total > len(shown) else ''}")
    warnings.warn(msg, CorpusWarning)
    return [msg]


def sample_plan(corpus: Corpus, scans: dict[str, dict[str, SplitScan]], temperature: float,
                max_sentences: int) -> tuple[dict[str, list[tuple[str, int]]], dict[str, int]]:
    """Train files per language (English pooled over pairs) and lines to sample from each language."""
    files: dict[str, list[tuple[str, int]]] = {ENGLISH: []}
    for p in corpus.pairs:
        sc = scans[p.code]["train"]
        files[p.code] = [(str(sc.xx.path), sc.lines)]
        files[ENGLISH].append((str(sc.en.path), sc.lines))
    sizes = {lang: sum(n for _, n in fs) for lang, fs in files.items()}
    total = min(max_sentences, sum(sizes.values()))
    return files, spm_lib.temperature_counts(sizes, temperature, total)


def _train_spm(corpus, scans, cfg: PrepareConfig, tmp: Path, pool, bars) -> tuple[int, dict]:
    files, counts = sample_plan(corpus, scans, cfg.spm_temperature, cfg.spm_sentences)
    task = bars.add_task("sampling for SentencePiece", total=None)
    sample = tmp / "spm_sample.txt"
    report = spm_lib.write_sample(files, counts, sample, pool, seed=cfg.seed)
    bars.update(task, total=1, completed=1)
    written = sum(r["written"] for r in report.values())
    task = bars.add_task(f"training SentencePiece ({written} lines)", total=None)
    vocab_size = spm_lib.train(sample, tmp / "spm", cfg.vocab_size, [p.code for p in corpus.pairs],
                               num_threads=cfg.spm_threads, input_sentence_size=written, seed=cfg.seed,
                               verbose=cfg.verbose)
    bars.update(task, total=1, completed=1)
    sample.unlink()  # can be large and is fully described by the report
    return vocab_size, report


def _binarize(scans, cfg: PrepareConfig, tmp: Path, dtype: str, pool, bars) -> dict[str, dict[str, SplitStats]]:
    total = sum(sc.lines for splits in scans.values() for sc in splits.values())
    task = bars.add_task("binarizing (line pairs)", total=total)
    return binarize_corpus(scans, tmp / "spm.model", tmp / "bin", dtype, cfg.limits(), pool,
                           chunk_dir=tmp / "chunks", progress=lambda n: bars.advance(task, n),
                           max_eval_tokens=cfg.max_eval_tokens)


def _fill_missing_dev(corpus: Corpus, tmp: Path, dtype: str) -> None:
    """Pairs without dev (possible in OPUS-100) get empty dev files so readers need no special case."""
    for p in corpus.pairs:
        if "dev" not in p.splits:
            for lang in (p.code, ENGLISH):
                write_empty(split_prefix(tmp, p.code, "dev", lang), dtype)
                raw_path(tmp, p.code, "dev", lang).parent.mkdir(exist_ok=True)
                raw_path(tmp, p.code, "dev", lang).write_bytes(b"")


_BOM_CHAR = "\ufeff"


def _write_raw(corpus: Corpus, tmp: Path) -> None:
    """Copy dev/test text unfiltered, normalising only line terminators to ``\\n`` and dropping byte order marks.

    A BOM at the start of the file (``iter_lines`` skips it) or of a line (files concatenated with
    theirs) is not text: SentencePiece's normalisation drops it from the tokenised side, so it goes
    from the references too, or sacrebleu would see it glued to the first word.
    """
    (tmp / "raw").mkdir(exist_ok=True)
    for p in corpus.pairs:
        for split in ("dev", "test"):
            if split not in p.splits:
                continue
            for lang, src in ((p.code, p.splits[split].xx), (ENGLISH, p.splits[split].en)):
                with open(raw_path(tmp, p.code, split, lang), "w", encoding="utf-8", newline="\n") as dst:
                    for block in iter_lines(src):
                        dst.write("".join(line.lstrip(_BOM_CHAR) + "\n" for line in block))


def _filter_report(cfg: PrepareConfig, stats) -> dict:
    langs = {code: {"train_raw": s["train"].lines, "train": s["train"].kept, "filtered": s["train"].filtered}
             for code, s in sorted(stats.items())}
    total = {r: sum(v["filtered"][r] for v in langs.values()) for r in FILTER_REASONS}
    return {"filters": _filters(cfg), "total_filtered": total, "langs": langs}


def _filters(cfg: PrepareConfig) -> dict:
    return {"min_len": cfg.min_len, "max_len": cfg.max_len, "max_ratio": cfg.max_ratio, "unit": cfg.len_unit}


def _meta(cfg: PrepareConfig, corpus: Corpus, stats, vocab_size: int, dtype: str, sample_report: dict,
          tmp: Path) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp / "spm.model"))
    codes = [p.code for p in corpus.pairs]
    pairs, token_stats = {}, {}
    for code in codes:
        s = stats[code]
        pairs[code] = {"train": s["train"].kept, "train_raw": s["train"].lines,
                       "dev": s["dev"].lines if "dev" in s else 0,
                       "test": s["test"].lines if "test" in s else 0,
                       "filtered": s["train"].filtered}
        token_stats[code] = {split: {code: st.tokens_xx, ENGLISH: st.tokens_en} for split, st in s.items()}
    return {
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "pad_id": spm_lib.PAD_ID, "unk_id": spm_lib.UNK_ID, "bos_id": spm_lib.BOS_ID, "eos_id": spm_lib.EOS_ID,
        "dtype": dtype,
        "direction": cfg.direction,
        "corpus": str(corpus.root),
        "layout": corpus.layout,
        "filters": _filters(cfg),
        "langs": sorted(codes),
        "pairs": pairs,
        "tasks": _tasks(sorted(codes), cfg.direction, sp),
        # Extras beyond the format above, for humans and reproducibility.
        "tokens": token_stats,
        "spm": {"model": "spm.model", "vocab_size_requested": cfg.vocab_size, "model_type": "unigram",
                "num_threads": cfg.spm_threads,
                "character_coverage": spm_lib.CHARACTER_COVERAGE, "temperature": cfg.spm_temperature,
                "sample": sample_report},
        "bin_format": {"bin": f"raw little-endian {dtype} token ids, no tag/bos/eos",
                       "idx": "raw little-endian int64, n+1 element offsets into .bin"},
    }


def _tasks(codes: Sequence[str], direction: str, sp) -> list[dict]:
    tasks = []
    for code in codes:
        if direction in ("en-xx", "both"):
            tasks.append(_task(code, ENGLISH, code, sp))
        if direction in ("xx-en", "both"):
            tasks.append(_task(code, code, ENGLISH, sp))
    return tasks


def _task(pair: str, src: str, tgt: str, sp) -> dict:
    tag = spm_lib.lang_tag(tgt)
    return {"name": f"{src}-{tgt}", "pair": pair, "src": src, "tgt": tgt, "tag": tag, "tag_id": sp.piece_to_id(tag)}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _move_into_place(tmp: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _print_summary(ui: _Ui, meta: dict) -> None:
    if ui.quiet:
        return
    from rich.table import Table

    table = Table(title=f"Prepared {len(meta['langs'])} pairs (vocab {meta['vocab_size']}, {meta['dtype']})")
    for col in ("lang", "train raw", "kept", *FILTER_REASONS, "dev", "test", "tok xx", "tok en"):
        table.add_column(col, justify="left" if col == "lang" else "right")
    totals = [0] * 10
    for code in meta["langs"]:
        p, tok = meta["pairs"][code], meta["tokens"][code]["train"]
        row = [p["train_raw"], p["train"], *(p["filtered"][r] for r in FILTER_REASONS), p["dev"], p["test"],
               tok[code], tok[ENGLISH]]
        totals = [a + b for a, b in zip(totals, row)]
        table.add_row(code, *map(str, row))
    table.add_row("total", *map(str, totals), style="bold")
    ui.out.print(table)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = PrepareConfig(corpus="", out="")
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="corpus root (OPUS-100 or <xx>-en/ directories)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--layout", default=d.layout, choices=("auto", *LAYOUTS))
    ap.add_argument("--direction", default=d.direction, choices=DIRECTIONS)
    ap.add_argument("--pairs", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                    help="comma-separated subset of non-English codes")
    ap.add_argument("--vocab-size", type=int, default=d.vocab_size)
    ap.add_argument("--spm-temperature", type=float, default=d.spm_temperature)
    ap.add_argument("--spm-sentences", type=int, default=d.spm_sentences)
    ap.add_argument("--spm-threads", type=int, default=d.spm_threads,
                    help="SentencePiece trainer threads; part of the result (a fixed number, not the core count)")
    ap.add_argument("--max-len", type=int, default=d.max_len)
    ap.add_argument("--min-len", type=int, default=d.min_len)
    ap.add_argument("--max-ratio", type=float, default=d.max_ratio, help="0 disables the ratio filter")
    ap.add_argument("--len-unit", default=d.len_unit, choices=LEN_UNITS)
    ap.add_argument("--max-eval-tokens", type=int, default=d.max_eval_tokens,
                    help="dev/test lines longer than this many tokens are refused (never filtered or truncated); "
                         "keep it within the model's max_positions - 2")
    ap.add_argument("--workers", type=int, default=d.workers)
    ap.add_argument("--chunk-lines", type=int, default=d.chunk_lines)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = PrepareConfig(**{k.replace("-", "_"): v for k, v in vars(args).items()})
    with warnings.catch_warnings():  # restores the default display afterwards (main() is also called in-process)
        warnings.showwarning = lambda msg, cat, *a, **k: print(f"warning: {msg}", file=sys.stderr)
        try:
            prepare(cfg)
        except (CorpusError, ConfigError, OutputExistsError, PreparedDataError) as e:  # user errors: no traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
