"""Gradient Vaccine (Wang, Tsvetkov, Firat, Cao 2021, ICLR), Algorithm 1, on Gram matrices.

Per parameter group k and ordered language pair (i, j) an EMA target φ̂_ijk, initially 0. For every
language i of the chosen subset 𝒢 (all / low-resource / high-resource) present in the batch, over the
other present languages j in random order:

    φ  = cos(g'_i, g_j)                                    (line 12: partly altered g'_i, original g_j)
    if φ < φ̂_ij:  g'_i ← g'_i + ‖g'_i‖(φ̂√(1−φ²) − φ√(1−φ̂²)) / (‖g_j‖√(1−φ̂²)) · g_j     (Eq. 2)
    φ̂_ij ← (1−β) φ̂_ij + β φ                              (line 16, Eq. 3)

The EMA update follows Algorithm 1 literally: it runs after EVERY comparison (altered or not), and the φ
it averages is the one computed on line 12 — the cosine of the partly altered g'_i (already altered by
the j's visited before) with the original g_j, measured BEFORE this pair's own alteration (line 14 does
not recompute φ). Languages outside 𝒢 keep g'_i = g_i (C_i = e_i) but are still used as directions g_j.
The update of the group is Σ_i g'_i = Σ_j w_j g_j, w = 1ᵀC.

Variants: ``fixed_target=c`` uses the constant target φ̂ ≡ c and keeps no EMA (the paper's ablation
uses 0.5); ``fixed_target=0`` is PCGrad exactly. ``langs`` picks 𝒢 from the training-set sizes:
"lrl" = size < ``size_threshold``, "hrl" = size ≥ ``size_threshold`` (the paper's best: LRL_only,
all_layer granularity, β = 1e-2).

Guards: a pair is skipped (no alteration, no EMA update) when either gradient is zero, j is absent, or
g'_i has vanished (see pcgrad.VANISHED). Cosines are clamped to [−1, 1]; targets are clamped to
|φ̂| ≤ 1 − 1e-6 where used (comparison and Eq. 2), because φ̂ = ±1 divides by √(1−φ̂²) = 0; the stored
EMA itself is not clamped. Random order: see pcgrad.py (``order``, ``last_order``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megavac.methods.base import (GramMethod, StepContext, active_mask, check_choice, check_number,
                                  check_state_tensor)
from megavac.methods.pcgrad import ORDERS, draw_order, pairwise_surgery

SUBSETS = ("all", "lrl", "hrl")


def lang_subset(num_langs: int, langs: str, sizes, size_threshold) -> torch.Tensor:
    """bool [K]: languages GradVac alters."""
    if langs not in SUBSETS:
        raise ValueError(f"langs must be one of {SUBSETS}, got {langs!r}")
    if langs == "all":
        return torch.ones(num_langs, dtype=torch.bool)
    if sizes is None:
        raise ValueError(f"gradvac langs={langs!r} needs the languages' training-set sizes, got sizes=None")
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    if sizes.shape != (num_langs,):
        raise ValueError(f"sizes must have {num_langs} entries, got shape {tuple(sizes.shape)}")
    low = sizes < float(size_threshold)
    return low if langs == "lrl" else ~low


class GradVac(GramMethod):
    """GradVac with per-(group, i, j) EMA targets, or a fixed target.

    Defaults are the paper's headline configuration (Section 4, Appendix F, Tables 6-8), the one its
    main results use: low-resource languages only (LRL_only), one Gram per layer (all_layer), β = 1e-2.
    ``sizes`` (training pairs per language, from the data) decide which languages are low-resource.
    """

    name = "gradvac"
    default_granularity = "all_layer"

    @dataclass
    class Options:
        beta: float = 1e-2
        """EMA rate β of the cosine-similarity targets φ̂ (Eq. 3; the paper searched 1e-1, 1e-2, 1e-3)."""
        langs: str = "lrl"
        """Languages whose gradients are altered: lrl (training pairs < size_threshold), hrl (the others)
        or all. Every present language still serves as a direction g_j."""
        size_threshold: float = 100_000
        """Training pairs below which a language counts as low-resource (the OPUS-100 grouping)."""
        fixed_target: float | None = None
        """A constant target φ̂ in (-1, 1) instead of EMA targets (the paper's ablation uses 0.5; 0 is PCGrad)."""
        order: str = "shared"
        """Random order of the other languages: shared or independent (see --pcgrad-order)."""

        def __post_init__(self):
            check_number("gradvac beta", self.beta, low=0.0, high=1.0, low_open=True)
            check_choice("gradvac langs", self.langs, SUBSETS)
            check_number("gradvac size_threshold", self.size_threshold, low=0.0)
            if self.fixed_target is not None:
                # Eq. 2 divides by √(1 − φ̂²): a target of ±1 would need an infinite multiple of g_j.
                check_number("gradvac fixed_target", self.fixed_target, low=-1.0, high=1.0, low_open=True,
                             high_open=True)
            check_choice("gradvac order", self.order, ORDERS)

    def __init__(self, num_langs: int, sizes=None, **options):
        super().__init__(num_langs, **options)
        o = self.options
        self.beta = float(o.beta)
        self.langs = o.langs
        self.subset = lang_subset(num_langs, o.langs, sizes, o.size_threshold)
        self.fixed_target = None if o.fixed_target is None else float(o.fixed_target)
        self.order = o.order
        # EMA targets, stored transposed ([G, j, i]); created at the first call (G is unknown before).
        self._ema_t: torch.Tensor | None = None
        self.last_order: torch.Tensor | None = None
        self.last_perm: torch.Tensor | None = None

    @classmethod
    def for_run(cls, num_langs, options, run):
        return cls(num_langs, sizes=run.sizes, **options)

    def _before(self, gram, ctx: StepContext):
        self.last_order, self.last_perm = draw_order(self.num_langs, ctx.generator, self.order)

    @property
    def ema(self) -> torch.Tensor | None:
        """EMA targets [G, K, K], ema[g, i, j] = φ̂_ij (a view; stored transposed, see pairwise_surgery)."""
        return None if self._ema_t is None else self._ema_t.transpose(1, 2)

    def _weights(self, gram, ctx):
        G, K, _ = gram.shape
        active = active_mask(gram, ctx.present)
        if self.fixed_target is not None:
            targets = gram.new_full((1, 1, 1), self.fixed_target).expand(G, K, K)
            return pairwise_surgery(gram, active, self.subset, self.last_order, self.last_perm, targets)
        if self._ema_t is None:
            self._ema_t = gram.new_zeros(G, K, K)
        if self._ema_t.shape[0] != G:
            raise ValueError(f"gram has {G} groups but the GradVac EMA has {self._ema_t.shape[0]}")
        # Updated in place, per compared pair, right after its comparison (Algorithm 1, line 16). A
        # skipped (non-finite) step never gets here, so the EMA stays untouched then.
        self._ema_t = self._ema_t.to(gram.device)
        return pairwise_surgery(gram, active, self.subset, self.last_order, self.last_perm, self._ema_t,
                                self.beta)

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["ema"] = None if self._ema_t is None else self.ema.contiguous().clone()
        return d

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        if "ema" not in d:
            raise ValueError(f"{self.name} state_dict lacks 'ema': keys {sorted(d)}")
        ema = d["ema"]
        if ema is None:
            self._ema_t = None
            return
        K = self.num_langs
        shape = (ema.shape[0] if isinstance(ema, torch.Tensor) and ema.dim() == 3 else -1, K, K)
        self._ema_t = check_state_tensor(self.name, ema, shape, "ema").transpose(1, 2).contiguous()
