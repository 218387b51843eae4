"""Fused DIGA alignment loss: ``1 - cos(student, bilinear(teacher))`` over a packed batch of images.

DIGA aligns the generation expert's intermediate features (the *student*, one token per VAE latent
patch) with the frozen understanding expert's features (the *teacher*, one token per ViT patch). The
two grids of one image differ in size, so the teacher is resized to the student grid with
``F.interpolate(mode="bilinear", align_corners=False)`` before the cosine similarity is taken.

Layout (packed, images concatenated along the token axis, tokens row-major within an image)::

    student  (sum_b h_s[b] * w_s[b], D)
    teacher  (sum_b h_t[b] * w_t[b], D)

Semantics, shared by every backend:

* the *raw* teacher features are resampled, then ``cos = a.t / (max(|a|, eps) * max(|t|, eps))`` with
  ``eps = 1e-8`` (the convention of :func:`torch.nn.functional.cosine_similarity`, each norm clamped);
* per-token loss ``l = 1 - cos``; with ``weight`` it becomes ``weight * l``;
* ``reduction="mean"``: ``l.mean()``, or ``sum(weight * l) / sum(weight)`` with weights (NaN if the
  weights sum to zero); ``"sum"``: ``sum(weight * l)``; ``"none"``: the ``(N,)`` per-token values;
* the teacher and the weights receive no gradient (both are treated as constants); the student
  gradient is exact (a zero student row gets the gradient ``-t / (eps * |t|)`` of the clamped norm,
  exactly as autograd through ``F.cosine_similarity`` gives), saturated to the student dtype's finite
  range (that gradient, about ``1 / eps``, would overflow float16);
* right at any finite magnitude: sums of squares that overflow are recomputed on the rescaled rows;
* a teacher of another floating dtype is converted to the student's dtype; the result has the
  student's dtype; every backend computes in fp32 (fp64 for fp64) whatever the storage type.

Backends: ``cuda`` and ``cpp`` run one fused kernel per pass: the forward reads each student row and the
teacher rows it samples once and writes the per-token losses plus three coefficients per token; the
backward reads the same rows once and writes the student gradient with the incoming gradient (and the
reduction's weights) applied inside the kernel. The image table lives on the student's device, is built
once per distinct grid list and cached, and neither pass synchronises with the host (both can be captured
in a CUDA graph). ``torch`` is the readable reference below (also the fallback, and the only float64 path).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ext
from .._backend import BackendSpec, CallInfo, extension_unavailable_reason, register_op

__all__ = ["DIGALoss", "diga_loss", "diga_loss_reference", "diga_table"]

EPS = 1e-8
_OP = "unigendet::diga_loss_fwd"
_OP_BWD = "unigendet::diga_loss_bwd"
_REDUCTIONS = ("mean", "sum", "none")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_DISPATCH = register_op(
    "diga_loss",
    [
        BackendSpec(
            "cuda", devices=("cuda",), dtypes=_KERNEL_DTYPES,
            available=lambda: extension_unavailable_reason(_OP, "CUDA"),
            description="compiled CUDA kernel: one warp per student token, loss and gradient in one pass",
        ),
        BackendSpec(
            "cpp", devices=("cpu",), dtypes=_KERNEL_DTYPES,
            available=lambda: extension_unavailable_reason(_OP, "CPU"),
            description="compiled C++ kernel: loss and gradient in one pass, parallel over tokens",
        ),
        BackendSpec(
            "torch", devices=("cpu", "cuda"), dtypes=_KERNEL_DTYPES + (torch.float64,),
            description="per-image F.interpolate + F.cosine_similarity reference",
        ),
    ],
)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _as_grid_list(grids, name: str) -> list[tuple[int, int]]:
    """``grids`` (a sequence of (h, w) or an int tensor (n, 2)) as a list of positive int pairs."""
    if isinstance(grids, torch.Tensor):
        if grids.is_floating_point() or grids.is_complex() or grids.dim() != 2 or grids.shape[1] != 2:
            raise ValueError(f"{name} must be an integer tensor of shape (n_images, 2), got "
                             f"{grids.dtype} {tuple(grids.shape)}")
        grids = grids.tolist()
    if not isinstance(grids, Sequence) or isinstance(grids, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of (h, w) pairs or an int tensor (n_images, 2)")
    out = []
    for k, g in enumerate(grids):
        if isinstance(g, torch.Tensor):
            g = g.tolist()
        if not isinstance(g, Sequence) or len(g) != 2:
            raise ValueError(f"{name}[{k}] must be an (h, w) pair, got {g!r}")
        h, w = g
        if isinstance(h, bool) or isinstance(w, bool) or not isinstance(h, int) or not isinstance(w, int):
            raise ValueError(f"{name}[{k}] must hold two ints, got {g!r}")
        if h <= 0 or w <= 0:
            raise ValueError(f"{name}[{k}] must be positive, got {(h, w)}")
        out.append((h, w))
    if not out:
        raise ValueError(f"{name} is empty: the batch must hold at least one image")
    return out


def _validate(student, teacher, student_grids, teacher_grids, weight, reduction):
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise ValueError("student and teacher must be tensors")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if student.dim() != 2:
        raise ValueError(f"student must be 2-D (tokens, dim), got shape {tuple(student.shape)}")
    if teacher.dim() != 2:
        raise ValueError(f"teacher must be 2-D (tokens, dim), got shape {tuple(teacher.shape)}")
    if not student.is_floating_point():
        raise ValueError(f"student must be a floating-point tensor, got {student.dtype}")
    if not teacher.is_floating_point():
        raise ValueError(f"teacher must be a floating-point tensor, got {teacher.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
    if teacher.shape[1] != student.shape[1]:
        raise ValueError(f"teacher feature size {teacher.shape[1]} != student feature size {student.shape[1]}")
    s_grids = _as_grid_list(student_grids, "student_grids")
    t_grids = _as_grid_list(teacher_grids, "teacher_grids")
    if len(s_grids) != len(t_grids):
        raise ValueError(f"student_grids has {len(s_grids)} images but teacher_grids has {len(t_grids)}")
    n_s = sum(h * w for h, w in s_grids)
    n_t = sum(h * w for h, w in t_grids)
    if n_s != student.shape[0]:
        raise ValueError(f"student_grids hold {n_s} tokens but student has {student.shape[0]}")
    if n_t != teacher.shape[0]:
        raise ValueError(f"teacher_grids hold {n_t} tokens but teacher has {teacher.shape[0]}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise ValueError("weight must be a floating-point tensor")
        if weight.device != student.device:
            raise ValueError(f"weight is on {weight.device} but student is on {student.device}")
        if weight.dim() != 1 or weight.shape[0] != student.shape[0]:
            raise ValueError(f"weight must have shape ({student.shape[0]},), got {tuple(weight.shape)}")
    return s_grids, t_grids


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def _reduce(per_token: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if weight is not None:
        weight = weight.detach().to(per_token.dtype)
        per_token = per_token * weight
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / weight.sum() if weight is not None else per_token.mean()


class _SaturatingCast(torch.autograd.Function):
    """``x.to(dtype)`` whose backward clamps the gradient to the finite range of the input's dtype."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.in_dtype = x.dtype
        return x.to(dtype)

    @staticmethod
    def backward(ctx, g):
        lim = torch.finfo(ctx.in_dtype).max
        return g.clamp(-lim, lim).to(ctx.in_dtype), None


def _cosine(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``F.cosine_similarity(s, t, dim=-1, eps=1e-8)`` that stays right at any finite magnitude.

    Rows are divided by their largest magnitude first (a constant: no gradient flows through it), so no square
    overflows; the clamps ``max(|x|, eps)`` become ``max(|x / m|, eps / m)``, the same function.
    """
    ms = s.detach().abs().amax(-1, keepdim=True)
    mt = t.abs().amax(-1, keepdim=True)
    ms = torch.where(ms > 0, ms, torch.ones_like(ms))
    mt = torch.where(mt > 0, mt, torch.ones_like(mt))
    s, t = s / ms, t / mt
    na = torch.maximum(s.norm(dim=-1), EPS / ms.squeeze(-1))
    nt = torch.maximum(t.norm(dim=-1), EPS / mt.squeeze(-1))
    return (s * t).sum(-1) / (na * nt)


def diga_loss_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_grids: list[tuple[int, int]],
    teacher_grids: list[tuple[int, int]],
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Readable PyTorch DIGA loss (the ``torch`` backend); arguments as :func:`diga_loss`, already validated.

    Per image: teacher tokens ``(h_t*w_t, D)`` -> ``(1, D, h_t, w_t)`` -> ``F.interpolate`` to
    ``(h_s, w_s)`` (bilinear, align_corners=False) -> ``(h_s*w_s, D)``; then ``1 - cos`` with the clamped norms
    of ``F.cosine_similarity(..., eps=1e-8)``, computed in fp32 (fp64 for fp64 inputs) on rows rescaled by their
    largest magnitude. The result has the student's dtype; the student gradient saturates to its finite range.
    """
    out_dtype = student.dtype
    cdt = torch.float64 if student.dtype == torch.float64 else torch.float32
    teacher = teacher.detach().to(student.dtype).to(cdt)
    student = _SaturatingCast.apply(student, cdt) if student.dtype != cdt else student
    dim = student.shape[1]
    losses = []
    s_off = t_off = 0
    for (hs, ws), (ht, wt) in zip(student_grids, teacher_grids):
        s = student[s_off:s_off + hs * ws]
        t = teacher[t_off:t_off + ht * wt]
        if (hs, ws) != (ht, wt):
            t = t.reshape(ht, wt, dim).permute(2, 0, 1).unsqueeze(0)
            t = F.interpolate(t, size=(hs, ws), mode="bilinear", align_corners=False)
            t = t.squeeze(0).permute(1, 2, 0).reshape(hs * ws, dim)
        losses.append(1 - _cosine(s, t))
        s_off += hs * ws
        t_off += ht * wt
    w = None if weight is None else weight.to(cdt)
    return _reduce(torch.cat(losses), w, reduction).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# Compiled kernels: fake implementation, autograd
# --------------------------------------------------------------------------------------------------

_FAKE_REGISTERED = False


def _register_fake() -> None:
    """Register the shape functions of the compiled ops (once, and only once the ops exist)."""
    global _FAKE_REGISTERED
    if _FAKE_REGISTERED:
        return

    @torch.library.register_fake(_OP)
    def _diga_loss_fwd_fake(student, teacher, table, save_coef):
        n = student.shape[0]
        return student.new_empty((n,), dtype=torch.float32), student.new_empty((n if save_coef else 0, 3),
                                                                                dtype=torch.float32)

    @torch.library.register_fake(_OP_BWD)
    def _diga_loss_bwd_fake(grad_loss, student, teacher, table, coef):
        return student.new_empty(student.shape)

    _FAKE_REGISTERED = True


def _maybe_register_fake() -> None:
    if not _FAKE_REGISTERED and _ext.load().loaded and torch._C._dispatch_has_kernel(_OP):
        _register_fake()


# Calls that reach the op directly (not through diga_loss) still get the fake implementation when the
# extension was already loaded; otherwise it is registered on first use (loading it here is not cheap).
if "unigendet._C" in sys.modules:
    _maybe_register_fake()


@torch.compiler.assume_constant_result
def _select_backend(device_type: str, dtype_name: str, backend: str | None) -> str:
    """Backend for a call; evaluated eagerly (and baked in as a constant) under ``torch.compile``."""
    info = CallInfo(device=torch.device(device_type), dtype=getattr(torch, dtype_name))
    name = _DISPATCH.select(info, backend)
    if name in ("cpp", "cuda"):
        _maybe_register_fake()
    return name


# --------------------------------------------------------------------------------------------------
# The image table
# --------------------------------------------------------------------------------------------------

_INT64_MAX = 2**63 - 1
_TABLES: OrderedDict = OrderedDict()  # (grids, device) -> table; the same grids reuse one device tensor
_TABLE_CACHE_SIZE = 64


def _table_rows(s_grids, t_grids) -> list[list[int]]:
    """Rows ``(h_s, w_s, h_t, w_t, student offset, teacher offset)`` per image, checked for int64 overflow."""
    rows, s_off, t_off = [], 0, 0
    for (hs, ws), (ht, wt) in zip(s_grids, t_grids):
        rows.append([hs, ws, ht, wt, s_off, t_off])
        s_off += hs * ws
        t_off += ht * wt
        if s_off > _INT64_MAX or t_off > _INT64_MAX:
            raise ValueError("student_grids / teacher_grids: token counts overflow int64")
    return rows


def diga_table(student_grids, teacher_grids, device) -> torch.Tensor:
    """The image table of a grid list on ``device``: int64 ``(n_images, 6)``, one row per image
    ``(h_s, w_s, h_t, w_t, student offset, teacher offset)``, the argument ``table`` of the compiled ops.

    Tables are cached per (grid lists, device): a training loop over batches of recurring resolutions uploads
    each one once, and a cached table keeps its address (a CUDA graph may capture it). A new table is copied
    from page-locked memory without synchronising with the device.
    """
    s_grids = _as_grid_list(student_grids, "student_grids")
    t_grids = _as_grid_list(teacher_grids, "teacher_grids")
    if len(s_grids) != len(t_grids):
        raise ValueError(f"student_grids has {len(s_grids)} images but teacher_grids has {len(t_grids)}")
    device = torch.device(device)
    if torch.compiler.is_compiling():  # a constant of the compiled graph
        return torch.tensor(_table_rows(s_grids, t_grids), dtype=torch.int64, device=device)
    key = (tuple(s_grids), tuple(t_grids), device)
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        return table
    host = torch.tensor(_table_rows(s_grids, t_grids), dtype=torch.int64)
    if device.type == "cuda":
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host.to(device)
    _TABLES[key] = table
    if len(_TABLES) > _TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return table


class _DIGALossFunction(torch.autograd.Function):
    """Forward kernel: per-token losses and coefficients; backward kernel: the student gradient, with the
    per-token incoming gradient (reduction, weights, ``grad_out``) applied inside the kernel."""

    @staticmethod
    def forward(ctx, student, teacher, table, weight, reduction):
        save = ctx.needs_input_grad[0]
        per_token, coef = torch.ops.unigendet.diga_loss_fwd(student, teacher, table, save)
        if save:
            ctx.save_for_backward(student, teacher, table, coef, weight)
        ctx.reduction = reduction
        return _reduce(per_token, weight, reduction).to(student.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, table, coef, weight = ctx.saved_tensors
        g = grad_out.float()
        n = student.shape[0]
        # d L / d loss_i for every token: a scalar (stride 0 in the kernel) or an (N,) vector.
        if ctx.reduction == "mean":
            gl = g / n if weight is None else g * weight / weight.sum()
        else:  # "sum" (scalar grad_out) or "none" ((N,) grad_out)
            gl = g if weight is None else g * weight
        grad = torch.ops.unigendet.diga_loss_bwd(gl.contiguous(), student, teacher, table, coef)
        return grad, None, None, None, None


def _diga_loss_fused(student, teacher, s_grids, t_grids, weight, reduction):
    teacher = teacher.detach().to(student.dtype)
    table = diga_table(s_grids, t_grids, student.device)
    if weight is not None:
        weight = weight.detach().to(torch.float32)
    return _DIGALossFunction.apply(student, teacher, table, weight, reduction)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def diga_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_grids,
    teacher_grids,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """DIGA alignment loss ``1 - cos(student, bilinear(teacher))`` over a packed batch of images.

    Args:
        student: ``(N, D)`` float32/float16/bfloat16 (float64 on the ``torch`` backend); image ``b``
            owns ``h_s[b] * w_s[b]`` consecutive row-major tokens. Receives the gradient.
        teacher: ``(M, D)`` on the same device; image ``b`` owns ``h_t[b] * w_t[b]`` tokens. Treated as
            a constant (no gradient); converted to the student's dtype if it differs.
        student_grids: ``[(h_s, w_s), ...]`` per image, or an int tensor ``(n_images, 2)``
            (pass lists under ``torch.compile``: reading a tensor forces a graph break).
        teacher_grids: ``[(h_t, w_t), ...]`` per image, same count.
        weight: optional ``(N,)`` per-token weights (a constant: no gradient flows to it).
        reduction: ``"mean"`` (``sum(w*l)/sum(w)`` with weights), ``"sum"`` or ``"none"`` (``(N,)``).
        backend: ``None`` (``UNIGENDET_BACKEND`` or ``auto``), ``"cuda"``, ``"cpp"`` or ``"torch"``.

    Returns:
        A scalar (``mean``/``sum``) or ``(N,)`` tensor (``none``) in the student's dtype.

    Raises:
        ValueError: bad shapes, dtypes, devices, grids that do not add up to the token counts, an
            empty batch, or an unknown reduction.
        unigendet.BackendUnavailableError: the requested backend cannot run this call.
    """
    s_grids, t_grids = _validate(student, teacher, student_grids, teacher_grids, weight, reduction)
    name = _select_backend(student.device.type, str(student.dtype).replace("torch.", ""), backend)
    if name == "torch":
        return diga_loss_reference(student, teacher, s_grids, t_grids, weight, reduction)
    return _diga_loss_fused(student, teacher, s_grids, t_grids, weight, reduction)


class DIGALoss(nn.Module):
    """Module form of :func:`diga_loss` (``reduction`` and ``backend`` fixed at construction).

    ``forward(student (N, D), teacher (M, D), student_grids, teacher_grids, weight=None)``.
    """

    def __init__(self, reduction: str = "mean", backend: str | None = None):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.backend = backend

    def forward(self, student, teacher, student_grids, teacher_grids, weight=None):
        return diga_loss(student, teacher, student_grids, teacher_grids, weight=weight,
                         reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}" + (f", backend={self.backend!r}" if self.backend else "")
