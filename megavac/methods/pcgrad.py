"""PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning") on Gram matrices, and the pairwise
surgery kernel it shares with GradVac.

Literal algorithm, per parameter group: for each language i, g'_i ← g_i; for every other j in random
order, if g'_i · g_j < 0 then g'_i ← g'_i − (g'_i · g_j / ‖g_j‖²) g_j; the update is Σ_i g'_i.

On Grams (docs/design.md §2): g'_i is always Σ_j C_ij g_j with C = I + (increments), every alteration adds a
multiple of an ORIGINAL g_j, so g'_i · g_j = (C_i G)_j and ‖g'_i‖² = C_i G C_iᵀ, and the update is
Σ_j w_j g_j with w = 1ᵀC. Rows never read each other, so all rows (and all groups) advance together.

Random order. Two modes, both drawn from ``ctx.generator`` and both identical for every group:

* ``order="shared"`` (default): ONE permutation σ of the K languages per step; language i visits the
  other languages in the order of σ with i left out. For every i this is a uniformly random order of
  the others, as the papers ask; only the orders of different rows are correlated. It is the fast mode:
  with a common order the K−1 sequential steps become a blocked triangular recurrence whose bulk is
  batched matrix products, and absent languages and rows outside GradVac's subset cost nothing.
* ``order="independent"``: one permutation per language i (as in Yu et al.'s released code, which
  shuffles before every row). Each step gathers one Gram row per (group, language): O(G·K³) memory
  traffic, about an order of magnitude slower at K = 100.

``last_order`` (LongTensor [K, K−1]) holds, after every ``weights`` call, the j-indices in the order
language i visited them; ``last_perm`` holds σ in the shared mode. Every call draws exactly one
permutation (shared) or K permutations (independent), skipped calls included, so the random stream
does not depend on the gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megavac.methods.base import GramMethod, StepContext, active_mask, check_choice

ORDERS = ("shared", "independent")

# A row whose altered gradient has lost all but 1e-5 of its norm (squared-norm ratio 1e-10) counts as
# vanished: its cosine with anything is then dominated by rounding (the squared norm is tracked by an
# update with cancellation), so GradVac stops comparing it, as it would a zero gradient.
VANISHED = 1e-10
# GradVac targets are clamped to |φ̂| ≤ 1 − TARGET_EPS before use: at φ̂ = ±1 the coefficient of Eq. 2
# divides by √(1−φ̂²) = 0 (reaching cosine 1 with a₁ = 1 needs an infinite multiple of g_j).
TARGET_EPS = 1e-6
# Steps handled between two batched matrix products in the shared-order kernel.
BLOCK = 8


def draw_order(num_langs: int, generator: torch.Generator, mode: str):
    """Random visiting orders: (order [K, K−1] long, σ [K] long or None)."""
    K = num_langs
    if mode == "shared":
        sigma = torch.randperm(K, generator=generator)
        order = sigma.expand(K, K)[sigma.expand(K, K) != torch.arange(K)[:, None]].view(K, K - 1)
        return order, sigma
    others = torch.arange(K).expand(K, K)[~torch.eye(K, dtype=torch.bool)].view(K, K - 1)
    order = torch.stack([others[i][torch.randperm(K - 1, generator=generator)] for i in range(K)])
    return order, None


def _coefficient(x, n, gjj, valid, target, want_phi=True):
    """Coefficient a of g_j added to each g'_i, and the cosine φ (GradVac); 0 where nothing changes.

    x = g'_i·g_j, n = ‖g'_i‖², gjj = ‖g_j‖² (> 0 where valid), valid = float 0/1 mask of compared pairs.
    Masks are applied by multiplication (every operand is finite), ~10× faster than where() on CPU.

    PCGrad (target None): a = −x/‖g_j‖² where x < 0, i.e. −min(x, 0)/‖g_j‖².
    GradVac, Eq. 2 with a₁ = 1 and t = φ̂ clamped to |t| ≤ 1 − TARGET_EPS:
        a = ‖g'_i‖ (t√(1−φ²) − φ√(1−t²)) / (‖g_j‖ √(1−t²)) = (κ √(n·gjj − x²) − x) / gjj,  κ = t/√(1−t²),
    using ‖g'_i‖‖g_j‖ φ = x and ‖g'_i‖‖g_j‖ √(1−φ²) = √(n·gjj − x²) (clamped at 0 = |φ| ≤ 1). The
    bracket is sin(arccos φ − arccos t), positive exactly when φ < t: line 13's condition is a > 0.
    """
    if target is None:
        return x.clamp(max=0.0) / gjj * -valid, None
    ng = n * gjj
    t = target.clamp(-1.0 + TARGET_EPS, 1.0 - TARGET_EPS)
    kappa = t * (1.0 - t * t).rsqrt_()
    sin_part = torch.addcmul(ng, x, x, value=-1.0).clamp_(min=0.0).sqrt_()  # ‖g'_i‖‖g_j‖ √(1−φ²)
    a = torch.addcmul(-x, kappa, sin_part).div_(gjj).clamp_(min=0.0).mul_(valid)
    if not want_phi:
        return a, None
    # (1 − valid) keeps the denominator of skipped pairs non-zero (their φ is never used); n ≥ 0 always
    # (see _altered_norm), so ng + (1 − valid) > 0 for every pair.
    phi = (x * (1.0 - valid).add_(ng).rsqrt_()).clamp_(-1.0, 1.0)
    return a, phi


def _altered_norm(n, x, a, gjj):
    """‖g'_i + a g_j‖², written as a sum of two squares so that it can never round below zero.

    Split g'_i into its part along g_j, of squared norm x²/‖g_j‖², and the rest, of squared norm
    (n‖g_j‖² − x²)/‖g_j‖² (≥ 0, clamped: rounding can make it slightly negative). Adding a g_j changes
    only the first: ‖g'_i + a g_j‖² = [max(n‖g_j‖² − x², 0) + (x + a‖g_j‖²)²] / ‖g_j‖². The expanded form
    n + 2ax + a²‖g_j‖² cancels catastrophically when g'_i vanishes (an exactly anti-parallel pair with
    ‖g‖ ~ 1e4 gives −1e-9 instead of 0), and a negative n made φ's rsqrt NaN, which the EMA kept forever.
    """
    along = torch.addcmul(x, a, gjj)
    return torch.addcmul(n * gjj, x, x, value=-1.0).clamp_(min=0.0).addcmul_(along, along).div_(gjj)


def _take(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """t.index_select(dim, index); on CPU through numpy.take, 3× faster for inner dimensions."""
    if t.device.type != "cpu":
        return t.index_select(dim, index)
    return torch.from_numpy(np.take(t.numpy(), index.numpy(), axis=dim))


def pairwise_surgery(gram, active, alter_rows, order, sigma, targets_t=None, beta=None):
    """Run PCGrad (targets_t None) or GradVac on all groups at once; returns weights [G, K] = 1ᵀC.

    gram [G, K, K] float64 (finite); active [G, K] bool (present, non-zero); alter_rows [K] bool (rows
    that are altered, e.g. low-resource languages only); order/sigma from ``draw_order``.
    targets_t [G, K, K]: GradVac targets TRANSPOSED, targets_t[g, j, i] = φ̂_ij, so that the targets of
    every row against one j are a contiguous row. With ``beta`` the EMA of every compared pair is
    updated in place, φ̂_ij ← (1−β) φ̂_ij + β φ, φ = cos(g'_i, g_j) measured before j's alteration.
    """
    alter_rows = alter_rows.to(gram.device)
    if sigma is not None:
        return _surgery_shared(gram, active, alter_rows, sigma.to(gram.device), targets_t, beta)
    rows_ok = (active & alter_rows[None, :]).to(gram.dtype)
    return _surgery_independent(gram, active.to(gram.dtype), rows_ok, order.to(gram.device), targets_t, beta)


def _surgery_shared(gram, active, alter_rows, sigma, targets_t, beta):
    # Only languages present in some group take part: rows R = those also in the altered subset, steps
    # S = σ restricted to them (order kept). Rows outside R keep C_i = e_i; languages outside S are
    # never a direction. At[g, t, r] = coefficient of g_{S_t} added to g'_{R_r} (C = I + A), so
    #   x_{r,t} = g'_r·g_{S_t} = G[S_t, R_r] + Σ_{s<t} At[s, r] G[S_s, S_t]
    # is a triangular recurrence. Blocks of BLOCK steps get the part Σ_{s<t0} from one batched matmul;
    # only the in-block part is sequential. Every per-step read and write is a contiguous [G, |R|] row.
    G, K, _ = gram.shape
    dt = gram.dtype
    weights = torch.ones(G, K, dtype=dt, device=gram.device)
    used = active.any(0)
    steps = sigma[used[sigma]]
    rows = torch.nonzero(used & alter_rows).squeeze(1)
    if len(rows) == 0 or len(steps) < 2:
        return weights
    # Compacting rows costs a gather per step for the EMA: only worth it when it removes at least half
    # of the rows; otherwise the extra rows are masked out.
    all_rows = 2 * len(rows) > K
    if all_rows:
        rows = torch.arange(K, device=gram.device)
    S = len(steps)
    g_s = _take(gram, steps, 1)  # [G, S, K]: g_s[g, t, k] = G[S_t, k]
    q = _take(g_s, steps, 2)  # [G, S, S]: q[g, t, s] = G[S_t, S_s]
    x0 = g_s if all_rows else _take(g_s, rows, 2)  # [G, S, R]: x0[g, t, r] = G[S_t, R_r]
    diag = torch.diagonal(gram, dim1=1, dim2=2)
    n = diag if all_rows else diag.index_select(1, rows)
    floor = VANISHED * n
    ok = active & alter_rows[None, :]
    rows_ok = ok.to(dt) if all_rows else ok.index_select(1, rows).to(dt)
    act = active.to(dt)
    gjj_all = torch.where(diag > 0, diag, torch.ones_like(diag))  # inactive j: masked out, any value
    row_of = {int(r): k for k, r in enumerate(rows.tolist())}
    gradvac = targets_t is not None
    At = gram.new_empty(G, S, len(rows))  # every row is written before it is read
    step_list = steps.tolist()
    for t0 in range(0, S, BLOCK):
        t1 = min(S, t0 + BLOCK)
        # Xt[g, b, r] = x_{r, t0+b} with the contributions of all steps before t0, then of the steps of
        # the block as they are taken (one rank-1 update of the block's remaining rows per step).
        Xt = x0[:, t0:t1].clone() if t0 == 0 else torch.baddbmm(x0[:, t0:t1], q[:, t0:t1, :t0], At[:, :t0])
        for b in range(t1 - t0):
            t, j = t0 + b, step_list[t0 + b]
            x = Xt[:, b, :]
            valid = rows_ok * act[:, j : j + 1]
            if j in row_of:
                valid[:, row_of[j]] = 0.0  # i ≠ j
            gjj = gjj_all[:, j : j + 1]
            if gradvac:
                valid = valid * (n > floor)
                tgt = targets_t[:, j, :] if all_rows else _take(targets_t[:, j, :], rows, 1)
                a, phi = _coefficient(x, n, gjj, valid, tgt, want_phi=beta is not None)
                if beta is not None:  # φ̂ += β (φ − φ̂) on compared pairs = (1−β) φ̂ + β φ
                    if all_rows:
                        tgt.addcmul_(valid, phi - tgt, value=beta)  # tgt is a view of targets_t
                    else:
                        new = torch.addcmul(tgt, valid, phi - tgt, value=beta)
                        targets_t[:, j, :].index_copy_(1, rows, new)
                n = _altered_norm(n, x, a, gjj)
            else:
                a, _ = _coefficient(x, None, gjj, valid, None)
            At[:, t, :] = a
            if t + 1 < t1:
                Xt[:, b + 1 :].addcmul_(q[:, t + 1 : t1, t : t + 1], a[:, None, :])
    return weights.index_add_(1, steps, At.sum(2))


def _surgery_independent(gram, act, rows_ok, order, targets_t, beta):
    # P[g, i] = C_i G (row i of C times the Gram), updated by one gathered Gram row per (group,
    # language) and step: O(G·K³) memory traffic.
    G, K, _ = gram.shape
    P = gram.clone()
    diag = torch.diagonal(gram, dim1=1, dim2=2)
    gjj_all = torch.where(diag > 0, diag, torch.ones_like(diag))
    weights = torch.ones(G, K, dtype=gram.dtype, device=gram.device)
    idx = torch.arange(K, device=gram.device)
    gradvac = targets_t is not None
    if gradvac:
        n = diag.clone()
        floor = VANISHED * diag
    for t in range(K - 1):
        j = order[:, t]  # j-index of every row i at this step
        x = P[:, idx, j]
        gjj = gjj_all[:, j]
        valid = rows_ok * act[:, j]
        if gradvac:
            valid = valid * (n > floor)
            tgt = targets_t[:, j, idx]
            a, phi = _coefficient(x, n, gjj, valid, tgt)
            if beta is not None:
                targets_t[:, j, idx] = tgt + (beta * valid) * (phi - tgt)
            n = _altered_norm(n, x, a, gjj)
        else:
            a, _ = _coefficient(x, None, gjj, valid, None)
        P.add_(a[:, :, None] * gram[:, j, :])
        weights.index_add_(1, j, a)
    return weights


class PCGrad(GramMethod):
    """Projecting conflicting gradients (Yu et al. 2020), every language against every other.

    The paper projects whole-model gradients (``default_granularity``); per-layer projection is the
    GradVac paper's "PCGrad w. all_layer" variant (``--granularity all_layer``).
    """

    name = "pcgrad"
    default_granularity = "whole_model"

    @dataclass
    class Options:
        order: str = "shared"
        """Random order in which each language visits the others: shared (one permutation per step, each
        row skipping itself; fast) or independent (one permutation per language, as the paper's code)."""

        def __post_init__(self):
            check_choice("pcgrad order", self.order, ORDERS)

    def __init__(self, num_langs: int, **options):
        super().__init__(num_langs, **options)
        self.order = self.options.order
        self.last_order: torch.Tensor | None = None
        self.last_perm: torch.Tensor | None = None

    def _before(self, gram, ctx: StepContext):
        self.last_order, self.last_perm = draw_order(self.num_langs, ctx.generator, self.order)

    def _weights(self, gram, ctx):
        active = active_mask(gram, ctx.present)
        rows = torch.ones(self.num_langs, dtype=torch.bool)
        return pairwise_surgery(gram, active, rows, self.last_order, self.last_perm)
