"""Dry-run planner: validate a whole training plan without GPUs, distributed init or DeepSpeed engines.

    python launch/train.py --dry-run --ds_config ds_configs/zero2_bf16.json --data-dir data/opus100 \\
        --model big --max-tokens 4096 --grad-accum 4 --world-size 64 [--pipeline-stages 2]

What is checked and estimated (every number is per GPU unless said otherwise):

* paths: the prepared data dir and its ``meta.json`` (or that the synthetic default would be generated);
  every selected language has training data, and its longest dev example (in tokens, with the tag, BOS
  and EOS, as batches are built) fits the model's ``max_positions``: validation refuses one that does not;
  the ds_config (loaded and merged by :func:`megavac.config.load_ds_config` / :func:`merge_ds_config`,
  the one place CLI flags override the JSON, then parsed by DeepSpeed's own ``DeepSpeedConfig``),
  a writable ``--save-dir``, and the ``latest`` checkpoint when ``--resume``;
* world size (``--world-size``, else ``WORLD_SIZE``, else ``SLURM_NTASKS``, else 1), pipeline stages and
  the data-parallel degree DP = world / stages; tokens per update = max_tokens × DP × grad_accum; DeepSpeed's
  nominal ``train_batch_size`` = micro (1) × grad_accum × DP;
* model parameters (the preset built on the ``meta`` device: no memory, no initialisation cost), with the
  ablations: ``--no-layernorm-affine`` (no LayerNorm parameters) and ``--family-experts`` (each routed
  module once per language family: its parameters, and in training its compute and activations, × the
  number of families F; the families are resolved as training resolves them; refused with pipeline stages);
* memory for model states under the ZeRO stage and precision, next to DeepSpeed's own estimators, plus a
  rough activation estimate for ``--max-tokens``;
* per-language gradient methods: the fp32 gradient slices (one per language present) megavac/pergrad keeps, and the
  configurations megavac/pergrad/ds_adapter.py refuses.

Model-state bytes per parameter, as DeepSpeed 0.19.8 allocates them (``P`` parameters, ``N`` = DP degree):

=========================  ============  ===============================================================
state                      bytes         partitioned over N from ZeRO stage
=========================  ============  ===============================================================
working parameters         2 (bf16/fp16) 3
                           or 4 (fp32)
working gradients          2, or 4 for   2
                           fp32 or fp32
                           accumulation
fp32 master parameters     4             1 (mixed precision; fp32 with ZeRO-1/2 too: DeepSpeed clones
                                         the partition; fp32 ZeRO-0/3 update the working copy in place)
fp32 gradient partition    4             1 (mixed precision with 16-bit accumulation only: the gradient
                                         cast for Adam; with data_types.grad_accum_dtype fp32 the
                                         accumulated fp32 partition is used as it is)
Adam moments (m, v)        8             1
=========================  ============  ===============================================================

ZeRO-3 also gathers the largest layer (16-bit parameters and gradients: 4 bytes per element, as
DeepSpeed's estimator counts it). With 16-bit mixed precision and 16-bit accumulation this table equals
DeepSpeed's ``estimate_zero2_model_states_mem_needs`` exactly (2P + 18P/N) and exceeds
``estimate_zero3_model_states_mem_needs`` (4·largest + 18P/N) by exactly the 16-bit parameter partition
2P/N, which DeepSpeed's ZeRO-3 formula leaves out. With fp32 gradient accumulation (``zero2_bf16.json``)
ZeRO-2 is 2P/N below DeepSpeed's figure (no separate 16-bit gradient partition). DeepSpeed has no ZeRO-1
estimator: its ZeRO-2 figure is shown, which partitions gradients and so is lower. Both columns are printed
side by side; the differences are at most 2P/N, i.e. 1/10 of the partitioned part.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

GiB = 2**30


# ----------------------------------------------------------------------------------------- CLI


def add_dry_run_args(parser: argparse.ArgumentParser) -> None:
    """The dry-run flags of ``launch/train.py`` (only meaningful with ``--dry-run``)."""
    g = parser.add_argument_group("dry run (no GPUs, no distributed init, no DeepSpeed engine)")
    g.add_argument("--dry-run", action="store_true",
                   help="validate paths, parallelism, model size and memory per GPU, print a report and exit "
                        "(0: plan OK, 2: problems)")
    g.add_argument("--world-size", type=int, default=None,
                   help="ranks to plan for (default: $WORLD_SIZE, else $SLURM_NTASKS, else 1)")


def default_world_size(env: dict | None = None) -> int:
    env = os.environ if env is None else env
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if env.get(key):
            try:
                return int(env[key])
            except ValueError:
                raise ValueError(f"${key}={env[key]!r} is not an integer world size") from None
    return 1


# ------------------------------------------------------------------------------------- checks


def check_parallelism(world: int, stages: int) -> int:
    """Validate world size × pipeline stages; returns the data-parallel degree. (How many stages the model
    allows is megavac.model.pipeline.check_stages's rule, the ZeRO stage under a pipeline merge_ds_config's.)"""
    if world < 1:
        raise ValueError(f"--world-size must be >= 1, got {world}")
    if stages < 1:
        raise ValueError(f"--pipeline-stages must be >= 1, got {stages}")
    if world % stages:
        raise ValueError(f"world size {world} is not divisible by --pipeline-stages {stages}")
    return world // stages


def check_method(method, ds: dict, pipeline: bool):
    """The method's config resolved as training resolves it (``MethodConfig.resolve``: method, granularity,
    options), and the merged DeepSpeed config ``ds`` one the per-language step serves
    (megavac.pergrad.ds_adapter.per_language_refusals; any setting for ``monolithic``). Returns the resolved config."""
    from megavac.pergrad.ds_adapter import per_language_refusals

    method = method.resolve()
    if method.method == "monolithic" and not method.gram_log_interval:  # no per-language gradients at all
        return method
    refusals = per_language_refusals(ds, pipeline)
    if refusals:
        what = f"--method {method.method}" + (" with --gram-log-interval" if method.method == "monolithic" else "")
        raise ValueError(f"{what}: " + "; ".join(refusals))
    return method


# ------------------------------------------------------------------------------------- memory


def model_state_bytes(params: int, largest_layer: int, zero_stage: int, precision: str, accum: str,
                      dp: int) -> dict[str, float]:
    """Bytes per GPU of each model state (see the module docstring's table)."""
    mixed = precision in ("bf16", "fp16")
    w = 2 if mixed else 4
    g = 4 if accum == "fp32" else 2
    opt_div = dp if zero_stage >= 1 else 1
    rows = {
        "parameters": w * params / (dp if zero_stage >= 3 else 1),
        "gradients": g * params / (dp if zero_stage >= 2 else 1),
        "fp32 master parameters": (4 * params / opt_div) if (mixed or zero_stage in (1, 2)) else 0.0,
        "fp32 gradient partition": (4 * params / opt_div) if (mixed and accum != "fp32") else 0.0,
        "Adam moments (m, v)": 8 * params / opt_div,
    }
    if zero_stage >= 3:
        rows["gathered largest layer"] = 4.0 * largest_layer
    return rows


def deepspeed_estimate(params: int, largest_layer: int, zero_stage: int, dp: int) -> float | None:
    """DeepSpeed's own per-GPU model-states estimate (no offload), or None for stages it has none for.

    DeepSpeed's ``*_all_cold`` helpers only print a table; they call these two functions, which return
    (cpu bytes, gpu bytes[, largest layer bytes]). Both assume 16-bit mixed precision.
    """
    if zero_stage in (1, 2):
        # DeepSpeed's ZeRO-2 estimate; for ZeRO-1 it counts 2-byte gradients as partitioned (a lower bound).
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=dp, num_nodes=1, cpu_offload=False)
        return float(gpu)
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, num_gpus_per_node=dp, num_nodes=1,
                                                          cpu_offload=False, cpu_offload_params=False)
        return float(gpu)
    return None


def activation_bytes(cfg, max_tokens: int, precision: str) -> float:
    """Rough activations kept for the backward of one micro-batch of ``max_tokens`` padded tokens per side.

    Counted per token: encoder layer (8d + 2·d_ff) elements + (2d + d_ff) dropout-mask bytes; decoder layer
    (12d + 2·d_ff) elements + (3d + d_ff) mask bytes, plus the cross-attention keys/values 2d per source
    token; embeddings 2d; the output: fp32 log-probabilities and their gradient, 8 bytes × vocab per target
    token. Attention is fused (SDPA), so no T×T score matrices. A per-language step keeps this graph for its
    K backward passes, so the same figure applies.

    Family experts (F families) run every copy on every row in training: a routed FFN keeps F × its
    2·d_ff elements and d_ff mask bytes, a routed attention block F × its queries, keys, values and context
    (self-attention 4d per token; cross-attention 2d per target token and its keys/values 2d per source
    token); per-family output projections keep no
    more for the backward (the row selection saves only the mask) but hold two more [T, vocab] logits
    transiently.
    """
    a = 2 if precision in ("bf16", "fp16") else 4
    d, ff, T = cfg.d_model, cfg.d_ff, max_tokens
    experts, F = getattr(cfg, "experts", ()), max(getattr(cfg, "num_families", 0), 1)
    f_ffn, f_att = (F if "ffn" in experts else 1), (F if "attn" in experts else 1)
    enc = cfg.enc_layers * ((4 * d + 4 * d * f_att + 2 * ff * f_ffn) * a + (2 * d + ff * f_ffn)) * T
    dec = cfg.dec_layers * (((6 * d + 6 * d * f_att + 2 * ff * f_ffn) * a + (3 * d + ff * f_ffn)) * T
                            + 2 * d * a * f_att * T)
    emb = 2 * (2 * d * a) * T
    out = 8 * cfg.vocab_size * T + (2 * a * cfg.vocab_size * T if "output" in experts and F > 1 else 0)
    return float(enc + dec + emb + out)


# ---------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    """(section, item, value) lines of the report."""
    memory: list[tuple[str, float, float | None]] = field(default_factory=list)
    """(item, megavac bytes, DeepSpeed bytes or None) per GPU."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    """Machine-readable results (tests, tooling)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, section: str, item: str, value) -> None:
        self.rows.append((section, item, str(value)))

    def raise_if_problems(self) -> None:
        if self.problems:
            raise ValueError("; ".join(self.problems))


def _data_info(data, plan: Plan) -> dict | None:
    """meta-like info: vocab_size, pad_id, language names, train sizes; None when unusable."""
    from data_pipeline.indexed import load_meta, select_langs

    if data.data_dir:
        path, option, found = Path(data.data_dir), f"--data-dir {data.data_dir}", "meta.json found"
        if not path.is_dir():
            plan.problems.append(f"{option} does not exist")
            return None
    else:
        path = Path(data.synthetic_dir) / "prepared"
        option, found = "synthetic default", "synthetic default, already prepared"
        if not (path / "meta.json").is_file():
            from data_pipeline.default_corpus import SEED, VOCAB_SIZE
            from data_pipeline.synthetic import build_languages

            codes = sorted(lang.code for lang in build_languages(SEED))
            plan.add("paths", "data dir", f"{path}: the synthetic corpus would be generated and prepared "
                                          f"({len(codes)} languages, vocab {VOCAB_SIZE} requested)")
            plan.notes.append("synthetic corpus not prepared yet: vocab and language count are the generator's defaults")
            return {"vocab_size": VOCAB_SIZE, "pad_id": 0, "names": [f"en-{c}" for c in codes], "sizes": None}
    try:  # a stale synthetic dir (older format) is a problem to report too, not a traceback
        meta = load_meta(path)
    except ValueError as e:
        plan.problems.append(f"{option}: {e}")
        return None
    plan.add("paths", "data dir", f"{path} ({found})")
    try:
        langs = select_langs(meta, data.langs, path)
    except ValueError as e:
        plan.problems.append(f"--langs: {e}")
        langs = meta["tasks"]  # report the rest of the plan over all languages
    sizes = [meta["pairs"][t["pair"]]["train"] for t in langs]
    empty = [t["name"] for t, n in zip(langs, sizes) if not n]
    if empty:
        plan.problems.append(f"{path}: no training data for {', '.join(empty)} (empty train split); re-prepare with "
                             "a corpus that has it, or leave these languages out with --langs")
    return {"vocab_size": meta["vocab_size"], "pad_id": meta["pad_id"], "names": [t["name"] for t in langs],
            "sizes": sizes, "path": path, "langs": langs, "corpus": meta.get("corpus")}


def _check_dev_lengths(info: dict, max_positions: int, plan: Plan) -> None:
    """The longest dev example of the selected languages against ``max_positions``, read from the prepared index
    (no tokens): validation builds every dev example and stops at the first one longer than that, hours in."""
    from data_pipeline.indexed import PreparedDataError, open_split, raw_path

    longest, missing = None, []
    for t in info["langs"]:
        try:
            src = open_split(info["path"], t["pair"], "dev", t["src"])
            tgt = open_split(info["path"], t["pair"], "dev", t["tgt"])
        except PreparedDataError as e:
            plan.problems.append(str(e))
            continue
        if len(src) == 0:
            missing.append(t["name"])
            continue
        # As megavac.data builds them: source <2xx> tokens </s>, target <s> tokens (or tokens </s>).
        lengths = np.maximum(src.sizes.astype(np.int64) + 2, tgt.sizes.astype(np.int64) + 1)
        i = int(np.argmax(lengths))
        side = t["src"] if src.sizes[i] + 2 >= tgt.sizes[i] + 1 else t["tgt"]
        if longest is None or lengths[i] > longest[0]:
            longest = (int(lengths[i]), t, i, side)
    if missing and longest is None:  # megavac.train.validation.Validator refuses this at start
        plan.problems.append(f"no dev data for any language ({', '.join(missing)}): validation, which selects the "
                             "best checkpoint, needs at least one; prepare a corpus with dev splits or add a language "
                             "that has one with --langs")
    elif missing:
        plan.notes.append(f"no dev data for {', '.join(missing)}: validation leaves them out of its average")
    if longest is None:
        return
    n, t, i, side = longest
    where = f"{t['name']} dev line {i + 1}"
    plan.add("data", "longest dev example", f"{n} tokens ({where}); max_positions {max_positions}")
    plan.numbers["longest_dev_example"] = n
    if n > max_positions:
        plan.problems.append(
            f"{where} has {n} tokens (with tag/BOS/EOS) > the model's max_positions={max_positions}: validation "
            f"would stop at its first run; remove or shorten line {i + 1} of pair {t['pair']}'s dev files (its "
            f"{side} side as prepared: {raw_path(info['path'], t['pair'], 'dev', side)}) in the corpus and re-run "
            "data_pipeline.prepare, whose --max-eval-tokens refuses such lines")


def _check_save_dir(train, plan: Plan) -> None:
    save = Path(train.save_dir)
    existing = save
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        plan.problems.append(f"--save-dir {train.save_dir} is not writable ({existing} is not a writable directory)")
    else:
        plan.add("paths", "save dir", f"{save} ({'exists' if save.exists() else 'will be created'}, writable)")
    if train.resume:
        latest = save / "checkpoints" / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if (save / "checkpoints" / tag).is_dir():
                plan.add("paths", "resume from", f"{save / 'checkpoints' / tag}")
            else:
                plan.problems.append(f"--resume: {latest} names {tag!r}, which does not exist")
        else:
            # The trainer starts from scratch in this case; a dry run asked to resume flags it.
            plan.problems.append(f"--resume: no checkpoint to resume from ({latest} does not exist)")


def _ds_config(ds_config_path: str, train, world: int, plan: Plan) -> dict | None:
    from megavac.config import load_ds_config, merge_ds_config, precision_of

    try:
        ds = merge_ds_config(load_ds_config(ds_config_path), train, world)
    except ValueError as e:
        plan.problems.append(str(e))
        return None
    # DeepSpeed's own parser, without distributed init (it then assumes one rank: give it that rank's batch).
    try:
        from deepspeed.runtime.config import DeepSpeedConfig

        probe = dict(ds, train_batch_size=ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"])
        DeepSpeedConfig(probe)
    except Exception as e:  # DeepSpeed raises assorted types (pydantic, AssertionError, ValueError)
        plan.problems.append(f"DeepSpeed rejects the merged config {ds_config_path}: {type(e).__name__}: {e}")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        plan.problems.append(f"{ds_config_path}: bf16 and fp16 are both enabled")
    stage = ds["zero_optimization"].get("stage", 0)
    plan.add("paths", "ds_config", f"{ds_config_path} (loaded and merged with the CLI flags: ZeRO-{stage}, "
                                   f"{precision_of(ds)}, grad accum {ds['gradient_accumulation_steps']}, "
                                   f"lr {ds['optimizer']['params']['lr']}, clip {ds['gradient_clipping']})")
    return ds


def make_plan(data, train, method, ds_config_path: str, world_size: int | None = None) -> Plan:
    """Check everything and estimate memory; problems are collected in ``plan.problems``."""
    import torch

    from megavac.config import model_config, precision_of
    from megavac.pergrad.ds_adapter import grad_accum_dtype, offload_optimizer_device
    from megavac.model import Transformer

    plan = Plan()
    world = default_world_size() if world_size is None else world_size
    info = _data_info(data, plan)
    _check_save_dir(train, plan)

    # Model on the meta device: shapes only. Family experts are routed by the languages' families, resolved
    # as training resolves them (the synthetic default's codes name their generator family).
    vocab, pad = (info["vocab_size"], info["pad_id"]) if info else (64000, 0)
    tasks = (info.get("langs") or [{"name": n, "pair": n.split("-", 1)[1]} for n in info["names"]]) if info else None
    if tasks is None and train.family_experts:
        plan.notes.append("--family-experts not planned: without the data's languages their families are unknown")
        train = replace(train, family_experts="", family_map="")
    try:
        mcfg = model_config(train, vocab, pad, tasks, info.get("corpus") if info else None)
    except ValueError as e:
        plan.problems.append(str(e))
        return plan
    with torch.device("meta"):
        model = Transformer(mcfg)
    params = model.num_parameters()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    embed = model.embed.weight.numel()
    norm_params = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters())
    expert_params = model.expert_parameters()

    # Parallelism, then the ds_config merged for the data-parallel degree (DeepSpeed's train_batch_size).
    ds0 = None
    try:
        from megavac.config import load_ds_config

        ds0 = load_ds_config(ds_config_path)
    except ValueError as e:
        plan.problems.append(str(e))
    try:
        from megavac.config import pipeline_stages as resolve_stages

        pipeline_stages = resolve_stages(ds0 or {}, train)
    except ValueError as e:
        plan.problems.append(str(e))
        pipeline_stages = 1
    try:
        dp = check_parallelism(world, pipeline_stages)
    except ValueError as e:
        plan.problems.append(str(e))
        dp = max(1, world // max(1, pipeline_stages))
    try:
        from megavac.model.pipeline import check_stages

        check_stages(mcfg, pipeline_stages)
    except ValueError as e:
        plan.problems.append(str(e))
    ds = _ds_config(ds_config_path, train, dp * pipeline_stages, plan) if ds0 is not None else None

    plan.add("parallelism", "world size", world)
    plan.add("parallelism", "pipeline stages", pipeline_stages)
    plan.add("parallelism", "data-parallel degree", f"{dp} (= world / stages; ZeRO partitions over it)")
    if pipeline_stages > 1:
        plan.notes.append("pipeline: DeepSpeed balances the layers over the stages by parameter count; the tied "
                          "embedding sits on the first and the last stage")
    if data.max_tokens < 1:
        plan.problems.append(f"--max-tokens must be >= 1, got {data.max_tokens}")
    plan.add("model", "preset", f"{train.model}: d_model {mcfg.d_model}, {mcfg.enc_layers}+{mcfg.dec_layers} layers, "
                                f"d_ff {mcfg.d_ff}, heads {mcfg.n_heads}, vocab {vocab}")
    plan.add("model", "parameters", f"{params:,} (embedding, tied: {embed:,}; largest layer {largest:,})")
    plan.add("model", "LayerNorm", f"gains and biases: {norm_params:,} parameters" if mcfg.layernorm_affine else
             "no gains or biases (--no-layernorm-affine): 0 LayerNorm parameters")
    if mcfg.experts:
        F = mcfg.num_families
        fams = ", ".join(f"{n} ({sum(f == i for f in mcfg.families)})" for i, n in enumerate(mcfg.family_names))
        plan.add("model", "family experts",
                 f"{mcfg.expert_modules} × {F} families: {expert_params:,} of the parameters are experts, {F} × "
                 f"{expert_params // F:,} (the routed modules' parameters are multiplied by the number of families; "
                 f"the model states, the per-language slices and the activations of the routed modules below "
                 f"count them); training runs every copy on every row ({F}× the routed modules' compute), "
                 f"inference each row's own family's copy only")
        plan.add("model", "families (languages)", fams)
    plan.numbers.update(world=world, stages=pipeline_stages, dp=dp, params=params, largest_layer=largest,
                        vocab_size=vocab, layernorm_params=norm_params, expert_params=expert_params,
                        families=mcfg.num_families)
    if info:
        plan.add("data", "languages", f"{len(info['names'])}: {', '.join(info['names'][:12])}"
                                  f"{' …' if len(info['names']) > 12 else ''}")
        plan.numbers["langs"] = len(info["names"])
        if "path" in info:  # a prepared directory (not the synthetic default still to be generated)
            _check_dev_lengths(info, mcfg.max_positions, plan)

    if ds is None:
        return plan
    ga = ds["gradient_accumulation_steps"]
    micro = ds["train_micro_batch_size_per_gpu"]
    tokens = data.max_tokens * dp * ga
    plan.add("batch", "tokens per update", f"{tokens:,} padded tokens (max_tokens {data.max_tokens} × DP {dp} × "
                                           f"grad accum {ga})")
    plan.add("batch", "DeepSpeed train_batch_size",
             f"{ds['train_batch_size']} (nominal: micro {micro} × grad accum {ga} × DP {dp}; "
             "one token-budgeted micro-batch counts as one sample)")
    if ds["train_batch_size"] != micro * ga * dp:
        plan.problems.append(f"train_batch_size {ds['train_batch_size']} != micro {micro} × grad accum {ga} × DP {dp}")
    plan.numbers.update(tokens_per_update=tokens, grad_accum=ga, train_batch_size=ds["train_batch_size"])

    precision = precision_of(ds)
    zero_stage = int(ds["zero_optimization"].get("stage", 0))
    try:
        accum = grad_accum_dtype(ds)
    except ValueError as e:
        plan.problems.append(str(e))
        accum = "fp32"
    offload = offload_optimizer_device(ds)
    try:
        method = check_method(method, ds, pipeline_stages > 1)
    except ValueError as e:
        plan.problems.append(str(e))
        method = replace(method, method="monolithic")  # reported; plan the rest without it

    # Memory per GPU. With pipeline stages a rank holds its stage's layers (the tied embedding on the first
    # and the last stage): the largest stage holds about (P - embed) / stages + embed.
    stage_params = params if pipeline_stages == 1 else int((params - embed) / pipeline_stages + embed)
    states = model_state_bytes(stage_params, largest, zero_stage, precision, accum, dp)
    model_total = sum(states.values())
    ds_total = deepspeed_estimate(stage_params, largest, zero_stage, dp)
    for k, v in states.items():
        plan.memory.append((k, v, None))
    plan.memory.append(("model states", model_total, ds_total))
    extra = 0.0
    if method.method != "monolithic" or method.gram_log_interval:
        K = len(info["names"]) if info else 0
        per_batch = method.langs_per_batch or K
        # pergrad keeps one slice per language PRESENT in the step: at most langs-per-batch of the K languages,
        # each this rank's 1/dp share of its stage's parameters (under a pipeline too: each language's
        # gradient is reduced into the rank's fragments right after its micro-batch's backward).
        slice_elems = stage_params // dp
        extra = per_batch * slice_elems * 4
        plan.memory.append((f"per-language slices ({per_batch} of {K} languages)", extra, None))
        if pipeline_stages > 1 and method.collector == "k_backward":
            cost = "one forward and backward per sentence (each language's rows are a pipeline micro-batch)"
        elif method.collector == "one_backward":
            from megavac.pergrad.one_backward import BUDGET

            # The per-language gradients of one parameter exist in full only until they are reduced into
            # the slices, at most BUDGET elements at a time (or one row of a larger tensor); the tied
            # embedding keeps its running sum next to a new contribution, and the all-to-all a send and a
            # receive buffer of that size. One rank writes straight into the slices: nothing.
            chunk = min(per_batch * max(embed, largest), max(BUDGET, max(embed, largest)))
            transient = 4 * chunk * 4 if dp > 1 else 0.0
            plan.memory.append(("per-language gradients of one parameter (transient)", transient, None))
            plan.numbers["pergrad_transient_bytes"] = transient
            cost = "one backward per micro-batch (per-language weight gradients split out of it)"
        else:
            cost = f"{per_batch} backward passes per micro-batch (the k_backward reference)"
        plan.add("method", method.method, f"{per_batch} fp32 gradient slices of {slice_elems:,} elements per "
                                          f"rank (one per language present, {per_batch} per batch at most, of {K}); "
                                          f"{cost}")
        plan.numbers["pergrad_bytes"] = extra
        extra += plan.numbers.get("pergrad_transient_bytes", 0.0)
    act = activation_bytes(mcfg, data.max_tokens, precision)
    plan.memory.append(("activations (rough)", act, None))
    plan.memory.append(("total", model_total + extra + act, None))
    plan.numbers.update(model_states_bytes=model_total, deepspeed_model_states_bytes=ds_total,
                        activation_bytes=act, total_bytes=model_total + extra + act, zero_stage=zero_stage,
                        precision=precision, grad_accum_dtype=accum, state_rows=states)
    plan.add("memory", "setting", f"ZeRO-{zero_stage}, {precision} (grad accumulation {accum}), "
                                  f"optimizer offload {offload}")
    if zero_stage == 1:
        plan.notes.append("DeepSpeed has no ZeRO-1 estimator: its column shows the ZeRO-2 formula (gradients "
                          "partitioned), a lower bound")
    if precision == "fp32" and ds_total is not None:
        plan.notes.append("DeepSpeed's estimator assumes 16-bit mixed precision; this run is fp32")
    return plan


# -------------------------------------------------------------------------------------- report


def render(plan: Plan, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    out = file or sys.stdout
    console = Console(file=out, width=None if out.isatty() else 120, highlight=False)
    table = Table(title="megavac dry run", show_lines=False)
    for col in ("section", "item", "value"):
        table.add_column(col, overflow="fold")
    last = None
    for section, item, value in plan.rows:
        table.add_row(section if section != last else "", item, value)
        last = section
    console.print(table)
    if plan.memory:
        mem = Table(title="memory per GPU (GiB)")
        mem.add_column("item")
        mem.add_column("megavac", justify="right")
        mem.add_column("DeepSpeed estimator", justify="right")
        for item, ours, theirs in plan.memory:
            style = "bold" if item in ("model states", "total") else None
            mem.add_row(item, f"{ours / GiB:.3f}", "" if theirs is None else f"{theirs / GiB:.3f}", style=style)
        console.print(mem)
    for note in plan.notes:
        console.print(f"note: {note}")
    if plan.ok:
        console.print("plan OK")
    else:
        console.print(f"{len(plan.problems)} problem(s):")
        for p in plan.problems:
            console.print(f"  - {p}")


def main(data, train, method, ds_config_path: str, world_size: int | None = None, file=None) -> int:
    """Run the dry run and print the report; 0 when the plan is OK, 2 otherwise."""
    try:
        plan = make_plan(data, train, method, ds_config_path, world_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    render(plan, file)
    return 0 if plan.ok else 2


__all__ = ["Plan", "make_plan", "main", "render", "add_dry_run_args", "check_parallelism", "check_method",
           "model_state_bytes", "deepspeed_estimate", "activation_bytes", "default_world_size"]
