"""Streaming, multi-process conversion of parallel text into token arrays.

Work is split into chunks of ``chunk_lines`` line pairs whose byte ranges come from the
validation scan (:func:`data_pipeline.corpus.scan_file`), so both files of a pair are cut
at the same line boundaries without holding line offsets for every line. Each worker
reads one chunk of both sides, encodes it, applies the train filters (they need both
sides) and writes the kept token ids and lengths to small chunk files. The main process
concatenates finished chunks in order into ``<xx>.<split>.<lang>.bin`` plus the ``.idx``
offsets, so peak memory is a few chunks, independent of corpus size.

Output format (also documented in :mod:`data_pipeline.indexed`): ``.bin`` is a raw
little-endian array of token ids (``uint16`` if vocab_size <= 65535 else ``int32``);
``.idx`` is a raw little-endian ``int64`` array of n+1 element offsets into ``.bin``.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .corpus import (
    ENGLISH, FILTER_REASONS, Corpus, FileScan, FilterLimits, LongLineError, check_same_length, classify,
    count_reasons, is_blank, read_range, scan_file,
)

Progress = Callable[[int], None]
"""Called with the amount of work just finished (bytes or lines, see the caller)."""


def dtype_name(vocab_size: int) -> str:
    """Smallest token dtype the trainer supports for ``vocab_size`` ids."""
    return "uint16" if vocab_size <= 65535 else "int32"


def numpy_dtype(name: str) -> np.dtype:
    """Explicitly little-endian numpy dtype for a meta.json dtype name."""
    return np.dtype({"uint16": "<u2", "int32": "<i4"}[name])


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- pool


class _InlinePool:
    """Same interface as ``multiprocessing.Pool`` for 1 worker: no processes to spawn."""

    def imap(self, fn, items):
        return map(fn, items)

    imap_unordered = imap


@contextmanager
def worker_pool(workers: int) -> Iterator:
    """A process pool (spawned, so safe with threads in the parent) or an inline stand-in."""
    if workers <= 1:
        yield _InlinePool()
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield pool


# --------------------------------------------------------------------------- scanning


@dataclass
class SplitScan:
    """Validated files of one split of one pair."""

    xx: FileScan
    """Non-English side."""
    en: FileScan
    """English side."""

    @property
    def lines(self) -> int:
        """Number of line pairs."""
        return self.xx.lines

    @property
    def chunks(self) -> int:
        """Number of chunks the split is cut into."""
        return len(self.xx.chunk_offsets) - 1


def scan_corpus(corpus: Corpus, chunk_lines: int, pool, progress: Progress | None = None
                ) -> dict[str, dict[str, SplitScan]]:
    """Validate every file of ``corpus`` in parallel; ``progress`` gets bytes scanned.

    Returns ``{code: {split: SplitScan}}``. Raises on invalid UTF-8 or mismatched counts.
    """
    jobs = [(p.code, split, side, str(getattr(files, side)), chunk_lines)
            for p in corpus.pairs for split, files in p.splits.items() for side in ("xx", "en")]
    found: dict[tuple[str, str], dict[str, FileScan]] = {}
    for code, split, side, scan in pool.imap(_scan_job, jobs):
        found.setdefault((code, split), {})[side] = scan
        if progress:
            progress(scan.size)
    out: dict[str, dict[str, SplitScan]] = {}
    for (code, split), sides in found.items():
        check_same_length(sides["xx"], sides["en"])
        out.setdefault(code, {})[split] = SplitScan(sides["xx"], sides["en"])
    return out


def _scan_job(job) -> tuple[str, str, str, FileScan]:
    code, split, side, path, chunk_lines = job
    return code, split, side, scan_file(path, chunk_lines)


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class ChunkTask:
    """One chunk of one split of one pair, as handed to a worker."""

    pair: str
    """Non-English language code."""
    split: str
    """train/dev/test."""
    index: int
    """Chunk number within the split."""
    xx: tuple[str, int, int]
    """(path, start byte, end byte) of the non-English side."""
    en: tuple[str, int, int]
    """(path, start byte, end byte) of the English side."""
    model: str
    """SentencePiece model file."""
    dtype: str
    """Token dtype name (uint16/int32)."""
    limits: FilterLimits | None
    """Train filters; None keeps every line (dev/test)."""
    out_prefix: str
    """Chunk files are ``<out_prefix>.<xx|en>.tok`` and ``.len``."""
    first_line: int = 0
    """Line number (from 0) of the chunk's first line in its file."""
    report: FilterLimits | None = None
    """Dev/test (``limits`` None): lines longer than ``report.max_len`` (in ``report.unit``), which the train
    filter would drop, are recorded in ``SplitStats.long``; None: not looked for."""
    max_tokens: int | None = None
    """Dev/test: lines longer than this many tokens are recorded in ``SplitStats.overlong``; None: no check."""


@dataclass
class SplitStats:
    """What binarizing one split of one pair produced."""

    lines: int = 0
    """Line pairs read."""
    kept: int = 0
    """Line pairs written."""
    filtered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTER_REASONS, 0))
    """Dropped line pairs per reason (train only)."""
    tokens_xx: int = 0
    """Tokens written for the non-English side."""
    tokens_en: int = 0
    """Tokens written for the English side."""
    long_lines: int = 0
    """Dev/test lines with a side longer than the train filter's ``max_len`` (``ChunkTask.report``): kept."""
    long: list[tuple[int, str, int]] = field(default_factory=list)
    """The first (by line) of them: (line number from 1, longer side ``xx``/``en``, its length)."""
    overlong_lines: int = 0
    """Dev/test lines with a side longer than ``ChunkTask.max_tokens`` tokens: refused."""
    overlong: list[tuple[int, str, int]] = field(default_factory=list)
    """The first (by line) of them, as in ``long``."""

    def add(self, other: "SplitStats") -> None:
        """Accumulate a chunk's statistics."""
        self.lines += other.lines
        self.kept += other.kept
        self.tokens_xx += other.tokens_xx
        self.tokens_en += other.tokens_en
        for k, v in other.filtered.items():
            self.filtered[k] += v
        self.long_lines += other.long_lines
        self.long = sorted(self.long + other.long)[:_OVERLONG_KEPT]
        self.overlong_lines += other.overlong_lines
        self.overlong = sorted(self.overlong + other.overlong)[:_OVERLONG_KEPT]


_OVERLONG_KEPT = 5  # enough to name in one error line; the count covers the rest


_PROCESSORS: dict = {}


def _processor(model: str):
    """Load each SentencePiece model once per worker process."""
    if model not in _PROCESSORS:
        import sentencepiece as spm

        _PROCESSORS[model] = spm.SentencePieceProcessor(model_file=model)
    return _PROCESSORS[model]


def encode_chunk(task: ChunkTask) -> tuple[ChunkTask, SplitStats]:
    """Encode, filter and write one chunk (runs in a worker)."""
    xx_lines = read_range(*task.xx)
    en_lines = read_range(*task.en)
    if len(xx_lines) != len(en_lines):  # the scan guarantees this; guard against races
        raise RuntimeError(f"chunk {task.index} of {task.xx[0]} and {task.en[0]} differ in length; "
                           "were the files modified during preparation?")
    sp = _processor(task.model)
    # Workers already use every core; SentencePiece's own threads would oversubscribe.
    xx_ids = sp.encode(xx_lines, num_threads=1)
    en_ids = sp.encode(en_lines, num_threads=1)
    xx_len = _lengths(xx_ids)
    en_len = _lengths(en_ids)
    stats = SplitStats(lines=len(xx_lines))
    if task.limits is None:
        keep = np.ones(len(xx_lines), dtype=bool)
        if task.report is not None:
            chars = task.report.unit == "chars"
            a, b = (_lengths(xx_lines), _lengths(en_lines)) if chars else (xx_len, en_len)
            stats.long_lines, stats.long = _longer_than(a, b, task.report.max_len, task.first_line)
        if task.max_tokens is not None:
            stats.overlong_lines, stats.overlong = _longer_than(xx_len, en_len, task.max_tokens, task.first_line)
    else:
        if task.limits.unit == "chars":
            a, b = _lengths(xx_lines), _lengths(en_lines)
        else:
            a, b = xx_len, en_len
        reason = classify(a, b, is_blank(xx_lines) | is_blank(en_lines), task.limits)
        keep = reason == 0
        stats.filtered = count_reasons(reason)
    stats.kept = int(keep.sum())
    dtype = numpy_dtype(task.dtype)
    stats.tokens_xx = _write_side(f"{task.out_prefix}.xx", xx_ids, xx_len, keep, dtype)
    stats.tokens_en = _write_side(f"{task.out_prefix}.en", en_ids, en_len, keep, dtype)
    return task, stats


def _longer_than(a: np.ndarray, b: np.ndarray, limit: int, first_line: int) -> tuple[int, list]:
    """Count of lines with a side longer than ``limit``, and the first few as (line from 1, side, length)."""
    longer = np.maximum(a, b)
    over = np.flatnonzero(longer > limit)
    return len(over), [(first_line + int(i) + 1, "xx" if a[i] >= b[i] else "en", int(longer[i]))
                       for i in over[:_OVERLONG_KEPT]]


def _lengths(seqs) -> np.ndarray:
    return np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))


def _write_side(prefix: str, ids: list[list[int]], lengths: np.ndarray, keep: np.ndarray,
                dtype: np.dtype) -> int:
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    flat = flat[np.repeat(keep, lengths)]
    flat.tofile(f"{prefix}.tok")
    lengths[keep].astype("<i4").tofile(f"{prefix}.len")
    return len(flat)


# --------------------------------------------------------------------------- assembly


def write_empty(prefix: Path, dtype: str) -> None:
    """A valid zero-line ``.bin``/``.idx`` pair (used for absent dev splits)."""
    np.zeros(0, dtype=numpy_dtype(dtype)).tofile(f"{prefix}.bin")
    np.zeros(1, dtype="<i8").tofile(f"{prefix}.idx")


def _assemble(chunk_prefixes: list[str], side: str, out_prefix: Path) -> None:
    """Concatenate chunk files of one side, in order, into ``.bin``/``.idx``; delete chunks."""
    with open(f"{out_prefix}.bin", "wb") as fbin, open(f"{out_prefix}.idx", "wb") as fidx:
        np.zeros(1, dtype="<i8").tofile(fidx)
        base = 0
        for prefix in chunk_prefixes:
            tok, lens = f"{prefix}.{side}.tok", f"{prefix}.{side}.len"
            with open(tok, "rb") as f:
                shutil.copyfileobj(f, fbin, 1 << 22)
            offsets = np.cumsum(np.fromfile(lens, dtype="<i4"), dtype=np.int64) + base
            offsets.astype("<i8").tofile(fidx)
            if len(offsets):
                base = int(offsets[-1])
            os.remove(tok)
            os.remove(lens)


def binarize_corpus(scans: dict[str, dict[str, SplitScan]], model: str | Path, bin_dir: str | Path,
                    dtype: str, limits: FilterLimits, pool, chunk_dir: str | Path | None = None,
                    progress: Progress | None = None, max_eval_tokens: int | None = None
                    ) -> dict[str, dict[str, SplitStats]]:
    """Binarize every scanned split into ``bin_dir/<xx>.<split>.<lang>.{bin,idx}``.

    Only the ``train`` split is filtered; dev/test lines longer than ``limits.max_len`` are kept
    and counted (``SplitStats.long``). ``progress`` gets line pairs done. Returns
    ``{code: {split: SplitStats}}``. With ``max_eval_tokens`` a dev/test line longer than that
    many tokens raises :class:`LongLineError`; dev/test chunks go first, so that happens before
    the (much larger) train split is encoded.
    """
    bin_dir = Path(bin_dir)
    chunk_dir = Path(chunk_dir) if chunk_dir else bin_dir / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(_chunk_tasks(scans, str(model), dtype, limits, chunk_dir, max_eval_tokens))
    remaining = {(c, s): sc.chunks for c, splits in scans.items() for s, sc in splits.items()}
    eval_left = sum(n for (_, split), n in remaining.items() if split != "train")
    stats = {c: {s: SplitStats() for s in splits} for c, splits in scans.items()}
    # Splits with zero lines have no chunks: assemble them up front.
    for (code, split), n in remaining.items():
        if n == 0:
            _assemble_split(code, split, 0, chunk_dir, bin_dir)
    for task, chunk_stats in pool.imap_unordered(encode_chunk, tasks):
        stats[task.pair][task.split].add(chunk_stats)
        key = (task.pair, task.split)
        remaining[key] -= 1
        if remaining[key] == 0:  # assemble as soon as possible so chunk files do not pile up
            _assemble_split(task.pair, task.split, scans[task.pair][task.split].chunks, chunk_dir, bin_dir)
        if task.split != "train":
            eval_left -= 1
            if eval_left == 0 and max_eval_tokens is not None:
                _refuse_overlong_eval_lines(scans, stats, max_eval_tokens)
        if progress:
            progress(chunk_stats.lines)
    shutil.rmtree(chunk_dir, ignore_errors=True)
    return stats


def eval_lines(stats: dict[str, dict[str, SplitStats]], key: str) -> tuple[int, list[tuple[str, str, int, str, int]]]:
    """Dev/test lines recorded under ``key`` (``long`` or ``overlong``) over all pairs: their count and
    the first few as (pair, split, line from 1, side, length), in pair, split and line order."""
    found = [(code, split, *entry) for code, splits in sorted(stats.items())
             for split, st in sorted(splits.items()) if split != "train" for entry in getattr(st, key)]
    total = sum(getattr(st, f"{key}_lines") for splits in stats.values() for s, st in splits.items() if s != "train")
    return total, found[:_OVERLONG_KEPT]


def _refuse_overlong_eval_lines(scans, stats, max_tokens: int) -> None:
    """Raise :class:`LongLineError` naming the first too-long dev/test line and counting the others.

    Refused rather than truncated or dropped, as fairseq refuses a validation example longer than
    max_positions unless told otherwise: a shortened line would change the dev loss and the
    references BLEU is computed on, a dropped one the test set itself.
    """
    total, shown = eval_lines(stats, "overlong")
    if not total:
        return
    code, split, line, side, n = shown[0]
    sc = scans[code][split]
    others = ", ".join(f"{c} {s} line {ln} ({m} tokens)" for c, s, ln, _, m in shown[1:])
    more = f"; {total - 1} more such line(s): {others}{' ...' if total > len(shown) else ''}" if total > 1 else ""
    raise LongLineError(
        f"{getattr(sc, side).path}: line {line} has {n} tokens, more than the {max_tokens} allowed for dev/test "
        f"lines (--max-eval-tokens); dev/test lines are never filtered or truncated, and validation stops at one "
        f"longer than the model's max_positions. Remove or shorten line {line} in both {sc.xx.path.name} and "
        f"{sc.en.path.name}, or raise --max-eval-tokens if the model's max_positions holds it{more}"
    )


def _chunk_prefix(chunk_dir: Path, code: str, split: str, index: int) -> str:
    return str(chunk_dir / f"{code}.{split}.{index:06d}")


def _assemble_split(code: str, split: str, chunks: int, chunk_dir: Path, bin_dir: Path) -> None:
    prefixes = [_chunk_prefix(chunk_dir, code, split, k) for k in range(chunks)]
    for side, lang in (("xx", code), ("en", ENGLISH)):
        _assemble(prefixes, side, bin_dir / f"{code}.{split}.{lang}")


def _chunk_tasks(scans, model: str, dtype: str, limits: FilterLimits, chunk_dir: Path,
                 max_eval_tokens: int | None = None) -> Iterator[ChunkTask]:
    """Dev/test chunks first (their length check can refuse the corpus early), then train."""
    for train in (False, True):
        for code, splits in scans.items():
            for split, sc in splits.items():
                if (split == "train") != train:
                    continue
                xo, eo = sc.xx.chunk_offsets, sc.en.chunk_offsets
                for k in range(sc.chunks):
                    yield ChunkTask(
                        pair=code, split=split, index=k,
                        xx=(str(sc.xx.path), xo[k], xo[k + 1]), en=(str(sc.en.path), eo[k], eo[k + 1]),
                        model=model, dtype=dtype, limits=limits if train else None,
                        out_prefix=_chunk_prefix(chunk_dir, code, split, k), first_line=k * sc.xx.chunk_lines,
                        report=None if train else limits, max_tokens=None if train else max_eval_tokens,
                    )
