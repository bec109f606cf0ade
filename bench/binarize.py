"""Benchmark of validation + binarization throughput and peak memory.

    python bench/binarize.py [--pairs 2000000] [--workers N] [--work DIR]

Generates a synthetic corpus of ``--pairs`` sentence pairs (8 languages, one per family,
so 8 scripts), plus a corpus 4x smaller made of the first quarter of every file, trains
one SentencePiece model, then scans and binarizes each corpus with ``--workers``
processes, each run in a fresh subprocess so that its peak RSS is its own. Prints
throughput and peak RSS (getrusage: RUSAGE_SELF for the main process, RUSAGE_CHILDREN
for the largest worker) for both sizes and their ratio: streaming means peak memory
should not grow with corpus size (ratio ~1).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# This orchestrating process imports only the standard library and runs every heavy step in
# a subprocess: on Linux a child's ru_maxrss starts from its parent's RSS at fork/exec
# time, so a big orchestrator would inflate the numbers being measured.


def bench_langs() -> list[str]:
    from data_pipeline.synthetic import build_languages

    return [lang.code for lang in build_languages(0) if lang.code.endswith("a")]  # one per family


def make_corpora(work: Path, pairs: int, workers: int) -> tuple[Path, Path]:
    """The full corpus and a 4x smaller one (first quarter of every file)."""
    from data_pipeline.synthetic import generate_corpus

    large, small = work / "large", work / "small"
    langs = bench_langs()
    per_lang = pairs // len(langs)
    generate_corpus(large, seed=0, dev_size=1000, test_size=0, langs=langs,
                    sizes={c: per_lang for c in langs}, workers=workers)
    for src in large.glob("*-en/*"):
        dst = small / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            n = sum(1 for _ in fin) // 4
            fin.seek(0)
            for _ in range(n):
                fout.write(fin.readline())
    return large, small


def train_model(corpus: Path, work: Path, vocab_size: int, workers: int) -> Path:
    from data_pipeline import spm as spm_lib
    from data_pipeline.binarize import worker_pool
    from data_pipeline.corpus import discover

    c = discover(corpus)
    files = {p.code: [(str(p.splits["train"].xx), 0)] for p in c.pairs}
    files["en"] = [(str(p.splits["train"].en), 0) for p in c.pairs]
    for lang, fs in files.items():  # line counts for the sampler
        files[lang] = [(path, sum(1 for _ in open(path, "rb"))) for path, _ in fs]
    sizes = {lang: sum(n for _, n in fs) for lang, fs in files.items()}
    counts = spm_lib.temperature_counts(sizes, 5.0, min(200_000, sum(sizes.values())))
    with worker_pool(workers) as pool:
        report = spm_lib.write_sample(files, counts, work / "sample.txt", pool)
    written = sum(r["written"] for r in report.values())
    spm_lib.train(work / "sample.txt", work / "spm", vocab_size, [p.code for p in c.pairs], workers, written)
    return work / "spm.model"


def measure(corpus: Path, model: Path, out: Path, workers: int, chunk_lines: int) -> dict:
    """One scan + binarize run; called in a fresh process (``--step measure``)."""
    from data_pipeline.binarize import binarize_corpus, scan_corpus, worker_pool
    from data_pipeline.corpus import FilterLimits, discover

    t0 = time.perf_counter()
    c = discover(corpus)
    with worker_pool(workers) as pool:
        scans = scan_corpus(c, chunk_lines, pool)
        t1 = time.perf_counter()
        stats = binarize_corpus(scans, model, out, "uint16", FilterLimits(), pool)
    t2 = time.perf_counter()
    pairs = sum(s.lines for splits in stats.values() for s in splits.values())
    kb = 1024  # ru_maxrss is in KiB on Linux
    return {
        "pairs": pairs, "scan_s": t1 - t0, "encode_s": t2 - t1, "total_s": t2 - t0,
        "bytes": sum(f.stat().st_size for f in corpus.rglob("*-en/*")),
        "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb,
        "rss_child_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kb,
    }


def run_step(*args: str) -> str:
    """Run ``bench/binarize.py --step ...`` in a fresh process; returns its last stdout line."""
    res = subprocess.run([sys.executable, __file__, "--step", *args], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"step {args[0]} failed:\n{res.stderr}")
    return res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""


def report(name: str, r: dict, workers: int) -> None:
    sents = 2 * r["pairs"]  # both sides are encoded
    print(f"{name:>6}: {r['pairs']:>9,} pairs  {r['bytes'] / 2**20:7.1f} MiB  scan {r['scan_s']:6.1f}s  "
          f"encode {r['encode_s']:6.1f}s  total {r['total_s']:6.1f}s")
    print(f"{'':>6}  {r['pairs'] / r['total_s']:>9,.0f} pairs/s  {sents / r['total_s']:>9,.0f} sentences/s  "
          f"{sents / r['total_s'] / workers:>9,.0f} sentences/s/core")
    print(f"{'':>6}  peak RSS: main {r['rss_main_mb']:.0f} MiB, largest worker {r['rss_child_mb']:.0f} MiB, "
          f"main + {workers} workers <= {r['rss_main_mb'] + workers * r['rss_child_mb']:.0f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2_000_000, help="sentence pairs in the large corpus")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--chunk-lines", type=int, default=50_000)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--work", help="working directory (default: a temporary one, deleted afterwards)")
    ap.add_argument("--step", choices=("generate", "train", "measure"), help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        return do_step(args)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_binarize_"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--work", str(work), "--workers", str(args.workers)]
    try:
        t = time.perf_counter()
        run_step("generate", "--pairs", str(args.pairs), *common)
        print(f"generated {args.pairs:,} + {args.pairs // 4:,} pairs in {time.perf_counter() - t:.0f}s", flush=True)
        t = time.perf_counter()
        run_step("train", "--vocab-size", str(args.vocab_size), *common)
        print(f"trained SentencePiece (vocab <= {args.vocab_size}) in {time.perf_counter() - t:.0f}s", flush=True)
        results = {}
        for name in ("small", "large"):
            results[name] = json.loads(run_step("measure", "--corpus", name, "--chunk-lines",
                                                str(args.chunk_lines), *common))
        print(f"\nscan + binarize with {args.workers} workers, chunks of {args.chunk_lines:,} lines:")
        for name, r in results.items():
            report(name, r, args.workers)
        s, l_ = results["small"], results["large"]
        print(f"\nlarge/small: pairs x{l_['pairs'] / s['pairs']:.2f}, "
              f"peak RSS main x{l_['rss_main_mb'] / s['rss_main_mb']:.2f}, "
              f"largest worker x{l_['rss_child_mb'] / s['rss_child_mb']:.2f}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def do_step(args) -> int:
    from data_pipeline.corpus import CorpusWarning

    warnings.simplefilter("ignore", CorpusWarning)  # the bench corpus has no test split on purpose
    work = Path(args.work)
    if args.step == "generate":
        make_corpora(work, args.pairs, args.workers)
    elif args.step == "train":
        train_model(work / "small", work, args.vocab_size, args.workers)
    else:
        out = work / f"bin_{args.corpus}"
        print(json.dumps(measure(work / args.corpus, work / "spm.model", out, args.workers, args.chunk_lines)))
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
