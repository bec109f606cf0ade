"""Corpus reading, validation, filtering, SentencePiece training and binarization."""
