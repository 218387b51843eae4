"""Packaging, dispatch and `python -m unigendet.info`."""

import json
import os
import subprocess
import sys

import pytest
import torch

import unigendet
from unigendet import _backend
from unigendet._backend import BackendSpec, BackendUnavailableError, CallInfo, OpDispatcher


def _run(args, cwd, env=None):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=600)


def test_import_kernels_from_any_directory(tmp_path):
    r = _run(["-c", "import unigendet.kernels, unigendet; print(unigendet.kernels.__name__, unigendet.__version__)"],
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["unigendet.kernels", unigendet.__version__]


def test_source_checkout_runs_triton_kernels(tmp_path):
    """A copy of the source tree on PYTHONPATH (nothing of it installed) imports and runs its own Triton kernels."""
    pytest.importorskip("triton")
    import shutil

    src = tmp_path / "checkout"
    shutil.copytree(os.path.dirname(unigendet.__file__), src / "unigendet",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = (
        "import torch, unigendet, unigendet.kernels.attention as ka\n"
        "from unigendet import _backend\n"
        "from unigendet.ops import varlen_attention\n"
        "print(unigendet.__file__.startswith(%r), ka.__file__.startswith(%r))\n"
        "q = torch.randn(5, 2, 32)\n"
        "cu = torch.tensor([0, 2, 5], dtype=torch.int32)\n"
        "a = varlen_attention(q, q, q, cu, cu, 3, 3, causal=True, backend='triton')\n"
        "b = varlen_attention(q, q, q, cu, cu, 3, 3, causal=True, backend='torch')\n"
        "print(bool((a - b).abs().max() < 1e-5))\n"
    ) % (str(src), str(src))
    r = _run(["-c", code], cwd=tmp_path, env={"PYTHONPATH": str(src), "TRITON_INTERPRET": "1",
                                             "UNIGENDET_JIT_BUILD": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "True"]


def test_triton_reported_unavailable_when_its_kernels_do_not_import(tmp_path):
    """The backend table offers Triton only when the kernel module itself imports."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'unigendet.kernels.attention': raise ImportError('hidden by test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from unigendet import _backend\n"
        "import unigendet.ops\n"
        "info = _backend.CallInfo(torch.device('cpu'), torch.float32, head_dim=64)\n"
        "print(_backend.get_dispatcher('varlen_attention').reasons(info)['triton'])\n"
    )
    r = _run(["-c", code], cwd=tmp_path, env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr
    assert "unigendet.kernels.attention failed to import" in r.stdout


def test_import_touches_no_cuda_or_triton(tmp_path):
    code = ("import sys, unigendet, unigendet.ops, unigendet.kernels; "
            "import torch; print(torch.cuda.is_initialized(), 'triton' in sys.modules and "
            "hasattr(sys.modules['triton'], 'runtime') and 'triton.runtime.driver' in sys.modules)")
    r = _run(["-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "False"


# Python source that makes ``import unigendet._C`` fail, as on a machine where it was never built.
HIDE_EXTENSION = (
    "import sys, importlib.abc\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name == 'unigendet._C': raise ImportError('hidden by test')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def test_import_without_extension(tmp_path):
    """With the compiled extension hidden and JIT disabled, the package imports and reports why."""
    code = (
        HIDE_EXTENSION +
        "import unigendet, unigendet.ops\n"
        "from unigendet import _ext\n"
        "s = _ext.load(); print(s.loaded, s.how)\n"
    )
    r = _run(["-c", code], cwd=tmp_path, env={"UNIGENDET_JIT_BUILD": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "none"]


def test_info_reports(tmp_path):
    r = _run(["-m", "unigendet.info", "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["torch"] == torch.__version__
    assert facts["cuda_available"] == torch.cuda.is_available()
    assert facts["triton_interpret"] == _backend.triton_interpret()
    for key in ("triton", "extension", "dali", "ops"):
        assert key in facts
    r = _run(["-m", "unigendet.info"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "compiled extension unigendet._C" in r.stdout


def _toy_dispatcher():
    return OpDispatcher("toy", [
        BackendSpec("cuda", devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), max_head_dim=256),
        BackendSpec("triton", devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                    available=lambda: "triton is not installed"),
        BackendSpec("torch", devices=("cpu", "cuda"), dtypes=(torch.float32, torch.float64, torch.float16)),
    ])


def test_dispatch_auto_falls_back():
    d = _toy_dispatcher()
    info = CallInfo(torch.device("cpu"), torch.float32, head_dim=64)
    assert d.select(info, "auto") == "torch"


def test_dispatch_explicit_raises_with_every_reason():
    d = _toy_dispatcher()
    info = CallInfo(torch.device("cpu"), torch.float32, head_dim=300)
    with pytest.raises(BackendUnavailableError) as e:
        d.select(info, "cuda")
    msg = str(e.value)
    assert "'cuda' was requested" in msg
    assert "device 'cpu' not supported" in msg
    assert "dtype float32 not supported" in msg
    assert "head dim 300 > 256" in msg
    assert "triton is not installed" in msg
    assert "torch: can run" in msg


def test_dispatch_missing_backend_and_bad_value(monkeypatch):
    d = _toy_dispatcher()
    info = CallInfo(torch.device("cpu"), torch.float32)
    with pytest.raises(BackendUnavailableError, match="has no cpp implementation"):
        d.select(info, "cpp")
    with pytest.raises(ValueError, match="backend='fast'"):
        d.select(info, "fast")
    monkeypatch.setenv("UNIGENDET_BACKEND", "nope")
    with pytest.raises(ValueError, match="UNIGENDET_BACKEND='nope'"):
        d.select(info)
    monkeypatch.setenv("UNIGENDET_BACKEND", "TORCH")
    assert d.select(info) == "torch"


def test_dispatch_no_backend_at_all():
    d = _toy_dispatcher()
    with pytest.raises(BackendUnavailableError, match="no backend can run"):
        d.select(CallInfo(torch.device("cpu"), torch.int32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks behaviour without CUDA")
def test_forced_cuda_backend_without_cuda_is_readable(tmp_path):
    """Every registered op, forced to `cuda` on a CPU-only machine, names its reasons."""
    import unigendet.ops  # noqa: F401

    ops = _backend.registered_ops()
    for name, disp in ops.items():
        info = CallInfo(torch.device("cpu"), torch.float32, head_dim=disp.example_head_dim)
        with pytest.raises(BackendUnavailableError) as e:
            disp.select(info, "cuda")
        assert "'cuda' was requested" in str(e.value), name
    r = _run(["-m", "unigendet.info"], cwd=tmp_path, env={"UNIGENDET_BACKEND": "cuda"})
    assert r.returncode == 0, r.stderr
    if ops:
        assert "-> NONE" in r.stdout


@pytest.mark.slow
def test_jit_build_when_not_built_ahead_of_time(tmp_path):
    """Without the ahead-of-time `_C`, the C++ kernels compile on first use into the cache and run."""
    code = (
        HIDE_EXTENSION +
        "import torch\n"
        "from unigendet import _ext\n"
        "s = _ext.load(); print(s.loaded, s.how)\n"
        "from unigendet.ops.diga_loss import diga_loss\n"
        "x, t = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)\n"
        "a = diga_loss(x.float(), t.float(), [(2, 2)], [(2, 2)], backend='cpp')\n"
        "b = diga_loss(x, t, [(2, 2)], [(2, 2)], backend='torch')\n"
        "print(abs(float(a) - float(b)) < 1e-5)\n"
    )
    r = _run(["-c", code], cwd=tmp_path, env={"UNIGENDET_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "jit", "True"]
    assert list((tmp_path / "cache" / "torch_extensions").iterdir())
