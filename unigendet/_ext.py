"""Loading of the compiled extension ``unigendet._C``.

Two ways to get it, tried in order on first use (never at import):

1. ahead of time, by ``pip install -e . --no-build-isolation`` (see ``setup.py``);
2. just in time, when the sources are next to the package (a source checkout) and a C++ compiler is
   present: :func:`torch.utils.cpp_extension.load` compiles the C++ CPU kernels (and the CUDA ones when
   torch has CUDA and ``nvcc`` exists) into ``$UNIGENDET_CACHE/torch_extensions`` (default
   ``~/.cache/unigendet``), once per source version. ``UNIGENDET_JIT_BUILD=0`` disables this.

If neither works, :func:`load` reports why and every op falls back to another backend.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_SRC_ROOT = os.path.dirname(_PKG_DIR)


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    how: str  # "aot", "jit" or "none"
    reason: str = ""
    with_cuda: bool = False


def cache_dir() -> str:
    return os.environ.get("UNIGENDET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "unigendet"))


def _jit_sources() -> tuple[list[str], list[str]]:
    csrc = os.path.join(_SRC_ROOT, "csrc")
    cpp = sorted(glob.glob(os.path.join(csrc, "kernels", "**", "*.cpp"), recursive=True)
                 + glob.glob(os.path.join(csrc, "torch", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join(csrc, "kernels", "**", "*.cu"), recursive=True)
                + glob.glob(os.path.join(csrc, "torch", "**", "*.cu"), recursive=True))
    return cpp, cu


def _jit_build() -> ExtensionStatus:
    if os.environ.get("UNIGENDET_JIT_BUILD", "1").strip().lower() in ("0", "false", "no", "off"):
        return ExtensionStatus(False, "none", "not built ahead of time and UNIGENDET_JIT_BUILD=0")
    cpp, cu = _jit_sources()
    if not cpp:
        return ExtensionStatus(False, "none", "not built ahead of time and no csrc/ sources beside the package")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return ExtensionStatus(False, "none", "not built ahead of time and no C++ compiler for a JIT build")
    from torch.utils import cpp_extension

    with_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None \
        and torch.cuda.is_available()
    sources = cpp + (cu if with_cuda else [])
    digest = hashlib.sha256()
    for path in sources + sorted(glob.glob(os.path.join(_SRC_ROOT, "csrc", "**", "*.h"), recursive=True)):
        with open(path, "rb") as f:
            digest.update(path.encode() + f.read())
    digest.update(torch.__version__.encode())
    name = "unigendet_C_" + digest.hexdigest()[:12]
    build_dir = os.path.join(cache_dir(), "torch_extensions", name)
    os.makedirs(build_dir, exist_ok=True)
    log.warning("unigendet: compiling the C++%s kernels just in time into %s (once)",
                " and CUDA" if with_cuda else "", build_dir)
    try:
        cpp_extension.load(
            name=name,
            sources=sources,
            extra_include_paths=[os.path.join(_SRC_ROOT, "csrc")],
            extra_cflags=["-O3", "-std=c++17"] + (["-DUNIGENDET_WITH_CUDA=1"] if with_cuda else []),
            extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DUNIGENDET_WITH_CUDA=1"],
            build_directory=build_dir,
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # a broken toolchain must never break the package
        return ExtensionStatus(False, "none", f"JIT build failed: {type(e).__name__}: {str(e)[-300:]}")
    return ExtensionStatus(True, "jit", with_cuda=with_cuda)


@functools.cache
def load() -> ExtensionStatus:
    """Load ``unigendet._C`` (registering its ops with torch) and say how it went."""
    try:
        from . import _C  # noqa: F401  (static initialisers register the ops)
    except ImportError as e:
        aot_reason = str(e)
    else:
        return ExtensionStatus(True, "aot", with_cuda=bool(getattr(_C, "WITH_CUDA", 0)))
    status = _jit_build()
    if not status.loaded:
        status = ExtensionStatus(False, "none", f"{status.reason}; ahead-of-time import failed: {aot_reason}")
    return status
