"""Time one ``weights`` call of every gradient method on a [G, K, K] Gram (float64, CPU).

    python bench/methods.py [--groups 200] [--langs 4 8 16 100] [--repeats 5] [--threads N]

Gradients are random with a shared component (cosines around 0.2, some conflicts), one language absent
and one with a zero gradient in one group, like a real batch. Prints the median wall time per call.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megavac.methods import StepContext, build_method

CASES = [
    ("monolithic", {}),
    ("pcgrad", {}),
    ("pcgrad", {"order": "independent"}),
    ("gradvac", {"langs": "all"}),
    ("gradvac", {"langs": "all", "order": "independent"}),
    ("cats", {"warm_interval": 1}),
    ("mgda", {}),
    ("mgda", {"variant": "fw"}),
    ("gradnorm", {}),
]


def make_gram(G: int, K: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(G, 1, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(G, K, dim, generator=gen, dtype=torch.float64) + 0.5 * shared
    v[:, K - 1] = 0  # absent
    v[0, 0] = 0  # zero gradient in one group
    present = torch.ones(K, dtype=torch.bool)
    present[K - 1] = False
    return v @ v.transpose(1, 2), present


def time_call(name, options, gram, present, repeats):
    K = gram.shape[1]
    m = build_method(name, K, **options)
    gen = torch.Generator().manual_seed(0)
    losses = torch.linspace(1.0, 2.0, K, dtype=torch.float64)
    times = []
    for step in range(repeats + 1):  # the first call builds lazy state (EMA) and warms up
        ctx = StepContext(step=step, present=present, losses=losses, generator=gen)
        t0 = time.perf_counter()
        w = m.weights(gram, ctx)
        times.append(time.perf_counter() - t0)
        assert torch.isfinite(w).all()
    extra = f" ({m.last_iters} it)" if name == "mgda" else ""
    return statistics.median(times[1:]), extra


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=200)
    p.add_argument("--langs", type=int, nargs="+", default=[4, 8, 16, 100])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, G = {args.groups}, float64, "
          f"median of {args.repeats} calls")
    header = f"{'method':<24}" + "".join(f"{'K=' + str(k):>16}" for k in args.langs)
    print(header)
    grams = {K: make_gram(args.groups, K, dim=max(16, 2 * K)) for K in args.langs}
    for name, options in CASES:
        label = name + "".join(f" {v}" for v in options.values() if isinstance(v, str))
        cells = []
        for K in args.langs:
            t, extra = time_call(name, options, *grams[K], args.repeats)
            cells.append(f"{t * 1e3:9.2f} ms{extra}")
        print(f"{label:<24}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
