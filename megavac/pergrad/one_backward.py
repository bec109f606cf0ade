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

The taps exist only inside ``OneBackwardCollector.collect`` (monolithic training and a method's plain
steps never see them). Linear layers and the tied projection run a custom autograd function there
(``_TappedLinear``): its backward computes δ's input gradient as usual and the per-language weight
gradients as ONE grouped GEMM (``torch.nn.functional.grouped_mm``, the token dimension split at the
language boundaries; bf16 on GPUs, one GEMM per language elsewhere), and gives autograd zeros in place
of the plain weight gradient, which the Gram step would overwrite anyway: the step does the weight-gradient FLOPs once, not twice. LayerNorm and
Embedding gradients are cheap (no GEMM): forward hooks save their input and a tensor hook on their
output receives δ; their plain gradients are computed too. DeepSpeed's backward runs as usual (it
reduces what autograd gives it into its partition, which the Gram step overwrites with the combination).

Reduction without K full gradients: as soon as a parameter's last contribution of the micro-batch has
arrived, the gradients of the languages this rank holds go to the owners of their ZeRO fragments
(``GradPartition.segments``) in ONE all-to-all, averaged as DeepSpeed averages, and are added to the
[P, N] slices (P = languages present in the step on any rank). The transient memory is one parameter's
per-language gradients (at most ``BUDGET`` elements: larger ones are computed and reduced a chunk of
languages at a time) and the all-to-all's buffers, on top of the slices' P × (model / data-parallel
ranks) fp32. On a single rank the gradients are written straight into the slices (no transient).
"""
from __future__ import annotations

import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

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


def _tokens(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Batch rows a..b of ``t`` [B, L, d] as fp32 tokens [(b - a) L, d]."""
    return t[a:b].reshape(-1, t.shape[-1]).float()


def _token_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over the tokens, per feature (fp32): biases, LayerNorm gains."""
    return t.reshape(-1, t.shape[-1]).float().sum(0)


def _grouped_outer(g: torch.Tensor, x: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """fp32 [n, out, in]: Σ over the tokens of batch rows a..b of g ⊗ x, for each (a, b) of ``bounds``
    (adjacent row ranges in increasing order): the per-language weight gradients of a linear map. bf16 on
    a GPU: ONE grouped GEMM whose groups split the token (reduction) dimension; otherwise one GEMM per
    language (torch's grouped GEMM has fast kernels for bf16 on CUDA only, with feature sizes that are
    multiples of 8; elsewhere it falls back to such a loop itself)."""
    a0, L = bounds[0][0], g.shape[1] if g.dim() == 3 else 1
    gt = g[a0:bounds[-1][1]].reshape(-1, g.shape[-1])
    xt = x[a0:bounds[-1][1]].reshape(-1, x.shape[-1])
    ends = [(b - a0) * L for _, b in bounds]
    global _GROUPED_MM
    if (_GROUPED_MM is not None and gt.is_cuda and gt.dtype == xt.dtype == torch.bfloat16
            and gt.shape[1] % 8 == 0 and xt.shape[1] % 8 == 0):
        offs = torch.tensor(ends, dtype=torch.int32).to(gt.device, non_blocking=True)
        try:
            return _GROUPED_MM(gt.T, xt, offs=offs).float()
        except RuntimeError as e:  # a layout this build's kernel refuses: the loop below, from now on
            warnings.warn(f"torch.nn.functional.grouped_mm refused the per-language GEMM ({e}); using one mm "
                          "per language")
            _GROUPED_MM = None
    gt, xt = gt.float(), xt.float()
    out = gt.new_empty(len(ends), gt.shape[1], xt.shape[1])
    for i, (s, e) in enumerate(zip([0, *ends[:-1]], ends)):
        torch.mm(gt[s:e].T, xt[s:e], out=out[i])
    return out


# torch >= 2.8 has a grouped GEMM (offsets split the shared dimension); elsewhere a loop of mm.
_GROUPED_MM = getattr(F, "grouped_mm", None)


class _TappedLinear(torch.autograd.Function):
    """y = x Wᵀ + b whose backward computes the input gradient as usual, hands the per-language weight
    (and bias) gradients to the taps, and gives autograd zeros for W and b: the plain weight gradient
    would only be reduced by DeepSpeed and then overwritten by the combined gradient, so its GEMM (a
    third of a backward's FLOPs) is not done twice."""

    @staticmethod
    def forward(ctx, x, weight, bias, taps, owner, micro):
        ctx.save_for_backward(x, weight)
        ctx.taps, ctx.owner, ctx.micro, ctx.has_bias = taps, owner, micro, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx = g @ weight if ctx.needs_input_grad[0] else None
        ctx.taps.linear(ctx.owner, weight, x, g, ctx.micro)
        return gx, torch.zeros_like(weight), (torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                                              if ctx.has_bias else None), None, None, None


@dataclass
class _Micro:
    """One micro-batch's language layout, which the taps capture at its forward: under a pipeline the
    backward of micro-batch i may run after the forward of micro-batch i + 1."""

    segs: list
    """(slice row, first batch row, end batch row) of every language in the micro-batch."""
    held: list
    """Per data-parallel rank: the slice rows it holds in this micro-batch (who sends what)."""
    uses: dict = field(default_factory=lambda: defaultdict(int))
    """Parameter -> forward uses still to come back in the backward."""
    acc: dict = field(default_factory=dict)
    """Parameter -> summed contributions awaiting the last one."""

    def done(self) -> bool:
        return not self.acc and all(v == 0 for v in self.uses.values())


class _Taps:
    """Per-language parameter gradients out of one backward: tapped forwards for the GEMM layers (Linear,
    the tied output projection), forward/tensor hooks for the cheap ones (LayerNorm, Embedding), whose
    plain gradients autograd still computes. Each forward use records the collector's current
    ``micro`` (its language layout); its backward reads that one."""

    def __init__(self, module: nn.Module, collector: "OneBackwardCollector"):
        self.c = collector
        self.handles, self.patched = [], []
        for m in module.modules():
            if isinstance(m, nn.Linear):
                self._patch(m, "forward", lambda x, m=m: self._linear_forward(m, x))
            elif isinstance(m, (nn.LayerNorm, nn.Embedding)) and (m.weight is not None
                                                                   or getattr(m, "bias", None) is not None):
                # (a LayerNorm without gain and bias, --no-layernorm-affine, has nothing to collect)
                self.handles.append(m.register_forward_hook(self._forward))
            # The tied output projection logits = y Eᵀ (``project`` of the Transformer, or of the
            # pipeline's embedding layer on the last stage) is no module of its own.
            if callable(getattr(m, "project", None)) and hasattr(m, "embed"):
                self._patch(m, "project", lambda y, m=m: self._projection_forward(m.embed.weight, y))

    def _patch(self, obj, name, fn):
        setattr(obj, name, fn)  # an instance attribute shadows the class's method until ``close``
        self.patched.append((obj, name))

    def close(self):
        for h in self.handles:
            h.remove()
        for obj, name in self.patched:
            delattr(obj, name)

    # ------------------------------------------------------------------------------- forward
    def _linear_forward(self, m, x):
        if not torch.is_grad_enabled():
            return F.linear(x, m.weight, m.bias)
        micro = self.c.micro
        for p in (m.weight, m.bias):
            if p is not None:
                micro.uses[p] += 1
        return _TappedLinear.apply(x, m.weight, m.bias, self, m, micro)

    def _projection_forward(self, w, y):
        if not torch.is_grad_enabled():
            return F.linear(y, w)
        micro = self.c.micro
        micro.uses[w] += 1
        return _TappedLinear.apply(y, w, None, self, None, micro)

    def _forward(self, m, inputs, output):
        if not torch.is_grad_enabled():
            return
        x, micro = inputs[0].detach(), self.c.micro
        for p in (m.weight, getattr(m, "bias", None)):
            if p is not None:
                micro.uses[p] += 1
        output.register_hook(lambda g, m=m, x=x, micro=micro: self._backward(m, x, g, micro))

    # ------------------------------------------------------------------------------ backward
    def linear(self, m, weight, x, g, micro):
        """Called by ``_TappedLinear.backward``: ``m`` the Linear (None: the tied projection, whose
        weight is the embedding's)."""
        w = weight if m is None else m.weight
        if self._direct(w):
            def gemm(dst, a, b, acc):
                gk, xk = _tokens(g, a, b), _tokens(x, a, b)
                if acc:
                    dst.addmm_(gk.T, xk)
                else:
                    torch.mm(gk.T, xk, out=dst)
            self._emit_direct(w, weight.shape, gemm, micro)
        else:
            self._emit(w, self._grouped(w, g, x, micro), micro)
        if m is not None and m.bias is not None:
            self._emit_rule(m.bias, lambda a, b: _token_sum(g[a:b]), micro)

    def _backward(self, m, x, g, micro):
        if isinstance(m, nn.LayerNorm):
            xhat = F.layer_norm(x.float(), m.normalized_shape, eps=m.eps)
            if m.weight is not None:
                self._emit_rule(m.weight, lambda a, b: _token_sum(g[a:b] * xhat[a:b]), micro)
            if m.bias is not None:
                self._emit_rule(m.bias, lambda a, b: _token_sum(g[a:b]), micro)
            return
        # nn.Embedding: row-wise scatter of δ at the token ids (none for the padding row)
        V, d = m.num_embeddings, m.embedding_dim

        def ids_and_rows(a, b):
            ids, gs = x[a:b].reshape(-1), g[a:b].reshape(-1, d).float()
            if m.padding_idx is not None:  # masked rather than dropped: no host sync on GPUs
                gs = gs.masked_fill((ids == m.padding_idx)[:, None], 0.0)
            return ids, gs

        if self._direct(m.weight):
            def scatter(dst, a, b, acc):
                if not acc:
                    dst.zero_()
                dst.index_add_(0, *ids_and_rows(a, b))
            self._emit_direct(m.weight, (V, d), scatter, micro)
        else:
            self._emit(m.weight, self._per_language(
                m.weight, lambda dst, a, b: dst.view(V, d).zero_().index_add_(0, *ids_and_rows(a, b)), micro), micro)

    def _emit_rule(self, p, one, micro):
        """Emit ``one(a, b)``, the (small) gradient of ``p`` from batch rows a..b of one language."""
        if self._direct(p):
            self._emit_direct(p, (self.c.numel_of(p),), lambda dst, a, b, acc: (dst.add_ if acc else dst.copy_)(one(a, b)),
                              micro)
        else:
            self._emit(p, self._per_language(p, lambda dst, a, b: dst.copy_(one(a, b).reshape(-1)), micro), micro)

    # One rank: every language's gradient goes straight into its row of the slices (the whole parameter
    # is this rank's one fragment), written by the step's first contribution and added by later ones: no
    # per-language temporaries, no copies.
    def _direct(self, p) -> bool:
        return self.c.direct_segment(p) is not None

    def _emit_direct(self, p, shape, write, micro):
        """``write(dst, a, b, accumulate)`` puts language rows a..b's gradient of ``p`` into ``dst`` (a
        view of shape ``shape`` of its slice row), over it or added to it."""
        s, slices = self.c.direct_segment(p), self.c.slices
        write = self.c.timed("split", write)
        first = p not in self.c.started
        micro.uses[p] -= 1
        seen = set()
        for r, a, b in micro.segs:
            write(slices[r, s.start:s.start + s.numel].view(shape), a, b, not first)
            seen.add(r)
        if first:
            for r in set(range(self.c.num_rows)) - seen:  # languages absent from this micro-batch
                slices[r, s.start:s.start + s.numel] = 0
            self.c.started.add(p)

    # Each rule below gives ``_emit`` grads(rows) -> fp32 [len(rows), numel]: the parameter's gradients
    # for the languages of slice rows ``rows`` (all in this micro-batch, ascending), so that big
    # parameters are computed a chunk of languages at a time and only the languages a rank holds.
    # grads(rows, out) writes into ``out`` (a flat buffer of len(rows) × numel, reused across
    # parameters so that big temporaries are not allocated, and page-faulted, per parameter) when given.
    def _per_language(self, p, write, micro):
        """grads(rows, out) from ``write(dst, a, b)``, which puts the gradient of ``p`` from batch rows a..b
        (one language) into the flat ``dst``."""
        bounds, numel = {r: (a, b) for r, a, b in micro.segs}, self.c.numel_of(p)

        def grads(rows, out=None):
            dst = (out if out is not None else torch.empty(len(rows) * numel, device=self.c.partition.device))
            dst = dst.view(len(rows), numel)
            for i, r in enumerate(rows):
                write(dst[i], *bounds[r])
            return dst
        return grads

    def _grouped(self, w, g, x, micro):
        """grads(rows, out) of a linear map's weight ``w`` (δ ``g``, input ``x``): with ``out``, one GEMM
        per language into it; without, one grouped GEMM over the languages' adjacent token ranges."""
        bounds, numel = {r: (a, b) for r, a, b in micro.segs}, self.c.numel_of(w)

        def grads(rows, out=None):
            if not rows:
                return torch.zeros(0, numel, device=self.c.partition.device)
            if out is None:  # GPUs: one grouped GEMM (its output comes from the caching allocator)
                return _grouped_outer(g, x, [bounds[r] for r in rows]).reshape(len(rows), numel)
            dst = out.view(len(rows), g.shape[-1], x.shape[-1])
            for i, r in enumerate(rows):
                torch.mm(_tokens(g, *bounds[r]).T, _tokens(x, *bounds[r]), out=dst[i])
            return dst.view(len(rows), numel)
        return grads

    def _emit(self, p, grads, micro):
        """One contribution of this micro-batch to parameter ``p``'s per-language gradients. While the
        P languages' gradients of ``p`` fit ``BUDGET`` elements, contributions are summed and reduced once
        after the last (the tied embedding has three: two embeddings and the output projection); a bigger
        parameter is computed and reduced a chunk of languages at a time, once per contribution, so the
        transient memory stays ``BUDGET`` elements. Every rank decides alike (P and numel are global)."""
        P, numel = self.c.num_rows, self.c.numel_of(p)
        micro.uses[p] -= 1
        first = p not in self.c.started  # the step's first reduction into p's columns overwrites them
        mine = [r for r, _, _ in micro.segs]
        grads = self.c.timed("split", grads)
        if P * numel <= BUDGET:
            prev = micro.acc.pop(p, None)
            if prev is None and micro.uses[p] == 0:  # the only contribution: straight to the workspace
                total = grads(mine, self.c.workspace(len(mine) * numel))
            else:
                total = grads(mine) if prev is None else prev.add_(grads(mine))
            if micro.uses[p] == 0:
                self.c.reduce_into_slices(p, total, 0, P, first, micro.held)
                self.c.started.add(p)
            else:
                micro.acc[p] = total
            return
        chunk = max(1, BUDGET // numel)
        for r0 in range(0, P, chunk):
            r1 = min(P, r0 + chunk)
            rows = [r for r in mine if r0 <= r < r1]
            self.c.reduce_into_slices(p, grads(rows, self.c.workspace(len(rows) * numel)), r0, r1 - r0, first,
                                      micro.held)
        self.c.started.add(p)


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
        self._params = [(p, k) for k, p in enumerate(params)]
        self._index = {id(p): k for k, p in enumerate(params)}
        self._segments = defaultdict(list)
        for s in self.partition.segments:
            self._segments[s.param].append(s)
        group = self.partition.dp_group()
        self._group = group
        self._dp = dist.get_world_size(group) if dist.is_initialized() else 1
        self._me = dist.get_rank(group) if dist.is_initialized() else 0
        # Every rank's fragments of every parameter (offset inside the parameter, numel), in each rank's
        # segment order: where the all-to-all sends which columns. Exchanged once.
        mine = [(s.param, s.offset, s.numel) for s in self.partition.segments]
        every = [mine]
        if self._dp > 1:
            every = [None] * self._dp
            dist.all_gather_object(every, mine, group=group)
        self._frags = defaultdict(lambda: [[] for _ in range(self._dp)])
        for r, frags in enumerate(every):
            for p, off, n in frags:
                self._frags[p][r].append((off, n))
        self.bytes_sent = 0
        """Bytes this rank has sent to other ranks in the per-language reduction (for benchmarks)."""
        self._buffers: dict[str, torch.Tensor | None] = {}
        self.seconds = defaultdict(float)
        """Wall seconds spent splitting weight gradients by language ("split", inside the backward) and
        reducing them ("reduce"), summed over steps (for benchmarks; CPU time on GPUs, kernels are async)."""

    # Called by _Taps during the backward.
    def direct_segment(self, p):
        """The segment of ``p`` when this single rank holds all of it in one piece (``_Taps`` then
        writes its per-language gradients straight into the slices), else None."""
        if self._dp != 1:
            return None
        segs = self._segments.get(self._index[id(p)], ())
        if len(segs) == 1 and segs[0].offset == 0 and segs[0].numel == self.numel_of(p):
            return segs[0]
        return None

    def numel_of(self, p) -> int:
        return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 parameters are partitioned: ds_numel is the full size

    def buffer(self, name: str, n: int) -> torch.Tensor:
        """A flat fp32 buffer of ``n`` elements that lives across parameters and steps (grown when
        needed): the per-language temporaries of one parameter and the all-to-all's send and receive
        copies, at most ``BUDGET`` (or one parameter's) elements each."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n:
            self._buffers[name] = None  # free the old one first
            buf = self._buffers[name] = torch.empty(max(n, 1), dtype=torch.float32, device=self.partition.device)
        return buf[:n]

    def workspace(self, n: int) -> torch.Tensor | None:
        """Where one parameter's per-language gradients are computed on CPUs, where a fresh allocation of
        this size is page-faulted in on every use; None on GPUs (the caching allocator reuses memory)."""
        return self.buffer("work", n) if self.partition.device.type == "cpu" else None

    def timed(self, phase: str, fn):
        """``fn`` whose wall time is added to ``self.seconds[phase]`` (benchmarks' phase split)."""
        def run(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[phase] += time.perf_counter() - t0
        return run

    def reduce_into_slices(self, p, grads: torch.Tensor, row0: int, n: int, first: bool, held: list) -> None:
        self.timed("reduce", self._reduce_into_slices)(p, grads, row0, n, first, held)

    def _reduce_into_slices(self, p, grads: torch.Tensor, row0: int, n: int, first: bool, held: list) -> None:
        """grads [m, numel]: this rank's gradients of ``p`` for the m languages it holds among slice rows
        row0..row0+n (``held``: per rank, the rows it holds in the micro-batch) -> this rank's fragments
        of their data-parallel average, added into those rows of the slices (``first``: the step's first
        reduction into p's columns, which are zeroed first unless the slices were).

        One all-to-all: each rank sends every other rank that rank's fragment columns of the rows of the
        languages it HOLDS in this micro-batch, and adds what it receives into its own fragments. Bytes
        per rank: (languages held) × numel × (N−1)/N × 4, i.e. one reduce-scatter per language held (an
        all-reduce of all rows would move twice that for every language of the step); under
        language-affine dealing a rank holds one language or few."""
        k = self._index[id(p)]
        segs = self._segments.get(k, ())
        held = [[r for r in rows if row0 <= r < row0 + n] for rows in held]  # slice rows, per rank
        if self._dp == 1:
            for s in segs:
                if first:
                    self.slices[row0:row0 + n, s.start:s.start + s.numel] = 0
                self.slices[held[0], s.start:s.start + s.numel] += grads[:, s.offset:s.offset + s.numel]
            return
        mine, me = held[self._me], self._me
        assert grads.shape[0] == len(mine), (grads.shape, len(mine))
        # The all-to-all carries what goes to OTHER ranks; this rank's own fragment columns of its own
        # rows are added straight from ``grads`` (no copies through the send and receive buffers).
        in_splits = [0 if d == me else len(mine) * sum(numel for _, numel in frags)
                     for d, frags in enumerate(self._frags[k])]
        send, pos = self.buffer("send", sum(in_splits)), 0
        for d, frags in enumerate(self._frags[k]):
            if d == me or not in_splits[d]:
                continue
            block, col = send[pos:pos + in_splits[d]].view(len(mine), -1), 0  # [rows, the rank's fragment columns]
            for off, numel in frags:
                block[:, col:col + numel] = grads[:, off:off + numel]
                col += numel
            pos += in_splits[d]
        width = sum(numel for _, numel in self._frags[k][me])
        out_splits = [0 if d == me else len(rows) * width for d, rows in enumerate(held)]
        recv = self.buffer("recv", sum(out_splits))
        dist.all_to_all_single(recv, send, out_splits, in_splits, group=self._group)
        self.bytes_sent += sum(in_splits) * send.element_size()
        scale, pos = 1.0 / self._dp, 0  # DeepSpeed averages over ranks
        for d, (rows, size) in enumerate(zip(held, out_splits)):
            if not rows:
                continue
            index = torch.tensor(rows, device=grads.device)
            if d == me:
                for s in segs:  # in place on the column view: one pass
                    self.slices[:, s.start:s.start + s.numel].index_add_(
                        0, index, grads[:, s.offset:s.offset + s.numel], alpha=scale)
                continue
            block, col = recv[pos:pos + size].view(len(rows), width), 0
            pos += size
            for s in segs:
                self.slices[:, s.start:s.start + s.numel].index_add_(0, index, block[:, col:col + s.numel], alpha=scale)
                col += s.numel

    def _begin(self, batches: list) -> tuple[list[_Micro], torch.Tensor, torch.Tensor]:
        """The step's layout: one ``_Micro`` per micro-batch, the languages present on any rank (the
        slice rows, in language order) and the presence mask; the slices are made ready."""
        self._check_batches(batches)
        K = self.num_langs
        # Which languages every rank holds in every micro-batch (one small all-gather per step): the
        # languages present, and who sends which rows in the all-to-alls.
        held = torch.zeros(len(batches), K, dtype=torch.uint8)
        for m, batch in enumerate(batches):
            held[m, [k for k, (a, b) in batch.segments.items() if b > a]] = 1
        every = [held]
        if self._dp > 1:  # on the device: NCCL has no CPU tensors
            held = held.to(self.partition.device)
            every = [torch.empty_like(held) for _ in range(self._dp)]
            dist.all_gather(every, held, group=self._group)
        every = torch.stack(every).cpu()  # [ranks, micro-batches, K]
        present = every.amax((0, 1)) > 0
        langs_all = torch.nonzero(present).flatten()
        rows = {int(k): r for r, k in enumerate(langs_all.tolist())}
        self.num_rows = len(rows)
        # On one rank every reduction writes all rows of its parameter's columns, the first of the step
        # overwriting: no need to zero P × (model size) first (padding columns are never written: zero).
        self.slices = self._zeroed_rows(len(rows)) if self._dp > 1 else self._rows(len(rows))
        self.started = set()
        micros = [_Micro(_segment_rows(b.segments, rows),
                         [[rows[int(k)] for k in torch.nonzero(every[r, m]).flatten().tolist()] for r in range(self._dp)])
                  for m, b in enumerate(batches)]
        return micros, langs_all, present

    def _finish(self, micros: list[_Micro]) -> None:
        assert all(m.done() for m in micros), "a tapped parameter got no gradient"
        for p, k in self._params:
            if p not in self.started:  # no gradient this step (an unused parameter): its columns are zero
                for s in self._segments.get(k, ()):
                    self.slices[:, s.start:s.start + s.numel] = 0

    def collect(self, batches: list) -> LanguageGrads:
        K, part, engine = self.num_langs, self.partition, self.engine
        micros, langs_all, present = self._begin(batches)
        tally = LossTally(K, device=part.device)
        taps = _Taps(engine.module, self)
        try:
            for m, batch in enumerate(batches):
                self.micro = micros[m]
                part.force_boundary()
                loss_k, nll_k, ntok_k = forward_losses(engine, batch, K, self.pad_id, self.label_smoothing)
                engine.backward(loss_k.sum())
                part.zero_()
                if m < len(batches) - 1:
                    engine.set_gradient_accumulation_boundary(False)
                    engine.step()  # not a boundary: only the micro-step counter moves
                tally.add(loss_k, nll_k, ntok_k, batch.ntokens)
        finally:
            taps.close()
        self._finish(micros)
        return LanguageGrads(self.slices, langs_all, present, tally)


class PipelineOneBackwardCollector(OneBackwardCollector):
    """The one-backward collector inside pipeline stages: DeepSpeed's 1F1B schedule runs over the plain
    micro-batches (not one per language, as ``PipelineCollector`` does) and each stage's taps split its
    weight gradients by language. Each stage's forward of micro-batch i (counted by a forward pre-hook;
    every stage runs them in order) takes micro-batch i's language layout; the reductions go into the
    pipeline partition's fragments (1/dp of each parameter) inside the backward, every data-parallel
    rank of a stage reducing the same parameters in the same order. The tied embedding's fragments
    are then summed over its two stages (``reduce_rows``)."""

    def __init__(self, engine, num_langs: int, partition: GradPartition | None = None):
        from megavac.model.pipeline import PipelineRunner

        runner = PipelineRunner(engine)
        super().__init__(engine, num_langs, runner.loss.pad_id, runner.loss.smoothing, partition)
        self.runner = runner

    def collect(self, batches: list) -> LanguageGrads:
        from megavac.model.pipeline import pipeline_items

        part, loss = self.partition, self.runner.loss
        micros, langs_all, present = self._begin(batches)
        forwards = iter(micros)

        def next_micro(*_):
            self.micro = next(forwards)

        hook = self.engine.module.register_forward_pre_hook(next_micro)
        taps = _Taps(self.engine.module, self)
        try:
            loss.begin(None)
            part.zero_()
            part.run_backward_schedule(pipeline_items(batches), lambda i: part.zero_())
        finally:
            taps.close()
            hook.remove()
        self._finish(micros)
        part.reduce_rows(self.slices)
        return LanguageGrads(self.slices, langs_all, present, loss.tally)
