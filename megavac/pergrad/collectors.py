"""Collectors: this rank's slice of every language's reduced gradient for one optimizer step
(docs/design.md §3).

``KBackwardCollector`` (the reference): one forward per micro-batch, one backward per language present.
``PipelineCollector``: each language's rows of a micro-batch as one pipeline micro-batch (one forward and
backward per sentence). Both hand a ``LanguageGrads`` to the Gram step (megavac.pergrad.gram_step) and
take no part in the update.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megavac.loss import LossTally, forward_losses
from megavac.model.groups import model_param_names
from megavac.pergrad.ds_adapter import GradPartition, grad_partition

# Columns per fp32 Gram product: each chunk's K×K product is an fp32 GEMM (fp64 GEMMs run at a fraction of
# the rate, on GPUs ~1/15) and the chunk sums are accumulated in fp64, so no fp32 sum runs over more than
# 2^16 terms (relative error ~1e-7 for gradients of one sign, far below the tests' 1e-5).
GRAM_CHUNK = 1 << 16


@dataclass
class LanguageGrads:
    """What a collector hands over for one optimizer step (all of this rank's)."""

    slices: torch.Tensor
    """fp32 [P, N]: this rank's slice of the reduced gradient (÷ ga as DeepSpeed scales) of each of the
    P languages present in the step, in the order of ``langs``; absent languages take no memory."""
    langs: torch.Tensor
    """long [P]: the language index of each row of ``slices`` (ascending)."""
    present: torch.Tensor
    """bool [K]: language present in the step's global batch (any rank, any micro-batch)."""
    tally: LossTally
    """This rank's per-language losses and tokens of the step (on the device; zero off the last stage)."""


class GradCollector:
    """Interface: "this rank's slice of each language's reduced gradient, and the local slice Grams".

    ``collect`` runs the forward and backward passes of one optimizer step (``ga`` micro-batches) and
    leaves the partition zeroed; ``param_grams`` gives the local Gram of every parameter tensor.
    A one-backward collector (per-language weight-gradient GEMMs, docs/design.md §3.2) fits the same shape.
    """

    partition: GradPartition
    num_langs: int

    def __init__(self, engine, num_langs: int, partition: GradPartition | None = None):
        self.engine = engine
        self.partition = partition or grad_partition(engine, *model_param_names(engine.module))
        self.num_langs = num_langs
        self.ga = int(engine.gradient_accumulation_steps())
        self._buffer: torch.Tensor | None = None

    def _rows(self, n: int) -> torch.Tensor:
        """fp32 [n, numel] for n present languages, reusing one buffer that grows to the most seen; the
        padding elements (outside every segment) are zero, the rest holds the last step's values."""
        if self._buffer is None or self._buffer.shape[0] < n:
            self._buffer = None  # free the old one first
            self._buffer = torch.zeros(n, self.partition.numel, dtype=torch.float32, device=self.partition.device)
        return self._buffer[:n]

    def _zeroed_rows(self, n: int) -> torch.Tensor:
        """``_rows(n)``, zeroed."""
        return self._rows(n).zero_()

    def _check_batches(self, batches: list) -> None:
        if len(batches) != self.ga:
            raise ValueError(f"got {len(batches)} micro-batches for gradient_accumulation_steps={self.ga}")

    def collect(self, batches: list) -> LanguageGrads:
        raise NotImplementedError

    def param_grams(self, slices: torch.Tensor) -> torch.Tensor:
        """float64 [P, K, K]: Σ over this rank's elements of parameter p of g_i[e] g_j[e] (fp32 products
        of GRAM_CHUNK columns, summed in fp64)."""
        P, K = len(self.partition.param_names), slices.shape[0]
        out = torch.zeros(P, K, K, dtype=torch.float64, device=slices.device)
        for s in self.partition.gram_segments:
            for a in range(s.start, s.start + s.numel, GRAM_CHUNK):
                x = slices[:, a:min(a + GRAM_CHUNK, s.start + s.numel)]
                out[s.param] += (x @ x.T).double()
        return out


class KBackwardCollector(GradCollector):
    """One forward per micro-batch, then one backward per language present in it (docs/design.md §3.1).

    For each language k: force an accumulation boundary (every backward then reduces into the
    partition), ``engine.backward(loss_k)``, add the slice to row k, zero the slice. The losses are
    divided by ``ga`` exactly as the plain path does (``scale_wrt_gas``), so row k ends as DeepSpeed's
    own accumulated gradient of language k.

    Every rank must issue the same backward passes in the same order (each is a collective under
    ZeRO), so the loop runs over the languages present on ANY rank (one small all-reduce per
    micro-batch); a rank that lacks language k back-propagates its zero share, which costs a backward
    but keeps the ranks' reductions paired. ``engine.step()`` is called after each non-final
    micro-batch with the boundary off (it only advances DeepSpeed's micro-step counter), so that the
    plain path's managed boundaries stay in phase.
    """

    def __init__(self, engine, num_langs: int, pad_id: int, label_smoothing: float,
                 partition: GradPartition | None = None):
        super().__init__(engine, num_langs, partition)
        self.pad_id, self.label_smoothing = pad_id, label_smoothing

    def collect(self, batches: list) -> LanguageGrads:
        self._check_batches(batches)
        K, part, engine = self.num_langs, self.partition, self.engine
        dev = part.device
        # Which languages each micro-batch has on ANY rank: one small all-reduce for the whole step.
        here = torch.zeros(len(batches), K, dtype=torch.float32, device=dev)
        for m, batch in enumerate(batches):
            here[m, list(batch.segments)] = 1.0
        group = part.dp_group()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(here, group=group)
        here = here.cpu() > 0
        present = here.any(0)
        langs_all = torch.nonzero(present).flatten()
        row = {int(k): r for r, k in enumerate(langs_all.tolist())}
        # One row per PRESENT language (a CATS batch has 8 of 100): the buffer grows to the most seen.
        slices = self._zeroed_rows(len(row))
        tally = LossTally(K, device=dev)
        for m, batch in enumerate(batches):
            langs = torch.nonzero(here[m]).flatten().tolist()
            loss_k, nll_k, ntok_k = forward_losses(engine, batch, K, self.pad_id, self.label_smoothing)
            snapshot = None
            for i, k in enumerate(langs):
                part.force_boundary()
                if i == 0:
                    snapshot = part.snapshot_backward_hooks()
                else:
                    part.rearm_backward_hooks(snapshot)
                engine.backward(loss_k[k], retain_graph=i < len(langs) - 1)
                part.read(slices[row[k]], accumulate=True)
                part.zero_()
            if m < len(batches) - 1:
                engine.set_gradient_accumulation_boundary(False)
                engine.step()  # not a boundary: no update, only the micro-step counter moves
            tally.add(loss_k, nll_k, ntok_k, batch.ntokens)
        return LanguageGrads(slices, langs_all, present, tally)


class PipelineCollector(GradCollector):
    """Per-language gradients on a pipeline engine, for the FLOPs of one plain step.

    A Transformer treats sentences independently, so language k's share of the batch loss is the loss
    of the batch's language-k rows alone (divided by the whole batch's tokens). Each (micro-batch,
    language) becomes one pipeline micro-batch: one forward and one backward per sentence, as in plain
    training, and more micro-batches only shrink the pipeline bubble. After each backward a stage
    reduces its parameters' local gradient into its fragments of the data-parallel average (one
    all-to-all, the bytes of a reduce-scatter), adds them to row k and zeroes the gradient
    (``run_backward_schedule``); then ``reduce_rows`` sums the tied embedding over its two stages: each
    row is this rank's share of DeepSpeed's reduced gradient of language k for the stage's parameters.
    Grams count each element once over all ranks (``gram_segments``) and are summed over data-parallel
    AND pipeline ranks.

    Memory: one fp32 row per present language of 1/dp of the stage's parameters (1/(stages × dp) of the
    model), as under ZeRO.
    """

    def __init__(self, engine, num_langs: int, partition: GradPartition | None = None):
        from megavac.model.pipeline import PipelineRunner

        super().__init__(engine, num_langs, partition)
        self.runner = PipelineRunner(engine)

    def collect(self, batches: list) -> LanguageGrads:
        from megavac.model.pipeline import pipeline_items

        self._check_batches(batches)
        K, part = self.num_langs, self.partition
        here = torch.zeros(K, dtype=torch.float32)
        subs, order = [], []
        for batch in batches:
            for k in sorted(batch.segments):
                subs.append(batch.language_rows(k, self.runner.loss.pad_id))
                order.append(k)
                here[k] = 1.0
        if part.dp_size > 1:  # on the device: NCCL has no CPU tensors
            here = here.to(part.device)
            dist.all_reduce(here, group=part.dp_group())
        present = here.cpu() > 0
        langs_all = torch.nonzero(present).flatten()
        row = {int(k): r for r, k in enumerate(langs_all.tolist())}
        rows = self._zeroed_rows(len(row))

        # Capture i of every data-parallel rank of the stage is one all-to-all (each rank's i-th language
        # micro-batch); ranks with fewer micro-batches join the remaining ones with nothing to send.
        mine = [row[k] for k in order]
        every = [mine]
        if part.dp_size > 1:
            every = [None] * part.dp_size
            dist.all_gather_object(every, mine, group=part.dp_group())

        def capture(i):
            part.reduce_into(rows, [o[i] if i < len(o) else None for o in every])
            part.zero_()

        loss = self.runner.loss
        loss.begin(None)
        part.zero_()
        part.run_backward_schedule(pipeline_items(subs), capture)
        for i in range(len(mine), max(map(len, every))):
            capture(i)
        part.reduce_rows(rows)
        return LanguageGrads(rows, langs_all, present, loss.tally)


COLLECTORS = ("one_backward", "k_backward")


def default_collector(engine, num_langs: int, pad_id: int, label_smoothing: float,
                      kind: str = "one_backward") -> GradCollector:
    """The collector for ``engine``: ``kind`` one_backward (per-language weight gradients split out of
    one backward per micro-batch) or k_backward (the reference: one backward per language; under
    pipeline parallelism, one pipeline micro-batch per language)."""
    from megavac.pergrad.ds_adapter import is_pipeline_engine

    if kind not in COLLECTORS:
        raise ValueError(f"collector must be one of {COLLECTORS}, got {kind!r}")
    pipeline = is_pipeline_engine(engine)
    if kind == "one_backward":
        from megavac.pergrad.one_backward import OneBackwardCollector, PipelineOneBackwardCollector

        if pipeline:
            return PipelineOneBackwardCollector(engine, num_langs)
        return OneBackwardCollector(engine, num_langs, pad_id, label_smoothing)
    if pipeline:
        return PipelineCollector(engine, num_langs)
    return KBackwardCollector(engine, num_langs, pad_id, label_smoothing)
