"""Top Hessian eigenvalue of each language's loss over training (CATS, Li & Gong 2021, Figure 2).

    python -m megavac.analysis curvature runs/x/checkpoints/step_1000 runs/x/checkpoints/step_2000 ...
    python -m megavac.analysis curvature runs/x/checkpoints --tag all          # every step_N folder of the run
    python -m megavac.analysis curvature model.pt --langs en-de,en-fr --tokens 4096

For every checkpoint (a root with ``--tag``, a tag folder, or an export file; several are a curve over
training, ordered by step) the consolidated fp32 model is loaded in this one process (no DeepSpeed engine,
``megavac.evaluation.consolidate.load_model``), its data fingerprint is checked against the data dir, and
for every language the top eigenvalue of the Hessian of that language's loss is estimated by power
iteration on Hessian-vector products (HVPs, ``torch.autograd.grad`` with ``create_graph=True``: double
backward) with respect to all trainable parameters.

What is measured, exactly:

- The loss is the training objective: label-smoothed cross entropy, mean per target token of the
  language's batch, with the smoothing of the checkpoint's run (``megavac.json`` settings →
  ``label_smoothing``; 0.1, the trainer's default, when absent; ``--label-smoothing`` overrides and
  ``--label-smoothing 0`` gives the plain NLL). The model is in eval mode: no dropout, so the function
  is deterministic and its Hessian symmetric. A model with family experts (``ModelConfig.expert_modules``)
  routes the language's rows through its family's copies, as in training; the other copies' parameters
  are in the Hessian with zero curvature.
- The batch is FIXED: the same examples for every checkpoint. The language's split (``--split``: train by
  default, the landscape training descends, as CATS measures it; dev for the held-out loss's) is permuted
  with a generator seeded by ``--seed`` and the language's name, and examples are taken in that order
  until ``--tokens`` target tokens are reached (the last one may overshoot; a split with fewer tokens is
  used whole). Their line numbers are in the JSON.
- The eigenvalue is the one of LARGEST MAGNITUDE, with its sign: what power iteration converges to
  (v ← Hv/‖Hv‖ from a seeded Gaussian start, the estimate is the Rayleigh quotient vᵀHv). This is the
  "top eigenvalue" λ_max of CATS Figure 2, where a low-resource language's becomes negative late in
  training: a negative value means the most curved direction is one of negative curvature. The plot's
  y-axis is logarithmic when every value is positive, linear otherwise. Iteration stops, converged, when
  the relative change of the estimate is below ``--tol`` and v is an eigenvector to that tolerance
  (1 − |vᵀHv|/‖Hv‖ ≤ tol; without this test two eigenvalues of opposite sign and equal magnitude give a
  stalled, wrong estimate while v oscillates), else after ``--iters`` HVPs: not converged (eigenvalues of
  nearly equal magnitude, or too few iterations), reported as such with the last estimate and its
  relative residual ‖Hv − λv‖/|λ|.

Cost. One iteration is one HVP. When the language's batch fits one forward (``--max-tokens`` padded
tokens; the default holds ``--tokens`` 2048 of ordinary sentences) the gradient's graph is built once per
checkpoint and language and kept, and an HVP is one double backward through it: 2-3× a forward+backward
over the batch. A batch split into several forwards recomputes forward, backward and double backward of
each part at every iteration: 3-4× a forward+backward, with the memory of one part. Total ≈ checkpoints ×
languages × iterations used × one HVP, plus loading each checkpoint once. Measured (fp32, vocabulary 600,
2,057 target tokens = 116 sentences in one forward unless said; CPU: 2 cores shared with other jobs, 1
intra-op thread, best of 9; GPU: one H200, torch 2.11, median of 5):

    model  params   device  tokens  forward+backward  HVP (graph kept)  HVP (recomputed)  GPU memory
    tiny    0.27M   CPU      2,057       0.13 s           0.36 s            0.51 s
    mini    1.0M    CPU      2,057       0.48 s           0.97 s            1.59 s
    mini    1.0M    H200     2,057       0.014 s          0.036 s           0.054 s          0.7 GiB
    base   44M      H200     2,057       0.042 s          0.11 s            0.16 s           7.0 GiB
    base   44M      H200     8,202       0.12 s           0.29 s            0.41 s          28.7 GiB
    big   177M      H200     4,119       0.21 s           0.47 s            0.68 s          29.9 GiB

So 28 languages × 20 iterations cost about 9 minutes per checkpoint for the mini model on 2 CPU cores and
about 1 minute for the base model on one H200. Memory grows with the tokens of one forward (and with the
vocabulary: the logits are kept for the double backward); lower ``--max-tokens`` to split the batch.
Attention runs through PyTorch's math kernel here: the fused kernels have no double backward (on CUDA the
memory-efficient one fails with "derivative for aten::_scaled_dot_product_efficient_attention_backward is
not implemented"). CPU and CUDA give the same eigenvalues (to 5e-7 relative on the test model).

Output in ``--out`` (default ``<run dir>/analysis/curvature``, the run dir being the checkpoint root's
parent): ``curvature.json`` (per checkpoint step and language: eigenvalue, iterations, converged, tokens,
loss, seconds; per language its training size from the data dir's meta.json and the examples used) and
``curvature.png``: eigenvalue against step, one curve per language (legend ordered by training size); for
a single checkpoint, a bar per language ordered by training size.
"""
from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DEFAULT_SMOOTHING = 0.1  # TrainConfig.label_smoothing's default: runs that saved no settings trained with it
EIGENVALUE_DOC = ("largest in magnitude, signed (power iteration on Hessian-vector products; the Rayleigh "
                  "quotient of the last iterate)")
JSON_NAME, PNG_NAME = "curvature.json", "curvature.png"


# ---------------------------------------------------------------- command line


def add_args(p) -> None:
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint roots (with --tag), tag folders (step_N) or export files; several give a "
                        "curve over training, ordered by step")
    p.add_argument("--tag", default=None,
                   help="for checkpoint roots: latest | best | step_N, several comma-separated, or 'all' (every "
                        "step_N folder of the root). Default: latest. Ignored for tag folders and export files")
    p.add_argument("--data-dir", default=None,
                   help="prepared data dir (default: the first checkpoint's data_dir); checked against every "
                        "checkpoint's data fingerprint")
    p.add_argument("--split", choices=("train", "dev"), default="train",
                   help="where the fixed batches come from (default train: the landscape training descends, as in "
                        "CATS; dev: the held-out loss's)")
    p.add_argument("--langs", default=None,
                   help="comma-separated languages (default: those the model was trained on)")
    p.add_argument("--tokens", type=int, default=2048, help="target tokens per language's fixed batch (default 2048)")
    p.add_argument("--max-tokens", type=int, default=16384,
                   help="padded tokens per forward; a larger batch is split into several (less memory, about 1.5x "
                        "the time per iteration). Default 16384")
    p.add_argument("--iters", type=int, default=20, help="most power iterations (HVPs) per language (default 20)")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="converged when the eigenvalue estimate changes by less than this, relatively, and the "
                        "iterate is an eigenvector to this tolerance (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch selection and of the start vector")
    p.add_argument("--label-smoothing", type=float, default=None,
                   help="override the loss's label smoothing (default: the checkpoint's training setting, else 0.1; "
                        "0 = plain NLL)")
    p.add_argument("--out", default=None, help="output folder (default <run dir>/analysis/curvature)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...; default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")


def run(args) -> int:
    """The command: checks everything a run needs before the first HVP, then measures, writes JSON and PNG."""
    _check_options(args)
    device = _device(args.device)
    sources = resolve_sources(args.checkpoints, args.tag)
    data_dir = _data_dir(args.data_dir, sources)
    from data_pipeline.indexed import load_meta, select_langs

    data_meta = load_meta(data_dir)
    names = [t["name"] for t in select_langs(data_meta, args.langs or _trained_langs(sources[0], data_meta), data_dir)]
    for src in sources:
        check_source(src, data_dir, data_meta, names)
    from megavac.data import MultilingualDataset

    ds = MultilingualDataset(str(data_dir), args.split, names)
    selections = {}
    for k, name in enumerate(names):
        if ds.sizes[k] == 0:
            raise ValueError(f"language {name} has no {args.split} examples in {data_dir}; use --split "
                             f"{'train' if args.split == 'dev' else 'dev'} or leave it out with --langs")
        selections[name] = fixed_examples(ds, k, args.tokens, args.seed)
    # Collated once, before any model is loaded: an example too long for a model is refused by name up front.
    max_positions = min(int(s.meta["model"].get("max_positions", 1024)) for s in sources)
    batches = {name: language_batches(ds, k, selections[name][0], args.max_tokens, max_positions)
               for k, name in enumerate(names)}
    train_sizes = training_sizes(data_meta, names)

    result = {
        "data_dir": str(Path(data_dir).resolve()), "split": args.split, "tokens_requested": args.tokens,
        "max_tokens": args.max_tokens, "iters": args.iters, "tol": args.tol, "seed": args.seed,
        "device": str(device), "eigenvalue": EIGENVALUE_DOC,
        "loss": "label-smoothed cross entropy, mean per target token of the language's fixed batch; eval mode "
                "(no dropout); Hessian w.r.t. all trainable parameters",
        "langs": {n: {"train_size": train_sizes[n], "split_size": int(ds.sizes[k]),
                      "examples": len(selections[n][0]), "tokens": selections[n][1],
                      "lines": [int(i) for i in selections[n][0]]} for k, n in enumerate(names)},
        "checkpoints": [],
    }
    out = Path(args.out) if args.out else default_out(sources[0])

    progress, console = _progress(args.no_progress)
    total = len(sources) * len(names) * args.iters
    with progress:
        bar = progress.add_task("curvature", total=total)
        budget = {"total": total}
        for src in sources:
            model, meta = _load(src)
            smoothing, smoothing_from = label_smoothing(meta, args.label_smoothing)
            model.to(device).eval()
            trained = meta.get("langs") or (meta.get("data_fingerprint") or {}).get("langs") or []
            entry = {"step": src.step, "tag": src.tag, "source": src.source, "kind": src.kind,
                     "label_smoothing": smoothing, "label_smoothing_from": smoothing_from,
                     "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad), "langs": {}}
            for name in names:
                progress.update(bar, description=f"step {src.step} {name}")

                def advance(_i, _lam, _bar=bar):
                    progress.advance(_bar)

                est = top_eigenvalue(model, batches[name], smoothing, args.iters, args.tol, args.seed, device, advance,
                                     lang_index=trained.index(name) if name in trained else None)
                budget["total"] -= args.iters - est["iters"]  # converged early: the bar's total shrinks
                progress.update(bar, total=budget["total"])
                entry["langs"][name] = {**est, "tokens": selections[name][1]}
                console.print(f"step {src.step} {name}: λ = {est['eigenvalue']:.6g} ({est['iters']} iterations, "
                              f"{'converged' if est['converged'] else 'NOT converged'}, {est['seconds']:.1f} s)",
                              highlight=False)
            result["checkpoints"].append(entry)
            del model
    smooth = {e["label_smoothing"] for e in result["checkpoints"]}
    result["label_smoothing"] = smooth.pop() if len(smooth) == 1 else None

    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(_finite_or_null(result), indent=1, allow_nan=False) + "\n")
    plot(result, out / PNG_NAME)
    print_table(result)
    print(f"wrote {out / JSON_NAME} and {out / PNG_NAME}")
    return 0


def _finite_or_null(x):
    """NaN/inf (a diverged checkpoint) as JSON null: strict JSON has no NaN."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_null(v) for v in x]
    return x


def _check_options(args) -> None:
    if args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.iters < 1:
        raise ValueError(f"--iters must be >= 1, got {args.iters}")
    if not args.tol > 0:
        raise ValueError(f"--tol must be > 0, got {args.tol}")
    if args.label_smoothing is not None and not 0.0 <= args.label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return dev


# ---------------------------------------------------------------- checkpoints


@dataclass
class Source:
    """One model to measure: where it is and what its metadata says (weights are loaded later, one at a time)."""
    path: Path
    tag: str  # the tag folder's name, or an export file's stem
    source: str  # the tag folder or the file: what messages name
    step: int | None
    meta: dict = field(repr=False)
    kind: str = "checkpoint"  # or "export"


def resolve_sources(paths, tag: str | None) -> list[Source]:
    """The models ``paths`` name, ordered by step; reads metadata only (export files are read whole).

    ValueError for a missing path, a tag folder without ``megavac.json``, the same checkpoint or step twice,
    and several models of which one has no step (an averaged export).
    """
    from megavac.evaluation.consolidate import read_meta, resolve_checkpoint

    tags = [t.strip() for t in tag.split(",") if t.strip()] if tag else [None]
    out = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            from megavac.evaluation.consolidate import load_model

            model, meta = load_model(p)  # the export's meta is inside the weights file
            del model
            out.append(Source(p, meta["tag"], meta["source"], meta.get("step"), meta, "export"))
            continue
        if not p.exists():
            raise ValueError(f"checkpoint {str(p)!r} does not exist")
        if _is_tag_dir(p):
            wanted = [None]
        elif tags == ["all"]:
            wanted = sorted((d.name for d in p.iterdir() if d.is_dir() and d.name.startswith("step_")
                             and (d / "megavac.json").is_file()), key=_tag_step)
            if not wanted:
                raise ValueError(f"--tag all: checkpoint root {str(p)!r} has no step_N folder with megavac.json")
        else:
            wanted = tags
        for t in wanted:
            root, resolved = resolve_checkpoint(p, t)
            meta = read_meta(root / resolved)
            step = meta.get("step", _tag_step(resolved))
            out.append(Source(root / resolved, resolved, str((root / resolved).resolve()), step, meta))
    seen = {}
    for s in out:
        if s.source in seen:
            raise ValueError(f"checkpoint {s.source!r} is given twice")
        seen[s.source] = s
    if len(out) > 1:
        nostep = [s.source for s in out if s.step is None]
        if nostep:
            raise ValueError(f"{nostep[0]!r} has no training step (an averaged export?); a curve over training "
                             "needs one per model: measure it alone")
        by_step = {}
        for s in out:
            if s.step in by_step:
                raise ValueError(f"{by_step[s.step].source!r} and {s.source!r} are both step {s.step}; a curve over "
                                 "training takes one checkpoint per step (measure other runs separately)")
            by_step[s.step] = s
        out.sort(key=lambda s: s.step)
    return out


def _is_tag_dir(p: Path) -> bool:
    # consolidate.resolve_checkpoint's rule: a folder with megavac.json or DeepSpeed model states is a tag folder.
    return (p / "megavac.json").is_file() or any(p.glob("*_model_states.pt"))


def _tag_step(tag: str) -> int | None:
    try:
        return int(tag.rsplit("_", 1)[1]) if tag.startswith("step_") else None
    except ValueError:
        return None


def _load(src: Source):
    from megavac.evaluation.consolidate import load_model

    return load_model(src.path, None)


def _data_dir(given, sources: list[Source]) -> Path:
    data_dir = given or sources[0].meta.get("data_dir")
    if not data_dir:
        raise ValueError(f"{sources[0].source}: its metadata names no data_dir; pass --data-dir (the prepared data "
                         "it was trained on)")
    if not Path(data_dir).is_dir():
        if given:
            raise ValueError(f"data dir {str(data_dir)!r} (--data-dir) does not exist")
        raise ValueError(f"data dir {str(data_dir)!r}, named by {sources[0].source}, does not exist (moved?); pass "
                         "--data-dir")
    return Path(data_dir)


def _trained_langs(src: Source, data_meta: dict) -> list[str] | None:
    trained = src.meta.get("langs") or (src.meta.get("data_fingerprint") or {}).get("langs")
    if not trained:
        return None
    have = {t["name"] for t in data_meta["tasks"]}
    return [n for n in trained if n in have] or None


def check_source(src: Source, data_dir, data_meta: dict, names: list[str]) -> None:
    """ValueError naming the checkpoint when ``data_dir`` is not its data (fingerprint, vocabulary, padding)
    or it was not trained on one of ``names``."""
    from megavac.fingerprint import check_data_fingerprint

    check_data_fingerprint(src.meta.get("data_fingerprint"), data_dir, what=f"checkpoint {src.source}", names=names)
    model = src.meta["model"]
    for key in ("vocab_size", "pad_id"):
        if key in model and data_meta[key] != model[key]:
            raise ValueError(f"data dir {data_dir} has {key}={data_meta[key]}, checkpoint {src.source} has "
                             f"{model[key]}: not the data it was trained on")


def label_smoothing(meta: dict, override: float | None) -> tuple[float, str]:
    """(smoothing, where it came from): ``override``, the run's settings, or the trainer's default."""
    if override is not None:
        return float(override), "--label-smoothing"
    settings = meta.get("settings") or {}  # export files carry no training settings
    if settings.get("label_smoothing") is not None:
        return float(settings["label_smoothing"]), "checkpoint settings"
    return DEFAULT_SMOOTHING, f"default: the {meta.get('kind') or 'checkpoint'} records no label_smoothing setting"


def default_out(src: Source) -> Path:
    """``<run dir>/analysis/curvature``: the run dir is the checkpoint root's parent (an export's folder)."""
    if src.kind == "export":
        return src.path.resolve().parent / "analysis" / "curvature"
    return src.path.resolve().parent.parent / "analysis" / "curvature"


# ---------------------------------------------------------------- data


def fixed_examples(ds, k: int, tokens: int, seed: int) -> tuple[np.ndarray, int]:
    """(line indices, target tokens) of language ``k``'s fixed batch: the split in an order seeded by ``seed``
    and the language's name (not its position, so ``--langs`` does not change it), taken until ``tokens``
    target tokens (the target and its end-of-sentence token, what the loss averages over)."""
    name = ds.names[k]
    order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(int(ds.sizes[k]))
    tgt = ds.tgt_len[k][order]
    n = int(np.searchsorted(np.cumsum(tgt), tokens)) + 1  # first prefix reaching `tokens`
    n = min(n, len(order))
    return order[:n], int(tgt[:n].sum())


def language_batches(ds, k: int, idx: np.ndarray, max_tokens: int, max_positions: int) -> list:
    """Language ``k``'s examples ``idx`` as length-sorted batches of at most ``max_tokens`` padded tokens."""
    from megavac.data import collate, pack_by_length

    items = [(k, int(i)) for i in idx]
    return [collate(ds, b, max_positions) for b in pack_by_length(items, ds.example_len(k, idx), max_tokens)]


def training_sizes(data_meta: dict, names: list[str]) -> dict[str, int]:
    """Training pairs per language after filtering (meta.json ``pairs[pair]["train"]``)."""
    by_name = {t["name"]: t for t in data_meta["tasks"]}
    out = {}
    for n in names:
        info = data_meta["pairs"].get(by_name[n]["pair"], {})
        out[n] = int(info.get("train", info.get("train_raw", 0)))
    return out


# ---------------------------------------------------------------- Hessian


def _sdpa_math():
    """Attention through the math kernel: the fused CPU/GPU kernels have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def batch_loss(model, batch, smoothing: float, total_tokens: int, lang_index: int | None = None) -> torch.Tensor:
    """Summed label-smoothed token loss of ``batch`` divided by ``total_tokens`` (the whole fixed batch's
    target tokens): the parts' values and Hessians add up to those of the mean per token. ``lang_index``: the
    batch's language index in the model's training order, which a model with family experts routes by."""
    from megavac.loss import token_losses

    if getattr(model.cfg, "experts", ()):
        if lang_index is None:
            raise ValueError("this model has family experts: pass the language's index in its training order")
        lang = torch.full((batch.src.shape[0],), lang_index, dtype=torch.long, device=batch.src.device)
        logits = model(batch.src, batch.tgt_in, lang)
    else:
        logits = model(batch.src, batch.tgt_in)
    loss, _ = token_losses(logits, batch.tgt_out, model.cfg.pad_id, smoothing)
    return loss.sum() / total_tokens


class HessianOperator:
    """v ↦ Hv for the Hessian of the mean per-token loss of ``batches`` w.r.t. ``params``.

    One batch: the gradient is computed once with ``create_graph=True`` and kept; each product is one
    double backward through it. Several: each product recomputes every part (memory of one part).
    """

    def __init__(self, model, batches, smoothing: float, device, params: list[torch.Tensor] | None = None,
                 lang_index: int | None = None):
        self.model, self.smoothing, self.lang_index = model, smoothing, lang_index
        self.params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.batches = [b.to(device) for b in batches]
        self.total = sum(int(b.ntokens) for b in self.batches)
        self._grads = None
        self.loss = None
        if len(self.batches) == 1:
            with _sdpa_math():
                loss = batch_loss(model, self.batches[0], smoothing, self.total, lang_index)
                self._grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            self.loss = float(loss.detach())

    def _product(self, grads, v) -> list[torch.Tensor]:
        pairs = [(g, vi, i) for i, (g, vi) in enumerate(zip(grads, v)) if g is not None and g.requires_grad]
        hv = [torch.zeros_like(p) for p in self.params]
        if pairs:
            out = torch.autograd.grad([g for g, _, _ in pairs], self.params, grad_outputs=[vi for _, vi, _ in pairs],
                                      retain_graph=self._grads is not None, allow_unused=True)
            hv = [h if o is None else o.detach() for h, o in zip(hv, out)]
        return hv

    def __call__(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        with _sdpa_math():
            if self._grads is not None:
                return self._product(self._grads, v)
            total, loss_sum = None, 0.0
            for b in self.batches:
                loss = batch_loss(self.model, b, self.smoothing, self.total, self.lang_index)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                hv = self._product(grads, v)
                total = hv if total is None else [t + h for t, h in zip(total, hv)]
                loss_sum += float(loss.detach())
            self.loss = loss_sum
            return total


def power_iteration(hvp, shapes_like: list[torch.Tensor], iters: int, tol: float, seed: int = 0,
                    callback=None) -> dict:
    """Dominant eigenvalue (largest magnitude, signed) of the symmetric operator ``hvp`` on tensors shaped like
    ``shapes_like``: v ← Hv/‖Hv‖ from a Gaussian start seeded by ``seed`` (drawn on the CPU, so every device
    starts from the same vector), estimate vᵀHv with ‖v‖ = 1, stopping when it changes by less than ``tol``
    relatively AND v is an eigenvector to the same tolerance (1 − |vᵀHv|/‖Hv‖ ≤ ``tol``: the ratio is 1 exactly
    for an eigenvector). The second test matters: with two eigenvalues of equal magnitude and opposite sign the
    estimate stalls at a wrong value while v oscillates between them. Returns {"eigenvalue", "iters",
    "converged", "residual" (‖Hv − λv‖/|λ| of the last iterate), "history"}."""
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype) for t in shapes_like]
    norm = math.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    lam, history, converged, residual = None, [], False, math.nan
    for i in range(1, iters + 1):
        hv = hvp(v)
        new = _dot(v, hv)  # Rayleigh quotient
        history.append(new)
        if callback is not None:
            callback(i, new)
        hnorm = math.sqrt(_dot(hv, hv))
        if hnorm == 0.0 or not math.isfinite(hnorm):  # a zero operator (λ = 0 exactly) or a broken model
            lam, converged, residual = new, hnorm == 0.0, 0.0 if hnorm == 0.0 else math.nan
            break
        # ‖Hv‖² = λ² + ‖Hv − λv‖²: the relative residual comes free, and is 0 exactly for an eigenvector.
        residual = math.sqrt(max(hnorm * hnorm - new * new, 0.0)) / max(abs(new), 1e-300)
        aligned = 1.0 - abs(new) / hnorm <= tol  # cos(v, Hv) within tol of ±1
        if lam is not None and abs(new - lam) <= tol * abs(lam) and aligned:
            lam, converged = new, True
            break
        lam = new
        v = [x / hnorm for x in hv]
    return {"eigenvalue": lam, "iters": len(history), "converged": converged, "residual": residual,
            "history": history}


def top_eigenvalue(model, batches, smoothing: float, iters: int = 20, tol: float = 1e-3, seed: int = 0,
                   device="cpu", callback=None, params: list[torch.Tensor] | None = None,
                   lang_index: int | None = None) -> dict:
    """Power iteration on the Hessian of the mean per-token loss of ``batches`` (one language's fixed batch, as
    ``language_batches`` makes it) w.r.t. ``params`` (default: all trainable parameters), model in eval mode.
    ``lang_index``: the language's index in the model's training order (a model with family experts routes
    its rows by it; the other family's copies then have zero curvature). Returns {"eigenvalue", "iters",
    "converged", "residual", "loss", "seconds", "seconds_per_hvp", "history"}."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        op = HessianOperator(model, batches, smoothing, device, params, lang_index)
        est = power_iteration(op, op.params, iters, tol, seed, callback)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    return {**est, "loss": op.loss, "seconds": round(seconds, 4),
            "seconds_per_hvp": round(seconds / max(est["iters"], 1), 5)}


# ---------------------------------------------------------------- output


def _progress(disabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("HVPs"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                        disable=disabled, transient=False)
    return progress, console


def _ordered_langs(result: dict) -> list[str]:
    """Languages by training size, largest first (ties: name)."""
    return sorted(result["langs"], key=lambda n: (-result["langs"][n]["train_size"], n))


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    steps = result["checkpoints"]
    print(f"top Hessian eigenvalue per language, {result['split']} split (largest in magnitude, signed; "
          "* = not converged within --iters)")
    table = Table()
    table.add_column("language")
    table.add_column("train", justify="right")
    for e in steps:
        table.add_column(f"step {e['step']}" if e["step"] is not None else e["tag"], justify="right")
    for n in _ordered_langs(result):
        cells = []
        for e in steps:
            r = e["langs"][n]
            cells.append(f"{r['eigenvalue']:.4g}" + ("" if r["converged"] else "*"))
        table.add_row(n, f"{result['langs'][n]['train_size']:,}", *cells)
    Console().print(table)


def plot(result: dict, path) -> list[str]:
    """Write the PNG; returns the plotted series' labels (one per language)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.MaxNLocator)

    langs = _ordered_langs(result)
    cks = result["checkpoints"]
    values = [e["langs"][n]["eigenvalue"] for e in cks for n in langs]
    positive = all(v is not None and v > 0 for v in values)
    sizes = [result["langs"][n]["train_size"] for n in langs]
    cmap = plt.get_cmap("viridis")
    logs = np.log10(np.maximum(sizes, 1))
    lo, hi = float(logs.min()), float(logs.max())
    span = (hi - lo) / 0.85 if hi > lo else 1.0  # the colour scale's top 15% (pale yellow) is left out
    colors = [cmap((x - lo) / span) for x in logs]
    labels = [f"{n} ({s:,} train)" for n, s in zip(langs, sizes)]
    smoothing = result.get("label_smoothing")
    what = (f"{result['split']} split, {result['tokens_requested']} target tokens per language, label smoothing "
            f"{smoothing if smoothing is not None else 'per checkpoint'}")

    fig, ax = plt.subplots(figsize=(max(6.5, 0.45 * len(langs) + 3) if len(cks) == 1 else 8, 5))
    if len(cks) == 1:
        e = cks[0]
        vals = [e["langs"][n]["eigenvalue"] for n in langs]
        bars = ax.bar(range(len(langs)), vals, color=colors)
        for b, n in zip(bars, langs):
            if not e["langs"][n]["converged"]:
                b.set_hatch("//")
        ax.set_xticks(range(len(langs)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_xlabel("language (ordered by training size; hatched: not converged)")
        ax.set_title(f"Top Hessian eigenvalue per language, step {e['step']}\n{what}", fontsize=10)
    else:
        steps = [e["step"] for e in cks]
        for n, c, label in zip(langs, colors, labels):
            ys = [e["langs"][n]["eigenvalue"] for e in cks]
            conv = [e["langs"][n]["converged"] for e in cks]
            ax.plot(steps, ys, "-", color=c, label=label)
            ax.scatter([s for s, ok in zip(steps, conv) if ok], [y for y, ok in zip(ys, conv) if ok], color=c, s=18)
            ax.scatter([s for s, ok in zip(steps, conv) if not ok], [y for y, ok in zip(ys, conv) if not ok],
                       facecolors="none", edgecolors=c, s=30)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("training step (hollow markers: not converged)")
        ax.set_title(f"Top Hessian eigenvalue per language over training\n{what}", fontsize=10)
        if len(langs) <= 12:
            ax.legend(fontsize=7, title="language (train pairs)", title_fontsize=7)
        else:
            sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(lo, lo + span))
            fig.colorbar(sm, ax=ax, label="log10 training pairs")
    ax.set_ylabel("λ_max (largest |eigenvalue|, signed)")
    if positive:
        ax.set_yscale("log")
    else:
        ax.axhline(0.0, color="0.6", lw=0.8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return labels
