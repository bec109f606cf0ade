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

    @torch.no_grad()
    def run(self, engine) -> dict:
        """Returns per-language NLL per token and perplexity plus their unweighted average over languages."""
        K = self.ds.num_langs
        tally = self._pipelined() if self.runner is not None else self._plain(engine)
        # Pipeline: only the last stage has sums (the other stages' are zero), so the world sum is right.
        tally = tally.all_reduce()
        nll = tally.mean_nll().tolist()
        out = {"loss": dict(zip(self.ds.names, tally.mean_loss().tolist())),
               "nll": dict(zip(self.ds.names, nll)),
               "ppl": {n: math.exp(min(x, 50.0)) for n, x in zip(self.ds.names, nll)}}
        out["avg_nll"] = sum(nll) / K
        out["avg_loss"] = sum(out["loss"].values()) / K
        return out

    def _plain(self, engine) -> LossTally:
        """Label-smoothed loss, nll and tokens per language over this rank's batches."""
        K = self.ds.num_langs
        tally = LossTally(K, device=self.device)
        engine.eval()
        for items in self.batches:
            # Ranks with no batch left still run one (zero-weighted) forward: ZeRO-3 gathers collectively.
            batch = collate(self.ds, items or [(0, 0)], self.max_positions).to(self.device)
            loss_k, nll_k, ntok_k = forward_losses(engine, batch, K, self.ds.pad_id, self.smoothing)
            if items:
                tally.add(loss_k, nll_k, ntok_k, batch.ntokens)
        engine.train()
        return tally

    def _pipelined(self) -> LossTally:
        batches = []
        for items in self.batches:
            batch = collate(self.ds, items or [(0, 0)], self.max_positions)
            if not items:  # a rank short of batches runs one whose targets are all padding: zero weight
                batch.tgt_out.fill_(self.ds.pad_id)
                batch.ntokens = 0
            batches.append(batch.to(self.device))
        return self.runner.eval_tally(batches)
