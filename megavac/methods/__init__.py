"""Gradient-surgery and task-weighting methods on per-language Gram matrices.

``build_method(name, num_langs, **options)`` returns a ``GramMethod``; see base.py for the interface
the trainer calls (``needs_gram``, ``loss_weights``, ``weights``, ``state_dict``, ``skipped``).
"""
from __future__ import annotations

from dataclasses import asdict

from megavac.methods.base import GramMethod, RunInfo, StepContext
from megavac.methods.cats import CATS
from megavac.methods.gradnorm import GradNorm
from megavac.methods.gradvac import GradVac
from megavac.methods.mgda import MGDA
from megavac.methods.monolithic import Monolithic
from megavac.methods.pcgrad import PCGrad

METHODS: dict[str, type[GramMethod]] = {
    "monolithic": Monolithic,
    "pcgrad": PCGrad,
    "gradvac": GradVac,
    "cats": CATS,
    "mgda": MGDA,
    "gradnorm": GradNorm,
}


def method_class(name: str) -> type[GramMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def method_options(name: str) -> dict:
    """Options a method accepts (its ``Options`` fields), with their defaults."""
    return asdict(method_class(name).Options())


def build_method(name: str, num_langs: int, **kwargs) -> GramMethod:
    """Instantiate method ``name`` for ``num_langs`` languages with its options (and, for GradVac, the
    training-set ``sizes``; for GradNorm, the ``group`` of W); unknown names/options raise ValueError."""
    return method_class(name)(num_langs, **kwargs)


__all__ = ["CATS", "GradNorm", "GradVac", "GramMethod", "MGDA", "METHODS", "Monolithic", "PCGrad", "RunInfo",
           "StepContext", "build_method", "method_class", "method_options"]
