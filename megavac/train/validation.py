"""Per-language validation loss over the whole dev split, sharded across data-parallel ranks."""
from __future__ import annotations

import math

import torch

from megavac.data import MultilingualDataset, collate, eval_batches
from megavac.loss import LossTally, forward_losses


class Validator:
    def __init__(self, ds: MultilingualDataset, max_tokens: int, max_positions: int, rank: int, world: int,
                 device: torch.device, smoothing: float, runner=None):
        """``rank``/``world``: data-parallel. ``runner``: a ``megavac.model.pipeline.PipelineRunner`` for
        pipelined engines (which only evaluate through ``eval_batch``)."""
        self.ds, self.max_positions, self.device, self.smoothing = ds, max_positions, device, smoothing
        self.batches = eval_batches(ds, max_tokens, rank, world)
        self.runner = runner
        # Languages without dev lines (OPUS-100 ships some pairs without dev; prepare warns by name) have no
        # loss: a 0 in the average would pull it down and make it depend on which languages lack data.
        self.missing = [n for n, size in zip(ds.names, ds.sizes) if size == 0]
        if len(self.missing) == ds.num_langs:
            # Refused here, at start: an average over no language is NaN, which reads as a diverged run later.
            raise ValueError(f"no dev data for any language ({', '.join(self.missing)}): validation, which selects "
                             "the best checkpoint, needs at least one; prepare a corpus with dev splits or add a "
                             "language that has one with --langs")
        if self.missing and _global_rank() == 0:
            print(f"validation: no dev data for {', '.join(self.missing)}; left out of the average validation "
                  f"loss (which selects the best checkpoint)", flush=True)

    @torch.no_grad()
    def run(self, engine) -> dict:
        """Per-language NLL per token and perplexity plus their unweighted average over languages.

        Only languages with dev data appear in ``loss``/``nll``/``ppl`` and the averages; ``missing`` lists
        the others (at least one language has dev data: the constructor refuses otherwise).
        """
        tally = self._pipelined() if self.runner is not None else self._plain(engine)
        # Pipeline: only the last stage has sums (the other stages' are zero), so the world sum is right.
        tally = tally.all_reduce()
        present = [k for k in range(self.ds.num_langs) if self.ds.sizes[k] > 0]
        names = [self.ds.names[k] for k in present]
        nll = [tally.mean_nll()[k].item() for k in present]
        loss = [tally.mean_loss()[k].item() for k in present]
        out = {"loss": dict(zip(names, loss)),
               "nll": dict(zip(names, nll)),
               "ppl": {n: math.exp(min(x, 50.0)) for n, x in zip(names, nll)},
               "missing": list(self.missing)}
        out["avg_nll"] = sum(nll) / len(nll)
        out["avg_loss"] = sum(loss) / len(loss)
        return out

    def _plain(self, engine) -> LossTally:
        """Label-smoothed loss, nll and tokens per language over this rank's batches."""
        K = self.ds.num_langs
        tally = LossTally(K, device=self.device)
        engine.eval()
        for items in self.batches:
            # Ranks with no batch left still run one (zero-weighted) forward: ZeRO-3 gathers collectively.
            batch = collate(self.ds, items or [self._filler()], self.max_positions).to(self.device)
            loss_k, nll_k, ntok_k = forward_losses(engine, batch, K, self.ds.pad_id, self.smoothing)
            if items:
                tally.add(loss_k, nll_k, ntok_k, batch.ntokens)
        engine.train()
        return tally

    def _pipelined(self) -> LossTally:
        batches = []
        for items in self.batches:
            batch = collate(self.ds, items or [self._filler()], self.max_positions)
            if not items:  # a rank short of batches runs one whose targets are all padding: zero weight
                batch.tgt_out.fill_(self.ds.pad_id)
                batch.ntokens = 0
            batches.append(batch.to(self.device))
        return self.runner.eval_tally(batches)

    def _filler(self) -> tuple[int, int]:
        """The example a rank short of batches runs (zero weight): the first language that has one."""
        return next((k, 0) for k in range(self.ds.num_langs) if self.ds.sizes[k] > 0)


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0
