"""Corpus reading, validation, filtering, SentencePiece training and binarization.

Entry points (see each module's docstring):

* ``python -m data_pipeline.prepare`` / :func:`data_pipeline.prepare.prepare` build a
  prepared data directory from an OPUS-100 or plain ``<xx>-en/`` corpus.
* :mod:`data_pipeline.indexed` reads it: :func:`load_meta`, :func:`open_split`,
  :class:`IndexedTokens`, :func:`load_raw`.
* ``python -m data_pipeline.synthetic`` writes a synthetic multilingual corpus.

Only the light-weight reader API is imported here, so that trainers importing
``data_pipeline`` do not pull in SentencePiece or rich.
"""
from .indexed import IndexedTokens, PreparedDataError, load_meta, load_raw, open_split

__all__ = ["IndexedTokens", "PreparedDataError", "load_meta", "load_raw", "open_split"]
