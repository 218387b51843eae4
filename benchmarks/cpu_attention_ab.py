"""Packed attention on the CPU against the public code's per-sample SDPA path, timed alternately in one process.

    python benchmarks/cpu_attention_ab.py [--rounds 100]

``bench_attention.py``'s ``cpu_tiny`` cases time one provider after the other; on a shared machine its speed drifts
between cases by more than the providers differ at these sub-10 ms sizes. Here every round runs each provider once
in a random order, so drift hits them alike, and the medians and their ratios are printed (the public path = 1.0).
Providers: the reference-code path of ``bench_attention.py``, ``packed_attention`` through ``auto`` (the ``sdpa``
backend), and the same with the block split off (every sample one masked call), forward under ``no_grad`` and
forward+backward. The pack is ``bench_attention.py``'s 600-token CPU pack (4 query heads, 1 K/V head, D 64, fp32).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import fakeclue_samples, reference_code_attention, reference_code_masks  # noqa: E402

from unigendet.ops import attention_sdpa  # noqa: E402
from unigendet.ops.attention import packed_attention  # noqa: E402
from unigendet.ops.layout import AttentionLayout  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=100)
    args = ap.parse_args()
    h, hkv, d = 4, 1, 64
    samples, total = fakeclue_samples(600, seed=1, lo=150, hi=300)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(total, n, d, generator=g) for n in (h, hkv, hkv))
    dout = torch.randn(total, h, d, generator=g)
    masks = reference_code_masks(samples, torch.device("cpu"), torch.float32)
    layout = AttentionLayout.from_splits(samples)
    unsplit = AttentionLayout.from_splits(samples)
    keep = attention_sdpa._SPLIT_MIN_ROWS
    attention_sdpa._SPLIT_MIN_ROWS = total + 1  # its blocks are planned (and cached) unsplit on the first call
    with torch.no_grad():
        packed_attention(q, k, v, unsplit)
    attention_sdpa._SPLIT_MIN_ROWS = keep
    paths = {"public code": lambda a, b, c: reference_code_attention(a, b, c, masks, d**-0.5),
             "unigendet": lambda a, b, c: packed_attention(a, b, c, layout),
             "unigendet, blocks unsplit": lambda a, b, c: packed_attention(a, b, c, unsplit)}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def fwd(f):
        def run():
            with torch.no_grad():
                f(q, k, v)
        return run

    def fwd_bwd(f):
        def run():
            for t in leaves:
                t.grad = None
            f(*leaves).backward(dout)
        return run

    cases = {(name, mode): (fwd if mode == "fwd" else fwd_bwd)(f) for name, f in paths.items()
             for mode in ("fwd", "fwd_bwd")}
    times = {c: [] for c in cases}
    for fn in cases.values():
        for _ in range(3):
            fn()
    rng = random.Random(0)
    for _ in range(args.rounds):
        for c in rng.sample(list(cases), len(cases)):
            t0 = time.perf_counter()
            cases[c]()
            times[c].append(time.perf_counter() - t0)
    med = {c: sorted(ts)[len(ts) // 2] * 1e3 for c, ts in times.items()}
    print(f"{total}-token pack, {torch.get_num_threads()} threads, {args.rounds} rounds, medians:")
    for mode in ("fwd", "fwd_bwd"):
        base = med["public code", mode]
        for name in paths:
            print(f"  {mode:8s} {name:26s} {med[name, mode]:7.3f} ms  {base / med[name, mode]:.2f}x")


if __name__ == "__main__":
    main()
