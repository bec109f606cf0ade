"""The embedded default data set: the synthetic corpus, generated and prepared once, then cached."""
from __future__ import annotations

from pathlib import Path

from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.synthetic import generate_corpus

# Settings of the default corpus; the README reports the BLEU a default run reaches on it.
SEED = 0
MIN_SIZE, MAX_SIZE = 50, 50_000  # three orders of magnitude between the smallest and largest language
VOCAB_SIZE = 4000


def ensure_prepared_synthetic(root: str | Path, quiet: bool = False) -> Path:
    """``<root>/corpus`` (plain layout) and ``<root>/prepared`` (training format); returns the latter."""
    root = Path(root)
    corpus, prepared = root / "corpus", root / "prepared"
    if not (corpus / "langs.tsv").is_file():  # langs.tsv is written last
        generate_corpus(corpus, seed=SEED, min_size=MIN_SIZE, max_size=MAX_SIZE)
    if not (prepared / "meta.json").is_file():
        prepare(PrepareConfig(corpus=corpus, out=prepared, vocab_size=VOCAB_SIZE, quiet=quiet))
    return prepared
