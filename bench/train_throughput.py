"""End-to-end training throughput through the real entry point, side by side in one run.

    python bench/train_throughput.py [--steps 60] [--model mini] [--ds ds_configs/zero2.json]
    python bench/train_throughput.py --methods monolithic gradvac --ranks 1 2 --data-dir runs/data/tatoeba

Trains on the default synthetic corpus (prepared on first use) or ``--data-dir`` through the deepspeed
launcher, once per (method, ranks), and reads target tokens/s from each run's metrics.jsonl, skipping
the first logging window (warm-up, JIT builds). Prints tokens/s per run, each method's ratio to
monolithic training at the same rank count, and the 2-rank/1-rank ratio. Ranks run one thread each
(``OMP_NUM_THREADS=1``) so that two ranks do not oversubscribe a small machine.
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


def run(nproc: int, label: str, args, save: Path) -> tuple[float, float]:
    """(target tokens/s, languages present per step on average) of one training run; ``label`` is a
    method, optionally with its own flags after colons (``gradvac:--lang-affine``)."""
    method, *own = label.split(":")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
           str(free_port()), "launch/train.py", "--ds_config", args.ds, "--model", args.model,
           "--max-steps", str(args.steps), "--log-interval", str(max(1, args.steps // 6)),
           "--lang-log-interval", str(max(1, args.steps // 6)), "--valid-interval", "1000000",
           "--save-interval", "1000000", "--max-tokens", str(args.max_tokens), "--save-dir", str(save),
           "--method", method, *own, *args.extra]
    if method != "monolithic":
        cmd += ["--granularity", args.granularity]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}")
    recs = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"][1:]
    tokens = sum(r["tokens"] for r in train)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in train)
    present = [sum(r["present"].values()) for r in recs if r["kind"] == "method" and "present" in r]
    return tokens / seconds, (sum(present) / len(present) if present else float("nan"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--ds", default="ds_configs/zero2.json")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--data-dir", default="", help="prepared data (default: the synthetic corpus)")
    ap.add_argument("--methods", nargs="+", default=["monolithic"],
                    help="e.g. monolithic gradvac gradvac:--lang-affine (flags of one run after colons)")
    ap.add_argument("--granularity", default="all_layer", help="for the per-language methods")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further launch/train.py flags")
    args = ap.parse_args()
    if not args.data_dir:
        from data_pipeline.default_corpus import ensure_prepared_synthetic

        args.data_dir = str(ensure_prepared_synthetic(REPO / "runs" / "data" / "synthetic", quiet=True))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            for m in args.methods:
                results[m, n] = run(n, m, args, Path(tmp) / f"{m}{n}")
                print(f"  {m} on {n} rank(s): {results[m, n][0]:,.0f} target tok/s", flush=True)
    print(f"\n{'method':<24} {'ranks':>5} {'target tok/s':>13} {'/ mono':>7} {'langs/step':>10}  "
          f"(model {args.model}, {args.ds}, --max-tokens {args.max_tokens} per rank, {args.data_dir})")
    for (m, n), (tps, langs) in results.items():
        mono = results.get(("monolithic", n), (float("nan"),))[0]
        print(f"{m:<24} {n:>5} {tps:>13,.0f} {tps / mono:>7.2f} {langs:>10.1f}")
    for m in args.methods:
        if (m, 1) in results and (m, 2) in results:
            print(f"{m}: 2-rank / 1-rank throughput ratio {results[m, 2][0] / results[m, 1][0]:.2f} "
                  f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
