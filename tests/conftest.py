"""Test configuration: markers, seeding, and the Triton interpreter on CPU-only machines.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` kernel is decorated, so it is set here,
before the package is imported, whenever no CUDA device is present. Tests marked ``interpret`` run
Triton kernels that way; ``gpu`` tests are skipped without CUDA; ``slow`` tests run unless
``-m "not slow"`` is given.
"""

import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interp = pytest.mark.skip(reason="needs triton and TRITON_INTERPRET=1 (set automatically without CUDA)")
    interp_ok = _has_triton() and os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords and not interp_ok:
            item.add_marker(skip_interp)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The tiny tokenizer, built into a per-module cache so the build itself is exercised."""
    from unigendet.tokenizer import load_tokenizer

    old = os.environ.get("UNIGENDET_CACHE")
    os.environ["UNIGENDET_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield load_tokenizer("tiny")
    finally:
        if old is None:
            os.environ.pop("UNIGENDET_CACHE", None)
        else:
            os.environ["UNIGENDET_CACHE"] = old


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield
    if HAS_CUDA:
        torch.cuda.empty_cache()
