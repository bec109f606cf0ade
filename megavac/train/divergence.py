"""Divergence detection: stop a run that is no longer training, naming the step, before it checkpoints.

A diverged run must not write checkpoints: with ``--keep-last`` they would push the last good ones out.
Three symptoms, each checked where it is cheap:
- a non-finite or exploding training loss (read at the log interval and before every checkpoint, when the
  loss is all-reduced anyway);
- DeepSpeed skipping every update: its optimizer skips a step whose gradient overflowed (fp16 loss-scale
  search, but also non-finite gradients in fp32/bf16), so a run with lr 1e3 can sit with frozen weights
  and a frozen loss while writing checkpoints; ``engine.skipped_steps`` counts them;
- a non-finite validation loss (what every checkpoint is preceded by).
"""
from __future__ import annotations

import math


class DivergenceError(RuntimeError):
    """The run diverged; the message names the step and what was seen."""


class DivergenceGuard:
    def __init__(self, max_loss: float, max_skipped_steps: int):
        self.max_loss, self.max_skipped = max_loss, max_skipped_steps
        self.skipped_seen: int | None = None
        self.consecutive = 0

    @staticmethod
    def default_max_loss(vocab_size: int) -> float:
        # A uniform guess costs ln(V) nats per token: three times that is a model far worse than guessing,
        # which no training run passes through on its way down.
        return 3.0 * math.log(vocab_size)

    def check_loss(self, step: int, loss: float, what: str = "training loss"):
        if not math.isfinite(loss):
            raise DivergenceError(f"diverged: {what} is {loss} at step {step}; no checkpoint was written for it. "
                                  "Lower --lr or raise --warmup-steps, and --resume from the last good checkpoint")
        if loss > self.max_loss:
            raise DivergenceError(f"diverged: {what} {loss:.4g} at step {step} exceeds --max-loss {self.max_loss:.4g} "
                                  "(3 × ln(vocab size) by default: far worse than a uniform guess); no checkpoint "
                                  "was written for it. Lower --lr or raise --warmup-steps, and --resume from the last "
                                  "good checkpoint")

    def after_step(self, step: int, skipped_steps: int):
        """``skipped_steps``: DeepSpeed's running count of skipped (overflowed) updates."""
        if self.skipped_seen is not None and skipped_steps > self.skipped_seen:
            self.consecutive += skipped_steps - self.skipped_seen
        elif self.skipped_seen is not None:
            self.consecutive = 0
        self.skipped_seen = skipped_steps
        if self.consecutive >= self.max_skipped:
            raise DivergenceError(
                f"diverged: DeepSpeed skipped the last {self.consecutive} updates (steps {step - self.consecutive + 1}"
                f"..{step}) as gradient overflows (non-finite gradients), so the weights no longer change; no "
                "checkpoint was written for them (--max-skipped-steps). Lower --lr, check the data, or (fp16) the "
                "loss-scale settings, and --resume from the last good checkpoint")
