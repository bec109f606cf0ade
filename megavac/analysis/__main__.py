"""python -m megavac.analysis <command> ...

    similarity RUN_DIR      figures from a run's Gram logs (cosine heatmaps, per-layer curves, dendrogram)
    curvature CHECKPOINT... top Hessian eigenvalue per language (power iteration), PNG + JSON
    compare EVAL_JSON...    per-language BLEU/chrF of evaluated runs side by side, deltas, PNG
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> module of megavac.analysis; each module has add_args(parser) and run(args) -> int
COMMANDS = {"similarity": "similarity", "curvature": "curvature", "compare": "compare"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megavac.analysis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f"megavac.analysis.{module}")
        modules[name] = mod
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0],
                           description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
    args = ap.parse_args(argv)
    try:
        return modules[args.command].run(args) or 0
    except ValueError as e:  # user errors: one line naming what is wrong
        print(f"python -m megavac.analysis {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
