"""Finding, validating and reading English-centric parallel corpora.

Two on-disk layouts are understood:

* ``opus100``: ``<root>/opus-100-corpus/v1.0/supervised/<a>-<b>/opus.<a>-<b>-<split>.<lang>``
  where one of ``a``/``b`` is ``en`` (the real release sorts the two codes, so both
  ``af-en`` and ``en-fr`` occur). ``root`` may also point at ``.../supervised``.
* ``plain``: ``<root>/<xx>-en/<split>.<xx>`` and ``<split>.en`` (``en-<xx>`` is accepted too).

Validation streams every file once (:func:`scan_file`): it counts lines, checks UTF-8
and records the byte offset of every ``chunk_lines``-th line, so both files of a pair
can later be cut at the same line boundaries with O(lines / chunk_lines) memory.
Lines are separated by ``\\n`` only (a trailing ``\\r`` is dropped as a CRLF leftover);
a final line without a newline still counts. A UTF-8 byte order mark at the start of a
file is not text: every reader skips it (the scan starts line 0 after it). NUL bytes are
refused (a binary or UTF-16 file passes the UTF-8 check otherwise).
"""
from __future__ import annotations

import errno
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

ENGLISH = "en"
UTF8_BOM = b"\xef\xbb\xbf"
SPLITS = ("train", "dev", "test")
LAYOUTS = ("opus100", "plain")

# Codes end up in file names (<xx>.<split>.<lang>.bin), task names ("en-xx") and tags
# ("<2xx>"), so dots, dashes and spaces would make those ambiguous.
_CODE_RE = re.compile(r"^[A-Za-z0-9_]+$")
_OPUS_FILE_RE = re.compile(r"^opus\.(?P<dir>[^.]+)-(?P<split>train|dev|test)\.(?P<lang>[^.]+)$")


class CorpusError(ValueError):
    """A problem with the user's corpus; the message names the file/line/value."""


class LayoutError(CorpusError):
    """The corpus root does not look like any supported layout."""


class MissingFileError(CorpusError):
    """A file that the layout requires is absent."""


class LineCountMismatchError(CorpusError):
    """The two sides of a parallel split have different numbers of lines."""


class InvalidUtf8Error(CorpusError):
    """A file contains bytes that are not valid UTF-8."""


class UnknownLanguageError(CorpusError):
    """A language asked for (``--pairs``) is not in the corpus."""


class DuplicateLanguageError(CorpusError):
    """Two directories (or two ``--pairs`` entries) map to the same language code."""


class InvalidLanguageCodeError(CorpusError):
    """A language code that cannot be used in file names and tags."""


class NulByteError(CorpusError):
    """A file contains a NUL byte (binary data, or UTF-16 text)."""


class EmptySplitError(CorpusError):
    """A split that must have lines has none (a train split, or every train line filtered)."""


class LongLineError(CorpusError):
    """A dev/test line is longer than the limit for evaluation lines (they are never filtered)."""


class CorpusWarning(UserWarning):
    """Something suspicious but usable, e.g. a missing optional test split."""


@dataclass(frozen=True)
class SplitFiles:
    """The two sides of one split of one language pair."""

    xx: Path
    """Non-English side."""
    en: Path
    """English side."""


@dataclass(frozen=True)
class PairSource:
    """Where the files of one English-centric language pair live."""

    code: str
    """Non-English language code, as used in output file names and tags."""
    directory: Path
    """The pair's directory inside the corpus."""
    splits: dict[str, SplitFiles]
    """Available splits (``train`` always; ``dev``/``test`` when present)."""


@dataclass(frozen=True)
class Corpus:
    """A discovered corpus: layout plus the pairs selected for preparation."""

    root: Path
    """Absolute corpus root as given by the user."""
    layout: str
    """``opus100`` or ``plain``."""
    pairs: list[PairSource]
    """Selected pairs, sorted by code."""


@dataclass
class FileScan:
    """Result of streaming one file once (see :func:`scan_file`)."""

    path: Path
    """The scanned file."""
    lines: int
    """Number of lines (a last line without ``\\n`` counts)."""
    size: int
    """File size in bytes."""
    chunk_offsets: list[int] = field(default_factory=list)
    """Byte offset of lines 0, C, 2C, ... followed by ``size``; chunk k spans
    ``chunk_offsets[k]:chunk_offsets[k+1]``."""
    chunk_lines: int = 1
    """C: lines per chunk (the last chunk may hold fewer), so chunk k starts at line k·C."""


# --------------------------------------------------------------------------- discovery


def discover(root: str | Path, layout: str = "auto", langs: Sequence[str] | None = None) -> Corpus:
    """Find the language pairs under ``root`` and check the required files exist.

    ``layout`` is ``auto``, ``opus100`` or ``plain``; ``langs`` optionally restricts the
    pairs (every entry must exist). Only selected pairs are checked for files. Raises a
    :class:`CorpusError` subclass on problems; warns (:class:`CorpusWarning`) about
    missing optional splits.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise LayoutError(f"corpus directory {root} does not exist or is not a directory")
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; expected auto, {', '.join(LAYOUTS)}")
    base = _opus100_base(root) if layout == "opus100" else root
    dirs = _select(_pair_dirs(base), langs, root)
    if not dirs:
        raise LayoutError(f"no English-centric language pairs found under {root} (layout {layout})")
    pairs = [_pair_source(code, d, layout) for code, d in sorted(dirs.items())]
    _warn_missing(pairs)
    return Corpus(root=root, layout=layout, pairs=pairs)


def detect_layout(root: Path) -> str:
    """Return ``opus100`` or ``plain`` by looking at what is under ``root``."""
    if _opus100_base(root, required=False) is not None:
        return "opus100"
    for child in _subdirs(root):
        if _code_from_dirname(child.name) is not None and any(child.glob("train.*")):
            return "plain"
    raise LayoutError(
        f"cannot detect the corpus layout of {root}: expected either "
        "opus-100-corpus/v1.0/supervised/<a>-<b>/opus.<a>-<b>-train.<lang> or <xx>-en/train.<xx>"
    )


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir())


def _opus100_base(root: Path, required: bool = True) -> Path | None:
    """The ``supervised`` directory, accepting the release root or any level below it."""
    for candidate in (root / "opus-100-corpus/v1.0/supervised", root / "v1.0/supervised",
                      root / "supervised", root):
        if candidate.is_dir() and any(
            _OPUS_FILE_RE.match(f.name) for d in _subdirs(candidate) for f in d.glob("opus.*")
        ):
            return candidate
    if required:
        raise LayoutError(f"{root} is not an OPUS-100 corpus: no <a>-<b>/opus.<a>-<b>-train.* files found")
    return None


def _code_from_dirname(name: str) -> str | None:
    """``de-en`` or ``en-de`` -> ``de``; anything else -> None."""
    if name.endswith("-" + ENGLISH):
        return name[: -len(ENGLISH) - 1]
    if name.startswith(ENGLISH + "-"):
        return name[len(ENGLISH) + 1:]
    return None


def link_problem(path: Path, base: Path | None = None) -> str | None:
    """Why the symbolic link ``path`` leads nowhere usable, or None (not a link, or a good one).

    ``Path.is_dir``/``is_file`` answer False for a link that loops or dangles, which would drop
    it without a word; the callers name it instead. A link to ``base`` or one of its parents
    (``ln -s . de-en``) loops through the tree.
    """
    if not path.is_symlink():
        return None
    target = os.readlink(path)
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"a symbolic link loop ({path.name} -> {target} never reaches a file or directory)"
        return f"a dangling symbolic link (to {target}, which does not exist)"
    if base is not None:
        resolved, base = path.resolve(), base.resolve()
        if resolved == base or resolved in base.parents:
            return f"a symbolic link to {resolved}, which contains it (a loop)"
    return None


def _pair_dirs(base: Path) -> list[tuple[str, Path]]:
    """(code, directory) of every English-centric pair directory under ``base``."""
    found = []
    for d in sorted(base.iterdir()):
        problem = link_problem(d, base)
        if problem is not None:  # skipped like any other unusable directory, and said so
            warnings.warn(f"ignoring {d}: {problem}", CorpusWarning)
            continue
        if not d.is_dir():  # plain files beside the pairs (langs.tsv, LICENSE)
            continue
        code = _code_from_dirname(d.name)
        if code is None:
            warnings.warn(f"ignoring {d}: not an English-centric <xx>-en or en-<xx> directory", CorpusWarning)
            continue
        found.append((code, d))
    return found


def _check_code(code: str, where: Path) -> None:
    if code == ENGLISH or not _CODE_RE.match(code):
        raise InvalidLanguageCodeError(
            f"{where}: language code {code!r} is not usable; codes must match [A-Za-z0-9_]+ "
            f"and not be {ENGLISH!r} (rename e.g. pt-BR to pt_BR)"
        )


def _pair_source(code: str, d: Path, layout: str) -> PairSource:
    _check_code(code, d)
    if layout == "opus100":
        files = {s: SplitFiles(d / f"opus.{d.name}-{s}.{code}", d / f"opus.{d.name}-{s}.{ENGLISH}")
                 for s in SPLITS}
        required: tuple[str, ...] = ("train",)  # five OPUS-100 pairs ship without dev/test
    else:
        files = {s: SplitFiles(d / f"{s}.{code}", d / f"{s}.{ENGLISH}") for s in SPLITS}
        required = ("train", "dev")
    return PairSource(code, d, _existing_splits(files, required))


def _existing_splits(files: dict[str, SplitFiles], required: Sequence[str]) -> dict[str, SplitFiles]:
    """Keep the splits present on disk; a split present on only one side is an error."""
    out = {}
    for split, sf in files.items():
        for f in (sf.xx, sf.en):
            problem = link_problem(f)
            if problem is not None:  # otherwise reported as "missing", though `ls` shows it
                raise MissingFileError(f"{f} is {problem}")
        have_xx, have_en = sf.xx.is_file(), sf.en.is_file()
        if have_xx and have_en:
            out[split] = sf
        elif have_xx or have_en:
            missing = sf.en if have_xx else sf.xx
            present = sf.xx if have_xx else sf.en
            raise MissingFileError(f"missing file {missing} (its other side {present} exists)")
        elif split in required:
            raise MissingFileError(f"missing file {sf.xx} (and {sf.en}): the {split} split is required")
    return out


def _warn_missing(pairs: list[PairSource]) -> None:
    """One warning per missing optional split, listing the pairs (not one line per pair)."""
    for split in SPLITS:
        lacking = [p.code for p in pairs if split not in p.splits]
        if lacking:
            shown = ", ".join(lacking[:30]) + (f" ... ({len(lacking)} in all)" if len(lacking) > 30 else "")
            why = "; their languages have no validation loss and are left out of its average" if split == "dev" else ""
            warnings.warn(f"no {split} split (files absent) for {len(lacking)} of {len(pairs)} pairs: {shown}{why}",
                          CorpusWarning)


def _select(dirs: list[tuple[str, Path]], langs: Sequence[str] | None, root: Path) -> dict[str, Path]:
    """Reject duplicate codes, then restrict to ``langs`` (which must all exist)."""
    by_code: dict[str, Path] = {}
    for code, d in dirs:
        # Case-insensitive: "DE" vs "de" would collide on case-insensitive file systems.
        clash = next((c for c in by_code if c.lower() == code.lower()), None)
        if clash is not None:
            raise DuplicateLanguageError(
                f"language code {code!r} occurs twice: {by_code[clash]} and {d} map to the same code"
            )
        by_code[code] = d
    if langs is None:
        return by_code
    seen: set[str] = set()
    for code in langs:
        if code in seen:
            raise DuplicateLanguageError(f"language code {code!r} is listed twice in --pairs")
        seen.add(code)
    unknown = [c for c in langs if c not in by_code]
    if unknown:
        available = sorted(by_code)
        shown = ", ".join(available[:40]) + (" ..." if len(available) > 40 else "")
        raise UnknownLanguageError(
            f"unknown language code(s) {', '.join(map(repr, unknown))} in --pairs: not found under "
            f"{root}; available: {shown}"
        )
    return {c: by_code[c] for c in langs}


# --------------------------------------------------------------------------- scanning

_BLOCK_BYTES = 1 << 24


def scan_file(path: str | Path, chunk_lines: int) -> FileScan:
    """Stream ``path`` once: count lines, validate UTF-8, record chunk offsets.

    Memory is one block plus O(lines / chunk_lines) offsets.
    """
    path = Path(path)
    lines = 0
    pending = b""
    with open(path, "rb") as f:
        # Line 0 starts after a byte order mark, so chunk 0 (and every reader of it) skips the mark.
        pos = len(UTF8_BOM) if f.read(len(UTF8_BOM)) == UTF8_BOM else 0  # file offset of ``pending``
        f.seek(pos)
        offsets = [pos]
        while block := f.read(_BLOCK_BYTES):
            data = pending + block
            cut = data.rfind(b"\n") + 1  # only complete lines: never split a UTF-8 sequence
            if cut == 0:
                pending = data
                continue
            complete, pending = data[:cut], data[cut:]
            _check_utf8(complete, path, pos, lines)
            _check_nul(complete, path, pos, lines)
            newlines = np.flatnonzero(np.frombuffer(complete, dtype=np.uint8) == 10)
            # Line j (0-based) starts right after the newline ending line j-1.
            first = (lines // chunk_lines + 1) * chunk_lines
            for j in range(first, lines + len(newlines) + 1, chunk_lines):
                offsets.append(pos + int(newlines[j - lines - 1]) + 1)
            lines += len(newlines)
            pos += cut
    if pending:
        _check_utf8(pending, path, pos, lines)
        _check_nul(pending, path, pos, lines)
        lines += 1
        pos += len(pending)
    if offsets[-1] != pos:
        offsets.append(pos)
    return FileScan(path=path, lines=lines, size=pos, chunk_offsets=offsets, chunk_lines=chunk_lines)


def _check_utf8(data: bytes, path: Path, file_offset: int, lines_before: int) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line_no = lines_before + data.count(b"\n", 0, e.start) + 1
        bad = data[e.start:e.end].hex(" ")
        raise InvalidUtf8Error(
            f"{path}: invalid UTF-8 on line {line_no} at byte offset {file_offset + e.start} "
            f"(byte {e.start - line_start} of the line): {e.reason} (bytes {bad})"
        ) from None


def _check_nul(data: bytes, path: Path, file_offset: int, lines_before: int) -> None:
    at = data.find(b"\0")
    if at < 0:
        return
    line_start = data.rfind(b"\n", 0, at) + 1
    line_no = lines_before + data.count(b"\n", 0, at) + 1
    raise NulByteError(
        f"{path}: NUL byte on line {line_no} at byte offset {file_offset + at} (byte {at - line_start} of the "
        "line); a text corpus has none (is the file binary or UTF-16?): remove it or convert the file to UTF-8"
    )


def check_same_length(xx: FileScan, en: FileScan) -> int:
    """Both sides must have the same number of lines; returns it."""
    if xx.lines != en.lines:
        raise LineCountMismatchError(
            f"line count mismatch: {xx.path} has {xx.lines} lines but {en.path} has {en.lines} lines"
        )
    return xx.lines


# --------------------------------------------------------------------------- reading


def split_lines(data: bytes) -> list[str]:
    """Decode a block of complete lines (validated UTF-8) into strings without terminators."""
    if not data:
        return []
    parts = data.split(b"\n")
    if parts[-1] == b"":
        parts.pop()  # the block ended with a newline
    return [p[:-1].decode("utf-8") if p.endswith(b"\r") else p.decode("utf-8") for p in parts]


def read_range(path: str | Path, start: int, end: int) -> list[str]:
    """Lines stored in bytes ``[start, end)`` of ``path`` (chunk boundaries from a scan, which start
    after a byte order mark)."""
    with open(path, "rb") as f:
        f.seek(start)
        return split_lines(f.read(end - start))


def iter_lines(path: str | Path, block_lines: int = 65536) -> Iterator[list[str]]:
    """Yield the lines of ``path`` in blocks of at most ``block_lines`` (bounded memory); a byte order
    mark at the start of the file is skipped, as :func:`scan_file` does."""
    block: list[str] = []
    with open(path, "rb") as f:
        if f.read(len(UTF8_BOM)) != UTF8_BOM:
            f.seek(0)
        for raw in f:
            block.append(raw.rstrip(b"\n").removesuffix(b"\r").decode("utf-8"))
            if len(block) == block_lines:
                yield block
                block = []
    if block:
        yield block


# --------------------------------------------------------------------------- filtering

FILTER_REASONS = ("empty", "too_long", "too_short", "ratio")
"""Reasons a training pair is dropped, in order of precedence (first match wins)."""

LEN_UNITS = ("tokens", "chars")


@dataclass(frozen=True)
class FilterLimits:
    """Limits applied to training pairs (never to dev/test)."""

    min_len: int = 1
    """Drop a pair if either side is shorter than this."""
    max_len: int = 250
    """Drop a pair if either side is longer than this."""
    max_ratio: float = 3.0
    """Drop a pair if longer/shorter side length exceeds this; 0 disables the check."""
    unit: str = "tokens"
    """What lengths count: SentencePiece ``tokens`` or Unicode ``chars``."""

    def validate(self) -> None:
        """Raise ``ValueError`` for nonsensical limits."""
        if self.min_len < 0 or self.max_len < max(self.min_len, 1):
            raise ValueError(f"need 0 <= min_len <= max_len and max_len >= 1, got "
                             f"min_len={self.min_len} max_len={self.max_len}")
        if self.max_ratio != 0 and self.max_ratio < 1:
            raise ValueError(f"max_ratio must be >= 1 (or 0 to disable), got {self.max_ratio}")
        if self.unit not in LEN_UNITS:
            raise ValueError(f"length unit must be one of {LEN_UNITS}, got {self.unit!r}")


def classify(xx_len: np.ndarray, en_len: np.ndarray, empty: np.ndarray, limits: FilterLimits) -> np.ndarray:
    """Per pair: 0 = keep, k = dropped for ``FILTER_REASONS[k-1]``.

    ``empty`` marks pairs where either side is blank; lengths are in ``limits.unit``.
    """
    a = np.asarray(xx_len, dtype=np.int64)
    b = np.asarray(en_len, dtype=np.int64)
    reason = np.zeros(len(a), dtype=np.int8)
    # Assign in reverse precedence so that the more basic reason overwrites.
    if limits.max_ratio > 0:
        ratio = np.maximum(a, b) / np.maximum(np.minimum(a, b), 1)
        reason[ratio > limits.max_ratio] = 4
    reason[(a < limits.min_len) | (b < limits.min_len)] = 3
    reason[(a > limits.max_len) | (b > limits.max_len)] = 2
    reason[np.asarray(empty, dtype=bool)] = 1
    return reason


def count_reasons(reason: np.ndarray) -> dict[str, int]:
    """Histogram of :func:`classify` output by reason name (kept pairs excluded)."""
    counts = np.bincount(reason, minlength=len(FILTER_REASONS) + 1)
    return {name: int(counts[i + 1]) for i, name in enumerate(FILTER_REASONS)}


def is_blank(lines: Iterable[str]) -> np.ndarray:
    """Boolean array: line has no non-whitespace character."""
    return np.fromiter((not s.strip() for s in lines), dtype=bool)
