"""MGDA (Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization"), on Gram matrices.

Per group: γ = argmin ‖Σ_k γ_k g_k‖² over the simplex of the ACTIVE languages (present, non-zero
gradient in the group), by Frank-Wolfe from the uniform point (the paper's Algorithm 2) with exact line
search. Everything is an inner product: with u = Gγ, ‖θ‖² = γᵀu, the Frank-Wolfe vertex is
t = argmin_k u_k and θ·g_t = u_t; u and ‖θ‖² are updated in O(K) per iteration.

Variants (``variant``):
* "pairwise" (default): pairwise Frank-Wolfe — move mass s from the away vertex a = argmax_{γ_k>0} u_k
  to t, s = clip((u_a − u_t)/‖g_t − g_a‖², 0, γ_a). Same vertices and line search as FW, but it
  converges linearly (Lacoste-Julien & Jaggi 2015) where plain FW zig-zags at O(1/t): with a sparse
  optimum in few dimensions plain FW is still 5–60 % above the minimum after 250 iterations.
* "fw": the paper's plain Frank-Wolfe, γ ← (1−s)γ + s e_t, s = clip((‖θ‖² − u_t)/‖θ − g_t‖², 0, 1).

Stopping: when the Frank-Wolfe duality gap ‖θ‖² − θ·g_t ≤ ``tol``·‖θ‖² (relative, so the result does
not depend on the gradients' scale), when ‖θ‖² ≤ 1e-20·max_k ‖g_k‖² (0 is in the hull: the languages
are Pareto-stationary and the update is ~0), or after ``max_iter`` iterations (Sener & Koltun use 250).

Scale: weights = (number of active languages in the group) × γ, so the uniform point reproduces
monolithic training (all ones) and the update has the magnitude of a plain step's when gradients agree.
Zero-gradient and absent languages are left out of the hull (weight 0, their gradient is zero): with a
zero vector in the hull the min-norm point would be 0 and the group would never be updated.
A group with no active language gets weights 1 (all its gradients are zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megavac.methods.base import GramMethod, active_mask, check_choice, check_number

VARIANTS = ("pairwise", "fw")
# After every unclipped pairwise step u_t = u_a exactly (the line search zeroes θ·(g_t − g_a)), so the
# next away vertex is chosen among values that tie up to rounding. Values within TIE·max_k ‖g_k‖² of
# the extreme count as tied and the lowest index wins, so the path does not depend on rounding.
TIE = 1e-12
# ‖θ‖² ≤ ZERO·max_k ‖g_k‖²: the hull (numerically) contains 0, θ = 0 is the answer; the relative gap
# test could never fire there.
ZERO = 1e-20


def _first(vals, tie, lowest):
    """Per group, the lowest index whose value is within ``tie`` of the min (max) of ``vals``.

    Excluded entries are pushed out of range by the caller (±3·scale), not by where(): on CPU, float
    arithmetic on [G, K] is ~10× faster than where() with a bool mask, and amin/amax is used because
    .min(dim)/.max(dim) take milliseconds on rows holding ±inf (torch 2.13 CPU).
    """
    if lowest:
        cand = vals <= vals.amin(1, keepdim=True) + tie
    else:
        cand = vals >= vals.amax(1, keepdim=True) - tie
    return cand.to(torch.int8).argmax(1)  # first True


class MGDA(GramMethod):
    """MGDA-UB's min-norm point; like the paper (shared parameters as one block), one Gram for the whole
    model by default."""

    name = "mgda"
    default_granularity = "whole_model"

    @dataclass
    class Options:
        max_iter: int = 250
        """Frank-Wolfe iterations at most (Sener & Koltun use 250)."""
        tol: float = 1e-6
        """Stop when the duality gap is at most tol × ‖θ‖² (relative)."""
        variant: str = "pairwise"
        """pairwise (pairwise Frank-Wolfe, linear convergence) or fw (the paper's plain Frank-Wolfe)."""

        def __post_init__(self):
            check_number("mgda max_iter", self.max_iter, low=0, integer=True)
            check_number("mgda tol", self.tol, low=0.0)
            check_choice("mgda variant", self.variant, VARIANTS)

    def __init__(self, num_langs: int, **options):
        super().__init__(num_langs, **options)
        self.max_iter = self.options.max_iter
        self.tol = float(self.options.tol)
        self.variant = self.options.variant
        self.last_iters = 0  # iterations of the last call (slowest group)

    def _weights(self, gram, ctx):
        G, K, _ = gram.shape
        act = active_mask(gram, ctx.present)
        m = act.sum(1)
        gamma = act.to(gram.dtype) / m.clamp(min=1)[:, None]
        diag = torch.diagonal(gram, dim1=1, dim2=2)
        u = torch.bmm(gram, gamma[:, :, None]).squeeze(-1)  # Gγ
        v11 = (gamma * u).sum(1)  # ‖θ‖²
        done = m <= 1
        # |θ·g_k| ≤ max_k ‖g_k‖² = scale, since θ lies in the hull: rounding of u is ~1e-16·scale, so
        # values within TIE·scale tie; ±3·scale moves an entry out of any min/max over active entries.
        scale = (diag * act).amax(1, keepdim=True)
        tie = TIE * scale
        off_min = (~act).to(gram.dtype) * (3.0 * scale)
        rows = torch.arange(G, device=gram.device)
        zero, one = torch.zeros_like(v11), torch.ones_like(v11)
        it = 0
        while it < self.max_iter:
            t = _first(u + off_min, tie, lowest=True)  # Frank-Wolfe vertex
            ut = u[rows, t]
            gap = v11 - ut
            done = done | (gap <= self.tol * v11) | (v11 <= ZERO * scale[:, 0])
            if bool(done.all()):
                break
            g_t = gram[rows, t]  # row t = column t (symmetric), contiguous
            if self.variant == "fw":
                v22 = diag[rows, t]
                denom = v11 - 2.0 * ut + v22  # ‖θ − g_t‖² > 0 whenever gap > 0
                s = torch.where(done, zero, (gap / torch.where(done, one, denom)).clamp(0.0, 1.0))
                gamma = gamma * (1.0 - s)[:, None]
                gamma[rows, t] += s
                u = torch.addcmul(u * (1.0 - s)[:, None], s[:, None], g_t)
                v11 = (1.0 - s) ** 2 * v11 + 2.0 * s * (1.0 - s) * ut + s * s * v22
            else:
                off_max = (gamma <= 0).to(gram.dtype) * (3.0 * scale)
                a = _first(u - off_max, tie, lowest=False)  # away vertex: in the support
                ua = u[rows, a]
                dd = diag[rows, t] - 2.0 * g_t[rows, a] + diag[rows, a]  # ‖g_t − g_a‖²
                ok = ~done & (dd > 0)
                s = torch.minimum((ua - ut) / torch.where(ok, dd, one), gamma[rows, a]).clamp(min=0.0)
                s = torch.where(ok, s, zero)
                gamma[rows, t] += s
                gamma[rows, a] -= s
                u = torch.addcmul(u, s[:, None], g_t - gram[rows, a])
                v11 = v11 + 2.0 * s * (ut - ua) + s * s * dd
            it += 1
        self.last_iters = it
        w = gamma * m[:, None].to(gram.dtype)
        return torch.where((m == 0)[:, None], torch.ones_like(w), w)
