"""Label-smoothed cross entropy with per-language shares of the batch loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_losses(logits: torch.Tensor, target: torch.Tensor, pad_id: int, smoothing: float = 0.1):
    """Per-token label-smoothed NLL [B, T] (zero on padding), in fp32.

    Smoothing mass is spread over the V-1 wrong classes (Szegedy et al. 2016, as in fairseq):
    loss = (1 - eps - eps/(V-1)) * nll + eps/(V-1) * sum_v(-log p_v).
    """
    lprobs = F.log_softmax(logits.float(), dim=-1)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -lprobs.sum(-1)
    eps_i = smoothing / (lprobs.shape[-1] - 1)
    loss = (1.0 - smoothing - eps_i) * nll + eps_i * smooth
    return loss.masked_fill(target == pad_id, 0.0), nll.masked_fill(target == pad_id, 0.0)


def per_language_losses(
    logits: torch.Tensor,
    target: torch.Tensor,
    lang: torch.Tensor,
    num_langs: int,
    pad_id: int,
    smoothing: float = 0.1,
    total: torch.Tensor | float | None = None,
):
    """Split the token-mean batch loss into per-language shares.

    Returns ``(loss_k [K], nll_sum_k [K], ntok_k [K])``: ``loss_k`` is language k's summed token loss
    divided by the batch's TOTAL token count, so ``loss_k.sum()`` is exactly the batch loss and the
    gradients of the shares sum to the monolithic gradient. ``nll_sum_k`` and ``ntok_k`` (detached)
    serve logging of per-language perplexity. ``total`` overrides the normaliser: a pipeline runs each
    language's rows of a batch as its own micro-batch and still divides by the whole batch's tokens.
    """
    loss, nll = token_losses(logits, target, pad_id, smoothing)
    ntok_row = (target != pad_id).sum(1)
    total = ntok_row.sum().clamp(min=1) if total is None else total
    loss_k = torch.zeros(num_langs, dtype=loss.dtype, device=loss.device).index_add(0, lang, loss.sum(1))
    with torch.no_grad():
        nll_k = torch.zeros(num_langs, dtype=nll.dtype, device=nll.device).index_add(0, lang, nll.sum(1))
        ntok_k = torch.zeros(num_langs, dtype=torch.long, device=lang.device).index_add(0, lang, ntok_row)
    return loss_k / total, nll_k, ntok_k


def forward_losses(engine, batch, num_langs: int, pad_id: int, smoothing: float):
    """One forward of ``batch``: (loss shares [K] with graph, nll sums [K], tokens [K]). Each row's language
    index goes along (``batch.lang``): family experts route by it (DeepSpeed's engine passes it on)."""
    logits = engine(batch.src, batch.tgt_in, batch.lang)
    return per_language_losses(logits, batch.tgt_out, batch.lang, num_langs, pad_id, smoothing)


class LossTally:
    """Per-language sums over micro-batches (and, after ``all_reduce``, ranks): float64 [3, K] rows
    label-smoothed token-loss sum, NLL sum, target tokens.

    Kept on the device the losses are on: adding a micro-batch reads nothing back to the host, so a GPU
    is never stalled by a sync per micro-step; values are read at the log interval.
    """

    LOSS, NLL, TOKENS = range(3)

    def __init__(self, num_langs: int, device=None, sums: torch.Tensor | None = None):
        self.sums = torch.zeros(3, num_langs, dtype=torch.float64, device=device) if sums is None else sums

    @torch.no_grad()
    def add(self, loss_k: torch.Tensor, nll_k: torch.Tensor, ntok_k: torch.Tensor, total) -> None:
        """One micro-batch's ``per_language_losses`` output; ``total`` is the normaliser of its shares."""
        dev = self.sums.device
        self.sums[self.LOSS] += (loss_k.detach().double() * total).to(dev)
        self.sums[self.NLL] += nll_k.double().to(dev)
        self.sums[self.TOKENS] += ntok_k.double().to(dev)

    def __iadd__(self, other: "LossTally") -> "LossTally":
        self.sums += other.sums.to(self.sums.device)
        return self

    def zero_(self) -> None:
        self.sums.zero_()

    def all_reduce(self, group=None) -> "LossTally":
        """A new tally summed over the ranks of ``group`` (this one unchanged)."""
        import torch.distributed as dist

        sums = self.sums.clone()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        return LossTally(sums.shape[1], sums=sums)

    @property
    def tokens(self) -> float:
        return float(self.sums[self.TOKENS].sum())

    @property
    def loss(self) -> float:
        """Label-smoothed loss per target token over all languages."""
        return float(self.sums[self.LOSS].sum()) / max(self.tokens, 1.0)

    def mean_loss(self) -> torch.Tensor:
        """float64 [K]: each language's label-smoothed loss per target token (0 where it has none)."""
        return self.sums[self.LOSS] / self.sums[self.TOKENS].clamp(min=1)

    def mean_nll(self) -> torch.Tensor:
        """float64 [K]: each language's NLL per target token (0 where it has none)."""
        return self.sums[self.NLL] / self.sums[self.TOKENS].clamp(min=1)
