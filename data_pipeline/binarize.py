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
    ENGLISH, FILTER_REASONS, Corpus, FileScan, FilterLimits, check_same_length, classify,
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

    def add(self, other: "SplitStats") -> None:
        """Accumulate a chunk's statistics."""
        self.lines += other.lines
        self.kept += other.kept
        self.tokens_xx += other.tokens_xx
        self.tokens_en += other.tokens_en
        for k, v in other.filtered.items():
            self.filtered[k] += v


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
                    progress: Progress | None = None) -> dict[str, dict[str, SplitStats]]:
    """Binarize every scanned split into ``bin_dir/<xx>.<split>.<lang>.{bin,idx}``.

    Only the ``train`` split is filtered. ``progress`` gets line pairs done. Returns
    ``{code: {split: SplitStats}}``.
    """
    bin_dir = Path(bin_dir)
    chunk_dir = Path(chunk_dir) if chunk_dir else bin_dir / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(_chunk_tasks(scans, str(model), dtype, limits, chunk_dir))
    remaining = {(c, s): sc.chunks for c, splits in scans.items() for s, sc in splits.items()}
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
        if progress:
            progress(chunk_stats.lines)
    shutil.rmtree(chunk_dir, ignore_errors=True)
    return stats


def _chunk_prefix(chunk_dir: Path, code: str, split: str, index: int) -> str:
    return str(chunk_dir / f"{code}.{split}.{index:06d}")


def _assemble_split(code: str, split: str, chunks: int, chunk_dir: Path, bin_dir: Path) -> None:
    prefixes = [_chunk_prefix(chunk_dir, code, split, k) for k in range(chunks)]
    for side, lang in (("xx", code), ("en", ENGLISH)):
        _assemble(prefixes, side, bin_dir / f"{code}.{split}.{lang}")


def _chunk_tasks(scans, model: str, dtype: str, limits: FilterLimits, chunk_dir: Path) -> Iterator[ChunkTask]:
    for code, splits in scans.items():
        for split, sc in splits.items():
            xo, eo = sc.xx.chunk_offsets, sc.en.chunk_offsets
            for k in range(sc.chunks):
                yield ChunkTask(
                    pair=code, split=split, index=k,
                    xx=(str(sc.xx.path), xo[k], xo[k + 1]), en=(str(sc.en.path), eo[k], eo[k + 1]),
                    model=model, dtype=dtype, limits=limits if split == "train" else None,
                    out_prefix=_chunk_prefix(chunk_dir, code, split, k),
                )
