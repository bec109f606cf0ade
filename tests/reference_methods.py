"""Literal reference implementations on EXPLICIT gradient vectors, for the exactness tests.

Written straight from the papers' pseudo-code with Python loops over groups, languages and pairs; they
share no code with megavac.methods (which works on Gram matrices). Each group's gradients are a tensor
[K, D_g] (row k = language k's gradient in that group); each function returns the update vector of every
group, i.e. what the optimizer would receive. The guards (which pairs are skipped, clamps) are part of
the specification in megavac/methods docstrings and are restated here with their own constants.
"""
from __future__ import annotations

import math

import torch

VANISHED = 1e-10  # ‖g'_i‖² ≤ VANISHED·‖g_i‖²: g'_i counts as zero (GradVac stops comparing it)
TARGET_EPS = 1e-6  # GradVac targets are used clamped to |φ̂| ≤ 1 − TARGET_EPS
WEIGHT_FLOOR = 1e-4  # GradNorm weights are floored here before renormalisation
MGDA_TIE = 1e-12  # MGDA vertex choice: values within MGDA_TIE·max‖g_k‖² tie, lowest index wins


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b))


def usable(vec: torch.Tensor, present: bool) -> bool:
    """A language takes part in a group if present and its gradient there is non-zero."""
    return bool(present) and dot(vec, vec) > 0


def pcgrad(groups, present, order):
    """Yu et al. 2020: for each i, for each other j in (replayed) random order, project on conflict."""
    out = []
    for grads in groups:
        K = grads.shape[0]
        new = []
        for i in range(K):
            gi = grads[i].clone()
            if usable(grads[i], present[i]):
                for j in order[i]:
                    j = int(j)
                    gj = grads[j]
                    if not usable(gj, present[j]):
                        continue
                    d = dot(gi, gj)
                    if d < 0:
                        gi = gi - d / dot(gj, gj) * gj
            new.append(gi)
        out.append(sum(new))
    return out


def gradvac(groups, present, order, ema, beta, subset, fixed_target=None):
    """Wang et al. 2021, Algorithm 1, one step. ema: [G][K][K] nested lists, updated in place."""
    out = []
    for k, grads in enumerate(groups):
        K = grads.shape[0]
        new = [grads[i].clone() for i in range(K)]
        for i in range(K):  # line 10: T_i in 𝒢 ∩ B
            if not (subset[i] and usable(grads[i], present[i])):
                continue
            for j in order[i]:  # line 11: T_j in B \ T_i, random order
                j = int(j)
                gj = grads[j]
                if not usable(gj, present[j]):
                    continue
                if dot(new[i], new[i]) <= VANISHED * dot(grads[i], grads[i]):
                    continue
                norm_i = math.sqrt(dot(new[i], new[i]))
                norm_j = math.sqrt(dot(gj, gj))
                phi = dot(new[i], gj) / (norm_i * norm_j)  # line 12
                phi = min(1.0, max(-1.0, phi))
                target = fixed_target if fixed_target is not None else ema[k][i][j]
                target = min(1.0 - TARGET_EPS, max(-1.0 + TARGET_EPS, target))
                if phi < target:  # lines 13-14, Eq. 2
                    coef = norm_i * (target * math.sqrt(max(0.0, 1 - phi * phi))
                                     - phi * math.sqrt(1 - target * target))
                    coef /= norm_j * math.sqrt(1 - target * target)
                    new[i] = new[i] + coef * gj
                if fixed_target is None:  # line 16, Eq. 3: always, with the line-12 φ
                    ema[k][i][j] = (1 - beta) * ema[k][i][j] + beta * phi
        out.append(sum(new))
    return out


def mgda(groups, present, max_iter=250, tol=1e-6, variant="pairwise"):
    """Sener & Koltun 2018: min-norm point of the hull by Frank-Wolfe (plain, or pairwise), exact line
    search, from the uniform point, per group; the update is scaled × (number of active languages)."""
    out = []
    for grads in groups:
        K = grads.shape[0]
        act = [k for k in range(K) if usable(grads[k], present[k])]
        if not act:
            out.append(grads.sum(0))
            continue
        gamma = {k: 1.0 / len(act) for k in act}
        for _ in range(max_iter if len(act) > 1 else 0):
            theta = sum(gamma[k] * grads[k] for k in act)
            u = {k: dot(theta, grads[k]) for k in act}
            tie = MGDA_TIE * max(dot(grads[k], grads[k]) for k in act)
            lo = min(u.values())
            t = next(k for k in act if u[k] <= lo + tie)  # Frank-Wolfe vertex: argmin_k θ·g_k
            v11, v1t = dot(theta, theta), u[t]
            if v11 - v1t <= tol * v11 or v11 <= 1e-20 * max(dot(grads[k], grads[k]) for k in act):
                break
            if variant == "fw":  # min_s ‖(1−s)θ + s g_t‖²
                s = (v11 - v1t) / dot(theta - grads[t], theta - grads[t])
                s = min(1.0, max(0.0, s))
                for k in act:
                    gamma[k] *= 1 - s
                gamma[t] += s
            else:  # away vertex a: argmax θ·g_k over the support; min_s ‖θ + s(g_t − g_a)‖², s ≤ γ_a
                hi = max(u[k] for k in act if gamma[k] > 0)
                a = next(k for k in act if gamma[k] > 0 and u[k] >= hi - tie)
                d = grads[t] - grads[a]
                if dot(d, d) > 0:
                    s = min(gamma[a], max(0.0, -dot(theta, d) / dot(d, d)))
                    gamma[t] += s
                    gamma[a] -= s
        out.append(len(act) * sum(gamma[k] * grads[k] for k in act))
    return out


class CATSRef:
    """Li & Gong 2021 under the reading of megavac/methods/cats.py, with explicit vectors."""

    def __init__(self, N, alpha_lr=0.1, lambda_lr=None, epsilon=1e-3, curvature_budget=None,
                 warm_steps=8000, warm_interval=10, interval=1000, alpha_step="implicit"):
        self.alpha_step = alpha_step
        self.N = N
        self.alpha = [1.0] * N  # Algorithm 1: α_n = 1 (Σα = N)
        self.lc, self.ls, self.ln = 0.0, 0.0, [0.0] * N
        self.lr_a = alpha_lr
        self.lr_l = alpha_lr if lambda_lr is None else lambda_lr
        self.eps = epsilon
        self.eps_c = epsilon if curvature_budget is None else curvature_budget
        self.warm_steps, self.warm_interval, self.interval = warm_steps, warm_interval, interval

    def step(self, groups, present, step):
        used = list(self.alpha)  # α̃ = clone(α): θ is updated with the pre-meta-step weights
        out = [sum(used[n] * grads[n] for n in range(self.N)) for grads in groups]
        m = self.warm_interval if step < self.warm_steps else self.interval
        if (step + 1) % m == 0:
            full = [torch.cat([grads[n] if present[n] else torch.zeros_like(grads[n]) for grads in groups])
                    for n in range(self.N)]
            v = sum(self.alpha[n] * full[n] for n in range(self.N))  # Σ α_n g_n, whole model
            curv = dot(v, v)  # ‖Σ α_n g_n‖², Fisher-trace estimate
            excess = sum(self.alpha) - self.N
            old = list(self.alpha)
            if self.alpha_step == "explicit":  # α ← α − lr ∂L/∂α
                grad_a = [2 * (1 + self.lc) * dot(full[n], v) + 2 * self.ls * excess - self.ln[n]
                          for n in range(self.N)]
                self.alpha = [old[n] - self.lr_a * grad_a[n] for n in range(self.N)]
            else:  # α' = α − lr ∂L/∂α(α'): (I + lr H) α' = α + lr b, ∂L/∂α = Hα − b
                lhs = torch.zeros(self.N, self.N, dtype=torch.float64)
                rhs = torch.zeros(self.N, dtype=torch.float64)
                for n in range(self.N):
                    for m in range(self.N):
                        h = 2 * (1 + self.lc) * dot(full[n], full[m]) + 2 * self.ls
                        lhs[n, m] = (n == m) + self.lr_a * h
                    rhs[n] = old[n] + self.lr_a * (2 * self.ls * self.N + self.ln[n])
                self.alpha = torch.linalg.solve(lhs, rhs).tolist()
            self.lc = max(0.0, self.lc + self.lr_l * (curv - self.eps_c))
            self.ls = self.ls + self.lr_l * excess ** 2
            self.ln = [max(0.0, self.ln[n] + self.lr_l * (self.eps - old[n])) for n in range(self.N)]
        return out


class GradNormRef:
    """Chen et al. 2018, Algorithm 1, with explicit vectors of the chosen group."""

    def __init__(self, N, alpha=1.5, lr=0.025, group=-1):
        self.N, self.alpha, self.lr, self.group = N, alpha, lr, group
        self.w = [1.0] * N
        self.L0 = [None] * N

    def step(self, groups, present, losses):
        used = list(self.w)
        out = [sum(used[n] * grads[n] for n in range(self.N)) for grads in groups]
        for n in range(self.N):
            if present[n] and self.L0[n] is None and losses[n] > 0:
                self.L0[n] = float(losses[n])
        W = groups[self.group]
        norm = [math.sqrt(dot(W[n], W[n])) for n in range(self.N)]  # ‖∇_W L_n‖
        tasks = [n for n in range(self.N)
                 if present[n] and norm[n] > 0 and self.L0[n] is not None and losses[n] > 0]
        if len(tasks) < 2:
            return out
        gw = {n: self.w[n] * norm[n] for n in tasks}  # G_W^(n) = ‖∇_W w_n L_n‖
        gbar = sum(gw.values()) / len(tasks)
        lt = {n: float(losses[n]) / self.L0[n] for n in tasks}  # L̃_n
        lbar = sum(lt.values()) / len(tasks)
        new = {}
        for n in tasks:
            target = gbar * (lt[n] / lbar) ** self.alpha  # constant in L_grad
            diff = gw[n] - target
            sign = (diff > 0) - (diff < 0)
            new[n] = max(WEIGHT_FLOOR, self.w[n] - self.lr * sign * norm[n])
        scale = sum(self.w[n] for n in tasks) / sum(new.values())
        for n in tasks:
            self.w[n] = new[n] * scale
        return out
