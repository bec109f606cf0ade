"""Shared pieces of the per-language-gradient test helpers: a tiny model, hand-made language-grouped
batches, DeepSpeed configs and the plain-PyTorch reference gradients.

Run inside a ``deepspeed --num_gpus N`` launch (N CPU ranks over gloo) or as a single process (this
module then provides the rendezvous variables the launcher would).
"""
from __future__ import annotations

import copy
import importlib
import os

import torch

from megavac.data import Batch
from megavac.loss import per_language_losses, token_losses
from megavac.model import ModelConfig, Transformer

VOCAB, PAD, SMOOTHING = 48, 0, 0.1
# Smaller than the "tiny" preset (d_model 64): the K-backward path runs K full backwards, and the tests
# launch several 2-rank jobs. Two layers per stack so that all_layer has several groups.
MODEL = dict(vocab_size=VOCAB, d_model=32, n_heads=2, enc_layers=2, dec_layers=2, d_ff=64, dropout=0.0,
             max_positions=64, pad_id=PAD)


def init_dist(port: str = "29517"):
    """Initialise torch.distributed (gloo) as the deepspeed launcher would; returns (rank, world)."""
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        os.environ.setdefault(k, v)
    torch.set_num_threads(1)
    import deepspeed

    # Skip the ~60 s JIT build of DeepSpeed's CPU shared-memory all-reduce: gloo suffices here.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def make_model(seed: int = 0, dropout: float = 0.0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**MODEL, "dropout": dropout}))


def ds_config(stage: int, world: int, ga: int = 1, precision: str = "fp32", lr: float = 1e-2,
              optimizer: str = "Adam", grad_accum_fp32: bool = False, adam_eps: float = 1e-8,
              zero_extra: dict | None = None) -> dict:
    cfg = {
        "train_batch_size": ga * world,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": ga,
        "gradient_clipping": 0.0,  # exact comparisons: no clipping
        "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 50_000_000},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if optimizer == "Adam":
        cfg["optimizer"] = {"type": "Adam", "params": {"lr": lr, "betas": [0.9, 0.98], "eps": adam_eps,
                                                       "weight_decay": 0.0, "torch_adam": True}}
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    cfg["zero_optimization"].update(zero_extra or {})
    if precision in ("bf16", "fp16"):
        cfg[precision] = {"enabled": True}
    if grad_accum_fp32:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def make_batch(rank: int, step: int, micro: int, langs: list[int], rows_per_lang: int = 2, seed: int = 0) -> Batch:
    """A language-grouped batch: ``rows_per_lang`` rows for each language in ``langs`` (sorted), random
    tokens and lengths, padding at the end of rows. Deterministic in (seed, rank, step, micro)."""
    g = torch.Generator().manual_seed(hash((seed, rank, step, micro)) % 2**31)
    langs = sorted(langs)
    rows = []
    for k in langs:
        for _ in range(rows_per_lang):
            s = int(torch.randint(3, 9, (1,), generator=g))
            t = int(torch.randint(2, 8, (1,), generator=g))
            src = torch.randint(4, VOCAB, (s,), generator=g)
            src[0] = 1 + k % 3  # a "<2xx>"-like tag, so languages differ systematically
            tgt = torch.randint(4 + 8 * (k % 4), VOCAB, (t + 1,), generator=g)  # per-language token ranges
            rows.append((k, src, tgt[:-1], tgt[1:]))
    S = max(len(r[1]) for r in rows)
    T = max(len(r[2]) for r in rows)
    B = len(rows)
    src = torch.full((B, S), PAD, dtype=torch.long)
    tgt_in = torch.full((B, T), PAD, dtype=torch.long)
    tgt_out = torch.full((B, T), PAD, dtype=torch.long)
    for i, (_, s, ti, to) in enumerate(rows):
        src[i, :len(s)] = s
        tgt_in[i, :len(ti)] = ti
        tgt_out[i, :len(to)] = to
    lang = torch.tensor([r[0] for r in rows], dtype=torch.long)
    segments = {}
    for i, k in enumerate(lang.tolist()):
        first, _ = segments.get(k, (i, i))
        segments[k] = (first, i + 1)
    return Batch(src, tgt_in, tgt_out, lang, segments, int((tgt_out != PAD).sum()))


def langs_for(rank: int, step: int, micro: int, K: int, pattern: str, world: int = 1) -> list[int]:
    """Which languages a rank's micro-batch holds.

    "all": every language everywhere. "mixed": ranks and micro-batches hold different subsets and the
    last language is absent from the whole step on even steps (tests the presence mask and the
    zero-loss backward that keeps ranks' collectives in step). "affine": language-affine dealing, one
    language per micro-batch, so each language is on one rank and in one micro-batch of the step (and
    languages are absent when ranks × micro-batches < K); on odd steps rank 0's first micro-batch is a
    mixed leftover batch of two languages.
    """
    if pattern == "all":
        return list(range(K))
    if pattern == "affine":
        k = (step + rank + world * micro) % K
        return sorted({k, (k + world * 2) % K}) if step % 2 and rank == 0 and micro == 0 else [k]
    assert pattern == "mixed"
    pool = list(range(K - 1)) if step % 2 == 0 else list(range(K))
    out = [k for k in pool if (k + rank + micro) % 3 != 0] or pool[:1]
    return out


def reference_grads(model: torch.nn.Module, batches_per_rank: list[list[Batch]], K: int, ga: int, seed_of=None):
    """Each language's full gradient as DeepSpeed defines the reduced one: the mean over ranks of the
    sum over micro-batches of ∇(loss share_k) / ga, computed with one backward per (rank, micro, k) on a
    plain copy of the model. Returns ({name: [K, *shape] fp64}, losses [K]): each language's mean token
    loss over the global batch (its token losses over all ranks and micro-batches ÷ its target tokens)."""
    names = [n for n, _ in model.named_parameters()]
    W = len(batches_per_rank)
    out = {n: torch.zeros(K, *p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    loss_sum = torch.zeros(K, dtype=torch.float64)
    tokens = torch.zeros(K, dtype=torch.float64)
    def seed(r, m):
        if seed_of is not None:
            torch.manual_seed(seed_of(r, m))

    for r, batches in enumerate(batches_per_rank):
        for m, b in enumerate(batches):
            seed(r, m)
            with torch.no_grad():
                tok_loss, _ = token_losses(model(b.src, b.tgt_in), b.tgt_out, PAD, SMOOTHING)
                for k in range(K):
                    rows = b.lang == k
                    loss_sum[k] += float(tok_loss[rows].double().sum())
                    tokens[k] += float((b.tgt_out[rows] != PAD).sum())
            for k in range(K):
                model.zero_grad(set_to_none=True)
                seed(r, m)
                logits = model(b.src, b.tgt_in)
                loss_k, _, _ = per_language_losses(logits, b.tgt_out, b.lang, K, PAD, SMOOTHING)
                if k not in b.segments:
                    continue
                loss_k[k].backward()
                for n, p in model.named_parameters():
                    if p.grad is not None:
                        out[n][k] += p.grad.double() / (W * ga)
    assert list(out) == names
    return out, loss_sum / tokens.clamp(min=1)


def clone_model(model):
    return copy.deepcopy(model)
