"""The interface every gradient method implements, and the checks they share.

Every method here sees the per-language gradients only through their Gram matrices (docs/design.md §2):
``gram[g, i, j] = g_i · g_j`` restricted to parameter group g. A method returns weights ``w[g, k]`` and
the trainer applies ``Σ_k w[g, k] g_k`` to group g. Language k's gradient ``g_k`` is the gradient of its
SHARE of the batch loss, so all-ones weights reproduce plain (monolithic) training.

Conventions shared by all methods:

* Arithmetic is float64 (Grams are cast on entry); weights come back float64 on the Gram's device.
* A language takes part in a group only if it is ``present`` in the batch AND its gradient in that group
  is non-zero (``gram[g, k, k] > 0``). Other languages are never compared against, never altered and
  never used as a direction: a zero gradient has no direction (its cosine is 0/0).
* Non-finite Grams (fp16 overflow, a NaN loss): ``weights`` returns the cheap-path weights
  ``loss_weights()`` broadcast to every group (all ones for every method except CATS and GradNorm,
  whose cheap-path weights are their current task weights), touches no state (EMA, α, λ, GradNorm
  weights) and increments ``skipped``. All-ones rather than ``None`` keeps the trainer's code path
  single; the step itself is then skipped or not by DeepSpeed's own overflow check, as in monolithic
  training.
* Randomness (the order in which PCGrad/GradVac visit the other languages) comes only from
  ``ctx.generator``, so a reference implementation can replay it from ``last_order``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass
class StepContext:
    step: int
    """Optimizer step (0-based) about to be taken."""
    present: torch.Tensor
    """bool [K]: language has gradient in this step (absent => zero row/column in the Gram)."""
    losses: torch.Tensor | None
    """float [K]: per-language MEAN token loss of this step's global batch (label-smoothed training loss,
    detached; 0 for absent languages), used by GradNorm's loss ratios. Not the loss shares: a share
    depends on how many of the batch's tokens the language holds, which length packing varies."""
    generator: torch.Generator
    """The only source of randomness, so a reference can replay it."""


@dataclass
class RunInfo:
    """What a method may read of the run it is built for (beyond its options)."""

    sizes: list[int]
    """Training pairs per language, in the order of the languages."""
    param_names: list[str]
    """The whole model's parameter names (``Transformer.named_parameters()``)."""
    granularity: str
    """The parameter groups of the Grams (megavac.model.groups)."""


class GramMethod:
    """Base class: monolithic behaviour, shared validation and the skip path.

    A method's user-facing options are the fields of its nested ``Options`` dataclass (one docstring per
    field, validated in ``__post_init__``); the command line gets one flag per field,
    ``--<method>-<field>`` (megavac.config). What comes from the data or the model rather than from the
    user (GradVac's training-set sizes, GradNorm's group) is a constructor argument of its own.

    Subclasses override ``_weights`` (called with a validated, finite float64 Gram) and, when they
    carry state, ``state_dict``/``load_state_dict`` (calling the base versions for ``skipped``).
    """

    name = "base"
    default_granularity = "whole_model"
    """Parameter groups of the method's paper (each method states its own)."""
    default_langs_per_batch: int | None = None
    """Languages per batch the method's paper draws (CATS: 4 or 8); None: the sampler's, all languages."""

    @dataclass
    class Options:
        pass

    def __init__(self, num_langs: int, **options):
        if not isinstance(num_langs, int) or isinstance(num_langs, bool) or num_langs < 1:
            raise ValueError(f"num_langs must be a positive int, got {num_langs!r}")
        self.num_langs = num_langs
        self.skipped = 0
        self.options = self.make_options(**options)

    @classmethod
    def for_run(cls, num_langs: int, options: dict, run: RunInfo) -> "GramMethod":
        """The method for a training run: its options plus what it reads of the run."""
        return cls(num_langs, **options)

    @classmethod
    def make_options(cls, **options):
        """The method's Options from keyword arguments; unknown names are a ValueError naming them."""
        allowed = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"method {cls.name!r} has no option(s) {unknown}; it accepts {allowed}")
        return cls.Options(**options)

    # ----------------------------------------------------------------------------- public interface
    def needs_gram(self, step: int) -> bool:
        return True

    def loss_weights(self) -> torch.Tensor:
        return torch.ones(self.num_langs, dtype=torch.float64)

    def weights(self, gram: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        gram = self._check(gram, ctx)
        self._before(gram, ctx)
        # One reduction instead of an elementwise mask: the sum is non-finite iff an entry is (or the
        # sum overflows, i.e. gradients of norm ~1e154, which is no better).
        if not bool(torch.isfinite(gram.sum())) or (
            self._uses_losses and ctx.losses is not None and not bool(torch.isfinite(ctx.losses).all())
        ):
            self.skipped += 1
            return self.loss_weights().to(gram).expand(gram.shape[0], -1).clone()
        w = self._weights(gram, ctx)
        assert w.shape == gram.shape[:2] and w.dtype == torch.float64, (w.shape, w.dtype)
        return w

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, d: dict) -> None:
        if "skipped" not in d:
            raise ValueError(f"{self.name} state_dict lacks 'skipped': keys {sorted(d)}")
        self.skipped = int(d["skipped"])

    # ------------------------------------------------------------------------------ for subclasses
    _uses_losses = False

    def _before(self, gram: torch.Tensor, ctx: StepContext) -> None:
        """Hook run before the finiteness check (draws randomness so every call draws the same)."""

    def _weights(self, gram: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return torch.ones(gram.shape[:2], dtype=torch.float64, device=gram.device)

    def _check(self, gram: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        K = self.num_langs
        if not isinstance(gram, torch.Tensor) or gram.dim() != 3 or gram.shape[1:] != (K, K):
            shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
            raise ValueError(f"gram must be [G, {K}, {K}], got {shape}")
        if gram.shape[0] < 1:
            raise ValueError("gram has no parameter group (G = 0)")
        present = ctx.present
        if not isinstance(present, torch.Tensor) or present.shape != (K,) or present.dtype != torch.bool:
            desc = (tuple(present.shape), present.dtype) if isinstance(present, torch.Tensor) else present
            raise ValueError(f"ctx.present must be a bool tensor of shape [{K}], got {desc}")
        if ctx.losses is not None and tuple(ctx.losses.shape) != (K,):
            raise ValueError(f"ctx.losses must have shape [{K}], got {tuple(ctx.losses.shape)}")
        return gram.detach().to(torch.float64)


def active_mask(gram: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """bool [G, K]: language present in the batch and with a non-zero gradient in the group."""
    return present.to(gram.device)[None, :] & (torch.diagonal(gram, dim1=1, dim2=2) > 0)


def check_state_tensor(name: str, value, shape: tuple, what: str) -> torch.Tensor:
    """Validate a tensor read from a state_dict (user error => ValueError naming the bad value)."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} state_dict: {what} must have shape {tuple(shape)}, got {got}")
    return value.detach().to(torch.float64).clone()


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number (an int with ``integer``) in the
    interval given by ``low``/``high`` (closed unless ``low_open``/``high_open``)."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}, "
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        where = f" in {lo or '(-inf, '}{hi or 'inf)'}" if (low is not None or high is not None) else ""
        raise ValueError(f"{name} must be a finite {'integer' if integer else 'number'}{where}, got {value!r}")
