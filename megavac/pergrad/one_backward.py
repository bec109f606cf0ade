"""One backward for all K per-language gradients (docs/design.md §3.2).

Rows of a batch are independent sentences and every token belongs to one language, so the output
gradient δ of every layer is the same whether the loss is split by language or not. A weight gradient
is a sum over tokens, Σ_t δ_t x_tᵀ: split that sum by the batch's language segments (rows are grouped by
language, ``Batch.segments``) and ONE backward of the plain loss yields every language's weight
gradient, for the FLOPs of one weight-gradient product:

* ``nn.Linear``: W_k = δ_kᵀ x_k, b_k = Σ δ_k over language k's tokens;
* ``nn.LayerNorm``: γ_k = Σ δ_k ⊙ x̂_k, β_k = Σ δ_k (x̂ recomputed from the saved input);
* ``nn.Embedding``: row-wise ``index_add`` of δ_k at language k's token ids (the padding row gets none);
* the tied output projection ``F.linear(y, embed.weight)`` of ``megavac.model.Transformer``: δ_logits,kᵀ y_k,
  added to the embedding's gradient.

The taps are forward hooks that save each layer's input and a tensor hook on its output that receives
δ during the backward; they exist only inside ``OneBackwardCollector.collect`` (monolithic training and
a method's plain steps never see them). DeepSpeed's own backward runs as usual (it reduces the plain
gradient into its partition, which the Gram step overwrites with the combination).

Reduction without K full gradients: as soon as a parameter's last contribution of the micro-batch has
arrived, its [P, numel] per-language gradients (P = languages present in the step on any rank) are
all-reduced over the data-parallel group, averaged as DeepSpeed averages, and only this rank's fragments
(``GradPartition.segments``) are added to the [P, N] slices. The transient memory is P × the largest
parameter (at most ``BUDGET`` elements: larger ones are computed and reduced a chunk of languages at a
time), on top of the slices' P × (model / data-parallel ranks) fp32.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megavac.loss import LossTally, forward_losses
from megavac.pergrad.collectors import GradCollector, LanguageGrads
from megavac.pergrad.ds_adapter import GradPartition

# Elements of per-language gradients one parameter may hold at once before they are reduced (256 MiB fp32).
BUDGET = 1 << 26


def _segment_rows(segments: dict, rows: dict) -> list[tuple[int, int, int]]:
    """(row of the slices, first batch row, end batch row) of every language in the micro-batch."""
    return [(rows[k], a, b) for k, (a, b) in sorted(segments.items()) if b > a]


def _outer(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ over the tokens of g ⊗ x: a linear map's weight gradient (fp32 [out, in])."""
    return g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()


def _token_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over the tokens, per feature (fp32): biases, LayerNorm gains."""
    return t.reshape(-1, t.shape[-1]).float().sum(0)


class _Taps:
    """Forward/backward hooks that turn one backward into per-language parameter gradients."""

    def __init__(self, module: nn.Module, collector: "OneBackwardCollector"):
        self.c = collector
        self.handles = []
        self.uses = defaultdict(int)  # parameter -> forward uses still to come back in the backward
        self.acc: dict[nn.Parameter, torch.Tensor] = {}  # summed contributions awaiting the last one
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding)):
                self.handles.append(m.register_forward_hook(self._forward))
        # The tied output projection logits = F.linear(dec_norm(y), embed.weight) is no module: its input is
        # dec_norm's output and its δ the gradient of the model's output.
        self.root = module
        self.handles.append(module.dec_norm.register_forward_hook(self._keep_projection_input))
        self.handles.append(module.register_forward_hook(self._output))
        self.proj_input = None

    def close(self):
        for h in self.handles:
            h.remove()

    # ------------------------------------------------------------------------------- forward
    def _params(self, m):
        return [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if p is not None]

    def _forward(self, m, inputs, output):
        if not torch.is_grad_enabled():
            return
        x = inputs[0].detach()
        for p in self._params(m):
            self.uses[p] += 1
        output.register_hook(lambda g, m=m, x=x: self._backward(m, x, g))

    def _keep_projection_input(self, m, inputs, output):
        self.proj_input = output.detach()

    def _output(self, m, inputs, output):
        if not torch.is_grad_enabled():
            return
        w = m.embed.weight
        self.uses[w] += 1
        y = self.proj_input
        output.register_hook(lambda g: self._projection(w, y, g))

    # ------------------------------------------------------------------------------ backward
    # Each rule below gives ``_emit`` the gradient of one language's rows a..b of the batch; ``_per_language``
    # turns it into grads(r0, r1) -> fp32 [r1 - r0, numel] for the languages in rows r0..r1 of the slices,
    # so that big parameters are computed a chunk of languages at a time.
    def _backward(self, m, x, g):
        if isinstance(m, nn.Linear):
            self._emit(m.weight, self._per_language(m.weight, lambda a, b: _outer(g[a:b], x[a:b])))
            if m.bias is not None:
                self._emit(m.bias, self._per_language(m.bias, lambda a, b: _token_sum(g[a:b])))
        elif isinstance(m, nn.LayerNorm):
            xhat = F.layer_norm(x.float(), m.normalized_shape, eps=m.eps)
            if m.weight is not None:
                self._emit(m.weight, self._per_language(m.weight, lambda a, b: _token_sum(g[a:b] * xhat[a:b])))
            if m.bias is not None:
                self._emit(m.bias, self._per_language(m.bias, lambda a, b: _token_sum(g[a:b])))
        else:  # nn.Embedding: row-wise scatter of δ at the token ids (none for the padding row)
            V, d = m.num_embeddings, m.embedding_dim

            def rows(a, b):
                ids, gs = x[a:b].reshape(-1), g[a:b].reshape(-1, d).float()
                if m.padding_idx is not None:
                    keep = ids != m.padding_idx
                    ids, gs = ids[keep], gs[keep]
                return gs.new_zeros(V, d).index_add_(0, ids, gs)

            self._emit(m.weight, self._per_language(m.weight, rows))

    def _projection(self, w, y, g):
        self._emit(w, self._per_language(w, lambda a, b: _outer(g[a:b], y[a:b])))

    def _per_language(self, p, one):
        """grads(r0, r1) from ``one(a, b)``, the gradient of ``p`` from batch rows a..b (one language)."""
        segs, numel = self.c.segment_rows, self.c.numel_of(p)

        def grads(r0, r1):
            out = torch.zeros(r1 - r0, numel, dtype=torch.float32, device=self.c.partition.device)
            for r, a, b in segs:
                if r0 <= r < r1:
                    out[r - r0] = one(a, b).reshape(-1)
            return out
        return grads

    def _emit(self, p, grads):
        """One contribution of this micro-batch to parameter ``p``'s per-language gradients. While the
        P languages' gradients of ``p`` fit ``BUDGET`` elements, contributions are summed and reduced once
        after the last (the tied embedding has three: two embeddings and the output projection); a bigger
        parameter is computed and reduced a chunk of languages at a time, once per contribution, so the
        transient memory stays ``BUDGET`` elements. Every rank decides alike (P and numel are global)."""
        P, numel = self.c.num_rows, self.c.numel_of(p)
        self.uses[p] -= 1
        if P * numel <= BUDGET:
            prev = self.acc.pop(p, None)
            total = grads(0, P) if prev is None else prev.add_(grads(0, P))
            if self.uses[p] == 0:
                self.c.reduce_into_slices(p, total, 0)
            else:
                self.acc[p] = total
            return
        chunk = max(1, BUDGET // numel)
        for r0 in range(0, P, chunk):
            self.c.reduce_into_slices(p, grads(r0, min(P, r0 + chunk)), r0)


class OneBackwardCollector(GradCollector):
    """Every language's reduced gradient slice from ONE backward per micro-batch (see module docstring).

    Plain ZeRO-1/2/3 engines over ``megavac.model.Transformer`` (not the pipeline form). The result is the
    same ``LanguageGrads`` the K-backward reference gives.
    """

    def __init__(self, engine, num_langs: int, pad_id: int, label_smoothing: float,
                 partition: GradPartition | None = None):
        super().__init__(engine, num_langs, partition)
        self.pad_id, self.label_smoothing = pad_id, label_smoothing
        params = [p for _, p in engine.module.named_parameters()]
        self._index = {id(p): k for k, p in enumerate(params)}
        self._segments = defaultdict(list)
        for s in self.partition.segments:
            self._segments[s.param].append(s)
        group = self.partition.dp_group()
        self._dp = dist.get_world_size(group) if dist.is_initialized() else 1
        self._group = group

    # Called by _Taps during the backward.
    def numel_of(self, p) -> int:
        return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 parameters are partitioned: ds_numel is the full size

    def reduce_into_slices(self, p, grads: torch.Tensor, row0: int) -> None:
        """grads [n, numel]: this rank's gradients of ``p`` for the languages of slice rows row0..row0+n ->
        this rank's fragments of their data-parallel average, added into those rows of the slices."""
        if self._dp > 1:
            dist.all_reduce(grads, group=self._group)
            grads /= self._dp
        rows = self.slices[row0:row0 + grads.shape[0]]
        for s in self._segments.get(self._index[id(p)], ()):
            rows[:, s.start:s.start + s.numel] += grads[:, s.offset:s.offset + s.numel]

    def collect(self, batches: list) -> LanguageGrads:
        self._check_batches(batches)
        K, part, engine = self.num_langs, self.partition, self.engine
        dev = part.device
        here = torch.zeros(K, dtype=torch.float32, device=dev)
        for batch in batches:
            here[list(batch.segments)] = 1.0
        if self._dp > 1:
            dist.all_reduce(here, group=self._group)
        present = here.cpu() > 0
        langs_all = torch.nonzero(present).flatten()
        rows = {int(k): r for r, k in enumerate(langs_all.tolist())}
        self.num_rows = len(rows)
        self.slices = self._zeroed_rows(len(rows))
        tally = LossTally(K, device=dev)
        taps = _Taps(engine.module, self)
        try:
            for m, batch in enumerate(batches):
                self.segment_rows = _segment_rows(batch.segments, rows)
                part.force_boundary()
                loss_k, nll_k, ntok_k = forward_losses(engine, batch, K, self.pad_id, self.label_smoothing)
                engine.backward(loss_k.sum())
                assert not taps.acc and all(v == 0 for v in taps.uses.values()), "a tapped parameter got no gradient"
                part.zero_()
                if m < len(batches) - 1:
                    engine.set_gradient_accumulation_boundary(False)
                    engine.step()  # not a boundary: only the micro-step counter moves
                tally.add(loss_k, nll_k, ntok_k, batch.ntokens)
        finally:
            taps.close()
        return LanguageGrads(self.slices, langs_all, present, tally)
