"""The one module that touches DeepSpeed's private internals (pinned to deepspeed 0.19.8).

What the per-language step needs from DeepSpeed, and nothing more (docs/design.md §3–4):

* read this rank's slice of the REDUCED gradient, right after a backward at an accumulation boundary,
  as one flat fp32 vector of the rank's local elements;
* zero that slice, so the next backward yields the next language's gradient alone;
* write a new value into it, which ``engine.step()`` then takes as the gradient (norm, clipping, the
  fp16 overflow check and the optimizer all read it there);
* the map from local elements to model parameters (``segments``), built once.

Where the slice lives, per configuration:

==========================  =======================================================================
ZeRO-1/2, fp32 (or bf16/    ``optimizer.averaged_gradients[i]``: a list of tensors whose concatenation
fp16 without fp32 accum)    is DeepSpeed param group i's flat partition (padding pieces included);
                            rebuilt after every boundary backward, so it is looked up on every access.
ZeRO-2, bf16/fp16 +         ``averaged_gradients[i].flat_partition``: a compact fp32 buffer, exact.
grad_accum_dtype fp32
ZeRO-3                      ``optimizer.grad_partitions_flat_buffer``: every parameter's partition,
                            in the order of ``fp16_groups``, ``partition_numel()`` elements each
                            (in the gradient-accumulation dtype: fp32 unless bf16/fp16 without
                            grad_accum_dtype fp32).
Pipeline engine (ZeRO-0/1)  each stage's ``param.grad`` (full local gradients of its parameters): the
                            engine reduces them only in its ReduceGrads instruction, which
                            ``run_backward_schedule`` leaves out of the 1F1B schedule; ``step()`` then
                            runs ReduceGrads and OptimizerStep as ``train_batch`` would.
==========================  =======================================================================

ZeRO-3 also needs its backward-hook counters re-armed before each further backward through a retained
graph (``snapshot_backward_hooks`` / ``rearm_backward_hooks``); the engine's boundary override is reset
through ``engine._is_gradient_accumulation_boundary``. Every attribute is fetched through ``_attr``,
which names it in a ``DeepSpeedInternalsError`` when it moved.

Refused, with the reason, by ``per_language_refusals`` from the DeepSpeed config dict (the trainer
through ``grad_partition``, the dry run through megavac/train/dry_run.py): ZeRO stage 0 (no partition: plain
data-parallel gradients), CPU/NVMe optimizer offload (the reduced gradient is kept in host memory),
bf16 + ZeRO-1 + fp32 gradient accumulation (DeepSpeed silently switches to ``BF16_Optimizer``, whose
gradients are full and replicated rather than a partition), and, under pipeline parallelism,
ZeRO-1 with ``overlap_comm`` (it reduces inside the backward, before each language is read).

Pipeline modules: ``detach_tied_weight_broadcast`` re-wraps the tied weights of a ``PipelineModule``
(its ``tied_modules``, with DeepSpeed's ``ds_*`` marks) for megavac/model/pipeline.py.

Element layout. The local vector concatenates DeepSpeed's groups (ZeRO-1/2) in order; ``segments`` lists
(start, numel, parameter index) of every parameter fragment in it, in ``engine.module.named_parameters()``
order. Elements outside every segment are alignment padding: DeepSpeed keeps them zero and they take no
part in Grams.

fp16: the slice holds gradients × the current loss scale. ``loss_scale()`` returns it so that Grams
can be unscaled (methods such as CATS depend on the Gram's scale); the combined gradient is written back
in scaled units, as DeepSpeed expects. A non-finite slice is left to the caller (a non-finite Gram
makes the method skip) and then to DeepSpeed's own overflow check, which skips the step.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

DEEPSPEED_VERSION = "0.19.8"


class DeepSpeedInternalsError(RuntimeError):
    """A DeepSpeed internal this module relies on is missing or changed (new DeepSpeed version?)."""


@dataclass(frozen=True)
class Segment:
    start: int
    """First element in the local flat vector."""
    numel: int
    """Number of elements (this rank's fragment of the parameter)."""
    param: int
    """Index of the parameter in ``engine.module.named_parameters()`` order."""
    offset: int
    """Position of the fragment's first element inside the flattened parameter."""


def check_version() -> None:
    import deepspeed

    if deepspeed.__version__ != DEEPSPEED_VERSION:
        raise DeepSpeedInternalsError(
            f"megavac.pergrad.ds_adapter is written against deepspeed {DEEPSPEED_VERSION}, found {deepspeed.__version__}: "
            "its ZeRO internals (averaged_gradients, grad_partitions_flat_buffer, _hp_mapping) must be re-checked "
            "(tests/test_ds_adapter.py) before the pin is moved")


def _attr(obj, name: str, where: str):
    """getattr that names the internal when DeepSpeed moved it."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise DeepSpeedInternalsError(
            f"deepspeed {DEEPSPEED_VERSION} internal {type(obj).__name__}.{name} ({where}) is missing") from None


class GradPartition:
    """This rank's slice of the reduced gradient of a DeepSpeed ZeRO engine (see module docstring)."""

    stage: int
    numel: int
    """Local elements (padding included)."""
    segments: list[Segment]
    param_names: list[str]
    storage_dtype: torch.dtype
    """dtype DeepSpeed keeps the slice in; reads are exact copies when it is float32."""

    def __init__(self, engine, names: list[str] | None = None, all_names: list[str] | None = None):
        """``names``: the model's names of ``engine.module.named_parameters()`` (default: those names);
        ``all_names``: every parameter of the whole model, other pipeline stages' too (default: ``names``).
        The caller owns the naming (megavac.model.groups.model_param_names); this module only counts elements."""
        self.engine = engine
        self.optimizer = engine.optimizer
        own = [n for n, _ in engine.module.named_parameters()]
        if names is not None and len(names) != len(own):
            raise ValueError(f"{len(names)} parameter names for {len(own)} parameters of engine.module")
        self.param_names = own if names is None else list(names)
        self.all_param_names = self.param_names if all_names is None else list(all_names)
        self._index = {id(p): k for k, (_, p) in enumerate(engine.module.named_parameters())}

    # ------------------------------------------------------------------ access (subclasses)
    def _pieces(self) -> list[tuple[int, torch.Tensor]]:
        """(offset in the local vector, DeepSpeed tensor) covering all local elements."""
        raise NotImplementedError

    def read(self, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
        """Copy (or add, ``accumulate``) the slice into ``out`` (fp32 [numel]); returns ``out``."""
        if out is None:
            out = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        assert out.shape == (self.numel,) and out.dtype == torch.float32, (out.shape, out.dtype)
        for off, t in self._pieces():
            dst = out[off:off + t.numel()].view(t.shape)
            if accumulate:
                dst.add_(t)
            else:
                dst.copy_(t)
        return out

    def zero_(self) -> None:
        for _, t in self._pieces():
            t.zero_()

    def write(self, flat: torch.Tensor) -> None:
        """Overwrite the slice with ``flat`` ([numel], any float dtype; cast to DeepSpeed's)."""
        assert flat.shape == (self.numel,), (flat.shape, self.numel)
        for off, t in self._pieces():
            t.copy_(flat[off:off + t.numel()].view(t.shape))

    @property
    def device(self) -> torch.device:
        return torch.device(self.engine.device)

    # ------------------------------------------------------------------ engine state
    def loss_scale(self) -> float:
        """Current fp16 loss scale (1 for fp32/bf16): the slice holds gradients × this."""
        if not self.engine.fp16_enabled():
            return 1.0
        return float(_attr(self.optimizer, "loss_scale", "fp16 loss scale"))

    def force_boundary(self) -> None:
        """Make the next backward(s) a gradient-accumulation boundary: every backward then reduces
        (ZeRO-1 otherwise reduces only at the boundary) and fills the partition we read."""
        self.engine.set_gradient_accumulation_boundary(True)

    def release_boundary(self) -> None:
        """Give the boundary back to DeepSpeed's micro-step counter (the plain training path)."""
        # The public setter takes a bool, which would pin the boundary for good; None is the engine's
        # initial "not overridden" state, in which (micro_steps + 1) % ga decides again.
        _attr(self.engine, "_is_gradient_accumulation_boundary", "engine boundary override")
        self.engine._is_gradient_accumulation_boundary = None
        if hasattr(self.optimizer, "set_gradient_accumulation_boundary"):  # its mirror of the engine's flag
            self.optimizer.set_gradient_accumulation_boundary(self.engine.is_gradient_accumulation_boundary())

    def dp_group(self):
        """The data-parallel process group the gradient is partitioned (and reduced) over."""
        return _attr(self.optimizer, "dp_process_group", "data-parallel group of the partition")

    def gram_group(self):
        """The group over which the local Grams of ``gram_segments`` add up to the full Gram (the
        data-parallel group under ZeRO; every rank under pipeline parallelism)."""
        return self.dp_group()

    @property
    def gram_segments(self) -> list[Segment]:
        """The local elements this rank counts in the Grams (each model element on exactly one rank of
        ``gram_group``). Under ZeRO the partition itself."""
        return self.segments

    def step(self) -> None:
        """Hand the gradient now in the partition to DeepSpeed: norm, clipping, overflow check, update."""
        self.force_boundary()
        self.engine.step()

    def snapshot_backward_hooks(self):
        """State to re-arm before a further backward through the same forward graph (None: nothing)."""
        return None

    def rearm_backward_hooks(self, snapshot) -> None:
        """Make the next backward through a retained graph behave as the first one did."""

    def segment_param_index(self) -> torch.Tensor:
        """long [numel]: parameter index of every local element, −1 for padding (for tests/analysis)."""
        idx = torch.full((self.numel,), -1, dtype=torch.long)
        for s in self.segments:
            idx[s.start:s.start + s.numel] = s.param
        return idx

    def _check_segments(self):
        prev = 0
        for s in self.segments:
            assert s.start >= prev and s.numel > 0 and s.start + s.numel <= self.numel, (s, prev, self.numel)
            prev = s.start + s.numel


class _Zero12Partition(GradPartition):
    """ZeRO-1/2 (stage_1_and_2.py)."""

    def __init__(self, engine, names: list[str] | None = None, all_names: list[str] | None = None):
        super().__init__(engine, names, all_names)
        opt = self.optimizer
        where = "stage_1_and_2.DeepSpeedZeroOptimizer"
        self.stage = int(engine.zero_optimization_stage())
        self.bit16_groups = _attr(opt, "bit16_groups", where)
        self.partition_size = [int(s) for s in _attr(opt, "partition_size", where)]
        _attr(opt, "averaged_gradients", where)
        _attr(opt, "_use_compact_grad_partition_buffer", where)
        self.group_offset = [0, *itertools.accumulate(self.partition_size)][:-1]
        self.numel = sum(self.partition_size)
        dtype = _attr(opt, "gradient_accumulation_dtype", where)
        compact = [bool(opt._use_compact_grad_partition_buffer(i)) for i in range(len(self.bit16_groups))]
        self.storage_dtype = torch.float32 if all(compact) else dtype
        segments = []
        for i, group in enumerate(self.bit16_groups):
            for p in group:
                mapping = _attr(p, "_hp_mapping", "parameter's link to its fp32 partition fragment")
                if mapping is None:
                    continue  # no element of p in this rank's partition of group i
                addr = mapping.get_hp_fragment_address()
                if addr.numel == 0:
                    continue
                if id(p) not in self._index:
                    raise DeepSpeedInternalsError("a ZeRO parameter is not among engine.module.named_parameters()")
                lp = _attr(mapping, "lp_fragment_address", "fragment inside the parameter")
                assert int(lp.numel) == int(addr.numel), (lp.numel, addr.numel)
                segments.append(Segment(self.group_offset[i] + int(addr.start), int(addr.numel), self._index[id(p)],
                                        int(lp.start)))
        self.segments = sorted(segments, key=lambda s: s.start)
        self._check_segments()
        self._checked_layout = False

    def _pieces(self):
        ag = self.optimizer.averaged_gradients
        pieces, layout = [], []
        for i, size in enumerate(self.partition_size):
            grp = ag.get(i) if isinstance(ag, dict) else ag[i]
            if grp is None:
                raise DeepSpeedInternalsError(
                    f"averaged_gradients[{i}] is None: the partition is read outside a boundary backward, or "
                    "DeepSpeed no longer fills it in independent_gradient_partition_epilogue()")
            base = self.group_offset[i]
            flat = getattr(grp, "flat_partition", None)
            if flat is not None:  # compact fp32 buffer; the list items are views of it
                if flat.numel() != size:
                    raise DeepSpeedInternalsError(f"averaged_gradients[{i}].flat_partition has {flat.numel()} "
                                                  f"elements, partition_size[{i}] is {size}")
                pieces.append((base, flat.view(-1)))
                if not self._checked_layout:
                    layout += [(base + t.storage_offset() - flat.storage_offset(), t) for t in grp]
                continue
            off = base
            for t in grp:
                pieces.append((off, t))
                off += t.numel()
            if off - base != size:
                raise DeepSpeedInternalsError(
                    f"averaged_gradients[{i}] holds {off - base} elements, partition_size[{i}] is {size}: the "
                    "layout of the gradient partition changed")
            layout += pieces[len(pieces) - len(grp):]
        if not self._checked_layout:
            self._check_layout(layout)
        return pieces

    def _check_layout(self, layout):
        # The gradient pieces that are not alignment padding must be exactly the parameter fragments
        # _hp_mapping describes: otherwise Grams would be attributed to the wrong parameters.
        found = sorted((off, t.numel()) for off, t in layout if not getattr(t, "_zero_padding", False))
        expected = sorted((s.start, s.numel) for s in self.segments)
        if found != expected:
            raise DeepSpeedInternalsError(
                "averaged_gradients pieces do not match the parameter fragments of _hp_mapping "
                f"(first pieces {found[:3]}, expected {expected[:3]})")
        self._checked_layout = True


class _Zero3Partition(GradPartition):
    """ZeRO-3 (stage3.py): ``grad_partitions_flat_buffer`` holds every parameter's gradient partition."""

    def __init__(self, engine, names: list[str] | None = None, all_names: list[str] | None = None):
        super().__init__(engine, names, all_names)
        opt = self.optimizer
        where = "stage3.DeepSpeedZeroOptimizer_Stage3"
        self.stage = 3
        self.buffer = _attr(opt, "grad_partitions_flat_buffer", where)
        groups = _attr(opt, "fp16_groups", where)
        _attr(opt, "averaged_gradients", where)
        self.numel = self.buffer.numel()
        self.storage_dtype = self.buffer.dtype
        segments, off = [], 0
        self._offsets = []
        for p in itertools.chain.from_iterable(groups):
            pn = int(_attr(p, "partition_numel", "ZeRO-3 parameter")())
            rank = int(_attr(opt, "_get_param_partition_rank", where)(p))
            real = max(0, min(pn, int(p.ds_numel) - rank * pn))  # the last rank's partition ends in padding
            if id(p) not in self._index:
                raise DeepSpeedInternalsError("a ZeRO-3 parameter is not among engine.module.named_parameters()")
            self._offsets.append((p, off))
            if real > 0:
                segments.append(Segment(off, real, self._index[id(p)], rank * pn))
            off += pn
        if off != self.numel:
            raise DeepSpeedInternalsError(f"grad_partitions_flat_buffer has {self.numel} elements, the parameters' "
                                          f"partitions {off}: its layout changed")
        self.segments = segments
        self._check_segments()
        self._checked_layout = False

    # ZeRO-3 gathers a module's parameters before its backward only while the module's
    # ``applied_pre_backward_ref_cnt`` (one per forward) is positive, and releases them when
    # ``ds_grads_remaining`` drops to 0. A second backward through a retained graph would find the
    # counters spent and run on released (empty) parameters, so they are put back to their
    # after-forward values before every further backward.
    _HOOK_COUNTERS = ("applied_pre_backward_ref_cnt", "ds_grads_remaining")

    def snapshot_backward_hooks(self):
        snap = []
        for m in self.engine.module.modules():
            vals = tuple(m.__dict__.get(a) for a in self._HOOK_COUNTERS)
            if any(v is not None for v in vals):
                snap.append((m, vals))
        if not snap:
            raise DeepSpeedInternalsError(
                "no ZeRO-3 module carries applied_pre_backward_ref_cnt / ds_grads_remaining after the forward: "
                "parameter_offload.py's backward hooks changed")
        return snap

    def rearm_backward_hooks(self, snapshot) -> None:
        for m, vals in snapshot:
            for a, v in zip(self._HOOK_COUNTERS, vals):
                if v is not None:
                    setattr(m, a, v)

    def _pieces(self):
        buf = self.optimizer.grad_partitions_flat_buffer
        if not self._checked_layout:
            self._check_layout(buf)
        return [(0, buf)]

    def _check_layout(self, buf):
        # averaged_gradients[i][j] (what step() flattens) must be views of the buffer at our offsets.
        ag = self.optimizer.averaged_gradients
        if ag:
            views = list(itertools.chain.from_iterable(ag[i] for i in sorted(ag) if ag[i] is not None))
            base = buf.data_ptr()
            for (p, off), v in zip(self._offsets, views):
                if v.data_ptr() != base + off * buf.element_size():
                    raise DeepSpeedInternalsError(
                        "averaged_gradients do not alias grad_partitions_flat_buffer at the expected offsets")
            self._checked_layout = True


class _PipelinePartition(GradPartition):
    """Pipeline engine (ZeRO-0/1, pipe/engine.py). ZeRO-1 reduces only in the ReduceGrads instruction at
    the end of ``train_batch``; until then each stage's parameters hold this rank's own full local
    gradients in ``param.grad``, which is what the per-language capture reads between micro-batches.

    The local vector is this data-parallel rank's share of the stage's parameters: every parameter is
    cut into ``dp`` near-equal fragments (as ZeRO-3 cuts parameters) and rank d holds fragment d, so the
    per-language rows cost 1/dp of the stage and a tied weight's fragment d is the same elements on both
    of its stages. ``reduce_into`` turns the local gradient in ``param.grad`` into this rank's fragments
    of the data-parallel average (one all-to-all); ``write`` puts dp × the fragments back into
    ``param.grad`` with zeros elsewhere, so ReduceGrads' data-parallel average is the full gradient.
    ``param_names`` must be the plain ``Transformer`` names the caller passes, so that every stage
    builds the same global groups. The Gram counts each model element once over all ranks: the
    second copy of a tied weight (``ds_pipe_replicated``, set by DeepSpeed on every tied copy but the
    first stage's) is left out.
    """

    def __init__(self, engine, names: list[str] | None = None, all_names: list[str] | None = None):
        super().__init__(engine, names, all_names)
        module = engine.module
        self.stage = int(engine.zero_optimization_stage())
        self.params = [p for _, p in module.named_parameters()]
        grid = _attr(engine, "grid", "PipelineEngine process grid")
        self.dp_rank, self.dp_size = int(grid.data_parallel_id), int(grid.data_parallel_size)
        self._dp_group = grid.get_data_parallel_group()
        self.storage_dtype = self.params[0].dtype if self.params else torch.float32
        # fragments[d]: (parameter index, first, end) of rank d's fragments, in parameter order.
        self.fragments = [[] for _ in range(self.dp_size)]
        for k, p in enumerate(self.params):
            chunk = -(-p.numel() // self.dp_size)
            for d in range(self.dp_size):
                lo, hi = min(p.numel(), d * chunk), min(p.numel(), (d + 1) * chunk)
                if hi > lo:
                    self.fragments[d].append((k, lo, hi))
        self.segments, off = [], 0
        for k, lo, hi in self.fragments[self.dp_rank]:
            self.segments.append(Segment(off, hi - lo, k, lo))
            off += hi - lo
        self.numel = off
        self._gram_segments = [s for s in self.segments
                               if not getattr(self.params[s.param], "ds_pipe_replicated", False)]
        index = {id(p): k for k, p in enumerate(self.params)}
        self.tied = [(index[id(w)], group) for w, group in module.get_tied_weights_and_groups()]
        self.bytes_sent = 0
        """Bytes this rank has sent in ``reduce_into`` (for benchmarks)."""
        self._check_segments()

    @property
    def gram_segments(self):
        return self._gram_segments

    def dp_group(self):
        return self._dp_group

    def gram_group(self):
        return None  # the world: every (stage, data-parallel rank) counts its own elements

    def _grads(self) -> list[torch.Tensor]:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad.view(-1) for p in self.params]

    def _pieces(self):
        grads = self._grads()
        return [(s.start, grads[s.param][s.offset:s.offset + s.numel]) for s in self.segments]

    def zero_(self) -> None:
        for g in self._grads():
            g.zero_()

    def write(self, flat: torch.Tensor) -> None:
        """dp × this rank's fragments of ``flat``, zeros elsewhere: ReduceGrads' data-parallel average of
        the ranks' ``param.grad`` is then ``flat`` assembled from every rank's fragments."""
        assert flat.shape == (self.numel,), (flat.shape, self.numel)
        grads = self._grads()
        for g in grads:
            g.zero_()
        for s in self.segments:
            grads[s.param][s.offset:s.offset + s.numel] = flat[s.start:s.start + s.numel] * self.dp_size

    def force_boundary(self) -> None:
        pass  # the pipeline engine decides boundaries by instruction, not by micro-step counting

    def release_boundary(self) -> None:
        pass

    def reduce_into(self, rows: torch.Tensor, row_of: list[int | None]) -> None:
        """One all-to-all of one stage gradient (the bytes of a reduce-scatter; a rank's own fragments are
        added locally): data-parallel rank d's ``param.grad`` (the local gradient of one of its language
        micro-batches) goes, fragment by fragment, to the fragments' owners, each adding it ÷ dp into
        ``rows[row_of[d]]`` (fp32
        [P, numel]); ``row_of[d]`` None: rank d sends nothing this time (it has fewer language
        micro-batches than another rank). Every data-parallel rank of the stage calls it alike."""
        import torch.distributed as dist

        grads, me, dp = self._grads(), self.dp_rank, self.dp_size
        if row_of[me] is not None:  # this rank's own fragments straight from its gradient, not via the all-to-all
            row = rows[row_of[me]]
            for s in self.segments:
                row[s.start:s.start + s.numel].add_(grads[s.param][s.offset:s.offset + s.numel], alpha=1 / dp)
        if dp == 1:
            return
        sending = row_of[me] is not None
        send = torch.cat([grads[k][lo:hi] for d, frags in enumerate(self.fragments) if d != me and sending
                          for k, lo, hi in frags] or [rows.new_zeros(0)]).float()
        in_splits = [sum(hi - lo for _, lo, hi in frags) if d != me and sending else 0
                     for d, frags in enumerate(self.fragments)]
        out_splits = [0 if d == me or r is None else self.numel for d, r in enumerate(row_of)]
        recv = rows.new_empty(sum(out_splits))
        dist.all_to_all_single(recv, send, out_splits, in_splits, group=self._dp_group)
        self.bytes_sent += sum(in_splits) * 4
        pieces = iter(recv.view(-1, self.numel)) if self.numel else iter(())
        for size, r in zip(out_splits, row_of):
            if size:
                rows[r].add_(next(pieces), alpha=1 / dp)

    def reduce_rows(self, rows: torch.Tensor) -> None:
        """In place: rows already data-parallel averaged by ``reduce_into`` -> DeepSpeed's reduced
        gradients, i.e. each tied weight's fragment summed over its stages."""
        import torch.distributed as dist

        for k, group in self.tied:
            for s in self.segments:
                if s.param == k:
                    part = rows[:, s.start:s.start + s.numel].contiguous()
                    dist.all_reduce(part, group=group)
                    rows[:, s.start:s.start + s.numel] = part

    def run_backward_schedule(self, items: list, after_backward) -> None:
        """DeepSpeed's 1F1B training schedule over ``items`` (one per micro-batch) WITHOUT its tied-weight
        and data-parallel reductions and optimizer step; ``after_backward(i)`` runs on this stage right
        after micro-batch i's backward (the schedule runs backwards in micro-batch order)."""
        from types import MethodType

        from deepspeed.runtime.pipe import schedule
        from deepspeed.runtime.pipe.engine import PipelineEngine

        eng = self.engine
        sched = schedule.TrainSchedule(micro_batches=len(items), stages=eng.num_stages, stage_id=eng.stage_id)
        skip = (schedule.ReduceTiedGrads, schedule.ReduceGrads, schedule.OptimizerStep)
        table = _attr(PipelineEngine, "_INSTRUCTION_MAP", "pipeline instruction table")
        eng.module.train()
        eng.total_loss, eng._compute_loss = None, True
        eng.set_dataiterator(iter(items))
        _attr(eng, "_reserve_pipe_buffers", "pipeline buffers")(sched.num_pipe_buffers())
        eng.fwd_outputs = []
        done = 0
        for cmds in sched:
            for cmd in cmds:
                if isinstance(cmd, skip):
                    continue
                MethodType(table[type(cmd)], eng)(**cmd.kwargs)
                if isinstance(cmd, schedule.BackwardPass):
                    after_backward(done)
                    done += 1
        assert done == len(items), (done, len(items))

    def step(self) -> None:
        """The end of ``train_batch``: data-parallel reduction of ``param.grad`` (already summed over the
        tied stages by ``reduce_rows``, so DeepSpeed's tied reduction is skipped) and the optimizer step."""
        _attr(self.engine, "_exec_reduce_grads", "pipeline ReduceGrads instruction")()
        _attr(self.engine, "_exec_optimizer_step", "pipeline OptimizerStep instruction")()


def is_pipeline_engine(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


# ------------------------------------------------------------------ what a config dict makes of DeepSpeed


def _zero_config(ds_config: dict):
    """DeepSpeed's own reading of ``zero_optimization`` (its defaults resolved: overlap_comm is on for
    ZeRO-3 only, the deprecated cpu_offload becomes offload_optimizer)."""
    from deepspeed.runtime.zero.config import get_zero_config

    return get_zero_config(ds_config)


def grad_accum_dtype(ds_config: dict) -> str:
    """'fp32', 'fp16' or 'bf16': the dtype DeepSpeed accumulates gradients in, i.e.
    data_types.grad_accum_dtype (any spelling DeepSpeed accepts), else the model's precision."""
    from deepspeed.runtime.config import DtypeEnum

    from megavac.config import precision_of

    raw = (ds_config.get("data_types") or {}).get("grad_accum_dtype")
    if raw is None:
        return precision_of(ds_config)
    try:
        name = DtypeEnum(raw).name
    except ValueError:
        name = None
    if name not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"data_types.grad_accum_dtype {raw!r} is not one of fp32, fp16, bf16")
    return name


def offload_optimizer_device(ds_config: dict) -> str:
    """'none', 'cpu' or 'nvme': where DeepSpeed keeps the optimizer (zero_optimization.offload_optimizer)."""
    off = _zero_config(ds_config).offload_optimizer
    return "none" if off is None else str(off.device)


def per_language_refusals(ds_config: dict, pipeline: bool) -> list[str]:
    """Why the per-language gradient step cannot run under ``ds_config`` (the merged DeepSpeed config
    dict), one sentence per refused setting, each naming it; empty when it can. ``pipeline``: the run
    uses DeepSpeed's pipeline engine. The trainer (``grad_partition``) and the dry run both ask here."""
    from megavac.config import precision_of

    zero = _zero_config(ds_config)
    stage = int(zero.stage)
    precision, accum = precision_of(ds_config), grad_accum_dtype(ds_config)
    offload = offload_optimizer_device(ds_config)
    out = []
    if stage == 0:
        out.append(f"per-language gradient methods need ZeRO stage {'1' if pipeline else '1, 2 or 3'}, got ZeRO "
                   "stage 0 (zero_optimization.stage=0): without ZeRO there is no gradient partition to read")
    if offload != "none":
        out.append(f"per-language gradient methods do not support zero_optimization.offload_optimizer.device="
                   f"{offload!r}: with optimizer offload DeepSpeed keeps the reduced gradient in host memory")
    # DeepSpeed's own switch (engine._do_optimizer_sanity_check): bf16 parameters, fp32 accumulation and
    # ZeRO-1 without CPU offload select BF16_Optimizer instead of the ZeRO optimizer.
    if stage == 1 and precision == "bf16" and accum == "fp32" and offload != "cpu":
        fix = ("use fp32, fp16, or bf16 without data_types.grad_accum_dtype" if pipeline else
               "use ZeRO-2 (exact with grad_accum_dtype fp32), or ZeRO-1 without data_types.grad_accum_dtype")
        out.append("per-language gradient methods with bf16 + ZeRO stage 1 + grad_accum_dtype fp32: DeepSpeed then "
                   "uses BF16_Optimizer, whose gradients are full and replicated rather than a ZeRO partition; "
                   + fix)
    # The pipeline adapter reads each stage's param.grad before ReduceGrads; with overlap_comm ZeRO-1 hooks
    # the reduction into the backward itself.
    if pipeline and stage == 1 and zero.overlap_comm:
        out.append("per-language gradients under pipeline parallelism need zero_optimization.overlap_comm false "
                   "(true given): with it ZeRO-1 reduces inside the backward, before each language is read")
    return out


def engine_ds_config(engine) -> dict:
    """The config dict ``engine`` was built from: deepspeed.initialize loads a path or base64 config into
    a dict and keeps it as ``engine.config`` (DeepSpeedConfig parses a copy of it)."""
    cfg = _attr(engine, "config", "the engine's DeepSpeed config dict")
    if not isinstance(cfg, dict):
        raise DeepSpeedInternalsError(f"engine.config is a {type(cfg).__name__}, not the DeepSpeed config dict")
    return cfg


def grad_partition(engine, names: list[str] | None = None, all_names: list[str] | None = None) -> GradPartition:
    """The adapter for ``engine`` (a DeepSpeedEngine); ValueError for configurations it cannot serve.
    ``names``/``all_names``: see ``GradPartition`` (required under pipeline parallelism, where a stage's
    own names are DeepSpeed's layer indices)."""
    check_version()
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    pipeline = is_pipeline_engine(engine)
    refusals = per_language_refusals(engine_ds_config(engine), pipeline)
    if refusals:
        raise ValueError("; ".join(refusals))
    stage = int(engine.zero_optimization_stage())
    # Defence: the rules above predict DeepSpeed's choices from the dict; if a DeepSpeed update makes them
    # wrong, the partition would be read from the wrong place.
    if stage == 0 or isinstance(engine.optimizer, BF16_Optimizer):
        raise DeepSpeedInternalsError(
            f"deepspeed {DEEPSPEED_VERSION}: ZeRO stage {stage} with {type(engine.optimizer).__name__} for a config "
            "per_language_refusals accepts: its optimizer selection changed")
    if pipeline:
        if names is None or all_names is None:
            raise ValueError("per-language gradients under pipeline parallelism need the model's parameter names "
                             "of the stage and of the whole model (megavac.model.groups.model_param_names)")
        return _PipelinePartition(engine, names, all_names)
    if stage in (1, 2):
        return _Zero12Partition(engine, names, all_names)
    if stage == 3:
        return _Zero3Partition(engine, names, all_names)
    raise ValueError(f"unsupported zero_optimization.stage={stage}")


# ------------------------------------------------------------------ pipeline modules


def detach_tied_weight_broadcast(pipe) -> None:
    """Re-wrap each tied weight of the ``PipelineModule`` ``pipe`` as a fresh Parameter on the same storage.

    DeepSpeed synchronises tied weights with an in-place broadcast outside no_grad, which leaves an
    autograd node without a backward kernel on the parameter: every backward then warns "c10d::
    broadcast_: an autograd kernel was not registered" (the gradient itself is right). A fresh Parameter
    drops that node; DeepSpeed looks the weight up by attribute each time, and its ds_* marks (which copy
    counts for the norm) carry over. Call before deepspeed.initialize, which collects the parameters.
    """
    tied = _attr(pipe, "tied_modules", "PipelineModule's tied modules")
    names = _attr(pipe, "tied_weight_attrs", "PipelineModule's tied weight names")
    for key, module in tied.items():
        for name in names[key]:
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path)
            old = getattr(owner, leaf)
            new = torch.nn.Parameter(old.detach(), requires_grad=old.requires_grad)
            new.__dict__.update({k: v for k, v in old.__dict__.items() if k.startswith("ds_")})
            setattr(owner, leaf, new)


# ------------------------------------------------------------------ process exit


def release_shm_buffers(master_addr: str, master_port: str | int, local_rank: int) -> int:
    """Unlink the shared-memory all-reduce buffers DeepSpeed's CPU communication op creates per job and
    never removes (0.19.8: ``/dev/shm/deepspeed_allreduce_buffer_<i>_<addr>_<port>_<local rank>``); without
    this every CPU job leaves them in /dev/shm until the node runs out of memory. Call after the last
    collective. Returns how many were removed."""
    import glob
    import os

    removed = 0
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{master_addr}_{master_port}_{local_rank}"):
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed
