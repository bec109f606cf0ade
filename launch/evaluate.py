"""Evaluate a megavac checkpoint or export: beam-search the dev/test sets, score BLEU/chrF per direction.

    python launch/evaluate.py --checkpoint runs/x/checkpoints --tag best --split test --out results.json
    python launch/evaluate.py --checkpoint runs/x/checkpoints --average-last 5       # mean of the newest 5
    python launch/evaluate.py --checkpoint model.pt --data-dir data/opus100          # an export file

The data dir must be the one the model was trained on (its data fingerprint): another is refused by name.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console

from megavac.evaluation.consolidate import load_model
from megavac.evaluation.generate import SearchConfig
from megavac.evaluation.evaluate import (EvalOptions, Thresholds, evaluate, make_progress, model_langs, render_table,
                                         write_json)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", "--model", required=True,
                    help="checkpoint root (with latest/best files), a tag folder, or an export file (launch/export.py, "
                         "launch/average.py)")
    ap.add_argument("--tag", default=None, help="latest (default), best or step_N; ignored for a tag folder")
    avg = ap.add_mutually_exclusive_group()
    avg.add_argument("--average-last", type=int, default=None, metavar="N",
                     help="evaluate the average of the newest N step checkpoints of the --checkpoint root")
    avg.add_argument("--average-tags", default=None, metavar="TAGS",
                     help="evaluate the average of these comma-separated tags of the --checkpoint root")
    ap.add_argument("--data-dir", default=None,
                    help="prepared data dir (default: data_dir from megavac.json, or the export's); must be the data "
                         "the model was trained on")
    ap.add_argument("--split", choices=("test", "dev"), default="test")
    ap.add_argument("--langs", default=None,
                    help="comma-separated directions, e.g. en-de,en-fr (default: all the model was trained on)")
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
    if meta["kind"] == "export":  # models/x.pt -> models/eval/x
        return Path(meta["source"]).parent / "eval" / meta["tag"]
    # runs/x/checkpoints/step_N -> runs/x/eval/step_N: outside the tag folders the trainer prunes.
    return Path(meta["checkpoint_root"]).parent / "eval" / meta["tag"]


def load(args):
    """(model, meta) of a checkpoint, an export file, or the average of several checkpoints."""
    if args.average_last is not None or args.average_tags:
        from megavac.evaluation.average import averaged_model

        if args.tag is not None:
            raise ValueError("--tag selects one checkpoint; with --average-last/--average-tags drop it")
        model, meta, _ = averaged_model(args.checkpoint, args.average_last, args.average_tags)
        return model, meta
    return load_model(args.checkpoint, args.tag)


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
    model, meta = load(args)
    data_dir = args.data_dir or meta.get("data_dir")
    if not data_dir:
        raise ValueError(f"{meta['source']} names no data_dir; pass --data-dir")
    if not args.data_dir and not Path(data_dir).is_dir():
        raise ValueError(f"data dir {data_dir} (named by {meta['source']}) does not exist here; pass --data-dir")
    langs = model_langs(meta, data_dir, args.langs)
    out_dir = args.out_dir or (Path(args.out).parent if args.out else default_out_dir(meta))
    opts = EvalOptions(
        split=args.split,
        max_tokens=args.max_tokens,
        device=device,
        thresholds=Thresholds(args.low_threshold, args.high_threshold),
        search=SearchConfig(beam=args.beam, lenpen=args.lenpen, max_len_a=args.max_len_a, max_len_b=args.max_len_b),
    )
    with make_progress(Console(stderr=True)) as progress:
        results = evaluate(model, data_dir, out_dir, langs, opts, progress, meta.get("data_fingerprint"),
                           meta["source"])
    results = {"checkpoint": meta["checkpoint_dir"], "tag": meta["tag"], "step": meta.get("step"), "kind": meta["kind"],
               **({"averaged": meta["averaged"]} if "averaged" in meta else {}), **results}
    render_table(results, Console())
    if args.out:
        write_json(results, args.out)


if __name__ == "__main__":
    main()
