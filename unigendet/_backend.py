"""Backend selection for the fused ops.

Every fused op registers an :class:`OpDispatcher` holding one :class:`BackendSpec` per implementation,
in priority order (fastest first). A spec *declares* what it supports (devices, dtypes, head dims,
minimum CUDA capability) and can add op-specific checks; :meth:`BackendSpec.not_supported_reasons`
turns a call description into human-readable reasons, xformers-style.

Selection (``UNIGENDET_BACKEND`` or a per-call ``backend=`` argument):

``auto``    the first backend with no reasons wins; backends marked ``auto=False`` for an input (the
            Triton interpreter on a CPU tensor, say) are only used when asked for by name.
``cuda``    the compiled CUDA kernels of ``unigendet._C``.
``triton``  the Triton kernels (on CPU tensors only under ``TRITON_INTERPRET=1``).
``cpp``     the compiled C++ CPU kernels of ``unigendet._C``.
``sdpa``    PyTorch's own fused SDPA kernels applied block by block (the attention ops on the CPU).
``torch``   the pure-PyTorch reference, which runs everywhere.

An explicit choice that cannot run raises :class:`BackendUnavailableError` listing the reasons of
every backend. Probes are lazy and cached: importing this module touches neither CUDA nor Triton.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendSpec",
    "BackendUnavailableError",
    "CallInfo",
    "OpDispatcher",
    "cuda_capability",
    "get_dispatcher",
    "has_triton",
    "registered_ops",
    "requested_backend",
    "triton_interpret",
    "triton_version",
]

BACKENDS = ("cuda", "triton", "cpp", "sdpa", "torch")
ENV_VAR = "UNIGENDET_BACKEND"


class BackendUnavailableError(NotImplementedError):
    """No backend (or not the requested one) can run this call; the message lists every reason."""


# --------------------------------------------------------------------------------------------------
# Capability probes (lazy, cached)
# --------------------------------------------------------------------------------------------------


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_version() -> str | None:
    if not has_triton():
        return None
    import triton

    return triton.__version__


@functools.cache
def _cuda_available() -> bool:
    return torch.cuda.is_available()


@functools.cache
def cuda_capability(index: int = 0) -> tuple[int, int] | None:
    """Compute capability of CUDA device ``index``, or None without CUDA."""
    if not _cuda_available():
        return None
    return torch.cuda.get_device_capability(index)


# --------------------------------------------------------------------------------------------------
# Call description and backend specs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallInfo:
    """What a dispatcher needs to know about one call."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, tensor: torch.Tensor, head_dim: int | None = None, **extra) -> CallInfo:
        return cls(device=tensor.device, dtype=tensor.dtype, head_dim=head_dim, extra=extra)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@dataclass
class BackendSpec:
    """Declared capabilities of one implementation of one op.

    ``available`` returns None when the implementation can run in this process at all, or a reason
    (e.g. "unigendet._C was not built with CUDA"). ``check`` adds op-specific reasons for a call.
    ``auto`` decides whether ``auto`` selection may pick this backend for a call (default: always).
    """

    name: str
    devices: Sequence[str]
    dtypes: Sequence[torch.dtype]
    available: Callable[[], str | None] = lambda: None
    head_dims: Sequence[int] | None = None
    max_head_dim: int | None = None
    min_capability: tuple[int, int] | None = None
    bf16_min_capability: tuple[int, int] | None = (8, 0)
    check: Callable[[CallInfo], list[str]] | None = None
    auto: Callable[[CallInfo], bool] = lambda info: True
    description: str = ""

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise ValueError(f"backend name must be one of {BACKENDS}, got {self.name!r}")

    def devices_for(self) -> tuple[str, ...]:
        devs = tuple(self.devices)
        if self.name == "triton" and triton_interpret():
            # Under the interpreter Triton runs CPU tensors (slowly) and no GPU ones.
            devs = ("cpu",)
        return devs

    def not_supported_reasons(self, info: CallInfo) -> list[str]:
        why = self.available()
        if why:
            return [why]
        reasons = []
        dev = info.device.type
        if dev not in self.devices_for():
            reasons.append(f"device {dev!r} not supported (supports {', '.join(self.devices_for())})")
        if info.dtype not in self.dtypes:
            reasons.append(
                f"dtype {_dtype_name(info.dtype)} not supported "
                f"(supports {', '.join(_dtype_name(d) for d in self.dtypes)})"
            )
        if info.head_dim is not None:
            if self.head_dims is not None and info.head_dim not in self.head_dims:
                reasons.append(f"head dim {info.head_dim} not supported (supports {list(self.head_dims)})")
            if self.max_head_dim is not None and info.head_dim > self.max_head_dim:
                reasons.append(f"head dim {info.head_dim} > {self.max_head_dim}")
        if dev == "cuda" and not reasons:
            cap = cuda_capability(info.device.index or 0)
            if self.min_capability and cap is not None and cap < self.min_capability:
                reasons.append(f"requires CUDA capability >= {self.min_capability}, device has {cap}")
            if (info.dtype == torch.bfloat16 and self.bf16_min_capability and cap is not None
                    and cap < self.bf16_min_capability):
                reasons.append(f"bfloat16 requires CUDA capability >= {self.bf16_min_capability}")
        if not reasons and self.check is not None:
            reasons.extend(self.check(info))
        return reasons


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the argument if given, else ``UNIGENDET_BACKEND``, else ``auto``."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    choice = choice.strip().lower()
    if choice not in BACKENDS + ("auto",):
        src = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{src}={choice!r} is not one of auto, {', '.join(BACKENDS)}")
    return choice


class OpDispatcher:
    """Priority-ordered backends of one op."""

    def __init__(self, op: str, specs: Sequence[BackendSpec], example_head_dim: int | None = None):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate backends for {op}: {names}")
        self.op = op
        self.specs = list(specs)
        # A representative head dim for `python -m unigendet.info` (None: the op has none).
        self.example_head_dim = example_head_dim

    def reasons(self, info: CallInfo) -> dict[str, list[str]]:
        """Every backend's reasons for rejecting ``info`` (an empty list: it can run)."""
        return {s.name: s.not_supported_reasons(info) for s in self.specs}

    def _format(self, info: CallInfo, reasons: dict[str, list[str]], head: str) -> str:
        lines = [f"{head} for {self.op} on {info.device.type} {_dtype_name(info.dtype)}"
                 + (f", head dim {info.head_dim}" if info.head_dim is not None else "") + ":"]
        for name, rs in reasons.items():
            lines.append(f"  {name}: " + ("; ".join(rs) if rs else "can run"))
        return "\n".join(lines)

    def select(self, info: CallInfo, backend: str | None = None) -> str:
        """Name of the backend that runs ``info``; raises :class:`BackendUnavailableError`."""
        choice = requested_backend(backend)
        if choice == "auto":
            for spec in self.specs:
                if spec.auto(info) and not spec.not_supported_reasons(info):
                    return spec.name
            raise BackendUnavailableError(self._format(info, self.reasons(info), "no backend can run"))
        spec = next((s for s in self.specs if s.name == choice), None)
        if spec is None:
            reasons = {s.name: s.not_supported_reasons(info) for s in self.specs}
            reasons[choice] = [f"{self.op} has no {choice} implementation"]
            raise BackendUnavailableError(
                self._format(info, reasons, f"backend {choice!r} was requested but cannot run")
            )
        rs = spec.not_supported_reasons(info)
        if rs:
            raise BackendUnavailableError(
                self._format(info, self.reasons(info), f"backend {choice!r} was requested but cannot run")
            )
        return choice


_REGISTRY: dict[str, OpDispatcher] = {}


def register_op(op: str, specs: Sequence[BackendSpec], example_head_dim: int | None = None) -> OpDispatcher:
    """Register (or replace) the dispatcher of ``op``."""
    d = OpDispatcher(op, specs, example_head_dim)
    _REGISTRY[op] = d
    return d


def get_dispatcher(op: str) -> OpDispatcher:
    return _REGISTRY[op]


def registered_ops() -> dict[str, OpDispatcher]:
    return dict(_REGISTRY)


# --------------------------------------------------------------------------------------------------
# Availability helpers shared by the ops
# --------------------------------------------------------------------------------------------------


def triton_unavailable_reason() -> str | None:
    if not has_triton():
        return "triton is not installed"
    if not triton_interpret() and not _cuda_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU interpreter)"
    return None


def triton_auto(info: CallInfo) -> bool:
    """``auto`` never picks the (very slow) Triton interpreter; it must be asked for by name."""
    return not triton_interpret()


def extension_unavailable_reason(op_qualname: str, dispatch_key: str) -> str | None:
    """Why ``torch.ops.<op_qualname>`` has no compiled ``dispatch_key`` (``CPU``/``CUDA``) kernel."""
    from . import _ext

    status = _ext.load()
    if not status.loaded:
        return f"unigendet._C is not loaded ({status.reason})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op_qualname, dispatch_key):
        return f"unigendet._C has no {dispatch_key} kernel for {op_qualname}" + (
            " (built without CUDA)" if dispatch_key == "CUDA" else ""
        )
    return None
