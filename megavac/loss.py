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
