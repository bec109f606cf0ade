"""Gradient-surgery and task-weighting methods on per-language Gram matrices.

``build_method(name, num_langs, **options)`` returns a ``GramMethod``; see base.py for the interface
the trainer calls (``needs_gram``, ``loss_weights``, ``weights``, ``state_dict``, ``skipped``).
"""
from __future__ import annotations

import inspect

from megavac.methods.base import GramMethod, StepContext
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


def method_options(name: str) -> dict:
    """Options a method accepts, with their defaults."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    params = list(inspect.signature(METHODS[name].__init__).parameters.values())[2:]
    return {p.name: p.default for p in params}


def build_method(name: str, num_langs: int, **options) -> GramMethod:
    """Instantiate method ``name`` for ``num_langs`` languages; unknown names/options raise ValueError."""
    allowed = method_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; it accepts {sorted(allowed)}")
    return METHODS[name](num_langs, **options)


__all__ = ["CATS", "GradNorm", "GradVac", "GramMethod", "MGDA", "METHODS", "Monolithic", "PCGrad",
           "StepContext", "build_method", "method_options"]
