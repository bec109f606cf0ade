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
uses 0.5); ``fixed_target=0`` is PCGrad exactly. ``tasks`` picks 𝒢 from the training-set sizes:
"lrl" = size < ``size_threshold``, "hrl" = size ≥ ``size_threshold`` (the paper's best: LRL_only,
all_layer granularity, β = 1e-2).

Guards: a pair is skipped (no alteration, no EMA update) when either gradient is zero, j is absent, or
g'_i has vanished (see pcgrad.VANISHED). Cosines are clamped to [−1, 1]; targets are clamped to
|φ̂| ≤ 1 − 1e-6 where used (comparison and Eq. 2), because φ̂ = ±1 divides by √(1−φ̂²) = 0; the stored
EMA itself is not clamped. Random order: see pcgrad.py (``order``, ``last_order``).
"""
from __future__ import annotations

import math

import torch

from megavac.methods.base import GramMethod, StepContext, active_mask, check_state_tensor
from megavac.methods.pcgrad import ORDERS, draw_order, pairwise_surgery

TASKS = ("all", "lrl", "hrl")


def task_subset(num_langs: int, tasks: str, sizes, size_threshold) -> torch.Tensor:
    """bool [K]: languages GradVac alters."""
    if tasks not in TASKS:
        raise ValueError(f"tasks must be one of {TASKS}, got {tasks!r}")
    if tasks == "all":
        return torch.ones(num_langs, dtype=torch.bool)
    if sizes is None or size_threshold is None:
        raise ValueError(f"tasks={tasks!r} needs sizes and size_threshold, got sizes={sizes!r}, "
                         f"size_threshold={size_threshold!r}")
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    if sizes.shape != (num_langs,):
        raise ValueError(f"sizes must have {num_langs} entries, got shape {tuple(sizes.shape)}")
    low = sizes < float(size_threshold)
    return low if tasks == "lrl" else ~low


class GradVac(GramMethod):
    """GradVac with per-(group, i, j) EMA targets, or a fixed target."""

    name = "gradvac"

    def __init__(
        self,
        num_langs: int,
        beta: float = 1e-2,
        tasks: str = "all",
        sizes=None,
        size_threshold: float | None = None,
        fixed_target: float | None = None,
        order: str = "shared",
    ):
        super().__init__(num_langs)
        if not (isinstance(beta, (int, float)) and 0.0 < beta <= 1.0):
            raise ValueError(f"beta must be in (0, 1], got {beta!r}")
        if fixed_target is not None and not (
            isinstance(fixed_target, (int, float)) and math.isfinite(fixed_target)
            and -1.0 <= fixed_target <= 1.0
        ):
            raise ValueError(f"fixed_target must be in [-1, 1], got {fixed_target!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.beta = float(beta)
        self.tasks = tasks
        self.subset = task_subset(num_langs, tasks, sizes, size_threshold)
        self.fixed_target = None if fixed_target is None else float(fixed_target)
        self.order = order
        # EMA targets, stored transposed ([G, j, i]); created at the first call (G is unknown before).
        self._ema_t: torch.Tensor | None = None
        self.last_order: torch.Tensor | None = None
        self.last_perm: torch.Tensor | None = None

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
