"""Per-language gradients on ZeRO shards and the per-language-weighted update (docs/design.md §2–3).

One optimizer step of a Gram method, on every rank:

1. a *collector* (megavac.pergrad.collectors) leaves this rank's slice of every language's reduced
   gradient in a [K, N] buffer;
2. local Grams per parameter tensor [P, K, K] (float64), summed into the granularity's groups [G, K, K];
3. ONE all-reduce of the [G, K, K] Grams (plus each language's token-loss sum and tokens) over the group
   whose slices partition every gradient, so the sum of the slice Grams is the full Gram;
4. ``method.weights(gram, ctx)`` -> w [G, K], identical on every rank (same Gram, same generator);
5. Σ_k w[g(e), k] g_k[e] written into the partition, element e of the slice only (no rank ever
   materialises a full gradient), then ``engine.step()``: DeepSpeed's norm, clipping, fp16 overflow
   check and optimizer see the combined gradient exactly as they would a plain one.

Language k's gradient g_k is the gradient of its SHARE of the batch loss (``per_language_losses``),
so Σ_k g_k is the plain gradient and all-ones weights reproduce plain training. Steps on which the
method needs no Gram (CATS between meta steps) run the trainer's ``PlainStep`` with the method's loss
weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megavac.loss import LossTally
from megavac.methods import GramMethod, StepContext
from megavac.model.groups import build_groups, group_label
from megavac.pergrad.collectors import GradCollector, default_collector
from megavac.train.plain_step import PlainStep


@dataclass
class StepStats:
    tally: LossTally
    """This rank's per-language losses and tokens of the step."""
    gram_step: bool
    """True when the Gram path ran (False: plain path with ``loss_weights``)."""
    present: torch.Tensor | None = None
    """bool [K] (Gram steps)."""
    grad_norm: torch.Tensor | None = None
    """float64 [K]: ‖g_k‖ over the whole model (Gram steps; unscaled)."""
    weights: torch.Tensor | None = None
    """float64 [G, K]: the method's weights (Gram steps)."""
    losses: torch.Tensor | None = None
    """float64 [K]: each language's mean token loss over the global batch (Gram steps; 0 if absent)."""
    skipped: bool = False
    """The method skipped (non-finite Gram, e.g. fp16 overflow); DeepSpeed then skips the step."""
    extra: dict = field(default_factory=dict)

    def lang_log(self, names: list[str]) -> dict:
        """Per-language record for metrics.jsonl (Gram steps): gradient norm, weight averaged over the
        groups, presence, and whether the method skipped. Cosines per group are in the Gram logs."""
        if not self.gram_step:
            return {}
        w = self.weights.mean(0)
        return {"grad_norm": dict(zip(names, self.grad_norm.tolist())),
                "weight": dict(zip(names, w.tolist())),
                "present": dict(zip(names, self.present.tolist())), "skipped": self.skipped}


class PerLanguageStep:
    """What the trainer calls for one optimizer step when a Gram method is configured.

    ``run(batches, step)`` takes the step's ``ga`` micro-batches and dispatches: Gram path when
    ``method.needs_gram(step)``, else the trainer's ``PlainStep`` with ``method.loss_weights()``.
    ``state_dict()`` (the method's state and the generator) is identical on every rank.
    """

    def __init__(self, engine, method: GramMethod, num_langs: int, *, pad_id: int, label_smoothing: float,
                 granularity: str = "all_layer", seed: int = 0, collector: GradCollector | str | None = None,
                 plain: PlainStep | None = None, gram_log_dir: str | Path | None = None,
                 gram_log_interval: int = 0, lang_names: list[str] | None = None):
        if method.num_langs != num_langs:
            raise ValueError(f"method is built for {method.num_langs} languages, the data has {num_langs}")
        if gram_log_interval < 0:
            raise ValueError(f"gram_log_interval must be >= 0, got {gram_log_interval}")
        self.engine, self.method, self.K = engine, method, num_langs
        self.pad_id, self.label_smoothing = pad_id, label_smoothing
        self.ga = int(engine.gradient_accumulation_steps())
        if collector is None or isinstance(collector, str):  # a kind: "one_backward" (default), "k_backward"
            collector = default_collector(engine, num_langs, pad_id, label_smoothing, collector or "one_backward")
        self.collector = collector
        self.plain = plain or PlainStep(engine, num_langs, pad_id, label_smoothing,
                                        runner=getattr(self.collector, "runner", None))
        self.partition = self.collector.partition
        self.granularity = granularity
        # Groups from the WHOLE model's names: under pipeline parallelism every stage then agrees on them.
        self.group_names, _ = build_groups(self.partition.all_param_names, granularity)
        index = {g: i for i, g in enumerate(self.group_names)}
        self.group_of_param = torch.tensor([index[group_label(n, granularity)] for n in self.partition.param_names],
                                           dtype=torch.long)
        self._runs = self._combine_runs()
        self.generator = torch.Generator().manual_seed(seed)
        self.gram_log_dir = Path(gram_log_dir) if gram_log_dir else None
        self.gram_log_interval = gram_log_interval
        self.lang_names = lang_names or [str(k) for k in range(num_langs)]
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def _combine_runs(self) -> list[tuple[int, int, int]]:
        """(start, end, group) of maximal runs of consecutive local elements in one group (segments
        separated only by padding merge too: padding is zero in every slice)."""
        runs = []
        for s in self.partition.segments:
            g = int(self.group_of_param[s.param])
            if runs and runs[-1][2] == g:
                runs[-1] = (runs[-1][0], s.start + s.numel, g)
            else:
                runs.append((s.start, s.start + s.numel, g))
        return runs

    # ------------------------------------------------------------------------- the two paths
    def logs_gram(self, step: int) -> bool:
        """Whether update ``step`` (0-based) writes a Gram log (named step + 1)."""
        return bool(self.gram_log_dir is not None and self.gram_log_interval and
                    (step + 1) % self.gram_log_interval == 0)

    def run(self, batches: list, step: int) -> StepStats:
        if self.method.needs_gram(step):
            return self.gram_step(batches, step)
        if self.logs_gram(step):  # a Gram for the log only: the update stays the plain step's (see gram_step)
            return self.gram_step(batches, step, log_only=True)
        # The method's loss weights (all ones: exactly plain training; CATS: α).
        return StepStats(self.plain(batches, self.method.loss_weights()), gram_step=False)

    def group_grams(self, slices: torch.Tensor) -> torch.Tensor:
        """float64 [G, P, P] local: parameter Grams of the P rows of ``slices`` summed into groups."""
        pg = self.collector.param_grams(slices)
        G, K = self.num_groups, slices.shape[0]
        return torch.zeros(G, K, K, dtype=torch.float64, device=pg.device).index_add_(
            0, self.group_of_param.to(pg.device), pg)

    def combine(self, slices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """fp32 [N]: Σ_k w[g(e), k] slices[k, e] for every local element e (padding stays 0)."""
        out = torch.zeros(slices.shape[1], dtype=torch.float32, device=slices.device)
        w = weights.to(device=slices.device, dtype=torch.float32)
        for a, b, g in self._runs:
            torch.mv(slices[:, a:b].T, w[g], out=out[a:b])
        return out

    def gram_step(self, batches: list, step: int, log_only: bool = False) -> StepStats:
        """``log_only``: the method is not asked (its state does not move); the update combines the
        per-language gradients with the plain step's loss weights, Σ_k w_k g_k, which is the plain step's
        gradient up to the order of the float additions (monolithic training: w = 1)."""
        part, K, G = self.partition, self.K, self.num_groups
        t = [time.perf_counter()]
        try:  # whatever happens, the accumulation boundary goes back to DeepSpeed's counter
            got = self.collector.collect(batches)
            t.append(time.perf_counter())
            idx = got.langs
            gram = torch.zeros(G, K, K, dtype=torch.float64, device=got.slices.device)
            gram[:, idx[:, None], idx[None, :]] = self.group_grams(got.slices)  # absent languages: zero rows
            # One all-reduce: the Grams and each language's token-loss sum and tokens (GradNorm, logging).
            # Under a pipeline only the last stage has losses; the others add zeros.
            t_sums = got.tally.sums
            packed = torch.cat([gram.flatten(), t_sums[LossTally.LOSS].to(gram.device),
                                t_sums[LossTally.TOKENS].to(gram.device)])
            group = part.gram_group()
            if dist.is_initialized() and dist.get_world_size(group) > 1:
                dist.all_reduce(packed, group=group)
            packed = packed.cpu()
            gram = packed[:G * K * K].view(G, K, K)
            losses = packed[G * K * K:G * K * K + K] / packed[G * K * K + K:].clamp(min=1)
            scale = part.loss_scale()
            if scale != 1.0:
                gram = gram / (scale * scale)  # fp16: slices hold gradients × scale
            t.append(time.perf_counter())
            ctx = StepContext(step=step, present=got.present.clone(), losses=losses, generator=self.generator)
            skipped_before = self.method.skipped
            if log_only:
                weights = self.method.loss_weights().to(torch.float64).expand(G, K).clone()
            else:
                weights = self.method.weights(gram, ctx)
            skipped = self.method.skipped != skipped_before
            assert weights.shape == (G, K), weights.shape
            t.append(time.perf_counter())
            part.write(self.combine(got.slices, weights[:, idx]))
            t.append(time.perf_counter())
            part.step()
            t.append(time.perf_counter())
        finally:
            part.release_boundary()
        # Named by the number of updates done once this one is (as metrics.jsonl and checkpoints are).
        if self.logs_gram(step):
            self._log_gram(step + 1, gram, weights, got.present, losses)
        diag = torch.diagonal(gram, dim1=1, dim2=2).sum(0)
        phases = dict(zip(("collect", "gram", "weights", "combine", "step"), np.diff(t).tolist()))
        return StepStats(got.tally, gram_step=True, present=got.present, grad_norm=diag.clamp(min=0).sqrt(),
                         weights=weights, losses=losses, skipped=skipped, extra={"seconds": phases})

    def _log_gram(self, step, gram, weights, present, losses):
        if self.rank != 0:
            return
        self.gram_log_dir.mkdir(parents=True, exist_ok=True)
        path = self.gram_log_dir / f"gram_{step:08d}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, step=step, gram=gram.numpy(), weights=weights.cpu().numpy(), present=present.numpy(),
                 losses=losses.numpy(), groups=np.array(self.group_names), langs=np.array(self.lang_names),
                 granularity=self.granularity, method=self.method.name)
        tmp.replace(path)

    # --------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"method": self.method.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, d: dict) -> None:
        for key in ("method", "generator"):
            if key not in d:
                raise ValueError(f"per-language step state lacks {key!r}: keys {sorted(d)}")
        self.method.load_state_dict(d["method"])
        self.generator.set_state(d["generator"])
