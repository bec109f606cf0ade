"""Write one checkpoint as a single export file: weights (fp32 or bf16), model config, SentencePiece model,
languages, data fingerprint and provenance (format: megavac/evaluation/export.py).

    python launch/export.py --checkpoint runs/x/checkpoints --tag best --out models/x.pt [--dtype bf16]
"""
from __future__ import annotations

import argparse
import sys

from megavac.evaluation.export import DTYPES, export_checkpoint, summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint root (with latest/best files) or a tag folder")
    ap.add_argument("--tag", default=None, help="latest (default), best or step_N; ignored for a tag folder")
    ap.add_argument("--out", required=True, help="the export file to write")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="of the stored weights")
    ap.add_argument("--data-dir", default=None, help="prepared data dir (default: data_dir from megavac.json)")
    args = ap.parse_args(argv)
    try:
        exp = export_checkpoint(args.checkpoint, args.out, args.tag, args.data_dir, args.dtype)
    except ValueError as e:
        sys.exit(f"export.py: error: {e}")
    print(summary(exp, args.out))


if __name__ == "__main__":
    main()
