"""GradNorm (Chen, Badrinarayanan, Lee, Rabinovich 2018), on the diagonal of one group's Gram.

Task weights w_i (initially 1) are learned so that the weighted gradient norms on the last shared layer
W, G_i = ‖∇_W w_i L_i‖ = w_i √Gram_ii, approach the common target Ḡ · r_i^α, where Ḡ = mean_i G_i,
L̃_i = L_i(t)/L_i(0) and r_i = L̃_i / mean_j L̃_j (relative inverse training rate; α = asymmetry).
L_grad = Σ_i |G_i − Ḡ r_i^α| with the target held constant (as in the paper), so
∂L_grad/∂w_i = sign(G_i − Ḡ r_i^α) · √Gram_ii; one plain gradient step of size ``gradnorm_lr``,
then renormalisation. As in the paper's Algorithm 1 the step's update uses the weights BEFORE this
step's GradNorm update (returned for every group); the new weights apply from the next step.

Multilingual specifics (documented choices):
* Only languages present in the batch, with a non-zero gradient on W and a recorded initial loss take
  part (means over them); the others' weights are untouched.
* L_i(0) is the language's loss the first time it is seen present with a positive loss.
* ``ctx.losses`` are the per-language loss SHARES the trainer passes; r_i depends on them only through
  L_i(t)/L_i(0), so a constant per-language factor (a stable share of the batch) cancels.
* Renormalisation keeps the participants' sum equal to what it was before the step, so Σ_k w_k stays
  equal to the number of languages K while absent languages keep their weights.
* A weight is floored at ``WEIGHT_FLOOR`` before renormalisation: a negative weight would ascend that
  language's loss (not in the paper; only reachable with a too large ``gradnorm_lr``).
* W is the group ``gradnorm_group`` of the Gram (default −1, the trainer's last shared layer).
"""
from __future__ import annotations

import math

import torch

from megavac.methods.base import GramMethod, check_state_tensor

WEIGHT_FLOOR = 1e-4


class GradNorm(GramMethod):
    name = "gradnorm"
    _uses_losses = True

    def __init__(self, num_langs: int, gradnorm_alpha: float = 1.5, gradnorm_lr: float = 0.025,
                 gradnorm_group: int = -1):
        super().__init__(num_langs)
        if not (isinstance(gradnorm_alpha, (int, float)) and math.isfinite(gradnorm_alpha)):
            raise ValueError(f"gradnorm_alpha must be a finite number, got {gradnorm_alpha!r}")
        if not (isinstance(gradnorm_lr, (int, float)) and gradnorm_lr > 0):
            raise ValueError(f"gradnorm_lr must be > 0, got {gradnorm_lr!r}")
        if not isinstance(gradnorm_group, int):
            raise ValueError(f"gradnorm_group must be an int group index, got {gradnorm_group!r}")
        self.alpha = float(gradnorm_alpha)
        self.lr = float(gradnorm_lr)
        self.group = gradnorm_group
        self.w = torch.ones(num_langs, dtype=torch.float64)
        self.initial_losses = torch.full((num_langs,), math.nan, dtype=torch.float64)

    def loss_weights(self) -> torch.Tensor:
        return self.w.clone()

    def _weights(self, gram, ctx):
        G, K, _ = gram.shape
        if ctx.losses is None:
            raise ValueError("GradNorm needs ctx.losses (per-language losses), got None")
        if not -G <= self.group < G:
            raise ValueError(f"gradnorm_group={self.group} is out of range for {G} groups")
        w_step = self.w.to(gram.device).expand(G, K).clone()
        losses = ctx.losses.detach().to(torch.float64).cpu()
        present = ctx.present.cpu()
        first = present & torch.isnan(self.initial_losses) & (losses > 0)
        self.initial_losses = torch.where(first, losses, self.initial_losses)
        norms = torch.diagonal(gram[self.group]).cpu().clamp(min=0).sqrt()
        part = present & (norms > 0) & (self.initial_losses > 0) & (losses > 0)
        if int(part.sum()) < 2:
            return w_step  # one language is its own average: nothing to balance
        w, n = self.w[part], norms[part]
        g_w = w * n
        ratio = losses[part] / self.initial_losses[part]
        target = g_w.mean() * (ratio / ratio.mean()) ** self.alpha
        new = (w - self.lr * torch.sign(g_w - target) * n).clamp(min=WEIGHT_FLOOR)
        new = new * (w.sum() / new.sum())
        self.w = self.w.clone()
        self.w[part] = new
        return w_step

    def state_dict(self) -> dict:
        d = super().state_dict()
        d.update(w=self.w.clone(), initial_losses=self.initial_losses.clone())
        return d

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        K = self.num_langs
        for key in ("w", "initial_losses"):
            if key not in d:
                raise ValueError(f"{self.name} state_dict lacks {key!r}: keys {sorted(d)}")
        self.w = check_state_tensor(self.name, d["w"], (K,), "w")
        self.initial_losses = check_state_tensor(self.name, d["initial_losses"], (K,), "initial_losses")
