"""Shared benchmark helpers (pytest-benchmark).

Run with ``pytest benchmarks/ --benchmark-only``. GPU cases skip without CUDA; CPU cases always run.
Timings use pedantic mode with a device synchronisation at the end of each timed call.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Keep the Triton interpreter off in benchmarks: interpreted kernels are not worth timing.
os.environ.setdefault("TRITON_INTERPRET", "0")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_pedantic(benchmark, fn: Callable[[], object], device: torch.device | str, *, rounds: int = 10,
                 warmup_rounds: int = 2, iterations: int = 1):
    """Time ``fn`` with a device sync after every call; returns fn's last result."""
    result = {}

    def timed():
        result["out"] = fn()
        synchronize(device)

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=iterations)
    return result.get("out")


def mean_seconds(benchmark) -> float:
    return float(benchmark.stats.stats.mean)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak device memory of one call of ``fn`` (CUDA only; None on CPU)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


@pytest.fixture
def cuda_device():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    if HAS_CUDA:
        torch.cuda.empty_cache()
