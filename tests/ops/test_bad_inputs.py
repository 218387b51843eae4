"""Property tests of the ops' input checks: malformed metadata gets a named ValueError, valid metadata a right result.

Random cu_seqlens, layouts and kernel plans (hypothesis), on the torch backend and, where noted, the C++ and
Triton-interpreter backends. Every case asserts the exact outcome: an error naming the argument, or agreement
with a dense reference.
"""

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from attention_helpers import dense_attention, mask_varlen  # noqa: E402

from unigendet import BackendUnavailableError  # noqa: E402
from unigendet.ops import AttentionLayout, diga_loss, packed_attention, varlen_attention  # noqa: E402
from unigendet.ops.layout import check_plan_tensors  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
lengths = st.lists(st.integers(0, 7), min_size=1, max_size=4)


def _cu(values):
    return torch.tensor(values, dtype=torch.int32)


@SETTINGS
@given(lens=lengths, start=st.integers(-2, 2), swap=st.booleans(), end_delta=st.integers(-2, 2),
       max_delta=st.integers(-2, 1), causal=st.booleans())
def test_varlen_cu_seqlens_are_checked_or_right(lens, start, swap, end_delta, max_delta, causal):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    cu = [c + start if i == 0 else c for i, c in enumerate(cu)]
    if swap and len(cu) > 2:
        cu[1], cu[2] = cu[2], cu[1]
    total = sum(lens) + end_delta
    longest = max(lens) + max_delta
    q = torch.randn(max(total, 0), 2, 8, dtype=torch.float64)
    valid = start == 0 and (not swap or len(cu) <= 2 or cu[1] == cu[2]) and end_delta == 0 and max_delta >= 0
    if total < 0 or longest < 0:
        return
    call = lambda: varlen_attention(q, q, q, _cu(cu), _cu(cu), longest, longest, causal=causal)  # noqa: E731
    if not valid:
        with pytest.raises(ValueError, match=r"cu_seqlens_q|max_seqlen_q"):
            call()
        with pytest.raises(ValueError, match=r"cu_seqlens|max_seqlen"):
            AttentionLayout.varlen(_cu(cu), _cu(cu), causal, total_q=total, total_k=total, max_seqlen_q=longest,
                                   max_seqlen_k=longest)
        return
    out = call()
    ref, _ = dense_attention(q, [q], [q], [mask_varlen(cu, cu, causal)])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_max_seqlen_bounds():
    q = torch.randn(4, 2, 8)
    cu = _cu([0, 4])
    with pytest.raises(ValueError, match=r"max_seqlen_q must be a Python int in \[0, 2\*\*31 - 1\]"):
        varlen_attention(q, q, q, cu, cu, 2**31, 4)
    with pytest.raises(ValueError, match="max_seqlen_q must be in"):
        AttentionLayout.varlen(cu.cuda() if torch.cuda.is_available() else cu, cu, False, total_q=4, total_k=4,
                               max_seqlen_q=2**31, max_seqlen_k=4, check=False)


def _plan(layout):
    p = layout.plan_cpu
    return [t.clone() for t in p.tensors()], p.total_q, p.total_k


CORRUPTIONS = [
    # (tensor index, row, column, value, message)
    (0, 0, 1, 10**6, "plan.q_ranges"),            # a query range past the buffer
    (0, 0, 0, -1, "plan.q_ranges"),
    (1, -1, None, 10**4, "plan.kv_ptr"),          # CSR offsets past the entries
    (2, 0, 1, 10**6, "plan.kv_entries"),          # keys past the buffer
    (2, 0, 3, 2 << 1, "source 2"),                # an unknown source
    (3, 0, 2, 10**6, "plan.k_segments"),
    (4, 0, None, 5, "plan.q_ptr"),
    (5, 0, 1, 10**6, "plan.q_entries"),
    (5, 0, 3, 7, "causal column"),
]


@pytest.mark.parametrize("case", CORRUPTIONS, ids=lambda c: f"{c[4]}-{c[3]}")
def test_registered_op_refuses_a_corrupt_host_plan(case):
    ti, row, col, value, msg = case
    layout = AttentionLayout.from_splits([[(3, "full"), (4, "causal"), (2, "noise")], [(5, "causal")]])
    tensors, total_q, total_k = _plan(layout)
    t = tensors[ti]
    if col is None:
        t[row] = value
    else:
        t[row, col] = value
    q = torch.randn(total_q, 2, 8)
    with pytest.raises(ValueError, match=msg):
        torch.ops.unigendet.packed_attention_fwd(q, [q], [q], *tensors, 14, 14, 0.3, "torch")
    with pytest.raises(ValueError, match=msg):
        check_plan_tensors(tensors, total_q, total_k, 1)


def test_overlapping_entries_and_segments_are_refused():
    layout = AttentionLayout.from_splits([[(3, "full"), (4, "causal")]])
    tensors, total_q, total_k = _plan(layout)
    ents = tensors[2]
    tensors[2] = torch.cat([ents, ents[:1]])  # a key range counted twice for the first range
    tensors[1] = tensors[1].clone()
    tensors[1][1:] += 1
    with pytest.raises(ValueError, match="overlap within a range"):
        check_plan_tensors(tensors, total_q, total_k, 1)
    tensors, total_q, total_k = _plan(layout)
    segs = tensors[3]
    tensors[3] = torch.cat([segs, segs[:1]])
    tensors[4] = torch.cat([tensors[4], tensors[4][-1:]])
    with pytest.raises(ValueError, match="overlap within a source"):
        check_plan_tensors(tensors, total_q, total_k, 1)


@SETTINGS
@given(lens=lengths, causal=st.booleans(), seed=st.integers(0, 2**16))
def test_random_valid_layouts_match_the_dense_reference(lens, causal, seed):
    samples = [[(n, "causal" if causal else "full")] for n in lens]
    total = sum(lens)
    layout = AttentionLayout.from_splits(samples)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, 2, 8, generator=g, dtype=torch.float64)
    k = torch.randn(total, 1, 8, generator=g, dtype=torch.float64)
    out = packed_attention(q, k, k, layout)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    ref, _ = dense_attention(q, [k], [k], [mask_varlen(cu, cu, causal)])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_triton_interpreter_refuses_bfloat16():
    pytest.importorskip("triton")
    from unigendet import _backend

    if not _backend.triton_interpret():
        pytest.skip("checks the interpreter")
    q = torch.randn(6, 2, 32, dtype=torch.bfloat16)
    cu = _cu([0, 6])
    with pytest.raises(BackendUnavailableError, match="cannot multiply bfloat16"):
        varlen_attention(q, q, q, cu, cu, 6, 6, backend="triton")
    from unigendet.ops import attention_triton

    plan = AttentionLayout.varlen(cu, cu, False).plan
    with pytest.raises(ValueError, match="cannot multiply bfloat16"):
        attention_triton.packed_attention_fwd_triton(q, [q], [q], plan, 0.2)


@SETTINGS
@given(grids=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
                      min_size=1, max_size=3), scale=st.sampled_from([1.0, 1e-20, 1e20]), seed=st.integers(0, 99))
def test_diga_loss_random_grids_and_magnitudes(grids, scale, seed):
    s_grids = [(a, b) for a, b, _, _ in grids]
    t_grids = [(c, d) for _, _, c, d in grids]
    g = torch.Generator().manual_seed(seed)
    n, m = sum(a * b for a, b in s_grids), sum(c * d for c, d in t_grids)
    s = torch.randn(n, 16, generator=g) * scale
    t = torch.randn(m, 16, generator=g) * scale
    ref = diga_loss(s.double(), t.double(), s_grids, t_grids, reduction="none")
    for backend in ("torch", "cpp"):
        try:
            out = diga_loss(s, t, s_grids, t_grids, reduction="none", backend=backend)
        except BackendUnavailableError:
            continue
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="student_grids hold"):
        diga_loss(s[:-1] if n > 1 else torch.randn(2, 16), t, s_grids, t_grids)
