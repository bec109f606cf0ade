"""GradNorm (Chen, Badrinarayanan, Lee, Rabinovich 2018), on the diagonal of one group's Gram.

Task weights w_i (initially 1) are learned so that the weighted gradient norms on the last shared layer
W, G_i = ‖∇_W w_i L_i‖ = w_i √Gram_ii, approach the common target Ḡ · r_i^α, where Ḡ = mean_i G_i,
L̃_i = L_i(t)/L_i(0) and r_i = L̃_i / mean_j L̃_j (relative inverse training rate; α = asymmetry).
L_grad = Σ_i |G_i − Ḡ r_i^α| with the target held constant (as in the paper), so
∂L_grad/∂w_i = sign(G_i − Ḡ r_i^α) · √Gram_ii; one plain gradient step of size ``lr``,
then renormalisation. As in the paper's Algorithm 1 the step's update uses the weights BEFORE this
step's GradNorm update (returned for every group); the new weights apply from the next step.

Multilingual specifics (documented choices):
* Only languages present in the batch, with a non-zero gradient on W and a recorded initial loss take
  part (means over them); the others' weights are untouched.
* L_i(0) is the language's loss the first time it is seen present with a positive loss.
* L_i(t) is language i's MEAN token loss over the step's global batch (``ctx.losses``), not its loss
  share (summed token loss ÷ the batch's tokens): batches are length-packed, so the fraction of a
  batch's tokens a language holds varies from batch to batch, and the first batch's share would bias
  r_i for the whole run. The gradients g_i stay those of the shares (their sum is the plain gradient).
* Renormalisation keeps the participants' sum equal to what it was before the step, so Σ_k w_k stays
  equal to the number of languages K while absent languages keep their weights.
* A weight is floored at ``WEIGHT_FLOOR`` before renormalisation: a negative weight would ascend that
  language's loss (not in the paper; only reachable with a too large ``lr``).
* W is the Gram's group ``group`` (default −1): the trainer passes the last shared layer (the last
  decoder layer, ``megavac.model.groups.last_shared_layer``), so the Grams are per layer (all_layer) by
  default. The weights themselves are one per language for the whole model, as in the paper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megavac.methods.base import GramMethod, check_number, check_state_tensor

WEIGHT_FLOOR = 1e-4


class GradNorm(GramMethod):
    name = "gradnorm"
    _uses_losses = True
    # W, the last shared layer, is one layer's group: the Grams are per layer (the weights are not).
    default_granularity = "all_layer"

    @dataclass
    class Options:
        alpha: float = 1.5
        """Asymmetry α of the target Ḡ·r_i^α (the paper: 0.12 to 3.0; 1.5 on its NYUv2 experiments)."""
        lr: float = 0.025
        """Learning rate of the weights w_i (the paper trains them with the network's optimizer; one plain
        gradient step per Gram step here)."""

        def __post_init__(self):
            check_number("gradnorm alpha", self.alpha)
            check_number("gradnorm lr", self.lr, low=0.0, low_open=True)

    def __init__(self, num_langs: int, group: int = -1, **options):
        super().__init__(num_langs, **options)
        if not isinstance(group, int) or isinstance(group, bool):
            raise ValueError(f"gradnorm group must be an int group index, got {group!r}")
        self.alpha = float(self.options.alpha)
        self.lr = float(self.options.lr)
        self.group = group
        self.w = torch.ones(num_langs, dtype=torch.float64)
        self.initial_losses = torch.full((num_langs,), math.nan, dtype=torch.float64)

    @classmethod
    def for_run(cls, num_langs, options, run):
        from megavac.model.groups import last_shared_layer

        return cls(num_langs, group=last_shared_layer(run.param_names, run.granularity), **options)

    def loss_weights(self) -> torch.Tensor:
        return self.w.clone()

    def _weights(self, gram, ctx):
        G, K, _ = gram.shape
        if ctx.losses is None:
            raise ValueError("GradNorm needs ctx.losses (per-language losses), got None")
        if not -G <= self.group < G:
            raise ValueError(f"gradnorm group={self.group} is out of range for {G} groups")
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
