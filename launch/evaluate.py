"""Evaluate a megavac checkpoint: beam-search the dev/test sets, score BLEU/chrF per direction.

    python launch/evaluate.py --checkpoint runs/x/checkpoints --tag best --split test --out results.json
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console

from megavac.evaluation.consolidate import load_model_from_checkpoint
from megavac.evaluation.generate import SearchConfig
from megavac.evaluation.evaluate import EvalOptions, Thresholds, evaluate, make_progress, render_table, write_json


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint root (with latest/best files) or a tag folder")
    ap.add_argument("--tag", default=None, help="latest (default), best or step_N; ignored for a tag folder")
    ap.add_argument("--data-dir", default=None, help="prepared data dir (default: data_dir from megavac.json)")
    ap.add_argument("--split", choices=("test", "dev"), default="test")
    ap.add_argument("--langs", default=None, help="comma-separated directions, e.g. en-de,en-fr (default: all)")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--lenpen", type=float, default=1.0)
    ap.add_argument("--max-len-a", type=float, default=1.2)
    ap.add_argument("--max-len-b", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=4000, help="padded source tokens per batch")
    ap.add_argument("--low-threshold", type=int, default=100_000, help="low resource: fewer training pairs")
    ap.add_argument("--high-threshold", type=int, default=1_000_000, help="high resource: at least this many")
    ap.add_argument("--out", default=None, help="write results JSON here")
    ap.add_argument("--out-dir", default=None, help="hypothesis files (default: --out's folder, else <run>/eval/<tag>)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return ap.parse_args(argv)


def default_out_dir(meta) -> Path:
    # runs/x/checkpoints/step_N -> runs/x/eval/step_N: outside the tag folders the trainer prunes.
    return Path(meta["checkpoint_root"]).parent / "eval" / meta["tag"]


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except ValueError as e:  # user errors (bad path, tag, task, data dir): a message, not a traceback
        sys.exit(f"evaluate.py: error: {e}")


def run(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_model_from_checkpoint(args.checkpoint, args.tag)
    data_dir = args.data_dir or meta.get("data_dir")
    if not data_dir:
        raise ValueError(f"{meta['checkpoint_dir']}/megavac.json has no data_dir; pass --data-dir")
    out_dir = args.out_dir or (Path(args.out).parent if args.out else default_out_dir(meta))
    opts = EvalOptions(
        split=args.split,
        max_tokens=args.max_tokens,
        device=device,
        thresholds=Thresholds(args.low_threshold, args.high_threshold),
        search=SearchConfig(beam=args.beam, lenpen=args.lenpen, max_len_a=args.max_len_a, max_len_b=args.max_len_b),
    )
    with make_progress(Console(stderr=True)) as progress:
        results = evaluate(model, data_dir, out_dir, args.langs, opts, progress)
    results = {"checkpoint": meta["checkpoint_dir"], "tag": meta["tag"], "step": meta.get("step"), **results}
    render_table(results, Console())
    if args.out:
        write_json(results, args.out)


if __name__ == "__main__":
    main()
