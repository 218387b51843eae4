"""Tests of unigendet.ops.diga_loss (fused DIGA alignment loss) against an fp64 reference.

The reference is per image ``F.interpolate(bilinear, align_corners=False)`` + ``F.cosine_similarity``
(the ``torch`` backend run in float64). A fused result passes when its error is at most 2x (values) /
3x (student gradients) the error of the same computation in plain PyTorch at the same precision, plus a
floor of twice the rounding noise at the result's magnitude.
"""

import pytest
import torch
import torch.nn.functional as F

from unigendet._backend import BackendUnavailableError, extension_unavailable_reason
from unigendet.ops import DIGALoss, diga_loss
from unigendet.ops.diga_loss import diga_loss_reference, diga_table

OP = "unigendet::diga_loss_fwd"
HAS_CPP = extension_unavailable_reason(OP, "CPU") is None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="unigendet._C has no CPU kernel for diga_loss")

# (student grids, teacher grids) per case.
CASES = {
    "equal": ([(4, 4), (3, 5)], [(4, 4), (3, 5)]),
    "upsample": ([(8, 6)], [(3, 4)]),
    "downsample": ([(3, 3)], [(7, 5)]),
    "non_square_mixed": ([(5, 7), (2, 6), (6, 4)], [(4, 9), (5, 3), (6, 4)]),
    "1xN_Nx1": ([(1, 9), (7, 1), (1, 1)], [(1, 4), (3, 1), (2, 2)]),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(s_grids, t_grids, dim, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in s_grids)
    m = sum(h * w for h, w in t_grids)
    # A shared component keeps the cosines away from zero, as for aligned features.
    base = torch.randn(1, dim, generator=g)
    s = (torch.randn(n, dim, generator=g) + base).to(dtype).to(device)
    t = (torch.randn(m, dim, generator=g) + base).to(dtype).to(device)
    return s, t


def run(student, teacher, s_grids, t_grids, weight=None, reduction="mean", backend="torch", grad_out=None):
    """Loss and student gradient (of sum(loss * grad_out))."""
    s = student.detach().clone().requires_grad_(True)
    out = diga_loss(s, teacher, s_grids, t_grids, weight=weight, reduction=reduction, backend=backend)
    go = torch.ones_like(out) if grad_out is None else grad_out.to(out.dtype)
    out.backward(go)
    return out.detach(), s.grad


def noise_floor(ref, dtype):
    """Twice the rounding noise of the exact result stored in ``dtype``: no kernel can beat it."""
    return 2 * (ref.to(dtype).double() - ref).abs().max().item() + 1e-12


def assert_2x_rule(student, teacher, s_grids, t_grids, backend, weight=None, reduction="mean", grad_out=None):
    dtype = student.dtype
    w64 = None if weight is None else weight.double()
    go64 = None if grad_out is None else grad_out.double()
    ref, ref_g = run(student.double(), teacher.double(), s_grids, t_grids, w64, reduction, "torch", go64)
    pt, pt_g = run(student, teacher, s_grids, t_grids, weight, reduction, "torch", grad_out)
    out, g = run(student, teacher, s_grids, t_grids, weight, reduction, backend, grad_out)
    assert out.dtype == dtype and out.shape == ref.shape
    assert g.dtype == dtype and g.shape == student.shape
    err = (out.double() - ref).abs().max().item()
    err_pt = (pt.double() - ref).abs().max().item()
    assert err <= 2 * err_pt + noise_floor(ref, dtype), (err, err_pt)
    g_err = (g.double() - ref_g).abs().max().item()
    g_err_pt = (pt_g.double() - ref_g).abs().max().item()
    assert g_err <= 3 * g_err_pt + noise_floor(ref_g, dtype), (g_err, g_err_pt)


# --------------------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["upsample", "downsample", "non_square_mixed", "1xN_Nx1"])
def test_torch_backend_gradcheck(case):
    s_grids, t_grids = CASES[case]
    s, t = make_inputs(s_grids, t_grids, 6, torch.float64)
    s.requires_grad_(True)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x, r=reduction: diga_loss(x, t, s_grids, t_grids, reduction=r, backend="torch"), (s,))


def test_reference_matches_explicit_bilinear_formula():
    # One token, computed by hand: student (1, 3) grid sampled from a (1, 2) teacher grid.
    s = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    per_tok = diga_loss_reference(s, t, [(1, 3)], [(1, 2)], reduction="none")
    # x positions: src = (x + 0.5) * 2/3 - 0.5 = -1/6 -> 0, 0.5, 7/6 -> clamped to the last column.
    sampled = torch.stack([t[0], 0.5 * t[0] + 0.5 * t[1], t[1]])
    expected = 1 - F.cosine_similarity(s, sampled, dim=-1)
    torch.testing.assert_close(per_tok, expected)


# --------------------------------------------------------------------------------------------------
# Compiled C++ kernel against the fp64 reference
# --------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(CASES))
def test_cpp_matches_reference(case, dtype):
    s_grids, t_grids = CASES[case]
    s, t = make_inputs(s_grids, t_grids, 67, dtype)  # 67: not a multiple of any vector width
    assert_2x_rule(s, t, s_grids, t_grids, "cpp")


@needs_cpp
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cpp_reductions_and_weights(reduction, weighted, dtype):
    s_grids, t_grids = CASES["non_square_mixed"]
    s, t = make_inputs(s_grids, t_grids, 48, dtype, seed=1)
    w = torch.rand(s.shape[0], generator=torch.Generator().manual_seed(5)) + 0.1 if weighted else None
    # A non-trivial incoming gradient checks the backward's rescaling too.
    go = torch.rand(s.shape[0]) + 0.5 if reduction == "none" else torch.tensor(0.75)
    assert_2x_rule(s, t, s_grids, t_grids, "cpp", weight=w, reduction=reduction, grad_out=go)


@needs_cpp
def test_cpp_long_rows():
    s_grids, t_grids = [(4, 3)], [(5, 5)]
    s, t = make_inputs(s_grids, t_grids, 3584, torch.bfloat16, seed=2)
    assert_2x_rule(s, t, s_grids, t_grids, "cpp")


@needs_cpp
def test_cpp_zero_vectors_match_cosine_similarity_eps():
    s_grids, t_grids = [(3, 3)], [(2, 2)]
    s, t = make_inputs(s_grids, t_grids, 16, torch.float32, seed=3)
    s[4] = 0  # a zero student row: the gradient of the clamped norm is t / (eps |t|)
    t[3] = 0  # a zero teacher row sampled (partly) by several students
    s[8] = 0
    ref, ref_g = run(s.double(), t.double(), s_grids, t_grids, reduction="sum")
    out, g = run(s, t, s_grids, t_grids, reduction="sum", backend="cpp")
    assert torch.isfinite(g).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-5)
    # Compare each row relative to its own scale (the zero rows' gradients are ~1e8).
    scale = ref_g.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    assert ((g.double() - ref_g).abs() / scale).max() < 1e-5
    # Exactly-zero teacher features: the sampled vector of the bottom-right student is zero.
    per_tok, _ = run(s, t, s_grids, t_grids, reduction="none", backend="cpp")
    assert per_tok[8].item() == pytest.approx(1.0)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_cpp_large_norms_do_not_overflow(dtype):
    # sum(x^2) is ~1e7, beyond float16's range: the kernels accumulate in fp32.
    s_grids, t_grids = [(4, 4)], [(3, 3)]
    s, t = make_inputs(s_grids, t_grids, 256, torch.float32, seed=4)
    s, t = (s * 200).to(dtype), (t * 200).to(dtype)
    ref, ref_g = run(s.double(), t.double(), s_grids, t_grids, reduction="none")
    out, g = run(s, t, s_grids, t_grids, reduction="none", backend="cpp")
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    assert (out.double() - ref).abs().max().item() <= 2 * noise_floor(ref, dtype)
    assert (g.double() - ref_g).abs().max().item() <= 2 * noise_floor(ref_g, dtype) + 1e-3 * ref_g.abs().max().item()


@needs_cpp
def test_cpp_strided_rows_and_mixed_teacher_dtype():
    s_grids, t_grids = CASES["upsample"]
    s, t = make_inputs(s_grids, t_grids, 40, torch.float32, seed=6)
    wide = torch.cat([s, torch.randn_like(s)], dim=1)
    strided = wide[:, :40]
    assert not strided.is_contiguous()
    ref, ref_g = run(s, t, s_grids, t_grids)
    out, g = run(strided, t, s_grids, t_grids, backend="cpp")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, ref_g)
    # A float32 teacher with a bfloat16 student: converted to the student's dtype.
    out_mixed = diga_loss(s.bfloat16(), t, s_grids, t_grids, backend="cpp")
    assert out_mixed.dtype == torch.bfloat16
    torch.testing.assert_close(out_mixed, diga_loss(s.bfloat16(), t.bfloat16(), s_grids, t_grids, backend="torch"),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_teacher_and_weight_get_no_grad(backend):
    s_grids, t_grids = CASES["downsample"]
    s, t = make_inputs(s_grids, t_grids, 8)
    s.requires_grad_(True)
    t.requires_grad_(True)
    w = torch.rand(s.shape[0], requires_grad=True)
    diga_loss(s, t, s_grids, t_grids, weight=w, backend=backend).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None and w.grad is None


@needs_cpp
def test_no_grad_and_detached_calls():
    s_grids, t_grids = CASES["equal"]
    s, t = make_inputs(s_grids, t_grids, 24)
    with torch.no_grad():
        a = diga_loss(s.clone().requires_grad_(True), t, s_grids, t_grids, backend="cpp")
    b = diga_loss(s, t, s_grids, t_grids, backend="cpp")
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, diga_loss(s, t, s_grids, t_grids, backend="torch"))


@needs_cpp
def test_equal_grids_is_plain_cosine_loss():
    s, t = make_inputs([(6, 5)], [(6, 5)], 32)
    expected = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    torch.testing.assert_close(diga_loss(s, t, [(6, 5)], [(6, 5)], backend="cpp"), expected)


@needs_cpp
def test_tensor_grids_module_and_auto_backend():
    s_grids, t_grids = CASES["non_square_mixed"]
    s, t = make_inputs(s_grids, t_grids, 16)
    expected = diga_loss(s, t, s_grids, t_grids, backend="torch")
    got = DIGALoss()(s, t, torch.tensor(s_grids), torch.tensor(t_grids))
    torch.testing.assert_close(got, expected)
    assert "sum" in repr(DIGALoss(reduction="sum"))


def test_unavailable_backend_raises():
    s, t = make_inputs([(2, 2)], [(2, 2)], 4)
    with pytest.raises(BackendUnavailableError):
        diga_loss(s, t, [(2, 2)], [(2, 2)], backend="cuda")
    with pytest.raises(BackendUnavailableError):
        diga_loss(s.double(), t.double(), [(2, 2)], [(2, 2)], backend="cpp")


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _bad_calls():
    s, t = make_inputs([(2, 3)], [(3, 3)], 8)
    ok = dict(student=s, teacher=t, student_grids=[(2, 3)], teacher_grids=[(3, 3)])
    return [
        ("teacher feature size", dict(ok, teacher=t[:, :4])),
        ("student_grids hold", dict(ok, student_grids=[(3, 3)])),
        ("teacher_grids hold", dict(ok, teacher_grids=[(2, 3)])),
        ("student must be a floating", dict(ok, student=s.long())),
        ("teacher must be a floating", dict(ok, teacher=t.int())),
        ("teacher is on", dict(ok, teacher=t.to("meta"))),
        ("student_grids is empty", dict(ok, student_grids=[], teacher_grids=[])),
        ("reduction", dict(ok, reduction="max")),
        ("student must be 2-D", dict(ok, student=s[None])),
        ("student_grids\\[0\\] must be positive", dict(ok, student_grids=[(0, 3)])),
        ("student_grids has 1 images", dict(ok, teacher_grids=[(3, 1), (3, 2)])),
        ("weight must have shape", dict(ok, weight=torch.ones(5))),
        ("weight must be a floating", dict(ok, weight=torch.ones(6, dtype=torch.long))),
        ("weight is on", dict(ok, weight=torch.ones(6, device="meta"))),
        ("student_grids must be an integer tensor", dict(ok, student_grids=torch.ones(1, 2))),
    ]


@pytest.mark.parametrize("match,kwargs", _bad_calls(), ids=[m for m, _ in _bad_calls()])
def test_bad_arguments_raise_value_error(match, kwargs):
    with pytest.raises(ValueError, match=match):
        diga_loss(**kwargs)


def test_module_rejects_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        DIGALoss(reduction="avg")


@needs_cpp
def test_compiled_op_checks_its_arguments():
    s, t = make_inputs([(2, 3)], [(3, 3)], 8)
    table = diga_table([(2, 3)], [(3, 3)], "cpu")
    with pytest.raises(ValueError, match="student grids hold"):
        torch.ops.unigendet.diga_loss_fwd(s[:5], t, table, True)
    bad = table.clone()
    bad[0, 2] = 0
    with pytest.raises(ValueError, match="non-positive grid size"):
        torch.ops.unigendet.diga_loss_fwd(s, t, bad, True)
    bad = table.clone()
    bad[0, 5] = 3  # teacher offset past the start: reads would run past the teacher
    with pytest.raises(ValueError, match="offsets"):
        torch.ops.unigendet.diga_loss_fwd(s, t, bad, True)
    huge = torch.tensor([[2**40, 2**40, 3, 3, 0, 0]])
    with pytest.raises(ValueError, match="overflow"):
        torch.ops.unigendet.diga_loss_fwd(s, t, huge, True)
    with pytest.raises(ValueError, match="table must be int64"):
        torch.ops.unigendet.diga_loss_fwd(s, t, table.int(), True)
    loss, coef = torch.ops.unigendet.diga_loss_fwd(s, t, table, True)
    with pytest.raises(ValueError, match="grad_loss must be float32"):
        torch.ops.unigendet.diga_loss_bwd(torch.ones(5), s, t, table, coef)
    with pytest.raises(ValueError, match="coef must be"):
        torch.ops.unigendet.diga_loss_bwd(torch.ones(6), s, t, table, coef[:, :2].contiguous())


def test_grid_sizes_that_overflow_int64_are_refused():
    s, t = make_inputs([(2, 3)], [(3, 3)], 8)
    with pytest.raises(ValueError, match="student_grids hold"):
        diga_loss(s, t, [(2, 3), (2**62, 2**62)], [(3, 3), (1, 1)], backend="torch")


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_right_at_any_finite_magnitude(backend, dtype):
    """|x| ~ 1e20: sums of squares overflow fp32; the loss and gradient still equal the fp64 result."""
    s_grids, t_grids = [(4, 4)], [(3, 3)]
    s, t = make_inputs(s_grids, t_grids, 64, torch.float32, seed=9)
    for scale in (1e20, 1e-20, 3e37):
        sx, tx = (s * scale).to(dtype), (t * scale).to(dtype)
        ref, ref_g = run(sx.double(), tx.double(), s_grids, t_grids, reduction="none")
        out, g = run(sx, tx, s_grids, t_grids, reduction="none", backend=backend)
        assert torch.isfinite(out).all() and torch.isfinite(g).all(), scale
        assert (out.double() - ref).abs().max().item() <= noise_floor(ref, dtype) + 1e-5, scale
        # (at 3e37 the gradient, about 1 / |a|, is subnormal: its storage alone loses bits)
        g_err = (g.double() - ref_g).abs().max().item()
        tol = 2 * noise_floor(ref_g, dtype) + (2e-5 if dtype == torch.float32 else 2e-2) * ref_g.abs().max().item()
        assert g_err <= tol, (scale, g_err, tol)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_float16_gradient_of_a_zero_row_saturates(backend):
    s_grids, t_grids = [(3, 3)], [(2, 2)]
    s, t = make_inputs(s_grids, t_grids, 16, torch.float16, seed=3)
    s[4] = 0  # gradient -t / (eps |t|): about 1e8 / 9 per entry, beyond float16
    out, g = run(s, t, s_grids, t_grids, reduction="mean", backend=backend)
    assert torch.isfinite(g).all()
    assert g[4].abs().max().item() == torch.finfo(torch.float16).max
    ref_out, ref_g = run(s.double(), t.double(), s_grids, t_grids, reduction="mean")
    keep = torch.ones(9, dtype=torch.bool)
    keep[4] = False
    torch.testing.assert_close(g[keep].double(), ref_g[keep], rtol=2e-3, atol=1e-4)
    assert abs(out.double() - ref_out).item() < 1e-3


# --------------------------------------------------------------------------------------------------
# torch.library / torch.compile integration
# --------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_opcheck(dtype):
    from unigendet.ops import diga_loss as _  # noqa: F401
    from unigendet.ops.diga_loss import _maybe_register_fake

    _maybe_register_fake()
    s_grids, t_grids = CASES["non_square_mixed"]
    s, t = make_inputs(s_grids, t_grids, 12, dtype)
    table = diga_table(s_grids, t_grids, "cpu")
    torch.library.opcheck(torch.ops.unigendet.diga_loss_fwd.default, (s, t, table, True))
    torch.library.opcheck(torch.ops.unigendet.diga_loss_fwd.default, (s, t, table, False))
    coef = torch.ops.unigendet.diga_loss_fwd(s, t, table, True)[1]
    gl = torch.rand(s.shape[0])
    torch.library.opcheck(torch.ops.unigendet.diga_loss_bwd.default, (gl, s, t, table, coef))
    torch.library.opcheck(torch.ops.unigendet.diga_loss_bwd.default, (torch.tensor(0.5), s, t, table, coef))


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    s_grids, t_grids = CASES["non_square_mixed"]
    s, t = make_inputs(s_grids, t_grids, 16)
    w = torch.rand(s.shape[0]) + 0.1

    def f(x, y, weight):
        return diga_loss(x, y, s_grids, t_grids, weight=weight, backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    ref, ref_g = run(s, t, s_grids, t_grids, weight=w)
    x = s.clone().requires_grad_(True)
    out = compiled(x, t, w)
    out.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, ref_g)


# --------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------


def _needs_cuda_kernel():
    why = extension_unavailable_reason(OP, "CUDA")
    if why:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dim", [64, 67, 3584])
def test_cuda_matches_reference(case, dtype, dim):
    _needs_cuda_kernel()
    s_grids, t_grids = CASES[case]
    s, t = make_inputs(s_grids, t_grids, dim, dtype, device="cuda")
    assert_2x_rule(s, t, s_grids, t_grids, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_weights_reductions_and_zero_rows(reduction):
    _needs_cuda_kernel()
    s_grids, t_grids = [(8, 8), (4, 6)], [(5, 5), (7, 3)]
    s, t = make_inputs(s_grids, t_grids, 256, torch.bfloat16, device="cuda")
    t[0] = 0
    w = torch.rand(s.shape[0], device="cuda") + 0.1
    go = torch.rand(s.shape[0], device="cuda") + 0.5 if reduction == "none" else torch.tensor(2.0, device="cuda")
    assert_2x_rule(s, t, s_grids, t_grids, "cuda", weight=w, reduction=reduction, grad_out=go)
    # Agrees with the CPU kernel when both are built.
    if HAS_CPP:
        out_cuda, g_cuda = run(s, t, s_grids, t_grids, w, reduction, "cuda", go)
        out_cpu, g_cpu = run(s.cpu(), t.cpu(), s_grids, t_grids, w.cpu(), reduction, "cpp", go.cpu())
        torch.testing.assert_close(out_cuda.cpu(), out_cpu, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(g_cuda.cpu(), g_cpu, rtol=2e-2, atol=1e-4)


@pytest.mark.gpu
def test_cuda_strided_and_compiled():
    _needs_cuda_kernel()
    s_grids, t_grids = [(6, 6)], [(5, 4)]
    s, t = make_inputs(s_grids, t_grids, 128, torch.float32, device="cuda")
    strided = torch.cat([s, s], dim=1)[:, 1:129]  # unaligned rows: the scalar-load path
    ref, ref_g = run(strided.contiguous(), t, s_grids, t_grids)
    out, g = run(strided, t, s_grids, t_grids, backend="cuda")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, ref_g)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: diga_loss(x, t, s_grids, t_grids, backend="cuda"), fullgraph=True)
    torch.testing.assert_close(compiled(s), diga_loss(s, t, s_grids, t_grids, backend="torch"))


def test_table_is_built_once_per_grid_list():
    a = diga_table([(2, 3), (4, 4)], [(3, 3), (5, 5)], "cpu")
    b = diga_table([(2, 3), (4, 4)], [(3, 3), (5, 5)], "cpu")
    assert a is b and a.tolist() == [[2, 3, 3, 3, 0, 0], [4, 4, 5, 5, 6, 9]]


@pytest.mark.gpu
def test_cuda_never_synchronises_and_is_graph_capturable():
    """Forward and backward raise under CUDA's sync debug mode if anything waits for the device; a CUDA graph of
    both replays to the eager result."""
    _needs_cuda_kernel()
    s_grids, t_grids = [(8, 8), (4, 6)], [(5, 5), (7, 3)]
    s, t = make_inputs(s_grids, t_grids, 256, torch.bfloat16, device="cuda")
    w = torch.rand(s.shape[0], device="cuda") + 0.1
    x = s.clone().requires_grad_(True)
    diga_loss(x, t, s_grids, t_grids, weight=w, backend="cuda").backward()  # warm-up: builds the table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x.grad = None
        out = diga_loss(x, t, s_grids, t_grids, weight=w, backend="cuda")
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager_out, eager_g = out.detach().clone(), x.grad.clone()
    static_x = s.clone().requires_grad_(True)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on the side stream, as CUDA graphs require
            static_x.grad = None
            diga_loss(static_x, t, s_grids, t_grids, weight=w, backend="cuda").backward()
    torch.cuda.current_stream().wait_stream(stream)
    static_x.grad = None
    with torch.cuda.graph(graph):
        g_out = diga_loss(static_x, t, s_grids, t_grids, weight=w, backend="cuda")
        g_out.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g_out.detach(), eager_out) and torch.equal(static_x.grad, eager_g)
