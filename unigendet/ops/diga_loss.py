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
  exactly as autograd through ``F.cosine_similarity`` gives; it overflows float16);
* a teacher of another floating dtype is converted to the student's dtype; the result has the
  student's dtype; the compiled kernels accumulate in fp32 whatever the storage type.

Backends: ``cuda`` and ``cpp`` run one fused kernel per call that produces the per-token losses *and*
the student gradient in the same pass (the backward only rescales the stored gradient); ``torch`` is
the readable reference below (also the fallback, and the only float64 path).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ext
from .._backend import BackendSpec, CallInfo, extension_unavailable_reason, register_op

__all__ = ["DIGALoss", "diga_loss", "diga_loss_reference"]

EPS = 1e-8
_OP = "unigendet::diga_loss_fwd"
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
    ``(h_s, w_s)`` (bilinear, align_corners=False) -> ``(h_s*w_s, D)``; then
    ``1 - F.cosine_similarity(student_b, teacher_b, dim=-1, eps=1e-8)``.
    """
    teacher = teacher.detach().to(student.dtype)
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
        losses.append(1 - F.cosine_similarity(s, t, dim=-1, eps=EPS))
        s_off += hs * ws
        t_off += ht * wt
    return _reduce(torch.cat(losses), weight, reduction)


# --------------------------------------------------------------------------------------------------
# Compiled kernels: fake implementation, autograd
# --------------------------------------------------------------------------------------------------

_FAKE_REGISTERED = False


def _register_fake() -> None:
    """Register the shape function of the compiled op (once, and only once the op exists)."""
    global _FAKE_REGISTERED
    if _FAKE_REGISTERED:
        return

    @torch.library.register_fake(_OP)
    def _diga_loss_fwd_fake(student, teacher, grids, weight, grad_scale, compute_grad):
        n, d = student.shape
        loss = student.new_empty((n,), dtype=torch.float32)
        grad = student.new_empty((n, d) if compute_grad else (0, d))
        return loss, grad

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


class _DIGALossFunction(torch.autograd.Function):
    """Loss and student gradient from one kernel call; the backward rescales the stored gradient."""

    @staticmethod
    def forward(ctx, student, teacher, grids, weight, reduction):
        n = student.shape[0]
        # Fold the reduction's constant factors into the gradient the kernel writes, so that the
        # backward is a single multiplication by the incoming gradient.
        if reduction == "mean":
            if weight is None:
                kernel_weight, grad_scale = None, 1.0 / n
            else:
                kernel_weight, grad_scale = weight / weight.sum(), 1.0
        else:
            kernel_weight, grad_scale = weight, 1.0
        compute_grad = ctx.needs_input_grad[0]
        per_token, grad = torch.ops.unigendet.diga_loss_fwd(
            student, teacher, grids, kernel_weight, grad_scale, compute_grad)
        if compute_grad:
            ctx.save_for_backward(grad)
        ctx.reduction = reduction
        if reduction == "none":
            out = per_token * weight if weight is not None else per_token
        elif reduction == "sum":
            out = (per_token * weight).sum() if weight is not None else per_token.sum()
        else:
            out = (per_token * kernel_weight).sum() if weight is not None else per_token.mean()
        return out.to(student.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad_student = grad * grad_out.to(grad.dtype).unsqueeze(1)
        else:
            grad_student = grad * grad_out.to(grad.dtype)
        return grad_student, None, None, None, None


def _diga_loss_fused(student, teacher, s_grids, t_grids, weight, reduction):
    teacher = teacher.detach().to(student.dtype)
    # The image table always lives on the CPU (the CUDA kernel copies it itself).
    grids = torch.tensor([[hs, ws, ht, wt] for (hs, ws), (ht, wt) in zip(s_grids, t_grids)], dtype=torch.int64,
                         device="cpu")
    if weight is not None:
        weight = weight.detach().to(torch.float32)
    return _DIGALossFunction.apply(student, teacher, grids, weight, reduction)


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
