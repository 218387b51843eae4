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

and by *tile lists* the launchers derive from it (``(T, 2)`` int32, one row per tile: the range or segment
index and the tile's first row; index ``-1`` marks an unused row). The lists put the tiles with the most
work first (a longest-first schedule, so that the grid's tail is made of short tiles) and the programs are
laid out tile-major, head-minor: the query heads of one GQA group, which read the same K/V tiles, run side
by side.

Visibility: query ``q`` of a range sees key ``k`` of an entry iff ``k_start <= k < k_end`` and, for a
causal entry, ``k - q <= diag``. With ``s_qk = scale * <q, k>`` over the visible keys:

    lse_q = log(sum_k exp(s_qk)),    P_qk = exp(s_qk - lse_q),    O_q = sum_k P_qk V_k

Backward (``delta_q = sum_d dO_qd O_qd``):

    dV_k = sum_q P_qk dO_q,   dS_qk = P_qk (dO_q . V_k - delta_q),
    dQ_q = scale * sum_k dS_qk K_k,   dK_k = scale * sum_q dS_qk Q_q

Head dims: a head of ``HEAD_DIM`` columns is processed as two column blocks ``[0, D0)`` and
``[D0, D0 + D1)`` (``D0`` a power of two, ``D1`` zero or a power of two >= 16), so that 72 runs as 64 + 16
(10% padding) instead of 128 (44%); every matmul over the head dim is the sum (or the pair) of the two
blocks' matmuls. The tensors are contiguous ``(tokens, heads, HEAD_DIM)``: the row strides are
``heads * HEAD_DIM``, derived here from the constexpr head dim, so that the compiler knows every row start is a
multiple of ``HEAD_DIM``'s power-of-two factor (8 for 72: 16-byte vector loads for 16-bit types).

Every kernel works in log2 units (``exp2`` with ``qk_scale = scale * log2(e)``) and accumulates in fp32.
The backward has two forms. Deterministic: dQ is owned by query tiles (walking ``kv_entries``) and dK/dV by
key tiles (walking ``q_entries`` and summing the GQA group's query heads in-program), no atomics, bit-for-bit
reproducible; it recomputes P and dP in both kernels (7 matmuls per tile pair). Fast (``ATOMIC_DQ``): the
dK/dV programs also form ``dS K`` and add it to an fp32 dQ buffer with atomics (5 matmuls per tile pair, the
order of the fp32 additions, hence the last bits, vary between runs).

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


def _configs(rows):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in rows]


# Candidates per kernel; ``first_choice_index`` names the one used when autotuning is off (the default:
# reproducible, capture-safe, one compile per kernel variant); the others are timed only with autotuning on.
# Every first choice is checked ahead of time for sm_90 under the Triton releases CI installs
# (.ci/triton-aot-check: no spills, wgmma, no scalar 16-bit loads).
CONFIGS = {
    # forward: BLOCK_M queries per program x BLOCK_N keys per step
    "fwd": _configs([(128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 4, 2), (64, 64, 4, 3)]),
    # dQ: BLOCK_M queries per program, BLOCK_N keys per step
    "dq": _configs([(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2)]),
    # dK/dV: BLOCK_N keys per program (the M of every matmul: 64 or more for wgmma), BLOCK_M queries per step
    "dkdv": _configs([(32, 64, 8, 2), (32, 64, 8, 1), (16, 64, 8, 2), (16, 128, 8, 1), (16, 64, 4, 2),
                      (32, 128, 8, 1), (64, 64, 8, 1)]),
    # dK/dV with the atomic dQ: a dQ tile beside dK and dV. BLOCK_M = 64 puts the dQ matmul on wgmma too; above
    # head dim 64 that tile spills, so 32 queries per step there (the dQ matmul then runs on mma.sync).
    "dkdv_atomic": _configs([(64, 64, 8, 1), (32, 128, 8, 1), (32, 64, 8, 2), (64, 128, 8, 1)]),
}
# The small tiles for fp32 (whose IEEE matmuls run on FMA units and whose wider elements spill large tiles).
FP32_CONFIG = {"fwd": (32, 16, 8, 2), "dq": (32, 16, 8, 2), "dkdv": (16, 32, 8, 1), "dkdv_atomic": (16, 32, 8, 1)}


def first_choice_index(kernel: str, head_dim: int, num_sources: int = 1, arch: int = 90) -> int:
    """Index in ``CONFIGS[kernel]`` of the configuration used without autotuning (16-bit dtypes) on sm_``arch``.

    Chosen from the ahead-of-time check under Triton 3.6 and 3.9: the largest tiles that spill under neither.
    sm_90: 128 keys per forward step except at padded head dims (72: the second column block's registers) and
    with several sources (the per-entry source select), where 64; 64 keys per dK/dV program, pipelined up to head
    dim 72 and not at 128. sm_80 (mma.sync keeps more in registers): 64 keys per forward step, and 32 per dQ step
    above head dim 64.
    """
    if kernel == "fwd":
        if arch < 90 or (head_dim > 64 and (head_dim & (head_dim - 1) or num_sources > 1)):
            return 1
    if kernel == "dq" and arch < 90 and head_dim > 64:
        return 2
    if kernel == "dkdv" and head_dim > 72:
        return 1
    if kernel == "dkdv_atomic" and head_dim > 64:
        return 1
    return 0


def atomic_dq_supported(arch: int) -> bool:
    """The atomic-dQ backward needs Hopper's bulk tensor reductions: element atomics beside dK/dV spill on sm_80,
    where ``deterministic=False`` runs the deterministic kernels instead."""
    return arch >= 90


PREPROCESS_BLOCK_T = 64


def head_dim_split(head_dim: int, max_block: int = 128) -> tuple[int, int]:
    """(D0, D1): the column blocks a head of ``head_dim`` columns is processed in (see the module docstring);
    ``max_block`` caps D0 (two blocks of 64 for 128 lower a kernel's peak register use)."""
    d0 = min(max(16, 1 << (int(head_dim).bit_length() - 1)), max_block)
    if d0 >= head_dim:
        return d0, 0
    if 2 * d0 == head_dim:
        return d0, d0
    d1 = max(16, 1 << (int(head_dim - d0) - 1).bit_length())
    if d0 + d1 >= 2 * d0:  # no gain over padding to the next power of two
        return 2 * d0, 0
    return d0, d1


# Lengths and head counts change from batch to batch and model to model: never specialise the kernels on their
# values (Triton would otherwise compile a variant per divisibility class; the row strides' divisibility comes
# from the constexpr head dim instead).
_RUNTIME_INTS = ["total_q", "H", "HKV"]

# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_cols(base, rows, row_stride, OFF: tl.constexpr, BD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Columns ``[OFF, OFF + BD)`` of the rows ``base + rows * row_stride`` (columns past HEAD_DIM read 0)."""
    cols = OFF + tl.arange(0, BD)
    ptrs = base + (rows[:, None] * row_stride + cols[None, :])
    if OFF + BD > HEAD_DIM:
        x = tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store_cols(base, rows, row_stride, x, row_mask, OFF: tl.constexpr, BD: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    cols = OFF + tl.arange(0, BD)
    ptrs = base + (rows[:, None] * row_stride + cols[None, :])
    if OFF + BD > HEAD_DIM:
        tl.store(ptrs, x, mask=row_mask[:, None] & (cols < HEAD_DIM)[None, :])
    else:
        tl.store(ptrs, x, mask=row_mask[:, None])


@triton.jit
def _load_head(base, rows, row_stride, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Both column blocks of the rows ``base + rows * row_stride`` (the second is the first when D1 == 0)."""
    x0 = _load_cols(base, rows, row_stride, 0, D0, HEAD_DIM)
    if D1 > 0:
        x1 = _load_cols(base, rows, row_stride, D0, D1, HEAD_DIM)
    else:
        x1 = x0
    return x0, x1


@triton.jit
def _load_entry(KvEntries, e, K0, V0, K1, V1, K2, V2, kv_col, NUM_SOURCES: tl.constexpr):
    """Entry ``e`` of the plan: its key range, diagonal, causal flag and its source's K/V bases at ``kv_col``."""
    k_start = tl.load(KvEntries + 4 * e)
    k_end = tl.load(KvEntries + 4 * e + 1)
    diag = tl.load(KvEntries + 4 * e + 2)
    flags = tl.load(KvEntries + 4 * e + 3)
    src = flags >> 1
    kb = _select_source(src, K0, K1, K2, NUM_SOURCES) + kv_col
    vb = _select_source(src, V0, V1, V2, NUM_SOURCES) + kv_col
    return k_start, k_end, diag, flags & 1, kb, vb


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


@triton.jit
def _entry_bounds(k_start, k_end, diag, causal, m_first, m_last, BLOCK_N: tl.constexpr):
    """Key tiles of one entry for queries [m_first, m_last]: ``[k_start, mid)`` visible to every query (no mask),
    ``[mid, hi)`` partly visible (masked); keys past ``hi`` are visible to none."""
    full_hi = k_end
    hi = k_end
    if causal != 0:
        full_hi = tl.minimum(k_end, m_first + diag + 1)
        hi = tl.minimum(k_end, m_last + diag + 1)
    n_full = tl.maximum(full_hi - k_start, 0) // BLOCK_N
    return k_start + n_full * BLOCK_N, hi


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, kb, vb, KD0, KD1, VD0, VD1, kv_col, offs_m, lo, hi, k_end, diag,
               causal, kv_stride, qk_scale,
               HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, USE_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Online-softmax update of one query tile over the key tiles ``[lo, hi)`` of one entry.

    ``MASKED=False`` is the bulk path (every key of every tile is in range and visible to every query of the
    tile: no mask, software-pipelined); ``MASKED=True`` handles the ragged end and the causal diagonal (one or
    two tiles, not pipelined).
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASKED else None):
        offs_n = start_n + offs_n0
        # 1. The key tile: TMA (rows past the tensor read 0) or pointers (rows past the entry read its last key).
        if USE_TMA:
            k0 = KD0.load([start_n, kv_col])
        else:
            if MASKED:
                rel = tl.minimum(offs_n0, k_end - 1 - start_n)
            else:
                rel = offs_n0
            kt = kb + tl.cast(start_n, tl.int64) * kv_stride
            k0 = _load_cols(kt, rel, kv_stride, 0, D0, HEAD_DIM)
        qk = tl.dot(q0, tl.trans(k0), input_precision=INPUT_PRECISION)
        if D1 > 0:
            if USE_TMA:
                k1 = KD1.load([start_n, kv_col + D0])
            else:
                k1 = _load_cols(kt, rel, kv_stride, D0, D1, HEAD_DIM)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=INPUT_PRECISION)
        qk = qk * qk_scale
        # 2. Mask keys past the entry end and, for causal entries, keys past the diagonal.
        if MASKED:
            visible = (offs_n[None, :] < k_end) & ((offs_n[None, :] - offs_m[:, None] <= diag) | (causal == 0))
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
        # 4. Accumulate P @ V (per column block).
        if USE_TMA:
            v0 = VD0.load([start_n, kv_col])
        else:
            vt = vb + tl.cast(start_n, tl.int64) * kv_stride
            v0 = _load_cols(vt, rel, kv_stride, 0, D0, HEAD_DIM)
        p = p.to(v0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=INPUT_PRECISION)
        if D1 > 0:
            if USE_TMA:
                v1 = VD1.load([start_n, kv_col + D0])
            else:
                v1 = _load_cols(vt, rel, kv_stride, D0, D1, HEAD_DIM)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _packed_attention_fwd_kernel(
    Q, K0, V0, K1, V1, K2, V2, Out, Lse,
    KD0, KD1, VD0, VD1,
    Tiles, QRanges, KvPtr, KvEntries,
    total_q, H, HKV, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, NUM_SOURCES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Packed attention forward. Grid: (tiles x H,), program ``pid`` = tile ``pid // H``, head ``pid % H``.

    Each program owns BLOCK_M queries of one range (a row of ``Tiles``) and one head ``h`` (kv head
    ``h // (H // HKV)``) and walks the range's entries; per entry it reads K/V from source ``src`` and visits
    only the key tiles that some query of the tile can see (causal tiles past the diagonal are skipped, tiles
    fully below it run unmasked). Writes ``O`` and ``lse`` (natural log); a query with no visible key gets
    ``O = 0`` and ``lse = -inf``. ``USE_TMA``: K/V tiles come through the tensor descriptors ``KD*``/``VD*``
    (one source, exact column blocks) instead of pointers.
    """
    pid = tl.program_id(0)
    tile = pid // H
    h = pid % H
    # 1. This program's query tile; unused rows of the tile list exit at once.
    r = tl.load(Tiles + 2 * tile)
    if r < 0:
        return
    m_start = tl.load(Tiles + 2 * tile + 1)
    q_end = tl.load(QRanges + 2 * r + 1)
    kvh = h // (H // HKV)
    q_stride = H * HEAD_DIM
    kv_stride = HKV * HEAD_DIM
    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_end
    # Rows past the range read its last row instead of being masked (results never stored); the tile's
    # address is a 64-bit scalar base plus small int32 offsets.
    rel_m = tl.minimum(tl.arange(0, BLOCK_M), q_end - 1 - m_start)
    q_base = Q + (m_start.to(tl.int64) * q_stride + h * HEAD_DIM)
    q0, q1 = _load_head(q_base, rel_m, q_stride, D0, D1, HEAD_DIM)
    m_last = tl.minimum(m_start + BLOCK_M, q_end) - 1

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], dtype=tl.float32)
    kv_col = kvh * HEAD_DIM

    # 2. Walk the entries of this range: an unmasked bulk and a masked tail each.
    e_lo = tl.load(KvPtr + r)
    e_hi = tl.load(KvPtr + r + 1)
    for e in range(e_lo, e_hi):
        k_start, k_end, diag, causal, kb, vb = _load_entry(KvEntries, e, K0, V0, K1, V1, K2, V2, kv_col, NUM_SOURCES)
        mid, hi = _entry_bounds(k_start, k_end, diag, causal, m_start, m_last, BLOCK_N)
        acc0, acc1, l_i, m_i = _fwd_inner(
            acc0, acc1, l_i, m_i, q0, q1, kb, vb, KD0, KD1, VD0, VD1, kv_col, offs_m, k_start, mid, k_end, diag,
            causal, kv_stride, qk_scale, HEAD_DIM, D0, D1, BLOCK_N, False, USE_TMA, INPUT_PRECISION)
        acc0, acc1, l_i, m_i = _fwd_inner(
            acc0, acc1, l_i, m_i, q0, q1, kb, vb, KD0, KD1, VD0, VD1, kv_col, offs_m, mid, hi, k_end, diag,
            causal, kv_stride, qk_scale, HEAD_DIM, D0, D1, BLOCK_N, True, USE_TMA, INPUT_PRECISION)

    # 3. Normalise; rows without a visible key give O = 0, lse = -inf.
    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_base = Out + (m_start.to(tl.int64) * q_stride + h * HEAD_DIM)
    rows = tl.arange(0, BLOCK_M)
    _store_cols(o_base, rows, q_stride, (acc0 * inv_l[:, None]).to(Out.dtype.element_ty), m_mask, 0, D0, HEAD_DIM)
    if D1 > 0:
        _store_cols(o_base, rows, q_stride, (acc1 * inv_l[:, None]).to(Out.dtype.element_ty), m_mask, D0, D1,
                    HEAD_DIM)
    tl.store(Lse + h.to(tl.int64) * total_q + offs_m, lse, mask=m_mask)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _packed_attention_bwd_preprocess_kernel(
    Out, DOut, Delta, total_q, H,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32. Grid: (cdiv(total_q, BLOCK_T), H)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < total_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    off = offs_t.to(tl.int64)[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    o = tl.load(Out + off, mask=mask, other=0.0)
    do = tl.load(DOut + off, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + h.to(tl.int64) * total_q + offs_t, delta, mask=offs_t < total_q)


@triton.jit
def _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, delta, kb, vb, offs_m, lo, hi, k_end, diag, causal, kv_stride,
              qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dQ accumulation (unscaled) of one query tile over the key tiles ``[lo, hi)`` of one entry."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASKED else None):
        offs_n = start_n + offs_n0
        if MASKED:
            rel = tl.minimum(offs_n0, k_end - 1 - start_n)
        else:
            rel = offs_n0
        kt = kb + tl.cast(start_n, tl.int64) * kv_stride
        vt = vb + tl.cast(start_n, tl.int64) * kv_stride
        # 1. Recompute P from the saved log-sum-exp (log2 units).
        k0 = _load_cols(kt, rel, kv_stride, 0, D0, HEAD_DIM)
        qk = tl.dot(q0, tl.trans(k0), input_precision=INPUT_PRECISION)
        v0 = _load_cols(vt, rel, kv_stride, 0, D0, HEAD_DIM)
        dp = tl.dot(do0, tl.trans(v0), input_precision=INPUT_PRECISION)
        if D1 > 0:
            k1 = _load_cols(kt, rel, kv_stride, D0, D1, HEAD_DIM)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=INPUT_PRECISION)
            v1 = _load_cols(vt, rel, kv_stride, D0, D1, HEAD_DIM)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=INPUT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            visible = (offs_n[None, :] < k_end) & ((offs_n[None, :] - offs_m[:, None] <= diag) | (causal == 0))
            p = tl.where(visible, p, 0.0)
        # 2. dS = P * (dO V^T - delta); dQ += dS K.
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 = tl.dot(ds, k0, dq0, input_precision=INPUT_PRECISION)
        if D1 > 0:
            dq1 = tl.dot(ds, k1, dq1, input_precision=INPUT_PRECISION)
    return dq0, dq1


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _packed_attention_bwd_dq_kernel(
    Q, K0, V0, K1, V1, K2, V2, DOut, Lse, Delta, DQ,
    Tiles, QRanges, KvPtr, KvEntries,
    total_q, H, HKV, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, NUM_SOURCES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of packed attention (deterministic form). Grid: (tiles x H,), laid out as the forward's.

    Each program owns BLOCK_M queries of one head and walks the same entries and key tiles as the forward,
    recomputing ``P = exp2(qk_scale * Q K^T - lse * log2(e))``; it is the only writer of its dQ rows, hence
    deterministic. Rows with ``lse = -inf`` (nothing visible) contribute nothing.
    """
    pid = tl.program_id(0)
    tile = pid // H
    h = pid % H
    r = tl.load(Tiles + 2 * tile)
    if r < 0:
        return
    m_start = tl.load(Tiles + 2 * tile + 1)
    q_end = tl.load(QRanges + 2 * r + 1)
    kvh = h // (H // HKV)
    q_stride = H * HEAD_DIM
    kv_stride = HKV * HEAD_DIM
    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_end
    # Rows past the range read its last row (see the forward); lse = +inf for them below, so P = 0.
    rel_m = tl.minimum(tl.arange(0, BLOCK_M), q_end - 1 - m_start)
    base = m_start.to(tl.int64) * q_stride + h * HEAD_DIM
    q0, q1 = _load_head(Q + base, rel_m, q_stride, D0, D1, HEAD_DIM)
    do0, do1 = _load_head(DOut + base, rel_m, q_stride, D0, D1, HEAD_DIM)
    lse = tl.load(Lse + h.to(tl.int64) * total_q + offs_m, mask=m_mask, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + h.to(tl.int64) * total_q + offs_m, mask=m_mask, other=0.0)
    m_last = tl.minimum(m_start + BLOCK_M, q_end) - 1
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], dtype=tl.float32)
    kv_col = kvh * HEAD_DIM

    e_lo = tl.load(KvPtr + r)
    e_hi = tl.load(KvPtr + r + 1)
    for e in range(e_lo, e_hi):
        k_start, k_end, diag, causal, kb, vb = _load_entry(KvEntries, e, K0, V0, K1, V1, K2, V2, kv_col, NUM_SOURCES)
        mid, hi = _entry_bounds(k_start, k_end, diag, causal, m_start, m_last, BLOCK_N)
        dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, delta, kb, vb, offs_m, k_start, mid, k_end, diag,
                             causal, kv_stride, qk_scale, HEAD_DIM, D0, D1, BLOCK_N, False, INPUT_PRECISION)
        dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, delta, kb, vb, offs_m, mid, hi, k_end, diag,
                             causal, kv_stride, qk_scale, HEAD_DIM, D0, D1, BLOCK_N, True, INPUT_PRECISION)

    # dQ = scale * sum_k dS K.
    rows = tl.arange(0, BLOCK_M)
    _store_cols(DQ + base, rows, q_stride, (dq0 * sm_scale).to(DQ.dtype.element_ty), m_mask, 0, D0, HEAD_DIM)
    if D1 > 0:
        _store_cols(DQ + base, rows, q_stride, (dq1 * sm_scale).to(DQ.dtype.element_ty), m_mask, D0, D1, HEAD_DIM)


@triton.jit
def _dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, dq_base, DQDesc0, DQDesc1,
                dq_col, offs_n, n_valid, lo, hi, q_end, diag, q_stride, qk_scale, sm_scale,
                HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr, USE_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dK/dV accumulation of one key tile over the query tiles ``[lo, hi)`` of one query entry and head.

    Works on the transposed problem (keys as rows: the M of every matmul is the key tile) so that the tile's
    dK, dV stay in registers. ``MASKED=True`` applies the causal rule (query ``q`` sees key ``k`` iff
    ``k - q <= diag``); rows past ``q_end`` read the last row and get ``lse = +inf`` (P = 0). ``ATOMIC_DQ``
    also adds ``scale * dS K`` to the fp32 dQ buffer: with bulk tensor reductions through ``DQDesc*`` when
    ``USE_TMA`` (its columns ``dq_col`` on), else element atomics at ``dq_base``.
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in tl.range(lo, hi, BLOCK_M, num_stages=1 if MASKED else None):
        offs_m = start_m + offs_m0
        m_mask = offs_m < q_end
        rel = tl.minimum(offs_m0, q_end - 1 - start_m)
        row0 = tl.cast(start_m, tl.int64) * q_stride
        q0 = _load_cols(q_base + row0, rel, q_stride, 0, D0, HEAD_DIM)
        do0 = _load_cols(do_base + row0, rel, q_stride, 0, D0, HEAD_DIM)
        lse = tl.load(lse_base + offs_m, mask=m_mask, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(delta_base + offs_m, mask=m_mask, other=0.0)
        # 1. P^T (keys x queries) from the saved log-sum-exp; dP^T = V dO^T.
        qkT = tl.dot(k0, tl.trans(q0), input_precision=INPUT_PRECISION)
        dpT = tl.dot(v0, tl.trans(do0), input_precision=INPUT_PRECISION)
        if D1 > 0:
            q1 = _load_cols(q_base + row0, rel, q_stride, D0, D1, HEAD_DIM)
            do1 = _load_cols(do_base + row0, rel, q_stride, D0, D1, HEAD_DIM)
            qkT = tl.dot(k1, tl.trans(q1), qkT, input_precision=INPUT_PRECISION)
            dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=INPUT_PRECISION)
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:
            pT = tl.where(offs_n[:, None] - offs_m[None, :] <= diag, pT, 0.0)
        # 2. dV += P^T dO.
        pT16 = pT.to(do0.dtype)
        dv0 = tl.dot(pT16, do0, dv0, input_precision=INPUT_PRECISION)
        if D1 > 0:
            dv1 = tl.dot(pT16, do1, dv1, input_precision=INPUT_PRECISION)
        # 3. dS^T = P^T * (dP^T - delta);  dK += dS^T Q.
        dsT = (pT * (dpT - delta[None, :])).to(q0.dtype)
        dk0 = tl.dot(dsT, q0, dk0, input_precision=INPUT_PRECISION)
        if D1 > 0:
            dk1 = tl.dot(dsT, q1, dk1, input_precision=INPUT_PRECISION)
        # 4. (fast form) dQ += scale * dS K, accumulated across key tiles with fp32 atomics. Keys past the
        #    segment read its last key: their columns of dS must not reach dQ.
        if ATOMIC_DQ:
            ds = tl.trans(tl.where(n_valid[:, None], dsT, 0.0).to(q0.dtype))
            part0 = tl.dot(ds, k0, input_precision=INPUT_PRECISION) * sm_scale
            if D1 > 0:
                part1 = tl.dot(ds, k1, input_precision=INPUT_PRECISION) * sm_scale
            if USE_TMA:
                # One bulk reduction per tile (cp.reduce.async.bulk.tensor): rows past q_end add exact zeros
                # (their P is 0), padded columns add zeros too (their K columns are 0), rows past the tensor
                # are clipped.
                DQDesc0.atomic_add([start_m, dq_col], part0)
                if D1 > 0:
                    DQDesc1.atomic_add([start_m, dq_col + D0], part1)
            else:
                cols0 = tl.arange(0, D0)
                ptrs = dq_base + row0 + (offs_m0[:, None] * q_stride + cols0[None, :])
                tl.atomic_add(ptrs, part0, mask=m_mask[:, None] & (cols0 < HEAD_DIM)[None, :], sem="relaxed")
                if D1 > 0:
                    cols1 = D0 + tl.arange(0, D1)
                    ptrs1 = dq_base + row0 + (offs_m0[:, None] * q_stride + cols1[None, :])
                    tl.atomic_add(ptrs1, part1, mask=m_mask[:, None] & (cols1 < HEAD_DIM)[None, :], sem="relaxed")
    return dk0, dk1, dv0, dv1


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _packed_attention_bwd_dkdv_kernel(
    Q, K0, V0, K1, V1, K2, V2, DK0, DV0, DK1, DV1, DK2, DV2, DOut, Lse, Delta, DQAcc, DQDesc0, DQDesc1,
    Tiles, KSegments, QPtr, QEntries,
    total_q, H, HKV, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, NUM_SOURCES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV (and with ``ATOMIC_DQ`` the fp32 dQ sums) of packed attention. Grid: (key tiles x HKV,).

    Program ``pid`` owns BLOCK_N keys (tile ``pid // HKV`` of the key-tile list, a segment and its first key)
    of one kv head ``pid % HKV``, keeps their dK/dV in registers and walks the segment's query entries and,
    inside, the query heads sharing that kv head (GQA summed in-program). It is the only writer of its dK/dV
    rows: deterministic, no atomics there. dK/dV buffers have the layout of K/V. ``USE_TMA`` (with ``ATOMIC_DQ``):
    the dQ sums go through the descriptors ``DQDesc*`` of the fp32 buffer viewed as (total_q, H * HEAD_DIM).
    """
    pid = tl.program_id(0)
    tile = pid // HKV
    kvh = pid % HKV
    # 1. This program's key tile; unused rows of the tile list exit at once.
    s = tl.load(Tiles + 2 * tile)
    if s < 0:
        return
    n_start = tl.load(Tiles + 2 * tile + 1)
    src = tl.load(KSegments + 3 * s)
    seg_end = tl.load(KSegments + 3 * s + 2)
    group = H // HKV
    q_stride = H * HEAD_DIM
    kv_stride = HKV * HEAD_DIM
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_valid = offs_n < seg_end
    # Keys past the segment end read its last key (their dK/dV rows are never stored).
    rel_n = tl.minimum(tl.arange(0, BLOCK_N), seg_end - 1 - n_start)
    kv_base = n_start.to(tl.int64) * kv_stride + kvh * HEAD_DIM
    kb = _select_source(src, K0, K1, K2, NUM_SOURCES) + kv_base
    vb = _select_source(src, V0, V1, V2, NUM_SOURCES) + kv_base
    k0, k1 = _load_head(kb, rel_n, kv_stride, D0, D1, HEAD_DIM)
    v0, v1 = _load_head(vb, rel_n, kv_stride, D0, D1, HEAD_DIM)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], dtype=tl.float32)
    n_last = n_start + BLOCK_N - 1

    # 2. Walk the query entries that see this segment, then the query heads of the GQA group.
    f_lo = tl.load(QPtr + s)
    f_hi = tl.load(QPtr + s + 1)
    for f in range(f_lo, f_hi):
        q_start = tl.load(QEntries + 4 * f)
        q_end = tl.load(QEntries + 4 * f + 1)
        diag = tl.load(QEntries + 4 * f + 2)
        causal = tl.load(QEntries + 4 * f + 3)
        # 3. Query tiles [lo, mid) straddle the causal diagonal (masked); [mid, q_end) see every key of the
        #    tile (unmasked). Tiles before lo see none of it and are skipped.
        lo = q_start
        mid = q_start
        if causal != 0:
            first_q = tl.minimum(tl.maximum(n_start - diag, q_start), q_end)
            lo = q_start + ((first_q - q_start) // BLOCK_M) * BLOCK_M
            full_q = tl.minimum(tl.maximum(n_last - diag, q_start), q_end)
            mid = q_start + tl.cdiv(full_q - q_start, BLOCK_M) * BLOCK_M
            mid = tl.maximum(tl.minimum(mid, q_end), lo)
        for g in range(0, group):
            h = kvh * group + g
            head = h * HEAD_DIM
            q_base = Q + head
            do_base = DOut + head
            dq_base = DQAcc + head
            lse_base = Lse + h.to(tl.int64) * total_q
            delta_base = Delta + h.to(tl.int64) * total_q
            dk0, dk1, dv0, dv1 = _dkdv_inner(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, dq_base, DQDesc0, DQDesc1,
                head, offs_n, n_valid, lo, mid, q_end, diag, q_stride, qk_scale, sm_scale, HEAD_DIM, D0, D1, BLOCK_M,
                True, ATOMIC_DQ, USE_TMA, INPUT_PRECISION)
            dk0, dk1, dv0, dv1 = _dkdv_inner(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, dq_base, DQDesc0, DQDesc1,
                head, offs_n, n_valid, mid, q_end, q_end, diag, q_stride, qk_scale, sm_scale, HEAD_DIM, D0, D1,
                BLOCK_M, False, ATOMIC_DQ, USE_TMA, INPUT_PRECISION)

    # 4. Store dK = scale * sum_q dS^T Q and dV.
    rows = tl.arange(0, BLOCK_N)
    dkb = _select_source(src, DK0, DK1, DK2, NUM_SOURCES) + kv_base
    dvb = _select_source(src, DV0, DV1, DV2, NUM_SOURCES) + kv_base
    _store_cols(dkb, rows, kv_stride, (dk0 * sm_scale).to(DK0.dtype.element_ty), n_valid, 0, D0, HEAD_DIM)
    _store_cols(dvb, rows, kv_stride, dv0.to(DV0.dtype.element_ty), n_valid, 0, D0, HEAD_DIM)
    if D1 > 0:
        _store_cols(dkb, rows, kv_stride, (dk1 * sm_scale).to(DK0.dtype.element_ty), n_valid, D0, D1, HEAD_DIM)
        _store_cols(dvb, rows, kv_stride, dv1.to(DV0.dtype.element_ty), n_valid, D0, D1, HEAD_DIM)
