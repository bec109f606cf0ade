"""Step time of every gradient method relative to monolithic training, measured side by side.

    python bench/pergrad.py [--langs 4 8 16] [--reps 5] [--model tiny] [--vocab 4000] [--tokens 1024] [--zero 2]
    deepspeed --num_gpus 2 bench/pergrad.py ...            # 2 CPU ranks (gloo); on GPUs: NCCL, one GPU per rank
    deepspeed --num_gpus 2 bench/pergrad.py --pipeline-stages 2 --zero 1   # the pipelined collector

One DeepSpeed engine, one process per rank. For each K (languages per batch) every repetition draws
one batch of about --tokens target tokens split evenly over K languages, and every method takes one
optimizer step on that same batch, in rotating order (interleaved, so drift in machine load hits all
methods alike); the first repetition is a warm-up. Methods run through ``PerLanguageStep`` exactly as
in training: "monolithic" is the plain path (one backward), "mono-gram" forces monolithic weights
through the Gram path (the collector's overhead alone), the others need a Gram every step (CATS with a
meta step every step). Without pipelining every Gram method runs twice, side by side: with the
one-backward collector [1bw] (per-language weight gradients split out of one backward) and with the
K-backward reference [Kbw] (one backward per language). Printed: median seconds of monolithic, each method's median as a
ratio to it, the Gram path's phase split, and the extra memory per rank (the K gradient slices).

With --pipeline-stages S the model is megavac's pipeline form (S stages, ZeRO-1) and the collectors the
pipelined ones: [1bw] one backward inside the stages, [Kbw] each language's rows of the batch as one
pipeline micro-batch; "monolithic" is then DeepSpeed's ``train_batch`` on the whole batch.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
import warnings

import torch

from megavac.data import Batch
from megavac.methods import build_method
from megavac.model import PRESETS, ModelConfig, Transformer
from megavac.pergrad import KBackwardCollector, PerLanguageStep
from megavac.pergrad.one_backward import OneBackwardCollector

METHODS = [
    ("monolithic", "monolithic", {}),
    ("mono-gram", "monolithic", {}),
    ("pcgrad", "pcgrad", {}),
    ("gradvac", "gradvac", {"langs": "all"}),
    ("mgda", "mgda", {}),
    ("cats", "cats", {"warm_interval": 1}),
    ("gradnorm", "gradnorm", {}),
]
PHASES = ("collect", "gram", "weights", "combine", "step")


def make_batch(langs: list[int], tokens: int, vocab: int, gen: torch.Generator) -> Batch:
    """About ``tokens`` target tokens over the languages ``langs`` (at least one sentence each), rows
    grouped by language, lengths 12..32."""
    rows, segments = [], {}
    n = max(len(langs), round(tokens / 22))
    for i, k in enumerate(langs):
        first = len(rows)
        for _ in range(n // len(langs) + (i < n % len(langs))):
            s, t = (int(x) for x in torch.randint(12, 33, (2,), generator=gen))
            src = torch.randint(4, vocab, (s,), generator=gen)
            rows.append((k, src, torch.randint(4, vocab, (t + 1,), generator=gen)))
        segments[k] = (first, len(rows))
    S, T = max(len(r[1]) for r in rows), max(len(r[2]) for r in rows) - 1
    src = torch.zeros(len(rows), S, dtype=torch.long)
    tgt_in = torch.zeros(len(rows), T, dtype=torch.long)
    tgt_out = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (_, s, t) in enumerate(rows):
        src[i, :len(s)] = s
        tgt_in[i, :len(t) - 1] = t[:-1]
        tgt_out[i, :len(t) - 1] = t[1:]
    lang = torch.tensor([r[0] for r in rows])
    return Batch(src, tgt_in, tgt_out, lang, segments, int((tgt_out != 0).sum()))


def sent(collector) -> int:
    """Bytes a collector (or its pipeline partition) has sent to other ranks so far."""
    if collector is None:
        return 0
    return getattr(collector, "bytes_sent", 0) + getattr(collector.partition, "bytes_sent", 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--langs", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--zero", type=int, default=2, choices=[1, 2, 3])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="bf16/fp16: with data_types.grad_accum_dtype fp32 (fp16 needs a GPU)")
    ap.add_argument("--granularity", default="all_layer")
    ap.add_argument("--lang-affine", action="store_true",
                    help="language-affine dealing: rank r's batch holds only languages r, r+N, ... of the K (same "
                         "tokens per rank); without it every rank's batch holds all K")
    ap.add_argument("--pipeline-stages", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS[1:]],
                    help="methods to time besides monolithic (default: all)")
    ap.add_argument("--collectors", nargs="+", default=["1bw", "Kbw"], choices=["1bw", "Kbw"],
                    help="collectors to time without pipelining (default: both)")
    # One thread by default: on a shared machine more threads than free cores make every step wait on
    # its slowest thread and timings swing 20x between repetitions.
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (0: torch's default)")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    # DeepSpeed 0.19.8 calls torch.distributed APIs that torch 2.13 marks deprecated: noise here.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    cuda = torch.cuda.is_available()
    if args.threads and not cuda:
        torch.set_num_threads(args.threads)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533").items():
        os.environ.setdefault(k, v)
    import importlib

    import deepspeed

    if not cuda:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # gloo; skip a 60 s JIT build
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)

    def now():
        if cuda:  # kernels run asynchronously: time what the device has finished
            torch.cuda.synchronize()
        return time.perf_counter()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, **{**PRESETS[args.model], "dropout": 0.0})
    model = Transformer(cfg)
    ds = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0,
          "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
          "zero_optimization": {"stage": args.zero, "overlap_comm": False, "contiguous_gradients": True,
                                "reduce_bucket_size": 50_000_000},
          "steps_per_print": 10**9}
    if args.precision != "fp32":  # ZeRO-2 with fp32 gradient accumulation keeps the slices exact (fp16: × loss scale)
        ds[args.precision] = {"enabled": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    stages = args.pipeline_stages
    if stages > 1 and args.zero != 1:
        raise SystemExit("--pipeline-stages needs --zero 1 (DeepSpeed's pipeline engine allows ZeRO-0/1)")
    ds["train_batch_size"] = world // stages

    def build(K):
        """(engine, {tag: collector}) for K languages: one engine for data parallelism, one per K when
        pipelined (the pipeline's loss function is built for K languages)."""
        if stages == 1:
            kinds = {"1bw": OneBackwardCollector, "Kbw": KBackwardCollector}
            return engine, {tag: kinds[tag](engine, K, pad_id=0, label_smoothing=0.1) for tag in args.collectors}
        from megavac.model.pipeline import PipelineLoss, make_pipeline_module
        from megavac.pergrad import PipelineCollector
        from megavac.pergrad.one_backward import PipelineOneBackwardCollector

        pipe = make_pipeline_module(cfg, stages, PipelineLoss(K, 0, 0.1))
        pipe.load_plain_state_dict(model.state_dict())
        eng, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=ds)
        kinds = {"1bw": PipelineOneBackwardCollector, "Kbw": PipelineCollector}
        return eng, {tag: kinds[tag](eng, K) for tag in args.collectors}

    engine = None
    if stages == 1:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    P = model.num_parameters()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    say = print if rank == 0 else (lambda *a, **k: None)
    layout = f"{world} rank(s)" if stages == 1 else f"{stages} pipeline stages x {world // stages} data-parallel"
    say(f"model {args.model} ({P / 1e6:.2f}M parameters, vocab {args.vocab}), {args.precision}, ZeRO-{args.zero}, {layout}, "
        f"~{args.tokens} target tokens per batch, {torch.get_num_threads()} thread(s) per rank, "
        f"granularity {args.granularity}, {args.reps} interleaved repetitions (+1 warm-up), median")

    # Every stage of a pipeline must see the same batch: seed by the data-parallel rank.
    gen = torch.Generator().manual_seed(1 + rank % (world // stages))  # pipe-major ranks: data index = rank % DP
    for K in args.langs:
        engine, collectors = build(K)
        steps = {}
        for tag, collector in collectors.items():
            for label, name, opts in METHODS:
                if label == "monolithic" and "monolithic" in steps or label not in ["monolithic", *args.methods]:
                    continue  # the plain path: no collector
                key = label if label == "monolithic" or len(collectors) == 1 else f"{label} [{tag}]"
                steps[key] = PerLanguageStep(engine, build_method(name, K, **opts), K, pad_id=0, label_smoothing=0.1,
                                             granularity=args.granularity, collector=collector)
        times = {label: [] for label in steps}
        phases = {label: {p: [] for p in PHASES} for label in steps}
        sent_bytes = {label: [] for label in steps}
        inner = {}  # label -> {"split"/"reduce": [seconds per step]} (one-backward collectors)
        dp, dp_rank = world // stages, rank % (world // stages)
        if args.lang_affine and K < dp:
            raise SystemExit(f"--lang-affine needs K >= the {dp} data-parallel ranks (each holds K/{dp} languages)")
        langs = [k for k in range(K) if k % dp == dp_rank] if args.lang_affine else list(range(K))
        for rep in range(args.reps + 1):
            batch = make_batch(langs, args.tokens, args.vocab, gen).to(engine.device)
            order = list(steps)
            order = order[rep % len(order):] + order[:rep % len(order)]
            for label in order:
                coll = steps[label].collector if label != "monolithic" else None
                b0 = sent(coll)
                s0 = dict(getattr(coll, "seconds", {}))
                t0 = now()
                if label.startswith("mono-gram"):
                    out = steps[label].gram_step([batch], engine.global_steps)
                else:
                    out = steps[label].run([batch], engine.global_steps)
                dt = now() - t0
                if rep:
                    times[label].append(dt)
                    sent_bytes[label].append(sent(coll) - b0)
                    for p, v in getattr(coll, "seconds", {}).items():
                        inner.setdefault(label, {}).setdefault(p, []).append(v - s0.get(p, 0.0))
                    for p, v in out.extra.get("seconds", {}).items():
                        phases[label][p].append(v)
        med = {label: statistics.median(v) for label, v in times.items()}
        base = med["monolithic"]
        if stages > 1:  # the slowest stage's time is the step time; each rank timed its own stage
            import torch.distributed as dist

            for label in med:
                t = torch.tensor([med[label]], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                med[label] = float(t)
            base = med["monolithic"]
        collector = next(iter(collectors.values()))
        slices_mb = K * collector.partition.numel * 4 / 2**20
        # The 1bw transient (several ranks; one rank writes straight into the slices): one parameter's
        # per-language gradients (chunked at BUDGET elements), a running sum, the all-to-all's buffers.
        from megavac.pergrad import one_backward

        biggest = max(p.numel() for p in model.parameters())
        transient_mb = 4 * min(K * biggest, max(one_backward.BUDGET, biggest)) * 4 / 2**20 if dp > 1 else 0.0
        # Communication per rank per step, in units of one plain reduce-scatter of the gradient
        # (P (N-1)/N fp32 elements; DeepSpeed's ZeRO reduction moves about that). Each backward that
        # DeepSpeed reduces costs one unit (K-backward: K of them); 1bw adds its measured all-to-all.
        plain_mb = P * (dp - 1) / dp * 4 / 2**20
        say(f"\nK = {K} languages per batch{' (language-affine: ' + str(len(langs)) + ' per rank)' if args.lang_affine else ''}"
            f": monolithic {base * 1e3:.0f} ms/step; extra memory per rank: slices {slices_mb:.1f} MiB "
            f"(= {K * collector.partition.numel / P:.2f} x fp32 model size)"
            + (f" + 1bw transient <= {transient_mb:.0f} MiB" if "1bw" in collectors else "")
            + f"; plain reduce-scatter {plain_mb:.1f} MiB per rank per step")
        say(f"  {'method':<19} {'x mono':>7}  {'comm MiB':>9}  {'x plain':>7}  " + "  ".join(f"{p:>8}" for p in PHASES)
            + "   (share of the Gram step)")
        for label in steps:
            split = ""
            if phases[label]["collect"]:
                tot = sum(statistics.median(phases[label][p]) for p in PHASES)
                split = "  ".join(f"{statistics.median(phases[label][p]) / tot:>8.1%}" for p in PHASES)
            reductions = K if "Kbw" in label and stages == 1 else 1  # K-backward: one per language present
            comm = reductions * plain_mb + statistics.median(sent_bytes[label]) / 2**20
            ratio = f"{comm / plain_mb:>7.2f}" if plain_mb else f"{'-':>7}"
            say(f"  {label:<19} {med[label] / base:>7.2f}  {comm:>9.1f}  {ratio}  {split}")
            if label in inner and phases[label]["collect"]:
                c = statistics.median(phases[label]["collect"])
                sp, rd = (statistics.median(inner[label].get(p, [0.0])) for p in ("split", "reduce"))
                say(f"  {'':<19} collect {c * 1e3:.0f} ms = forward+backward {(c - sp - rd) * 1e3:.0f} (plain step "
                    f"{base * 1e3:.0f}) + per-language split {sp * 1e3:.0f} + reduction {rd * 1e3:.0f}")
        del collector, collectors, steps
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    say(f"\npeak RSS {rss1 / 1024:.0f} MiB (after engine init {rss0 / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
