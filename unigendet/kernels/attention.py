"""Triton kernels for packed (varlen / multimodal / multi-source) attention, forward and backward.

One kernel family serves plain varlen attention, BAGEL-style packed layouts (full, causal and noise
splits) and symbiotic multi-source attention (queries attending to up to three separate K/V tensors).
The work is described by a *kernel plan* of int32 tensors (see ``unigendet.ops.layout``):

``q_ranges``  (R, 2)   query ranges ``[q_start, q_end)``.
``kv_ptr``    (R+1,)   CSR offsets of each range's entries in ``kv_entries``.
``kv_entries`` (E, 4)  ``(k_start, k_end, diag, flags)``; ``causal = flags & 1``, ``src = flags >> 1``.
``k_segments`` (S, 3)  ``(src, k_start, k_end)``: disjoint key segments.
``q_ptr``     (S+1,)   CSR offsets of each segment's query entries in ``q_entries``.
``q_entries`` (F, 4)   ``(q_start, q_end, diag, causal)``.

Visibility: query ``q`` of a range sees key ``k`` of an entry iff ``k_start <= k < k_end`` and, for a
causal entry, ``k - q <= diag``. With ``s_qk = scale * <q, k>`` over the visible keys:

    lse_q = log(sum_k exp(s_qk)),    P_qk = exp(s_qk - lse_q),    O_q = sum_k P_qk V_k

Backward (``delta_q = sum_d dO_qd O_qd``):

    dV_k = sum_q P_qk dO_q,   dS_qk = P_qk (dO_q . V_k - delta_q),
    dQ_q = scale * sum_k dS_qk K_k,   dK_k = scale * sum_q dS_qk Q_q

Every kernel works in log2 units (``exp2`` with ``qk_scale = scale * log2(e)``) and accumulates in
fp32. The backward is deterministic by construction: dQ is owned by query tiles (walking
``kv_entries``) and dK/dV by key tiles (walking ``q_entries`` and summing the GQA group's query heads
in-program), so no atomics are used.

Only ``@triton.jit`` functions and static config lists live here; nothing queries a driver at import.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# --------------------------------------------------------------------------------------------------
# Static launch configurations
# --------------------------------------------------------------------------------------------------

# One small configuration for the CPU interpreter: every program runs sequentially in numpy there.
INTERPRET_BLOCK_M = 16
INTERPRET_BLOCK_N = 16

# Candidates for the autotuner, chosen so that each kernel has spill-free configurations on sm_80 and sm_90 for the
# common head dims (checked ahead of time, without a GPU, by .ci/triton-aot-check); the last, small tile of each
# list is there for fp32, whose wider elements spill the larger tiles.
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 16, 4, 2)]
]
BWD_DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(32, 32, 4, 3), (16, 32, 4, 2), (64, 32, 4, 2), (32, 64, 8, 2), (16, 32, 4, 1)]
]
BWD_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 32, 8, 2), (128, 64, 8, 3), (128, 16, 8, 2), (64, 16, 4, 2), (32, 16, 4, 2)]
]
PREPROCESS_BLOCK_T = 64
AUTOTUNE_KEY = ["HEAD_DIM", "NUM_SOURCES"]  # the autotuner also keys on the tensors' dtypes


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptrs, row_mask, d_mask, HAS_ROW_MASK: tl.constexpr, PAD_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, masking rows and/or the padded head-dim columns only when needed."""
    if HAS_ROW_MASK:
        if PAD_D:
            x = tl.load(ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    else:
        if PAD_D:
            x = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _select_source(src, P0, P1, P2, NUM_SOURCES: tl.constexpr):
    """Base pointer of source ``src`` (a runtime scalar) among up to three same-typed tensors."""
    p = P0
    if NUM_SOURCES > 1:
        if src == 1:
            p = P1
        if src == 2:
            p = P2
    return p


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _packed_attention_fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, offs_m, offs_d, lo, hi, k_end, diag, causal,
    stride_kt, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Online-softmax update of one query tile over key tiles ``[lo, hi)`` of one entry.

    ``MASKED=False`` is the bulk path: every key of every tile is in range and visible to every query
    of the tile, so no mask is built. ``MASKED=True`` handles the ragged end of the entry and the
    causal diagonal.
    """
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    d_mask = offs_d < HEAD_DIM
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < k_end
        kv_off = offs_n.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
        # 1. Load the key tile and compute the scaled scores in log2 units.
        k = _load_rows(k_base + kv_off, n_mask, d_mask, MASKED, PAD_D)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        # 2. Mask keys past the entry end and, for causal entries, keys past the diagonal.
        if MASKED:
            visible = n_mask[None, :] & ((offs_n[None, :] - offs_m[:, None] <= diag) | (causal == 0))
            qk = tl.where(visible, qk, float("-inf"))
        # 3. Online softmax; a row that has seen no visible key yet keeps m = -inf, guarded here.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every key of a bulk tile is visible to every query: the running max is finite
            m_safe = m_new
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # 4. Accumulate P @ V.
        v = _load_rows(v_base + kv_off, n_mask, d_mask, MASKED, PAD_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _packed_attention_fwd_kernel(
    Q, K0, V0, K1, V1, K2, V2, Out, Lse,
    QRanges, KvPtr, KvEntries,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_lh,
    qk_scale, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SOURCES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Packed attention forward. Grid: (R query ranges, cdiv(max_q_len, BLOCK_M), H).

    Each program owns BLOCK_M queries of one range and one head ``h`` (kv head ``h // GROUP``) and
    walks the range's entries; per entry it reads K/V from source ``src`` and visits only the key
    tiles that some query of the tile can see (causal tiles past the diagonal are skipped, tiles
    fully below it run unmasked). Writes ``O`` and ``lse`` (natural log) for the tile's queries;
    a query with no visible key gets ``O = 0`` and ``lse = -inf``.
    """
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    r = tl.program_id(0)
    pid_m = tl.program_id(1)
    h = tl.program_id(2)
    # 1. Query tile of this program; early exit past the end of the range.
    q_start = tl.load(QRanges + 2 * r)
    q_end = tl.load(QRanges + 2 * r + 1)
    m_start = q_start + pid_m * BLOCK_M
    if m_start >= q_end:
        return
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_end
    d_mask = offs_d < HEAD_DIM
    h64 = h.to(tl.int64)
    kvh64 = (h // GROUP).to(tl.int64)
    # Rows past the range read its last row instead of being masked (a row-masked load of the tile keeps
    # registers busy for the whole kernel and makes ptxas spill); their results are never stored.
    # Addresses: a scalar 64-bit tile base plus int32 offsets inside the tile (small: rows < BLOCK_M).
    rel = tl.minimum(tl.arange(0, BLOCK_M), q_end - 1 - m_start)[:, None]
    q_base = Q + (h64 * stride_qh + m_start.to(tl.int64) * stride_qt)
    q = _load_rows(q_base + (rel * stride_qt + offs_d[None, :]), m_mask, d_mask, False, PAD_D)
    # Last query of the tile (for the causal upper bound on keys).
    q_last = tl.minimum(m_start + BLOCK_M, q_end) - 1

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # 2. Walk the entries of this range (dynamic bounds loaded from the plan).
    e_lo = tl.load(KvPtr + r)
    e_hi = tl.load(KvPtr + r + 1)
    for e in range(e_lo, e_hi):
        k_start = tl.load(KvEntries + 4 * e)
        k_end = tl.load(KvEntries + 4 * e + 1)
        diag = tl.load(KvEntries + 4 * e + 2)
        flags = tl.load(KvEntries + 4 * e + 3)
        causal = flags & 1
        src = flags >> 1
        k_base = _select_source(src, K0, K1, K2, NUM_SOURCES) + kvh64 * stride_kh
        v_base = _select_source(src, V0, V1, V2, NUM_SOURCES) + kvh64 * stride_kh
        # 3. Split the entry's keys into an unmasked bulk and a masked tail.
        #    full_hi: keys below it are visible to every query of the tile.
        #    hi: keys at or past it are visible to no query of the tile.
        full_hi = k_end
        hi = k_end
        if causal != 0:
            full_hi = tl.minimum(k_end, m_start + diag + 1)
            hi = tl.minimum(k_end, q_last + diag + 1)
        n_full = tl.maximum(full_hi - k_start, 0) // BLOCK_N
        mid = k_start + n_full * BLOCK_N
        acc, l_i, m_i = _packed_attention_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, offs_m, offs_d, k_start, mid, k_end, diag, causal,
            stride_kt, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, INPUT_PRECISION,
        )
        acc, l_i, m_i = _packed_attention_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, offs_m, offs_d, mid, hi, k_end, diag, causal,
            stride_kt, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, INPUT_PRECISION,
        )

    # 4. Normalise; rows without a visible key give O = 0, lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = Out + (h64 * stride_oh + m_start.to(tl.int64) * stride_ot) + (
        tl.arange(0, BLOCK_M)[:, None] * stride_ot + offs_d[None, :])
    if PAD_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_mask[:, None])
    tl.store(Lse + h64 * stride_lh + offs_m, lse, mask=m_mask)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _packed_attention_bwd_preprocess_kernel(
    Out, DOut, Delta, total_q,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_deltah,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32. Grid: (cdiv(total_q, BLOCK_T), H)."""
    pid = tl.program_id(0)
    h64 = tl.program_id(1).to(tl.int64)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < total_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    t64 = offs_t.to(tl.int64)[:, None]
    o = tl.load(Out + h64 * stride_oh + t64 * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOut + h64 * stride_doh + t64 * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + h64 * stride_deltah + offs_t, delta, mask=offs_t < total_q)


@triton.jit
def _packed_attention_bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, offs_m, offs_d, lo, hi, k_end, diag, causal,
    stride_kt, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dQ accumulation of one query tile over key tiles ``[lo, hi)`` of one entry (unscaled)."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    d_mask = offs_d < HEAD_DIM
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < k_end
        kv_off = offs_n.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
        k = _load_rows(k_base + kv_off, n_mask, d_mask, MASKED, PAD_D)
        v = _load_rows(v_base + kv_off, n_mask, d_mask, MASKED, PAD_D)
        # 1. Recompute P from the saved log-sum-exp (log2 units).
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        if MASKED:
            visible = n_mask[None, :] & ((offs_n[None, :] - offs_m[:, None] <= diag) | (causal == 0))
            p = tl.where(visible, p, 0.0)
        # 2. dS = P * (dO V^T - delta); dQ += dS K.
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _packed_attention_bwd_dq_kernel(
    Q, K0, V0, K1, V1, K2, V2, DOut, Lse, Delta, DQ,
    QRanges, KvPtr, KvEntries,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
    qk_scale, sm_scale, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SOURCES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of packed attention. Grid: (R query ranges, cdiv(max_q_len, BLOCK_M), H), as the forward.

    Each program owns BLOCK_M queries of one head and walks the same entries and key tiles as the
    forward, recomputing ``P = exp2(qk_scale * Q K^T - lse * log2(e))``; it is the only writer of its
    dQ rows, hence deterministic. Rows with ``lse = -inf`` (nothing visible) contribute nothing.
    """
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    r = tl.program_id(0)
    pid_m = tl.program_id(1)
    h = tl.program_id(2)
    # 1. Query tile; early exit past the end of the range.
    q_start = tl.load(QRanges + 2 * r)
    q_end = tl.load(QRanges + 2 * r + 1)
    m_start = q_start + pid_m * BLOCK_M
    if m_start >= q_end:
        return
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_end
    d_mask = offs_d < HEAD_DIM
    h64 = h.to(tl.int64)
    kvh64 = (h // GROUP).to(tl.int64)
    # Rows past the range read its last row (no row mask, see the forward); they get lse = +inf below, so P = 0.
    m0 = m_start.to(tl.int64)
    rel = tl.minimum(tl.arange(0, BLOCK_M), q_end - 1 - m_start)[:, None]
    q = _load_rows(Q + (h64 * stride_qh + m0 * stride_qt) + (rel * stride_qt + offs_d[None, :]),
                   m_mask, d_mask, False, PAD_D)
    do = _load_rows(DOut + (h64 * stride_doh + m0 * stride_dot) + (rel * stride_dot + offs_d[None, :]),
                    m_mask, d_mask, False, PAD_D)
    # 2. Rows outside the range or without any visible key get lse = +inf so that P = 0 for them.
    lse = tl.load(Lse + h64 * stride_lh + offs_m, mask=m_mask, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + h64 * stride_lh + offs_m, mask=m_mask, other=0.0)
    q_last = tl.minimum(m_start + BLOCK_M, q_end) - 1
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # 3. Walk the entries exactly as the forward does.
    e_lo = tl.load(KvPtr + r)
    e_hi = tl.load(KvPtr + r + 1)
    for e in range(e_lo, e_hi):
        k_start = tl.load(KvEntries + 4 * e)
        k_end = tl.load(KvEntries + 4 * e + 1)
        diag = tl.load(KvEntries + 4 * e + 2)
        flags = tl.load(KvEntries + 4 * e + 3)
        causal = flags & 1
        src = flags >> 1
        k_base = _select_source(src, K0, K1, K2, NUM_SOURCES) + kvh64 * stride_kh
        v_base = _select_source(src, V0, V1, V2, NUM_SOURCES) + kvh64 * stride_kh
        full_hi = k_end
        hi = k_end
        if causal != 0:
            full_hi = tl.minimum(k_end, m_start + diag + 1)
            hi = tl.minimum(k_end, q_last + diag + 1)
        n_full = tl.maximum(full_hi - k_start, 0) // BLOCK_N
        mid = k_start + n_full * BLOCK_N
        dq = _packed_attention_bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, offs_m, offs_d, k_start, mid, k_end, diag, causal,
            stride_kt, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, INPUT_PRECISION,
        )
        dq = _packed_attention_bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, offs_m, offs_d, mid, hi, k_end, diag, causal,
            stride_kt, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, INPUT_PRECISION,
        )

    # 4. Store dQ = scale * sum_k dS K.
    dq = dq * sm_scale
    dq_ptrs = DQ + (h64 * stride_dqh + m0 * stride_dqt) + (tl.arange(0, BLOCK_M)[:, None] * stride_dqt
                                                           + offs_d[None, :])
    if PAD_D:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _packed_attention_bwd_dkdv_inner(
    dk, dv, k, v, Q_h, DO_h, Lse_h, Delta_h, offs_n, offs_d, lo, hi, q_end, diag,
    stride_qt, stride_dot, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dK/dV accumulation of one key tile over query tiles ``[lo, hi)`` of one query entry and head.

    Works on the transposed problem (keys as rows) so that the tile's dK, dV stay in registers.
    ``MASKED=True`` applies the causal rule (query ``q`` sees key ``k`` iff ``k - q <= diag``); rows
    past ``q_end`` are neutralised by loading ``lse = +inf`` for them (P = 0).
    """
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    d_mask = offs_d < HEAD_DIM
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        m_mask = offs_m < q_end
        # Rows past q_end read row q_end - 1 (no row mask); lse = +inf for them makes P = 0.
        m0 = tl.cast(start_m, tl.int64)
        rel = tl.minimum(offs_m0, q_end - 1 - start_m)[:, None]
        q = _load_rows(Q_h + m0 * stride_qt + (rel * stride_qt + offs_d[None, :]), m_mask, d_mask, False, PAD_D)
        do = _load_rows(DO_h + m0 * stride_dot + (rel * stride_dot + offs_d[None, :]), m_mask, d_mask, False, PAD_D)
        lse = tl.load(Lse_h + offs_m, mask=m_mask, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(Delta_h + offs_m, mask=m_mask, other=0.0)
        # 1. P^T (keys x queries) from the saved log-sum-exp.
        qkT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
        pT = tl.math.exp2(qkT - lse2[None, :])
        if MASKED:
            pT = tl.where(offs_n[:, None] - offs_m[None, :] <= diag, pT, 0.0)
        # 2. dV += P^T dO.
        dv += tl.dot(pT.to(do.dtype), do, input_precision=INPUT_PRECISION)
        # 3. dS^T = P^T * (V dO^T - delta);  dK += dS^T Q.
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _packed_attention_bwd_dkdv_kernel(
    Q, K0, V0, K1, V1, K2, V2, DK0, DV0, DK1, DV1, DK2, DV2, DOut, Lse, Delta,
    KSegments, QPtr, QEntries,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dot, stride_doh, stride_lh,
    qk_scale, sm_scale, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SOURCES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of packed attention. Grid: (S key segments, cdiv(max_k_len, BLOCK_N), Hkv).

    Each program owns BLOCK_N keys of one segment and one kv head, keeps their dK/dV in registers
    and walks the segment's query entries and, inside, the GROUP query heads sharing that kv head
    (GQA summed in-program). It is the only writer of its rows: deterministic, no atomics.
    dK/dV buffers are written with the same strides as K/V.
    """
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    s = tl.program_id(0)
    pid_n = tl.program_id(1)
    kvh = tl.program_id(2)
    # 1. Key tile of this program; early exit past the end of the segment.
    src = tl.load(KSegments + 3 * s)
    seg_start = tl.load(KSegments + 3 * s + 1)
    seg_end = tl.load(KSegments + 3 * s + 2)
    n_start = seg_start + pid_n * BLOCK_N
    if n_start >= seg_end:
        return
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < seg_end
    d_mask = offs_d < HEAD_DIM
    kvh64 = kvh.to(tl.int64)
    # Keys past the segment end read its last key (no row mask, see the forward); their rows of dK/dV are
    # computed independently of the valid rows and never stored. Addresses: scalar 64-bit tile base + int32.
    tile_base = kvh64 * stride_kh + n_start.to(tl.int64) * stride_kt
    rel = tl.minimum(tl.arange(0, BLOCK_N), seg_end - 1 - n_start)[:, None]
    k = _load_rows(_select_source(src, K0, K1, K2, NUM_SOURCES) + tile_base + (rel * stride_kt + offs_d[None, :]),
                   n_mask, d_mask, False, PAD_D)
    v = _load_rows(_select_source(src, V0, V1, V2, NUM_SOURCES) + tile_base + (rel * stride_kt + offs_d[None, :]),
                   n_mask, d_mask, False, PAD_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Last key of the tile (for the causal lower bound on queries).
    n_last = n_start + BLOCK_N - 1

    # 2. Walk the query entries that see this segment, then the query heads of the GQA group.
    f_lo = tl.load(QPtr + s)
    f_hi = tl.load(QPtr + s + 1)
    for f in range(f_lo, f_hi):
        q_start = tl.load(QEntries + 4 * f)
        q_end = tl.load(QEntries + 4 * f + 1)
        diag = tl.load(QEntries + 4 * f + 2)
        causal = tl.load(QEntries + 4 * f + 3)
        # 3. Query tiles [lo, mid) straddle the causal diagonal (masked); [mid, q_end) see every key
        #    of the tile (unmasked). Tiles before lo see none of it and are skipped.
        lo = q_start
        mid = q_start
        if causal != 0:
            first_q = tl.minimum(tl.maximum(n_start - diag, q_start), q_end)
            lo = q_start + ((first_q - q_start) // BLOCK_M) * BLOCK_M
            full_q = tl.minimum(tl.maximum(n_last - diag, q_start), q_end)
            mid = q_start + tl.cdiv(full_q - q_start, BLOCK_M) * BLOCK_M
            mid = tl.maximum(tl.minimum(mid, q_end), lo)
        for g in range(0, GROUP):
            h64 = kvh64 * GROUP + g
            Q_h = Q + h64 * stride_qh
            DO_h = DOut + h64 * stride_doh
            Lse_h = Lse + h64 * stride_lh
            Delta_h = Delta + h64 * stride_lh
            dk, dv = _packed_attention_bwd_dkdv_inner(
                dk, dv, k, v, Q_h, DO_h, Lse_h, Delta_h, offs_n, offs_d, lo, mid, q_end, diag,
                stride_qt, stride_dot, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, INPUT_PRECISION,
            )
            dk, dv = _packed_attention_bwd_dkdv_inner(
                dk, dv, k, v, Q_h, DO_h, Lse_h, Delta_h, offs_n, offs_d, mid, q_end, q_end, diag,
                stride_qt, stride_dot, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False, INPUT_PRECISION,
            )

    # 4. Store dK = scale * sum_q dS^T Q and dV.
    dk = dk * sm_scale
    kv_off = tile_base + (tl.arange(0, BLOCK_N)[:, None] * stride_kt + offs_d[None, :])
    dk_ptrs = _select_source(src, DK0, DK1, DK2, NUM_SOURCES) + kv_off
    dv_ptrs = _select_source(src, DV0, DV1, DV2, NUM_SOURCES) + kv_off
    if PAD_D:
        mask = n_mask[:, None] & d_mask[None, :]
    else:
        mask = n_mask[:, None]
    tl.store(dk_ptrs, dk.to(DK0.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV0.dtype.element_ty), mask=mask)
