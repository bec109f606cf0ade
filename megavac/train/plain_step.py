"""The plain optimizer step: one backward of Σ_k w_k loss_k per micro-batch (all w_k = 1: plain training).

Monolithic training and the steps on which a per-language method needs no Gram (CATS between meta steps)
run this same object, over a DeepSpeed engine or, under pipeline parallelism, DeepSpeed's
``train_batch`` (``megavac.model.pipeline.PipelineRunner``). It returns a ``LossTally`` kept on the device.
"""
from __future__ import annotations

import torch

from megavac.loss import LossTally, forward_losses


class PlainStep:
    def __init__(self, engine, num_langs: int, pad_id: int, smoothing: float, runner=None):
        """``runner``: a ``megavac.model.pipeline.PipelineRunner`` when ``engine`` is a pipeline engine."""
        self.engine, self.runner = engine, runner
        self.num_langs, self.pad_id, self.smoothing = num_langs, pad_id, smoothing

    def __call__(self, batches: list, loss_weights: torch.Tensor | None = None) -> LossTally:
        """One optimizer update over the step's ``gradient_accumulation_steps`` micro-batches."""
        if loss_weights is not None and bool((loss_weights == 1).all()):
            loss_weights = None  # exactly the plain loss, without a multiply
        if self.runner is not None:
            return self.runner.train_batch(batches, loss_weights)
        tally = LossTally(self.num_langs, device=self.engine.device)
        for batch in batches:
            loss_k, nll_k, ntok_k = forward_losses(self.engine, batch, self.num_langs, self.pad_id, self.smoothing)
            loss = loss_k.sum() if loss_weights is None else (loss_k * loss_weights.to(loss_k)).sum()
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed updates only at the accumulation boundary
            tally.add(loss_k, nll_k, ntok_k, batch.ntokens)
        return tally
