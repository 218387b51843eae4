"""Public attention API: input errors, op registration (opcheck), torch.compile, determinism, modules."""

import pytest
import torch
from attention_helpers import assert_within, dense_attention, mask_from_splits_vectorised, mask_varlen, max_err

from unigendet import BackendUnavailableError, _backend
from unigendet.ops import (
    AttentionLayout,
    PackedAttention,
    SMSAAttention,
    VarlenAttention,
    packed_attention,
    smsa_attention,
    varlen_attention,
)

I32 = torch.int32
HAS_CUDA = torch.cuda.is_available()


def cu(lens, device="cpu"):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=I32, device=device)


def qkv(tq, tk, h=4, hkv=2, d=8, dtype=torch.float32, device="cpu", grad=False):
    g = torch.Generator().manual_seed(0)
    mk = lambda n, hh: torch.randn(n, hh, d, generator=g, dtype=torch.float64).to(dtype).to(device) \
        .requires_grad_(grad)
    return mk(tq, h), mk(tk, hkv), mk(tk, hkv)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------

Q, K, V = qkv(10, 10)
CU = cu([4, 6])


def _varlen(**over):
    args = dict(q=Q, k=K, v=V, cu_seqlens_q=CU, cu_seqlens_k=CU, max_seqlen_q=6, max_seqlen_k=6)
    args.update(over)
    return lambda: varlen_attention(**args)


VARLEN_ERRORS = [
    (_varlen(q=Q[0]), "q"),
    (_varlen(q=Q.to(torch.int64)), "q"),
    (_varlen(q="q"), "q"),
    (_varlen(k=K.double()), "k must have the dtype"),
    (_varlen(v=V[:, :1]), "v must have the shape"),
    (_varlen(k=K[:, :1].expand(10, 3, 8).contiguous(), v=V[:, :1].expand(10, 3, 8).contiguous()), "k: number"),
    (_varlen(k=K[..., :4], v=V[..., :4]), "k must have the head dim"),
    (_varlen(cu_seqlens_q=CU.long()), "cu_seqlens_q must be int32"),
    (_varlen(cu_seqlens_q=CU[None]), "cu_seqlens_q must be 1-D"),
    (_varlen(cu_seqlens_q=[0, 4, 10]), "cu_seqlens_q must be a torch.Tensor"),
    (_varlen(cu_seqlens_k=cu([4, 6, 0])), "cu_seqlens_k must have shape"),
    (_varlen(cu_seqlens_q=torch.tensor([0, 7, 6], dtype=I32)), "cu_seqlens_q must be non-decreasing"),
    (_varlen(cu_seqlens_q=torch.tensor([1, 4, 10], dtype=I32)), "cu_seqlens_q must start at 0"),
    (_varlen(cu_seqlens_k=cu([4, 5])), r"cu_seqlens_k\[-1\]"),
    (_varlen(max_seqlen_q=5), "max_seqlen_q"),
    (_varlen(max_seqlen_k=torch.tensor(6)), "max_seqlen_k"),
    (_varlen(dropout_p=0.1), "dropout_p"),
    (_varlen(window_size=(4, 0)), "window_size"),
    (_varlen(softcap=30.0), "softcap"),
    (_varlen(alibi_slopes=torch.ones(4)), "alibi_slopes"),
    (_varlen(softmax_scale=float("nan")), "softmax_scale"),
    (_varlen(backend="nope"), "backend"),
]

LAYOUT = AttentionLayout.from_splits([[(4, "full"), (6, "causal")]])
PACKED_ERRORS = [
    (lambda: packed_attention(Q, K, V, "layout"), "layout must be an AttentionLayout"),
    (lambda: packed_attention(Q[:9], K, V, LAYOUT), "q has 9 tokens"),
    (lambda: packed_attention(Q, K[:9], V[:9], LAYOUT), "k has 9 tokens"),
    (lambda: packed_attention(Q, [K, K], [V, V], LAYOUT), "one tensor per layout source"),
    (lambda: packed_attention(Q, K, V.half(), LAYOUT), "v must have the dtype"),
]


def _smsa(**over):
    cq = cu([4, 6])
    args = dict(q=Q, k_gen=K[:3], v_gen=V[:3], k_det=K, v_det=V, k_txt=None, v_txt=None, cu_seqlens_q=cq,
                cu_seqlens_gen=cu([1, 2]), cu_seqlens_det=cu([5, 5]), cu_seqlens_txt=None, max_seqlen_q=6,
                max_seqlen_gen=2, max_seqlen_det=5, max_seqlen_txt=0)
    args.update(over)
    return lambda: smsa_attention(**args)


SMSA_ERRORS = [
    (_smsa(cu_seqlens_gen=None), "k_gen, v_gen and cu_seqlens_gen"),
    (_smsa(v_det=None), "k_det, v_det and cu_seqlens_det"),
    (_smsa(k_gen=None, v_gen=None, cu_seqlens_gen=None, k_det=None, v_det=None, cu_seqlens_det=None),
     "at least one"),
    (_smsa(k_txt=K[:, :1].contiguous(), v_txt=V[:, :1].contiguous(), cu_seqlens_txt=cu([5, 5]), max_seqlen_txt=5),
     "k_txt must have the key/value heads"),
    (_smsa(cu_seqlens_det=cu([5, 5, 0])), "cu_seqlens_det must have shape"),
    (_smsa(cu_seqlens_gen=cu([1, 1])), r"cu_seqlens_gen\[-1\]"),
    (_smsa(max_seqlen_det=4), "max_seqlen_det"),
    (_smsa(cu_seqlens_q=cu([4, 6]).float()), "cu_seqlens_q must be int32"),
]


@pytest.mark.parametrize("fn, match", VARLEN_ERRORS + PACKED_ERRORS + SMSA_ERRORS)
def test_value_errors_name_the_argument(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_explicit_backend_that_cannot_run():
    with pytest.raises(BackendUnavailableError, match="cuda"):
        varlen_attention(Q, K, V, CU, CU, 6, 6, backend="cuda")
    # the torch backend runs fp64 and the Triton backend does not declare it
    with pytest.raises(BackendUnavailableError, match="triton"):
        varlen_attention(Q.double(), K.double(), V.double(), CU, CU, 6, 6, backend="triton")


def test_env_backend(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    out = varlen_attention(Q, K, V, CU, CU, 6, 6, causal=True)
    ref = varlen_attention(Q, K, V, CU, CU, 6, 6, causal=True, backend="torch")
    assert torch.equal(out, ref)


def test_ops_registered_with_dispatcher():
    ops = _backend.registered_ops()
    for name in ("varlen_attention", "packed_attention", "smsa_attention"):
        d = ops[name]
        assert [s.name for s in d.specs] == ["triton", "sdpa", "torch"] and d.example_head_dim == 128
        info = _backend.CallInfo(device=torch.device("cpu"), dtype=torch.float32, head_dim=128)
        assert d.select(info, "auto") == "sdpa"  # the CPU kernels; auto never picks the interpreter
        assert d.reasons(info)["torch"] == []
        f64 = _backend.CallInfo(device=torch.device("cpu"), dtype=torch.float64, head_dim=128)
        assert d.select(f64, "auto") == "torch"  # the only float64 path


# --------------------------------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------------------------------


def _op_cases():
    lay = AttentionLayout.from_splits([[(3, "full"), (4, "causal"), (2, "noise")], [(0, "full"), (3, "causal")]])
    yield "splits", lay.plan_cpu, 12, (12,)
    cq, ck = cu([3, 0, 5]), cu([2, 4, 5])
    yield "varlen", AttentionLayout.varlen(cq, ck, True).plan_cpu, 8, (11,)
    sm = AttentionLayout.smsa(cu([3, 2]), [cu([1, 2]), None, cu([2, 0])])
    yield "smsa", sm.plan_cpu, 5, (3, 0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(_op_cases()), ids=lambda c: c[0])
def test_opcheck(case, dtype):
    _, plan, tq, tks = case
    g = torch.Generator().manual_seed(1)
    q = torch.randn(tq, 4, 8, generator=g, dtype=dtype)
    ks = [torch.randn(n, 2, 8, generator=g, dtype=dtype) for n in tks]
    vs = [torch.randn(n, 2, 8, generator=g, dtype=dtype) for n in tks]
    args = (q, ks, vs, *plan.tensors(), plan.max_q_len, plan.max_k_len, 0.35, "torch")
    torch.library.opcheck(torch.ops.unigendet.packed_attention_fwd.default, args)
    out, lse = torch.ops.unigendet.packed_attention_fwd(*args)
    bargs = (torch.randn_like(out), q, ks, vs, out, lse, *plan.tensors(), plan.max_q_len, plan.max_k_len, 0.35,
             "torch", True)
    torch.library.opcheck(torch.ops.unigendet.packed_attention_bwd.default, bargs)


def test_plan_is_checked_once_and_inputs_once(monkeypatch):
    """Every layer reuses one plan: the op checks its values on the first call only. q, k and v are validated by the
    public function; the registered op (and the Triton launches beneath it) do not check them again."""
    from unigendet.ops import attention as A

    calls = []
    real = A.check_plan_tensors
    monkeypatch.setattr(A, "check_plan_tensors", lambda *a: calls.append(1) or real(*a))
    layout = AttentionLayout.from_splits([[(5, "causal"), (7, "full")], [(4, "causal")]])
    q, k, v = qkv(16, 16)
    for _ in range(3):
        packed_attention(q, k, v, layout, backend="torch")
    assert len(calls) == 1
    layout.plan_cpu.q_ranges.add_(0)  # an in-place change (a new version) is checked again
    packed_attention(q, k, v, layout, backend="torch")
    assert len(calls) == 2
    plan = layout.plan_cpu
    bad = [t.long() if i == 2 else t for i, t in enumerate(plan.tensors())]
    with pytest.raises(ValueError, match=r"plan.kv_entries must be an int32 tensor"):
        torch.ops.unigendet.packed_attention_fwd(q, [k], [v], *bad, plan.max_q_len, plan.max_k_len, 0.3, "torch")


@pytest.mark.skipif(not _backend.triton_interpret(), reason="needs the Triton interpreter")
def test_triton_op_path_does_not_recheck_inputs(monkeypatch):
    from unigendet.ops import attention_triton

    def fail(*a, **k):
        raise AssertionError("the launcher's checks ran under the registered op")

    monkeypatch.setattr(attention_triton, "_check_qkv", fail)
    layout = AttentionLayout.from_splits([[(5, "causal"), (11, "full")]])
    q, k, v = qkv(16, 16, d=32, grad=True)
    out = packed_attention(q, k, v, layout, backend="triton")
    out.sum().backward()
    ref = packed_attention(q.detach(), k.detach(), v.detach(), layout, backend="torch")
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------


def _fwd_bwd(fn, leaves, *args):
    out = fn(*leaves, *args)
    loss = (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
    return (out.detach(), *torch.autograd.grad(loss, leaves))


def _compare_compiled(fn, leaves, *args, compile_backend="aot_eager"):
    torch._dynamo.reset()
    eager = _fwd_bwd(fn, leaves, *args)
    compiled = _fwd_bwd(torch.compile(fn, fullgraph=True, backend=compile_backend), leaves, *args)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_compile_packed_attention():
    layout = AttentionLayout.from_splits([[(3, "full"), (4, "causal"), (2, "noise")], [(5, "causal")]])
    leaves = qkv(14, 14, grad=True)
    _compare_compiled(lambda q, k, v, lay: packed_attention(q, k, v, lay), leaves, layout)


def test_compile_varlen_attention():
    cq, ck = cu([3, 0, 9]), cu([5, 2, 7])
    leaves = qkv(12, 14, grad=True)
    _compare_compiled(lambda q, k, v, a, b: varlen_attention(q, k, v, a, b, 9, 7, causal=True), leaves, cq, ck)


def test_compile_smsa_attention_and_shared_kv():
    q, k, v = qkv(7, 9, grad=True)

    def f(q, k, v, cq, c1, c2):
        # the det source reuses k for its values: one tensor passed twice
        return smsa_attention(q, k[:4], v[:4], k[4:], k[4:], None, None, cq, c1, c2, None, 5, 3, 3, 0)

    _compare_compiled(f, (q, k, v), cu([2, 5]), cu([1, 3]), cu([3, 2]))


def test_compile_dynamic_shapes_new_layouts():
    # every size symbolic; a new pack (other lengths, other layout) reuses or recompiles without a graph break
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v, lay: packed_attention(q, k, v, lay), fullgraph=True, backend="aot_eager",
                       dynamic=True)
    for samples in ([[(3, "full"), (4, "causal")]], [[(5, "full"), (4, "causal")], [(2, "noise")]]):
        layout = AttentionLayout.from_splits(samples)
        leaves = qkv(layout.total_q, layout.total_q, grad=True)
        eager = _fwd_bwd(packed_attention, leaves, layout)
        compiled = _fwd_bwd(fn, leaves, layout)
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


@pytest.mark.slow
def test_compile_inductor_packed_attention():
    layout = AttentionLayout.from_splits([[(3, "full"), (4, "causal")], [(5, "causal")]])
    leaves = qkv(12, 12, grad=True)
    torch._dynamo.reset()
    eager = _fwd_bwd(lambda q, k, v: packed_attention(q, k, v, layout) * 2, leaves)
    compiled = _fwd_bwd(torch.compile(lambda q, k, v: packed_attention(q, k, v, layout) * 2, fullgraph=True), leaves)
    for a, b in zip(eager, compiled):
        assert max_err(a, b) < 1e-6


# --------------------------------------------------------------------------------------------------
# Autograd details, determinism, modules
# --------------------------------------------------------------------------------------------------


def test_same_tensor_for_k_and_v():
    q, k, _ = qkv(10, 10, dtype=torch.float64, grad=True)
    out = varlen_attention(q, k, k, CU, CU, 6, 6, causal=True)
    kk = k.detach().clone().requires_grad_()
    k2 = kk * 1.0
    ref = varlen_attention(q, kk, k2, CU, CU, 6, 6, causal=True)
    dout = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k), dout)
    g2 = torch.autograd.grad(ref, (q, kk), dout)
    assert max_err(g1[0], g2[0]) < 1e-13 and max_err(g1[1], g2[1]) < 1e-13


def test_autocast_casts_mixed_inputs_like_sdpa():
    """Under autocast, q/k leaving an fp32 norm and v leaving a bf16 matmul run in the autocast dtype."""
    q, k, v = qkv(10, 10, grad=True)
    layout = AttentionLayout.varlen(CU, CU, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed_attention(q, k, v.to(torch.bfloat16), layout)
        ref = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), CU, CU, 6, 6, causal=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0
    out64 = packed_attention(q.double(), k.double(), v.double(), layout)  # no autocast: float64 stays
    assert out64.dtype == torch.float64


def test_lse_is_not_differentiable_and_out_only_grad():
    q, k, v = qkv(10, 10, grad=True)
    out, lse, none = varlen_attention(q, k, v, CU, CU, 6, 6, return_attn_probs=True)
    assert none is None and not lse.requires_grad and out.requires_grad
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_deterministic_cpu():
    samples = [[(5, "full"), (17, "causal"), (3, "noise")], [(9, "causal")]]
    layout = AttentionLayout.from_splits(samples)
    q, k, v = qkv(34, 34, h=8, hkv=2, d=16, grad=True)
    dout = torch.randn(34, 8, 16)
    first = None
    for _ in range(5):
        out = packed_attention(q, k, v, layout, deterministic=True)
        gs = (out, *torch.autograd.grad(out, (q, k, v), dout))
        if first is None:
            first = gs
        else:
            assert all(torch.equal(a, b) for a, b in zip(first, gs))


def test_modules():
    layout = AttentionLayout.from_splits([[(4, "full"), (6, "causal")]])
    q, k, v = qkv(10, 10)
    assert torch.equal(PackedAttention(softmax_scale=0.5)(q, k, v, layout),
                       packed_attention(q, k, v, layout, softmax_scale=0.5))
    va = VarlenAttention(causal=True, backend="torch")
    assert torch.equal(va(q, k, v, CU, CU, 6, 6), varlen_attention(q, k, v, CU, CU, 6, 6, causal=True, backend="torch"))
    assert "causal=True" in repr(va)
    sm = SMSAAttention()
    args = (q, k[:3], v[:3], None, None, k, v, CU, cu([1, 2]), None, cu([5, 5]), 6, 2, 0, 5)
    assert torch.equal(sm(*args), smsa_attention(*args))


def test_cpu_cu_seqlens_need_no_device_sync():
    # CPU cu_seqlens with the torch backend: the plan is built on the host, never moved to a device
    layout_dense = mask_varlen([0, 4, 10], [0, 4, 10], True)
    out = varlen_attention(Q, K, V, CU, CU, 6, 6, causal=True)
    ref, _ = dense_attention(Q, [K], [V], [layout_dense])
    assert max_err(out, ref) < 1e-5


# --------------------------------------------------------------------------------------------------
# The public API on the Triton backend (interpreter on the CPU; kernels are tested on their own elsewhere)
# --------------------------------------------------------------------------------------------------


def _triton_api_cases(dtype):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    samples = [[(5, "full"), (7, "causal"), (3, "noise")], [(4, "causal")]]
    layout = AttentionLayout.from_splits(samples)
    q, k, v = r(19, 4, 32), r(19, 2, 32), r(19, 2, 32)
    yield ("packed", lambda be: packed_attention(q, k, v, layout, backend=be), (q, k, v),
           [mask_from_splits_vectorised(samples)], [k], [v])
    cq, ck = cu([3, 0, 9]), cu([5, 2, 2])
    q2, k2, v2 = r(12, 4, 32), r(9, 2, 32), r(9, 2, 32)
    yield ("varlen", lambda be: varlen_attention(q2, k2, v2, cq, ck, 9, 5, causal=True, backend=be), (q2, k2, v2),
           [mask_varlen(cq.tolist(), ck.tolist(), True)], [k2], [v2])
    q3, kd, vd, kt, vt = r(6, 4, 32), r(5, 2, 32), r(5, 2, 32), r(4, 2, 32), r(4, 2, 32)
    c0, cd, ct = cu([2, 4]), cu([3, 2]), cu([0, 4])
    yield ("smsa", lambda be: smsa_attention(q3, None, None, kd, vd, kt, vt, c0, None, cd, ct, 4, 0, 3, 4, backend=be),
           (q3, kd, vd, kt, vt), [mask_varlen(c0.tolist(), cd.tolist(), False),
                                  mask_varlen(c0.tolist(), ct.tolist(), False)], [kd, kt], [vd, vt])


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backend_through_public_api(dtype):
    pytest.importorskip("unigendet.ops.attention_triton")
    for name, fn, leaves, masks, ks, _ in _triton_api_cases(dtype):
        out = fn("triton")
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
        got = torch.autograd.grad(out, leaves, dout)
        n = len(ks)
        ref_leaves = [t.detach().requires_grad_() for t in leaves]
        pt_leaves = [t.detach().requires_grad_() for t in leaves]
        ref, _ = dense_attention(ref_leaves[0], ref_leaves[1::2][:n], ref_leaves[2::2][:n], masks)
        pt, _ = dense_attention(pt_leaves[0], pt_leaves[1::2][:n], pt_leaves[2::2][:n], masks, dtype=dtype,
                                reorder=True)
        ref_g = torch.autograd.grad(ref, ref_leaves, dout.double())
        pt_g = torch.autograd.grad(pt, pt_leaves, dout)
        assert_within(f"{name} out", out, ref, pt, 2.0, dtype)
        for i, (a, b, c) in enumerate(zip(got, ref_g, pt_g)):
            assert_within(f"{name} grad {i}", a, b, c, 3.0, dtype)


# --------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# --------------------------------------------------------------------------------------------------


def _gpu_case(dtype=torch.bfloat16, causal=True):
    lens_q = [1, 17, 0, 1000, 2049, 300, 64]
    lens_k = [1, 17, 3, 1000, 2049, 100, 0]
    cq, ck = cu(lens_q, "cuda"), cu(lens_k, "cuda")
    q, k, v = qkv(sum(lens_q), sum(lens_k), h=28, hkv=4, d=128, dtype=dtype, device="cuda", grad=True)
    return q, k, v, cq, ck, max(lens_q), max(lens_k), causal


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gpu_bf16_varlen_against_fp64(backend):
    q, k, v, cq, ck, mq, mk, causal = _gpu_case()
    out = varlen_attention(q, k, v, cq, ck, mq, mk, causal=causal, backend=backend)
    dout = torch.randn_like(out)
    gs = torch.autograd.grad(out, (q, k, v), dout)
    mask = mask_varlen(cq.tolist(), ck.tolist(), causal).cuda()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref, _ = dense_attention(leaves[0], [leaves[1]], [leaves[2]], [mask])
    ref_g = torch.autograd.grad(ref, leaves, dout.double())
    pl = [t.detach().requires_grad_() for t in (q, k, v)]
    pt, _ = dense_attention(pl[0], [pl[1]], [pl[2]], [mask], dtype=torch.bfloat16, reorder=True)
    pt_g = torch.autograd.grad(pt, pl, dout)
    assert_within("out", out, ref, pt, 2.0, torch.bfloat16)
    for name, g, r, p in zip("qkv", gs, ref_g, pt_g):
        assert_within(f"d{name}", g, r, p, 3.0, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gpu_deterministic_50_repeats(backend):
    q, k, v, cq, ck, mq, mk, causal = _gpu_case()
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    first = None
    for _ in range(50):
        out = varlen_attention(q, k, v, cq, ck, mq, mk, causal=causal, deterministic=True, backend=backend)
        gs = (out, *torch.autograd.grad(out, (q, k, v), dout))
        if first is None:
            first = gs
        else:
            assert all(torch.equal(a, b) for a, b in zip(first, gs))


@pytest.mark.gpu
def test_gpu_packed_layout_device_checks():
    samples = [[(300, "full"), (500, "full"), (40, "causal"), (120, "causal")], [(30, "causal"), (1024, "noise")]]
    layout = AttentionLayout.from_splits(samples)  # host plan
    q, k, v = qkv(2014, 2014, h=28, hkv=4, d=128, dtype=torch.bfloat16, device="cuda", grad=True)
    out = packed_attention(q, k, v, layout.to("cuda"))
    mask = mask_from_splits_vectorised(samples).cuda()
    ref, _ = dense_attention(q, [k], [v], [mask])
    pt, _ = dense_attention(q, [k], [v], [mask], dtype=torch.bfloat16, reorder=True)
    assert_within("out", out, ref, pt, 2.0, torch.bfloat16)
    # the torch backend accepts a host layout; the Triton backend needs the layout on q's device
    packed_attention(q, k, v, layout, backend="torch")
    if _backend.get_dispatcher("packed_attention").select(_backend.CallInfo.of(q, 128)) == "triton":
        with pytest.raises(ValueError, match="layout"):
            packed_attention(q, k, v, layout, backend="triton")
    with pytest.raises(ValueError, match="k must be on the device"):
        packed_attention(q, k.cpu(), v.cpu(), layout, backend="torch")
