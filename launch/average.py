"""Average the weights of several checkpoints of one run (as fairseq's average_checkpoints.py) into an export file.

    python launch/average.py --checkpoint runs/x/checkpoints --last 5 --out models/x_avg5.pt [--dtype bf16]
    python launch/average.py --checkpoint runs/x/checkpoints --tags step_8000,step_9000,best --out models/x.pt
"""
from __future__ import annotations

import argparse
import sys

from megavac.evaluation.average import average_to_export
from megavac.evaluation.export import DTYPES, summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint root (the run's checkpoints/ folder)")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--last", type=int, help="average the newest N step checkpoints")
    which.add_argument("--tags", help="average these comma-separated tags (step_N, latest, best)")
    ap.add_argument("--out", required=True, help="the export file to write")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="of the stored weights (averaged in fp64)")
    ap.add_argument("--data-dir", default=None, help="prepared data dir (default: data_dir from megavac.json)")
    args = ap.parse_args(argv)
    try:
        exp = average_to_export(args.checkpoint, args.out, args.last, args.tags, args.data_dir, args.dtype)
    except ValueError as e:
        sys.exit(f"average.py: error: {e}")
    print(summary(exp, args.out))


if __name__ == "__main__":
    main()
