"""Read-only, memory-mapped access to a prepared data directory.

Files written by ``python -m data_pipeline.prepare`` (format_version 1):

* ``bin/<xx>.<split>.<lang>.bin``: raw little-endian token ids of every line
  concatenated, no tag/bos/eos; dtype ``meta["dtype"]`` (``uint16`` or ``int32``).
* ``bin/<xx>.<split>.<lang>.idx``: raw little-endian ``int64`` array (no header) of
  n+1 offsets in elements: line i is ``bin[idx[i]:idx[i+1]]``, ``idx[0] == 0``.
* ``raw/<xx>.<split>.<lang>`` (dev/test): original lines, UTF-8, ``\\n``-terminated;
  read them with :func:`load_raw`, which splits on ``\\n`` only (``str.splitlines``
  would also split on U+2028, U+0085, ..., and text-mode ``open`` on a lone ``\\r``;
  either misaligns references).
* ``spm.model``: the SentencePiece model (:func:`spm_path`).
* ``meta.json``: written last (:func:`load_meta`); its ``tasks`` (the languages: translation directions) are what
  ``--langs`` selects from (:func:`select_langs`).

Every consumer (training data, the dry-run plan, evaluation) reads the directory through
these functions, so the format check, the file layout and the line splitting live here only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

FORMAT_VERSION = 1
# What every consumer of meta.json relies on (prepare writes more, for humans).
META_KEYS = ("vocab_size", "pad_id", "unk_id", "bos_id", "eos_id", "pairs", "tasks")
TASK_KEYS = ("name", "pair", "src", "tgt", "tag_id")
_DTYPE_BY_ITEMSIZE = {2: np.dtype("<u2"), 4: np.dtype("<i4")}


class PreparedDataError(ValueError):
    """A prepared data directory is missing, incomplete or corrupt."""


class IndexedTokens:
    """Token sequences of one side of one split, memory-mapped.

    ``IndexedTokens("<dir>/bin/de.train.en")`` opens ``.bin`` and ``.idx``; indexing
    returns a read-only ``np.ndarray`` view (no copy). Picklable cheaply (re-maps the
    files) so it can be handed to DataLoader workers.
    """

    def __init__(self, prefix: str | Path, dtype: str | None = None):
        self.prefix = Path(prefix)
        self._dtype_name = dtype
        self._open()

    def _open(self) -> None:
        idx_path, bin_path = Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise PreparedDataError(f"missing {p}; run `python -m data_pipeline.prepare` to create it")
        self._idx = np.memmap(idx_path, dtype="<i8", mode="r") if idx_path.stat().st_size else np.zeros(0, "<i8")
        if len(self._idx) == 0 or self._idx[0] != 0:
            raise PreparedDataError(f"{idx_path} is not a valid offset index (must start with 0)")
        n_tokens = int(self._idx[-1])
        nbytes = bin_path.stat().st_size
        dtype = self._resolve_dtype(n_tokens, nbytes, bin_path)
        if nbytes != n_tokens * dtype.itemsize:
            raise PreparedDataError(f"{bin_path} has {nbytes} bytes but {idx_path} says {n_tokens} "
                                    f"tokens of {dtype.itemsize} bytes; the file is truncated or corrupt")
        self.dtype = dtype
        # np.memmap cannot map an empty file.
        self._bin = np.memmap(bin_path, dtype=dtype, mode="r") if nbytes else np.zeros(0, dtype)
        self._sizes: np.ndarray | None = None

    def _resolve_dtype(self, n_tokens: int, nbytes: int, bin_path: Path) -> np.dtype:
        if self._dtype_name is not None:
            return np.dtype({"uint16": "<u2", "int32": "<i4"}[self._dtype_name])
        if n_tokens == 0:
            return np.dtype("<u2")
        dtype = _DTYPE_BY_ITEMSIZE.get(nbytes // n_tokens) if nbytes % n_tokens == 0 else None
        if dtype is None:
            raise PreparedDataError(f"cannot infer the token dtype of {bin_path}: {nbytes} bytes for {n_tokens} tokens")
        return dtype

    def __len__(self) -> int:
        return len(self._idx) - 1

    @property
    def sizes(self) -> np.ndarray:
        """Token count of every line (int32, computed once from the index)."""
        if self._sizes is None:
            self._sizes = np.diff(self._idx).astype(np.int32)
        return self._sizes

    @property
    def num_tokens(self) -> int:
        """Total tokens over all lines."""
        return int(self._idx[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"line {i} out of range for {self.prefix} ({n} lines)")
        i %= n
        # Plain ndarray view (not np.memmap): no copy, and no memmap semantics leak to callers.
        return np.asarray(self._bin[int(self._idx[i]):int(self._idx[i + 1])])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getstate__(self):
        return {"prefix": self.prefix, "dtype": self._dtype_name}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._dtype_name = state["dtype"]
        self._open()

    def __repr__(self) -> str:
        return f"IndexedTokens({str(self.prefix)!r}, lines={len(self)}, tokens={self.num_tokens})"


def load_meta(data_dir: str | Path) -> dict:
    """Read ``<data_dir>/meta.json``; raises :class:`PreparedDataError` if absent or unknown."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        hint = (" (a half-written directory: preparation did not finish)" if Path(data_dir).is_dir() else "")
        raise PreparedDataError(
            f"{path} not found{hint}; create the data directory with "
            f"`python -m data_pipeline.prepare --corpus <corpus> --out {data_dir}`"
        )
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: neither names the file
        raise PreparedDataError(f"{path} is not valid JSON ({e}); re-run data_pipeline.prepare") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise PreparedDataError(f"{path}: format_version {version!r} is not supported "
                                f"(expected {FORMAT_VERSION}); re-run data_pipeline.prepare")
    # Checked here, once, so a hand-edited file fails with its name rather than a KeyError deep in a consumer.
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise PreparedDataError(f"{path} lacks keys {missing}")
    for t in meta["tasks"]:
        if not isinstance(t, dict) or any(k not in t for k in TASK_KEYS):
            raise PreparedDataError(f"{path}: task {t} lacks one of {list(TASK_KEYS)}")
    return meta


def select_langs(meta: dict, names: str | Sequence[str] | None = None, data_dir: str | Path | None = None
                 ) -> list[dict]:
    """The languages (``meta["tasks"]``: translation directions) that ``names`` selects, in the order ``names`` gives them.

    ``names`` is a comma-separated string (as ``--langs`` takes it) or a list of language names;
    None or empty selects every language, in meta order. The order matters: a language's position is
    its language index k in training. Unknown or repeated names raise ``ValueError`` naming
    them and the available languages (of ``data_dir``, when given).
    """
    tasks = meta["tasks"]
    if isinstance(names, str):
        names = names.split(",")
    wanted = [n.strip() for n in names or () if n.strip()]
    if not wanted:
        return list(tasks)
    by_name = {t["name"]: t for t in tasks}
    where = f"{data_dir} has" if data_dir is not None else "available:"
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"unknown language(s) {unknown}; {where} {list(by_name)}")
    repeated = sorted({n for n in wanted if wanted.count(n) > 1})
    if repeated:
        # A repeated language would be two languages sharing one data set (twice the sampling weight).
        raise ValueError(f"language(s) {repeated} selected more than once in {','.join(wanted)!r}")
    return [by_name[n] for n in wanted]


def spm_path(data_dir: str | Path) -> Path:
    """Path of the SentencePiece model ``spm.model``; raises if it is missing."""
    path = Path(data_dir) / "spm.model"
    if not path.is_file():
        raise PreparedDataError(f"missing {path}; run `python -m data_pipeline.prepare` to create it")
    return path


def split_prefix(data_dir: str | Path, pair: str, split: str, lang: str) -> Path:
    """Path prefix of ``bin/<pair>.<split>.<lang>`` (without .bin/.idx)."""
    return Path(data_dir) / "bin" / f"{pair}.{split}.{lang}"


def open_split(data_dir: str | Path, pair: str, split: str, lang: str) -> IndexedTokens:
    """Open one side (``lang`` = ``pair`` or ``"en"``) of one split of one pair.

    An empty train split raises :class:`PreparedDataError` naming the pair (prepare refuses one;
    this catches directories from before that check or edited since): found later it would be a
    sampling error that names no language. Empty dev/test splits are valid (no validation data).
    """
    tokens = IndexedTokens(split_prefix(data_dir, pair, split, lang))
    if split == "train" and len(tokens) == 0:
        raise PreparedDataError(f"{tokens.prefix}.idx: the train split of pair {pair} is empty, and every language "
                                f"needs training data; re-run data_pipeline.prepare (it refuses an empty train split) "
                                f"or leave the pair's languages out with --langs")
    return tokens


def raw_path(data_dir: str | Path, pair: str, split: str, lang: str) -> Path:
    """Path of the unfiltered dev/test text ``raw/<pair>.<split>.<lang>``."""
    return Path(data_dir) / "raw" / f"{pair}.{split}.{lang}"


def load_raw(data_dir: str | Path, pair: str, split: str, lang: str) -> list[str]:
    """Original dev/test lines (sources and BLEU references), byte-exact, split on ``\\n`` only.

    Any other character (``\\r``, U+0085, U+2028, ...) stays inside its line, so the lines
    align one to one with the binarized split and with the other side of the pair.
    """
    path = raw_path(data_dir, pair, split, lang)
    if not path.is_file():
        raise PreparedDataError(f"missing {path}; only dev and test splits have raw text")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PreparedDataError(f"{path}: invalid UTF-8 at byte offset {e.start}; re-run data_pipeline.prepare"
                                ) from None
    lines = text.split("\n")
    # prepare terminates every line; an unterminated last line (a hand-edited file) is still a line.
    if lines[-1] == "":
        lines.pop()
    return lines
