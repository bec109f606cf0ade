"""Monolithic training: one language-agnostic objective, every language's share weighted 1.

Σ_k 1 · g_k is exactly the gradient of the batch loss, so the trainer never needs per-language
gradients for it (``needs_gram`` is False) and runs the plain single-backward path.
"""
from __future__ import annotations

from megavac.methods.base import GramMethod


class Monolithic(GramMethod):
    """All weights 1 (absent languages too: their gradients are zero, the weight is irrelevant)."""

    name = "monolithic"

    def needs_gram(self, step: int) -> bool:
        return False
