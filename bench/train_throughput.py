"""Training throughput on 1 and 2 ranks, side by side in one run.

    python bench/train_throughput.py [--steps 60] [--model mini] [--ds ds_configs/zero2.json]

Trains on the default synthetic corpus (prepared on first use) through the deepspeed launcher and
reads target tokens/s from each run's metrics.jsonl, skipping the first logging window (warm-up,
JIT builds). Prints tokens/s per layout and the 2-rank/1-rank ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from megavac.distributed import free_port

REPO = Path(__file__).resolve().parents[1]



def run(nproc: int, args, save: Path) -> float:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
           str(free_port()), "launch/train.py", "--ds_config", args.ds, "--model", args.model,
           "--max-steps", str(args.steps), "--log-interval", str(args.steps // 6), "--valid-interval", "1000000",
           "--save-interval", "1000000", "--max-tokens", str(args.max_tokens), "--save-dir", str(save)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recs = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"][1:]
    tokens = sum(r["tokens"] for r in train)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in train)
    return tokens / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--ds", default="ds_configs/zero2.json")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--data-dir", default="", help="prepared data (default: the synthetic corpus)")
    args = ap.parse_args()
    if not args.data_dir:
        from data_pipeline.default_corpus import ensure_prepared_synthetic

        args.data_dir = str(ensure_prepared_synthetic(REPO / "runs" / "data" / "synthetic", quiet=True))
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: run(n, args, Path(tmp) / f"r{n}") for n in (1, 2)}
    print(f"{'ranks':>5} {'target tok/s':>13}  (model {args.model}, {args.ds}, --max-tokens {args.max_tokens} per rank)")
    for n, tps in results.items():
        print(f"{n:>5} {tps:>13,.0f}")
    print(f"2-rank / 1-rank throughput ratio: {results[2] / results[1]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
