"""CATS — Curvature-Aware Task Scaling (Li & Gong 2021, Eq. 5–6, Algorithm 1, Appendix B).

Task weights α_n (one per language, N = all languages) scale the per-language losses; θ is trained with
Σ α_n g_n. Every M steps α and the Lagrange multipliers λ = (λ_c, λ_s, λ_n) take one step on the
Lagrangian of the curvature-regularised problem: gradient DESCENT on α (SGD, lr ``alpha_lr``, the
paper's {0.1, 1.0}), gradient ASCENT on λ (from 0, lr ``lambda_lr``, default = alpha_lr).

The reading implemented here (the paper is inconsistent in two places):

1. Eq. 6 as printed starts with the VECTOR Σ α_n ∇_θ L_n, which cannot be a term of a scalar Lagrangian.
   The text says α is estimated "with the objective of minimizing its tr(F) as a meta objective ... by
   solving the Lagrangian of Eq. (5)", and Algorithm 1 computes ∇_α L_meta "with ‖Σ α_n ∇_θ g̃_n‖²"
   only. So the first term is read as Eq. 5's objective, the empirical-Fisher trace
   c(α) = ‖Σ_n α_n g_n‖² = αᵀ G α (G = the Gram of the whole model = Σ over groups); it needs no loss
   values (``ctx.losses`` is not used). The Lagrangian is
       L(α, λ) = c(α) − λ_c (ε_c − c(α)) + λ_s (Σ_n α_n − N)² − Σ_n λ_n (α_n − ε)
   with gradients
       ∂L/∂α   = 2 (1 + λ_c) G α + 2 λ_s (Σα − N) 1 − λ_n
       ∂L/∂λ_c = c(α) − ε_c,   ∂L/∂λ_s = (Σα − N)²,   ∂L/∂λ_n = ε − α_n.
   All gradients are taken at the current (α, λ) and applied together; λ_c and λ_n are multipliers of
   inequality constraints (c ≤ ε_c, α_n ≥ ε) and are projected onto ≥ 0 after the ascent step (λ_s
   only grows). ε_c (``curvature_budget``) defaults to ε (``epsilon``): the paper writes both with one ε.
2. Appendix B initialises α_n = 1/N, but the constraint is Σ α_n = N and Algorithm 1 initialises
   α_n = 1. α_n = 1 is used: it satisfies the constraint and starts as plain (monolithic) training.
3. "Standard SGD" on α, taken as an IMPLICIT (proximal) step by default. ∂L/∂α = Hα − b is affine,
   H = 2(1+λ_c)G + 2λ_s 11ᵀ, b = 2λ_s N 1 + λ_n, and the explicit step α − lr(Hα − b) diverges as soon
   as lr·λ_max(H) > 2. Since gradient ascent makes λ_s grow forever (its gradient (Σα−N)² ≥ 0) and λ_c
   grow linearly whenever the budget ε_c is not reachable, that always happens eventually: with the
   paper's lr = 0.1 on synthetic Grams with ‖Σ_n g_n‖² = 0.5, after ~2500 meta steps at N = 8 and
   within 400 at N = 100 (λ_s > 1/(N·lr) alone suffices).
   The implicit step α' = α − lr(Hα' − b), i.e. (I + lr H) α' = α + lr b (an N×N solve), agrees with SGD
   to first order in lr, has the same fixed points, and is stable for every lr and multiplier.
   ``alpha_step="explicit"`` gives the literal SGD step.

Schedule (Algorithm 1: M steps of θ with a frozen clone of α, then one meta step with the gradients of
the last of them): the meta step happens at steps with (step + 1) % M == 0, M = ``warm_interval``
(10; the paper also uses 100) while step < ``warm_steps`` (8000; 16k in the paper for OPUS-100),
then M = ``interval`` (1000). Only those steps need the Gram (``needs_gram``); on all others the
trainer runs the monolithic path with ``loss_weights()`` = α. On a meta step the returned weights are
the α used BEFORE the meta update (the clone α̃ of Algorithm 1); the new α applies from the next step.
The per-batch language count K (4 for TED/WMT, 8 for OPUS-100: ``default_langs_per_batch``) is the
sampler's (``--langs-per-batch``). Absent languages have zero Gram rows, so only the Σα and α ≥ ε terms move them.
Scale: ∂c/∂α = 2Gα has the units of squared gradient norms, so ``alpha_lr`` interacts with the loss
scale (g_n are gradients of loss shares). With an unreachable curvature budget (the default ε_c = ε =
1e-3 usually is) λ_c grows by lr·(c − ε_c) per meta step, so the curvature term gains weight over
time and α drifts towards the minimum-curvature weights; the Σα = N and α ≥ ε terms are quadratic-
penalty / multiplier terms and hold only approximately. A reachable ``curvature_budget`` lets
λ_c settle.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megavac.methods.base import GramMethod, check_choice, check_number, check_state_tensor


class CATS(GramMethod):
    """CATS with the reading of the module docstring; defaults are the paper's OPUS-100 settings."""

    name = "cats"
    # The meta objective is the whole model's curvature ‖Σ α_n g_n‖²: finer groups would only be summed.
    default_granularity = "whole_model"
    # Appendix B: K = 8 languages per batch on OPUS-100 (4 on TED and WMT).
    default_langs_per_batch = 8

    @dataclass
    class Options:
        alpha_lr: float = 0.1
        """Learning rate of the task weights α (the paper uses 0.1 or 1.0)."""
        lambda_lr: float | None = None
        """Learning rate of the gradient ascent on the multipliers λ; None: alpha_lr."""
        epsilon: float = 1e-3
        """ε of the constraint α_n ≥ ε."""
        curvature_budget: float | None = None
        """Curvature budget ε_c of the constraint ‖Σ α_n g_n‖² ≤ ε_c; None: epsilon (the paper writes one ε)."""
        warm_steps: int = 8000
        """Steps during which α is updated every warm_interval steps (the paper: 16k on OPUS-100)."""
        warm_interval: int = 10
        """α-update interval M early in training (10 or 100 in the paper)."""
        interval: int = 1000
        """α-update interval M after warm_steps."""
        alpha_step: str = "implicit"
        """implicit: the proximal SGD step (I + lr H) α' = α + lr b, stable for any lr; explicit: the
        literal SGD step, which diverges once the multipliers grow (see the module docstring)."""

        def __post_init__(self):
            check_number("cats alpha_lr", self.alpha_lr, low=0.0, low_open=True)
            if self.lambda_lr is not None:
                check_number("cats lambda_lr", self.lambda_lr, low=0.0, low_open=True)
            check_number("cats epsilon", self.epsilon, low=0.0)
            if self.curvature_budget is not None:
                check_number("cats curvature_budget", self.curvature_budget, low=0.0)
            check_number("cats warm_steps", self.warm_steps, low=0, integer=True)
            check_number("cats warm_interval", self.warm_interval, low=1, integer=True)
            check_number("cats interval", self.interval, low=1, integer=True)
            check_choice("cats alpha_step", self.alpha_step, ("implicit", "explicit"))

    def __init__(self, num_langs: int, **options):
        super().__init__(num_langs, **options)
        o = self.options
        self.alpha_lr = float(o.alpha_lr)
        self.lambda_lr = self.alpha_lr if o.lambda_lr is None else float(o.lambda_lr)
        self.epsilon = float(o.epsilon)
        self.curvature_budget = self.epsilon if o.curvature_budget is None else float(o.curvature_budget)
        self.alpha_step = o.alpha_step
        self.warm_steps, self.warm_interval, self.interval = o.warm_steps, o.warm_interval, o.interval
        K = num_langs
        self.alpha = torch.ones(K, dtype=torch.float64)
        self.lambda_c = 0.0
        self.lambda_s = 0.0
        self.lambda_n = torch.zeros(K, dtype=torch.float64)
        self.updates = 0

    def needs_gram(self, step: int) -> bool:
        m = self.warm_interval if step < self.warm_steps else self.interval
        return (step + 1) % m == 0

    def loss_weights(self) -> torch.Tensor:
        return self.alpha.clone()

    def curvature(self, gram: torch.Tensor) -> float:
        """c(α) = ‖Σ α_n g_n‖² over the whole model, for monitoring."""
        g = gram.to(torch.float64).sum(0).cpu()
        return float(self.alpha @ g @ self.alpha)

    def _weights(self, gram, ctx):
        G, K, _ = gram.shape
        w = self.alpha.to(gram.device).expand(G, K).clone()
        if not self.needs_gram(ctx.step):
            return w
        p = ctx.present.cpu().to(torch.float64)
        g = gram.sum(0).cpu() * p[:, None] * p[None, :]  # whole-model Gram; absent rows are zero anyway
        a = self.alpha
        ga = g @ a
        curv = a @ ga
        excess = a.sum() - K
        if self.alpha_step == "explicit":
            grad_a = 2.0 * (1.0 + self.lambda_c) * ga + 2.0 * self.lambda_s * excess - self.lambda_n
            self.alpha = a - self.alpha_lr * grad_a
        else:
            # ∂L/∂α = Hα − b is affine in α; the implicit step α' = α − lr (Hα' − b) solves
            # (I + lr H) α' = α + lr b, with H PSD so the matrix is SPD and the step never overshoots.
            ones = torch.ones(K, dtype=torch.float64)
            hess = 2.0 * (1.0 + self.lambda_c) * g + 2.0 * self.lambda_s * torch.outer(ones, ones)
            b = 2.0 * self.lambda_s * K * ones + self.lambda_n
            lhs = torch.eye(K, dtype=torch.float64) + self.alpha_lr * hess
            self.alpha = torch.linalg.solve(lhs, a + self.alpha_lr * b)
        self.lambda_c = max(0.0, self.lambda_c + self.lambda_lr * float(curv - self.curvature_budget))
        self.lambda_s = self.lambda_s + self.lambda_lr * float(excess * excess)
        self.lambda_n = (self.lambda_n + self.lambda_lr * (self.epsilon - a)).clamp(min=0.0)
        self.updates += 1
        return w

    def state_dict(self) -> dict:
        d = super().state_dict()
        d.update(alpha=self.alpha.clone(), lambda_c=self.lambda_c, lambda_s=self.lambda_s,
                 lambda_n=self.lambda_n.clone(), updates=self.updates)
        return d

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        for key in ("alpha", "lambda_c", "lambda_s", "lambda_n", "updates"):
            if key not in d:
                raise ValueError(f"{self.name} state_dict lacks {key!r}: keys {sorted(d)}")
        K = self.num_langs
        self.alpha = check_state_tensor(self.name, d["alpha"], (K,), "alpha")
        self.lambda_n = check_state_tensor(self.name, d["lambda_n"], (K,), "lambda_n")
        self.lambda_c = float(d["lambda_c"])
        self.lambda_s = float(d["lambda_s"])
        self.updates = int(d["updates"])
