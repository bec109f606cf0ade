"""Joint SentencePiece model trained on a temperature-sampled multilingual sample.

Training on the raw concatenation would let the largest languages (and English, which
appears in every pair) dominate the vocabulary. Instead every language l (English
counted once, with all pairs' English lines pooled) contributes

    m_l = total * q_l,   q_l = p_l^(1/T) / sum_k p_k^(1/T),   p_l = n_l / sum_k n_k

lines, where ``total = min(spm_sentences, sum_l n_l)``. When m_l > n_l the language's
lines are repeated (every line floor(m_l/n_l) times plus a random subset), which is the
upsampling that temperature sampling asks for. Selection streams each file once and
keeps only O(block) random indices in memory, so memory does not grow with the corpus.
"""
from __future__ import annotations

import io
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .corpus import ENGLISH, UTF8_BOM

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
CHARACTER_COVERAGE = 0.9995  # below 1.0 so that stray rare symbols do not eat vocabulary
_SELECT_BLOCK = 1 << 16
# Trainer threads are part of the result, not just of its speed: the unigram E-step sums per-thread
# partial counts in float, so 1, 2 and 16 threads give different models (byte-wise, from the same
# sample and seed), while a fixed count gives the same model on every machine. Hence a fixed
# default (``prepare --spm-threads``, recorded in the fingerprint), never the worker count.
TRAIN_THREADS = 16


def lang_tag(code: str) -> str:
    """Target-language tag token, e.g. ``<2de>``."""
    return f"<2{code}>"


def temperature_counts(sizes: Mapping[str, int], temperature: float, total: int) -> dict[str, int]:
    """Lines to sample per language: proportional to ``(n_l / sum n)^(1/T)``, summing to ``total``.

    Rounding uses largest remainders (ties broken by language code) so the sum is exact.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n_all = sum(sizes.values())
    if n_all == 0 or total <= 0:
        return dict.fromkeys(sizes, 0)
    weights = {lang: (n / n_all) ** (1.0 / temperature) if n > 0 else 0.0 for lang, n in sizes.items()}
    z = sum(weights.values())
    exact = {lang: total * w / z for lang, w in weights.items()}
    counts = {lang: math.floor(x) for lang, x in exact.items()}
    short = total - sum(counts.values())
    by_remainder = sorted(exact, key=lambda lang: (-(exact[lang] - counts[lang]), lang))
    for lang in by_remainder[:short]:
        counts[lang] += 1
    return counts


@dataclass(frozen=True)
class SampleTask:
    """Take lines from one file: every line ``repeat`` times, plus ``extra`` random lines once more."""

    lang: str
    """Language the file belongs to."""
    path: str
    """Text file."""
    lines: int
    """Number of lines in the file (from the validation scan)."""
    repeat: int
    """Copies of every line."""
    extra: int
    """Lines chosen uniformly without replacement for one more copy."""
    seed: int
    """Random seed for this file (derived from the run seed and file number)."""
    out: str
    """Where to write this file's share of the sample."""


def plan_sample(files: Mapping[str, Sequence[tuple[str, int]]], counts: Mapping[str, int], seed: int,
                tmp_dir: str | Path) -> list[SampleTask]:
    """Split each language's count over its files (English has one file per pair).

    ``files`` maps language -> [(path, lines)]. A language's lines are pooled, so the
    extra lines are distributed over its files hypergeometrically (uniform over the pool).
    """
    rng = np.random.default_rng([seed, 0])
    tasks = []
    for lang in sorted(files):
        n_total = sum(n for _, n in files[lang])
        if n_total == 0:
            continue
        repeat, extra = divmod(counts.get(lang, 0), n_total)
        left_lines = n_total
        for path, n in files[lang]:
            k = _draw_share(rng, n, left_lines, extra)
            left_lines -= n
            extra -= k
            if repeat or k:
                tasks.append(SampleTask(lang, str(path), n, repeat, k, seed + 1 + len(tasks),
                                        str(Path(tmp_dir) / f"sample.{len(tasks):05d}.txt")))
    return tasks


def _draw_share(rng: np.random.Generator, n: int, pool_left: int, need: int) -> int:
    """How many of ``need`` uniform picks from ``pool_left`` items fall in the first ``n``."""
    if need == 0 or n == 0:
        return 0
    if n == pool_left:
        return need
    return int(rng.hypergeometric(n, pool_left - n, need))


def sample_file(task: SampleTask) -> tuple[str, int, int]:
    """Write ``task``'s lines; returns (lang, lines written, blank lines skipped)."""
    rng = np.random.default_rng(task.seed)
    written = skipped = 0
    with open(task.path, "rb") as src, open(task.out, "wb") as dst:
        if src.read(len(UTF8_BOM)) != UTF8_BOM:  # a byte order mark is not part of line 0
            src.seek(0)
        for start, copies in _multiplicities(rng, task):
            for i in range(len(copies)):
                line = src.readline().rstrip(b"\n").removesuffix(b"\r")
                m = int(copies[i])
                if m == 0:
                    continue
                if not line.strip():  # SentencePiece learns nothing from blank lines
                    skipped += m
                    continue
                dst.write((line + b"\n") * m)
                written += m
    return task.lang, written, skipped


def _multiplicities(rng: np.random.Generator, task: SampleTask):
    """Yield (first line, copies per line) for consecutive blocks of the file.

    Sequential hypergeometric draws give a uniform sample without replacement while only
    materialising one block of indices at a time.
    """
    need, left = task.extra, task.lines
    for start in range(0, task.lines, _SELECT_BLOCK):
        size = min(_SELECT_BLOCK, task.lines - start)
        k = _draw_share(rng, size, left, need)
        copies = np.full(size, task.repeat, dtype=np.int64)
        if k:
            copies[rng.choice(size, size=k, replace=False)] += 1
        need -= k
        left -= size
        yield start, copies


def write_sample(files: Mapping[str, Sequence[tuple[str, int]]], counts: Mapping[str, int],
                 out_path: str | Path, pool, seed: int = 0) -> dict[str, dict[str, int]]:
    """Stream the temperature sample of every language into ``out_path``.

    Returns ``{lang: {"planned": m_l, "written": w, "blank_skipped": b}}``.
    """
    out_path = Path(out_path)
    tmp_dir = out_path.parent / (out_path.name + ".parts")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tasks = plan_sample(files, counts, seed, tmp_dir)
    report = {lang: {"planned": int(counts.get(lang, 0)), "written": 0, "blank_skipped": 0} for lang in files}
    for lang, written, skipped in pool.imap(sample_file, tasks):
        report[lang]["written"] += written
        report[lang]["blank_skipped"] += skipped
    with open(out_path, "wb") as dst:
        for t in tasks:
            with open(t.out, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
            os.remove(t.out)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return report


def train(sample_path: str | Path, model_prefix: str | Path, vocab_size: int, langs: Sequence[str],
          num_threads: int, input_sentence_size: int, seed: int = 0, verbose: bool = False) -> int:
    """Train the joint unigram model; returns the realised vocabulary size.

    ``langs`` are the non-English codes; ``<2en>`` and ``<2xx>`` for each become
    user-defined symbols so they are never split. ``num_threads`` changes the model (see
    :data:`TRAIN_THREADS`): pass a fixed number, not the machine's core count.
    """
    import sentencepiece as spm

    tags = [lang_tag(ENGLISH)] + [lang_tag(c) for c in sorted(langs)]
    spm.set_random_generator_seed(seed)
    # Lines through an iterator and the model into memory: given file names, SentencePiece stores them
    # (input, model_prefix) in the model, so the same preparation in another directory gave other bytes.
    model = io.BytesIO()
    with open(sample_path, "rb") as sample:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(line.rstrip(b"\n").decode("utf-8") for line in sample), model_writer=model,
            model_type="unigram", vocab_size=vocab_size, character_coverage=CHARACTER_COVERAGE,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            user_defined_symbols=tags,
            input_sentence_size=max(input_sentence_size, 1), shuffle_input_sentence=True,
            num_threads=max(num_threads, 1),
            # Small corpora cannot fill a large vocabulary; shrink instead of failing.
            hard_vocab_limit=False,
            minloglevel=0 if verbose else 2,
        )
    Path(f"{model_prefix}.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # What SentencePiece writes beside the model (piece, tab, score as C++ prints a float), for humans.
    Path(f"{model_prefix}.vocab").write_text(
        "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size())), encoding="utf-8")
    return sp.get_piece_size()
